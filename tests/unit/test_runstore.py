"""The run store (controller/runstore/), each behaviour on both stores: a real SQLite file in a
temp dir, and a fresh database on the run's real PostgreSQL server (tests/support/postgres.py).
Owner isolation, event order, output archiving, the limits and pruning, SQLite's schema
migrations (PostgreSQL's: test_runstore_postgres.py), and the thread wrapper an IOLoop uses."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import random
import sqlite3
import stat
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.runstore import (
    DEFAULT_BUSY_TIMEOUT,
    MAX_HOSTS,
    MIGRATIONS,
    PostgresRunStore,
    Run,
    RunLimits,
    RunStoreThread,
    SqliteRunStore,
    SqlRunStore,
    migrate,
    new_run_id,
    schema_version,
)
from controller.runstore.postgres import placeholders
from marco.errors import (
    BadRequest,
    ConfigError,
    Conflict,
    DiskBudgetExhausted,
    InsufficientStorage,
    NotFound,
    TooManyRuns,
)

T0 = 1_700_000_000.0
DAY = 86400.0
_serial = itertools.count()


def make_run(owner: str = "alice", started: float = T0, kind: str = "command",
             title: str = "echo hi", **fields: Any) -> Run:
    """A run whose id sorts by `started` (and, within a second, by creation order here)."""
    second = int(started) if math.isfinite(started) else 0
    run_id = f"r{second:08x}{next(_serial):012x}"
    fields.setdefault("hosts", ["n1"])
    return Run(id=run_id, owner=owner, kind=kind, title=title, started=started, **fields)


def ended_run(store: SqlRunStore, owner: str, started: float, **fields: Any) -> Run:
    run = make_run(owner, started, ended=started + 1, status="ok", **fields)
    store.create(run)
    return run


def noise(size: int, seed: int) -> str:
    """Text that zlib cannot shrink much (so stored sizes are predictable)."""
    return random.Random(seed).randbytes(size).hex()


def output(execution_id: str, lines: list[str], host: str = "n1",
           task_id: str | None = None) -> dict[str, Any]:
    """add_output's keywords for one whole execution's output (archived) on `host`."""
    events = [{"seq": 0, "time": T0, "stream": "stdout", "lines": lines}]
    return {"host": host, "node": host, "execution_id": execution_id, "task_id": task_id,
            "events": events, "archived": True}


class SqliteBackend:
    """Stores on one SQLite file, and that file read past the store."""

    name = "sqlite"

    def __init__(self, path: Path) -> None:
        self.database: Path | str = path
        self.path = path

    def open(self, busy_timeout: float = DEFAULT_BUSY_TIMEOUT, **limits: Any) -> SqlRunStore:
        return SqliteRunStore(self.path, RunLimits(**limits), busy_timeout)

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """The rows of one query past the store (`?` placeholders); a write is committed."""
        with closing(sqlite3.connect(self.path)) as db, db:
            return [tuple(row) for row in db.execute(sql, args).fetchall()]

    def clear(self) -> None:
        """Nothing stored any more (every store on it closed first)."""
        for name in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
            name.unlink(missing_ok=True)


class PostgresBackend:
    """Stores on one fresh PostgreSQL database, and that database read past the store."""

    name = "postgres"

    def __init__(self, url: str) -> None:
        self.database: Path | str = url
        self.url = url

    def open(self, busy_timeout: float = DEFAULT_BUSY_TIMEOUT, **limits: Any) -> SqlRunStore:
        return PostgresRunStore(self.url, RunLimits(**limits), busy_timeout)

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as db:
            cursor = db.execute(placeholders(sql), args)
            return [tuple(row) for row in cursor.fetchall()] if cursor.description else []

    def clear(self) -> None:
        self.rows("DO $$ BEGIN IF to_regclass('runs') IS NOT NULL THEN "
                  "TRUNCATE runs, owner_bytes CASCADE; END IF; END $$")


Backend = SqliteBackend | PostgresBackend
BACKENDS = ["sqlite", "postgres"]


def open_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """The store kind the test is parametrized with; PostgreSQL's server starts when first
    asked for, and each test has a fresh database."""
    if request.param == "postgres":
        return PostgresBackend(request.getfixturevalue("postgres_url"))
    return SqliteBackend(tmp_path / "runs.sqlite3")


def stored_ids(backend: Backend) -> set[str]:
    """The run ids in the database, read past the store (what is really stored)."""
    return {row[0] for row in backend.rows("SELECT id FROM runs")}


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


def open_store(path: Path, **limits: Any) -> SqliteRunStore:
    return SqliteRunStore(path, RunLimits(**limits))


# Runs


def test_new_run_ids_sort_by_start_second() -> None:
    first, second = new_run_id(T0), new_run_id(T0 + 1)
    assert len(first) == 21 and first.startswith("r") and first[1:9] == f"{int(T0):08x}"
    assert first < second and new_run_id(T0) != first


def test_created_run_reads_back(store: SqlRunStore) -> None:
    run = make_run(title="ansible-playbook site.yml -l web", kind="playbook",
                   meta={"playbook": "site.yml", "check": False, "note": "é ✓"})
    store.create(run)
    got = store.get("alice", run.id)
    assert got == run
    assert got.summary() == {"id": run.id, "owner": "alice", "kind": "playbook",
                             "title": "ansible-playbook site.yml -l web", "hosts": ["n1"],
                             "started": T0, "ended": None, "status": "running", "stats": {},
                             "meta": {"playbook": "site.yml", "check": False, "note": "é ✓"}}
    json.dumps(got.summary())
    with pytest.raises(Conflict):
        store.create(run)


def test_the_sqlite_file_is_private(path: Path) -> None:
    store = open_store(path)
    store.create(make_run())
    for name in (path, Path(f"{path}-wal")):
        assert stat.S_IMODE(name.stat().st_mode) == 0o600, name
    store.close()


def test_list_is_newest_first_filters_and_pages(store: SqlRunStore) -> None:
    specs = [("command", "ok", "echo one"), ("playbook", "failed", "ansible-playbook Site.yml"),
             ("shell", "running", "uptime"), ("deploy", "ok", "deploy app.tar 100%"),
             ("command", "failed", "false"), ("playbook", "running", "ansible-playbook db.yml")]
    runs = []
    for n, (kind, status, title) in enumerate(specs):
        ended = None if status == "running" else T0 + n + 0.5
        runs.append(make_run(started=T0 + n, kind=kind, title=title, status=status, ended=ended))
        store.create(runs[-1])
    ids = [run.id for run in reversed(runs)]

    assert [r.id for r in store.list("alice")[0]] == ids
    assert [r.title for r in store.list("alice", kind="playbook")[0]] == [
        "ansible-playbook db.yml", "ansible-playbook Site.yml"]
    assert [r.title for r in store.list("alice", status="failed")[0]] == [
        "false", "ansible-playbook Site.yml"]
    assert [r.title for r in store.list("alice", text="SITE")[0]] == ["ansible-playbook Site.yml"]
    assert [r.title for r in store.list("alice", text="0%")[0]] == ["deploy app.tar 100%"]
    assert store.list("alice", text="%")[0][0].title == "deploy app.tar 100%"  # not a wildcard
    assert [r.title for r in store.list("alice", kind="playbook", status="running")[0]] == [
        "ansible-playbook db.yml"]

    page, more = store.list("alice", limit=4)
    assert [r.id for r in page] == ids[:4] and more
    page, more = store.list("alice", limit=4, before=page[-1].id)
    assert [r.id for r in page] == ids[4:] and not more
    page, more = store.list("alice", limit=2, before=ids[3])
    assert [r.id for r in page] == ids[4:] and not more

    for bad in ({"kind": "cron"}, {"status": "lost"}, {"limit": 0}, {"limit": 1001},
                {"before": "x"}, {"text": "a" * 1001}):
        with pytest.raises(BadRequest):
            store.list("alice", **bad)


def test_another_owner_sees_nothing_of_a_run(store: SqlRunStore) -> None:
    run = make_run()
    store.create(run)
    store.append_events("alice", run.id, [{"type": "play_start", "play": "p"}])
    store.add_output("alice", run.id, **output("e1", ["secret"]))

    assert store.get("bob", run.id) is None and store.get("alice", "r" + "0" * 20) is None
    assert store.list("bob") == ([], False)
    for call in (lambda: store.append_events("bob", run.id, [{"type": "x"}]),
                 lambda: store.events("bob", run.id),
                 lambda: store.update("bob", run.id, status="ok"),
                 lambda: store.add_output("bob", run.id, **output("e2", ["x"])),
                 lambda: store.executions("bob", run.id),
                 lambda: store.events("alice", "nonsense")):
        with pytest.raises(NotFound):
            call()
    assert store.get("alice", run.id) == run  # bob changed nothing
    assert len(store.events("alice", run.id)) == 1 and len(store.executions("alice", run.id)) == 1


def test_a_nul_is_never_stored_and_looking_for_one_finds_nothing(store: SqlRunStore) -> None:
    """PostgreSQL's text cannot hold a NUL: both stores refuse one in any text stored as it is
    (BadRequest, in check_run and add_output's checks), and find nothing for one."""
    run = make_run()
    store.create(run)
    store.add_output("alice", run.id, **output("e1", ["a NUL \x00 in a line is JSON: fine"]))
    assert store.list("alice", text="\x00") == ([], False)
    assert store.execution("alice", run.id, "e1\x00") is None
    assert store.stored_ids("alice", run.id, ["e1", "e1\x00"]) == {"e1"}
    assert store.executions("alice", run.id, host="n1\x00") == []
    assert store.executions("alice", run.id, task="\x00") == []
    assert store.executions("alice", run.id, node="\x00") == []
    with pytest.raises(NotFound):
        store.output_page("alice", run.id, "e1\x00")
    assert store.output_page("alice", run.id, "e1")[0][0]["lines"] == [
        "a NUL \x00 in a line is JSON: fine"]


def test_update_sets_what_is_given_and_a_final_status_ends_the_run(
        store: SqlRunStore) -> None:
    run = make_run()
    store.create(run)
    updated = store.update("alice", run.id, hosts=["n1", "n2"],
                           stats={"n1": {"ok": 2, "failed": 0}})
    assert updated.hosts == ["n1", "n2"] and updated.ended is None
    assert store.get("alice", run.id) == updated
    ended = store.update("alice", run.id, status="failed")
    assert ended.status == "failed" and ended.ended is not None and ended.hosts == ["n1", "n2"]
    with pytest.raises(Conflict):  # ended already: ending again is refused
        store.update("alice", run.id, ended=T0 + 5)
    with pytest.raises(Conflict):
        store.update("alice", run.id, status="running")
    for bad in ({"status": "lost"}, {"stats": {"n1": {"ok": "2"}}},
                {"hosts": "n1"}, {"ended": float("nan")}):
        with pytest.raises(BadRequest):
            store.update("alice", run.id, **bad)
    assert store.get("alice", run.id) == store.update("alice", run.id)


def test_bad_runs_are_refused(store: SqlRunStore) -> None:
    bads: list[dict[str, Any]] = [
        {"kind": "cron"}, {"status": "lost"}, {"title": "t" * 1001},
        {"meta": {"x": "m" * 16 * 1024}}, {"meta": ["not", "an", "object"]},
        {"hosts": ["ok", ""]}, {"owner": ""}, {"started": float("inf")},
        {"title": "a NUL \x00 in it"}, {"hosts": ["n\x00"]}]  # no text column holds a NUL
    for bad in bads:
        run = make_run(**bad)
        with pytest.raises(BadRequest):
            store.create(run)
    run = make_run()
    run.id = "r123"
    with pytest.raises(BadRequest):
        store.create(run)
    assert store.list("alice") == ([], False)
    store.create(make_run(title="t" * 1000, meta={"x": "m" * 16000}))  # at the limits: fine


def test_running_runs_are_capped_per_user(backend: Backend) -> None:
    store = backend.open(max_running_per_user=2)
    first, second = make_run(), make_run()
    store.create(first)
    store.create(second)
    with pytest.raises(TooManyRuns) as refused:
        store.create(make_run())
    assert refused.value.status == 429
    store.create(make_run("bob"))  # bob has his own count
    store.update("alice", first.id, status="ok")
    store.create(make_run())
    assert len(store.list("alice")[0]) == 3
    store.close()


# Events


def test_events_get_seq_in_order_and_since_reads_the_rest(store: SqlRunStore) -> None:
    run = make_run()
    store.create(run)
    assert store.events("alice", run.id) == []
    first: list[dict[str, Any]] = [{"type": "play_start", "play": "web", "play_id": "p1", "time": T0 + 1, "seq": 99},
             {"type": "task_start", "task": "ping", "task_id": "t1", "play_id": "p1"}]
    assert store.append_events("alice", run.id, first) == 3
    assert store.append_events("alice", run.id, []) == 3
    assert store.append_events("alice", run.id, [
        {"type": "host_result", "task_id": "t1", "host": "n1", "status": "ok", "msg": "pong ✓",
         "rc": None, "duration": 0.25, "time": T0 + 2}]) == 4
    events = store.events("alice", run.id)
    assert [(e["seq"], e["type"]) for e in events] == [
        (1, "play_start"), (2, "task_start"), (3, "host_result")]
    assert events[0] == {"seq": 1, "time": T0 + 1, "type": "play_start", "play": "web",
                         "play_id": "p1"}
    assert events[2]["msg"] == "pong ✓" and events[2]["rc"] is None
    assert isinstance(events[1]["time"], float)  # the store's clock when the sender gave none
    assert [e["seq"] for e in store.events("alice", run.id, since=1)] == [2, 3]
    assert store.events("alice", run.id, since=3) == []


def test_an_ended_run_refuses_events(store: SqlRunStore) -> None:
    run = make_run()
    store.create(run)
    store.append_events("alice", run.id, [{"type": "recap", "stats": {}}])
    store.update("alice", run.id, status="ok")
    with pytest.raises(Conflict):
        store.append_events("alice", run.id, [{"type": "task_start"}])
    assert len(store.events("alice", run.id)) == 1


@pytest.mark.parametrize("events", [  # each is refused as a whole
    [{"type": "ok"}, "not an object"],
    [{"type": "ok"}, {"no": "type"}],
    [{"type": "ok"}, {"type": 3}],
    [{"type": "ok"}, {"type": ""}],
    [{"type": "ok"}, {"type": "x\x00"}],
    [{"type": "ok"}, {"type": "x", "time": "now"}],
    [{"type": "ok"}, {"type": "x", "value": float("nan")}],
    [{"type": "ok"}, {"type": "x", "blob": "b" * 64 * 1024}],
    [{"type": "ok"}] * 1001,
], ids=["not-dict", "no-type", "type-not-str", "empty-type", "type-nul", "bad-time", "not-json",
        "too-big", "too-many"])
def test_bad_events_are_refused_and_none_is_stored(store: SqlRunStore,
                                                   events: list[dict[str, Any]]) -> None:
    run = make_run()
    store.create(run)
    with pytest.raises(BadRequest):
        store.append_events("alice", run.id, events)
    assert store.events("alice", run.id) == []
    assert store.append_events("alice", run.id, [{"type": "ok"}] * 1000) == 1001  # the limit


# Output


def test_outputs_round_trip_exactly_and_are_compressed(store: SqlRunStore,
                                                       backend: Backend) -> None:
    run = make_run()
    store.create(run)
    lines = ["plain", "naïve ✓ 日本語 😀", "tab\tand \\ and \" and \x00", "lone \udcff surrogate",
             ""]
    events = [{"seq": 0, "time": T0, "stream": "stdout", "lines": lines},
              {"seq": 5, "time": T0 + 0.5, "stream": "stderr",
               "lines": ["warning: é", "line\u2028sep \x85 \x1c \r"]}]  # no surrogate: not escaped
    store.add_output("alice", run.id, host="n1", node="n1", execution_id="e1", task_id="t1",
                     events=events, archived=True)
    store.add_output("alice", run.id, **output("e2", ["the same line, again and again"] * 5000,
                                               host="n2"))

    assert store.output_page("alice", run.id, "e1") == (events, 7)
    assert [e.execution_id for e in store.executions("alice", run.id)] == ["e1", "e2"]
    assert [e.execution_id for e in store.executions("alice", run.id, host="n2")] == ["e2"]
    assert store.executions("alice", run.id, host="n3") == []

    [(blob, size)] = backend.rows("SELECT data, bytes FROM chunks WHERE execution_id = 'e2'")
    as_json = len(json.dumps(output("e2", ["the same line, again and again"] * 5000)).encode())
    assert len(blob) == size and size * 20 < as_json
    assert store.executions("alice", run.id, host="n2")[0].bytes == size


def test_bad_output_is_refused(store: SqlRunStore) -> None:
    run = make_run()
    store.create(run)
    good: dict[str, Any] = {"host": "n1", "node": "n1", "execution_id": "e1", "task_id": None}
    line = {"seq": 0, "lines": ["x"]}
    for bad in ({**good, "host": "", "events": []}, {**good, "execution_id": "", "events": []},
                {**good, "node": "n" * 256, "events": []}, {**good, "events": ["line"]},
                {**good, "events": [{"x": float("inf")}]},
                {**good, "events": [{**line, "x": float("inf")}]},
                {**good, "events": [{"seq": -1, "lines": ["x"]}]},
                {**good, "events": [{"seq": True, "lines": ["x"]}]},
                {**good, "events": [{"seq": 0, "lines": [1]}]},
                {**good, "events": [{"seq": 3, "lines": ["x"]}, {"seq": 2, "lines": ["y"]}]},
                {**good, "events": [line], "truncated_seq": -1},
                {**good, "execution_id": "e\x00", "events": []},
                {**good, "task_id": "t\x00", "events": []}):
        with pytest.raises(BadRequest):
            store.add_output("alice", run.id, **bad)
    assert store.executions("alice", run.id) == []


def one_output_size(backend: Backend) -> int:
    """What one `noise(4000, n)` output takes stored (all of them take nearly the same),
    measured on the backend's database, emptied after."""
    probe = backend.open()
    run = make_run()
    probe.create(run)
    probe.add_output("alice", run.id, **output("e", [noise(4000, 0)]))
    [(size,)] = backend.rows("SELECT bytes FROM runs")
    probe.close()
    backend.clear()
    return int(size)


def test_per_user_byte_cap_prunes_their_oldest_ended_runs_never_a_running_one(
        backend: Backend) -> None:
    size = one_output_size(backend)
    store = backend.open(max_bytes_per_user=int(size * 3.5))
    running = make_run(started=T0)  # the oldest, but running: never pruned
    store.create(running)
    store.add_output("alice", running.id, **output("e0", [noise(4000, 1)]))
    old, newer = ended_run(store, "alice", T0 + 1), ended_run(store, "alice", T0 + 2)
    bobs = ended_run(store, "bob", T0 - 10)
    for n, run in enumerate((old, newer, bobs)):
        store.add_output(run.owner, run.id, **output(f"e{n + 1}", [noise(4000, n + 2)]))

    latest = ended_run(store, "alice", T0 + 3)
    store.add_output("alice", latest.id, **output("e9", [noise(4000, 9)]))
    assert stored_ids(backend) == {running.id, newer.id, latest.id, bobs.id}  # only `old` went

    store.add_output("alice", latest.id, **output("e10", [noise(4000, 10)]))  # its own run stays
    assert stored_ids(backend) == {running.id, latest.id, bobs.id}

    before = stored_ids(backend)
    with pytest.raises(DiskBudgetExhausted) as refused:
        store.add_output("alice", latest.id, **output("e11", [noise(8000, 11)]))
    assert refused.value.status == 507
    assert stored_ids(backend) == before and len(store.executions("alice", latest.id)) == 2
    store.close()


def test_a_runs_own_row_counts_against_the_byte_cap(backend: Backend) -> None:
    """Host lists, stats and meta are stored bytes too: huge ones cannot fill the disk."""
    store = backend.open(max_bytes_per_user=60_000)
    hosts = [f"host-{n:05d}" for n in range(1000)]  # about 13 kB as JSON
    runs = [ended_run(store, "alice", T0 + n, hosts=hosts) for n in range(8)]
    assert stored_ids(backend) <= {run.id for run in runs[-5:]}  # the oldest went to make room
    assert runs[-1].id in stored_ids(backend)
    with pytest.raises(DiskBudgetExhausted):  # alone larger than the cap
        store.create(make_run(hosts=[f"h{n:06d}" for n in range(MAX_HOSTS)]))
    running = make_run(started=T0 + 100)
    store.create(running)
    with pytest.raises(DiskBudgetExhausted):  # growing a run's hosts is charged too
        store.update("alice", running.id, hosts=[f"h{n:06d}" for n in range(MAX_HOSTS)])
    with pytest.raises(BadRequest, match="at most"):
        store.create(make_run(hosts=["h"] * (MAX_HOSTS + 1)))
    store.close()


def test_events_count_against_the_byte_cap(backend: Backend) -> None:
    store = backend.open(max_bytes_per_user=100_000)
    run = make_run()
    store.create(run)
    big = [{"type": "host_result", "result": noise(10_000, n)} for n in range(4)]
    store.append_events("alice", run.id, big)
    with pytest.raises(DiskBudgetExhausted):
        store.append_events("alice", run.id, big)
    assert len(store.events("alice", run.id)) == 4
    store.close()


def test_total_byte_cap_prunes_anyones_oldest_ended_runs(backend: Backend) -> None:
    size = one_output_size(backend)
    store = backend.open(max_bytes=int(size * 2.5))
    bobs_running = make_run("bob", T0 - 20)
    store.create(bobs_running)
    store.add_output("bob", bobs_running.id, **output("e0", [noise(4000, 0)]))
    bobs_old = ended_run(store, "bob", T0 - 10)
    store.add_output("bob", bobs_old.id, **output("e1", [noise(4000, 1)]))

    alices = ended_run(store, "alice", T0)
    store.add_output("alice", alices.id, **output("e2", [noise(4000, 2)]))
    assert stored_ids(backend) == {bobs_running.id, alices.id}

    with pytest.raises(InsufficientStorage) as refused:
        store.add_output("alice", alices.id, **output("e3", [noise(8000, 3)]))
    assert not isinstance(refused.value, DiskBudgetExhausted)
    assert stored_ids(backend) == {bobs_running.id, alices.id}
    store.close()


def test_a_refused_write_leaves_the_accounting_as_it_was(backend: Backend) -> None:
    """A create refused after it had pruned for `max_per_user` (the id exists) undoes the
    pruning: that run stays, and still counts (the next write over the cap prunes it)."""
    size = one_output_size(backend)
    store = backend.open(max_per_user=2, max_bytes_per_user=int(size * 2.5))
    old, latest = ended_run(store, "alice", T0), ended_run(store, "alice", T0 + 1)
    for n, run in enumerate((old, latest)):
        store.add_output("alice", run.id, **output(f"e{n}", [noise(4000, n)]))
    with pytest.raises(Conflict):
        store.create(latest)
    assert stored_ids(backend) == {old.id, latest.id}

    store.add_output("alice", latest.id, **output("e9", [noise(4000, 9)]))
    assert stored_ids(backend) == {latest.id}
    store.close()


# Pruning


def test_prune_removes_runs_ended_longer_ago_than_the_retention(backend: Backend) -> None:
    store = backend.open(retention_days=90)
    now = T0 + 200 * DAY
    gone = make_run(started=now - 92 * DAY)
    store.create(gone)
    store.append_events("alice", gone.id, [{"type": "play_start"}])
    store.add_output("alice", gone.id, **output("e1", ["old"]))
    store.update("alice", gone.id, status="ok", ended=now - 91 * DAY)
    kept = ended_run(store, "bob", now - 89 * DAY)
    running = make_run(started=T0)  # started long ago, still running
    store.create(running)
    assert store.prune(now) == 1
    assert stored_ids(backend) == {kept.id, running.id}
    # its events and outputs went with it
    assert backend.rows("SELECT COUNT(*) FROM events") == [(0,)]
    assert backend.rows("SELECT COUNT(*) FROM outputs") == [(0,)]
    assert store.prune(now) == 0
    store.close()


def test_prune_keeps_each_users_newest_max_per_user_runs(backend: Backend) -> None:
    store = backend.open(max_per_user=3)
    runs = [ended_run(store, "alice", T0 + n) for n in range(3)]
    running = make_run(started=T0 - 5)
    # a 4th, as if the limit had been higher before
    backend.rows("INSERT INTO runs (id, owner, kind, title, hosts, started, status, stats, meta)"
                 " VALUES (?, 'alice', 'command', '', '[]', ?, 'running', '{}', '{}')",
                 running.id, running.started)
    bobs = [ended_run(store, "bob", T0 + n) for n in range(2)]
    assert store.prune(T0) == 1
    assert stored_ids(backend) == {running.id, runs[1].id, runs[2].id} | {r.id for r in bobs}

    latest = make_run(started=T0 + 10)
    store.create(latest)  # creating beyond the cap drops the oldest ended run at once
    assert stored_ids(backend) == {running.id, runs[2].id, latest.id} | {r.id for r in bobs}
    store.close()


def test_prune_applies_lowered_byte_caps(backend: Backend) -> None:
    size = one_output_size(backend)
    store = backend.open()
    runs = [ended_run(store, "alice", T0 + n) for n in range(3)]
    for n, run in enumerate(runs):
        store.add_output("alice", run.id, **output(f"e{n}", [noise(4000, n)]))
    store.close()
    store = backend.open(max_bytes_per_user=int(size * 1.5))
    assert store.prune(T0) == 2 and stored_ids(backend) == {runs[2].id}
    store.close()


def test_pruned_runs_give_their_disk_back(path: Path) -> None:
    def file_size() -> int:
        with sqlite3.connect(path) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return path.stat().st_size

    store = open_store(path, retention_days=1)
    empty = file_size()  # the schema's own pages (tables, indexes)
    for n in range(5):
        run = ended_run(store, "alice", T0 + n)
        store.add_output("alice", run.id, **output("e", [noise(100_000, n)]))
    full = file_size()
    assert full - empty > 500_000
    assert store.prune(T0 + 10 * DAY) == 5
    assert file_size() - empty < (full - empty) // 10
    store.close()


def test_interrupt_running_ends_what_a_previous_process_left_running(backend: Backend) -> None:
    store = backend.open()
    running, done = make_run(), ended_run(store, "alice", T0 + 1)
    store.create(running)
    store.close()
    store = backend.open()
    assert store.interrupt_running(T0 + 60) == 1
    got = store.get("alice", running.id)
    assert got is not None and (got.status, got.ended) == ("interrupted", T0 + 60)
    assert store.get("alice", done.id) == done
    assert store.interrupt_running(T0 + 99) == 0
    store.close()


# Schema versions


def test_a_new_file_gets_every_migration_and_reopening_changes_nothing(path: Path) -> None:
    store = open_store(path)
    run = ended_run(store, "alice", T0)
    store.close()
    with sqlite3.connect(path) as db:
        assert schema_version(db) == len(MIGRATIONS)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store = open_store(path)
    assert store.get("alice", run.id) == run
    store.close()


def test_migrations_apply_in_order_once_from_an_older_file(path: Path) -> None:
    """A current file meets a code with one more version: it is applied once, data stays."""
    store = open_store(path)
    run = ended_run(store, "alice", T0)
    store.close()
    v2 = ("ALTER TABLE runs ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0",
          "CREATE INDEX runs_pinned ON runs (pinned)")
    with sqlite3.connect(path, isolation_level=None) as db:
        assert schema_version(db) == len(MIGRATIONS)
        assert migrate(db, path, [*MIGRATIONS, v2]) == len(MIGRATIONS) + 1
        # a second ALTER would fail
        assert migrate(db, path, [*MIGRATIONS, v2]) == len(MIGRATIONS) + 1
        assert schema_version(db) == len(MIGRATIONS) + 1
        assert db.execute("SELECT id, pinned FROM runs").fetchall() == [(run.id, 0)]


def test_a_failing_migration_leaves_the_old_version(path: Path) -> None:
    open_store(path).close()
    broken = ("ALTER TABLE runs ADD COLUMN pinned INTEGER", "THIS IS NOT SQL")
    with sqlite3.connect(path, isolation_level=None) as db:
        with pytest.raises(sqlite3.OperationalError):
            migrate(db, path, [*MIGRATIONS, broken])
        assert schema_version(db) == len(MIGRATIONS)
        columns = [row[1] for row in db.execute("PRAGMA table_info(runs)")]
        assert "pinned" not in columns


def test_a_newer_or_foreign_file_is_refused_clearly(path: Path) -> None:
    open_store(path).close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 7")
    with pytest.raises(ConfigError, match="version 7") as refused:
        open_store(path)
    assert refused.value.hint and "newer" in refused.value.hint
    other = path.with_name("other.sqlite3")
    other.write_bytes(b"not a database at all, " * 100)
    with pytest.raises(ConfigError, match="unusable"):
        open_store(other)


# The thread an IOLoop uses


def test_the_thread_wrapper_serves_an_asyncio_loop(backend: Backend) -> None:
    wrapper = RunStoreThread(backend.database, RunLimits(max_running_per_user=1))
    run = make_run()

    async def use() -> None:
        await wrapper.call("create", run)
        assert await wrapper.call("get", "alice", run.id) == run
        assert await wrapper.call("append_events", "alice", run.id, [{"type": "x"}]) == 2
        many = await asyncio.gather(*(wrapper.call("get", "alice", run.id) for _ in range(20)))
        assert many == [run] * 20
        assert (await wrapper.call("list", "alice", limit=10))[0] == [run]
        with pytest.raises(TooManyRuns):  # the store's typed errors come through
            await wrapper.call("create", make_run())
        with pytest.raises(AttributeError):
            await wrapper.call("_delete", [run.id])

    asyncio.run(use())
    if backend.name == "sqlite":
        with pytest.raises(sqlite3.ProgrammingError):  # the connection lives on its thread
            wrapper.store.get("alice", run.id)
    wrapper.close()
    wrapper.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("runstore")]


def test_the_thread_wrapper_reports_an_unusable_file(path: Path) -> None:
    path.write_bytes(b"garbage" * 1000)
    with pytest.raises(ConfigError):
        RunStoreThread(path)
    assert not [t for t in threading.enumerate() if t.name.startswith("runstore")]


# One property over any sequence of operations

OWNERS = ["alice", "bob", "carol"]
operations = st.lists(st.one_of(
    st.tuples(st.just("create"), st.sampled_from(OWNERS), st.integers(0, 5)),  # ties: often
    st.tuples(st.just("append"), st.sampled_from(OWNERS), st.integers(0, 30)),
    st.tuples(st.just("end"), st.sampled_from(OWNERS), st.integers(0, 30)),
    st.tuples(st.just("list"), st.sampled_from(OWNERS), st.integers(1, 5)),
), max_size=40)


@settings(max_examples=150, deadline=None, database=None,
          derandomize=os.environ.get("CI", "").lower() in ("1", "true", "yes"),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(operations)
def test_any_operations_keep_lists_newest_first_and_owners_apart(
        backend: Backend, ops: list[tuple[str, str, int]]) -> None:
    backend.clear()  # each example starts empty; the database is the test's
    store = backend.open(max_running_per_user=100)
    owned: dict[str, list[str]] = {owner: [] for owner in OWNERS}
    try:
        for op, owner, n in ops:
            apply(store, owned, op, owner, n)
            check(store, owned)
    finally:
        store.close()


def apply(store: SqlRunStore, owned: dict[str, list[str]], op: str, owner: str,
          n: int) -> None:
    """One operation; `append` and `end` act on any owner's run, as a forger would try."""
    every = [run_id for ids in owned.values() for run_id in ids]
    if op == "create":
        run = Run(id=new_run_id(T0 + n), owner=owner, kind="command", title=f"t{n}",
                  hosts=[], started=T0 + n)
        store.create(run)
        owned[owner].append(run.id)
    elif op == "list":
        page, more = store.list(owner, limit=n)
        rest, _ = store.list(owner, before=page[-1].id) if page else ([], False)
        assert [r.id for r in page + rest] == sorted(owned[owner], reverse=True)
        assert more == (len(owned[owner]) > n)
    elif every:
        run_id = every[n % len(every)]
        mine = run_id in owned[owner]
        try:
            if op == "append":
                store.append_events(owner, run_id, [{"type": "x", "n": n}])
            else:
                store.update(owner, run_id, status="ok", stats={"n1": {"ok": n}})
            assert mine
        except NotFound:
            assert not mine
        except Conflict:  # an ended run takes no events and does not end again
            assert mine


def check(store: SqlRunStore, owned: dict[str, list[str]]) -> None:
    for owner in OWNERS:
        runs, more = store.list(owner, limit=1000)
        assert [r.id for r in runs] == sorted(owned[owner], reverse=True) and not more
        assert all(r.owner == owner for r in runs)
        assert [int(r.started) for r in runs] == sorted((int(r.started) for r in runs),
                                                        reverse=True)


# Stale runs and racing ends (issue 12 review)


def test_a_running_run_idle_past_the_cutoff_ends_interrupted(backend: Backend) -> None:
    """Idle means no start and no events since the cutoff; events keep a run alive."""
    store = backend.open()
    idle, busy, done = make_run(started=T0), make_run(started=T0), ended_run(store, "alice", T0)
    store.create(idle)
    store.create(busy)
    store.append_events("alice", busy.id, [{"type": "task_start", "time": T0}])
    # busy's events arrived now (their own `time` says T0: arrival counts, not the claim)
    assert store.interrupt_stale(before=T0 + 100, now=T0 + 200) == 1
    got = store.get("alice", idle.id)
    assert got is not None and (got.status, got.ended) == ("interrupted", T0 + 200)
    kept = store.get("alice", busy.id)
    assert kept is not None and (kept.status, kept.ended) == ("running", None)
    assert store.get("alice", done.id) == done
    store.close()


def test_a_file_from_before_last_activity_counts_from_each_runs_start(path: Path) -> None:
    """The migration fills last_activity of existing runs with their start."""
    with sqlite3.connect(path, isolation_level=None) as db:
        migrate(db, path, MIGRATIONS[:1])
        run = make_run(started=T0)
        db.execute("INSERT INTO runs (id, owner, kind, title, hosts, started, ended, status, "
                   "stats, meta) VALUES (?, 'alice', 'command', 't', '[]', ?, NULL, "
                   "'running', '{}', '{}')", (run.id, T0))
    store = open_store(path)
    assert store.interrupt_stale(before=T0 - 1, now=T0 + 5) == 0
    assert store.interrupt_stale(before=T0 + 1, now=T0 + 5) == 1
    store.close()


def test_ending_an_ended_run_is_a_conflict_and_changes_nothing(store: SqlRunStore) -> None:
    run = make_run()
    store.create(run)
    first = store.update("alice", run.id, status="ok", ended=T0 + 5,
                         stats={"n1": {"ok": 1}})
    for second in ({"status": "interrupted"}, {"ended": T0 + 9},
                   {"status": "failed", "stats": {"n1": {"failed": 1}}}):
        with pytest.raises(Conflict):
            store.update("alice", run.id, **second)
    assert store.get("alice", run.id) == first
    # hosts may still be added to an ended run (they do not end it again)
    assert store.update("alice", run.id, hosts=["n1", "n2"]).hosts == ["n1", "n2"]


def test_of_two_ends_sent_at_once_exactly_one_wins(backend: Backend) -> None:
    """Two ends through the thread wrapper at once: one winner, one Conflict."""
    async def race() -> list[Any]:
        keeper = RunStoreThread(backend.database)
        try:
            run = make_run()
            await keeper.call("create", run)
            return list(await asyncio.gather(
                keeper.call("update", "alice", run.id, status="ok"),
                keeper.call("update", "alice", run.id, status="interrupted"),
                return_exceptions=True))
        finally:
            keeper.close()
    results = asyncio.run(race())
    assert sum(isinstance(r, Run) for r in results) == 1
    assert sum(isinstance(r, Conflict) for r in results) == 1
