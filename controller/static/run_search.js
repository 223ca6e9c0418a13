// The run page's search across the whole output (issue 13, item 2): GET /api/runs/ID/search,
// its hits shown one at a time through RunView.reveal and every occurrence marked through
// RunView.highlight (runs.js). Loaded before runs.js: it only defines things; `api` and `el`
// of runs.js are used at run time.
"use strict";

const SEARCH_TYPING_MS = 400;   // a search starts once typing has stopped this long
const SEARCH_HOSTS_MS = 1000;   // the host filter's choices follow the run's hosts this often

class RunSearch {
  constructor(runView, container) {
    this.view = runView;
    this.box = container;
    this.hits = [];           // the hits read so far, in order
    this.count = 0;           // matching lines the last answer found
    this.complete = true;     // whether that count is all of them
    this.next = null;         // the cursor of the hits after those read
    this.pages = [];          // the pages of hits read: {at: the first one's index, after: its cursor}
    this.index = -1;          // the current hit
    this.asked = null;        // the query of the hits shown, as a string
    this.pending = null;      // the query of the search under way, as a string
    this.generation = 0;      // answers to an older search are dropped
    this.aborter = null;      // aborts the requests of the search under way (a newer one starts)
    this.paging = null;       // the read of the next page of hits under way (one at a time)
    this.typing = null;
  }

  start() {
    const form = el("form", "search-form");
    form.setAttribute("role", "search");
    form.setAttribute("aria-label", "Search the output");
    form.addEventListener("submit", (e) => e.preventDefault());
    this.input = this.control(form, "input", "search-q", "Search output");
    this.input.type = "search";
    this.input.autocomplete = "off";
    this.input.spellcheck = false;
    this.input.placeholder = "text in any line";
    this.prev = this.button(form, "search-prev", "Previous", "Previous match (Shift+Enter)");
    this.nextButton = this.button(form, "search-next", "Next", "Next match (Enter)");
    this.counter = el("span", "search-count", "");
    this.counter.id = "search-count";
    this.counter.setAttribute("role", "status");  // read out as it changes (polite)
    form.appendChild(this.counter);
    const filters = el("span", "search-filters");
    this.host = this.control(filters, "select", "search-host", "Host");
    this.host.appendChild(this.option("", "all hosts"));
    this.stderr = this.checkbox(filters, "search-stderr", "stderr only");
    this.failed = this.checkbox(filters, "search-failed", "failed hosts only");
    this.caseBox = this.checkbox(filters, "search-case", "match case");
    form.appendChild(filters);
    this.box.replaceChildren(form);

    this.input.addEventListener("keydown", (e) => {
      if (e.key !== "Enter") return;
      e.preventDefault();
      this.step(e.shiftKey ? -1 : 1);
    });
    this.input.addEventListener("input", () => this.typed());
    this.prev.addEventListener("click", () => this.step(-1));
    this.nextButton.addEventListener("click", () => this.step(1));
    for (const filter of [this.host, this.stderr, this.failed, this.caseBox]) {
      filter.addEventListener("change", () => this.search(true));
    }
    this.host.addEventListener("focus", () => this.refreshHosts());
    this.refreshHosts();
    this.hostsTimer = setInterval(() => this.refreshHosts(), SEARCH_HOSTS_MS);
    this.buttons();
  }

  // --- controls ---------------------------------------------------------------------------
  control(parent, tag, id, text) {
    const label = el("label", "search-label", text);
    label.htmlFor = id;
    const control = el(tag, "search-" + tag);
    control.id = id;
    parent.append(label, control);
    return control;
  }

  button(parent, id, text, title) {
    const button = el("button", "search-step", text);
    button.type = "button";
    button.id = id;
    button.title = title;
    button.setAttribute("aria-label", text + " match");  // starts with its visible text
    parent.appendChild(button);
    return button;
  }

  checkbox(parent, id, text) {
    const label = el("label", "search-check");
    const box = el("input");
    box.type = "checkbox";
    box.id = id;
    label.append(box, " " + text);
    parent.appendChild(label);
    return box;
  }

  option(value, text) {
    const option = el("option", null, text);
    option.value = value;
    return option;
  }

  // The host filter offers the run's hosts (they grow while a playbook runs).
  refreshHosts() {
    const run = this.view.run;
    if (!run) return;
    const have = new Set([...this.host.options].map((o) => o.value));
    for (const host of run.hosts) if (!have.has(host)) this.host.appendChild(this.option(host, host));
    if (run.ended !== null && this.hostsTimer) {
      clearInterval(this.hostsTimer);
      this.hostsTimer = null;
    }
  }

  // --- searching --------------------------------------------------------------------------
  // The query the controls say, as the API's arguments.
  query() {
    const q = this.input.value;
    if (!q) return null;
    const args = new URLSearchParams({ q });
    if (this.caseBox.checked) args.set("case", "1");
    if (this.host.value) args.set("host", this.host.value);
    if (this.stderr.checked) args.set("stream", "stderr");
    if (this.failed.checked) args.set("failed", "1");
    return args;
  }

  typed() {
    clearTimeout(this.typing);
    this.typing = setTimeout(() => this.search(true), SEARCH_TYPING_MS);
  }

  // Enter, Shift+Enter, the buttons: the next or previous hit; a changed query is searched
  // again first, and so is a running run's output, which may have grown (Enter again while that
  // same search is under way does nothing).
  async step(direction) {
    clearTimeout(this.typing);
    const args = this.query();
    if (!args) return this.search(true);
    if (args.toString() === this.pending) return;
    const running = this.view.run && this.view.run.ended === null;
    if (args.toString() !== this.asked) return this.search(true);
    if (running && !(await this.refresh())) return;
    return this.move(direction);
  }

  // A new request's abort signal; the requests of the search before it are aborted (the
  // controller stops working on a search nobody waits for).
  signal() {
    if (this.aborter) this.aborter.abort();
    this.aborter = new AbortController();
    return this.aborter.signal;
  }

  // GET .../search with `args`: the answer, or null when it failed (the counter says why) or a
  // newer search replaced this one (`generation`).
  async ask(args, generation, signal) {
    try {
      const answer = await api(this.view.path(`/search?${args}`), { signal });
      return generation === this.generation ? answer : null;
    } catch (err) {
      if (generation !== this.generation) return null;
      if (err.name === "AbortError") return null;
      this.reset(err.status === 429 ? "too many searches at once: try again" : err.message);
      return null;
    }
  }

  // Asks the controller afresh; shows the first hit when `first`. False if it failed or a
  // newer search replaced it.
  async search(first) {
    const args = this.query();
    const generation = ++this.generation;
    const signal = this.signal();
    this.paging = null;
    this.view.highlight(args ? this.input.value : null, { caseSensitive: this.caseBox.checked });
    if (!args) {
      this.pending = null;
      this.reset("");
      return false;
    }
    this.counter.textContent = "searching…";
    this.pending = args.toString();
    const answer = await this.ask(args, generation, signal);
    if (generation === this.generation) this.pending = null;
    if (!answer) return false;
    this.asked = args.toString();
    this.hits = answer.hits;
    this.pages = [{ at: 0, after: null }];
    this.count = answer.count;
    this.complete = answer.complete;
    this.next = answer.next;
    this.index = -1;
    if (first && this.hits.length) await this.show(0);
    else this.showCount();
    return true;
  }

  // A running run searched again from the page of hits the current one is on (read again
  // with that page's cursor): the pages before it stay, and the current hit is found again in
  // it, so the next hit is the one after it, on whichever page (not hit 1 again once past the
  // first page); lines printed since are found. False if it failed or a newer search
  // replaced it.
  async refresh() {
    const current = this.hits[this.index];
    const page = this.pages.filter((p) => p.at <= Math.max(0, this.index)).pop() || { at: 0, after: null };
    const args = new URLSearchParams(this.asked);
    if (page.after) args.set("after", page.after);
    const generation = ++this.generation;
    const signal = this.signal();
    this.paging = null;
    this.pending = this.asked;
    const answer = await this.ask(args, generation, signal);
    if (generation === this.generation) this.pending = null;
    if (!answer) return false;
    this.hits = [...this.hits.slice(0, page.at), ...answer.hits];
    this.pages = [...this.pages.filter((p) => p.at < page.at), page];
    this.count = answer.count;
    this.complete = answer.complete;
    this.next = answer.next;
    const again = current ? this.hits.findIndex((h, i) => i >= page.at
      && h.execution_id === current.execution_id && h.seq === current.seq) : -1;
    // Not found again (more new hits came before it than a page holds): the page's first next.
    this.index = again >= 0 ? again : page.at - 1;
    return true;
  }

  reset(message) {
    this.hits = [];
    this.pages = [];
    this.count = 0;
    this.index = -1;
    this.next = null;
    this.asked = null;
    this.counter.textContent = message;
    this.buttons();
  }

  // The hit `direction` away from the current one; past the last hit read, the next page of
  // hits is read; past either end of all of them, the other end. Where it goes is decided once
  // the page is read: presses meanwhile go on from the hit the one before them showed.
  async move(direction) {
    if (!this.hits.length) return this.showCount();
    if (this.index + direction >= this.hits.length && this.next && !(await this.more())) return;
    let index = this.index + direction;
    if (index >= this.hits.length) index = this.next ? this.hits.length - 1 : 0;
    if (index < 0) index = this.next ? 0 : this.hits.length - 1;
    return this.show(index);
  }

  // The next page of hits, read once however many presses ask for it meanwhile (two reads of
  // the same page would add its hits twice); false if it failed or a newer search came.
  more() {
    if (!this.paging) {
      const paging = this.readPage().finally(() => { if (this.paging === paging) this.paging = null; });
      this.paging = paging;
    }
    return this.paging;
  }

  async readPage() {
    const args = new URLSearchParams(this.asked), cursor = this.next;
    args.set("after", cursor);
    const generation = this.generation;
    let answer;
    try {
      answer = await api(this.view.path(`/search?${args}`), { signal: this.aborter.signal });
    } catch (err) {
      if (generation === this.generation && err.name !== "AbortError") this.counter.textContent = err.message;
      return false;
    }
    if (generation !== this.generation || this.next !== cursor) return false;
    this.pages.push({ at: this.hits.length, after: cursor });
    this.hits.push(...answer.hits);
    this.next = answer.next;
    return true;
  }

  async show(index) {
    this.index = index;
    this.showCount();
    try {
      await this.view.reveal(this.hits[index]);
    } catch (err) {
      this.counter.textContent = err.message;
    }
  }

  // "3 of 120", "120 matches", "no match"; "+" when the search stopped before the end.
  showCount() {
    const more = this.complete ? "" : "+";
    let text;
    if (!this.count) text = this.complete ? "no match" : "no match in the lines searched";
    else if (this.index < 0) text = `${this.count}${more} ${this.count === 1 ? "match" : "matches"}`;
    else text = `${this.index + 1} of ${this.count}${more}`;
    this.counter.textContent = text;
    this.buttons();
  }

  // Without hits the buttons say so but stay in the Tab order (a disabled button leaves it).
  buttons() {
    const none = String(!this.hits.length);
    this.prev.setAttribute("aria-disabled", none);
    this.nextButton.setAttribute("aria-disabled", none);
  }
}
