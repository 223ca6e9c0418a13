"use strict";
// The player of a terminal run's recording (issue 16, docs/terminals.md): reads the run's
// `term` events (GET /api/runs/ID?since=SEQ, in pages; a run still going is followed) and plays
// their asciicast v2 frames into a read-only xterm.js terminal: play/pause, speed (1×, 2×, 5×,
// instant), restart. Needs vendor/xterm/xterm.js and style_nonce.js loaded first.

const CAST_IDLE_MAX = 2;        // seconds: a longer pause in the recording plays as this long
const CAST_FOLLOW_WAIT = 25;    // seconds a read of a running recording waits for more
const CAST_RETRY_MS = 2000;     // a failed read is asked again after this
const CAST_SIZE_MAX = 1000;     // columns or rows a resize frame may ask for (as the agent's bound)

const castSleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function castTime(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

// "COLSxROWS" of a resize frame, within bounds, else null.
function castSize(text) {
  const match = /^(\d{1,4})x(\d{1,4})$/.exec(String(text));
  if (!match) return null;
  const cols = Number(match[1]), rows = Number(match[2]);
  return cols >= 1 && rows >= 1 && cols <= CAST_SIZE_MAX && rows <= CAST_SIZE_MAX ? { cols, rows } : null;
}

class CastPlayer {
  constructor(section, runId) {
    this.section = section;
    this.runId = runId;
    this.frames = [];            // [time on the play's timeline (s), type, data]
    this.lastTime = 0;           // the recording's time of the last frame read (s)
    this.timeline = 0;           // the play's time of the last frame read (idle pauses capped)
    this.seq = 0;
    this.ended = false;          // the run ended: no more frames will come
    this.index = 0;              // the next frame to play
    this.position = 0;           // the play's time reached (s)
    this.playing = false;
    this.timer = null;
    this.speed = 1;
  }

  path(query) { return `/api/runs/${encodeURIComponent(this.runId)}${query}`; }

  async start() {
    this.say("Loading the recording…");
    const meta = await this.read(0);
    this.say(null);
    const size = castSize(`${meta.cols}x${meta.rows}`) || { cols: 80, rows: 24 };
    this.size = size;
    this.term = new Terminal({ cols: size.cols, rows: size.rows, disableStdin: true, scrollback: 5000,
      convertEol: false, fontSize: 13, theme: { background: "#14181c", foreground: "#d8dee4" },
      fontFamily: "ui-monospace, 'DejaVu Sans Mono', Menlo, Consolas, monospace" });
    this.term.open(this.section.querySelector("#cast-screen"));
    this.term.textarea?.setAttribute("aria-label", "Recorded terminal (read only)");
    this.bind();
    this.show();
    this.play();
    this.follow();
  }

  // Every page of events after `since`; answers the run's meta (the recorded size).
  async read(wait) {
    for (;;) {
      const query = `?since=${this.seq}${wait ? `&wait=${wait}` : ""}`;
      const response = await fetch(this.path(query), { headers: { Accept: "application/json" } });
      if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
      const run = await response.json();
      for (const event of run.events) this.add(event);
      this.ended = run.ended !== null;
      if (!(run.more && run.events.length)) return run.meta || {};
      wait = 0;
    }
  }

  // A running session's recording grows: read on while it runs (each read waits for more).
  async follow() {
    while (!this.ended) {
      try {
        await this.read(document.visibilityState === "visible" ? CAST_FOLLOW_WAIT : 0);
      } catch (e) {
        this.say(`Cannot read the recording: ${e.message}; retrying`);
        await castSleep(CAST_RETRY_MS);
        continue;
      }
      this.show();
      if (this.playing && !this.timer) this.tick();
    }
    this.show();
  }

  add(event) {
    this.seq = Math.max(this.seq, event.seq || 0);
    if (event.type !== "term" || !Array.isArray(event.frames)) return;
    for (const frame of event.frames) {
      if (!Array.isArray(frame) || typeof frame[0] !== "number") continue;
      const gap = Math.max(0, frame[0] - this.lastTime);
      this.lastTime = Math.max(this.lastTime, frame[0]);
      this.timeline += Math.min(gap, CAST_IDLE_MAX);
      this.frames.push([this.timeline, frame[1], frame[2]]);
    }
  }

  bind() {
    this.playButton = this.section.querySelector("#cast-play");
    this.playButton.addEventListener("click", () => (this.playing ? this.pause() : this.play()));
    this.section.querySelector("#cast-restart").addEventListener("click", () => this.restart());
    const speed = this.section.querySelector("#cast-speed");
    speed.addEventListener("change", () => this.setSpeed(Number(speed.value)));
    this.speed = Number(speed.value) || 0;
  }

  play() {
    if (this.index >= this.frames.length && this.ended) this.rewind();
    this.playing = true;
    this.started = performance.now() - (this.position * 1000) / (this.speed || 1);
    this.show();
    this.tick();
  }

  pause() {
    this.playing = false;
    clearTimeout(this.timer);
    this.timer = null;
    this.show();
  }

  restart() {
    this.pause();
    this.rewind();
    this.play();
  }

  rewind() {
    this.term.reset();
    this.term.resize(this.size.cols, this.size.rows);
    this.index = 0;
    this.position = 0;
  }

  setSpeed(speed) {
    this.speed = speed;
    if (this.playing) { clearTimeout(this.timer); this.timer = null; this.play(); }
    this.show();
  }

  // Plays every frame due by now; waits for the next one's time. Instant (speed 0) writes
  // every frame read at once.
  tick() {
    this.timer = null;
    if (!this.playing) return;
    const now = this.speed ? ((performance.now() - this.started) / 1000) * this.speed : Infinity;
    while (this.index < this.frames.length && this.frames[this.index][0] <= now) {
      this.apply(this.frames[this.index]);
      this.position = this.frames[this.index][0];
      this.index += 1;
    }
    if (this.speed) this.position = Math.max(this.position, Math.min(now, this.timeline));
    this.show();
    if (this.index < this.frames.length) {
      const ms = ((this.frames[this.index][0] - now) * 1000) / this.speed;
      this.timer = setTimeout(() => this.tick(), Math.max(0, Math.min(ms, 1000)));
    } else if (this.ended) {
      this.playing = false;   // played to the end
      this.show();
    }
    // else: a running recording; follow() ticks again when frames come
  }

  apply([, type, data]) {
    if (type === "o") this.term.write(String(data));
    else if (type === "r") {
      const size = castSize(data);
      if (size) this.term.resize(size.cols, size.rows);
    }
  }

  show() {
    this.playButton.textContent = this.playing ? "Pause" : "Play";
    this.playButton.setAttribute("aria-pressed", String(this.playing));
    const done = this.index >= this.frames.length && this.ended;
    this.section.dataset.state = this.playing ? "playing" : done ? "ended" : "paused";
    const total = this.ended ? castTime(this.timeline) : `${castTime(this.timeline)}, recording`;
    const text = `${castTime(this.position)} / ${total}`;
    const time = this.section.querySelector("#cast-time");
    if (time.textContent !== text) time.textContent = text;
  }

  say(text) {
    const line = this.section.querySelector("#cast-status");
    line.textContent = text || "";
  }
}

window.CastPlayer = CastPlayer;
