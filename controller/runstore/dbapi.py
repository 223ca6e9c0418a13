"""What the run store needs of a database connection and its rows: the part of Python's DB-API
that sqlite3 and the PostgreSQL adapter (postgres.py) both give, with `?` placeholders."""

from __future__ import annotations

from typing import Any, Protocol


class Row(Protocol):
    """A result row read by column name or index (sqlite3.Row, postgres.py's Row)."""

    def __getitem__(self, key: Any, /) -> Any: ...


class Database(Protocol):
    """A connection taking SQL with `?` placeholders (sqlite3.Connection, postgres.py's)."""

    def execute(self, sql: str, parameters: Any = ..., /) -> Any: ...
    def executemany(self, sql: str, parameters: Any, /) -> Any: ...
