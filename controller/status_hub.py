"""Node status, fanned out: one upstream status subscription per node, whatever the number of
pages showing it (issue 15).

The controller subscribes to a node's status over the agent's /v1/stream with its service
token (and, under mutual TLS, its own certificate): a status-only service subscription, which
never carries any user's output. Each snapshot is read once, tagged with its node and sent as
the same text to every page watching that node; the newest one is kept so a page that starts
watching gets it at once. The upstream closes as soon as no page watches the node, and is
opened again (with a backoff) while pages still watch it after it dropped.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from marco.errors import MarcoError
from marco.nodes import NodeRegistry
from marco.protocol import encode
from marco.tokens import TokenSigner

from .connector import AgentConnector

log = logging.getLogger(__name__)

Send = Callable[[str], None]
RETRY_FIRST = 1.0   # seconds before the first reconnect of a dropped upstream
RETRY_MAX = 30.0    # the backoff doubles up to this


def event_object(text: str) -> dict[str, Any] | None:
    """An agent's event as a JSON object with a string type, or None (not one: dropped)."""
    try:
        data: Any = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        return None
    return data


def tagged(data: dict[str, Any], node: str) -> str:
    """An event encoded with its node (ours replaces any `node` the agent put in it)."""
    data["node"] = node
    return encode(data)


class StatusFeed:
    """One node's upstream status subscription and the pages it feeds."""

    def __init__(self, hub: StatusHub, node: str) -> None:
        self.hub, self.node = hub, node
        self.watchers: list[Send] = []
        self.last: str | None = None  # the newest snapshot, tagged
        self.connected = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        """Keep one upstream open while pages watch the node; back off between failures."""
        delay = RETRY_FIRST
        while self.watchers:
            try:
                if await self._follow():
                    delay = RETRY_FIRST  # it was up: the next drop is retried soon again
            except MarcoError as error:
                log.info("status of %s: %s", self.node, error.message)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def _follow(self) -> bool:
        """Open the upstream, subscribe, fan out until it closes; whether it said hello."""
        node = self.hub.registry.get(self.node)
        if node is None or not node.alive:
            return False
        stream = self.hub.connector.client(node, self.hub.service_token()).stream()
        try:
            await stream.connect()
            self.connected = True
            await stream.send({"type": "subscribe", "status": True})
            while (text := await stream.read_text()) is not None:
                self._fan_out(text)
            return True
        finally:
            self.connected, self.last = False, None  # no stale snapshot for new watchers
            stream.close()

    def _fan_out(self, text: str) -> None:
        data = event_object(text)
        if data is None or data["type"] != "status":
            return  # a service subscription carries status (and pongs) only
        self.last = message = tagged(data, self.node)
        for send in list(self.watchers):
            send(message)


class StatusHub:
    """Which pages watch which node's status; one `StatusFeed` per watched node."""

    def __init__(self, registry: NodeRegistry, connector: AgentConnector,
                 service_signer: TokenSigner) -> None:
        self.registry, self.connector = registry, connector
        self.service_signer = service_signer
        self.feeds: dict[str, StatusFeed] = {}

    def service_token(self) -> str:
        return self.service_signer.issue("controller")

    def watch(self, node: str, send: Send) -> None:
        """Send `node`'s status to `send` from now on (its newest snapshot at once)."""
        feed = self.feeds.get(node)
        if feed is None:
            feed = self.feeds[node] = StatusFeed(self, node)
        if send not in feed.watchers:
            feed.watchers.append(send)
        if feed.last is not None:
            send(feed.last)
        feed.start()

    def unwatch(self, node: str, send: Send) -> None:
        """Stop sending `node`'s status to `send`; the last watcher gone closes the upstream."""
        feed = self.feeds.get(node)
        if feed is None:
            return
        if send in feed.watchers:
            feed.watchers.remove(send)
        if not feed.watchers:
            feed.stop()
            del self.feeds[node]

    def upstreams(self) -> int:
        """Upstream status subscriptions open now."""
        return sum(1 for feed in self.feeds.values() if feed.connected)
