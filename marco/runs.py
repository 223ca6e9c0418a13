"""What a run is made of (docs/runs.md), shared by the controller's store and API, the CLI and
the Ansible callback: one spelling of the ids, kinds, statuses and recap counts."""

from __future__ import annotations

import re
from collections.abc import Mapping

RUN_ID = re.compile(r"r[0-9a-f]{20}")  # "r" + 8 hex of the start second + 12 random
KINDS = ("playbook", "command", "shell", "deploy", "terminal")
# Kinds whose runs start no executions on agents: a terminal run's output is its own events.
WITHOUT_EXECUTIONS = frozenset({"terminal"})
STATUSES = ("running", "ok", "failed", "unreachable", "interrupted")
END_STATUSES = STATUSES[1:]  # every status but running
COUNTS = ("ok", "changed", "failed", "unreachable", "skipped")  # a host's counts in a recap


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
