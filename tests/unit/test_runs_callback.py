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
    MAX_META_BYTES,
    MAX_NAME_CHARS,
    NO_LOG_MSG,
    EventSender,
    MarcoRunsCallback,
    SenderProcess,
    check_mode,
    clean_result,
    delegated_host,
    host_result,
    run_meta,
    run_title,
)
from marco.controller_client import call_controller
from marco.errors import AgentUnreachable, MarcoError
from marco.tokens import TokenSigner
from tests.support.controller_process import ControllerProcess
from tests.support.users import UnixUser


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


@pytest.mark.parametrize("spelling", [
    ["-e", "pw=SECRET"], ["-ePW=SECRET"], ["--extra-vars", "pw=SECRET"],
    ["--extra-vars=pw=SECRET"], ["--extra", "pw=SECRET"], ["--extra-v=pw=SECRET"],
    ["-Ce", "pw=SECRET"], ["-CePW=SECRET"], ["-De", "{\"pw\": \"SECRET\"}"]])
def test_every_extra_vars_spelling_ansible_takes_is_hidden(spelling: list[str]) -> None:
    """Ansible's parser takes abbreviated long options and combined short flags: each is
    hidden, and the playbook, harmless flags and `@file` stay."""
    title = run_title(["site.yml", "-l", "web", *spelling, "--diff", "-e", "@vars.yml"])
    assert "SECRET" not in title, title
    assert title.startswith("ansible-playbook site.yml -l web ") and "<hidden>" in title
    assert title.endswith("--diff -e @vars.yml"), title


def test_check_mode_is_found_in_every_spelling() -> None:
    for argv in (["-C"], ["--check"], ["--che"], ["-DC"], ["-Ce", "x=1"]):
        assert check_mode(["site.yml", *argv]), argv
    assert not check_mode(["site.yml", "-D", "-e", "check=1"])


def test_loop_results_lose_their_invocation_and_internal_keys() -> None:
    result = {"changed": True, "results": [
        {"item": n, "invocation": {"module_args": {"pw": "SECRET"}}, "_ansible_no_log": False,
         "_ansible_item_label": "SECRET", "rc": 0} for n in range(3)]}
    deep: dict[str, Any] = {"invocation": "SECRET"}
    for _ in range(100):
        deep = {"next": deep}
    result["deep"] = deep
    cleaned = clean_result(result, MAX_EVENT_BYTES)
    assert "SECRET" not in json.dumps(cleaned), cleaned
    assert [r["item"] for r in cleaned["results"]] == [0, 1, 2]
    assert cleaned["results"][0] == {"item": 0, "rc": 0}


class Stats:
    """What the recap reads of Ansible's AggregateStats."""

    def __init__(self, **failures: int) -> None:
        self.processed = {"h1": 1, "h2": 1}
        self.failures = failures

    def summarize(self, host: str) -> dict[str, int]:
        return {"ok": 2, "changed": 1, "failures": self.failures.get(host, 0),
                "unreachable": 0, "skipped": 0}


@pytest.fixture
def controller(start_controller: Any) -> ControllerProcess:
    dev: ControllerProcess = start_controller(pki=None)
    return dev


def registered_callback(controller: ControllerProcess, token: str,
                        sender: EventSender | None) -> MarcoRunsCallback:
    """A callback as `_register` leaves it for a run registered on the real controller, with
    `sender` (a test double's posts, or None: the sender process did not start)."""
    run = call_controller(controller.url, "/api/runs", token,
                          {"kind": "playbook", "title": "ansible-playbook site.yml"})
    callback = MarcoRunsCallback()
    callback._plugin_options = {"flush_seconds": 0.3, "timeout": 5.0}
    callback.run_id, callback.sender = run["id"], sender
    callback.permalink = f"{controller.url}/runs/{run['id']}"
    callback.finish_to = (controller.url, token, 5.0)
    return callback


@pytest.mark.parametrize("case", ["post fails", "flush times out", "no sender"])
def test_a_recap_not_sent_ends_the_run_with_a_finish(
        case: str, controller: ControllerProcess, signer: TokenSigner,
        alice: UnixUser) -> None:
    """The recap did not reach the controller: the run is ended by POST /finish with the
    stats' status, instead of staying `running`."""
    token = signer.issue(alice.name)
    fake = Controller(fail=case == "post fails")
    if case == "post fails":
        fake.release.set()
    sender = None if case == "no sender" else EventSender(fake.post, 100)
    callback = registered_callback(controller, token, sender)
    if sender is not None:
        callback._emit({"type": "play_start", "play": "p", "play_id": "p1"})
        assert fake.entered.wait(10)
    callback.v2_playbook_on_stats(Stats(h2=1))
    fake.release.set()
    run = controller.get_json(f"/api/runs/{callback.run_id}", token)
    assert run["status"] == "failed" and run["ended"] is not None, run
    assert callback.ended
    callback._interrupted()  # at exit: the run is ended already, nothing more is sent


def test_a_recap_sent_is_not_followed_by_a_finish(
        controller: ControllerProcess, signer: TokenSigner, alice: UnixUser) -> None:
    """The recap went out (a real sender posting to the real controller): it ends the run."""
    token = signer.issue(alice.name)
    callback = registered_callback(controller, token, None)
    process = SenderProcess(controller.url, f"/api/runs/{callback.run_id}/events", token, 5.0)
    callback.process, callback.sender = process, EventSender(process.post, 100)
    callback.v2_playbook_on_stats(Stats())
    run = controller.get_json(f"/api/runs/{callback.run_id}", token)
    assert run["status"] == "ok" and [e["type"] for e in run["events"]] == ["recap"], run
    assert callback.ended and not callback.warned


class Named:
    """A play or task as the callback reads it: a name, an id, a module."""

    def __init__(self, name: str, uuid: str, action: str = "ansible.builtin.command") -> None:
        self.name, self._uuid, self.action, self.resolved_action = name, uuid, action, action
        self.no_log, self.delegate_to = False, None

    def get_name(self) -> str:
        return self.name


def test_huge_play_and_task_names_are_cut_so_the_run_keeps_its_events(
        controller: ControllerProcess, signer: TokenSigner, alice: UnixUser) -> None:
    """A name larger than an event may be would have the controller refuse its batch and
    the callback drop every later event: names are cut to 1,000 characters with "…"."""
    token = signer.issue(alice.name)
    callback = registered_callback(controller, token, None)
    process = SenderProcess(controller.url, f"/api/runs/{callback.run_id}/events", token, 5.0)
    callback.process, callback.sender = process, EventSender(process.post, 100)
    callback.v2_playbook_on_play_start(Named("p" * 70_000, "play-1"))
    callback.v2_playbook_on_task_start(Named("t" * 70_000, "task-1", "x" * 70_000), False)
    callback.v2_playbook_on_stats(Stats())
    run = controller.get_json(f"/api/runs/{callback.run_id}", token)
    assert [e["type"] for e in run["events"]] == ["play_start", "task_start", "recap"], run
    play, task = run["events"][0], run["events"][1]
    assert play["play"] == "p" * 999 + "…" and task["task"] == "t" * 999 + "…"
    assert len(task["action"]) == MAX_NAME_CHARS
    assert run["status"] == "ok" and not callback.warned


def test_a_huge_command_line_fits_the_runs_meta() -> None:
    meta = run_meta("/p/site.yml", ["site.yml", *(["-l", "h" * 3000] * 20)])
    assert len(json.dumps(meta).encode()) <= MAX_META_BYTES
    assert meta["args"][0] == "site.yml" and meta["args"][-1].endswith(" more)")
    assert len(meta["args"][2]) == MAX_NAME_CHARS  # one argument is cut too
    assert run_meta("/p/site.yml", ["site.yml", "-l", "web"])["args"] == ["site.yml", "-l", "web"]


def test_a_result_with_nan_is_still_json_the_controller_takes() -> None:
    cleaned = clean_result({"ansible_facts": {"x": float("nan"), "y": [float("inf")]}},
                           MAX_EVENT_BYTES)
    assert cleaned == {"ansible_facts": {"x": "nan", "y": ["inf"]}}
    json.dumps(cleaned, allow_nan=False)


class Result:
    """What `delegated_host` reads of an ansible-core 2.19 CallbackTaskResult."""

    def __init__(self, data: dict[str, Any], fields: dict[str, Any], delegate_to: Any) -> None:
        self.result, self.task_fields = data, fields
        self.task = Named("task", "t1")
        self.task.delegate_to = delegate_to


@pytest.mark.parametrize(("data", "fields", "task", "expected"), [
    ({}, {}, None, None),                                                  # not delegated
    ({"_ansible_delegated_vars": {"ansible_host": "10.0.0.2"}}, {"delegate_to": "e2"},
     "{{ groups.all[1] }}", "e2"),                                         # 2.19: rendered fields
    ({}, {}, "e3", "e3"),                                                  # the task's own
    ({"_ansible_delegated_vars": {"ansible_delegated_host": "e4"}}, {}, None, "e4"),  # < 2.19
    ({}, {"delegate_to": "{{ item }}"}, "{{ item }}", None),               # a loop's items differ
])
def test_the_delegated_host_is_the_inventory_name(data: dict[str, Any], fields: dict[str, Any],
                                                  task: Any, expected: str | None) -> None:
    assert delegated_host(Result(data, fields, task)) == expected


def test_a_delegated_result_carries_its_delegate_even_under_no_log() -> None:
    controller = Controller()
    controller.release.set()
    callback = MarcoRunsCallback()
    callback.sender = EventSender(controller.post, 100)
    result = Result({"changed": True, "rc": 0, "_ansible_delegated_vars": {
        "ansible_host": "10.0.0.2"}}, {"delegate_to": "e2"}, "e2")
    result.host = Named("e1", "h1")  # type: ignore[attr-defined]
    callback.v2_runner_on_ok(result)
    result.task.no_log = True
    callback.v2_runner_on_ok(result)
    assert callback.sender.flush(10)
    shown, hidden = [e for batch in controller.batches for e in batch]
    assert shown["delegate"] == hidden["delegate"] == "e2" and shown["host"] == "e1"
    assert "_ansible_delegated_vars" not in shown["result"] and "result" not in hidden


def test_a_result_with_a_lone_surrogate_is_measured_as_the_controller_counts_it() -> None:
    """UTF-8 cannot hold a lone surrogate: the controller then escapes every non-ASCII
    character (6 bytes each), and the result must fit as it counts."""
    result = {"stdout": "\udcff" + "é" * 40_000, "rc": 0}
    cleaned = clean_result(result, MAX_EVENT_BYTES)
    assert len(json.dumps(cleaned, separators=(",", ":")).encode()) <= MAX_EVENT_BYTES
    assert cleaned["rc"] == 0 and cleaned["stdout"].endswith("(cut)")
