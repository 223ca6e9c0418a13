"""The one client of an agent's `/v1/terminal` (docs/terminals.md): the controller's relay, the
`marco shell` CLI, the tests and the bench all talk to a terminal through `TerminalClient`.

Binary frames carry the terminal's bytes both ways, small JSON text frames the control
messages (`started`, `resize`, `signal`, `detach`, `exit`). Reading is pulled: the next frame
is read from the socket only when `read` is awaited, so a slow reader slows the agent (which
then stops reading the pty), never this process's memory. A close with an error code raises
the class of `marco.errors` the code names; the close reason's text never decides anything.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from typing import Any

from tornado import httpclient, websocket

from . import protocol
from .agent_api import DEFAULT_TIMEOUT
from .client import agent_socket_target, transport_error
from .errors import (
    AgentUnreachable,
    AuthenticationError,
    BadRequest,
    Conflict,
    MarcoError,
    NotFound,
    PermissionDenied,
    ProtocolError,
    TooManySockets,
    TryAgain,
)
from .tls import ClientTls

# The close codes of /v1/terminal and the error each raises (docs/terminals.md).
CLOSE_ERRORS: dict[int, type[MarcoError]] = {
    protocol.CLOSE_BAD_MESSAGE: BadRequest,
    protocol.CLOSE_UNAUTHORIZED: AuthenticationError,
    protocol.CLOSE_FORBIDDEN: PermissionDenied,
    protocol.CLOSE_NO_SESSION: NotFound,
    protocol.CLOSE_INPUT_BACKLOG: TryAgain,  # the session detached: reattach to it
    protocol.CLOSE_TAKEN_OVER: Conflict,     # another socket of the user took the session
    protocol.CLOSE_TOO_MANY_SOCKETS: TooManySockets,
}
# An HTTP answer instead of the upgrade, by its status (a proxy's, or an agent's refusal).
UPGRADE_ERRORS: dict[int, type[MarcoError]] = {
    400: BadRequest, 401: AuthenticationError, 403: PermissionDenied, 404: NotFound,
    429: TooManySockets, 502: AgentUnreachable, 503: AgentUnreachable, 504: AgentUnreachable,
}
# Closes that are no error: normal, going away (the agent stops), none given.
NORMAL_CLOSES = (1000, 1001, 1005)
MAX_FRAME = 16 * 1024 * 1024  # the agent sends at most 64 KiB a frame; a margin for the relay
SIGNALS = ("INT", "TERM", "HUP", "KILL", "QUIT")


def close_error(code: int | None, reason: str, what: str) -> MarcoError | None:
    """The error a close with `code` means, or None for a normal close."""
    if code in NORMAL_CLOSES:
        return None
    error_class = CLOSE_ERRORS.get(code or 0)
    if error_class is not None:
        return error_class(reason or f"terminal closed by {what} ({code})")
    if code is None:  # no close frame: the connection itself broke
        return AgentUnreachable(f"the connection to {what} was lost")
    return ProtocolError(f"terminal closed by {what} with code {code}: {reason}")


def upgrade_error(status: int, what: str) -> MarcoError:
    """The error of an HTTP answer where the WebSocket upgrade was expected, by its status
    only: 404 is an agent without /v1/terminal (older than terminals)."""
    if status == 404:
        return NotFound(f"{what} has no terminals ({protocol.TERMINAL_PATH} answered 404)",
                        "its agent is older than terminals: upgrade it")
    error_class = UPGRADE_ERRORS.get(status, ProtocolError)
    return error_class(f"{what} answered HTTP {status} instead of opening the terminal")


class TerminalClient:
    """One terminal socket: `open` (new session or reattach), then `send`/`read` until `read`
    returns None (the session ended: its `exit` message came before) or raises."""

    def __init__(self, url: str, token: str, ssl_context: ssl.SSLContext | None = None,
                 what: str | None = None, tls: ClientTls | None = None) -> None:
        self.url, self.token, self.ssl_context, self.tls = url, token, ssl_context, tls
        self.what = what or url
        self.started: dict[str, Any] | None = None
        self.exit: dict[str, Any] | None = None
        self._ws: websocket.WebSocketClientConnection | None = None
        self._ended = False  # the close was read: tornado gives None only once

    @classmethod
    def for_node(cls, host: str, port: int, token: str, tls: ClientTls | None,
                 node: str | None = None) -> TerminalClient:
        """The terminal of the agent at host:port; with `tls`, mutual TLS and the agent's
        certificate must name `node` (default: `host`), as for every other agent call."""
        url, context, what = agent_socket_target(host, port, protocol.TERMINAL_PATH, tls, node)
        return cls(url, token, context, what, tls)

    @property
    def close_code(self) -> int | None:
        return self._ws.close_code if self._ws is not None else None

    @property
    def close_reason(self) -> str | None:
        return self._ws.close_reason if self._ws is not None else None

    async def open(self, cols: int, rows: int, term: str = "xterm-256color",
                   command: str | None = None, session: str | None = None,
                   timeout: float = DEFAULT_TIMEOUT, echo: bool = True) -> dict[str, Any]:
        """Connect, start (or reattach to `session`) and return the agent's `started`;
        `echo=False` starts the pty with echo off (input not typed by a person)."""
        try:
            self._ws = await websocket.websocket_connect(
                httpclient.HTTPRequest(self.url, connect_timeout=timeout,
                                       request_timeout=timeout, ssl_options=self.ssl_context),
                max_message_size=MAX_FRAME)
        except httpclient.HTTPClientError as exc:
            if exc.response is not None:  # an answer, not a failed connection (599)
                raise upgrade_error(exc.code, self.what) from None
            raise transport_error(exc, self.what, self.tls) from None
        except OSError as exc:
            raise transport_error(exc, self.what, self.tls) from None
        await self._send_text({"type": "open", "token": self.token, "cols": cols, "rows": rows,
                               "term": term, "command": command, "session": session,
                               "echo": echo})
        try:
            first = await asyncio.wait_for(self.read(), timeout)
        except TimeoutError:
            self.close()
            raise AgentUnreachable(f"{self.what} did not start the terminal in {timeout} s") \
                from None
        if not isinstance(first, dict) or first.get("type") != "started":
            self.close()
            raise ProtocolError(f"expected the terminal's 'started', got {first!r:.200}")
        self.started = first
        return first

    async def send(self, data: bytes) -> None:
        """Bytes for the pty (keystrokes, a paste)."""
        await self._write(data, binary=True)

    async def resize(self, cols: int, rows: int) -> None:
        await self._send_text({"type": "resize", "cols": cols, "rows": rows})

    async def signal(self, name: str) -> None:
        """Signal the terminal's foreground process group: INT, TERM, HUP, KILL or QUIT."""
        if name not in SIGNALS:
            raise BadRequest(f"signal must be one of {', '.join(SIGNALS)}, not {name!r}")
        await self._send_text({"type": "signal", "signal": name})

    async def detach(self) -> None:
        """Leave the session running for the agent's detach grace; the agent closes (1000)."""
        await self._send_text({"type": "detach"})

    async def read(self) -> bytes | dict[str, Any] | None:
        """The next frame: output bytes, a control message, or None once the socket closed
        normally; a close with an error code raises its class (CLOSE_ERRORS)."""
        if self._ws is None:
            raise AgentUnreachable(f"the terminal on {self.what} is not open")
        message = None if self._ended else await self._ws.read_message()
        if message is None:
            self._ended = True
            error = close_error(self._ws.close_code, self._ws.close_reason or "", self.what)
            if error is not None:
                raise error
            return None
        if isinstance(message, bytes):
            return message
        try:
            data = json.loads(message)
        except ValueError:
            raise ProtocolError(f"{self.what} sent a text frame that is not JSON") from None
        if not isinstance(data, dict):
            raise ProtocolError(f"{self.what} sent a control message that is not an object")
        if data.get("type") == "exit":
            self.exit = data
        return data

    def close(self) -> None:
        if self._ws is not None:
            self._ws.close()

    async def _send_text(self, message: dict[str, Any]) -> None:
        await self._write(protocol.encode(message), binary=False)

    async def _write(self, message: str | bytes, binary: bool) -> None:
        if self._ws is None:
            raise AgentUnreachable(f"the terminal on {self.what} is not open")
        try:
            await self._ws.write_message(message, binary=binary)
        except websocket.WebSocketClosedError:
            # Closed by the agent with a code: the code's error, as `read` would raise it.
            error = close_error(self._ws.close_code, self._ws.close_reason or "", self.what)
            raise error or AgentUnreachable(f"the terminal on {self.what} is closed") from None
