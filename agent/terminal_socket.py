"""The WebSocket /v1/terminal (docs/terminals.md): one terminal session per socket.

Authenticated like /v1/stream: nothing happens until the first message, a JSON `open` with the
token, sent within AUTH_TIMEOUT of the upgrade. Then binary frames are the pty's bytes both
ways and small JSON text frames the control messages. Closing the socket without `detach`
detaches the session as well (it is kept for `terminal_detach_grace`). Errors before the
upgrade are JSON, like the rest of the API.
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

    def check_origin(self, origin: str) -> bool:
        return self.ctx.origin_allowed(origin)

    async def get(self, *args: Any, **kwargs: Any) -> None:
        if self.request.headers.get("Upgrade", "").lower() != "websocket":
            raise BadRequest(f"{protocol.TERMINAL_PATH} is a WebSocket: send an Upgrade request")
        await super().get(*args, **kwargs)

    def open(self, *args: str, **kwargs: str) -> None:
        self.set_nodelay(True)
        self._auth_timer = asyncio.get_running_loop().call_later(
            AUTH_TIMEOUT, self._refuse, protocol.CLOSE_UNAUTHORIZED, "authentication timed out")

    async def on_message(self, message: str | bytes) -> None:
        session = self.session
        if session is not None:
            self._in_session(session, message)
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

    def _check_sockets(self, username: str) -> None:
        """A terminal's socket counts against max_sockets_per_user with /v1/stream's."""
        held = self.ctx.hub.count(username) + self.ctx.terminals.attached(username)
        cap = self.ctx.config.max_sockets_per_user
        if held >= cap:
            raise TooManySockets(f"{held} of your sockets are open here (the limit is {cap})")

    def _in_session(self, session: TerminalSession, message: str | bytes) -> None:
        if isinstance(message, bytes):
            if not session.write_input(message):
                self.close(protocol.CLOSE_INPUT_BACKLOG,
                           "input backlog: the terminal does not take input this fast")
                session.detach(self)
            return
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
        if self.session is not None:
            self.session.detach(self)
