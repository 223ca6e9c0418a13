"""The run store: runs, their events and their executions' output (docs/runs.md "Storage").

`RunStore` is the interface (interface.py). `SqlRunStore` (store.py) is its logic in SQL both
stores run, its byte caps kept by budget.py: `SqliteRunStore` (sqlite.py) is the embedded
default on the schema of schema.py, `PostgresRunStore` (postgres.py) a PostgreSQL server, which
several controllers may share, on the schema of pgschema.py; location.py picks one from the
`database` setting. `RunStoreThread` (thread.py) serves an IOLoop. The values and their checks
are in records.py.
"""

from .chunks import MAX_PAGE_LINES, MAX_SEQ
from .interface import RunStore
from .location import is_postgres_url, open_store, run_database
from .postgres import PostgresRunStore
from .records import (
    DEFAULT_LIMITS,
    MAX_EVENT_BYTES,
    MAX_EVENTS_PER_CALL,
    MAX_EVENTS_READ,
    MAX_HOSTS,
    MAX_LIST,
    MAX_META_BYTES,
    MAX_NAME,
    MAX_TITLE,
    ExecutionRecord,
    Run,
    RunLimits,
    check_hosts,
    new_run_id,
)
from .schema import DEFAULT_BUSY_TIMEOUT, MIGRATIONS, migrate, open_database, schema_version
from .sqlite import SqliteRunStore
from .store import SqlRunStore
from .thread import STORE_METHODS, RunStoreThread

__all__ = [
    "DEFAULT_BUSY_TIMEOUT", "DEFAULT_LIMITS", "MAX_EVENTS_PER_CALL", "MAX_EVENTS_READ",
    "MAX_EVENT_BYTES", "MAX_HOSTS", "MAX_LIST", "MAX_META_BYTES", "MAX_NAME", "MAX_PAGE_LINES",
    "MAX_SEQ", "MAX_TITLE",
    "MIGRATIONS", "STORE_METHODS", "ExecutionRecord", "PostgresRunStore", "Run", "RunLimits",
    "RunStore", "RunStoreThread", "SqlRunStore", "SqliteRunStore", "check_hosts",
    "is_postgres_url", "migrate", "new_run_id", "open_database", "open_store", "run_database",
    "schema_version",
]
