"""Revocations, pushed to every agent: users' "not before" times (log out everywhere: agents
then refuse that user's older tokens and close their sockets) and the cluster CA's CRL (revoked
certificates: agents then refuse them in the TLS handshake).

Agents that are down when it happens get both when they come back: every time a node turns
alive, they are pushed again. The CRL file is watched, so `marco-controller revoke-cert` run
beside a running controller reaches every agent within seconds. Pushes are authenticated by
a short-lived service token (its own salt, so no user token can pass for one) over the
controller's mutual TLS.

Controllers sharing a database (controller/shared_state.py) write each revocation there too;
what another controller wrote reaches this one's memory (its pages and API refuse those tokens)
and is pushed from here as well, to every node this controller sees.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from marco.errors import MarcoError
from marco.nodes import Node, NodeRegistry
from marco.revocations import DeniedTokens, Revocations, token_digest
from marco.tls import file_stamps
from marco.tokens import TokenSigner

from .connector import AgentConnector
from .shared_state import SharedState

log = logging.getLogger(__name__)


class RevocationPusher:
    """Keeps the revocations and brings every agent up to date."""

    def __init__(self, revocations: Revocations, registry: NodeRegistry,
                 service_signer: TokenSigner, connector: AgentConnector,
                 crl_file: Path | None = None, denied: DeniedTokens | None = None,
                 signer: TokenSigner | None = None, shared: SharedState | None = None) -> None:
        self.connector = connector
        self.shared = shared  # None: this controller's own files only
        self.denied, self.signer = denied, signer
        self.crl_file = crl_file
        self._crl_mtime = self._crl_stamp()
        self._crl_pending: set[str] = set()  # nodes a CRL push failed on: retried
        self.revocations = revocations
        self.registry = registry
        self.service_signer = service_signer
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listeners: list[Callable[[], None]] = []

    def watch(self) -> None:
        """Push the table to each node that turns alive (it may have missed a revocation);
        follow what other controllers on the same database revoke."""
        self.registry.on_change(self._node_changed)
        if self.shared is not None:
            self.shared.follow(self)

    def reloaded(self, revocations: dict[str, float], denied: dict[str, float]) -> None:
        """Another controller revoked these: refuse them here now, push them to the nodes."""
        self._revoked()
        for node in self.registry.alive():
            self._spawn(self._push(node, revocations, denied))

    def _node_changed(self, node: Node) -> None:
        tokens = self.denied.table() if self.denied is not None else {}
        if node.alive and (self.revocations.table() or tokens):
            self._spawn(self._push(node, self.revocations.table(), tokens))
        if node.alive and self.crl_file is not None:
            self._spawn(self._push_crl(node))

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _crl_stamp(self) -> tuple[float, ...]:
        return file_stamps(self.crl_file)

    async def check_crl(self) -> dict[str, Any] | None:
        """If the CRL file changed (a `revoke-cert`), push it to every live node now; retry
        the live nodes an earlier push failed on."""
        stamp = self._crl_stamp()
        if stamp != self._crl_mtime:
            self._crl_mtime = stamp
            nodes = self.registry.alive()
            log.info("pushing the new CRL to %d node(s)", len(nodes))
        elif self._crl_pending:
            nodes = [n for n in self.registry.alive() if n.name in self._crl_pending]
        else:
            return None
        results = await asyncio.gather(*(self._push_crl(node) for node in nodes))
        for node, result in zip(nodes, results, strict=True):
            if result["ok"]:
                self._crl_pending.discard(node.name)
            else:
                self._crl_pending.add(node.name)
        return {n.name: r for n, r in zip(nodes, results, strict=True)}

    async def _push_crl(self, node: Node) -> dict[str, Any]:
        assert self.crl_file is not None
        try:
            pem = self.crl_file.read_bytes()
            client = self.connector.client(node, self.service_signer.issue("controller"))
            return {"ok": True, **await client.push_crl(pem)}
        except OSError as error:
            log.error("cannot read %s: %s", self.crl_file, error.strerror)
            return {"ok": False, "message": str(error)}
        except MarcoError as error:
            log.warning("could not push the CRL to %s: %s", node.name, error.message)
            return {"ok": False, "message": error.message}

    def on_revoked(self, listener: Callable[[], None]) -> None:
        """Call `listener` right after any token is voided here (before the nodes hear it):
        what holds sockets open for a login checks them again."""
        self._listeners.append(listener)

    def _revoked(self) -> None:
        for listener in self._listeners:
            listener()

    async def deny(self, token: str) -> dict[str, Any]:
        """Void one token (a plain logout) here and, once pushed, on every live node."""
        assert self.denied is not None and self.signer is not None
        until = self.signer.expires_at(token)
        table = {token_digest(token): until}
        self.denied.update(table)
        self._revoked()
        nodes = self.registry.alive()
        results = await self._push_and_share(nodes, {}, table)
        return {"nodes": {n.name: r for n, r in zip(nodes, results, strict=True)}}

    def deny_soon(self, token: str) -> None:
        """`deny` without waiting for the nodes (the page's logout redirects at once)."""
        self._spawn(self.deny(token))

    async def revoke(self, user: str) -> dict[str, Any]:
        """Void every token of `user` issued up to now, on every live node now. Tokens carry
        whole seconds: the cutoff is the next second, so tokens of this very second (the
        caller's own among them) are void too."""
        now = self.shared.cutoff_now() if self.shared is not None else time.time()
        cutoff = float(math.floor(now) + 1)
        self.revocations.update({user: cutoff})
        self._revoked()
        nodes = self.registry.alive()
        results = await self._push_and_share(nodes, {user: cutoff}, {})
        log.info("%s logged out everywhere (tokens before %s refused)", user, cutoff)
        answers = {n.name: r for n, r in zip(nodes, results, strict=True)}
        return {"not_before": cutoff, "nodes": answers}

    async def _push_and_share(self, nodes: list[Node], table: dict[str, float],
                              tokens: dict[str, float]) -> list[dict[str, Any]]:
        """Push to the nodes and write to the shared database at once: a database that
        stalls (up to shared_timeout) delays no agent's push. The nodes' answers."""
        pushes = asyncio.gather(*(self._push(node, table, tokens) for node in nodes))
        if self.shared is None:
            return list(await pushes)
        results, _ = await asyncio.gather(pushes, self.shared.share(table, tokens))
        return list(results)

    async def _push(self, node: Node, table: dict[str, float],
                    tokens: dict[str, float] | None = None) -> dict[str, Any]:
        client = self.connector.client(node, self.service_signer.issue("controller"))
        try:
            await client.push_revocations(table, tokens or {})
            return {"ok": True}
        except MarcoError as error:
            log.warning("could not push revocations to %s: %s", node.name, error.message)
            return {"ok": False, "message": error.message}
