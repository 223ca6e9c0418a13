"""A harness for agent.runners' RunnerPool without an agent: a pool with a started Isolation,
tasks launched as an execution would launch them, each scenario in a forked process; and the
first lines of a fake runner (its hello), for tests that script a runner's side by hand."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import secrets
import signal
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from agent.ansiballz import ModuleCommand, module_command
from agent.isolation import Isolation, IsolationSettings
from agent.runners import Launched, RunnerDied, RunnerPool, RunnerSettings
from agent.users import UserIdentity, UserResolver
from tests.support.ansiballz_payloads import PIPELINED

PIPE_SIZE = 1024 * 1024
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
SCENARIO_SECONDS = 120.0


# -- the harness -------------------------------------------------------------------------------

def in_child(scenario: Callable[[], Awaitable[None]]) -> None:
    """Run `scenario` on a fresh loop in a forked process; its failure fails the test."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        os.close(read_end)
        code = 0
        try:
            asyncio.run(asyncio.wait_for(scenario(), SCENARIO_SECONDS))
        except BaseException:
            os.write(write_end, traceback.format_exc().encode())
            code = 1
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as report:
        failure = report.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and not failure, failure or status


async def until(predicate: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    """Await `predicate()` being true (returned), polling, with a deadline."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)
    return value


@asynccontextmanager
async def pool_of(source: str | None = None, **settings: Any) -> AsyncIterator[RunnerPool]:
    """A RunnerPool with a started Isolation, closed after."""
    isolation = Isolation(IsolationSettings())
    isolation.start()
    pool = RunnerPool(UserResolver(), isolation, RunnerSettings(**settings), source=source)
    try:
        yield pool
    finally:
        await pool.close()
        await isolation.close()


@dataclass
class Ran:
    launched: Launched
    status: int
    stdout: bytes
    stderr: bytes

    @property
    def rc(self) -> int:
        return os.waitstatus_to_exitcode(self.status)

    def result(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.stdout)
        return result


def _pipe() -> tuple[int, int]:
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    fcntl.fcntl(write_end, F_SETPIPE_SZ, PIPE_SIZE)  # the payload fits: no writer task
    return read_end, write_end


@dataclass
class Started:
    """A launched task: its execution id, the Launched, its output pipes."""

    pool: RunnerPool
    execution_id: str
    launched: Launched
    stdout: int
    stderr: int

    async def ended(self) -> Ran:
        """Its end and its output; RunnerDied after its leftovers were killed."""
        try:
            status = await self.launched.exited
        except RunnerDied:  # the caller ends the execution: what the task left is killed
            self.pool.isolation.signal(self.execution_id, signal.SIGKILL)
            raise
        finally:
            self.pool.isolation.finished(self.execution_id)
        loop = asyncio.get_running_loop()
        out, err = await asyncio.gather(loop.run_in_executor(None, _read_all, self.stdout),
                                        loop.run_in_executor(None, _read_all, self.stderr))
        return Ran(self.launched, status, out, err)


async def start_task(pool: RunnerPool, user: UserIdentity, payload: bytes) -> Started:
    """Launch `payload` as an execution would (its own cgroup, pipes, clean environment)."""
    module = command_of(payload)
    execution_id = secrets.token_hex(8)
    stdin_r, stdin_w = _pipe()
    stdout_r, stdout_w = _pipe()
    stderr_r, stderr_w = _pipe()
    env = {**user.clean_environment(), "MARCO_EXECUTION_ID": execution_id}
    try:
        with pool.isolation.spawning_fds(execution_id, user) as (procs_fd, nproc):
            launched = await pool.launch(execution_id, user, module, user.home, env,
                                         (stdin_r, stdout_w, stderr_w), procs_fd, nproc)
    except BaseException:
        for fd in (stdin_w, stdout_r, stderr_r):
            os.close(fd)
        raise
    finally:
        for fd in (stdin_r, stdout_w, stderr_w):
            os.close(fd)
    try:  # after launch, as the agent does: the child is in its cgroup by now
        os.write(stdin_w, payload)
    except BrokenPipeError:  # a child that reads no stdin (the fake runner's)
        pass
    finally:
        os.close(stdin_w)
    return Started(pool, execution_id, launched, stdout_r, stderr_r)


def _read_all(fd: int) -> bytes:
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


async def run_task(pool: RunnerPool, user: UserIdentity, payload: bytes) -> Ran:
    return await (await start_task(pool, user, payload)).ended()


def command_of(payload: bytes) -> ModuleCommand:
    module = module_command(PIPELINED, payload)
    assert isinstance(module, ModuleCommand), module
    return module


# A fake runner's first lines: its socket from argv[1], `send`, and its hello.
FAKE_HELLO = r'''
import json, os, socket, sys
sock = socket.socket(fileno=int(sys.argv[1]))
def send(message, fds=()):
    if message is not None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode()
        socket.send_fds(sock, [data], list(fds))
send({"op": "hello", "pid": os.getpid(), "python": "3.fake"})
'''
