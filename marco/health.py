"""Health checks: `HealthMonitor` probes every known node's `/v1/health`. An agent that died
without a goodbye (SIGKILL, cable) is marked down and leaves the inventory; it comes back when a
probe or a new announcement succeeds. Static nodes from the config are probed the same way.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from marco.client import AsyncAgentClient
from marco.errors import CertificateRefused, MarcoError
from marco.nodes import Node, NodeRegistry
from marco.tls import ClientTls
from marco.tokens import verify_health_proof

log = logging.getLogger(__name__)

HEALTH_TIMEOUT = 2.0


@dataclass(frozen=True)
class Probe:
    """One health check: `answered` is False when the node did not answer at all (refused,
    reset, timed out), as opposed to a wrong answer (certificate, secret proof, name)."""

    alive: bool
    error: str | None = None
    details: dict[str, Any] | None = None
    answered: bool = True


class HealthMonitor:
    """Probes every node's /v1/health each `interval` seconds, all nodes concurrently.

    With the cluster's secret keys, every probe carries a fresh challenge that only an agent
    holding the secret can answer: a machine posing as a node on the LAN fails it and is
    never offered users' tokens.
    """

    def __init__(self, registry: NodeRegistry, interval: float,
                 keys: Sequence[bytes] | None = None, tls: ClientTls | None = None,
                 failures: int = 1) -> None:
        self.tls = tls
        self.registry = registry
        self.interval = interval
        self.keys = list(keys or [])
        # A node is down after `failures` probes in a row that got no answer, so one slow
        # answer (a busy node, a lost packet) does not drop it from the inventory; a wrong
        # answer (certificate, secret proof, name) drops it at once.
        self.failures = max(1, failures)
        self._missed: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self.interval)

    async def check_all(self) -> None:
        nodes = self.registry.all()
        self._missed = {name: count for name, count in self._missed.items()
                        if self.registry.get(name) is not None}  # forgotten nodes' counts go
        if nodes:
            await asyncio.gather(*(self.check(node) for node in nodes))

    async def probe(self, node: Node) -> Probe:
        """One node's health, the secret proof checked when keys are set."""
        client = AsyncAgentClient(node.host, node.port, timeout=HEALTH_TIMEOUT, tls=self.tls,
                                  node=node.name if self.tls is not None else None)
        nonce = secrets.token_hex(16) if self.keys else None
        try:
            details = await client.health(nonce)
        except CertificateRefused as error:
            log.warning("refusing %s at %s:%d: %s", node.name, node.host, node.port,
                        error.message)
            return Probe(False, str(error))
        except MarcoError as error:
            return Probe(False, str(error), answered=False)
        reported = str(details.get("node", ""))
        if nonce is not None and not verify_health_proof(self.keys, nonce, reported,
                                                         details.get("proof")):
            log.warning("%s:%d answers as node %s without proof of the cluster secret: ignored",
                        node.host, node.port, node.name)
            return Probe(False,
                         "failed the cluster-secret proof (not a Marco agent of this cluster?)")
        if node.source == "mdns" and reported != node.name:
            log.warning("%s announces node %s but its agent is %s: ignored", node.service,
                        node.name, reported)
            return Probe(False, f"the agent there is {reported!r}")
        return Probe(True, details=details)

    async def verify(self, node: Node) -> bool:
        """For the browser: is this newly announced node a real agent of this cluster?"""
        return (await self.probe(node)).alive

    async def check(self, node: Node) -> None:
        probe = await self.probe(node)
        if probe.answered:
            self._missed.pop(node.name, None)
        else:
            missed = self._missed[node.name] = self._missed.get(node.name, 0) + 1
            if node.alive and missed < self.failures:
                log.info("%s did not answer its health check (%d in a row, down at %d): %s",
                         node.name, missed, self.failures, probe.error)
                return
        self.registry.set_health(node.name, probe.alive, probe.error, details=probe.details)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
