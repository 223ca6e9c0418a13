"""The web page in a real browser (Debian chromium + Playwright) against a real controller,
real agents and real Unix users logging in with PAM."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from tests.support.browser import launch
from tests.support.controller_process import ControllerProcess
from tests.support.users import UnixUser
from tests.support.waiting import wait_for

TIMEOUT_MS = 20_000
# Agents speak mutual TLS, which a browser has no client certificate for: the page goes
# through the controller's relay (one certificate for the browser to trust).
LIVE = "live"


@pytest.fixture(scope="module")
def browser(pki) -> Iterator[Any]:
    with sync_playwright() as playwright:
        chromium = launch(playwright, trust=pki.controller_cert)
        yield chromium
        chromium.close()


def log_in(page: Page, controller: ControllerProcess, user: UnixUser) -> None:
    page.goto(controller.url + "/")
    expect(page).to_have_url(re.compile(r"/login"))
    page.fill("#username", user.name)
    page.fill("#password", user.password)
    page.click("#login-button")
    expect(page.locator("#current-user")).to_have_text(user.name, timeout=TIMEOUT_MS)


def node_card(page: Page, name: str) -> Any:
    return page.locator(f'.node[data-node="{name}"]')


def pane(page: Page, name: str) -> Any:
    return page.locator(f'.pane[data-node="{name}"]')


def run_on(page: Page, names: list[str], command: str) -> None:
    for name in names:
        node_card(page, name).locator(".node-select").check()
    page.fill("#shell-command", command)
    page.click("#shell-run")


def test_wrong_password_shows_a_clear_error(browser, cluster, alice: UnixUser) -> None:
    controller, _ = cluster
    page = browser.new_page()
    page.goto(controller.url + "/login")
    page.fill("#username", alice.name)
    page.fill("#password", "certainly-not-the-password")
    page.click("#login-button")
    expect(page.locator("#login-error")).to_have_text("wrong user name or password")
    assert not any(c["name"] == "marco_token" for c in page.context.cookies())
    page.close()


def test_nodes_status_and_live_output_on_two_nodes(browser, cluster, alice: UnixUser) -> None:
    controller, names = cluster
    page = browser.new_page()
    log_in(page, controller, alice)
    for name in names:
        expect(node_card(page, name)).to_be_visible(timeout=TIMEOUT_MS)
        expect(pane(page, name).locator(".link-state")).to_have_text(LIVE, timeout=TIMEOUT_MS)
    # Status numbers arrive and change every second.
    card = node_card(page, names[0])
    expect(card.locator(".cpu-total")).to_have_text(re.compile(r"CPU \d+%"), timeout=TIMEOUT_MS)
    first = card.get_attribute("data-status-time")
    wait_for(lambda: card.get_attribute("data-status-time") not in (None, first), what="new status")
    assert card.locator(".core").count() >= 1
    expect(card.locator(".bar-text").first).to_contain_text("GiB")

    run_on(page, names, "for i in 1 2 3 4 5 6; do echo tick-$i; sleep 0.5; done; "
                        "echo to-stderr >&2; printf '\\033[32mcolour\\033[0m\\n'")
    for name in names:
        block = pane(page, name).locator(".execution").last
        # Lines appear while the command still runs.
        expect(block.locator(".line.stdout", has_text="tick-1")).to_be_visible(timeout=TIMEOUT_MS)
        assert block.locator(".exec-state").inner_text() == "running"
        assert block.locator(".line", has_text="tick-6").count() == 0
    for name in names:
        block = pane(page, name).locator(".execution").last
        expect(block.locator(".exec-state")).to_have_text("rc=0", timeout=TIMEOUT_MS)
        stderr = block.locator(".line.stderr", has_text="to-stderr")
        stdout = block.locator(".line.stdout", has_text="tick-6")
        expect(stderr).to_be_visible()
        colour = lambda loc: loc.evaluate("e => getComputedStyle(e).color")  # noqa: E731
        assert colour(stderr) != colour(stdout)
        assert block.locator(".ansi-c2", has_text="colour").count() == 1  # ANSI green rendered
        assert block.locator(".exec-label").inner_text() == "shell"
    # A reload replays every execution's output from the agents.
    page.reload()
    block = pane(page, names[1]).locator(".execution").last
    expect(block.locator(".line", has_text="tick-6")).to_be_visible(timeout=TIMEOUT_MS)
    expect(block.locator(".exec-state")).to_have_text("rc=0")
    assert block.locator(".line", has_text=re.compile(r"^tick-\d$")).count() == 6
    page.close()


def test_stop_button_ends_a_long_command(browser, cluster, alice: UnixUser) -> None:
    controller, names = cluster
    page = browser.new_page()
    log_in(page, controller, alice)
    expect(pane(page, names[0]).locator(".link-state")).to_have_text(LIVE, timeout=TIMEOUT_MS)
    run_on(page, [names[0]], "echo sleeping; sleep 600")
    block = pane(page, names[0]).locator(".execution").last
    expect(block.locator(".line", has_text="sleeping")).to_be_visible(timeout=TIMEOUT_MS)
    expect(block.locator(".exec-state")).to_have_text("running")
    block.locator(".stop").click()
    expect(block.locator(".exec-state")).to_have_text("killed (SIGTERM)", timeout=TIMEOUT_MS)
    expect(block.locator(".stop")).to_be_disabled()
    page.close()


def test_a_second_user_sees_none_of_the_first_users_output(browser, cluster, alice: UnixUser,
                                                           bob: UnixUser) -> None:
    controller, names = cluster
    alice_page = browser.new_context().new_page()
    bob_page = browser.new_context().new_page()
    log_in(alice_page, controller, alice)
    log_in(bob_page, controller, bob)
    for page in (alice_page, bob_page):
        expect(pane(page, names[0]).locator(".link-state")).to_have_text(LIVE, timeout=TIMEOUT_MS)
    run_on(alice_page, [names[0]], "echo alice-private-$((6*7)); id -un")
    alice_block = pane(alice_page, names[0]).locator(".execution").last
    expect(alice_block.locator(".line", has_text="alice-private-42")).to_be_visible(timeout=TIMEOUT_MS)
    expect(alice_block.locator(".line", has_text=alice.name)).to_be_visible()
    run_on(bob_page, [names[0]], "echo bob-here; id -un")
    bob_block = pane(bob_page, names[0]).locator(".execution").last
    expect(bob_block.locator(".line", has_text="bob-here")).to_be_visible(timeout=TIMEOUT_MS)
    expect(bob_block.locator(".line", has_text=bob.name)).to_be_visible()
    # Each page's socket delivers in order: once a user's own later line is shown, a leaked
    # earlier line of the other user would be shown already.
    assert "alice-private" not in bob_page.content()
    run_on(alice_page, [names[0]], "echo alice-after-bob")
    expect(pane(alice_page, names[0]).locator(".line", has_text="alice-after-bob")).to_be_visible(
        timeout=TIMEOUT_MS)
    assert "bob-here" not in alice_page.content()
    bob_page.reload()  # replay after a reload shows bob's own executions only
    expect(pane(bob_page, names[0]).locator(".line", has_text="bob-here")).to_be_visible(timeout=TIMEOUT_MS)
    assert "alice-private" not in bob_page.content()
    alice_page.context.close()
    bob_page.context.close()


def test_deploy_a_file_to_two_nodes_and_run_a_command(browser, cluster, alice: UnixUser,
                                                      tmp_path: Path) -> None:
    controller, names = cluster
    page = browser.new_page()
    log_in(page, controller, alice)
    for name in names:
        expect(pane(page, name).locator(".link-state")).to_have_text(LIVE, timeout=TIMEOUT_MS)
        node_card(page, name).locator(".node-select").check()
    source = tmp_path / "payload-ü.txt"
    source.write_text("deployed by the browser\n")
    page.click("#tab-deploy")
    page.set_input_files("#deploy-file", str(source))
    page.fill("#deploy-folder", "~")
    page.fill("#deploy-command", "cat payload-ü.txt; stat -c %U payload-ü.txt")
    page.click("#deploy-run")
    result = page.locator(".result").first
    for name in names:
        expect(result.locator(".ok", has_text=f"{name}: done")).to_be_visible(timeout=TIMEOUT_MS)
        block = pane(page, name).locator(".execution").last
        expect(block.locator(".line", has_text="deployed by the browser")).to_be_visible(timeout=TIMEOUT_MS)
        expect(block.locator(".line", has_text=alice.name)).to_be_visible()
    assert (Path(alice.home) / "payload-ü.txt").read_text() == "deployed by the browser\n"
    # Overwrite off: each node reports that the file exists, nothing is replaced.
    page.uncheck("#deploy-overwrite")
    page.fill("#deploy-command", "")
    page.click("#deploy-run")
    newest = page.locator(".result").first
    for name in names:
        expect(newest.locator(".error", has_text=f"{name}:")).to_contain_text("exists",
                                                                                timeout=TIMEOUT_MS)
    page.close()


def test_log_out_everywhere_button(browser, cluster, alice: UnixUser) -> None:
    controller, _ = cluster
    first = browser.new_context().new_page()
    second = browser.new_context().new_page()
    log_in(first, controller, alice)
    log_in(second, controller, alice)
    time.sleep(1.1)  # tokens carry whole seconds
    second.click("#logout-everywhere")
    expect(second).to_have_url(re.compile(r"/login"))
    first.reload()  # the other browser's session is over too
    expect(first).to_have_url(re.compile(r"/login"), timeout=TIMEOUT_MS)
    first.context.close()
    second.context.close()


def test_dev_mode_page_goes_through_the_relay(browser, start_agent, start_controller,
                                              alice: UnixUser, unique_name) -> None:
    """`--dev` on loopback: plain HTTP, and the page still reaches the agent through the
    controller's relay (it never holds a token to open the agent's socket itself)."""
    name = unique_name("dev")
    start_agent(node_name=name, announce=True, pki=None)
    controller = start_controller(pki=None)
    assert controller.url.startswith("http://")
    page = browser.new_page()
    log_in(page, controller, alice)
    expect(pane(page, name).locator(".link-state")).to_have_text("live", timeout=TIMEOUT_MS)
    run_on(page, [name], "echo direct-$((20+22))")
    expect(pane(page, name).locator(".line.stdout", has_text="direct-42")).to_be_visible(
        timeout=TIMEOUT_MS)
    page.close()


def test_no_log_execution_shows_that_its_output_is_hidden(browser, start_agent, start_controller,
                                                          signer, alice: UnixUser,
                                                          unique_name) -> None:
    """What an Ansible `no_log` task runs reaches the page as a block that says its output is
    hidden: no line, no command text."""
    name = unique_name("nolog")
    agent = start_agent(node_name=name)
    controller = start_controller(extra_args=["--no-discovery", "--node",
                                              f"{name}={agent.host}:{agent.port}"])
    page = browser.new_page()
    log_in(page, controller, alice)
    expect(pane(page, name).locator(".link-state")).to_have_text(LIVE, timeout=TIMEOUT_MS)
    client = agent.client(signer.issue(alice.name))
    assert client.run("echo hidden-s3cret", label="secret task", no_log=True).stdout == \
        b"hidden-s3cret\n"
    client.run("echo shown-line", label="plain task")
    plain = pane(page, name).locator(".execution", has_text="plain task")
    expect(plain.locator(".line.stdout", has_text="shown-line")).to_be_visible(timeout=TIMEOUT_MS)
    secret = pane(page, name).locator(".execution", has_text="secret task")
    expect(secret.locator(".line.notice")).to_have_text("output hidden: no_log")
    expect(secret.locator(".exec-command")).to_have_text("(hidden: no_log)")
    assert "hidden-s3cret" not in page.content()
    page.reload()  # the replay after a reload hides it the same way
    secret = pane(page, name).locator(".execution", has_text="secret task")
    expect(secret.locator(".line.notice")).to_have_text("output hidden: no_log",
                                                        timeout=TIMEOUT_MS)
    assert "hidden-s3cret" not in page.content()
    page.close()
