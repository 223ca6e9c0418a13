"""The output renderer (controller/static/ansi.js) in a real chromium: SGR in full with the colon
forms, 256 and true colours through CSS custom properties under the page's CSP, `\\r` collapsed
like a terminal, both themes, WCAG contrast of every palette colour; then once through the real
run page of a real controller, and the header's theme toggle."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, Route, expect

from marco.tokens import TokenSigner
from tests.support.command_runs import ended_command_run
from tests.support.controller_process import ControllerProcess
from tests.support.users import UnixUser
from tests.support.waiting import wait_for
from tests.support.web import TIMEOUT_MS, open_logged_in

STATIC = Path(__file__).resolve().parents[2] / "controller" / "static"
ORIGIN = "http://ansi.test"
# The controller's own policy (controller/session.py): no 'unsafe-inline' for styles or scripts.
CSP = ("default-src 'self'; connect-src 'self'; img-src 'self' data:; style-src 'self'; "
       "script-src 'self'; frame-ancestors 'none'")
PAGE = ('<!DOCTYPE html><html lang="en"><head><link rel="stylesheet" href="/marco.css">'
        '<script src="/theme.js"></script><script src="/ansi.js"></script></head>'
        '<body><pre class="lines" id="pane"></pre></body></html>')
TYPES = {".css": "text/css", ".js": "text/javascript"}
ESC = "\x1b"

# Collects the page's CSP violations (Playwright injects this past the CSP).
WATCH_CSP = """window.__violations = [];
document.addEventListener("securitypolicyviolation",
  (e) => window.__violations.push(e.violatedDirective + " " + e.blockedURI));"""

# Renders lines (one state, as one stream) into the pane: per line its text and its parts
# (text, classes, computed colour and background).
RENDER = """(lines) => {
  const pane = document.getElementById("pane");
  pane.textContent = "";
  const state = Ansi.newState();
  return lines.map((line) => {
    const span = document.createElement("span");
    span.className = "line stdout";
    Ansi.render(span, line, state);
    pane.appendChild(span);
    const parts = Array.from(span.childNodes).map((n) => {
      const e = n.nodeType === Node.TEXT_NODE ? span : n;
      const s = getComputedStyle(e);
      return { text: n.textContent, cls: e === span ? "" : e.className, color: s.color,
               bg: s.backgroundColor };
    });
    return { text: span.textContent, parts };
  });
}"""

# WCAG 2 contrast, computed here independently of ansi.js, of each case's first character
# against its own background (or the pane's when it has none).
CONTRAST = """(cases) => {
  const pane = document.getElementById("pane");
  pane.textContent = "";
  const rgb = (c) => c.match(/[\\d.]+/g).map(Number);
  const lum = (c) => {
    const l = c.slice(0, 3).map((v) => { v /= 255; return v <= 0.04045 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); });
    return 0.2126 * l[0] + 0.7152 * l[1] + 0.0722 * l[2];
  };
  const paneBg = rgb(getComputedStyle(pane).backgroundColor);
  return { pane: paneBg.slice(0, 3), ratios: cases.map((line) => {
    const span = document.createElement("span");
    span.className = "line stdout";
    Ansi.render(span, line, Ansi.newState());
    pane.appendChild(span);
    const part = span.firstElementChild || span;
    const s = getComputedStyle(part);
    const own = rgb(s.backgroundColor);
    const back = own.length === 4 && own[3] === 0 ? paneBg : own;
    const a = lum(rgb(s.color)), b = lum(back);
    return [line, (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05)];
  }) };
}"""


def serve(route: Route) -> None:
    """The test origin: the page (with the controller's CSP) and the real static files."""
    path = route.request.url[len(ORIGIN):].split("?")[0]
    if path == "/":
        route.fulfill(status=200, body=PAGE, headers={"Content-Type": "text/html",
                                                       "Content-Security-Policy": CSP})
    elif path in ("/marco.css", "/ansi.js", "/theme.js"):
        file = STATIC / path[1:]
        route.fulfill(status=200, body=file.read_text(),
                      headers={"Content-Type": TYPES[file.suffix]})
    else:
        route.fulfill(status=404, body="")


def blank(browser: Any, scheme: str = "light") -> Page:
    """A page with the controller's CSP, marco.css and ansi.js, in the given system theme."""
    context = browser.new_context(color_scheme=scheme)
    context.route(f"{ORIGIN}/**", serve)
    context.add_init_script(WATCH_CSP)
    page: Page = context.new_page()
    page.goto(ORIGIN + "/")
    page.wait_for_function("typeof Ansi !== 'undefined'")
    return page


def render(page: Page, *lines: str) -> list[dict[str, Any]]:
    return list(page.evaluate(RENDER, list(lines)))


def sgr(codes: str, text: str) -> str:
    return f"{ESC}[{codes}m{text}{ESC}[0m"


def classes(part: dict[str, Any]) -> set[str]:
    return set(str(part["cls"]).split())


@pytest.fixture
def page(browser: Any) -> Iterator[Page]:
    page = blank(browser)
    yield page
    page.context.close()


def test_every_sgr_attribute_is_a_class_and_its_reset_ends_it(page: Page) -> None:
    lines = render(page, sgr("1", "b") + sgr("2", "d") + sgr("3", "i") + sgr("4", "u")
                   + sgr("7", "v") + sgr("9", "s"),
                   f"{ESC}[1;3;4;9;7mall{ESC}[22;23;24;27;29mnone",
                   f"{ESC}[4:3mcurly{ESC}[4:0mno{ESC}[4:5mdash{ESC}[21mdouble{ESC}[24mplain")
    first = {p["text"]: classes(p) for p in lines[0]["parts"]}
    assert first == {"b": {"ansi-bold"}, "d": {"ansi-dim"}, "i": {"ansi-italic"},
                     "u": {"ansi-underline", "ansi-ul-single"}, "v": {"ansi-fg-paper", "ansi-bg-ink"},
                     "s": {"ansi-strike"}}
    every, after = lines[1]["parts"]
    assert classes(every) == {"ansi-bold", "ansi-italic", "ansi-underline", "ansi-ul-single",
                              "ansi-strike", "ansi-fg-paper", "ansi-bg-ink"}
    assert after["cls"] == "" and after["text"] == "none"
    styles = [(p["text"], classes(p)) for p in lines[2]["parts"]]
    assert styles == [("curly", {"ansi-underline", "ansi-ul-curly"}), ("no", set()),
                      ("dash", {"ansi-underline", "ansi-ul-dashed"}),
                      ("double", {"ansi-underline", "ansi-ul-double"}), ("plain", set())]
    # Inverse swaps the pane's ink and background.
    pane_bg = page.evaluate("getComputedStyle(document.getElementById('pane')).backgroundColor")
    inverse = next(p for p in lines[0]["parts"] if p["text"] == "v")
    assert inverse["color"] == pane_bg and inverse["bg"] != pane_bg


def test_no_escape_leaks_as_visible_text(page: Page) -> None:
    cases = {
        f"{ESC}[38:5:208mA{ESC}[0m": "A",
        f"{ESC}[38:2::10:20:30mB{ESC}[39m": "B",
        f"{ESC}[38:2:0:10:20:30mC": "C",
        f"{ESC}[48;5;21;38;2;1;2;3mD{ESC}[m": "D",
        f"{ESC}[58:2::1:2:3;4mE{ESC}[59m": "E",
        f"{ESC}]0;window title{chr(7)}F{ESC}]8;;https://x.test/{ESC}\\G{ESC}]8;;{ESC}\\": "FG",
        f"{ESC}[2K{ESC}[1GH{ESC}[?25l{ESC}(BI{ESC}7{ESC}8": "HI",
        f"J{ESC}[38;5": "J",
        f"K{ESC}": "K",
        f"{ESC}Pq#0;2;0;0;0{ESC}\\L{ESC}_apc{chr(7)}M": "LM",
    }
    lines = render(page, *cases)
    assert [line["text"] for line in lines] == list(cases.values())


def test_256_and_true_colours_render_in_their_colours(browser: Any) -> None:
    page = blank(browser, "dark")
    lines = render(page, sgr("38;5;208", "a") + sgr("38:5:208", "b") + sgr("38;2;10;200;120", "c")
                   + sgr("38:2::10:200:120", "d") + sgr("38:2:1:10:200:120", "e")
                   + sgr("48;5;21", "f") + sgr("48:2::200:30:40", "g") + sgr("38;5;244", "h")
                   + sgr("91", "i") + sgr("38;5;9", "j"))
    parts = {p["text"]: p for p in lines[0]["parts"]}
    assert [parts[t]["color"] for t in "abcde"] == ["rgb(255, 135, 0)"] * 2 + ["rgb(10, 200, 120)"] * 3
    assert parts["f"]["bg"] == "rgb(0, 0, 255)" and parts["g"]["bg"] == "rgb(200, 30, 40)"
    assert parts["h"]["color"] == "rgb(128, 128, 128)"                 # the grey ramp
    assert "ansi-fgx" in classes(parts["a"]) and "ansi-bgx" in classes(parts["f"])
    assert classes(parts["j"]) == classes(parts["i"]) == {"ansi-c9"}   # 0..15 stay classes
    assert page.evaluate("window.__violations") == []
    page.context.close()


def test_custom_properties_are_set_through_the_cssom_without_a_csp_violation(page: Page) -> None:
    render(page, sgr("38;5;208", "x") + sgr("48;2;1;2;3", "y"))
    styled = page.locator("#pane span.ansi-fgx")
    assert styled.evaluate("e => e.style.getPropertyValue('--ansi-fg-light')").startswith("rgb(")
    assert page.evaluate("window.__violations") == []
    # The watcher does see a violation: an inline style attribute is refused by this CSP.
    page.evaluate("document.getElementById('pane').setAttribute('style', 'color: red')")
    wait_for(lambda: page.evaluate("window.__violations.length") > 0, what="a CSP violation")


def test_carriage_return_overwrites_from_column_0_keeping_styles(page: Page) -> None:
    lines = render(page, "abcdef\rXY", "10%\r20%\r30%", "10%\r20%\r30%\r", "ab\bc",
                   sgr("31", "abcdef") + "\r" + sgr("1", "XY"), "done\r\r", "100%\r5%")
    assert [line["text"] for line in lines] == ["XYcdef", "30%", "30%", "ac", "XYcdef", "done",
                                                "5%0%"]
    styled = [(p["text"], classes(p)) for p in lines[4]["parts"]]
    assert styled == [("XY", {"ansi-bold"}), ("cdef", {"ansi-c1"})]


def test_styles_carry_across_the_lines_of_a_stream(page: Page) -> None:
    lines = render(page, f"{ESC}[32;1mgreen", "still", f"{ESC}[0mplain")
    assert classes(lines[1]["parts"][0]) == {"ansi-c2", "ansi-bold"}
    assert lines[2]["parts"][0]["cls"] == ""


def palette_cases() -> list[str]:
    """Every base colour (as text, inverted, as a background), every one of the 256 (the same),
    true colours sampled (as text and background), and 256/true colours on a true-colour
    background of their own."""
    base = [f"{ESC}[{30 + n}mx" for n in range(8)] + [f"{ESC}[{90 + n}mx" for n in range(8)]
    inverse = [f"{ESC}[7;{30 + n}mx" for n in range(8)] + [f"{ESC}[7;{90 + n}mx" for n in range(8)]
    indexed = [f"{ESC}[38;5;{n}mx" for n in range(256)] + [f"{ESC}[7;38;5;{n}mx" for n in range(256)]
    steps = (0, 60, 120, 180, 255)
    true = [f"{ESC}[38;2;{r};{g};{b}mx" for r in steps for g in steps for b in steps]
    on_true = [f"{ESC}[38;2;30;30;60;48;2;20;20;40mx", f"{ESC}[38;5;255;48:2::255:255:255mx"]
    # Default text on a background the output set: a base one, 256 and true ones.
    backs = ([f"{ESC}[{40 + n}mx" for n in range(8)] + [f"{ESC}[{100 + n}mx" for n in range(8)]
             + [f"{ESC}[48;5;{n}mx" for n in range(256)]
             + [f"{ESC}[48;2;{r};{g};{b}mx" for r in steps for g in steps for b in steps])
    return base + inverse + indexed + true + on_true + backs + [f"{ESC}[38:2::255:255:0mx",
                                                                f"{ESC}[38:2::0:0:255mx"]


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_every_palette_colour_has_4_5_to_1_contrast(browser: Any, scheme: str) -> None:
    page = blank(browser, scheme)
    result = page.evaluate(CONTRAST, palette_cases())
    low = [(line.replace(ESC, "ESC"), round(ratio, 2)) for line, ratio in result["ratios"]
           if ratio < 4.5]
    assert low == []
    # ansi.js nudges against the pane colours marco.css gives each theme.
    assert result["pane"] == page.evaluate(f"Ansi.PANE.{scheme}")
    page.context.close()


# The page's own text on its backgrounds (marco.css variables): (text, background) pairs.
UI_PAIRS = [("ink", "bg"), ("ink", "panel"), ("ink", "soft"), ("muted", "bg"), ("muted", "panel"),
            ("muted", "soft"), ("muted", "soft-2"), ("muted", "term"), ("accent", "panel"),
            ("accent", "ok-bg"), ("bad", "panel"), ("bad", "bad-bg"), ("warn", "warn-bg"),
            ("warn", "soft"), ("running", "running-bg"), ("unreachable", "unreachable-bg"),
            ("interrupted", "interrupted-bg"), ("button-ink", "button"),
            ("topbar-ink", "topbar"), ("term-ink", "term"), ("err", "term"), ("focus", "panel"),
            ("focus", "bg")]

# Each pair's WCAG ratio, the variables resolved by the browser on a probe element.
UI_CONTRAST = """(pairs) => {
  const probe = document.createElement("span");
  document.body.appendChild(probe);
  const resolve = (name) => {
    probe.style.setProperty("color", `var(--${name})`);
    return getComputedStyle(probe).color.match(/[\\d.]+/g).slice(0, 3).map(Number);
  };
  const lum = (c) => {
    const l = c.map((v) => { v /= 255; return v <= 0.04045 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); });
    return 0.2126 * l[0] + 0.7152 * l[1] + 0.0722 * l[2];
  };
  return pairs.map(([text, back]) => {
    const a = lum(resolve(text)), b = lum(resolve(back));
    return [text, back, (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05)];
  });
}"""


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_the_pages_own_colours_have_4_5_to_1_contrast(browser: Any, scheme: str) -> None:
    page = blank(browser, scheme)
    ratios = page.evaluate(UI_CONTRAST, UI_PAIRS)
    assert len(ratios) == len(UI_PAIRS)
    assert [(text, back, round(r, 2)) for text, back, r in ratios if r < 4.5] == []
    assert page.evaluate("window.__violations") == []
    page.context.close()


def test_the_stored_theme_wins_over_the_systems(browser: Any) -> None:
    page = blank(browser, "light")
    light = render(page, sgr("31", "r"))[0]["parts"][0]["color"]
    page.evaluate("localStorage.setItem('marco-theme', 'dark')")
    page.reload()
    page.wait_for_function("typeof Ansi !== 'undefined'")
    assert page.evaluate("document.documentElement.dataset.theme") == "dark"
    pane_bg = page.evaluate("getComputedStyle(document.getElementById('pane')).backgroundColor")
    assert pane_bg == "rgb(20, 24, 28)"
    assert render(page, sgr("31", "r"))[0]["parts"][0]["color"] != light
    page.context.close()


# ---------------------------------------------------------------------------------------------
# Through the real controller: the run page and the header's toggle.

def logged_in(browser: Any, controller: ControllerProcess, user: UnixUser, path: str,
              scheme: str) -> Page:
    context = browser.new_context(color_scheme=scheme)
    context.add_init_script(WATCH_CSP)
    page: Page = context.new_page()
    open_logged_in(page, controller, user, path)
    return page


def test_the_run_page_shows_256_and_true_colours_in_dark_mode(
        browser: Any, cluster: tuple[ControllerProcess, list[str]], alice: UnixUser,
        signer: TokenSigner) -> None:
    controller, names = cluster
    mark = secrets.token_hex(4)
    command = (f"printf '\\033[38;5;208morange-{mark}\\033[0m "
               f"\\033[38:2::10:200:120mtrue-{mark}\\033[0m\\n\\033[30mblack-{mark}\\033[0m\\n'")
    run_id = ended_command_run(controller, signer.issue(alice.name), names[0], command)
    page = logged_in(browser, controller, alice, f"/runs/{run_id}", "dark")
    pane = page.locator(f'.host-pane[data-host="{names[0]}"]')
    orange = pane.locator(".line span", has_text=f"orange-{mark}")
    expect(orange).to_be_visible(timeout=TIMEOUT_MS)
    colour = lambda loc: loc.evaluate("e => getComputedStyle(e).color")  # noqa: E731
    assert colour(orange) == "rgb(255, 135, 0)"
    assert colour(pane.locator(".line span", has_text=f"true-{mark}")) == "rgb(10, 200, 120)"
    lines = pane.locator(".lines").first
    assert lines.evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(20, 24, 28)"
    line = pane.locator(".line", has_text=f"orange-{mark}")
    assert line.text_content() == f"orange-{mark} true-{mark}"
    black = pane.locator(".line span", has_text=f"black-{mark}")
    ratio = page.evaluate(CONTRAST_OF, [colour(black), "rgb(20, 24, 28)"])
    assert ratio >= 4.5
    assert page.evaluate("window.__violations") == []
    page.context.close()


CONTRAST_OF = """([a, b]) => {
  const lum = (c) => {
    const l = c.match(/[\\d.]+/g).slice(0, 3).map(Number).map((v) => { v /= 255; return v <= 0.04045 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); });
    return 0.2126 * l[0] + 0.7152 * l[1] + 0.0722 * l[2];
  };
  const x = lum(a), y = lum(b);
  return (Math.max(x, y) + 0.05) / (Math.min(x, y) + 0.05);
}"""


def test_the_theme_toggle_is_a_button_that_sticks(
        browser: Any, cluster: tuple[ControllerProcess, list[str]], alice: UnixUser) -> None:
    controller, _ = cluster
    page = logged_in(browser, controller, alice, "/runs", "light")
    toggle = page.get_by_role("button", name="Dark mode")
    expect(toggle).to_have_attribute("aria-pressed", "false", timeout=TIMEOUT_MS)
    background = lambda: page.evaluate("getComputedStyle(document.body).backgroundColor")  # noqa: E731
    light = background()
    toggle.focus()
    page.keyboard.press("Enter")                       # reachable and usable by keyboard
    expect(toggle).to_have_attribute("aria-pressed", "true")
    dark = background()
    assert dark != light
    page.goto(controller.url + "/")                    # another page, same browser: it sticks
    expect(page.get_by_role("button", name="Dark mode")).to_have_attribute("aria-pressed", "true",
                                                                           timeout=TIMEOUT_MS)
    assert background() == dark
    page.get_by_role("button", name="Dark mode").click()
    expect(page.get_by_role("button", name="Dark mode")).to_have_attribute("aria-pressed", "false")
    assert background() == light
    page.context.close()
