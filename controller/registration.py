"""Agents that register themselves (issue 15): `marco-agent --controller URL` where mDNS does
not reach (other subnets, networks that block multicast).

A registration is accepted only with a fresh challenge of this controller, a node certificate
of the cluster (issued by its CA, valid now, OU=agent, not revoked by its CRL) naming the node
registered, and a signature by that certificate's key (marco.registration). The node is then
listed only after the same health check as an announced one: mutual TLS pinned to its name and
the proof of the cluster secret. The address is the one the registration came from, unless the
agent names one (an IP address): across routers the controller reaches an agent where its
packets come from, and an agent behind NAT or a proxy knows better.

A registration lasts `registration_ttl` seconds unless renewed, and ends at once when the agent
deregisters (it stops); at most `registration_max` are held. A registered name never takes over
a static node's or another live node's (NodeRegistry.upsert).
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import ipaddress
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tornado.web
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from marco.errors import (
    AuthenticationError,
    BadRequest,
    PayloadTooLarge,
    PermissionDenied,
    TryAgain,
)
from marco.health import Probe
from marco.jsonapi import JsonApiMixin
from marco.nodes import STATIC_FACTS, Node, NodeRegistry
from marco.protocol import decode
from marco.registration import ACTIONS, MAX_BODY, registration_message, signature_valid
from marco.tls import file_stamps

log = logging.getLogger(__name__)

SOURCE = "registered"
CHALLENGE_SECONDS = 30  # a challenge's lifetime: one exchange, with slack for a slow link
CLOCK_SKEW = 2  # seconds a challenge may come from the future (two controllers' clocks)
LIFETIME = CHALLENGE_SECONDS + CLOCK_SKEW  # seconds a used challenge is remembered
# Registrations one node may make within LIFETIME: an agent renewing every second (the
# fastest the tests use) with its jitter, and a few retries, stay under it.
PER_NODE = 48


class NodeCertificates:
    """Checks the node certificate a registration carries against the cluster's CA and CRL
    (both read again when their files change: a revocation applies at once)."""

    def __init__(self, ca_file: Path, crl_file: Path) -> None:
        self.ca_file, self.crl_file = ca_file, crl_file
        self._stamp: tuple[float, ...] = ()
        self._ca: x509.Certificate | None = None
        self._crl: x509.CertificateRevocationList | None = None

    def _load(self) -> tuple[x509.Certificate, x509.CertificateRevocationList | None]:
        stamp = file_stamps(self.ca_file, self.crl_file)
        if stamp != self._stamp or self._ca is None:
            self._ca = x509.load_pem_x509_certificate(self.ca_file.read_bytes())
            self._crl = (x509.load_pem_x509_crl(self.crl_file.read_bytes())
                         if self.crl_file.exists() else None)
            self._stamp = stamp
        return self._ca, self._crl

    def check(self, pem: object, node: str) -> x509.Certificate:
        """The certificate if it is node `node`'s, else the refusal saying why."""
        if not isinstance(pem, str) or not pem.strip():
            raise AuthenticationError("a registration must carry the node's certificate",
                                      hint="the agent sends its --tls-cert (agent.pem)")
        try:
            certificate = x509.load_pem_x509_certificate(pem.encode())
        except ValueError:
            raise AuthenticationError("'certificate' is not a PEM certificate") from None
        ca, crl = self._load()
        try:
            certificate.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            raise PermissionDenied("the certificate is not from this cluster's CA") from None
        now = datetime.datetime.now(datetime.UTC)
        if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
            raise PermissionDenied(f"the certificate of {node!r} is expired or not yet valid",
                                   hint="reissue it: marco-controller issue-agent NODE")
        if _subject(certificate, NameOID.ORGANIZATIONAL_UNIT_NAME) != "agent":
            raise PermissionDenied("not a node certificate (only OU=agent registers)")
        named = _subject(certificate, NameOID.COMMON_NAME)
        if named != node:
            raise PermissionDenied(f"the certificate is node {named!r}'s, not {node!r}'s")
        if crl is not None and crl.get_revoked_certificate_by_serial_number(
                certificate.serial_number) is not None:
            raise PermissionDenied(f"the certificate of {node!r} is revoked")
        return certificate


def _subject(certificate: x509.Certificate, oid: x509.ObjectIdentifier) -> str | None:
    values = certificate.subject.get_attributes_for_oid(oid)
    return str(values[0].value) if len(values) == 1 else None


class Challenges:
    """Fresh challenges without state: the time, a random part and an HMAC of both under a key
    derived from the cluster secret (two controllers accept each other's). A challenge serves
    one registration: the ones used are remembered by node name until they expire, at most
    `per_node` for one name (a node renewing in a loop is refused, no other) and `most` names
    (every registered node renewing, and as many deregistering or refused, fit)."""

    def __init__(self, key: bytes, most: int, clock: Callable[[], float] = time.time,
                 per_node: int = PER_NODE) -> None:
        self._key = hmac.new(key, b"marco-registration-challenge", hashlib.sha256).digest()
        self.most, self.per_node, self._clock = most, per_node, clock
        # Node name: its used challenges, each with when it may be forgotten (one lifetime for
        # all: the oldest go first). Names in the order of their last use, so the names whose
        # challenges all expired are the first ones.
        self._used: dict[str, dict[str, float]] = {}

    def _mac(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()[:32]

    def issue(self) -> str:
        text = f"{int(self._clock())}.{secrets.token_hex(8)}"
        return f"{text}.{self._mac(text)}"

    def check(self, nonce: object, node: str) -> str:
        """The challenge if this controller made it recently and `node` did not use it yet
        (a replay is the same node's: the signature covers the name)."""
        stamp_text, _, rest = str(nonce).partition(".")
        random_part, _, mac = rest.partition(".")
        fresh = False
        if isinstance(nonce, str) and stamp_text.isdigit() and hmac.compare_digest(
                self._mac(f"{stamp_text}.{random_part}"), mac):
            age = self._clock() - int(stamp_text)
            fresh = -CLOCK_SKEW <= age <= CHALLENGE_SECONDS
        if not fresh:
            raise AuthenticationError("the challenge is not this controller's or has expired",
                                      hint="ask GET /api/register for a new one")
        if nonce in self._used.get(node, {}):
            raise AuthenticationError("the challenge was used already")
        return str(nonce)

    def _forget_expired(self, now: float) -> None:
        """Drop the names whose newest used challenge expired (oldest names first)."""
        while self._used:
            name, used = next(iter(self._used.items()))
            if next(reversed(used.values())) > now:
                return
            del self._used[name]

    def use(self, nonce: str, node: str) -> None:
        """Remember a challenge `node` used (refused again until it expires); TryAgain when
        that node registers too often, or too many nodes register at once."""
        now = self._clock()
        self._forget_expired(now)
        used = self._used.get(node, {})
        while used and next(iter(used.values())) <= now:
            del used[next(iter(used))]
        if len(used) >= self.per_node:
            log.warning("refusing a registration of %s: %d within %d s", node, len(used),
                        LIFETIME)
            raise TryAgain(f"node {node!r} registered {len(used)} times within {LIFETIME} s; "
                           "try again in a moment")
        if node not in self._used and len(self._used) >= self.most:
            raise TryAgain("too many registrations at once; try again in a moment")
        used[nonce] = now + LIFETIME
        self._used.pop(node, None)
        self._used[node] = used  # last used now: the end of the order


@dataclass
class Registration:
    """One registered agent: where it said it is and until when (monotonic seconds)."""

    name: str
    host: str
    port: int
    expires: float


@dataclass(frozen=True)
class RegistrationRequest:
    """A registration's fields, checked for shape (not yet for authenticity)."""

    action: str
    node: str
    port: int
    address: str
    nonce: object
    certificate: object
    signature: object

    @classmethod
    def parse(cls, body: Any) -> RegistrationRequest:
        if not isinstance(body, dict):
            raise BadRequest("expected a JSON object")
        action, node, port = body.get("action", "register"), body.get("node"), body.get("port")
        address = body.get("address") or ""
        if action not in ACTIONS:
            raise BadRequest(f"'action' must be one of {', '.join(ACTIONS)}")
        if not isinstance(node, str) or not 0 < len(node) <= 253:
            raise BadRequest("'node' must be the node's name")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise BadRequest("'port' must be the agent's TCP port")
        if not isinstance(address, str):
            raise BadRequest("'address' must be an IP address")
        if address:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise BadRequest("'address' must be an IP address (not a name)") from None
        return cls(action, node, port, address, body.get("nonce"), body.get("certificate"),
                   body.get("signature"))

    def message(self) -> bytes:
        return registration_message(self.action, self.node, self.port, self.address,
                                    str(self.nonce))


class Registrations:
    """The registered agents by name: bounded, expiring, listed once they pass the check."""

    def __init__(self, registry: NodeRegistry, probe: Callable[[Node], Awaitable[Probe]],
                 certificates: NodeCertificates, challenges: Challenges, ttl: float,
                 most: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry, self.probe = registry, probe
        self.certificates, self.challenges = certificates, challenges
        self.ttl, self.most, self._clock = ttl, most, clock
        self._entries: dict[str, Registration] = {}
        self._checking: set[str] = set()  # names whose health check runs now
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def challenge(self) -> dict[str, Any]:
        return {"nonce": self.challenges.issue(), "ttl": self.ttl}

    async def handle(self, body: Any, source: str) -> dict[str, Any]:
        """One registration or deregistration, authenticated, from the address `source`."""
        request = RegistrationRequest.parse(body)
        nonce = self.challenges.check(request.nonce, request.node)
        certificate = self.certificates.check(request.certificate, request.node)
        if not signature_valid(certificate, request.message(), request.signature):
            raise AuthenticationError("the signature is not by the certificate's key")
        self.challenges.use(nonce, request.node)
        if request.action == "deregister":
            self.deregister(request.node)
            return {"registered": False}
        return await self.register(request.node, request.address or source, request.port)

    async def register(self, name: str, host: str, port: int) -> dict[str, Any]:
        """Hold (or renew) the registration and list the node once it passes the check."""
        if name not in self._entries and len(self._entries) >= self.most:
            log.warning("refusing the registration of %s: %d held (registration_max)", name,
                        len(self._entries))
            raise TryAgain(f"the controller holds {self.most} registrations already")
        known = self.registry.get(name)
        moved = name in self._entries and (self._entries[name].host,
                                           self._entries[name].port) != (host, port)
        if name not in self._entries or moved:
            log.info("%s registers at %s:%d", name, host, port)
        self._entries[name] = Registration(name, host, port, self._clock() + self.ttl)
        if self._task is None or self._task.done():
            self.start()  # the expiry sweep runs on the loop that serves registrations
        answer: dict[str, Any] = {"registered": True, "ttl": self.ttl, "address": host}
        if known is not None and known.alive and (known.host, known.port) == (host, port):
            known.last_seen = time.time() if known.source == SOURCE else known.last_seen
            return {**answer, "listed": True, "as": known.source}
        if name in self._checking:
            return {**answer, "listed": False, "error": "its health check is under way"}
        error = await self._check_and_list(name, host, port)
        return {**answer, "listed": error is None, **({"error": error} if error else {})}

    async def _check_and_list(self, name: str, host: str, port: int) -> str | None:
        """The health check with the secret proof, then the listing; the reason if not."""
        self._checking.add(name)
        try:
            probe = await self.probe(Node(name=name, host=host, port=port, source=SOURCE))
        finally:
            self._checking.discard(name)
        details = probe.details or {}
        if probe.alive and details.get("node") != name:
            probe = Probe(False, f"the agent at {host}:{port} is {details.get('node')!r}")
        if not probe.alive:
            log.warning("registered node %s at %s:%d fails its health check: %s", name, host,
                        port, probe.error)
            return f"the controller cannot check it at {host}:{port}: {probe.error}"
        entry = self._entries.get(name)
        if entry is None or (entry.host, entry.port) != (host, port):
            return "the registration ended or moved during its health check"
        txt = {key: str(details[key]) for key in STATIC_FACTS if key in details}
        node = self.registry.upsert(Node(name=name, host=host, port=port, txt=txt,
                                         source=SOURCE))
        if node.source != SOURCE or (node.host, node.port) != (host, port):
            return f"the name {name!r} is held by another live node ({node.source})"
        return None

    def deregister(self, name: str) -> None:
        """The agent stops: forget it at once."""
        if self._entries.pop(name, None) is not None:
            log.info("%s deregistered", name)
        self.registry.remove(name, SOURCE)

    def expire(self) -> list[str]:
        """Drop the registrations not renewed in time; their names."""
        now = self._clock()
        gone = [name for name, entry in self._entries.items() if entry.expires <= now]
        for name in gone:
            del self._entries[name]
            log.info("the registration of %s expired (not renewed within %g s)", name, self.ttl)
            self.registry.remove(name, SOURCE)
        return gone

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._sweep())

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.ttl / 4))
            self.expire()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


class RegisterApi(JsonApiMixin, tornado.web.RequestHandler):
    """GET /api/register: a fresh challenge. POST /api/register: register, renew or
    deregister (marco.registration), authenticated by the node's certificate and signature."""

    service_name = "controller"

    def initialize(self, registrations: Registrations | None) -> None:
        self.registrations = registrations

    def check_xsrf_cookie(self) -> None:
        pass  # no cookie is involved: the node's signature authenticates the request

    def prepare(self) -> None:
        if self.registrations is None:
            raise PermissionDenied("this controller does not accept registrations",
                                   hint="it runs with --no-registration or in --dev mode")

    def get(self) -> None:
        assert self.registrations is not None
        self.set_header("Cache-Control", "no-store")
        self.write_json(self.registrations.challenge())

    async def post(self) -> None:
        assert self.registrations is not None
        if len(self.request.body) > MAX_BODY:
            raise PayloadTooLarge(f"a registration is at most {MAX_BODY} bytes")
        try:
            body = decode(self.request.body or b"null")
        except ValueError:
            raise BadRequest("body is not valid JSON") from None
        source = self.request.remote_ip or ""
        self.write_json(await self.registrations.handle(body, source))
