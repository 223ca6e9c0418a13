"""The per-user WebSocket /v1/stream: live events of the user's executions, status, replay.

The first client message must be ``{"type": "auth", "token": ...}``; until then nothing is
sent. A bad, expired or missing token closes the socket with 4401; a user who already has
`max_sockets_per_user` sockets open gets 4429. Every later message that acts re-checks the
token's age. Sending never blocks: a socket whose queue would pass `max_socket_pending_bytes`
with the next message is closed with 4408 and can reconnect and replay from its last seq.

The controller's service token (with the controller's certificate under mutual TLS) opens a
status-only service subscription instead: its socket is in no user's table, so it never gets
any user's output, and it may only subscribe to status and ping (issue 15: the controller
subscribes to each node's status once and fans it out to every page). Service subscriptions
count against `max_sockets_per_user` as one more user would.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from marco import protocol
from marco.bounded_socket import BoundedWebSocket
from marco.errors import BadRequest, MarcoError, to_body
from marco.jsonapi import JsonApiMixin

from .context import AgentContext
from .handlers import MAX_REPLAY_LINES, is_controller
from .users import UserIdentity

log = logging.getLogger(__name__)

AUTH_TIMEOUT = 10.0
REPLAY_BYTES = 4 * 1024 * 1024  # per replay request; the client asks again from `next`
# The hub key counting service subscriptions against max_sockets_per_user: no Unix user can be
# named so, and nothing is ever published to it (events are published by execution user).
SERVICE_KEY = "\x00controller"
SERVICE_MESSAGES = ("subscribe", "ping")


class StreamSocket(JsonApiMixin, BoundedWebSocket):
    """One browser or client connection of one user (errors before the upgrade are JSON, like
    the rest of the API)."""

    ctx: AgentContext
    service_name = "agent"

    def initialize(self, ctx: AgentContext) -> None:
        self.ctx = ctx
        self.user: UserIdentity | None = None
        self.token: str | None = None
        self.pending_bytes = 0
        self.closed = False
        self.status_subscribed = False
        self.service = False
        self.peer_cert: Any = None
        self._auth_timer: asyncio.TimerHandle | None = None

    def check_origin(self, origin: str) -> bool:
        return self.ctx.origin_allowed(origin)

    async def get(self, *args: Any, **kwargs: Any) -> None:
        if self.request.headers.get("Upgrade", "").lower() != "websocket":
            raise BadRequest("/v1/stream is a WebSocket: send an Upgrade request")
        if self.ctx.crl is not None:  # mutual TLS (not --dev): before the upgrade detaches it
            self.peer_cert = self.request.get_ssl_certificate()
        await super().get(*args, **kwargs)

    def open(self) -> None:
        self.set_nodelay(True)
        self._auth_timer = asyncio.get_running_loop().call_later(
            AUTH_TIMEOUT, self.close, protocol.CLOSE_UNAUTHORIZED, "authentication timed out")

    def on_message(self, message: str | bytes) -> None:
        try:
            data = protocol.decode(message)
            if not isinstance(data, dict) or not isinstance(data.get("type"), str):
                raise ValueError("not a message object")
        except ValueError:
            self.close(protocol.CLOSE_BAD_MESSAGE, "messages must be JSON objects with a type")
            return
        if self.user is None and not self.service:
            self._authenticate(data)
            return
        try:
            # Every acting message re-checks max_age and revocation.
            self.ctx.verify_service(self.token) if self.service else self.ctx.verify(self.token)
        except MarcoError as error:
            self.close(protocol.CLOSE_UNAUTHORIZED, str(error)[:120])
            return
        try:
            self._dispatch(data)
        except MarcoError as error:
            self.send(protocol.encode({"type": "error", **to_body(error),
                                       "request": data.get("type")}))

    def _authenticate(self, data: dict[str, Any]) -> None:
        if data.get("type") != "auth":
            self.close(protocol.CLOSE_UNAUTHORIZED, "authenticate first")
            return
        token = data.get("token")
        token = token if isinstance(token, str) else ""
        if self._is_service_token(token):
            self._authenticate_service(token)
            return
        try:
            user = self.ctx.authenticate(token, self.request.remote_ip or "?")
        except MarcoError as error:
            code = protocol.CLOSE_FORBIDDEN if error.status == 403 else protocol.CLOSE_UNAUTHORIZED
            self.close(code, str(error)[:120])
            return
        self._expire_with(self.ctx.signer.expires_at(token))
        open_sockets, cap = self.ctx.hub.count(user.name), self.ctx.config.max_sockets_per_user
        if open_sockets >= cap:
            self.close(protocol.CLOSE_TOO_MANY_SOCKETS,
                       f"{open_sockets} of your sockets are open here (the limit is {cap})")
            return
        self.user, self.token = user, token
        self.ctx.hub.add(user.name, self)
        executions = [e.summary(short=True) for e in self.ctx.executions.of_user(user.name)]
        self.send(protocol.encode({"type": "hello", "user": user.name,
                                   "node": self.ctx.config.node_name,
                                   "proto": protocol.PROTOCOL_VERSION,
                                   "executions": executions}))

    def _expire_with(self, expires_at: float) -> None:
        """The socket lives no longer than its token: it closes (4401) when the token expires."""
        if self._auth_timer is not None:
            self._auth_timer.cancel()
        self._auth_timer = asyncio.get_running_loop().call_later(
            max(expires_at - time.time(), 0), self.close, protocol.CLOSE_UNAUTHORIZED,
            "token expired")

    def _is_service_token(self, token: str) -> bool:
        """Whether `token` is the controller's service token (its own salt: no user token
        passes for one, nor one for a user token)."""
        try:
            self.ctx.verify_service(token)
        except MarcoError:
            return False
        return True

    def _authenticate_service(self, token: str) -> None:
        """A status-only service subscription: the controller's token and, under mutual TLS,
        its certificate (every node holds the secret that signs service tokens)."""
        if self.ctx.crl is not None and not is_controller(self.peer_cert):
            self.close(protocol.CLOSE_FORBIDDEN, "only the controller's certificate may "
                       "open a service subscription")
            return
        self._expire_with(self.ctx.service_signer.expires_at(token))
        open_sockets, cap = self.ctx.hub.count(SERVICE_KEY), self.ctx.config.max_sockets_per_user
        if open_sockets >= cap:
            self.close(protocol.CLOSE_TOO_MANY_SOCKETS,
                       f"{open_sockets} service subscriptions are open here (the limit is {cap})")
            return
        self.service, self.token = True, token
        self.ctx.hub.add(SERVICE_KEY, self)
        self.send(protocol.encode({"type": "hello", "service": True,
                                   "node": self.ctx.config.node_name,
                                   "proto": protocol.PROTOCOL_VERSION, "executions": []}))

    def _dispatch(self, data: dict[str, Any]) -> None:
        kind = data["type"]
        if self.service and kind not in SERVICE_MESSAGES:
            raise BadRequest(f"a service subscription carries status only, not {kind!r}")
        if kind == "subscribe":
            if not isinstance(data.get("status"), bool):
                raise BadRequest("'status' must be true or false")
            self._subscribe_status(data["status"])
        elif kind == "replay" and self.user is not None:
            self._replay(str(data.get("id", "")), data.get("since", 0))
        elif kind == "stop" and self.user is not None:
            self.ctx.executions.stop(self.user.name, str(data.get("id", "")))
        elif kind == "ping":
            self.send(protocol.encode({"type": "pong", "data": data.get("data")}))
        else:
            self.send(protocol.encode({"type": "error", "error": "bad_request",
                                       "message": f"unknown message type {kind!r}"}))

    def _subscribe_status(self, wanted: bool) -> None:
        if wanted and not self.status_subscribed:
            self.ctx.status.subscribe(self.send)
        elif not wanted and self.status_subscribed:
            self.ctx.status.unsubscribe(self.send)
        self.status_subscribed = wanted

    def _replay(self, execution_id: str, since: Any) -> None:
        """Send stored output from `since`, then a `replayed` marker with the next seq.

        Runs in one go on the event loop, so no live event of the same execution can slip in
        between: live events that follow carry seqs >= `next`. At most REPLAY_BYTES go out per
        request (`complete` false): the client asks again from `next`.
        """
        assert self.user is not None
        if not isinstance(since, int) or isinstance(since, bool):
            since = 0
        execution, events = self.ctx.executions.read_output(
            self.user.name, execution_id, since, MAX_REPLAY_LINES, REPLAY_BYTES)
        for event in events:
            self.send(protocol.encode(event))
        next_seq = events[-1]["seq"] + len(events[-1]["lines"]) if events else since
        self.send(protocol.encode({"type": "replayed", "id": execution_id, "next": next_seq,
                                   "complete": next_seq >= execution.next_seq,
                                   "execution": execution.summary(short=True)}))

    def revoke(self) -> None:
        """Its user logged out everywhere: close if this socket's token is now refused."""
        try:
            self.ctx.verify_service(self.token) if self.service else self.ctx.verify(self.token)
        except MarcoError as error:
            self.close(protocol.CLOSE_UNAUTHORIZED, str(error)[:120])
            self._forget()

    def pending_limit(self) -> int:
        return self.ctx.config.max_socket_pending_bytes

    def too_slow(self, size: int) -> None:
        log.warning("closing a slow socket of %s (%d bytes pending, %d more to send)",
                    self.user.name if self.user else "?", self.pending_bytes, size)
        self.close(protocol.CLOSE_SLOW_CONSUMER, "too slow: reconnect and replay from seq")

    def _forget(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._auth_timer is not None:
            self._auth_timer.cancel()
        if self.user is not None or self.service:
            self.ctx.hub.remove(self.user.name if self.user else SERVICE_KEY, self)
        if self.status_subscribed:
            self.ctx.status.unsubscribe(self.send)
            self.status_subscribed = False
