"""Pure: the live nodes -> Ansible's dynamic inventory JSON (`--list` and `--host`)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Protocol

_GROUP_UNSAFE = re.compile(r"[^A-Za-z0-9_]")
_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple[tuple[str | int, ...], str]:
    """Sorts names as people count: sc2 before sc10 (runs of digits compare as numbers; split
    on them, text and numbers alternate, so each place holds one type), then by the name."""
    parts = _DIGITS.split(name)
    return tuple(int(p) if i % 2 else p.casefold() for i, p in enumerate(parts)), name


class InventoryNode(Protocol):
    name: str
    host: str
    port: int
    txt: dict[str, str]


RESERVED_GROUPS = {"_meta", "all", "ungrouped"}

#: The connection plugin every node is reached through (the collection marco.fleet).
CONNECTION = "marco.fleet.marco"

#: The announced facts that become `marco_*` host variables. Only descriptive ones: anything
#: that steers the connection (address, port, node name, TLS, token, files) is set here from
#: what the controller checked, never from what a machine on the LAN announced.
ANNOUNCED_FACTS = ("os", "arch", "cpus", "groups", "version", "proto")


def group_name(raw: str) -> str:
    """A valid Ansible group name (letters, digits, underscores; not starting with a digit),
    never one of the names the inventory format reserves (a node could announce `-meta`)."""
    name = _GROUP_UNSAFE.sub("_", raw.strip())
    name = f"_{name}" if name[:1].isdigit() else name
    return f"group{name}" if name in RESERVED_GROUPS else name


def host_vars(node: InventoryNode, tls: bool = True) -> dict[str, Any]:
    """One host's variables. `tls` is the inventory source's own mode (mutual TLS unless it
    runs in --dev), whatever the node announced."""
    variables: dict[str, Any] = {"ansible_host": node.host, "ansible_port": node.port,
                                 "ansible_connection": CONNECTION, "marco_node": node.name,
                                 "marco_tls": tls}
    for key in ANNOUNCED_FACTS:
        if key in node.txt:
            variables[f"marco_{key}"] = node.txt[key]
    return variables


def node_groups(node: InventoryNode) -> list[str]:
    groups = [g for g in (node.txt.get("groups") or "").split(",") if g.strip()]
    if node.txt.get("os"):
        groups.append(node.txt["os"])
    return [group_name(g) for g in groups if group_name(g)]


def build_inventory(nodes: Iterable[InventoryNode], tls: bool = True) -> dict[str, Any]:
    """The `--list` JSON: `all`, one group per TXT group and per OS, `_meta.hostvars`."""
    hostvars: dict[str, dict[str, Any]] = {}
    groups: dict[str, list[str]] = {}
    for node in sorted(nodes, key=lambda n: natural_key(n.name)):
        hostvars[node.name] = host_vars(node, tls)
        for group in node_groups(node):
            groups.setdefault(group, []).append(node.name)
    inventory: dict[str, Any] = {
        "_meta": {"hostvars": hostvars},
        "all": {"hosts": list(hostvars), "children": sorted(groups, key=natural_key)},
    }
    for group, hosts in sorted(groups.items(), key=lambda item: natural_key(item[0])):
        inventory[group] = {"hosts": hosts}
    return inventory
