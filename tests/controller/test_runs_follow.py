"""The run page's output views as a tool people live in (issue 13), in a real chromium against
a real controller and agent: a pane follows its new lines, stops when scrolled up (with a "Jump
to latest" button) and follows again from it; new lines never move a reader scrolled up, and
no line is dropped; line times shown and hidden by a remembered "Timestamps" toggle; a pane's
duration once its run ended."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from playwright.sync_api import Page, expect

from marco.tokens import TokenSigner
from tests.support.agent_process import AgentProcess
from tests.support.command_runs import start_command_run
from tests.support.controller_process import ControllerProcess
from tests.support.http import call
from tests.support.names import unique_node_name
from tests.support.pki import TestPki
from tests.support.users import UnixUser
from tests.support.waiting import wait_for
from tests.support.web import TIMEOUT_MS, open_logged_in

Cluster = tuple[ControllerProcess, AgentProcess]
# A command that prints a line every ~10 ms for several seconds: the page reads it as it runs.
SLOW = "for i in $(seq 1 1500); do echo line-$i; sleep 0.01; done"
LINE_HEIGHT = 17  # px of an output line (output_view.js): the scroll height is lines x 17
# Where a line is in its pane's scroll area.
IN_PANE = ("l => l.getBoundingClientRect().top"
           " - l.closest('.output-scroll').getBoundingClientRect().top")
TIME = re.compile(r'^"\d\d:\d\d:\d\d\.\d{3} "$')  # a line's ::before content when shown


def line_count(pre: Any) -> int:
    """The lines the output view counts (its scroll height is lines x LINE_HEIGHT)."""
    return int(pre.evaluate(f"pre => Math.round(pre.scrollHeight / {LINE_HEIGHT})"))


def at_bottom(pre: Any) -> bool:
    return bool(pre.evaluate(
        "pre => pre.scrollHeight - pre.scrollTop - pre.clientHeight < 4"))


def wait_for_lines(page: Page, pre: Any, more_than: int) -> None:
    """Until the pane counts more than `more_than` lines (the run goes on printing); checked in
    the page so no scroll of ours comes between, and given up after TIMEOUT_MS."""
    pre.evaluate("(pre, [n, h, ms]) => new Promise((resolve, reject) => {"
                 " const end = Date.now() + ms, count = () => Math.round(pre.scrollHeight / h);"
                 " const check = () => count() > n ? resolve()"
                 " : Date.now() > end ? reject(new Error(`still ${count()} lines`))"
                 " : setTimeout(check, 50); check(); })", [more_than, LINE_HEIGHT, TIMEOUT_MS])


def test_a_pane_follows_stops_when_scrolled_up_and_jumps_to_latest(
        browser: Any, one_agent: Cluster, alice: UnixUser, signer: TokenSigner) -> None:
    controller, agent = one_agent
    token = signer.issue(alice.name)
    run_id = start_command_run(controller, token, agent.node_name, SLOW)
    page: Page = browser.new_context().new_page()
    page.set_default_timeout(TIMEOUT_MS)
    open_logged_in(page, controller, alice, f"/runs/{run_id}")
    pane = page.locator(f'.host-pane[data-host="{agent.node_name}"]')
    pre = pane.locator(".output-scroll")
    jump = pane.get_by_role("button", name=f"Jump to latest output of {agent.node_name}")
    # Following: more lines than the pane holds, and it stays at its bottom as they come.
    wait_for_lines(page, pre, 100)
    shown = line_count(pre)
    wait_for_lines(page, pre, shown)
    assert pre.evaluate("pre => pre.scrollHeight > 2 * pre.clientHeight")
    assert at_bottom(pre)
    expect(jump).to_be_hidden()
    # Scrolled up: the button shows, and new lines do not move the reader.
    pre.evaluate("pre => { pre.scrollTop = 0; }")
    expect(jump).to_be_visible()
    expect(pre.locator('.line[data-seq="0"]')).to_have_text("line-1")
    shown = line_count(pre)
    wait_for_lines(page, pre, shown)
    assert pre.evaluate("pre => pre.scrollTop") == 0
    assert pre.locator('.line[data-seq="0"]').evaluate(IN_PANE) == 0
    expect(jump).to_be_visible()
    # The button (by keyboard too): at the bottom again, following, the button gone.
    jump.focus()
    page.keyboard.press("Enter")
    expect(jump).to_be_hidden()
    assert at_bottom(pre)
    shown = line_count(pre)
    wait_for_lines(page, pre, shown)
    assert at_bottom(pre)
    # Scrolled up by keyboard (PageUp on the focused output), End follows again.
    pre.focus()
    page.keyboard.press("PageUp")
    expect(jump).to_be_visible()
    page.keyboard.press("End")
    expect(jump).to_be_hidden()
    shown = line_count(pre)
    wait_for_lines(page, pre, shown)
    assert at_bottom(pre)
    # Once the run ended, the pane gives its duration.
    expect(pane.locator(".pane-took")).to_have_text(re.compile(r"^took \d"),
                                                    timeout=60_000)
    page.context.close()


def test_an_open_results_output_follows_and_jumps_to_latest(
        browser: Any, one_agent: Cluster, alice: UnixUser, signer: TokenSigner) -> None:
    """A playbook's open result: its task's running execution is followed the same way."""
    controller, agent = one_agent
    token = signer.issue(alice.name)
    host = agent.node_name
    status, answer = call(controller, "POST", "/api/runs",
                          {"kind": "playbook", "title": "ansible-playbook follow.yml"}, token)
    assert status == 201, answer
    run_id = str(answer["id"])
    status, answer = call(controller, "POST", f"/api/runs/{run_id}/events", {"events": [
        {"type": "task_start", "task": "print", "task_id": "t1", "play_id": "p1",
         "action": "ansible.builtin.shell"},
        {"type": "host_result", "task_id": "t1", "host": host, "status": "ok", "rc": 0,
         "duration": 1.5}]}, token)
    assert status == 200, answer
    agent.client(token).start(SLOW, tags={"run": run_id, "task": "t1", "host": host})
    page: Page = browser.new_context().new_page()
    page.set_default_timeout(TIMEOUT_MS)
    open_logged_in(page, controller, alice, f"/runs/{run_id}")
    page.locator(f'tr.grid-task[data-task="t1"] button.cell[data-host="{host}"]').click()
    pre = page.locator("#details-output .output-scroll")
    jump = page.get_by_role("button", name="Jump to latest output of this result")
    wait_for_lines(page, pre, 100)
    assert at_bottom(pre)
    expect(jump).to_be_hidden()
    pre.evaluate("pre => { pre.scrollTop = 0; }")
    expect(jump).to_be_visible()
    shown = line_count(pre)
    wait_for_lines(page, pre, shown)
    assert pre.evaluate("pre => pre.scrollTop") == 0
    jump.click()
    expect(jump).to_be_hidden()
    assert at_bottom(pre)
    page.context.close()


def test_new_lines_do_not_move_a_reader_scrolled_up_and_none_is_dropped(
        browser: Any, one_agent: Cluster, alice: UnixUser, signer: TokenSigner) -> None:
    """While the reader looks at line 12,000, 15,000 more lines come: that line stays where it
    is in the pane, and every line stays reachable (line 1 and the last)."""
    controller, agent = one_agent
    token = signer.issue(alice.name)
    gate = Path(tempfile.mkdtemp(prefix="follow-gate-")) / "go"
    gate.parent.chmod(0o755)
    command = (f"seq 1 15000; while [ ! -e {gate} ]; do sleep 0.1; done; seq 15001 30000")
    run_id = start_command_run(controller, token, agent.node_name, command)
    page: Page = browser.new_context().new_page()
    page.set_default_timeout(TIMEOUT_MS)
    open_logged_in(page, controller, alice, f"/runs/{run_id}")
    pane = page.locator(f'.host-pane[data-host="{agent.node_name}"]')
    pre = pane.locator(".output-scroll")
    wait_for_lines(page, pre, 14999)
    pre.evaluate(f"pre => {{ pre.scrollTop = 11999 * {LINE_HEIGHT} - 50; }}")
    line = pre.locator('.line[data-seq="11999"]')
    expect(line).to_have_text("12000")
    where = line.evaluate(IN_PANE)
    gate.touch()
    wait_for_lines(page, pre, 29999)
    expect(pane.get_by_role("button", name=re.compile("^Jump to latest"))).to_be_visible()
    assert line.evaluate(IN_PANE) == where
    pre.evaluate("pre => { pre.scrollTop = 0; }")
    expect(pre.locator('.line[data-seq="0"]')).to_have_text("1")
    pre.evaluate("pre => { pre.scrollTop = pre.scrollHeight; }")
    expect(pre.locator('.line[data-seq="29999"]')).to_have_text("30000")
    shutil.rmtree(gate.parent)
    page.context.close()


def before(line: Any) -> str:
    return str(line.evaluate("l => getComputedStyle(l, '::before').content"))


def test_timestamps_toggle_shows_line_times_and_is_remembered(
        browser: Any, one_agent: Cluster, alice: UnixUser, signer: TokenSigner) -> None:
    controller, agent = one_agent
    token = signer.issue(alice.name)
    run_id = start_command_run(controller, token, agent.node_name, "echo first; echo second")
    page: Page = browser.new_context().new_page()
    page.set_default_timeout(TIMEOUT_MS)
    open_logged_in(page, controller, alice, f"/runs/{run_id}")
    line = page.locator(".host-pane .line.stdout", has_text="second")
    expect(line).to_have_text("second")
    toggle = page.get_by_role("checkbox", name="Timestamps")
    expect(toggle).not_to_be_checked()
    assert before(line) == "none"
    toggle.check()
    assert TIME.match(before(line)), before(line)
    expect(line).to_have_text("second")  # the time is not part of the line's text
    toggle.uncheck()
    assert before(line) == "none"
    toggle.check()
    page.reload()
    line = page.locator(".host-pane .line.stdout", has_text="second")
    expect(line).to_have_text("second")
    expect(page.get_by_role("checkbox", name="Timestamps")).to_be_checked()
    assert TIME.match(before(line)), before(line)
    page.context.close()


def duration_text(seconds: float) -> str:
    """fmtDuration of runs.js, below a minute."""
    return f"{round(seconds * 1000)} ms" if seconds < 1 else f"{seconds:.1f} s"


def test_a_pane_gives_its_executions_duration_on_the_nodes_clock(
        browser: Any, one_agent: Cluster, alice: UnixUser, signer: TokenSigner) -> None:
    """A pane says how long its host's execution took, from its start to its end as the agent
    gives them (not the run's own duration, which also counts the controller's part)."""
    controller, agent = one_agent
    token = signer.issue(alice.name)
    run_id = start_command_run(controller, token, agent.node_name, "sleep 0.4; echo done")
    wait_for(lambda: call(controller, "GET", f"/api/runs/{run_id}?limit=1",
                          token=token)[1]["ended"], what="the run ended")
    status, answer = call(controller, "GET", f"/api/runs/{run_id}/executions", token=token)
    assert status == 200, answer
    (execution,) = answer["executions"]
    took = execution["ended"] - execution["started"]
    assert took >= 0.4 and execution["rc"] == 0  # it slept that long
    page: Page = browser.new_context().new_page()
    page.set_default_timeout(TIMEOUT_MS)
    open_logged_in(page, controller, alice, f"/runs/{run_id}")
    pane = page.locator(f'.host-pane[data-host="{agent.node_name}"]')
    expect(pane.locator(".pane-took")).to_have_text(f"took {duration_text(took)}")
    page.context.close()


def test_a_pane_whose_execution_was_lost_gives_the_runs_duration(
        browser: Any, one_agent: Cluster, alice: UnixUser, signer: TokenSigner,
        secret_file: Path, pki: TestPki, tmp_path: Path) -> None:
    """An execution whose node restarted without it is archived with no end: once the run has
    ended the pane says how long the run took, not "running for" a time that keeps growing."""
    controller, _ = one_agent
    token = signer.issue(alice.name)
    name = unique_node_name("lost")
    gate = Path(tempfile.mkdtemp(prefix="lost-gate-"))
    gate.chmod(0o755)
    agent = AgentProcess(secret_file, tmp_path / "before" / "state", node_name=name,
                         announce=True, pki=pki)
    try:
        wait_for(lambda: name in controller.inventory_hosts(token), what="the agent discovered")
        status, answer = call(controller, "POST", "/api/runs",
                              {"kind": "command", "title": "wait", "hosts": [name]}, token)
        assert status == 201, answer
        run_id = str(answer["id"])
        with agent.client(token) as client:
            client.start(f"until [ -e {gate}/end ]; do sleep 0.05; done",
                         tags={"run": run_id, "host": name})
        # Listed once by its agent: the controller records it, with its start.
        (listed,) = executions_of(controller, token, run_id)
        assert isinstance(listed["started"], (int, float)) and listed["ended"] is None, listed
        # The node restarts without its state: it no longer has the execution.
        agent.stop()
        agent = AgentProcess(secret_file, tmp_path / "after" / "state", node_name=name,
                             announce=True, pki=pki, port=agent.port)
        wait_for(lambda: name in controller.inventory_hosts(token), what="the agent back")
        status, run = call(controller, "POST", f"/api/runs/{run_id}/finish",
                           {"status": "interrupted"}, token)
        assert status == 200, run
        wait_for(lambda: executions_of(controller, token, run_id)[0]["archived"],
                 timeout=120, what="the lost execution archived")
        (lost,) = executions_of(controller, token, run_id)
        assert lost["ended"] is None and lost["state"] != "running", lost
        page: Page = browser.new_context().new_page()
        page.set_default_timeout(TIMEOUT_MS)
        open_logged_in(page, controller, alice, f"/runs/{run_id}")
        took = page.locator(f'.host-pane[data-host="{name}"] .pane-took')
        expect(took).to_have_text(f"took {duration_text(run['ended'] - run['started'])}")
        expect(took).to_have_attribute("title", "the run's duration, from its start to its end")
        page.context.close()
    finally:
        (gate / "end").touch()
        agent.stop()
        shutil.rmtree(gate, ignore_errors=True)


def executions_of(controller: ControllerProcess, token: str, run_id: str) -> list[Any]:
    status, answer = call(controller, "GET", f"/api/runs/{run_id}/executions", token=token)
    assert status == 200, answer
    return list(answer["executions"])
