"""The runs database's file and schema: versions in `PRAGMA user_version`, applied in order at
open, each in one transaction with its version number."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from marco.errors import ConfigError

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
