"""Pure: the live nodes -> Ansible's dynamic inventory JSON (`--list` and `--host`)."""

from __future__ import annotations

import re
from typing import Any, Iterable, Protocol

_GROUP_UNSAFE = re.compile(r"[^A-Za-z0-9_]")


class InventoryNode(Protocol):
    name: str
    host: str
    port: int
    txt: dict[str, str]


RESERVED_GROUPS = {"_meta", "all", "ungrouped"}


def group_name(raw: str) -> str:
    """A valid Ansible group name (letters, digits, underscores; not starting with a digit),
    never one of the names the inventory format reserves (a node could announce `-meta`)."""
    name = _GROUP_UNSAFE.sub("_", raw.strip())
    name = f"_{name}" if name[:1].isdigit() else name
    return f"group{name}" if name in RESERVED_GROUPS else name


def host_vars(node: InventoryNode) -> dict[str, Any]:
    variables: dict[str, Any] = {"ansible_host": node.host, "ansible_port": node.port,
                                 "ansible_connection": "marco"}
    for key, value in sorted(node.txt.items()):
        variables[f"marco_{group_name(key)}"] = value
    return variables


def node_groups(node: InventoryNode) -> list[str]:
    groups = [g for g in (node.txt.get("groups") or "").split(",") if g.strip()]
    if node.txt.get("os"):
        groups.append(node.txt["os"])
    return [group_name(g) for g in groups if group_name(g)]


def build_inventory(nodes: Iterable[InventoryNode]) -> dict[str, Any]:
    """The `--list` JSON: `all`, one group per TXT group and per OS, `_meta.hostvars`."""
    hostvars: dict[str, dict[str, Any]] = {}
    groups: dict[str, list[str]] = {}
    for node in sorted(nodes, key=lambda n: n.name):
        hostvars[node.name] = host_vars(node)
        for group in node_groups(node):
            groups.setdefault(group, []).append(node.name)
    inventory: dict[str, Any] = {
        "_meta": {"hostvars": hostvars},
        "all": {"hosts": sorted(hostvars), "children": sorted(groups)},
    }
    for group, hosts in sorted(groups.items()):
        inventory[group] = {"hosts": hosts}
    return inventory
