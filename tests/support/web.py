"""Logging in through the page's form in a real browser (Playwright), for the web tests."""

from __future__ import annotations

import re

from playwright.sync_api import Locator, Page, expect

from tests.support.controller_process import ControllerProcess
from tests.support.users import UnixUser
from tests.support.waiting import wait_for

TIMEOUT_MS = 20_000


def fill_login(page: Page, user: UnixUser) -> None:
    """On the login form: the user's name and password, then submit."""
    expect(page).to_have_url(re.compile(r"/login"), timeout=TIMEOUT_MS)
    page.fill("#username", user.name)
    page.fill("#password", user.password)
    page.click("#login-button")


def open_logged_in(page: Page, controller: ControllerProcess, user: UnixUser,
                   path: str = "/") -> None:
    """Open `path` in a browser context with no login: the login form comes first, then the
    page itself (the login keeps where it was going)."""
    page.goto(controller.url + path)
    fill_login(page, user)
    expect(page.locator("#current-user")).to_have_text(user.name, timeout=TIMEOUT_MS)
    expect(page).to_have_url(controller.url + path, timeout=TIMEOUT_MS)
    # The header is there as soon as it is parsed; the page's scripts (its buttons' handlers)
    # only once it has loaded.
    page.wait_for_load_state("load", timeout=TIMEOUT_MS)


# Whether an output line is inside its scroll area's visible part (false while it is not in
# one: a view re-renders its lines as pages and lengths arrive).
LINE_IN_SIGHT = """l => { const area = l.closest('.output-scroll'); if (!area) return false;
  const s = area.getBoundingClientRect(), r = l.getBoundingClientRect();
  return r.top >= s.top - 1 && r.bottom <= s.bottom + 1; }"""


def expect_in_sight(line: Locator, timeout: float = TIMEOUT_MS / 1000) -> None:
    """Until the output line is in sight in its scroll area (asked again while the view
    re-renders it)."""
    wait_for(lambda: line.evaluate(LINE_IN_SIGHT), timeout=timeout,
             what="the line in sight in its output")
