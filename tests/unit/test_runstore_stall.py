"""A run store whose database stalls (issue 15, review 9 #1): a statement ends at the statement
timeout (PostgreSQL cancels it), calls waiting for the store's one thread are bounded (more are
TryAgain at once), and closing the store leaves the IOLoop free; a URL libpq cannot parse is
named masked."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

from controller.archive import RunKeeper
from controller.connector import AgentConnector
from controller.runstore import PostgresRunStore, RunStoreThread
from controller.runstore.postgres import WRITE_LOCK
from controller.shared_state import PostgresState, SharedLimits
from marco.errors import ConfigError, TryAgain
from marco.nodes import NodeRegistry
from tests.support.waiting import wait_for
from tests.unit.test_runstore import make_run


def test_a_statement_past_the_statement_timeout_ends_as_try_again(postgres_url: str) -> None:
    """A write waiting on another controller's lock with no lock timeout to speak of (an hour)
    still ends: the statement timeout cancels it."""
    store = PostgresRunStore(postgres_url, busy_timeout=3600, statement_timeout=0.3)
    run = make_run()
    store.create(run)
    outcome: list[Any] = []

    def write() -> None:
        try:
            outcome.append(store.mark_swept("alice", run.id, "n1"))
        except TryAgain as error:
            outcome.append(error)

    with psycopg.connect(postgres_url) as other:  # another controller, stalled mid-write
        other.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
        writer = threading.Thread(target=write)
        writer.start()
        try:
            wait_for(lambda: outcome, timeout=20, what="the write to be cancelled")
        finally:
            other.rollback()  # a write still waiting goes on and ends
            writer.join()
    assert isinstance(outcome[0], TryAgain) and outcome[0].status == 503
    store.close()


def test_calls_beyond_the_queue_are_try_again_at_once(tmp_path: Path) -> None:
    """The store's thread is held (as by a stalled database): `max_waiting` calls wait, the
    next is refused at once, and the waiting ones finish when the thread is free."""
    store = RunStoreThread(tmp_path / "runs.sqlite3", max_waiting=2)
    held = threading.Event()
    store._executor.submit(held.wait, 60)  # the thread is busy with a call that does not end

    async def scenario() -> list[Any]:
        waiting = [asyncio.ensure_future(store.call("get", "alice", f"r{n}")) for n in range(2)]
        await asyncio.sleep(0)  # both are queued on the thread now
        with pytest.raises(TryAgain) as refused:
            await store.call("get", "alice", "r3")
        assert refused.value.status == 503
        held.set()
        return await asyncio.gather(*waiting)

    try:
        assert asyncio.run(scenario()) == [None, None]
        assert store.waiting == 0
    finally:
        held.set()
        store.close()


def test_closing_the_run_keeper_leaves_the_loop_free(tmp_path: Path) -> None:
    """Closing waits for the store's thread (held here, as by a stalled database) off the
    loop: the loop still runs other work meanwhile."""
    store = RunStoreThread(tmp_path / "runs.sqlite3")
    keeper = RunKeeper(store, AgentConnector(None), NodeRegistry())
    held = threading.Event()
    blocker = store._executor.submit(held.wait, 20)  # True once set, False if it timed out

    async def scenario() -> None:
        closing = asyncio.ensure_future(keeper.close())

        async def other_work() -> None:  # runs only if the loop is not blocked in close()
            await asyncio.sleep(0)
            held.set()

        await asyncio.wait_for(asyncio.gather(closing, other_work()), timeout=20)

    try:
        asyncio.run(scenario())
        assert blocker.result() is True, "the loop was blocked while the store closed"
    finally:
        held.set()
        store.close()


BAD_ESCAPE = "postgresql://marco:s3cr%zzet@127.0.0.1:1/runs"  # %zz: not a percent-escape


def test_a_malformed_url_is_a_config_error_without_the_password() -> None:
    """libpq's parse error quotes the bad escape, in the password here (review 9 #5): the
    run store and the shared state say the URL is malformed, masked."""
    with pytest.raises(ConfigError, match="malformed") as refused:
        PostgresRunStore(BAD_ESCAPE)
    with pytest.raises(ConfigError, match="malformed") as shared:
        PostgresState(BAD_ESCAPE, SharedLimits(poll=1, listen=False, timeout=1,
                                               max_failures=3, window=60)).open()
    for error in (refused.value, shared.value):
        assert "zz" not in str(error) and "***" in str(error) and "%25" in (error.hint or "")
