"""The marco_runs callback's pieces without Ansible running: the title's hidden extra vars,
results cleaned and bounded, no_log results, and the one sender thread (batches, the first
failure drops the rest, a bounded flush)."""

from __future__ import annotations

import json
import socket
import threading
from typing import Any

import pytest

from ansible_plugins.core.runs_callback import (
    MAX_EVENT_BYTES,
    NO_LOG_MSG,
    EventSender,
    SenderProcess,
    clean_result,
    host_result,
    run_title,
)
from marco.errors import AgentUnreachable, MarcoError


def test_inline_extra_vars_are_hidden_in_the_title() -> None:
    title = run_title(["site.yml", "-l", "web", "-e", "password=hunter2", "-e@vars.yml",
                       "--extra-vars=token=abc", "--extra-vars", "@more.yml", "-eX=1"])
    assert title == ("ansible-playbook site.yml -l web -e '<hidden>' -e@vars.yml "
                     "'--extra-vars=<hidden>' --extra-vars @more.yml '-e<hidden>'")
    assert len(run_title(["x" * 5000])) == 1000


def test_a_result_loses_invocation_and_internal_keys_and_fits() -> None:
    result = {"stdout": "x" * 200_000, "rc": 0, "invocation": {"module_args": {"pw": "s"}},
              "_ansible_no_log": False, "changed": True, "stdout_lines": ["x" * 1000] * 100}
    cleaned = clean_result(result, MAX_EVENT_BYTES)
    assert "invocation" not in cleaned and "_ansible_no_log" not in cleaned
    assert len(json.dumps(cleaned).encode()) <= MAX_EVENT_BYTES
    assert cleaned["rc"] == 0 and cleaned["changed"] is True  # small values stay whole
    assert cleaned["stdout"].startswith("xxx") and cleaned["stdout"].endswith("(cut)")


def test_a_no_log_result_is_only_its_message() -> None:
    event = host_result({"type": "host_result", "host": "h", "no_log": True,
                         "raw_result": {"stdout": "secret", "rc": 3}})
    assert event == {"type": "host_result", "host": "h", "msg": NO_LOG_MSG, "rc": None}
    shown = host_result({"type": "host_result", "host": "h", "no_log": False,
                         "raw_result": {"msg": "m" * 5000, "rc": 3}})
    assert len(shown["msg"]) == 2000 and shown["rc"] == 3 and shown["result"]["rc"] == 3


class Controller:
    """A fake POST: records batches; can block until released, or fail."""

    def __init__(self, fail: bool = False) -> None:
        self.batches: list[list[dict[str, Any]]] = []
        self.calls = 0
        self.release = threading.Event()
        self.entered = threading.Event()
        self.fail = fail

    def post(self, events: list[dict[str, Any]]) -> None:
        self.calls += 1
        self.entered.set()
        self.release.wait(10)
        if self.fail:
            raise AgentUnreachable("cannot reach the controller")
        self.batches.append(events)


def test_events_queued_while_a_post_is_out_go_in_one_batch() -> None:
    controller = Controller()
    sender = EventSender(controller.post, 100)
    sender.put({"n": 0})
    assert controller.entered.wait(10)
    for n in range(1, 51):
        sender.put({"n": n})
    controller.release.set()
    assert sender.flush(10)
    assert [[e["n"] for e in batch] for batch in controller.batches] == [[0], list(range(1, 51))]


def test_after_a_failure_events_are_dropped() -> None:
    controller = Controller(fail=True)
    controller.release.set()
    sender = EventSender(controller.post, 100)
    sender.put({"n": 0})
    assert not sender.flush(10)
    assert sender.failure and "cannot reach" in sender.failure
    sender.put({"n": 1})
    assert not sender.flush(10)
    assert controller.calls == 1 and controller.batches == []  # one try, then nothing


def test_flush_waits_no_longer_than_asked() -> None:
    controller = Controller()  # never released until the end: a controller that hangs
    sender = EventSender(controller.post, 100)
    sender.put({"n": 0})
    assert controller.entered.wait(10)
    assert not sender.flush(0.2)
    controller.release.set()


def test_a_full_queue_drops_and_counts() -> None:
    controller = Controller()
    sender = EventSender(controller.post, 3)
    sender.put({"n": 0})
    assert controller.entered.wait(10)
    for n in range(1, 6):
        sender.put({"n": n})
    assert sender.dropped == 2
    controller.release.set()
    assert not sender.flush(10)  # all that fitted went out, but the run is incomplete
    assert [e["n"] for batch in controller.batches for e in batch] == [0, 1, 2, 3]


def test_the_sender_process_answers_each_batch() -> None:
    """The real `runs_sender` process: a controller out of reach is its error, raised by
    `post`; after the end of its input it ends."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        process = SenderProcess(f"http://127.0.0.1:{closed.getsockname()[1]}",
                                "/api/runs/r1/events", "token", 5.0)
        with pytest.raises(MarcoError, match="cannot reach the controller"):
            process.post([{"type": "play_start"}])
        process.close()
        assert process.process.wait(30) == 0
