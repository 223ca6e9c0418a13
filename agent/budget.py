"""Per-user disk budget: every byte a user makes the agent write (output spools, `meta.json`,
`?wait=1` captures) is charged to that user, against one limit."""

from __future__ import annotations

from collections.abc import Callable


class DiskBudget:
    """Bytes charged per user against `limit`. When a charge would pass it, `make_room(user)`
    may free space first (the manager forgets that user's oldest finished execution) and
    answers whether it freed anything."""

    def __init__(self, limit: int, make_room: Callable[[str], bool] | None = None) -> None:
        self.limit = limit
        self.make_room = make_room
        self._used: dict[str, int] = {}
        self._refused: set[str] = set()  # users a charge was refused to since their last release

    def used(self, user: str) -> int:
        return self._used.get(user, 0)

    def exhausted(self, user: str) -> bool:
        """Whether `user` is at the limit, or was refused bytes and has freed none since."""
        return user in self._refused or self.used(user) >= self.limit

    def account(self, user: str) -> Account:
        return Account(self, user)

    def try_charge(self, user: str, size: int) -> bool:
        """Charge `size` bytes unless that passes the limit even after making room."""
        while self.used(user) + size > self.limit:
            if self.make_room is None or not self.make_room(user):
                self._refused.add(user)
                return False
        self.charge(user, size)
        return True

    def charge(self, user: str, size: int) -> None:
        """Charge unconditionally (records already on disk, small bookkeeping writes)."""
        if size < 0:
            self.release(user, -size)
        elif size:
            self._used[user] = self.used(user) + size

    def release(self, user: str, size: int) -> None:
        if size > 0:
            self._refused.discard(user)
        left = self.used(user) - size
        if left > 0:
            self._used[user] = left
        else:
            self._used.pop(user, None)


class Account:
    """One user's side of the budget, handed to what writes on that user's behalf."""

    def __init__(self, budget: DiskBudget, user: str) -> None:
        self.budget, self.user = budget, user

    def try_charge(self, size: int) -> bool:
        return self.budget.try_charge(self.user, size)

    def charge(self, size: int) -> None:
        self.budget.charge(self.user, size)

    def release(self, size: int) -> None:
        self.budget.release(self.user, size)
