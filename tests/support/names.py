"""Node names unique across tests, modules and concurrent runs (they share loopback's mDNS)."""

from __future__ import annotations

import itertools
import os

_counter = itertools.count(1)


def unique_node_name(prefix: str) -> str:
    """`PREFIX-PID-N`: the pid keeps runs (and pytest-xdist workers) apart, N the tests."""
    return f"{prefix}-{os.getpid()}-{next(_counter)}"
