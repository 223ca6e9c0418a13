"""The `marco` inventory source: the controller's /api/inventory, or a zeroconf browse.

Returns the same `--list` JSON either way (`controller.inventory.build_inventory`); the plugin
shim feeds it to Ansible's inventory and applies `compose`, `groups` and `keyed_groups`.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Sequence

from agent.errors import AgentUnreachable, AuthenticationError, MarcoError
from agent.protocol import choose_mdns_interfaces
from controller.discovery import browse_once
from controller.inventory import build_inventory


def from_controller(url: str, token: str, timeout: float = 30.0) -> dict[str, Any]:
    request = urllib.request.Request(url.rstrip("/") + "/api/inventory",
                                     headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return json.load(reply)
    except urllib.error.HTTPError as error:
        if error.code == 401:
            raise AuthenticationError("the controller refused the token; run `marco login`") from None
        raise MarcoError(f"{url} answered {error.code}") from None
    except (urllib.error.URLError, OSError) as error:
        raise AgentUnreachable(f"cannot reach the controller at {url}: "
                               f"{getattr(error, 'reason', error)}") from None


def from_zeroconf(interfaces: Sequence[str], wait: float) -> dict[str, Any]:
    chosen = choose_mdns_interfaces("", interfaces)
    if not chosen:
        raise MarcoError("browsing needs `mdns_interfaces` (addresses of this machine's "
                         "interfaces on the nodes' network), or set `controller`")
    return build_inventory(asyncio.run(browse_once(chosen, wait)))
