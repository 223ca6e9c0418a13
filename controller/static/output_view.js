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
  // Characters of lines kept in memory per view (UTF-16 units, 2 bytes each: about 128 MB), as
  // well as pages: a page of 1,000 lines of 32 KiB would otherwise hold 64 MB. Pages in sight
  // are kept whatever they hold.
  const MAX_CHARS = 64 * 1024 * 1024;
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

  // Case folding for the marks, one character at a time so that indices stay those of the
  // text (the whole line's toLowerCase may change its length: "İ" becomes two units, and a
  // final "Σ" becomes "ς"); characters Python's case-insensitive matching (the search's) takes
  // as equal are folded to one of them.
  const FOLDS = new Map(Object.entries({
    "\u0130": "\u0069", "\u0131": "\u0069", "\u017f": "\u0073", "\u03b9": "\u0345",
    "\u03bc": "\u00b5", "\u03c3": "\u03c2", "\u03d0": "\u03b2", "\u03d1": "\u03b8",
    "\u03d5": "\u03c6", "\u03d6": "\u03c0", "\u03f0": "\u03ba", "\u03f1": "\u03c1",
    "\u03f5": "\u03b5", "\u1c80": "\u0432", "\u1c81": "\u0434", "\u1c82": "\u043e",
    "\u1c83": "\u0441", "\u1c84": "\u0442", "\u1c85": "\u0442", "\u1c86": "\u044a",
    "\u1c87": "\u0463", "\u1e9b": "\u1e61", "\u1fbe": "\u0345", "\u1fd3": "\u0390",
    "\u1fe3": "\u03b0", "\ua64b": "\u1c88", "\ufb06": "\ufb05",
  }));
  function foldCase(text) {
    let out = "";
    for (const ch of text) {
      const lower = ch.toLowerCase();
      const one = lower.length === ch.length ? lower : ch;
      out += FOLDS.get(one) || one;
    }
    return out;
  }

  // The UTF-16 index of code point `n` of `text` (the search's spans count code points).
  function unitIndex(text, n) {
    let units = 0;
    for (const ch of text) {
      if (n-- <= 0) break;
      units += ch.length;
    }
    return units;
  }

  // One page of a segment: PAGE_LINES slots from seq no * PAGE_LINES; `filled` counts the
  // slots known from its start (a source fills a page in order).
  class Page {
    constructor(no) {
      this.no = no;
      this.texts = new Array(PAGE_LINES);
      this.stderr = new Uint8Array(PAGE_LINES);
      this.times = new Float64Array(PAGE_LINES).fill(NaN);
      this.filled = 0;
      this.chars = 0;               // characters of its lines
      this.loading = null;          // the promise of a read under way
      this.retryAt = 0;             // a read that brought nothing is not repeated before this
      this.end = null;              // {ansi, from}: the ANSI state after its last line, computed
                                    // from the state at the start of page `from` (0: exact)
    }

    // Keeps a line; how many characters the page holds more than before.
    put(index, text, stream, time) {
      const was = this.texts[index], line = String(text);
      this.texts[index] = line;
      this.stderr[index] = stream === "stderr" ? 1 : 0;
      this.times[index] = typeof time === "number" && isFinite(time) ? time : NaN;
      while (this.filled < PAGE_LINES && this.texts[this.filled] !== undefined) this.filled++;
      const grown = line.length - (was === undefined ? 0 : was.length);
      this.chars += grown;
      return grown;
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
      this.chars = 0;               // characters of the lines in `pages`
      this.maxChars = MAX_CHARS;    // the most kept beyond the pages in sight
      this.inSight = new Set();     // keys of the pages the last paint showed (never evicted)
      // What the view did, for tests and benchmarks: `heightIndexes`, the sorted heights built
      // for wrapped lines (once per change of heights, not per lookup); `evicted`, pages dropped.
      this.counters = { heightIndexes: 0, evicted: 0 };
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
      this.chars = 0;
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
                                     end: null, extra: new Map(), extraSum: 0, heights: null,
                                     changed: new Set() };
        seg.length = this.capped(seg, Math.max(seg.length, Number(given.length) || 0));
        this.segments.push(seg);
        this.byId.set(id, seg);
      }
      for (const key of [...this.pages.keys()]) {
        if (!this.byId.has(key.split("\n")[0])) this.drop(key);
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
      let end = 0, page = null;
      for (const event of events || []) {
        const lines = event.lines || [], seq = Number(event.seq) || 0;
        for (let k = 0; k < lines.length; k++) {
          const at = seq + k, no = Math.floor(at / PAGE_LINES);
          if (!page || page.no !== no) page = this.page(seg, no, true);
          const full = page.filled === PAGE_LINES;
          this.chars += page.put(at % PAGE_LINES, lines[k], event.stream, event.time);
          this.forget(seg, at);
          if (!full && page.filled === PAGE_LINES) this.restyle(seg, no);
        }
        end = Math.max(end, seq + lines.length);
      }
      this.evict(page ? `${seg.id}\n${page.no}` : null);
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
        this.evict(key);
      }
      return page;
    }

    // Drops the least recently used pages while there are more than MAX_PAGES or they hold
    // more than `maxChars` characters; never the pages in sight nor `keep` (the one just used).
    evict(keep) {
      for (const [key, page] of this.pages) {
        if (this.pages.size <= MAX_PAGES && this.chars <= this.maxChars) return;
        if (key === keep || this.inSight.has(key) || page.loading) continue;
        this.drop(key);
        this.counters.evicted++;
      }
    }

    drop(key) {
      const page = this.pages.get(key);
      if (!page) return;
      this.chars -= page.chars;
      this.pages.delete(key);
    }

    // A page became full: the pages after it start from its end state now (their colours may
    // change), so their lines are rendered again.
    restyle(seg, no) {
      const from = (no + 1) * PAGE_LINES, prefix = `${seg.id}\n`;
      for (const key of [...this.rendered.keys()]) {
        if (key.startsWith(prefix) && Number(key.slice(prefix.length)) >= from) this.rendered.delete(key);
      }
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
      if (seg.extraSum) {
        const heights = this.heights(seg), n = this.measuredBefore(heights, seq);
        y += heights.before[n];
      }
      return y;
    }

    // A segment's measured lines in seq order, their extra px, and the extra of those before
    // each (prefix sums: `before[i]` is the extra of lines[0..i-1]), so a lookup is a binary
    // search instead of a sort of every measured line. After heights change it is built again
    // once: the lines changed since are merged into the sorted ones (linear, no sort of all).
    heights(seg) {
      const old = seg.heights;
      if (old && !seg.changed.size) return old;
      this.counters.heightIndexes++;
      const size = seg.extra.size, lines = new Float64Array(size), px = new Float64Array(size);
      if (!old || seg.changed.size * 8 > old.lines.length) {
        lines.set(Float64Array.from(seg.extra.keys()).sort());
        for (let i = 0; i < size; i++) px[i] = seg.extra.get(lines[i]);
      } else {
        const changed = Float64Array.from(seg.changed).sort();
        let i = 0, j = 0, k = 0;
        while (i < old.lines.length || j < changed.length) {
          if (j >= changed.length || (i < old.lines.length && old.lines[i] < changed[j])) {
            lines[k] = old.lines[i]; px[k++] = old.px[i++];
            continue;
          }
          const seq = changed[j++];
          if (i < old.lines.length && old.lines[i] === seq) i++;  // changed or gone
          const now = seg.extra.get(seq);
          if (now) { lines[k] = seq; px[k++] = now; }
        }
      }
      const before = new Float64Array(size + 1);
      for (let i = 0; i < size; i++) before[i + 1] = before[i] + px[i];
      seg.changed.clear();
      seg.heights = { lines, px, before };
      return seg.heights;
    }

    // How many of the measured lines are above line `seq`.
    measuredBefore(heights, seq) {
      let lo = 0, hi = heights.lines.length;
      while (lo < hi) {
        const mid = (lo + hi) >> 1;
        if (heights.lines[mid] < seq) lo = mid + 1; else hi = mid;
      }
      return lo;
    }

    // A measured line's height changed (px: its extra over LINE_HEIGHT, 0 for none).
    setExtra(seg, seq, px) {
      const was = seg.extra.get(seq) || 0, now = Math.max(0, px);
      if (now > 0) seg.extra.set(seq, now); else seg.extra.delete(seq);
      seg.extraSum += now - was;
      if (seg.heights) seg.changed.add(seq);  // merged into the sorted heights when next needed
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
    // tall but the measured ones, which are LINE_HEIGHT + their extra. A measured line's top
    // is its seq x LINE_HEIGHT plus the extra before it: the last one whose top is not below
    // `y` is found by binary search, and the line is it or one of the plain lines after it.
    seqAt(seg, y) {
      const last = Math.max(0, seg.length - 1);
      if (!seg.extraSum) return Math.min(last, Math.floor(y / LINE_HEIGHT));
      const { lines, before } = this.heights(seg);
      let lo = 0, hi = lines.length;  // lines[0..lo-1] start at or above y
      while (lo < hi) {
        const mid = (lo + hi) >> 1;
        if (lines[mid] * LINE_HEIGHT + before[mid] <= y) lo = mid + 1; else hi = mid;
      }
      if (!lo) return Math.min(last, Math.floor(y / LINE_HEIGHT));
      const line = lines[lo - 1], top = line * LINE_HEIGHT + before[lo - 1];
      const below = top + LINE_HEIGHT + before[lo] - before[lo - 1];
      if (y < below) return Math.min(last, line);
      return Math.min(last, line + 1 + Math.floor((y - below) / LINE_HEIGHT));
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
      for (const seg of this.segments) {
        seg.extra.clear();
        seg.extraSum = 0;
        seg.heights = null;
        seg.changed.clear();
      }
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
      this.inSight = this.pagesOf(start, end);
      // Pages out of sight now may go (a reveal read its page before the view moved there).
      if (this.chars > this.maxChars || this.pages.size > MAX_PAGES) this.evict(null);
      const fresh = new Map(), elements = [];
      let ansi = null, ansiAt = -1;
      for (let index = start; index < end; index++) {
        const seg = this.segmentAt(index), seq = index - seg.start, key = `${seg.id}\n${seq}`;
        let element = this.rendered.get(key);
        if (!element) {
          // A segment (another execution) starts from a reset state, a page from the state
          // its predecessors give: never from the line rendered before it.
          if (ansiAt !== index || seq % PAGE_LINES === 0) ansi = this.ansiAt(index);
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

    // The keys of the pages the lines [start, end) are on.
    pagesOf(start, end) {
      const keys = new Set();
      for (let index = start; index < end;) {
        const seg = this.segmentAt(index), no = Math.floor((index - seg.start) / PAGE_LINES);
        keys.add(`${seg.id}\n${no}`);
        index = seg.start + Math.min(seg.length, (no + 1) * PAGE_LINES);
      }
      return keys;
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

    // The ANSI state a line starts from: its page's start state (startOf), then the page's
    // lines before it applied (only lines with an escape change it).
    ansiAt(index) {
      const seg = this.segmentAt(index), seq = index - seg.start;
      const no = Math.floor(seq / PAGE_LINES), page = this.pages.get(`${seg.id}\n${no}`);
      const ansi = this.startOf(seg, no);
      if (page) this.advance(ansi, page, seq % PAGE_LINES);
      return ansi;
    }

    // The state a page starts from: a segment starts reset; page `no` from the end of page
    // no - 1 when that one is in memory and full, computed from the first page of the run of
    // full pages before it (exact when that is page 0; else it starts reset: a colour set on
    // a page not in memory does not carry). A page's end is kept with the page it was
    // computed from and computed again when that changes (the true predecessor arrived, or
    // left memory).
    startOf(seg, no) {
      let from = no;
      const full = (n) => { const p = this.pages.get(`${seg.id}\n${n}`); return p && p.filled === PAGE_LINES ? p : null; };
      while (from > 0 && full(from - 1)) from--;
      let ansi = newAnsi();
      for (let n = from; n < no; n++) {
        const page = full(n);
        if (!page.end || page.end.from !== from) {
          this.advance(ansi, page, PAGE_LINES);
          page.end = { ansi: copyAnsi(ansi), from };
        } else {
          ansi = copyAnsi(page.end.ansi);
        }
      }
      return ansi;
    }

    // Applies the page's first `count` lines to `ansi` (those with an escape change it).
    advance(ansi, page, count) {
      let scratch = null;
      for (let k = 0; k < count && k < page.filled; k++) {
        const text = page.texts[k];
        if (text.indexOf("\x1b") < 0) continue;
        scratch = scratch || document.createElement("span");
        Ansi.render(scratch, text, ansi[page.stderr[k] ? "stderr" : "stdout"]);
        scratch.replaceChildren();
      }
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
        const seq = Number(element.dataset.seq), px = Math.max(0, element.offsetHeight - LINE_HEIGHT);
        const was = seg.extra.get(seq) || 0;
        if (px === was || element.offsetHeight === 0) continue;
        this.setExtra(seg, seq, px);
        changed = true;
      }
      if (changed) this.restore(anchor);
      return changed;
    }

    // --- search ----------------------------------------------------------------------------
    // Marks every occurrence of the literal `needle` in the rendered lines (null: none).
    highlight(needle, { caseSensitive = false } = {}) {
      const changed = (needle ? String(needle) : null) !== this.needle;
      // The current line's occurrence was the previous needle's.
      if (changed && this.current) this.current.at = null;
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
    // current line the occurrence at `at` (the search's [start, end) in code points of the
    // line's text) is "current", else its first. Case is folded a character at a time, so the
    // occurrences' indices are the text's.
    mark(element, at, current) {
      const texts = [], walker = document.createTreeWalker(element, NodeFilter.SHOW_TEXT);
      for (let node = walker.nextNode(); node; node = walker.nextNode()) texts.push(node);
      const whole = texts.map((t) => t.data).join("");
      const fold = (s) => (this.caseSensitive ? s : foldCase(s));
      const hay = fold(whole), needle = fold(this.needle);
      if (!needle) return;
      const spans = [];
      let chosen = current ? this.spanOf(whole, at) : null;
      if (chosen) spans.push([chosen[0], chosen[1], true]);
      for (let i = hay.indexOf(needle); i >= 0 && spans.length < MAX_MARKS; i = hay.indexOf(needle, i + needle.length)) {
        const end = i + needle.length;
        if (chosen && i < chosen[1] && end > chosen[0]) continue;  // that one is the current
        if (current && !chosen) chosen = [i, end];
        spans.push([i, end, chosen !== null && chosen[0] === i && current]);
      }
      spans.sort((a, b) => b[0] - a[0]);  // from the end: earlier offsets stay valid
      for (const [startAt, endAt, isCurrent] of spans) this.wrap(element, startAt, endAt, isCurrent);
    }

    // The search's span [start, end) in code points as UTF-16 indices of `text`; null when it
    // does not fit the text (a hit for text the line does not show).
    spanOf(text, at) {
      if (!Array.isArray(at) || at.length < 2) return null;
      const [start, end] = at.map(Number);
      if (!Number.isInteger(start) || !Number.isInteger(end) || start < 0 || end <= start) return null;
      const from = unitIndex(text, start), to = unitIndex(text, end);
      if (to > text.length || to <= from || unitIndex(text, end - 1) >= text.length) return null;
      return [from, to];
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
