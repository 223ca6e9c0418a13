"""Per-user "not before" times: tokens issued earlier are refused ("log out everywhere").

The controller pushes the table to every agent (`PUT /v1/revocations`, authenticated by a
short-lived service token of its own salt); each agent keeps it on disk, so a revocation
survives restarts, and takes the later time when two disagree.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .errors import BadRequest


class Revocations:
    """username -> epoch seconds before which that user's tokens are void."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._table: dict[str, float] = {}

    def load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        self._table = self._checked(data)

    def not_before(self, user: str) -> float | None:
        return self._table.get(user)

    def table(self) -> dict[str, float]:
        return dict(self._table)

    def update(self, table: Any) -> list[str]:
        """Merge `table` (later times win), persist it, return the users whose time moved."""
        moved = []
        for user, when in self._checked(table).items():
            if when > self._table.get(user, 0.0):
                self._table[user] = when
                moved.append(user)
        if moved:
            self._save()
        return moved

    def _save(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(self._table, handle)
        os.replace(tmp, self.path)

    @staticmethod
    def _checked(table: Any) -> dict[str, float]:
        if not isinstance(table, dict):
            raise BadRequest("revocations must map user names to epoch seconds")
        out = {}
        for user, when in table.items():
            if not isinstance(user, str) or not user or isinstance(when, bool) \
                    or not isinstance(when, (int, float)) or not math.isfinite(when):
                raise BadRequest("revocations must map user names to epoch seconds")
            out[user] = float(when)
        return out
