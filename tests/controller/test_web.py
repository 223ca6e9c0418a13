"""The web page in a real browser (Debian chromium + Playwright) against a real controller,
real agents and real Unix users logging in with PAM."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, expect

from tests.support.controller_process import ControllerProcess
from tests.support.users import UnixUser
from tests.support.waiting import wait_for

TIMEOUT_MS = 20_000
# Agents speak mutual TLS, which a browser has no client certificate for: the page goes
# through the controller's relay (one certificate for the browser to trust).
LIVE = "live"


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
    log_in(second, controller, alice)  # the same second is fine: logout voids its second too
    second.click("#logout-everywhere")
    expect(second).to_have_url(re.compile(r"/login"))
    try:
        first.reload()  # the other browser's session is over too
    except PlaywrightError:  # the page was on its way to /login already (its sockets closed)
        pass
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


HTML_LINE = "<img src=x onerror=alert(1)><b>bold</b>"


def record_dialogs(page: Page) -> list[str]:
    """Every dialog the page opens (an alert from injected markup would be one), dismissed."""
    dialogs: list[str] = []

    def on_dialog(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    return dialogs


def check_failed_html_execution(block: Any, command: str) -> None:
    """The failed command's block: its exit code, its HTML output and command as plain text."""
    expect(block.locator(".exec-state")).to_have_text("rc=3", timeout=TIMEOUT_MS)
    expect(block.locator(".exec-state")).to_have_class(re.compile(r"\bstate-failed\b"))
    expect(block.locator(".line.stdout")).to_have_text(HTML_LINE, timeout=TIMEOUT_MS)
    expect(block.locator(".line.stderr .ansi-c1")).to_have_text("<i>red</i>")  # coloured, still text
    expect(block.locator(".exec-command")).to_have_text(command)
    assert block.locator("img, b, i").count() == 0


def test_failed_command_html_output_and_a_node_going_down(browser, start_agent, start_controller,
                                                          alice: UnixUser, unique_name) -> None:
    """One node's life on one page: a failing command shows its exit code, HTML in output and
    in the command stays text, the card says `down` once the agent stops (refusing runs on it)
    and comes back when the agent does."""
    name = unique_name("life")
    agent = start_agent(node_name=name)
    controller = start_controller(extra_args=["--no-discovery", "--node",
                                              f"{name}={agent.host}:{agent.port}"])
    page = browser.new_page()
    dialogs = record_dialogs(page)
    log_in(page, controller, alice)
    card, link = node_card(page, name), pane(page, name).locator(".link-state")
    expect(link).to_have_text(LIVE, timeout=TIMEOUT_MS)
    expect(card.locator(".badge")).not_to_have_text("down")
    command = f"echo '{HTML_LINE}'; printf '\\033[31m<i>red</i>\\033[0m\\n' >&2; exit 3"
    run_on(page, [name], command)
    check_failed_html_execution(pane(page, name).locator(".execution").last, command)
    assert page.locator("img").count() == 0
    page.reload()  # the replay takes the same care, and its summary carries the exit code
    check_failed_html_execution(pane(page, name).locator(".execution").last, command)

    agent.stop()
    expect(card.locator(".badge")).to_have_text("down", timeout=TIMEOUT_MS)
    expect(card).to_have_class(re.compile(r"\bdown\b"))
    expect(page.locator("#node-count")).to_have_text("0 up / 1")
    expect(link).to_contain_text("disconnected", timeout=TIMEOUT_MS)
    run_on(page, [name], "echo never-runs")
    expect(page.locator("#run-results .error").first).to_have_text(
        f"unknown or unreachable node(s): {name}", timeout=TIMEOUT_MS)

    back = agent.restarted()
    try:
        expect(card.locator(".badge")).not_to_have_text("down", timeout=TIMEOUT_MS)
        expect(page.locator("#node-count")).to_have_text("1 up / 1")
        expect(link).to_have_text(LIVE, timeout=TIMEOUT_MS)
        run_on(page, [name], "echo back-again")
        expect(pane(page, name).locator(".line.stdout", has_text="back-again")).to_be_visible(
            timeout=TIMEOUT_MS)
    finally:
        back.stop()
    # Long after the markup reached the page twice, no handler of it ran (the CSP forbids
    # inline handlers as well: this fails when markup is parsed and the CSP lets it run).
    assert dialogs == []
    page.close()


LOCKED = re.compile(r"^too many failed logins; try again in \d+ s$")


def submit_login(page: Page, controller: ControllerProcess, user: str, password: str) -> int:
    """Fill and send the login form; the HTTP status of the answer."""
    page.goto(controller.url + "/login")
    page.fill("#username", user)
    page.fill("#password", password)
    with page.expect_response(lambda r: r.request.method == "POST"
                              and r.url.endswith("/login")) as answer:
        page.click("#login-button")
    return answer.value.status


def test_login_lockout_shows_its_message(browser, start_controller, alice: UnixUser,
                                         bob: UnixUser) -> None:
    """After `login_max_failures` wrong passwords the form answers 429 and says how long to
    wait, even for the right password; the browser's address is locked for every user."""
    controller = start_controller(extra_args=["--no-discovery", "--login-max-failures", "2",
                                              "--login-lockout", "300"])
    page = browser.new_page()
    error = page.locator("#login-error")
    for _ in range(2):
        assert submit_login(page, controller, alice.name, "not-" + alice.password) == 401
        expect(error).to_have_text("wrong user name or password")
    assert submit_login(page, controller, alice.name, alice.password) == 429
    expect(error).to_have_text(LOCKED)
    expect(page.locator("#username")).to_have_value(alice.name)
    assert submit_login(page, controller, bob.name, bob.password) == 429
    expect(error).to_have_text(LOCKED)
    assert not any(c["name"] == "marco_token" for c in page.context.cookies())
    page.close()
