"""The runs database's file and schema: versions in `PRAGMA user_version`, applied in order at
open, each in one transaction with its version number."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

from marco.errors import ConfigError, TryAgain

from . import chunks

SQLITE_BUSY, SQLITE_LOCKED = 5, 6  # sqlite3.Error.sqlite_errorcode: another connection holds it
BUSY_CODES = frozenset({SQLITE_BUSY, SQLITE_LOCKED})
DEFAULT_BUSY_TIMEOUT = 5.0  # seconds a statement waits for another connection's lock

# One step of a migration: an SQL statement, or a function for what SQL cannot say.
Step = str | Callable[[sqlite3.Connection], None]


def outputs_to_chunks(db: sqlite3.Connection) -> None:
    """Migration 3: each output stored whole becomes its execution's first chunk (the same
    compressed bytes, so the run's charge stays; events out of seq order, which nothing should
    have stored, are dropped and the charge follows)."""
    for (rowid,) in db.execute("SELECT rowid FROM outputs").fetchall():  # one blob at a time
        run_id, execution_id, size, data = db.execute(
            "SELECT run_id, execution_id, bytes, data FROM outputs WHERE rowid = ?",
            (rowid,)).fetchone()
        events = chunks.decode(data) if data else []
        kept = chunks.in_order(events)
        if kept != events:
            data = chunks.encode(kept)
        if kept:
            db.execute("INSERT INTO chunks (run_id, execution_id, first_seq, next_seq, bytes, "
                       "data) VALUES (?, ?, ?, ?, ?, ?)",
                       (run_id, execution_id, kept[0]["seq"], chunks.end_of(kept[-1]),
                        len(data), data))
        stored = len(data) if kept else 0
        db.execute("UPDATE outputs SET next_seq = ?, bytes = ?, data = x'' WHERE rowid = ?",
                   (chunks.end_of(kept[-1]) if kept else 0, stored, rowid))
        db.execute("UPDATE runs SET bytes = bytes + ? WHERE id = ?", (stored - size, run_id))

# Schema versions: MIGRATIONS[n - 1] takes a file from version n - 1 to n (never edit one that
# has shipped; append a new one). `bytes` on a run is what its events and outputs take.
MIGRATIONS: list[tuple[Step, ...]] = [
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
    # Output kept as it happens, read in pages: an execution's row (`outputs`, its `data`
    # unused from now on) says how far it is stored; its lines are in `chunks`, one per
    # add_output, found by their first seq. `swept`: the nodes whose executions of a run are
    # all stored (nobody needs to ask them again).
    (
        "ALTER TABLE outputs ADD COLUMN node TEXT",
        "ALTER TABLE outputs ADD COLUMN next_seq INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE outputs ADD COLUMN truncated_seq INTEGER",
        """CREATE TABLE chunks (
            run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            execution_id TEXT NOT NULL, first_seq INTEGER NOT NULL, next_seq INTEGER NOT NULL,
            bytes INTEGER NOT NULL, data BLOB NOT NULL,
            PRIMARY KEY (run_id, execution_id, first_seq))""",
        """CREATE TABLE swept (
            run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE, node TEXT NOT NULL,
            PRIMARY KEY (run_id, node))""",
        outputs_to_chunks,
        "UPDATE outputs SET node = host",
    ),
    # Reading one node's, host's or task's executions of a run finds them by index instead of
    # scanning the run (a run may hold tens of thousands); `nodes`: the nodes a run's output
    # is on beyond its hosts (delegates), so the final collection and the read side ask them.
    (
        "CREATE INDEX outputs_by_node ON outputs (run_id, node)",
        "CREATE INDEX outputs_by_host ON outputs (run_id, host)",
        "CREATE INDEX outputs_by_task ON outputs (run_id, task_id)",
        """CREATE TABLE nodes (
            run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE, node TEXT NOT NULL,
            PRIMARY KEY (run_id, node))""",
    ),
    # An execution's times and exit code as its agent gave them (the run page shows how long
    # each one took, after the agent has forgotten it).
    (
        "ALTER TABLE outputs ADD COLUMN started REAL",
        "ALTER TABLE outputs ADD COLUMN ended REAL",
        "ALTER TABLE outputs ADD COLUMN rc INTEGER",
    ),
]


def schema_version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def migrate(db: sqlite3.Connection, path: Path,
            migrations: Sequence[tuple[Step, ...]] = MIGRATIONS) -> int:
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
            for step in statements:
                if isinstance(step, str):
                    db.execute(step)
                else:
                    step(db)
            db.execute(f"PRAGMA user_version = {number}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return len(migrations)


def is_busy(error: BaseException) -> bool:
    """Another connection holds the lock this statement needed (past the busy timeout)."""
    return isinstance(error, sqlite3.OperationalError) \
        and getattr(error, "sqlite_errorcode", None) in BUSY_CODES


def try_again() -> TryAgain:
    return TryAgain("the runs database is busy (another process holds it)",
                    hint="try again in a moment")


def open_database(path: Path, busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> sqlite3.Connection:
    """The connection, on a file only its owner can read (SQLite gives its -wal and -shm
    files the same mode); a statement waits up to `busy_timeout` seconds for a lock another
    connection holds."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    os.chmod(path, 0o600)
    # Transactions are explicit (isolation_level None).
    db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    try:
        # Pruned runs give their pages back (prune); this only takes on a new file, before WAL.
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA foreign_keys = ON")
        migrate(db, path)
    except sqlite3.DatabaseError as error:
        db.close()
        if is_busy(error):
            raise try_again() from error
        raise ConfigError(f"the runs database {path} is unusable: {error}",
                          hint="move the file away (its runs are lost) or restore a backup"
                          ) from error
    except BaseException:
        db.close()
        raise
    return db
