"""Marco's Ansible side: the collection `marco.fleet` under `ansible_collections/marco/fleet/`
(galaxy.yml, thin plugin shims that ansible-doc reads) and the logic behind it in the
importable package `ansible_plugins.core`. `python -m ansible_plugins` prints the collection's
folder, for `ansible-galaxy collection install`."""

from __future__ import annotations

from pathlib import Path

#: A folder for `collections_path`: it holds ansible_collections/marco/fleet.
COLLECTIONS_PATH = Path(__file__).resolve().parent
#: The collection itself (galaxy.yml at its root).
COLLECTION = COLLECTIONS_PATH / "ansible_collections" / "marco" / "fleet"
