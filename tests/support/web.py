"""Logging in through the page's form in a real browser (Playwright), for the web tests."""

from __future__ import annotations

import re

from playwright.sync_api import Page, expect

from tests.support.controller_process import ControllerProcess
from tests.support.users import UnixUser

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
