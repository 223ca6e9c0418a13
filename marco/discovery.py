"""Live discovery of agents: a zeroconf browser feeding the node registry (marco.nodes).

`ZeroconfBrowser` adds and updates nodes as agents announce themselves and drops them on a
goodbye once they no longer answer (anyone on the LAN can send a goodbye); the health monitor
(marco.health) checks them afterwards. A service seen but not listed (its resolution or its
first health check lost) is resolved again with doubling waits, `retry_tries` times at most; one
that answered wrong (certificate, secret proof, name) is not tried again until it announces
anew (anyone can announce: a forged service must not have the controller dial it forever). A
browse query each `rebrowse` seconds finds agents whose announcements were all lost
(`DiscoveryLimits`).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from zeroconf import DNSQuestionType, ServiceStateChange, Zeroconf, current_time_millis
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from marco.errors import ConfigError
from marco.health import HealthMonitor, Probe
from marco.nodes import Node, NodeRegistry
from marco.protocol import SERVICE_TYPE
from marco.tls import ClientTls

log = logging.getLogger(__name__)

RESOLVE_TIMEOUT_MS = 3000
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux: root may pass rmem_max


@dataclass(frozen=True)
class DiscoveryLimits:
    """How unlisted services are tried again: `retry_names` service names at most (more are
    left to their next announcement), first `retry_first` seconds after a failure, the wait
    doubling up to `retry_longest`, `retry_tries` times at most (then left to its next
    announcement); a browse query each `rebrowse` seconds (0: none after zeroconf's own first
    four), which agents already known do not answer (known answers)."""

    retry_names: int = 1024
    retry_first: float = 1.0
    retry_longest: float = 30.0
    rebrowse: float = 60.0
    retry_tries: int = 8
    receive_buffer: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.retry_names < 0 or not 0 < self.retry_first <= self.retry_longest:
            raise ConfigError("discovery retries: names must be 0 or more and the first wait "
                              "positive and at most the longest")
        if self.retry_tries < 0:
            raise ConfigError("discovery_retry_tries must be 0 (no retries) or more")
        if self.rebrowse < 0:
            raise ConfigError("discovery_rebrowse must be 0 (off) or positive")
        if self.receive_buffer < 0:
            raise ConfigError("discovery_receive_buffer must be 0 (the system's) or positive")


class Outcome(enum.Enum):
    """What one resolution and check of a service came to."""

    SETTLED = "listed, or its name held by a live agent elsewhere"
    RETRY = "not resolved or not answered: may be tried again"
    REFUSED = "answered wrong (certificate, secret proof, name): not tried again"


class ZeroconfBrowser:
    """Browses `_marco._tcp.local.` with QM questions on the given interface addresses.
    `verify` checks a node (HealthMonitor.probe: the secret proof over a new connection)."""

    def __init__(self, registry: NodeRegistry, interfaces: Sequence[str],
                 verify: Callable[[Node], Awaitable[Probe]] | None = None,
                 limits: DiscoveryLimits | None = None) -> None:
        self.registry = registry
        self.interfaces = list(interfaces)
        self.verify = verify
        self.limits = limits or DiscoveryLimits()
        # Service names seen but not listed: the tries so far and the next one's timer
        # (at most `retry_names`; a name leaves once listed or gone).
        self._retries: dict[str, tuple[int, asyncio.TimerHandle]] = {}
        # Service names no longer tried (a wrong answer, or `retry_tries` spent), oldest
        # first, at most `retry_names`: a new announcement resolves them once more.
        self._given_up: dict[str, None] = {}
        self._rebrowse: asyncio.Task[None] | None = None
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
        if self.limits.receive_buffer:
            grow_receive_buffers(self._zc.zeroconf, self.limits.receive_buffer)
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, SERVICE_TYPE,
                                            handlers=[self._on_change],
                                            question_type=DNSQuestionType.QM)
        self.registry.on_change(self._node_changed)
        if self.limits.rebrowse > 0:
            self._rebrowse = asyncio.ensure_future(self._browse_again())
        log.info("browsing for agents on %s", ", ".join(self.interfaces))

    async def _browse_again(self) -> None:
        """A browse query each `rebrowse` seconds, with the known answers: zeroconf's own
        queries stop after four unless a record nears its expiry (an hour), so an agent whose
        announcements were all lost would wait that long."""
        while True:
            await asyncio.sleep(self.limits.rebrowse)
            if self._browser is not None:
                self._browser.query_scheduler.async_send_ready_queries(
                    False, current_time_millis(), {SERVICE_TYPE})

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
        self._retry_done(name)
        if self.verify is not None:
            for node in self.registry.announced_as(name):
                if (await self.verify(node)).alive:
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
                outcome = await self._resolve_one(name)
                if not self._resolving[name]:
                    break
                self._resolving[name] = False
        finally:
            del self._resolving[name]  # bounded by the names resolving right now
        if outcome is Outcome.SETTLED:
            self._retry_done(name)
        elif outcome is Outcome.REFUSED:
            self._give_up(name, "it answered wrong")
        else:
            self._retry_later(name)

    def _retry_later(self, name: str) -> None:
        """Resolve a service seen but not listed again later, each wait twice the last (up
        to `retry_longest`), until it is listed or gone: its repeated announcements are
        identical packets, which zeroconf does not pass on, so nothing else would."""
        tries, timer = self._retries.pop(name, (0, None))
        if timer is not None:
            timer.cancel()
        if self._loop is None or self._zc is None or name in self._given_up:
            return
        if tries >= self.limits.retry_tries:
            self._give_up(name, f"{tries} tries")
            return
        if len(self._retries) >= self.limits.retry_names:
            log.warning("%s is not listed and %d other services wait for another try: left "
                        "to its next announcement", name, len(self._retries))
            return
        wait = min(self.limits.retry_longest, self.limits.retry_first * 2 ** min(tries, 30))
        (log.warning if tries == 0 else log.debug)(
            "%s is announced but not listed: trying again in %.1f s", name, wait)
        self._retries[name] = (tries + 1, self._loop.call_later(
            wait, self._handle, name, ServiceStateChange.Updated))

    def _retry_done(self, name: str) -> None:
        """The service is listed, held by another agent's node, or gone: no more tries."""
        _, timer = self._retries.pop(name, (0, None))
        if timer is not None:
            timer.cancel()
        self._given_up.pop(name, None)

    def _give_up(self, name: str, why: str) -> None:
        """No more timed tries of this service (`why`): its next announcement only."""
        _, timer = self._retries.pop(name, (0, None))
        if timer is not None:
            timer.cancel()
        if name not in self._given_up:
            log.warning("%s is not listed (%s): not tried again until it announces anew",
                        name, why)
        self._given_up.pop(name, None)
        self._given_up[name] = None
        while len(self._given_up) > self.limits.retry_names:
            del self._given_up[next(iter(self._given_up))]

    async def _resolve_one(self, name: str) -> Outcome:
        """Resolve and check one service: settled (listed, or its name held by a live agent
        elsewhere), refused (a wrong answer), or to be tried again (no resolution, no answer)."""
        if self._zc is None:
            return Outcome.SETTLED
        began = time.monotonic()
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._zc.zeroconf, RESOLVE_TIMEOUT_MS,
                                        question_type=DNSQuestionType.QM):
            log.info("could not resolve %s", name)
            return Outcome.RETRY
        addresses = info.parsed_scoped_addresses()
        if not addresses or info.port is None:
            return Outcome.RETRY
        txt = {k: v or "" for k, v in info.decoded_properties.items()}
        label = name[: -len(SERVICE_TYPE) - 1]
        node = Node(name=txt.get("node") or label, host=addresses[0], port=info.port, txt=txt,
                    source="mdns", service=name)
        resolved = time.monotonic()
        if self.verify is not None:
            probe = await self.verify(node)
            if not probe.alive:  # anyone can announce on a LAN; only agents with the secret
                return Outcome.REFUSED if probe.answered else Outcome.RETRY
        if await self._held_elsewhere(node):
            return Outcome.SETTLED
        self.registry.upsert(node)
        log.info("listed %s: resolved in %.3f s, proved in %.3f s", node.name,
                  resolved - began, time.monotonic() - resolved)
        return Outcome.SETTLED

    async def _held_elsewhere(self, node: Node) -> bool:
        """Does a live agent at another address still hold this node's name? Two agents
        announcing one name (started at once, or a clone) must not take turns in the
        inventory: the one listed first keeps the name while it still proves itself; an agent
        that moved (a new address, a new port) no longer answers at the old one."""
        known = self.registry.get(node.name)
        if known is None or not known.alive or (known.host, known.port) == (node.host, node.port):
            return False
        if self.verify is None or not (await self.verify(known)).alive:
            return False
        log.warning("%s:%d announces node %s, which the agent at %s:%d still holds: ignored "
                    "(two agents with one name?)", node.host, node.port, node.name,
                    known.host, known.port)
        if node.service is not None:
            self._contested.add(node.service)
        return True

    async def stop(self) -> None:
        for task in [*self._tasks, *([self._rebrowse] if self._rebrowse else [])]:
            task.cancel()
        for name in list(self._retries):
            self._retry_done(name)
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zc is not None:
            await self._zc.async_close()
        self._browser = self._zc = None


def grow_receive_buffers(zc: Zeroconf, size: int) -> None:
    """Give the mDNS sockets a receive buffer of `size` bytes: when many agents start at once
    their announcements and answers arrive in a burst, and the system's default (about 208 KiB,
    some 280 datagrams) drops the rest before zeroconf reads them. As root, SO_RCVBUFFORCE
    passes `net.core.rmem_max`; otherwise the kernel caps the size there."""
    engine = zc.engine
    # zeroconf keeps its sockets on the engine and offers no option for their buffers.
    sockets = [engine._listen_socket, *engine._respond_sockets]  # noqa: SLF001
    for sock in sockets:
        if sock is None:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
        except OSError:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
            except OSError as exc:
                log.warning("cannot grow the mDNS receive buffer: %s", exc.strerror or exc)
                return


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
        monitor = HealthMonitor(registry, wait, tls=tls)
        try:
            await monitor.check_all()
        finally:
            monitor.stop()  # its kept connections
        return registry.all()  # each with `alive` and, when refused, `error`
    return registry.alive()
