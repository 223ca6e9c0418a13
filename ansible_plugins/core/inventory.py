"""The `marco` inventory source without a controller: a zeroconf browse (with a controller,
the plugin reads /api/inventory through `marco.inventory_script.fetch_inventory`).

Returns the same `--list` JSON either way (`marco.inventory.build_inventory`); the plugin
shim feeds it to Ansible's inventory and applies `compose`, `groups` and `keyed_groups`.
"""

from __future__ import annotations

import asyncio
from typing import Any, Sequence

from marco.errors import AuthenticationError, MarcoError
from marco.protocol import choose_mdns_interfaces
from marco.credentials import find_client_tls
from marco.discovery import browse_once
from marco.inventory import build_inventory


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
            "certificate: run `marco login` (or set MARCO_CLIENT_CERT, MARCO_CLIENT_KEY, MARCO_TLS_CA)")
    return build_inventory(alive, tls=tls is not None)
