"""An execution's output as the store keeps it: the agent's output events (`seq`, `lines`, and
whatever else they carry, e.g. `stream`) in chunks, each a zlib-compressed run of JSON lines.

Line `seq + i` is `lines[i]` of the event with that `seq` (docs/protocol.md "Output events and
`seq`"). Pure functions: the store (sqlite.py) and migration 3 (schema.py) use them.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

from marco.errors import BadRequest

from .records import encoded_json

MAX_PAGE_LINES = 100_000  # at most this many lines in one page read
MAX_SEQ = (1 << 63) - 1   # SQLite's largest integer: no seq (of a line or an event) is beyond


def end_of(event: dict[str, Any]) -> int:
    """The seq after the event's last line."""
    return int(event["seq"]) + len(event["lines"])


def is_output_event(event: Any) -> bool:
    """An object with an int `seq` >= 0 and a list of string `lines`."""
    return isinstance(event, dict) and isinstance(event.get("seq"), int) \
        and not isinstance(event["seq"], bool) and event["seq"] >= 0 \
        and isinstance(event.get("lines"), list) \
        and all(isinstance(line, str) for line in event["lines"])


def check_events(events: Any) -> list[dict[str, Any]]:
    """Output events in seq order, not overlapping (gaps allowed), or BadRequest."""
    if not isinstance(events, list):
        raise BadRequest("output events must be a list")
    position = 0
    for event in events:
        if not is_output_event(event):
            raise BadRequest("an output event is an object with an int seq >= 0 and a list of "
                             "string lines")
        if event["seq"] < position:
            raise BadRequest("output events must be in seq order, not overlapping")
        position = end_of(event)
    return events


def in_order(events: list[Any]) -> list[dict[str, Any]]:
    """The well-formed events that keep seq order (for data stored before it was checked)."""
    kept: list[dict[str, Any]] = []
    position = 0
    for event in events:
        if is_output_event(event) and event["seq"] >= position and event["lines"]:
            kept.append(event)
            position = end_of(event)
    return kept


def trim(event: dict[str, Any], start: int, stop: int) -> dict[str, Any] | None:
    """The event cut to the lines with start <= seq < stop (None when none is left); the event
    itself when nothing is cut."""
    seq, lines = int(event["seq"]), event["lines"]
    first, last = max(start - seq, 0), min(stop - seq, len(lines))
    if first >= last:
        return None
    if first == 0 and last == len(lines):
        return event
    return {**event, "seq": seq + first, "lines": lines[first:last]}


def after(events: list[dict[str, Any]], next_seq: int) -> list[dict[str, Any]]:
    """The events' lines from `next_seq` on (what a store holding lines below it lacks)."""
    kept = (trim(event, next_seq, end_of(event)) for event in events)
    return [event for event in kept if event is not None]


def encode(events: list[dict[str, Any]]) -> bytes:
    """One chunk: the events as compressed JSON lines (BadRequest when one is not JSON)."""
    text = "".join(encoded_json(event, "an output event") + "\n" for event in events)
    return zlib.compress(text.encode("utf-8"), 6)


def decode(data: bytes) -> list[dict[str, Any]]:
    """The events of one chunk."""
    text = zlib.decompress(data).decode("utf-8")
    # Only "\n" ends a line: JSON escapes it, but not U+2028 or U+0085, which splitlines() cuts.
    return [json.loads(line) for line in text.split("\n")[:-1]]


class Page:
    """Lines from `since` on, at most `limit` of them, gathered chunk by chunk."""

    def __init__(self, since: int, limit: int) -> None:
        self.since, self.left = since, limit
        self.events: list[dict[str, Any]] = []
        self.next = since

    @property
    def full(self) -> bool:
        return self.left <= 0

    def add(self, events: list[dict[str, Any]]) -> None:
        """Take what the page still wants of one chunk's events."""
        for event in events:
            if self.full:
                return
            start = max(self.since, int(event["seq"]))
            part = trim(event, start, start + self.left)
            if part is not None:
                self.events.append(part)
                self.left -= len(part["lines"])
                self.next = end_of(part)


def check_seq(value: Any, what: str) -> int:
    """A seq SQLite can compare (0 to MAX_SEQ), or BadRequest."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEQ:
        raise BadRequest(f"{what} must be an integer from 0 to {MAX_SEQ}")
    return value


def check_page(since: Any, limit: Any) -> None:
    """BadRequest unless `since` is a seq and `limit` a page size."""
    check_seq(since, "since")
    if isinstance(limit, bool) or not isinstance(limit, int) \
            or not 0 < limit <= MAX_PAGE_LINES:
        raise BadRequest(f"limit must be 1 to {MAX_PAGE_LINES} lines")
