// Marco's runs pages: the runs list (/runs) and one run's page (/runs/ID), filled from the runs
// API (docs/runs.md). Every value from the API becomes text (textContent), never HTML; statuses
// are CSS classes with an aria-label.
"use strict";

const POLL_MS = 1000;          // a running run's page asks for new output this often
const WAIT_S = 25;             // a running run's next events are awaited this long per ask (a long poll)
const LIST_POLL_MS = 2000;     // the list refreshes this often while a shown run is running
const PAGE_SIZE = 50;
const OUTPUT_PAGE = 5000;      // output lines asked for per request at most (the API's default)
// A poll lists a view's executions from the store alone (`live=0`: no agent asked; the output
// reads say each one's end) but its first look and every LIVE_LOOK_EVERY-th, which also find
// executions only their agents know so far.
const LIVE_LOOK_EVERY = 10;
const MAX_TITLE = 1000;        // a run's title is its command's first this many characters

const $ = (sel, root = document) => root.querySelector(sel);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
};
const STATUSES = ["running", "ok", "changed", "failed", "unreachable", "skipped", "interrupted"];
// A status from the API as a class name: only known ones, so data never makes up classes.
const statusClass = (s) => "status-" + (STATUSES.includes(s) ? s : "unknown");

function xsrfToken() {
  const m = document.cookie.match(/(?:^|; )_xsrf=([^;]*)/);
  return m ? decodeURIComponent(m[1]) : "";
}

async function api(path, options = {}) {
  const headers = Object.assign({ "X-XSRFToken": xsrfToken() }, options.headers || {});
  const response = await fetch(path, Object.assign({ credentials: "same-origin" }, options, { headers }));
  if (response.status === 401) {
    window.location = "/login?next=" + encodeURIComponent(window.location.pathname);
    throw new Error("logged out");
  }
  let data = {};
  try { data = await response.json(); } catch (e) { /* empty body */ }
  if (!response.ok) {
    const message = data.message ? (data.hint ? `${data.message}; ${data.hint}` : data.message) : `HTTP ${response.status}`;
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return data;
}

function badge(status, id) {
  const b = el("span", "status " + statusClass(status), status);
  b.setAttribute("aria-label", "status: " + status);
  if (id) b.id = id;
  return b;
}

// Download links for some output (GET /api/runs/ID/output.txt|.jsonl with `query`: a host's,
// a task's on a host): plain text as printed, without terminal escapes, and JSON lines.
function downloadLinks(runPath, query, label) {
  const links = el("span", "downloads");
  const add = (text, file, extra, title) => {
    const a = el("a", "download", text);
    a.href = `${runPath}/${file}?${new URLSearchParams(Object.assign({}, query, extra))}`;
    a.setAttribute("download", "");
    a.title = `${title}: ${label}`;
    links.appendChild(a);
    links.appendChild(document.createTextNode(" "));
  };
  links.appendChild(document.createTextNode("download: "));
  add("text", "output.txt", {}, "download the output as text");
  add("text without colours", "output.txt", { ansi: "strip" }, "download the output as text without colours");
  add("JSON lines", "output.jsonl", {}, "download the output as JSON lines with timestamps");
  return links;
}

function setBadge(b, status) {
  // Only the status class changes: the badge keeps its other classes (e.g. pane-state).
  for (const c of [...b.classList]) if (c.startsWith("status-")) b.classList.remove(c);
  b.classList.add("status", statusClass(status));
  b.textContent = status;
  b.setAttribute("aria-label", "status: " + status);
}

const fmtWhen = (t) => new Date(t * 1000).toLocaleString();

function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  const m = Math.floor(seconds / 60), s = Math.round(seconds % 60);
  if (m < 60) return `${m} min ${s} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

const runDuration = (run) => (run.ended === null ? Date.now() / 1000 : run.ended) - run.started;

// Hosts ok and failed from a run's stats (a host failed if it failed or was unreachable).
function hostCounts(run) {
  let ok = 0, failed = 0;
  for (const counts of Object.values(run.stats || {})) {
    if ((counts.failed || 0) > 0 || (counts.unreachable || 0) > 0) failed++; else ok++;
  }
  return { ok, failed };
}

function failedHosts(run) {
  return Object.entries(run.stats || {})
    .filter(([, c]) => (c.failed || 0) > 0 || (c.unreachable || 0) > 0).map(([h]) => h);
}

// A node's Unix time as local HH:MM:SS.mmm.
function fmtTime(t) {
  const d = new Date(t * 1000), two = (n) => String(n).padStart(2, "0");
  return `${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}.${String(d.getMilliseconds()).padStart(3, "0")}`;
}

const TIMES_KEY = "marco-timestamps";

// The "Timestamps" toggle: a class on the page the line times show by, kept in localStorage.
function timestampsToggle() {
  const box = $("#show-times");
  if (!box) return;
  const apply = () => document.body.classList.toggle("show-times", box.checked);
  try { box.checked = localStorage.getItem(TIMES_KEY) === "1"; } catch (e) { /* no storage */ }
  apply();
  box.addEventListener("change", () => {
    apply();
    try { localStorage.setItem(TIMES_KEY, box.checked ? "1" : "0"); } catch (e) { /* no storage */ }
  });
}

const newAnsi = () => ({ stdout: Ansi.newState(), stderr: Ansi.newState() });

// A run's executions as a view's segments are listed: page by page (GET /api/runs/ID/
// executions), the agents asked on the first look and every LIVE_LOOK_EVERY-th.
class OutputReader {
  constructor(runPath) {
    this.runPath = runPath;
    this.looks = 0;
  }

  // The view's executions for the next look (see LIVE_LOOK_EVERY), page by page while the
  // answer says `more` (stored ones come first: the next page starts after those given).
  async list(query = new URLSearchParams()) {
    if (this.looks++ % LIVE_LOOK_EVERY) query.set("live", "0");
    const executions = [];
    for (;;) {
      const page = new URLSearchParams(query);
      if (executions.length) page.set("offset", String(executions.length));
      const text = page.toString();
      const answer = await api(`${this.runPath}/executions${text ? "?" + text : ""}`);
      executions.push(...answer.executions);
      if (!answer.more || !answer.executions.length) return executions;
    }
  }
}

// The seq after an execution's last line that can be read: an agent that cut its output (its
// spool was full) keeps nothing from `truncated_seq` on, though its `next_seq` counts on.
function readableEnd(execution) {
  const next = execution.next_seq || 0, cut = execution.truncated_seq;
  return Number.isInteger(cut) ? Math.min(next, cut) : next;
}

// Whether an execution still runs: its agent says so, or (its agent not asked) it is not
// archived while its run runs. One archived without `ended` (its node restarted and lost it,
// an older agent) has ended, when is unknown.
function executionRunning(execution, run) {
  if (typeof execution.ended === "number") return false;
  if (execution.state === "running") return true;
  return !execution.archived && !execution.state && Boolean(run) && run.ended === null;
}

// How long executions took, from the first one's start to the last one's end (the nodes'
// clocks, as the executions listing gives them): {seconds, running}, or null when no
// execution says when it started (an agent not asked yet, an older controller) or one that
// has ended does not say when.
function executionsSpan(executions, run) {
  const started = executions.map((e) => e.started).filter((t) => typeof t === "number");
  if (!started.length) return null;
  const running = executions.some((e) => executionRunning(e, run));
  if (!running && executions.some((e) => typeof e.ended !== "number")) return null;
  const end = running ? Date.now() / 1000
    : Math.max(...executions.map((e) => e.ended));
  return { seconds: Math.max(0, end - Math.min(...started)), running };
}

// "took 1.2 s" (or "running for 3.0 s") for executions of `run`; "" when their times are
// unknown.
function spanText(executions, run) {
  const span = executionsSpan(executions, run);
  if (!span) return "";
  return (span.running ? "running for " : "took ") + fmtDuration(span.seconds);
}

// The open result's executions and how long each took, under its output's heading.
function showExecutionTimes(executions, run) {
  const line = $("#details-executions");
  if (!line) return;
  const parts = executions.map((e) => {
    const took = spanText([e], run);
    const rc = Number.isInteger(e.rc) ? `, rc=${e.rc}` : "";
    return took ? took + rc : null;
  }).filter(Boolean);
  line.textContent = parts.length ? `${executions.length} execution(s): ${parts.join("; ")}` : "";
  line.classList.toggle("hidden", !parts.length);
}

// Executions as an OutputView's segments, in the listing's order.
const segmentsOf = (executions) => executions.map((e) => ({
  id: e.execution_id, host: e.host, task_id: e.task_id, length: readableEnd(e) }));

// ---------------------------------------------------------------------------------------------
// /runs: the caller's runs, newest first, filtered through GET /api/runs.
class RunsList {
  constructor() {
    this.body = $("#runs");
    this.more = $("#runs-more");
    this.last = null;       // the id of the oldest run shown (the next page's `before`)
    this.pages = 0;
    this.generation = 0;    // answers to older filter values are dropped
    this.timer = null;
  }

  start() {
    const reload = () => this.load(true);
    $("#filter-kind").addEventListener("change", reload);
    $("#filter-status").addEventListener("change", reload);
    let typing = null;
    $("#filter-q").addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(reload, 250); });
    $("#run-filters").addEventListener("submit", (e) => { e.preventDefault(); reload(); });
    this.more.addEventListener("click", () => this.load(false));
    return this.load(true);
  }

  query(before) {
    const q = new URLSearchParams({ limit: String(PAGE_SIZE) });
    for (const [name, id] of [["kind", "#filter-kind"], ["status", "#filter-status"], ["q", "#filter-q"]]) {
      const value = $(id).value.trim();
      if (value) q.set(name, value);
    }
    if (before) q.set("before", before);
    return "/api/runs?" + q.toString();
  }

  async load(fresh) {
    clearTimeout(this.timer);
    const generation = fresh ? ++this.generation : this.generation;
    let answer;
    try {
      answer = await api(this.query(fresh ? null : this.last));
    } catch (err) {
      $("#runs-error").textContent = err.message;
      $("#runs-error").classList.remove("hidden");
      return;
    }
    if (generation !== this.generation) return;
    $("#runs-error").classList.add("hidden");
    if (fresh) { this.body.replaceChildren(); this.pages = 0; }
    this.body.dataset.query = this.query(null);  // what the rows shown answer (tests wait on it)
    this.pages++;
    for (const run of answer.runs) this.body.appendChild(this.row(run));
    if (answer.runs.length) this.last = answer.runs[answer.runs.length - 1].id;
    this.more.classList.toggle("hidden", !answer.more);
    $("#no-runs").classList.toggle("hidden", this.body.childElementCount > 0);
    $("#runs-count").textContent = `${this.body.childElementCount}${answer.more ? "+" : ""}`;
    // Only the first page refreshes itself, so "more" pages never jump under the reader.
    if (this.pages === 1 && answer.runs.some((r) => r.ended === null)) {
      this.timer = setTimeout(() => this.load(true), LIST_POLL_MS);
    }
  }

  row(run) {
    const tr = el("tr", "run-row");
    tr.dataset.run = run.id;
    tr.dataset.status = run.status;
    const cell = (child, cls) => {
      const td = el("td", cls);
      if (typeof child === "string") td.textContent = child; else td.appendChild(child);
      tr.appendChild(td);
      return td;
    };
    cell(badge(run.status), "run-status");
    cell(run.kind, "run-kind");
    const link = el("a", "run-link", run.title);
    link.href = "/runs/" + encodeURIComponent(run.id);
    cell(link, "run-title");
    cell(run.owner, "run-owner");
    cell(fmtWhen(run.started), "run-started");
    cell(run.ended === null ? "running" : fmtDuration(runDuration(run)), "run-duration");
    const { ok, failed } = hostCounts(run);
    const hosts = cell("", "run-hosts");
    hosts.appendChild(el("span", "hosts-ok", `${ok} ok`));
    hosts.appendChild(document.createTextNode(" · "));
    hosts.appendChild(el("span", failed ? "hosts-failed" : "hosts-none", `${failed} failed`));
    hosts.title = (run.hosts || []).join(", ");
    return tr;
  }
}

// ---------------------------------------------------------------------------------------------
// /runs/ID: one run; a tasks × hosts grid for playbooks, a pane per host for the others.
class RunView {
  constructor(section) {
    this.id = section.dataset.run;
    this.kind = section.dataset.kind;
    this.run = null;
    this.seq = 0;                  // the last event seen
    this.tasks = new Map();        // task_id -> {name, play, row, cells: Map(host -> cell)}
    this.hosts = [];               // the grid's columns, in order
    this.results = new Map();      // `${task_id}\n${host}` -> the host_result event
    this.panes = new Map();        // host -> {pane, view, empty, state, took}
    this.paneOutput = new OutputReader(this.path());
    this.open = null;              // {task_id, host} of the details panel
    this.outputPolling = false;    // pollOutput runs (from the first events answer on)
    this.details = null;           // the open details' output: {key, reader}
    this.detailsView = null;       // the OutputView of the open details' output
    this.highlighted = [null, {}]; // the search's needle and options, for every view
    this.outputTurn = Promise.resolve();  // output is read one reader at a time, in order
  }

  get playbook() { return this.kind === "playbook"; }
  path(suffix = "") { return `/api/runs/${encodeURIComponent(this.id)}${suffix}`; }

  async start() {
    // A terminal run's page shows its recording's player (cast_player.js) instead of panes.
    const terminal = this.kind === "terminal" && typeof CastPlayer !== "undefined";
    $(this.playbook ? "#grid-panel" : terminal ? "#cast-panel" : "#host-panes-panel").classList.remove("hidden");
    if (terminal) new CastPlayer($("#cast-panel"), this.id).start().catch((e) => this.showError(e.message));
    $("#details-close").addEventListener("click", () => this.closeDetails());
    $("#rerun").addEventListener("click", () => this.rerun(this.run.hosts));
    $("#rerun-failed").addEventListener("click", () => this.rerun(failedHosts(this.run)));
    $("#end-run").addEventListener("click", () => this.markEnded());
    this.detailsView = this.outputView($("#details-output"), "this result");
    timestampsToggle();
    OutputView.wrapToggle($("#wrap-lines"));
    if (typeof RunSearch !== "undefined") {
      this.search = new RunSearch(this, $("#run-search"));
      this.search.start();
    }
    await this.pollEvents();
  }

  // Events: the first ask answers at once; then, while the run runs and the tab is seen,
  // each ask waits at the controller until the next batch arrives or the run ends (a long
  // poll), so a result shows in its cell as it arrives. A hidden tab asks every second
  // instead, so background tabs do not hold the browser's few connections to the
  // controller. Output is read on its own beat (pollOutput), from the first answer on.
  async pollEvents() {
    let first = true;
    for (;;) {
      const wait = !first && document.visibilityState === "visible";
      first = false;
      try {
        let run;
        do {  // the events come in pages: ask on while the answer says there are `more`
          run = await api(this.path(`?since=${this.seq}${wait ? `&wait=${WAIT_S}` : ""}`));
          this.update(run);
          for (const event of run.events) this.apply(event);
        } while (run.more && run.events.length);
        this.showError(null);
        if (!this.outputPolling) {
          this.outputPolling = true;
          this.pollOutput();
        }
        if (run.ended !== null) return;
        // Nothing new: the controller did not wait (a hidden tab, or the user's waiting reads
        // are at their bound), or waited its whole time; either way the next ask can wait a
        // second without delaying a result it would have brought.
        if (!run.events.length) await sleep(POLL_MS);
      } catch (err) {
        this.showError(err.message);
        if (err.status === 404) return;  // the run is gone (pruned): asking again cannot help
        await sleep(POLL_MS);  // a controller that fails is not asked in a tight loop
      }
    }
  }

  // Output every second while the run runs, and once more after its end was seen.
  async pollOutput() {
    for (;;) {
      const ended = this.run.ended !== null;
      try {
        await this.refreshOutput();
      } catch (err) {
        this.showError(err.message);
        if (err.status === 404) return;  // the run is gone (pruned)
      }
      if (ended) return;
      await sleep(POLL_MS);
    }
  }

  showError(message) {
    $("#run-error").textContent = message || "";
    $("#run-error").classList.toggle("hidden", !message);
  }

  update(run) {
    this.run = run;
    setBadge($("#run-status"), run.status);
    $("#run-page").dataset.status = run.status;
    $("#run-started").textContent = "started " + fmtWhen(run.started);
    $("#run-duration").textContent = run.ended === null ? "running" : "took " + fmtDuration(runDuration(run));
    const { ok, failed } = hostCounts(run);
    $("#run-hosts").textContent = `${run.hosts.length} host(s): ${ok} ok, ${failed} failed`;
    const canRerun = run.ended !== null && (run.kind === "command" || run.kind === "shell");
    const command = this.command();
    $("#rerun-actions").classList.toggle("hidden", !canRerun);
    $("#rerun-unavailable").classList.toggle("hidden", command !== null);
    $("#end-actions").classList.toggle("hidden", run.ended !== null);
    $("#rerun").disabled = command === null;
    $("#rerun-failed").disabled = command === null || failedHosts(run).length === 0;
    for (const host of run.hosts) this.addHost(host);
    for (const [host, pane] of this.panes) {
      // A host without stats in an ended run ended with the run (e.g. interrupted).
      if (run.stats && run.stats[host]) this.hostState(host, run.stats[host]);
      else setBadge(pane.state, run.ended === null ? "running" : run.status);
      this.paneDuration(host);
    }
  }

  apply(event) {
    this.seq = Math.max(this.seq, event.seq);
    if (event.type === "play_start") this.currentPlay = event.play;
    else if (event.type === "task_start") this.addTask(event);
    else if (event.type === "host_result") this.addResult(event);
    else if (event.type === "execution" && event.host) this.addHost(event.host);
  }

  addHost(host) {
    if (this.hosts.includes(host)) return;
    this.hosts.push(host);
    if (this.playbook) {
      const th = el("th", "grid-host", host);
      th.scope = "col";
      $("#grid-hosts").appendChild(th);
      for (const [taskId, task] of this.tasks) task.row.appendChild(this.cell(taskId, host));
    } else {
      this.addPane(host);
    }
  }

  addTask(event) {
    if (this.tasks.has(event.task_id)) return;
    const row = el("tr", "grid-task");
    row.dataset.task = event.task_id;
    const name = el("th", "task-name");
    name.scope = "row";
    if (this.currentPlay) name.appendChild(el("span", "task-play", this.currentPlay));
    name.appendChild(el("span", "task-title", event.task || event.action || event.task_id));
    row.appendChild(name);
    const task = { name: event.task || event.action || String(event.task_id), row, cells: new Map() };
    this.tasks.set(event.task_id, task);
    for (const host of this.hosts) row.appendChild(this.cell(event.task_id, host));
    $("#grid-tasks").appendChild(row);
    $("#no-tasks").classList.add("hidden");
  }

  // A grid cell: empty until its host's result arrives, then a button coloured by status.
  cell(taskId, host) {
    const td = el("td", "grid-cell");
    td.dataset.host = host;
    const task = this.tasks.get(taskId);
    const button = el("button", "cell status-none", "");
    button.type = "button";
    button.disabled = true;
    button.dataset.host = host;
    button.setAttribute("aria-label", `${task ? task.name : taskId} on ${host}: no result`);
    button.addEventListener("click", () => this.showDetails(taskId, host));
    td.appendChild(button);
    if (task) task.cells.set(host, button);
    const result = this.results.get(`${taskId}\n${host}`);
    if (result) this.colour(button, taskId, result);
    return td;
  }

  addResult(event) {
    if (event.task_id === undefined || !event.host) return;
    this.addHost(event.host);
    this.results.set(`${event.task_id}\n${event.host}`, event);
    const task = this.tasks.get(event.task_id);
    const button = task && task.cells.get(event.host);
    if (button) this.colour(button, event.task_id, event);
    if (this.open && this.open.task_id === event.task_id && this.open.host === event.host) {
      this.showDetails(event.task_id, event.host);
    }
  }

  colour(button, taskId, result) {
    const task = this.tasks.get(taskId);
    button.className = "cell " + statusClass(result.status);
    button.textContent = String(result.status);
    button.disabled = false;
    button.dataset.status = result.status;
    button.setAttribute("aria-label", `${task ? task.name : taskId} on ${result.host}: ${result.status}`);
  }

  closeDetails() {
    this.open = null;
    this.details = null;
    $("#details").classList.add("hidden");
    document.querySelectorAll(".cell.selected").forEach((c) => c.classList.remove("selected"));
  }

  // An OutputView in `container` reading lines from GET /api/runs/ID/output.
  outputView(container, label) {
    const view = new OutputView(container, {
      label,
      loadPage: (execution, since, limit) => api(this.path(
        `/output?execution=${encodeURIComponent(execution)}&since=${since}&limit=${Math.min(limit, OUTPUT_PAGE)}`)),
    });
    view.highlight(...this.highlighted);
    return view;
  }

  // Every output view of the page: the panes' and the details'.
  views() {
    const all = [...this.panes.values()].map((pane) => pane.view);
    if (this.detailsView) all.push(this.detailsView);
    return all;
  }

  // For the search (run_search.js): every occurrence of the literal `needle` marked in every
  // output view (null: none).
  highlight(needle, options = {}) {
    this.highlighted = [needle || null, { caseSensitive: Boolean(options.caseSensitive) }];
    for (const view of this.views()) view.highlight(...this.highlighted);
  }

  // For the search: shows a hit (as GET /api/runs/ID/search gives it): its task's details on
  // its host (playbooks) or its host's pane, scrolled to its line, marked current.
  async reveal(hit) {
    let view, box;
    if (this.playbook) {
      if (!this.open || this.open.task_id !== hit.task_id || this.open.host !== hit.host) {
        await this.showDetails(hit.task_id, hit.host, true);
      }
      view = this.detailsView;
      box = $("#details");
    } else {
      this.addHost(hit.host);
      view = this.panes.get(hit.host).view;
      box = this.panes.get(hit.host).pane;
    }
    if (!view.segments.some((seg) => seg.id === hit.execution_id)) await this.refreshOutput();
    for (const other of this.views()) if (other !== view) other.clearCurrent();
    box.scrollIntoView({ block: "nearest" });
    return view.reveal(hit.execution_id, hit.seq, hit.at);
  }

  // The details panel: a host's result for a task, formatted, and that task's output there
  // (resolves once its output was looked at). `pending`: shown without a result too (a hit
  // of the search in a task still running there).
  showDetails(taskId, host, pending = false) {
    const result = this.results.get(`${taskId}\n${host}`) || (pending ? { task_id: taskId, host, status: "running" } : null);
    if (!result) return Promise.resolve();
    const task = this.tasks.get(taskId);
    this.open = { task_id: taskId, host };
    document.querySelectorAll(".cell.selected").forEach((c) => c.classList.remove("selected"));
    if (task && task.cells.get(host)) task.cells.get(host).classList.add("selected");
    $("#details").classList.remove("hidden");
    $("#details").dataset.host = host;
    $("#details").dataset.task = taskId;
    $("#details-title").textContent = `${task ? task.name : taskId} on ${host}`;
    $("#details-downloads").replaceChildren(downloadLinks(this.path(), { host, task: taskId }, `this task on ${host}`));
    const facts = $("#details-facts");
    facts.replaceChildren();
    const fact = (name, value, cls) => {
      if (value === null || value === undefined || value === "") return;
      const dt = el("dt", null, name), dd = el("dd", cls, typeof value === "string" ? value : JSON.stringify(value));
      dd.dataset.fact = name;
      facts.appendChild(dt);
      facts.appendChild(dd);
    };
    fact("status", result.status, statusClass(result.status));
    fact("msg", result.msg, "fact-msg");
    fact("rc", result.rc === null || result.rc === undefined ? null : String(result.rc));
    fact("duration", result.duration === undefined || result.duration === null ? null : fmtDuration(result.duration));
    const r = result.result && typeof result.result === "object" ? result.result : {};
    if (r.changed !== undefined) fact("changed", String(Boolean(r.changed)));
    if (r.cmd !== undefined) fact("cmd", Array.isArray(r.cmd) ? r.cmd.join(" ") : r.cmd);
    const body = $("#details-body");
    body.replaceChildren();
    this.block(body, "stdout", r.stdout_lines, r.stdout);
    this.block(body, "stderr", r.stderr_lines, r.stderr);
    const rest = Object.keys(r).filter((k) => !["stdout", "stdout_lines", "stderr", "stderr_lines", "msg", "rc", "changed", "cmd"].includes(k));
    if (rest.length) {
      // The rest of the result stays available, folded away: the formatted view comes first.
      const more = el("details", "raw-result");
      more.appendChild(el("summary", null, `other result fields (${rest.join(", ")})`));
      const other = {};
      for (const k of rest) other[k] = r[k];
      more.appendChild(el("pre", "raw", JSON.stringify(other, null, 2)));
      body.appendChild(more);
    }
    return this.loadTaskOutput(taskId, host);
  }

  block(parent, name, lines, text) {
    const list = Array.isArray(lines) ? lines : (typeof text === "string" && text !== "" ? text.split("\n") : []);
    if (!list.length) return;
    parent.appendChild(el("h3", null, name));
    const pre = el("pre", "lines result-" + name);
    const ansi = newAnsi();
    for (const line of list) {
      const span = el("span", "line " + (name === "stderr" ? "stderr" : "stdout"));
      Ansi.render(span, String(line), ansi[name === "stderr" ? "stderr" : "stdout"]);
      pre.appendChild(span);
    }
    parent.appendChild(pre);
  }

  // Output readers take turns: a poll and a click never read the same lines twice.
  exclusive(work) {
    const turn = this.outputTurn.then(work, work);
    this.outputTurn = turn.catch(() => {});
    return turn;
  }

  // The open result's output: the executions tagged with that task on that host, new lines only.
  loadTaskOutput(taskId, host) {
    return this.exclusive(async () => {
      const key = `${taskId}\n${host}`;
      if (!this.open || `${this.open.task_id}\n${this.open.host}` !== key) return;
      const view = this.detailsView;
      if (!this.details || this.details.key !== key) {
        // Another result: its output from scratch, followed from its end.
        this.details = { key, reader: new OutputReader(this.path()) };
        view.setSegments([]);
        view.jumpToLatest();
        showExecutionTimes([]);
        $("#details-no-output").classList.add("hidden");
      }
      const details = this.details;
      const current = () => this.details === details;
      try {
        const query = new URLSearchParams({ host, task: taskId });
        const executions = await details.reader.list(query);
        if (!current()) return;
        view.setSegments(segmentsOf(executions));
        showExecutionTimes(executions, this.run);
        await view.readTail();
      } catch (err) {
        this.showError(err.message);
        return;
      }
      if (!current()) return;
      $("#details-no-output").classList.toggle("hidden", view.lineCount > 0);
      view.container.classList.toggle("hidden", view.lineCount === 0);
    });
  }

  // The output shown: the open details' while a playbook runs, every host's for the others.
  async refreshOutput() {
    if (this.playbook) {
      if (this.open) await this.loadTaskOutput(this.open.task_id, this.open.host);
      return;
    }
    await this.exclusive(async () => {
      const executions = await this.paneOutput.list();
      for (const execution of executions) this.addHost(execution.host);
      for (const [host, pane] of this.panes) {
        pane.executions = executions.filter((e) => e.host === host);
        pane.view.setSegments(segmentsOf(pane.executions));
        this.paneDuration(host);
      }
      // Each pane's new lines (a running execution's), one pane after the other.
      for (const pane of this.panes.values()) {
        await pane.view.readTail();
        pane.empty.classList.toggle("hidden", pane.view.lineCount > 0);
        pane.view.container.classList.toggle("hidden", pane.view.lineCount === 0);
      }
    });
  }

  addPane(host) {
    const pane = el("div", "pane host-pane");
    pane.dataset.host = host;
    const head = el("div", "pane-head");
    head.appendChild(el("b", "pane-host", host));
    const state = badge("running");
    state.classList.add("pane-state");
    head.appendChild(state);
    head.appendChild(downloadLinks(this.path(), { host }, host));
    pane.appendChild(head);
    const took = el("span", "pane-took");
    head.appendChild(took);
    pane.appendChild(head);
    const output = el("div", "pane-output hidden");
    pane.appendChild(output);
    const view = this.outputView(output, host);
    const empty = el("p", "hint pane-empty", "No output (yet).");
    pane.appendChild(empty);
    $("#host-panes").appendChild(pane);
    this.panes.set(host, { pane, view, empty, state, took, executions: [] });
  }

  // A pane's duration: its executions', from the first one's start to the last one's end on
  // the node; without their times (not listed yet), the run's once it has ended.
  paneDuration(host) {
    const pane = this.panes.get(host);
    if (!pane) return;
    const own = spanText(pane.executions, this.run);
    const ended = this.run && this.run.ended !== null;
    pane.took.textContent = own || (ended ? "took " + fmtDuration(runDuration(this.run)) : "");
    pane.took.title = own ? `its ${pane.executions.length} execution(s), on the node's clock`
      : ended ? "the run's duration, from its start to its end" : "";
  }

  hostState(host, counts) {
    const pane = this.panes.get(host);
    if (!pane) return;
    const status = (counts.unreachable || 0) > 0 ? "unreachable" : (counts.failed || 0) > 0 ? "failed" : "ok";
    setBadge(pane.state, status);
    pane.state.textContent = counts.rc === undefined ? status : `${status} (rc=${counts.rc})`;
  }

  // A run whose client died stays running until the controller ends it as stale: its owner
  // ends it now (POST .../finish interrupted); the poll still running shows the end.
  async markEnded() {
    $("#end-run").disabled = true;
    try {
      await api(this.path("/finish"), { method: "POST", body: JSON.stringify({ status: "interrupted" }),
                                        headers: { "Content-Type": "application/json" } });
      this.showError(null);
    } catch (err) {
      this.showError(err.message);  // a 409: it had ended meanwhile, which the poll shows
    }
    $("#end-run").disabled = false;
  }

  // The command to re-run: the full one kept in `meta.command`; without it (a run from before
  // it was kept, or a command over the meta limit) the title, unless that was cut: null.
  command() {
    const meta = this.run.meta || {};
    if (typeof meta.command === "string") return meta.command;
    return this.run.title.length < MAX_TITLE ? this.run.title : null;
  }

  // POST /api/run with this run's command on `hosts`, then open the new run.
  async rerun(hosts) {
    const command = this.command();
    if (!hosts.length || command === null) return;
    const body = { nodes: hosts, command, kind: this.run.kind, label: this.run.kind,
                   cwd: (this.run.meta || {}).cwd || null };
    try {
      const answer = await api("/api/run", { method: "POST", body: JSON.stringify(body),
                                             headers: { "Content-Type": "application/json" } });
      window.location = answer.run.url;
    } catch (err) {
      this.showError(err.message);
    }
  }
}

window.addEventListener("DOMContentLoaded", () => {
  const section = $("#run-page");
  // The run page's view is window.runView (the search and tests drive it from there).
  if (section) window.runView = new RunView(section);
  const work = section ? window.runView.start() : $("#runs-page") ? new RunsList().start() : null;
  if (work) work.catch((e) => console.error(e));
});
