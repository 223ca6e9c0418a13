"""The run store's byte accounting and pruning: every stored byte (a run's row, its events, its
output) is charged to its run, and the per-user and total caps hold by deleting the oldest
ended runs, never a running one and never the run being written (docs/runs.md "Storage")."""

from __future__ import annotations

from typing import Any

from marco.errors import DiskBudgetExhausted, InsufficientStorage

from .dbapi import Database
from .records import DAY, RunLimits

# Stored bytes per owner, summed over the runs (a store may keep the sums in a table instead).
USAGE_OF_RUNS = "SELECT owner, SUM(bytes) FROM runs GROUP BY owner HAVING SUM(bytes) > 0"


class Budget:
    """The byte caps of one store's database; every method runs inside the store's
    transaction."""

    def __init__(self, db: Database, limits: RunLimits, usage_sql: str = USAGE_OF_RUNS) -> None:
        self._db, self.limits, self._usage_sql = db, limits, usage_sql
        # Stored bytes per owner, kept beside the database so that a charge costs no scan of
        # every run; None after a rolled back transaction (then read again from the database,
        # as a store shared with other processes does at each transaction).
        self._usage: dict[str, int] | None = None

    def forget(self) -> None:
        """The transaction rolled back, or another process may have written: read the sums
        from the database again next time."""
        self._usage = None

    def used(self) -> dict[str, int]:
        """Stored bytes per owner."""
        if self._usage is None:
            self._usage = {owner: int(size) for owner, size in self._db.execute(self._usage_sql)}
        return self._usage

    def charge(self, owner: str, run_id: str, added: int) -> None:
        """Add `added` bytes to the run, first pruning the oldest ended runs (never this one)
        so that the owner's and the total caps hold; or raise, having pruned nothing."""
        if added > 0:
            self._make_room(owner, run_id, added)
        self._db.execute("UPDATE runs SET bytes = bytes + ? WHERE id = ?", (added, run_id))
        usage = self.used()
        usage[owner] = usage.get(owner, 0) + added

    def _make_room(self, owner: str, run_id: str, added: int) -> None:
        """Delete the oldest ended runs so that `added` more bytes fit, or raise (then
        nothing is deleted)."""
        used_by_owner, used = self.used().get(owner, 0), sum(self.used().values())
        victims = self._victims(owner, run_id, used_by_owner + added
                                - self.limits.max_bytes_per_user, [])
        if victims is None:
            raise DiskBudgetExhausted(
                f"{owner}'s stored runs would take more than "
                f"{self.limits.max_bytes_per_user} bytes",
                hint="ended runs are pruned oldest first; this one does not fit")
        freed = sum(size for _, size in victims)
        more = self._victims(None, run_id, used - freed + added - self.limits.max_bytes,
                             [run for run, _ in victims])
        if more is None:
            raise InsufficientStorage(
                f"the stored runs would take more than {self.limits.max_bytes} bytes",
                hint="ended runs are pruned oldest first; this one does not fit")
        self.delete([run for run, _ in victims + more])

    def _victims(self, owner: str | None, keep: str | None, need: int,
                 taken: list[str]) -> list[tuple[str, int]] | None:
        """The oldest ended runs (of `owner`, or anyone's) that free `need` bytes, except
        `keep` and those `taken`; None when all of them would not free enough."""
        chosen: list[tuple[str, int]] = []
        if need <= 0:
            return chosen
        sql = "SELECT id, bytes FROM runs WHERE ended IS NOT NULL AND bytes > 0"
        args: list[Any] = []
        if owner is not None:
            sql, args = sql + " AND owner = ?", [owner]
        skip = set(taken) | {keep}
        for run_id, size in self._db.execute(sql + " ORDER BY id", args):
            if run_id in skip:
                continue
            chosen.append((run_id, size))
            need -= size
            if need <= 0:
                return chosen
        return None

    def drop_oldest_ended(self, owner: str, count: int) -> int:
        """Delete up to `count` of the owner's oldest ended runs; returns how many went."""
        rows = self._db.execute("SELECT id FROM runs WHERE owner = ? AND ended IS NOT NULL "
                                "ORDER BY id LIMIT ?", (owner, count)).fetchall()
        self.delete([row[0] for row in rows])
        return len(rows)

    def delete(self, run_ids: list[str]) -> None:
        """Delete runs with all they hold (the foreign keys cascade)."""
        usage = self.used()
        for run_id in run_ids:
            for owner, size in self._db.execute(
                    "DELETE FROM runs WHERE id = ? RETURNING owner, bytes", (run_id,)):
                usage[owner] = usage.get(owner, 0) - size

    def prune(self, now: float) -> int:
        """Runs ended more than `retention_days` ago go, then each owner's oldest ended runs
        beyond `max_per_user` and beyond the byte caps. Returns how many runs went."""
        old = self._db.execute("SELECT id FROM runs WHERE ended IS NOT NULL AND ended < ?",
                               (now - self.limits.retention_days * DAY,)).fetchall()
        self.delete([row[0] for row in old])
        removed = len(old)
        for owner, count in self._db.execute("SELECT owner, COUNT(*) FROM runs GROUP BY owner "
                                             "HAVING COUNT(*) > ?",
                                             (self.limits.max_per_user,)).fetchall():
            removed += self.drop_oldest_ended(owner, count - self.limits.max_per_user)
        return removed + self._prune_bytes()

    def _prune_bytes(self) -> int:
        """Bring owners over their byte cap, then everyone over the total, back under it as
        far as ended runs allow; returns how many runs went."""
        removed = 0
        for owner, used in [*self.used().items()]:
            if used > self.limits.max_bytes_per_user:
                removed += self._prune_down(owner, used - self.limits.max_bytes_per_user)
        return removed + self._prune_down(None, sum(self.used().values())
                                          - self.limits.max_bytes)

    def _prune_down(self, owner: str | None, need: int) -> int:
        """Delete the oldest ended runs (of `owner`, or anyone's) until `need` bytes are
        freed or none is left."""
        victims = self._victims(owner, None, need, [])
        if victims is None:  # not enough: all of them
            sql = "SELECT id, bytes FROM runs WHERE ended IS NOT NULL AND bytes > 0"
            args: list[Any] = []
            if owner is not None:
                sql, args = sql + " AND owner = ?", [owner]
            victims = [(row[0], row[1]) for row in self._db.execute(sql, args)]
        self.delete([run for run, _ in victims])
        return len(victims)
