# marco.fleet.marco, the inventory: a thin shim (the documentation for ansible-doc); the logic is
# ansible_plugins.core.inventory, in the Python package marco (pip install 'marco[ansible]').
from __future__ import annotations

DOCUMENTATION = r"""
name: marco
short_description: Nodes running Marco agents, from the Marco controller or by zeroconf
description:
  - Lists the nodes whose Marco agents are alive, with groups from each agent's announced
    groups and OS, and host variables C(ansible_host), C(ansible_port),
    C(ansible_connection=marco.fleet.marco) and C(marco_*) facts from the announcement.
  - Reads the controller's C(/api/inventory); without a controller it browses for agents by
    zeroconf on the interfaces given.
  - Uses files ending in C(.marco.yml) or C(.marco.yaml).
author: Marco developers
version_added: "0.1"
extends_documentation_fragment:
  - constructed
  - inventory_cache
options:
  plugin:
    description: Marks this file as a Marco inventory source.
    required: true
    choices: [marco.fleet.marco]
  controller:
    description: URL of the Marco controller. Without it, agents are found by zeroconf.
    type: string
    env:
      - name: MARCO_CONTROLLER
  marco_token:
    description: Token for the controller (default as for the connection; see C(marco login)).
    type: string
    env:
      - name: MARCO_TOKEN
  marco_token_file:
    description: File holding the token.
    type: path
    env:
      - name: MARCO_TOKEN_FILE
  mdns_interfaces:
    description: Addresses of this machine's interfaces to browse on, when there is no controller.
    type: list
    elements: string
    default: []
  browse_seconds:
    description: How long to browse when there is no controller.
    type: float
    default: 2.0
"""

EXAMPLES = r"""
# inventory.marco.yml
plugin: marco.fleet.marco
controller: https://marco.example.org:7380
keyed_groups:
  - key: marco_arch
    prefix: arch
groups:
  big: marco_cpus | int >= 8
"""

from ansible_plugins.core.inventory import MarcoInventory  # noqa: E402


class InventoryModule(MarcoInventory):
    """Ansible finds plugins by this class name."""
