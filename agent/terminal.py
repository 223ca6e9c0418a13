"""Interactive terminals (docs/terminals.md): a login shell, or one command, in a pseudo-terminal
as the token's user, attached to at most one socket at a time.

The agent holds the pty's master, non-blocking, read by the event loop (`add_reader`, no
coroutine per read). Flow control: output handed to the socket but not yet written counts
against `buffer_bytes`; past it the master is not read until the writes complete, so a
program that writes faster than the client reads blocks on its next write, as on a slow
terminal, and the agent's memory stays flat. A session whose socket went away is detached: its
output goes to a bounded scrollback (then reading stops) until a reattach or the grace ends.

A session ends when its program exits (and the pty is drained), or by the agent (idle, the
token expired or was logged out, the grace passed, the agent stops): the master is closed,
which hangs the terminal up (the kernel sends SIGHUP to its session leader and foreground
group), and SIGKILL follows after HANGUP_GRACE; whatever is left in the session's isolation (its
cgroup, or what the subreaper finds) is killed when the session is over.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import functools
import grp
import hashlib
import logging
import os
import re
import secrets
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from marco import protocol
from marco.errors import (
    AuthenticationError,
    BadRequest,
    MarcoError,
    NotFound,
    ShuttingDown,
    TokenExpired,
    TooManySockets,
)
from marco.shells import DEFAULT_SHELL

from .isolation import Isolation, popen_setup
from .users import UserIdentity, UserResolver

log = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024       # bytes read from the master at once: at most one frame's worth
HANGUP_GRACE = 2.0           # seconds from the hang-up to SIGKILL (what a hang-up gives)
EXIT_LINGER = 2.0            # seconds to drain the pty after the program exited
SESSION_ID = re.compile(r"[0-9a-f]{32}")
TERM_VALUE = re.compile(r"[A-Za-z0-9._+-]{1,64}")
MAX_SIZE = 1000              # columns and rows
MAX_COMMAND_BYTES = 64 * 1024
SIGNALS = {"INT": signal.SIGINT, "TERM": signal.SIGTERM, "HUP": signal.SIGHUP,
           "KILL": signal.SIGKILL, "QUIT": signal.SIGQUIT}
ISOLATION_PREFIX = "terminal-"  # a session's cgroup (or subreaper record) name, by its id


class Peer(Protocol):
    """What a session needs of its socket (tornado's WebSocketHandler has both)."""

    def write_message(self, message: str | bytes, binary: bool = False) -> Any: ...

    def close(self, code: int | None = None, reason: str | None = None) -> None: ...


class Audit(Protocol):
    def record(self, event: str, user: str | None, **fields: Any) -> None: ...


@dataclass(frozen=True)
class TerminalSettings:
    """The agent's terminal settings (agent/config.py)."""

    enabled: bool = True
    max_per_user: int = 8
    idle_timeout: float = 3600.0
    detach_grace: float = 60.0
    buffer_bytes: int = 256 * 1024
    scrollback_bytes: int = 64 * 1024
    input_max_bytes: int = 1024 * 1024


@dataclass(frozen=True)
class OpenRequest:
    """A checked `open` message (docs/terminals.md)."""

    cols: int
    rows: int
    term: str = "xterm-256color"
    command: str | None = None
    session: str | None = None
    echo: bool = True

    @classmethod
    def from_message(cls, data: dict[str, Any]) -> OpenRequest:
        """Raise BadRequest unless every field is as the contract says."""
        cols, rows = data.get("cols", 80), data.get("rows", 24)
        for name, value in (("cols", cols), ("rows", rows)):
            if not isinstance(value, int) or isinstance(value, bool) \
                    or not 1 <= value <= MAX_SIZE:
                raise BadRequest(f"{name} must be a whole number from 1 to {MAX_SIZE}")
        term = data.get("term") or "xterm-256color"
        if not isinstance(term, str) or not TERM_VALUE.fullmatch(term):
            raise BadRequest("term must be 1 to 64 of A-Z a-z 0-9 . _ + -")
        command = data.get("command")
        if command is not None and (not isinstance(command, str) or not command
                                    or len(command.encode("utf-8", "surrogatepass"))
                                    > MAX_COMMAND_BYTES or "\0" in command):
            raise BadRequest("command must be null or a non-empty string of at most 64 KiB "
                             "without NUL")
        session = data.get("session")
        if session is not None and (not isinstance(session, str)
                                    or not SESSION_ID.fullmatch(session)):
            raise NotFound("no such terminal session")  # the answer for any id not yours
        echo = data.get("echo", True)
        if not isinstance(echo, bool):
            raise BadRequest("echo must be true or false")
        return cls(cols, rows, term, command, session, echo)


def window_size(fd: int, cols: int, rows: int) -> None:
    """TIOCSWINSZ on the pty: the foreground group gets SIGWINCH."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def echo_off(fd: int) -> None:
    """Clear ECHO on the pty (`stty -echo`): input not typed by a person is not shown back,
    nor recorded as output."""
    attrs = termios.tcgetattr(fd)
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


def signal_name(returncode: int) -> str:
    """The contract's name of a signal: KILL, HUP, ... (no SIG prefix)."""
    try:
        return signal.Signals(-returncode).name.removeprefix("SIG")
    except ValueError:
        return str(-returncode)


def _tty_gid(fallback: int) -> int:
    try:
        return grp.getgrnam("tty").gr_gid
    except KeyError:
        return fallback


def _child_setup(setup: Callable[[], object] | None, home: bytes) -> None:
    """Runs in the child between fork and exec, already as the user (after setsid): the
    isolation's setup, the pty on fd 0 as controlling terminal, then the home, entered as the
    user so the kernel checks the user's own right to (as login: "/" when it cannot)."""
    if setup is not None:
        setup()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    try:
        os.chdir(home)
    except OSError:
        os.chdir("/")


class _ExitWatch(asyncio.SubprocessProtocol):
    """Tells the session its main process's status (asyncio's child watcher reaps it)."""

    def __init__(self, on_exit: Callable[[int | None], None]) -> None:
        self.on_exit = on_exit
        self.transport: asyncio.SubprocessTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def process_exited(self) -> None:
        assert self.transport is not None
        returncode = self.transport.get_returncode()
        self.transport.close()
        self.on_exit(returncode)


class TerminalSession:
    """One pty and its program, as one user; attached to at most one socket."""

    def __init__(self, user: UserIdentity, token: str, request: OpenRequest,
                 settings: TerminalSettings, isolation: Isolation, audit: Audit | None,
                 on_over: Callable[[TerminalSession], None],
                 identity: dict[str, Any]) -> None:
        self.id = secrets.token_hex(16)
        self.identity = identity  # Popen's user, group, extra_groups (UserResolver)
        self.user, self.token, self.request = user, token, request
        self.settings, self.isolation, self.audit = settings, isolation, audit
        self.on_over = on_over
        self.shell = user.shell or DEFAULT_SHELL
        self.isolation_id = ISOLATION_PREFIX + self.id
        self.master = -1
        self.pid: int | None = None
        self.started = time.time()
        self.last_activity = time.monotonic()
        self.peer: Peer | None = None
        self.generation = 0          # which attachment a write's completion belongs to
        self.pending = 0             # bytes handed to the socket, not yet written
        self.scrollback = bytearray()
        self.input = bytearray()
        self.bytes_out = self.bytes_in = 0
        self.bytes_taken = 0         # input the pty took (progress of a full backlog)
        self._room: asyncio.Future[None] | None = None  # done when the backlog has room
        self.reading = self.writing = False
        self.eof = False
        self.returncode: int | None = None
        self.exited = False
        self.reason: str | None = None
        self.over = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._timers: dict[str, asyncio.TimerHandle] = {}

    # -- start --------------------------------------------------------------------------------

    async def spawn(self, expires_at: float) -> None:
        """Open the pty and start the shell (or command) as the user; OSError or
        SubprocessError when that fails."""
        loop = asyncio.get_running_loop()
        master, slave = os.openpty()
        try:
            if os.geteuid() == 0:  # else devpts made it ours already (a one-user agent)
                os.fchown(slave, self.user.uid, _tty_gid(self.user.gid))
                os.fchmod(slave, 0o620)
            window_size(master, self.request.cols, self.request.rows)
            if not self.request.echo:
                echo_off(slave)
            os.set_blocking(master, False)
            env = self.user.clean_environment()
            # MARCO_EXECUTION_ID is what the subreaper finds a session's leftovers by, also
            # those that left its session (setsid); cgroups find them by their cgroup.
            env.update(TERM=self.request.term, MARCO_TERMINAL=self.id,
                       MARCO_EXECUTION_ID=self.isolation_id)
            argv = ([self.shell, "-c", self.request.command] if self.request.command is not None
                    else ["-" + os.path.basename(self.shell)])
            with self.isolation.spawning_fds(self.isolation_id, self.user) as (procs_fd, nproc):
                setup = popen_setup(procs_fd, nproc).get("preexec_fn")
                transport, _ = await loop.subprocess_exec(
                    lambda: _ExitWatch(self._exited), *argv, executable=self.shell,
                    stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
                    close_fds=True, preexec_fn=functools.partial(
                        _child_setup, setup, os.fsencode(self.user.home)),
                    **self.identity)
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self.master, self.pid = master, transport.get_pid()
        self.isolation.started(self.isolation_id, self.pid)
        if self.reason is not None:  # ended while it started (logout, the agent stops)
            self._close_master()     # the hang-up
            self._kill()             # and no grace: nobody ever saw this terminal
            return
        self.expire_at(expires_at)
        self._arm_idle()
        self._update_reading()

    def started_message(self, reattached: bool) -> dict[str, Any]:
        return {"type": "started", "session": self.id, "shell": self.shell, "pid": self.pid,
                "reattached": reattached}

    # -- sockets ------------------------------------------------------------------------------

    def attach(self, peer: Peer, reattached: bool) -> None:
        """Give the session to `peer`: `started`, what the scrollback kept, then live output.
        A socket that had it (the same user's, whose connection may be dead) is closed 4409."""
        if self.peer is not None and self.peer is not peer:
            self.peer.close(protocol.CLOSE_TAKEN_OVER, "taken over by another connection")
            self._room_now()  # its input wait ends: the new socket's input comes next
        self._cancel("detach")
        self.peer, self.pending = peer, 0
        self.generation += 1
        self._send_text(protocol.encode(self.started_message(reattached)))
        kept, self.scrollback = bytes(self.scrollback), bytearray()
        for start in range(0, len(kept), READ_CHUNK):
            if self.peer is not peer:  # the socket went while this was sent: the rest
                self.scrollback += kept[start:]  # after the chunk _send_output kept
                break
            self._send_output(kept[start:start + READ_CHUNK])
        self._update_reading()

    def detach(self, peer: Peer) -> None:
        """`peer` is gone (or asked to detach): keep the session for the grace."""
        if self.peer is not peer:
            return
        self.peer, self.pending = None, 0
        self.generation += 1
        self._room_now()
        if self.reason is None:
            self._timers["detach"] = asyncio.get_running_loop().call_later(
                self.settings.detach_grace, self.end, "detached")
            self._update_reading()

    def expire_at(self, when: float) -> None:
        """End the session when its token expires (a reattach brings a newer token)."""
        self._cancel("expiry")
        self._timers["expiry"] = asyncio.get_running_loop().call_later(
            max(when - time.time(), 0), self.end, "expired")

    # -- input --------------------------------------------------------------------------------

    def write_input(self, data: bytes) -> None:
        """Queue `data` for the pty (the socket then waits for `input_room` while the backlog
        is past its bound, so the client's input is held back by TCP, not here)."""
        if self.reason is not None:
            return
        self.bytes_in += len(data)
        self.last_activity = time.monotonic()
        self.input += data
        self._write_some()

    def input_full(self) -> bool:
        """More input waits for the pty than `input_max_bytes` (a live session's)."""
        return self.reason is None and len(self.input) > self.settings.input_max_bytes

    def input_room(self) -> asyncio.Future[None]:
        """Done once the backlog is within its bound, the session ended or its socket left."""
        if self._room is None or self._room.done():
            self._room = asyncio.get_running_loop().create_future()
        if not self.input_full():
            self._room.set_result(None)
        return self._room

    def _room_now(self) -> None:
        if self._room is not None and not self._room.done():
            self._room.set_result(None)

    def resize(self, cols: int, rows: int) -> None:
        if self.reason is None:
            window_size(self.master, cols, rows)

    def signal_foreground(self, name: str) -> None:
        """Signal the terminal's foreground group: only its processes in this session whose
        real or saved uid is the user's, as the kernel would let the user do it."""
        if self.reason is not None or self.pid is None:
            return
        try:
            group = os.tcgetpgrp(self.master)
        except OSError:
            return
        for pid in _group_members(group):
            _signal_if_users(pid, group, self.pid, self.user.uid, SIGNALS[name])

    def _write_some(self) -> None:
        while self.input:
            try:
                written = os.write(self.master, self.input[:READ_CHUNK])
            except BlockingIOError:
                break
            except OSError:  # the pty hung up: nothing will read it any more
                self.input.clear()
                break
            del self.input[:written]
            self.bytes_taken += written
        if not self.input_full():
            self._room_now()
        want = bool(self.input)
        if want != self.writing:
            loop = asyncio.get_running_loop()
            loop.add_writer(self.master, self._write_some) if want \
                else loop.remove_writer(self.master)
            self.writing = want

    # -- output -------------------------------------------------------------------------------

    def _readable(self) -> None:
        room = READ_CHUNK if self.peer is not None else \
            self.settings.scrollback_bytes - len(self.scrollback)
        data = self._read_burst(max(min(room, READ_CHUNK), 1))
        if data is None:
            return
        if not data:
            self.eof = True
            self._update_reading()
            if self.exited and self.reason is None:
                self.end("exited")
            return
        self.bytes_out += len(data)
        self.last_activity = time.monotonic()
        if self.peer is not None:
            self._send_output(data)
        else:
            self.scrollback += data
        self._update_reading()

    def _read_burst(self, limit: int) -> bytes | None:
        """Up to `limit` bytes of what the pty holds now, as one frame: a pty read gives at
        most a few KiB, so it reads again until EAGAIN or `limit`. None: nothing there yet;
        b"": the end (every slave fd is closed)."""
        data = bytearray()
        while len(data) < limit:
            try:
                chunk = os.read(self.master, limit - len(data))
            except BlockingIOError:
                break
            except OSError as exc:  # EIO: every slave fd is closed
                if exc.errno != errno.EIO:
                    log.warning("terminal %s: reading the pty failed: %s", self.id,
                                exc.strerror)
                chunk = b""
            if not chunk:  # the end: what came before it first, the end at the next read
                return bytes(data) if data else b""
            data += chunk
        return bytes(data) if data else None

    def _send_output(self, data: bytes) -> None:
        peer = self.peer
        if peer is None:  # it went away while this was being sent: kept for a reattach
            self.scrollback += data
            return
        try:
            future = peer.write_message(data, binary=True)
        except Exception:  # closed under us (WebSocketClosedError): keep it for a reattach
            self.detach(peer)
            self.scrollback += data
            return
        self.pending += len(data)
        future.add_done_callback(functools.partial(self._written, self.generation, len(data)))

    def _written(self, generation: int, size: int, future: asyncio.Future[None]) -> None:
        if not future.cancelled():
            future.exception()  # retrieved: a closed socket shows in on_close
        if generation != self.generation:
            return
        self.pending -= size
        self._update_reading()

    def _send_text(self, message: str) -> asyncio.Future[None] | None:
        """Queue a control message; its write's future, or None when the socket is gone."""
        if self.peer is None:
            return None
        try:
            future: asyncio.Future[None] = self.peer.write_message(message)
        except Exception:
            self.detach(self.peer)
            return None
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return future

    def _may_read(self) -> bool:
        if self.eof or self.reason is not None or self.master < 0:
            return False
        if self.peer is not None:
            return self.pending < self.settings.buffer_bytes
        return len(self.scrollback) < self.settings.scrollback_bytes

    def _update_reading(self) -> None:
        want = self._may_read()
        if want != self.reading:
            loop = asyncio.get_running_loop()
            loop.add_reader(self.master, self._readable) if want \
                else loop.remove_reader(self.master)
            self.reading = want

    # -- the end ------------------------------------------------------------------------------

    def _exited(self, returncode: int | None) -> None:
        self.exited, self.returncode = True, returncode
        if self.reason is not None:
            self._finish()
        elif self.eof:
            self.end("exited")
        else:
            self._timers["linger"] = asyncio.get_running_loop().call_later(
                EXIT_LINGER, self._linger_over)

    def _linger_over(self) -> None:
        """The program exited a while ago; what holds the pty open (a background job) gets
        hung up, unless the socket is only slow (flow control): then the output still comes."""
        if self.reason is not None:
            return
        if self.peer is not None and not self._may_read() and not self.eof:
            self._timers["linger"] = asyncio.get_running_loop().call_later(
                EXIT_LINGER, self._linger_over)
            return
        self.end("exited")

    def end(self, reason: str) -> None:
        """End the session for `reason`: hang the terminal up; SIGKILL after HANGUP_GRACE."""
        if self.reason is not None:
            return
        self.reason = reason
        for name in ("idle", "expiry", "detach", "linger"):
            self._cancel(name)
        self._room_now()
        self._close_master()
        if self.exited:
            self._finish()
        else:
            self._timers["kill"] = asyncio.get_running_loop().call_later(
                HANGUP_GRACE, self._kill)

    def _kill(self) -> None:
        self.isolation.signal(self.isolation_id, signal.SIGKILL)
        if self.pid is not None and not self.exited:
            try:
                os.killpg(self.pid, signal.SIGKILL)  # its own group: the agent started it
            except (ProcessLookupError, PermissionError):
                pass

    def _close_master(self) -> None:
        if self.master < 0:
            return
        loop = asyncio.get_running_loop()
        if self.reading:
            loop.remove_reader(self.master)
        if self.writing:
            loop.remove_writer(self.master)
        self.reading = self.writing = False
        os.close(self.master)  # the hang-up: SIGHUP to the session leader and foreground
        self.master = -1

    def _finish(self) -> None:
        """Both the program and the session are over: clean up, tell the socket, audit."""
        if self.over:
            return
        self.over = True
        self._cancel("kill")
        if self.isolation.alive(self.isolation_id):
            self.isolation.signal(self.isolation_id, signal.SIGKILL)
        self.isolation.finished(self.isolation_id)
        status, killed = self._status()
        peer = self.peer
        sent = self._send_text(protocol.encode({"type": "exit", "status": status,
                                                "signal": killed, "reason": self.reason}))
        if peer is not None and sent is not None:
            # Closed once the output before it is written: tornado gives a closing socket
            # 5 s to finish, which a slow client's last buffer of output may need.
            reason = self.reason or "exited"
            sent.add_done_callback(lambda _: peer.close(protocol.CLOSE_NORMAL, reason))
        self.peer = None
        duration = round(time.time() - self.started, 3)
        if self.audit is not None:
            self.audit.record("terminal_end", self.user.name, session=self.id,
                              reason=self.reason, status=status, signal=killed,
                              duration=duration, bytes_out=self.bytes_out,
                              bytes_in=self.bytes_in)
        log.info("terminal %s of %s ended (%s) after %.1f s", self.id, self.user.name,
                 self.reason, duration)
        self.on_over(self)
        if not self.done.done():
            self.done.set_result(None)

    def _status(self) -> tuple[int | None, str | None]:
        code = self.returncode
        if code is None:
            return None, None
        return (None, signal_name(code)) if code < 0 else (code, None)

    # -- timers -------------------------------------------------------------------------------

    def _arm_idle(self) -> None:
        timeout = self.settings.idle_timeout
        if timeout <= 0:
            return
        due = self.last_activity + timeout - time.monotonic()
        if due <= 0:
            self.end("idle")
            return
        self._timers["idle"] = asyncio.get_running_loop().call_later(due, self._arm_idle)

    def _cancel(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()


def _group_members(group: int) -> list[int]:
    """The pids whose process group is `group` (one /proc scan)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and _stat_fields(int(name))[:1] == [group]:
            found.append(int(name))
    return found


def _stat_fields(pid: int) -> list[int]:
    """[pgrp, session] of a process, or [] once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            text = handle.read()
    except OSError:
        return []
    fields = text[text.rindex(b")") + 2:].split()
    return [int(fields[2]), int(fields[3])]


def _real_and_saved_uid(pid: int) -> tuple[int, int] | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as handle:
            for line in handle:
                if line.startswith(b"Uid:"):
                    real, _, saved = line.split()[1:4]
                    return int(real), int(saved)
    except OSError:
        pass
    return None


def _signal_if_users(pid: int, group: int, session: int, uid: int, signum: int) -> None:
    """Signal `pid` through a pidfd opened first, so what is checked is what is signalled."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        ids = _real_and_saved_uid(pid)
        if _stat_fields(pid) == [group, session] and ids is not None and uid in ids:
            signal.pidfd_send_signal(pidfd, signum)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)


class TerminalManager:
    """Every terminal session of the agent; one per agent (AgentContext)."""

    def __init__(self, settings: TerminalSettings, isolation: Isolation,
                 resolver: UserResolver, audit: Audit | None = None) -> None:
        self.settings, self.isolation, self.audit = settings, isolation, audit
        self.resolver = resolver
        self.sessions: dict[str, TerminalSession] = {}
        self.closing = False

    def of_user(self, username: str) -> list[TerminalSession]:
        return [s for s in self.sessions.values() if s.user.name == username]

    def attached(self, username: str) -> int:
        """The user's sockets attached to a terminal (they count as /v1/stream sockets do)."""
        return sum(1 for s in self.of_user(username) if s.peer is not None)

    async def start(self, user: UserIdentity, token: str, expires_at: float,
                    request: OpenRequest, peer: Peer, client: str) -> TerminalSession:
        """A new session as `user`, attached to `peer` (TooManySockets past the cap)."""
        if self.closing:
            raise ShuttingDown("the agent is shutting down")
        held = sum(1 for s in self.of_user(user.name) if s.reason is None)  # ended: going
        if held >= self.settings.max_per_user:
            raise TooManySockets(f"{held} of your terminals are open on this node (the limit "
                                 f"is terminal_max_per_user = {self.settings.max_per_user})")
        session = TerminalSession(user, token, request, self.settings, self.isolation,
                                  self.audit, self._forget, self.resolver.popen_identity(user))
        self.sessions[session.id] = session  # counted while it starts
        try:
            await session.spawn(expires_at)
        except (OSError, subprocess.SubprocessError) as exc:
            del self.sessions[session.id]
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise MarcoError(f"cannot start the terminal: {reason}") from None
        self._audit_start(session, client)
        if session.reason is not None:  # ended while it started: hung up and killed already
            if session.reason == "stopping":
                raise ShuttingDown("the agent is shutting down")
            raise AuthenticationError(f"the terminal ended as it started ({session.reason})")
        log.info("terminal %s started for %s (pid %s)", session.id, user.name, session.pid)
        session.attach(peer, reattached=False)
        return session

    def _audit_start(self, session: TerminalSession, client: str) -> None:
        """`terminal_start`: the command's SHA-256 only (the plain digest, as executions'
        audit records have it), never its text."""
        request = session.request
        if self.audit is not None:
            command = request.command
            self.audit.record("terminal_start", session.user.name, session=session.id,
                              shell=session.shell, command_sha256=hashlib.sha256(
                                  command.encode("utf-8", "surrogatepass")).hexdigest()
                              if command is not None else None,
                              pid=session.pid, peer=client, cols=request.cols, rows=request.rows)

    def owned(self, user: UserIdentity, session_id: str) -> TerminalSession:
        """The user's own live session; another user's id is NotFound as well."""
        session = self.sessions.get(session_id)
        if session is None or session.user.name != user.name or session.reason is not None \
                or session.pid is None:
            raise NotFound("no such terminal session")
        return session

    def reattach(self, user: UserIdentity, session_id: str, expires_at: float, token: str,
                 peer: Peer) -> TerminalSession:
        """The user's own session, given to `peer` (a socket that had it is closed 4409)."""
        session = self.owned(user, session_id)
        session.token = token
        session.expire_at(expires_at)
        session.attach(peer, reattached=True)
        return session

    def check_tokens(self, verify: Callable[[str], object]) -> None:
        """Revocations changed: end every session whose token `verify` now refuses."""
        for session in list(self.sessions.values()):
            try:
                verify(session.token)
            except TokenExpired:
                session.end("expired")
            except AuthenticationError:
                session.end("logged out")

    async def shutdown(self) -> None:
        """The agent stops: every session ends ("stopping") and is waited for a while."""
        self.closing = True
        sessions = list(self.sessions.values())
        for session in sessions:
            session.end("stopping")
        if sessions:
            await asyncio.wait([asyncio.shield(s.done) for s in sessions],
                               timeout=HANGUP_GRACE + EXIT_LINGER)

    def _forget(self, session: TerminalSession) -> None:
        self.sessions.pop(session.id, None)
