"""The main page as a tool people live in (issue 13), in a real chromium against a real
controller, real agents and real PAM logins: tabs and keyboard-only deploy (item 7), follow per
execution (item 4), the node table at 50 and 1,000 nodes (item 8)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from playwright.sync_api import Page, expect

from tests.support.controller_process import ControllerProcess
from tests.support.users import UnixUser
from tests.support.web import TIMEOUT_MS, open_logged_in

LIVE = "live"
TABBABLE_MAX = 80  # Tab presses to reach a control: more means it is not reachable


def pane(page: Page, name: str) -> Any:
    return page.locator(f'.pane[data-node="{name}"]')


def logged_in_page(browser: Any, controller: ControllerProcess, user: UnixUser) -> Page:
    page: Page = browser.new_context().new_page()
    page.set_default_timeout(TIMEOUT_MS)
    open_logged_in(page, controller, user)
    return page


def tab_to(page: Page, selector: str) -> None:
    """Press Tab (keyboard only) until the focused element matches `selector`."""
    for _ in range(TABBABLE_MAX):
        page.keyboard.press("Tab")
        if page.evaluate("s => document.activeElement.matches(s)", selector):
            return
    raise AssertionError(f"{selector} not reached by {TABBABLE_MAX} Tab presses")


def test_run_tabs_are_a_tablist_the_arrow_keys_move_in(browser: Any, cluster: Any,
                                                        alice: UnixUser) -> None:
    controller, _ = cluster
    page = logged_in_page(browser, controller, alice)
    tablist = page.get_by_role("tablist", name="Act on the chosen nodes")
    shell, deploy = (tablist.get_by_role("tab", name=n) for n in ("Shell", "Deploy"))
    expect(shell).to_have_attribute("aria-selected", "true")
    expect(deploy).to_have_attribute("aria-selected", "false")
    for tab in (shell, deploy):  # each names the panel it shows, and that panel is a tabpanel
        panel = page.locator("#" + str(tab.get_attribute("aria-controls")))
        expect(panel).to_have_attribute("role", "tabpanel")
    shell_panel = page.get_by_role("tabpanel", name="Shell")
    deploy_panel = page.locator("#deploy-form")
    expect(shell_panel).to_be_visible()
    expect(deploy_panel).to_be_hidden()
    # Only the selected tab is in the Tab order: from the tab, Tab goes into its panel.
    tab_to(page, "#tab-shell")
    page.keyboard.press("ArrowRight")
    expect(deploy).to_be_focused()
    expect(deploy).to_have_attribute("aria-selected", "true")
    expect(shell).to_have_attribute("aria-selected", "false")
    expect(deploy_panel).to_be_visible()
    expect(shell_panel).to_be_hidden()
    page.keyboard.press("ArrowRight")  # wraps round
    expect(shell).to_be_focused()
    page.keyboard.press("End")
    expect(deploy).to_be_focused()
    page.keyboard.press("Home")
    expect(shell).to_be_focused()
    page.keyboard.press("ArrowLeft")
    expect(deploy).to_have_attribute("aria-selected", "true")
    page.keyboard.press("Tab")
    expect(page.locator("#deploy-file")).to_be_focused()
    page.context.close()


def test_keyboard_only_deploy(browser: Any, cluster: Any, alice: UnixUser,
                              tmp_path: Path) -> None:
    """Tick a node, choose a file and deploy it with Tab, arrows, Space and Enter only; the
    page says which file was chosen and shows the command's output."""
    controller, names = cluster
    page = logged_in_page(browser, controller, alice)
    expect(pane(page, names[0]).locator(".link-state")).to_have_text(LIVE)
    checkbox = page.get_by_role("checkbox", name=f"Select {names[0]}")
    tab_to(page, f'.node-select[value="{names[0]}"]')
    page.keyboard.press("Space")
    expect(checkbox).to_be_checked()
    tab_to(page, "#tab-shell")
    page.keyboard.press("ArrowRight")
    source = tmp_path / "keyboard.txt"
    source.write_text("deployed by keyboard\n")
    page.keyboard.press("Tab")
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Space")
    chooser.value.set_files(str(source))
    expect(page.locator("#drop-label")).to_contain_text("Chosen: keyboard.txt")
    page.keyboard.press("Tab")
    expect(page.locator("#deploy-folder")).to_be_focused()
    page.keyboard.press("Tab")  # the overwrite box
    page.keyboard.press("Tab")
    expect(page.locator("#deploy-command")).to_be_focused()
    page.keyboard.type("cat keyboard.txt")
    page.keyboard.press("Tab")
    expect(page.locator("#deploy-run")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator(".result").first.locator(".ok", has_text=f"{names[0]}: done")).to_be_visible()
    block = pane(page, names[0]).locator(".execution").last
    expect(block.locator(".line", has_text="deployed by keyboard")).to_be_visible()
    assert (Path(alice.home) / "keyboard.txt").read_text() == "deployed by keyboard\n"
    page.context.close()


def test_new_output_is_announced_briefly(browser: Any, cluster: Any, alice: UnixUser) -> None:
    """A polite live region says how many lines came, per node, not the lines themselves."""
    controller, names = cluster
    page = logged_in_page(browser, controller, alice)
    expect(pane(page, names[0]).locator(".link-state")).to_have_text(LIVE)
    region = page.locator("#output-announcer")
    expect(region).to_have_attribute("aria-live", "polite")
    page.get_by_role("checkbox", name=f"Select {names[0]}").check()
    page.fill("#shell-command", "seq 1 12")
    page.click("#shell-run")
    expect(region).to_have_text(re.compile(rf"^{re.escape(names[0])}: 12 new lines$"))
    page.context.close()


# A command printing a line every ~10 ms for several seconds: the page shows it as it runs.
SLOW = "for i in $(seq 1 1500); do echo line-$i; sleep 0.01; done"


def at_bottom(box: Any) -> bool:
    return bool(box.evaluate("b => b.scrollHeight - b.scrollTop - b.clientHeight < 4"))


def wait_for_lines(box: Any, more_than: int) -> None:
    """Until the box shows more than `more_than` lines; checked in the page so no scroll of
    ours comes between, given up after TIMEOUT_MS."""
    box.evaluate("(b, [n, ms]) => new Promise((resolve, reject) => { const end = Date.now() + ms;"
                 " const check = () => b.childElementCount > n ? resolve()"
                 " : Date.now() > end ? reject(new Error(`still ${b.childElementCount} lines`))"
                 " : setTimeout(check, 50); check(); })", [more_than, TIMEOUT_MS])


def test_an_execution_follows_stops_when_scrolled_up_and_jumps_to_latest(
        browser: Any, cluster: Any, alice: UnixUser) -> None:
    controller, names = cluster
    page = logged_in_page(browser, controller, alice)
    expect(pane(page, names[0]).locator(".link-state")).to_have_text(LIVE)
    page.get_by_role("checkbox", name=f"Select {names[0]}").check()
    page.fill("#shell-command", SLOW)
    page.click("#shell-run")
    block = pane(page, names[0]).locator(".execution", has_text="line-1").last
    box = block.locator("pre.lines")
    jump = block.get_by_role("button", name=f"Jump to latest output of {names[0]}")
    # Following: more lines than the box holds, and it stays at its bottom as they come.
    wait_for_lines(box, 100)
    wait_for_lines(box, box.evaluate("b => b.childElementCount"))
    assert box.evaluate("b => b.scrollHeight > 2 * b.clientHeight")
    assert at_bottom(box)
    expect(jump).to_be_hidden()
    # Scrolled up: the button shows, and new lines do not move the reader.
    box.evaluate("b => { b.scrollTop = 0; }")
    expect(jump).to_be_visible()
    wait_for_lines(box, box.evaluate("b => b.childElementCount"))
    assert box.evaluate("b => b.scrollTop") == 0
    expect(jump).to_be_visible()
    # The button, by keyboard: at the bottom again and following, the button gone.
    jump.focus()
    page.keyboard.press("Enter")
    expect(jump).to_be_hidden()
    assert at_bottom(box)
    wait_for_lines(box, box.evaluate("b => b.childElementCount"))
    assert at_bottom(box)
    assert page.locator("#follow").count() == 0  # no page-wide switch any more
    page.context.close()
