"""A WebSocket handler whose sending never blocks and whose unsent queue is bounded: the agent's
per-user stream and the controller's page socket both send this way."""

from __future__ import annotations

import asyncio
import functools

import tornado.websocket


def message_size(message: str) -> int:
    """Bytes `message` takes on the wire (its UTF-8 length, cheap for ASCII)."""
    return len(message) if message.isascii() else len(message.encode("utf-8", "replace"))


class BoundedWebSocket(tornado.websocket.WebSocketHandler):
    """`send` queues a message without waiting for it to be written; a socket whose queue would
    pass `pending_limit()` with the next message is given up (`too_slow`). Subclasses say what
    giving up a socket releases (`_forget`, called once)."""

    pending_bytes = 0
    closed = False

    def pending_limit(self) -> int:
        raise NotImplementedError

    def too_slow(self, size: int) -> None:
        """Log and close: the queue plus `size` more bytes passed the limit."""
        raise NotImplementedError

    def _forget(self) -> None:
        raise NotImplementedError

    def send(self, message: str) -> None:
        """Queue one message without blocking; give the socket up when it falls too far behind."""
        if self.closed:
            return
        size = message_size(message)
        if self.pending_bytes + size > self.pending_limit():
            # Counted with the message being added: one huge message cannot overshoot the bound.
            self.too_slow(size)
            self._forget()
            return
        try:
            future = self.write_message(message)
        except tornado.websocket.WebSocketClosedError:
            self._forget()
            return
        self.pending_bytes += size
        future.add_done_callback(functools.partial(self._written, size=size))

    def _written(self, future: asyncio.Future[None], *, size: int) -> None:
        self.pending_bytes -= size
        if not future.cancelled() and future.exception() is not None:
            self._forget()

    def on_close(self) -> None:
        self._forget()
