"""Warm module runners: per-user Python processes that fork a fresh child per Ansible module.

A runner runs `agent/zygote.py` as the user (uid, gid, groups, clean environment, its own
cgroup `runner-<hex>` under the user's), on the module's interpreter, preloaded with the
payload's `module_utils`. The agent speaks to it over an AF_UNIX SOCK_SEQPACKET socket: one JSON
object per message, fds by SCM_RIGHTS from the agent only (the table is in docs/protocol.md).
The runner is the user's process and may send anything: every message is checked (size, types,
ids, the pid it reports must be its own child of the user's uid), a bad one kills the runner;
an fd it sends is refused by the kernel where it can (SO_PASSRIGHTS) and else closed in a
thread of its own (closing a user's fd can block: a lingering TCP socket, a FUSE file); the agent
never signals a pid the runner reports: it signals through the runner (as the user, so the
kernel bounds it) and through the isolation (the runner's own cgroup id, trusted).
"""

from __future__ import annotations

import array
import asyncio
import functools
import json
import logging
import os
import resource
import secrets
import signal
import socket
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from marco.errors import ConfigError

from .ansiballz import ModuleCommand, preload_matches
from .isolation import Isolation
from .users import UserIdentity, UserResolver

log = logging.getLogger(__name__)

MAX_MESSAGE = 64 * 1024       # bytes of one message, either way
SCM_MAX_FD = 253              # the kernel's most fds in one message: all fit, none is
                              # dropped (hence closed) by the kernel in the loop's thread
SO_PASSRIGHTS = getattr(socket, "SO_PASSRIGHTS", 83)  # Linux >= 6.16: 0 refuses SCM_RIGHTS
MAX_ENTRIES = 8192            # preloaded module_utils a runner may report
MAX_TEXT = 200                # characters kept of a runner's words (python version, errors)
OUTPUT_PER_MINUTE = 64 * 1024  # bytes of a runner's stdout/stderr logged per minute
QUIT_GRACE = 5.0              # seconds a quitting runner has to exit before it is killed
KILL_WAIT = 5.0               # seconds shutdown waits for a killed runner (D state) to end
FAILED_BACKOFF = 30.0         # seconds a (user, interpreter) whose runner failed to start
                              # runs cold without trying again
MAX_FAILED = 256              # such failures remembered
PID_MAX = 1 << 22             # the kernel's highest pid_max
HELPER_PREFIX = "file-"        # the ids of file helpers (execution ids are 32 hex digits)
MAX_HELPER_TASKS = 16         # a runner with this many tasks forks no file helper (cold)

Key = tuple[UserIdentity, str]


@dataclass(frozen=True)
class RunnerSettings:
    """`enabled`: runners at all; the rest bound them (see docs/operations.md)."""

    enabled: bool = True
    idle_seconds: float = 600.0       # a runner with no task for this long quits
    max_per_user: int = 2             # runners (distinct interpreters/preloads) per user
    max_total: int = 32               # runners on the node; the LRU idle one quits first
    preload_seconds: float = 30.0     # start + preload (and a task's start) deadline

    def __post_init__(self) -> None:
        if self.idle_seconds <= 0 or self.preload_seconds <= 0:
            raise ConfigError("runner idle_seconds and preload_seconds must be > 0")
        if self.max_per_user < 1 or self.max_total < 1:
            raise ConfigError("runner max_per_user and max_total must be >= 1")


class RunnerDeclined(Exception):
    """The module does not go warm (nothing of it ran): the caller runs it the cold way."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RunnerDied(Exception):
    """The runner died while the task ran: the execution ends `lost`."""

    def __init__(self) -> None:
        super().__init__("the module runner died during this task")


class _Misbehaved(Exception):
    """A runner's message breaks the protocol: the runner is killed."""


@dataclass
class Launched:
    """A task the runner forked. `pid` is what the runner reported, checked to be its child
    of the user's uid when it was reported: for display, never for signals."""

    pid: int
    note: str
    exited: asyncio.Future[int]       # the raw wait status; RunnerDied if the runner died
    _signal: Callable[[int], None] = field(default=lambda signum: None, repr=False)
    _release: Callable[[], None] = field(default=lambda: None, repr=False)

    def signal(self, signum: int) -> None:
        """Signal the task's session through the runner (as the user); never os.kill."""
        self._signal(signum)

    def release(self) -> None:
        """The agent holds nothing of the task any more (a file helper's pipe ends closed)."""
        self._release()


@dataclass
class _Task:
    started: asyncio.Future[int]      # the child's pid, or RunnerDeclined
    exited: asyncio.Future[int]


def _consume(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception retrieved: a task nobody awaits any more logs nothing."""
    if not future.cancelled():
        future.exception()


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _text(value: object, what: str) -> str:
    """A short string of the runner's, with control characters shown escaped."""
    if not isinstance(value, str) or len(value) > MAX_MESSAGE:
        raise _Misbehaved(f"{what} is not a string")
    return value[:MAX_TEXT].encode("unicode_escape", "replace").decode("ascii")


def _integer(value: object, low: int, high: int, what: str) -> int:
    if type(value) is not int or not low <= value <= high:
        raise _Misbehaved(f"{what} is not an integer in [{low}, {high}]")
    return value


def _entries(value: object) -> dict[str, tuple[int, int]]:
    """The `preloaded` entries: {zip member name: [crc, size]}."""
    if not isinstance(value, dict) or len(value) > MAX_ENTRIES:
        raise _Misbehaved(f"entries is not an object of at most {MAX_ENTRIES} members")
    entries: dict[str, tuple[int, int]] = {}
    for name, pair in value.items():
        if not isinstance(pair, list) or len(pair) != 2 or len(name) > 1024:
            raise _Misbehaved("an entry is not name: [crc, size]")
        entries[name] = (_integer(pair[0], 0, 0xFFFFFFFF, "an entry's crc"),
                         _integer(pair[1], 0, 1 << 40, "an entry's size"))
    return entries


def _received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", data[:len(data) - len(data) % 4]))
    return fds


def _child_of(pid: int, parent: int, uid: int) -> bool | None:
    """True if `pid` is a process (not a thread) whose parent is `parent`, of real uid `uid`;
    False if it is not; None if it is gone (and reaped) already."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            text = handle.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    try:
        return (int(fields["Tgid"]) == pid and int(fields["PPid"]) == parent
                and int(fields["Uid"].split()[0]) == uid)
    except (KeyError, ValueError, IndexError):
        return False


def _move(procs_fd: int, pid: int, parent: int, uid: int) -> bool | None:
    """In a thread (a cgroup migration waits ~10 ms in the kernel, the loop must not): put
    `pid` into the cgroup whose cgroup.procs `procs_fd` is (a dup, closed here), checked again
    just before to be `parent`'s child of `uid`. Before the caller feeds the child its payload,
    so all it starts is there too. Returns what `_child_of` said."""
    try:
        child = _child_of(pid, parent, uid)
        if child:
            os.write(procs_fd, str(pid).encode())
        return child
    except ProcessLookupError:
        return None  # it ended already
    except OSError as exc:
        log.warning("cannot move task %d into its cgroup: %s", pid, exc.strerror)
        return True
    finally:
        os.close(procs_fd)


def _executable(pid: int) -> str:
    """The file process `pid` runs, as the kernel resolved it ("" if unknown): what the
    interpreter path named when it was spawned, with no path of the user's walked as root."""
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def _rss(pid: int) -> int:
    """VmRSS of `pid` in bytes (0 if unknown)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _runner_setup(procs_fd: int | None, nproc: int) -> None:
    """In the runner between fork and exec, already as the user: join its cgroup, cap the
    user's processes."""
    if procs_fd is not None:
        os.write(procs_fd, b"0")
    if nproc:
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))


def _refuse_fds(sock: socket.socket) -> bool:
    """Have the kernel refuse fds sent to `sock` (the runner's sendmsg fails with EPERM), so
    that no fd of the user's is ever queued to the agent; False where the kernel cannot."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_PASSRIGHTS, 0)
    except OSError:
        return False
    return True


def _close_quietly(fd: int) -> None:
    """Close an fd a runner sent (or the agent's end of its socket, which may hold fds the
    runner queued): a socket is made to reset rather than linger first."""
    try:
        if stat.S_ISSOCK(os.fstat(fd).st_mode):
            _no_linger(fd)
    except OSError:
        pass
    try:
        os.close(fd)
    except OSError:
        pass


def _no_linger(fd: int) -> None:
    """SO_LINGER {on, 0}: the last close resets the connection at once (through a dup, which
    closes without being the last reference)."""
    with socket.socket(fileno=os.dup(fd)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _close_off_loop(fds: list[int]) -> None:
    """Close `fds` in a thread of their own: a close can block as long as the user likes (a
    lingering TCP socket's queue, a FUSE file's flush), and must never block the loop."""
    if fds:
        threading.Thread(target=_close_all, args=(fds,), name="marco-runner-close",
                         daemon=True).start()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        _close_quietly(fd)


def _remove_tmpdir(root: str, pid: int, uid: int) -> None:
    """Remove what a dead runner (pid `pid` of `uid`) left in `root`: its
    `marco-runner-<pid>-*` directory of `uid`, holding at most its `warm.zip`. Through
    directory fds and without following any link: the directory is the user's."""
    prefix = f"marco-runner-{pid}-"
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        for name in os.listdir(root_fd):
            if name.startswith(prefix):
                _remove_runner_dir(root_fd, name, uid)
    except OSError:
        pass
    finally:
        os.close(root_fd)


def _remove_runner_dir(root_fd: int, name: str, uid: int) -> None:
    try:
        info = os.stat(name, dir_fd=root_fd, follow_symlinks=False)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid:
            return
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=root_fd)
        try:
            if "warm.zip" in os.listdir(fd):
                os.unlink("warm.zip", dir_fd=fd)  # a link itself, were it one
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=root_fd)  # fails if the user put anything else there
    except OSError as exc:
        log.debug("cannot remove a dead runner's %s: %s", name, exc.strerror)


class _OutputLog:
    """A runner's stdout/stderr, logged at debug up to OUTPUT_PER_MINUTE, the rest dropped."""

    def __init__(self, runner_id: str) -> None:
        self.runner_id = runner_id
        self.window = time.monotonic()
        self.used = 0
        self.dropped = 0

    def feed(self, data: bytes) -> None:
        now = time.monotonic()
        if now - self.window >= 60.0:
            self.flush()
            self.window, self.used = now, 0
        keep = data[:max(0, OUTPUT_PER_MINUTE - self.used)]
        self.used += len(keep)
        self.dropped += len(data) - len(keep)
        if keep:
            log.debug("%s said: %r", self.runner_id, keep.decode("utf-8", "replace"))

    def flush(self) -> None:
        if self.dropped:
            log.debug("%s: %d bytes of its output dropped", self.runner_id, self.dropped)
            self.dropped = 0


class _RunnerProtocol(asyncio.SubprocessProtocol):
    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.output = _OutputLog(runner.id)

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self.output.feed(data)

    def process_exited(self) -> None:
        self.output.flush()
        self.runner.process_exited()


class Runner:
    """One runner process: its socket, its tasks, its idle timer."""

    def __init__(self, key: Key, settings: RunnerSettings, isolation: Isolation,
                 resolver: UserResolver, forget: Callable[[Runner], None],
                 retire: Callable[[Runner], object]) -> None:
        self.key = key
        self.user, self.interpreter = key
        self.settings = settings
        self.isolation = isolation
        self.resolver = resolver
        self.forget = forget        # the pool drops it (dead)
        self.retire = retire        # the pool drops it and has it quit (idle)
        self.id = f"runner-{secrets.token_hex(8)}"
        self.pid = 0
        self.executable = ""        # the file the kernel runs for it (/proc/PID/exe)
        self.python = ""
        self.entries: dict[str, tuple[int, int]] = {}
        self.preload_ms = 0.0
        self.runs = 0
        self.tasks: dict[str, _Task] = {}
        self.held: set[str] = set()  # file helpers whose pipe ends the agent still holds
        self.dead = False
        self.retiring = False       # no new task: it quits once its tasks end
        self.last_used = time.monotonic()
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.ready: asyncio.Task[None] | None = None
        self.exited: asyncio.Future[None] = loop.create_future()
        self._sock: socket.socket | None = None
        self.refuses_fds = False    # the kernel refuses fds sent to the agent's end
        self._transport: asyncio.SubprocessTransport | None = None
        self._hello: asyncio.Future[None] = loop.create_future()
        self._preloaded: asyncio.Future[dict[str, tuple[int, int]]] | None = None
        self._idle: asyncio.TimerHandle | None = None
        for future in (self._hello, self.exited):
            future.add_done_callback(_consume)

    def __repr__(self) -> str:
        return f"<Runner {self.id} pid {self.pid} of {self.user.name}>"

    @property
    def busy(self) -> bool:
        """Starting or running a task: not to be retired for room."""
        return bool(self.tasks) or self.ready is None or not self.ready.done()

    # -- start ------------------------------------------------------------------------------

    async def start(self, module: ModuleCommand, source: str) -> None:
        """Spawn, wait for hello, preload; a failure kills the runner and declines."""
        began = time.monotonic()
        try:
            async with asyncio.timeout(self.settings.preload_seconds):
                await self._spawn(source)
                await self._hello
                self.entries = await self._preload(module)
        except TimeoutError:
            self.kill(f"no preload within {self.settings.preload_seconds:g} s")
            raise RunnerDeclined("preload failed: timed out after "
                                 f"{self.settings.preload_seconds:g} s") from None
        except RunnerDeclined:
            self.kill("its start failed")
            raise
        self.preload_ms = (time.monotonic() - began) * 1000
        log.info("%s started for %s on %s (pid %d, python %s): preload %.0f ms, %d modules",
                 self.id, self.user.name, self.interpreter, self.pid, self.python,
                 self.preload_ms, len(self.entries))
        self._task_done()

    async def _spawn(self, source: str) -> None:
        """Start the runner exactly as an execution starts: as the user, clean environment,
        its own session, no fd of the agent's but its socket end, in its own cgroup."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.refuses_fds = _refuse_fds(parent)
        end = child.fileno()  # its number is the runner's argv[1]: no fd is moved in between
        try:
            with self.isolation.spawning_fds(self.id, self.user) as (procs_fd, nproc):
                transport, _ = await self.loop.subprocess_exec(
                    lambda: _RunnerProtocol(self), self.interpreter, "-c", source, str(end),
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    env=self.user.clean_environment(), cwd="/", start_new_session=True,
                    close_fds=True, pass_fds=(end,),
                    preexec_fn=functools.partial(_runner_setup, procs_fd, nproc),
                    **self.resolver.popen_identity(self.user))
        except (OSError, subprocess.SubprocessError) as exc:
            parent.close()  # the runner never had it: nothing of the user's is queued on it
            reason = exc.strerror if isinstance(exc, OSError) else "its setup failed"
            raise RunnerDeclined(f"runner did not start: {reason}") from None
        finally:
            child.close()
        self._transport = transport
        self.pid = self._transport.get_pid()
        self.executable = _executable(self.pid)
        self.isolation.started(self.id, self.pid)
        parent.setblocking(False)
        self._sock = parent
        if self.dead:  # it exited before the spawn returned
            self._close_socket()
            raise RunnerDeclined("runner died")
        self.loop.add_reader(parent.fileno(), self._readable)

    async def _preload(self, module: ModuleCommand) -> dict[str, tuple[int, int]]:
        """Send the payload's zip in a memfd (too big for a message) and wait for the list of
        what the runner imported from it."""
        self._preloaded = self.loop.create_future()
        self._preloaded.add_done_callback(_consume)
        memfd = os.memfd_create("marco-runner-zip", os.MFD_CLOEXEC)
        try:
            view = memoryview(module.zip_data)
            while view:
                view = view[os.write(memfd, view):]
            os.lseek(memfd, 0, os.SEEK_SET)
            self._send({"op": "preload", "profile": module.profile}, [memfd])
        finally:
            os.close(memfd)
        return await self._preloaded

    # -- tasks ------------------------------------------------------------------------------

    async def run(self, execution_id: str, cwd: str, env: dict[str, str],
                  fds: tuple[int, int, int], procs_fd: int | None, nproc: int) -> Launched:
        """Have the runner fork a child for the task; returns once it reported the child and
        the agent moved it into the execution's cgroup. `procs_fd` is never sent: the kernel
        checks a cgroup.procs write against the opener's credentials, so with root's fd the
        user's runner could move any process of the node (the agent too) into its cgroup."""
        message: dict[str, Any] = {"op": "run", "id": execution_id, "cwd": cwd, "env": env}
        if nproc:
            message["nproc"] = nproc
        pid, task = await self._fork(execution_id, message, fds)
        self.runs += 1
        if procs_fd is not None and await self.loop.run_in_executor(
                None, _move, os.dup(procs_fd), pid, self.pid, self.user.uid) is False:
            self.kill(f"task pid {pid} is no longer its child", warn=True)
            raise RunnerDeclined("runner died")
        return Launched(pid, "", task.exited,
                        functools.partial(self.signal_task, execution_id))

    @property
    def takes_helpers(self) -> bool:
        """Started, not ending, and below MAX_HELPER_TASKS tasks: may fork a file helper."""
        return (self.ready is not None and self.ready.done() and not self.dead
                and not self.retiring and self._sock is not None
                and self.task_count < MAX_HELPER_TASKS)

    @property
    def task_count(self) -> int:
        """Its tasks, and the file helpers it reported ended whose pipe ends the agent still
        holds: a runner that reports `exited` early frees no room while the agent holds fds."""
        return len(self.tasks.keys() | self.held)

    async def helper(self, helper_id: str, argv: list[str], source: str,
                     fds: tuple[int, int, int]) -> Launched:
        """Have the runner fork a child that runs `source` as `python3 -I -S -c source argv`
        would, on the agent's pipes `fds` (stdin, stdout, stderr). It counts as a task (idle
        timer, status, quit); it stays in the runner's cgroup. RunnerDeclined or _Gone if
        the runner could not start it."""
        pid, task = await self._fork(
            helper_id, {"op": "helper", "id": helper_id, "argv": argv, "source": source}, fds)
        self.held.add(helper_id)
        return Launched(pid, f"runner {self.pid}", task.exited,
                        functools.partial(self.signal_task, helper_id),
                        functools.partial(self.held.discard, helper_id))

    async def _fork(self, task_id: str, message: dict[str, Any],
                    fds: tuple[int, int, int]) -> tuple[int, _Task]:
        """Send a run or helper message with the child's fds; the child's pid (checked to be
        the runner's child of the user) once the runner reported it."""
        if self.dead:
            raise _Gone()
        if task_id in self.tasks:
            raise RunnerDeclined("execution id already running here")
        task = _Task(self.loop.create_future(), self.loop.create_future())
        for future in (task.started, task.exited):
            future.add_done_callback(_consume)
        self.tasks[task_id] = task
        self._cancel_idle()
        try:
            self._send(message, fds)
        except BaseException:
            self.tasks.pop(task_id, None)
            self._task_done()
            raise
        self.last_used = time.monotonic()
        try:
            async with asyncio.timeout(self.settings.preload_seconds):
                pid = await asyncio.shield(task.started)
        except TimeoutError:
            self.kill("no started within the deadline")
            raise RunnerDeclined("runner died") from None
        return pid, task

    def signal_task(self, execution_id: str, signum: int) -> None:
        """Ask the runner to signal the task's session; a runner that cannot be told is
        killed (its task then ends lost)."""
        if self.dead or execution_id not in self.tasks:
            return
        try:
            self._send({"op": "signal", "id": execution_id, "signal": int(signum)})
        except (RunnerDeclined, _Gone):
            self.kill("a signal could not be sent")

    def _task_done(self) -> None:
        if self.retiring and not self.tasks and not self.dead:
            self.retire(self)
            return
        if not self.tasks and not self.dead:
            self.last_used = time.monotonic()
            self._cancel_idle()
            self._idle = self.loop.call_later(self.settings.idle_seconds, self._idle_expired)

    def _cancel_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _idle_expired(self) -> None:
        self._idle = None
        if not self.tasks and not self.dead:
            log.info("%s of %s idle for %g s: it quits", self.id, self.user.name,
                     self.settings.idle_seconds)
            self.retire(self)

    # -- messages ---------------------------------------------------------------------------

    def _send(self, message: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
        data = json.dumps(message, separators=(",", ":")).encode()
        if len(data) > MAX_MESSAGE:
            raise RunnerDeclined("the task does not fit a runner message (environment?)")
        if self._sock is None:
            raise _Gone()
        ancillary = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                     if fds else [])
        try:
            self._sock.sendmsg([data], ancillary)
        except BlockingIOError:  # it does not read what it is sent
            self.kill("its socket is full")
            raise RunnerDeclined("runner busy") from None
        except OSError:
            self._gone("its socket is closed")
            raise _Gone() from None

    def _readable(self) -> None:
        """Read every waiting message. A runner sends no fds: one that does is killed, and
        the fds are closed in another thread (room for the kernel's most, so that it drops,
        hence closes, none here)."""
        while self._sock is not None:
            try:
                data, ancdata, flags, _ = self._sock.recvmsg(
                    MAX_MESSAGE + 1, socket.CMSG_SPACE(SCM_MAX_FD * 4), socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.kill(f"its socket failed: {exc.strerror}")
                return
            fds = _received_fds(ancdata)
            _close_off_loop(fds)
            try:
                if not data and not fds:
                    self.kill("it closed its socket")
                    return
                if fds:
                    raise _Misbehaved(f"it sent {len(fds)} fd(s)")
                if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(data) > MAX_MESSAGE:
                    raise _Misbehaved("a message too long")
                self._handle(data)
            except _Misbehaved as exc:
                self.kill(f"misbehaved: {exc}", warn=True)
                return

    def _handle(self, data: bytes) -> None:
        try:
            message = json.loads(data)
        except (ValueError, RecursionError):
            raise _Misbehaved("a message is not JSON") from None
        if not isinstance(message, dict):
            raise _Misbehaved("a message is not an object")
        op = message.get("op")
        if op == "hello":
            self._on_hello(message)
        elif op in ("preloaded", "preload_failed"):
            self._on_preloaded(message)
        elif op == "started":
            self._on_started(message)
        elif op == "exited":
            self._on_exited(message)
        elif op == "declined":
            self._on_declined(message)
        else:
            raise _Misbehaved("unknown op")

    def _on_hello(self, message: dict[str, Any]) -> None:
        if self._hello.done():
            raise _Misbehaved("a second hello")
        self.python = _text(message.get("python"), "python")
        self._hello.set_result(None)

    def _on_preloaded(self, message: dict[str, Any]) -> None:
        waiting = self._preloaded
        if waiting is None or waiting.done():
            raise _Misbehaved(f"{message['op']} unasked")
        if message["op"] == "preload_failed":
            waiting.set_exception(RunnerDeclined(
                "preload failed: " + _text(message.get("error"), "error")))
        else:
            waiting.set_result(_entries(message.get("entries")))

    def _task_of(self, message: dict[str, Any]) -> tuple[str, _Task]:
        task_id = message.get("id")
        task = self.tasks.get(task_id) if isinstance(task_id, str) else None
        if task is None or task_id is None:
            raise _Misbehaved("a task id that is not running")
        return task_id, task

    def _on_started(self, message: dict[str, Any]) -> None:
        """The child's pid, checked to be the runner's child of the user."""
        _, task = self._task_of(message)
        if task.started.done():
            raise _Misbehaved("a second started")
        pid = _integer(message.get("pid"), 2, PID_MAX, "pid")
        if _child_of(pid, self.pid, self.user.uid) is False:
            raise _Misbehaved(f"pid {pid} is not its child of uid {self.user.uid}")
        task.started.set_result(pid)

    def _on_exited(self, message: dict[str, Any]) -> None:
        task_id, task = self._task_of(message)
        status = _integer(message.get("status"), 0, 0xFFFF, "status")
        if not (os.WIFEXITED(status) or os.WIFSIGNALED(status)):
            raise _Misbehaved("a status that is no exit")
        del self.tasks[task_id]
        _fail(task.started, RunnerDeclined("the runner could not start the task"))
        if not task.exited.done():
            task.exited.set_result(status)
        self._task_done()

    def _on_declined(self, message: dict[str, Any]) -> None:
        """No child for the task (its python site changed since the runner started, so a
        cold interpreter would differ): the task runs cold and the runner is retired, so that
        the next launch starts a fresh one."""
        task_id, task = self._task_of(message)
        if task.started.done():
            raise _Misbehaved("declined after started")
        reason = _text(message.get("reason"), "reason")
        del self.tasks[task_id]
        _fail(task.started, RunnerDeclined(reason))
        _fail(task.exited, RunnerDeclined(reason))
        log.info("%s of %s declined a task (%s): it quits once its tasks end", self.id,
                 self.user.name, reason)
        self.retiring = True
        self._task_done()

    # -- the end ----------------------------------------------------------------------------

    def kill(self, why: str, warn: bool = False) -> None:
        """SIGKILL the runner through its own isolation id and its transport, and forget it."""
        if self.pid:
            if not self.dead:
                (log.warning if warn else log.info)("%s of %s killed: %s", self.id,
                                                    self.user.name, why)
            self.isolation.signal(self.id, signal.SIGKILL)
            if self._transport is not None and self._transport.get_returncode() is None:
                self._transport.kill()
        self._gone(why)

    def _gone(self, why: str) -> None:
        """No more work for this runner: waiters are told, tasks fail with RunnerDied."""
        if self.dead:
            return
        self.dead = True
        self._cancel_idle()
        self._close_socket()
        _fail(self._hello, RunnerDeclined("runner died"))
        if self._preloaded is not None:
            _fail(self._preloaded, RunnerDeclined("runner died"))
        for task in self.tasks.values():
            _fail(task.started, RunnerDeclined("runner died"))
            _fail(task.exited, RunnerDied())
        self.tasks.clear()
        self.forget(self)
        log.debug("%s of %s gone: %s", self.id, self.user.name, why)

    def _close_socket(self) -> None:
        """Closed in another thread unless the kernel refuses the runner's fds: its queue
        may hold fds the runner sent, and closing the socket closes them."""
        if self._sock is not None:
            self.loop.remove_reader(self._sock.fileno())
            if self.refuses_fds:
                self._sock.close()
            else:
                _close_off_loop([self._sock.detach()])
            self._sock = None

    def process_exited(self) -> None:
        """The runner process ended (reaped by asyncio): what it left goes (processes in its
        cgroup, its temporary directory), then its cgroup."""
        if self.isolation.mode == "cgroup":  # its own cgroup: nobody else's process is there
            self.isolation.signal(self.id, signal.SIGKILL)
        self.isolation.finished(self.id)
        if self.pid:
            root = self.user.clean_environment().get("TMPDIR") or "/tmp"
            threading.Thread(target=_remove_tmpdir, args=(root, self.pid, self.user.uid),
                             name="marco-runner-tmp", daemon=True).start()
        self._gone("it exited")
        if not self.exited.done():
            self.exited.set_result(None)
        if self._transport is not None:
            self._transport.close()

    async def quit(self, grace: float = QUIT_GRACE) -> None:
        """Ask the runner to quit (message and EOF: it exits once its children are reaped);
        killed if it has not after `grace` seconds. File helpers get SIGTERM first: an
        upload in progress ends now, and cleanly (its temporary file removed)."""
        if self._sock is not None:
            for helper_id in [i for i in self.tasks if i.startswith(HELPER_PREFIX)]:
                self.signal_task(helper_id, signal.SIGTERM)
            try:
                self._send({"op": "quit"})
            except (RunnerDeclined, _Gone):
                pass
        self._gone("asked to quit")
        if self._transport is None:
            return
        try:
            async with asyncio.timeout(grace):
                await asyncio.shield(self.exited)
        except TimeoutError:
            self.kill(f"still running {grace:g} s after quit")
            try:  # a process in D state (a hung NFS home) ends only when the kernel lets it
                async with asyncio.timeout(KILL_WAIT):
                    await asyncio.shield(self.exited)
            except TimeoutError:
                log.warning("%s of %s (pid %d) still not ended %g s after SIGKILL: left",
                            self.id, self.user.name, self.pid, KILL_WAIT)

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {"user": self.user.name, "pid": self.pid, "python": self.python,
                "rss": _rss(self.pid), "tasks": self.task_count,
                "idle_s": 0.0 if self.tasks else round(now - self.last_used, 3),
                "preload_ms": round(self.preload_ms, 1)}


class _Gone(Exception):
    """The runner was found dead before the task was sent: another one may take it."""


class RunnerPool:
    """The node's runners, keyed by (user identity, interpreter), bounded and LRU."""

    def __init__(self, resolver: UserResolver, isolation: Isolation,
                 settings: RunnerSettings, *, source: str | None = None) -> None:
        self.resolver = resolver
        self.isolation = isolation
        self.settings = settings
        self._source = source     # a test seam: the runner's code (zygote.py's by default)
        self._runners: list[Runner] = []
        self._quitting: set[asyncio.Task[None]] = set()
        self._closed = False
        self._failed: dict[Key, tuple[float, str]] = {}  # start failures: when, why

    def source(self) -> str:
        if self._source is None:
            self._source = Path(__file__).with_name("zygote.py").read_text()
        return self._source

    async def launch(self, execution_id: str, user: UserIdentity, module: ModuleCommand,
                     cwd: str, env: dict[str, str], fds: tuple[int, int, int],
                     procs_fd: int | None, nproc: int) -> Launched:
        """Run the module in the user's warm runner (started and preloaded on first use);
        RunnerDeclined(reason) if it cannot, before anything of it ran. The caller feeds the
        payload to its end of stdin only after this returns: the child, waiting for it,
        starts nothing before it is in the execution's cgroup."""
        if not self.settings.enabled or self._closed:
            raise RunnerDeclined("runner off")
        key: Key = (user, module.interpreter)
        differ = False
        for runner in [r for r in self._runners if r.key == key]:
            if runner.ready is not None and not runner.ready.done():
                try:
                    await asyncio.shield(runner.ready)  # one start for concurrent launches
                except RunnerDeclined:
                    continue  # its starter remembers why (_check_failed below)
            if runner.dead or runner.retiring:
                continue
            if not preload_matches(runner.entries, module.entries):
                differ = True
                continue
            try:
                launched = await runner.run(execution_id, cwd, env, fds, procs_fd, nproc)
            except _Gone:
                continue
            launched.note = f"warm (runner {runner.pid}, task {runner.runs})"
            return launched
        self._check_failed(key)
        runner = self._new_runner(key, "module_utils differ" if differ else "runner limit")
        runner.ready = asyncio.get_running_loop().create_task(
            runner.start(module, self.source()))
        runner.ready.add_done_callback(_consume)
        try:
            await asyncio.shield(runner.ready)
        except RunnerDeclined as declined:
            self._remember_failure(key, declined.reason)
            raise
        try:
            launched = await runner.run(execution_id, cwd, env, fds, procs_fd, nproc)
        except _Gone:
            raise RunnerDeclined("runner died") from None
        launched.note = f"new runner (preload {runner.preload_ms:.0f} ms)"
        return launched

    async def file_helper(self, user: UserIdentity, interpreter: str, argv: list[str],
                          source: str, fds: tuple[int, int, int]) -> Launched | None:
        """Fork the agent's file helper in a live runner of exactly `user` whose executable
        is the file `interpreter` (a realpath), with room for a task; None (the caller starts
        it cold) if there is none or it fails before the helper started. Never starts a
        runner. One try only: a runner that failed may have forked a child that holds `fds`."""
        runner = self.helper_runner(user, interpreter)
        if runner is None:
            return None
        try:
            return await runner.helper(HELPER_PREFIX + secrets.token_hex(8), argv, source, fds)
        except (RunnerDeclined, _Gone):
            return None

    def helper_runner(self, user: UserIdentity, interpreter: str) -> Runner | None:
        """The live runner of exactly `user` on the file `interpreter` that may fork a file
        helper now, if any (the caller makes no pipes for nothing)."""
        if not self.settings.enabled or self._closed:
            return None
        for runner in self._runners:
            if (runner.user == user and runner.takes_helpers
                    and runner.executable == interpreter):
                return runner
        return None

    def _check_failed(self, key: Key) -> None:
        """A runner for `key` that failed to start is not tried again for FAILED_BACKOFF
        seconds: each try would cost a start (and its deadline) on top of the cold run."""
        failed = self._failed.get(key)
        if failed is None:
            return
        when, why = failed
        if time.monotonic() - when < FAILED_BACKOFF:
            raise RunnerDeclined(why)
        del self._failed[key]

    def _remember_failure(self, key: Key, why: str) -> None:
        self._failed.pop(key, None)
        self._failed[key] = (time.monotonic(), why)
        while len(self._failed) > MAX_FAILED:
            del self._failed[next(iter(self._failed))]

    def _new_runner(self, key: Key, reason: str) -> Runner:
        """A runner for `key` within the bounds: the least recently used idle runner (of the
        user, then of the node) quits to make room; none idle: RunnerDeclined(reason)."""
        user = key[0]
        for limit, among in ((self.settings.max_per_user,
                              [r for r in self._runners if r.user.name == user.name]),
                             (self.settings.max_total, self._runners)):
            if len(among) >= limit:
                idle = [r for r in among if not r.busy]
                if not idle:
                    raise RunnerDeclined(reason)
                self._retire(min(idle, key=lambda r: r.last_used))
        runner = Runner(key, self.settings, self.isolation, self.resolver, self._forget,
                        self._retire)
        self._runners.append(runner)
        return runner

    def _forget(self, runner: Runner) -> None:
        if runner in self._runners:
            self._runners.remove(runner)

    def _retire(self, runner: Runner) -> asyncio.Task[None]:
        """Forget `runner` now and let it quit in the background."""
        self._forget(runner)
        task = asyncio.get_running_loop().create_task(runner.quit())
        self._quitting.add(task)
        task.add_done_callback(self._quitting.discard)
        return task

    def status(self) -> list[dict[str, Any]]:
        """[{user, pid, python, rss, tasks, idle_s, preload_ms}] of the live runners."""
        return [runner.status() for runner in self._runners if runner.pid and not runner.dead]

    def retire_user(self, username: str) -> None:
        """Revocation: the user's runners are forgotten now and quit in the background (killed
        after QUIT_GRACE); their running tasks end as they would."""
        for runner in [r for r in self._runners if r.user.name == username]:
            self._retire(runner)

    async def close_user(self, username: str) -> None:
        """`retire_user`, and wait until those runners are gone."""
        quitting = [self._retire(r) for r in list(self._runners) if r.user.name == username]
        await asyncio.gather(*quitting)

    async def close(self) -> None:
        """Agent shutdown: every runner quits."""
        self._closed = True
        for runner in list(self._runners):
            self._retire(runner)
        await asyncio.gather(*self._quitting)
