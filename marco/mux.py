"""marco-mux, the controller side's kept connections (issue 14): what its server
(`marco.mux_server`) and its client (`marco.mux_client`) share.

One mux per (Unix user, controller host), like ssh's ControlPersist: Ansible's workers talk to
it over a Unix socket only their user can reach, and it keeps mutual-TLS connections to agents
alive between tasks, so a task pays no TCP + TLS handshake. It keeps no token: each call
carries its own.

The socket speaks frames: a kind byte, a 4-byte big-endian length, the payload. `H` is a JSON
head (a call, an answer, an error); `D` is raw data and `E` ends a run of `D` frames (a blob:
stdin, stdout, a file), so bodies never go through base64 or JSON.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import (
    ConfigError,
    MarcoError,
    MuxUnavailable,
    PayloadTooLarge,
    ProtocolError,
    error_from_response,
)

VERSION = 2   # 2: `put` carries `mkdir`, results `user` and `home`; the `home` call
SOCKET_NAME = "mux.sock"
LOCK_NAME = "mux.lock"
LOG_NAME = "mux.log"
HEAD, DATA, END = b"H", b"D", b"E"
FRAME = struct.Struct("!cI")
MAX_HEAD = 1024 * 1024          # a call's JSON head (labels, tags, a shell command)
CHUNK = 1024 * 1024             # the largest data frame sent


@dataclass(frozen=True)
class MuxSettings:
    """The mux's bounds, from MARCO_MUX_* variables (docs/operations.md)."""

    idle_seconds: float = 60.0           # exit after this long without a client or a call
    max_clients: int = 128               # client connections served at once; more go direct
    max_idle_connections: int = 32       # agent connections kept idle; the oldest close first
    max_stdin_bytes: int = 64 * 1024 * 1024  # one call's stdin, held in memory
    # An agent connection is not reused past this age: a new handshake checks the certificates
    # (and the agent's CRL) again, as the agent checks them only when a connection opens.
    max_connection_seconds: float = 300.0

    ENV = {"idle_seconds": "MARCO_MUX_IDLE_SECONDS", "max_clients": "MARCO_MUX_MAX_CLIENTS",
           "max_connection_seconds": "MARCO_MUX_MAX_CONNECTION_SECONDS",
           "max_idle_connections": "MARCO_MUX_MAX_IDLE_CONNECTIONS",
           "max_stdin_bytes": "MARCO_MUX_MAX_STDIN_BYTES"}

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> MuxSettings:
        values: dict[str, Any] = {}
        for field, variable in cls.ENV.items():
            text = environ.get(variable, "").strip()
            if not text:
                continue
            kind = float if field.endswith("seconds") else int
            try:
                value = kind(text)
            except ValueError:
                raise ConfigError(f"{variable}={text!r} is not a number") from None
            if value <= 0:
                raise ConfigError(f"{variable} must be positive, not {text}")
            values[field] = value
        return cls(**values)

    def environ(self) -> dict[str, str]:
        """These settings as the variables a started mux reads."""
        return {variable: str(getattr(self, field)) for field, variable in self.ENV.items()}


def runtime_dir(environ: Mapping[str, str]) -> str:
    """Where the user's mux socket lives: $XDG_RUNTIME_DIR/marco if that is the user's own
    directory, else ~/.marco/run."""
    base = environ.get("XDG_RUNTIME_DIR", "")
    if base and os.path.isabs(base):
        try:
            info = os.stat(base)
        except OSError:
            info = None
        if info is not None and stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid():
            return os.path.join(base, "marco")
    home = environ.get("HOME") or os.path.expanduser("~")
    return os.path.join(home, ".marco", "run")


def private_dir(path: str) -> str:
    """`path`, made if missing (0700), and checked to be a real directory of this user that no
    one else can enter: otherwise another user could swap the socket for their own."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        info = os.lstat(path)
    except OSError as exc:
        raise MuxUnavailable(f"cannot make the mux directory {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() \
            or stat.S_IMODE(info.st_mode) & 0o077:
        raise MuxUnavailable(f"the mux directory {path} is not private (a directory of uid "
                             f"{os.geteuid()}, mode 0700)")
    return path


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket (the kernel's word)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


class ClientGone(Exception):
    """The other end of the mux socket closed (or broke the framing) mid-call."""


class Frames:
    """Framed reads and writes on one Unix socket (blocking; one user at a time)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._reader = sock.makefile("rb", buffering=256 * 1024)

    def close(self) -> None:
        self._reader.close()
        self.sock.close()

    # -- writing ----------------------------------------------------------------------------

    def send_head(self, head: Mapping[str, Any]) -> None:
        payload = json.dumps(head, separators=(",", ":")).encode()
        self.sock.sendall(FRAME.pack(HEAD, len(payload)) + payload)

    def send_error(self, error: MarcoError) -> None:
        self.send_head({"error": error.code, "message": error.message, "hint": error.hint})

    def send_data(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        for start in range(0, len(view), CHUNK):
            piece = view[start:start + CHUNK]
            header = FRAME.pack(DATA, len(piece))
            # One syscall for header and data, no copy; a signal may cut it short.
            sent = self.sock.sendmsg([header, piece])
            if sent < len(header):
                self.sock.sendall(header[sent:])
                sent = len(header)
            if sent < len(header) + len(piece):
                self.sock.sendall(piece[sent - len(header):])

    def send_end(self) -> None:
        self.sock.sendall(FRAME.pack(END, 0))

    def send_blob(self, data: bytes) -> None:
        if data:
            self.send_data(data)
        self.send_end()

    # -- reading ----------------------------------------------------------------------------

    def _exact(self, size: int) -> bytes:
        data: bytes | None = self._reader.read(size)
        if data is None or len(data) != size:
            raise ClientGone("the mux socket closed mid-frame" if data else "mux socket closed")
        return data

    def frame(self, limit: int = CHUNK) -> tuple[bytes, bytes]:
        """The next frame's kind and payload."""
        kind, size = FRAME.unpack(self._exact(FRAME.size))
        if kind not in (HEAD, DATA, END) or size > max(limit, MAX_HEAD if kind == HEAD else 0):
            raise ClientGone(f"bad mux frame {kind!r} of {size} bytes")
        return kind, self._exact(size) if size else b""

    def head(self) -> dict[str, Any]:
        kind, payload = self.frame(MAX_HEAD)
        if kind != HEAD:
            raise ClientGone(f"expected a head frame, got {kind!r}")
        try:
            head = json.loads(payload)
        except ValueError:
            raise ClientGone("a head frame that is not JSON") from None
        if not isinstance(head, dict):
            raise ClientGone("a head frame that is not an object")
        return head

    def chunks(self) -> Iterator[bytes]:
        """The data frames of one blob, up to its end frame."""
        while True:
            kind, payload = self.frame()
            if kind == END:
                return
            if kind != DATA:
                raise ClientGone(f"expected data, got {kind!r}")
            yield payload

    def blob(self, limit: int) -> bytes:
        """One whole blob, at most `limit` bytes (the rest is read and dropped, then refused)."""
        parts, size = [], 0
        for chunk in self.chunks():
            size += len(chunk)
            if size <= limit:
                parts.append(chunk)
        if size > limit:
            raise PayloadTooLarge(f"{size} bytes of stdin; the mux takes at most {limit} "
                                  "(MARCO_MUX_MAX_STDIN_BYTES)")
        return b"".join(parts)


def raise_if_error(head: Mapping[str, Any]) -> None:
    """An error head as the typed error it names (marco.errors' wire codes)."""
    if "error" not in head:
        return
    code, message, hint = head.get("error"), head.get("message"), head.get("hint")
    raise error_from_response(500, code if isinstance(code, str) else None,
                              str(message or "the mux failed"),
                              hint if isinstance(hint, str) else None)


def protocol_error(what: str) -> ProtocolError:
    return ProtocolError(f"the mux answered {what}")
