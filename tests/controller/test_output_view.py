"""The run page's virtualized output view (issue 13, items 1, 4 and 6's layout) in a real
chromium against a real controller and agents: a finished 200,000-line run opens at its end,
scrolls to line 1 with only a window of lines in the DOM, jumps back to the latest by button and
keyboard, reveals a line in the middle for the search with its hits marked, and long lines wrap
at a toggle kept in the browser."""

from __future__ import annotations

from typing import Any

import pytest
from playwright.sync_api import Locator, Page, expect

from marco.tokens import TokenSigner
from tests.support.controller_process import ControllerProcess
from tests.support.http import call
from tests.support.users import UnixUser
from tests.support.waiting import wait_for
from tests.support.web import TIMEOUT_MS, open_logged_in

Cluster = tuple[ControllerProcess, list[str]]
LINES = 200_000
LINE_HEIGHT = 17  # px of an unwrapped line (output_view.js LINE_HEIGHT)
# Whether a line element is inside its scroll area's visible part.
IN_SIGHT = """l => { const s = l.closest('.output-scroll').getBoundingClientRect(),
  r = l.getBoundingClientRect(); return r.top >= s.top - 1 && r.bottom <= s.bottom + 1; }"""


def finished_run(controller: ControllerProcess, token: str, node: str, command: str) -> str:
    """A command run through POST /api/run, waited for until it ended; its id."""
    status, answer = call(controller, "POST", "/api/run", {"nodes": [node], "command": command},
                          token)
    assert status == 200, answer
    run_id = str(answer["run"]["id"])

    def ended() -> bool:
        status, run = call(controller, "GET", f"/api/runs/{run_id}", token=token)
        return status == 200 and run["ended"] is not None

    wait_for(ended, timeout=60, what="run ended")
    return run_id


@pytest.fixture(scope="module")
def big_run(cluster: Cluster, alice: UnixUser, signer: TokenSigner) -> str:
    """One finished run printing 1 to 200,000 on the cluster's first node."""
    controller, names = cluster
    return finished_run(controller, signer.issue(alice.name), names[0], f"seq 1 {LINES}")


def open_run(browser: Any, controller: ControllerProcess, user: UnixUser, run_id: str) -> Page:
    page: Page = browser.new_context().new_page()
    page.set_default_timeout(TIMEOUT_MS)
    open_logged_in(page, controller, user, f"/runs/{run_id}")
    return page


def line(pane: Locator, seq: int) -> Locator:
    return pane.locator(f'.line[data-seq="{seq}"]')


def test_a_200000_line_run_opens_at_its_end_and_scrolls_to_line_1(
        browser: Any, cluster: Cluster, big_run: str, alice: UnixUser) -> None:
    controller, names = cluster
    page = open_run(browser, controller, alice, big_run)
    pane = page.locator(f'.host-pane[data-host="{names[0]}"]')
    scroller = pane.locator(".output-scroll")
    jump = pane.get_by_role("button", name=f"Jump to latest output of {names[0]}")
    # It opens following: the last line in sight, every line counted in the scroll height.
    expect(line(pane, LINES - 1)).to_have_text(str(LINES))
    assert line(pane, LINES - 1).evaluate(IN_SIGHT)
    assert scroller.evaluate("s => s.scrollHeight") == LINES * LINE_HEIGHT
    expect(jump).to_be_hidden()
    # Scrolled to the top: line 1, with only a window of lines in the DOM.
    scroller.evaluate("s => { s.scrollTop = 0; }")
    expect(line(pane, 0)).to_have_text("1")
    assert line(pane, 0).evaluate(IN_SIGHT)
    assert pane.locator(".line").count() < 500
    expect(jump).to_be_visible()
    # End on the focused output: the latest line again, following.
    scroller.focus()
    page.keyboard.press("End")
    expect(line(pane, LINES - 1)).to_have_text(str(LINES))
    assert line(pane, LINES - 1).evaluate(IN_SIGHT)
    expect(jump).to_be_hidden()
    # Home, PageDown: line 1, then the lines a page further.
    page.keyboard.press("Home")
    expect(line(pane, 0)).to_have_text("1")
    assert line(pane, 0).evaluate(IN_SIGHT)
    page.keyboard.press("PageDown")
    expect(line(pane, 0)).not_to_be_in_viewport()
    shown = scroller.evaluate("s => s.scrollTop")
    assert shown > 10 * LINE_HEIGHT, shown
    # The button: the latest line again.
    jump.click()
    expect(jump).to_be_hidden()
    assert line(pane, LINES - 1).evaluate(IN_SIGHT)
    assert pane.locator(".line").count() < 500
    page.context.close()


def test_reveal_brings_a_middle_line_into_sight_with_its_hits_marked(
        browser: Any, cluster: Cluster, big_run: str, alice: UnixUser) -> None:
    """What the search (run_search.js) does with a hit: runView.reveal and runView.highlight."""
    controller, names = cluster
    page = open_run(browser, controller, alice, big_run)
    pane = page.locator(f'.host-pane[data-host="{names[0]}"]')
    expect(line(pane, LINES - 1)).to_have_text(str(LINES))
    execution = line(pane, LINES - 1).get_attribute("data-segment")
    page.evaluate("needle => runView.highlight(needle, {caseSensitive: false})", "12345")
    page.evaluate("hit => runView.reveal(hit)",
                  {"execution_id": execution, "host": names[0], "task_id": None,
                   "seq": 123449, "stream": "stdout", "text": "123450", "at": [[0, 5]]})
    target = line(pane, 123449)
    expect(target).to_have_text("123450")
    assert target.evaluate(IN_SIGHT)
    expect(target).to_have_class("line stdout current-line")
    expect(target.locator("mark.hit.current")).to_have_text("12345")
    # Other lines with the needle are marked too, not current; the reader is not following.
    expect(line(pane, 123450).locator("mark.hit")).to_have_text("12345")
    expect(line(pane, 123450).locator("mark.current")).to_have_count(0)
    expect(pane.get_by_role("button", name=f"Jump to latest output of {names[0]}")).to_be_visible()
    # No needle: no marks.
    page.evaluate("() => runView.highlight(null)")
    expect(pane.locator("mark")).to_have_count(0)
    expect(target).to_have_text("123450")
    page.context.close()


def test_wrapping_long_lines_is_a_toggle_kept_in_the_browser(
        browser: Any, cluster: Cluster, alice: UnixUser, signer: TokenSigner) -> None:
    controller, names = cluster
    token = signer.issue(alice.name)
    run_id = finished_run(controller, token, names[1],
                          "echo first; printf 'x%.0s' $(seq 1 600); echo; echo last")
    page = open_run(browser, controller, alice, run_id)
    pane = page.locator(f'.host-pane[data-host="{names[1]}"]')
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
