"""The controller's health checks: an agent that does not answer is down only after
`health_failures` checks in a row; a wrong answer downs it at the first check. A node's checks
share one kept connection, each with a fresh challenge; a new CRL ends it."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path

import psutil

from marco.health import HealthMonitor
from marco.nodes import NodeRegistry, parse_static_node
from marco.tokens import load_secret
from tests.support.agent_process import AgentProcess
from tests.support.pki import TestPki


def checked(monitor: HealthMonitor, registry: NodeRegistry, name: str, times: int,
            between: Callable[[int], None] | None = None) -> list[bool]:
    """Whether the node is alive after each of `times` checks (one event loop, as in the
    controller); `between(i)` runs before check i."""
    async def checks() -> list[bool]:
        seen = []
        try:
            for index in range(times):
                if between is not None:
                    between(index)
                node = registry.get(name)
                assert node is not None
                await monitor.check(node)
                seen.append(node.alive)
        finally:
            monitor.stop()
        return seen
    return asyncio.run(checks())


def connections_to(port: int) -> set[int]:
    """This process's open TCP connections to `port` on loopback, by local port."""
    return {c.laddr.port for c in psutil.Process().net_connections("tcp")
            if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED}


def test_a_silent_node_is_down_after_failures_checks_in_a_row() -> None:
    with socket.socket() as closed:  # bound, never listening: every connection is refused
        closed.bind(("127.0.0.1", 0))
        registry = NodeRegistry()
        registry.upsert(parse_static_node(f"quiet=127.0.0.1:{closed.getsockname()[1]}"))
        registry.set_health("quiet", True)  # it was up
        assert checked(HealthMonitor(registry, 1, failures=3), registry, "quiet", 3) == \
            [True, True, False]
        registry.set_health("quiet", True)
        assert checked(HealthMonitor(registry, 1, failures=1), registry, "quiet", 1) == [False]


def test_an_answer_resets_the_count_and_a_wrong_answer_downs_at_once(
        shared_agent: AgentProcess, pki: TestPki) -> None:
    registry = NodeRegistry()
    registry.upsert(parse_static_node(f"shared={shared_agent.host}:{shared_agent.port}"))
    registry.upsert(parse_static_node(f"impostor={shared_agent.host}:{shared_agent.port}"))
    monitor = HealthMonitor(registry, 1, tls=pki.client_tls(), failures=3)
    node = registry.get("shared")
    assert node is not None
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        for _ in range(2):  # two misses, an answer, two misses: never three in a row
            node.port = closed.getsockname()[1]
            assert checked(monitor, registry, "shared", 2) == [True, True]
            node.port = shared_agent.port
            assert checked(monitor, registry, "shared", 1) == [True]
    # The agent's certificate names `shared`, not `impostor`: refused, down at the first check.
    registry.set_health("impostor", True)
    assert checked(monitor, registry, "impostor", 1) == [False]


def test_a_nodes_checks_share_one_connection_each_with_its_own_proof(
        shared_agent: AgentProcess, pki: TestPki, secret_file: Path) -> None:
    registry = NodeRegistry()
    node = registry.upsert(parse_static_node(f"shared={shared_agent.host}:{shared_agent.port}"))
    keys = load_secret(secret_file)

    async def probes(max_age: float) -> tuple[list[set[int]], set[str]]:
        monitor = HealthMonitor(registry, 1, keys=keys, tls=pki.client_tls(),
                                connection_max_age=max_age)
        before = connections_to(shared_agent.port)
        used, proofs = [], set()
        try:
            for _ in range(5):
                probe = await monitor.probe(node, keep=True)
                assert probe.alive, probe.error
                assert probe.details is not None
                proofs.add(probe.details["proof"])
                await asyncio.sleep(0)  # an aborted socket closes on the loop's next turn
                used.append(connections_to(shared_agent.port) - before)
        finally:
            monitor.stop()
        return used, proofs

    used, proofs = asyncio.run(probes(300))
    assert len(used[0]) == 1 and all(ports == used[0] for ports in used), used
    assert len(proofs) == 5  # a fresh challenge, so a fresh proof, on every check
    # connection_max_age 0: a connection per check, none left open after it.
    used, proofs = asyncio.run(probes(0))
    assert used == [set()] * 5 and len(proofs) == 5


def test_a_new_crl_ends_the_kept_connection_of_a_revoked_agent(
        start_agent: Callable[..., AgentProcess], tmp_path: Path, secret_file: Path) -> None:
    own = TestPki(tmp_path / "pki")  # revoking must not touch the session's CA
    agent = start_agent("revoked-soon", pki=own)
    registry = NodeRegistry()
    registry.upsert(parse_static_node(f"revoked-soon={agent.host}:{agent.port}"))
    monitor = HealthMonitor(registry, 1, keys=load_secret(secret_file), tls=own.client_tls())
    kept: list[int] = []

    def between(index: int) -> None:
        kept.append(monitor.kept_connections)
        if index == 2:
            own.revoke("revoked-soon")  # the controller's CRL file changes

    assert checked(monitor, registry, "revoked-soon", 3, between) == [True, True, False]
    assert kept == [0, 1, 1]
    node = registry.get("revoked-soon")
    assert node is not None and node.error is not None
    assert "revoked" in node.error, node.error


def test_checks_in_flight_are_bounded_by_at_once() -> None:
    """A round of checks over many nodes keeps at most `at_once` in flight (a thousand first
    checks at once, each a TLS handshake, time out on a busy host and down healthy nodes);
    every node is still checked in the round."""
    async def round_of_checks() -> tuple[int, int, list[bool]]:
        open_now, peak, accepted = 0, 0, 0

        async def slow_silence(reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
            nonlocal open_now, peak, accepted
            open_now, accepted = open_now + 1, accepted + 1
            peak = max(peak, open_now)
            await asyncio.sleep(0.05)  # then hang up unanswered: a check that got no answer
            open_now -= 1
            writer.close()

        server = await asyncio.start_server(slow_silence, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        registry = NodeRegistry()
        for index in range(12):
            registry.upsert(parse_static_node(f"n{index}=127.0.0.1:{port}"))
        monitor = HealthMonitor(registry, 1, failures=1, at_once=3)
        try:
            await monitor.check_all()
        finally:
            monitor.stop()
            server.close()
        return peak, accepted, [node.alive for node in registry.all()]

    peak, accepted, alive = asyncio.run(round_of_checks())
    assert accepted >= 12 and not any(alive)  # every node was checked (and got no answer)
    assert 1 <= peak <= 3, peak
