"""Per-user slots: at most `per_user` of one kind of work (a listing asking agents, a download,
a read waiting for a run's events) held by each user at once; a request beyond is told so and
answers without it (the caller decides how: from the store alone, at once, or 429)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class UserSlots:
    """How many of each user's requests hold a slot now, at most `per_user`."""

    def __init__(self, per_user: int) -> None:
        self.per_user = per_user
        self._held: dict[str, int] = {}

    @contextmanager
    def admit(self, user: str) -> Iterator[bool]:
        """Whether this request gets a slot (held until the block ends)."""
        if self._held.get(user, 0) >= self.per_user:
            yield False
            return
        self._held[user] = self._held.get(user, 0) + 1
        try:
            yield True
        finally:
            self._held[user] -= 1
            if not self._held[user]:
                del self._held[user]
