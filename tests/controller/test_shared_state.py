"""controller/shared_state.py on a real PostgreSQL server: two `PostgresState`s on one
database stand for two controllers (each with its own connections, as two processes have)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from controller.auth import LoginRateLimiter
from controller.run_signals import RunSignals
from controller.shared_state import LocalState, PostgresState, SharedLimits, shared_state
from marco.errors import TooManyAttempts
from marco.revocations import token_digest

DIGEST = token_digest("a token of alice")
pytestmark = pytest.mark.timeout(60)


def limits(**changes: Any) -> SharedLimits:
    values: dict[str, Any] = dict(poll=0.2, listen=True, timeout=5.0, max_failures=3,
                                  window=60.0)
    values.update(changes)
    return SharedLimits(**values)


class Heard:
    """A SharedListener that keeps what it was told."""

    def __init__(self) -> None:
        self.revocations: dict[str, float] = {}
        self.denied: dict[str, float] = {}

    def reloaded(self, revocations: dict[str, float], denied: dict[str, float]) -> None:
        self.revocations.update(revocations)
        self.denied.update(denied)


async def until(predicate: Callable[[], Any], what: str, timeout: float = 10.0) -> None:
    """Wait (without blocking the loop) until `predicate()` holds, or fail saying `what`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def two_controllers(url: str, test: Callable[[PostgresState, PostgresState, Heard],
                                             Awaitable[None]], **changes: Any) -> None:
    """Run `test(a, b, what b heard)` with two shared states on `url`, both following."""

    async def main() -> None:
        a, b = PostgresState(url, limits(**changes)), PostgresState(url, limits(**changes))
        heard = Heard()
        for state in (a, b):
            state.open()
        a.follow(Heard())
        b.follow(heard)
        try:
            # Both listen and have read once since: a change now reaches them only as told.
            await until(lambda: all(s.reloads and (s.listening or not s.limits.listen)
                                    for s in (a, b)), "both to follow")
            await test(a, b, heard)
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


@pytest.mark.parametrize("listen", [True, False], ids=["listen", "poll"])
def test_a_logout_everywhere_on_one_reaches_the_other(postgres_url: str, listen: bool) -> None:
    async def test(a: PostgresState, b: PostgresState, heard: Heard) -> None:
        a.revocations.update({"alice": 1000.0})
        await a.share({"alice": 1000.0}, {})
        await until(lambda: b.revocations.not_before("alice") == 1000.0, "b to read it")
        assert heard.revocations == {"alice": 1000.0}  # pushed to b's nodes, pages checked

    # Listening: no poll within the test's time, so only the notification can tell b.
    two_controllers(postgres_url, test, listen=listen, poll=60.0 if listen else 0.2)


def test_a_plain_logout_on_one_voids_the_token_on_the_other(postgres_url: str) -> None:
    async def test(a: PostgresState, b: PostgresState, heard: Heard) -> None:
        until_ = time.time() + 600
        a.denied.update({DIGEST: until_})
        await a.share({}, {DIGEST: until_})
        await until(lambda: b.denied.denied("a token of alice"), "b to deny it")
        assert heard.denied == {DIGEST: until_}

    two_controllers(postgres_url, test, listen=True, poll=60.0)  # the notification, not a poll


def test_a_controller_started_later_reads_what_was_written(postgres_url: str) -> None:
    async def test(a: PostgresState, b: PostgresState, heard: Heard) -> None:
        await a.share({"bob": 2000.0}, {DIGEST: time.time() + 600})
        late = PostgresState(postgres_url, limits())
        await asyncio.to_thread(late.open)  # a controller's start-up blocks no one's loop
        assert late.revocations.not_before("bob") == 2000.0
        assert late.denied.denied("a token of alice")

    two_controllers(postgres_url, test)


def test_an_earlier_time_never_replaces_a_later_one(postgres_url: str) -> None:
    async def test(a: PostgresState, b: PostgresState, heard: Heard) -> None:
        await a.share({"alice": 3000.0}, {})
        await b.share({"alice": 2000.0}, {})
        await until(lambda: b.revocations.not_before("alice") == 3000.0, "b to take the later")
        late = PostgresState(postgres_url, limits())
        await asyncio.to_thread(late.open)
        assert late.revocations.not_before("alice") == 3000.0

    two_controllers(postgres_url, test)


def test_malformed_rows_are_ignored_the_others_still_read(postgres_url: str) -> None:
    """Anyone with the database's password can write rows: each is checked before use."""
    async def test(a: PostgresState, b: PostgresState, heard: Heard) -> None:
        with psycopg.connect(postgres_url, autocommit=True) as connection:
            connection.execute("INSERT INTO marco_revocations VALUES "
                               "('', 5, nextval('marco_shared_seq')), "
                               "('mallory', 'NaN', nextval('marco_shared_seq'))")
            connection.execute("INSERT INTO marco_denied_tokens VALUES "
                               "('not-a-digest', %s, nextval('marco_shared_seq'))",
                               (time.time() + 600,))
        await a.share({"alice": 1000.0}, {})
        await until(lambda: b.revocations.not_before("alice") == 1000.0, "b to read alice")
        assert b.revocations.table() == {"alice": 1000.0}
        assert b.denied.table() == {}

    two_controllers(postgres_url, test)


def test_failed_logins_on_one_lock_the_user_out_on_both(postgres_url: str) -> None:
    async def test(a: PostgresState, b: PostgresState, heard: Heard) -> None:
        keys = ("user:alice", "addr:10.0.0.1")
        for limiter in (a.limiter, b.limiter, a.limiter):  # 3 = max_failures, on both
            ticket = await limiter.reserve(keys)
            await limiter.release(ticket, failed=True)
        with pytest.raises(TooManyAttempts):
            await b.limiter.reserve(("user:alice", "addr:10.0.0.2"))
        with pytest.raises(TooManyAttempts):
            await a.limiter.reserve(("user:bob", "addr:10.0.0.1"))
        ticket = await b.limiter.reserve(("user:bob", "addr:10.0.0.2"))  # other keys: free
        await b.limiter.release(ticket, failed=False)

    two_controllers(postgres_url, test)


def test_attempts_still_at_pam_count_on_the_other_controller(postgres_url: str) -> None:
    """A burst of parallel guesses spread over both controllers cannot pass the limit."""
    async def test(a: PostgresState, b: PostgresState, heard: Heard) -> None:
        keys = ("user:alice", "addr:10.0.0.1")
        tickets = [await limiter.reserve(keys) for limiter in (a.limiter, b.limiter, a.limiter)]
        with pytest.raises(TooManyAttempts):
            await b.limiter.reserve(keys)
        for ticket in tickets:  # all three were right: nothing stays counted
            await a.limiter.release(ticket, failed=False)
        await b.limiter.release(await b.limiter.reserve(keys), failed=False)

    two_controllers(postgres_url, test)


def test_a_right_password_forgives_the_users_failures_everywhere(postgres_url: str) -> None:
    async def test(a: PostgresState, b: PostgresState, heard: Heard) -> None:
        for _ in range(2):
            await a.limiter.release(await a.limiter.reserve(("user:alice",)), failed=True)
        await b.limiter.forgive("user:alice")
        for _ in range(3):
            await a.limiter.release(await a.limiter.reserve(("user:alice",)), failed=True)
        with pytest.raises(TooManyAttempts):
            await b.limiter.reserve(("user:alice",))

    two_controllers(postgres_url, test)


def test_failures_older_than_the_window_no_longer_count(postgres_url: str) -> None:
    async def test(a: PostgresState, b: PostgresState, heard: Heard) -> None:
        await a.limiter.release(await a.limiter.reserve(("user:alice",)), failed=True)
        with pytest.raises(TooManyAttempts):
            await b.limiter.reserve(("user:alice",))
        with psycopg.connect(postgres_url, autocommit=True) as connection:  # a window ago
            connection.execute("UPDATE marco_login_attempts SET at = at - 61")
        await b.limiter.release(await b.limiter.reserve(("user:alice",)), failed=False)
        await a.limiter.sweep()
        with psycopg.connect(postgres_url, autocommit=True) as connection:
            left = connection.execute("SELECT count(*) FROM marco_login_attempts").fetchone()
        assert left == (0,)

    two_controllers(postgres_url, test, max_failures=1)


@pytest.mark.parametrize("listen", [True, False], ids=["listen", "poll"])
def test_a_run_changed_on_one_wakes_its_followers_on_the_other(postgres_url: str,
                                                                listen: bool) -> None:
    async def test(a: PostgresState, b: PostgresState, heard: Heard) -> None:
        here, there = RunSignals(4), RunSignals(4)
        a.attach_runs(here)
        b.attach_runs(there)
        # Listening first: b wakes every wait once when its LISTEN connection comes up.
        await until(lambda: not listen or b.listening, "b to listen")
        with there.waiter("alice", "run-1") as waiter:
            here.changed("run-1")
            await asyncio.wait_for(waiter.wait(60), 10)  # returns early only when woken
            assert "run-1" not in there._waiting

    # Listening: no poll within the test's time, so only the notification can wake it.
    two_controllers(postgres_url, test, listen=listen, poll=60.0 if listen else 0.5)


def test_a_database_that_does_not_answer_gets_the_revocation_later(
        postgres_url: str) -> None:
    """A logout while the connection is broken is kept and written once it works again."""
    async def test(a: PostgresState, b: PostgresState, heard: Heard) -> None:
        real = a.db.url
        a.db.url = real.replace("/marco_", "/missing_")  # connecting fails from now on
        await a.db.drop()
        await a.share({"alice": 1000.0}, {})  # logged, kept
        assert a._unsaved[0] == {"alice": 1000.0}
        a.db.url = real
        await until(lambda: b.revocations.not_before("alice") == 1000.0, "b to read it")

    two_controllers(postgres_url, test)


def test_a_logout_while_the_database_is_down_survives_a_restart(
        postgres_url: str, tmp_path: Path) -> None:
    """A plain logout and a log-out-everywhere while the database is down are journaled in the
    state dir; the controller restarts, the database answers again: the other controller
    refuses them (review 9 #3; before, they were in memory only and lost)."""
    until_expiry = time.time() + 3600

    async def down_then_restarted() -> None:
        a = PostgresState(postgres_url.replace("/marco_", "/missing_"), limits(), tmp_path)
        await a.share({"alice": 1000.0}, {DIGEST: until_expiry})  # logged, journaled
        await a.close()
        again = PostgresState(postgres_url, limits(), tmp_path)
        again.open()
        assert again.revocations.not_before("alice") == 1000.0 and again.denied.table()
        again.follow(Heard())
        b = PostgresState(postgres_url, limits())
        b.open()
        b.follow(Heard())
        try:
            await until(lambda: b.revocations.not_before("alice") == 1000.0
                        and DIGEST in b.denied.table(), "b to read both")
            await until(lambda: not (tmp_path / "unsaved-revocations.json").exists(),
                        "the journal to be emptied")
        finally:
            await again.close()
            await b.close()

    asyncio.run(down_then_restarted())


def test_a_lone_controllers_revocations_are_imported_once(
        postgres_url: str, tmp_path: Path) -> None:
    """Switching to a database: revocations.json and denied-tokens.json of the state dir go
    into it (review 9 #6; before, they were silently ignored)."""
    local = LocalState(tmp_path, LoginRateLimiter(3, 60.0))
    local.revocations.update({"alice": 1000.0})
    local.denied.update({DIGEST: time.time() + 3600})

    async def switched() -> None:
        a = PostgresState(postgres_url, limits(), tmp_path)
        a.open()
        a.follow(Heard())
        b = PostgresState(postgres_url, limits())
        b.open()
        b.follow(Heard())
        try:
            assert a.revocations.not_before("alice") == 1000.0
            await until(lambda: b.revocations.not_before("alice") == 1000.0
                        and DIGEST in b.denied.table(), "b to read both")
        finally:
            await a.close()
            await b.close()

    asyncio.run(switched())
    assert not (tmp_path / "revocations.json").exists()
    assert (tmp_path / "revocations.json.imported").exists()


def test_sqlite_selects_the_local_state(tmp_path: Path) -> None:
    local = shared_state(f"sqlite:///{tmp_path}/runs.sqlite3", tmp_path, limits())
    assert isinstance(local, LocalState)
    local.revocations.update({"alice": 1000.0})
    again = shared_state("", tmp_path, limits())
    again.open()
    assert again.revocations.not_before("alice") == 1000.0


def test_a_listener_whose_server_stops_answering_is_replaced(postgres_url: str) -> None:
    """The LISTEN connection's backend is stopped (SIGSTOP: it holds the socket and answers
    nothing, like a server cut off without a reset): the heartbeat notices, a new listener
    comes up (review 9 #7; before, it waited for notifications forever)."""
    import os
    import signal

    def listener_pids() -> list[int]:
        with psycopg.connect(postgres_url, autocommit=True) as db:
            rows = db.execute("SELECT pid FROM pg_stat_activity WHERE datname = "
                              "current_database() AND application_name = "
                              "'marco-controller-listen'").fetchall()
        return [int(row[0]) for row in rows]

    async def main() -> None:
        state = PostgresState(postgres_url, limits(heartbeat=0.3, timeout=1.0, poll=60.0))
        state.open()
        state.follow(Heard())
        stopped: list[int] = []
        try:
            await until(lambda: state.listening, "the listener")
            stopped = await asyncio.to_thread(listener_pids)
            assert len(stopped) == 1
            os.kill(stopped[0], signal.SIGSTOP)

            async def replaced() -> bool:
                pids = await asyncio.to_thread(listener_pids)
                return state.listening and bool(set(pids) - set(stopped))

            deadline = time.monotonic() + 20
            while not await replaced():
                assert time.monotonic() < deadline, "the stopped listener was not replaced"
                await asyncio.sleep(0.1)
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
            await state.close()

    asyncio.run(main())


def test_a_cutoff_on_a_controller_whose_clock_is_behind_voids_the_others_tokens(
        postgres_url: str, secret_file: Path) -> None:
    """This controller's clock runs 100 s behind the database's (and the other controller's):
    its "log out everywhere" cutoff still lies past a token the other issues now (review 9 #4:
    the cutoff is the later clock plus shared_clock_margin)."""
    from controller.connector import AgentConnector
    from controller.revoke import RevocationPusher
    from marco.nodes import NodeRegistry
    from marco.revocations import Revocations
    from marco.tokens import TokenSigner, load_secret

    async def main() -> None:
        behind = PostgresState(postgres_url, limits(clock_margin=2.0))
        behind.clock = lambda: time.time() - 100
        behind.open()
        try:
            signer = TokenSigner(load_secret(secret_file))
            pusher = RevocationPusher(Revocations(None), NodeRegistry(), signer,
                                      AgentConnector(None), shared=behind)
            answer = await pusher.revoke("alice")
            issued_elsewhere = int(time.time())  # a token's whole-second issue time, now
            assert answer["not_before"] > issued_elsewhere + 1  # void, with the margin
            assert behind.lead() >= 100
        finally:
            await behind.close()

    asyncio.run(main())
