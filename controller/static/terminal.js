"use strict";
// Terminals (issue 16, docs/terminals.md): a real shell on a node in the page, rendered by the
// vendored xterm.js, through the controller's relay /terminal/NODE (the page never holds an
// agent token). Several side by side; "Type into all" sends the keystrokes typed in a ticked
// terminal to every ticked one (like cluster-ssh). Needs vendor/xterm/xterm.js, addon-fit.js
// and style_nonce.js (the page's CSP) loaded first.

const MAX_TERMINALS = 16;        // panes one page holds at once (each a socket and a session)
const TERM_SCROLLBACK = 5000;    // lines each terminal keeps above its screen
const TERM_NAME = "xterm-256color";
// What each of the relay's and agent's close codes means, said in the pane.
const CLOSE_REASONS = {
  1000: "the connection closed",
  1001: "the controller is going away",
  1006: "the connection was lost",
  1011: "the controller failed",
  4400: "a message was refused",
  4401: "not logged in, or the login expired",
  4403: "refused (no login shell on the node, or terminals are off there)",
  4404: "no such session (it ended, or is not yours)",
  4408: "too much input was waiting for the node",
  4409: "the session was taken over by another connection of yours",
  4429: "too many terminals open on that node, or through the controller",
  4502: "the node's agent could not be reached, or its connection broke",
};
const EXIT_REASONS = {
  exited: "the shell ended",
  idle: "idle too long",
  expired: "the login expired",
  "logged out": "logged out",
  stopping: "the agent stopped",
  detached: "left detached past the node's grace time",
};
// The close code of a session another connection of the same user reattached to.
const TAKEN_OVER = 4409;

const termEl = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};

// The terminal's colours: dark whatever the page's theme, as terminals usually are.
const TERM_THEME = {
  background: "#14181c", foreground: "#d8dee4", cursor: "#d8dee4",
  selectionBackground: "#3a4f66", red: "#e5534b", green: "#57ab5a",
};

function termOptions(extra = {}) {
  return {
    scrollback: TERM_SCROLLBACK,
    fontFamily: "ui-monospace, 'DejaVu Sans Mono', Menlo, Consolas, monospace",
    fontSize: 13,
    theme: TERM_THEME,
    ...extra,
  };
}

// `url` as a path of this site's run pages (/runs/...), or null: a recording link never leads
// elsewhere, whatever the message says ("//host", "/\\host" and "https:" URLs are refused).
function sameSiteRun(url) {
  if (typeof url !== "string" || !url) return null;
  let parsed;
  try { parsed = new URL(url, location.href); } catch (e) { return null; }
  if (parsed.origin !== location.origin || !parsed.pathname.startsWith("/runs/")) return null;
  return parsed.pathname + parsed.search + parsed.hash;
}

// One terminal pane: its xterm.js, its socket to the relay, its state line.
class TerminalPane {
  constructor(manager, node) {
    this.manager = manager;
    this.node = node;
    this.socket = null;
    this.session = null;        // the agent's session id, once started (to reattach)
    this.state = "connecting";  // connecting | connected | detached | ended
    this.error = null;          // the relay's last {"type": "error"} message
    this.exit = null;           // the agent's {"type": "exit"} message
    this.reattaching = false;
    this.replaced = false;      // a reattach found its session gone and a new one was asked
    this.encoder = new TextEncoder();
    this.build();
  }

  build() {
    const pane = termEl("section", "term-pane");
    pane.dataset.node = this.node;
    pane.setAttribute("aria-label", `Terminal on ${this.node}`);
    const head = termEl("div", "term-head");
    const tick = termEl("label", "term-tick");
    tick.title = "Include this terminal in Type into all";
    this.tick = termEl("input");
    this.tick.type = "checkbox";
    this.tick.checked = true;
    this.tick.setAttribute("aria-label", `Type into all: include ${this.node}`);
    this.tick.addEventListener("change", () => this.manager.showBroadcast());
    tick.appendChild(this.tick);
    head.appendChild(tick);
    head.appendChild(termEl("b", "term-node", this.node));
    this.stateLine = termEl("span", "term-state");
    this.stateLine.setAttribute("role", "status");
    head.appendChild(this.stateLine);
    this.recording = termEl("a", "term-recording hidden", "recording");
    this.recording.target = "_blank";
    this.recording.rel = "noopener";
    head.appendChild(this.recording);
    const tools = termEl("span", "term-buttons");
    this.copyButton = this.button(tools, "Copy", `Copy the selection in ${this.node}'s terminal (Ctrl+Shift+C)`, () => this.copy());
    this.reconnectButton = this.button(tools, "Reconnect", `Reconnect the terminal on ${this.node}`, () => this.reconnect());
    this.reconnectButton.classList.add("hidden");
    this.button(tools, "×", `Close the terminal on ${this.node}`, () => this.manager.close(this)).classList.add("term-close");
    head.appendChild(tools);
    pane.appendChild(head);
    this.message = termEl("p", "term-message hidden");
    this.message.setAttribute("role", "alert");
    pane.appendChild(this.message);
    this.body = termEl("div", "term-body");
    pane.appendChild(this.body);
    this.element = pane;
  }

  button(box, text, label, action) {
    const b = termEl("button", "term-button", text);
    b.type = "button";
    b.setAttribute("aria-label", label);
    b.title = label;
    b.addEventListener("click", action);
    box.appendChild(b);
    return b;
  }

  // The xterm.js terminal, once the pane is in the page (fit needs its size).
  mount() {
    this.term = new Terminal(termOptions({ cursorBlink: true }));
    this.fit = new FitAddon.FitAddon();
    this.term.loadAddon(this.fit);
    this.term.open(this.body);
    this.term.textarea?.setAttribute("aria-label", `Terminal input on ${this.node} (Ctrl+Shift+L leaves it)`);
    this.term.attachCustomKeyEventHandler((e) => this.key(e));
    this.term.onData((data) => this.manager.typed(this, this.encoder.encode(data)));
    // Mouse reports in some modes are bytes, not text: one char per byte.
    this.term.onBinary((data) => this.manager.typed(this, Uint8Array.from(data, (c) => c.charCodeAt(0) & 0xff)));
    this.term.onResize(({ cols, rows }) => this.sendJson({ type: "resize", cols, rows }));
    this.refit();
    this.resizer = new ResizeObserver(() => this.refit());
    this.resizer.observe(this.body);
    this.connect(null);
  }

  // Fits the terminal to its pane; a hidden pane (another tab shown) has no size: left as is.
  refit() {
    if (!this.body.clientWidth || !this.body.clientHeight) return;
    try { this.fit.fit(); } catch (e) { /* not rendered yet: the next resize fits it */ }
  }

  // Ctrl+Shift+C copies the selection; Ctrl+Shift+V (xterm.js leaves it to the browser) pastes
  // through the paste event, which xterm.js turns into input (bracketed when the program asked
  // for it). The terminal
  // takes Tab for the shell, so Ctrl+Shift+L leaves it for the pane's buttons (keyboard users).
  key(e) {
    if (e.type !== "keydown" || !e.ctrlKey || !e.shiftKey) return true;
    if (e.code === "KeyC") { e.preventDefault(); this.copy(); return false; }
    if (e.code === "KeyL") { e.preventDefault(); this.copyButton.focus(); return false; }
    return true;
  }

  async copy() {
    const text = this.term.getSelection();
    if (!text) { this.say("Select text in the terminal first, then copy."); return; }
    try {
      await navigator.clipboard.writeText(text);
      this.say(null);
    } catch (e) {
      this.say(`The browser did not allow copying: ${e.message}`);
    }
    this.term.focus();
  }

  url() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    return `${scheme}//${location.host}/terminal/${encodeURIComponent(this.node)}`;
  }

  // Opens the socket and asks for a session: a new one, or `session` to reattach.
  connect(session) {
    this.exit = null;
    this.error = null;
    this.reattaching = Boolean(session);
    this.setState("connecting", session ? "reattaching…" : "connecting…");
    const socket = new WebSocket(this.url());
    socket.binaryType = "arraybuffer";
    this.socket = socket;
    socket.onopen = () => {
      const { cols, rows } = this.term;
      socket.send(JSON.stringify({ type: "open", cols, rows, term: TERM_NAME, command: null, session }));
    };
    socket.onmessage = (e) => { if (this.socket === socket) this.received(e.data); };
    socket.onclose = (e) => { if (this.socket === socket) this.closed(e); };
  }

  received(data) {
    if (typeof data !== "string") { this.term.write(new Uint8Array(data)); return; }
    let message;
    try { message = JSON.parse(data); } catch (e) { return; }
    if (message.type === "started") this.started(message);
    else if (message.type === "recording") this.recorded(message);
    else if (message.type === "exit") this.exit = message;
    else if (message.type === "error") this.error = message;
  }

  started(message) {
    this.session = message.session;
    this.setState("connected", message.reattached ? "connected (reattached)" : "connected");
    this.say(this.replaced ? "The old session had ended (past the node's grace time): this is a new one." : null);
    this.replaced = false;
    this.reconnectButton.classList.add("hidden");
    // The size may have changed while it connected.
    this.sendJson({ type: "resize", cols: this.term.cols, rows: this.term.rows });
  }

  // The recording's run (or why there is none, or why it stopped): only a run's page on
  // this site becomes a link.
  recorded(message) {
    if (typeof message.message === "string") this.say(message.message.slice(0, 300));
    const url = sameSiteRun(message.url);
    if (!url) return;
    this.recording.href = url;
    this.recording.textContent = "recording";
    this.recording.setAttribute("aria-label", `Recording of the terminal on ${this.node} (opens its run)`);
    this.recording.classList.remove("hidden");
  }

  closed(event) {
    this.socket = null;
    if (this.exit) {
      const how = this.exit.signal ? `killed by ${this.exit.signal}`
        : this.exit.reason === "exited" ? `status ${this.exit.status}` : EXIT_REASONS[this.exit.reason] || this.exit.reason;
      this.setState("ended", `ended (${how})`);
      this.say(this.exit.reason === "exited" ? null : `The session ended: ${EXIT_REASONS[this.exit.reason] || this.exit.reason}.`);
      this.reconnectButton.textContent = "New session";
      this.reconnectButton.setAttribute("aria-label", `New session: the terminal on ${this.node}`);
      this.session = null;
      this.reconnectButton.classList.remove("hidden");
      return;
    }
    if (event.code === TAKEN_OVER && this.session) {
      // The same session is open in another tab or window of this user now: it goes on there.
      this.setState("detached", "taken over");
      this.say("This session was taken over by another connection of yours (another tab or window). Reconnect takes it back here.");
      this.reconnectButton.textContent = "Reconnect";
      this.reconnectButton.setAttribute("aria-label", `Reconnect: the terminal on ${this.node}`);
      this.reconnectButton.classList.remove("hidden");
      return;
    }
    if (event.code === 4404 && this.reattaching) {
      // Past the agent's grace time (or the agent restarted): a new session, and it says so.
      this.session = null;
      this.replaced = true;   // started() says it is a new one
      this.say("The old session had ended (past the node's grace time): starting a new one.");
      this.connect(null);
      return;
    }
    const why = this.error?.message || CLOSE_REASONS[event.code] || event.reason || `closed (code ${event.code})`;
    const keep = this.session && event.code !== 4401 && event.code !== 4403;
    this.setState(keep ? "detached" : "ended", keep ? "detached" : "not connected");
    this.say(keep ? `Disconnected: ${why}. Reconnect within the node's grace time to get the same session back.`
      : `Could not connect: ${why}.`);
    this.reconnectButton.textContent = keep ? "Reconnect" : "Try again";
    this.reconnectButton.setAttribute("aria-label", `${keep ? "Reconnect" : "Try again"}: the terminal on ${this.node}`);
    this.reconnectButton.classList.remove("hidden");
  }

  reconnect() {
    if (this.socket) return;
    this.connect(this.state === "detached" ? this.session : null);
    this.term.focus();
  }

  setState(state, text) {
    this.state = state;
    this.element.dataset.state = state;
    this.stateLine.textContent = text;
    this.stateLine.className = `term-state term-${state}`;
  }

  say(text) {
    this.message.textContent = text || "";
    this.message.classList.toggle("hidden", !text);
  }

  get live() { return this.state === "connected" && this.socket && this.socket.readyState === WebSocket.OPEN; }

  sendBytes(bytes) { if (this.live) this.socket.send(bytes); }

  sendJson(message) { if (this.live) this.socket.send(JSON.stringify(message)); }

  // Closing a pane hangs up its shell (SIGHUP to the foreground, as a closed terminal window
  // does); whatever ignores it ends when the agent's grace time for the socket's loss is over.
  destroy() {
    this.sendJson({ type: "signal", signal: "HUP" });
    const socket = this.socket;
    this.socket = null;
    if (socket) socket.close(1000, "closed");
    this.resizer?.disconnect();
    this.term?.dispose();
    this.element.remove();
  }
}

// The Terminals view: its panes in a grid, the "Type into all" switch and its banner.
class Terminals {
  constructor(root, chosen) {
    this.root = root;
    this.chosen = chosen;        // () => the node names ticked in the nodes' views
    this.panes = [];
    this.broadcast = false;
    this.grid = root.querySelector("#terminals");
    this.banner = root.querySelector("#term-banner");
    this.allSwitch = root.querySelector("#term-all");
    this.count = root.querySelector("#term-count");
    this.allSwitch.addEventListener("click", () => this.setBroadcast(!this.broadcast));
    root.querySelector("#term-open-ticked").addEventListener("click", () => this.openChosen());
    this.showBroadcast();
  }

  // A terminal on `node`: a new pane, focused (or a notice when the page holds its most).
  open(node) {
    if (this.panes.length >= MAX_TERMINALS) {
      this.notice(`At most ${MAX_TERMINALS} terminals at once: close one first.`);
      return null;
    }
    const pane = new TerminalPane(this, node);
    this.panes.push(pane);
    this.grid.appendChild(pane.element);
    pane.mount();
    this.showBroadcast();
    pane.term.focus();
    return pane;
  }

  openChosen() {
    const nodes = this.chosen();
    if (!nodes.length) { this.notice("Tick the nodes to open terminals on first (cards or table)."); return; }
    for (const node of nodes) if (!this.open(node)) break;
  }

  close(pane) {
    pane.destroy();
    this.panes = this.panes.filter((p) => p !== pane);
    this.showBroadcast();
  }

  notice(text) {
    this.count.textContent = text;
  }

  // Keystrokes (and pastes) typed in `pane`: to it alone, or, while "Type into all" is on and
  // it is ticked, to every ticked terminal.
  typed(pane, bytes) {
    if (this.broadcast && pane.tick.checked) {
      for (const p of this.panes) if (p.tick.checked) p.sendBytes(bytes);
    } else {
      pane.sendBytes(bytes);
    }
  }

  setBroadcast(on) {
    this.broadcast = on;
    this.showBroadcast();
  }

  get ticked() { return this.panes.filter((p) => p.tick.checked); }

  // The switch, the banner with the count and the ticked panes' outline, always as they are.
  showBroadcast() {
    const ticked = this.ticked;
    this.allSwitch.setAttribute("aria-checked", String(this.broadcast));
    this.allSwitch.classList.toggle("on", this.broadcast);
    this.root.classList.toggle("broadcasting", this.broadcast);
    for (const pane of this.panes) pane.element.classList.toggle("term-ticked", this.broadcast && pane.tick.checked);
    const text = this.broadcast
      ? `Typing into all: keys typed in a ticked terminal go to all ${ticked.length} ticked terminal${ticked.length === 1 ? "" : "s"}`
      : "";
    this.banner.classList.toggle("hidden", !this.broadcast);
    if (this.banner.textContent !== text) this.banner.textContent = text;
    const open = `${this.panes.length} terminal${this.panes.length === 1 ? "" : "s"} open`;
    if (this.count.textContent !== open) this.count.textContent = open;
  }
}

window.MarcoTerminals = Terminals;
