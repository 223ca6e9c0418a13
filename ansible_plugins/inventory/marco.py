# Marco inventory plugin: a thin shim; the logic is in ansible_plugins.core.inventory.
from __future__ import annotations

DOCUMENTATION = r"""
name: marco
short_description: Nodes running Marco agents, from the Marco controller or by zeroconf
description:
  - Lists the nodes whose Marco agents are alive, with groups from each agent's announced
    groups and OS, and host variables C(ansible_host), C(ansible_port),
    C(ansible_connection=marco) and C(marco_*) facts from the announcement.
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
    choices: [marco]
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
plugin: marco
controller: https://marco.example.org:7380
keyed_groups:
  - key: marco_arch
    prefix: arch
groups:
  big: marco_cpus | int >= 8
"""

from ansible.errors import AnsibleParserError  # noqa: E402
from ansible.plugins.inventory import BaseInventoryPlugin, Cacheable, Constructable  # noqa: E402

from marco.errors import MarcoError  # noqa: E402
from ansible_plugins.core.inventory import from_zeroconf  # noqa: E402
from marco.credentials import find_token  # noqa: E402
from marco.inventory_script import fetch_inventory  # noqa: E402


class InventoryModule(BaseInventoryPlugin, Constructable, Cacheable):
    NAME = "marco"

    def verify_file(self, path):
        return super().verify_file(path) and path.endswith((".marco.yml", ".marco.yaml"))

    def _fetch(self):
        controller = self.get_option("controller")
        try:
            if controller:
                token = find_token(self.get_option("marco_token"), self.get_option("marco_token_file"))
                return fetch_inventory(controller, token)
            return from_zeroconf(self.get_option("mdns_interfaces"), self.get_option("browse_seconds"))
        except MarcoError as error:
            raise AnsibleParserError(f"marco inventory: {error.message}") from None

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
            self._set_composite_vars(self.get_option("compose"), variables, host, strict=strict)
            self._add_host_to_composed_groups(self.get_option("groups"), variables, host, strict=strict)
            self._add_host_to_keyed_groups(self.get_option("keyed_groups"), variables, host, strict=strict)
