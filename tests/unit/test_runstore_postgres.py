"""What only the PostgreSQL run store has (controller/runstore/postgres.py, pgschema.py), on a
fresh database of the run's real PostgreSQL server (tests/support/postgres.py): its schema
versions, connection errors, two stores (two controllers) writing one database at once, a
writer holding the lock, a dropped connection, its indexes and per-owner sums. Everything the
two stores share is checked on both in test_runstore.py and test_runstore_output.py."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from controller.runstore import (
    PostgresRunStore,
    Run,
    RunLimits,
    RunStore,
    RunStoreThread,
    run_database,
)
from controller.runstore.pgschema import MIGRATIONS, masked, migrate, schema_version
from controller.runstore.postgres import WRITE_LOCK
from marco.errors import ConfigError, DiskBudgetExhausted, TryAgain
from tests.support.postgres import PostgresServer
from tests.unit.test_runstore import T0, ended_run, make_run, noise, output

STORES_AT_ONCE = 2  # controllers sharing the database
CALLS_EACH = 40


@pytest.fixture
def store(postgres_url: str) -> Iterator[PostgresRunStore]:
    opened = PostgresRunStore(postgres_url)
    yield opened
    opened.close()


def query(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows of one statement past the store (its own connection, autocommit)."""
    with psycopg.connect(url, autocommit=True) as db:
        cursor = db.execute(sql, args or None)
        return [tuple(row) for row in cursor.fetchall()] if cursor.description else []


def test_the_store_is_a_run_store(store: PostgresRunStore) -> None:
    typed: RunStore = store  # mypy checks the signatures against the interface
    assert typed is store


# Schema versions


def test_a_new_database_gets_every_migration_and_reopening_changes_nothing(
        postgres_url: str) -> None:
    store = PostgresRunStore(postgres_url)
    run = ended_run(store, "alice", T0)
    store.close()
    assert query(postgres_url, "SELECT part, version FROM marco_schema") == [
        ("runs", len(MIGRATIONS))]
    store = PostgresRunStore(postgres_url)
    assert store.get("alice", run.id) == run
    store.close()


def test_migrations_apply_in_order_once(postgres_url: str) -> None:
    """A current database meets a code with one more version: it is applied once, data
    stays."""
    store = PostgresRunStore(postgres_url)
    run = ended_run(store, "alice", T0)
    store.close()
    v2 = ("ALTER TABLE runs ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0",
          "CREATE INDEX runs_pinned ON runs (pinned)")
    with psycopg.connect(postgres_url, autocommit=True) as db:
        assert migrate(db, "test", [*MIGRATIONS, v2]) == len(MIGRATIONS) + 1
        assert migrate(db, "test", [*MIGRATIONS, v2]) == len(MIGRATIONS) + 1  # a 2nd ALTER fails
        assert schema_version(db) == len(MIGRATIONS) + 1
        assert db.execute("SELECT id, pinned FROM runs").fetchall() == [(run.id, 0)]


def test_a_failing_migration_leaves_the_old_version(postgres_url: str) -> None:
    PostgresRunStore(postgres_url).close()
    broken = ("ALTER TABLE runs ADD COLUMN pinned INTEGER", "THIS IS NOT SQL")
    with psycopg.connect(postgres_url, autocommit=True) as db:
        with pytest.raises(psycopg.errors.SyntaxError):
            migrate(db, "test", [*MIGRATIONS, broken])
        assert schema_version(db) == len(MIGRATIONS)
        columns = [row[0] for row in db.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'runs'")]
        assert "pinned" not in columns and "bytes" in columns  # the DDL rolled back too


def test_a_newer_database_is_refused_clearly(postgres_url: str) -> None:
    PostgresRunStore(postgres_url).close()
    query(postgres_url, "UPDATE marco_schema SET version = 7 WHERE part = 'runs'")
    with pytest.raises(ConfigError, match="version 7") as refused:
        PostgresRunStore(postgres_url)
    assert refused.value.hint and "newer" in refused.value.hint


# Connecting


def test_a_server_that_refuses_or_is_not_there_is_a_config_error_without_the_password(
        postgres_server: PostgresServer, postgres_url: str) -> None:
    wrong = postgres_server.url(postgres_url.rsplit("/", 1)[1], password="not-the-password")
    with pytest.raises(ConfigError, match="unusable") as refused:
        PostgresRunStore(wrong)
    assert "not-the-password" not in str(refused.value) and "***" in str(refused.value)
    nobody = wrong.replace(f":{postgres_server.port}/", ":1/")  # nothing listens on port 1
    with pytest.raises(ConfigError):
        RunStoreThread(nobody)
    assert not [t for t in threading.enumerate() if t.name.startswith("runstore")]


def test_the_password_is_masked() -> None:
    assert masked("postgresql://marco:s3cret@db.example:5432/runs?sslmode=require") \
        == "postgresql://marco:***@db.example:5432/runs?sslmode=require"
    assert masked("postgresql://marco@db/runs") == "postgresql://marco@db/runs"
    assert "p@ss" not in masked("postgresql://marco:p@ss@db/runs")


def test_the_database_setting_picks_the_store(tmp_path: Path) -> None:
    assert run_database("", tmp_path) == tmp_path / "runs.sqlite3"
    assert run_database("mine.db", tmp_path) == tmp_path / "mine.db"
    assert run_database("/srv/runs.db", tmp_path) == Path("/srv/runs.db")
    assert run_database("sqlite:///srv/runs.db", tmp_path) == Path("/srv/runs.db")
    for url in ("postgresql://marco@db/runs", "postgres://marco@db/runs"):
        assert run_database(url, tmp_path) == url
    for bad in ("mysql://db/runs", "sqlite://runs.db"):
        with pytest.raises(ConfigError):
            run_database(bad, tmp_path)


def test_a_silent_server_is_given_up_on_unless_the_url_says_otherwise(postgres_url: str) -> None:
    """TCP keepalives and a TCP user timeout (libpq's) by default, so that a network cut
    with no reset ends a call instead of holding the store's thread; the URL's own win."""
    def options(store: PostgresRunStore) -> dict[str, bytes | None]:
        return {option.keyword.decode(): option.val
                for option in store._pg.get().pgconn.info}  # what libpq connected with

    store = PostgresRunStore(postgres_url)
    assert {key: options(store)[key] for key in ("keepalives_idle", "tcp_user_timeout",
                                                 "connect_timeout", "application_name")} \
        == {"keepalives_idle": b"10", "tcp_user_timeout": b"30000", "connect_timeout": b"10",
            "application_name": b"marco-controller"}
    store.close()
    store = PostgresRunStore(f"{postgres_url}?tcp_user_timeout=5000&application_name=mine")
    assert (options(store)["tcp_user_timeout"], options(store)["application_name"]) == (
        b"5000", b"mine")
    store.close()


def test_a_dropped_connection_is_try_again_then_opened_again(
        store: PostgresRunStore, postgres_server: PostgresServer, postgres_url: str) -> None:
    """The server ended the connection (a restart, a failover): the call in flight is a 503,
    the next one connects again."""
    run = make_run()
    store.create(run)
    database = postgres_url.rsplit("/", 1)[1]
    ended = query(postgres_server.url(user="postgres"),
                  "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                  "AND application_name = 'marco-controller'", database)
    assert ended == [(True,)]
    with pytest.raises(TryAgain) as refused:
        store.get("alice", run.id)
    assert refused.value.status == 503
    assert store.get("alice", run.id) == run


# Two controllers on one database


def test_a_writer_holding_the_lock_makes_writes_try_again_and_reads_go_on(
        postgres_url: str) -> None:
    store = PostgresRunStore(postgres_url, busy_timeout=0.05)
    run = make_run()
    store.create(run)
    with psycopg.connect(postgres_url) as other:  # another controller, mid-write
        other.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
        for call in (lambda: store.add_output("alice", run.id, **output("e1", ["x"])),
                     lambda: store.mark_swept("alice", run.id, "n1"),
                     lambda: store.append_events("alice", run.id, [{"type": "x"}])):
            with pytest.raises(TryAgain) as refused:
                call()
            assert refused.value.status == 503 and "busy" in refused.value.message
        assert store.get("alice", run.id) == run and store.executions("alice", run.id) == []
        other.rollback()
    assert store.add_output("alice", run.id, **output("e1", ["x"])).next_seq == 1
    store.close()


def side_by_side(work: Callable[[PostgresRunStore, int], None], url: str,
                 limits: RunLimits) -> None:
    """`work(store, n)` in STORES_AT_ONCE threads, each with a store of its own (as two
    controllers would have), started together; raises the first error any of them had."""
    stores = [PostgresRunStore(url, limits, busy_timeout=30) for _ in range(STORES_AT_ONCE)]
    start, errors = threading.Barrier(STORES_AT_ONCE), []

    def one(store: PostgresRunStore, n: int) -> None:
        start.wait()
        try:
            work(store, n)
        except BaseException as error:  # reported below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=one, args=(store, n)) for n, store in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for store in stores:
        store.close()
    assert not any(thread.is_alive() for thread in threads)
    if errors:
        raise errors[0]


def test_two_stores_appending_to_one_run_give_each_event_its_own_seq(postgres_url: str) -> None:
    store = PostgresRunStore(postgres_url)
    run = make_run()
    store.create(run)

    def append(writer: PostgresRunStore, n: int) -> None:
        for call in range(CALLS_EACH):
            writer.append_events("alice", run.id, [{"type": "x", "by": n, "call": call}] * 3)

    side_by_side(append, postgres_url, RunLimits())
    events = store.events("alice", run.id)
    assert [event["seq"] for event in events] == list(range(1, STORES_AT_ONCE * CALLS_EACH * 3 + 1))
    for n in range(STORES_AT_ONCE):  # each writer's events in its own order
        calls = [event["call"] for event in events if event["by"] == n]
        assert calls == sorted(calls) and len(calls) == CALLS_EACH * 3
    store.close()


def test_two_stores_writing_at_once_keep_the_users_byte_cap(postgres_url: str) -> None:
    """Both fill alice's cap with running runs (never pruned) at once: together they store no
    more than the cap, and the refused calls are DiskBudgetExhausted."""
    cap = 40_000  # about 17 outputs of 2,300 bytes, of the 2 x 40 tried
    store = PostgresRunStore(postgres_url)
    runs = [make_run(started=T0 + n) for n in range(STORES_AT_ONCE)]
    for run in runs:
        store.create(run)
    refused = [0] * STORES_AT_ONCE

    def fill(writer: PostgresRunStore, n: int) -> None:
        for call in range(CALLS_EACH):
            try:
                writer.add_output("alice", runs[n].id, **output(f"e{call}", [noise(2000, call)]))
            except DiskBudgetExhausted:
                refused[n] += 1

    side_by_side(fill, postgres_url, RunLimits(max_bytes_per_user=cap))
    [(stored,)] = query(postgres_url, "SELECT SUM(bytes) FROM runs WHERE owner = 'alice'")
    assert cap - 3000 < stored <= cap and all(refused)
    assert query(postgres_url, "SELECT bytes FROM owner_bytes WHERE owner = 'alice'") == [
        (stored,)]
    store.close()


# What PostgreSQL keeps


def test_the_owners_sums_follow_every_change(postgres_url: str) -> None:
    """owner_bytes (kept by a trigger) is what the runs hold, per owner, after creates,
    output, updates, deletion by the caps and pruning."""
    limits = RunLimits(max_bytes_per_user=10_000, retention_days=1)  # 2 outputs each
    capped = PostgresRunStore(postgres_url, limits)
    runs: list[Run] = []
    for n in range(6):
        runs.append(ended_run(capped, "alice" if n % 2 else "bob", T0 + n))
        capped.add_output(runs[-1].owner, runs[-1].id, **output("e", [noise(4000, n)]))
    capped.update("alice", runs[5].id, hosts=["n1", "n2", "n3"])
    assert len(query(postgres_url, "SELECT id FROM runs")) == 4  # the byte cap took 2
    assert capped.prune(T0 + 86400 + 3.5) == 1  # ended more than a day before: bob's 2nd
    sums = query(postgres_url, "SELECT owner, SUM(bytes)::bigint FROM runs GROUP BY owner")
    kept = query(postgres_url, "SELECT owner, bytes FROM owner_bytes WHERE bytes > 0")
    assert sorted(kept) == sorted(sums) and len(sums) == 2
    capped.prune(T0 + 30 * 86400)  # all went
    assert query(postgres_url, "SELECT owner, bytes FROM owner_bytes WHERE bytes <> 0") == []
    capped.close()


def test_filtered_listings_use_an_index(store: PostgresRunStore, postgres_url: str) -> None:
    """A node's, host's or task's executions are found by index, not by scanning the run (the
    planner is told to avoid scans: a test table is small enough that it would pick one)."""
    run = make_run()
    store.create(run)
    with psycopg.connect(postgres_url, autocommit=True) as db:
        db.execute("SET enable_seqscan = off")
        for column in ("node", "host", "task_id"):
            plan = " ".join(row[0] for row in db.execute(
                f"EXPLAIN SELECT * FROM outputs WHERE run_id = %s AND {column} = %s "
                "ORDER BY position", (run.id, "x")))
            assert f"outputs_by_{column.removesuffix('_id')}" in plan, plan
