"""Per-user "not before" times: tokens issued earlier are refused ("log out everywhere"); and
single tokens voided by a plain logout (`DeniedTokens`).

The controller pushes the table to every agent (`PUT /v1/revocations`, authenticated by a
short-lived service token of its own salt); each agent keeps it on disk, so a revocation
survives restarts, and takes the later time when two disagree.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

from .atomic import write_atomic
from .errors import BadRequest


class Revocations:
    """username -> epoch seconds before which that user's tokens are void; kept in `path`, or
    in memory only (`path` None: a controller whose database keeps them)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._table: dict[str, float] = {}

    def load(self) -> None:
        if self.path is None:
            return
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
        _save_json(self.path, self._table)

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


def token_digest(token: str) -> str:
    """How a logged-out token is named in deny lists: never the token itself."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class DeniedTokens:
    """Single tokens voided by a plain logout: SHA-256 digest -> when the token would have
    expired anyway (entries are dropped after that, so the list stays small); kept in `path`,
    or in memory only (`path` None)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._table: dict[str, float] = {}

    def load(self) -> None:
        if self.path is None:
            return
        try:
            self._table = self._checked(json.loads(self.path.read_text()))
        except FileNotFoundError:
            return

    def denied(self, token: str) -> bool:
        return token_digest(token) in self._table

    def table(self) -> dict[str, float]:
        return dict(self._table)

    def update(self, table: Any) -> list[str]:
        """Add entries, drop expired ones, persist; return the digests that are new."""
        now = time.time()
        incoming = self._checked(table)
        added = [digest for digest, until in incoming.items()
                 if until > now and digest not in self._table]
        for digest in added:
            self._table[digest] = incoming[digest]
        expired = [digest for digest, until in self._table.items() if until <= now]
        for digest in expired:
            del self._table[digest]
        if added or expired:
            _save_json(self.path, self._table)
        return added

    @staticmethod
    def _checked(table: Any) -> dict[str, float]:
        if not isinstance(table, dict) or not all(
                isinstance(d, str) and len(d) == 64 and all(c in "0123456789abcdef" for c in d)
                and isinstance(u, (int, float)) and not isinstance(u, bool) and math.isfinite(u)
                for d, u in table.items()):
            raise BadRequest("denied tokens must map SHA-256 hex digests to epoch seconds")
        return {d: float(u) for d, u in table.items()}


def _save_json(path: Path | None, data: Any) -> None:
    if path is None:
        return
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data).encode(), 0o600)
