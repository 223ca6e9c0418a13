"""Announce this agent on the LAN by zeroconf (mDNS / DNS-SD), on chosen interfaces only.

`choose_mdns_interfaces` (marco.protocol, shared with the controller's browser) decides where to
announce (never every network by default), `Announcement` says what (the `_marco._tcp.local.`
service and its TXT record), and `Announcer`
registers it and withdraws it with goodbye packets. The agent's `main()` owns the signal
handlers: on SIGTERM/SIGINT it awaits `Announcer.stop()` (or leaves `async with Announcer(...)`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import re
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

from zeroconf import (
    BadTypeInNameException,
    DNSQuestionType,
    NonUniqueNameException,
    ServiceNameAlreadyRegistered,
)
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from marco import __version__
from marco.errors import ConfigError
from marco.protocol import PROTOCOL_VERSION, SERVICE_TYPE, specific_address

log = logging.getLogger(__name__)

#: Longest wait for the goodbye packets on stop (zeroconf sends three, 125 ms apart).
GOODBYE_TIMEOUT = 5.0
#: Default seconds to listen for another owner of our name before probing. A responder that
#: multicast its records in the last second may hold its answer for up to 1 s (RFC 6762 6).
CLASH_CHECK_SECONDS = 0.5

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
        """The TXT record: proto, version, node, os, arch, cpus, groups (comma-joined), tls."""
        txt = {
            "proto": str(PROTOCOL_VERSION),
            "version": __version__,
            "node": self.node,
            "os": _os_id(),
            "arch": platform.machine().lower() or "unknown",
            "cpus": str(os.cpu_count() or 1),
            "groups": ",".join(self.groups),
            "tls": "1" if self.tls else "0",
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
                 clash_check: float = CLASH_CHECK_SECONDS) -> None:
        self.announcement = announcement
        self.clash_check = clash_check  # seconds; 0 trusts zeroconf's own (QU) probes alone
        self.interfaces = [specific_address(item, "mDNS interface address") for item in interfaces]
        if not self.interfaces:
            raise ConfigError("no mDNS interface address to announce on")
        self._zc: AsyncZeroconf | None = None
        self._info: AsyncServiceInfo | None = None
        self._starting: asyncio.Task[None] | None = None

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
        """Open the sockets, probe, announce; any failure closes what was opened."""
        where = ", ".join(self.interfaces)
        try:
            self._zc = AsyncZeroconf(interfaces=list(self.interfaces))
        except OSError as exc:
            raise ConfigError(f"cannot open mDNS sockets on {where}: "
                              f"{exc.strerror or exc} (is it an address of this host?)") from None
        try:
            if self.clash_check > 0 and await self._name_answered(info.name):
                raise NonUniqueNameException(info.name)
            announced = await self._zc.async_register_service(info)
            self._info = info
            await announced
        except (NonUniqueNameException, ServiceNameAlreadyRegistered):
            await self.stop()
            raise ConfigError(f"{info.name} is already announced on {where} by another agent: "
                              f"give this node a unique name") from None
        except BaseException:
            await self.stop()
            raise
        log.info("announcing %s (port %d) on %s", info.name, info.port, where)

    async def _name_answered(self, name: str) -> bool:
        """Does another responder answer a QM query for `name`? zeroconf's probes are QU: the
        answer is unicast to UDP 5353 here, which any other mDNS stack on this host (avahi,
        the controller, a second agent) may receive instead, so a clash would go unnoticed."""
        assert self._zc is not None
        other = AsyncServiceInfo(SERVICE_TYPE, name)
        answered = await other.async_request(self._zc.zeroconf, self.clash_check * 1000,
                                             question_type=DNSQuestionType.QM)
        return answered or other.port is not None

    async def stop(self) -> None:
        """Send goodbyes and close the sockets; idempotent, safe if start failed or is running
        (an unfinished start() is cancelled: it raises CancelledError to its caller)."""
        starting = self._starting
        if starting is not None and starting is not asyncio.current_task():
            starting.cancel()
            await asyncio.wait({starting})  # start() cleans up after itself when cancelled
        zc, info = self._zc, self._info
        self._zc = self._info = None
        if zc is None:
            return
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
