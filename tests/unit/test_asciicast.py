"""The terminal recorder and the .cast file (marco/asciicast.py, issue 16): frames, batches,
the byte cap, UTF-8 split anywhere."""

from __future__ import annotations

import json
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from marco.asciicast import (
    CastRecorder,
    cast_file,
    cast_header,
    frame_size,
    is_frame,
)


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def drain(recorder: CastRecorder) -> list[dict]:
    events = []
    while (event := recorder.flush()) is not None:
        events.append(event)
    return events


def text_of(events: list[dict]) -> str:
    return "".join(f[2] for e in events for f in e["frames"] if f[1] == "o")


def test_output_and_resize_become_timed_frames() -> None:
    clock = Clock()
    recorder = CastRecorder(clock=clock)
    clock.now += 0.25
    recorder.output(b"hello ")
    clock.now += 1.5
    recorder.resize(120, 40)
    recorder.output(b"world")
    assert drain(recorder) == [{"type": "term", "frames": [
        [0.25, "o", "hello "], [1.75, "r", "120x40"], [1.75, "o", "world"]]}]


def test_a_flush_is_due_after_half_a_second_or_a_full_event() -> None:
    clock = Clock()
    recorder = CastRecorder(clock=clock)
    assert not recorder.due()  # nothing held
    recorder.output(b"x")
    assert not recorder.due()
    clock.now += 0.5
    assert recorder.due()
    recorder.flush()
    recorder.output(b"y" * 40_000)
    assert recorder.due()  # a full event's worth, at once


def test_events_hold_at_most_32_kib_of_frames_even_of_escapes() -> None:
    recorder = CastRecorder(clock=Clock())
    data = bytes(range(32)) * 4000 + "é€😀".encode() * 5000  # \u escapes: up to 12x
    recorder.output(data)
    events = drain(recorder)
    assert len(events) > 1
    for event in events:
        assert sum(frame_size(f) for f in event["frames"]) <= 32 * 1024
        assert len(json.dumps(event, ensure_ascii=False).encode()) <= 64 * 1024
    assert text_of(events) == data.decode()


def test_an_incomplete_sequence_waits_for_the_next_batch() -> None:
    recorder = CastRecorder(clock=Clock())
    euro = "€".encode()
    recorder.output(b"a" + euro[:1])
    recorder.output(euro[1:2])
    recorder.output(euro[2:] + b"b")
    recorder.output(b"\xff")  # not UTF-8 at all: U+FFFD
    recorder.output(euro[:2])
    recorder.finish()  # the session ended mid-sequence
    assert text_of(drain(recorder)) == "a€b\ufffd\ufffd"


def test_the_byte_cap_stops_the_recording_with_a_last_frame() -> None:
    recorder = CastRecorder(max_bytes=10, clock=Clock())
    recorder.output(b"123456")
    recorder.output(b"7890abc")
    recorder.output(b"more")
    recorder.resize(10, 10)
    assert recorder.stopped and recorder.recorded == 10
    assert text_of(drain(recorder)) == \
        "1234567890\r\n[marco: recording stopped at 10 bytes]\r\n"


def test_the_cast_file_is_asciicast_v2() -> None:
    clock = Clock()
    recorder = CastRecorder(clock=clock)
    recorder.output(b"$ echo 42\r\n42\r\n")
    clock.now += 1
    recorder.resize(100, 30)
    events = [*drain(recorder), {"type": "recap", "stats": {}}]
    header = cast_header(80, 24, 1700000000.5, "shell on n1", "xterm-256color", "/bin/bash")
    lines = list(cast_file(header, events))
    assert json.loads(lines[0]) == {"version": 2, "width": 80, "height": 24,
                                    "timestamp": 1700000000, "title": "shell on n1",
                                    "env": {"TERM": "xterm-256color", "SHELL": "/bin/bash"}}
    assert [json.loads(line) for line in lines[1:]] == [[0.0, "o", "$ echo 42\r\n42\r\n"],
                                                        [1.0, "r", "100x30"]]
    assert all(line.endswith("\n") and line.count("\n") == 1 for line in lines)


def test_frames_are_checked() -> None:
    assert is_frame([0.5, "o", "x"]) and is_frame([0, "r", "80x24"])
    for bad in ([0.5, "i", "x"], [-1, "o", "x"], [True, "o", "x"], [0.1, "o", 3],
                [float("nan"), "o", ""], [float("inf"), "o", ""], [0.1, "o"], (0.1, "o", "x"), "x"):
        assert not is_frame(bad), bad


@settings(max_examples=300, deadline=None, database=None,
          derandomize=os.environ.get("CI", "").lower() in ("1", "true", "yes"))
@given(st.lists(st.one_of(st.text(max_size=20).map(str.encode), st.binary(max_size=6)),
                max_size=20).map(b"".join),
       st.lists(st.integers(0, 400), max_size=12))
def test_bytes_split_anywhere_decode_as_the_whole(data: bytes, cuts: list[int]) -> None:
    """UTF-8 text mixed with random bytes, in random chunks, gives the text of the whole,
    however it is split."""
    recorder = CastRecorder(clock=Clock())
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    for start, end in zip(points, points[1:], strict=False):
        recorder.output(data[start:end])
    recorder.finish()
    assert text_of(drain(recorder)) == data.decode("utf-8", errors="replace")
