"""The run page's virtualized output view (issue 13, items 1, 4 and 6's layout) in a real
chromium against a real controller and agents: a finished 200,000-line run opens at its end,
scrolls to line 1 with only a window of lines in the DOM, jumps back to the latest by button and
keyboard, reveals a line in the middle for the search with its hits marked (in a pane, and in
a playbook's task output on a host), scales a 1,000,000-line output, and long lines wrap at a
toggle kept in the browser; memory is bounded in characters too, colours start afresh with each
execution and carry over pages from their true start, and wrapped lines' heights are looked up
without sorting them each time."""

from __future__ import annotations

import functools
import re
from typing import Any

import pytest
from playwright.sync_api import Locator, Page, expect

from marco.client import AgentClient
from marco.tokens import TokenSigner
from tests.support.agent_process import AgentProcess
from tests.support.command_runs import ended_command_run
from tests.support.controller_process import ControllerProcess
from tests.support.http import call
from tests.support.users import UnixUser
from tests.support.waiting import wait_for
from tests.support.web import TIMEOUT_MS, expect_in_sight, open_logged_in

Cluster = tuple[ControllerProcess, AgentProcess]
LINES = 200_000
LINE_HEIGHT = 17  # px of an unwrapped line (output_view.js LINE_HEIGHT)


@pytest.fixture(scope="module")
def big_run(one_agent: Cluster, alice: UnixUser, signer: TokenSigner) -> str:
    """One finished run printing 1 to 200,000 on the cluster's node."""
    controller, agent = one_agent
    return ended_command_run(controller, signer.issue(alice.name), agent.node_name,
                        f"seq 1 {LINES}")


def open_run(browser: Any, controller: ControllerProcess, user: UnixUser, run_id: str) -> Page:
    page: Page = browser.new_context().new_page()
    page.set_default_timeout(TIMEOUT_MS)
    open_logged_in(page, controller, user, f"/runs/{run_id}")
    return page


def line(pane: Locator, seq: int) -> Locator:
    return pane.locator(f'.line[data-seq="{seq}"]')


def test_a_200000_line_run_opens_at_its_end_and_scrolls_to_line_1(
        browser: Any, one_agent: Cluster, big_run: str, alice: UnixUser) -> None:
    controller, agent = one_agent
    host = agent.node_name
    page = open_run(browser, controller, alice, big_run)
    pane = page.locator(f'.host-pane[data-host="{host}"]')
    scroller = pane.locator(".output-scroll")
    jump = pane.get_by_role("button", name=f"Jump to latest output of {host}")
    # It opens following: the last line in sight, every line counted in the scroll height.
    expect(line(pane, LINES - 1)).to_have_text(str(LINES))
    expect_in_sight(line(pane, LINES - 1))
    assert scroller.evaluate("s => s.scrollHeight") == LINES * LINE_HEIGHT
    expect(jump).to_be_hidden()
    # Scrolled to the top: line 1, with only a window of lines in the DOM.
    scroller.evaluate("s => { s.scrollTop = 0; }")
    expect(line(pane, 0)).to_have_text("1")
    expect_in_sight(line(pane, 0))
    assert pane.locator(".line").count() < 500
    expect(jump).to_be_visible()
    # End on the focused output: the latest line again, following.
    scroller.focus()
    page.keyboard.press("End")
    expect(line(pane, LINES - 1)).to_have_text(str(LINES))
    expect_in_sight(line(pane, LINES - 1))
    expect(jump).to_be_hidden()
    # Home, PageDown: line 1, then the lines a page further.
    page.keyboard.press("Home")
    expect(line(pane, 0)).to_have_text("1")
    expect_in_sight(line(pane, 0))
    page.keyboard.press("PageDown")
    expect(line(pane, 0)).not_to_be_in_viewport()
    shown = scroller.evaluate("s => s.scrollTop")
    assert shown > 10 * LINE_HEIGHT, shown
    # The button: the latest line again.
    jump.click()
    expect(jump).to_be_hidden()
    expect_in_sight(line(pane, LINES - 1))
    assert pane.locator(".line").count() < 500
    page.context.close()


def test_reveal_brings_a_middle_line_into_sight_with_its_hits_marked(
        browser: Any, one_agent: Cluster, big_run: str, alice: UnixUser) -> None:
    """What the search (run_search.js) does with a hit: runView.reveal and runView.highlight."""
    controller, agent = one_agent
    host = agent.node_name
    page = open_run(browser, controller, alice, big_run)
    pane = page.locator(f'.host-pane[data-host="{host}"]')
    expect(line(pane, LINES - 1)).to_have_text(str(LINES))
    execution = line(pane, LINES - 1).get_attribute("data-segment")
    page.evaluate("needle => runView.highlight(needle, {caseSensitive: false})", "12345")
    page.evaluate("hit => runView.reveal(hit)",
                  {"execution_id": execution, "host": host, "task_id": None,
                   "seq": 123449, "stream": "stdout", "text": "123450", "at": [[0, 5]]})
    target = line(pane, 123449)
    expect(target).to_have_text("123450")
    expect_in_sight(target)
    expect(target).to_have_class("line stdout current-line")
    expect(target.locator("mark.hit.current")).to_have_text("12345")
    # Other lines with the needle are marked too, not current; the reader is not following.
    expect(line(pane, 123450).locator("mark.hit")).to_have_text("12345")
    expect(line(pane, 123450).locator("mark.current")).to_have_count(0)
    expect(pane.get_by_role("button", name=f"Jump to latest output of {host}")).to_be_visible()
    # No needle: no marks.
    page.evaluate("() => runView.highlight(null)")
    expect(pane.locator("mark")).to_have_count(0)
    expect(target).to_have_text("123450")
    page.context.close()


def test_wrapping_long_lines_is_a_toggle_kept_in_the_browser(
        browser: Any, one_agent: Cluster, alice: UnixUser, signer: TokenSigner) -> None:
    controller, agent = one_agent
    host = agent.node_name
    token = signer.issue(alice.name)
    run_id = ended_command_run(controller, token, host,
                          "echo first; printf 'x%.0s' $(seq 1 600); echo; echo last")
    page = open_run(browser, controller, alice, run_id)
    pane = page.locator(f'.host-pane[data-host="{host}"]')
    scroller = pane.locator(".output-scroll")
    long = line(pane, 1)
    expect(line(pane, 2)).to_have_text("last")
    toggle = page.get_by_role("checkbox", name="Wrap lines")
    expect(toggle).not_to_be_checked()
    height = lambda: long.evaluate("l => l.getBoundingClientRect().height")  # noqa: E731
    wide = lambda: scroller.evaluate("s => s.scrollWidth > s.clientWidth")  # noqa: E731
    assert height() == LINE_HEIGHT and wide()
    toggle.check()
    assert height() > 2 * LINE_HEIGHT and not wide()
    # The next line sits right under the wrapped one.
    assert line(pane, 2).evaluate("l => l.getBoundingClientRect().top") == pytest.approx(
        long.evaluate("l => l.getBoundingClientRect().bottom"), abs=1)
    page.reload()
    expect(page.get_by_role("checkbox", name="Wrap lines")).to_be_checked()
    expect(line(pane, 2)).to_have_text("last")
    assert height() > 2 * LINE_HEIGHT and not wide()
    page.get_by_role("checkbox", name="Wrap lines").uncheck()
    assert height() == LINE_HEIGHT and wide()
    page.context.close()


def test_a_million_line_run_is_scaled_and_every_line_reachable(
        browser: Any, one_agent: Cluster, alice: UnixUser, signer: TokenSigner) -> None:
    """1,000,000 lines x 17px is more than the tallest scroll area the view makes (15M px):
    the scroll area is scaled, yet the top shows line 1, the bottom the last line, a line in
    the middle is revealed, and the wheel moves by real lines there."""
    controller, agent = one_agent
    host = agent.node_name
    lines = 1_000_000
    run_id = ended_command_run(controller, signer.issue(alice.name), host, f"seq 1 {lines}")
    page = open_run(browser, controller, alice, run_id)
    pane = page.locator(f'.host-pane[data-host="{host}"]')
    scroller = pane.locator(".output-scroll")
    expect(line(pane, lines - 1)).to_have_text(str(lines))
    expect_in_sight(line(pane, lines - 1))
    height = scroller.evaluate("s => s.scrollHeight")
    assert height <= 15_000_000 < lines * LINE_HEIGHT
    scroller.evaluate("s => { s.scrollTop = 0; }")
    expect(line(pane, 0)).to_have_text("1")
    expect_in_sight(line(pane, 0))
    # The wheel over the output: 10 lines' worth of px moves by 10 lines.
    box = scroller.bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, 10 * LINE_HEIGHT)
    expect(line(pane, 10)).to_have_text("11")
    page.wait_for_function(
        "() => { const l = document.querySelector('.output-scroll .line[data-seq=\"10\"]');"
        " return l && Math.abs(l.getBoundingClientRect().top"
        " - l.closest('.output-scroll').getBoundingClientRect().top) < 1; }")
    # A line in the middle, as the search reveals it.
    execution = line(pane, 0).get_attribute("data-segment")
    page.evaluate("hit => runView.reveal(hit)", {"execution_id": execution, "host": host,
                                                 "task_id": None, "seq": 654320, "at": []})
    expect(line(pane, 654320)).to_have_text("654321")
    expect_in_sight(line(pane, 654320))
    scroller.evaluate("s => { s.scrollTop = s.scrollHeight; }")
    expect(line(pane, lines - 1)).to_have_text(str(lines))
    expect_in_sight(line(pane, lines - 1))
    page.context.close()


def test_reveal_opens_a_playbook_tasks_output_on_its_host(
        browser: Any, one_agent: Cluster, alice: UnixUser, signer: TokenSigner) -> None:
    """A hit in a playbook: the details of its task on its host open (the task's cell
    selected) and its line is in sight there, marked current."""
    controller, agent = one_agent
    token, host = signer.issue(alice.name), agent.node_name
    status, answer = call(controller, "POST", "/api/runs",
                          {"kind": "playbook", "title": "ansible-playbook reveal.yml"}, token)
    assert status == 201, answer
    run_id = str(answer["id"])
    events: list[dict[str, Any]] = [{"type": "task_start", "task": name, "task_id": name,
                                      "play_id": "p1",
                                      "action": "ansible.builtin.shell"} for name in ("t1", "t2")]
    events += [{"type": "host_result", "task_id": name, "host": host, "status": "ok", "rc": 0}
               for name in ("t1", "t2")]
    status, answer = call(controller, "POST", f"/api/runs/{run_id}/events", {"events": events},
                          token)
    assert status == 200, answer
    with agent.client(token) as client:
        execution = client.start("seq 1 5000", tags={"run": run_id, "task": "t2", "host": host})
        wait_for(lambda: client.execution(execution)["state"] != "running", what="it ended")
    page = open_run(browser, controller, alice, run_id)
    expect(page.locator(f'tr.grid-task[data-task="t2"] button.cell[data-host="{host}"]')
           ).to_be_enabled()
    page.evaluate("needle => runView.highlight(needle)", "3000")
    page.evaluate("hit => runView.reveal(hit)", {"execution_id": execution, "host": host,
                                                 "task_id": "t2", "seq": 2999, "at": [[0, 4]]})
    details = page.locator("#details")
    expect(details).to_have_attribute("data-task", "t2")
    target = line(details, 2999)
    expect(target).to_have_text("3000")
    expect_in_sight(target)
    expect(target.locator("mark.hit.current")).to_have_text("3000")
    expect(page.locator(f'tr.grid-task[data-task="t2"] button.cell[data-host="{host}"]')
           ).to_have_class(re.compile(r"\bselected\b"))
    call(controller, "POST", f"/api/runs/{run_id}/finish", {}, token)
    page.context.close()


# The seqs of the first and last lines in sight in a scroll area.
SEEN = """s => { const r = s.getBoundingClientRect(), shown = [...s.querySelectorAll('.line')]
  .filter((l) => l.getBoundingClientRect().bottom > r.top + 1 && l.getBoundingClientRect().top < r.bottom - 1)
  .map((l) => Number(l.dataset.seq)); return [Math.min(...shown), Math.max(...shown)]; }"""


def test_wrapped_lines_of_many_heights_are_all_reachable(
        browser: Any, one_agent: Cluster, alice: UnixUser, signer: TokenSigner) -> None:
    """Wrapping 3,000 lines, every third 400 characters long (several rows): End shows the last
    line, Home the first, and paging down goes through them without skipping one."""
    controller, agent = one_agent
    host = agent.node_name
    command = ("for i in $(seq 1 3000); do if [ $((i % 3)) = 0 ]; "
               "then printf \"$i %0400d\\n\" 0; else echo $i; fi; done")
    run_id = ended_command_run(controller, signer.issue(alice.name), host, command)
    page = open_run(browser, controller, alice, run_id)
    page.get_by_role("checkbox", name="Wrap lines").check()
    pane = page.locator(f'.host-pane[data-host="{host}"]')
    scroller = pane.locator(".output-scroll")
    expect(line(pane, 2999)).to_contain_text("3000 0000")
    expect_in_sight(line(pane, 2999))
    scroller.focus()
    page.keyboard.press("Home")
    expect(line(pane, 0)).to_have_text("1")
    expect_in_sight(line(pane, 0))
    first, last = scroller.evaluate(SEEN)
    for _ in range(10):
        page.keyboard.press("PageDown")
        page.wait_for_function(f"s => ({SEEN})(s)[0] > {first}", arg=scroller.element_handle())
        first, next_last = scroller.evaluate(SEEN)
        assert first <= last, (first, last)  # the line after the last one seen is in sight
        last = next_last
    page.keyboard.press("End")
    expect_in_sight(line(pane, 2999))
    page.context.close()


def test_memory_is_bounded_by_characters_too(
        browser: Any, one_agent: Cluster, alice: UnixUser, signer: TokenSigner) -> None:
    """Pages of long lines: the view keeps at most `maxChars` characters of lines (its
    default is 64M; lowered here to a page and a half of 1,000-character lines) however far
    the reader goes, drops the least recently used pages for it, and reads one again when
    it comes back into sight."""
    controller, agent = one_agent
    host = agent.node_name
    command = "s=$(printf 'x%.0s' $(seq 1 995)); seq -w 1 5000 | sed \"s/$/ $s/\""
    run_id = ended_command_run(controller, signer.issue(alice.name), host, command)
    page = open_run(browser, controller, alice, run_id)
    pane = page.locator(f'.host-pane[data-host="{host}"]')
    expect(line(pane, 4999)).to_contain_text("5000 xxx")
    execution = line(pane, 4999).get_attribute("data-segment")
    view = f"runView.panes.get({host!r}).view"
    page.evaluate(f"() => {{ {view}.maxChars = 1500000; }}")
    # What the view counts, and what its pages hold (they must agree).
    held = f"""() => {{ const v = {view}; let sum = 0;
        for (const p of v.pages.values()) for (const t of p.texts) sum += t === undefined ? 0 : t.length;
        return [v.chars, sum, v.counters.evicted]; }}"""
    for seq in (0, 2500, 4500, 1200, 3700, 0):
        page.evaluate("hit => runView.reveal(hit)", {"execution_id": execution, "host": host,
                                                     "task_id": None, "seq": seq, "at": []})
        expect(line(pane, seq)).to_have_text(f"{seq + 1:04d} " + "x" * 995)
        counted, summed, _ = page.evaluate(held)
        assert counted == summed, (counted, summed)
        assert counted <= 1_500_000, counted
    assert page.evaluate(held)[2] >= 4  # pages were dropped, and read again when needed
    page.context.close()


def ended(client: AgentClient, execution: str) -> bool:
    return bool(client.execution(execution)["state"] != "running")


def red(element: Locator) -> Locator:
    """The red (SGR 31) runs of a line."""
    return element.locator(".ansi-c1")


def test_colours_do_not_leak_from_one_execution_into_the_next(
        browser: Any, one_agent: Cluster, alice: UnixUser, signer: TokenSigner) -> None:
    """Two executions of a task on a host, each ending in red without a reset: the other's
    first line starts plain (each execution starts from a reset state), also when both are
    rendered in one go."""
    controller, agent = one_agent
    token, host = signer.issue(alice.name), agent.node_name
    status, answer = call(controller, "POST", "/api/runs",
                          {"kind": "playbook", "title": "ansible-playbook colours.yml"}, token)
    assert status == 201, answer
    run_id = str(answer["id"])
    status, answer = call(controller, "POST", f"/api/runs/{run_id}/events", {"events": [
        {"type": "task_start", "task": "t1", "task_id": "t1", "play_id": "p1",
         "action": "ansible.builtin.shell"},
        {"type": "host_result", "task_id": "t1", "host": host, "status": "ok", "rc": 0}]}, token)
    assert status == 200, answer
    with agent.client(token) as client:
        for name in ("a", "b"):
            execution = client.start(f"echo plain-{name}; printf '\\033[31mred-{name}\\n'",
                                     tags={"run": run_id, "task": "t1", "host": host})
            wait_for(functools.partial(ended, client, execution), what="it ended")
    page = open_run(browser, controller, alice, run_id)
    page.locator(f'tr.grid-task[data-task="t1"] button.cell[data-host="{host}"]').click()
    details = page.locator("#details-output")
    lines = details.locator(".line")
    expect(lines).to_have_count(4)
    expect(details.locator(".line", has_text="red-")).to_have_count(2)
    # Every line rendered again at once (as a search's highlight does): one pass over both.
    page.evaluate("() => runView.highlight('zzz-not-there')")
    expect(lines).to_have_text([re.compile("^plain-"), re.compile("^red-"),
                                re.compile("^plain-"), re.compile("^red-")])
    for k in range(4):
        expect(red(lines.nth(k))).to_have_count(k % 2)
    call(controller, "POST", f"/api/runs/{run_id}/finish", {}, token)
    page.context.close()


def test_colours_carry_over_pages_from_their_true_start(
        browser: Any, one_agent: Cluster, alice: UnixUser, signer: TokenSigner) -> None:
    """Red set on line 501 (page 1 of 1,000 lines) and never reset. Seen first in the middle,
    page 2 started from a reset state (page 1 not read); once page 1 is read, page 3's lines
    are red: the end of page 2 computed from that reset start is not used again."""
    controller, agent = one_agent
    host = agent.node_name
    run_id = ended_command_run(controller, signer.issue(alice.name), host,
                          "seq 1 500; printf '\\033[31mred\\n'; seq 502 3000")
    page = open_run(browser, controller, alice, run_id)
    pane = page.locator(f'.host-pane[data-host="{host}"]')
    expect(line(pane, 2999)).to_have_text("3000")
    execution = line(pane, 2999).get_attribute("data-segment")

    def reveal(seq: int) -> Locator:
        page.evaluate("hit => runView.reveal(hit)", {"execution_id": execution, "host": host,
                                                     "task_id": None, "seq": seq, "at": []})
        expect(line(pane, seq)).to_have_text(str(seq + 1))
        return line(pane, seq)

    expect(red(reveal(1950))).to_have_count(0)  # page 1 not read: from a reset state
    expect(red(reveal(950))).to_have_count(1)
    expect(red(line(pane, 1000))).to_have_count(1)
    expect(red(reveal(2500))).to_have_count(1)
    expect(red(reveal(1950))).to_have_count(1)
    page.context.close()


def test_scrolling_wrapped_lines_again_builds_no_height_index(
        browser: Any, one_agent: Cluster, alice: UnixUser, signer: TokenSigner) -> None:
    """Wrapped lines' heights are looked up in sorted sums built once per change of heights:
    paging through lines already measured builds none (a sort per lookup made each scroll
    event sort every measured line)."""
    controller, agent = one_agent
    host = agent.node_name
    command = ("for i in $(seq 1 3000); do if [ $((i % 3)) = 0 ]; "
               "then printf \"$i %0400d\\n\" 0; else echo $i; fi; done")
    run_id = ended_command_run(controller, signer.issue(alice.name), host, command)
    page = open_run(browser, controller, alice, run_id)
    page.get_by_role("checkbox", name="Wrap lines").check()
    pane = page.locator(f'.host-pane[data-host="{host}"]')
    scroller = pane.locator(".output-scroll")
    expect(line(pane, 2999)).to_contain_text("3000 0000")
    built = f"() => runView.panes.get({host!r}).view.counters.heightIndexes"

    def page_through() -> int:
        """Home, then ten pages down; the seq of the first line in sight."""
        scroller.focus()
        page.keyboard.press("Home")
        expect(line(pane, 0)).to_have_text("1")
        first = scroller.evaluate(SEEN)[0]
        for _ in range(10):
            page.keyboard.press("PageDown")
            page.wait_for_function(f"s => ({SEEN})(s)[0] > {first}",
                                   arg=scroller.element_handle())
            first = scroller.evaluate(SEEN)[0]
        return int(first)

    reached = page_through()
    before = page.evaluate(built)
    assert before > 0
    assert page_through() == reached
    assert page.evaluate(built) == before
    page.context.close()
