"""Terminals in the page (issue 16, docs/terminals.md), in a real chromium against a real
controller (its relay), real agents and real PAM logins: a shell from a node's card, "type
into all" on three nodes, the replay of a recorded session, all under the page's CSP."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from marco.tokens import TokenSigner
from tests.support.agent_process import AgentProcess
from tests.support.controller_process import ControllerProcess
from tests.support.daemon import stop_all
from tests.support.http import call
from tests.support.names import unique_node_name
from tests.support.pki import TestPki
from tests.support.users import UnixUser
from tests.support.waiting import wait_for
from tests.support.web import TIMEOUT_MS, open_logged_in

# Every CSP violation the page reports, and the console's CSP errors, kept in the page.
WATCH_CSP = """window.__cspViolations = [];
document.addEventListener('securitypolicyviolation',
  (e) => window.__cspViolations.push(`${e.violatedDirective} ${e.blockedURI} ${e.sample}`));"""
# The rows an xterm.js terminal shows now, from its buffer (what the screen reads).
ROWS = """(node) => { const view = window.marcoTerminals; if (!view) return null;
  const pane = view.panes.find((p) => p.node === node); if (!pane || !pane.term) return null;
  const buffer = pane.term.buffer.active, rows = [];
  for (let i = 0; i < buffer.length; i++) rows.push(buffer.getLine(i).translateToString(true));
  return rows; }"""


@pytest.fixture(scope="module")
def trio(secret_file: Path, pki: TestPki, pam_service: str, signer: TokenSigner,
         alice: UnixUser, tmp_path_factory: pytest.TempPathFactory,
         ) -> Iterator[tuple[ControllerProcess, list[str]]]:
    """A controller and three agents it discovered (the type-into-all test needs three)."""
    workdir = tmp_path_factory.mktemp("terminals")
    names = sorted(unique_node_name("term") for _ in range(3))
    daemons: list[AgentProcess | ControllerProcess] = []
    try:
        controller = ControllerProcess(secret_file, workdir, pam_service=pam_service, pki=pki)
        daemons.append(controller)
        for name in names:
            daemons.append(AgentProcess(secret_file, workdir / name / "state", node_name=name,
                                        announce=True, pki=pki))
        token = signer.issue(alice.name)
        wait_for(lambda: set(names) <= set(controller.inventory_hosts(token)),
                 what="the three agents discovered")
        yield controller, names
    finally:
        stop_all(daemons)


@pytest.fixture
def page(browser: Any, trio: tuple[ControllerProcess, list[str]], alice: UnixUser) -> Iterator[Page]:
    """The main page, logged in as alice, watching for CSP violations from its first script."""
    controller, _ = trio
    context = browser.new_context()
    context.add_init_script(WATCH_CSP)
    page: Page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    console: list[str] = []
    page.on("console", lambda m: console.append(m.text) if "Content Security Policy" in m.text else None)
    open_logged_in(page, controller, alice)
    yield page
    assert console == [], console
    context.close()


def violations(page: Page) -> list[str]:
    return page.evaluate("window.__cspViolations")


def rows_of(page: Page, node: str) -> list[str]:
    return page.evaluate(ROWS, node) or []


def wait_rows(page: Page, node: str, pattern: str, what: str) -> list[str]:
    """Until a row of `node`'s terminal matches `pattern` (a regex, whole row)."""
    regex = re.compile(pattern)
    return wait_for(lambda: [r for r in rows_of(page, node) if regex.fullmatch(r.rstrip())],
                    timeout=TIMEOUT_MS / 1000, what=f"{what} in {node}'s terminal")


def open_from_card(page: Page, node: str, connected: bool = True) -> Any:
    page.get_by_role("button", name=f"Open a terminal on {node}").click()
    pane = page.locator(f'.term-pane[data-node="{node}"]')
    expect(pane.locator(".xterm-rows")).to_be_attached()
    if connected:
        expect(pane).to_have_attribute("data-state", "connected")
    return pane


def test_terminal_renders_colours_under_the_csp(page: Page, trio: Any) -> None:
    """xterm.js's renderer styles cells with <style> elements and style attributes: under the
    page's CSP (no 'unsafe-inline') the nonce shim lets them apply, and nothing is reported."""
    _, names = trio
    open_from_card(page, names[0], connected=False)
    # A palette colour (a class from xterm.js's <style>) and a truecolour (a style attribute).
    page.evaluate("""() => window.marcoTerminals.panes[0].term.write(
        '\\x1b[31mpalette\\x1b[0m \\x1b[38;2;0;200;0mtruecolour\\x1b[0m\\r\\n')""")
    pane = page.locator(f'.term-pane[data-node="{names[0]}"]')
    palette = pane.locator(".xterm-rows span", has_text="palette")
    truecolour = pane.locator(".xterm-rows span", has_text="truecolour")
    expect(palette).to_have_css("color", "rgb(229, 83, 75)")  # the theme's red (terminal.js)
    expect(truecolour).to_have_css("color", "rgb(0, 200, 0)")
    assert violations(page) == []


def screen_rows(page: Page, selector: str) -> list[str]:
    """The rows xterm.js's DOM renderer shows in `selector` (a player's screen)."""
    rows = page.locator(f"{selector} .xterm-rows > div").all_text_contents()
    return [row.replace("\xa0", " ").strip() for row in rows]


def test_open_from_card_echo_42(page: Page, trio: Any) -> None:
    """A Terminal button on a card opens a shell on that node as the user: what is typed
    reaches it and its output shows in the terminal's rows."""
    _, names = trio
    pane = open_from_card(page, names[1])
    expect(pane.locator(".term-state")).to_have_text("connected")
    page.keyboard.type("echo $((6*7))")
    page.keyboard.press("Enter")
    wait_rows(page, names[1], r"42", "the shell's answer 42")
    page.keyboard.type("whoami")
    page.keyboard.press("Enter")
    wait_rows(page, names[1], re.escape(page.locator("#current-user").inner_text()), "whoami")
    assert violations(page) == []


def test_type_into_all_three_nodes(page: Page, trio: Any, alice: UnixUser) -> None:
    """Ticked in the nodes' view, three terminals open at once; with "Type into all" on (a
    banner with the count, the panes outlined), one typed line runs in all three sessions."""
    _, names = trio
    for name in names:
        page.get_by_role("checkbox", name=f"Select {name}").check()
    page.get_by_role("tab", name="Terminals").click()
    page.get_by_role("button", name="Open terminals on the ticked nodes").click()
    panes = [page.locator(f'.term-pane[data-node="{name}"]') for name in names]
    for pane in panes:
        expect(pane).to_have_attribute("data-state", "connected")
    switch = page.get_by_role("switch", name="Type into all")
    expect(switch).to_have_attribute("aria-checked", "false")
    expect(page.locator("#term-banner")).to_be_hidden()
    switch.click()
    expect(switch).to_have_attribute("aria-checked", "true")
    expect(page.locator("#term-banner")).to_contain_text("all 3 ticked terminals")
    for pane in panes:
        expect(pane).to_have_class(re.compile(r"\bterm-ticked\b"))
    target = Path(alice.home) / f"type-into-all-{names[0]}.txt"
    panes[0].locator(".xterm").click()
    page.keyboard.type(f'echo "$MARCO_TERMINAL" >> {target}; echo all-$((40+2))')
    page.keyboard.press("Enter")
    for name in names:
        wait_rows(page, name, r"all-42", "the line typed into all")
    sessions = wait_for(lambda: target.exists() and len(target.read_text().split()) == 3 and target.read_text().split(),
                        what="three sessions' lines in the file")
    assert len(set(sessions)) == 3, sessions  # three shells, one line each
    target.unlink()
    assert violations(page) == []


def test_replay_a_recorded_session(page: Page, trio: Any) -> None:
    """A session in the page is recorded: its pane links the run, whose page plays the
    recording back (instant) and offers the asciicast download."""
    _, names = trio
    pane = open_from_card(page, names[2])
    page.keyboard.type("echo recorded-$((3*5))")
    page.keyboard.press("Enter")
    wait_rows(page, names[2], r"recorded-15", "the recorded line")
    page.keyboard.type("exit 3")
    page.keyboard.press("Enter")
    expect(pane).to_have_attribute("data-state", "ended")
    expect(pane.locator(".term-state")).to_have_text("ended (status 3)")
    link = pane.get_by_role("link", name=re.compile("Recording of the terminal"))
    href = link.get_attribute("href")
    assert href and href.startswith("/runs/"), href
    page.goto(page.url.rstrip("/") + href)
    expect(page.locator("#run-kind")).to_have_text("terminal")
    page.get_by_label("Speed").select_option("0")  # instant
    wait_for(lambda: "recorded-15" in screen_rows(page, "#cast-screen"),
             what="the recorded line in the player")
    expect(page.locator("#cast-panel")).to_have_attribute("data-state", "ended")
    expect(page.locator("#cast-download")).to_have_attribute("href", f"/api/runs/{href.split('/')[-1]}/cast")
    assert violations(page) == []


def test_player_plays_frames_and_resizes(page: Page, trio: Any, signer: TokenSigner,
                                         alice: UnixUser) -> None:
    """A terminal run made through the runs API (as `marco shell` records): the player shows
    its output in order, follows its resize frame, ends, and restarts from the top."""
    controller, names = trio
    token = signer.issue(alice.name)
    meta = {"node": names[0], "cols": 60, "rows": 10, "term": "xterm-256color",
            "shell": "/bin/bash", "command": None, "session": "s1"}
    status, run = call(controller, "POST", "/api/runs", {"kind": "terminal", "title": f"shell on {names[0]}",
                                                          "hosts": [names[0]], "meta": meta}, token)
    assert status == 201, run
    frames = [[0.1, "o", "first line\r\n"], [0.3, "o", "\x1b[32msecond\x1b[0m line\r\n"],
              [0.5, "r", "90x12"], [0.7, "o", "after the resize\r\n"], [30.7, "o", "the end"]]
    status, answer = call(controller, "POST", f"/api/runs/{run['id']}/events",
                          {"events": [{"type": "term", "frames": frames}]}, token)
    assert status == 200, answer
    status, answer = call(controller, "POST", f"/api/runs/{run['id']}/events",
                          {"events": [{"type": "recap", "stats": {names[0]: {"ok": 1}}}]}, token)
    assert status == 200, answer
    page.goto(controller.url + run["url"])
    player = page.locator("#cast-panel")
    # 30.7 s recorded, its 30 s pause played as 2 s (the player's idle cap): ended by 2.7 s.
    expect(player).to_have_attribute("data-state", "ended")
    expect(page.locator("#cast-time")).to_have_text("0:02 / 0:02")
    rows = screen_rows(page, "#cast-screen")
    assert rows[:4] == ["first line", "second line", "after the resize", "the end"], rows
    assert len(rows) == 12  # the resize frame's rows
    page.get_by_role("button", name="Restart").click()
    expect(player).to_have_attribute("data-state", "playing")
    expect(player).to_have_attribute("data-state", "ended")
    assert screen_rows(page, "#cast-screen")[:4] == ["first line", "second line", "after the resize", "the end"]
    expect(page.locator("#cast-download")).to_have_attribute("href", f"/api/runs/{run['id']}/cast")
    assert violations(page) == []


def test_reconnect_reattaches_the_same_session(page: Page, trio: Any) -> None:
    """A socket lost under the terminal leaves it detached with what happened said in the pane;
    Reconnect within the agent's grace time gets the same shell back (its variable kept)."""
    _, names = trio
    pane = open_from_card(page, names[0])
    page.keyboard.type("KEPT=still-$((2+3))")
    page.keyboard.press("Enter")
    wait_rows(page, names[0], r".*KEPT=still-\$\(\(2\+3\)\)", "the typed assignment")
    # The connection drops under the page (as a network failure would drop it).
    page.evaluate("() => window.marcoTerminals.panes[0].socket.close(4000, 'dropped')")
    expect(pane).to_have_attribute("data-state", "detached")
    expect(pane.get_by_role("alert")).to_contain_text("Disconnected")
    pane.get_by_role("button", name=re.compile("^Reconnect")).click()
    expect(pane.locator(".term-state")).to_have_text("connected (reattached)")
    pane.locator(".xterm").click()
    page.keyboard.type("echo $KEPT")
    page.keyboard.press("Enter")
    wait_rows(page, names[0], r"still-5", "the variable set before the drop")
    assert violations(page) == []


def test_copy_paste_and_keyboard_exit(page: Page, trio: Any) -> None:
    """Ctrl+Shift+C copies the terminal's selection to the clipboard, Ctrl+Shift+V pastes the
    clipboard into the shell, and Ctrl+Shift+L leaves the terminal for its pane's buttons."""
    _, names = trio
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    pane = open_from_card(page, names[1])
    page.keyboard.type("echo copy-$((7*6))")
    page.keyboard.press("Enter")
    wait_rows(page, names[1], r"copy-42", "the line to copy")
    page.evaluate("""(node) => { const pane = window.marcoTerminals.panes.find((p) => p.node === node);
        const buffer = pane.term.buffer.active;
        for (let i = 0; i < buffer.length; i++)
          if (buffer.getLine(i).translateToString(true) === 'copy-42') pane.term.selectLines(i, i); }""", names[1])
    page.keyboard.press("Control+Shift+KeyC")
    wait_for(lambda: page.evaluate("navigator.clipboard.readText()").strip() == "copy-42",
             what="the selection in the clipboard")
    page.evaluate("navigator.clipboard.writeText('echo pasted-$((9*9))')")
    page.keyboard.press("Control+Shift+KeyV")
    page.keyboard.press("Enter")
    wait_rows(page, names[1], r"pasted-81", "the pasted command's output")
    page.keyboard.press("Control+Shift+KeyL")
    expect(pane.get_by_role("button", name=re.compile("^Copy the selection"))).to_be_focused()
    page.keyboard.press("Tab")
    expect(pane.get_by_role("button", name=re.compile("^Close the terminal"))).to_be_focused()


def test_reconnect_past_the_grace_opens_a_new_session_and_says_so(page: Page, trio: Any) -> None:
    """A reattach the agent answers "no such session" (its grace time passed) opens a new
    session at once, and the pane says it is a new one."""
    _, names = trio
    pane = open_from_card(page, names[2])
    page.evaluate("() => window.marcoTerminals.panes[0].socket.close(4000, 'dropped')")
    expect(pane).to_have_attribute("data-state", "detached")
    # As if the grace time had passed: the agent knows no such session any more.
    page.evaluate("() => { window.marcoTerminals.panes[0].session = 'gone-session-0'; }")
    pane.get_by_role("button", name=re.compile("^Reconnect")).click()
    expect(pane.locator(".term-state")).to_have_text("connected")
    expect(pane.get_by_role("alert")).to_contain_text("this is a new one")
    pane.locator(".xterm").click()
    page.keyboard.type("echo new-$((50+5))")
    page.keyboard.press("Enter")
    wait_rows(page, names[2], r"new-55", "the new session's answer")


def test_unknown_node_says_what_happened(page: Page, trio: Any) -> None:
    """The relay's error (no such node) is said in the pane, which offers to try again."""
    page.get_by_role("tab", name="Terminals").click()
    page.evaluate("() => window.marcoTerminals.open('no-such-node-here')")
    pane = page.locator('.term-pane[data-node="no-such-node-here"]')
    expect(pane).to_have_attribute("data-state", "ended")
    expect(pane.get_by_role("alert")).to_contain_text("no node named 'no-such-node-here'")
    expect(pane.get_by_role("button", name=re.compile("^Try again"))).to_be_visible()


def test_the_window_size_follows_the_pane(page: Page, trio: Any) -> None:
    """The terminal is fitted to its pane and the shell's window size follows it: `stty size`
    says the terminal's rows and columns, before and after the page is made narrower."""
    _, names = trio
    page.set_viewport_size({"width": 1400, "height": 900})
    open_from_card(page, names[0])

    def stty_matches(tag: str) -> None:
        cols, rows = page.evaluate("() => [window.marcoTerminals.panes[0].term.cols, window.marcoTerminals.panes[0].term.rows]")
        page.keyboard.type(f"echo {tag} $(stty size)")
        page.keyboard.press("Enter")
        wait_rows(page, names[0], rf"{tag} {rows} {cols}", f"stty size {rows} {cols}")

    stty_matches("wide")
    wide = page.evaluate("() => window.marcoTerminals.panes[0].term.cols")
    page.set_viewport_size({"width": 700, "height": 900})
    wait_for(lambda: page.evaluate("() => window.marcoTerminals.panes[0].term.cols") < wide,
             what="the terminal refitted narrower")
    stty_matches("narrow")


def test_a_recording_link_only_leads_to_this_sites_runs(page: Page, trio: Any) -> None:
    """The pane links a recording only to a run page of this site, whatever the message's
    url says (a backslash, a scheme or a dot segment that would lead elsewhere)."""
    _, names = trio
    pane = open_from_card(page, names[1])
    link = pane.locator(".term-recording")
    for url in ("/\\evil.example/runs/x", "//evil.example/runs/x", "https://evil.example/runs/x",
                "javascript:alert(1)//runs/", "/runs/../login", "/login"):
        page.evaluate("""([node, url]) => { const pane = window.marcoTerminals.panes.find((p) => p.node === node);
            pane.recording.classList.add('hidden'); pane.recording.removeAttribute('href');
            pane.recorded({ type: 'recording', run: 'r', url }); }""", [names[1], url])
        expect(link).to_be_hidden()
        assert link.get_attribute("href") is None, url
    page.evaluate("""(node) => window.marcoTerminals.panes.find((p) => p.node === node)
        .recorded({ type: 'recording', run: 'r-1', url: '/runs/r-1', stopped: true,
                    message: 'recording stopped: the run store failed' })""", names[1])
    expect(link).to_have_attribute("href", "/runs/r-1")
    expect(pane.get_by_role("alert")).to_have_text("recording stopped: the run store failed")


def test_a_session_taken_over_elsewhere_says_so_and_takes_it_back(page: Page, trio: Any) -> None:
    """Another connection of the same user (another tab) reattaches to the pane's session:
    the pane says it was taken over and offers Reconnect, which takes the session back."""
    _, names = trio
    pane = open_from_card(page, names[2])
    page.keyboard.type("KEPT=back-$((4+4))")
    page.keyboard.press("Enter")
    wait_rows(page, names[2], r".*KEPT=back-\$\(\(4\+4\)\)", "the typed assignment")
    # Another tab of the same user: its own socket to the relay, reattaching to the session.
    page.evaluate("""(node) => new Promise((resolve) => {
        const pane = window.marcoTerminals.panes.find((p) => p.node === node);
        const other = new WebSocket(pane.url());
        window.__otherTab = other;
        other.onopen = () => other.send(JSON.stringify({ type: 'open', cols: 80, rows: 24,
                                                         session: pane.session }));
        other.onmessage = (e) => { if (typeof e.data === 'string' && JSON.parse(e.data).type === 'started') resolve(); };
    })""", names[2])
    expect(pane).to_have_attribute("data-state", "detached")
    expect(pane.locator(".term-state")).to_have_text("taken over")
    expect(pane.get_by_role("alert")).to_contain_text("taken over by another connection of yours")
    pane.get_by_role("button", name=re.compile("^Reconnect")).click()
    expect(pane.locator(".term-state")).to_have_text("connected (reattached)")
    wait_for(lambda: page.evaluate("window.__otherTab.readyState") == 3,
             what="the other tab's socket closed (taken back)")
    pane.locator(".xterm").click()
    page.keyboard.type("echo $KEPT")
    page.keyboard.press("Enter")
    wait_rows(page, names[2], r"back-8", "the variable set before the takeover")
    assert violations(page) == []
