"""controller/run_search.py's matcher and bounds (issue 13, review 6 findings 1, 2, 3, 7, 8,
13): a line is matched as the page shows it (`\\r`, `\\b`), counted with one search and looked
through only in its kept text, slices bounded in characters, lines held in memory matched
between awaits, a search's stop and deadline, the controller-wide bound on searches, and
cursors naming a position in the store's order, over a real store (no agents)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.connector import AgentConnector
from controller.run_output import RunReader
from controller.run_search import (
    LOOP_SLICE_CHARS,
    MAX_SPANS,
    SLICE_LINES,
    TEXT_CHARS,
    Place,
    Scan,
    SearchLimits,
    SearchQuery,
    SearchSlots,
    Stop,
    Stopped,
    overwrite,
    parse_cursor,
    scan_events,
    search_run,
    shown,
)
from controller.runstore import Run, RunStoreThread
from marco.errors import BadRequest, TooManySearches
from marco.nodes import NodeRegistry
from tests.unit.test_runstore import make_run


def output(seq: int, lines: list[str], stream: str = "stdout") -> dict[str, Any]:
    return {"type": "output", "seq": seq, "time": 1.0, "stream": stream, "lines": lines}


def scan_of(text: str, **fields: Any) -> Scan:
    limits = fields.pop("limits", SearchLimits())
    scan = Scan(SearchQuery(text, **fields), limits)
    scan.begin({"execution_id": "e1", "host": "web1", "task_id": None}, 0)
    return scan


def test_overwrite_is_the_pages() -> None:
    """The cases of ansi.js `overwrite`: `\\r` back to column 0, `\\b` one back (not past 0),
    what follows overwrites cell by cell and leaves the cells after it."""
    assert overwrite("10%\r55%\r100%") == "100%"
    assert overwrite("abc\rX") == "Xbc"
    assert overwrite("ab\bc") == "ac"
    assert overwrite("\b\bx") == "x"
    assert overwrite("abc\r\r") == "abc"
    assert overwrite("a\b\b\bb") == "b"
    assert overwrite("abcd\b\b\rX") == "Xbcd"
    assert overwrite("ab\r\bcdef") == "cdef"
    assert overwrite("héllo\b\b\u00e9\U0001f600") == "hél\u00e9\U0001f600"  # code points
    assert overwrite("plain") == "plain"
    assert shown("\x1b[31m10%\x1b[0m\r55%") == "55%"  # escapes first, then overwriting


def test_a_line_is_matched_as_shown() -> None:
    scan = scan_of("55%")
    scan.new_slice(SLICE_LINES, LOOP_SLICE_CHARS)
    scan.visit([output(0, ["10%\r55%\r100%", "abc\rX"])])
    assert scan.count == 0
    scan = scan_of("Xbc")
    scan.new_slice(SLICE_LINES, LOOP_SLICE_CHARS)
    scan.visit([output(0, ["10%\r55%\r100%", "abc\rX"])])
    assert [(hit["seq"], hit["text"], hit["at"]) for hit in scan.hits] == [(1, "Xbc", [[0, 3]])]


class Spy:
    """A compiled pattern that records how it is used (the work a line costs)."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        self.pattern = pattern
        self.searches = 0
        self.finditer_ends: list[int] = []

    def search(self, text: str) -> re.Match[str] | None:
        self.searches += 1
        return self.pattern.search(text)

    def finditer(self, text: str, pos: int = 0, endpos: int = -1) -> Iterator[re.Match[str]]:
        self.finditer_ends.append(min(endpos, len(text)) if endpos >= 0 else len(text))
        return self.pattern.finditer(text, pos, endpos if endpos >= 0 else len(text))


def test_a_line_costs_one_search_and_a_hit_its_kept_text() -> None:
    """Lines of 32,000 `a`, `q=a`: each line is counted with one search; a kept hit looks
    through its first 500 characters only, for at most 20 occurrences; lines only counted
    (past the page) are never looked through."""
    scan = scan_of("a", limit=2)
    spy = Spy(scan.pattern)
    scan.pattern = spy  # type: ignore[assignment]
    scan.new_slice(SLICE_LINES, 10**9)
    scan.visit([output(0, ["a" * 32_000] * 10)])
    assert scan.count == 10 and len(scan.hits) == 2 and scan.more
    assert spy.searches == 1 + 10  # the event's joined lines, then each line once
    assert spy.finditer_ends == [TEXT_CHARS, TEXT_CHARS]
    for hit in scan.hits:
        assert len(hit["at"]) == MAX_SPANS and hit["at"][0] == [0, 1]
        assert len(hit["text"]) == TEXT_CHARS
    # An occurrence starting in the kept text and reaching past it ends at 500.
    scan = scan_of("bc")
    scan.new_slice(SLICE_LINES, LOOP_SLICE_CHARS)
    scan.visit([output(0, ["x" * 499 + "bc" + "bc" * 10])])
    assert scan.hits[0]["at"] == [[499, 500]]


def test_a_slice_is_bounded_in_characters_and_keeps_the_rest() -> None:
    """A slice of 100 characters over lines of 30 stops after 4 lines (the line that crosses
    the bound is scanned whole), keeps the rest of the event and the events after it."""
    scan = scan_of("line")
    lines = [f"line {n:025d}" for n in range(10)]  # 30 characters each
    events = [output(0, lines[:6]), output(6, lines[6:])]
    scan.new_slice(SLICE_LINES, 100)
    assert scan.visit(events) is False
    assert (scan.count, scan.next, scan.slice_full) == (4, 4, True)
    rest = scan.take_rest()
    assert [(event["seq"], len(event["lines"])) for event in rest] == [(4, 2), (6, 4)]
    while rest:
        scan.new_slice(SLICE_LINES, 100)
        scan.visit(rest)
        rest = scan.take_rest()
    assert scan.count == 10 and [hit["seq"] for hit in scan.hits] == list(range(10))
    assert not scan.cut


def test_a_slice_counts_backspaces_and_returns_for_more() -> None:
    """Applying `\\r` and `\\b` is Python's work, not the regex engine's: a slice of 1,000
    characters takes one line of 10 `\\b` (20 characters), nine of 10 `\\r`, fifty plain ones
    (the line crossing the bound is taken whole), in events of 5 lines or in one of 100."""
    for line, per_slice in (("x\b" * 10, 1), ("x\r" * 10, 9), ("xy" * 10, 50)):
        for events in ([output(n, [line] * 5) for n in range(0, 100, 5)], [output(0, [line] * 100)]):
            scan = scan_of("q")
            scan.new_slice(SLICE_LINES, 1000)
            scan.visit(events)
            assert scan.next == per_slice, (line, len(events))


def test_a_search_stops_at_its_characters() -> None:
    scan = scan_of("x", limits=SearchLimits(chars=100))
    scan.new_slice(SLICE_LINES, LOOP_SLICE_CHARS)
    assert scan.visit([output(0, ["x" * 40] * 5)]) is False
    assert (scan.count, scan.cut, scan.rest) == (2, True, [])
    assert scan.answer()["complete"] is False


def test_lines_in_memory_are_matched_between_awaits() -> None:
    """An agent's page of 5,000,000 characters is matched in slices, the event loop running
    other work between them."""
    page = [output(n * 1000, ["y" * 1000] * 1000) for n in range(5)]  # 5,000,000 characters
    ticks = 0

    async def main() -> int:
        nonlocal ticks
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0)

        scan = scan_of("z")
        task = asyncio.ensure_future(ticker())
        await asyncio.sleep(0)  # the ticker runs once
        before = ticks
        await scan_events(scan, page, Stop(60))
        done.set()
        await task
        assert scan.next == 5000 and not scan.cut
        return ticks - before

    assert asyncio.run(main()) >= 5_000_000 // LOOP_SLICE_CHARS - 1


def test_a_stop_ends_a_wait_and_a_scan() -> None:
    async def main() -> None:
        never = asyncio.Event()
        stop = Stop(60)
        waiting = asyncio.ensure_future(never.wait())
        asyncio.get_running_loop().call_soon(stop.leave)
        with pytest.raises(Stopped):  # at once: 30 s is a hang's bound, never reached
            await asyncio.wait_for(stop.within(waiting), 30)
        assert not waiting.done()  # let go of, left to end by itself
        never.set()
        await waiting
        with pytest.raises(Stopped):
            await scan_events(scan_of("x"), [output(0, ["x"])], stop)
        with pytest.raises(Stopped):  # a deadline passed
            await Stop(0).within(asyncio.Event().wait())
        assert await Stop(60).within(asyncio.sleep(0, "done")) == "done"

    asyncio.run(main())


def test_searches_at_once_are_bounded_per_user_and_in_all() -> None:
    slots = SearchSlots(per_user=1, at_once=2)
    with slots.admit("alice"):
        with pytest.raises(TooManySearches, match="alice has 1"):
            with slots.admit("alice"):
                pass
        with slots.admit("bob"):
            with pytest.raises(TooManySearches, match="the controller has 2"):
                with slots.admit("carol"):
                    pass
        with slots.admit("carol"):  # bob's slot is back
            pass
    assert slots.held == 0


def test_cursors() -> None:
    place = Place(3, "e:1", 42)
    assert parse_cursor(str(place)) == place
    assert parse_cursor("") is None
    for bad in ("e1:5", "x:e1:5", "1::5", "1:e1:", "1:e1:x", "-1:e1:5", f"1:e1:{2**63}"):
        with pytest.raises(BadRequest):
            parse_cursor(bad)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RunStoreThread]:
    opened = RunStoreThread(tmp_path / "runs.sqlite3")
    yield opened
    opened.close()


def stored_run(store: RunStoreThread, executions: int) -> Run:
    """A run with archived executions e0, e1, ... each of 10 lines `eN line K`."""
    run = make_run()

    async def fill() -> None:
        await store.call("create", run)
        for index in range(executions):
            await store.call(
                "add_output", "alice", run.id, host="web1", node="node1",
                execution_id=f"e{index}", task_id=None, archived=True,
                events=[output(0, [f"e{index} line {n}" for n in range(10)])])

    asyncio.run(fill())
    return run


def search(store: RunStoreThread, run: Run, text: str, **fields: Any) -> dict[str, Any]:
    reader = RunReader(store, AgentConnector(None), NodeRegistry())
    return asyncio.run(search_run(reader, run, "no token", SearchQuery(text, **fields),
                                  SearchLimits()))


def test_pages_go_through_executions_by_position(store: RunStoreThread) -> None:
    run = stored_run(store, 3)
    every = search(store, run, "line 5")
    assert [hit["execution_id"] for hit in every["hits"]] == ["e0", "e1", "e2"]
    pages: list[list[str]] = []
    after = None
    while len(pages) < 5:
        answer = search(store, run, "line", limit=7, after=after)
        assert answer["count"] == 30
        pages.append([f"{hit['execution_id']}:{hit['seq']}" for hit in answer["hits"]])
        if answer["next"] is None:
            break
        after = parse_cursor(answer["next"])
    assert [len(page) for page in pages] == [7, 7, 7, 7, 2]
    assert [hit for page in pages for hit in page] == [
        f"e{e}:{n}" for e in range(3) for n in range(10)]
    assert pages[0][-1] == "e0:6" and search(store, run, "line", limit=7)["next"] == "0:e0:6"


def test_a_cursor_the_search_never_comes_to_is_a_bad_request(store: RunStoreThread) -> None:
    """Not an empty page while lines match: a place past the listing, or one whose position
    holds another execution."""
    run = stored_run(store, 2)
    for place in (Place(5, "e5", 0), Place(1, "e0", 3)):
        with pytest.raises(BadRequest, match="after"):
            search(store, run, "line", after=place)
    assert search(store, run, "line", after=Place(1, "e1", 8))["hits"][0]["seq"] == 9
