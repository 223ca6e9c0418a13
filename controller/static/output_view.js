// OutputView: a virtualized list of output lines (issue 13, docs/runs.md "The pages"). Only the
// lines in sight, plus a margin, are in the DOM, so a 1,000,000-line output opens and scrolls;
// lines are read a page at a time, as they come into sight, from a source (`loadPage`) or pushed
// (`append`); the pages kept in memory are bounded (least recently used go first).
//
// Layout: the output is one list of segments (one per execution) in the order given. Without
// wrapping every line is LINE_HEIGHT px tall, so line i is at i x LINE_HEIGHT. With wrapping
// (the "Wrap lines" toggle) a rendered line is measured and keeps its measured height; a line
// never rendered counts as one row; when heights become known the line at the top of the view
// stays where it is (an anchor), so nothing jumps. Browsers cap an element's height (Firefox
// about 17.9M px, Chromium about 33.5M): above MAX_HEIGHT_PX the scroll area is scaled, the
// scrollbar maps proportionally to the whole output and the wheel and keys move by real lines.
//
// Self-contained (the main page loads it without runs.js): its only global is OutputView.
"use strict";
const OutputView = (() => {
  const LINE_HEIGHT = 17;          // px per line without wrapping (output.css sets the same)
  const PAGE_LINES = 1000;         // lines per page read from the source
  const MAX_PAGES = 200;           // pages kept in memory, per view (least recently used go)
  const MARGIN = 100;              // lines rendered above and below the ones in sight
  const MAX_HEIGHT_PX = 15000000;  // the tallest scroll area made; taller outputs are scaled
  const MAX_MEASURED = 200000;     // wrapped lines' heights remembered (then forgotten at once)
  const MAX_MARKS = 200;           // highlighted occurrences per line
  const RETRY_MS = 1000;           // a page that brought nothing is asked again after this
  const WRAP_KEY = "marco-wrap";
  const views = new Set();
  let wrapping = false;

  const two = (n) => String(n).padStart(2, "0");
  // A node's Unix time as local HH:MM:SS.mmm (the line's data-time, shown by CSS).
  function fmtTime(t) {
    const d = new Date(t * 1000);
    return `${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}.${String(d.getMilliseconds()).padStart(3, "0")}`;
  }
  const newAnsi = () => ({ stdout: Ansi.newState(), stderr: Ansi.newState() });
  // Ansi replaces a state's colours, never changes them in place: a shallow copy is a copy.
  const copyAnsi = (a) => ({ stdout: Object.assign({}, a.stdout), stderr: Object.assign({}, a.stderr) });

  // One page of a segment: PAGE_LINES slots from seq no * PAGE_LINES; `filled` counts the
  // slots known from its start (a source fills a page in order).
  class Page {
    constructor(no) {
      this.no = no;
      this.texts = new Array(PAGE_LINES);
      this.stderr = new Uint8Array(PAGE_LINES);
      this.times = new Float64Array(PAGE_LINES).fill(NaN);
      this.filled = 0;
      this.loading = null;          // the promise of a read under way
      this.retryAt = 0;             // a read that brought nothing is not repeated before this
      this.endAnsi = null;          // the ANSI state after its last line, once rendered full
    }

    put(index, text, stream, time) {
      this.texts[index] = String(text);
      this.stderr[index] = stream === "stderr" ? 1 : 0;
      this.times[index] = typeof time === "number" && isFinite(time) ? time : NaN;
      while (this.filled < PAGE_LINES && this.texts[this.filled] !== undefined) this.filled++;
    }
  }

  class View {
    /**
     * container: an element the view fills (the scroll area and its "Jump to latest" button).
     * options.label names it ("Output of LABEL"); options.loadPage(segmentId, since, limit)
     * resolves to {events, next, end} (a pull source; without it, lines come by `append`).
     */
    constructor(container, { label = "", loadPage = null } = {}) {
      this.container = container;
      this.label = label;
      this.loadPage = loadPage;
      this.segments = [];           // {id, host, task_id, length, start, end, extra, extraSum}
      this.byId = new Map();
      this.pages = new Map();       // `${segment}\n${no}` -> Page, in least recently used order
      this.top = 0;                 // the view's top, in px of the whole (unscaled) output
      this.expected = null;         // the scrollTop we set last (its scroll event is ours)
      this.following = true;
      this.needle = null;
      this.caseSensitive = false;
      this.current = null;          // {segment, seq, at} of the revealed line
      this.rendered = new Map();    // `${segment}\n${seq}` -> its line element in the DOM
      this.range = [0, 0];
      this.scheduled = false;
      this.width = 0;
      this.build();
      views.add(this);
    }

    build() {
      this.container.classList.add("output-view");
      this.scroller = document.createElement("div");
      this.scroller.className = "lines output-scroll";
      this.scroller.tabIndex = 0;   // scrollable by keyboard
      this.scroller.setAttribute("role", "region");
      this.scroller.setAttribute("aria-label", `Output of ${this.label}`);
      // Lines come and go as the reader scrolls: never read out as news (a live region
      // around the view, such as the details panel, would otherwise announce each scroll).
      this.scroller.setAttribute("aria-live", "off");
      this.spacer = document.createElement("div");
      this.spacer.className = "output-spacer";
      this.window = document.createElement("div");
      this.window.className = "output-window";
      this.spacer.appendChild(this.window);
      this.scroller.appendChild(this.spacer);
      this.jump = document.createElement("button");
      this.jump.type = "button";
      this.jump.className = "jump-latest hidden";
      this.jump.textContent = "Jump to latest";
      // The visible text starts the accessible name (what speech input users say), then whose.
      this.jump.setAttribute("aria-label", `Jump to latest output of ${this.label}`);
      this.container.replaceChildren(this.scroller, this.jump);
      this.scroller.addEventListener("scroll", () => this.onScroll());
      this.scroller.addEventListener("wheel", (e) => this.onWheel(e), { passive: false });
      this.scroller.addEventListener("keydown", (e) => this.onKey(e));
      this.jump.addEventListener("click", () => this.jumpToLatest());
      if (typeof ResizeObserver !== "undefined") {
        this.resizing = new ResizeObserver(() => this.onResize());
        this.resizing.observe(this.scroller);
      }
    }

    // Stops observing and forgets the view (its container is the caller's to remove).
    destroy() {
      views.delete(this);
      if (this.resizing) this.resizing.disconnect();
      this.pages.clear();
    }

    // --- the model -------------------------------------------------------------------------
    get lineCount() {
      const last = this.segments[this.segments.length - 1];
      return last ? last.start + last.length : 0;
    }

    // The segments in display order; a known one keeps its lines and the longest length seen
    // (a listing from the store alone may say less than a page read already did).
    setSegments(list) {
      const anchor = this.anchor();
      const old = this.byId;
      this.segments = [];
      this.byId = new Map();
      for (const given of list) {
        const id = String(given.id);
        if (this.byId.has(id)) continue;
        const seg = old.get(id) || { id, host: given.host, task_id: given.task_id, length: 0,
                                     end: null, extra: new Map(), extraSum: 0 };
        seg.length = this.capped(seg, Math.max(seg.length, Number(given.length) || 0));
        this.segments.push(seg);
        this.byId.set(id, seg);
      }
      for (const key of [...this.pages.keys()]) {
        if (!this.byId.has(key.split("\n")[0])) this.pages.delete(key);
      }
      if (this.current && !this.byId.has(this.current.segment)) this.current = null;
      this.relayout(anchor, true);
    }

    // A segment that said `end` at `end` lines has no more: it is never longer than that.
    capped(seg, length) { return seg.end === null ? length : Math.min(length, seg.end); }

    grow(segmentId, length) {
      const seg = this.byId.get(String(segmentId));
      if (!seg) return;
      const grown = this.capped(seg, Math.max(seg.length, Number(length) || 0));
      if (grown === seg.length) return;
      const anchor = this.anchor();
      seg.length = grown;
      this.relayout(anchor, false);
    }

    // Push source: events {stream, seq, time, lines} (seq: the first line's).
    append(segmentId, events) {
      const seg = this.byId.get(String(segmentId));
      if (!seg) return;
      const end = this.store(seg, events);
      if (end > seg.length) this.grow(segmentId, end); else this.schedule(true);
    }

    // Lines of `events` into the segment's pages; the seq after the last one.
    store(seg, events) {
      let end = 0;
      for (const event of events || []) {
        const lines = event.lines || [], seq = Number(event.seq) || 0;
        for (let k = 0; k < lines.length; k++) {
          const at = seq + k, page = this.page(seg, Math.floor(at / PAGE_LINES), true);
          page.put(at % PAGE_LINES, lines[k], event.stream, event.time);
          this.forget(seg, at);
        }
        end = Math.max(end, seq + lines.length);
      }
      return end;
    }

    // The page `no` of a segment (made when `make`), now the most recently used.
    page(seg, no, make) {
      const key = `${seg.id}\n${no}`;
      let page = this.pages.get(key);
      if (page) {
        this.pages.delete(key);
        this.pages.set(key, page);
      } else if (make) {
        page = new Page(no);
        this.pages.set(key, page);
        for (const oldest of this.pages.keys()) {
          if (this.pages.size <= MAX_PAGES) break;
          if (oldest !== key) this.pages.delete(oldest);
        }
      }
      return page;
    }

    // A line's element is rendered again once its text is known.
    forget(seg, seq) { this.rendered.delete(`${seg.id}\n${seq}`); }

    // Reads the missing lines of a page from the source (one read at a time; after a read
    // that filled nothing it waits RETRY_MS). Resolves when done.
    load(seg, no) {
      const page = this.page(seg, no, true);
      const want = Math.min(PAGE_LINES, seg.length - no * PAGE_LINES);
      if (!this.loadPage || page.filled >= want) return Promise.resolve();
      if (page.loading) return page.loading;
      if (page.retryAt > Date.now()) return Promise.resolve();
      const since = no * PAGE_LINES + page.filled, before = page.filled;
      page.loading = this.read(seg, since, PAGE_LINES - page.filled).then(() => {
        page.loading = null;
        // Nothing new at the page's first gap (not there yet, or the source lost it): the
        // next render does not ask again at once.
        if (page.filled === before) page.retryAt = Date.now() + RETRY_MS;
      }, (err) => {
        page.loading = null;
        page.retryAt = Date.now() + RETRY_MS;
        throw err;
      });
      return page.loading;
    }

    // One read from the source at `since`; whether it brought a line. Learns the length
    // (`next`) and the end.
    async read(seg, since, limit) {
      const answer = await this.loadPage(seg.id, since, limit);
      if (this.byId.get(seg.id) !== seg) return false;  // dropped meanwhile
      const got = this.store(seg, answer.events || []);
      const next = Math.max(Number(answer.next) || 0, got);
      if (answer.end && next >= since) seg.end = Math.max(next, seg.end || 0);
      const length = this.capped(seg, Math.max(seg.length, next));
      if (length !== seg.length) {
        const anchor = this.anchor();
        seg.length = length;
        this.relayout(anchor, false);
      } else {
        this.schedule(false);
      }
      return got > since;
    }

    // Reads what came after each segment's known end (a running execution's new lines);
    // resolves once every segment was asked once. Whether any segment may still grow.
    async readTail() {
      if (!this.loadPage) return false;
      let open = false;
      for (const seg of [...this.segments]) {
        if (seg.end !== null && seg.length >= seg.end) continue;
        open = true;
        const no = Math.floor(seg.length / PAGE_LINES);
        const page = this.page(seg, no, true);
        if (page.loading) { await page.loading; continue; }
        const since = seg.length;
        page.loading = this.read(seg, since, PAGE_LINES - (since % PAGE_LINES)).finally(() => { page.loading = null; });
        await page.loading;
      }
      return open;
    }

    // Whether every segment has said its end (nothing more will come).
    get ended() { return this.segments.every((seg) => seg.end !== null && seg.length >= seg.end); }

    // --- geometry (px of the whole output, unscaled) ----------------------------------------
    relayout(anchor, all) {
      let start = 0;
      for (const seg of this.segments) { seg.start = start; start += seg.length; }
      if (all) this.rendered.clear();
      this.restore(anchor);
      this.schedule(false);
    }

    get height() {
      let extra = 0;
      for (const seg of this.segments) extra += seg.extraSum;
      return this.lineCount * LINE_HEIGHT + extra;
    }

    // The segment holding global line `index` (binary search on the starts).
    segmentAt(index) {
      let lo = 0, hi = this.segments.length - 1;
      while (lo < hi) {
        const mid = (lo + hi + 1) >> 1;
        if (this.segments[mid].start <= index) lo = mid; else hi = mid - 1;
      }
      return this.segments[lo];
    }

    // The top of a segment's line, px from the output's top.
    topOf(seg, seq) {
      let y = (seg.start + seq) * LINE_HEIGHT;
      for (const other of this.segments) { if (other === seg) break; y += other.extraSum; }
      if (seg.extraSum) for (const [at, px] of seg.extra) if (at < seq) y += px;
      return y;
    }

    // The global index of the line at px `y` (clamped to the lines there are).
    lineAt(y) {
      let base = 0;
      for (const seg of this.segments) {
        const h = seg.length * LINE_HEIGHT + seg.extraSum;
        if (y < base + h || seg === this.segments[this.segments.length - 1]) {
          return Math.max(0, Math.min(this.lineCount - 1, seg.start + this.seqAt(seg, Math.max(0, y - base))));
        }
        base += h;
      }
      return 0;
    }

    // The seq of a segment's line at px `y` from the segment's top: lines are LINE_HEIGHT
    // tall but the measured ones, which are LINE_HEIGHT + their extra.
    seqAt(seg, y) {
      const last = Math.max(0, seg.length - 1);
      if (!seg.extraSum) return Math.min(last, Math.floor(y / LINE_HEIGHT));
      let seq = 0, at = 0;
      for (const [line, px] of [...seg.extra].sort((a, b) => a[0] - b[0])) {
        const plain = (line - seq) * LINE_HEIGHT;
        if (y < at + plain) return Math.min(last, seq + Math.floor((y - at) / LINE_HEIGHT));
        at += plain;
        if (y < at + LINE_HEIGHT + px) return Math.min(last, line);
        at += LINE_HEIGHT + px;
        seq = line + 1;
      }
      return Math.min(last, seq + Math.floor((y - at) / LINE_HEIGHT));
    }

    get viewport() { return this.scroller.clientHeight; }
    get maxTop() { return Math.max(0, this.height - this.viewport); }
    // The scroll area's height and the factor from its px to the output's (1 unless scaled).
    get physical() { return Math.min(this.height, MAX_HEIGHT_PX); }
    scale() {
      const free = this.physical - this.viewport;
      return free > 0 && this.height > MAX_HEIGHT_PX ? this.maxTop / free : 1;
    }

    // The line at the view's top and how far above the view's top it starts.
    anchor() {
      if (!this.lineCount) return null;
      const index = this.lineAt(this.top), seg = this.segmentAt(index);
      return { segment: seg.id, seq: index - seg.start, offset: this.top - this.topOf(seg, index - seg.start) };
    }

    // After a change of layout: at the end when following, else the anchor line where it was.
    restore(anchor) {
      if (this.following) this.top = this.maxTop;
      else if (anchor && this.byId.has(anchor.segment)) {
        const seg = this.byId.get(anchor.segment);
        this.top = this.topOf(seg, Math.min(anchor.seq, Math.max(0, seg.length - 1))) + anchor.offset;
      }
      this.top = Math.max(0, Math.min(this.top, this.maxTop));
    }

    // --- scrolling -------------------------------------------------------------------------
    setTop(y, following) {
      this.following = following;
      this.top = Math.max(0, Math.min(y, this.maxTop));
      if (following) this.top = this.maxTop;
      this.render();
    }

    jumpToLatest() { this.setTop(this.maxTop, true); }

    atBottom() { return this.maxTop - this.top < 4; }

    onScroll() {
      const now = this.scroller.scrollTop;
      const ours = this.expected !== null && Math.abs(now - this.expected) <= 1;
      this.expected = null;
      if (ours) return;
      this.top = Math.min(this.maxTop, now * this.scale());
      this.following = this.atBottom();
      this.render();
    }

    // Scaled, the wheel moves by the output's px (the scroll area's would skip lines).
    onWheel(event) {
      if (this.scale() === 1 || event.ctrlKey) return;
      event.preventDefault();
      const unit = event.deltaMode === 1 ? LINE_HEIGHT : event.deltaMode === 2 ? this.viewport : 1;
      const top = this.top + event.deltaY * unit;
      this.setTop(top, top >= this.maxTop - 4);
    }

    onKey(event) {
      if (event.altKey || event.ctrlKey || event.metaKey) return;
      const page = Math.max(LINE_HEIGHT, this.viewport - LINE_HEIGHT);
      const moves = { PageDown: page, PageUp: -page, ArrowDown: LINE_HEIGHT, ArrowUp: -LINE_HEIGHT };
      if (event.key === "End") this.jumpToLatest();
      else if (event.key === "Home") this.setTop(0, false);
      else if (event.key in moves) {
        const top = this.top + moves[event.key];
        this.setTop(top, moves[event.key] > 0 && top >= this.maxTop - 4);
      } else return;
      event.preventDefault();
    }

    onResize() {
      const width = this.scroller.clientWidth;
      const anchor = this.anchor();
      if (wrapping && width !== this.width) this.unmeasure();
      this.width = width;
      this.restore(anchor);
      this.render();
    }

    // Forgets measured heights (the width or wrapping changed): lines count as one row again.
    unmeasure() {
      for (const seg of this.segments) { seg.extra.clear(); seg.extraSum = 0; }
      this.rendered.clear();
    }

    setWrap() {
      const anchor = this.anchor();
      this.unmeasure();
      this.restore(anchor);
      this.render();
    }

    // --- rendering -------------------------------------------------------------------------
    // Renders on the next frame (`all`: no line element is reused).
    schedule(all) {
      if (all) this.rendered.clear();
      if (this.scheduled) return;
      this.scheduled = true;
      requestAnimationFrame(() => { this.scheduled = false; this.render(); });
    }

    render() {
      if (this.following) this.top = this.maxTop;
      this.paint();
      if (wrapping && this.measure()) this.paint();  // heights known now: place them again
      this.jump.classList.toggle("hidden", this.following);
    }

    // Places the scroll area and the lines in sight, and asks for the pages they need.
    paint() {
      const count = this.lineCount, view = this.viewport;
      this.spacer.style.height = `${this.physical}px`;
      const scale = this.scale();
      const physicalTop = Math.round(this.top / scale);
      if (Math.abs(this.scroller.scrollTop - physicalTop) > 1) {
        this.expected = physicalTop;
        this.scroller.scrollTop = physicalTop;
      }
      if (!count) {
        this.window.replaceChildren();
        this.rendered.clear();
        return;
      }
      const first = this.lineAt(this.top), last = this.lineAt(this.top + view);
      const start = Math.max(0, first - MARGIN), end = Math.min(count, last + MARGIN + 1);
      const fresh = new Map(), elements = [];
      let ansi = null, ansiAt = -1;
      for (let index = start; index < end; index++) {
        const seg = this.segmentAt(index), key = `${seg.id}\n${index - seg.start}`;
        let element = this.rendered.get(key);
        if (!element) {
          if (ansiAt !== index) ansi = this.ansiAt(index);
          element = this.line(index, ansi);
          ansiAt = index + 1;
        }
        fresh.set(key, element);
        elements.push(element);
      }
      this.rendered = fresh;
      this.range = [start, end];
      this.window.replaceChildren(...elements);
      const seg = this.segmentAt(start);
      // Where the first rendered line goes in the scroll area: its distance from the view's
      // top is the output's own (scaled or not, lines keep their real heights).
      this.window.style.top = `${this.scroller.scrollTop + this.topOf(seg, start - seg.start) - this.top}px`;
      this.want(start, end);
    }

    // Asks for the pages the lines [start, end) are on that are not all known.
    want(start, end) {
      for (let index = start; index < end;) {
        const seg = this.segmentAt(index), seq = index - seg.start;
        const no = Math.floor(seq / PAGE_LINES);
        this.load(seg, no).catch((err) => this.failed(err));
        index = seg.start + Math.min(seg.length, (no + 1) * PAGE_LINES);
      }
    }

    failed(err) {
      if (typeof console !== "undefined") console.warn("output page not read:", err && err.message);
    }

    // The ANSI state a line starts from: its page starts from the state at the end of the
    // previous page when that page was rendered in full, else from a reset state; then the
    // page's lines before it are applied (only lines with an escape change it).
    ansiAt(index) {
      const seg = this.segmentAt(index), seq = index - seg.start;
      const no = Math.floor(seq / PAGE_LINES), page = this.pages.get(`${seg.id}\n${no}`);
      const before = no > 0 ? this.pages.get(`${seg.id}\n${no - 1}`) : null;
      const ansi = before && before.endAnsi ? copyAnsi(before.endAnsi) : newAnsi();
      if (!page) return ansi;
      const scratch = document.createElement("span");
      for (let k = 0; k < seq % PAGE_LINES && k < page.filled; k++) {
        const text = page.texts[k];
        if (text.indexOf("\x1b") >= 0) Ansi.render(scratch, text, ansi[page.stderr[k] ? "stderr" : "stdout"]);
      }
      scratch.replaceChildren();
      return ansi;
    }

    // A line's element: its text rendered (or empty while its page is read), with
    // data-segment, data-seq and data-time; `ansi` is advanced past it.
    line(index, ansi) {
      const seg = this.segmentAt(index), seq = index - seg.start;
      const no = Math.floor(seq / PAGE_LINES), k = seq % PAGE_LINES;
      const page = this.pages.get(`${seg.id}\n${no}`);
      const known = page && page.texts[k] !== undefined;
      const stream = known && page.stderr[k] ? "stderr" : "stdout";
      const element = document.createElement("span");
      element.className = known ? "line " + stream : "line pending";
      element.dataset.segment = seg.id;
      element.dataset.seq = String(seq);
      if (!known) return element;
      if (!isNaN(page.times[k])) element.dataset.time = fmtTime(page.times[k]);
      Ansi.render(element, page.texts[k], ansi[stream]);
      if (k === PAGE_LINES - 1 && page.filled === PAGE_LINES) page.endAnsi = copyAnsi(ansi);
      const current = this.current && this.current.segment === seg.id && this.current.seq === seq;
      if (current) element.classList.add("current-line");
      if (this.needle) this.mark(element, current ? this.current.at : null, current);
      return element;
    }

    // Heights of rendered wrapped lines; whether any changed (the layout then moves, the line
    // at the view's top staying put).
    measure() {
      const anchor = this.anchor();
      let changed = false, count = 0;
      for (const seg of this.segments) count += seg.extra.size;
      if (count > MAX_MEASURED) this.unmeasure();
      for (const element of this.rendered.values()) {
        const seg = this.byId.get(element.dataset.segment);
        if (!seg) continue;
        const seq = Number(element.dataset.seq), px = element.offsetHeight - LINE_HEIGHT;
        const was = seg.extra.get(seq) || 0;
        if (px === was || element.offsetHeight === 0) continue;
        if (px > 0) seg.extra.set(seq, px); else seg.extra.delete(seq);
        seg.extraSum += px - was;
        changed = true;
      }
      if (changed) this.restore(anchor);
      return changed;
    }

    // --- search ----------------------------------------------------------------------------
    // Marks every occurrence of the literal `needle` in the rendered lines (null: none).
    highlight(needle, { caseSensitive = false } = {}) {
      this.needle = needle ? String(needle) : null;
      this.caseSensitive = Boolean(caseSensitive);
      this.rendered.clear();
      this.render();
    }

    // Scrolls so that the segment's line `seq` shows, its page read first, and marks it
    // current (`at`: the occurrence [[start, end]] the search found, when given).
    async reveal(segmentId, seq, at = null) {
      const seg = this.byId.get(String(segmentId));
      if (!seg) return null;
      seq = Math.max(0, Number(seq) || 0);
      if (seq >= seg.length) this.grow(seg.id, seq + 1);
      await this.load(seg, Math.floor(seq / PAGE_LINES));
      if (this.byId.get(seg.id) !== seg) return null;
      seq = Math.min(seq, seg.length - 1);
      this.current = { segment: seg.id, seq, at: Array.isArray(at) && at.length ? at[0] : null };
      this.rendered.clear();
      const y = this.topOf(seg, seq) - Math.max(0, (this.viewport - LINE_HEIGHT) / 3);
      this.setTop(y, false);
      return this.rendered.get(`${seg.id}\n${seq}`) || null;
    }

    // No line of this view is the current one any more (another view's is).
    clearCurrent() {
      if (!this.current) return;
      this.current = null;
      this.rendered.clear();
      this.schedule(true);
    }

    // Wraps occurrences of the needle in the line's text nodes in <mark class="hit">; in the
    // current line the one at `at` (else the first) is also "current".
    mark(element, at, current) {
      const texts = [], walker = document.createTreeWalker(element, NodeFilter.SHOW_TEXT);
      for (let node = walker.nextNode(); node; node = walker.nextNode()) texts.push(node);
      const whole = texts.map((t) => t.data).join("");
      const fold = (s) => (this.caseSensitive ? s : s.toLowerCase());
      const hay = fold(whole), needle = fold(this.needle);
      if (!needle || hay.length !== whole.length) return;
      const found = [];
      for (let i = hay.indexOf(needle); i >= 0 && found.length < MAX_MARKS; i = hay.indexOf(needle, i + needle.length)) found.push(i);
      if (!found.length) return;
      let chosen = current ? found[0] : -1;
      if (current && Array.isArray(at) && found.includes(at[0])) chosen = at[0];
      for (const startAt of found.reverse()) this.wrap(element, startAt, startAt + needle.length, startAt === chosen);
    }

    // Wraps the text [start, end) of the element's text nodes in marks (one per text node).
    wrap(element, start, end, current) {
      const walker = document.createTreeWalker(element, NodeFilter.SHOW_TEXT);
      const parts = [];
      let at = 0;
      for (let node = walker.nextNode(); node; node = walker.nextNode()) {
        const from = at, to = at + node.data.length;
        at = to;
        if (to <= start || from >= end) continue;
        parts.push([node, Math.max(start, from) - from, Math.min(end, to) - from]);
      }
      for (const [node, a, b] of parts) {
        let piece = node;
        if (a > 0) piece = piece.splitText(a);
        if (b - a < piece.data.length) piece.splitText(b - a);
        const mark = document.createElement("mark");
        mark.className = current ? "hit current" : "hit";
        piece.parentNode.replaceChild(mark, piece);
        mark.appendChild(piece);
      }
    }

    // --- wrapping (a page-wide choice) ------------------------------------------------------
    static get wrapping() { return wrapping; }

    // Wraps long lines (or not) in every view; the class on <body> is what the CSS reads.
    static setWrap(on) {
      wrapping = Boolean(on);
      document.body.classList.toggle("wrap-lines", wrapping);
      for (const view of views) view.setWrap();
    }

    // The "Wrap lines" checkbox: its state kept in localStorage (marco-wrap, 1 or 0).
    static wrapToggle(box) {
      if (!box) return;
      try { box.checked = localStorage.getItem(WRAP_KEY) === "1"; } catch (e) { /* no storage */ }
      View.setWrap(box.checked);
      box.addEventListener("change", () => {
        View.setWrap(box.checked);
        try { localStorage.setItem(WRAP_KEY, box.checked ? "1" : "0"); } catch (e) { /* no storage */ }
      });
    }
  }

  View.LINE_HEIGHT = LINE_HEIGHT;
  View.PAGE_LINES = PAGE_LINES;
  return View;
})();
