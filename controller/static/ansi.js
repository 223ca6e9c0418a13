// ANSI SGR colours -> DOM spans (text is never parsed as HTML).
"use strict";
const Ansi = (() => {
  const SGR = /\x1b\[([0-9;]*)m/g;
  const OTHER = /\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07/g;  // cursor moves, titles: dropped

  function apply(state, codes) {
    const list = codes === "" ? [0] : codes.split(";").map(Number);
    for (let i = 0; i < list.length; i++) {
      const c = list[i];
      if (c === 0) { state.fg = null; state.bg = null; state.bold = false; state.dim = false; state.underline = false; }
      else if (c === 1) state.bold = true;
      else if (c === 2) state.dim = true;
      else if (c === 4) state.underline = true;
      else if (c === 22) { state.bold = false; state.dim = false; }
      else if (c === 24) state.underline = false;
      else if (c >= 30 && c <= 37) state.fg = "c" + (c - 30);
      else if (c >= 90 && c <= 97) state.fg = "c" + (c - 90 + 8);
      else if (c === 39) state.fg = null;
      else if (c >= 40 && c <= 47) state.bg = "b" + (c - 40);
      else if (c >= 100 && c <= 107) state.bg = "b" + (c - 100 + 8);
      else if (c === 49) state.bg = null;
      else if ((c === 38 || c === 48) && list[i + 1] === 5) { i += 2; }   // 256 colours: ignored
      else if ((c === 38 || c === 48) && list[i + 1] === 2) { i += 4; }   // true colour: ignored
    }
  }

  function classes(state) {
    const out = [];
    if (state.fg) out.push("ansi-" + state.fg);
    if (state.bg) out.push("ansi-" + state.bg);
    if (state.bold) out.push("ansi-bold");
    if (state.dim) out.push("ansi-dim");
    if (state.underline) out.push("ansi-underline");
    return out.join(" ");
  }

  function appendText(element, text, state) {
    if (!text) return;
    const cls = classes(state);
    if (cls) { const span = document.createElement("span"); span.className = cls; span.textContent = text; element.appendChild(span); }
    else element.appendChild(document.createTextNode(text));
  }

  // Escapes other than colours (cursor moves, titles, stray ESC) are dropped.
  function plain(text) { return text.replace(OTHER, "").replace(/\x1b/g, ""); }

  // Append `line` to `element`; `state` carries colours across lines of one stream.
  function render(element, line, state) {
    if (line.indexOf("\x1b") < 0) { appendText(element, line, state); return; }
    let last = 0, match;
    SGR.lastIndex = 0;
    while ((match = SGR.exec(line)) !== null) {
      appendText(element, plain(line.slice(last, match.index)), state);
      apply(state, match[1]);
      last = SGR.lastIndex;
    }
    appendText(element, plain(line.slice(last)), state);
  }

  return { render, newState: () => ({ fg: null, bg: null, bold: false, dim: false, underline: false }) };
})();
