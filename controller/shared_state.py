"""What controllers on one database share besides the runs: users' "log out everywhere" times,
tokens voided by a plain logout, failed logins, and which runs just changed.

`LocalState` keeps them as a lone controller always did: the first two in JSON files in its
state dir (marco/revocations.py), failed logins in memory (controller/auth.py), run changes
within the process (controller/run_signals.py). `PostgresState` keeps them in tables of the
runs' PostgreSQL database: each controller holds the revocations in memory (a token is checked
on every request without a query), writes its own changes through, and reads what the others
wrote when told (LISTEN/NOTIFY) and every `shared_poll` seconds in any case. Failed logins are
counted in the database itself, so a lockout holds on every controller. Run changes go out as
notifications, which wake the requests following that run on the other controllers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from marco.atomic import write_atomic
from marco.errors import BadRequest, MarcoError, TooManyAttempts, TryAgain
from marco.revocations import DeniedTokens, Revocations

from .auth import LoginLimiter, LoginRateLimiter
from .run_signals import RunSignals
from .runstore.pgschema import CONNECTION_DEFAULTS, check_url

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)

SHARED_CHANNEL = "marco_shared"  # a revocation or denied token was written: read them again
RUNS_CHANNEL = "marco_runs"      # payload "<controller id> <run id>": that run changed
MAX_UNPUBLISHED_RUNS = 10_000    # run changes waiting to be published; beyond, others poll
MAX_RUN_ID = 200                 # longer notification payloads are not run ids: ignored
LOGIN_SWEEP_SECONDS = 60.0       # how often expired failed logins are deleted
JOURNAL = "unsaved-revocations.json"  # in the state dir: what the database has not taken yet
LOCAL_FILES = ("revocations.json", "denied-tokens.json")  # a lone controller's (LocalState)
# Advisory lock keys (the two-int form; the first int is this module's class).
LOCK_CLASS = 0x6D61  # "ma"
SCHEMA_LOCK, WRITE_LOCK = 1, 2

SCHEMA = (
    "CREATE SEQUENCE IF NOT EXISTS marco_shared_seq",
    "CREATE TABLE IF NOT EXISTS marco_revocations (username text PRIMARY KEY, "
    "not_before double precision NOT NULL, seq bigint NOT NULL)",
    "CREATE INDEX IF NOT EXISTS marco_revocations_seq ON marco_revocations (seq)",
    "CREATE TABLE IF NOT EXISTS marco_denied_tokens (digest text PRIMARY KEY, "
    "until double precision NOT NULL, seq bigint NOT NULL)",
    "CREATE INDEX IF NOT EXISTS marco_denied_tokens_seq ON marco_denied_tokens (seq)",
    "CREATE TABLE IF NOT EXISTS marco_login_attempts (id bigserial PRIMARY KEY, "
    "key text NOT NULL, at double precision NOT NULL, pending boolean NOT NULL)",
    "CREATE INDEX IF NOT EXISTS marco_login_attempts_key ON marco_login_attempts (key)",
    "CREATE INDEX IF NOT EXISTS marco_login_attempts_at ON marco_login_attempts (at)",
)
SCHEMA_LAST = "marco_login_attempts_at"  # made last: when it is there, all the rest is
# Rows written after `seq`: writers hold WRITE_LOCK from their numbers to their commit, so the
# numbers become visible in order and nothing below the newest one read can appear later.
CHANGES = ("SELECT 'r', username, not_before, seq FROM marco_revocations WHERE seq > %(seq)s "
           "UNION ALL SELECT 'd', digest, until, seq FROM marco_denied_tokens "
           "WHERE seq > %(seq)s AND until > extract(epoch FROM clock_timestamp()) "
           "ORDER BY 4")
NOW = "SELECT extract(epoch FROM clock_timestamp())::float8"  # one clock for all controllers


def is_postgres(url: str) -> bool:
    """Whether the database setting names a PostgreSQL server (else: the SQLite default)."""
    return url.startswith(("postgresql://", "postgres://"))


class SharedListener(Protocol):
    """Told of the revocations other controllers wrote (controller/revoke.py pushes them)."""

    def reloaded(self, revocations: dict[str, float], denied: dict[str, float]) -> None: ...


class SharedState(Protocol):
    """The interface both kinds of shared state offer."""

    revocations: Revocations  # read on every request: kept in memory by both
    denied: DeniedTokens

    @property
    def limiter(self) -> LoginLimiter:
        """Failed logins, counted where every controller sees them."""

    def open(self) -> None:
        """At start-up, before any request: what is kept so far (ConfigError: unusable)."""

    def attach_runs(self, signals: RunSignals) -> None:
        """Publish this controller's run changes; wake `signals` on the others'."""

    def follow(self, listener: SharedListener) -> None:
        """Start reading what other controllers write (the IOLoop runs)."""

    async def share(self, revocations: dict[str, float], denied: dict[str, float]) -> None:
        """Tell the others of changes made here (already in `revocations`/`denied`)."""

    async def close(self) -> None:
        """Stop following; close connections."""

    def cutoff_now(self) -> float:
        """The time a "log out everywhere" cutoff starts from (every token issued up to it,
        on any controller, is void)."""

    def lead(self) -> float:
        """Seconds a cutoff may lie ahead of this clock beyond its own second."""


class LocalState:
    """One controller alone: revocations in files of the state dir, failures in memory."""

    def __init__(self, state_dir: Path, limiter: LoginRateLimiter) -> None:
        self.revocations = Revocations(state_dir / "revocations.json")
        self.denied = DeniedTokens(state_dir / "denied-tokens.json")
        self.limiter = limiter

    def open(self) -> None:
        self.revocations.load()
        self.denied.load()

    def attach_runs(self, signals: RunSignals) -> None:
        """Nothing to do: `RunSignals` wakes this process's waits itself."""

    def follow(self, listener: SharedListener) -> None:
        """Nothing to do: no one else writes these files."""

    async def share(self, revocations: dict[str, float], denied: dict[str, float]) -> None:
        """Nothing to do: `update` wrote the files."""

    async def close(self) -> None:
        """Nothing to close."""

    def cutoff_now(self) -> float:
        return time.time()  # one controller: its own clock issues every token

    def lead(self) -> float:
        return 0.0


@dataclass(frozen=True)
class SharedLimits:
    """The shared state's settings (controller/config.py)."""

    poll: float          # shared_poll: seconds between two reads of the others' changes
    listen: bool         # shared_listen: LISTEN for them too, acted on at once
    timeout: float       # shared_timeout: seconds one database exchange may take
    max_failures: int    # login_max_failures
    window: float        # login_lockout
    heartbeat: float = 15.0  # seconds of LISTEN without a notification before a SELECT 1
    clock_margin: float = 2.0  # shared_clock_margin: added to a "log out everywhere" cutoff


class Database:
    """This controller's one connection for the shared state: opened when first needed and
    again after a failure, one transaction at a time, each within `timeout` seconds counted
    from the call (the wait for the connection's lock included)."""

    def __init__(self, url: str, timeout: float) -> None:
        self.url, self.timeout = url, timeout
        self._connection: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()
        self.failures = 0  # transactions that failed on the database so far

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        import psycopg  # the controller's dependency, imported when a database is used

        if self._connection is None or self._connection.closed:
            self._connection = await psycopg.AsyncConnection.connect(
                self.url, connect_timeout=max(2, math.ceil(self.timeout)))
        return self._connection

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A transaction, committed when the block ends; any failure drops the connection
        (the server rolls back what it had) and raises TryAgain. Callers queued behind a
        transaction that failed on the database fail at once: the N-th caller of a stalled
        database waits one timeout, not N."""
        import psycopg

        failures = self.failures
        try:
            async with asyncio.timeout(self.timeout):
                async with self._lock:
                    if self.failures != failures:
                        raise TryAgain("the database did not answer the call before this one",
                                       hint="try again in a moment")
                    async with self._held() as connection:
                        yield connection
        except (psycopg.Error, OSError, TimeoutError) as error:
            raise TryAgain(f"the database did not answer: {error!r}") from error

    @asynccontextmanager
    async def _held(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """The connection for one transaction under the lock; a failure on the database (or
        the deadline's cancellation) counts, and any failure drops the connection."""
        import psycopg

        try:
            connection = await self._connect()
            yield connection
            await connection.commit()
        except (psycopg.Error, OSError, asyncio.CancelledError):
            self.failures += 1
            await self.drop()
            raise
        except BaseException:
            await self.drop()
            raise

    async def drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                await connection.close()
            except Exception:  # a broken connection: nothing more to release
                log.debug("closing the shared-state connection failed", exc_info=True)


class DatabaseLoginLimiter:
    """At most `max_failures` failed logins per key per `window` seconds, counted in the
    database for every controller. An attempt counts from its start (a pending row), as in
    `LoginRateLimiter`, so parallel guesses on several controllers cannot slip past; each
    key's count is checked and added to under its own advisory lock."""

    def __init__(self, db: Database, max_failures: int, window: float) -> None:
        self.db, self.max_failures, self.window = db, max_failures, window

    async def reserve(self, keys: Sequence[str]) -> list[int]:
        async with self.db.transaction() as connection:
            for key in sorted(set(keys)):  # one order: two attempts never wait on each other
                await connection.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))",
                                         (LOCK_CLASS, key))
            now = await _now(connection)
            await connection.execute("DELETE FROM marco_login_attempts WHERE key = ANY(%s) "
                                     "AND at < %s", (list(keys), now - self.window))
            cursor = await connection.execute(
                "SELECT count(*), min(at) FROM marco_login_attempts WHERE key = ANY(%s) "
                "GROUP BY key HAVING count(*) >= %s ORDER BY 2 LIMIT 1",
                (list(keys), self.max_failures))
            over = await cursor.fetchone()
            ids: list[int] = []
            if over is None:
                for key in keys:
                    cursor = await connection.execute(
                        "INSERT INTO marco_login_attempts (key, at, pending) "
                        "VALUES (%s, %s, true) RETURNING id", (key, now))
                    row = await cursor.fetchone()
                    assert row is not None
                    ids.append(int(row[0]))
        if over is not None:
            wait = int(self.window - (now - float(over[1]))) + 1
            raise TooManyAttempts(f"too many failed logins; try again in {wait} s")
        return ids

    async def release(self, ticket: list[int], failed: bool) -> None:
        async with self.db.transaction() as connection:
            if failed:
                await connection.execute(
                    f"UPDATE marco_login_attempts SET pending = false, at = ({NOW}) "
                    "WHERE id = ANY(%s)", (ticket,))
            else:
                await connection.execute("DELETE FROM marco_login_attempts WHERE id = ANY(%s)",
                                         (ticket,))

    async def forgive(self, user_key: str) -> None:
        async with self.db.transaction() as connection:
            await connection.execute("DELETE FROM marco_login_attempts WHERE key = %s "
                                     "AND NOT pending", (user_key,))

    async def sweep(self) -> None:
        """Delete what no longer counts: the table stays as small as the failures of one
        window, however many names are tried."""
        async with self.db.transaction() as connection:
            await connection.execute(f"DELETE FROM marco_login_attempts WHERE at < ({NOW}) - %s",
                                     (self.window,))


async def _now(connection: psycopg.AsyncConnection[Any]) -> float:
    cursor = await connection.execute(NOW)
    row = await cursor.fetchone()
    assert row is not None
    return float(row[0])


class PostgresState:
    """The shared state in PostgreSQL tables beside the runs (the same database URL)."""

    def __init__(self, url: str, limits: SharedLimits, state_dir: Path | None = None) -> None:
        """`state_dir`: where revocations the database has not taken yet are journaled (None:
        memory only)."""
        self.url, self.limits, self.state_dir = url, limits, state_dir
        self.revocations = Revocations(None)
        self.denied = DeniedTokens(None)
        self.db = Database(url, limits.timeout)
        self.limiter = DatabaseLoginLimiter(self.db, limits.max_failures, limits.window)
        self.id = secrets.token_hex(8)  # tells this controller's notifications from others'
        self._seq = 0  # the newest change read
        self._unsaved: tuple[dict[str, float], dict[str, float]] = ({}, {})
        self._unpublished: set[str] = set()
        self._signals: RunSignals | None = None
        self._listener: SharedListener | None = None
        self._dirty: asyncio.Event | None = None
        self._publish: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.listening = False  # whether the LISTEN connection is up
        self.reloads = 0  # reads of the others' changes done so far
        self.clock = time.time  # this controller's clock (tests give it a skew)
        self.clock_offset = 0.0  # the database's clock minus this one, at the last read

    # -- start-up -----------------------------------------------------------------------------

    def open(self) -> None:
        """Make the tables if they are missing and read them, before any request is served
        (a blocking connection: the IOLoop does not serve yet)."""
        import psycopg

        check_url(self.url)  # ConfigError, the password masked (libpq's message quotes it)
        try:
            with psycopg.connect(self.url, connect_timeout=max(2, math.ceil(
                    self.limits.timeout))) as connection:
                connection.execute(f"SET statement_timeout = {int(self.limits.timeout * 1000)}")
                # Made once: the DDL's table locks would wait on other controllers' work.
                if connection.execute(f"SELECT to_regclass('{SCHEMA_LAST}')").fetchone() \
                        in (None, (None,)):
                    connection.execute("SELECT pg_advisory_xact_lock(%s, %s)",
                                       (LOCK_CLASS, SCHEMA_LOCK))
                    for statement in SCHEMA:
                        connection.execute(statement)
                    connection.commit()
                rows = connection.execute(CHANGES, {"seq": 0}).fetchall()
                row = connection.execute(NOW).fetchone()
                self.clock_offset = float(row[0]) - self.clock() if row else 0.0
        except psycopg.Error as error:
            raise TryAgain(f"cannot open the shared state in the database: {error}") from error
        self._apply(rows)
        self._load_journal()

    def _load_journal(self) -> None:
        """Revocations made here that the database never took (a logout during an outage,
        then a restart) and, once, a lone controller's files in the state dir (switching to a
        database): honoured here at once, written to the database by the reload loop."""
        if self.state_dir is None:
            return
        revoked, denied = self._read_journal()
        imported = []
        for local in (Revocations(self.state_dir / LOCAL_FILES[0]),
                      DeniedTokens(self.state_dir / LOCAL_FILES[1])):
            assert local.path is not None
            try:
                local.load()
            except (ValueError, BadRequest) as error:
                log.error("%s not imported into the database (unreadable): %s", local.path,
                          error)
                continue
            if local.path.exists():
                imported.append(local.path)
                (revoked if isinstance(local, Revocations) else denied).update(local.table())
        self._remember(revoked, denied)
        self.revocations.update(revoked)
        self.denied.update(denied)
        for path in imported:  # journaled above: nothing is lost if the database is down
            path.rename(path.with_name(f"{path.name}.imported"))
            log.warning("%s imported into the database (renamed %s.imported)", path.name,
                        path.name)

    def _read_journal(self) -> tuple[dict[str, float], dict[str, float]]:
        assert self.state_dir is not None
        try:
            data = json.loads((self.state_dir / JOURNAL).read_text())
            return (Revocations._checked(data["revocations"]),
                    DeniedTokens._checked(data["denied"]))
        except FileNotFoundError:
            return {}, {}
        except (ValueError, KeyError, TypeError, BadRequest) as error:
            log.error("%s is unreadable, ignored: %s", JOURNAL, error)
            return {}, {}

    def _remember(self, revocations: dict[str, float], denied: dict[str, float]) -> None:
        """Add to what is to be written to the database, journaled first."""
        for user, when in revocations.items():
            self._unsaved[0][user] = max(when, self._unsaved[0].get(user, 0.0))
        self._unsaved[1].update(denied)
        self._write_journal()

    def _write_journal(self) -> None:
        """The unsaved changes on disk (removed when there are none); a journal that cannot
        be written is logged: this controller holds them in memory still."""
        if self.state_dir is None:
            return
        path = self.state_dir / JOURNAL
        try:
            if self._unsaved[0] or self._unsaved[1]:
                data = {"revocations": self._unsaved[0], "denied": self._unsaved[1]}
                write_atomic(path, json.dumps(data).encode(), 0o600)
            else:
                path.unlink(missing_ok=True)
        except OSError as error:
            log.error("cannot write %s: %s", path, error)

    def attach_runs(self, signals: RunSignals) -> None:
        self._signals = signals
        signals.on_change(self.publish_run)

    def follow(self, listener: SharedListener) -> None:
        self._listener = listener
        self._dirty, self._publish = asyncio.Event(), asyncio.Event()
        work = [self._reload_loop(), self._publish_loop()]
        if self.limits.listen:
            work.append(self._listen_loop())
        self._tasks = [asyncio.ensure_future(coroutine) for coroutine in work]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.db.drop()

    # -- revocations --------------------------------------------------------------------------

    async def share(self, revocations: dict[str, float], denied: dict[str, float]) -> None:
        """Write changes made here; a database that does not answer has them written later
        (each reload tries again), while this controller and its agents hold them already."""
        self._remember(revocations, denied)
        try:
            await self._save()
        except MarcoError as error:
            log.error("revocations not written to the database yet (tried again every %s s): "
                      "%s", self.limits.poll, error.message)

    async def _save(self) -> None:
        now = time.time()
        revocations = dict(self._unsaved[0])
        denied = {d: until for d, until in self._unsaved[1].items() if until > now}
        if not revocations and not denied:
            self._unsaved[1].clear()
            self._write_journal()
            return
        async with self.db.transaction() as connection:
            await connection.execute("SELECT pg_advisory_xact_lock(%s, %s)",
                                     (LOCK_CLASS, WRITE_LOCK))
            for user, when in revocations.items():
                await connection.execute(
                    "INSERT INTO marco_revocations VALUES (%s, %s, nextval('marco_shared_seq')) "
                    "ON CONFLICT (username) DO UPDATE SET not_before = excluded.not_before, "
                    "seq = excluded.seq WHERE marco_revocations.not_before < "
                    "excluded.not_before", (user, when))
            for digest, until in denied.items():
                await connection.execute(
                    "INSERT INTO marco_denied_tokens VALUES (%s, %s, "
                    "nextval('marco_shared_seq')) ON CONFLICT (digest) DO NOTHING",
                    (digest, until))
            await connection.execute(f"DELETE FROM marco_denied_tokens WHERE until < ({NOW})")
            await connection.execute("SELECT pg_notify(%s, '')", (SHARED_CHANNEL,))
        for user, when in revocations.items():
            if self._unsaved[0].get(user) == when:
                del self._unsaved[0][user]
        for digest in [*denied, *(d for d, u in self._unsaved[1].items() if u <= now)]:
            self._unsaved[1].pop(digest, None)
        self._write_journal()

    async def reload(self) -> None:
        """Read what was written since the last read; tell the listener what is new here."""
        async with self.db.transaction() as connection:
            cursor = await connection.execute(CHANGES, {"seq": self._seq})
            rows = await cursor.fetchall()
            self.clock_offset = await _now(connection) - self.clock()
        revoked, denied = self._apply(rows)
        self.reloads += 1
        if (revoked or denied) and self._listener is not None:
            log.info("read from the database: %d user(s) logged out everywhere, %d token(s) "
                     "logged out", len(revoked), len(denied))
            self._listener.reloaded(revoked, denied)

    def _apply(self, rows: Sequence[tuple[Any, ...]]) -> tuple[dict[str, float],
                                                                dict[str, float]]:
        """Merge rows into memory (each checked: anyone with the database's password could
        have written them); the revocations and tokens that are new here."""
        revoked: dict[str, float] = {}
        denied: dict[str, float] = {}
        for kind, name, when, seq in rows:
            self._seq = max(self._seq, int(seq))
            try:
                if kind == "r":
                    revoked.update(Revocations._checked({name: when}))
                else:
                    denied.update(DeniedTokens._checked({name: when}))
            except BadRequest:
                log.warning("ignoring a malformed %s row in the database",
                            "revocation" if kind == "r" else "denied-token")
        moved = self.revocations.update(revoked)
        added = self.denied.update(denied)
        return {user: revoked[user] for user in moved}, {d: denied[d] for d in added}

    def cutoff_now(self) -> float:
        """The later of this clock and the database's (as last read: no query, a stalled
        database delays no logout) plus shared_clock_margin: the other controllers' clocks
        may run ahead of this one, and their tokens of the last seconds must be void too."""
        return max(self.clock(), self.clock() + self.clock_offset) + self.limits.clock_margin

    def lead(self) -> float:
        return max(0.0, self.clock_offset) + self.limits.clock_margin

    # -- runs ---------------------------------------------------------------------------------

    def publish_run(self, run_id: str) -> None:
        """Queue a notification that the run changed (sent by the publishing task)."""
        if len(self._unpublished) < MAX_UNPUBLISHED_RUNS:
            self._unpublished.add(run_id)
        if self._publish is not None:
            self._publish.set()

    def _notified(self, channel: str, payload: str) -> None:
        if channel == SHARED_CHANNEL:
            assert self._dirty is not None
            self._dirty.set()
            return
        sender, _, run_id = payload.partition(" ")
        if sender != self.id and run_id and len(run_id) <= MAX_RUN_ID \
                and self._signals is not None:
            self._signals.wake(run_id)  # only wakes waits here: a run id no one waits for is inert

    # -- background work ----------------------------------------------------------------------

    async def _reload_loop(self) -> None:
        """Read the others' changes when told and every `poll` seconds; write what could not
        be written; sweep failed logins; without LISTEN, wake the run waits each time."""
        assert self._dirty is not None
        swept = time.monotonic()
        while True:
            try:
                await asyncio.wait_for(self._dirty.wait(), self.limits.poll)
            except TimeoutError:
                pass
            self._dirty.clear()
            if not self.limits.listen and self._signals is not None:
                self._signals.wake_all()
            try:
                if self._unsaved[0] or self._unsaved[1]:
                    await self._save()
                await self.reload()
                if time.monotonic() - swept > LOGIN_SWEEP_SECONDS:
                    await self.limiter.sweep()
                    swept = time.monotonic()
            except MarcoError as error:
                log.warning("shared state not read from the database: %s", error.message)

    async def _publish_loop(self) -> None:
        assert self._publish is not None
        while True:
            await self._publish.wait()
            self._publish.clear()
            runs, self._unpublished = self._unpublished, set()
            if not runs:
                continue
            try:
                async with self.db.transaction() as connection:
                    await connection.execute(
                        "SELECT pg_notify(%s, n) FROM unnest(%s::text[]) AS n",
                        (RUNS_CHANNEL, [f"{self.id} {run}" for run in runs]))
            except MarcoError as error:  # the others' waits still end by their timeout
                log.warning("run changes not published: %s", error.message)

    async def _listen_loop(self) -> None:
        """LISTEN on its own connection, connected again after a failure; on each
        (re)connection, reread and wake every run wait: notifications may have been missed."""
        import psycopg

        delay = 0.5
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                        self._listen_conninfo(), autocommit=True) as connection:
                    for channel in (SHARED_CHANNEL, RUNS_CHANNEL):
                        await connection.execute(f"LISTEN {channel}")
                    delay, self.listening = 0.5, True
                    self._caught_up()
                    await self._listen(connection)
            except (psycopg.Error, OSError) as error:  # TimeoutError too: a silent heartbeat
                log.warning("not listening to the database (again in %.1f s): %s", delay, error)
            finally:
                self.listening = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.limits.poll * 4)

    def _listen_conninfo(self) -> str:
        """The URL with TCP keepalives (unless it sets its own): a listener whose server
        vanished without a reset ends instead of waiting for notifications forever."""
        from psycopg import conninfo

        given = check_url(self.url)
        extra = {key: value for key, value in CONNECTION_DEFAULTS.items() if key not in given}
        extra["application_name"] = "marco-controller-listen"
        extra["connect_timeout"] = max(2, math.ceil(self.limits.timeout))
        return conninfo.make_conninfo(self.url, **extra)

    async def _listen(self, connection: psycopg.AsyncConnection[Any]) -> None:
        """Act on notifications; after `heartbeat` seconds without one, a SELECT 1 within
        shared_timeout proves the connection alive (TimeoutError: it is replaced)."""
        while True:
            async for note in connection.notifies(timeout=self.limits.heartbeat):
                self._notified(note.channel, note.payload)
            async with asyncio.timeout(self.limits.timeout):
                await connection.execute("SELECT 1")

    def _caught_up(self) -> None:
        assert self._dirty is not None
        self._dirty.set()
        if self._signals is not None:
            self._signals.wake_all()


def shared_state(database: str, state_dir: Path, limits: SharedLimits) -> SharedState:
    """The shared state the database setting selects (not opened yet)."""
    if is_postgres(database):
        return PostgresState(database, limits, state_dir)
    return LocalState(state_dir, LoginRateLimiter(limits.max_failures, limits.window))
