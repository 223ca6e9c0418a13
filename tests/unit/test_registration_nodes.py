"""The node registry's rules for registered agents (issue 15): one take-over rule for
announced and registered names, and registrations that end."""

from __future__ import annotations

from marco.nodes import Node, NodeRegistry, parse_static_node


def registered(name: str, host: str = "10.0.0.5", port: int = 7370) -> Node:
    return Node(name=name, host=host, port=port, source="registered")


def announced(name: str, service: str, host: str = "10.0.0.6") -> Node:
    return Node(name=name, host=host, port=7370, source="mdns", service=service)


def test_a_registered_name_never_takes_a_static_or_live_announced_one() -> None:
    registry = NodeRegistry()
    registry.upsert(parse_static_node("rack=10.0.0.1:7370"))
    registry.upsert(announced("lan", "lan._marco._tcp.local."))
    assert registry.upsert(registered("rack")).source == "static"
    assert registry.upsert(registered("lan")).source == "mdns"
    assert registry.get("rack").host == "10.0.0.1" and registry.get("lan").host == "10.0.0.6"  # type: ignore[union-attr]
    registry.set_health("rack", False, "unreachable")  # a static name stays even when down
    assert registry.upsert(registered("rack")).source == "static"


def test_an_announcement_never_takes_a_live_registered_name() -> None:
    registry = NodeRegistry()
    registry.upsert(registered("far"))
    assert registry.upsert(announced("far", "far._marco._tcp.local.")).source == "registered"


def test_a_down_node_is_taken_over_the_other_way_in() -> None:
    registry = NodeRegistry()
    registry.upsert(announced("moved", "moved._marco._tcp.local."))
    registry.set_health("moved", False, "unreachable")
    node = registry.upsert(registered("moved", host="192.0.2.9"))
    assert (node.source, node.service, node.host, node.alive) == (
        "registered", None, "192.0.2.9", True)
    # Its old announcement's goodbye no longer removes it.
    registry.remove_service("moved._marco._tcp.local.")
    assert registry.get("moved") is not None


def test_a_registered_node_moves_and_is_removed_by_its_own_source_only() -> None:
    registry = NodeRegistry()
    registry.upsert(registered("far"))
    assert registry.upsert(registered("far", host="10.9.9.9")).host == "10.9.9.9"
    registry.upsert(announced("lan", "lan._marco._tcp.local."))
    assert not registry.remove("lan", "registered")  # an announced node is not a registration
    assert registry.get("lan") is not None
    assert registry.remove("far", "registered") and registry.get("far") is None


def test_a_registered_node_takes_its_facts_from_its_health_answer() -> None:
    registry = NodeRegistry()
    registry.upsert(registered("far"))
    registry.set_health("far", True, details={"node": "far", "groups": "lab,web", "os": "linux"})
    assert registry.get("far").summary()["groups"] == ["lab", "web"]  # type: ignore[union-attr]
