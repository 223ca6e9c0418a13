"""How the controller opens clients to its nodes: mutual TLS pinned to the node's name, with
the controller's own certificate, or plain HTTP in development mode."""

from __future__ import annotations

from typing import Protocol

from marco.client import DEFAULT_TIMEOUT, AsyncAgentClient
from marco.tls import ClientTls


class Reachable(Protocol):
    name: str
    host: str
    port: int


class AgentConnector:
    """Makes `AsyncAgentClient`s for nodes; `tls` None means development mode (plain HTTP)."""

    def __init__(self, tls: ClientTls | None) -> None:
        self.tls = tls

    def client(self, node: Reachable, token: str | None = None,
               timeout: float = DEFAULT_TIMEOUT) -> AsyncAgentClient:
        return AsyncAgentClient(node.host, node.port, token, timeout=timeout, tls=self.tls,
                                node=node.name if self.tls is not None else None)
