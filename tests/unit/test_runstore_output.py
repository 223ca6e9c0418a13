"""The run store's output, kept as it happens and read in pages (controller/runstore/, schema
version 3), each behaviour on both stores (a SQLite file in a temp dir, a fresh database on
the run's PostgreSQL server): chunks, overlap and gaps, archiving, paging by lines across
chunks, the caps, owners, deletion; SQLite's migration from version 2 and a busy file."""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.runstore import (
    MAX_HOSTS,
    MAX_SEQ,
    MIGRATIONS,
    ExecutionRecord,
    Run,
    RunStore,
    RunStoreThread,
    SqliteRunStore,
    SqlRunStore,
    migrate,
)
from marco.errors import (
    BadRequest,
    DiskBudgetExhausted,
    InsufficientStorage,
    NotFound,
    TryAgain,
)
from tests.unit.test_runstore import (
    BACKENDS,
    T0,
    Backend,
    SqliteBackend,
    ended_run,
    make_run,
    noise,
    open_backend,
)

Line = tuple[int, str, str]  # (seq, stream, text) of one output line


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "runs.sqlite3"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return open_backend(request, tmp_path)


@pytest.fixture
def store(backend: Backend) -> Iterator[SqlRunStore]:
    opened = backend.open()
    yield opened
    opened.close()


@pytest.fixture
def run(store: SqlRunStore) -> Run:
    created = make_run()
    store.create(created)
    return created


def events_of(first: int, count: int, per_event: int = 3,
              stream: str = "stdout") -> list[dict[str, Any]]:
    """Agent output events holding lines first .. first+count-1, `per_event` lines each (the
    text of line N is "line N")."""
    events = []
    for seq in range(first, first + count, per_event):
        end = min(seq + per_event, first + count)
        events.append({"type": "output", "id": "e1", "seq": seq, "time": T0 + seq,
                       "stream": stream, "lines": [f"line {n}" for n in range(seq, end)]})
    return events


def flat(events: list[dict[str, Any]]) -> list[Line]:
    """Every line the events hold, with its seq and stream."""
    return [(event["seq"] + n, event["stream"], text)
            for event in events for n, text in enumerate(event["lines"])]


def add(store: SqlRunStore, run: Run, events: list[dict[str, Any]],
        execution_id: str = "e1", owner: str = "alice", **fields: Any) -> ExecutionRecord:
    fields.setdefault("host", "web1")
    fields.setdefault("node", "node1")
    fields.setdefault("task_id", "t1")
    return store.add_output(owner, run.id, execution_id=execution_id, events=events, **fields)


def chunk_count(backend: Backend, execution_id: str | None = None) -> int:
    """Chunk rows in the database (of one execution if given), read past the store."""
    if execution_id is None:
        return int(backend.rows("SELECT COUNT(*) FROM chunks")[0][0])
    return int(backend.rows("SELECT COUNT(*) FROM chunks WHERE execution_id = ?",
                            execution_id)[0][0])


def run_bytes(backend: Backend) -> dict[str, int]:
    return {row[0]: int(row[1]) for row in backend.rows("SELECT id, bytes FROM runs")}


# Storing


def test_the_store_is_a_run_store(store: SqlRunStore) -> None:
    typed: RunStore = store  # mypy checks the signatures against the interface
    assert typed is store


def test_overlapping_output_is_stored_once(store: SqlRunStore, run: Run, backend: Backend) -> None:
    """Collecting again from an older seq (a retry, a second trigger) adds only new lines."""
    record = add(store, run, events_of(0, 10))
    assert (record.next_seq, record.archived, record.node) == (10, False, "node1")
    size = run_bytes(backend)[run.id]

    record = add(store, run, events_of(0, 10))  # the same again: nothing new
    assert record.next_seq == 10 and chunk_count(backend) == 1 and run_bytes(backend)[run.id] == size

    record = add(store, run, events_of(5, 10))  # lines 5..14: an event overlaps next_seq
    assert record.next_seq == 15 and chunk_count(backend) == 2
    events, end = store.output_page("alice", run.id, "e1")
    assert flat(events) == flat(events_of(0, 15)) and end == 15
    assert [e["seq"] for e in events] == [0, 3, 6, 9, 10, 11, 14]  # 8..10 was cut to 10
    assert events[4]["time"] == T0 + 8 and events[4]["id"] == "e1"  # other keys kept


def test_a_gap_is_kept_as_a_gap(store: SqlRunStore, run: Run) -> None:
    """Lines the agent no longer has (truncated) leave a gap; pages skip it."""
    add(store, run, events_of(0, 5))
    record = add(store, run, events_of(20, 5), truncated_seq=5)
    assert (record.next_seq, record.truncated_seq) == (25, 5)
    events, end = store.output_page("alice", run.id, "e1")
    assert [seq for seq, _, _ in flat(events)] == [*range(5), *range(20, 25)] and end == 25
    events, end = store.output_page("alice", run.id, "e1", since=7)
    assert flat(events) == flat(events_of(20, 5)) and end == 25
    assert store.output_page("alice", run.id, "e1", since=25) == ([], 25)
    assert store.output_page("alice", run.id, "e1", since=99) == ([], 99)


def test_an_archived_execution_is_frozen(store: SqlRunStore, run: Run, backend: Backend) -> None:
    registered = add(store, run, [])
    assert registered == ExecutionRecord(host="web1", node="node1", execution_id="e1",
                                         task_id="t1", next_seq=0, archived=False,
                                         truncated_seq=None, bytes=0)
    stored = add(store, run, events_of(0, 4), archived=True, host="other", node="other",
                 task_id=None)  # names stay as first given
    assert (stored.host, stored.node, stored.task_id) == ("web1", "node1", "t1")
    assert stored.archived and stored.next_seq == 4 and stored.bytes > 0
    size = run_bytes(backend)[run.id]

    again = add(store, run, events_of(4, 6), archived=False, truncated_seq=1)
    assert again == stored and chunk_count(backend) == 1 and run_bytes(backend)[run.id] == size
    assert store.executions("alice", run.id) == [stored]


def test_an_ended_run_still_takes_output(store: SqlRunStore) -> None:
    ended = ended_run(store, "alice", T0)
    assert add(store, ended, events_of(0, 3), archived=True).next_seq == 3


def test_executions_are_listed_in_order_and_filtered(store: SqlRunStore, run: Run) -> None:
    add(store, run, [], "e3", host="db1", task_id="t2")
    add(store, run, events_of(0, 2), "e1", host="web1", task_id="t1")
    add(store, run, [], "e2", host="web1", task_id=None)
    add(store, run, events_of(2, 2), "e3")  # a later call does not move it
    assert [e.execution_id for e in store.executions("alice", run.id)] == ["e3", "e1", "e2"]
    assert [e.execution_id for e in store.executions("alice", run.id, host="web1")] \
        == ["e1", "e2"]
    assert [e.execution_id for e in store.executions("alice", run.id, task="t2")] == ["e3"]
    assert store.executions("alice", run.id, host="web1", task="t2") == []


def test_one_execution_by_id_and_by_node(store: SqlRunStore, run: Run) -> None:
    add(store, run, events_of(0, 2), "e1", node="node1")
    add(store, run, [], "e2", host="web1", node="delegate1")
    add(store, run, [], "e3", host="db1", node="node1", task_id="t2")
    found = store.execution("alice", run.id, "e2")
    assert found is not None and (found.node, found.host) == ("delegate1", "web1")
    assert store.execution("alice", run.id, "e9") is None
    assert [e.execution_id for e in store.executions("alice", run.id, node="node1")] \
        == ["e1", "e3"]
    assert [e.execution_id for e in store.executions("alice", run.id, node="node1",
                                                     task="t2")] == ["e3"]
    with pytest.raises(NotFound):  # another owner's run is a missing one
        store.execution("bob", run.id, "e1")
    assert [e.execution_id for e in store.executions("alice", run.id, offset=1, limit=1)] \
        == ["e2"]
    assert [e.execution_id for e in store.executions("alice", run.id, node="node1",
                                                     offset=1)] == ["e3"]
    assert store.executions("alice", run.id, offset=3) == []
    for bad in ({"offset": -1}, {"limit": 0}, {"offset": True}):
        with pytest.raises(BadRequest):
            store.executions("alice", run.id, **bad)


def test_filtered_listings_use_an_index(path: Path) -> None:
    """A node's, host's or task's executions are found by index, not by scanning the run
    (tens of thousands of executions each output page or final collection would read; in
    PostgreSQL: test_runstore_postgres.py)."""
    SqliteRunStore(path).close()
    run = make_run()
    with sqlite3.connect(path) as db:
        for column in ("node", "host", "task_id"):
            plan = " ".join(str(row[-1]) for row in db.execute(
                f"EXPLAIN QUERY PLAN SELECT * FROM outputs WHERE run_id = ? AND {column} = ? "
                "ORDER BY rowid", (run.id, "x")))
            assert f"outputs_by_{column.removesuffix('_id')}" in plan, plan


def test_a_runs_recorded_nodes(store: SqlRunStore, run: Run, backend: Backend) -> None:
    """Nodes beyond the run's hosts (delegates) are recorded once each, charged, at most
    MAX_HOSTS per run (a 400 beyond, nothing recorded), and go with the run."""
    assert store.nodes("alice", run.id) == []
    before = run_bytes(backend)[run.id]
    store.add_nodes("alice", run.id, ["d1", "d2", "d1"])
    store.add_nodes("alice", run.id, ["d2", "d3"])
    assert store.nodes("alice", run.id) == ["d1", "d2", "d3"]
    assert run_bytes(backend)[run.id] - before == 6
    with pytest.raises(NotFound):
        store.add_nodes("bob", run.id, ["d4"])
    with pytest.raises(NotFound):
        store.nodes("bob", run.id)
    with pytest.raises(BadRequest):
        store.add_nodes("alice", run.id, [""])
    store.add_nodes("alice", run.id, [f"n{n}" for n in range(MAX_HOSTS - 3)])
    with pytest.raises(BadRequest):  # one more than MAX_HOSTS: none of them is recorded
        store.add_nodes("alice", run.id, ["d1", "x1", "x2"])
    assert len(store.nodes("alice", run.id)) == MAX_HOSTS
    store.add_nodes("alice", run.id, ["d1"])  # known ones still pass
    store.update("alice", run.id, status="ok", ended=T0 + 1)
    assert store.prune(T0 + 91 * 86400) == 1  # past the default retention of 90 days
    assert backend.rows("SELECT COUNT(*) FROM nodes") == [(0,)]


# Reading pages


def test_pages_cross_chunks_and_count_lines(store: SqlRunStore, run: Run) -> None:
    """Any page equals the same slice of all the lines, whatever chunks and events hold them;
    following `next` reads every line once."""
    rng = random.Random(12)
    everything: list[dict[str, Any]] = []
    seq = 0
    for _ in range(30):  # chunks of 1 to 60 lines in events of 1 to 7, both streams
        count = rng.randint(1, 60)
        events = events_of(seq, count, rng.randint(1, 7), rng.choice(["stdout", "stderr"]))
        add(store, run, events)
        everything += events
        seq += count
    lines = flat(everything)
    for since in [0, 1, 2, 59, 60, 61, seq // 2, seq - 1, seq, seq + 5]:
        for limit in [1, 2, 3, 7, 50, 61, 500, 100_000]:
            events, end = store.output_page("alice", run.id, "e1", since, limit)
            expected = lines[since:since + limit]
            assert flat(events) == expected
            assert end == (expected[-1][0] + 1 if expected else since)
            assert all(event["lines"] for event in events)

    read: list[Line] = []
    since = 0
    while True:
        events, since = store.output_page("alice", run.id, "e1", since, 37)
        if not events:
            break
        read += flat(events)
    assert read == lines


def test_a_page_is_cut_inside_an_event(store: SqlRunStore, run: Run) -> None:
    add(store, run, [{"seq": 0, "stream": "stdout", "lines": ["a", "b", "c", "d", "e"]}])
    events, end = store.output_page("alice", run.id, "e1", since=1, limit=3)
    assert events == [{"seq": 1, "stream": "stdout", "lines": ["b", "c", "d"]}] and end == 4


def test_bad_page_arguments_are_refused(store: SqlRunStore, run: Run) -> None:
    add(store, run, events_of(0, 3))
    for since, limit in [(-1, 10), (0, 0), (0, 100_001), (True, 10), (0, 2.5), ("0", 10)]:
        with pytest.raises(BadRequest):
            store.output_page("alice", run.id, "e1", since, limit)  # type: ignore[arg-type]
    store.output_page("alice", run.id, "e1", 0, 100_000)


def test_events_since_and_limit(store: SqlRunStore, run: Run) -> None:
    store.append_events("alice", run.id, [{"type": "x", "n": n} for n in range(10)])
    assert [e["n"] for e in store.events("alice", run.id, since=3, limit=4)] == [3, 4, 5, 6]
    assert [e["seq"] for e in store.events("alice", run.id, since=8, limit=4)] == [9, 10]
    assert len(store.events("alice", run.id)) == 10
    for bad in (0, -1, True, 100_001):
        with pytest.raises(BadRequest):
            store.events("alice", run.id, limit=bad)


def test_a_page_of_events_is_bounded_by_count_and_bytes(store: SqlRunStore, run: Run) -> None:
    """5,000 events of 64 KiB would be 320 MiB in one answer: a page stops at `max_bytes`
    (type and body as stored), always giving one event, and says more follow."""
    store.append_events("alice", run.id, [{"type": "x", "pad": "p" * 1000} for _ in range(10)])
    size = len("x") + len(json.dumps({"pad": "p" * 1000}, separators=(",", ":")))
    events, more = store.events_page("alice", run.id, 0, 100, max_bytes=3 * size)
    assert [e["seq"] for e in events] == [1, 2, 3] and more
    events, more = store.events_page("alice", run.id, 3, 100, max_bytes=3 * size + 1)
    assert [e["seq"] for e in events] == [4, 5, 6] and more
    events, more = store.events_page("alice", run.id, 0, 4, max_bytes=1 << 20)
    assert [e["seq"] for e in events] == [1, 2, 3, 4] and more
    events, more = store.events_page("alice", run.id, 6, 4, max_bytes=1 << 20)
    assert [e["seq"] for e in events] == [7, 8, 9, 10] and not more
    events, more = store.events_page("alice", run.id, 8, 100, max_bytes=1)  # one, whatever
    assert [e["seq"] for e in events] == [9] and more
    assert store.events_page("alice", run.id, 10, 100, max_bytes=1) == ([], False)
    assert events[0] == store.events("alice", run.id, since=8, limit=1)[0]
    for bad in (0, True, 100_001):
        with pytest.raises(BadRequest):
            store.events_page("alice", run.id, 0, bad, max_bytes=100)
    with pytest.raises(NotFound):
        store.events_page("bob", run.id, 0, 10, max_bytes=100)


def test_a_seq_beyond_sqlites_integers_is_a_bad_request(store: SqlRunStore,
                                                        run: Run) -> None:
    """Not an OverflowError (a 500) from SQLite."""
    add(store, run, events_of(0, 3))
    store.append_events("alice", run.id, [{"type": "x"}])
    assert store.events("alice", run.id, since=MAX_SEQ) == []
    assert store.output_page("alice", run.id, "e1", MAX_SEQ, 10) == ([], MAX_SEQ)
    for call in (lambda: store.events("alice", run.id, since=MAX_SEQ + 1),
                 lambda: store.events_page("alice", run.id, MAX_SEQ + 1, 10, 100),
                 lambda: store.output_page("alice", run.id, "e1", MAX_SEQ + 1, 10)):
        with pytest.raises(BadRequest):
            call()


# Owners, limits, deletion


def test_another_owner_or_run_sees_no_output(store: SqlRunStore, run: Run) -> None:
    add(store, run, events_of(0, 3))
    store.mark_swept("alice", run.id, "node1")
    other = make_run()
    store.create(other)
    for call in (lambda: add(store, run, events_of(3, 1), owner="bob"),
                 lambda: store.executions("bob", run.id),
                 lambda: store.output_page("bob", run.id, "e1"),
                 lambda: store.output_page("alice", other.id, "e1"),  # not that run's
                 lambda: store.output_page("alice", run.id, "e9"),
                 lambda: store.output_page("alice", "nonsense", "e1"),
                 lambda: store.mark_swept("bob", run.id, "node2"),
                 lambda: store.swept("bob", run.id)):
        with pytest.raises(NotFound):
            call()
    assert store.executions("alice", run.id)[0].next_seq == 3
    assert store.swept("alice", run.id) == {"node1"}


def test_swept_nodes(store: SqlRunStore, run: Run) -> None:
    assert store.swept("alice", run.id) == set()
    store.mark_swept("alice", run.id, "node1")
    store.mark_swept("alice", run.id, "node1")
    store.mark_swept("alice", run.id, "node2")
    assert store.swept("alice", run.id) == {"node1", "node2"}
    with pytest.raises(BadRequest):
        store.mark_swept("alice", run.id, "")


def noisy(first: int, count: int, seed: int) -> list[dict[str, Any]]:
    """Output zlib cannot shrink much: `count` lines of 4,000 random hex characters (about
    2,300 bytes each compressed)."""
    return [{"seq": first, "stream": "stdout",
             "lines": [noise(2000, seed * 1000 + n) for n in range(count)]}]


def test_output_is_charged_and_over_a_cap_nothing_is_stored(backend: Backend) -> None:
    store = backend.open(max_bytes_per_user=35_000, max_bytes=40_000)
    run = make_run()
    store.create(run)
    before = run_bytes(backend)[run.id]
    record = add(store, run, noisy(0, 5, 1))  # about 12 kB
    assert run_bytes(backend)[run.id] - before >= record.bytes > 9_000

    with pytest.raises(DiskBudgetExhausted):
        add(store, run, noisy(5, 14, 2))
    with pytest.raises(DiskBudgetExhausted):  # a new execution is not even registered
        add(store, run, noisy(0, 14, 3), "e2")
    assert store.executions("alice", run.id) == [record] and chunk_count(backend) == 1

    bobs = make_run("bob")
    store.create(bobs)
    add(store, bobs, noisy(0, 10, 4), owner="bob")  # 23 kB
    with pytest.raises(InsufficientStorage) as refused:  # bob's cap would hold, not the total
        add(store, bobs, noisy(0, 4, 5), "e2", owner="bob")
    assert refused.value.status == 507 and not isinstance(refused.value, DiskBudgetExhausted)
    assert [e.execution_id for e in store.executions("bob", bobs.id)] == ["e1"]
    store.close()


def test_a_deleted_run_takes_its_chunks_and_swept_rows(backend: Backend) -> None:
    store = backend.open(max_bytes_per_user=40_000, retention_days=1)
    old = ended_run(store, "alice", T0)
    for n in range(3):
        add(store, old, noisy(n * 5, 5, n))
    store.mark_swept("alice", old.id, "node1")
    assert chunk_count(backend) == 3

    run = make_run(started=T0 + 10)
    store.create(run)
    add(store, run, noisy(0, 12, 9))  # does not fit beside `old`: old goes, bytes come back
    assert set(run_bytes(backend)) == {run.id} and chunk_count(backend) == 1
    assert backend.rows("SELECT COUNT(*) FROM swept") == [(0,)]
    assert backend.rows("SELECT COUNT(*) FROM outputs") == [(1,)]

    store.mark_swept("alice", run.id, "node1")
    store.update("alice", run.id, status="ok", ended=T0 + 11)
    assert store.prune(T0 + 5 * 86400) == 1
    assert chunk_count(backend) == 0 and run_bytes(backend) == {}
    assert backend.rows("SELECT COUNT(*) FROM swept") == [(0,)]
    again = make_run(started=T0 + 20)
    store.create(again)
    add(store, again, noisy(0, 15, 10))  # the whole cap is free again
    store.close()


# Migration 3


def version_2_file(path: Path, outputs: list[tuple[str, str, list[Any]]]) -> Run:
    """A file as Marco with schema version 2 left it: one ended run of alice's holding
    `outputs` (execution id, host, events) stored whole, the run's bytes charged."""
    run = make_run(ended=T0 + 5, status="ok")
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    assert migrate(db, path, MIGRATIONS[:2]) == 2
    db.execute("INSERT INTO runs (id, owner, kind, title, hosts, started, ended, status, stats, "
               "meta, bytes, last_activity) VALUES (?, 'alice', 'command', 'echo', '[]', ?, ?, "
               "'ok', '{}', '{}', 100, ?)", (run.id, T0, T0 + 5, T0))
    for execution_id, host, events in outputs:
        text = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in events)
        data = zlib.compress(text.encode("utf-8", "surrogatepass"), 6)
        db.execute("INSERT INTO outputs (run_id, execution_id, host, task_id, archived, bytes, "
                   "data) VALUES (?, ?, ?, 't1', 1, ?, ?)",
                   (run.id, execution_id, host, len(data), data))
        db.execute("UPDATE runs SET bytes = bytes + ? WHERE id = ?", (len(data), run.id))
    db.close()
    return run


def test_a_version_2_file_gives_the_same_output_back(path: Path) -> None:
    events = events_of(0, 40, 7) + events_of(50, 3)
    run = version_2_file(path, [("e1", "web1", events), ("e2", "web2", [])])
    sqlite = SqliteBackend(path)
    charged = run_bytes(sqlite)[run.id]

    store = SqliteRunStore(path)
    assert store.output_page("alice", run.id, "e1", 0, 1000) == (events, 53)
    assert store.output_page("alice", run.id, "e1", 38, 4) == (
        [{**events[5], "seq": 38, "lines": ["line 38", "line 39"]},
         {**events[6], "lines": ["line 50", "line 51"]}], 52)
    first, second = store.executions("alice", run.id)
    assert (first.host, first.node, first.next_seq, first.archived) == ("web1", "web1", 53, True)
    assert (second.execution_id, second.next_seq, second.bytes) == ("e2", 0, 0)
    empty = len(zlib.compress(b"", 6))  # e2's: it has no chunk, so nothing is charged for it
    assert run_bytes(sqlite)[run.id] == charged - empty  # e1's bytes are the same, in a chunk
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT SUM(LENGTH(data)) FROM outputs").fetchone()[0] == 0
        assert db.execute("SELECT SUM(bytes) FROM chunks").fetchone()[0] == first.bytes
    assert store.output_page("alice", run.id, "e1", 0, 100_000)[0] == events
    store.close()


def test_a_version_2_output_out_of_order_keeps_what_is_in_order(path: Path) -> None:
    bad = [{"seq": 0, "lines": ["a", "b"]}, {"no": "seq"}, {"seq": 1, "lines": ["x"]},
           {"seq": 2, "lines": ["c"]}]
    run = version_2_file(path, [("e1", "web1", bad)])
    store = SqliteRunStore(path)
    events, end = store.output_page("alice", run.id, "e1")
    assert events == [bad[0], bad[3]] and end == 3
    record = store.executions("alice", run.id)[0]
    assert run_bytes(SqliteBackend(path))[run.id] == 100 + record.bytes  # charged as stored now
    store.close()


# A busy file


def test_a_file_locked_by_another_process_is_try_again(path: Path) -> None:
    store = SqliteRunStore(path, busy_timeout=0.05)
    run = make_run()
    store.create(run)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the file
    for call in (lambda: add(store, run, events_of(0, 3)),
                 lambda: store.mark_swept("alice", run.id, "n1"),
                 lambda: store.append_events("alice", run.id, [{"type": "x"}])):
        with pytest.raises(TryAgain) as refused:
            call()
        assert refused.value.status == 503
    assert store.executions("alice", run.id) == []  # reads do not wait for writers (WAL)
    other.execute("ROLLBACK")
    assert add(store, run, events_of(0, 3)).next_seq == 3  # and it works once released
    store.close()

    other.execute("PRAGMA locking_mode = EXCLUSIVE")  # now it holds the file, readers too
    other.execute("BEGIN IMMEDIATE")
    other.execute("UPDATE runs SET title = 'x'")
    other.execute("COMMIT")
    with pytest.raises(TryAgain):
        SqliteRunStore(path, busy_timeout=0.05)
    other.close()
    SqliteRunStore(path, busy_timeout=0.05).close()


# The thread


def test_the_thread_serves_the_new_calls(backend: Backend) -> None:
    async def main() -> None:
        wrapper = RunStoreThread(backend.database, busy_timeout=0.5)
        try:
            run = make_run()
            await wrapper.call("create", run)
            await wrapper.call("add_output", "alice", run.id, host="h", node="n",
                               execution_id="e1", task_id=None, events=events_of(0, 4))
            assert (await wrapper.call("output_page", "alice", run.id, "e1", 2, 10))[1] == 4
            await wrapper.call("mark_swept", "alice", run.id, "n")
            assert await wrapper.call("swept", "alice", run.id) == {"n"}
            assert len(await wrapper.call("executions", "alice", run.id)) == 1
            assert (await wrapper.call("execution", "alice", run.id, "e1")).node == "n"
            await wrapper.call("add_nodes", "alice", run.id, ["d"])
            assert await wrapper.call("nodes", "alice", run.id) == ["d"]
        finally:
            wrapper.close()

    asyncio.run(main())
