"""marco-mux's server: one per (Unix user, controller host), started on demand by the Ansible
connection (`python -m marco.mux_server`, which detaches: double fork + setsid).

It serves its own user only (the socket is 0600 in a 0700 directory, and the peer's uid is
checked on every accept), one thread per client connection, and keeps idle mutual-TLS
`AgentClient`s per (host, port, node, timeout, TLS files and their mtimes) for the next call.
It exits after `MARCO_MUX_IDLE_SECONDS` with no client connected.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import logging
import os
import select
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any

from .agent_api import ExecutionResult
from .client import AgentClient
from .credentials import node_tls
from .errors import ConfigError, MarcoError, MuxUnavailable, TryAgain
from .mux import (
    LOCK_NAME,
    LOG_NAME,
    SOCKET_NAME,
    VERSION,
    ClientGone,
    Frames,
    MuxSettings,
    peer_uid,
    private_dir,
    runtime_dir,
)
from .tls import ClientTls, file_stamps

log = logging.getLogger("marco.mux")

LOCK_WAIT = 2.0            # seconds a new mux waits for an exiting one to let go of the lock
LOG_LIMIT = 1024 * 1024    # the log is started afresh past this size
KNOWN_HOMES = 4096         # (agent, token) pairs whose user and home the mux remembers
KNOWN_HOME_SECONDS = 300.0 # for this long after the answer that named them
TlsFiles = tuple[str, str, str, str | None]


@dataclass(frozen=True)
class Target:
    """The agent a call goes to and how to reach it (the client's options, checked)."""

    host: str
    port: int
    node: str
    timeout: float
    tls: TlsFiles | None

    @classmethod
    def from_head(cls, data: Any) -> Target:
        try:
            tls = data["tls"]
            files = None if tls is None else (str(tls["ca"]), str(tls["cert"]), str(tls["key"]),
                                              None if tls.get("crl") is None else str(tls["crl"]))
            target = cls(str(data["host"]), int(data["port"]), str(data["node"]),
                         float(data["timeout"]), files)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ClientGone("a call without a well-formed target") from None
        if files is not None and not all(os.path.isabs(path) for path in files if path):
            raise ClientGone("TLS file paths must be absolute")
        return target

    def key(self) -> tuple[Any, ...]:
        """The pool key: a changed certificate, key, CA or CRL file means new connections."""
        stamps = file_stamps(*self.tls) if self.tls is not None else ()
        return (self.host, self.port, self.node, self.timeout, self.tls, stamps)


class AgentPool:
    """Idle kept-alive agent connections, at most `limit` in all (the oldest close first),
    none reused past `max_age` seconds."""

    def __init__(self, limit: int, max_age: float) -> None:
        self.limit, self.max_age = limit, max_age
        self._lock = threading.Lock()
        self._idle: list[tuple[tuple[Any, ...], AgentClient]] = []   # oldest first
        self._born: dict[int, float] = {}   # id(client) -> when it was made
        self._tls: dict[TlsFiles, ClientTls] = {}
        self.opened = 0   # AgentClients made (for the log)

    def take(self, target: Target) -> tuple[tuple[Any, ...], AgentClient]:
        """An idle client for `target`, else a new one (its connection made on first use)."""
        key = target.key()
        too_old = time.monotonic() - self.max_age
        stale: list[AgentClient] = []
        found = None
        with self._lock:
            for index in range(len(self._idle) - 1, -1, -1):
                idle_key, client = self._idle[index]
                if self._born.get(id(client), 0.0) < too_old:
                    stale.append(self._idle.pop(index)[1])
                elif idle_key == key and found is None:
                    found = self._idle.pop(index)[1]
                elif idle_key[:5] == key[:5]:  # same target, files changed since
                    stale.append(self._idle.pop(index)[1])
        for client in stale:
            self._close(client)
        if found is not None:
            return key, found
        tls = self._client_tls(target.tls) if target.tls is not None else None
        client = AgentClient(target.host, target.port, None, timeout=target.timeout, tls=tls,
                             node=target.node)
        with self._lock:
            self.opened += 1
            self._born[id(client)] = time.monotonic()
        log.info("new agent client %s:%d (%s)", target.host, target.port, target.node)
        return key, client

    def give(self, key: tuple[Any, ...], client: AgentClient) -> None:
        """Keep `client` for the next call to its target."""
        client.token = None
        with self._lock:
            self._idle.append((key, client))
            evicted = self._idle[:-self.limit] if len(self._idle) > self.limit else []
            del self._idle[:len(evicted)]
        for _, old in evicted:
            self._close(old)

    def discard(self, client: AgentClient) -> None:
        """A client not to keep (its call was cut short)."""
        self._close(client)

    def close_all(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for _, client in idle:
            self._close(client)

    def _close(self, client: AgentClient) -> None:
        client.close()
        with self._lock:
            self._born.pop(id(client), None)

    def _client_tls(self, files: TlsFiles) -> ClientTls:
        """One ClientTls per set of files (it reloads its contexts when they change)."""
        with self._lock:
            tls = self._tls.get(files)
        if tls is None:
            tls = ClientTls(*files)
            with self._lock:
                self._tls[files] = tls
        return tls


def abort(client: AgentClient) -> None:
    """Shut the client's connection from another thread: a read blocked on it wakes (closing
    alone would not), the agent sees the caller hang up and stops a `?wait=1` execution, as
    when an Ansible worker's direct connection closes mid-call. Reads AgentClient's kept
    connection, which its public API does not expose."""
    conn = getattr(client, "_conn", None)
    sock = getattr(conn, "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class HangupWatch:
    """One thread watching the client sockets of calls in flight: a client that closes its
    end mid-call (its worker killed by a task timeout or Ctrl-C) aborts that call's agent
    connection at once."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._lock = threading.Lock()
        self._calls: dict[int, Callable[[], None]] = {}
        self._thread = threading.Thread(target=self._loop, name="mux-hangups", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def watching(self, sock: socket.socket, on_hangup: Callable[[], None]) -> Iterator[list[bool]]:
        """While the block runs, a hangup of `sock` calls `on_hangup`; the yielded list holds
        True once it did."""
        fired = [False]

        def hangup() -> None:
            fired[0] = True
            on_hangup()

        fd = sock.fileno()
        with self._lock:
            self._calls[fd] = hangup
        self._epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLONESHOT)
        try:
            yield fired
        finally:
            with self._lock:
                self._calls.pop(fd, None)
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)

    def _loop(self) -> None:
        while True:
            for fd, _ in self._epoll.poll(1.0):
                with self._lock:
                    hangup = self._calls.pop(fd, None)
                if hangup is not None:
                    hangup()


class Session:
    """One client connection: calls one after the other, until the client closes."""

    def __init__(self, server: MuxServer, sock: socket.socket) -> None:
        self.server, self.frames = server, Frames(sock)

    def serve(self) -> None:
        try:
            self.frames.send_head({"mux": VERSION, "pid": os.getpid()})
            while True:
                head = self.frames.head()
                self.call(head)
        except (ClientGone, OSError):
            pass
        finally:
            self.frames.close()

    def call(self, head: dict[str, Any]) -> None:
        op = head.get("op")
        target = Target.from_head(head.get("target"))
        token = head.get("token")
        if not isinstance(token, str):
            raise ClientGone("a call without a token")
        if op == "run":
            self.run(head, target, token)
        elif op == "put":
            self.put(head, target, token)
        elif op == "get":
            self.get(head, target, token)
        elif op == "home":
            user, home = self.server.homes.known(target, token)
            self.frames.send_head({"user": user, "home": home})
        else:
            raise ClientGone(f"unknown call {op!r}")

    def _client(self, target: Target, token: str) -> tuple[tuple[Any, ...], AgentClient] | None:
        try:
            if target.tls is None:  # plain HTTP (a --dev agent): loopback only, as direct
                node_tls(False, target.host)
            key, client = self.server.pool.take(target)
        except MarcoError as error:
            self.frames.send_error(error)
            return None
        client.token = token
        return key, client

    def run(self, head: dict[str, Any], target: Target, token: str) -> None:
        try:
            stdin = self.frames.blob(self.server.settings.max_stdin_bytes)
        except MarcoError as error:
            self.frames.send_error(error)
            return
        taken = self._client(target, token)
        if taken is None:
            return
        key, client = taken
        result: ExecutionResult | None = None
        failure: BaseException | None = None
        with self.server.hangups.watching(self.frames.sock, lambda: abort(client)) as hung_up:
            try:
                result = client.run(head["command"], stdin=stdin, cwd=head.get("cwd"),
                                    env=head.get("env"), label=str(head.get("label") or ""),
                                    timeout=head.get("timeout"),
                                    wait_timeout=head.get("wait_timeout"),
                                    no_log=bool(head.get("no_log")), tags=head.get("tags"),
                                    runner=bool(head.get("runner", True)))
            except Exception as exc:  # every failure goes back to the caller, typed
                failure = exc
        if hung_up[0]:
            self.server.pool.discard(client)
            raise ClientGone("the client hung up mid-call")
        self.server.pool.give(key, client)
        if result is None:
            self.frames.send_error(_as_marco_error(failure))
            return
        self.server.homes.learn(target, token, result.user, result.home)
        self.frames.send_head({"result": {field.name: getattr(result, field.name)
                                          for field in fields(result)
                                          if field.name not in ("stdout", "stderr")}})
        self.frames.send_blob(result.stdout)
        self.frames.send_blob(result.stderr)

    def put(self, head: dict[str, Any], target: Target, token: str) -> None:
        chunks = self.frames.chunks()
        taken = self._client(target, token)
        if taken is None:
            for _ in chunks:  # the client sends the whole file: read it to answer after it
                pass
            return
        key, client = taken
        try:
            answer = client.put_file(lambda: next(chunks, b""), str(head["path"]),
                                     mode=head.get("mode"),
                                     overwrite=bool(head.get("overwrite", True)),
                                     size=head.get("size"), mkdir=bool(head.get("mkdir")))
        except ClientGone:
            self.server.pool.discard(client)
            raise
        except Exception as exc:  # the agent refused or failed: the rest of the file is read
            for _ in chunks:
                pass
            self.server.pool.give(key, client)
            self.frames.send_error(_as_marco_error(exc))
            return
        self.server.pool.give(key, client)
        self.frames.send_head({"answer": answer})

    def get(self, head: dict[str, Any], target: Target, token: str) -> None:
        taken = self._client(target, token)
        if taken is None:
            self.frames.send_end()
            return
        key, client = taken
        sink = _FrameSink(self.frames)
        try:
            written = client.get_file(str(head["path"]), sink)  # type: ignore[arg-type]
        except Exception as exc:
            if sink.gone:
                self.server.pool.discard(client)
                raise ClientGone("the client hung up mid-download") from None
            self.server.pool.give(key, client)
            self.frames.send_end()
            self.frames.send_error(_as_marco_error(exc))
            return
        self.server.pool.give(key, client)
        self.frames.send_end()
        self.frames.send_head({"written": written})


class _FrameSink:
    """A download's destination: each chunk goes to the client as a data frame."""

    def __init__(self, frames: Frames) -> None:
        self.frames, self.gone = frames, False

    def write(self, chunk: bytes) -> int:
        try:
            self.frames.send_data(chunk)
        except OSError:
            self.gone = True
            raise
        return len(chunk)


def _as_marco_error(exc: BaseException | None) -> MarcoError:
    if isinstance(exc, MarcoError):
        return exc
    log.exception("a call failed", exc_info=exc)
    return MarcoError(f"marco-mux: {type(exc).__name__}: {exc}")


class KnownHomes:
    """Whom each (agent, token) ran as and that user's home, from the last answer through this
    mux: a task's `echo ~` is answered from it (ansible_plugins/core/remote_tmp.py). Keyed by
    a digest of the token (the mux keeps no token); at most `limit`, least recent dropped, and
    each for `max_age` seconds (a home changed on the node is seen again by then)."""

    def __init__(self, limit: int = KNOWN_HOMES, max_age: float = KNOWN_HOME_SECONDS) -> None:
        self.limit, self.max_age = limit, max_age
        self._homes: OrderedDict[tuple[str, int, str, str], tuple[str, str, float]] = \
            OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(target: Target, token: str) -> tuple[str, int, str, str]:
        return (target.host, target.port, target.node,
                hashlib.sha256(token.encode()).hexdigest())

    def learn(self, target: Target, token: str, user: str, home: str) -> None:
        if not (user and home):
            return
        key = self._key(target, token)
        with self._lock:
            self._homes[key] = (user, home, time.monotonic())
            self._homes.move_to_end(key)
            while len(self._homes) > self.limit:
                self._homes.popitem(last=False)

    def known(self, target: Target, token: str) -> tuple[str, str]:
        with self._lock:
            user, home, when = self._homes.get(self._key(target, token), ("", "", 0.0))
        if time.monotonic() - when > self.max_age:
            return "", ""
        return user, home


class MuxServer:
    """The listening socket, its clients, the pool and the idle clock."""

    def __init__(self, listener: socket.socket, settings: MuxSettings) -> None:
        self.listener, self.settings = listener, settings
        self.pool = AgentPool(settings.max_idle_connections, settings.max_connection_seconds)
        self.homes = KnownHomes()
        self.hangups = HangupWatch()
        self._lock = threading.Lock()
        self._clients = 0
        self._last_activity = time.monotonic()

    def serve(self) -> None:
        """Accept until idle for `idle_seconds`."""
        while True:
            wait = self._idle_wait()
            if wait <= 0:
                return
            self.listener.settimeout(wait)
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            self._admit(sock)

    def _idle_wait(self) -> float:
        """Seconds to wait for a client before looking again (<= 0: time to exit)."""
        with self._lock:
            if self._clients:
                return 1.0
            left = self.settings.idle_seconds - (time.monotonic() - self._last_activity)
        return min(left, 1.0)

    def _admit(self, sock: socket.socket) -> None:
        sock.settimeout(None)
        try:
            uid = peer_uid(sock)
        except OSError:
            sock.close()
            return
        if uid != os.geteuid():
            log.warning("refused a connection from uid %d: this mux serves uid %d only",
                        uid, os.geteuid())
            with contextlib.suppress(OSError):
                Frames(sock).send_error(MuxUnavailable("this marco-mux serves another user"))
            sock.close()
            return
        with self._lock:
            busy = self._clients >= self.settings.max_clients
            if not busy:
                self._clients += 1
        if busy:
            with contextlib.suppress(OSError):
                Frames(sock).send_error(TryAgain(f"marco-mux serves {self.settings.max_clients} "
                                                 "clients already (MARCO_MUX_MAX_CLIENTS)"))
            sock.close()
            return
        threading.Thread(target=self._session, args=(sock,), daemon=True).start()

    def _session(self, sock: socket.socket) -> None:
        try:
            Session(self, sock).serve()
        finally:
            with self._lock:
                self._clients -= 1
                self._last_activity = time.monotonic()


# -- starting: lock, socket, detach -------------------------------------------------------------

def _take_lock(directory: str) -> int | None:
    """The lock only one mux per directory holds for its whole life (None: another has it)."""
    fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(0.02)


def _listen(path: str) -> socket.socket:
    """The socket at `path` (a stale one, a dead mux's, replaced), mode 0600."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(previous)
    os.chmod(path, 0o600)
    listener.listen(128)
    return listener


def _setup_log(directory: str) -> None:
    path = os.path.join(directory, LOG_NAME)
    with contextlib.suppress(OSError):
        if os.path.getsize(path) > LOG_LIMIT:
            os.unlink(path)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def serve(report: Callable[[str], None], lock: int | None = None) -> None:
    """Become the user's mux (or find one already is: `report("taken")`) and serve. `lock`:
    the lock file's fd, already locked by the starter (so no other starts meanwhile)."""
    settings = MuxSettings.from_environ(os.environ)
    directory = private_dir(runtime_dir(os.environ))
    if lock is None:
        lock = _take_lock(directory)
    if lock is None:
        report("taken")
        return
    _setup_log(directory)
    path = os.path.join(directory, SOCKET_NAME)
    listener = _listen(path)
    bound = os.stat(path).st_ino
    log.info("marco-mux serving %s (idle exit after %s s)", path, settings.idle_seconds)
    report("ready")
    server = MuxServer(listener, settings)
    try:
        server.serve()
    finally:
        # Gone from the path first: a client from now on starts a new mux.
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == bound:
                os.unlink(path)
        listener.close()
        server.pool.close_all()
        log.info("marco-mux idle, exiting (%d agent connections made)", server.pool.opened)
        os.close(lock)


def _detached_child(write_fd: int, lock: int | None) -> None:
    """The mux itself: says on `write_fd` whether it serves, then serves."""
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)

    def report(word: str) -> None:
        os.write(write_fd, word.encode())
        os.close(write_fd)

    try:
        serve(report, lock)
    except Exception as exc:  # noqa: BLE001 - told to the starter, who goes direct
        with contextlib.suppress(OSError):
            report(f"error: {exc}")
        raise


def main() -> None:
    """Detach (the second fork; the starter made this process a session leader) and return
    once the mux serves: exit 0 if it does (or another already did), 1 with the reason."""
    parser = argparse.ArgumentParser(prog="marco-mux")
    parser.add_argument("--foreground", action="store_true", help="do not detach")
    parser.add_argument("--lock-fd", type=int, help="the mux lock, locked by the starter")
    args = parser.parse_args()
    if args.foreground:
        serve(lambda word: None, args.lock_fd)
        return
    read_fd, write_fd = os.pipe()
    if os.fork() == 0:
        os.close(read_fd)
        try:
            _detached_child(write_fd, args.lock_fd)
        finally:
            os._exit(0)
    os.close(write_fd)
    answer = b""
    while chunk := os.read(read_fd, 4096):
        answer += chunk
    text = answer.decode("utf-8", "replace")
    if text in ("ready", "taken"):
        sys.exit(0)
    sys.stderr.write((text or "marco-mux exited before serving") + "\n")
    sys.exit(1)


if __name__ == "__main__":
    try:
        main()
    except ConfigError as error:
        sys.exit(f"marco-mux: {error}")
