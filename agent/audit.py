"""The agent's audit log: who ran what, where, when, for how long, with which result, and which
files were written or read — one JSON object per line, appended, readable by its owner only.

Each write is a single `write(2)` on a file opened with O_APPEND, so lines never interleave and
nothing already written is rewritten. A failing audit write is logged and never stops the work.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class AuditLog:
    """Append-only JSON lines at `path` (mode 0600)."""

    def __init__(self, path: Path, node: str) -> None:
        self.path = path
        self.node = node
        self._fd: int | None = None

    def open(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        info = os.fstat(self._fd)
        if stat.S_IMODE(info.st_mode) & 0o077:
            os.fchmod(self._fd, 0o600)

    def record(self, event: str, user: str | None, **fields: Any) -> None:
        """Append one event; `fields` must be JSON-serialisable."""
        entry = {"time": round(time.time(), 6), "node": self.node, "event": event, "user": user,
                 **fields}
        line = (json.dumps(entry, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        if self._fd is None:
            return
        try:
            os.write(self._fd, line)
        except OSError as error:
            log.error("audit log %s: cannot write (%s); event was %s", self.path, error.strerror,
                      line.decode("utf-8", "replace").strip())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
