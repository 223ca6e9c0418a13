"""The WebSocket /v1/terminal (docs/terminals.md): one terminal session per socket.

Authenticated like /v1/stream: nothing happens until the first message, a JSON `open` with the
token, sent within AUTH_TIMEOUT of the upgrade. Then binary frames are the pty's bytes both
ways and small JSON text frames the control messages. Closing the socket without `detach`
detaches the session as well (it is kept for `terminal_detach_grace`). Errors before the
upgrade are JSON, like the rest of the API.

Input is flow-controlled through TCP: while more input waits for the pty than
`terminal_input_max_bytes`, `on_message` does not return, and Tornado reads the socket's next
message only after it did. Keepalive is the socket's own (not Tornado's ping timeout): a client
that does not read its output answers no ping while that output waits before the ping, which
is flow control, not death; only a missing pong with nothing unread before the ping closes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import tornado.websocket

from marco import protocol
from marco.errors import (
    BadRequest,
    MarcoError,
    NotFound,
    PermissionDenied,
    ShuttingDown,
    TooManySockets,
)
from marco.jsonapi import JsonApiMixin

from .context import AgentContext
from .terminal import SIGNALS, OpenRequest, TerminalSession

log = logging.getLogger(__name__)

AUTH_TIMEOUT = 10.0
CLOSE_GOING_AWAY = 1001
CLOSE_INTERNAL = 1011


def close_code(error: MarcoError) -> int:
    """The close code of a refused `open`, by the error's class."""
    if isinstance(error, NotFound):
        return protocol.CLOSE_NO_SESSION
    if isinstance(error, TooManySockets):
        return protocol.CLOSE_TOO_MANY_SOCKETS
    if isinstance(error, ShuttingDown):
        return CLOSE_GOING_AWAY
    if isinstance(error, BadRequest):
        return protocol.CLOSE_BAD_MESSAGE
    if error.status == 403:
        return protocol.CLOSE_FORBIDDEN
    if error.status == 401:
        return protocol.CLOSE_UNAUTHORIZED
    return CLOSE_INTERNAL


class TerminalSocket(JsonApiMixin, tornado.websocket.WebSocketHandler):
    """One client's terminal: a new session, or a reattach to one of its user's."""

    ctx: AgentContext
    service_name = "agent"

    def initialize(self, ctx: AgentContext) -> None:
        self.ctx = ctx
        self.session: TerminalSession | None = None
        self.opening = False
        self._auth_timer: asyncio.TimerHandle | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self._frames_sent = 0     # frames written to this socket
        self._frames_read = 0     # ... of which a pong proved the client read
        self._ping_mark = 0       # frames sent before the ping in flight
        self._ponged = True
        # Input waiting for room in the pty: Tornado reads nothing more of the socket until
        # it is taken, pongs included, so no pong is no sign of a dead client meanwhile
        # (terminal_input_stall bounds a program that takes none of it).
        self._holding_input = False

    @property
    def ping_interval(self) -> float | None:
        return 0  # Tornado's pings off: _ping does them (see the module's docstring)

    @property
    def ping_timeout(self) -> float | None:
        return 0

    def check_origin(self, origin: str) -> bool:
        return self.ctx.origin_allowed(origin)

    async def get(self, *args: Any, **kwargs: Any) -> None:
        if self.request.headers.get("Upgrade", "").lower() != "websocket":
            raise BadRequest(f"{protocol.TERMINAL_PATH} is a WebSocket: send an Upgrade request")
        await super().get(*args, **kwargs)

    def open(self, *args: str, **kwargs: str) -> None:
        self.set_nodelay(True)
        loop = asyncio.get_running_loop()
        self._auth_timer = loop.call_later(
            AUTH_TIMEOUT, self._refuse, protocol.CLOSE_UNAUTHORIZED, "authentication timed out")
        if self.ctx.config.websocket_ping_interval > 0:
            self._keepalive = loop.call_later(self.ctx.config.websocket_ping_interval,
                                              self._ping)

    def write_message(self, message: str | bytes | dict[str, Any],
                      binary: bool = False) -> asyncio.Future[None]:
        self._frames_sent += 1
        return super().write_message(message, binary)

    # -- keepalive ----------------------------------------------------------------------------

    def _ping(self) -> None:
        """A ping; `websocket_ping_timeout` later, _check_pong looks for its pong."""
        config = self.ctx.config
        self._keepalive = None
        if self.ws_connection is None or self.ws_connection.is_closing():
            return
        self._ponged, self._ping_mark = False, self._frames_sent
        try:
            self.ping()
        except tornado.websocket.WebSocketClosedError:
            return
        self._keepalive = asyncio.get_running_loop().call_later(
            config.websocket_ping_timeout or config.websocket_ping_interval, self._check_pong)

    def on_pong(self, data: bytes) -> None:
        self._ponged, self._frames_read = True, self._ping_mark

    def _check_pong(self) -> None:
        """No pong and nothing unread before the ping: the client is gone. Unread output
        holds the ping back (a client that stops reading, TCP full), and so does its input
        held for room in the pty (its pong waits behind it): kept, as a stopped terminal is;
        a dead peer's connection then ends by TCP's own timeouts."""
        config = self.ctx.config
        self._keepalive = None
        unread = self._ping_mark > self._frames_read
        excused = unread or self._holding_input
        if not self._ponged and not excused and config.websocket_ping_timeout > 0:
            self.close(CLOSE_GOING_AWAY, "ping timed out")
            return
        wait = max(config.websocket_ping_interval - config.websocket_ping_timeout, 0)
        self._keepalive = asyncio.get_running_loop().call_later(wait, self._ping)

    # -- messages -----------------------------------------------------------------------------

    async def on_message(self, message: str | bytes) -> None:
        session = self.session
        if session is not None:
            if session.peer is not self:  # taken over, or detached: not this socket's now
                return
            if isinstance(message, bytes):
                await self._input(session, message)
            else:
                self._control_text(session, message)
        elif not self.opening:
            self.opening = True
            await self._start_session(message)
        # else: more before `started` (the client did not wait): dropped, as before `open`

    async def _start_session(self, message: str | bytes) -> None:
        """The first message: authenticate, check, then start or reattach."""
        try:
            data = protocol.decode(message) if isinstance(message, str) else None
        except ValueError:
            data = None
        if not isinstance(data, dict) or data.get("type") != "open":
            self._refuse(protocol.CLOSE_UNAUTHORIZED, "send the open message first")
            return
        token = data.get("token")
        token = token if isinstance(token, str) else ""
        try:
            user = self.ctx.authenticate(token, self.request.remote_ip or "?")
            if not self.ctx.config.terminals:
                raise PermissionDenied("terminals are off on this node (terminals = false)")
            request = OpenRequest.from_message(data)
            expires_at = self.ctx.signer.expires_at(token)
            if request.session is not None:
                taken = self.ctx.terminals.owned(user, request.session).peer is not None
                self._check_sockets(user.name, replacing=taken)
                self.session = self.ctx.terminals.reattach(user, request.session, expires_at,
                                                           token, self)
            else:
                self._check_sockets(user.name)
                self.session = await self.ctx.terminals.start(
                    user, token, expires_at, request, self, self.request.remote_ip or "?")
        except MarcoError as error:
            self._refuse(close_code(error), error.message)
            return
        if self._auth_timer is not None:
            self._auth_timer.cancel()
        if self.ws_connection is None:  # closed while the shell started: detached
            self.session.detach(self)

    def _check_sockets(self, username: str, replacing: bool = False) -> None:
        """A terminal's socket counts against max_sockets_per_user with /v1/stream's (a
        reattach too; one that takes a session over replaces that session's socket)."""
        held = self.ctx.hub.count(username) + self.ctx.terminals.attached(username) - replacing
        cap = self.ctx.config.max_sockets_per_user
        if held >= cap:
            raise TooManySockets(f"{held} of your sockets are open here (the limit is {cap})")

    async def _input(self, session: TerminalSession, data: bytes) -> None:
        """Bytes for the pty; returns once the backlog is within its bound again (the next
        message waits in TCP meanwhile). A pty that takes nothing for terminal_input_stall
        seconds (a program that never reads) closes the socket with 4408: the session
        detaches, so a reattach or its grace decides, and no socket waits for ever."""
        session.write_input(data)
        stall = self.ctx.config.terminal_input_stall or None
        self._holding_input = session.input_full()
        try:
            await self._wait_for_room(session, stall)
        finally:
            self._holding_input = False

    async def _wait_for_room(self, session: TerminalSession, stall: float | None) -> None:
        """Wait while the input backlog is past its bound (see _input)."""
        while session.input_full() and session.peer is self:
            taken = session.bytes_taken
            try:
                await asyncio.wait_for(asyncio.shield(session.input_room()), stall)
            except TimeoutError:
                if session.bytes_taken == taken and session.peer is self:
                    self.close(protocol.CLOSE_INPUT_BACKLOG,
                               "input stalled: the terminal took none of it for "
                               f"{self.ctx.config.terminal_input_stall:g} s")
                    session.detach(self)
                    return

    def _control_text(self, session: TerminalSession, message: str) -> None:
        try:
            data = protocol.decode(message)
            self._control(session, data if isinstance(data, dict) else {})
        except (ValueError, BadRequest) as error:
            self.close(protocol.CLOSE_BAD_MESSAGE, str(error)[:120])

    def _control(self, session: TerminalSession, data: dict[str, Any]) -> None:
        kind = data.get("type")
        if kind == "resize":
            request = OpenRequest.from_message(data)  # the same bounds as at open
            session.resize(request.cols, request.rows)
        elif kind == "signal" and data.get("signal") in SIGNALS:
            session.signal_foreground(str(data["signal"]))
        elif kind == "detach":
            session.detach(self)
            self.close(protocol.CLOSE_NORMAL, "detached")
        else:
            raise BadRequest(f"unknown or malformed control message {str(kind)[:40]!r}")

    def _refuse(self, code: int, reason: str) -> None:
        if self.session is None:
            self.close(code, reason[:120])

    def on_close(self) -> None:
        if self._auth_timer is not None:
            self._auth_timer.cancel()
        if self._keepalive is not None:
            self._keepalive.cancel()
        if self.session is not None:
            self.session.detach(self)
