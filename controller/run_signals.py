"""Waking the requests that wait for a run's next events (`GET /api/runs/ID?wait=S`).

A long poll: an open run page asks for the events after the last one it has and the controller
answers as soon as a batch arrives or the run ends, so a task's result reaches its cell as it
happens rather than at the page's next poll. Each user holds at most `max_per_user` waiting
requests; beyond that a request answers at once, as without `wait`.

Two controllers on one database (controller/shared_state.py): a change made here is also
published (`on_change`), and a change another controller published wakes the waits here
(`wake`), so a run page on one follows a run recorded through the other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .user_slots import UserSlots


class Waiter:
    """One request's wait for a run to change; `await wait(timeout)` returns early on a change."""

    def __init__(self, future: asyncio.Future[None] | None) -> None:
        self._future = future

    @property
    def admitted(self) -> bool:
        """Whether this request may wait (False: its user already holds the most waits)."""
        return self._future is not None

    async def wait(self, timeout: float) -> None:
        """Until the run changes, the controller stops, or `timeout` seconds pass."""
        if self._future is None or timeout <= 0:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._future), timeout)
        except TimeoutError:
            pass


class RunSignals:
    """Who waits for which run, and the per-user bound on waiting requests."""

    def __init__(self, max_per_user: int) -> None:
        self.slots = UserSlots(max_per_user)
        self._waiting: dict[str, set[asyncio.Future[None]]] = {}
        self._publish: Callable[[str], None] | None = None

    def on_change(self, publish: Callable[[str], None]) -> None:
        """Tell `publish` of every change made here (the other controllers wake on it)."""
        self._publish = publish

    @contextmanager
    def waiter(self, owner: str, run_id: str) -> Iterator[Waiter]:
        """A wait registered before the caller reads the run, so a batch stored between that
        read and the wait still wakes it."""
        with self.slots.admit(owner) as admitted:
            if not admitted:
                yield Waiter(None)
                return
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting.setdefault(run_id, set()).add(future)
            try:
                yield Waiter(future)
            finally:
                futures = self._waiting.get(run_id)
                if futures is not None:
                    futures.discard(future)
                    if not futures:
                        del self._waiting[run_id]

    def changed(self, run_id: str) -> None:
        """The run has new events or has ended here: wake everyone waiting for it, here and
        (published) on the other controllers."""
        self.wake(run_id)
        if self._publish is not None:
            self._publish(run_id)

    def wake(self, run_id: str) -> None:
        """Wake the requests waiting here for the run (it changed, here or elsewhere)."""
        for future in self._waiting.pop(run_id, ()):
            if not future.done():
                future.set_result(None)

    def wake_all(self) -> None:
        """Every waiting request answers now (the controller stops, or changes published
        elsewhere may have been missed): each reads the store again."""
        for run_id in list(self._waiting):
            self.wake(run_id)

    def close(self) -> None:
        """The controller stops: every waiting request answers now."""
        self.wake_all()
