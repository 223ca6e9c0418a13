"""An execution whose child a module runner forks: its pipes, its stdin, its exit.

The agent makes the three pipes and keeps its ends, so the child's output reaches
`Execution.on_output` exactly as a child the agent forks itself; only the start, the exit
status and signals go through the runner (agent.runners). The exit is reported as the cold
path's `/bin/sh -c 'python && sleep 0'` reports it: a child killed by signal N ends with rc
128+N and the shell's message on stderr, unless the agent itself stopped it.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from .ansiballz import cold_exit
from .child_end import STDERR, STDOUT, ChildEnd
from .runners import Launched, RunnerDied

if TYPE_CHECKING:
    from .executions import Execution

RUNNER_DIED = b"marco-agent: the module runner died during this task; it was killed\n"


class _PipeReader(asyncio.Protocol):
    """One of the child's output pipes, fed into the execution."""

    def __init__(self, child: WarmChild, fd: int) -> None:
        self.child = child
        self.fd = fd

    def data_received(self, data: bytes) -> None:
        self.child.execution.on_output(self.fd, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.child.pipe_closed(self.fd)


class WarmChild:
    """Ends the execution once the runner reports the child's exit and both pipes are closed,
    or `linger` seconds after the exit (a background grandchild may hold them open forever)."""

    def __init__(self, execution: Execution, on_finished: Callable[[int | None], None],
                 linger: float, on_lost: Callable[[], None]) -> None:
        self.execution = execution
        self.on_finished = on_finished
        self.on_lost = on_lost  # kills what is left of the task when its runner died
        self.launched: Launched | None = None
        self.transports: dict[int, asyncio.BaseTransport] = {}
        self.returncode: int | None = None
        self._shell_message = b""  # what the cold path's shell would print after the exit
        self.end = ChildEnd(self._over, self.close, linger)

    async def attach(self, stdout_r: int, stderr_r: int, stdin_w: int, stdin: bytes) -> None:
        """Read the output pipes and feed stdin (then EOF); takes ownership of the fds."""
        loop = asyncio.get_running_loop()
        for fd, pipe in ((STDOUT, stdout_r), (STDERR, stderr_r)):
            transport, _ = await loop.connect_read_pipe(
                lambda fd=fd: _PipeReader(self, fd), open(pipe, "rb", buffering=0))  # type: ignore[misc]
            self.transports[fd] = transport
        writer, _ = await loop.connect_write_pipe(asyncio.Protocol,
                                                  open(stdin_w, "wb", buffering=0))
        stdin_pipe = writer
        if stdin:
            stdin_pipe.write(stdin)
        stdin_pipe.close()  # after the buffer drains: the child reads its script to EOF

    def watch(self, launched: Launched) -> None:
        self.launched = launched
        launched.exited.add_done_callback(self._exited)

    def signal(self, signum: int) -> None:
        if self.launched is not None and not self.end.exited:
            self.launched.signal(signum)

    def _exited(self, future: asyncio.Future[int]) -> None:
        execution = self.execution
        try:
            status = future.result()
        except (RunnerDied, asyncio.CancelledError):
            # Nobody can tell how it ends: it ends now, rather than go on unseen.
            self.returncode, self._shell_message = None, RUNNER_DIED
            self.on_lost()
        else:
            code = os.waitstatus_to_exitcode(status)
            if code < 0 and not (execution.stopped or execution.timed_out):
                self.returncode, self._shell_message = cold_exit(-code, os.WCOREDUMP(status))
            else:
                self.returncode = code
        self.end.child_exited()

    def pipe_closed(self, fd: int) -> None:
        self.end.pipe_closed(fd)

    def close(self) -> None:
        for transport in self.transports.values():
            transport.close()

    def _over(self) -> None:
        if self._shell_message:
            self.execution.on_output(STDERR, self._shell_message)
        self.on_finished(self.returncode)


def make_pipes(pipe_size: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """((stdin_r, stdout_w, stderr_w) for the child, (stdin_w, stdout_r, stderr_r) for the
    agent), all close-on-exec; the output pipes enlarged so a chatty child runs ahead."""
    stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
    stdout_r, stdout_w = os.pipe2(os.O_CLOEXEC)
    stderr_r, stderr_w = os.pipe2(os.O_CLOEXEC)
    for fd in (stdout_r, stderr_r):
        try:
            fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), pipe_size)
        except OSError:
            pass  # over pipe-max-size: keep the default
    return (stdin_r, stdout_w, stderr_w), (stdin_w, stdout_r, stderr_r)


def close_all(fds: tuple[int, ...]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
