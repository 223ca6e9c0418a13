"""What a run is made of (docs/runs.md), shared by the controller's store and API, the CLI and
the Ansible callback: one spelling of the ids, kinds, statuses and recap counts."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

RUN_ID = re.compile(r"r[0-9a-f]{20}")  # "r" + 8 hex of the start second + 12 random
KINDS = ("playbook", "command", "shell", "deploy", "terminal")
# Kinds whose runs start no executions on agents: a terminal run's output is its own events.
WITHOUT_EXECUTIONS = frozenset({"terminal"})
STATUSES = ("running", "ok", "failed", "unreachable", "interrupted")
END_STATUSES = STATUSES[1:]  # every status but running
COUNTS = ("ok", "changed", "failed", "unreachable", "skipped")  # a host's counts in a recap
MAX_TITLE = 1000                  # characters of a run's title
MAX_META_BYTES = 16 * 1024        # a run's meta as JSON


def host_failed(counts: Mapping[str, int]) -> bool:
    """Whether a host's recap counts say it failed: a failed or an unreachable task."""
    return bool(counts.get("failed", 0) or counts.get("unreachable", 0))


def status_from_stats(stats: Mapping[str, Mapping[str, int]]) -> str:
    """A finished run's status from its per-host counts: failed beats unreachable beats ok."""
    if any(counts.get("failed", 0) for counts in stats.values()):
        return "failed"
    if any(counts.get("unreachable", 0) for counts in stats.values()):
        return "unreachable"
    return "ok"


def with_command(meta: dict[str, Any], command: str) -> dict[str, Any]:
    """`meta` with the full `command` (re-run runs it, not the title cut to MAX_TITLE), when
    that still fits MAX_META_BYTES as JSON; else `meta` alone (the title keeps its start)."""
    fuller = {**meta, "command": command}
    try:
        size = len(json.dumps(fuller, ensure_ascii=False, separators=(",", ":")).encode())
    except UnicodeEncodeError:  # a lone surrogate: the store would refuse it
        return meta
    return fuller if size <= MAX_META_BYTES else meta
