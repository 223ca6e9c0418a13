"""The controller's registration table (issue 15): what it refuses and why, with a real cluster
CA, real node certificates and real signatures. The health check is real too: nothing listens
at the address registered, so no node gets listed and each registration stays pending."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.registration import Challenges, NodeCertificates, Registrations
from marco.errors import AuthenticationError, BadRequest, PermissionDenied, TryAgain
from marco.health import HealthMonitor
from marco.nodes import Node, NodeRegistry
from marco.registration import registration_message, sign_registration
from tests.support.pki import TestPki

SECRET = b"s" * 32


class Clock:
    """A clock the test moves (challenges and registrations expire without waiting)."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return TestPki(tmp_path_factory.mktemp("registration") / "pki")


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port nothing listens on while the test runs (bound, never listening)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def table(pki: TestPki, clock: Clock, most: int = 10,
          registry: NodeRegistry | None = None) -> Registrations:
    registry = registry or NodeRegistry()
    health = HealthMonitor(registry, 1.0, keys=[SECRET], tls=pki.client_tls())
    return Registrations(registry, health.probe, NodeCertificates(pki.ca_file, pki.crl_file),
                         Challenges(SECRET, most=4 * most, clock=clock), ttl=30.0, most=most,
                         clock=clock)


def bundle(pki: TestPki, node: str) -> tuple[str, bytes]:
    out = pki.agent_bundle(node)
    return (out / "agent.pem").read_text(), (out / "agent.key").read_bytes()


def registration(nonce: str, node: str, certificate: str | None, key: bytes, port: int,
                 action: str = "register", changed: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """The body an agent sends; `changed` alters fields after signing (tampering)."""
    signature = sign_registration(key, registration_message(action, node, port, "", nonce))
    body = {"action": action, "node": node, "port": port, "address": "", "nonce": nonce,
            "certificate": certificate, "signature": signature}
    return {**body, **(changed or {})}


Register = Callable[..., dict[str, Any]]


@pytest.fixture
def register(pki: TestPki, closed_port: int) -> Callable[[Registrations], Register]:
    """`register(table)(node, certificate_of=..., **changed)`: a registration of `node` with
    a fresh challenge, signed with the key of `certificate_of`'s bundle."""
    def with_table(registrations: Registrations) -> Register:
        def send(node: str, certificate_of: str | None = None, action: str = "register",
                 changed: dict[str, Any] | None = None) -> dict[str, Any]:
            certificate, key = bundle(pki, certificate_of or node)
            nonce = registrations.challenge()["nonce"]
            body = registration(nonce, node, certificate, key, closed_port, action, changed)
            return asyncio.run(registrations.handle(body, "127.0.0.1"))
        return send
    return with_table


def test_a_node_certificate_registers_and_waits_for_its_health_check(pki, register) -> None:
    registrations = table(pki, Clock())
    answer = register(registrations)("reg-ok")
    assert answer["registered"] and answer["listed"] is False, answer
    assert "cannot check it" in answer["error"] and len(registrations) == 1
    assert registrations.registry.get("reg-ok") is None  # never listed unchecked


def test_a_registration_without_a_certificate_is_refused(pki, register) -> None:
    with pytest.raises(AuthenticationError, match="must carry the node's certificate"):
        register(table(pki, Clock()))("reg-none", changed={"certificate": None})


def test_a_certificate_of_another_node_is_refused(pki, register) -> None:
    registrations = table(pki, Clock())
    with pytest.raises(PermissionDenied, match="is node 'reg-a''s, not 'reg-b''s"):
        register(registrations)("reg-b", certificate_of="reg-a")
    assert len(registrations) == 0


def test_a_revoked_certificate_is_refused_at_once(tmp_path: Path) -> None:
    own = TestPki(tmp_path / "pki")  # a CA of its own: the revocation touches no other test
    registrations = table(own, Clock())
    certificate, key = bundle(own, "reg-revoked")

    def send() -> dict[str, Any]:
        nonce = registrations.challenge()["nonce"]
        return asyncio.run(registrations.handle(
            registration(nonce, "reg-revoked", certificate, key, 1), "127.0.0.1"))

    assert send()["registered"]
    own.revoke("reg-revoked")
    with pytest.raises(PermissionDenied, match="revoked"):
        send()


def test_certificates_that_are_not_this_clusters_node_certificates(pki,
                                                                  tmp_path: Path) -> None:
    registrations = table(pki, Clock())
    foreign = TestPki(tmp_path / "foreign")
    certificate, key = bundle(foreign, "reg-foreign")
    nonce = registrations.challenge()["nonce"]
    with pytest.raises(PermissionDenied, match="not from this cluster's CA"):
        asyncio.run(registrations.handle(registration(nonce, "reg-foreign", certificate, key, 1),
                                         "127.0.0.1"))
    client = pki.issue("reg-client", "client", out_dir=tmp_path / "client")
    nonce = registrations.challenge()["nonce"]
    body = registration(nonce, "reg-client", client.cert_file.read_text(),
                        client.key_file.read_bytes(), 1)
    with pytest.raises(PermissionDenied, match="not a node certificate"):
        asyncio.run(registrations.handle(body, "127.0.0.1"))


def test_a_signature_must_be_by_the_certificates_key_over_every_field(pki, register,
                                                                     closed_port: int) -> None:
    send = register(table(pki, Clock()))
    other_key = bundle(pki, "reg-other")[1]
    with pytest.raises(AuthenticationError, match="signature"):
        send("reg-sig", changed={"signature": sign_registration(other_key, registration_message(
            "register", "reg-sig", closed_port, "", "whatever"))})
    with pytest.raises(AuthenticationError, match="signature"):
        send("reg-sig", changed={"port": closed_port % 65535 + 1})  # not the port signed
    with pytest.raises(AuthenticationError, match="signature"):
        send("reg-sig", changed={"address": "192.0.2.7"})


def test_a_challenge_serves_once_and_expires(pki, closed_port: int) -> None:
    clock = Clock()
    registrations = table(pki, clock)
    certificate, key = bundle(pki, "reg-nonce")
    nonce = registrations.challenge()["nonce"]
    body = registration(nonce, "reg-nonce", certificate, key, closed_port)
    assert asyncio.run(registrations.handle(body, "127.0.0.1"))["registered"]
    with pytest.raises(AuthenticationError, match="used already"):
        asyncio.run(registrations.handle(body, "127.0.0.1"))
    late = registrations.challenge()["nonce"]
    clock.now += 31
    with pytest.raises(AuthenticationError, match="expired"):
        asyncio.run(registrations.handle(
            registration(late, "reg-nonce", certificate, key, closed_port), "127.0.0.1"))
    forged = f"{int(clock.now)}.00.{'0' * 32}"
    with pytest.raises(AuthenticationError, match="not this controller's"):
        asyncio.run(registrations.handle(
            registration(forged, "reg-nonce", certificate, key, closed_port), "127.0.0.1"))


def test_too_many_registrations_are_refused_and_expired_ones_make_room(pki, register) -> None:
    clock = Clock()
    registrations = table(pki, clock, most=2)
    send = register(registrations)
    send("reg-many1")
    send("reg-many2")
    with pytest.raises(TryAgain, match="holds 2 registrations"):
        send("reg-many3")
    assert send("reg-many1")["registered"]  # a renewal is no new registration
    clock.now += 31
    assert sorted(registrations.expire()) == ["reg-many1", "reg-many2"]
    assert send("reg-many3")["registered"]


def test_a_deregistration_ends_the_registration(pki, register) -> None:
    registry = NodeRegistry()
    registrations = table(pki, Clock(), registry=registry)
    send = register(registrations)
    send("reg-bye")
    # As if its health check had passed: the node is listed as registered.
    registry.upsert(Node(name="reg-bye", host="127.0.0.1", port=1, source="registered"))
    assert send("reg-bye", action="deregister") == {"registered": False}
    assert len(registrations) == 0 and registry.get("reg-bye") is None


def test_malformed_registrations_are_bad_requests(pki, register) -> None:
    send = register(table(pki, Clock()))
    for changed in ({"action": "take-over"}, {"port": 0}, {"port": "7370"},
                    {"address": "controller.example"}, {"node": ""}):
        with pytest.raises(BadRequest):
            send("reg-bad", changed=changed)


def test_used_challenges_are_bounded_and_forgotten_once_expired() -> None:
    clock = Clock()
    challenges = Challenges(SECRET, most=2, clock=clock, per_node=2)
    for node in ("a", "a", "b"):
        challenges.use(challenges.check(challenges.issue(), node), node)
    with pytest.raises(TryAgain, match="'a' registered 2 times"):
        challenges.use(challenges.check(challenges.issue(), "a"), "a")
    with pytest.raises(TryAgain, match="too many registrations at once"):
        challenges.use(challenges.check(challenges.issue(), "c"), "c")
    clock.now += 40  # the used ones have expired: no longer remembered, room again
    for node in ("c", "a", "a"):
        challenges.use(challenges.check(challenges.issue(), node), node)


def test_a_node_registering_in_a_loop_does_not_get_another_refused(pki, register) -> None:
    """One node's key (a compromised node renewing in a loop) fills only its own share of the
    used challenges: every other node still registers."""
    registrations = table(pki, Clock())
    send = register(registrations)
    accepted = 0
    with pytest.raises(TryAgain, match="'reg-loop' registered"):
        for _ in range(200):
            send("reg-loop")
            accepted += 1
    assert accepted >= 40  # an agent renewing every second within a challenge's lifetime
    for _ in range(3):
        assert send("reg-other")["registered"]
