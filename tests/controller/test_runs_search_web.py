"""The run page's search (issue 13, item 2; run_search.js) in a real chromium against a real
controller and agents: a line of a finished 100,000-line run found and shown marked in its
pane, next and previous through many hits, no match, the stderr and host filters, and the
controls reached by Tab with their names, a running run searched again on Enter, and a
playbook's hits shown in their task's details; a new search aborts the one under way, marks
stay where the hits are whatever case folding does, and paging through hits (3 a page on a
controller of its own) reads each page once and goes on past the first page while a run runs."""

from __future__ import annotations

import contextlib
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Locator, Page, Request, Route, expect

from marco.tokens import TokenSigner
from tests.controller.test_runs_api import gate  # noqa: F401 (a fixture)
from tests.controller.test_runs_download import playbook_with_two_tasks
from tests.support.command_runs import archived_command_run
from tests.support.controller_process import ControllerProcess
from tests.support.daemon import stop_all
from tests.support.http import call
from tests.support.pki import TestPki
from tests.support.users import UnixUser
from tests.support.waiting import wait_for
from tests.support.web import TIMEOUT_MS, expect_in_sight, open_logged_in

Cluster = tuple[ControllerProcess, list[str]]
LINES = 100_000


@pytest.fixture(scope="module")
def big_run(cluster: Cluster, alice: UnixUser, signer: TokenSigner) -> str:
    """One finished run printing 1 to 100,000 on the cluster's first node, stored whole."""
    controller, names = cluster
    return archived_command_run(controller, signer.issue(alice.name), [names[0]], f"seq 1 {LINES}")


def open_run(browser: Any, controller: ControllerProcess, user: UnixUser, run_id: str) -> Page:
    page: Page = browser.new_context().new_page()
    page.set_default_timeout(TIMEOUT_MS)
    open_logged_in(page, controller, user, f"/runs/{run_id}")
    return page


def pane_of(page: Page, host: str) -> Locator:
    return page.locator(f'.host-pane[data-host="{host}"]')


def line(pane: Locator, seq: int) -> Locator:
    return pane.locator(f'.line[data-seq="{seq}"]')


def find(page: Page, text: str) -> None:
    """Type the text into the search box and press Enter, in one task of the page: typing
    alone starts a search after 400 ms, and an Enter that comes later (a loaded CI machine)
    moves to the second hit."""
    page.evaluate("""(text) => {
        const box = document.querySelector("#search-q");
        box.focus();
        box.value = text;
        box.dispatchEvent(new Event("input", { bubbles: true }));
        box.dispatchEvent(new KeyboardEvent("keydown", { key: "Enter", bubbles: true }));
    }""", text)


def expect_current(pane: Locator, seq: int, text: str, needle: str) -> None:
    """Line `seq` of the pane shows `text`, in sight, its hit marked current."""
    target = line(pane, seq)
    expect(target).to_have_text(text)
    expect(target.locator("mark.hit.current")).to_have_text(needle)
    expect_in_sight(target)


def test_search_finds_a_line_of_a_100000_line_run_and_steps_through_hits(
        browser: Any, cluster: Cluster, big_run: str, alice: UnixUser) -> None:
    controller, names = cluster
    page = open_run(browser, controller, alice, big_run)
    pane = pane_of(page, names[0])
    expect(line(pane, LINES - 1)).to_have_text(str(LINES))  # opened at its end
    count = page.locator("#search-count")
    find(page, "77777")
    expect(count).to_have_text("1 of 1")
    expect_current(pane, 77776, "77777", "77777")
    expect(page.locator("mark.hit.current")).to_have_count(1)
    # "9999" is in 19 lines: 9999, 19999, ..., 99999 and 99990 .. 99998, in that order.
    find(page, "9999")
    expect(count).to_have_text("1 of 19")
    expect_current(pane, 9998, "9999", "9999")
    page.press("#search-q", "Enter")
    expect(count).to_have_text("2 of 19")
    expect_current(pane, 19998, "19999", "9999")
    expect(line(pane, 9998)).to_have_count(0)  # far out of sight: not in the DOM
    page.click("#search-next")
    expect(count).to_have_text("3 of 19")
    expect_current(pane, 29998, "29999", "9999")
    page.press("#search-q", "Shift+Enter")
    expect(count).to_have_text("2 of 19")
    page.click("#search-prev")
    page.click("#search-prev")  # before the first: the last
    expect(count).to_have_text("19 of 19")
    expect_current(pane, 99998, "99999", "9999")
    expect(page.locator("mark.hit.current")).to_have_count(1)
    find(page, "not in any line")
    expect(count).to_have_text("no match")
    expect(page.locator("mark.hit")).to_have_count(0)
    page.context.close()


def test_the_search_controls_have_names_and_are_reached_by_tab(
        browser: Any, cluster: Cluster, big_run: str, alice: UnixUser) -> None:
    controller, _ = cluster
    page = open_run(browser, controller, alice, big_run)
    for control in (page.get_by_role("searchbox", name="Search output"),
                    page.get_by_role("button", name="Previous match"),
                    page.get_by_role("button", name="Next match"),
                    page.get_by_role("combobox", name="Host"),
                    page.get_by_role("checkbox", name="stderr only"),
                    page.get_by_role("checkbox", name="failed hosts only"),
                    page.get_by_role("checkbox", name="match case")):
        expect(control).to_be_visible()
    page.focus("#search-q")
    order = []
    for _ in range(6):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id"))
    assert order == ["search-prev", "search-next", "search-host", "search-stderr",
                     "search-failed", "search-case"]
    # By keyboard alone: type, Enter, and the count is read out (a status).
    page.focus("#search-q")
    page.keyboard.type("50000")
    page.keyboard.press("Enter")
    expect(page.get_by_role("status")).to_have_text("1 of 1")
    page.context.close()


def test_stderr_and_host_filters(browser: Any, cluster: Cluster, alice: UnixUser,
                                 signer: TokenSigner) -> None:
    controller, names = cluster
    run_id = archived_command_run(controller, signer.issue(alice.name), names,
                         "echo out-mark; echo err-mark >&2")
    page = open_run(browser, controller, alice, run_id)
    count = page.locator("#search-count")
    find(page, "mark")
    expect(count).to_have_text("1 of 4")
    page.check("#search-stderr")
    expect(count).to_have_text("1 of 2")
    current = page.locator("mark.hit.current")
    expect(current).to_have_count(1)
    expect(current.locator("xpath=ancestor::*[contains(@class, 'line')][1]")).to_have_text(
        "err-mark")
    page.select_option("#search-host", names[1])
    expect(count).to_have_text("1 of 1")
    expect(pane_of(page, names[1]).locator("mark.hit.current")).to_have_text("mark")
    expect(pane_of(page, names[1]).locator(".line.stderr mark.hit.current")).to_have_count(1)
    page.uncheck("#search-stderr")
    expect(count).to_have_text("1 of 2")
    page.context.close()


def test_enter_searches_a_running_run_again(browser: Any, cluster: Cluster, alice: UnixUser,
                                            signer: TokenSigner, gate: Path) -> None:  # noqa: F811
    """A line printed after the first search is found by the next Enter."""
    controller, names = cluster
    token = signer.issue(alice.name)
    status, answer = call(controller, "POST", "/api/run", {"nodes": [names[0]], "command": (
        f"echo first; until [ -e {gate}/more ]; do sleep 0.05; done; echo late-needle; "
        f"until [ -e {gate}/end ]; do sleep 0.05; done")}, token)
    assert status == 200, answer
    try:
        page = open_run(browser, controller, alice, answer["run"]["id"])
        pane = pane_of(page, names[0])
        expect(line(pane, 0)).to_have_text("first")
        count = page.locator("#search-count")
        find(page, "needle")
        expect(count).to_have_text("no match")
        (gate / "more").touch()
        expect(line(pane, 1)).to_have_text("late-needle")
        page.press("#search-q", "Enter")
        expect(count).to_have_text("1 of 1")
        expect_current(pane, 1, "late-needle", "needle")
        page.context.close()
    finally:
        (gate / "end").touch()


def test_a_playbooks_hit_opens_its_task_on_its_host(browser: Any, cluster: Cluster,
                                                    alice: UnixUser, signer: TokenSigner,
                                                    pki: TestPki) -> None:
    """A playbook's hit is shown in the details of its task on its host."""
    controller, names = cluster
    run_id = playbook_with_two_tasks(controller, signer.issue(alice.name), names[0], pki)
    page = open_run(browser, controller, alice, run_id)
    details, count = page.locator("#details"), page.locator("#search-count")
    find(page, "three")  # task t2's line
    expect(count).to_have_text("1 of 1")
    expect(details).to_have_attribute("data-task", "t2")
    expect(details).to_have_attribute("data-host", names[0])
    expect(details.locator('.line[data-seq="0"] mark.hit.current')).to_have_text("three")
    # "e" is in t1's "one" and t2's "three": next goes from one task's details to the other's.
    find(page, "e")
    expect(count).to_have_text("1 of 2")
    first = details.get_attribute("data-task")
    page.press("#search-q", "Enter")
    expect(count).to_have_text("2 of 2")
    expect(details).not_to_have_attribute("data-task", str(first))
    assert {first, details.get_attribute("data-task")} == {"t1", "t2"}
    current = details.locator("mark.hit.current")
    expect(current).to_have_text("e")
    expect(current.locator("xpath=ancestor::*[contains(@class, 'line')][1]")).to_have_text(
        "one" if first == "t2" else "three")
    page.context.close()


def test_a_new_search_aborts_the_one_under_way(browser: Any, cluster: Cluster, big_run: str,
                                               alice: UnixUser) -> None:
    """Typing on while a search is under way: its request is aborted (the controller need not
    finish a search nobody waits for) and the new one answers. The first request is held on
    its way (never answered) so it is surely under way when the second starts."""
    controller, _ = cluster
    page = open_run(browser, controller, alice, big_run)
    held: list[Route] = []

    def hold_the_first(route: Route) -> None:
        if query_of(route.request) == "777" and not held:
            held.append(route)
        else:
            route.continue_()

    page.route("**/search?*", hold_the_first)
    with page.expect_request(lambda request: query_of(request) == "777"):
        page.fill("#search-q", "777")  # searched once typing stops
    with page.expect_event("requestfailed", lambda request: query_of(request) == "777"):
        find(page, "77777")
    expect(page.locator("#search-count")).to_have_text("1 of 1")
    with contextlib.suppress(PlaywrightError):
        held[0].continue_()
    page.context.close()


def query_of(request: Request) -> str | None:
    """The `q` of a search request."""
    return urllib.parse.parse_qs(urllib.parse.urlsplit(request.url).query).get("q", [None])[0]


def test_marks_stay_in_place_whatever_case_folding_does(
        browser: Any, cluster: Cluster, alice: UnixUser, signer: TokenSigner) -> None:
    """Lines whose lowercase has another length ("İ") or another letter ("ΟΔΟΣ" ends in "ς"),
    or that hold characters of two UTF-16 units before the hit: every hit is marked where it
    is, the current one where the search found it."""
    controller, names = cluster
    text = "İstanbul error\\nΟΔΟΣ\\nx ΟΔΟΣ\\n😀 error\\nſtop\\nſtep\\n"
    run_id = archived_command_run(controller, signer.issue(alice.name), [names[0]], f"printf '{text}'")
    page = open_run(browser, controller, alice, run_id)
    pane = pane_of(page, names[0])
    count = page.locator("#search-count")
    expect(line(pane, 5)).to_have_text("ſtep")
    find(page, "error")
    expect(count).to_have_text("1 of 2")
    expect(line(pane, 0).locator("mark.hit.current")).to_have_text("error")
    expect(line(pane, 3).locator("mark.hit")).to_have_text("error")
    page.press("#search-q", "Enter")
    expect(count).to_have_text("2 of 2")
    expect(line(pane, 3).locator("mark.hit.current")).to_have_text("error")
    find(page, "σ")  # Python's matching (the controller's) takes Σ, σ and ς as one letter
    expect(count).to_have_text("1 of 2")
    expect(line(pane, 1).locator("mark.hit.current")).to_have_text("Σ")
    expect(line(pane, 2).locator("mark.hit")).to_have_text("Σ")
    find(page, "st")  # and ſ (long s) as s
    expect(count).to_have_text("1 of 3")
    expect(line(pane, 0).locator("mark.hit.current")).to_have_text("st")
    expect(line(pane, 4).locator("mark.hit")).to_have_text("ſt")
    expect(line(pane, 5).locator("mark.hit")).to_have_text("ſt")
    page.context.close()


@pytest.fixture(scope="module")
def small_pages(secret_file: Path, pki: TestPki, pam_service: str, signer: TokenSigner,
                alice: UnixUser, cluster: Cluster,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Another controller on the cluster's agents whose search answers give 3 hits a page,
    so paging is reached with a few lines."""
    controller = ControllerProcess(secret_file, tmp_path_factory.mktemp("small-pages"),
                                   pam_service=pam_service, pki=pki,
                                   extra_args=["--runs-search-hits", "3"])
    try:
        names = cluster[1]
        token = signer.issue(alice.name)
        wait_for(lambda: set(names) <= set(controller.inventory_hosts(token)),
                 what="the agents discovered")
        yield controller, names
    finally:
        stop_all([controller])


HITS = "for i in $(seq 1 10); do echo hit-$i; done"


def test_presses_at_a_page_edge_read_the_next_page_once(
        browser: Any, small_pages: Cluster, alice: UnixUser, signer: TokenSigner) -> None:
    """Two Enters at once on the last hit read: the next page is read once and both count
    (hit 5 of 10, each hit once: Next reaches the 10th, then the first)."""
    controller, names = small_pages
    run_id = archived_command_run(controller, signer.issue(alice.name), [names[0]], HITS)
    page = open_run(browser, controller, alice, run_id)
    pane, count = pane_of(page, names[0]), page.locator("#search-count")
    expect(line(pane, 9)).to_have_text("hit-10")
    find(page, "hit")
    expect(count).to_have_text("1 of 10")
    for shown in (2, 3):
        page.press("#search-q", "Enter")
        expect(count).to_have_text(f"{shown} of 10")
    # Two key presses in one task: the second comes while the first's page is being read.
    page.evaluate("""() => { const box = document.querySelector('#search-q');
        for (let i = 0; i < 2; i++) box.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter'})); }""")
    expect(count).to_have_text("5 of 10")
    expect_current(pane, 4, "hit-5", "hit")
    for shown in range(6, 11):
        page.press("#search-q", "Enter")
        expect(count).to_have_text(f"{shown} of 10")
        expect_current(pane, shown - 1, f"hit-{shown}", "hit")
    page.press("#search-q", "Enter")
    expect(count).to_have_text("1 of 10")
    page.context.close()


def test_enter_on_a_running_run_goes_on_past_the_first_page(
        browser: Any, small_pages: Cluster, alice: UnixUser, signer: TokenSigner,
        gate: Path) -> None:  # noqa: F811
    """While the run runs each Enter searches again: from the current hit on, so the hits
    after the first page are reached (not hit 1 again), then it wraps to the first."""
    controller, names = small_pages
    token = signer.issue(alice.name)
    status, answer = call(controller, "POST", "/api/run", {"nodes": [names[0]], "command": (
        f"{HITS}; until [ -e {gate}/end ]; do sleep 0.05; done")}, token)
    assert status == 200, answer
    try:
        page = open_run(browser, controller, alice, answer["run"]["id"])
        pane, count = pane_of(page, names[0]), page.locator("#search-count")
        expect(line(pane, 9)).to_have_text("hit-10")
        find(page, "hit")
        expect(count).to_have_text("1 of 10")
        for shown in range(2, 11):
            page.press("#search-q", "Enter")
            expect(count).to_have_text(f"{shown} of 10")
            expect_current(pane, shown - 1, f"hit-{shown}", "hit")
        page.press("#search-q", "Enter")
        expect(count).to_have_text("1 of 10")
        expect_current(pane, 0, "hit-1", "hit")
        page.context.close()
    finally:
        (gate / "end").touch()
