"""When a child is over: it exited and its output pipes closed, or a while after its exit."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

STDOUT, STDERR = 1, 2


class ChildEnd:
    """Calls `on_over` once, when the child has exited and both its stdout and stderr pipes
    are closed. A background grandchild may hold the pipes open forever, so `linger` seconds
    after the exit `give_up` closes them and the child is over anyway."""

    def __init__(self, on_over: Callable[[], None], give_up: Callable[[], None],
                 linger: float) -> None:
        self.on_over = on_over
        self.give_up = give_up
        self.linger = linger
        self.open_pipes = {STDOUT, STDERR}
        self.exited = False
        self.over = False
        self._timer: asyncio.TimerHandle | None = None

    def pipe_closed(self, fd: int) -> None:
        self.open_pipes.discard(fd)
        self._check()

    def child_exited(self) -> None:
        self.exited = True
        if self.open_pipes:
            self._timer = asyncio.get_running_loop().call_later(self.linger, self._give_up)
        self._check()

    def _give_up(self) -> None:
        self.give_up()
        self.open_pipes.clear()
        self._check()

    def _check(self) -> None:
        if self.exited and not self.open_pipes and not self.over:
            self.over = True
            if self._timer is not None:
                self._timer.cancel()
            self.on_over()
