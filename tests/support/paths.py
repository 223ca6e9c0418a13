"""Where things are: the checkout, its playbooks, the venv's console scripts."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOKS = ROOT / "playbooks"
BIN = Path(sys.executable).parent  # the venv's bin: ansible-playbook, marco, marco-agent, ...
