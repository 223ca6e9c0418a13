"""The node registry's rules for announcements (pure, no network)."""

from __future__ import annotations

from marco.inventory import build_inventory, group_name
from marco.nodes import Node, NodeRegistry


def _get(registry: NodeRegistry, name: str) -> Node:
    node = registry.get(name)
    assert node is not None, f"{name} not in the registry"
    return node


def test_announcements_do_not_take_names_from_the_config_or_a_live_service() -> None:
    registry = NodeRegistry()
    registry.upsert(Node("rack1", "10.0.0.5", 7370, source="static"))
    registry.upsert(Node("web1", "10.0.0.6", 7370, service="web1._marco._tcp.local."))
    registry.upsert(Node("rack1", "10.0.0.66", 7370, service="evil._marco._tcp.local."))
    registry.upsert(Node("web1", "10.0.0.66", 7370, service="evil._marco._tcp.local."))
    assert _get(registry, "rack1").host == "10.0.0.5"
    assert _get(registry, "web1").host == "10.0.0.6"
    # A dead holder's name may be taken by another (verified) service.
    registry.set_health("web1", False, "gone")
    registry.upsert(Node("web1", "10.0.0.7", 7370, service="web1-new._marco._tcp.local."))
    assert _get(registry, "web1").host == "10.0.0.7" and _get(registry, "web1").alive


def test_a_renamed_service_drops_its_old_name() -> None:
    registry = NodeRegistry()
    registry.upsert(Node("old", "10.0.0.6", 7370, service="s._marco._tcp.local."))
    registry.upsert(Node("new", "10.0.0.6", 7370, service="s._marco._tcp.local."))
    assert registry.get("old") is None and registry.get("new") is not None


def test_reserved_group_names_are_renamed() -> None:
    for raw in ("-meta", "_meta", "all", "ungrouped"):
        assert group_name(raw) not in {"_meta", "all", "ungrouped"}
    node = Node("evil", "10.0.0.9", 7370, txt={"groups": "-meta,web"})
    inventory = build_inventory([node])
    assert inventory["_meta"]["hostvars"]["evil"]["ansible_connection"] == "marco.fleet.marco"
    assert "evil" in inventory["web"]["hosts"]


def test_announced_keys_never_steer_the_connection() -> None:
    """A machine on the LAN announces whatever it likes: only descriptive facts become host
    variables; address, node name and TLS come from what the controller checked."""
    txt = {"node": "web1", "os": "debian", "groups": "web", "tls": "0", "host": "203.0.113.9",
           "node ": "evil", "token_file": "/etc/shadow", "tls_ca": "/tmp/x", "port": "1"}
    node = Node(name="web1", host="192.0.2.10", port=7370, txt=txt)
    variables = build_inventory([node])["_meta"]["hostvars"]["web1"]
    assert variables["ansible_host"] == "192.0.2.10" and variables["ansible_port"] == 7370
    assert variables["marco_node"] == "web1" and variables["marco_tls"] is True
    assert variables["marco_os"] == "debian" and variables["marco_groups"] == "web"
    assert not {"marco_host", "marco_token_file", "marco_tls_ca", "marco_port"} & set(variables)
    assert build_inventory([node], tls=False)["_meta"]["hostvars"]["web1"]["marco_tls"] is False


def test_plain_http_only_to_loopback() -> None:
    import pytest

    from marco.credentials import node_tls
    from marco.errors import ConfigError

    assert node_tls(False, "127.0.0.1") is None and node_tls(False, "::1") is None
    with pytest.raises(ConfigError, match="refusing plain HTTP to 192.0.2.10"):
        node_tls(False, "192.0.2.10")


def test_nodes_are_listed_in_natural_order() -> None:
    """sc2 before sc10, whatever order they came in: every listing built on the registry
    (inventory, the node API, the page) starts from this order."""
    registry = NodeRegistry()
    for name in ("sc10", "sc2", "sc1", "Sc3"):
        registry.upsert(Node(name=name, host="127.0.0.1", port=1, source="static"))
    assert [node.name for node in registry.all()] == ["sc1", "sc2", "Sc3", "sc10"]
