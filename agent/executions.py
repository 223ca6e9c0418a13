"""Executions: spawn a command as the token's user, stream its output, stop it, keep its record.

Each execution runs in its own session (process group) with the user's uid, gid, supplementary
groups and a clean environment. The working directory is entered between fork and exec
*after* the switch to the user, so the kernel checks the user's own right to enter it. Output
is read from pipes by an asyncio protocol (no coroutine per read), split into lines, batched
for a few milliseconds, numbered with a per-execution `seq`, stamped with the node's time of
the batch's first line, appended to the on-disk spool and published to the owner's sockets.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import fcntl
import functools
import hashlib
import logging
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, cast

from marco import protocol
from marco.agent_api import split_frame
from marco.errors import (
    BadRequest,
    ConfigError,
    DiskBudgetExhausted,
    NotFound,
    PayloadTooLarge,
    ShuttingDown,
    TooManyExecutions,
)

from .ansiballz import Declined, ModuleCommand, module_command
from .budget import Account, DiskBudget
from .child_end import ChildEnd
from .isolation import Isolation, popen_setup
from .lines import LineSplitter
from .runners import RunnerDeclined, RunnerPool
from .spool import ExecutionSpool, SpareDirs
from .users import UserIdentity, UserResolver
from .warm import WarmChild, close_all, make_pipes

log = logging.getLogger(__name__)

STDOUT, STDERR = 1, 2
STREAM_NAMES = {STDOUT: "stdout", STDERR: "stderr"}
BATCH_DELAY = 0.005          # seconds a batch may wait for more lines
BATCH_MAX_BYTES = 256 * 1024  # a batch this large goes out at once
PIPE_SIZE = 1024 * 1024      # bigger pipes let a chatty child run ahead of the reader
EXIT_LINGER = 2.0            # seconds to wait for pipe EOF after the process itself exited
CAPTURE_MEMORY = 8 * 1024 * 1024
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
ID_LENGTH = 32
MAX_TIMEOUT = 366 * 24 * 3600
CAPTURE_MAX = 256 * 1024 * 1024  # bytes of stdout (and of stderr) a `wait` caller gets back
CENSORED = "(hidden: no_log)"  # what listings, records and the audit log show of a no_log command
LISTED_COMMAND_CHARS = 1000  # commands longer than this are shortened in listings and `hello`
PATH_MAX = 4096  # bytes: the kernel refuses longer paths, so a longer cwd is refused up front
AUDITED_COMMAND_CHARS = 4096  # the audit log keeps this much of a command, and its SHA-256
MAX_TAGS = 8                 # tags per execution (Marco uses run, task, host)
TAG_KEY = re.compile(r"[a-z_]{1,40}")
MAX_TAG_VALUE_CHARS = 200
CWD_FAILED = 125             # a child's status when it cannot enter its cwd (as `env -C`)
RECORD_DELAY = 1.0           # seconds a running execution without output may go unrecorded


class AuditSink(Protocol):
    """Where the manager records who ran what (agent.audit.AuditLog)."""

    def record(self, event: str, user: str | None, **fields: Any) -> None: ...


class EventSink(Protocol):
    """Where encoded events of a user's executions go (the per-user socket table)."""

    def publish(self, username: str, message: str) -> None: ...


@dataclass(frozen=True)
class ExecutionRequest:
    """A validated `POST /v1/executions` body."""

    argv: list[str] | None
    shell: str | None
    cwd: str | None
    env: dict[str, str]
    stdin: bytes
    label: str
    timeout: float | None
    no_log: bool = False
    tags: dict[str, str] = field(default_factory=dict)
    runner: bool = True  # may a module runner run it (agent.runners)? The caller may say no

    @classmethod
    def from_json(cls, body: Any, max_command_bytes: int = 256 * 1024,
                  max_stdin_bytes: int = 16 * 1024 * 1024) -> ExecutionRequest:
        """Validate a request body; argv or shell, env and cwd together may take at most
        `max_command_bytes` (they are kept in memory, in listings and on disk), stdin at most
        `max_stdin_bytes` (held in memory until the command reads it)."""
        if not isinstance(body, dict):
            raise BadRequest("body must be a JSON object")
        argv, shell = body.get("argv"), body.get("shell")
        if (argv is None) == (shell is None):
            raise BadRequest("give exactly one of 'argv' (list of strings) or 'shell' (string)")
        if argv is not None and (not isinstance(argv, list) or not argv
                                 or not all(isinstance(a, str) for a in argv)):
            raise BadRequest("'argv' must be a non-empty list of strings")
        if shell is not None and not isinstance(shell, str):
            raise BadRequest("'shell' must be a string")
        for text in (argv or []) + ([shell] if shell is not None else []):
            if "\0" in text:
                raise BadRequest("command contains a NUL byte")
        env = body.get("env") or {}
        if not isinstance(env, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and k and "=" not in k
                and "\0" not in k + v for k, v in env.items()):
            raise BadRequest("'env' must map variable names to strings")
        cwd = body.get("cwd")
        if cwd is not None and (not isinstance(cwd, str) or not cwd or "\0" in cwd):
            raise BadRequest("'cwd' must be a non-empty string")
        if cwd is not None and len(cwd.encode("utf-8", "surrogatepass")) >= PATH_MAX:
            raise BadRequest(f"'cwd' must be shorter than {PATH_MAX} bytes (PATH_MAX)")
        if argv is not None and "=" in argv[0]:
            raise BadRequest("the program name (argv[0]) must not contain '='")
        encoded = body.get("stdin") or ""
        stdin_size = (len(encoded) // 4 * 3 - encoded[-2:].count("=")
                      if isinstance(encoded, str) else 0)
        if stdin_size > max_stdin_bytes:
            raise PayloadTooLarge(f"stdin takes {stdin_size} bytes; this node accepts at most "
                                  f"{max_stdin_bytes} (send large data as a file)")
        try:
            stdin = base64.b64decode(encoded, validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise BadRequest("'stdin' must be base64") from None
        label = body.get("label") or ""
        if not isinstance(label, str) or len(label) > protocol.MAX_LABEL_CHARS:
            raise BadRequest(f"'label' must be a string of at most {protocol.MAX_LABEL_CHARS} "
                             "characters")
        timeout = body.get("timeout")
        if timeout is not None and (isinstance(timeout, bool)
                                    or not isinstance(timeout, (int, float))
                                    or not 0 < timeout <= MAX_TIMEOUT):
            raise BadRequest(f"'timeout' must be a number of seconds in (0, {MAX_TIMEOUT}]")
        no_log = body.get("no_log", False)
        if not isinstance(no_log, bool):
            raise BadRequest("'no_log' must be true or false")
        tags = parse_tags(body.get("tags"))
        runner = body.get("runner", True)
        if not isinstance(runner, bool):
            raise BadRequest("'runner' must be true or false")
        size = sum(len(text.encode("utf-8", "surrogatepass")) + 1 for text in (
            *(argv or []), shell or "", cwd or "", *(k + "=" + v for k, v in env.items())))
        if size > max_command_bytes:
            raise PayloadTooLarge(f"the command, its environment and cwd take {size} bytes; this "
                                  f"node accepts at most {max_command_bytes} (send large data "
                                  "as stdin or as a file)")
        return cls(argv, shell, cwd, env, stdin, label, timeout, no_log, tags, runner)

    @classmethod
    def from_frame(cls, body: bytes | memoryview, max_command_bytes: int = 256 * 1024,
                   max_stdin_bytes: int = 16 * 1024 * 1024) -> ExecutionRequest:
        """Validate a binary body (marco.agent_api.EXECUTION_TYPE): a 4-byte big-endian head
        length, the head (the JSON body without 'stdin'), then stdin raw; the limits as for
        `from_json`."""
        try:
            head, stdin = split_frame(body)
        except ValueError as error:
            raise BadRequest(f"binary body: {error}") from None
        if "stdin" in head:
            raise BadRequest("binary body: stdin follows the head, not in it")
        if len(stdin) > max_stdin_bytes:
            raise PayloadTooLarge(f"stdin takes {len(stdin)} bytes; this node accepts at most "
                                  f"{max_stdin_bytes} (send large data as a file)")
        return replace(cls.from_json(head, max_command_bytes, max_stdin_bytes),
                       stdin=bytes(stdin))

    @property
    def command(self) -> list[str] | str:
        if self.argv is not None:
            return self.argv
        assert self.shell is not None  # from_json requires exactly one of them
        return self.shell


def parse_tags(tags: Any) -> dict[str, str]:
    """Validate an execution's `tags` (absent: none): at most MAX_TAGS keys matching
    [a-z_]{1,40}, string values of at most MAX_TAG_VALUE_CHARS; they are kept with the record
    and sent in every listing, so they stay small."""
    if tags is None:
        return {}
    if not isinstance(tags, dict):
        raise BadRequest("'tags' must be an object of strings")
    if len(tags) > MAX_TAGS:
        raise BadRequest(f"'tags' has {len(tags)} keys; at most {MAX_TAGS} are allowed")
    for key, value in tags.items():
        if not TAG_KEY.fullmatch(key):
            raise BadRequest(f"tag name {key[:50]!r} must be 1-40 characters of a-z and _")
        if not isinstance(value, str) or len(value) > MAX_TAG_VALUE_CHARS or "\0" in value:
            raise BadRequest(f"tag {key!r} must be a string of at most {MAX_TAG_VALUE_CHARS} "
                             "characters")
    return dict(tags)


class OutputCapture:
    """The raw bytes of stdout and stderr, for `?wait=1` callers (spills to disk when large)."""

    def __init__(self, tmp_dir: Path, limit: int = CAPTURE_MAX,
                 account: Account | None = None) -> None:
        self.limit = limit
        self.account = account  # the owner's disk budget: a capture may spill to disk
        self.streams: dict[int, tempfile.SpooledTemporaryFile[bytes]] = {
            fd: tempfile.SpooledTemporaryFile(max_size=CAPTURE_MEMORY, mode="w+b", dir=str(tmp_dir))
            for fd in (STDOUT, STDERR)}
        self.sizes = {STDOUT: 0, STDERR: 0}
        self.truncated = {STDOUT: False, STDERR: False}

    def write(self, fd: int, data: bytes) -> None:
        """Keep at most `limit` bytes per stream; the rest is only streamed and spooled."""
        if self.truncated[fd]:
            return  # nothing after a cut, or the caller would get output with a hole in it
        room = self.limit - self.sizes[fd]
        if len(data) > room:
            self.truncated[fd] = True
            data = data[:max(room, 0)]
        if data and self.account is not None and not self.account.try_charge(len(data)):
            self.truncated[fd] = True
            data = b""
        if data:
            self.streams[fd].write(data)
            self.sizes[fd] += len(data)

    def close(self) -> None:
        for stream in self.streams.values():
            stream.close()
        if self.account is not None:
            self.account.release(sum(self.sizes.values()))
            self.account = None


@dataclass
class Execution:
    """One command run for one user: its state, its output batching, its record on disk."""

    id: str
    user: str
    label: str
    command: list[str] | str
    cwd: str
    started: float
    spool: ExecutionSpool
    sink: EventSink
    capture: OutputCapture | None = None
    state: str = "running"          # running | exited | killed | lost
    ended: float | None = None
    rc: int | None = None
    signal: str | None = None
    timed_out: bool = False
    stopped: bool = False
    next_seq: int = 0
    pid: int | None = None
    done: asyncio.Future[None] | None = None
    timeout_handle: asyncio.TimerHandle | None = None
    no_log: bool = False            # output only for a `wait` caller: never spooled or streamed
    tags: dict[str, str] = field(default_factory=dict)  # the caller's (run, task, host): not output
    via: str = "process"            # who started the child: "process" (the agent) or "runner"
    runner_note: str = ""           # why, for the caller's -vvv: "warm (runner 42, task 7)"
    _splitters: dict[int, LineSplitter] = field(default_factory=lambda: {
        STDOUT: LineSplitter(), STDERR: LineSplitter()})
    _batch_fd: int = STDOUT
    _batch_lines: list[str] = field(default_factory=list)
    _batch_bytes: int = 0
    _batch_time: float = 0.0         # when the batch's first line was read: its event's `time`
    _read_times: dict[int, float] = field(default_factory=dict)  # each pipe's last read
    _flush_handle: asyncio.TimerHandle | None = None
    # A running execution's meta.json is written lazily (see `record_running`): most exit
    # first, and their one record is written at the end.
    _recorded: bool = False
    _record_handle: asyncio.TimerHandle | None = None

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def duration(self) -> float | None:
        end = self.ended if self.ended is not None else (time.time() if self.running else None)
        return None if end is None else round(end - self.started, 6)

    def summary(self, short: bool = False) -> dict[str, Any]:
        """The JSON shape of an execution in meta.json and `GET /v1/executions/{id}`; `short`
        (listings, `hello`) cuts a long command to LISTED_COMMAND_CHARS, so many sockets of
        a user holding many executions hold little (`command_shortened` says so)."""
        command = self.command
        shortened = short and _length(command) > LISTED_COMMAND_CHARS
        if shortened:
            command = _short(command, LISTED_COMMAND_CHARS)
        return {"id": self.id, "user": self.user, "label": self.label, "command": command,
                "command_shortened": shortened,
                "cwd": self.cwd, "started": self.started, "ended": self.ended,
                "state": self.state, "rc": self.rc, "signal": self.signal,
                "duration": self.duration, "timed_out": self.timed_out,
                "stopped": self.stopped, "next_seq": self.next_seq,
                "truncated_seq": self.spool.truncated_seq, "no_log": self.no_log,
                "tags": self.tags, "via": self.via, "runner_note": self.runner_note}

    # -- output path: pipe bytes -> lines -> batch -> spool + sockets -----------------------

    def on_output(self, fd: int, data: bytes) -> None:
        if self.capture is not None:
            self.capture.write(fd, data)
        if self.no_log:
            return
        # One clock read per pipe read (not per line): a line's time is the read that ends it.
        now = self._read_times[fd] = time.time()
        lines = self._splitters[fd].feed(data)
        if lines:
            self._add_lines(fd, lines, len(data), now)

    def _add_lines(self, fd: int, lines: list[str], nbytes: int, read_time: float) -> None:
        if self._batch_lines and fd != self._batch_fd:
            self.flush_batch()
        if not self._batch_lines:
            self._batch_time = read_time
        self._batch_fd = fd
        self._batch_lines.extend(lines)
        self._batch_bytes += nbytes
        if self._batch_bytes >= BATCH_MAX_BYTES:
            self.flush_batch()
        elif self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(
                BATCH_DELAY, self.flush_batch)

    def flush_batch(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._batch_lines:
            return
        lines, self._batch_lines, self._batch_bytes = self._batch_lines, [], 0
        seq, self.next_seq = self.next_seq, self.next_seq + len(lines)
        if not self._recorded and self.running:
            self.save_meta()  # spooled output always has its record, to replay after a crash
        message = protocol.encode(protocol.output_event(
            self.id, STREAM_NAMES[self._batch_fd], seq, lines, self._batch_time))
        self.spool.append(message, seq, len(lines))
        self.sink.publish(self.user, message)

    def flush_partial_lines(self) -> None:
        for fd, splitter in self._splitters.items():
            rest = splitter.flush()
            if rest:
                # A last line without a newline ended with its pipe's last read.
                self._add_lines(fd, rest, 0, self._read_times.get(fd, time.time()))
        self.flush_batch()

    def publish(self, event: dict[str, Any]) -> None:
        self.sink.publish(self.user, protocol.encode(event))

    def save_meta(self) -> None:
        self._recorded = True
        try:
            self.spool.write_meta(self.summary())
        except OSError:
            log.exception("cannot write meta of execution %s", self.id)

    def record_running(self) -> None:
        """Have the running execution recorded on disk (so an agent that dies under it finds
        it `lost` on restart) before its first output is spooled or after RECORD_DELAY,
        whichever comes first; one that ends sooner is recorded once, at its end."""
        self._record_handle = asyncio.get_running_loop().call_later(
            RECORD_DELAY, self._record_if_running)

    def _record_if_running(self) -> None:
        self._record_handle = None
        if not self._recorded and self.running:
            self.save_meta()

    def record_end(self) -> None:
        """Write the final record (the execution has ended)."""
        if self._record_handle is not None:
            self._record_handle.cancel()
            self._record_handle = None
        self.save_meta()


class _ChildProtocol(asyncio.SubprocessProtocol):
    """Feeds pipe data into the execution and tells the runner when the child is over."""

    def __init__(self, execution: Execution,
                 on_started: Callable[[asyncio.SubprocessTransport], None],
                 on_finished: Callable[[], None]) -> None:
        self.execution = execution
        self.on_started = on_started
        self.transport: asyncio.SubprocessTransport | None = None
        self.end = ChildEnd(on_finished, self._close_pipes, EXIT_LINGER)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Called before any pipe data is delivered: the `started` event goes out first.
        self.transport = cast(asyncio.SubprocessTransport, transport)  # subprocess_exec's own
        self.on_started(self.transport)

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self.execution.on_output(fd, data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self.end.pipe_closed(fd)

    def process_exited(self) -> None:
        self.end.child_exited()

    def _close_pipes(self) -> None:
        for fd in list(self.end.open_pipes):
            pipe = self.transport.get_pipe_transport(fd) if self.transport else None
            if pipe is not None:
                pipe.close()


class ExecutionManager:
    """Starts, tracks, stops and forgets executions; one per agent."""

    def __init__(self, resolver: UserResolver, sink: EventSink, state_dir: Path,
                 spool_max_bytes: int, stop_grace: float, retention: float,
                 retention_count: int, audit: AuditSink | None = None,
                 max_running_per_user: int = 64, spool_max_bytes_per_user: int = 1 << 30,
                 isolation: Isolation | None = None, capture_max: int = CAPTURE_MAX,
                 runners: RunnerPool | None = None) -> None:
        self.resolver = resolver
        self.isolation = isolation or Isolation()  # each execution's processes: cgroup or subreaper
        self.sink = sink
        self.spool_root = state_dir / "executions"
        self.spare_dirs = SpareDirs()  # emptied spool directories, for new executions
        self.tmp_dir = state_dir / "tmp"
        self.spool_max_bytes = spool_max_bytes
        self.capture_max = capture_max
        self.stop_grace = stop_grace
        self.retention = retention
        self.retention_count = retention_count
        self._executions: dict[str, Execution] = {}
        # Each user's finished executions, oldest end first (they are added as they end), so
        # retention looks at the oldest few instead of sorting everything on every exit.
        self._finished_of: dict[str, dict[str, Execution]] = {}
        self._running_of: collections.Counter[str] = collections.Counter()
        self._transports: dict[str, asyncio.SubprocessTransport] = {}
        # Pipelined Ansible modules go to a warm per-user runner (None or disabled: never).
        self.runners = runners
        self._warm: dict[str, WarmChild] = {}
        self.closing = False
        self.audit = audit
        self.max_running_per_user = max_running_per_user
        # Everything a user makes this agent write (spools, meta.json, captures) counts here;
        # when full, that user's oldest finished executions go first.
        self.budget = DiskBudget(spool_max_bytes_per_user, self._make_room)

    # -- lifecycle ----------------------------------------------------------------------------

    def load(self) -> None:
        """Create the state dirs and reload finished executions kept from an earlier run."""
        for directory in (self.spool_root.parent, self.spool_root, self.tmp_dir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            check_private_dir(directory)
        self.isolation.start()
        spares = self.spool_root.parent / "spare-dirs"
        spares.mkdir(mode=0o700, exist_ok=True)
        check_private_dir(spares)
        self.spare_dirs.open(spares)
        for tmp in self.tmp_dir.iterdir():  # captures of a previous run
            tmp.unlink(missing_ok=True)
        for directory in sorted(self.spool_root.iterdir()):
            try:
                meta = ExecutionSpool.read_meta(directory)
            except FileNotFoundError:  # died before its first record: nothing to keep
                shutil.rmtree(directory, ignore_errors=True)
                continue
            except (OSError, ValueError):
                log.warning("ignoring unreadable execution record %s", directory)
                continue
            spool = ExecutionSpool.open_existing(directory, self.spool_max_bytes,
                                                 self.budget.account(meta["user"]))
            spool.truncated_seq = meta.get("truncated_seq")
            execution = Execution(meta["id"], meta["user"], meta["label"], meta["command"],
                                  meta["cwd"], meta["started"], spool, self.sink,
                                  state=meta["state"], ended=meta.get("ended"),
                                  rc=meta.get("rc"), signal=meta.get("signal"),
                                  timed_out=meta.get("timed_out", False),
                                  stopped=meta.get("stopped", False),
                                  next_seq=meta.get("next_seq", 0),
                                  no_log=meta.get("no_log", False),
                                  tags=meta.get("tags") or {},
                                  via=meta.get("via", "process"),
                                  runner_note=meta.get("runner_note", ""))
            if execution.running:  # the agent died under it: its fate is unknown
                execution.state, execution.ended = "lost", execution.ended or time.time()
                execution.save_meta()
            self._executions[execution.id] = execution
        for execution in sorted(self._executions.values(), key=_end):
            self._add_finished(execution)
        self.expire()

    async def shutdown(self) -> None:
        """Stop every running execution (agent shutdown) and wait for them to end."""
        self.closing = True
        running = [e for e in self._executions.values() if e.running]
        for execution in running:
            self._signal_group(execution, signal.SIGTERM)
        waits = [asyncio.shield(e.done) for e in running if e.done is not None]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=self.stop_grace)
            if pending:
                for execution in running:
                    self._signal_group(execution, signal.SIGKILL)
                await asyncio.wait(waits, timeout=EXIT_LINGER + 1)
        if self.runners is not None:
            await self.runners.close()
        await self.isolation.close()  # kills what executions left behind, removes cgroups

    # -- queries ------------------------------------------------------------------------------

    def get(self, username: str, execution_id: str) -> Execution:
        """The user's execution; another user's id is indistinguishable from a missing one."""
        execution = self._executions.get(execution_id)
        if execution is None or execution.user != username:
            raise NotFound("no such execution")
        return execution

    def of_user(self, username: str, run: str | None = None) -> list[Execution]:
        """The user's executions, oldest first; with `run`, only those tagged with that run."""
        return sorted((e for e in self._executions.values() if e.user == username
                       and (run is None or e.tags.get("run") == run)),
                      key=lambda e: e.started)

    def read_output(self, username: str, execution_id: str, since: int, max_lines: int,
                    max_bytes: int) -> tuple[Execution, list[dict[str, Any]]]:
        execution = self.get(username, execution_id)
        if since < 0:
            raise BadRequest("'since' must be >= 0")
        return execution, execution.spool.read(since, max_lines, max_bytes)

    # -- actions ------------------------------------------------------------------------------

    async def start(self, user: UserIdentity, request: ExecutionRequest,
                    capture: bool = False) -> Execution:
        if self.closing:
            raise ShuttingDown("the agent is shutting down; try again when it is back")
        running = self._running_of[user.name]
        if running >= self.max_running_per_user:
            raise TooManyExecutions(f"{running} of your executions are running on this node "
                                    f"(the limit is {self.max_running_per_user}); "
                                    "stop some or wait")
        while self.budget.exhausted(user.name):
            if not self._make_room(user.name):
                raise DiskBudgetExhausted(
                    f"your output on this node takes {self.budget.used(user.name)} bytes, all of "
                    f"your disk budget (spool_max_bytes_per_user = {self.budget.limit}); stop "
                    "or wait for your running executions, whose output fills it")
        execution_id = secrets.token_hex(ID_LENGTH // 2)
        cwd = user.expand(request.cwd) if request.cwd else user.home
        account = self.budget.account(user.name)
        spool = ExecutionSpool.create(self.spool_root / execution_id, self.spool_max_bytes,
                                      account, self.spare_dirs)
        loop = asyncio.get_running_loop()
        # A no_log command (an Ansible task marked no_log) may carry secrets in its arguments:
        # it is kept nowhere, and its output reaches only the `wait` caller.
        command = CENSORED if request.no_log else request.command
        execution = Execution(execution_id, user.name, request.label, command, cwd,
                              time.time(), spool, self.sink,
                              capture=OutputCapture(self.tmp_dir, self.capture_max, account)
                              if capture else None,
                              done=loop.create_future(), no_log=request.no_log,
                              tags=request.tags)
        given = request.command
        argv = given if isinstance(given, list) else ["/bin/sh", "-c", given]
        env = user.clean_environment()
        env.update(request.env)
        env["MARCO_EXECUTION_ID"] = execution_id
        module = self._module_of(request)
        self._executions[execution_id] = execution
        self._running_of[user.name] += 1
        try:
            with self.isolation.spawning_fds(execution_id, user) as (procs_fd, nproc):
                warm = False
                if isinstance(module, ModuleCommand):
                    warm = await self._launch_warm(execution, user, module, env, procs_fd,
                                                   nproc, request.stdin)
                else:
                    execution.runner_note = module
                if not warm:
                    transport = await self._spawn(execution, user, argv, env,
                                                  popen_setup(procs_fd, nproc))
        except (OSError, subprocess.SubprocessError) as exc:
            del self._executions[execution_id]
            self._running_of[user.name] -= 1
            spool.remove()
            if execution.capture:
                execution.capture.close()
            reason = exc.strerror if isinstance(exc, OSError) else "its cgroup could not be joined"
            raise BadRequest(f"cannot start the command: {reason}") from None
        if not warm:
            self._feed_stdin(transport, request.stdin)
        if execution.stopped:
            # Stopped while it was being started, before its pid (or runner task) was known.
            self._terminate(execution)
        if request.timeout:
            execution.timeout_handle = loop.call_later(request.timeout, self._timeout, execution)
        log.info("execution %s started for %s: %s", execution_id, user.name,
                 _short(execution.command))
        return execution

    async def _spawn(self, execution: Execution, user: UserIdentity, argv: list[str],
                     env: dict[str, str], isolation_args: dict[str, Any],
                     ) -> asyncio.SubprocessTransport:
        """Start the command as the user, in its session, entering `cwd` after the switch to
        the user (CPython's own `cwd=` would chdir as root, before it). A program exec refuses
        (missing, not executable, a script without `#!`) is started again through `env -C`,
        which reports it as a shell would (127 or 126, its message on stderr) and runs a
        script without `#!` with /bin/sh."""
        loop = asyncio.get_running_loop()
        options: dict[str, Any] = dict(
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env, start_new_session=True, close_fds=True,
            **self.resolver.popen_identity(user))

        def protocol_() -> _ChildProtocol:
            return _ChildProtocol(execution, lambda t: self._started_process(execution, t),
                                  lambda: self._finished_process(execution))

        setup = isolation_args.get("preexec_fn")
        try:
            transport, _ = await loop.subprocess_exec(
                protocol_, *argv, preexec_fn=functools.partial(
                    _enter_cwd, os.fsencode(execution.cwd), _cwd_error(execution.cwd), setup),
                **options)
        except OSError as exc:
            if exc.filename is None:  # not the exec: pipes, fork, the switch to the user
                raise
            transport, _ = await loop.subprocess_exec(
                protocol_, "/usr/bin/env", "-C", execution.cwd, "--", *argv, **options,
                **isolation_args)
        return transport

    def _module_of(self, request: ExecutionRequest) -> ModuleCommand | str:
        """The pipelined Ansible module a runner may run warm, or why the agent starts the
        command itself (the note the caller shows at -vvv)."""
        if self.runners is None or not self.runners.settings.enabled:
            return "runner off"
        if not request.runner:
            return "not asked (runner: false)"
        if request.shell is None:
            return "not a pipelined module"
        for name in request.env:
            if _changes_interpreter(name):
                return f"the request's environment sets {name}"
        found = module_command(request.shell, request.stdin)
        return found.reason if isinstance(found, Declined) else found

    async def _launch_warm(self, execution: Execution, user: UserIdentity,
                           module: ModuleCommand, env: dict[str, str], procs_fd: int | None,
                           nproc: int, stdin: bytes) -> bool:
        """Have the user's module runner fork the child; False (and the reason in
        `runner_note`) when it declines before anything ran: the caller starts it cold."""
        assert self.runners is not None
        # What the cold path's `/bin/sh -c 'NAME=VALUE python3 && sleep 0'` gives Python
        # (dash exports PWD as getcwd() finds it: symlinks resolved).
        child_env = {**env, **module.env, "PWD": os.path.realpath(execution.cwd)}
        child_fds, own_fds = make_pipes(PIPE_SIZE)
        try:
            launched = await self.runners.launch(execution.id, user, module, execution.cwd,
                                                 child_env, child_fds, procs_fd, nproc)
        except RunnerDeclined as declined:
            close_all(own_fds)
            execution.runner_note = f"declined: {declined.reason}"
            return False
        except BaseException:
            close_all(own_fds)
            raise
        finally:
            close_all(child_fds)
        warm = WarmChild(execution, functools.partial(self._finished_warm, execution),
                         EXIT_LINGER, functools.partial(self.isolation.signal, execution.id,
                                                        signal.SIGKILL))
        execution.via, execution.runner_note = "runner", launched.note
        self._warm[execution.id] = warm
        # The pid comes from the user's own process: shown, never signalled by the agent,
        # and never handed to the subreaper, which would signal its session as root (the
        # runner may reap the child and the pid be reused). Stops go through the runner
        # and the execution's cgroup.
        self._started(execution, launched.pid if _owned_by(launched.pid, user.uid) else None,
                      track=False)
        stdin_w, stdout_r, stderr_r = own_fds
        await warm.attach(stdout_r, stderr_r, stdin_w, stdin)
        warm.watch(launched)
        return True

    def _finished_warm(self, execution: Execution, returncode: int | None) -> None:
        warm = self._warm.pop(execution.id, None)
        if warm is not None:
            warm.close()
        self._finished(execution, returncode, lost=returncode is None)

    def stop(self, username: str, execution_id: str) -> Execution:
        """SIGTERM the execution's processes now, SIGKILL them after the grace period; a
        finished execution's leftovers (a `setsid cmd &`) get the same."""
        execution = self.get(username, execution_id)
        if execution.running:
            execution.stopped = True
            self._terminate(execution)
        elif self.isolation.alive(execution.id):
            self._terminate(execution)
        return execution

    def expire(self) -> None:
        """Forget finished executions older than the retention time, beyond the count, or
        (oldest first) beyond the user's disk budget. Running executions are never dropped:
        their spool stops storing (and says where) when the budget or `spool_max_bytes` is
        reached, and the user's new executions are refused until there is room. Runs every
        EXPIRE_INTERVAL (agent.__main__); an exit expires its own user's (`_expire_user`)."""
        now = time.time()
        for user in list(self._finished_of):
            self._expire_user(user, now)

    def _expire_user(self, user: str, now: float) -> None:
        """`expire` for one user: only the oldest records are looked at."""
        finished = self._finished_of.get(user, {})
        while len(finished) > self.retention_count:
            self._forget(next(iter(finished.values())))
        while finished and now - _end(oldest := next(iter(finished.values()))) > self.retention:
            self._forget(oldest)
        while self.budget.used(user) > self.budget.limit and self._make_room(user):
            pass

    def _add_finished(self, execution: Execution) -> None:
        if not execution.running:
            self._finished_of.setdefault(execution.user, {})[execution.id] = execution

    def _make_room(self, user: str) -> bool:
        """Forget the user's oldest finished execution; False when none is left."""
        finished = self._finished_of.get(user)
        if not finished:
            return False
        self._forget(next(iter(finished.values())))
        return True

    def _forget(self, execution: Execution) -> None:
        del self._executions[execution.id]
        finished = self._finished_of.get(execution.user, {})
        finished.pop(execution.id, None)
        if not finished:
            self._finished_of.pop(execution.user, None)
        execution.spool.remove()
        if self.isolation.alive(execution.id):
            # What it left running could never be stopped by id again: it goes with the record.
            self.isolation.signal(execution.id, signal.SIGKILL)

    # -- internals ----------------------------------------------------------------------------

    def _terminate(self, execution: Execution) -> None:
        self._signal_group(execution, signal.SIGTERM)
        asyncio.get_running_loop().call_later(
            self.stop_grace, self._signal_group, execution, signal.SIGKILL)

    def _timeout(self, execution: Execution) -> None:
        if execution.running:
            execution.timed_out = True
            self._terminate(execution)

    def _signal_group(self, execution: Execution, signum: signal.Signals) -> None:
        # Also after the main process ended: processes that left its group (setsid) remain.
        self.isolation.signal(execution.id, signum)
        if not execution.running or execution.pid is None:
            return
        warm = self._warm.get(execution.id)
        if warm is not None:
            # Its pid comes from the user's runner: the runner signals it, as the user.
            warm.signal(signum)
            return
        try:
            os.killpg(execution.pid, signum)
        except ProcessLookupError:
            pass
        except PermissionError:
            log.warning("cannot signal execution %s", execution.id)

    @staticmethod
    def _enlarge_pipes(transport: asyncio.SubprocessTransport) -> None:
        for fd in (STDOUT, STDERR):
            pipe = transport.get_pipe_transport(fd)
            handle = pipe.get_extra_info("pipe") if pipe else None
            if handle is not None:
                try:
                    fcntl.fcntl(handle.fileno(), F_SETPIPE_SZ, PIPE_SIZE)
                except (OSError, ValueError):
                    pass  # over pipe-max-size, or already closed: keep the default

    @staticmethod
    def _feed_stdin(transport: asyncio.SubprocessTransport, data: bytes) -> None:
        pipe = transport.get_pipe_transport(0)
        if pipe is None:
            return
        stdin = cast(asyncio.WriteTransport, pipe)  # fd 0 of a subprocess: a write pipe
        try:
            if data:
                stdin.write(data)
            stdin.write_eof()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the command does not read its stdin: fine

    def _started_process(self, execution: Execution,
                         transport: asyncio.SubprocessTransport) -> None:
        self._transports[execution.id] = transport
        self._enlarge_pipes(transport)
        self._started(execution, transport.get_pid())

    def _finished_process(self, execution: Execution) -> None:
        transport = self._transports.pop(execution.id, None)
        returncode = transport.get_returncode() if transport else None
        if transport is not None:
            transport.close()
        self._finished(execution, returncode)

    def _started(self, execution: Execution, pid: int | None, track: bool = True) -> None:
        execution.pid = pid
        if pid is not None and track:
            self.isolation.started(execution.id, pid)
        execution.publish(protocol.started_event(execution.id, execution.label, execution.command,
                                                 execution.cwd, execution.started, 0,
                                                 execution.no_log, execution.tags))
        execution.record_running()
        if self.audit is not None:
            # Bounded, so one user's long commands cannot rotate everyone's history away.
            command = execution.command
            shortened = _length(command) > AUDITED_COMMAND_CHARS
            self.audit.record("execution.start", execution.user, id=execution.id,
                              command=_short(command, AUDITED_COMMAND_CHARS) if shortened
                              else command, command_sha256=_digest(command) if shortened else None,
                              cwd=execution.cwd, label=execution.label, pid=execution.pid,
                              no_log=execution.no_log)

    def _finished(self, execution: Execution, returncode: int | None,
                  lost: bool = False) -> None:
        """The main process ended with `returncode` (-N: killed by signal N); `lost`: how is
        unknown (its runner died), the execution ends `lost`."""
        if execution.timeout_handle is not None:
            execution.timeout_handle.cancel()
        self.isolation.finished(execution.id)  # leftovers keep running until stopped
        if lost:
            execution.state = "lost"
        elif returncode is not None and returncode < 0:
            execution.state, execution.signal = "killed", signal_name(-returncode)
        else:
            execution.state, execution.rc = "exited", returncode
        self._running_of[execution.user] -= 1
        # Ended before its last lines go out: they need no record of a running execution,
        # the final one below covers them.
        execution.flush_partial_lines()
        execution.ended = time.time()
        execution.spool.close()
        execution.record_end()
        execution.publish(protocol.exit_event(
            execution.id, execution.rc, execution.signal, execution.duration or 0.0,
            execution.next_seq, execution.timed_out, execution.stopped))
        if self.audit is not None:
            self.audit.record("execution.end", execution.user, id=execution.id, rc=execution.rc,
                              signal=execution.signal, duration=execution.duration,
                              stopped=execution.stopped, timed_out=execution.timed_out)
        log.info("execution %s of %s ended: rc=%s signal=%s in %.3fs", execution.id,
                 execution.user, execution.rc, execution.signal, execution.duration or 0.0)
        if execution.done is not None and not execution.done.done():
            execution.done.set_result(None)
        self._add_finished(execution)
        # After the `wait` caller's answer: forgetting old records is no part of this one.
        asyncio.get_running_loop().call_soon(self._expire_user, execution.user, time.time())


def signal_name(number: int) -> str:
    """SIGTERM, SIGRTMIN+3, ...: every signal a process can die of has a name."""
    try:
        return signal.Signals(number).name
    except ValueError:
        if signal.SIGRTMIN <= number <= signal.SIGRTMAX:
            return f"SIGRTMIN+{number - signal.SIGRTMIN}"
        return f"SIG{number}"


def _changes_interpreter(name: str) -> bool:
    """Does this variable change how Python starts or encodes stdio? A runner started
    without it would then not behave as a new interpreter would."""
    return name.startswith(("PYTHON", "LD_", "LC_")) or name in ("LANG", "PWD", "HOME", "TZ")


def _owned_by(pid: int, uid: int) -> bool:
    """Is `pid` a live process whose real uid is `uid`? (A runner reports its child's pid.)"""
    try:
        with open(f"/proc/{int(pid)}/status", "rb") as handle:
            for line in handle:
                if line.startswith(b"Uid:"):
                    return pid > 1 and int(line.split()[1]) == uid
    except (OSError, ValueError):
        pass
    return False


def _cwd_error(cwd: str) -> str:
    """The start of the message a child that cannot enter `cwd` writes to its stderr (made in
    the agent: the child does as little as it can between fork and exec)."""
    return f"marco-agent: cannot change directory to {cwd!r}: "


def _enter_cwd(cwd: bytes, error: str, setup: Callable[[], object] | None) -> None:
    """Runs in the child between fork and exec, already as the user: the isolation's setup
    (join the cgroup, cap processes), then enter `cwd`, so the kernel checks the user's own
    right to. A refusal ends the child as `env -C` does: its reason on stderr, status 125."""
    if setup is not None:
        setup()
    try:
        os.chdir(cwd)
    except OSError as exc:
        os.write(2, (error + (exc.strerror or "error") + "\n").encode("utf-8", "replace"))
        os._exit(CWD_FAILED)


def use_pidfd_child_watcher() -> None:
    """Wait for children with a pidfd on the running loop where asyncio would start a thread
    per child (Python 3.11's ThreadedChildWatcher); 3.12 makes that choice itself. Nothing
    changes where the kernel has no pidfd_open (before Linux 5.3)."""
    if sys.version_info >= (3, 12):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        log.info("no pidfd_open: asyncio waits for each execution in a thread of its own")
        return
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(asyncio.get_running_loop())
    asyncio.set_child_watcher(watcher)


def check_private_dir(directory: Path) -> None:
    """Refuse a state directory another user could swap or read (a symlink, a foreign owner,
    group/other access): the agent writes there as root."""
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"state directory {directory} is not a directory (a symlink?)")
    if info.st_uid != os.geteuid():
        raise ConfigError(f"state directory {directory} belongs to uid {info.st_uid}, "
                          f"not to the agent (uid {os.geteuid()})")
    if info.st_mode & 0o077:
        os.chmod(directory, 0o700, follow_symlinks=False)


def _end(execution: Execution) -> float:
    """When a finished execution ended (its start if the record has no end): retention's
    order."""
    return execution.ended or execution.started


def _digest(command: list[str] | str) -> str:
    text = command if isinstance(command, str) else "\0".join(command)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _length(command: list[str] | str) -> int:
    return len(command) if isinstance(command, str) else sum(len(a) + 1 for a in command)


def _short(command: list[str] | str, limit: int = 200) -> str:
    text = command if isinstance(command, str) else " ".join(command)
    return text if len(text) <= limit else text[:limit] + "…"
