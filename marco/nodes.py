"""The nodes the controller knows: `Node` (name, address, port, TXT fields, first and last
seen, alive) and `NodeRegistry`, which holds them by name and tells listeners of each change.
Discovery (marco.discovery), the health monitor (marco.health), static nodes from the
config and agents registered with the controller (controller.registration) feed it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from marco.errors import ConfigError
from marco.inventory import natural_key
from marco.protocol import DEFAULT_PORT

log = logging.getLogger(__name__)

STATIC_FACTS = ("node", "version", "proto", "os", "arch", "cpus", "groups")


@dataclass
class Node:
    """One agent as the controller knows it."""

    name: str
    host: str
    port: int
    txt: dict[str, str] = field(default_factory=dict)
    source: str = "mdns"            # mdns | static | registered
    service: str | None = None      # the mDNS service name, for goodbyes
    first_seen: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    alive: bool = True
    error: str | None = None

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "host": self.host, "port": self.port, "txt": self.txt,
                "source": self.source, "first_seen": self.first_seen,
                "last_seen": self.last_seen, "alive": self.alive, "error": self.error,
                "groups": [g for g in self.txt.get("groups", "").split(",") if g]}


def parse_static_node(spec: str) -> Node:
    """`HOST:PORT`, `HOST` or `NAME=HOST:PORT` from the config."""
    name, _, address = spec.rpartition("=")
    host, sep, port_text = address.rpartition(":") if ":" in address else (address, "", "")
    if not sep:
        host, port_text = address, str(DEFAULT_PORT)
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"static node {spec!r}: port must be a number") from None
    if not host or not 0 < port < 65536:
        raise ConfigError(f"static node {spec!r}: expected HOST:PORT or NAME=HOST:PORT")
    return Node(name=name or host, host=host, port=port, source="static")


_HELD_BY = {"static": "the config", "registered": "a registered agent"}


def _holder(node: Node) -> str | None:
    """Who holds a name: an mDNS service name, or "registered" (a certificate proved it)."""
    return node.service if node.source == "mdns" else node.source


class NodeRegistry:
    """Every known node by name; listeners hear about each change."""

    def __init__(self) -> None:
        self._nodes: dict[str, Node] = {}
        self._listeners: list[Callable[[Node], None]] = []

    def on_change(self, listener: Callable[[Node], None]) -> None:
        self._listeners.append(listener)

    def _changed(self, node: Node) -> None:
        for listener in self._listeners:
            try:
                listener(node)
            except Exception:
                log.exception("node listener failed")

    def all(self) -> list[Node]:
        """Every node, in natural order of names (sc2 before sc10)."""
        return sorted(self._nodes.values(), key=lambda n: natural_key(n.name))

    def alive(self) -> list[Node]:
        return [n for n in self.all() if n.alive]

    def get(self, name: str) -> Node | None:
        return self._nodes.get(name)

    def upsert(self, node: Node) -> Node:
        """Add a node, or refresh a known one (a new announcement means it is alive).

        An announcement never takes over a name from the config, nor one that another live
        service holds (first come, first kept; a warning is logged); a service that announces a
        new name drops its old one.
        """
        known = self._nodes.get(node.name)
        if known is not None and node.source != "static" and (
                known.source == "static" or (_holder(known) != _holder(node) and known.alive)):
            log.warning("ignoring %s: it announces the node name %r, which %s already has",
                        node.service or f"{node.host}:{node.port} ({node.source})", node.name,
                        known.service or _HELD_BY.get(known.source, known.source))
            return known
        if node.service:
            for other in [n for n in self._nodes.values()
                          if n.service == node.service and n.name != node.name]:
                del self._nodes[other.name]
                other.alive = False
                log.info("node %s is now called %s", other.name, node.name)
                self._changed(other)
        if known is None:
            self._nodes[node.name] = node
            log.info("node %s found at %s:%d (%s)", node.name, node.host, node.port, node.source)
            self._changed(node)
            return node
        changed = (known.host, known.port, known.txt, known.alive) != (
            node.host, node.port, node.txt or known.txt, True)
        if node.source != known.source:  # a down node's name taken by the other way in
            known.source, known.service = node.source, node.service
        known.host, known.port, known.service = node.host, node.port, node.service or known.service
        known.txt = node.txt or known.txt
        known.last_seen, known.alive, known.error = time.time(), True, None
        if changed:
            log.info("node %s is up at %s:%d", known.name, known.host, known.port)
            self._changed(known)
        return known

    def set_health(self, name: str, alive: bool, error: str | None = None,
                   details: dict[str, Any] | None = None) -> None:
        node = self._nodes.get(name)
        if node is None:
            return
        was = node.alive
        node.alive, node.error = alive, error
        if alive:
            node.last_seen = time.time()
            if details and node.source != "mdns":  # no TXT record: take the same facts
                node.txt = {**node.txt, **{key: str(details[key]) for key in STATIC_FACTS
                                           if key in details}}
        if was != alive:
            log.info("node %s is %s%s", name, "up" if alive else "down",
                     f": {error}" if error else "")
            self._changed(node)

    def announced_as(self, service: str) -> list[Node]:
        """The nodes discovered under an mDNS service name."""
        return [node for node in self._nodes.values()
                if node.service == service and node.source == "mdns"]

    def remove(self, name: str, source: str) -> bool:
        """Forget the node `name` if `source` holds it (a registration ended); whether it did."""
        node = self._nodes.get(name)
        if node is None or node.source != source:
            return False
        del self._nodes[name]
        node.alive = False
        log.info("node %s left (%s)", name, source)
        self._changed(node)
        return True

    def remove_service(self, service: str) -> None:
        """An agent said goodbye: forget it (static nodes stay)."""
        for name, node in list(self._nodes.items()):
            if node.service == service and node.source == "mdns":
                del self._nodes[name]
                node.alive = False
                log.info("node %s left", name)
                self._changed(node)
