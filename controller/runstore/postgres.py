"""PostgresRunStore: the run store in a PostgreSQL server (`--database postgresql://...`), which
several controllers may share. The logic is SqlRunStore's (store.py), the same as SQLite's; here
are the connection, its transactions and PostgreSQL's errors.

Writers take one transaction-scoped advisory lock (WRITE_LOCK) first, as SQLite's BEGIN
IMMEDIATE takes the file's lock: every write transaction of every controller runs one after
the other, so the per-user and total byte caps (sums over many runs, even over all owners), the
count of a user's running runs and each run's next seq are read and changed by one writer at a
time. Row locks could not cover a sum over all owners, nor a count of rows not written yet;
SERIALIZABLE would make every call retry on conflicts. Writes are short (milliseconds); reads
take no lock (MVCC) and go on beside a writer. The per-owner sums are read again at each
transaction (another controller may have written): a trigger keeps them in `owner_bytes`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import errors as pgerrors

from marco.errors import BadRequest, ConfigError, InsufficientStorage, MarcoError, TryAgain

from .budget import Budget
from .pgschema import DEFAULT_STATEMENT_TIMEOUT, check_url, connect, masked, migrate
from .records import DEFAULT_LIMITS, RunLimits
from .schema import DEFAULT_BUSY_TIMEOUT
from .store import SqlRunStore

WRITE_LOCK = 0x6D6172636F_02  # pg_advisory_xact_lock key of every write ("marco", 2)
USAGE_OF_OWNERS = "SELECT owner, bytes FROM owner_bytes WHERE bytes > 0"
# Errors that end with the statement while the connection stays usable: another writer held
# the lock past lock_timeout, a statement was cancelled, or transactions collided.
BUSY = (pgerrors.LockNotAvailable, pgerrors.QueryCanceled, pgerrors.SerializationFailure,
        pgerrors.DeadlockDetected)


def placeholders(sql: str) -> str:
    """SQL with `?` placeholders as psycopg's `%s` (a literal % doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


class Row(tuple[Any, ...]):
    """A row read by index or by column name, like sqlite3.Row."""

    names: dict[str, int]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return super().__getitem__(self.names[key])
        return super().__getitem__(key)


def rows_by_name(cursor: Any) -> Any:
    """psycopg row factory: Row objects sharing the cursor's column names."""
    names = {column.name: n for n, column in enumerate(cursor.description or ())}

    def make(values: Sequence[Any]) -> Row:
        row = Row(values)
        row.names = names
        return row

    return make


class Connection:
    """The store's one connection, taking `?` placeholders; opened again on the next call
    after it broke (the server restarted, the network dropped it: that call was TryAgain)."""

    def __init__(self, url: str, busy_timeout: float,
                 statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT) -> None:
        self.url, self.busy_timeout = url, busy_timeout
        self.statement_timeout = statement_timeout
        self._connection: psycopg.Connection[Any] | None = None

    def get(self) -> psycopg.Connection[Any]:
        """The connection, opened again when the last one broke."""
        if self._connection is not None and (self._connection.broken
                                             or self._connection.closed):
            self._connection.close()
            self._connection = None
        if self._connection is None:
            self._connection = connect(self.url, self.busy_timeout, rows_by_name,
                                       self.statement_timeout)
        return self._connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def execute(self, sql: str, parameters: Any = None) -> Any:
        if parameters is None:  # psycopg reads no placeholders then: % stays as written
            return self.get().execute(sql)
        return self.get().execute(placeholders(sql), parameters)

    def executemany(self, sql: str, parameters: Any) -> Any:
        cursor = self.get().cursor()
        cursor.executemany(placeholders(sql), parameters)
        return cursor


class PostgresRunStore(SqlRunStore):
    """The run store in PostgreSQL (use it from one thread: see RunStoreThread)."""

    TITLE_CONTAINS = 'strpos(lower(title COLLATE "C"), lower(? COLLATE "C")) > 0'  # ASCII only
    EVENT_SIZE = "octet_length(type) + octet_length(body)"
    GREATEST = "GREATEST"
    ORDER = "position"
    NO_LIMIT = None

    def __init__(self, url: str, limits: RunLimits = DEFAULT_LIMITS,
                 busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
                 statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT) -> None:
        """Connect and migrate; ConfigError when the server cannot be reached or refuses
        (the message never shows the URL's password). A statement waits up to
        `busy_timeout` seconds for a lock another connection holds and runs at most
        `statement_timeout` seconds, then the call raises TryAgain."""
        self.url, self.limits = url, limits
        self.where = masked(url)
        check_url(url)  # before any connection: libpq's parse errors quote the password
        self._pg = Connection(url, busy_timeout, statement_timeout)
        self._db = self._pg
        self._budget = Budget(self._pg, limits, USAGE_OF_OWNERS)
        self._cursors = itertools.count()
        try:
            migrate(self._pg.get(), self.where)
        except psycopg.Error as error:
            self._pg.close()
            raise ConfigError(f"the runs database {self.where} is unusable: {error}",
                              hint="check --database, that the server runs and that its role "
                                   "may connect and create tables") from None
        except BaseException:
            self._pg.close()
            raise

    def close(self) -> None:
        self._pg.close()

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """One write transaction: all of it or nothing, after every other controller's
        (WRITE_LOCK); the per-owner sums are read afresh (another controller may have
        written since, or this one rolled back)."""
        with self._pg.get().transaction():
            self._pg.execute("SELECT pg_advisory_xact_lock(?)", (WRITE_LOCK,))
            self._budget.forget()
            yield self._pg

    @contextmanager
    def _lazy_rows(self, sql: str, args: Sequence[Any], batch: int) -> Iterator[Iterator[Any]]:
        """A server-side cursor in a read transaction: `batch` rows per fetch."""
        connection = self._pg.get()
        with connection.transaction():
            with connection.cursor(name=f"marco_read_{next(self._cursors)}") as cursor:
                cursor.itersize = batch
                cursor.execute(placeholders(sql), args)
                yield iter(cursor)

    def _storage_error(self, error: Exception) -> MarcoError | None:
        """PostgreSQL's errors in the ladder, decided by their class (their SQLSTATE)."""
        if isinstance(error, pgerrors.DiskFull):
            return InsufficientStorage("the runs database's disk is full")
        if isinstance(error, BUSY):
            return TryAgain("the runs database is busy (another controller holds it)",
                            hint="try again in a moment")
        if isinstance(error, (psycopg.OperationalError, psycopg.InterfaceError)):
            return TryAgain(f"the runs database {self.where} cannot be reached",
                            hint="try again in a moment")
        if isinstance(error, psycopg.DataError):
            return BadRequest("a value the runs database cannot store or compare")
        return None

    def _is_duplicate(self, error: Exception) -> bool:
        return isinstance(error, pgerrors.UniqueViolation)
