"""Waiting for a run's next events (`GET /api/runs/ID?wait=S`, docs/runs.md) against a real
controller: a waiting read answers when the next batch arrives or the run ends, not after its
S seconds; a user's waiting reads are bounded; an ended run never waits; another user's run is
a 404 at once. Each wait here asks for 60 s (the controllers allow 120) while the test gives
it 30: a read that is not woken fails the test instead of passing late."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from marco.tokens import TokenSigner
from tests.support.controller_process import ControllerProcess
from tests.support.http import call
from tests.support.users import UnixUser
from tests.support.waiting import wait_for

LONG = 60  # seconds a read asks to wait: longer than any deadline below
ALLOW_LONG = ["--runs-wait-max", "120", "--no-discovery"]


class Read(threading.Thread):
    """One GET in a thread of its own; its answer once it has come."""

    def __init__(self, controller: ControllerProcess, token: str, path: str) -> None:
        super().__init__(daemon=True)
        self.controller, self.token, self.path = controller, token, path
        self.answer: tuple[int, Any] | None = None
        self.start()

    def run(self) -> None:
        self.answer = call(self.controller, "GET", self.path, token=self.token)

    def result(self) -> tuple[int, Any]:
        """The answer, within 30 s (far less than the wait it asked for)."""
        wait_for(lambda: self.answer is not None, timeout=30, what=f"the answer to {self.path}")
        assert self.answer is not None
        return self.answer


def new_run(controller: ControllerProcess, token: str) -> str:
    status, answer = call(controller, "POST", "/api/runs",
                          {"kind": "playbook", "title": "ansible-playbook wait.yml"}, token)
    assert status == 201, answer
    return str(answer["id"])


def waits(controller: ControllerProcess, run_id: str, count: int = 1) -> Callable[[], bool]:
    """Whether the controller has logged `count` reads of the run waiting (its debug log)."""
    return lambda: controller.log().count(f"run {run_id}: a read of ") >= count


def task(task_id: str) -> dict[str, Any]:
    return {"type": "task_start", "task": task_id, "task_id": task_id, "play_id": "p"}


def test_a_waiting_read_answers_when_the_next_batch_arrives(start_controller, alice: UnixUser,
                                                            signer: TokenSigner) -> None:
    controller = start_controller(extra_args=ALLOW_LONG)
    token = signer.issue(alice.name)
    run_id = new_run(controller, token)
    read = Read(controller, token, f"/api/runs/{run_id}?since=0&wait={LONG}")
    wait_for(waits(controller, run_id), what="the read to wait")
    status, answer = call(controller, "POST", f"/api/runs/{run_id}/events",
                          {"events": [task("t1")]}, token)
    assert status == 200, answer
    status, run = read.result()
    assert status == 200 and [e["task_id"] for e in run["events"]] == ["t1"]
    # The end wakes a read too, and says so.
    read = Read(controller, token, f"/api/runs/{run_id}?since=1&wait={LONG}")
    wait_for(waits(controller, run_id, 2), what="the second read to wait")
    call(controller, "POST", f"/api/runs/{run_id}/finish", {"status": "ok"}, token)
    status, run = read.result()
    assert status == 200 and run["events"] == [] and run["status"] == "ok"


def test_waiting_reads_are_bounded_per_user(start_controller, alice: UnixUser, bob: UnixUser,
                                            signer: TokenSigner) -> None:
    controller = start_controller(extra_args=["--runs-max-waiting-per-user", "1", *ALLOW_LONG])
    alices, bobs = signer.issue(alice.name), signer.issue(bob.name)
    first, second, bobs_run = new_run(controller, alices), new_run(controller, alices), \
        new_run(controller, bobs)
    held = Read(controller, alices, f"/api/runs/{first}?since=0&wait={LONG}")
    wait_for(waits(controller, first), what="alice's first read to wait")
    # Over alice's bound: her second read answers at once, as without wait.
    status, run = Read(controller, alices, f"/api/runs/{second}?since=0&wait={LONG}").result()
    assert status == 200 and run["events"] == [] and run["ended"] is None
    assert not controller.log().count(f"run {second}: a read of ")
    # Per user: bob still waits.
    bobs_read = Read(controller, bobs, f"/api/runs/{bobs_run}?since=0&wait={LONG}")
    wait_for(waits(controller, bobs_run), what="bob's read to wait")
    for token, run_id in ((alices, first), (bobs, bobs_run)):
        call(controller, "POST", f"/api/runs/{run_id}/events", {"events": [task("t")]}, token)
    assert held.result()[1]["events"][0]["task_id"] == "t"
    assert bobs_read.result()[1]["events"][0]["task_id"] == "t"


def test_an_ended_or_foreign_run_does_not_wait(start_controller, alice: UnixUser, bob: UnixUser,
                                               signer: TokenSigner) -> None:
    controller = start_controller(extra_args=ALLOW_LONG)
    token = signer.issue(alice.name)
    run_id = new_run(controller, token)
    call(controller, "POST", f"/api/runs/{run_id}/finish", {"status": "ok"}, token)
    status, run = Read(controller, token, f"/api/runs/{run_id}?since=0&wait={LONG}").result()
    assert status == 200 and run["status"] == "ok"
    running = new_run(controller, token)
    status, answer = Read(controller, signer.issue(bob.name),
                          f"/api/runs/{running}?since=0&wait={LONG}").result()
    assert status == 404, answer
    assert not controller.log().count(f"run {running}: a read of ")
    status, answer = call(controller, "GET", f"/api/runs/{running}?wait=-1", token=token)
    assert status == 400, answer
