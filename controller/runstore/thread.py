"""RunStoreThread: a run store on a thread of its own, so that its connection is used from one
thread only and an IOLoop never blocks on disk or on the database server."""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from marco.errors import TryAgain

from .location import open_store
from .pgschema import DEFAULT_STATEMENT_TIMEOUT
from .records import DEFAULT_LIMITS, RunLimits
from .schema import DEFAULT_BUSY_TIMEOUT
from .store import SqlRunStore

# The store's methods a caller may ask RunStoreThread for.
STORE_METHODS = frozenset({"create", "get", "list", "append_events", "events", "update",
                           "add_output", "execution", "stored_ids", "executions", "output_page",
                           "scan_output",
                           "mark_swept", "swept", "add_nodes", "nodes", "events_page",
                           "prune", "interrupt_running",
                           "interrupt_stale"})
DEFAULT_MAX_WAITING = 256  # calls queued for the store's thread (the controller's runs_store_queue)


class RunStoreThread:
    """A run store on a thread of its own, for the IOLoop: `await call("get", ...)`.
    `database`: a SQLite file's path or a postgresql:// URL (location.run_database)."""

    def __init__(self, database: Path | str, limits: RunLimits = DEFAULT_LIMITS,
                 busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
                 statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT,
                 max_waiting: int = DEFAULT_MAX_WAITING) -> None:
        """Open the store on its thread (ConfigError here if it is unusable). At most
        `max_waiting` calls wait for (or run on) the thread; more are TryAgain at once, so a
        stalled database holds a bounded queue, not every run request of the controller."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runstore")
        self.max_waiting = max_waiting
        self.waiting = 0  # calls submitted and not yet returned (changed on the loop only)
        try:
            self.store: SqlRunStore = self._executor.submit(
                open_store, database, limits, busy_timeout, statement_timeout).result()
        except BaseException:
            self._executor.shutdown(wait=True)
            raise
        self._closed = False

    async def call(self, method_name: str, *args: Any, **kwargs: Any) -> Any:
        """Run one of the store's methods on its thread and return (or raise) its result."""
        if method_name not in STORE_METHODS:
            raise AttributeError(f"the run store has no method {method_name!r}")
        if self.waiting >= self.max_waiting:
            raise TryAgain(f"the run store has {self.waiting} calls waiting (the database is "
                           "slow or stalled)", hint="try again in a moment")
        method = getattr(self.store, method_name)
        loop = asyncio.get_running_loop()
        self.waiting += 1
        try:
            return await loop.run_in_executor(self._executor,
                                              functools.partial(method, *args, **kwargs))
        finally:
            self.waiting -= 1

    def close(self) -> None:
        """Close the store on its thread, then stop the thread (pending calls finish first)."""
        if self._closed:
            return
        self._closed = True
        self._executor.submit(self.store.close).result()
        self._executor.shutdown(wait=True)
