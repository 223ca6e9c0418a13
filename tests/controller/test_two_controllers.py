"""Two real controllers on one real PostgreSQL database (issue 15, item 6): both see every
node (each discovers it on its own), a run recorded through one is listed and followed live on
the other, a logout on one is refused by the other, failed logins on one count on the other,
and stopping one loses nothing."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from marco.tokens import TokenSigner
from tests.support.agent_process import AgentProcess
from tests.support.controller_process import ControllerProcess
from tests.support.http import call
from tests.support.users import UnixUser
from tests.support.waiting import wait_for
from tests.support.web import open_logged_in

Pair = tuple[ControllerProcess, ControllerProcess, str]
FOLLOW_WAIT = 25  # s a long poll may wait (the default runs_wait_max)
FOLLOW_DEADLINE = 20.0  # s the test gives a follower on the other controller: less than that
LIVE_MS = 15_000  # what a page on the other controller gets to show a batch: less than a wait
pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def pair(start_controller: Callable[..., ControllerProcess],
         start_agent: Callable[..., AgentProcess], postgres_url: str,
         unique_name: Callable[[str], str], alice: UnixUser, signer: TokenSigner) -> Pair:
    """Controllers A and B on one database, and an agent both discover by zeroconf."""
    options = ["--database", postgres_url, "--login-max-failures", "2"]
    a, b = start_controller(extra_args=options), start_controller(extra_args=options)
    node = start_agent(unique_name("two"), announce=True).node_name
    token = signer.issue(alice.name)
    for controller in (a, b):
        wait_for(lambda c=controller: node in c.inventory_hosts(token),  # type: ignore[misc]
                 what="the agent discovered by both controllers")
    return a, b, node


def new_run(controller: ControllerProcess, token: str, node: str) -> str:
    status, answer = call(controller, "POST", "/api/runs",
                          {"kind": "playbook", "title": "site.yml", "hosts": [node]}, token)
    assert status == 201, answer
    return str(answer["id"])


def send(controller: ControllerProcess, token: str, run_id: str, *events: Any) -> None:
    status, answer = call(controller, "POST", f"/api/runs/{run_id}/events",
                          {"events": list(events)}, token)
    assert status == 200, answer


def task(name: str) -> dict[str, Any]:
    return {"type": "task_start", "task": name, "task_id": name, "play_id": "p1"}


def log_mentions(controller: ControllerProcess, pattern: str) -> bool:
    return re.search(pattern, controller.log()) is not None


class Follower(threading.Thread):
    """A long poll for a run's events after `since` on one controller (as the run page asks)."""

    def __init__(self, controller: ControllerProcess, token: str, run_id: str,
                 since: int) -> None:
        super().__init__(daemon=True)
        self.controller, self.token, self.run_id, self.since = controller, token, run_id, since
        self.answer: tuple[int, Any] | None = None

    def run(self) -> None:
        self.answer = call(self.controller, "GET", f"/api/runs/{self.run_id}?since="
                           f"{self.since}&wait={FOLLOW_WAIT}", token=self.token)


def test_a_run_recorded_through_one_is_listed_and_followed_live_on_the_other(
        pair: Pair, alice: UnixUser, signer: TokenSigner) -> None:
    a, b, node = pair
    token = signer.issue(alice.name)
    run_id = new_run(a, token, node)
    send(a, token, run_id, {"type": "play_start", "play": "all", "play_id": "p1"})
    status, listing = call(b, "GET", "/api/runs", token=token)
    assert status == 200 and [run["id"] for run in listing["runs"]] == [run_id]
    # B waits for the events after the first (the run page's long poll) ...
    follower = Follower(b, token, run_id, since=1)
    follower.start()
    wait_for(lambda: log_mentions(b, rf"run {run_id}: a read of {alice.name} waits for "
                                     r"events after 1"), what="B's follower waiting")
    # ... and is answered as soon as A records the next batch, long before its wait is over.
    send(a, token, run_id, task("ping"))
    follower.join(FOLLOW_DEADLINE)
    assert not follower.is_alive(), "B's follower was not woken by A's batch"
    assert follower.answer is not None and follower.answer[0] == 200
    assert [event["type"] for event in follower.answer[1]["events"]] == ["task_start"]


def test_a_run_page_on_one_shows_the_run_recorded_through_the_other_live(
        browser: Any, pair: Pair, alice: UnixUser, signer: TokenSigner) -> None:
    a, b, node = pair
    token = signer.issue(alice.name)
    run_id = new_run(a, token, node)
    send(a, token, run_id, {"type": "play_start", "play": "all", "play_id": "p1"}, task("t1"))
    page: Page = browser.new_context().new_page()
    open_logged_in(page, b, alice, f"/runs/{run_id}")
    expect(page.locator("#run-status")).to_have_text("running")
    # The page's long poll waits on B after the two events it has ...
    wait_for(lambda: log_mentions(b, rf"run {run_id}: a read of {alice.name} waits for "
                                     r"events after 2"), what="the page following on B")
    # ... and shows A's next batch and the run's end before that wait is over.
    send(a, token, run_id, {"type": "host_result", "task_id": "t1", "host": node,
                            "status": "changed", "rc": 0, "duration": 0.1})
    cell = page.locator(f'tr.grid-task[data-task="t1"] button.cell[data-host="{node}"]')
    expect(cell).to_have_class(re.compile(r"\bstatus-changed\b"), timeout=LIVE_MS)
    send(a, token, run_id, {"type": "recap", "stats": {node: {"ok": 1, "changed": 1}}})
    expect(page.locator("#run-status")).to_have_text("ok", timeout=LIVE_MS)
    page.context.close()


def test_a_logout_on_one_is_refused_by_the_other(pair: Pair, alice: UnixUser,
                                                 signer: TokenSigner) -> None:
    a, b, _ = pair
    plain = signer.issue(alice.name)
    # Tokens of one user and second are one string: the other one is of a later second.
    everywhere = wait_for(lambda: (t := signer.issue(alice.name)) != plain and t,
                          what="a second token")
    for token in (plain, everywhere):
        assert call(b, "GET", "/api/runs", token=token)[0] == 200
    assert call(a, "POST", "/api/logout", token=plain)[0] == 200
    wait_for(lambda: call(b, "GET", "/api/runs", token=plain)[0] == 401,
             what="B refusing the token logged out on A")
    assert call(b, "GET", "/api/runs", token=everywhere)[0] == 200  # only that one token
    assert call(a, "POST", "/api/revoke", token=everywhere)[0] == 200
    wait_for(lambda: call(b, "GET", "/api/runs", token=everywhere)[0] == 401,
             what="B refusing the tokens logged out everywhere on A")
    assert "read from the database: 1 user(s) logged out everywhere" in b.log()


def test_failed_logins_on_one_lock_the_user_out_of_the_other(pair: Pair,
                                                             alice: UnixUser) -> None:
    a, b, _ = pair
    wrong = {"user": alice.name, "password": "not-" + alice.password}
    for _ in range(2):  # --login-max-failures 2
        assert call(a, "POST", "/api/token", wrong)[0] == 401
    status, answer = call(b, "POST", "/api/token",
                          {"user": alice.name, "password": alice.password})
    assert (status, answer["error"]) == (429, "too_many_attempts"), answer


def test_stopping_one_loses_nothing(pair: Pair, alice: UnixUser, signer: TokenSigner) -> None:
    a, b, node = pair
    token = signer.issue(alice.name)
    run_id = new_run(a, token, node)
    send(a, token, run_id, {"type": "play_start", "play": "all", "play_id": "p1"}, task("t1"))
    a.stop()
    # B serves the run recorded through A, records more of it, and ends it.
    send(b, token, run_id, task("t2"))
    send(b, token, run_id, {"type": "recap", "stats": {node: {"ok": 2}}})
    status, run = call(b, "GET", f"/api/runs/{run_id}", token=token)
    assert status == 200 and run["status"] == "ok" and len(run["events"]) == 4
    # A comes back and sees all of it, and B's revocations made while it was down.
    assert call(b, "POST", "/api/revoke", token=signer.issue(alice.name))[0] == 200
    # Neither told nor polling for a while: what A knows of B's revocation, it read at start.
    with restarted(a, "--no-shared-listen", "--shared-poll", "600") as back:
        status, run = call(back, "GET", f"/api/runs/{run_id}", token=token)
        assert status == 401  # logged out everywhere on B while A was down
        fresh = wait_for(lambda: fresh_token(back, alice), what="a new login on A")
        status, run = call(back, "GET", f"/api/runs/{run_id}", token=fresh)
        assert status == 200 and run["status"] == "ok" and len(run["events"]) == 4


def test_a_run_left_running_survives_the_others_restart(pair: Pair, alice: UnixUser,
                                                        signer: TokenSigner) -> None:
    """A controller starting on a shared database does not end the runs the other is
    recording (alone, it ends the runs its previous process left running)."""
    a, b, node = pair
    token = signer.issue(alice.name)
    run_id = new_run(b, token, node)
    a.stop()
    with restarted(a) as back:
        status, run = call(back, "GET", f"/api/runs/{run_id}", token=token)
        assert status == 200 and run["status"] == "running", run
        send(back, token, run_id, task("after the restart"))


@contextmanager
def restarted(controller: ControllerProcess, *more_args: str) -> Iterator[ControllerProcess]:
    """`controller` (stopped) started again, and stopped after the block (the fixture stops
    only the processes it started)."""
    back = controller.restarted(more_args)
    try:
        yield back
    finally:
        back.stop()


def fresh_token(controller: ControllerProcess, user: UnixUser) -> str | None:
    """A token from a password login (None while the login is refused)."""
    status, answer = call(controller, "POST", "/api/token",
                          {"user": user.name, "password": user.password})
    return str(answer["token"]) if status == 200 else None
