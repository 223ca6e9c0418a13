"""marco-mux's client: `MuxClient`, the same `run`/`put_file`/`get_file` as `AgentClient`,
over the user's mux socket (started on demand); the mux holds the agent connection.

`MuxClient.open` raises `MuxUnavailable` when no mux can be reached or it refuses (the
connection then talks to the agent directly); a mux lost mid-call raises `AgentUnreachable`,
as a lost agent connection would (a call is never resent: it may have run).
"""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any, BinaryIO, TypeVar

from .agent_api import DEFAULT_TIMEOUT, NO_LIMIT, ExecutionResult, describe
from .errors import AgentUnreachable, MarcoError, MuxUnavailable
from .mux import (
    CHUNK,
    LOCK_NAME,
    SOCKET_NAME,
    VERSION,
    ClientGone,
    Frames,
    MuxSettings,
    private_dir,
    raise_if_error,
    runtime_dir,
)
from .tls import ClientTls

GREETING_WAIT = 5.0    # seconds for a mux to greet a new client
START_WAIT = 15.0      # seconds for a started mux to say it serves
MARGIN = 5.0           # seconds a call's answer may take beyond the agent's own bound
# What a started mux inherits: no token, no ansible state; its settings and where it lives.
PASSED_ON = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ",
             "XDG_RUNTIME_DIR")
T = TypeVar("T")
NO_LIMIT_BYTES = 1 << 62  # an answer's output is bounded by the agent's capture limit
RESULT_FIELDS = frozenset(field.name for field in fields(ExecutionResult)) - {"stdout", "stderr"}


def socket_path(environ: Mapping[str, str]) -> str:
    return os.path.join(runtime_dir(environ), SOCKET_NAME)


def _mux_command(environ: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """How to start the user's mux: its argv and an environment with none of this process's
    secrets, its settings, and the marco this process runs (whatever the cwd)."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {name: environ[name] for name in PASSED_ON if name in environ}
    env.update(MuxSettings.from_environ(environ).environ())
    env["PYTHONPATH"] = package_root
    return [sys.executable, "-m", "marco.mux_server"], env


def claim_lock(directory: str) -> int | None:
    """The mux lock, taken (its fd; None: a mux holds it, starting, serving or exiting). The
    mux a starter starts inherits it, so no other starter starts a second one meanwhile."""
    fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def start_mux(environ: Mapping[str, str], directory: str) -> bool:
    """Start the user's mux and return once it serves (False: another one is starting or
    exiting, nothing started): a session of its own, detached by its second fork."""
    lock = claim_lock(directory)
    if lock is None:
        return False
    argv, env = _mux_command(environ)
    try:
        done = subprocess.run([*argv, "--lock-fd", str(lock)], env=env, cwd="/",
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, start_new_session=True, pass_fds=(lock,),
                              timeout=START_WAIT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MuxUnavailable(f"cannot start marco-mux: {exc}") from None
    finally:
        os.close(lock)  # the mux keeps it locked through its own copy
    if done.returncode != 0:
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
        reason = lines[-1] if lines else f"exit status {done.returncode}"
        raise MuxUnavailable(f"marco-mux did not start: {reason}")
    return True


def spawn_mux(environ: Mapping[str, str], directory: str) -> str:
    """Start the user's mux without waiting for it (unless one holds the lock); say which,
    for -vvv. The caller goes direct meanwhile: a task never waits for a mux's start
    (~130 ms)."""
    lock = claim_lock(directory)
    if lock is None:
        return "marco-mux is starting"
    argv, env = _mux_command(environ)
    try:
        # Never waited for: reaped by this process's later Popen calls, or by init.
        subprocess.Popen([*argv, "--lock-fd", str(lock)], env=env, cwd="/",
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True, pass_fds=(lock,))
    except OSError as exc:
        return f"cannot start marco-mux: {exc}"
    finally:
        os.close(lock)
    return "starting marco-mux for the next tasks"


def connect_mux(environ: Mapping[str, str], start: str = "wait") -> tuple[Frames, int]:
    """A greeted connection to the user's mux and its pid. If none answers, `start` says what
    to do: "wait" starts one and waits for it, "background" starts one for later calls and
    raises MuxUnavailable now, "no" only raises."""
    directory = private_dir(runtime_dir(environ))
    path = os.path.join(directory, SOCKET_NAME)
    started = False
    deadline = time.monotonic() + START_WAIT
    while True:
        try:
            return _greeted(path)
        except (FileNotFoundError, ConnectionError, ClientGone) as exc:
            # No mux, a dead one's socket, or one dying or exiting as we came.
            if start == "background":
                raise MuxUnavailable(spawn_mux(environ, directory)) from None
            if start != "wait" or time.monotonic() >= deadline:
                raise MuxUnavailable(f"no marco-mux answers at {path}: {exc}") from None
            if not started:
                started = start_mux(environ, directory)
            if not started:
                time.sleep(0.01)  # another starter's mux is binding, or one exits: again
        except OSError as exc:
            raise MuxUnavailable(f"cannot reach marco-mux at {path}: {exc}") from None


def _greeted(path: str) -> tuple[Frames, int]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(GREETING_WAIT)
        sock.connect(path)
        frames = Frames(sock)
        head = frames.head()
    except BaseException:
        sock.close()
        raise
    if "error" in head:
        frames.close()
        raise MuxUnavailable(f"marco-mux refused: {head.get('message')}")
    if head.get("mux") != VERSION or not isinstance(head.get("pid"), int):
        frames.close()
        raise MuxUnavailable(f"marco-mux speaks another version ({head.get('mux')!r})")
    return frames, head["pid"]


class MuxClient:
    """An agent reached through the user's mux: `AgentClient`'s `run`, `put_file`,
    `get_file` and `close` (not thread-safe). The token goes with every call."""

    def __init__(self, frames: Frames, pid: int, host: str, port: int, token: str | None,
                 timeout: float = DEFAULT_TIMEOUT, tls: ClientTls | None = None,
                 node: str | None = None) -> None:
        self.host, self.port, self.token, self.timeout = host, port, token, timeout
        self.tls, self.node, self.pid = tls, node or host, pid
        self.what = describe(host, port, self.node)
        self._frames: Frames | None = frames
        self._target = {"host": host, "port": port, "node": self.node, "timeout": timeout,
                        "tls": None if tls is None else {
                            "ca": os.path.abspath(tls.ca_file),
                            "cert": os.path.abspath(tls.cert_file),
                            "key": os.path.abspath(tls.key_file),
                            "crl": None if tls.crl_file is None else os.path.abspath(tls.crl_file)}}

    @classmethod
    def open(cls, host: str, port: int, token: str | None, timeout: float = DEFAULT_TIMEOUT,
             tls: ClientTls | None = None, node: str | None = None,
             environ: Mapping[str, str] | None = None, start: str = "wait") -> MuxClient:
        """Connected to the user's mux, or MuxUnavailable saying why (`start`: what to do when
        no mux answers, as for `connect_mux`)."""
        frames, pid = connect_mux(os.environ if environ is None else environ, start)
        return cls(frames, pid, host, port, token, timeout, tls, node)

    def __enter__(self) -> MuxClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._frames is not None:
            self._frames.close()
            self._frames = None

    # -- calls ------------------------------------------------------------------------------

    def run(self, command: list[str] | str, stdin: bytes = b"", cwd: str | None = None,
            env: dict[str, str] | None = None, label: str = "", timeout: float | None = None,
            wait_timeout: float | None = None, no_log: bool = False,
            tags: dict[str, str] | None = None, runner: bool = True) -> ExecutionResult:
        """Run a command to completion through the mux (AgentClient.run)."""
        bound = (wait_timeout or (timeout or NO_LIMIT) + self.timeout) + MARGIN
        head = self._call("run", command=command, cwd=cwd, env=env, label=label,
                          timeout=timeout, wait_timeout=wait_timeout, no_log=no_log, tags=tags,
                          runner=runner)

        def exchange(frames: Frames) -> ExecutionResult:
            frames.send_blob(stdin)
            answer = frames.head()
            raise_if_error(answer)
            stdout, stderr = frames.blob(NO_LIMIT_BYTES), frames.blob(NO_LIMIT_BYTES)
            result = answer.get("result")
            if not isinstance(result, dict):
                raise ClientGone("an answer without a result")
            known = {key: value for key, value in result.items() if key in RESULT_FIELDS}
            return ExecutionResult(**known, stdout=stdout, stderr=stderr)

        return self._exchange(head, bound, exchange)

    def known_home(self) -> tuple[str, str]:
        """(user, home) the last answer through the mux named for this agent and token, or
        ("", ""): asked of the mux alone, the agent is not reached."""
        def exchange(frames: Frames) -> tuple[str, str]:
            answer = frames.head()
            raise_if_error(answer)
            return str(answer.get("user") or ""), str(answer.get("home") or "")

        return self._exchange(self._call("home"), self.timeout + MARGIN, exchange)

    def put_file(self, source: BinaryIO | Callable[[], bytes], path: str, mode: int | None = None,
                 overwrite: bool = True, size: int | None = None,
                 mkdir: bool = False) -> dict[str, Any]:
        """Stream `source` to `path` on the node through the mux (AgentClient.put_file)."""
        read = source if callable(source) else (lambda: source.read(CHUNK))
        bound = self.timeout + MARGIN
        head = self._call("put", path=path, mode=mode, overwrite=overwrite, size=size,
                          mkdir=mkdir)

        def exchange(frames: Frames) -> dict[str, Any]:
            while chunk := read():
                frames.send_data(chunk)
            frames.send_end()
            answer = frames.head()
            raise_if_error(answer)
            return dict(answer.get("answer") or {})

        return self._exchange(head, bound, exchange)

    def get_file(self, path: str, destination: BinaryIO) -> int:
        """Stream the node's file at `path` into `destination` (AgentClient.get_file)."""
        bound = self.timeout + MARGIN
        head = self._call("get", path=path)

        def exchange(frames: Frames) -> int:
            for chunk in frames.chunks():
                destination.write(chunk)
            answer = frames.head()
            raise_if_error(answer)
            return int(answer.get("written", 0))

        return self._exchange(head, bound, exchange)

    # -- transport --------------------------------------------------------------------------

    def _call(self, op: str, **arguments: Any) -> dict[str, Any]:
        return {"op": op, "target": self._target, "token": self.token or "", **arguments}

    def _exchange(self, head: dict[str, Any], bound: float,
                  exchange: Callable[[Frames], T]) -> T:
        if self._frames is None:
            raise AgentUnreachable(f"the marco-mux connection to {self.what} is closed")
        frames = self._frames
        try:
            frames.sock.settimeout(bound)
            frames.send_head(head)
            return exchange(frames)
        except MarcoError:
            raise
        except (ClientGone, OSError) as exc:
            self.close()
            detail = "timed out" if isinstance(exc, TimeoutError) else str(exc)
            raise AgentUnreachable(f"lost marco-mux (pid {self.pid}) during a call to "
                                   f"{self.what}: {detail}") from None

