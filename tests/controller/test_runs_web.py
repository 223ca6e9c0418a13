"""The runs pages in a real browser (Debian chromium + Playwright) against a real controller,
real agents and real Unix users: the list with its filters, a playbook's tasks × hosts grid
filled live, a command run's panes and re-run, permalinks, owners only, text stays text."""

from __future__ import annotations

import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from marco.tokens import TokenSigner
from tests.support.agent_process import AgentProcess
from tests.support.command_runs import ended_command_run, run_of
from tests.support.controller_process import ControllerProcess
from tests.support.daemon import stop_all
from tests.support.http import call
from tests.support.names import unique_node_name
from tests.support.pki import TestPki
from tests.support.users import UnixUser
from tests.support.waiting import wait_for
from tests.support.web import TIMEOUT_MS, fill_login, open_logged_in

Cluster = tuple[ControllerProcess, list[AgentProcess]]
HTML = '<b id="injected">bold?</b><img src=x id="injected-img">'


@pytest.fixture(scope="module")
def web_cluster(secret_file: Path, pki: TestPki, pam_service: str, signer: TokenSigner,
                alice: UnixUser, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A controller and two agents it discovers; the agents are kept, so a test can start an
    execution tagged as a playbook task's, as the marco connection plugin does."""
    workdir = tmp_path_factory.mktemp("runs-web")
    daemons: list[AgentProcess | ControllerProcess] = []
    try:
        controller = ControllerProcess(secret_file, workdir, pam_service=pam_service, pki=pki)
        daemons.append(controller)
        agents = [AgentProcess(secret_file, workdir / name / "state", node_name=name,
                               announce=True, pki=pki)
                  for name in (unique_node_name("node"), unique_node_name("node"))]
        daemons.extend(agents)
        token = signer.issue(alice.name)
        wait_for(lambda: {a.node_name for a in agents} <= set(controller.inventory_hosts(token)),
                 what="both agents discovered")
        yield controller, agents
    finally:
        stop_all(daemons)


def new_page(browser: Any, controller: ControllerProcess, user: UnixUser, path: str) -> Page:
    """A fresh browser context (no cookies) logged in as `user` and showing `path`."""
    page: Page = browser.new_context().new_page()
    open_logged_in(page, controller, user, path)
    return page


def playbook_run(controller: ControllerProcess, token: str, title: str) -> str:
    status, answer = call(controller, "POST", "/api/runs",
                          {"kind": "playbook", "title": title}, token)
    assert status == 201, answer
    return str(answer["id"])


def send(controller: ControllerProcess, token: str, run_id: str, *events: dict[str, Any]) -> None:
    status, answer = call(controller, "POST", f"/api/runs/{run_id}/events",
                          {"events": list(events)}, token)
    assert status == 200, answer


def task(task_id: str, name: str) -> dict[str, Any]:
    return {"type": "task_start", "task": name, "task_id": task_id, "play_id": "p1",
            "action": "ansible.builtin.shell"}


def result(task_id: str, host: str, status: str, **fields: Any) -> dict[str, Any]:
    return {"type": "host_result", "task_id": task_id, "host": host, "status": status,
            "rc": fields.pop("rc", None), "duration": 0.25, **fields}


def row(page: Page, run_id: str) -> Any:
    return page.locator(f'tr.run-row[data-run="{run_id}"]')


def cell(page: Page, task_id: str, host: str) -> Any:
    return page.locator(f'tr.grid-task[data-task="{task_id}"] button.cell[data-host="{host}"]')


def test_command_runs_in_the_list_with_status_and_filters(browser, web_cluster: Cluster,
                                                          alice: UnixUser,
                                                          signer: TokenSigner) -> None:
    controller, agents = web_cluster
    token = signer.issue(alice.name)
    mark = secrets.token_hex(4)
    good = ended_command_run(controller, token, [a.node_name for a in agents], f"echo good-{mark}")
    bad = ended_command_run(controller, token, [agents[0].node_name], f"echo bad-{mark}; exit 3")
    page = new_page(browser, controller, alice, "/")
    page.click("#nav-runs")  # the header's link
    expect(page).to_have_url(controller.url + "/runs")
    expect(row(page, bad)).to_be_visible(timeout=TIMEOUT_MS)
    for run_id, status, hosts in ((good, "ok", "2 ok · 0 failed"),
                                  (bad, "failed", "0 ok · 1 failed")):
        badge = row(page, run_id).locator(".status")
        expect(badge).to_have_text(status)
        expect(badge).to_have_class(re.compile(rf"\bstatus-{status}\b"))
        assert badge.get_attribute("aria-label") == f"status: {status}"
        expect(row(page, run_id).locator(".run-kind")).to_have_text("command")
        expect(row(page, run_id).locator(".run-owner")).to_have_text(alice.name)
        expect(row(page, run_id).locator(".run-hosts")).to_have_text(hosts)
    expect(row(page, good).locator(".run-title")).to_have_text(f"echo good-{mark}")
    # The filters ask the API again: by status, then by text.
    page.select_option("#filter-status", "failed")
    expect(row(page, good)).to_have_count(0, timeout=TIMEOUT_MS)
    expect(row(page, bad)).to_be_visible()
    page.select_option("#filter-status", "")
    page.fill("#filter-q", f"good-{mark}")
    expect(page.locator("tr.run-row")).to_have_count(1, timeout=TIMEOUT_MS)
    expect(row(page, good)).to_be_visible()
    page.select_option("#filter-kind", "playbook")
    expect(page.locator("#no-runs")).to_be_visible(timeout=TIMEOUT_MS)
    page.context.close()


def test_more_pages_the_list(browser, web_cluster: Cluster, alice: UnixUser,
                             signer: TokenSigner) -> None:
    controller, _ = web_cluster
    token = signer.issue(alice.name)
    mark = secrets.token_hex(4)
    made = []
    for _ in range(52):  # ended at once: the running runs of a user are capped
        made.append(playbook_run(controller, token, f"ansible-playbook page-{mark}.yml"))
        call(controller, "POST", f"/api/runs/{made[-1]}/finish", {"status": "ok"}, token)
    page = new_page(browser, controller, alice, "/runs")
    page.fill("#filter-q", f"page-{mark}")
    expect(page.locator("#runs")).to_have_attribute("data-query", re.compile(f"q=page-{mark}"),
                                                    timeout=TIMEOUT_MS)
    expect(page.locator("tr.run-row")).to_have_count(50)
    page.click("#runs-more")
    expect(page.locator("tr.run-row")).to_have_count(52, timeout=TIMEOUT_MS)
    expect(page.locator("#runs-more")).to_be_hidden()
    shown = page.locator("tr.run-row").evaluate_all("rows => rows.map(r => r.dataset.run)")
    assert sorted(shown) == sorted(made) and len(set(shown)) == 52
    page.context.close()


def test_a_command_runs_page_shows_each_hosts_output_and_reruns(browser, web_cluster: Cluster,
                                                                alice: UnixUser,
                                                                signer: TokenSigner) -> None:
    controller, agents = web_cluster
    token = signer.issue(alice.name)
    names = [a.node_name for a in agents]
    mark = secrets.token_hex(4)
    command = f"echo out-{mark}; echo err-{mark} >&2; test -e /nonexistent-{mark}"
    run_id = ended_command_run(controller, token, names, command)
    page = new_page(browser, controller, alice, f"/runs/{run_id}")
    for name in names:
        pane = page.locator(f'.host-pane[data-host="{name}"]')
        expect(pane.locator(".line.stdout", has_text=f"out-{mark}")).to_be_visible(timeout=TIMEOUT_MS)
        expect(pane.locator(".line.stderr", has_text=f"err-{mark}")).to_be_visible()
        expect(pane.locator(".pane-state")).to_have_text("failed (rc=1)")
    expect(page.locator("#run-status")).to_have_text("failed")
    # Re-run on the failed hosts: the same command, a new run, and the page opens it.
    expect(page.locator("#rerun-failed")).to_be_enabled()
    page.click("#rerun-failed")
    expect(page).not_to_have_url(re.compile(rf"/runs/{run_id}$"), timeout=TIMEOUT_MS)
    expect(page).to_have_url(re.compile(r"/runs/r[0-9a-f]{20}$"))
    expect(page.locator("#run-title")).to_have_text(command)
    expect(page.locator(".host-pane")).to_have_count(2)
    expect(page.locator("#run-status")).to_have_text("failed", timeout=TIMEOUT_MS)
    page.context.close()


def test_a_playbook_run_shows_a_live_grid_with_formatted_results(browser, web_cluster: Cluster,
                                                                 alice: UnixUser,
                                                                 signer: TokenSigner) -> None:
    controller, agents = web_cluster
    token = signer.issue(alice.name)
    one, two = (a.node_name for a in agents)
    run_id = playbook_run(controller, token, "ansible-playbook site.yml -l web")
    send(controller, token, run_id, {"type": "play_start", "play": "web", "play_id": "p1"},
         task("t1", "say hello"),
         result("t1", one, "changed", rc=0,
                result={"stdout_lines": ["hello from one", "second line"], "changed": True}),
         result("t1", two, "failed", rc=2, msg=HTML,
                result={"stdout": "partial", "stderr": f"oops {HTML}", "rc": 2}))
    # That task's execution on host one, tagged as the connection plugin tags it.
    agents[0].client(token).start(f"echo executed-{run_id}",
                                  tags={"run": run_id, "task": "t1", "host": one})
    page = new_page(browser, controller, alice, f"/runs/{run_id}")
    expect(page.locator("#run-status")).to_have_text("running")
    failed, changed = cell(page, "t1", two), cell(page, "t1", one)
    expect(failed).to_have_class(re.compile(r"\bstatus-failed\b"), timeout=TIMEOUT_MS)
    expect(changed).to_have_class(re.compile(r"\bstatus-changed\b"))
    assert failed.get_attribute("aria-label") == f"say hello on {two}: failed"
    # Keyboard: the cells are buttons in the tab order; Enter on one opens its details.
    changed.focus()
    page.keyboard.press("Tab")
    expect(failed).to_be_focused()
    page.keyboard.press("Enter")
    details = page.locator("#details")
    expect(details.locator('[data-fact="msg"]')).to_have_text(HTML)
    expect(details.locator('[data-fact="rc"]')).to_have_text("2")
    expect(details.locator('[data-fact="duration"]')).to_have_text("250 ms")
    expect(details.locator(".result-stdout .line")).to_have_text(["partial"])
    expect(details.locator(".result-stderr .line")).to_have_text([f"oops {HTML}"])
    assert page.locator("#injected, #injected-img").count() == 0  # HTML shown as text
    expect(page.locator("#details-no-output")).to_be_visible(timeout=TIMEOUT_MS)
    changed.click()
    expect(details.locator(".result-stdout .line")).to_have_text(["hello from one", "second line"])
    expect(page.locator("#details-output .line", has_text=f"executed-{run_id}")).to_be_visible(
        timeout=TIMEOUT_MS)
    # Live: a new task and results arrive while the page is open; a recap ends it.
    send(controller, token, run_id, task("t2", "restart"), result("t2", one, "ok"))
    expect(cell(page, "t2", one)).to_have_class(re.compile(r"\bstatus-ok\b"), timeout=TIMEOUT_MS)
    expect(cell(page, "t2", two)).to_be_disabled()
    send(controller, token, run_id, result("t2", two, "skipped"),
         {"type": "recap", "stats": {one: {"ok": 2, "changed": 1}, two: {"failed": 1}}})
    expect(cell(page, "t2", two)).to_have_class(re.compile(r"\bstatus-skipped\b"),
                                                timeout=TIMEOUT_MS)
    expect(page.locator("#run-status")).to_have_text("failed", timeout=TIMEOUT_MS)
    expect(page.locator("#grid-tasks .task-title")).to_have_text(["say hello", "restart"])
    expect(page.locator("#rerun-actions")).to_be_hidden()  # playbooks are re-run by Ansible
    page.context.close()


def test_a_permalink_survives_the_login_and_is_its_owners_only(browser, web_cluster: Cluster,
                                                               alice: UnixUser, bob: UnixUser,
                                                               signer: TokenSigner) -> None:
    controller, _ = web_cluster
    token = signer.issue(alice.name)
    title = f"ansible-playbook private-{secrets.token_hex(4)}.yml"
    run_id = playbook_run(controller, token, title)
    # A fresh context: the login form first, then the run itself.
    page = browser.new_context().new_page()
    page.goto(f"{controller.url}/runs/{run_id}")
    fill_login(page, alice)
    expect(page).to_have_url(f"{controller.url}/runs/{run_id}", timeout=TIMEOUT_MS)
    expect(page.locator("#run-title")).to_have_text(title)
    page.context.close()
    # Bob: alice's run is as missing as one that never was; his list has nothing of hers.
    bob_page = new_page(browser, controller, bob, "/runs")
    expect(bob_page.locator("#no-runs")).to_be_visible(timeout=TIMEOUT_MS)
    assert bob_page.locator("tr.run-row").count() == 0
    for missing in (run_id, "r" + "0" * 20, "not-a-run"):
        response = bob_page.goto(f"{controller.url}/runs/{missing}")
        assert response is not None and response.status == 404
        expect(bob_page.locator("#run-missing h2")).to_have_text("Not found")
        assert title not in bob_page.content()
    call(controller, "POST", f"/api/runs/{run_id}/finish", {}, token)
    bob_page.context.close()


def test_the_login_goes_only_to_paths_on_this_site(browser, web_cluster: Cluster,
                                                   alice: UnixUser) -> None:
    controller, _ = web_cluster
    page = browser.new_context().new_page()
    page.goto(f"{controller.url}/login?next=//example.com/runs")
    fill_login(page, alice)
    expect(page).to_have_url(controller.url + "/", timeout=TIMEOUT_MS)
    page.context.close()


def test_a_command_from_the_pages_shell_is_listed(browser, web_cluster: Cluster,
                                                  alice: UnixUser) -> None:
    controller, agents = web_cluster
    name, command = agents[0].node_name, f"echo shell-{secrets.token_hex(4)}"
    page = new_page(browser, controller, alice, "/")
    page.locator(f'.node[data-node="{name}"] .node-select').check(timeout=TIMEOUT_MS)
    page.fill("#shell-command", command)
    page.click("#shell-run")
    expect(page.locator(".line", has_text=command[5:])).to_be_visible(timeout=TIMEOUT_MS)
    page.click("#nav-runs")
    listed = page.locator("tr.run-row", has=page.locator(".run-title", has_text=command))
    expect(listed.locator(".status")).to_have_text("ok", timeout=TIMEOUT_MS)
    expect(listed.locator(".run-hosts")).to_have_text("1 ok · 0 failed")
    expect(listed.locator(".run-kind")).to_have_text("shell")  # the Shell tab's, not marco run's
    page.context.close()


def test_a_running_run_can_be_marked_as_ended(browser, web_cluster: Cluster, alice: UnixUser,
                                              signer: TokenSigner) -> None:
    """A run whose client is gone: its page offers Mark as ended, which interrupts it."""
    controller, _ = web_cluster
    token = signer.issue(alice.name)
    run_id = playbook_run(controller, token, f"abandoned {secrets.token_hex(4)}")
    page = new_page(browser, controller, alice, f"/runs/{run_id}")
    expect(page.locator("#run-status")).to_have_text("running", timeout=TIMEOUT_MS)
    expect(page.locator("#end-run")).to_be_visible()
    expect(page.locator("#rerun-actions")).to_be_hidden()
    page.click("#end-run")
    expect(page.locator("#run-status")).to_have_text("interrupted", timeout=TIMEOUT_MS)
    expect(page.locator("#end-run")).to_be_hidden()
    run = run_of(controller, token, run_id)
    assert run["status"] == "interrupted" and run["ended"] is not None
    page.context.close()


# Scrolls an output view from its top to its bottom a window at a time, waiting at each step
# until the line at the top is rendered and no line in the DOM is still being read; the text of
# every line seen, by its seq.
READ_ALL = """async (s) => {
  const seen = {}, step = Math.floor(s.clientHeight / 2), end = Date.now() + 60000;
  for (let y = 0; ; y += step) {
    s.scrollTop = y;
    const top = `.line[data-seq="${Math.floor(s.scrollTop / 17)}"]`;  // one execution, 17px lines
    while (!s.querySelector(top) || s.querySelector('.line.pending')) {
      if (Date.now() > end) throw new Error('lines still pending at ' + y);
      await new Promise((r) => setTimeout(r, 20));
    }
    for (const l of s.querySelectorAll('.line')) seen[l.dataset.seq] = l.textContent;
    if (y >= s.scrollHeight - s.clientHeight) return seen;
  }
}"""


def test_a_long_output_is_read_in_pages_and_shown_whole(browser, web_cluster: Cluster,
                                                        alice: UnixUser,
                                                        signer: TokenSigner) -> None:
    """12,000 lines: more than one page of the output API, every one of them shown in its
    place when the pane is scrolled through, each once and in order."""
    controller, agents = web_cluster
    token = signer.issue(alice.name)
    name = agents[0].node_name
    run_id = ended_command_run(controller, token, [name], "seq 1 12000")
    page = new_page(browser, controller, alice, f"/runs/{run_id}")
    scroller = page.locator(f'.host-pane[data-host="{name}"] .output-scroll')
    expect(scroller.locator('.line[data-seq="11999"]')).to_have_text("12000", timeout=TIMEOUT_MS)
    seen = scroller.evaluate(READ_ALL)
    assert [seen[str(n)] for n in range(12000)] == [str(n) for n in range(1, 12001)]
    assert len(seen) == 12000
    page.context.close()


def test_rerun_runs_the_full_command_not_its_title(browser, web_cluster: Cluster,
                                                   alice: UnixUser, signer: TokenSigner) -> None:
    """A command longer than a title (1,000 characters) is re-run whole, from the run's
    `meta.command`; one over the meta limit (16 KiB) has no re-run, and the page says so."""
    controller, agents = web_cluster
    token = signer.issue(alice.name)
    name, mark = agents[0].node_name, secrets.token_hex(4)
    command = f": {'x' * 1200}; echo end-{mark}"  # the echo is past the title's 1,000
    run_id = ended_command_run(controller, token, [name], command)
    assert len(run_of(controller, token, run_id)["title"]) == 1000
    page = new_page(browser, controller, alice, f"/runs/{run_id}")
    expect(page.locator(".line", has_text=f"end-{mark}")).to_be_visible(timeout=TIMEOUT_MS)
    expect(page.locator("#rerun-unavailable")).to_be_hidden()
    page.click("#rerun")
    expect(page).not_to_have_url(re.compile(rf"/runs/{run_id}$"), timeout=TIMEOUT_MS)
    expect(page.locator("#run-status")).to_have_text("ok", timeout=TIMEOUT_MS)
    expect(page.locator(".line", has_text=f"end-{mark}")).to_be_visible(timeout=TIMEOUT_MS)
    rerun_id = page.url.rsplit("/", 1)[1]
    assert run_of(controller, token, rerun_id)["meta"]["command"] == command
    huge = ended_command_run(controller, token, [name], f": {'y' * 17000}; echo huge-{mark}")
    page.goto(f"{controller.url}/runs/{huge}")
    expect(page.locator(".line", has_text=f"huge-{mark}")).to_be_visible(timeout=TIMEOUT_MS)
    expect(page.locator("#rerun-unavailable")).to_be_visible()
    expect(page.locator("#rerun")).to_be_disabled()
    assert "command" not in run_of(controller, token, huge)["meta"]
    page.context.close()


def test_a_run_with_more_events_than_a_page_shows_them_all(browser, web_cluster: Cluster,
                                                           alice: UnixUser,
                                                           signer: TokenSigner) -> None:
    """An ended playbook of 5,000 plays (more events than one answer of GET /api/runs/ID
    gives) and one task after them: the page asks on while `more`, so the task shows."""
    controller, agents = web_cluster
    token = signer.issue(alice.name)
    host = agents[0].node_name
    run_id = playbook_run(controller, token, f"ansible-playbook many-{secrets.token_hex(4)}.yml")
    for batch in range(5):
        send(controller, token, run_id, *({"type": "play_start", "play": f"play {n}",
                                           "play_id": f"p{n}"}
                                          for n in range(batch * 1000, (batch + 1) * 1000)))
    send(controller, token, run_id, task("last", "the last task"), result("last", host, "ok"),
         {"type": "recap", "stats": {host: {"ok": 1}}})
    page = new_page(browser, controller, alice, f"/runs/{run_id}")
    expect(page.locator("#run-status")).to_have_text("ok", timeout=TIMEOUT_MS)
    expect(cell(page, "last", host)).to_have_class(re.compile(r"\bstatus-ok\b"),
                                                   timeout=TIMEOUT_MS)
    page.context.close()


def test_a_long_output_opens_at_its_end_and_reads_earlier_lines_when_in_sight(
        browser, web_cluster: Cluster, alice: UnixUser, signer: TokenSigner) -> None:
    """25,000 lines: the pane opens at the last line having read only the pages in sight (not
    the first), no line is left out, and line 1 is read once it is scrolled into sight."""
    controller, agents = web_cluster
    token = signer.issue(alice.name)
    name = agents[0].node_name
    run_id = ended_command_run(controller, token, [name], "seq 1 25000")
    page: Page = browser.new_context().new_page()
    asked: list[int] = []  # the first line of each output page the page asks for
    page.on("request", lambda request: asked.extend(
        int(n) for n in re.findall(r"[?&]since=(\d+)", request.url)) if "/output?" in request.url
        else None)
    open_logged_in(page, controller, alice, f"/runs/{run_id}")
    pane = page.locator(f'.host-pane[data-host="{name}"]')
    expect(pane.locator('.line[data-seq="24999"]')).to_have_text("25000", timeout=TIMEOUT_MS)
    assert asked and min(asked) >= 20000, asked
    pane.locator(".output-scroll").evaluate("s => { s.scrollTop = 0; }")
    expect(pane.locator('.line[data-seq="0"]')).to_have_text("1")
    assert min(asked) == 0
    page.context.close()


def test_an_output_its_agent_cut_shows_the_lines_kept(browser, web_cluster: Cluster,
                                                      start_agent, alice: UnixUser,
                                                      signer: TokenSigner) -> None:
    """A running execution whose agent stopped keeping its output at line 5 (over its
    spool) while its next_seq counts on past 20,000: the pane shows the 5 lines kept, not
    25,006 lines of which only 5 can be read. The page's polls
    after its first look list the executions with live=0 (no agent asked)."""
    controller, _ = web_cluster
    token = signer.issue(alice.name)
    agent = start_agent(node_name=unique_node_name("cut"), announce=True,
                        extra_args=["--spool-max-bytes", "2000"])
    name = agent.node_name
    wait_for(lambda: name in controller.inventory_hosts(token), what="the agent discovered")
    status, answer = call(controller, "POST", "/api/runs",
                          {"kind": "command", "title": "cut", "hosts": [name]}, token)
    assert status == 201, answer
    run_id = answer["id"]
    gate = Path(tempfile.mkdtemp(prefix="marco-gate-"))
    gate.chmod(0o755)
    try:
        with agent.client(token) as client:
            execution_id = client.start(
                f"seq 1 5; until [ -e {gate}/big ]; do sleep 0.05; done; "
                "head -c 3000 /dev/zero | tr '\\0' x; echo; seq 6 25005; "
                f"until [ -e {gate}/end ]; do sleep 0.05; done", tags={"run": run_id,
                                                                       "host": name})
            wait_for(lambda: client.execution(execution_id)["next_seq"] == 5, what="5 lines")
            (gate / "big").touch()  # a line of its own, over the spool: cut from seq 5 on
            cut = wait_for(lambda: (e := client.execution(execution_id))["next_seq"] == 25006
                           and e, what="25,006 lines")
        assert cut["truncated_seq"] == 5 and cut["state"] == "running"
        page: Page = browser.new_context().new_page()
        listings: list[str] = []  # the page's listings of the run's executions
        page.on("request", lambda request: listings.append(request.url)
                if "/executions" in request.url else None)
        open_logged_in(page, controller, alice, f"/runs/{run_id}")
        pane = page.locator(f'.host-pane[data-host="{name}"]')
        expect(pane.locator(".line.stdout")).to_have_count(5, timeout=TIMEOUT_MS)
        expect(pane.locator(".line.stdout").last).to_have_text("5")
        # The pane holds the 5 lines kept, not 25,006 the agent numbered: nothing to scroll.
        assert pane.locator(".output-scroll").evaluate("s => s.scrollHeight <= s.clientHeight")
        # Its first look asks the agents; the polls after it list from the store alone.
        with page.expect_request(lambda request: "/executions?live=0" in request.url,
                                 timeout=TIMEOUT_MS):
            pass
        assert "live=" not in listings[0]
        page.context.close()
    finally:
        (gate / "end").touch()
        call(controller, "POST", f"/api/runs/{run_id}/finish", {}, token)
        shutil.rmtree(gate, ignore_errors=True)


def test_a_run_with_more_executions_than_a_listing_shows_them_all(
        browser, start_agent, start_controller, alice: UnixUser, signer: TokenSigner) -> None:
    """runs_executions_page 1 (5,000 by default): the page lists a run's executions page by
    page while `more`, so each host's pane shows its output."""
    agents = [start_agent(node_name=unique_node_name("page")) for _ in range(2)]
    controller = start_controller(extra_args=[
        "--no-discovery", "--runs-executions-page", "1",
        *(arg for a in agents for arg in ("--node", f"{a.node_name}={a.host}:{a.port}"))])
    token = signer.issue(alice.name)
    names = [a.node_name for a in agents]
    wait_for(lambda: set(names) <= set(controller.inventory_hosts(token)), what="nodes alive")
    run_id = ended_command_run(controller, token, names, "echo hello")
    page = new_page(browser, controller, alice, f"/runs/{run_id}")
    for name in names:
        pane = page.locator(f'.host-pane[data-host="{name}"]')
        expect(pane.locator(".line.stdout")).to_have_text(["hello"], timeout=TIMEOUT_MS)
    page.context.close()
