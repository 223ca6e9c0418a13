"""The main page over 1,000 nodes (issue 15, item 2), in a real chromium against a real
controller and 1,000 simulated agents (tests/support/sim_agents.py, not announced: static
nodes, each with its own port and certificate, health with the secret proof, status while
watched): the table keeps
a bounded number of rows in the page, every view sorts names naturally (many-2 before many-10),
search and the group filter narrow it, a selection survives scrolling and is sent in order."""

from __future__ import annotations

import json
import re
import resource
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from marco.tokens import TokenSigner
from tests.support.controller_process import ControllerProcess
from tests.support.pki import TestPki
from tests.support.sim_agents import SimulatorProcess
from tests.support.users import UnixUser
from tests.support.waiting import wait_for
from tests.support.web import TIMEOUT_MS, open_logged_in

COUNT = 1000
PREFIX = "many"
GROUPS = ("even", "odd")    # node i is in GROUPS[i % 2]
ROWS = "#node-rows tr[data-node]"
MAX_ROWS = 60               # rows in the page: those in sight (~16) and ROW_MARGIN each side
MAX_ELEMENTS = 1500         # elements in the whole page: nothing is built per node out of sight
CARDS_AT_ONCE = 100         # marco.js


def name(i: int) -> str:
    return f"{PREFIX}-{i}"


def all_checked(controller: ControllerProcess, token: str) -> bool:
    """Every node up with the facts (groups) of a health check: a static node is listed up,
    without facts, before its first check."""
    nodes = controller.get_json("/api/nodes", token)["nodes"]
    return len(nodes) == COUNT and all(n["alive"] and n["groups"] for n in nodes)


@pytest.fixture(scope="module")
def thousand(secret_file: Path, pki: TestPki, pam_service: str, signer: TokenSigner,
             alice: UnixUser, tmp_path_factory: pytest.TempPathFactory,
             ) -> Iterator[ControllerProcess]:
    """A controller with 1,000 simulated agents as static nodes, all checked."""
    work = tmp_path_factory.mktemp("many")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 1,000 ports, inherited
    simulator = SimulatorProcess(pki, secret_file, work, PREFIX, COUNT,
                                 extra_args=["--no-announce", "--spread-groups",
                                             "--groups", ",".join(GROUPS)])
    controller = None
    try:
        config = work / "controller.toml"
        config.write_text(f"discovery = false\nnode = {json.dumps(simulator.static_nodes())}\n")
        # Health checks of 1,000 nodes every 30 s, not every 0.5 s (the tests' default).
        controller = ControllerProcess(secret_file, work, pam_service=pam_service, pki=pki,
                                       extra_args=["--config", str(config),
                                                   "--health-interval", "30"])
        token = signer.issue(alice.name)
        wait_for(lambda: all_checked(controller, token), 120, f"{COUNT} nodes checked")
        yield controller
    finally:
        if controller is not None:
            controller.stop()
        simulator.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def table_page(browser: Any, controller: ControllerProcess, user: UnixUser) -> Page:
    page: Page = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
    page.set_default_timeout(TIMEOUT_MS)
    open_logged_in(page, controller, user)
    expect(page.get_by_role("button", name="Table")).to_have_attribute("aria-pressed", "true")
    expect(page.locator("#node-table")).to_have_attribute("aria-rowcount", str(COUNT + 1))
    return page


def row_names(page: Page) -> list[str]:
    return [str(n) for n in page.locator(ROWS).evaluate_all("rs => rs.map((r) => r.dataset.node)")]


def scroll_table(page: Page, to: str) -> None:
    """Scroll the table to its top or bottom, and wait for the rows there."""
    page.locator("#node-table-wrap").evaluate(
        "(w, to) => { w.scrollTop = to === 'top' ? 0 : w.scrollHeight; }", to)
    edge = name(0) if to == "top" else name(COUNT - 1)
    expect(page.locator(f'{ROWS}[data-node="{edge}"]')).to_be_in_viewport()


def row_box(page: Page, node: str) -> Any:
    return page.locator(f'{ROWS}[data-node="{node}"]').get_by_role("checkbox")


def test_the_table_keeps_few_rows_sorts_naturally_and_shows_status(
        browser: Any, thousand: ControllerProcess, alice: UnixUser) -> None:
    page = table_page(browser, thousand, alice)
    expect(page.locator("#node-count")).to_have_text(f"{COUNT} up / {COUNT}")
    expect(page.locator("#node-shown")).to_have_text(f"{COUNT} shown")
    # Natural order: many-0, many-1, many-2, ... many-10 (not many-0, many-1, many-10, many-100).
    assert row_names(page)[:12] == [name(i) for i in range(12)]
    assert len(row_names(page)) <= MAX_ROWS
    # The rows in sight get their status over the page's socket.
    expect(page.locator(ROWS).first.locator(".col-cpu")).to_have_text(re.compile(r"^\d+%$"))
    assert page.evaluate("document.getElementsByTagName('*').length") < MAX_ELEMENTS
    scroll_table(page, "bottom")
    names = row_names(page)
    assert len(names) <= MAX_ROWS and names[-3:] == [name(i) for i in (997, 998, 999)]
    assert page.evaluate("document.getElementsByTagName('*').length") < MAX_ELEMENTS
    page.context.close()


def test_search_and_group_filter_narrow_the_table(browser: Any, thousand: ControllerProcess,
                                                  alice: UnixUser) -> None:
    page = table_page(browser, thousand, alice)
    table, shown = page.locator("#node-table"), page.locator("#node-shown")
    search = page.get_by_role("searchbox", name="Search nodes")
    search.fill(name(99))
    expected = [name(99)] + [name(i) for i in range(990, 1000)]
    expect(table).to_have_attribute("aria-rowcount", str(len(expected) + 1))
    expect(shown).to_have_text(f"{len(expected)} of {COUNT} shown")
    assert row_names(page) == expected
    search.fill("")
    group = page.get_by_role("combobox", name="Group")
    assert group.locator("option").all_inner_texts() == ["all groups", *GROUPS]
    group.select_option("odd")
    expect(table).to_have_attribute("aria-rowcount", str(COUNT // 2 + 1))
    assert row_names(page)[:4] == [name(i) for i in (1, 3, 5, 7)]
    search.fill(name(2))  # with the group: many-21, many-23, ..., many-2xx odd ones
    odd_twos = [name(i) for i in range(COUNT) if i % 2 and name(i).startswith(name(2))]
    expect(table).to_have_attribute("aria-rowcount", str(len(odd_twos) + 1))
    assert row_names(page) == odd_twos[:len(row_names(page))]
    group.select_option("")
    search.fill("")
    expect(table).to_have_attribute("aria-rowcount", str(COUNT + 1))
    page.context.close()


def test_a_selection_survives_scrolling_and_is_sent_in_natural_order(
        browser: Any, thousand: ControllerProcess, alice: UnixUser) -> None:
    page = table_page(browser, thousand, alice)
    ticked = page.locator("#ticked")
    for i in (10, 2):
        row_box(page, name(i)).check()
    page.evaluate("document.activeElement.blur()")  # a focused row stays in the page
    scroll_table(page, "bottom")
    assert name(2) not in row_names(page)  # its row left the page
    row_box(page, name(999)).check()
    scroll_table(page, "top")
    expect(row_box(page, name(2))).to_be_checked()
    expect(row_box(page, name(10))).to_be_checked()
    expect(row_box(page, name(3))).not_to_be_checked()
    expect(ticked).to_have_text("on the 3 ticked nodes shown")
    page.fill("#shell-command", "true")
    with page.expect_request(lambda r: r.url.endswith("/api/run")) as request:
        page.click("#shell-run")
    assert json.loads(str(request.value.post_data))["nodes"] == [name(2), name(10), name(999)]
    # "all" ticks the nodes the filter shows; "none" clears them.
    page.get_by_role("combobox", name="Group").select_option("even")
    page.get_by_role("button", name="all").click()
    expect(ticked).to_have_text(f"on the {COUNT // 2} ticked nodes shown; "
                                "1 more ticked but hidden by the filter, left out")
    page.get_by_role("combobox", name="Group").select_option("")
    expect(row_box(page, name(1))).not_to_be_checked()
    scroll_table(page, "bottom")
    expect(row_box(page, name(998))).to_be_checked()
    page.get_by_role("button", name="none").click()
    expect(ticked).to_have_text("tick nodes above to act on them")
    expect(row_box(page, name(998))).not_to_be_checked()
    page.context.close()


def test_cards_come_a_hundred_at_a_time_in_natural_order(
        browser: Any, thousand: ControllerProcess, alice: UnixUser) -> None:
    page = table_page(browser, thousand, alice)
    search = page.get_by_role("searchbox", name="Search nodes")
    search.fill(name(150))  # its row, ticked, then every row again
    row_box(page, name(150)).check()
    search.fill("")
    page.get_by_role("button", name="Cards").click()
    cards = page.locator("#nodes .node")
    expect(cards).to_have_count(CARDS_AT_ONCE)
    shown = cards.evaluate_all("cs => cs.map((c) => c.dataset.node)")
    assert shown == [name(i) for i in range(CARDS_AT_ONCE)]
    more = page.locator("#more-cards")
    expect(more).to_have_text(f"Show {CARDS_AT_ONCE} more ({COUNT - CARDS_AT_ONCE} not shown yet)")
    more.click()
    expect(cards).to_have_count(2 * CARDS_AT_ONCE)
    expect(page.get_by_role("checkbox", name=f"Select {name(150)}")).to_be_checked()
    # A search shows its own first cards.
    search.fill(name(99))
    expect(cards).to_have_count(11)
    expect(more).to_be_hidden()
    page.context.close()


def test_the_inventory_and_the_node_list_are_in_natural_order(
        thousand: ControllerProcess, signer: TokenSigner, alice: UnixUser) -> None:
    """What Ansible runs through (hosts in inventory order) and what `/api/nodes` lists."""
    token = signer.issue(alice.name)
    every, even = [name(i) for i in range(COUNT)], [name(i) for i in range(0, COUNT, 2)]
    inventory = thousand.get_json("/api/inventory", token)
    assert inventory["all"]["hosts"] == every
    assert list(inventory["_meta"]["hostvars"]) == every
    assert inventory["even"]["hosts"] == even
    assert [n["name"] for n in thousand.get_json("/api/nodes", token)["nodes"]] == every
