"""The `marco` inventory plugin through the real ansible-inventory: without a controller
(zeroconf browse), constructed groups and variables, and its cache."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.support.paths import BIN, ROOT


def ansible_inventory(source: Path, tmp_path: Path, *args: str,
                      tls: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**(tls or {}),"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8",
           "ANSIBLE_CONFIG": str(ROOT / "playbooks" / "ansible.cfg"),
           "ANSIBLE_CACHE_PLUGIN_CONNECTION": str(tmp_path / "cache"),
           # A source the plugin refuses fails the command (by default Ansible warns, exits 0).
           "ANSIBLE_INVENTORY_UNPARSED_FAILED": "1"}
    return subprocess.run([str(BIN / "ansible-inventory"), "-i", str(source), *args], env=env,
                          capture_output=True, text=True, timeout=120)


def plain(value: object) -> object:
    """Values from the network are marked unsafe (never templated) in Ansible's JSON dump."""
    if isinstance(value, dict) and set(value) == {"__ansible_unsafe"}:
        return value["__ansible_unsafe"]
    return value


def test_zeroconf_source_with_constructed_groups_and_cache(start_agent, unique_name,
                                                           tmp_path: Path, pki) -> None:
    names = [unique_name("inv"), unique_name("inv")]
    start_agent(node_name=names[0], announce=True, extra_args=["--groups", "web"])
    start_agent(node_name=names[1], announce=True, extra_args=["--groups", "db,web"])
    source = tmp_path / "lan.marco.yml"
    source.write_text(
        "plugin: marco.fleet.marco\n"
        "mdns_interfaces: [127.0.0.1]\n"
        "browse_seconds: 3\n"
        "compose:\n  node_label: marco_node ~ '@' ~ marco_os\n"
        "groups:\n  databases: \"'db' in marco_groups.split(',')\"\n"
        "keyed_groups:\n  - key: marco_arch\n    prefix: arch\n"
        "cache: true\ncache_plugin: jsonfile\n")
    # Without a client certificate the agents (mutual TLS) cannot be checked: a clear error.
    refused = ansible_inventory(source, tmp_path, "--list")
    assert refused.returncode != 0
    assert "you have no client certificate: run `marco login`" in refused.stderr, refused.stderr
    # With one, each agent's certificate must name the node it announced.
    listed = ansible_inventory(source, tmp_path, "--list", tls=pki.client_env())
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    hostvars = {host: {k: plain(v) for k, v in variables.items()}
                for host, variables in data["_meta"]["hostvars"].items()}
    assert set(names) <= set(hostvars)
    assert hostvars[names[0]]["ansible_connection"] == "marco.fleet.marco"
    assert hostvars[names[0]]["node_label"] == f"{names[0]}@{hostvars[names[0]]['marco_os']}"
    assert set(names) <= set(data["web"]["hosts"])
    assert data["databases"]["hosts"] == [names[1]]
    arch_group = f"arch_{os.uname().machine}"
    assert set(names) <= set(data[arch_group]["hosts"])
    assert any((tmp_path / "cache").iterdir())  # the result was cached


def test_clear_error_without_a_source(tmp_path: Path) -> None:
    source = tmp_path / "nothing.marco.yml"
    source.write_text("plugin: marco.fleet.marco\n")
    out = ansible_inventory(source, tmp_path, "--list")
    assert out.returncode != 0
    assert "marco inventory: browsing needs `mdns_interfaces`" in out.stderr, out.stderr
