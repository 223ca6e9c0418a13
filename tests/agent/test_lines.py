"""Line splitting: newline handling, UTF-8 across reads, invalid bytes, very long lines."""

from agent.lines import LineSplitter


def test_lines_partial_and_flush() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"one\ntw") == ["one"]
    assert splitter.feed(b"o\nthree") == ["two"]
    assert splitter.flush() == ["three"]
    assert splitter.flush() == []


def test_empty_lines_kept() -> None:
    assert LineSplitter().feed(b"\n\na\n") == ["", "", "a"]


def test_utf8_split_across_reads() -> None:
    data = "héllo wörld ✓\n".encode()
    splitter = LineSplitter()
    out = []
    for i in range(len(data)):
        out += splitter.feed(data[i:i + 1])
    assert out == ["héllo wörld ✓"]


def test_invalid_utf8_is_replaced_not_fatal() -> None:
    assert LineSplitter().feed(b"ok \xff\xfe bytes\n") == ["ok \ufffd\ufffd bytes"]


def test_long_lines_are_cut_at_character_boundaries() -> None:
    splitter = LineSplitter(max_line=10)
    lines = splitter.feed(("é" * 12 + "\n").encode())
    assert "".join(lines) == "é" * 12
    assert all(len(line.encode()) <= 10 for line in lines)
    # A long line still waiting for its newline is cut too (bounded memory).
    lines = splitter.feed(b"x" * 35)
    assert lines == ["x" * 10] * 3
    assert splitter.flush() == ["x" * 5]
