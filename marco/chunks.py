"""Request bodies arrive in pieces as small as one TLS record (16 KiB); passing each on costs a
queue hop, a pipe write or a TLS record per piece. `Coalescer` joins them into blocks of at
least `min_size` bytes."""

from __future__ import annotations

BLOCK = 1024 * 1024


class Coalescer:
    """Collects pieces; `add` returns a block once `min_size` bytes are in, `flush` the rest."""

    def __init__(self, min_size: int = BLOCK) -> None:
        self.min_size = min_size
        self._pieces: list[bytes] = []
        self._size = 0

    def add(self, piece: bytes) -> bytes | None:
        if not self._pieces and len(piece) >= self.min_size:
            return piece  # already big enough: no copy
        self._pieces.append(piece)
        self._size += len(piece)
        return self.flush() if self._size >= self.min_size else None

    def flush(self) -> bytes:
        block = b"".join(self._pieces)
        self._pieces, self._size = [], 0
        return block
