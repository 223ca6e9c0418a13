"""The per-user socket table: username -> open WebSockets, and fan-out of encoded events."""

from __future__ import annotations

import logging
from typing import Protocol

log = logging.getLogger(__name__)


class EventSocket(Protocol):
    """What the hub needs of a socket: a non-blocking send of one encoded message."""

    def send(self, message: str) -> None: ...


class StreamHub:
    """Sends each user's events to that user's sockets only.

    `send` must never block: a socket queues or drops itself when it falls behind, so a slow or
    dead viewer cannot stall an execution or the other sockets.
    """

    def __init__(self) -> None:
        self._sockets: dict[str, set[EventSocket]] = {}

    def add(self, username: str, socket: EventSocket) -> None:
        self._sockets.setdefault(username, set()).add(socket)

    def remove(self, username: str, socket: EventSocket) -> None:
        sockets = self._sockets.get(username)
        if sockets is None:
            return
        sockets.discard(socket)
        if not sockets:
            del self._sockets[username]

    def sockets(self, username: str) -> list[EventSocket]:
        return list(self._sockets.get(username, ()))

    def all_sockets(self) -> list[EventSocket]:
        return [socket for sockets in self._sockets.values() for socket in sockets]

    def count(self, username: str) -> int:
        return len(self._sockets.get(username, ()))

    def publish(self, username: str, message: str) -> None:
        for socket in list(self._sockets.get(username, ())):
            try:
                socket.send(message)
            except Exception:  # one broken socket must not affect the others
                log.exception("dropping a socket of %s that failed to send", username)
                self.remove(username, socket)
