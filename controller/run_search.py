"""Searching a run's whole output (docs/runs.md, `GET /api/runs/ID/search`): literal text only
(a user's regular expression could pin the controller), matched on each line as the page shows
it (without its terminal escapes, `\\r` and `\\b` overwriting like a terminal), over every
execution of the run in the order the store lists them, each line in seq order.

Every cost is bounded. What the store holds is matched on the store's thread a slice at a time
(lines and characters), other calls on that thread going between; lines held in memory (an
agent's page, the rest of a big chunk) are matched on the event loop a smaller slice at a time,
awaiting between slices. A line is counted with one search; only a kept hit looks for where the
text occurs, in its first 500 characters and at most 20 times. A search stops at its bounds in
lines, characters and seconds (its answer then says it is not complete), and at once when its
client goes away; an agent that failed once is not asked again in that search.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from marco.errors import BadRequest, TooManySearches
from marco.runs import host_failed

from .run_output import RunReader, strip_ansi
from .runstore import MAX_SEQ, Run
from .runstore.chunks import end_of, trim
from .user_slots import UserSlots

log = logging.getLogger(__name__)
T = TypeVar("T")

SLICE_LINES = 20_000          # lines one slice matches at most
SLICE_CHARS = 4_000_000       # characters one call on the store's thread matches at most
LOOP_SLICE_CHARS = 1_000_000  # characters matched on the event loop between two awaits
TEXT_CHARS = 500              # characters of a hit's line an answer gives
MAX_SPANS = 20                # occurrences one hit's `at` gives at most
# What one `\r` and one `\b` count for in a slice's characters (measured): applying them
# takes steps of Python, not of the regular expression engine, a `\b` the more.
RETURN_COST, BACKSPACE_COST = 10, 100
STREAMS = ("stdout", "stderr")
BACKSPACES = re.compile(r"\x08+")
NOT_A_PLACE = "'after' must be the 'next' of an earlier answer of the same search"


@dataclass(frozen=True)
class SearchLimits:
    """The search's settings (runs_search_*) and the read side's page sizes it reads by."""

    lines: int = 5_000_000          # lines one search scans at most
    chars: int = 1 << 30            # characters of those lines at most
    seconds: float = 30.0           # how long one search runs at most
    executions_page: int = 5000     # executions listed per read
    output_page: int = 20_000       # lines per output page read from an agent


@dataclass(frozen=True)
class Place:
    """Where a hit is (an answer's `next`): its execution's position in the order the store
    lists the run's executions (rows are only ever added at the end, so a position names the
    same execution in every later search), that execution, the line's seq."""

    position: int
    execution_id: str
    seq: int

    def __str__(self) -> str:
        return f"{self.position}:{self.execution_id}:{self.seq}"


@dataclass(frozen=True)
class SearchQuery:
    """What to look for and where (docs/runs.md): the text, its case, the filters, the page."""

    text: str
    case_sensitive: bool = False
    hosts: frozenset[str] = field(default_factory=frozenset)  # empty: every host
    task: str | None = None
    stream: str | None = None
    failed: bool = False
    limit: int = 1000
    after: Place | None = None  # the last hit given


def check_text(text: str, most: int) -> str:
    """The text to look for: 1 to `most` characters of one line, else BadRequest."""
    if not 0 < len(text) <= most:
        raise BadRequest(f"'q' must be 1 to {most} characters")
    if "\n" in text:
        raise BadRequest("'q' is looked for in one line: it cannot hold a newline")
    return text


def check_stream(stream: str) -> str | None:
    """`stdout`, `stderr`, or None for both (an empty argument)."""
    if stream and stream not in STREAMS:
        raise BadRequest("'stream' is 'stdout' or 'stderr'")
    return stream or None


def is_number(text: str, most: int) -> bool:
    return text.isascii() and text.isdigit() and int(text) <= most


def parse_cursor(text: str) -> Place | None:
    """An `after` argument (None when empty), else BadRequest."""
    if not text:
        return None
    position, _, rest = text.partition(":")
    execution_id, _, seq = rest.rpartition(":")
    if not execution_id or not is_number(position, MAX_SEQ) or not is_number(seq, MAX_SEQ):
        raise BadRequest(NOT_A_PLACE)
    return Place(int(position), execution_id, int(seq))


def overwrite(text: str) -> str:
    """The text as the page shows it (ansi.js `overwrite`, like a terminal): after `\\r` what
    follows overwrites from column 0, `\\b` steps one column back; cells are code points.

    Each pass between two `\\r` writes columns 0 up to its length, so a column shows what the
    last pass reaching it wrote: the passes are taken from the last, each adding what lies
    beyond the ones after it, and a line costs its length (plus a step per `\\b`)."""
    if "\r" not in text and "\b" not in text:
        return text
    parts: list[str] = []
    covered = 0
    for piece in reversed(text.split("\r")):
        if "\b" in piece:
            piece = backspaced(piece)
        if len(piece) > covered:
            parts.append(piece[covered:])
            covered = len(piece)
    return "".join(parts)


def backspaced(text: str) -> str:
    """One pass (no `\\r`) with its `\\b` applied: each piece between them is written with one
    slice assignment at the column the `\\b` before it left."""
    cells: list[str] = []
    column = start = 0
    for controls in BACKSPACES.finditer(text):
        piece = text[start:controls.start()]
        cells[column:column + len(piece)] = piece
        column = max(0, column + len(piece) - (controls.end() - controls.start()))
        start = controls.end()
    piece = text[start:]
    cells[column:column + len(piece)] = piece
    return "".join(cells)


def control_cost(lines: list[str]) -> int:
    """What the lines' `\\r` and `\\b` add to a slice's characters (counted in C, not per line
    in Python)."""
    return RETURN_COST * sum(map(str.count, lines, itertools.repeat("\r"))) \
        + BACKSPACE_COST * sum(map(str.count, lines, itertools.repeat("\b")))


def shown(line: str) -> str:
    """A line's text as the page shows it: escapes dropped, then `\\r` and `\\b` applied."""
    return overwrite(strip_ansi(line))


def failed_hosts(run: Run) -> set[str]:
    """The hosts whose stats say failed or unreachable."""
    return {host for host, counts in run.stats.items() if host_failed(counts)}


def hosts_to_search(run: Run, query: SearchQuery) -> frozenset[str] | None:
    """The hosts whose executions are searched (None: every one)."""
    if not query.failed:
        return query.hosts or None
    failed = failed_hosts(run)
    return frozenset(failed & query.hosts if query.hosts else failed)


class Stopped(Exception):
    """A search stops early (its client went away, its deadline passed): its own signal, never
    an error of the request."""


class Stop:
    """When a search stops early: once its client went away (`leave`, from the handler's
    on_connection_close) or its deadline passed. Checked between slices; a wait on an agent
    is cut short by it."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.left = asyncio.Event()

    def leave(self) -> None:
        self.left.set()

    def check(self) -> None:
        """Stopped once the search is to stop."""
        if self.left.is_set() or time.monotonic() >= self.deadline:
            raise Stopped

    async def within(self, awaitable: Awaitable[T]) -> T:
        """What `awaitable` gives, unless the client goes away or the deadline passes first:
        then Stopped, and the awaitable is let go of (a hung agent's read no longer holds the
        search; it ends by its own timeout, its outcome unread: a cancelled Tornado fetch
        would log the error it ends with as an application error)."""
        task = asyncio.ensure_future(awaitable)
        left = asyncio.ensure_future(self.left.wait())
        try:
            done, _ = await asyncio.wait((task, left), return_when=asyncio.FIRST_COMPLETED,
                                         timeout=max(0.0, self.deadline - time.monotonic()))
        except asyncio.CancelledError:  # the search itself is cancelled: so is its wait
            task.cancel()
            raise
        finally:
            left.cancel()
        if task not in done:
            task.add_done_callback(forget)
            raise Stopped
        return task.result()


def forget(task: asyncio.Future[Any]) -> None:
    """Read a let-go task's outcome, so that asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


class SearchSlots:
    """The searches going on: at most `per_user` of one user and `at_once` in all (a search
    costs the store's thread and the event loop, whoever asks)."""

    def __init__(self, per_user: int, at_once: int) -> None:
        self.per_user, self.at_once = per_user, at_once
        self.users = UserSlots(per_user)
        self.held = 0

    @contextmanager
    def admit(self, user: str) -> Iterator[None]:
        """Hold a slot for the block; TooManySearches when none is free."""
        if self.held >= self.at_once:
            raise TooManySearches(f"the controller has {self.at_once} searches going on",
                                  hint="try again in a moment")
        with self.users.admit(user) as admitted:
            if not admitted:
                raise TooManySearches(f"{user} has {self.per_user} searches going on",
                                      hint="wait for one to finish")
            self.held += 1
            try:
                yield
            finally:
                self.held -= 1


class Scan:
    """One search's progress: the matching lines counted, the hits of the page asked for, what
    it may still scan (the search's bounds, the slice's), where it is."""

    def __init__(self, query: SearchQuery, limits: SearchLimits) -> None:
        self.query = query
        flags = 0 if query.case_sensitive else re.IGNORECASE
        self.pattern = re.compile(re.escape(query.text), flags)  # escaped: literal text only
        # Where an occurrence starting in a hit's kept text ends at the latest (matching is
        # per character, case-blind too: an occurrence is as long as the text).
        self.reach = TEXT_CHARS + len(query.text) - 1
        self.count = 0
        self.hits: list[dict[str, Any]] = []
        self.last: Place | None = None  # the last hit's place
        self.more = False          # a matching line after the page's last hit
        self.lines_left, self.chars_left = limits.lines, limits.chars
        self.cut = False           # a line was left unscanned (a bound of the search)
        self.slice_lines = self.slice_chars = 0
        self.slice_full = False
        self.rest: list[dict[str, Any]] = []  # events after where a slice stopped in them
        self.execution: dict[str, Any] = {}
        self.position = -1         # the execution's position in the listing
        self.next = 0              # the seq after the last line scanned of this execution
        # Hits up to the cursor are counted, not given: "before" its execution, "in" it,
        # "after" it (or no cursor).
        self.cursor_state = "before" if query.after is not None else "after"

    def begin(self, execution: dict[str, Any], position: int) -> None:
        """Start scanning an execution, the `position`-th the listing gives."""
        self.execution, self.position, self.next = execution, position, 0
        after = self.query.after
        if after is None or position < after.position:
            return
        if position > after.position:  # the cursor's own was filtered out: go on after it
            self.cursor_state = "after"
        elif execution["execution_id"] != after.execution_id:
            raise BadRequest(NOT_A_PLACE)
        else:
            self.cursor_state = "in"

    def check_reached(self) -> None:
        """A search that went through the whole listing came to the cursor's place, else the
        place is not one of this search's (400, rather than no hits while lines match)."""
        if self.cursor_state == "before" and not self.cut:
            raise BadRequest(NOT_A_PLACE)

    def new_slice(self, lines: int, chars: int) -> None:
        self.slice_lines, self.slice_chars, self.slice_full = lines, chars, False

    def take_rest(self) -> list[dict[str, Any]]:
        rest, self.rest = self.rest, []
        return rest

    def visit(self, events: list[dict[str, Any]]) -> bool:
        """Match output events in seq order until the slice is full (what is left of them is
        kept in `rest`) or a bound of the search is reached; False then (the store reads no
        further chunk)."""
        for index, event in enumerate(events):
            lines, seq = event["lines"], int(event["seq"])
            take = self.fits(lines)
            if take:
                self.next = seq + take
                if self.query.stream is None or event.get("stream") == self.query.stream:
                    self.match(event, lines if take == len(lines) else lines[:take])
            if take < len(lines):
                if not self.cut:
                    left = trim(event, seq + take, end_of(event))
                    self.rest = [*([left] if left else []), *events[index + 1:]]
                return False
        return not self.slice_full

    def fits(self, lines: list[str]) -> int:
        """How many of the lines this slice and the search's bounds take (spent on them); a
        line refused by the search's bounds cuts the search, one refused by the slice's waits
        for the next slice."""
        if self.slice_full:
            return 0
        count, chars = len(lines), sum(map(len, lines))
        controls = control_cost(lines)
        if count <= min(self.lines_left, self.slice_lines) and chars <= self.chars_left \
                and chars + controls <= self.slice_chars:
            self.spend(count, chars, chars + controls)
            return count
        take = self.fits_each(lines) if controls else self.fits_plain(lines)
        if take < count and not self.slice_full:
            self.cut = True
        return take

    def fits_plain(self, lines: list[str]) -> int:
        """`fits` for lines without `\\r` or `\\b`, by their running length (no step of Python
        per line: an event may hold tens of thousands): a line is taken while the slice has
        characters left before it and the search has enough for it."""
        ends = list(itertools.accumulate(map(len, lines[:min(self.lines_left,
                                                             self.slice_lines)])))
        take = min(len(ends), bisect.bisect_left(ends, self.slice_chars) + 1,
                   bisect.bisect_right(ends, self.chars_left))
        chars = ends[take - 1] if take else 0
        self.spend(take, chars, chars)
        return take

    def fits_each(self, lines: list[str]) -> int:
        """`fits` line by line, each charged for its `\\r` and `\\b` too."""
        take = 0
        for line in lines:
            if self.slice_full or self.lines_left <= 0 or self.chars_left < len(line):
                break
            self.spend(1, len(line), len(line) + control_cost([line]))
            take += 1
        return take

    def spend(self, lines: int, chars: int, cost: int) -> None:
        """Lines and characters scanned; `cost`: what they count for in the slice."""
        self.lines_left -= lines
        self.chars_left -= chars
        self.slice_lines -= lines
        self.slice_chars -= cost
        self.slice_full = self.slice_lines <= 0 or self.slice_chars <= 0

    def match(self, event: dict[str, Any], lines: list[str]) -> None:
        """Count and keep the event's lines holding the text: one search over the event's
        lines joined first (most events hold none; the text holds no newline), then one per
        line of an event that does."""
        texts = [shown(line) for line in lines]
        if self.pattern.search("\n".join(texts)) is None:
            return
        for index, text in enumerate(texts):
            if self.pattern.search(text) is not None:
                self.found(event, int(event["seq"]) + index, text)

    def found(self, event: dict[str, Any], seq: int, text: str) -> None:
        self.count += 1
        if self.cursor_state == "before" or (
                self.cursor_state == "in" and self.query.after is not None
                and seq <= self.query.after.seq):
            return
        if len(self.hits) >= self.query.limit:
            self.more = True
            return
        execution = self.execution
        # Only the kept text is looked through, for the first few occurrences.
        spans = (found.span() for found in itertools.islice(
            self.pattern.finditer(text, 0, self.reach), MAX_SPANS))
        self.hits.append({
            "execution_id": execution["execution_id"], "host": execution["host"],
            "task_id": execution["task_id"], "seq": seq, "stream": event.get("stream"),
            "time": event.get("time"), "text": text[:TEXT_CHARS],
            "at": [[start, min(end, TEXT_CHARS)] for start, end in spans
                   if start < TEXT_CHARS]})
        self.last = Place(self.position, execution["execution_id"], seq)

    def answer(self) -> dict[str, Any]:
        following = str(self.last) if self.last is not None and self.more else None
        return {"hits": self.hits, "count": self.count, "complete": not self.cut,
                "next": following}


async def search_run(reader: RunReader, run: Run, token: str, query: SearchQuery,
                     limits: SearchLimits, stop: Stop | None = None) -> dict[str, Any]:
    """The answer of `GET /api/runs/ID/search` for the caller's run (token: the caller's, for
    what only the agents hold); `stop` ends it early (its client went away)."""
    stop = stop if stop is not None else Stop(limits.seconds)
    scan = Scan(query, limits)
    hosts = hosts_to_search(run, query)
    if hosts is not None and not hosts:
        return scan.answer()
    # Listed by the hosts asked for alone (never by failed ones, which change as the run goes
    # on): positions stay those of every page of the same search.
    one_host = next(iter(query.hosts)) if len(query.hosts) == 1 else None
    unreachable: set[str] = set()  # nodes whose read failed in this search: not asked again
    log.debug("run %s: a search of %s begins", run.id, run.owner)
    try:
        async for position, execution in listed(reader, run, token, one_host, query.task,
                                                limits.executions_page, stop):
            if hosts is not None and execution["host"] not in hosts:
                continue
            scan.begin(execution, position)
            await scan_stored(reader, run, execution["execution_id"], scan, stop)
            if not execution["archived"] and not scan.cut \
                    and execution["node"] not in unreachable:
                await scan_agent(reader, run, token, execution["execution_id"], scan,
                                 limits.output_page, stop, unreachable)
            if scan.cut:
                break
    except Stopped:
        scan.cut = True
        why = "its client went away" if stop.left.is_set() else "its time is up"
        log.info("run %s: a search of %s stops: %s", run.id, run.owner, why)
    scan.check_reached()
    log.debug("run %s: a search of %s found %d line(s)", run.id, run.owner, scan.count)
    return scan.answer()


async def listed(reader: RunReader, run: Run, token: str, host: str | None, task: str | None,
                 page: int, stop: Stop) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    """The run's executions with their positions, in the order the store lists them, page by
    page: the stored ones, then, after the agents were asked (which stores the executions
    only they know so far), those stored since. A position names the same execution in every
    search (rows are only ever added at the end), whatever order the agents list theirs in."""
    position, asked = 0, False
    while True:
        stop.check()
        start = position
        found, _, more = await stop.within(reader.executions(
            run, token, host=host, task=task, live=False, offset=position, limit=page))
        for execution in found:
            yield position, execution
            position += 1
        if more:
            continue
        if asked:
            return
        asked = True
        # A listing's last page asks the agents and registers what they add.
        await stop.within(reader.executions(run, token, host=host, task=task, offset=start,
                                            limit=page))


async def scan_stored(reader: RunReader, run: Run, execution_id: str, scan: Scan,
                      stop: Stop) -> None:
    """Scan what the store holds of one execution, a slice per call on its thread (the rest of
    a chunk a slice stopped in is matched on the loop, not decoded again)."""
    since = 0
    while not scan.cut:
        stop.check()
        scan.new_slice(SLICE_LINES, SLICE_CHARS)
        await reader.store.call("scan_output", run.owner, run.id, execution_id, scan.visit,
                                since=since)
        full, rest = scan.slice_full, scan.take_rest()
        if rest:
            await scan_events(scan, rest, stop)
        elif not full:  # the stored lines ended
            return
        if scan.next <= since:
            return
        since = scan.next


async def scan_events(scan: Scan, events: list[dict[str, Any]], stop: Stop) -> None:
    """Match events held in memory on the event loop, LOOP_SLICE_CHARS at a time, letting
    other work run between slices."""
    while events and not scan.cut:
        stop.check()
        scan.new_slice(SLICE_LINES, LOOP_SLICE_CHARS)
        scan.visit(events)
        events = scan.take_rest()
        if events:
            await asyncio.sleep(0)


async def scan_agent(reader: RunReader, run: Run, token: str, execution_id: str, scan: Scan,
                     page: int, stop: Stop, unreachable: set[str]) -> None:
    """Scan the lines of an execution not stored whole past what the store gave, a page at a
    time, as `GET /api/runs/ID/output` reads them (the store, then its agent; a node in
    `unreachable` is not asked, one whose read fails is added)."""
    since = scan.next
    while not scan.cut:
        stop.check()
        answer = await stop.within(reader.output(run, token, execution_id, since, page,
                                                 unreachable=unreachable))
        await scan_events(scan, answer["events"], stop)
        if answer["end"] or answer["next"] <= since:
            return
        since = answer["next"]
