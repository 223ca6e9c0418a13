"""The agent's file helper forked by the user's warm module runner, seen as a subprocess.

`FileWriter` and `FileReader` (agent.files) speak to the helper through what they use of an
`asyncio.subprocess.Process`: `stdin` (a StreamWriter), `stdout` and `stderr` (StreamReaders),
`wait()`, `returncode` and `kill()`. `RunnerHelper` gives them the same over the three pipes the
agent made: the runner got only the child's ends (agent.runners, op `helper`), the agent keeps
its own, and the exit and signals go through the runner, never to a pid it reported.

The runner is the user's process: it may keep the pipe ends it received and report `exited`
whenever it likes. So the agent never waits for EOF from it: once `exited` is reported, what
the pipes hold is read and the rest is EOF, and `close` (called when the operation is over)
closes the agent's ends whatever the runner kept.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Protocol

from .runners import Launched, RunnerDeclined, RunnerDied, RunnerPool
from .users import UserIdentity

LOST = -signal.SIGKILL  # the returncode of a helper whose runner died before reporting its exit
DRAIN_MAX = 1024 * 1024  # bytes read from a pipe after the exit report (pipe-max-size's default)


class HelperProcess(Protocol):
    """What the file service uses of a helper process (cold or forked by a runner)."""

    @property
    def stdin(self) -> asyncio.StreamWriter | None: ...

    @property
    def stdout(self) -> asyncio.StreamReader | None: ...

    @property
    def stderr(self) -> asyncio.StreamReader | None: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    def kill(self) -> None: ...

    def close(self) -> None: ...


class RunnerHelper:
    """A file helper a runner forked: the agent's ends of its pipes and its exit."""

    def __init__(self, launched: Launched) -> None:
        self.launched = launched
        self.stdin: asyncio.StreamWriter | None = None
        self.stdout: asyncio.StreamReader | None = None
        self.stderr: asyncio.StreamReader | None = None
        self.returncode: int | None = None
        self._transports: list[asyncio.BaseTransport] = []
        self._readers: list[tuple[asyncio.StreamReader, asyncio.ReadTransport]] = []

    async def attach(self, stdin_w: int | None, stdout_r: int, stderr_r: int,
                     limit: int) -> None:
        """Wrap the agent's ends (owned from here on, closed on failure) in streams."""
        loop = asyncio.get_running_loop()
        fds = [fd for fd in (stdin_w, stdout_r, stderr_r) if fd is not None]
        try:
            self.stdout = await self._reader(loop, stdout_r, limit)
            fds.remove(stdout_r)
            self.stderr = await self._reader(loop, stderr_r, limit)
            fds.remove(stderr_r)
            if stdin_w is not None:
                transport, protocol = await loop.connect_write_pipe(
                    asyncio.streams.FlowControlMixin, open(stdin_w, "wb", buffering=0))
                fds.remove(stdin_w)
                self._transports.append(transport)
                self.stdin = asyncio.StreamWriter(transport, protocol, None, loop)
        except BaseException:
            _close_fds(fds)
            self.close()
            raise
        self.launched.exited.add_done_callback(self._exited)

    async def _reader(self, loop: asyncio.AbstractEventLoop, fd: int,
                      limit: int) -> asyncio.StreamReader:
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader, loop=loop), open(fd, "rb", buffering=0))
        self._transports.append(transport)
        self._readers.append((reader, transport))
        return reader

    def _exited(self, _: asyncio.Future[int]) -> None:
        """The exit report ends the pipes: what they hold now is read, the rest is EOF (a
        runner that kept the write ends makes no reader wait), and the agent's ends are closed."""
        for reader, transport in self._readers:
            if not transport.is_closing():
                pipe = transport.get_extra_info("pipe")
                if pipe is not None:
                    _drain(pipe.fileno(), reader)
                reader.feed_eof()
        self.close()

    async def wait(self) -> int:
        """The helper's exit code as the runner reported it (LOST if the runner died)."""
        if self.returncode is None:
            try:
                status = await asyncio.shield(self.launched.exited)
            except (RunnerDied, RunnerDeclined):
                code = LOST
            else:
                code = os.waitstatus_to_exitcode(status)
            if self.returncode is None:
                self.returncode = code
        return self.returncode

    def kill(self) -> None:
        """SIGKILL through the runner (as the user: the kernel bounds it to the user's own
        processes) and close the agent's ends: whatever the runner does, nothing of the
        agent's waits on them."""
        if self.returncode is None and not self.launched.exited.done():
            self.launched.signal(signal.SIGKILL)
        self.close()

    def close(self) -> None:
        """The operation is over: the agent's ends are closed now (aborted, not flushed), and
        the runner may count the helper out of its tasks once it reports it ended."""
        for transport in self._transports:
            if isinstance(transport, asyncio.WriteTransport):
                if not transport.is_closing() or transport.get_write_buffer_size():
                    transport.abort()  # a close() still flushing waits on the user: dropped
            elif not transport.is_closing():
                transport.close()
        self.launched.release()


async def start_helper(pool: RunnerPool, user: UserIdentity, interpreter: str,
                       argv: list[str], source: str, *, writes: bool,
                       limit: int) -> RunnerHelper | None:
    """The file helper forked by a live runner of `user` on `interpreter` (a realpath), or
    None: no such runner, or it failed before the helper started (the caller starts it
    cold). `writes`: the helper reads the upload from stdin; else stdin is /dev/null."""
    if pool.helper_runner(user, interpreter) is None:
        return None
    child, own = _pipes(writes)
    try:
        launched = await pool.file_helper(user, interpreter, argv, source, child)
    except BaseException:
        _close_fds(own)
        raise
    finally:
        _close_fds(child)  # the runner has its copies (or none): EOF comes when the child ends
    if launched is None:
        _close_fds(own)
        return None
    helper = RunnerHelper(launched)
    stdin_w = own[0] if writes else None
    stdout_r, stderr_r = own[-2:]
    try:
        await helper.attach(stdin_w, stdout_r, stderr_r, limit)
    except BaseException:
        launched.signal(signal.SIGKILL)
        launched.release()
        raise
    return helper


def _drain(fd: int, reader: asyncio.StreamReader) -> None:
    """Feed `reader` what the non-blocking pipe `fd` holds now, at most DRAIN_MAX bytes."""
    left = DRAIN_MAX
    while left > 0:
        try:
            data = os.read(fd, min(left, 65536))
        except (BlockingIOError, InterruptedError, OSError):
            return
        if not data:
            return
        reader.feed_data(data)
        left -= len(data)


def _pipes(writes: bool) -> tuple[tuple[int, int, int], tuple[int, ...]]:
    """((stdin, stdout, stderr) for the child, the agent's ends), all close-on-exec: the
    agent's ends are (stdin_w, stdout_r, stderr_r), or (stdout_r, stderr_r) with /dev/null
    as the child's stdin."""
    made: list[int] = []
    try:
        if writes:
            stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
            made += [stdin_r, stdin_w]
        else:
            stdin_r = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            made.append(stdin_r)
        stdout_r, stdout_w = os.pipe2(os.O_CLOEXEC)
        made += [stdout_r, stdout_w]
        stderr_r, stderr_w = os.pipe2(os.O_CLOEXEC)
    except BaseException:
        _close_fds(made)
        raise
    own = (stdin_w, stdout_r, stderr_r) if writes else (stdout_r, stderr_r)
    return (stdin_r, stdout_w, stderr_w), own


def _close_fds(fds: tuple[int, ...] | list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
