"""The controller's health checks: an agent that does not answer is down only after
`health_failures` checks in a row; a wrong answer downs it at the first check."""

from __future__ import annotations

import asyncio
import socket

from marco.health import HealthMonitor
from marco.nodes import NodeRegistry, parse_static_node
from tests.support.agent_process import AgentProcess
from tests.support.pki import TestPki


def checked(monitor: HealthMonitor, registry: NodeRegistry, name: str, times: int) -> list[bool]:
    """Whether the node is alive after each of `times` checks."""
    seen = []
    for _ in range(times):
        node = registry.get(name)
        assert node is not None
        asyncio.run(monitor.check(node))
        seen.append(node.alive)
    return seen


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
