"""Turn a byte stream into text lines: split on \\n, replace invalid UTF-8, cap line length."""

from __future__ import annotations

MAX_LINE_BYTES = 32 * 1024


def _char_boundary(data: bytes, limit: int) -> int:
    """The largest cut <= limit that does not split a UTF-8 sequence (never 0 for limit > 3)."""
    cut = limit
    # Step back over continuation bytes (10xxxxxx) so the cut lands before a lead byte.
    while cut > limit - 4 and cut > 0 and (data[cut] & 0xC0) == 0x80:
        cut -= 1
    return cut if cut > limit - 4 and cut > 0 else limit


class LineSplitter:
    """Incremental splitter for one stream (stdout or stderr) of one execution.

    `feed` returns the complete lines in the data so far; the trailing partial line waits for
    more data, or for `flush` at exit. A line longer than `max_line` bytes is cut into several
    lines at UTF-8 character boundaries so no message grows without bound.
    """

    def __init__(self, max_line: int = MAX_LINE_BYTES) -> None:
        self.max_line = max_line
        self._partial = b""

    def feed(self, data: bytes) -> list[str]:
        if self._partial:
            data = self._partial + data
        cut = data.rfind(b"\n")
        if cut < 0:
            self._partial = data
            return self._cut_long_partial([])
        self._partial = data[cut + 1:]
        complete = data[:cut]
        lines = complete.decode("utf-8", "replace").split("\n")
        if cut > self.max_line and max(map(len, lines)) > self.max_line // 4:
            # Only possible when some line is long: re-split those in bytes (rare, slow path).
            lines = [piece for line in complete.split(b"\n") for piece in self._cut(line)]
        return self._cut_long_partial(lines)

    def flush(self) -> list[str]:
        """The last line without a trailing newline, if any (call once, at exit)."""
        rest, self._partial = self._partial, b""
        return self._cut(rest) if rest else []

    def _cut_long_partial(self, lines: list[str]) -> list[str]:
        while len(self._partial) > self.max_line:
            cut = _char_boundary(self._partial, self.max_line)
            lines.append(self._partial[:cut].decode("utf-8", "replace"))
            self._partial = self._partial[cut:]
        return lines

    def _cut(self, line: bytes) -> list[str]:
        pieces = []
        while len(line) > self.max_line:
            cut = _char_boundary(line, self.max_line)
            pieces.append(line[:cut].decode("utf-8", "replace"))
            line = line[cut:]
        pieces.append(line.decode("utf-8", "replace"))
        return pieces
