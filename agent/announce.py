"""Announce this agent on the LAN by zeroconf (mDNS / DNS-SD), on chosen interfaces only.

`choose_mdns_interfaces` (marco.protocol, shared with the controller's browser) decides where to
announce (never every network by default), `Announcement` says what (the `_marco._tcp.local.`
service and its TXT record), and `Announcer`
checks the name is free, registers it and withdraws it with goodbye packets.

The name check is a one-shot mDNS query (RFC 6762 5.1, 6.7) from a port of its own on each IPv4
interface: any responder holding the name answers it at once by unicast to that port, free of
the one-second multicast rule and of the other mDNS stacks sharing UDP 5353 on this host. It
replaces zeroconf's three QU probes (150-250 ms + 1 s, and their unicast answers may land in
another process's socket) and the earlier 0.5 s QM wait.

Two agents started at once both pass that check. After announcing, each watches the responses
for its names: within CONFLICT_WINDOW_SECONDS the one that started later (TXT `since`) yields
(`conflict`, `on_conflict`); after it an agent keeps its name and announces it again. The
agent's `main()` owns the signal handlers: on SIGTERM/SIGINT it awaits `Announcer.stop()` (or
leaves `async with Announcer(...)`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import re
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from zeroconf import (
    BadTypeInNameException,
    DNSAddress,
    DNSIncoming,
    DNSOutgoing,
    DNSQuestion,
    DNSQuestionType,
    DNSRecord,
    DNSService,
    DNSText,
    IPVersion,
    NonUniqueNameException,
    RecordUpdate,
    RecordUpdateListener,
    ServiceNameAlreadyRegistered,
    Zeroconf,
)
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from marco import __version__
from marco.errors import ConfigError
from marco.protocol import PROTOCOL_VERSION, SERVICE_TYPE, specific_address

log = logging.getLogger(__name__)

#: Longest wait for the goodbye packets on stop (zeroconf sends three, 125 ms apart).
GOODBYE_TIMEOUT = 5.0
#: Default seconds to listen for another owner of our name before announcing. The one-shot
#: query's answer is unicast at once (no 1 s multicast hold, RFC 6762 6.7); the window covers
#: a loaded responder and a lost packet (the query is sent CLASH_QUERIES times within it).
CLASH_CHECK_SECONDS = 0.3
#: One-shot queries sent over the check window, evenly spaced.
CLASH_QUERIES = 3
#: Seconds to listen on an IPv6 interface, where the check is a QM query on the shared socket
#: instead: a responder that multicast its records in the last second may hold its answer
#: for up to 1 s (RFC 6762 6).
CLASH_CHECK_V6_SECONDS = 0.5

#: Seconds after its first announcement in which an agent yields its name to an agent that
#: announced the same name at about the same time and started earlier: both passed the name
#: check before either announced. After that it keeps the name and announces it again.
CONFLICT_WINDOW_SECONDS = 2.0
#: Seconds between a rival's announcement or goodbye and our own announcement again; more
#: rival packets meanwhile join the same one (a flood of them costs one round per ~0.7 s).
DEFEND_DELAY_SECONDS = 0.25

_MDNS_GROUP = "224.0.0.251"
_MDNS_PORT = 5353
_TYPE_TXT, _TYPE_SRV, _CLASS_IN = 16, 33, 1
_MAX_DATAGRAM = 9000  # RFC 6762 17: an mDNS message is at most 9000 bytes

_MAX_LABEL = 63      # bytes in one DNS label (RFC 1035), also the DNS-SD instance name limit
_MAX_TXT_ITEM = 255  # bytes in one TXT "key=value" string (RFC 6763 6.1)


def dns_label(node: str) -> str:
    """`node` as one lowercase DNS label (letters, digits, '-'; 63 bytes at most)."""
    label = re.sub(r"[^a-z0-9-]+", "-", node.strip().lower())
    label = label.strip("-")[:_MAX_LABEL].rstrip("-")
    if not label:
        raise ConfigError(f"node name {node!r} has no letter or digit to announce")
    return label


def _os_id() -> str:
    """A short OS name: the distro ID on Linux when known ("debian"), else e.g. "linux"."""
    system = platform.system().lower() or "unknown"
    if system == "linux":
        try:
            distro = platform.freedesktop_os_release().get("ID", "")
        except OSError:
            distro = ""
        distro = re.sub(r"[^a-z0-9._-]", "", distro.lower())[:32]
        if distro:
            return distro
    return system


@dataclass(frozen=True)
class Announcement:
    """What one agent announces; empty `addresses` means "the interface addresses"."""

    node: str
    port: int
    addresses: tuple[str, ...]
    groups: tuple[str, ...] = ()
    tls: bool = False
    #: When this agent started announcing (Unix time): of two agents that announce one name at
    #: once, the later yields (in its TXT record, so that both decide alike).
    since: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        object.__setattr__(self, "addresses", tuple(self.addresses))
        object.__setattr__(self, "groups", tuple(self.groups))
        dns_label(self.node)
        if not 0 < self.port < 65536:
            raise ConfigError(f"announced port {self.port} is not a TCP port")
        for address in self.addresses:
            specific_address(address, "announced address")
        for group in self.groups:
            if not group or re.search(r"[\s,=]", group):
                raise ConfigError(f"group name {group!r} is empty or has a comma, '=' or space")

    def txt(self) -> dict[str, str]:
        """The TXT record: proto, version, node, os, arch, cpus, groups (comma-joined), tls,
        since (Unix time, ms)."""
        txt = {
            "proto": str(PROTOCOL_VERSION),
            "version": __version__,
            "node": self.node,
            "os": _os_id(),
            "arch": platform.machine().lower() or "unknown",
            "cpus": str(os.cpu_count() or 1),
            "groups": ",".join(self.groups),
            "tls": "1" if self.tls else "0",
            "since": f"{self.since:.3f}",
        }
        for key, value in txt.items():
            if len(f"{key}={value}".encode()) > _MAX_TXT_ITEM:
                raise ConfigError(f"announced {key} is longer than a TXT entry allows (255 bytes)")
        return txt

    def service_name(self) -> str:
        """The DNS-SD instance name, e.g. "node-01._marco._tcp.local."."""
        return f"{dns_label(self.node)}.{SERVICE_TYPE}"

    def server_name(self) -> str:
        """The SRV target host name, unique per agent: "node-01.local."."""
        return f"{dns_label(self.node)}.local."


class Announcer:
    """Registers one agent's service on the given interface addresses; async start/stop."""

    def __init__(self, announcement: Announcement, interfaces: Sequence[str],
                 clash_check: float = CLASH_CHECK_SECONDS,
                 on_conflict: Callable[[], None] | None = None) -> None:
        self.announcement = announcement
        # Called once when this agent yields its name to another (`conflict` says why); its
        # owner stops the agent (no new connections, then stop()). Without it, stop() here.
        self.on_conflict = on_conflict
        self.conflict: str | None = None
        self.clash_check = clash_check  # seconds; 0: no check, only the watch for rivals
        self.interfaces = [specific_address(item, "mDNS interface address") for item in interfaces]
        if not self.interfaces:
            raise ConfigError("no mDNS interface address to announce on")
        self._zc: AsyncZeroconf | None = None
        self._info: AsyncServiceInfo | None = None
        self._starting: asyncio.Task[None] | None = None
        self._watch: _RivalWatch | None = None
        self._announced_at = 0.0  # monotonic
        self._defending: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def build_info(self) -> AsyncServiceInfo:
        """The zeroconf service record set for this announcement."""
        item = self.announcement
        try:
            return AsyncServiceInfo(
                SERVICE_TYPE, item.service_name(), port=item.port, properties=item.txt(),
                server=item.server_name(), parsed_addresses=list(item.addresses or self.interfaces))
        except BadTypeInNameException as exc:
            raise ConfigError(f"cannot announce node {item.node!r}: {exc}") from None

    async def start(self) -> None:
        """Probe for the name and announce it; ConfigError on a name clash or a bad address."""
        if self._zc is not None or self._starting is not None:
            raise RuntimeError("announcer already started")
        info = self.build_info()
        self._starting = asyncio.current_task()
        try:
            await self._register(info)
        finally:
            self._starting = None

    async def _register(self, info: AsyncServiceInfo) -> None:
        """Open the sockets, check the name is free, announce; any failure closes what was
        opened."""
        where = ", ".join(self.interfaces)
        began = time.monotonic()
        try:
            self._zc = AsyncZeroconf(interfaces=list(self.interfaces))
        except OSError as exc:
            raise ConfigError(f"cannot open mDNS sockets on {where}: "
                              f"{exc.strerror or exc} (is it an address of this host?)") from None
        try:
            opened = time.monotonic()
            if self.clash_check > 0 and await self._name_answered(info.name):
                raise NonUniqueNameException(info.name)
            checked = time.monotonic()
            # The name check above stands in for zeroconf's probes (the module's docstring):
            # `cooperating_responders` skips them, and with them their 1.2 s.
            announced = await self._zc.async_register_service(info, cooperating_responders=True)
            self._info = info
            self._watch_rivals()
            log.info("announcing %s (port %d) on %s: sockets %.3f s, name check %.3f s",
                     info.name, info.port, where, opened - began, checked - opened)
            await announced
            if self.conflict is not None:
                raise ConfigError(self.conflict)
        except (NonUniqueNameException, ServiceNameAlreadyRegistered):
            await self.stop()
            raise ConfigError(f"{info.name} is already announced on {where} by another agent: "
                              f"give this node a unique name") from None
        except BaseException:
            await self.stop()
            raise

    async def _name_answered(self, name: str) -> bool:
        """Does another responder answer for `name`? A one-shot query on each IPv4 interface,
        a QM query on the shared sockets when there is an IPv6 one."""
        checks = [self._one_shot_answered(name, address) for address in self.interfaces
                  if _is_ipv4(address)]
        if not all(_is_ipv4(address) for address in self.interfaces):
            checks.append(self._qm_answered(name))
        return any(await asyncio.gather(*checks))

    async def _one_shot_answered(self, name: str, address: str) -> bool:
        """Ask for `name` from a port of our own on `address`, CLASH_QUERIES times over
        `clash_check` seconds: a responder holding it answers by unicast to that port at once
        (RFC 6762 6.7), so no other mDNS stack on this host can receive the answer instead."""
        loop = asyncio.get_running_loop()
        try:
            sock = _one_shot_socket(address)
        except OSError as exc:
            raise ConfigError(f"cannot check the mDNS name on {address}: "
                              f"{exc.strerror or exc}") from None
        with sock:
            end = loop.time() + self.clash_check
            spacing = self.clash_check / CLASH_QUERIES
            send_at = loop.time()
            while (now := loop.time()) < end:
                if now >= send_at:
                    await loop.sock_sendto(sock, _name_query(name), (_MDNS_GROUP, _MDNS_PORT))
                    send_at = now + spacing
                try:
                    data, source = await asyncio.wait_for(
                        loop.sock_recvfrom(sock, _MAX_DATAGRAM), min(send_at, end) - now)
                except TimeoutError:
                    continue
                # RFC 6762 6: a response from another port than 5353 is not a responder's.
                if source[1] == _MDNS_PORT and _answers_for(data, name):
                    return True
        return False

    async def _qm_answered(self, name: str) -> bool:
        """A QM query for `name` on the shared sockets (the IPv6 fallback): the answer is
        multicast, so every stack on this host sees it, but may be held up to 1 s."""
        assert self._zc is not None
        other = AsyncServiceInfo(SERVICE_TYPE, name)
        answered = await other.async_request(self._zc.zeroconf,
                                             max(self.clash_check, CLASH_CHECK_V6_SECONDS) * 1000,
                                             question_type=DNSQuestionType.QM)
        return answered or other.port is not None

    def _watch_rivals(self) -> None:
        """Hear every mDNS response from now on, to catch another agent announcing our name."""
        assert self._zc is not None
        self._loop = asyncio.get_running_loop()
        self._announced_at = time.monotonic()
        self._watch = _RivalWatch(self._records_heard)
        zeroconf = self._zc.zeroconf
        zeroconf.async_add_listener(self._watch, None)
        # A rival that announced while we checked is in the cache only: its repeats are
        # identical packets, which zeroconf drops unread for 0.8 s. A goodbye leaves its
        # records there with a TTL of 1 s: those are gone, not rivals.
        assert self._info is not None
        heard = [record for name in (self._info.name, self._info.server or "")
                 for record in zeroconf.cache.async_entries_with_name(name.lower())
                 if record.ttl > 1]
        if heard:
            self._judge(heard)

    def _records_heard(self, records: list[DNSRecord]) -> None:
        """One response's records (zeroconf may call from its own thread: hop to our loop)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._judge, records)

    def _judge(self, records: list[DNSRecord]) -> None:
        """Another agent announces our name: within our window the one that started later
        yields; after it we keep the name. Either way the keeper announces again, so caches
        that heard the rival (or its goodbye) hold our records at the end."""
        info = self._info
        if info is None or self.conflict is not None:
            return
        rival = [record for record in records if _rivals(record, info)]
        if not rival:
            return
        live = [record for record in rival if record.ttl > 0]
        in_window = time.monotonic() - self._announced_at < CONFLICT_WINDOW_SECONDS
        if live and in_window and _own_order(info) > _rival_order(records, live, info):
            self._yield(info.name)
            return
        if live:
            log.warning("another responder announces %s%s: keeping the name, announcing it "
                        "again", info.name, "" if in_window else " (after our start window)")
        self._defend()

    def _yield(self, name: str) -> None:
        self.conflict = (f"{name} was announced at the same time by another agent that started "
                         "first: give this node a unique name")
        log.error("%s; withdrawing", self.conflict)
        if self._starting is not None:
            return  # start() is still announcing: it fails with the conflict instead
        if self.on_conflict is not None:
            self.on_conflict()
        else:
            asyncio.ensure_future(self.stop())

    def _defend(self) -> None:
        if self._defending is None or self._defending.done():
            self._defending = asyncio.ensure_future(self._announce_again())

    async def _announce_again(self) -> None:
        await asyncio.sleep(DEFEND_DELAY_SECONDS)
        if self._zc is not None and self._info is not None:
            await (await self._zc.async_update_service(self._info))

    async def stop(self) -> None:
        """Send goodbyes and close the sockets; idempotent, safe if start failed or is running
        (an unfinished start() is cancelled: it raises CancelledError to its caller)."""
        starting = self._starting
        if starting is not None and starting is not asyncio.current_task():
            starting.cancel()
            await asyncio.wait({starting})  # start() cleans up after itself when cancelled
        zc, info, watch = self._zc, self._info, self._watch
        self._zc = self._info = self._watch = None
        if self._defending is not None:
            self._defending.cancel()
        if zc is None:
            return
        if watch is not None:
            zc.zeroconf.async_remove_listener(watch)
        try:
            if info is not None:
                goodbyes = await zc.async_unregister_service(info)
                await asyncio.wait_for(goodbyes, GOODBYE_TIMEOUT)
                log.info("withdrew %s", info.name)
        except Exception:  # noqa: BLE001 - closing must still happen; the peers' TTL expires it
            log.warning("could not send mDNS goodbyes for %s", info and info.name, exc_info=True)
        finally:
            await zc.async_close()

    @property
    def running(self) -> bool:
        """True between a successful start() and stop()."""
        return self._info is not None

    async def __aenter__(self) -> Announcer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()


def _is_ipv4(address: str) -> bool:
    return ":" not in address


def _one_shot_socket(address: str) -> socket.socket:
    """A UDP socket on an ephemeral port of `address` that multicasts out of that interface."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(address))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
        sock.bind((address, 0))
    except OSError:
        sock.close()
        raise
    return sock


def _name_query(name: str) -> bytes:
    """A one-shot query for `name`'s SRV and TXT records; a fresh id each time, since
    responders drop a packet identical to one they saw within the last 0.8 s."""
    query = DNSOutgoing(0, multicast=False, id_=secrets.randbelow(0xFFFF) + 1)
    query.add_question(DNSQuestion(name, _TYPE_SRV, _CLASS_IN))
    query.add_question(DNSQuestion(name, _TYPE_TXT, _CLASS_IN))
    return query.packets()[0]


def _answers_for(data: bytes, name: str) -> bool:
    """Is `data` an mDNS response with a record for `name`? Anything else is ignored."""
    message = DNSIncoming(data)
    if not message.valid or not message.is_response():
        return False
    wanted = name.lower()
    return any(record.name.lower() == wanted for record in message.answers())


class _RivalWatch(RecordUpdateListener):
    """Hands every response's records to a callback (zeroconf's listener interface)."""

    def __init__(self, heard: Callable[[list[DNSRecord]], None]) -> None:
        super().__init__()
        self._heard = heard

    def async_update_records(self, zc: Zeroconf, now: float,
                             records: list[RecordUpdate]) -> None:
        self._heard([update.new for update in records])


def _rivals(record: DNSRecord, info: AsyncServiceInfo) -> bool:
    """Is `record` one of our names (service, host) with data that is not ours?"""
    name = record.name.lower()
    if name == info.name.lower():
        if isinstance(record, DNSService):
            return (record.port, record.server.lower()) != (info.port, (info.server or "").lower())
        if isinstance(record, DNSText):
            return record.text != info.text
    if name == (info.server or "").lower() and isinstance(record, DNSAddress):
        return record.address not in info.addresses_by_version(IPVersion.All)
    return False


def _own_order(info: AsyncServiceInfo) -> tuple[float, int, tuple[bytes, ...]]:
    """Who started first, for us: (since, port, addresses); the smaller is earlier."""
    return (_since(info.text), info.port or 0,
            tuple(sorted(info.addresses_by_version(IPVersion.All))))


def _rival_order(records: list[DNSRecord], rival: list[DNSRecord],
                 info: AsyncServiceInfo) -> tuple[float, int, tuple[bytes, ...]]:
    """The same for the rival, from one response: `since` from its TXT record for our name (a
    responder with none counts as the earliest: we yield to it), the port and addresses where
    they differ from ours, else ours."""
    name = info.name.lower()
    since = min((_since(r.text) for r in records
                 if isinstance(r, DNSText) and r.name.lower() == name), default=0.0)
    _, port, addresses = _own_order(info)
    port = next((r.port or 0 for r in rival if isinstance(r, DNSService)), port)
    theirs = tuple(sorted(r.address for r in rival if isinstance(r, DNSAddress)))
    return since, port, theirs or addresses


def _since(text: bytes) -> float:
    """The `since` of a TXT record's data (length-prefixed strings), 0.0 if none."""
    offset = 0
    while offset < len(text):
        length = text[offset]
        item = text[offset + 1:offset + 1 + length]
        offset += 1 + length
        key, _, value = item.partition(b"=")
        if key == b"since":
            try:
                return float(value)
            except ValueError:
                return 0.0
    return 0.0
