// Marco's page: nodes with live status, shell and deploy on chosen nodes, live output viewer.
// The page reaches each agent's per-user WebSocket through the controller's relay (/relay/NODE),
// authenticated by the HttpOnly login cookie: it never holds the agents' token.
"use strict";

const REPLAY_EXECUTIONS = 20;      // per node, on (re)connect
const ANNOUNCE_EVERY_MS = 5000;    // the live region speaks of new output at most this often
const SOCKET_LINGER_MS = 5000;     // a node's socket stays this long after it left the page's needs
const TABLE_ABOVE = 50;            // more nodes and the table is the view until one is picked
const SMALL_CLUSTER = 20;          // up to this many nodes each alive one holds its socket and
                                   // shows its pane; above, only those the page needs
const REPLAY_WAIT_MS = 15000;      // a replay unanswered this long (the agent refused it) is given up
const SHORT_OUTPUT = 12;           // lines an execution's box shows at their own height
const ROW_MARGIN = 8;              // table rows rendered above and below those in sight
const VIEW_KEY = "marco-node-view";
const naturally = new Intl.Collator(undefined, { numeric: true, sensitivity: "base" });

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};
const cssId = (s) => String(s).replace(/[^A-Za-z0-9_-]/g, "_");

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
// One node: its card (status; built once the cards view shows), its row's data, its output
// pane, its socket (open only while the page needs it: see wanted()).
class NodeView {
  constructor(app, node) {
    this.app = app;
    this.node = node;
    this.executions = new Map();   // id -> ExecutionView
    this.socket = null;
    this.closed = false;
    this.card = null;
    this.lastStatus = null;        // the agent's last status snapshot, for the card and the row
    this.cardInSight = false;
    this.rowInSight = false;
    this.lingerTimer = null;
    this.pausing = false;
    this.buildPane();
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
    const details = el("details", "procs");
    details.appendChild(el("summary", "", "top processes"));
    this.procs = el("table", "proc-table");
    details.appendChild(this.procs);
    card.appendChild(details);
    this.card = card;
    this.drawCard();
    if (this.lastStatus) this.drawStatus(this.lastStatus);
  }

  buildPane() {
    const pane = el("div", "pane empty");
    pane.id = "pane-" + cssId(this.node.name);
    pane.dataset.node = this.node.name;
    const head = el("div", "pane-head");
    head.appendChild(el("b", "", this.node.name));
    this.link = el("span", "link-state", "not connected");
    head.appendChild(this.link);
    pane.appendChild(head);
    this.list = el("div", "executions");
    stickToBottom(this.list);
    pane.appendChild(this.list);
    this.pane = pane;
  }

  update(node) {
    this.node = node;
    if (this.card) this.drawCard();
    this.reviewSocket();
  }

  drawCard() {
    const node = this.node;
    this.card.classList.toggle("down", !node.alive);
    this.badge.textContent = node.alive ? (node.txt.os || "up") : "down";
    const groups = node.groups.length ? ` · groups ${node.groups.join(", ")}` : "";
    this.meta.textContent = `${node.host}:${node.port}${groups}`;
  }

  // Above SMALL_CLUSTER nodes the page holds a node's socket (output and status) only while it
  // needs it: the node is in sight (its card or its table row), chosen, or runs something the
  // page shows. One socket per node per page does not scale to a thousand nodes (each agent
  // allows a user 32, a browser a few hundred in all); issue 15 multiplexes them into one.
  wanted() {
    if (!this.node.alive) return false;
    if (this.app.nodeCount <= SMALL_CLUSTER) return true;   // every live node, as a few need
    if (this.cardInSight || this.rowInSight || this.app.selected.has(this.node.name)) return true;
    for (const execution of this.executions.values()) if (execution.running) return true;
    return false;
  }

  // Opens the socket when wanted; closes it SOCKET_LINGER_MS after it stopped being wanted
  // (scrolling past a node does not open and close its socket at once).
  reviewSocket() {
    if (this.wanted()) {
      clearTimeout(this.lingerTimer);
      this.lingerTimer = null;
      if (!this.socket && !this.closed) this.connect();
    } else if (this.socket && !this.lingerTimer) {
      this.lingerTimer = setTimeout(() => {
        this.lingerTimer = null;
        if (this.socket && !this.wanted()) { this.pausing = true; this.socket.close(); }
      }, SOCKET_LINGER_MS);
    }
  }

  setLink(text, ok) {
    this.link.textContent = text;
    this.link.classList.toggle("bad", !ok);
  }

  // -- socket ----------------------------------------------------------------------------------
  connect() {
    // Always through the controller's relay: the browser trusts one certificate (the
    // controller's), the login cookie authenticates the socket, and the agents' token never
    // reaches page JavaScript (the relay authenticates upstream).
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const socket = new WebSocket(`${scheme}//${location.host}/relay/${encodeURIComponent(this.node.name)}`);
    this.socket = socket;
    this.setLink("connecting…", true);
    socket.onmessage = (message) => this.onEvent(JSON.parse(message.data));
    socket.onclose = (event) => {
      this.socket = null;
      for (const execution of this.executions.values()) execution.dropReads();
      if (this.closed) return;
      if (this.pausing) { this.pausing = false; this.setLink("not connected (out of sight)", true); this.reviewSocket(); return; }
      if (event.code === 4401) { window.location = "/login"; return; }
      this.setLink(`disconnected (${event.code}); retrying`, false);
      setTimeout(() => this.reviewSocket(), 1500);
    };
  }

  send(message) {
    if (!this.isOpen()) return false;
    this.socket.send(JSON.stringify(message));
    return true;
  }

  isOpen() { return Boolean(this.socket && this.socket.readyState === WebSocket.OPEN); }

  onEvent(event) {
    switch (event.type) {
      case "hello":
        this.setLink("live", true);
        this.send({ type: "subscribe", status: true });
        // Each execution's length is known now; its view reads the lines it shows (the last
        // ones while following) by replay, page by page as they come into sight.
        event.executions.slice(-REPLAY_EXECUTIONS).forEach((summary) => {
          const view = this.execution(summary.id, summary);
          view.setSummary(summary);
          view.grow(summary.next_seq);
        });
        break;
      case "started": {
        const view = this.execution(event.id, event);
        view.live = true;   // started while the page watched: its lines are news worth announcing
        view.setSummary(Object.assign({ state: "running" }, event));
        break;
      }
      case "output": this.execution(event.id).output(event); break;
      case "exit": this.execution(event.id).exit(event); break;
      case "replayed": {
        const view = this.execution(event.id, event.execution);
        view.setSummary(event.execution);
        view.replayed(event);
        break;
      }
      case "status": this.status(event.status); break;
      case "error": this.app.notice(`${this.node.name}: ${withHint(event)}`); break;
      default: break;
    }
  }

  execution(id, summary) {
    let view = this.executions.get(id);
    if (!view) {
      view = new ExecutionView(this, id, summary || {});
      this.executions.set(id, view);
      this.list.appendChild(view.block);
      this.pane.classList.remove("empty");
      followEnd(this.list);
    }
    return view;
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

  stop() { this.closed = true; clearTimeout(this.lingerTimer); if (this.socket) this.socket.close(); }
}

// ---------------------------------------------------------------------------------------------
// One execution: a block with its header, its lines (stdout and stderr styled apart), stop.
class ExecutionView {
  constructor(nodeView, id, summary) {
    this.nodeView = nodeView;
    this.id = id;
    this.nextSeq = 0;               // the seq after the last line known (live or replayed)
    this.reads = [];                // replays asked for the view, answered in order
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
    this.stopButton.onclick = () => nodeView.send({ type: "stop", id });
    [this.label, this.command, this.started, this.state, this.stopButton].forEach((e) => head.appendChild(e));
    block.appendChild(head);
    this.notice = el("div", "exec-notice");
    block.appendChild(this.notice);
    // The lines: an OutputView (output_view.js), virtual, fed by the socket's live output and
    // reading earlier lines by replay; it follows the end with "Jump to latest" (item 4).
    this.box = el("div", "exec-output no-lines");
    block.appendChild(this.box);
    this.view = new OutputView(this.box, { label: nodeView.node.name, loadPage: (segment, since) => this.read(since) });
    this.view.setSegments([{ id, host: nodeView.node.name, length: 0 }]);
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
  // through output() (so they fill the view), then `replayed` answers the read. Without an
  // open socket it answers "nothing yet" at once (the view asks again a second later).
  read(since) {
    return new Promise((resolve) => {
      this.reads.push({ since, resolve });
      if (this.reads.length === 1) this.askNext();
    });
  }

  askNext() {
    while (this.reads.length && !this.nodeView.send({ type: "replay", id: this.id, since: this.reads[0].since })) {
      const read = this.reads.shift();
      read.resolve({ events: [], next: read.since, end: false });
    }
    // An agent that refuses a replay (e.g. the execution was pruned) answers an `error` with no
    // id: the read is given up after a while, so the view may ask again and the queue moves on.
    const asked = this.reads[0];
    if (asked) asked.timer = setTimeout(() => { if (this.reads[0] === asked) this.replayed({ next: asked.since }); }, REPLAY_WAIT_MS);
  }

  replayed(event) {
    const read = this.reads.shift();
    if (!read) return;
    clearTimeout(read.timer);
    const ended = event.execution && event.execution.state && event.execution.state !== "running";
    read.resolve({ events: [], next: event.next, end: Boolean(event.complete && ended) });
    this.askNext();
  }

  // The socket closed: no answer will come to the reads asked on it.
  dropReads() {
    for (const read of this.reads.splice(0)) { clearTimeout(read.timer); read.resolve({ events: [], next: read.since, end: false }); }
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
    // Rows already in the DOM are kept and refreshed (a focused checkbox keeps its focus).
    const before = this.rendered;
    this.rendered = new Map();
    const trs = this.rows.slice(from, to).map((view, i) => {
      const tr = before.get(view.node.name) || this.row(view);
      this.fill(tr, view, from + i);
      this.rendered.set(view.node.name, tr);
      return tr;
    });
    const current = [...this.body.children].slice(1, -1);
    if (this.body.children.length >= 2 && current.length === trs.length && trs.every((tr, i) => tr === current[i])) {
      this.body.firstElementChild.replaceWith(this.spacer(from));
      this.body.lastElementChild.replaceWith(this.spacer(this.rows.length - to));
    } else {
      this.body.replaceChildren(this.spacer(from), ...trs, this.spacer(this.rows.length - to));
    }
    const measured = trs.length ? trs[0].getBoundingClientRect().height : 0;
    if (measured > 0 && Math.abs(measured - this.rowHeight) > 0.5) { this.rowHeight = measured; this.schedule(); }
    // The box grows with its spacers (up to its max-height): render again for the new height.
    if (this.wrap.clientHeight !== height) this.schedule();
    this.inSight(new Set(this.rows.slice(first, last).map((v) => v.node.name)));
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

  // Tells each node whether its row is in sight now (it holds a socket while it is).
  inSight(names) {
    for (const view of this.app.views.values()) {
      const now = names.has(view.node.name);
      if (view.rowInSight !== now) { view.rowInSight = now; view.reviewSocket(); }
    }
  }
}

// ---------------------------------------------------------------------------------------------
class App {
  constructor() {
    this.views = new Map();
    this.selected = new Set();     // the chosen nodes' names, shared by the cards and the table
    this.mode = null;              // "cards" or "table"
    this.nodeCount = 0;
    this.announcer = new Announcer($("#output-announcer"));
    this.table = new NodeTable(this, $("#node-table-wrap"));
    // A card in sight holds its node's socket (see NodeView.wanted).
    this.cardObserver = new IntersectionObserver((entries) => {
      for (const entry of entries) {
        const view = this.views.get(entry.target.dataset.node);
        if (view && view.cardInSight !== entry.isIntersecting) { view.cardInSight = entry.isIntersecting; view.reviewSocket(); }
      }
    });
  }

  async start() {
    await api("/api/session");  // redirects to the login page when the session is over
    this.bindForms();
    this.bindNodeTools();
    await this.refreshNodes();
    setInterval(() => this.refreshNodes().catch((e) => this.notice(e.message)), 2000);
  }

  async refreshNodes() {
    const { nodes } = await api("/api/nodes");
    this.nodeCount = nodes.length;
    $("#no-nodes").classList.toggle("hidden", nodes.length > 0);
    $("#node-count").textContent = `${nodes.filter((n) => n.alive).length} up / ${nodes.length}`;
    const seen = new Set();
    for (const node of nodes) {
      seen.add(node.name);
      let view = this.views.get(node.name);
      if (!view) {
        view = new NodeView(this, node);
        this.views.set(node.name, view);
        $("#panes").appendChild(view.pane);
      } else {
        view.update(node);
      }
    }
    for (const [name, view] of this.views) {
      if (!seen.has(name)) {
        view.stop();
        if (view.card) { this.cardObserver.unobserve(view.card); view.card.remove(); }
        view.pane.remove();
        this.views.delete(name);
        this.selected.delete(name);
      }
    }
    $("#panes").classList.toggle("many", nodes.length > SMALL_CLUSTER);
    for (const view of this.views.values()) view.reviewSocket();   // the count may have crossed SMALL_CLUSTER
    this.groupChoices(nodes);
    if (this.mode === null) this.setMode(storedMode() || (nodes.length > TABLE_ABOVE ? "table" : "cards"), false);
    else this.showNodes();
  }

  // -- the nodes' two views, their filter and the selection -------------------------------------
  bindNodeTools() {
    $("#view-cards").addEventListener("click", () => this.setMode("cards", true));
    $("#view-table").addEventListener("click", () => this.setMode("table", true));
    $("#node-search").addEventListener("input", () => this.showNodes());
    $("#node-group").addEventListener("change", () => this.showNodes());
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

  matches(view) {
    const text = $("#node-search").value.trim().toLowerCase(), group = $("#node-group").value;
    const node = view.node;
    if (group && !node.groups.includes(group)) return false;
    return !text || [node.name, node.host, node.txt.os || "", ...node.groups].some((s) => s.toLowerCase().includes(text));
  }

  // The nodes the filter keeps, in the view shown: cards (built on first show) or table rows.
  showNodes() {
    const all = [...this.views.values()];
    const shown = all.filter((v) => this.matches(v));
    $("#node-shown").textContent = shown.length === all.length ? `${all.length} shown` : `${shown.length} of ${all.length} shown`;
    if (this.mode === "cards") {
      const keep = new Set(shown);
      for (const view of all) {
        if (!view.card) { $("#nodes").appendChild(view.ensureCard()); this.cardObserver.observe(view.card); }
        view.card.classList.toggle("hidden", !keep.has(view));
      }
    }
    this.table.setRows(this.mode === "table" ? shown : []);
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
    view.reviewSocket();
  }

  // "all" chooses the nodes the filter shows; "none" clears every choice.
  selectAll(on) {
    for (const view of this.views.values()) {
      if (!on || this.matches(view)) this.select(view.node.name, on);
    }
  }

  chosen() {
    return [...this.views.keys()].filter((name) => this.selected.has(name));
  }

  notice(text, ok = false) {
    const p = el("p", ok ? "ok" : "error", text);
    $("#run-results").prepend(p);
    while ($("#run-results").children.length > 8) $("#run-results").lastChild.remove();
  }

  showResults(title, results) {
    const box = el("div", "result");
    box.appendChild(el("b", "", title));
    for (const [node, r] of Object.entries(results)) {
      const text = r.ok ? `${node}: ${r.command_error ? "copied; command failed: " + r.command_error : "done"}`
        : `${node}: ${withHint(r)}`;
      box.appendChild(el("div", r.ok && !r.command_error ? "ok" : "error", text));
    }
    $("#run-results").prepend(box);
  }

  bindForms() {
    bindTabs($("#run-tabs"));
    $("#select-all").onclick = () => this.selectAll(true);
    $("#select-none").onclick = () => this.selectAll(false);

    $("#shell-form").addEventListener("submit", async (e) => {
      e.preventDefault();
      const nodes = this.chosen();
      if (!nodes.length) { this.notice("Tick at least one node first."); return; }
      try {
        const body = { nodes, command: $("#shell-command").value, cwd: $("#shell-cwd").value || null, label: "shell", kind: "shell" };
        const { results } = await api("/api/run", { method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json" } });
        const failed = Object.entries(results).filter(([, r]) => !r.ok);
        if (failed.length) this.showResults("Run", results);
      } catch (err) { this.notice(err.message); }
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
      if (!nodes.length) { this.notice("Tick at least one node first."); return; }
      if (!this.file) { this.notice("Choose a file to deploy."); return; }
      const query = new URLSearchParams({
        nodes: nodes.join(","), folder: $("#deploy-folder").value || "~", name: this.file.name,
        overwrite: $("#deploy-overwrite").checked ? "1" : "0",
      });
      // The command travels in a header, so it stays out of the controller's access log.
      const headers = { "Content-Type": "application/octet-stream",
                        "X-Marco-Command": encodeURIComponent($("#deploy-command").value) };
      try {
        this.notice(`Deploying ${this.file.name} to ${nodes.length} node(s)…`, true);
        const { results } = await api(`/api/deploy?${query}`, { method: "PUT", body: this.file, headers });
        this.showResults(`Deploy ${this.file.name}`, results);
      } catch (err) { this.notice(err.message); }
    });
  }
}

window.addEventListener("DOMContentLoaded", () => { new App().start().catch((e) => console.error(e)); });
