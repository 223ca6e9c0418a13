"""Where the runs live, from the controller's `database` setting, and the store for it."""

from __future__ import annotations

from pathlib import Path

from marco.errors import ConfigError

from .pgschema import DEFAULT_STATEMENT_TIMEOUT
from .postgres import PostgresRunStore
from .records import DEFAULT_LIMITS, RunLimits
from .schema import DEFAULT_BUSY_TIMEOUT
from .sqlite import SqliteRunStore
from .store import SqlRunStore

DEFAULT_FILE = "runs.sqlite3"  # in the state dir
SQLITE_SCHEME = "sqlite://"


def is_postgres_url(database: str | Path) -> bool:
    return isinstance(database, str) and database.startswith(("postgresql://", "postgres://"))


def run_database(setting: str, state_dir: Path) -> Path | str:
    """A postgresql:// (or postgres://) URL as given; a SQLite file as a path or a
    sqlite:///PATH URL (relative paths from the state dir); empty: STATE_DIR/runs.sqlite3.
    ConfigError for any other URL."""
    if not setting:
        return state_dir / DEFAULT_FILE
    if is_postgres_url(setting):
        return setting
    if setting.startswith(SQLITE_SCHEME):
        path = setting[len(SQLITE_SCHEME):]
        if not path.startswith("/") or path == "/":
            raise ConfigError(f"database {setting!r}: a SQLite URL is sqlite:///ABSOLUTE/PATH")
        return Path(path)
    if "://" in setting:
        raise ConfigError(f"database: {setting.split('://', 1)[0]}:// is not a database Marco "
                          "knows", hint="a postgresql:// URL or a SQLite file path")
    return state_dir / setting  # an absolute path stays as it is


def open_store(database: Path | str, limits: RunLimits = DEFAULT_LIMITS,
               busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
               statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT) -> SqlRunStore:
    """The store for `database` (run_database's answer), opened and migrated;
    `statement_timeout` bounds each statement on a PostgreSQL server."""
    if is_postgres_url(database):
        return PostgresRunStore(str(database), limits, busy_timeout, statement_timeout)
    return SqliteRunStore(Path(database), limits, busy_timeout)
