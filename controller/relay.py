"""WebSocket relay /relay/NODE: the browser's way to the agents' live output (agents speak
mutual TLS with client certificates a browser does not have; this way the browser trusts one
certificate, the controller's).

The browser authenticates to the relay with its login cookie (same origin: Tornado's default
`check_origin` stays on); the relay opens the agent's /v1/stream with the user's token and
passes messages both ways unchanged (agent events as the agent's own text, not re-encoded).
The browser's own `auth` message is not forwarded.
"""

from __future__ import annotations

import asyncio
import json
import logging

import tornado.websocket

from marco.client import AgentStream
from marco.errors import MarcoError
from marco.protocol import CLOSE_UNAUTHORIZED, encode

from .context import ControllerContext
from .session import SessionMixin

log = logging.getLogger(__name__)


class RelaySocket(SessionMixin, tornado.websocket.WebSocketHandler):
    """One browser socket relayed to one agent for the logged-in user."""

    def initialize(self, ctx: ControllerContext) -> None:
        super().initialize(ctx)
        self.upstream: AgentStream | None = None
        self._pump: asyncio.Task[None] | None = None

    async def open(self, node_name: str) -> None:
        user = self.current_user
        node = self.ctx.registry.get(node_name)
        if not user:
            self.close(CLOSE_UNAUTHORIZED, "log in first")
            return
        if node is None:
            self.close(4404, "no such node")
            return
        self.upstream = self.ctx.connector.client(node, self.token()).stream()
        try:
            hello = await self.upstream.connect()
        except MarcoError as error:
            self.close(4502, f"agent unreachable: {error.message}"[:120])
            return
        self.write_message(encode(hello))
        self._pump = asyncio.ensure_future(self._relay_down())

    async def _relay_down(self) -> None:
        assert self.upstream is not None
        try:
            while (event := await self.upstream.read_text()) is not None:
                await self.write_message(event)
        except (MarcoError, tornado.websocket.WebSocketClosedError) as error:
            log.info("relay closed: %s", error)
        finally:
            self.close()

    async def on_message(self, message: str | bytes) -> None:
        if self.upstream is None:
            return
        try:
            data = json.loads(message)
        except ValueError:
            return
        if isinstance(data, dict) and data.get("type") != "auth":
            await self.upstream.send(data)

    def on_close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
        if self.upstream is not None:
            self.upstream.close()
