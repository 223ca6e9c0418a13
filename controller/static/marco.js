// Marco's page: nodes with live status, shell and deploy on chosen nodes, live output viewer.
// The page holds one WebSocket to the controller (/page-socket, issue 15), authenticated by the
// HttpOnly login cookie (it never holds the agents' token): it watches the nodes it needs and
// gets their status and its user's output over it, each message tagged with its node.
"use strict";

const REPLAY_EXECUTIONS = 20;      // per node, on (re)connect
const ANNOUNCE_EVERY_MS = 5000;    // the live region speaks of new output at most this often
const SOCKET_LINGER_MS = 5000;     // a node stays watched this long after it left the page's needs
const TABLE_ABOVE = 50;            // more nodes and the table is the view until one is picked
const SMALL_CLUSTER = 20;          // up to this many nodes each alive one is watched and shows
                                   // its pane; above, only those the page needs
const REPLAY_WAIT_MS = 15000;      // a replay unanswered this long is given up (its late answer is
                                   // still matched to it, by the order the agent answers in)
const REPLAY_LINES = 1000;         // lines one replay asks for (the view's page)
const MAX_WATCHED = 64;            // nodes one page watches at once (each is an output stream
                                   // of the user's on the controller, shared by their pages)
const OPEN_EVERY_MS = 10;          // nodes are watched one at a time, at most this often
const RETRY_FIRST_MS = 1500;       // a dropped watch's first retry; doubled each time (with
const RETRY_MAX_MS = 60000;        // jitter) up to this; back to the first once it says hello
const MAX_RESULTS = 20;            // run and deploy results kept on the page (newest first)
const MAX_NOTICES = 8;             // notices kept, apart from the results
const OUTPUT_CHARS = 64 * 1024 * 1024;  // output characters all execution views keep in all,
                                        // shared out among them (the lines in sight always)
const SHORT_OUTPUT = 12;           // lines an execution's box shows at their own height
const ROW_MARGIN = 8;              // table rows rendered above and below those in sight
const CARDS_AT_ONCE = 100;         // cards shown at first; coming to their end shows as many more
const VIEW_KEY = "marco-node-view";
const naturally = new Intl.Collator(undefined, { numeric: true, sensitivity: "base" });

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};
// An element id for a node name: its safe characters and a short hash of the whole name, so
// web.1 and web_1 get different ids.
function cssId(s) {
  let h = 0;
  for (const ch of String(s)) h = (Math.imul(h, 31) + ch.codePointAt(0)) >>> 0;
  return String(s).replace(/[^A-Za-z0-9_-]/g, "_") + "-" + h.toString(36);
}

function storedMode() {
  try { const v = localStorage.getItem(VIEW_KEY); return v === "cards" || v === "table" ? v : null; }
  catch (e) { return null; }   // storage refused: the default for the node count
}

function xsrfToken() {
  const m = document.cookie.match(/(?:^|; )_xsrf=([^;]*)/);
  return m ? decodeURIComponent(m[1]) : "";
}

// An error's text for people: what went wrong, then what to do about it (its hint), if any.
function withHint(error) {
  return error.hint ? `${error.message}; ${error.hint}` : error.message;
}

async function api(path, options = {}) {
  const headers = Object.assign({ "X-XSRFToken": xsrfToken() }, options.headers || {});
  const response = await fetch(path, Object.assign({ credentials: "same-origin" }, options, { headers }));
  if (response.status === 401 || response.status === 403 && path === "/api/session") {
    window.location = "/login";
    throw new Error("logged out");
  }
  let data = {};
  try { data = await response.json(); } catch (e) { /* empty body */ }
  if (!response.ok) throw new Error(withHint(data) || `HTTP ${response.status}`);
  return data;
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(n < 10 && i ? 1 : 0)} ${units[i]}`;
}
const fmtRate = (n) => fmtBytes(n) + "/s";
const fmtTime = (t) => new Date(t * 1000).toLocaleTimeString();

// ---------------------------------------------------------------------------------------------
// Small canvas chart: a line of the last 60 values (0..100).
class Sparkline {
  constructor(canvas) { this.canvas = canvas; this.values = []; }
  push(v) {
    this.values.push(v);
    if (this.values.length > 60) this.values.shift();
    this.draw();
  }
  draw() {
    const c = this.canvas, ctx = c.getContext("2d"), w = c.width, h = c.height;
    ctx.clearRect(0, 0, w, h);
    ctx.strokeStyle = "#2a7"; ctx.lineWidth = 1.5; ctx.beginPath();
    this.values.forEach((v, i) => {
      const x = (i / 59) * w, y = h - (Math.min(v, 100) / 100) * (h - 2) - 1;
      if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
    });
    ctx.stroke();
  }
}

function bar(label, percent, text) {
  const row = el("div", "bar");
  row.appendChild(el("span", "bar-label", label));
  const track = el("span", "bar-track");
  const fill = el("span", "bar-fill");
  fill.style.width = `${Math.max(0, Math.min(100, percent || 0)).toFixed(1)}%`;
  if (percent > 85) fill.classList.add("hot");
  track.appendChild(fill);
  row.appendChild(track);
  row.appendChild(el("span", "bar-text", text));
  return row;
}

// ---------------------------------------------------------------------------------------------
// Keyboard and screen readers (issue 13, item 7).

// A tablist as the ARIA pattern has it: click or arrow keys (Home/End too) select a tab and
// show its panel (aria-controls); only the selected tab is in the Tab order.
function bindTabs(list) {
  const tabs = [...list.querySelectorAll("[role=tab]")];
  const select = (tab, focus) => {
    for (const t of tabs) {
      const on = t === tab;
      t.setAttribute("aria-selected", String(on));
      t.tabIndex = on ? 0 : -1;
      t.classList.toggle("active", on);
      document.getElementById(t.getAttribute("aria-controls")).classList.toggle("hidden", !on);
    }
    if (focus) tab.focus();
  };
  const moves = { ArrowRight: (i) => i + 1, ArrowLeft: (i) => i - 1, Home: () => 0, End: () => tabs.length - 1 };
  for (const tab of tabs) {
    tab.addEventListener("click", () => select(tab, false));
    tab.addEventListener("keydown", (e) => {
      const move = moves[e.key];
      if (!move) return;
      e.preventDefault();
      const i = (move(tabs.indexOf(tab)) + tabs.length) % tabs.length;
      select(tabs[i], true);
    });
  }
}

// Tells screen readers briefly that output came ("web1: 12 new lines"), never more often than
// ANNOUNCE_EVERY_MS: a line-by-line region would talk over everything else.
class Announcer {
  constructor(region) {
    this.region = region;
    this.counts = new Map();   // node -> new lines not announced yet
    this.last = 0;
    this.timer = null;
  }

  add(node, lines) {
    if (!this.region || !lines) return;
    this.counts.set(node, (this.counts.get(node) || 0) + lines);
    if (this.timer) return;
    // A second at least, so one burst of output makes one announcement.
    const wait = Math.max(1000, this.last + ANNOUNCE_EVERY_MS - Date.now());
    this.timer = setTimeout(() => this.flush(), wait);
  }

  flush() {
    this.timer = null;
    this.last = Date.now();
    const entries = [...this.counts];
    this.counts.clear();
    const plural = (n) => `${n} new line${n === 1 ? "" : "s"}`;
    this.region.textContent = entries.length > 3
      ? `${entries.length} nodes: ${plural(entries.reduce((sum, [, n]) => sum + n, 0))}`
      : entries.map(([node, n]) => `${node}: ${plural(n)}`).join("; ");
  }
}

// ---------------------------------------------------------------------------------------------
// Follow (issue 13, item 4): a node's list of executions follows new ones while scrolled to its
// bottom and stays where the reader is once scrolled up (each execution's lines follow in their
// OutputView, with its "Jump to latest").
const atBottom = (box) => box.scrollHeight - box.scrollTop - box.clientHeight < 4;

// A box that follows while at its bottom, without a button (a node's list of executions).
function stickToBottom(box) {
  box.dataset.following = "1";
  box.addEventListener("scroll", () => { box.dataset.following = atBottom(box) ? "1" : "0"; });
}

// Keeps a following box at its bottom after something was added to it. A scroll event comes
// a frame after the scroll: a reader who scrolled up since this last pinned the box is seen
// here first (by the position), not pulled back down.
function followEnd(box) {
  if (box.dataset.following === "0") return;
  if (box.pinnedTop !== undefined && box.scrollTop < box.pinnedTop - 4) {
    box.dispatchEvent(new Event("scroll"));   // its handler stops following
    return;
  }
  box.scrollTop = box.scrollHeight;
  box.pinnedTop = box.scrollTop;
}

// ---------------------------------------------------------------------------------------------
// One node: its card (status; built once the cards view shows it), its row's data, its output
// pane (built with its first execution, or at once in a small cluster, where every pane shows),
// its watch over the page's socket (only while the page needs it: see wanted()).
class NodeView {
  constructor(app, node) {
    this.app = app;
    this.node = node;
    this.executions = new Map();   // id -> ExecutionView
    this.socket = null;            // true while watched over the page's socket (asked or live)
    this.linked = false;           // its hello came: replays and stops may be sent
    this.closed = false;
    this.card = null;
    this.pane = null;
    this.link = null;
    this.linkState = ["not connected", true];   // what its pane's link line says, once built
    this.lastStatus = null;        // the agent's last status snapshot, for the card and the row
    this.cardInSight = false;
    this.rowInSight = false;
    this.lingerTimer = null;
    this.pausing = false;
    this.retryMs = RETRY_FIRST_MS; // the next retry's base delay (exponential backoff)
    this.retryAt = 0;              // no reconnect before this (Date.now() ms)
    this.retryTimer = null;
    this.asked = [];               // replays sent on the open socket, oldest first: {view, read}
    this.forgotten = new Set();    // ids of views dropped: a late replay's lines make none again
    this.update(node);
  }

  // The card, built on first use: a thousand nodes in the table view build none.
  ensureCard() {
    if (!this.card) this.buildCard();
    return this.card;
  }

  buildCard() {
    const card = el("div", "node");
    card.id = "node-" + cssId(this.node.name);
    card.dataset.node = this.node.name;
    const head = el("label", "node-head");
    this.checkbox = el("input");
    this.checkbox.type = "checkbox";
    this.checkbox.className = "node-select";
    this.checkbox.value = this.node.name;
    this.checkbox.setAttribute("aria-label", `Select ${this.node.name}`);
    this.checkbox.checked = this.app.selected.has(this.node.name);
    this.checkbox.addEventListener("change", () => this.app.select(this.node.name, this.checkbox.checked));
    head.appendChild(this.checkbox);
    head.appendChild(el("b", "node-name", this.node.name));
    this.badge = el("span", "badge", "");
    head.appendChild(this.badge);
    card.appendChild(head);
    this.meta = el("div", "node-meta", "");
    card.appendChild(this.meta);
    const cpuRow = el("div", "cpu-row");
    this.cpuText = el("span", "cpu-total", "CPU –");
    cpuRow.appendChild(this.cpuText);
    const canvas = el("canvas", "spark");
    canvas.width = 120; canvas.height = 28;
    this.spark = new Sparkline(canvas);
    cpuRow.appendChild(canvas);
    card.appendChild(cpuRow);
    this.cores = el("div", "cores");
    card.appendChild(this.cores);
    this.bars = el("div", "bars");
    card.appendChild(this.bars);
    this.facts = el("div", "facts");
    card.appendChild(this.facts);
    this.termButton = el("button", "term-open", "Terminal");
    this.termButton.type = "button";
    this.termButton.setAttribute("aria-label", `Open a terminal on ${this.node.name}`);
    this.termButton.addEventListener("click", () => this.app.openTerminal(this.node.name));
    card.appendChild(this.termButton);
    const details = el("details", "procs");
    details.appendChild(el("summary", "", "top processes"));
    this.procs = el("table", "proc-table");
    details.appendChild(this.procs);
    card.appendChild(details);
    this.card = card;
    this.drawCard();
    if (this.lastStatus) this.drawStatus(this.lastStatus);
  }

  // The pane, built on first use (a thousand nodes without output build none) and placed
  // among the others in the natural order of their names.
  ensurePane() {
    if (!this.pane) { this.buildPane(); this.app.placePane(this); }
    return this.pane;
  }

  buildPane() {
    const pane = el("div", "pane empty");
    pane.id = "pane-" + cssId(this.node.name);
    pane.dataset.node = this.node.name;
    const head = el("div", "pane-head");
    head.appendChild(el("b", "", this.node.name));
    this.link = el("span", "link-state");
    head.appendChild(this.link);
    this.setLink(...this.linkState);
    pane.appendChild(head);
    this.list = el("div", "executions");
    stickToBottom(this.list);
    pane.appendChild(this.list);
    this.pane = pane;
  }

  update(node) {
    // A node back up is tried again at once, whatever the backoff had reached.
    if (node.alive && !this.node.alive) { this.retryMs = RETRY_FIRST_MS; this.retryAt = 0; }
    this.node = node;
    if (this.card) this.drawCard();
    this.reviewSocket();
  }

  drawCard() {
    const node = this.node;
    this.card.classList.toggle("down", !node.alive);
    this.badge.textContent = node.alive ? (node.txt.os || "up") : "down";
    this.termButton.disabled = !node.alive;
    const groups = node.groups.length ? ` · groups ${node.groups.join(", ")}` : "";
    this.meta.textContent = `${node.host}:${node.port}${groups}`;
  }

  // Above SMALL_CLUSTER nodes the page watches a node (output and status) only while it needs
  // it: the node is in sight (its card or its table row) or runs something the page shows;
  // being ticked is not enough (a thousand ticked nodes would be a thousand output streams on
  // the controller). Never while the tab is hidden. App caps them at MAX_WATCHED.
  wanted() {
    if (!this.node.alive || this.closed || document.hidden) return false;
    if (this.app.nodeCount <= SMALL_CLUSTER) return true;   // every live node, as a few need
    if (this.cardInSight || this.rowInSight) return true;
    for (const execution of this.executions.values()) if (execution.running) return true;
    return false;
  }

  // Asks for a watch when wanted (App asks it when a slot is free and the backoff allows);
  // ends it SOCKET_LINGER_MS after it stopped being wanted (scrolling past a node does not
  // watch and unwatch it at once).
  reviewSocket() {
    if (this.wanted()) {
      clearTimeout(this.lingerTimer);
      this.lingerTimer = null;
      if (this.socket) return;
      const wait = this.retryAt - Date.now();
      if (wait <= 0) this.app.sockets.want(this);
      else if (!this.retryTimer) this.retryTimer = setTimeout(() => { this.retryTimer = null; this.reviewSocket(); }, wait);
    } else {
      this.app.sockets.unwant(this);
      if (this.socket && !this.lingerTimer) this.lingerTimer = setTimeout(() => { this.lingerTimer = null; if (!this.wanted()) this.pause(); }, SOCKET_LINGER_MS);
    }
  }

  // Lets go of the watch on purpose (not needed, or its slot is needed elsewhere).
  pause() {
    if (!this.socket) return;
    this.pausing = true;
    this.app.page.unwatch(this);
    this.onClose({ code: 1000, reason: "" });
  }

  setLink(text, ok) {
    this.linkState = [text, ok];
    if (!this.link) return;
    this.link.textContent = text;
    this.link.classList.toggle("bad", !ok);
  }

  // -- socket ----------------------------------------------------------------------------------
  // Watches the node over the page's one socket (PageSocket): the browser trusts one
  // certificate (the controller's), and the controller reaches the agent for the user.
  connect() {
    this.socket = true;
    this.linked = false;
    this.setLink("connecting…", true);
    this.app.page.watch(this);
  }

  // The watch ended: unwatched (pausing), the node gone (`gone`) or the page's socket closed.
  onClose(event) {
    this.socket = null;
    this.linked = false;
    this.app.sockets.closed(this);
    for (const { read } of this.asked.splice(0)) read.answer({ next: read.since });
    if (this.closed) return;
    if (this.pausing) { this.pausing = false; this.setLink("not connected (not in sight)", true); this.reviewSocket(); return; }
    if (event.code === 4401) { window.location = "/login"; return; }
    // Exponential backoff with jitter: a restarted controller is not met by every tab at once.
    // A node the controller no longer knows (4404) waits the longest.
    const delay = event.code === 4404 ? RETRY_MAX_MS : Math.round(this.retryMs * (0.5 + Math.random()));
    this.retryMs = Math.min(RETRY_MAX_MS, this.retryMs * 2);
    this.retryAt = Date.now() + delay;
    const reason = event.reason ? `: ${event.reason}` : "";
    this.setLink(`disconnected (${event.code}${reason}); retrying in ${Math.ceil(delay / 1000)} s`, false);
    this.reviewSocket();
  }

  send(message) {
    if (!this.isOpen()) return false;
    return this.app.page.send(Object.assign({ node: this.node.name }, message));
  }

  isOpen() { return Boolean(this.socket && this.linked && this.app.page.ready); }

  // A replay for `read` of an execution's view. The controller answers a node's replays in the
  // order sent, so answers are matched to replays by that order, never by timing.
  replay(view, read, limit) {
    if (!this.send({ type: "replay", id: view.id, since: read.since, limit })) return false;
    this.asked.push({ view, read });
    return true;
  }

  // The answer (`replayed`) of the oldest replay of execution `id`; the replays asked before
  // it got an error (the agent refused them).
  answered(id, event) {
    if (event.execution) this.executions.get(id)?.setSummary(event.execution);
    const at = this.asked.findIndex((a) => a.view.id === id);
    if (at < 0) return;
    const done = this.asked.splice(0, at + 1), mine = done.pop();
    for (const { view, read } of done) view.refused(read);
    // Its own read (a no-op when that read was given up: a late answer answers no other).
    mine.read.answer(event);
  }

  onEvent(event) {
    switch (event.type) {
      case "hello": {
        this.linked = true;
        this.setLink("live", true);
        this.retryMs = RETRY_FIRST_MS;
        // Each execution's state and length is known now (those the page knows are brought
        // up to date, whatever their age); views are made for the newest ones, and read the
        // lines they show by replay, page by page as they come into sight. Those the agent no
        // longer lists are gone from the node: their views go too.
        const listed = new Set(event.executions.map((s) => s.id));
        for (const [id, view] of this.executions) if (!listed.has(id)) this.forget(view);
        const newest = new Set(event.executions.slice(-REPLAY_EXECUTIONS).map((s) => s.id));
        for (const summary of event.executions) {
          if (!newest.has(summary.id) && !this.executions.has(summary.id)) continue;
          const view = this.execution(summary.id, summary);
          view.setSummary(summary);
          view.grow(view.cut === null ? summary.next_seq : Math.min(summary.next_seq, view.cut));
        }
        this.prune();
        break;
      }
      case "started": {
        const view = this.execution(event.id, event);
        view.live = true;   // started while the page watched: its lines are news worth announcing
        view.setSummary(Object.assign({ state: "running" }, event));
        this.prune();
        break;
      }
      case "output": if (!this.forgotten.has(event.id)) this.execution(event.id).output(event); break;
      case "exit": this.executions.get(event.id)?.exit(event); this.prune(); break;
      case "replayed": this.answered(event.id, event); break;
      case "status": this.status(event.status); break;
      case "error": {
        // A replay's error answers the oldest replay (the agent refused it, e.g. the execution
        // was pruned): its view says so and reads no more, no notice.
        const refused = event.request === "replay" ? this.asked.shift() : null;
        if (refused) refused.view.refused(refused.read, true);
        else this.app.notice(`${this.node.name}: ${withHint(event)}`);
        break;
      }
      default: break;
    }
  }

  execution(id, summary) {
    let view = this.executions.get(id);
    if (!view) {
      this.ensurePane();
      view = new ExecutionView(this, id, summary || {});
      this.forgotten.delete(id);
      this.executions.set(id, view);
      this.list.appendChild(view.block);
      this.pane.classList.remove("empty");
      followEnd(this.list);
    }
    return view;
  }

  // At most REPLAY_EXECUTIONS views per node, oldest first dropped; running ones are kept.
  prune() {
    let extra = this.executions.size - REPLAY_EXECUTIONS;
    for (const view of this.executions.values()) {
      if (extra <= 0) break;
      if (!view.running) { this.forget(view); extra--; }
    }
  }

  forget(view) {
    this.forgotten.add(view.id);
    for (const id of this.forgotten) { if (this.forgotten.size <= 1000) break; this.forgotten.delete(id); }
    view.destroy();
    this.executions.delete(view.id);
    this.pane?.classList.toggle("empty", this.executions.size === 0);
  }

  status(s) {
    this.lastStatus = s;
    if (this.card) this.drawStatus(s);
    this.app.table.updateRow(this);
  }

  drawStatus(s) {
    this.cpuText.textContent = `CPU ${s.cpu.percent.toFixed(0)}%`;
    this.cpuText.dataset.value = s.cpu.percent;
    this.spark.push(s.cpu.percent);
    this.cores.replaceChildren(...s.cpu.per_core.map((p, i) => {
      const core = el("span", "core");
      core.title = `core ${i}: ${p.toFixed(0)}%`;
      const fill = el("span", "core-fill");
      fill.style.height = `${Math.min(100, p).toFixed(0)}%`;
      core.appendChild(fill);
      return core;
    }));
    const m = s.memory, sw = s.swap;
    this.bars.replaceChildren(
      bar("mem", m.percent, `${fmtBytes(m.used)} / ${fmtBytes(m.total)}`),
      bar("swap", sw.percent, sw.total ? `${fmtBytes(sw.used)} / ${fmtBytes(sw.total)}` : "none"));
    const temp = s.temperature === null ? "–" : `${s.temperature.toFixed(0)} °C`;
    this.facts.replaceChildren(
      el("span", "fact", `load ${s.load.map((l) => l.toFixed(2)).join(" ")}`),
      el("span", "fact", `temp ${temp}`),
      el("span", "fact net", `↓ ${fmtRate(s.network.rx_rate)} ↑ ${fmtRate(s.network.tx_rate)}`),
      el("span", "fact", `up ${(s.uptime / 3600).toFixed(1)} h`));
    const rows = [["pid", "user", "name", "cpu", "rss"]].concat(
      s.processes.map((p) => [p.pid, p.user, p.name, `${p.cpu.toFixed(1)}%`, fmtBytes(p.rss)]));
    this.procs.replaceChildren(...rows.map((r, i) => {
      const tr = el("tr");
      r.forEach((cell) => tr.appendChild(el(i ? "td" : "th", "", String(cell))));
      return tr;
    }));
    this.card.dataset.statusTime = s.time;
  }

  // The node left the page: its watch, timers and execution views go.
  stop() {
    this.closed = true;
    clearTimeout(this.lingerTimer);
    clearTimeout(this.retryTimer);
    this.app.sockets.unwant(this);
    if (this.socket) { this.app.page.unwatch(this); this.onClose({ code: 1000, reason: "" }); }
    for (const view of [...this.executions.values()]) this.forget(view);
  }
}

// ---------------------------------------------------------------------------------------------
// One execution: a block with its header, its lines (stdout and stderr styled apart), stop.
class ExecutionView {
  constructor(nodeView, id, summary) {
    this.nodeView = nodeView;
    this.id = id;
    this.nextSeq = 0;               // the seq after the last line known (live or replayed)
    this.reads = [];                // reads the view asked for, not answered yet, in order
    this.asking = null;             // the read whose replay is on the socket now
    this.gone = false;              // the agent no longer has it: nothing more to read
    this.cut = null;                // the agent kept no line from this seq on (its spool was full)
    const block = el("div", "execution");
    block.dataset.id = id;
    const head = el("div", "exec-head");
    this.label = el("span", "exec-label", "");
    this.command = el("code", "exec-command", "");
    this.started = el("span", "exec-started", "");
    this.state = el("span", "exec-state state-running", "running");
    this.stopButton = el("button", "stop", "stop");
    this.stopButton.type = "button";
    this.stopButton.setAttribute("aria-label", `stop this execution on ${nodeView.node.name}`);
    this.stopButton.onclick = () => this.stop();
    [this.label, this.command, this.started, this.state, this.stopButton].forEach((e) => head.appendChild(e));
    block.appendChild(head);
    this.notice = el("div", "exec-notice");
    block.appendChild(this.notice);
    // The lines: an OutputView (output_view.js), virtual, fed by the socket's live output and
    // reading earlier lines by replay; it follows the end with "Jump to latest" (item 4).
    this.box = el("div", "exec-output no-lines");
    block.appendChild(this.box);
    this.view = new OutputView(this.box, { label: nodeView.node.name, loadPage: (segment, since, limit) => this.read(since, limit) });
    this.view.setSegments([{ id, host: nodeView.node.name, length: 0 }]);
    nodeView.app.outputs.add(this);
    this.live = false;
    this.running = false;
    this.block = block;
    this.setSummary(summary);
  }

  setSummary(s) {
    if (s.label !== undefined) this.label.textContent = s.label || "(no label)";
    if (s.command !== undefined) this.command.textContent = Array.isArray(s.command) ? s.command.join(" ") : s.command;
    if (s.started) this.started.textContent = fmtTime(s.started);
    if (s.no_log && !this.block.classList.contains("no-log")) {
      // The agent keeps and streams nothing of a no_log task: say so instead of an empty box.
      this.block.classList.add("no-log");
      this.notice.appendChild(el("span", "line notice", "output hidden: no_log"));
    }
    if (Number.isInteger(s.truncated_seq) && this.cut === null) {
      // Lines from there on were not kept: they are never asked for (and said so once).
      this.cut = s.truncated_seq;
      this.notice.appendChild(el("span", "line notice cut-note",
        `output from line ${this.cut + 1} on was not kept (the node's spool for it was full)`));
    }
    if (s.state === "running") this.running = true;
    if (s.state && s.state !== "running") this.finish(s.state, s.rc, s.signal);
  }

  // Output events, live or replayed, into the view (a line seen twice is stored once; a gap
  // stays as lines still to read, read by replay when in sight).
  output(event) {
    const end = event.seq + event.lines.length;
    const fresh = Math.max(0, end - Math.max(this.nextSeq, event.seq));
    this.nextSeq = Math.max(this.nextSeq, end);
    this.view.append(this.id, [event]);
    this.sized();
    followEnd(this.nodeView.list);
    if (this.live && fresh) this.nodeView.app.announcer.add(this.nodeView.node.name, fresh);
  }

  // The execution has `length` lines (the agent said so): the view shows the ones not read
  // yet as pending until it reads them.
  grow(length) {
    if (!(length > 0)) return;
    this.view.grow(this.id, length);
    this.sized();
  }

  // Hidden without lines, as tall as a few, then a fixed height that scrolls.
  sized() {
    const lines = this.view.lineCount;
    this.box.classList.toggle("no-lines", lines === 0);
    this.box.classList.toggle("tall", lines > SHORT_OUTPUT);
  }

  // The view's source: a replay from `since` over the node's socket; its output events come
  // through output() (so they fill the view), then `replayed` answers the read. One replay is
  // on the socket at a time; without an open socket a read answers "nothing yet" at once (the
  // view asks again a second later).
  read(since, limit) {
    return new Promise((resolve) => {
      const read = { since, limit: limit || REPLAY_LINES, done: false, timer: null };
      read.answer = (event) => {
        if (read.done) return;
        read.done = true;
        clearTimeout(read.timer);
        const ended = event.execution && event.execution.state && event.execution.state !== "running";
        resolve({ events: [], next: event.next, end: Boolean(event.complete && ended) });
        if (this.asking === read) { this.asking = null; this.askNext(); }
      };
      this.reads.push(read);
      if (!this.asking) this.askNext();
    });
  }

  // Sends the next read worth asking: reads of pages filled meanwhile (by live output or an
  // earlier answer) or no longer in sight (the reader scrolled past) are answered with nothing,
  // unsent, so dragging through a long output does not queue a replay per page passed.
  askNext() {
    while (this.reads.length && !this.asking) {
      const read = this.reads.shift();
      if (this.gone || !this.worthAsking(read) || !this.nodeView.replay(this, read, read.limit)) {
        read.answer({ next: read.since });
        continue;
      }
      this.asking = read;
      // No answer this long (an agent that never answers): the view may ask again; a late
      // answer still matches this read by the socket's order, and is then ignored.
      read.timer = setTimeout(() => { if (this.asking === read) read.answer({ next: read.since }); }, REPLAY_WAIT_MS);
    }
  }

  // Whether the view still lacks line `since` in a page it shows. The view's pages are read as
  // they are; without them (another view version), every read is worth asking.
  worthAsking(read) {
    if (this.cut !== null && read.since >= this.cut) return false;
    const pages = this.view.pages, inSight = this.view.inSight;
    const key = `${this.id}\n${Math.floor(read.since / REPLAY_LINES)}`;
    if (inSight instanceof Set && inSight.size && !inSight.has(key)) return false;
    const page = pages instanceof Map ? pages.get(key) : null;
    return !page || !page.texts || page.texts[read.since % REPLAY_LINES] === undefined;
  }

  // The agent refused a replay of this execution; `gone`: it no longer has it (pruned), so
  // the view stops reading and says so.
  refused(read, gone = false) {
    read.answer({ next: read.since });
    if (gone && !this.gone) {
      this.gone = true;
      this.notice.appendChild(el("span", "line notice", "no longer on the node: earlier lines cannot be read"));
    }
  }

  // The socket closed: no answer will come to the reads asked on it.
  dropReads() {
    for (const read of this.reads.splice(0)) read.answer({ next: read.since });
  }

  // Stop, over the node's socket; said so when it cannot be sent.
  stop() {
    if (this.nodeView.send({ type: "stop", id: this.id })) return;
    if (!this.stopNote) this.stopNote = this.notice.appendChild(el("span", "line notice stop-note"));
    this.stopNote.textContent = "not connected: stop not sent; try again once the node is live";
  }

  // Dropped from the page: the view, its observers and its pages go, and its reads end.
  destroy() {
    this.gone = true;
    this.dropReads();
    if (this.asking) this.asking.answer({ next: this.asking.since });
    if (typeof this.view.destroy === "function") this.view.destroy();
    this.block.remove();
    this.nodeView.app.outputs.delete(this);
  }

  exit(event) {
    this.finish(event.signal ? "killed" : "exited", event.rc, event.signal);
  }

  finish(state, rc, signal) {
    const text = signal ? `${state} (${signal})` : (rc === null || rc === undefined ? state : `rc=${rc}`);
    this.state.textContent = text;
    this.state.className = "exec-state " + (rc === 0 ? "state-ok" : "state-failed");
    this.block.dataset.state = state;
    this.stopButton.disabled = true;
    if (this.running) { this.running = false; this.nodeView.reviewSocket(); }
  }
}

// ---------------------------------------------------------------------------------------------
// The node table (issue 13, item 8): one row per node, sortable by any column, filtered like the
// cards; only the rows in sight (plus ROW_MARGIN) are in the DOM, between two spacer rows.
const pct = (n) => (typeof n === "number" ? `${n.toFixed(0)}%` : "–");
const NODE_COLUMNS = [
  { key: "name", label: "Name", value: (v) => v.node.name },
  { key: "status", label: "Status", value: (v) => (v.node.alive ? "up" : "down") },
  { key: "cpu", label: "CPU", numeric: true, value: (v) => v.lastStatus?.cpu.percent, text: pct },
  { key: "memory", label: "Memory", numeric: true, value: (v) => v.lastStatus?.memory.percent,
    text: (n, v) => (typeof n === "number" ? `${pct(n)} of ${fmtBytes(v.lastStatus.memory.total)}` : "–") },
  { key: "load", label: "Load", numeric: true, value: (v) => v.lastStatus?.load[0],
    text: (n, v) => (typeof n === "number" ? v.lastStatus.load.map((l) => l.toFixed(2)).join(" ") : "–") },
  { key: "groups", label: "Groups", value: (v) => v.node.groups.join(", ") },
  { key: "os", label: "OS", value: (v) => v.node.txt.os || "" },
  { key: "version", label: "Agent", value: (v) => v.node.txt.version || "" },
];
const missing = (x) => x === undefined || x === null || x === "";

// Numbers by value, text in natural order (sc2 before sc10); a missing value always last; ties
// by name.
function compareBy(column, dir) {
  return (a, b) => {
    const x = column.value(a), y = column.value(b);
    if (missing(x) !== missing(y)) return missing(x) ? 1 : -1;
    const order = missing(x) ? 0 : column.numeric ? x - y : naturally.compare(x, y);
    return order * dir || naturally.compare(a.node.name, b.node.name);
  };
}

class NodeTable {
  constructor(app, wrap) {
    this.app = app;
    this.wrap = wrap;
    this.table = $("table", wrap);
    this.body = $("tbody", wrap);
    this.views = [];
    this.rows = [];
    this.sort = { key: "name", dir: 1 };
    this.rendered = new Map();     // name -> its <tr>, for the rows in the DOM
    this.rowHeight = 30;           // measured once a row is rendered
    this.pending = false;
    this.buildHead($("thead tr", wrap));
    wrap.addEventListener("scroll", () => this.schedule());
    window.addEventListener("resize", () => this.schedule());
  }

  buildHead(row) {
    row.appendChild(el("th", "col-select", "")).appendChild(el("span", "visually-hidden", "Selected"));
    this.heads = new Map();
    for (const column of NODE_COLUMNS) {
      const th = el("th", "col-" + column.key);
      th.scope = "col";
      const button = el("button", "sort", column.label);
      button.type = "button";
      button.addEventListener("click", () => this.sortBy(column.key));
      th.appendChild(button);
      row.appendChild(th);
      this.heads.set(column.key, th);
    }
    this.markSort();
  }

  sortBy(key) {
    this.sort = { key, dir: this.sort.key === key ? -this.sort.dir : 1 };
    this.markSort();
    this.setRows(this.views);
  }

  markSort() {
    for (const [key, th] of this.heads) {
      th.setAttribute("aria-sort", key !== this.sort.key ? "none" : this.sort.dir > 0 ? "ascending" : "descending");
    }
  }

  setRows(views) {
    this.views = views;
    const column = NODE_COLUMNS.find((c) => c.key === this.sort.key);
    this.rows = [...views].sort(compareBy(column, this.sort.dir));
    this.table.setAttribute("aria-rowcount", String(this.rows.length + 1));
    this.render();
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => { this.pending = false; this.render(); });
  }

  // The rows in sight and ROW_MARGIN more each side; the spacers keep the scroll height.
  render() {
    if (this.wrap.classList.contains("hidden")) { this.body.replaceChildren(); this.rendered.clear(); this.inSight(new Set()); return; }
    // What the box shows, in the body's own coordinates (the rows start under the header).
    const headHeight = this.table.tHead.offsetHeight, height = this.wrap.clientHeight;
    const top = this.wrap.scrollTop - headHeight, bottom = top + height;
    const first = Math.min(this.rows.length, Math.max(0, Math.floor(top / this.rowHeight)));
    const last = Math.min(this.rows.length, Math.max(0, Math.ceil(bottom / this.rowHeight)));
    const from = Math.max(0, first - ROW_MARGIN), to = Math.min(this.rows.length, last + ROW_MARGIN);
    // The rows from `from` to `to`, and the focused row wherever it is (scrolled away or moved
    // by a sort, it stays in the DOM, so keyboard focus stays on it) with the rows either side
    // of it (Tab and Shift+Tab go on from it); spacers fill the gaps.
    const indexes = new Set();
    for (let i = from; i < to; i++) indexes.add(i);
    const focused = this.body.contains(document.activeElement) ? document.activeElement : null;
    const focusedName = focused ? focused.closest("tr")?.dataset.node : undefined;
    const focusedAt = focusedName === undefined ? -1 : this.rows.findIndex((v) => v.node.name === focusedName);
    if (focusedAt >= 0) {
      for (const i of [focusedAt - 1, focusedAt, focusedAt + 1]) if (i >= 0 && i < this.rows.length) indexes.add(i);
    }
    const before = this.rendered, wanted = [], trs = [];
    this.rendered = new Map();
    let next = 0;
    for (const index of [...indexes].sort((x, y) => x - y)) {
      if (index > next) wanted.push(this.spacer(index - next));
      const view = this.rows[index], tr = before.get(view.node.name) || this.row(view);
      this.fill(tr, view, index);
      this.rendered.set(view.node.name, tr);
      wanted.push(tr);
      trs.push(tr);
      next = index + 1;
    }
    wanted.push(this.spacer(this.rows.length - next));
    this.reconcile(wanted);
    // A row moved by a sort lost its focus on the way (the DOM drops it): give it back.
    if (focused && focused.isConnected && document.activeElement !== focused) focused.focus({ preventScroll: true });
    const measured = trs.length ? trs[0].getBoundingClientRect().height : 0;
    if (measured > 0 && Math.abs(measured - this.rowHeight) > 0.5) { this.rowHeight = measured; this.schedule(); }
    // The box grows with its spacers (up to its max-height): render again for the new height.
    if (this.wrap.clientHeight !== height) this.schedule();
    this.inSight(new Set(this.rows.slice(first, last).map((v) => v.node.name)));
  }

  // Makes the body's children `wanted`, in place: rows no longer wanted go, new ones are
  // inserted, and rows kept are not moved unless the order changed (a moved element loses
  // focus).
  reconcile(wanted) {
    const keep = new Set(wanted);
    for (const child of [...this.body.children]) if (!keep.has(child)) child.remove();
    wanted.forEach((node, i) => {
      const at = this.body.children[i];
      if (at !== node) this.body.insertBefore(node, at || null);
    });
  }

  spacer(rows) {
    const tr = el("tr", "spacer");
    tr.setAttribute("aria-hidden", "true");
    const td = el("td");
    td.colSpan = NODE_COLUMNS.length + 1;
    td.style.height = `${rows * this.rowHeight}px`;   // CSSOM, allowed by the page's CSP
    tr.appendChild(td);
    return tr;
  }

  row(view) {
    const name = view.node.name;
    const tr = el("tr");
    tr.dataset.node = name;
    const check = el("input", "row-select");
    check.type = "checkbox";
    check.value = name;
    check.setAttribute("aria-label", `Select ${name}`);
    check.addEventListener("change", () => this.app.select(name, check.checked));
    tr.appendChild(el("td", "col-select")).appendChild(check);
    for (const column of NODE_COLUMNS) tr.appendChild(el("td", "col-" + column.key));
    return tr;
  }

  // A row's cells from the node as known now; `index` is its place among all rows.
  fill(tr, view, index) {
    tr.className = view.node.alive ? "up" : "down";
    tr.setAttribute("aria-rowindex", String(index + 2));
    tr.firstElementChild.firstElementChild.checked = this.app.selected.has(view.node.name);
    NODE_COLUMNS.forEach((column, i) => {
      const td = tr.children[i + 1], value = column.value(view);
      const text = column.text ? column.text(value, view) : value || "–";
      if (td.textContent !== text) td.textContent = text;
      if (column.numeric && typeof value === "number") td.dataset.value = String(value);
    });
  }

  // A rendered row's cells with the node's latest status (its place waits for the next sort).
  updateRow(view) {
    const tr = this.rendered.get(view.node.name);
    if (tr) this.fill(tr, view, Number(tr.getAttribute("aria-rowindex")) - 2);
  }

  syncChecks() {
    for (const [name, tr] of this.rendered) $(".row-select", tr).checked = this.app.selected.has(name);
  }

  // Tells each node whether its row is in sight now (it is watched while it is).
  inSight(names) {
    for (const view of this.app.views.values()) {
      const now = names.has(view.node.name);
      if (view.rowInSight !== now) { view.rowInSight = now; view.reviewSocket(); }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The page's watches: at most MAX_WATCHED at once, asked one at a time at most every
// OPEN_EVERY_MS (a thousand nodes wanted at once make no burst of upstream connections). When
// every slot is taken, a watch only lingering (its node no longer wanted) ends for the next.
class SocketSlots {
  constructor() {
    this.open = new Set();       // NodeViews watched
    this.waiting = new Set();    // NodeViews wanting a watch, in the order they asked
    this.timer = null;
  }

  want(view) { if (!this.open.has(view)) { this.waiting.add(view); this.pump(); } }

  unwant(view) { this.waiting.delete(view); }

  closed(view) { this.open.delete(view); this.pump(); }

  pump() {
    if (this.timer || !this.waiting.size) return;
    if (this.open.size >= MAX_WATCHED) {
      const lingering = [...this.open].find((v) => !v.wanted() && !v.pausing);
      if (lingering) lingering.pause();   // its close frees the slot (closed → pump)
      return;
    }
    const [view] = this.waiting;
    this.waiting.delete(view);
    if (view.wanted() && !view.socket) { this.open.add(view); view.connect(); }
    this.timer = setTimeout(() => { this.timer = null; this.pump(); }, OPEN_EVERY_MS);
  }
}

// ---------------------------------------------------------------------------------------------
// The page's one socket to the controller (issue 15): NodeViews watch and unwatch their node
// over it, and every message it brings names its node. Watches asked while it is closed are
// sent once it is ready; when it closes, every watch ends (each NodeView retries as it does
// for a dropped node), and it opens again with a backoff while nodes are wanted.
class PageSocket {
  constructor(app) {
    this.app = app;
    this.socket = null;
    this.ready = false;            // the controller said `ready`: messages may be sent
    this.watching = new Set();     // NodeViews watched (or to watch once ready)
    this.retryMs = RETRY_FIRST_MS;
    this.timer = null;             // the next reopen, while backing off
  }

  open() {
    if (this.socket || this.timer) return;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const socket = new WebSocket(`${scheme}//${location.host}/page-socket`);
    this.socket = socket;
    socket.onmessage = (message) => this.onMessage(JSON.parse(message.data));
    socket.onclose = (event) => this.onClose(event);
  }

  watch(view) {
    this.watching.add(view);
    if (this.ready) this.send({ type: "watch", node: view.node.name });
    else this.open();
  }

  unwatch(view) {
    if (this.watching.delete(view)) this.send({ type: "unwatch", node: view.node.name });
  }

  send(message) {
    if (!this.ready) return false;
    this.socket.send(JSON.stringify(message));
    return true;
  }

  onMessage(event) {
    if (event.type === "ready") {
      this.ready = true;
      this.retryMs = RETRY_FIRST_MS;
      for (const view of this.watching) this.send({ type: "watch", node: view.node.name });
      return;
    }
    if (event.type === "statuses") {   // the newest status of each node that sent one
      for (const status of event.statuses) this.onMessage(status);
      return;
    }
    const view = this.app.views.get(event.node);
    if (!view || !this.watching.has(view)) {
      // Late news of a node no longer watched; an error of none: said as a notice.
      if (event.type === "error" && !event.node) this.app.notice(withHint(event));
      return;
    }
    if (event.type === "gone") {
      this.watching.delete(view);
      view.onClose(event);
    } else {
      view.onEvent(event);
    }
  }

  onClose(event) {
    this.socket = null;
    this.ready = false;
    if (event.code === 4401) { window.location = "/login"; return; }
    const views = [...this.watching];
    this.watching.clear();
    for (const view of views) view.onClose(event);
    // Exponential backoff with jitter: a restarted controller is not met by every tab at once.
    const delay = Math.round(this.retryMs * (0.5 + Math.random()));
    this.retryMs = Math.min(RETRY_MAX_MS, this.retryMs * 2);
    this.timer = setTimeout(() => { this.timer = null; if (this.watching.size) this.open(); }, delay);
  }

  // The controller answers again: the socket is opened now, not after the backoff.
  back() {
    this.retryMs = RETRY_FIRST_MS;
    if (this.timer) { clearTimeout(this.timer); this.timer = null; if (this.watching.size) this.open(); }
  }
}

// ---------------------------------------------------------------------------------------------
// The page's execution views share OUTPUT_CHARS: each keeps its share of lines beyond those in
// sight (its view's `maxChars`), so many views do not each keep a run page's worth.
class OutputBudget {
  constructor() { this.views = new Set(); }

  add(execution) { this.views.add(execution); this.share(); }

  delete(execution) { if (this.views.delete(execution)) this.share(); }

  share() {
    const each = Math.floor(OUTPUT_CHARS / Math.max(1, this.views.size));
    for (const execution of this.views) if ("maxChars" in execution.view) execution.view.maxChars = each;
  }
}

// ---------------------------------------------------------------------------------------------
class App {
  constructor() {
    this.views = new Map();
    this.ordered = [];             // the views in the natural order of their names (sc2, sc10)
    this.selected = new Set();     // the chosen nodes' names, shared by the cards and the table
    this.cardLimit = CARDS_AT_ONCE; // cards shown (those the filter keeps, in order), at most
    this.cardsShown = new Set();   // the views whose card is in the page now
    this.shown = [];               // the views the filter keeps, in order
    this.mode = null;              // "cards" or "table"
    this.nodeCount = 0;
    this.sockets = new SocketSlots();
    this.page = new PageSocket(this);
    this.outputs = new OutputBudget();
    this.announcer = new Announcer($("#output-announcer"));
    this.table = new NodeTable(this, $("#node-table-wrap"));
    // A card in sight has its node watched (see NodeView.wanted).
    this.cardObserver = new IntersectionObserver((entries) => {
      for (const entry of entries) {
        const view = this.views.get(entry.target.dataset.node);
        if (view && view.cardInSight !== entry.isIntersecting) { view.cardInSight = entry.isIntersecting; view.reviewSocket(); }
      }
    });
    // Coming to the end of the cards shows as many more (the button does it for keyboards).
    this.moreObserver = new IntersectionObserver((entries) => {
      if (entries.some((e) => e.isIntersecting)) this.moreCards();
    });
  }

  async start() {
    await api("/api/session");  // redirects to the login page when the session is over
    this.bindForms();
    this.bindNodeTools();
    // A hidden tab lets its watches go (after the linger) and takes them again when shown.
    document.addEventListener("visibilitychange", () => { for (const view of this.views.values()) view.reviewSocket(); });
    await this.refreshNodes();
    this.keepRefreshing();
  }

  // The node list every 2 s, one call after the other (a slow answer never overlaps the next,
  // so lists are never applied out of order). A failure is one status line, replaced, not a
  // notice per try.
  keepRefreshing() {
    setTimeout(async () => {
      try {
        await this.refreshNodes();
        if ($("#page-status").textContent) this.controllerBack();
        this.setStatus("");
      } catch (e) { this.setStatus(`Cannot refresh the nodes: ${e.message}; retrying`); }
      this.keepRefreshing();
    }, 2000);
  }

  // The controller answers again: the sockets it dropped are tried now, not after a backoff
  // grown while it was away (SocketSlots spreads the reconnects out).
  controllerBack() {
    this.page.back();
    for (const view of this.views.values()) {
      view.retryMs = RETRY_FIRST_MS;
      view.retryAt = 0;
      view.reviewSocket();
    }
  }

  setStatus(text) {
    const line = $("#page-status");
    if (line.textContent !== text) line.textContent = text;
  }

  async refreshNodes() {
    const { nodes } = await api("/api/nodes");
    this.nodeCount = nodes.length;
    $("#no-nodes").classList.toggle("hidden", nodes.length > 0);
    $("#node-count").textContent = `${nodes.filter((n) => n.alive).length} up / ${nodes.length}`;
    const seen = new Set();
    let changed = false;
    for (const node of nodes) {
      seen.add(node.name);
      let view = this.views.get(node.name);
      if (!view) {
        view = new NodeView(this, node);
        this.views.set(node.name, view);
        changed = true;
      } else {
        view.update(node);
      }
    }
    for (const [name, view] of this.views) {
      if (!seen.has(name)) {
        view.stop();
        if (view.card) { this.cardObserver.unobserve(view.card); view.card.remove(); }
        this.cardsShown.delete(view);
        view.pane?.remove();
        this.views.delete(name);
        this.selected.delete(name);
        changed = true;
      }
    }
    // Sorted when the nodes change, not on every refresh.
    if (changed) this.ordered = [...this.views.values()].sort((a, b) => naturally.compare(a.node.name, b.node.name));
    $("#panes").classList.toggle("many", nodes.length > SMALL_CLUSTER);
    if (nodes.length <= SMALL_CLUSTER) for (const view of this.ordered) view.ensurePane();
    for (const view of this.views.values()) view.reviewSocket();   // the count may have crossed SMALL_CLUSTER
    this.groupChoices(nodes);
    if (this.mode === null) this.setMode(storedMode() || (nodes.length > TABLE_ABOVE ? "table" : "cards"), false);
    else this.showNodes();
  }

  // -- the nodes' two views, their filter and the selection -------------------------------------
  bindNodeTools() {
    $("#view-cards").addEventListener("click", () => this.setMode("cards", true));
    $("#view-table").addEventListener("click", () => this.setMode("table", true));
    // A new filter shows its first cards again.
    $("#node-search").addEventListener("input", () => { this.cardLimit = CARDS_AT_ONCE; this.showNodes(); });
    $("#node-group").addEventListener("change", () => { this.cardLimit = CARDS_AT_ONCE; this.showNodes(); });
    $("#more-cards").addEventListener("click", () => this.moreCards());
    this.moreObserver.observe($("#more-cards"));
  }

  // A node's output pane, among the others in the natural order of their names.
  placePane(view) {
    const panes = $("#panes");
    const next = [...panes.children].find((p) => naturally.compare(p.dataset.node, view.node.name) > 0);
    panes.insertBefore(view.pane, next || null);
  }

  setMode(mode, remember) {
    this.mode = mode;
    if (remember) { try { localStorage.setItem(VIEW_KEY, mode); } catch (e) { /* not kept */ } }
    $("#view-cards").setAttribute("aria-pressed", String(mode === "cards"));
    $("#view-table").setAttribute("aria-pressed", String(mode === "table"));
    $("#nodes").classList.toggle("hidden", mode !== "cards");
    $("#node-table-wrap").classList.toggle("hidden", mode !== "table");
    this.showNodes();
  }

  // The filter as it is set now, as a test of one view (the search box and the group are read
  // once, not once per node).
  filter() {
    const text = $("#node-search").value.trim().toLowerCase(), group = $("#node-group").value;
    return (view) => {
      const node = view.node;
      if (group && !node.groups.includes(group)) return false;
      return !text || [node.name, node.host, node.txt.os || "", ...node.groups].some((s) => s.toLowerCase().includes(text));
    };
  }

  // The nodes the filter keeps, in natural order, in the view shown: cards or table rows.
  showNodes() {
    const keep = this.filter();
    const all = this.ordered, shown = all.filter(keep);
    const text = shown.length === all.length ? `${all.length} shown` : `${shown.length} of ${all.length} shown`;
    // Written only when it changes: it is a live region, and the refresh runs every 2 s.
    if ($("#node-shown").textContent !== text) $("#node-shown").textContent = text;
    this.shown = shown;
    this.showCards(this.mode === "cards" ? shown : []);
    this.table.setRows(this.mode === "table" ? shown : []);
    this.showTicked(keep);
  }

  // The first `cardLimit` cards of those shown (each built on first show), in their order;
  // cards no longer among them leave the page (their node is no longer in sight).
  showCards(shown) {
    const box = $("#nodes"), wanted = shown.slice(0, this.cardLimit);
    const now = new Set(wanted);
    for (const view of this.cardsShown) {
      if (now.has(view)) continue;
      this.cardObserver.unobserve(view.card);
      view.card.remove();
      if (view.cardInSight) { view.cardInSight = false; view.reviewSocket(); }
    }
    wanted.forEach((view, i) => {
      const card = view.ensureCard(), at = box.children[i];
      if (at !== card) box.insertBefore(card, at || null);
      if (!this.cardsShown.has(view)) {
        view.checkbox.checked = this.selected.has(view.node.name);   // ticked while away
        this.cardObserver.observe(card);
      }
    });
    this.cardsShown = now;
    const more = $("#more-cards"), left = shown.length - wanted.length;
    more.classList.toggle("hidden", left <= 0);
    const label = `Show ${Math.min(left, CARDS_AT_ONCE)} more (${left} not shown yet)`;
    if (left > 0 && more.textContent !== label) more.textContent = label;
  }

  // The next CARDS_AT_ONCE cards (the button, or the end of the cards coming into sight).
  moreCards() {
    if (this.mode !== "cards" || this.cardLimit >= this.shown.length) return;
    this.cardLimit += CARDS_AT_ONCE;
    this.showCards(this.shown);
  }

  // How many nodes Run and Deploy act on (the ticked nodes the filter shows), and how many
  // ticked ones the filter hides (left out).
  showTicked(keep = this.filter()) {
    const on = this.chosen(keep).length, hidden = this.selected.size - on;
    const text = (on ? `on the ${on} ticked node${on === 1 ? "" : "s"} shown` : "tick nodes above to act on them")
      + (hidden ? `; ${hidden} more ticked but hidden by the filter, left out` : "");
    if ($("#ticked").textContent !== text) $("#ticked").textContent = text;
  }

  // The group filter's choices: every group a node is in.
  groupChoices(nodes) {
    const groups = [...new Set(nodes.flatMap((n) => n.groups))].sort(naturally.compare);
    const select = $("#node-group");
    const have = [...select.options].slice(1).map((o) => o.value);
    if (have.join("\n") === groups.join("\n")) return;
    const current = select.value;
    select.replaceChildren(el("option", "", "all groups"), ...groups.map((g) => el("option", "", g)));
    select.options[0].value = "";
    select.value = groups.includes(current) ? current : "";
  }

  select(name, on) {
    if (on) this.selected.add(name); else this.selected.delete(name);
    const view = this.views.get(name);
    if (!view) return;
    if (view.card) view.checkbox.checked = on;
    this.table.syncChecks();
    this.showTicked();
  }

  // "all" chooses the nodes the filter shows; "none" clears every choice. One pass over the
  // nodes, then the boxes in the page are set once.
  selectAll(on) {
    const keep = this.filter();
    if (on) { for (const view of this.ordered) if (keep(view)) this.selected.add(view.node.name); }
    else this.selected.clear();
    for (const view of this.cardsShown) view.checkbox.checked = this.selected.has(view.node.name);
    this.table.syncChecks();
    this.showTicked(keep);
  }

  // The nodes Run and Deploy act on, in natural order: ticked and shown by the filter (a
  // ticked node the filter hides is not acted on unseen).
  chosen(keep = this.filter()) {
    return this.ordered.filter((v) => this.selected.has(v.node.name) && keep(v)).map((v) => v.node.name);
  }

  // Notices from the nodes' sockets have their own list: they never push results out.
  notice(text) {
    const box = $("#notices");
    box.prepend(el("p", "error", text));
    while (box.children.length > MAX_NOTICES) box.lastChild.remove();
  }

  // One line of a run or deploy's outcome among the results (refused, or under way).
  result(text, ok = false) {
    this.keepResult(el("p", ok ? "ok" : "error", text));
  }

  keepResult(box) {
    const results = $("#run-results");
    results.prepend(box);
    while (results.children.length > MAX_RESULTS) results.lastChild.remove();
  }

  showResults(title, results) {
    const box = el("div", "result");
    box.appendChild(el("b", "", title));
    for (const [node, r] of Object.entries(results)) {
      const text = r.ok ? `${node}: ${r.command_error ? "copied; command failed: " + r.command_error : "done"}`
        : `${node}: ${withHint(r)}`;
      box.appendChild(el("div", r.ok && !r.command_error ? "ok" : "error", text));
    }
    this.keepResult(box);
  }

  // A terminal on `name` in the Terminals tab, which is chosen and brought into sight.
  openTerminal(name) {
    if (!this.terminals) return;
    $("#tab-terminals").click();
    const pane = this.terminals.open(name);
    pane?.element.scrollIntoView({ block: "nearest" });
  }

  bindForms() {
    bindTabs($("#run-tabs"));
    // The Terminals tab (terminal.js); its "open on the ticked nodes" acts on those Run would.
    // The view is window.marcoTerminals (tests read its terminals' buffers from there).
    if (window.MarcoTerminals) window.marcoTerminals = this.terminals = new window.MarcoTerminals($("#terminals-pane"), () => this.chosen());
    $("#select-all").onclick = () => this.selectAll(true);
    $("#select-none").onclick = () => this.selectAll(false);

    $("#shell-form").addEventListener("submit", async (e) => {
      e.preventDefault();
      const nodes = this.chosen();
      if (!nodes.length) { this.result("Tick at least one node the filter shows first."); return; }
      try {
        const body = { nodes, command: $("#shell-command").value, cwd: $("#shell-cwd").value || null, label: "shell", kind: "shell" };
        const { results } = await api("/api/run", { method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json" } });
        const failed = Object.entries(results).filter(([, r]) => !r.ok);
        if (failed.length) this.showResults("Run", results);
      } catch (err) { this.result(err.message); }
    });

    const fileInput = $("#deploy-file"), zone = $("#drop-zone");
    // The label says which file is chosen; it is a polite live region, so it is also heard.
    const setFile = (file) => {
      this.file = file;
      $("#drop-label").textContent = file ? `Chosen: ${file.name} (${fmtBytes(file.size)}); Enter or Space to choose another`
        : "Drop a file here or choose one (Enter or Space)";
    };
    fileInput.addEventListener("change", () => setFile(fileInput.files[0]));
    zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (e) => { e.preventDefault(); zone.classList.remove("over"); setFile(e.dataTransfer.files[0]); });

    $("#deploy-form").addEventListener("submit", async (e) => {
      e.preventDefault();
      const nodes = this.chosen();
      if (!nodes.length) { this.result("Tick at least one node the filter shows first."); return; }
      if (!this.file) { this.result("Choose a file to deploy."); return; }
      const query = new URLSearchParams({
        nodes: nodes.join(","), folder: $("#deploy-folder").value || "~", name: this.file.name,
        overwrite: $("#deploy-overwrite").checked ? "1" : "0",
      });
      // The command travels in a header, so it stays out of the controller's access log.
      const headers = { "Content-Type": "application/octet-stream",
                        "X-Marco-Command": encodeURIComponent($("#deploy-command").value) };
      try {
        this.result(`Deploying ${this.file.name} to ${nodes.length} node(s)…`, true);
        const { results } = await api(`/api/deploy?${query}`, { method: "PUT", body: this.file, headers });
        this.showResults(`Deploy ${this.file.name}`, results);
      } catch (err) { this.result(err.message); }
    });
  }
}

window.addEventListener("DOMContentLoaded", () => { new App().start().catch((e) => console.error(e)); });
