"""The agent's audit log: who ran what, where, when, for how long, with which result, and which
files were written or read — one JSON object per line, appended, readable by its owner only.

Each write is a single `write(2)` on a file opened with O_APPEND, so lines never interleave and
nothing already written is rewritten. A failing audit write is logged and never stops the work.
The log is bounded: past `max_bytes` it is renamed to `audit.log.1` (older ones shift up to
`backups`, the oldest is dropped) and a new one starts; `reopen` (on SIGHUP) suits logrotate.
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
    """Append-only JSON lines at `path` (mode 0600), rotated past `max_bytes` (0: never, for
    an external logrotate that sends SIGHUP) keeping `backups` older files."""

    def __init__(self, path: Path, node: str, max_bytes: int = 64 * 1024 * 1024,
                 backups: int = 4) -> None:
        self.path = path
        self.node = node
        self.max_bytes, self.backups = max_bytes, backups
        self._fd: int | None = None
        self._size = 0

    def open(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        info = os.fstat(self._fd)
        self._size = info.st_size
        if stat.S_IMODE(info.st_mode) & 0o077:
            os.fchmod(self._fd, 0o600)

    def reopen(self) -> None:
        """Start writing to `path` afresh (after an external rotation renamed it)."""
        self.close()
        try:
            self.open()
        except OSError as error:
            log.error("audit log %s: cannot reopen (%s)", self.path, error.strerror)

    def _rotate(self) -> None:
        self.close()
        try:
            for index in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{index}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{index + 1}"))
            if self.backups > 0:
                os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
            else:
                self.path.unlink(missing_ok=True)
        except OSError as error:
            log.error("audit log %s: cannot rotate (%s)", self.path, error.strerror)
        self.reopen()

    def record(self, event: str, user: str | None, **fields: Any) -> None:
        """Append one event; `fields` must be JSON-serialisable."""
        entry = {"time": round(time.time(), 6), "node": self.node, "event": event, "user": user,
                 **fields}
        line = (json.dumps(entry, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        if self._fd is None:
            return
        try:
            self._size += os.write(self._fd, line)
        except OSError as error:
            log.error("audit log %s: cannot write (%s); event was %s", self.path, error.strerror,
                      line.decode("utf-8", "replace").strip())
        if self.max_bytes and self._size >= self.max_bytes:
            self._rotate()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
