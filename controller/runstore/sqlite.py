"""The run store: runs, their events and their executions' archived output (docs/runs.md).

`RunStore` is the interface (a server database can implement it later); `SqliteRunStore` is
the embedded default: one SQLite file under the state dir (WAL, mode 0600, schema versions in
`PRAGMA user_version` applied in order at open). Every method checks the owner: another user's
run is exactly like a missing one. Stored bytes (events and compressed output) are charged to
the run, and the per-user and total caps are kept by pruning the oldest ended runs, never a
running one (the store keeps the per-owner sums in memory: one process owns the file).
`RunStoreThread` serves an IOLoop: the store lives on one thread of its own, so
SQLite is used from one thread only and the loop never blocks on disk.
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import json
import math
import os
import secrets
import sqlite3
import time
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

from marco.errors import (
    BadRequest,
    ConfigError,
    Conflict,
    DiskBudgetExhausted,
    InsufficientStorage,
    NotFound,
    TooManyRuns,
)
from marco.runs import KINDS, RUN_ID, STATUSES

MAX_TITLE = 1000
MAX_META_BYTES = 16 * 1024
MAX_EVENTS_PER_CALL = 1000
MAX_EVENT_BYTES = 64 * 1024
MAX_LIST = 1000
MAX_NAME = 255  # a host name, an execution or task id
MAX_HOSTS = 10_000  # hosts of one run
SQLITE_FULL = 13  # sqlite3.Error.sqlite_errorcode of "database or disk is full"
DAY = 86400.0


@dataclass
class Run:
    """One thing a user did (docs/runs.md "The model")."""

    id: str
    owner: str
    kind: str
    title: str
    hosts: list[str]
    started: float
    ended: float | None = None
    status: str = "running"
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The run's JSON form, without its events."""
        return {"id": self.id, "owner": self.owner, "kind": self.kind, "title": self.title,
                "hosts": list(self.hosts), "started": self.started, "ended": self.ended,
                "status": self.status, "stats": {h: dict(c) for h, c in self.stats.items()},
                "meta": dict(self.meta)}


@dataclass
class StoredOutput:
    """One execution's output as archived: the agent's output events, in order."""

    host: str
    execution_id: str
    task_id: str | None
    events: list[dict[str, Any]]
    archived: bool


@dataclass(frozen=True)
class RunLimits:
    """The `runs_*` settings (docs/runs.md "Settings")."""

    retention_days: float = 90
    max_bytes: int = 1 << 30
    max_running_per_user: int = 20
    max_per_user: int = 10_000
    max_bytes_per_user: int = 256 << 20


DEFAULT_LIMITS = RunLimits()

def new_run_id(now: float | None = None) -> str:
    """`r` + 8 hex of the start second + 12 random hex: ids sort by start."""
    seconds = int(time.time() if now is None else now)
    return f"r{seconds:08x}{secrets.token_hex(6)}"


class RunStore(Protocol):
    """What the controller needs of a run store (SQLite here; a server database later)."""

    def create(self, run: Run) -> None: ...
    def get(self, owner: str, run_id: str) -> Run | None: ...
    def list(self, owner: str, kind: str | None = None, status: str | None = None,
             text: str | None = None, before: str | None = None,
             limit: int = 50) -> tuple[list[Run], bool]: ...
    def append_events(self, owner: str, run_id: str,
                      events: builtins.list[dict[str, Any]]) -> int: ...
    def events(self, owner: str, run_id: str, since: int = 0) -> builtins.list[dict[str, Any]]: ...
    def update(self, owner: str, run_id: str, *, hosts: builtins.list[str] | None = None,
               status: str | None = None, ended: float | None = None,
               stats: dict[str, dict[str, int]] | None = None) -> Run: ...
    def put_output(self, owner: str, run_id: str, output: StoredOutput) -> None: ...
    def outputs(self, owner: str, run_id: str,
                host: str | None = None) -> builtins.list[StoredOutput]: ...
    def prune(self, now: float | None = None) -> int: ...
    def interrupt_running(self, now: float | None = None) -> int: ...
    def interrupt_stale(self, before: float, now: float | None = None) -> int: ...
    def close(self) -> None: ...


# Schema versions: MIGRATIONS[n - 1] takes a file from version n - 1 to n (never edit one that
# has shipped; append a new one). `bytes` on a run is what its events and outputs take.
MIGRATIONS: list[tuple[str, ...]] = [
    (
        """CREATE TABLE runs (
            id TEXT PRIMARY KEY, owner TEXT NOT NULL, kind TEXT NOT NULL, title TEXT NOT NULL,
            hosts TEXT NOT NULL, started REAL NOT NULL, ended REAL, status TEXT NOT NULL,
            stats TEXT NOT NULL, meta TEXT NOT NULL, bytes INTEGER NOT NULL DEFAULT 0)""",
        "CREATE INDEX runs_by_owner ON runs (owner, id DESC)",
        "CREATE INDEX runs_by_ended ON runs (ended) WHERE ended IS NOT NULL",
        "CREATE INDEX runs_running ON runs (owner) WHERE ended IS NULL",
        """CREATE TABLE events (
            run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            seq INTEGER NOT NULL, time REAL NOT NULL, type TEXT NOT NULL, body TEXT NOT NULL,
            PRIMARY KEY (run_id, seq))""",
        """CREATE TABLE outputs (
            run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            execution_id TEXT NOT NULL, host TEXT NOT NULL, task_id TEXT,
            archived INTEGER NOT NULL, bytes INTEGER NOT NULL, data BLOB NOT NULL,
            PRIMARY KEY (run_id, execution_id))""",
    ),
    # A run's last activity (its start, then each batch of events' arrival): a running run
    # idle for longer than any of its owner's tokens live is ended (interrupt_stale).
    (
        "ALTER TABLE runs ADD COLUMN last_activity REAL",
        "UPDATE runs SET last_activity = started",
    ),
]


def schema_version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def migrate(db: sqlite3.Connection, path: Path,
            migrations: Sequence[tuple[str, ...]] = MIGRATIONS) -> int:
    """Bring the file to the newest version, each step in the same transaction as its version
    number (a crash leaves the old version or the new, never half). Returns the version."""
    db.execute("BEGIN IMMEDIATE")  # a second opener waits, then sees the new version
    try:
        version = schema_version(db)
        if version > len(migrations):
            raise ConfigError(f"the runs database {path} has schema version {version}; this "
                              f"Marco knows versions up to {len(migrations)}",
                              hint="run a newer Marco, or move the file away")
        for number, statements in enumerate(migrations[version:], start=version + 1):
            for statement in statements:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {number}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return len(migrations)


def open_database(path: Path) -> sqlite3.Connection:
    """The connection, on a file only its owner can read (SQLite gives its -wal and -shm
    files the same mode)."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    os.chmod(path, 0o600)
    db = sqlite3.connect(path, isolation_level=None)  # transactions are explicit
    try:
        # Pruned runs give their pages back (prune); this only takes on a new file, before WAL.
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA foreign_keys = ON")
        migrate(db, path)
    except sqlite3.DatabaseError as error:
        db.close()
        raise ConfigError(f"the runs database {path} is unusable: {error}",
                          hint="move the file away (its runs are lost) or restore a backup"
                          ) from error
    except BaseException:
        db.close()
        raise
    return db


def _json(value: Any) -> str:
    """Compact JSON as UTF-8 text (escaped only if a lone surrogate needs it)."""
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)


def _encoded_json(value: Any, what: str) -> str:
    """`_json`, or BadRequest naming `what` when the value is not JSON."""
    try:
        return _json(value)
    except (TypeError, ValueError) as error:
        raise BadRequest(f"{what} is not JSON: {error}") from error


def _is_time(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) \
        and math.isfinite(value)


def _check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME:
        raise BadRequest(f"{what} must be a string of 1 to {MAX_NAME} characters")
    return value


def check_hosts(hosts: Any) -> list[str]:
    """The hosts of a run, or BadRequest (also for callers that check before storing)."""
    if not isinstance(hosts, list):
        raise BadRequest("hosts must be a list of node names")
    if len(hosts) > MAX_HOSTS:
        raise BadRequest(f"a run has at most {MAX_HOSTS} hosts")
    return [_check_name(host, "a host") for host in hosts]


def _row_bytes(run: Run) -> int:
    """The bytes a run's own row holds (title, hosts, stats, meta): charged against the byte
    caps like its events and outputs, so runs with huge host lists cannot fill the disk."""
    return sum(len(text.encode("utf-8", "surrogatepass"))
               for text in (run.title, _json(run.hosts), _json(run.stats), _json(run.meta)))


def _check_status(status: Any) -> str:
    if status not in STATUSES:
        raise BadRequest(f"status must be one of {', '.join(sorted(STATUSES))}")
    return str(status)


def _check_stats(stats: Any) -> dict[str, dict[str, int]]:
    ok = isinstance(stats, dict) and all(
        isinstance(host, str) and isinstance(counts, dict) and all(
            isinstance(name, str) and isinstance(n, int) and not isinstance(n, bool)
            for name, n in counts.items())
        for host, counts in stats.items())
    if not ok:
        raise BadRequest("stats must map each host to {name: integer} counts")
    return cast(dict[str, dict[str, int]], stats)


def _check_run(run: Run) -> None:
    if not isinstance(run.id, str) or not RUN_ID.fullmatch(run.id):
        raise BadRequest("a run id is r and 20 lowercase hex characters")
    _check_name(run.owner, "the owner")
    if run.kind not in KINDS:
        raise BadRequest(f"kind must be one of {', '.join(sorted(KINDS))}")
    if not isinstance(run.title, str) or len(run.title) > MAX_TITLE:
        raise BadRequest(f"the title must be a string of at most {MAX_TITLE} characters")
    check_hosts(run.hosts)
    if not _is_time(run.started) or not (run.ended is None or _is_time(run.ended)):
        raise BadRequest("started and ended must be numbers (Unix time)")
    _check_status(run.status)
    _check_stats(run.stats)
    if not isinstance(run.meta, dict):
        raise BadRequest("meta must be an object")
    if len(_encoded_json(run.meta, "meta").encode("utf-8")) > MAX_META_BYTES:
        raise BadRequest(f"meta is larger than {MAX_META_BYTES} bytes as JSON")


def _event_row(event: Any, now: float) -> tuple[float, str, str]:
    """(time, type, body JSON) of one event, or BadRequest; `seq` is the store's to give."""
    if not isinstance(event, dict) or not isinstance(event.get("type"), str) \
            or not event["type"]:
        raise BadRequest("each event must be an object with a string type")
    stamp = event.get("time", now)
    if not _is_time(stamp):
        raise BadRequest("an event's time must be a number (Unix time)")
    body = {k: v for k, v in event.items() if k not in ("seq", "time", "type")}
    text = _encoded_json(body, "an event")
    if len(text.encode("utf-8")) + len(event["type"].encode("utf-8")) > MAX_EVENT_BYTES:
        raise BadRequest(f"an event is larger than {MAX_EVENT_BYTES} bytes as JSON")
    return float(stamp), event["type"], text


def _check_output(output: StoredOutput) -> bytes:
    """The output's compressed JSON lines, or BadRequest."""
    _check_name(output.host, "the host")
    _check_name(output.execution_id, "the execution id")
    if output.task_id is not None:
        _check_name(output.task_id, "the task id")
    if not isinstance(output.events, list) or not all(isinstance(e, dict) for e in output.events):
        raise BadRequest("an output is a list of event objects")
    lines = "".join(_encoded_json(e, "an output event") + "\n" for e in output.events)
    return zlib.compress(lines.encode("utf-8"), 6)


def _decode_output(data: bytes) -> list[dict[str, Any]]:
    text = zlib.decompress(data).decode("utf-8")
    # Only "\n" ends a line: JSON escapes it, but not U+2028 or U+0085, which splitlines() cuts.
    return [json.loads(line) for line in text.split("\n")[:-1]]


def _run_from_row(row: sqlite3.Row) -> Run:
    return Run(id=row["id"], owner=row["owner"], kind=row["kind"], title=row["title"],
               hosts=json.loads(row["hosts"]), started=row["started"], ended=row["ended"],
               status=row["status"], stats=json.loads(row["stats"]), meta=json.loads(row["meta"]))


class SqliteRunStore:
    """The embedded run store: one SQLite file (use it from one thread: see RunStoreThread)."""

    def __init__(self, path: Path, limits: RunLimits = DEFAULT_LIMITS) -> None:
        self.path, self.limits = path, limits
        self._db = open_database(path)
        self._db.row_factory = sqlite3.Row
        # Stored bytes per owner, kept beside the file so that a charge costs no scan of every
        # run; None after a rolled back transaction (then read again from the file).
        self._usage: dict[str, int] | None = None

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it or nothing (a full disk is InsufficientStorage)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException as error:
            self._usage = None
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            if isinstance(error, sqlite3.Error) and error.sqlite_errorcode == SQLITE_FULL:
                raise InsufficientStorage("the controller's disk is full") from error
            raise

    def _used(self) -> dict[str, int]:
        """Stored bytes per owner."""
        if self._usage is None:
            self._usage = {owner: int(size) for owner, size in self._db.execute(
                "SELECT owner, SUM(bytes) FROM runs GROUP BY owner HAVING SUM(bytes) > 0")}
        return self._usage

    def _row(self, owner: str, run_id: str) -> sqlite3.Row | None:
        if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
            return None
        row: sqlite3.Row | None = self._db.execute(
            "SELECT * FROM runs WHERE id = ? AND owner = ?", (run_id, owner)).fetchone()
        return row

    def _existing(self, owner: str, run_id: str) -> sqlite3.Row:
        row = self._row(owner, run_id)
        if row is None:
            raise NotFound(f"no run {run_id}")
        return row

    # Runs

    def create(self, run: Run) -> None:
        """Record a new run; TooManyRuns (429) when its owner has too many running, and
        the owner's oldest ended runs go when they have `max_per_user` runs."""
        _check_run(run)
        with self._transaction() as db:
            running = db.execute("SELECT COUNT(*) FROM runs WHERE owner = ? AND ended IS NULL",
                                 (run.owner,)).fetchone()[0]
            if run.ended is None and running >= self.limits.max_running_per_user:
                raise TooManyRuns(
                    f"{run.owner} has {running} runs running (at most "
                    f"{self.limits.max_running_per_user})",
                    hint="wait for one to end")
            total = db.execute("SELECT COUNT(*) FROM runs WHERE owner = ?",
                               (run.owner,)).fetchone()[0]
            if total >= self.limits.max_per_user:
                excess = total - self.limits.max_per_user + 1
                if self._drop_oldest_ended(run.owner, excess) < excess:
                    raise TooManyRuns(f"{run.owner} has {total} runs, none ended",
                                      hint="end a run first")
            try:
                db.execute(
                    "INSERT INTO runs (id, owner, kind, title, hosts, started, ended, status,"
                    " stats, meta, last_activity) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (run.id, run.owner, run.kind, run.title, _json(run.hosts),
                     float(run.started), run.ended, run.status, _json(run.stats),
                     _json(run.meta), float(run.started)))
            except sqlite3.IntegrityError as error:
                raise Conflict(f"run {run.id} already exists") from error
            self._charge(run.owner, run.id, _row_bytes(run))

    def get(self, owner: str, run_id: str) -> Run | None:
        """The run, or None (also for another owner's run)."""
        row = self._row(owner, run_id)
        return None if row is None else _run_from_row(row)

    def list(self, owner: str, kind: str | None = None, status: str | None = None,
             text: str | None = None, before: str | None = None,
             limit: int = 50) -> tuple[list[Run], bool]:
        """The owner's runs, newest first (by id), and whether there are more: `before` is the
        last id of the previous page; `text` matches the title, ignoring ASCII case."""
        where, args = ["owner = ?"], [owner]
        if kind is not None:
            if kind not in KINDS:
                raise BadRequest(f"kind must be one of {', '.join(sorted(KINDS))}")
            where.append("kind = ?")
            args.append(kind)
        if status is not None:
            where.append("status = ?")
            args.append(_check_status(status))
        if text:
            if len(text) > MAX_TITLE:
                raise BadRequest(f"the text to match is longer than {MAX_TITLE} characters")
            where.append("instr(lower(title), lower(?)) > 0")  # no LIKE: no wildcards to escape
            args.append(text)
        if before is not None:
            if not isinstance(before, str) or not RUN_ID.fullmatch(before):
                raise BadRequest("before must be a run id")
            where.append("id < ?")
            args.append(before)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= MAX_LIST:
            raise BadRequest(f"limit must be 1 to {MAX_LIST}")
        rows = self._db.execute(
            f"SELECT * FROM runs WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?",
            (*args, limit + 1)).fetchall()
        return [_run_from_row(row) for row in rows[:limit]], len(rows) > limit

    def update(self, owner: str, run_id: str, *, hosts: builtins.list[str] | None = None,
               status: str | None = None, ended: float | None = None,
               stats: dict[str, dict[str, int]] | None = None) -> Run:
        """Change what is given and return the run. A final status without `ended` ends the
        run now; an ended run cannot be `running`, and ending a run that has ended already is
        a Conflict (checked in the same transaction: of two racing ends, one wins)."""
        hosts = None if hosts is None else check_hosts(hosts)
        stats = None if stats is None else _check_stats(stats)
        status = None if status is None else _check_status(status)
        if ended is not None and not _is_time(ended):
            raise BadRequest("ended must be a number (Unix time)")
        with self._transaction():
            run = _run_from_row(self._existing(owner, run_id))
            if run.ended is not None and (status is not None or ended is not None):
                raise Conflict(f"run {run_id} has ended already")
            size_before = _row_bytes(run)
            if hosts is not None:
                run.hosts = hosts
            if stats is not None:
                run.stats = stats
            if status is not None:
                run.status = status
            if ended is not None:
                run.ended = float(ended)
            if run.status != "running" and run.ended is None:
                run.ended = time.time()
            if run.status == "running" and run.ended is not None:
                raise BadRequest("an ended run needs a final status")
            self._db.execute(
                "UPDATE runs SET hosts = ?, status = ?, ended = ?, stats = ? WHERE id = ?",
                (_json(run.hosts), run.status, run.ended, _json(run.stats), run_id))
            self._charge(owner, run_id, _row_bytes(run) - size_before)
        return run

    def interrupt_running(self, now: float | None = None) -> int:
        """At start-up: the runs a previous process left running end as `interrupted`."""
        with self._transaction() as db:
            cursor = db.execute("UPDATE runs SET status = 'interrupted', ended = ? "
                                "WHERE ended IS NULL", (time.time() if now is None else now,))
            return cursor.rowcount

    def interrupt_stale(self, before: float, now: float | None = None) -> int:
        """Running runs with no activity (start or events) since `before` end as
        `interrupted`: their client is gone (docs/runs.md "Stale runs")."""
        with self._transaction() as db:
            cursor = db.execute("UPDATE runs SET status = 'interrupted', ended = ? WHERE "
                                "ended IS NULL AND COALESCE(last_activity, started) < ?",
                                (time.time() if now is None else now, before))
            return cursor.rowcount

    # Events

    def append_events(self, owner: str, run_id: str, events: builtins.list[dict[str, Any]]) -> int:
        """Append events (seq 1, 2, ... per run); returns the next seq. NotFound for a
        missing or foreign run, Conflict for an ended one, BadRequest for bad events (then
        none is stored); their bytes are charged to the owner like output."""
        if not isinstance(events, list) or len(events) > MAX_EVENTS_PER_CALL:
            raise BadRequest(f"events must be a list of at most {MAX_EVENTS_PER_CALL}")
        now = time.time()
        rows = [_event_row(event, now) for event in events]
        with self._transaction() as db:
            if self._existing(owner, run_id)["ended"] is not None:
                raise Conflict(f"run {run_id} has ended", hint="start a new run")
            last = db.execute("SELECT COALESCE(MAX(seq), 0) FROM events WHERE run_id = ?",
                              (run_id,)).fetchone()[0]
            size = sum(len(body.encode("utf-8")) + len(kind.encode("utf-8"))
                       for _, kind, body in rows)
            self._charge(owner, run_id, size)
            db.executemany(
                "INSERT INTO events (run_id, seq, time, type, body) VALUES (?, ?, ?, ?, ?)",
                [(run_id, last + n, *row) for n, row in enumerate(rows, start=1)])
            db.execute("UPDATE runs SET last_activity = MAX(COALESCE(last_activity, 0), ?) "
                       "WHERE id = ?", (now, run_id))
        return int(last) + len(rows) + 1

    def events(self, owner: str, run_id: str, since: int = 0) -> builtins.list[dict[str, Any]]:
        """The run's events after seq `since`, in order (NotFound for a missing or foreign run)."""
        self._existing(owner, run_id)
        rows = self._db.execute("SELECT seq, time, type, body FROM events WHERE run_id = ? "
                                "AND seq > ? ORDER BY seq", (run_id, since)).fetchall()
        return [{"seq": r["seq"], "time": r["time"], "type": r["type"], **json.loads(r["body"])}
                for r in rows]

    # Output

    def put_output(self, owner: str, run_id: str, output: StoredOutput) -> None:
        """Store one execution's output compressed (replacing what the run had stored for that
        execution). Room is made by pruning the oldest ended runs, the owner's first; when
        that cannot make enough, nothing changes and DiskBudgetExhausted (the owner's cap) or
        InsufficientStorage (the total cap) says so."""
        data = _check_output(output)
        with self._transaction() as db:
            self._existing(owner, run_id)
            old = db.execute("SELECT bytes FROM outputs WHERE run_id = ? AND execution_id = ?",
                             (run_id, output.execution_id)).fetchone()
            self._charge(owner, run_id, len(data) - (old[0] if old else 0))
            db.execute("INSERT OR REPLACE INTO outputs (run_id, execution_id, host, task_id, "
                       "archived, bytes, data) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (run_id, output.execution_id, output.host, output.task_id,
                        int(bool(output.archived)), len(data), data))

    def outputs(self, owner: str, run_id: str,
                host: str | None = None) -> builtins.list[StoredOutput]:
        """The run's stored outputs (one host's if given), in the order they were stored."""
        self._existing(owner, run_id)
        sql, args = "SELECT * FROM outputs WHERE run_id = ?", [run_id]
        if host is not None:
            sql, args = sql + " AND host = ?", [*args, host]
        rows = self._db.execute(sql + " ORDER BY rowid", args).fetchall()
        return [StoredOutput(host=r["host"], execution_id=r["execution_id"],
                             task_id=r["task_id"], events=_decode_output(r["data"]),
                             archived=bool(r["archived"])) for r in rows]

    # Limits

    def _charge(self, owner: str, run_id: str, added: int) -> None:
        """Add `added` bytes to the run, first pruning the oldest ended runs (never this one)
        so that the owner's and the total caps hold; or raise, having pruned nothing."""
        if added > 0:
            used_by_owner, used = self._used().get(owner, 0), sum(self._used().values())
            victims = self._victims(owner, run_id, used_by_owner + added
                                    - self.limits.max_bytes_per_user, [])
            if victims is None:
                raise DiskBudgetExhausted(
                    f"{owner}'s stored runs would take more than "
                    f"{self.limits.max_bytes_per_user} bytes",
                    hint="ended runs are pruned oldest first; this one does not fit")
            freed = sum(size for _, size in victims)
            more = self._victims(None, run_id, used - freed + added - self.limits.max_bytes,
                                 [run for run, _ in victims])
            if more is None:
                raise InsufficientStorage(
                    f"the stored runs would take more than {self.limits.max_bytes} bytes",
                    hint="ended runs are pruned oldest first; this one does not fit")
            self._delete([run for run, _ in victims + more])
        self._db.execute("UPDATE runs SET bytes = bytes + ? WHERE id = ?", (added, run_id))
        usage = self._used()
        usage[owner] = usage.get(owner, 0) + added

    def _victims(self, owner: str | None, keep: str | None, need: int,
                 taken: builtins.list[str]) -> builtins.list[tuple[str, int]] | None:
        """The oldest ended runs (of `owner`, or anyone's) that free `need` bytes, except
        `keep` and those `taken`; None when all of them would not free enough."""
        chosen: list[tuple[str, int]] = []
        if need <= 0:
            return chosen
        sql = "SELECT id, bytes FROM runs WHERE ended IS NOT NULL AND bytes > 0"
        args: list[Any] = []
        if owner is not None:
            sql, args = sql + " AND owner = ?", [owner]
        skip = set(taken) | {keep}
        for run_id, size in self._db.execute(sql + " ORDER BY id", args):
            if run_id in skip:
                continue
            chosen.append((run_id, size))
            need -= size
            if need <= 0:
                return chosen
        return None

    def _drop_oldest_ended(self, owner: str, count: int) -> int:
        """Delete up to `count` of the owner's oldest ended runs; returns how many went."""
        rows = self._db.execute("SELECT id FROM runs WHERE owner = ? AND ended IS NOT NULL "
                                "ORDER BY id LIMIT ?", (owner, count)).fetchall()
        self._delete([row[0] for row in rows])
        return len(rows)

    def _delete(self, run_ids: builtins.list[str]) -> None:
        """Delete runs with their events and outputs (the foreign keys cascade)."""
        usage = self._used()
        for run_id in run_ids:
            for owner, size in self._db.execute(
                    "DELETE FROM runs WHERE id = ? RETURNING owner, bytes", (run_id,)):
                usage[owner] = usage.get(owner, 0) - size

    def prune(self, now: float | None = None) -> int:
        """Apply the limits to what is stored: runs ended more than `retention_days` ago go,
        then each owner's oldest ended runs beyond `max_per_user` and beyond the byte caps.
        Returns how many runs went."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            old = db.execute("SELECT id FROM runs WHERE ended IS NOT NULL AND ended < ?",
                             (now - self.limits.retention_days * DAY,)).fetchall()
            self._delete([row[0] for row in old])
            removed = len(old)
            for owner, count in db.execute("SELECT owner, COUNT(*) FROM runs GROUP BY owner "
                                           "HAVING COUNT(*) > ?",
                                           (self.limits.max_per_user,)).fetchall():
                removed += self._drop_oldest_ended(owner, count - self.limits.max_per_user)
            removed += self._prune_bytes()
        if removed:
            # Give the freed pages back to the disk. executescript() steps it to the end;
            # execute() steps once, which frees a single page.
            self._db.executescript("PRAGMA incremental_vacuum;")
        return removed

    def _prune_bytes(self) -> int:
        """Bring owners over their byte cap, then everyone over the total, back under it as
        far as ended runs allow; returns how many runs went."""
        removed = 0
        for owner, used in [*self._used().items()]:
            if used > self.limits.max_bytes_per_user:
                removed += self._prune_down(owner, used - self.limits.max_bytes_per_user)
        return removed + self._prune_down(None, sum(self._used().values())
                                          - self.limits.max_bytes)

    def _prune_down(self, owner: str | None, need: int) -> int:
        """Delete the oldest ended runs (of `owner`, or anyone's) until `need` bytes are
        freed or none is left."""
        victims = self._victims(owner, None, need, [])
        if victims is None:  # not enough: all of them
            sql = "SELECT id, bytes FROM runs WHERE ended IS NOT NULL AND bytes > 0"
            args: list[Any] = []
            if owner is not None:
                sql, args = sql + " AND owner = ?", [owner]
            victims = [(row[0], row[1]) for row in self._db.execute(sql, args)]
        self._delete([run for run, _ in victims])
        return len(victims)


# The store's methods a caller may ask RunStoreThread for.
STORE_METHODS = frozenset({"create", "get", "list", "append_events", "events", "update",
                           "put_output", "outputs", "prune", "interrupt_running",
                           "interrupt_stale"})


class RunStoreThread:
    """A SqliteRunStore on a thread of its own, for the IOLoop: `await call("get", ...)`."""

    def __init__(self, path: Path, limits: RunLimits = DEFAULT_LIMITS) -> None:
        """Open the store on its thread (ConfigError here if the file is unusable)."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runstore")
        try:
            self.store: SqliteRunStore = self._executor.submit(
                SqliteRunStore, path, limits).result()
        except BaseException:
            self._executor.shutdown(wait=True)
            raise
        self._closed = False

    async def call(self, method_name: str, *args: Any, **kwargs: Any) -> Any:
        """Run one of the store's methods on its thread and return (or raise) its result."""
        if method_name not in STORE_METHODS:
            raise AttributeError(f"the run store has no method {method_name!r}")
        method = getattr(self.store, method_name)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor,
                                          functools.partial(method, *args, **kwargs))

    def close(self) -> None:
        """Close the store on its thread, then stop the thread (pending calls finish first)."""
        if self._closed:
            return
        self._closed = True
        self._executor.submit(self.store.close).result()
        self._executor.shutdown(wait=True)
