// ANSI output -> DOM spans, the way a terminal shows it (text is never parsed as HTML).
// SGR in full (bold, dim, italic, underline styles, inverse, strike, 16/256/true colours, the
// colon forms); `\r` and `\b` overwrite like a terminal; every other escape is dropped.
// CSP-safe: the 16 base colours are classes; 256 and true colours are CSS custom properties set
// through the CSSOM with values computed here from numbers, never text taken from the output.
"use strict";
const Ansi = (() => {
  // CSI (ESC [ params intermediates final; cut short at the line's end), strings (OSC, DCS,
  // SOS, PM, APC: up to BEL or ST), other escapes (ESC, intermediates, final).
  const ESCAPES = /\x1b\[([0-?]*)[ -/]*([@-~])?|\x1b[\]P^_X][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[ -/]*[0-~]?/g;
  // The panes' backgrounds (marco.css --term in each theme): foregrounds are nudged against them.
  const PANE = { light: [255, 255, 255], dark: [20, 24, 28] };
  const MIN_CONTRAST = 4.5;                            // WCAG AA for normal text
  const UNDERLINES = ["", "single", "double", "curly", "dotted", "dashed"];
  const nudged = new Map();                            // "rgb|bg" -> the rgb shown, bounded below
  const NUDGE_CACHE = 4096;

  // --- colours -------------------------------------------------------------------------------
  // A colour is null (the default), {p: 0..15} (a base colour, a class) or {rgb: [r, g, b]}.
  const CUBE = [0, 95, 135, 175, 215, 255];

  function indexed(n) {
    if (!Number.isInteger(n) || n < 0 || n > 255) return undefined;
    if (n < 16) return { p: n };
    if (n < 232) return { rgb: [CUBE[Math.floor((n - 16) / 36)], CUBE[Math.floor((n - 16) / 6) % 6], CUBE[(n - 16) % 6]] };
    const grey = 8 + (n - 232) * 10;
    return { rgb: [grey, grey, grey] };
  }

  function truecolour(r, g, b) {
    const ok = (v) => Number.isInteger(v) && v >= 0 && v <= 255;
    return ok(r) && ok(g) && ok(b) ? { rgb: [r, g, b] } : undefined;
  }

  function luminance(rgb) {
    const lin = rgb.map((v) => { const c = v / 255; return c <= 0.04045 ? c / 12.92 : Math.pow((c + 0.055) / 1.055, 2.4); });
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2];
  }

  function contrast(a, b) {
    const la = luminance(a), lb = luminance(b);
    return (Math.max(la, lb) + 0.05) / (Math.min(la, lb) + 0.05);
  }

  // Moves `rgb` away from `bg` in luminance, 10% a step (as xterm.js's minimumContrastRatio
  // does), until it reaches MIN_CONTRAST; the better direction if neither reaches it.
  function nudge(rgb, bg) {
    const key = rgb.join(",") + "|" + bg.join(",");
    const known = nudged.get(key);
    if (known) return known;
    if (nudged.size >= NUDGE_CACHE) nudged.clear();
    if (contrast(rgb, bg) >= MIN_CONTRAST) { nudged.set(key, rgb); return rgb; }
    const darker = walk(rgb, bg, (v) => Math.floor(v * 0.9));
    const lighter = walk(rgb, bg, (v) => Math.ceil(v + (255 - v) * 0.1));
    const towardsDark = luminance(bg) > 0.5;
    const first = towardsDark ? darker : lighter, second = towardsDark ? lighter : darker;
    const best = contrast(first, bg) >= MIN_CONTRAST || contrast(first, bg) >= contrast(second, bg) ? first : second;
    nudged.set(key, best);
    return best;
  }

  function walk(rgb, bg, step) {
    let c = rgb;
    for (let i = 0; i < 64 && contrast(c, bg) < MIN_CONTRAST; i++) {
      const next = c.map(step);
      if (next.every((v, k) => v === c[k])) break;
      c = next;
    }
    return c;
  }

  const css = (rgb) => `rgb(${rgb[0] | 0}, ${rgb[1] | 0}, ${rgb[2] | 0})`;

  // --- SGR -----------------------------------------------------------------------------------
  function newState() {
    return { fg: null, bg: null, bold: false, dim: false, italic: false, underline: 0,
             inverse: false, strike: false, hidden: false };
  }

  function reset(state) { Object.assign(state, newState()); }

  // An extended colour (38/48/58) from `params` at `i`: the colour (or undefined) and how many
  // parameters it took. `sub` are the colon subparameters of params[i] when it has any.
  function extended(params, i, sub) {
    if (sub.length > 1) {                               // 38:5:N, 38:2::R:G:B, 38:2:CS:R:G:B, 38:2:R:G:B
      const n = sub.slice(1).map((s) => (s === "" ? 0 : Number(s)));
      if (n[0] === 5) return [indexed(n[1]), 1];
      if (n[0] === 2) return [n.length >= 5 ? truecolour(n[2], n[3], n[4]) : truecolour(n[1], n[2], n[3]), 1];
      return [undefined, 1];
    }
    const kind = Number(params[i + 1]);                 // 38;5;N and 38;2;R;G;B
    if (kind === 5) return [indexed(Number(params[i + 2])), 3];
    if (kind === 2) return [truecolour(Number(params[i + 2]), Number(params[i + 3]), Number(params[i + 4])), 5];
    return [undefined, 1];
  }

  function apply(state, codes) {
    const params = codes === "" ? [""] : codes.split(";");
    for (let i = 0; i < params.length;) {
      const sub = params[i].split(":");
      const c = sub[0] === "" ? 0 : Number(sub[0]);
      if (c === 38 || c === 48 || c === 58) {
        const [colour, used] = extended(params, i, sub);
        if (colour !== undefined && c !== 58) state[c === 38 ? "fg" : "bg"] = colour;  // 58: underline colour, not shown
        i += used;
        continue;
      }
      simple(state, c, sub);
      i += 1;
    }
  }

  function simple(state, c, sub) {
    if (c === 0) reset(state);
    else if (c === 1) state.bold = true;
    else if (c === 2) state.dim = true;
    else if (c === 3) state.italic = true;
    else if (c === 4) state.underline = sub.length > 1 ? underlineStyle(sub[1], state.underline) : 1;
    else if (c === 7) state.inverse = true;
    else if (c === 8) state.hidden = true;
    else if (c === 9) state.strike = true;
    else if (c === 21) state.underline = 2;             // ECMA-48 and today's terminals: double underline
    else if (c === 22) { state.bold = false; state.dim = false; }
    else if (c === 23) state.italic = false;
    else if (c === 24) state.underline = 0;
    else if (c === 27) state.inverse = false;
    else if (c === 28) state.hidden = false;
    else if (c === 29) state.strike = false;
    else if (c >= 30 && c <= 37) state.fg = { p: c - 30 };
    else if (c >= 90 && c <= 97) state.fg = { p: c - 90 + 8 };
    else if (c === 39) state.fg = null;
    else if (c >= 40 && c <= 47) state.bg = { p: c - 40 };
    else if (c >= 100 && c <= 107) state.bg = { p: c - 100 + 8 };
    else if (c === 49) state.bg = null;
  }

  function underlineStyle(text, current) {
    const n = text === "" ? 0 : Number(text);
    return Number.isInteger(n) && n >= 0 && n < UNDERLINES.length ? n : current;
  }

  // --- styles on spans -----------------------------------------------------------------------
  // A style: the span's classes and the custom properties its 256/true colours need. Inverse
  // swaps the colours; a default swapped in is the pane's own background ("paper") or ink.
  function style(state) {
    const fg = state.inverse ? (state.bg || "paper") : state.fg;
    const bg = state.inverse ? (state.fg || "ink") : state.bg;
    const cls = [], props = [];
    // A true-colour background swapped in from a foreground is nudged like that foreground, so
    // the pane-coloured text on it stays readable; one the output chose is shown as it is.
    const bgs = colour(bg, "bg", cls, props, state.inverse ? paneOf : null);
    // Text in a 256/true colour is nudged against its own true-colour background, else the pane;
    // default text on a true-colour background is black or white, whichever reads better.
    colour(fg, "fg", cls, props, bgs ? (theme) => bgs[theme] : paneOf);
    if (!fg && bgs) cls.push(readableOn(bgs.light));
    if (state.bold) cls.push("ansi-bold");
    if (state.dim) cls.push("ansi-dim");
    if (state.italic) cls.push("ansi-italic");
    if (state.underline) cls.push("ansi-underline", "ansi-ul-" + UNDERLINES[state.underline]);
    if (state.strike) cls.push("ansi-strike");
    if (state.hidden) cls.push("ansi-hidden");
    return { cls: cls.join(" "), props };
  }

  const paneOf = (theme) => PANE[theme];
  const readableOn = (rgb) => (contrast(rgb, [0, 0, 0]) >= contrast(rgb, [255, 255, 255]) ? "ansi-on-light" : "ansi-on-dark");

  // Adds one colour's class (and custom properties, for a 256/true colour, per theme: nudged to
  // MIN_CONTRAST against `against(theme)` when given); the rgb shown per theme, or null.
  function colour(c, where, cls, props, against) {
    if (!c) return null;
    if (c === "paper" || c === "ink") { cls.push(`ansi-${where}-${c}`); return null; }
    if (c.p !== undefined) { cls.push((where === "fg" ? "ansi-c" : "ansi-b") + c.p); return null; }
    cls.push("ansi-" + where + "x");
    const shown = {};
    for (const theme of ["light", "dark"]) {
      shown[theme] = against ? nudge(c.rgb, against(theme)) : c.rgb;
      props.push([`--ansi-${where}-${theme}`, css(shown[theme])]);
    }
    return shown;
  }

  function span(text, st) {
    const s = document.createElement("span");
    s.className = st.cls;
    for (const [name, value] of st.props) s.style.setProperty(name, value);
    s.textContent = text;
    return s;
  }

  function appendText(element, text, st) {
    if (!text) return;
    if (st.cls) element.appendChild(span(text, st));
    else element.appendChild(document.createTextNode(text));
  }

  // --- lines ---------------------------------------------------------------------------------
  // The line as runs of text with their style, escapes applied to `state` on the way.
  function segments(line, state) {
    const out = [];
    let last = 0, match;
    ESCAPES.lastIndex = 0;
    while ((match = ESCAPES.exec(line)) !== null) {
      if (match.index > last) out.push([line.slice(last, match.index), style(state)]);
      if (match[2] === "m" && !/^[<=>?]/.test(match[1])) apply(state, match[1]);
      last = ESCAPES.lastIndex;
    }
    if (last < line.length) out.push([line.slice(last), style(state)]);
    return out;
  }

  // Like a terminal: after `\r` text overwrites from column 0, `\b` steps one column back;
  // each character keeps its own style. Cells are code points.
  function overwrite(segs) {
    const cells = [];
    let col = 0;
    for (const [text, st] of segs) {
      for (const ch of text) {
        if (ch === "\r") col = 0;
        else if (ch === "\b") col = Math.max(0, col - 1);
        else { cells[col] = [ch, st]; col++; }
      }
    }
    const out = [];
    for (let i = 0; i < cells.length; i++) {
      const [ch, st] = cells[i] || [" ", NO_STYLE];
      const prev = out[out.length - 1];
      if (prev && prev[1] === st) prev[0] += ch; else out.push([ch, st]);
    }
    return out;
  }
  const NO_STYLE = { cls: "", props: [] };

  // Append `line` to `element`; `state` carries styles across lines of one stream.
  function render(element, line, state) {
    line = String(line);
    if (line.indexOf("\x1b") < 0 && line.indexOf("\r") < 0 && line.indexOf("\b") < 0) {
      appendText(element, line, style(state));
      return;
    }
    let segs = segments(line, state);
    if (line.indexOf("\r") >= 0 || line.indexOf("\b") >= 0) segs = overwrite(segs);
    for (const [text, st] of segs) appendText(element, text, st);
  }

  return { render, newState, contrast, nudge, indexed, PANE, MIN_CONTRAST };
})();
