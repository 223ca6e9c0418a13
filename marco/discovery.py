"""Live discovery of agents: a zeroconf browser feeding a registry, checked by health probes.

`NodeRegistry` holds what is known (name, address, port, TXT fields, first/last seen, alive).
`ZeroconfBrowser` adds and updates nodes as agents announce themselves and drops them on a
goodbye once they no longer answer (anyone on the LAN can send a goodbye). `HealthMonitor`
probes every node's `/v1/health`: an agent that died without a goodbye (SIGKILL, cable) is
marked down and leaves the inventory; it comes back when a probe or a new announcement
succeeds. Static nodes from the config are probed the same way.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from zeroconf import DNSQuestionType, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from marco.client import AsyncAgentClient
from marco.errors import CertificateRefused, ConfigError, MarcoError
from marco.protocol import DEFAULT_PORT, SERVICE_TYPE
from marco.tls import ClientTls
from marco.tokens import verify_health_proof

log = logging.getLogger(__name__)

RESOLVE_TIMEOUT_MS = 3000
HEALTH_TIMEOUT = 2.0
STATIC_FACTS = ("node", "version", "proto", "os", "arch", "cpus", "groups")


@dataclass
class Node:
    """One agent as the controller knows it."""

    name: str
    host: str
    port: int
    txt: dict[str, str] = field(default_factory=dict)
    source: str = "mdns"            # mdns | static
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
        return sorted(self._nodes.values(), key=lambda n: n.name)

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
        if known is not None and node.source == "mdns" and (
                known.source == "static" or (known.service != node.service and known.alive)):
            log.warning("ignoring %s: it announces the node name %r, which %s already has",
                        node.service, node.name, known.service or "the config")
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
            if details and node.source == "static":  # no TXT record: take the same facts
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

    def remove_service(self, service: str) -> None:
        """An agent said goodbye: forget it (static nodes stay)."""
        for name, node in list(self._nodes.items()):
            if node.service == service and node.source == "mdns":
                del self._nodes[name]
                node.alive = False
                log.info("node %s left", name)
                self._changed(node)


class ZeroconfBrowser:
    """Browses `_marco._tcp.local.` with QM questions on the given interface addresses."""

    def __init__(self, registry: NodeRegistry, interfaces: Sequence[str],
                 verify: Callable[[Node], Awaitable[bool]] | None = None) -> None:
        self.registry = registry
        self.interfaces = list(interfaces)
        self.verify = verify
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Service names resolving now, each with whether another announcement came meanwhile
        # (then one more pass follows, however many came: a flood queues nothing).
        self._resolving: dict[str, bool] = {}
        # Service names a second agent announced while the first still held them (bounded by
        # the names in the registry: each leaves when its node goes away).
        self._contested: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            self._zc = AsyncZeroconf(interfaces=self.interfaces)
        except OSError as exc:
            raise ConfigError(f"cannot browse mDNS on {', '.join(self.interfaces)}: "
                              f"{exc.strerror or exc}") from None
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, SERVICE_TYPE,
                                            handlers=[self._on_change],
                                            question_type=DNSQuestionType.QM)
        self.registry.on_change(self._node_changed)
        log.info("browsing for agents on %s", ", ".join(self.interfaces))

    def _node_changed(self, node: Node) -> None:
        """A node whose name another agent also announced went away (goodbye, or down): that
        agent may still announce it, so resolve the name again at once rather than wait for
        its next announcement (its repeats are identical packets, which zeroconf drops)."""
        if node.alive or node.service not in self._contested or self._zc is None:
            return
        self._contested.discard(node.service)
        self._handle(node.service, ServiceStateChange.Updated)

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str,
                   state_change: ServiceStateChange) -> None:
        # zeroconf calls handlers on its own loop thread in some versions: hop to ours.
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._handle, name, state_change)

    def _handle(self, name: str, state_change: ServiceStateChange) -> None:
        work = (self._goodbye(name) if state_change is ServiceStateChange.Removed
                else self._resolve(name))
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _goodbye(self, name: str) -> None:
        """An agent said goodbye. Anyone on the LAN can send one, so with `verify` the node is
        asked first: an agent stops taking connections before its goodbye, and one that still
        proves itself is kept (a forged goodbye, or an agent back already)."""
        if self.verify is not None:
            for node in self.registry.announced_as(name):
                if await self.verify(node):
                    log.warning("a goodbye for node %s came while it still answers: ignored",
                                node.name)
                    return
        self.registry.remove_service(name)

    async def _resolve(self, name: str) -> None:
        """Resolve a service announced just now and, once it proves itself, list it: at once,
        not on the health monitor's tick. One resolution per service name at a time; the
        announcements that come while it runs make one more pass, never a queue."""
        if name in self._resolving:
            self._resolving[name] = True
            return
        self._resolving[name] = False
        try:
            while True:
                await self._resolve_one(name)
                if not self._resolving[name]:
                    break
                self._resolving[name] = False
        finally:
            del self._resolving[name]  # bounded by the names resolving right now

    async def _resolve_one(self, name: str) -> None:
        if self._zc is None:
            return
        began = time.monotonic()
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._zc.zeroconf, RESOLVE_TIMEOUT_MS,
                                        question_type=DNSQuestionType.QM):
            log.warning("could not resolve %s", name)
            return
        addresses = info.parsed_scoped_addresses()
        if not addresses or info.port is None:
            return
        txt = {k: v or "" for k, v in info.decoded_properties.items()}
        label = name[: -len(SERVICE_TYPE) - 1]
        node = Node(name=txt.get("node") or label, host=addresses[0], port=info.port, txt=txt,
                    source="mdns", service=name)
        resolved = time.monotonic()
        if self.verify is not None and not await self.verify(node):
            return  # anyone can announce on a LAN; only agents holding the secret are nodes
        if await self._held_elsewhere(node):
            return
        self.registry.upsert(node)
        log.info("listed %s: resolved in %.3f s, proved in %.3f s", node.name,
                  resolved - began, time.monotonic() - resolved)

    async def _held_elsewhere(self, node: Node) -> bool:
        """Does a live agent at another address still hold this node's name? Two agents
        announcing one name (started at once, or a clone) must not take turns in the
        inventory: the one listed first keeps the name while it still proves itself; an agent
        that moved (a new address, a new port) no longer answers at the old one."""
        known = self.registry.get(node.name)
        if known is None or not known.alive or (known.host, known.port) == (node.host, node.port):
            return False
        if self.verify is None or not await self.verify(known):
            return False
        log.warning("%s:%d announces node %s, which the agent at %s:%d still holds: ignored "
                    "(two agents with one name?)", node.host, node.port, node.name,
                    known.host, known.port)
        if node.service is not None:
            self._contested.add(node.service)
        return True

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zc is not None:
            await self._zc.async_close()
        self._browser = self._zc = None


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


async def browse_once(interfaces: Sequence[str], wait: float = 2.0,
                      check_health: bool = True, tls: ClientTls | None = None) -> list[Node]:
    """Browse for agents for `wait` seconds and return those found, each probed unless
    `check_health` is false (`alive` and `error` tell the outcome): discovery without a
    controller, e.g. for the inventory plugin.

    With `tls` (a client certificate), each probe is mutual TLS and the agent's certificate must
    name the node it announced. Without it, this cannot tell a real agent from a machine posing
    as one (mDNS is unauthenticated)."""
    registry = NodeRegistry()
    browser = ZeroconfBrowser(registry, interfaces)
    await browser.start()
    try:
        await asyncio.sleep(wait)
    finally:
        await browser.stop()
    if check_health:
        await HealthMonitor(registry, wait, tls=tls).check_all()
        return registry.all()  # each with `alive` and, when refused, `error`
    return registry.alive()
