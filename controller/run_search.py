"""Searching a run's whole output (docs/runs.md, `GET /api/runs/ID/search`): literal text only
(a user's regular expression could pin the controller), matched on each line without its
terminal escapes, over every execution of the run in the order they are listed, each line in
seq order. What the store holds is scanned on the store's thread a chunk at a time, a slice of
lines per call (other calls on that thread go between); the lines of an execution not stored
yet are read from its agent through the read side, so a search works during a run. Bounded in
lines scanned; the answer counts every matching line found and gives a page of them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from marco.errors import BadRequest

from .run_output import RunReader, strip_ansi
from .runstore import MAX_SEQ, Run

log = logging.getLogger(__name__)

SLICE_LINES = 50_000  # lines one call on the store's thread scans at most
TEXT_CHARS = 500      # characters of a hit's line an answer gives
STREAMS = ("stdout", "stderr")


@dataclass(frozen=True)
class SearchLimits:
    """The search's settings (runs_search_*) and the read side's page sizes it reads by."""

    lines: int = 5_000_000          # lines one search scans at most
    executions_page: int = 5000     # executions listed per read
    output_page: int = 20_000       # lines per output page read from an agent


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
    after: tuple[str, int] | None = None  # (execution id, seq) of the last hit given


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


def cursor(execution_id: str, seq: int) -> str:
    """The `next` of an answer: where its last hit is."""
    return f"{execution_id}:{seq}"


def parse_cursor(text: str) -> tuple[str, int] | None:
    """An `after` argument (None when empty), else BadRequest."""
    if not text:
        return None
    execution_id, _, seq = text.rpartition(":")
    if not execution_id or not seq.isascii() or not seq.isdigit() or int(seq) > MAX_SEQ:
        raise BadRequest("'after' must be the 'next' of an earlier answer")
    return execution_id, int(seq)


def failed_hosts(run: Run) -> set[str]:
    """The hosts whose stats say failed or unreachable."""
    return {host for host, counts in run.stats.items()
            if counts.get("failed", 0) or counts.get("unreachable", 0)}


def hosts_to_search(run: Run, query: SearchQuery) -> frozenset[str] | None:
    """The hosts whose executions are searched (None: every one)."""
    if not query.failed:
        return query.hosts or None
    failed = failed_hosts(run)
    return frozenset(failed & query.hosts if query.hosts else failed)


class Scan:
    """One search's progress: the matching lines counted, the hits of the page asked for,
    the lines it may still scan, where it is in the execution being scanned."""

    def __init__(self, query: SearchQuery, lines: int) -> None:
        self.query = query
        flags = 0 if query.case_sensitive else re.IGNORECASE
        self.pattern = re.compile(re.escape(query.text), flags)  # escaped: literal text only
        self.count = 0
        self.hits: list[dict[str, Any]] = []
        self.more = False          # a matching line after the page's last hit
        self.lines_left = lines
        self.cut = False           # a line was left unscanned (runs_search_lines)
        self.slice_left = SLICE_LINES
        self.execution: dict[str, Any] = {}
        self.next = 0              # the seq after the last line scanned of this execution
        # Hits before the cursor are counted, not given: "before" its execution, "in" it,
        # "after" it (or no cursor).
        self.cursor_state = "before" if query.after is not None else "after"

    def begin(self, execution: dict[str, Any]) -> None:
        """Start scanning an execution (as the executions listing gives it)."""
        self.execution, self.next = execution, 0
        if self.cursor_state == "in":
            self.cursor_state = "after"
        after = self.query.after
        if after is not None and self.cursor_state == "before" \
                and execution["execution_id"] == after[0]:
            self.cursor_state = "in"

    def visit(self, events: list[dict[str, Any]]) -> bool:
        """Scan output events in seq order; False once this slice is done or a line is left
        unscanned (the store then stops reading chunks)."""
        for event in events:
            if self.slice_left <= 0:
                return False
            lines = event["lines"]
            take = min(len(lines), self.lines_left, self.slice_left)
            if take < len(lines) and take == self.lines_left:
                self.cut = True
            if take:
                self.lines_left -= take
                self.slice_left -= take
                self.next = int(event["seq"]) + take
                if self.query.stream is None or event.get("stream") == self.query.stream:
                    self.match(event, lines[:take] if take < len(lines) else lines)
            if self.cut:
                return False
        return self.slice_left > 0

    def match(self, event: dict[str, Any], lines: list[str]) -> None:
        """Count and keep the event's lines holding the text (one search over the event's
        lines joined first: most events hold none)."""
        texts = [strip_ansi(line) for line in lines]
        if self.pattern.search("\n".join(texts)) is None:  # the text holds no newline
            return
        for index, text in enumerate(texts):
            spans = [found.span() for found in self.pattern.finditer(text)]
            if spans:
                self.found(event, int(event["seq"]) + index, text, spans)

    def found(self, event: dict[str, Any], seq: int, text: str,
              spans: list[tuple[int, int]]) -> None:
        self.count += 1
        if self.cursor_state == "before" or (
                self.cursor_state == "in" and self.query.after is not None
                and seq <= self.query.after[1]):
            return
        if len(self.hits) >= self.query.limit:
            self.more = True
            return
        execution = self.execution
        self.hits.append({
            "execution_id": execution["execution_id"], "host": execution["host"],
            "task_id": execution["task_id"], "seq": seq, "stream": event.get("stream"),
            "time": event.get("time"), "text": text[:TEXT_CHARS],
            "at": [[start, min(end, TEXT_CHARS)] for start, end in spans
                   if start < TEXT_CHARS]})

    def answer(self) -> dict[str, Any]:
        last = self.hits[-1] if self.hits else None
        following = cursor(last["execution_id"], last["seq"]) if last and self.more else None
        return {"hits": self.hits, "count": self.count, "complete": not self.cut,
                "next": following}


async def search_run(reader: RunReader, run: Run, token: str, query: SearchQuery,
                     limits: SearchLimits) -> dict[str, Any]:
    """The answer of `GET /api/runs/ID/search` for the caller's run (token: the caller's, for
    what only the agents hold)."""
    scan = Scan(query, limits.lines)
    hosts = hosts_to_search(run, query)
    if hosts is not None and not hosts:
        return scan.answer()
    one_host = next(iter(hosts)) if hosts is not None and len(hosts) == 1 else None
    log.debug("run %s: a search of %s begins", run.id, run.owner)
    async for execution in listed(reader, run, token, one_host, query.task,
                                  limits.executions_page):
        if hosts is not None and execution["host"] not in hosts:
            continue
        scan.begin(execution)
        await scan_stored(reader, run, execution["execution_id"], scan)
        if not execution["archived"] and not scan.cut:
            await scan_agent(reader, run, token, execution["execution_id"], scan,
                             limits.output_page)
        if scan.cut:
            break
    log.debug("run %s: a search of %s found %d line(s)", run.id, run.owner, scan.count)
    return scan.answer()


async def listed(reader: RunReader, run: Run, token: str, host: str | None, task: str | None,
                 page: int) -> AsyncIterator[dict[str, Any]]:
    """The run's executions in the order `GET /api/runs/ID/executions` lists them (stored
    ones first, then those only their agents know so far), page by page."""
    offset, more = 0, True
    while more:
        found, _, more = await reader.executions(run, token, host=host, task=task,
                                                 offset=offset, limit=page)
        for execution in found:
            yield execution
        offset += len(found)


async def scan_stored(reader: RunReader, run: Run, execution_id: str, scan: Scan) -> None:
    """Scan what the store holds of one execution, a slice of lines per call on its thread."""
    since = 0
    while not scan.cut:
        scan.slice_left = SLICE_LINES
        await reader.store.call("scan_output", run.owner, run.id, execution_id, scan.visit,
                                since=since)
        if scan.slice_left > 0 or scan.next <= since:  # the stored lines ended
            return
        since = scan.next


async def scan_agent(reader: RunReader, run: Run, token: str, execution_id: str, scan: Scan,
                     page: int) -> None:
    """Scan the lines of an execution not stored whole past what the store gave, a page at a
    time, as `GET /api/runs/ID/output` reads them (the store, then its agent)."""
    since = scan.next
    while not scan.cut:
        answer = await reader.output(run, token, execution_id, since, page)
        scan.slice_left = page + 1  # no slices here: one page is in memory already
        scan.visit(answer["events"])
        if answer["end"] or answer["next"] <= since:
            return
        since = answer["next"]
