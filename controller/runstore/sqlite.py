"""SqliteRunStore: the embedded run store, one SQLite file under the state dir (WAL, mode 0600,
schema versions applied in order at open, schema.py). The logic is SqlRunStore's (store.py);
here are the file, its transactions and SQLite's errors. The store keeps the per-owner sums in
memory (budget.py): one process owns the file.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from marco.errors import InsufficientStorage, MarcoError

from .budget import Budget
from .records import DEFAULT_LIMITS, RunLimits
from .schema import DEFAULT_BUSY_TIMEOUT, is_busy, open_database, try_again
from .store import RC_MAX, RC_MIN, SqlRunStore

__all__ = ["RC_MAX", "RC_MIN", "SqliteRunStore"]

SQLITE_FULL = 13  # sqlite3.Error.sqlite_errorcode of "database or disk is full"


class SqliteRunStore(SqlRunStore):
    """The embedded run store: one SQLite file (use it from one thread: see RunStoreThread)."""

    # Versions 1 and 2 kept an output whole in its row's `data`, unused since (NOT NULL).
    REGISTER = ("INSERT INTO outputs (run_id, execution_id, host, node, task_id, archived, "
                "bytes, data, next_seq) VALUES (?, ?, ?, ?, ?, 0, 0, x'', 0)")

    def __init__(self, path: Path, limits: RunLimits = DEFAULT_LIMITS,
                 busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> None:
        """Open (and migrate) the file; a statement waits up to `busy_timeout` seconds for a
        lock another connection holds, then the call raises TryAgain."""
        self.path, self.limits = path, limits
        self._sqlite = open_database(path, busy_timeout)
        self._sqlite.row_factory = sqlite3.Row
        self._db = self._sqlite
        self._budget = Budget(self._sqlite, limits)

    def close(self) -> None:
        self._sqlite.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it or nothing (BEGIN IMMEDIATE: one writer at a
        time, the file's lock taken at the start)."""
        self._sqlite.execute("BEGIN IMMEDIATE")
        try:
            yield self._sqlite
            self._sqlite.execute("COMMIT")
        except BaseException:
            self._budget.forget()
            if self._sqlite.in_transaction:
                self._sqlite.execute("ROLLBACK")
            raise

    def _storage_error(self, error: Exception) -> MarcoError | None:
        """Another connection holding the lock past the busy timeout is TryAgain (503), a
        full disk InsufficientStorage (decided by SQLite's error code, never its message)."""
        if is_busy(error):
            return try_again()
        if getattr(error, "sqlite_errorcode", None) == SQLITE_FULL:
            return InsufficientStorage("the controller's disk is full")
        return None

    def _is_duplicate(self, error: Exception) -> bool:
        return isinstance(error, sqlite3.IntegrityError)

    def _after_prune(self) -> None:
        # Give the freed pages back to the disk. executescript() steps it to the end;
        # execute() steps once, which frees a single page.
        self._sqlite.executescript("PRAGMA incremental_vacuum;")
