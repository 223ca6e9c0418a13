"""The `marco.fleet.marco` inventory plugin: the controller's /api/inventory (through
`marco.inventory_script.fetch_inventory`) or, without a controller, a zeroconf browse.

Both give the same `--list` JSON (`marco.inventory.build_inventory`); `MarcoInventory` feeds it
to Ansible's inventory and applies `compose`, `groups` and `keyed_groups`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from ansible.errors import AnsibleParserError
from ansible.plugins.inventory import BaseInventoryPlugin, Cacheable, Constructable

from marco.credentials import find_client_tls, find_token
from marco.discovery import browse_once
from marco.errors import AuthenticationError, MarcoError
from marco.inventory import build_inventory
from marco.inventory_script import fetch_inventory
from marco.protocol import choose_mdns_interfaces


def from_zeroconf(interfaces: Sequence[str], wait: float) -> dict[str, Any]:
    chosen = choose_mdns_interfaces("", interfaces)
    if not chosen:
        raise MarcoError("browsing needs `mdns_interfaces` (addresses of this machine's "
                         "interfaces on the nodes' network), or set `controller`")
    # With the user's client certificate, each answer is checked over mutual TLS: only agents
    # with a certificate from the cluster CA naming the announced node are listed.
    tls = find_client_tls()
    nodes = asyncio.run(browse_once(chosen, wait, tls=tls))
    alive = [node for node in nodes if node.alive]
    if tls is None and not alive and any(n.txt.get("tls") == "1" for n in nodes):
        raise AuthenticationError(
            f"found {len(nodes)} agent(s) speaking mutual TLS, but you have no client "
            "certificate: run `marco login` (or set MARCO_CLIENT_CERT, MARCO_CLIENT_KEY, "
            "MARCO_TLS_CA)")
    return build_inventory(alive, tls=tls is not None)


class MarcoInventory(BaseInventoryPlugin, Constructable, Cacheable):
    """The nodes of a Marco controller (`/api/inventory`), or found by zeroconf."""

    NAME = "marco.fleet.marco"

    def verify_file(self, path):
        return super().verify_file(path) and path.endswith((".marco.yml", ".marco.yaml"))

    def _fetch(self):
        controller = self.get_option("controller")
        try:
            if controller:
                token = find_token(self.get_option("marco_token"),
                                   self.get_option("marco_token_file"))
                return fetch_inventory(controller, token)
            return from_zeroconf(self.get_option("mdns_interfaces"),
                                 self.get_option("browse_seconds"))
        except MarcoError as error:
            raise AnsibleParserError(f"marco inventory: {error}") from None

    def parse(self, inventory, loader, path, cache=True):
        super().parse(inventory, loader, path, cache)
        self._read_config_data(path)
        cache_key = self.get_cache_key(path)
        use_cache = self.get_option("cache") and cache
        data = None
        if use_cache:
            try:
                data = self._cache[cache_key]
            except KeyError:
                pass
        if data is None:
            data = self._fetch()
            if self.get_option("cache"):
                self._cache[cache_key] = data
        self._populate(data)

    def _populate(self, data):
        strict = self.get_option("strict")
        hostvars = data.get("_meta", {}).get("hostvars", {})
        for group, body in data.items():
            if group in ("_meta", "all"):
                continue
            self.inventory.add_group(group)
            for host in body.get("hosts", []):
                self.inventory.add_host(host, group=group)
        for host, variables in hostvars.items():
            self.inventory.add_host(host)
            for key, value in variables.items():
                self.inventory.set_variable(host, key, value)
            self._set_composite_vars(self.get_option("compose"), variables, host,
                                     strict=strict)
            self._add_host_to_composed_groups(self.get_option("groups"), variables, host,
                                              strict=strict)
            self._add_host_to_keyed_groups(self.get_option("keyed_groups"), variables, host,
                                           strict=strict)
