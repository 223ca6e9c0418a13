"""Log out everywhere: a per-user "not before" time, kept by the controller and pushed to every
agent, which then refuse that user's older tokens (and close their sockets).

Agents that are down when it happens get the whole table when they come back: every time a
node turns alive, it is pushed again. Pushes are authenticated by a short-lived service token
(its own salt, so no user token can pass for one).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

from agent.errors import MarcoError
from agent.revocations import Revocations
from agent.tokens import TokenSigner

from .connector import AgentConnector
from .discovery import Node, NodeRegistry

log = logging.getLogger(__name__)


class RevocationPusher:
    """Keeps the revocations and brings every agent up to date."""

    def __init__(self, revocations: Revocations, registry: NodeRegistry,
                 service_signer: TokenSigner, connector: AgentConnector) -> None:
        self.connector = connector
        self.revocations = revocations
        self.registry = registry
        self.service_signer = service_signer
        self._tasks: set[asyncio.Task[Any]] = set()

    def watch(self) -> None:
        """Push the table to each node that turns alive (it may have missed a revocation)."""
        self.registry.on_change(self._node_changed)

    def _node_changed(self, node: Node) -> None:
        if node.alive and self.revocations.table():
            task = asyncio.ensure_future(self._push(node, self.revocations.table()))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def revoke(self, user: str) -> dict[str, Any]:
        """Void every token of `user` issued before this second, on every live node now."""
        cutoff = float(math.floor(time.time()))
        self.revocations.update({user: cutoff})
        nodes = self.registry.alive()
        results = await asyncio.gather(*(self._push(node, {user: cutoff}) for node in nodes))
        log.info("%s logged out everywhere (tokens before %s refused)", user, cutoff)
        return {"not_before": cutoff, "nodes": {n.name: r for n, r in zip(nodes, results)}}

    async def _push(self, node: Node, table: dict[str, float]) -> dict[str, Any]:
        client = self.connector.client(node, self.service_signer.issue("controller"))
        try:
            await client.push_revocations(table)
            return {"ok": True}
        except MarcoError as error:
            log.warning("could not push revocations to %s: %s", node.name, error.message)
            return {"ok": False, "message": error.message}
