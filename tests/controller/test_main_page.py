"""The main page as a tool people live in (issue 13), in a real chromium against a real
controller, real agents and real PAM logins: tabs and keyboard-only deploy (item 7), follow per
execution (item 4), the node table at 50 and 1,000 nodes (item 8)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from marco.tokens import TokenSigner
from tests.support.controller_process import ControllerProcess
from tests.support.http import call
from tests.support.users import UnixUser
from tests.support.waiting import wait_for
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
    terminals = tablist.get_by_role("tab", name="Terminals")  # the last tab (issue 16)
    page.keyboard.press("ArrowRight")
    expect(terminals).to_be_focused()
    page.keyboard.press("ArrowRight")  # wraps round
    expect(shell).to_be_focused()
    page.keyboard.press("End")
    expect(terminals).to_be_focused()
    page.keyboard.press("Home")
    expect(shell).to_be_focused()
    page.keyboard.press("ArrowLeft")  # wraps round backwards
    expect(terminals).to_have_attribute("aria-selected", "true")
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
    # The Deploy tab is chosen and its form shown before Tab moves on (on a busy host the
    # keys come faster than the page switches panes).
    expect(page.locator("#tab-deploy")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#deploy-form")).to_be_visible()
    source = tmp_path / "keyboard.txt"
    source.write_text("deployed by keyboard\n")
    page.keyboard.press("Tab")
    expect(page.locator("#deploy-file")).to_be_focused()
    # Space on the focused file input opens the chooser; under CI load headless Chromium
    # once let it pass without one (20 s): press again, as a person would.
    for tries_left in (2, 1, 0):
        try:
            with page.expect_file_chooser(timeout=7000) as chooser:
                page.keyboard.press("Space")
            break
        except PlaywrightTimeout:
            if not tries_left:
                raise
            expect(page.locator("#deploy-file")).to_be_focused()
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


def wait_taller(box: Any, than: int) -> None:
    """Until the box's scroll height passes `than` px (more lines came: the view makes room
    for every line, rendered or not); checked in the page so no scroll of ours comes between,
    given up after TIMEOUT_MS."""
    box.evaluate("(b, [h, ms]) => new Promise((resolve, reject) => { const end = Date.now() + ms;"
                 " const check = () => b.scrollHeight > h ? resolve()"
                 " : Date.now() > end ? reject(new Error(`still ${b.scrollHeight} px`))"
                 " : setTimeout(check, 50); check(); })", [than, TIMEOUT_MS])


def height(box: Any) -> int:
    return int(box.evaluate("b => b.scrollHeight"))


def test_an_execution_follows_stops_when_scrolled_up_and_jumps_to_latest(
        browser: Any, cluster: Any, alice: UnixUser) -> None:
    controller, names = cluster
    page = logged_in_page(browser, controller, alice)
    expect(pane(page, names[0]).locator(".link-state")).to_have_text(LIVE)
    page.get_by_role("checkbox", name=f"Select {names[0]}").check()
    page.fill("#shell-command", SLOW)
    page.click("#shell-run")
    block = pane(page, names[0]).locator(".execution", has_text="line-1").last
    box = block.get_by_role("region", name=f"Output of {names[0]}")
    jump = block.get_by_role("button", name=f"Jump to latest output of {names[0]}")
    # Following: more lines than the box holds, and it stays at its bottom as they come.
    wait_taller(box, 17 * 100)  # 100 lines of 17 px: several times what the box shows
    assert box.evaluate("b => b.scrollHeight > 2 * b.clientHeight")
    wait_taller(box, height(box))
    wait_for(lambda: at_bottom(box), what="the box at its bottom", timeout=5)
    expect(jump).to_be_hidden()
    # Scrolled up: the button shows, and new lines do not move the reader.
    box.evaluate("b => { b.scrollTop = 0; }")
    expect(jump).to_be_visible()
    wait_taller(box, height(box))
    assert box.evaluate("b => b.scrollTop") == 0
    expect(box.locator(".line", has_text=re.compile(r"^line-1$"))).to_be_visible()
    expect(jump).to_be_visible()
    # The button, by keyboard: at the bottom again and following, the button gone.
    jump.focus()
    page.keyboard.press("Enter")
    expect(jump).to_be_hidden()
    wait_for(lambda: at_bottom(box), what="the box at its bottom", timeout=5)
    wait_taller(box, height(box))
    wait_for(lambda: at_bottom(box), what="the box at its bottom", timeout=5)
    assert page.locator("#follow").count() == 0  # no page-wide switch any more
    page.context.close()


# The nodes the page watches over its one socket (issue 15), followed by wrapping the browser's
# own WebSocket: watch and unwatch sent, `gone` received, all ended when the socket closes.
# `heldSockets()` names the nodes watched now; `sockets` counts the WebSockets open (one).
COUNT_SOCKETS = """(() => {
  const Native = window.WebSocket, held = new Set();
  window.sockets = 0;
  window.heldSockets = () => [...held];
  const note = () => { window.mostHeld = Math.max(window.mostHeld || 0, held.size); };
  window.WebSocket = class extends Native {
    constructor(url, protocols) {
      super(url, protocols);
      window.sockets += 1;
      this.addEventListener("message", (m) => {
        const e = JSON.parse(m.data);
        if (e.type === "gone") held.delete(e.node);
      });
      this.addEventListener("close", () => { window.sockets -= 1; held.clear(); });
    }
    send(data) {
      const m = JSON.parse(data);
      if (m.type === "watch") { held.add(m.node); note(); }
      if (m.type === "unwatch") held.delete(m.node);
      return super.send(data);
    }
  };
})();"""
ROWS = "#node-rows tr[data-node]"
# The names of the table's rows that intersect its scroll box, as the page shows them.
IN_SIGHT = """() => { const wrap = document.getElementById("node-table-wrap");
  const top = wrap.getBoundingClientRect().top + wrap.clientTop, bottom = top + wrap.clientHeight;
  return [...document.querySelectorAll("#node-rows tr[data-node]")].filter((tr) => {
    const r = tr.getBoundingClientRect(); return r.bottom > top && r.top < bottom;
  }).map((tr) => tr.dataset.node); }"""
ALIVE_AT_MOST = 40  # nodes that are a real agent (one agent under many names; the rest are down)


def static_nodes(count: int, agent_address: str) -> tuple[list[str], set[str]]:
    """`count` node specs sc1..scN: every k-th one the real agent, the rest a closed port."""
    step = max(1, count // ALIVE_AT_MOST)
    alive = {f"sc{i}" for i in range(1, count + 1) if i % step == 0}
    return ([f"sc{i}={agent_address if f'sc{i}' in alive else '127.0.0.1:1'}"
             for i in range(1, count + 1)], alive)


def big_cluster(start_agent: Any, start_controller: Any, unique_name: Any, signer: TokenSigner,
                alice: UnixUser, tmp_path: Path, count: int) -> tuple[ControllerProcess, set[str]]:
    """A controller with `count` static nodes from its config file (too many for flags to be
    pleasant), of which up to ALIVE_AT_MOST reach one real agent in group `web` (plain HTTP:
    one agent answers to many node names only without certificates naming it)."""
    # One agent under many names: each name watched is one more stream of the user's and one
    # more status subscription of the controller's on it (one per node on a real cluster).
    agent = start_agent(node_name=unique_name("table"), pki=None,
                        extra_args=["--groups", "web", "--max-sockets-per-user", "200"])
    specs, alive = static_nodes(count, f"{agent.host}:{agent.port}")
    config = tmp_path / "controller.toml"
    config.write_text(f"discovery = false\nnode = {json.dumps(specs)}\n")
    controller = start_controller(pki=None, extra_args=["--config", str(config),
                                                        "--health-failures", "1"])
    token = signer.issue(alice.name)

    def settled() -> bool:
        nodes = call(controller, "GET", "/api/nodes", token=token)[1]["nodes"]
        return {n["name"] for n in nodes if n["alive"]} == alive and len(nodes) == count
    wait_for(settled, what=f"{len(alive)} of {count} nodes up", timeout=60)
    return controller, alive


def row_names(page: Page) -> list[str]:
    return [str(n) for n in page.locator(ROWS).evaluate_all("rs => rs.map((r) => r.dataset.node)")]


def sockets_only_in_sight(page: Page) -> bool:
    """Every socket the page holds is for a node whose row is in sight."""
    held, in_sight = page.evaluate("heldSockets()"), page.evaluate(IN_SIGHT)
    return set(held) <= set(in_sight)


@pytest.mark.parametrize("count", [50, 1000])
def test_node_table_at_scale(browser: Any, start_agent: Any, start_controller: Any,
                             unique_name: Any, signer: TokenSigner, alice: UnixUser,
                             tmp_path: Path, count: int) -> None:
    controller, alive = big_cluster(start_agent, start_controller, unique_name, signer, alice,
                                    tmp_path, count)
    context = browser.new_context()
    context.add_init_script(COUNT_SOCKETS)
    page: Page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    began = time.monotonic()
    open_logged_in(page, controller, alice)
    table, shown = page.locator("#node-table"), page.locator("#node-shown")
    # Many nodes: the table is the view; fifty: the cards, until the table is picked.
    table_button = page.get_by_role("button", name="Table")
    if count > 50:
        expect(table_button).to_have_attribute("aria-pressed", "true")
    else:
        expect(page.locator(".node").first).to_be_visible()
        table_button.click()
    expect(table).to_have_attribute("aria-rowcount", str(count + 1))
    print(f"{count} nodes: the table was shown {time.monotonic() - began:.2f} s after opening")
    expect(shown).to_have_text(f"{count} shown")
    assert page.locator(ROWS).count() <= 40  # only the rows in sight and a margin
    # Names in natural order, either way.
    assert row_names(page)[:12] == [f"sc{i}" for i in range(1, 13)]
    page.get_by_role("button", name="Name").click()
    expect(page.locator(ROWS).first).to_have_attribute("data-node", f"sc{count}")
    assert row_names(page)[:3] == [f"sc{i}" for i in range(count, count - 3, -1)]
    # The search narrows the table.
    page.get_by_role("searchbox", name="Search nodes").fill("sc10")
    matching = [i for i in range(1, count + 1) if "sc10" in f"sc{i}"]
    expect(table).to_have_attribute("aria-rowcount", str(len(matching) + 1))
    expect(shown).to_have_text(f"{len(matching)} of {count} shown")
    page.get_by_role("searchbox", name="Search nodes").fill("")
    # The group filter keeps the real agent's nodes, which give live status in their rows.
    page.get_by_role("combobox", name="Group").select_option("web")
    expect(table).to_have_attribute("aria-rowcount", str(len(alive) + 1))
    first = page.locator(ROWS).first
    expect(first.locator(".col-status")).to_have_text("up")
    expect(first.locator(".col-cpu")).to_have_text(re.compile(r"^\d+%$"), timeout=TIMEOUT_MS)
    # Sockets only for the rows in sight (once those that were in sight before let go).
    wait_for(lambda: sockets_only_in_sight(page), what="sockets only for rows in sight")
    held = page.evaluate("heldSockets()")
    assert 0 < len(held) < len(alive), held
    # Scrolled to the end: the new rows in sight get theirs, the old ones close.
    page.locator("#node-table-wrap").evaluate("w => { w.scrollTop = w.scrollHeight; }")
    expect(page.locator(ROWS).last).to_be_in_viewport()
    wait_for(lambda: sockets_only_in_sight(page) and page.evaluate("heldSockets()"),
             what="sockets moved to the rows in sight")
    assert len(page.evaluate("heldSockets()")) < len(alive)
    context.close()


def test_table_sorts_numbers_by_value_and_names_naturally(browser: Any, cluster: Any,
                                                          alice: UnixUser) -> None:
    """The page's own comparison: 9 < 10 < 100 with missing values last in both directions,
    and sc2 before sc10."""
    controller, _ = cluster
    page = logged_in_page(browser, controller, alice)
    order = page.evaluate("""() => {
      const view = (name, cpu) => ({ node: { name, groups: [], txt: {} },
                                     lastStatus: cpu === null ? null : { cpu: { percent: cpu } } });
      const views = [view("sc10", 100), view("sc2", null), view("sc1", 9), view("sc3", 10)];
      const cpu = NODE_COLUMNS.find((c) => c.key === "cpu"), name = NODE_COLUMNS[0];
      const names = (column, dir) => [...views].sort(compareBy(column, dir)).map((v) => v.node.name);
      return [names(cpu, 1), names(cpu, -1), names(name, 1)];
    }""")
    assert order == [["sc1", "sc3", "sc10", "sc2"], ["sc10", "sc3", "sc1", "sc2"],
                     ["sc1", "sc2", "sc3", "sc10"]]
    page.context.close()


def test_selection_is_shared_by_cards_and_table_and_the_view_is_remembered(
        browser: Any, cluster: Any, alice: UnixUser) -> None:
    controller, names = cluster
    page = logged_in_page(browser, controller, alice)
    page.get_by_role("checkbox", name=f"Select {names[1]}").check()  # on its card
    page.get_by_role("button", name="Table").click()
    row = page.locator(f'{ROWS}[data-node="{names[1]}"]')
    expect(row.get_by_role("checkbox")).to_be_checked()
    page.locator(f'{ROWS}[data-node="{names[0]}"]').get_by_role("checkbox").check()
    page.reload()  # the table stays the view; the choice is the page's, not kept
    expect(page.get_by_role("button", name="Table")).to_have_attribute("aria-pressed", "true")
    expect(page.locator(".node").first).to_be_hidden()
    row.get_by_role("checkbox").check()
    page.get_by_role("button", name="Cards").click()
    expect(page.get_by_role("checkbox", name=f"Select {names[1]}")).to_be_checked()
    expect(page.get_by_role("checkbox", name=f"Select {names[0]}")).not_to_be_checked()
    page.context.close()


def test_a_small_cluster_keeps_every_node_live_out_of_sight(browser: Any, cluster: Any,
                                                            alice: UnixUser) -> None:
    """A few nodes each hold their socket whether their card is in sight or not (output started
    elsewhere shows in every pane); the in-sight rule is for many nodes."""
    controller, names = cluster
    page: Page = browser.new_context(viewport={"width": 500, "height": 300}).new_page()
    page.set_default_timeout(TIMEOUT_MS)
    open_logged_in(page, controller, alice)
    last = page.locator(f'.node[data-node="{names[-1]}"]')
    expect(last).to_be_attached()
    expect(last).not_to_be_in_viewport()
    for name in names:
        expect(pane(page, name).locator(".link-state")).to_have_text(LIVE)
    page.context.close()


def test_every_line_of_a_long_execution_is_reachable(browser: Any, cluster: Any,
                                                     alice: UnixUser) -> None:
    """An execution's lines are a virtual list: 20,000 lines (four times what the page kept
    before) all reachable, live and after a reload (read back from the agent by replay as
    they come into sight)."""
    controller, names = cluster
    page = logged_in_page(browser, controller, alice)
    expect(pane(page, names[0]).locator(".link-state")).to_have_text(LIVE)
    page.get_by_role("checkbox", name=f"Select {names[0]}").check()
    page.fill("#shell-command", "seq 1 20000; echo every-line-$((6*7))")
    page.click("#shell-run")
    for reloaded in (False, True):
        block = pane(page, names[0]).locator(".execution", has_text="seq 1 20000").last
        expect(block.locator(".exec-state")).to_have_text("rc=0")
        box = block.get_by_role("region", name=f"Output of {names[0]}")
        expect(box.locator(".line", has_text="every-line-42")).to_be_visible()
        assert box.locator(".line").count() < 1000, reloaded  # only those in sight, and a margin
        box.focus()
        page.keyboard.press("Home")
        expect(box.locator(".line", has_text=re.compile(r"^1$"))).to_be_visible()
        expect(box.locator(".line", has_text=re.compile(r"^2$"))).to_be_visible()
        page.keyboard.press("End")
        expect(box.locator(".line", has_text=re.compile(r"^20000$"))).to_be_visible()
        if not reloaded:
            page.reload()
    page.context.close()


def table_page(browser: Any, controller: ControllerProcess, user: UnixUser,
               height: int = 720) -> Page:
    """A logged-in page counting its sockets, showing the node table."""
    context = browser.new_context(viewport={"width": 1280, "height": height})
    context.add_init_script(COUNT_SOCKETS)
    page: Page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    open_logged_in(page, controller, user)
    page.get_by_role("button", name="Table").click()
    expect(page.locator(ROWS).first).to_be_visible()
    return page


def focused_row(page: Page) -> str | None:
    return page.evaluate("() => document.activeElement.closest('tr')?.dataset.node ?? null")


def test_keyboard_tabs_through_every_row_of_the_table(browser: Any, start_agent: Any,
                                                       start_controller: Any, unique_name: Any,
                                                       signer: TokenSigner, alice: UnixUser,
                                                       tmp_path: Path) -> None:
    """Tab goes from row to row past the first screen (the rows rendered change on the way, and
    the focused one keeps its focus), and the row reached can be ticked by Space."""
    controller, _ = big_cluster(start_agent, start_controller, unique_name, signer, alice,
                                tmp_path, 60)
    page = table_page(browser, controller, alice)
    assert page.locator(ROWS).count() < 40  # the rows rendered must change on the way down
    page.locator(ROWS).first.get_by_role("checkbox").focus()
    for _ in range(40):
        page.keyboard.press("Tab")
    assert focused_row(page) == "sc41"
    page.keyboard.press("Space")
    expect(page.locator(f'{ROWS}[data-node="sc41"]').get_by_role("checkbox")).to_be_checked()
    # Scrolled away by the pointer, the focused row stays (and Tab goes on from it).
    page.locator("#node-table-wrap").evaluate("w => { w.scrollTop = 0; }")
    expect(page.locator(ROWS).first).to_have_attribute("data-node", "sc1")
    page.keyboard.press("Tab")
    assert focused_row(page) == "sc42"
    page.context.close()


def test_watches_are_for_rows_in_sight_never_for_ticks_over_one_socket(
        browser: Any, start_agent: Any, start_controller: Any, unique_name: Any,
        signer: TokenSigner, alice: UnixUser, tmp_path: Path) -> None:
    """Ticking every node watches none of the rows out of sight; a box showing 40 live rows
    watches those 40, all over the page's one WebSocket (issue 15)."""
    controller, alive = big_cluster(start_agent, start_controller, unique_name, signer, alice,
                                    tmp_path, 60)
    assert len(alive) == 60
    page = table_page(browser, controller, alice)
    in_sight = page.evaluate(IN_SIGHT)
    assert 0 < len(in_sight) < 24
    page.get_by_role("button", name="all").click()
    expect(page.locator("#ticked")).to_have_text("on the 60 ticked nodes shown")
    expect(page.locator(f'{ROWS}[data-node="{in_sight[0]}"] .col-cpu')).to_have_text(
        re.compile(r"^\d+%$"))
    # Scrolled on: the ticked rows that left sight are no longer watched.
    page.locator("#node-table-wrap").evaluate("w => { w.scrollTop = w.scrollHeight; }")
    wait_for(lambda: set(page.evaluate("heldSockets()")) == set(page.evaluate(IN_SIGHT)),
             what="a watch for each row in sight, none for the ticked rows out of sight")
    # Taller: 40 rows in sight, 40 watched (two refreshes of the node list on, which review
    # every node's watch, still), over one socket.
    page.set_viewport_size({"width": 1280, "height": 2100})
    wait_for(lambda: len(page.evaluate(IN_SIGHT)) >= 40, what="40 rows in sight")
    wait_for(lambda: set(page.evaluate("heldSockets()")) == set(page.evaluate(IN_SIGHT)),
             what="a watch for each of the rows in sight")
    for _ in range(2):
        with page.expect_response(lambda r: r.url.endswith("/api/nodes")):
            pass
    assert set(page.evaluate("heldSockets()")) == set(page.evaluate(IN_SIGHT))
    assert page.evaluate("window.sockets") == 1
    page.context.close()


def test_a_node_keeps_its_newest_20_executions(browser: Any, cluster: Any,
                                                alice: UnixUser) -> None:
    """A page left open keeps a node's newest 20 executions, not every one it saw."""
    controller, names = cluster
    name = names[1]
    page = logged_in_page(browser, controller, alice)
    expect(pane(page, name).locator(".link-state")).to_have_text(LIVE)
    page.get_by_role("checkbox", name=f"Select {name}").check()
    tag = f"kept{time.monotonic_ns()}"
    commands = [f"echo {tag}-{i}" for i in range(1, 24)]
    for command in commands:  # one after the other, so their order is known
        page.fill("#shell-command", command)
        page.click("#shell-run")
        block = pane(page, name).locator(".execution").filter(
            has=page.locator(".exec-command", has_text=re.compile(f"^{command}$")))
        expect(block.locator(".exec-state")).to_have_text("rc=0")
    shown = pane(page, name).locator(".exec-command")
    expect(shown).to_have_count(20)
    assert shown.all_inner_texts() == commands[-20:]
    page.context.close()


def test_run_acts_only_on_the_ticked_nodes_the_filter_shows(browser: Any, cluster: Any,
                                                            alice: UnixUser) -> None:
    controller, names = cluster
    page = logged_in_page(browser, controller, alice)
    ticked = page.locator("#ticked")
    for name in names:
        page.get_by_role("checkbox", name=f"Select {name}").check()
    expect(ticked).to_have_text("on the 2 ticked nodes shown")
    page.get_by_role("searchbox", name="Search nodes").fill(names[1])
    expect(ticked).to_have_text(
        "on the 1 ticked node shown; 1 more ticked but hidden by the filter, left out")
    page.fill("#shell-command", "true")
    with page.expect_request(lambda r: r.url.endswith("/api/run")) as request:
        page.click("#shell-run")
    assert json.loads(str(request.value.post_data))["nodes"] == [names[1]]
    page.context.close()


def test_node_element_ids_differ_for_names_that_differ(browser: Any, cluster: Any,
                                                       alice: UnixUser) -> None:
    """web.1 and web_1 get different ids (one name always the same); the panes' ids differ."""
    controller, _ = cluster
    page = logged_in_page(browser, controller, alice)
    ids = page.evaluate('() => [cssId("web.1"), cssId("web_1"), cssId("web.1")]')
    assert ids[0] != ids[1] and ids[0] == ids[2], ids
    page.locator(".pane").first.wait_for(state="attached")  # the nodes are listed
    panes = page.locator(".pane").evaluate_all("ps => ps.map((p) => p.id)")
    assert len(set(panes)) == len(panes) > 0
    page.context.close()


def test_an_unreachable_controller_is_one_status_line_and_results_stay(
        browser: Any, start_agent: Any, start_controller: Any, unique_name: Any,
        signer: TokenSigner, alice: UnixUser, tmp_path: Path) -> None:
    """While the node list cannot be refreshed, one status line says so (replaced, not one
    notice per try), and the results shown stay; it goes once the controller is back."""
    controller, _ = big_cluster(start_agent, start_controller, unique_name, signer, alice,
                                tmp_path, 1)
    page = logged_in_page(browser, controller, alice)
    status, results = page.locator("#page-status"), page.locator("#run-results > *")
    page.fill("#shell-command", "true")
    page.click("#shell-run")  # nothing ticked: a result says so
    expect(results).to_have_count(1)
    controller.stop()
    expect(status).to_contain_text("Cannot refresh the nodes")
    for _ in range(3):  # three more tries fail
        with page.expect_event("requestfailed", lambda r: r.url.endswith("/api/nodes")):
            pass
    expect(results).to_have_count(1)
    expect(page.locator("#notices > *")).to_have_count(0)
    back = controller.restarted()
    try:
        expect(status).to_be_hidden()
        expect(status).to_have_text("")
    finally:
        back.stop()
    page.context.close()


def test_an_execution_that_ended_while_disconnected_is_shown_ended(
        browser: Any, start_agent: Any, start_controller: Any, unique_name: Any,
        signer: TokenSigner, alice: UnixUser, tmp_path: Path) -> None:
    """The controller is away while an execution ends and 21 more run: back, the page learns
    it ended though it is not among the 20 newest the agent's hello lists for new views."""
    agent = start_agent(node_name=unique_name("gap"), pki=None)
    config = tmp_path / "controller.toml"
    config.write_text(f'discovery = false\nnode = ["gap1={agent.host}:{agent.port}"]\n')
    controller = start_controller(pki=None, extra_args=["--config", str(config)])
    client = agent.client(signer.issue(alice.name))
    page = logged_in_page(browser, controller, alice)
    link = pane(page, "gap1").locator(".link-state")
    expect(link).to_have_text(LIVE)
    long = client.start("sleep 600", label="long")
    block = pane(page, "gap1").locator(f'.execution[data-id="{long}"]')
    expect(block.locator(".exec-state")).to_have_text("running")
    controller.stop()
    expect(link).to_contain_text("disconnected")
    for i in range(21):
        assert client.run(f"echo gap-{i}").rc == 0
    client.stop(long)
    wait_for(lambda: client.execution(long)["state"] != "running", what="the long one ended")
    back = controller.restarted()
    try:
        expect(link).to_have_text(LIVE)
        expect(pane(page, "gap1").locator(".exec-command", has_text="echo gap-20")).to_be_visible()
        # Ended and older than the 20 newest, it goes (kept as running, it stayed for good).
        expect(block).to_have_count(0)
        expect(pane(page, "gap1").locator(".execution")).to_have_count(20)
    finally:
        back.stop()
    page.context.close()


# Every replay the page asks for, as {id, since}, by wrapping the browser's own WebSocket.send.
COUNT_REPLAYS = """(() => {
  const send = WebSocket.prototype.send, asked = [];
  window.replaysAsked = () => asked;
  WebSocket.prototype.send = function (data) {
    try { const m = JSON.parse(data); if (m.type === "replay") asked.push({ id: m.id, since: m.since }); }
    catch (e) { /* not JSON */ }
    return send.call(this, data);
  };
})();"""


def test_lines_an_agent_did_not_keep_are_never_asked_for(
        browser: Any, start_agent: Any, start_controller: Any, unique_name: Any,
        signer: TokenSigner, alice: UnixUser, tmp_path: Path) -> None:
    """An execution whose spool filled up: the page says from which line nothing was kept and
    never replays from there (it asked again every second before)."""
    agent = start_agent(node_name=unique_name("cut"), pki=None,
                        extra_args=["--spool-max-bytes", "1000000"])
    config = tmp_path / "controller.toml"
    config.write_text(f'discovery = false\nnode = ["cut1={agent.host}:{agent.port}"]\n')
    controller = start_controller(pki=None, extra_args=["--config", str(config)])
    client = agent.client(signer.issue(alice.name))
    cut = client.run("seq 1 400000")
    cut_seq = client.execution(cut.id)["truncated_seq"]
    assert isinstance(cut_seq, int) and 0 < cut_seq < 400000
    context = browser.new_context()
    context.add_init_script(COUNT_REPLAYS)
    page: Page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    open_logged_in(page, controller, alice)
    block = pane(page, "cut1").locator(f'.execution[data-id="{cut.id}"]')
    expect(block.locator(".cut-note")).to_have_text(
        f"output from line {cut_seq + 1} on was not kept (the node's spool for it was full)")
    expect(block.locator(".line", has_text=re.compile(f"^{cut_seq}$"))).to_be_visible()
    asked = wait_for(lambda: [r["since"] for r in page.evaluate("replaysAsked()")
                              if r["id"] == cut.id], what="a replay of the cut execution")
    assert max(asked) < cut_seq, asked
    context.close()


def test_a_refused_socket_says_why_and_when_it_is_tried_again(
        browser: Any, start_agent: Any, start_controller: Any, unique_name: Any,
        alice: UnixUser, tmp_path: Path) -> None:
    """A node whose agent refuses the user's stream (here: the user's one socket there is
    taken by a page of another controller; pages of one controller share it) shows the reason
    and when it tries again, not a bare close code."""
    agent = start_agent(node_name=unique_name("cap"), pki=None,
                        extra_args=["--max-sockets-per-user", "1"])
    config = tmp_path / "controller.toml"
    config.write_text(f'discovery = false\nnode = ["cap1={agent.host}:{agent.port}"]\n')
    controller = start_controller(pki=None, extra_args=["--config", str(config)])
    other = start_controller(pki=None, extra_args=["--config", str(config)])
    first = logged_in_page(browser, controller, alice)
    expect(pane(first, "cap1").locator(".link-state")).to_have_text(LIVE)
    same = logged_in_page(browser, controller, alice)
    expect(pane(same, "cap1").locator(".link-state")).to_have_text(LIVE)
    second = logged_in_page(browser, other, alice)
    expect(pane(second, "cap1").locator(".link-state")).to_have_text(re.compile(
        r"^disconnected \(4502: agent unreachable: .*the limit is 1.*\); retrying in \d+ s$"))
    for page in (first, same, second):
        page.context.close()


def test_an_execution_the_agent_dropped_says_so_instead_of_notices(
        browser: Any, start_agent: Any, start_controller: Any, unique_name: Any,
        signer: TokenSigner, alice: UnixUser, tmp_path: Path) -> None:
    """Reading earlier lines of an execution the agent has pruned meanwhile: its view says it
    is no longer on the node (and reads no more); no notice is added."""
    agent = start_agent(node_name=unique_name("pruned"), pki=None,
                        extra_args=["--retention-count", "2"])
    config = tmp_path / "controller.toml"
    config.write_text(f'discovery = false\nnode = ["pr1={agent.host}:{agent.port}"]\n')
    controller = start_controller(pki=None, extra_args=["--config", str(config)])
    client = agent.client(signer.issue(alice.name))
    long = client.run("seq 1 20000").id  # before the page: it reads the lines it shows
    page = logged_in_page(browser, controller, alice)
    expect(pane(page, "pr1").locator(".link-state")).to_have_text(LIVE)
    block = pane(page, "pr1").locator(f'.execution[data-id="{long}"]')
    box = block.get_by_role("region", name="Output of pr1")
    expect(box.locator(".line", has_text=re.compile(r"^20000$"))).to_be_visible()
    for _ in range(2):
        client.run("true")
    assert long not in {e["id"] for e in client.executions()}
    box.focus()
    page.keyboard.press("Home")
    expect(block.locator(".exec-notice")).to_contain_text("no longer on the node")
    expect(page.locator("#notices > *")).to_have_count(0)
    page.context.close()


def test_stop_without_a_socket_says_it_was_not_sent(
        browser: Any, start_agent: Any, start_controller: Any, unique_name: Any,
        signer: TokenSigner, alice: UnixUser, tmp_path: Path) -> None:
    agent = start_agent(node_name=unique_name("nostop"), pki=None)
    config = tmp_path / "controller.toml"
    config.write_text(f'discovery = false\nnode = ["ns1={agent.host}:{agent.port}"]\n')
    controller = start_controller(pki=None, extra_args=["--config", str(config)])
    client = agent.client(signer.issue(alice.name))
    page = logged_in_page(browser, controller, alice)
    link = pane(page, "ns1").locator(".link-state")
    expect(link).to_have_text(LIVE)
    long = client.start("sleep 600", label="long")
    block = pane(page, "ns1").locator(f'.execution[data-id="{long}"]')
    expect(block.locator(".exec-state")).to_have_text("running")
    controller.stop()
    expect(link).to_contain_text("disconnected")
    block.get_by_role("button", name="stop this execution on ns1").click()
    expect(block.locator(".exec-notice")).to_contain_text("not connected: stop not sent")
    assert client.execution(long)["state"] == "running"
    client.stop(long)
    page.context.close()


# The replays the page sends and the output lines it receives, in order, for one execution:
# the browser's own WebSocket, observed (send wrapped, a message listener added).
WATCH_REPLAYS = """(() => {
  const Native = window.WebSocket, log = [];
  window.replayLog = () => log;
  window.WebSocket = class extends Native {
    constructor(url, protocols) {
      super(url, protocols);
      this.addEventListener("message", (m) => {
        const e = JSON.parse(m.data);
        if (e.type === "output") log.push({ kind: "got", id: e.id, seq: e.seq, n: e.lines.length });
      });
    }
    send(data) {
      const m = JSON.parse(data);
      if (m.type === "replay") log.push({ kind: "asked", id: m.id, since: m.since });
      return super.send(data);
    }
  };
})();"""


def test_no_replay_asks_for_lines_the_page_already_has(
        browser: Any, start_agent: Any, start_controller: Any, unique_name: Any,
        signer: TokenSigner, alice: UnixUser, tmp_path: Path) -> None:
    """Shown at a page boundary, a view wants two pages at once; the answer for the first
    brings the second too, so the read queued for it is not sent."""
    agent = start_agent(node_name=unique_name("reads"), pki=None)
    config = tmp_path / "controller.toml"
    config.write_text(f'discovery = false\nnode = ["rd1={agent.host}:{agent.port}"]\n')
    controller = start_controller(pki=None, extra_args=["--config", str(config)])
    long = agent.client(signer.issue(alice.name)).run("seq 1 20000").id
    context = browser.new_context()
    context.add_init_script(WATCH_REPLAYS)
    page: Page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    open_logged_in(page, controller, alice)
    box = pane(page, "rd1").locator(f'.execution[data-id="{long}"]').get_by_role(
        "region", name="Output of rd1")
    expect(box.locator(".line", has_text=re.compile(r"^20000$"))).to_be_visible()
    # Line 10,000 (seq 9999) at the top: pages 9 and 10 are in sight, in one scroll.
    box.evaluate("b => { b.scrollTop = 9999 * 17; }")
    expect(box.locator(".line", has_text=re.compile(r"^10001$"))).to_be_visible()
    expect(box.locator(".line", has_text=re.compile(r"^9999$"))).to_be_visible()
    have: set[int] = set()
    asked = []
    for entry in page.evaluate("replayLog()"):
        if entry["id"] != long:
            continue
        if entry["kind"] == "got":
            have.update(range(entry["seq"], entry["seq"] + entry["n"]))
        else:
            asked.append(entry["since"])
            assert entry["since"] not in have, (entry, asked)
    assert 9000 in asked, asked
    context.close()
