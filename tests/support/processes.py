"""Looking at processes from a test: alive means running, a zombie is dead."""

from __future__ import annotations


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie is dead: reaping it is its parent's business)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ")[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone before the open, or before the read
        return False
