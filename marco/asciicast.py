"""Terminal sessions kept as asciicast v2 (docs/terminals.md, "Recording"): the recorder that
batches a session's output and resizes into `term` events of a run, and the .cast file made
from those events. No I/O here: the caller moves the events and the lines."""

from __future__ import annotations

import codecs
import json
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from marco.runs import MAX_TITLE

FLUSH_SECONDS = 0.5               # a batch of frames is due this long after the last one
EVENT_FRAMES_BYTES = 32 * 1024    # frames of one event, as JSON, at most
DEFAULT_MAX_BYTES = 64 << 20      # output bytes one session records (terminal_record_max_bytes)
EVENT_TYPE = "term"
FRAME_KINDS = ("o", "r")          # output, resize: input is never recorded
STOPPED = "\r\n[marco: recording stopped at {} bytes]\r\n"
TITLE_COMMAND = 200  # characters of a command in a terminal run's title

Frame = list[Any]  # [seconds since the start, "o" or "r", text]


def frame_size(frame: Frame) -> int:
    """The frame's bytes as JSON, at most what the run store counts (it keeps non-ASCII text
    as UTF-8, never longer than its \\u escapes), plus the comma that joins it."""
    return len(json.dumps(frame, separators=(",", ":"))) + 1


def is_frame(frame: Any) -> bool:
    """Whether `frame` is one asciicast event line: [time >= 0, "o" or "r", text]."""
    return (isinstance(frame, list) and len(frame) == 3
            and isinstance(frame[0], (int, float)) and not isinstance(frame[0], bool)
            and math.isfinite(frame[0]) and frame[0] >= 0
            and frame[1] in FRAME_KINDS and isinstance(frame[2], str))


class CastRecorder:
    """One session's recording: output and resizes as frames, handed out as `term` events of
    at most `event_bytes` of frames by `flush`. Output past `max_bytes` is not recorded: one
    last frame says so, and the session goes on unrecorded."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES,
                 clock: Callable[[], float] = time.monotonic,
                 flush_seconds: float = FLUSH_SECONDS,
                 event_bytes: int = EVENT_FRAMES_BYTES) -> None:
        self.max_bytes, self.clock = max_bytes, clock
        self.flush_seconds, self.event_bytes = flush_seconds, event_bytes
        self.started = clock()
        self.last_flush = self.started
        self.recorded = 0         # output bytes taken so far
        self.stopped = False      # the byte cap was reached
        self.pending_bytes = 0    # frames not handed out yet, as JSON
        self._frames: deque[tuple[Frame, int]] = deque()
        # An incomplete UTF-8 sequence at the end of one batch is held for the next.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def now(self) -> float:
        """Seconds since the session started, as a frame's time (microseconds)."""
        return round(max(self.clock() - self.started, 0.0), 6)

    def output(self, data: bytes) -> None:
        """Bytes the terminal wrote."""
        if self.stopped or not data:
            return
        left = self.max_bytes - self.recorded
        if len(data) > left:
            self._add_text(self._decoder.decode(data[:left]))
            self.recorded = self.max_bytes
            self.stop()
            return
        self.recorded += len(data)
        self._add_text(self._decoder.decode(data))

    def resize(self, cols: int, rows: int) -> None:
        """The window's new size."""
        if not self.stopped:
            self._add([self.now(), "r", f"{cols}x{rows}"])

    def stop(self) -> None:
        """Record no more: the last frame says where it stopped."""
        if not self.stopped:
            self.stopped = True
            self._add_text(STOPPED.format(self.recorded))

    def discard(self) -> None:
        """Record no more and drop the frames held (the store refused them)."""
        self.stopped = True
        self._frames.clear()
        self.pending_bytes = 0

    def finish(self) -> None:
        """The session ended: a sequence left incomplete becomes U+FFFD."""
        if not self.stopped:
            self._add_text(self._decoder.decode(b"", final=True))

    def due(self) -> bool:
        """Whether a flush is due: a full event's worth of frames, or frames held for
        `flush_seconds` since the last flush."""
        if not self._frames:
            return False
        return (self.pending_bytes >= self.event_bytes
                or self.clock() - self.last_flush >= self.flush_seconds)

    def flush(self) -> dict[str, Any] | None:
        """The next `term` event (the oldest frames, at most `event_bytes` of them), or None
        when no frame is held."""
        self.last_flush = self.clock()
        if not self._frames:
            return None
        frames: list[Frame] = []
        size = 0
        while self._frames and (not frames or size + self._frames[0][1] <= self.event_bytes):
            frame, bytes_ = self._frames.popleft()
            frames.append(frame)
            size += bytes_
        self.pending_bytes -= size
        return {"type": EVENT_TYPE, "frames": frames}

    def _add_text(self, text: str) -> None:
        if not text:
            return
        at = self.now()
        for piece in self._pieces(text, at):
            self._add([at, "o", piece])

    def _pieces(self, text: str, at: float) -> Iterator[str]:
        """`text` cut so that each frame of it fits one event."""
        if frame_size([at, "o", text]) <= self.event_bytes or len(text) < 2:
            yield text
            return
        middle = len(text) // 2
        yield from self._pieces(text[:middle], at)
        yield from self._pieces(text[middle:], at)

    def _add(self, frame: Frame) -> None:
        size = frame_size(frame)
        self._frames.append((frame, size))
        self.pending_bytes += size


def run_title(node: str, command: str | None) -> str:
    """A terminal run's title: `shell on NODE`, or `NODE: COMMAND` with the command cut to
    TITLE_COMMAND characters (the store takes MAX_TITLE)."""
    if command is None:
        return f"shell on {node}"
    cut = command if len(command) <= TITLE_COMMAND else command[:TITLE_COMMAND - 1] + "…"
    return f"{node}: {cut}"[:MAX_TITLE]


def cast_header(width: int, height: int, timestamp: float, title: str, term: str | None,
                shell: str | None) -> dict[str, Any]:
    """An asciicast v2 header."""
    env = {key: value for key, value in (("TERM", term), ("SHELL", shell)) if value}
    return {"version": 2, "width": width, "height": height, "timestamp": int(timestamp),
            "title": title, "env": env}


def cast_lines(events: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    """The frame lines of a run's events (its `term` events; others are not frames)."""
    for event in events:
        if event.get("type") != EVENT_TYPE:
            continue
        for frame in event.get("frames", ()):
            yield json.dumps(frame, ensure_ascii=False) + "\n"


def cast_file(header: Mapping[str, Any], events: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    """The asciicast v2 file, a line at a time: the header, then one frame a line."""
    yield json.dumps(dict(header), ensure_ascii=False) + "\n"
    yield from cast_lines(events)
