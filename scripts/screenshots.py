"""The screenshots in docs/screenshots/: a run's page and the node table, light and dark.

    sudo .venv/bin/python scripts/screenshots.py [--out docs/screenshots]

Real parts, like the tests: three agents (mutual TLS) and a controller on loopback, a command
run on all three printing coloured output (16, 256 and true colours, a progress line), and
Debian's chromium through Playwright, logged in with a token of the user running this (the
page's header names that user). Run it by hand after a change to the pages; the PNG files are
committed.
"""

from __future__ import annotations

import argparse
import getpass
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from marco.tokens import TokenSigner, create_secret, load_secret  # noqa: E402
from tests.support.agent_process import AgentProcess  # noqa: E402
from tests.support.browser import launch  # noqa: E402
from tests.support.command_runs import ended_command_run  # noqa: E402
from tests.support.controller_process import ControllerProcess  # noqa: E402
from tests.support.pki import TestPki  # noqa: E402
from tests.support.waiting import wait_for  # noqa: E402

NODES = ("web1", "web2", "db1")
# A build-like log: steps in colour, a 256-colour and a true-colour line, a progress line
# redrawn with \r, a warning on stderr, after forty plain lines.
COMMAND = r"""
seq -f 'log line %g' 1 40
printf '\033[1;34m==>\033[0m Building \033[1mmarco-demo\033[0m on %s\n' "$(hostname)"
for step in fetch configure compile test package; do
  printf '\033[32m[ ok ]\033[0m %-10s \033[2m(%s)\033[0m\n' "$step" "$(date +%T)"
done
printf '\033[38;5;208mcolour 208\033[0m, \033[38;2;120;80;200mtrue colour\033[0m\n'
for p in 10 40 70 100; do printf '\rprogress %3d%%' "$p"; done; echo
echo 'deprecated option --fast, use --quick' >&2
printf '\033[1;32mdone\033[0m\n'
"""
VIEWPORT = {"width": 1280, "height": 900}


def shoot(browser: Any, url: str, token: str, theme: str, path: Path,
          prepare: Any) -> None:
    """One screenshot of `url` in `theme` (the page's own toggle, kept in localStorage)."""
    context = browser.new_context(extra_http_headers={"Authorization": f"Bearer {token}"},
                                  viewport=VIEWPORT, color_scheme=theme)
    page = context.new_page()
    try:
        page.goto(url)
        prepare(page)
        page.wait_for_timeout(300)  # a frame or two for the last lines to paint
        page.screenshot(path=str(path), full_page=False)
        print(f"wrote {path}")
    finally:
        context.close()


def run_page(page: Any) -> None:
    page.locator(".host-pane").nth(len(NODES) - 1).wait_for()
    page.locator('.line:has-text("done")').first.wait_for()
    # The first pane whole, under the run's head: the page scrolled by the search bar's height.
    page.evaluate("() => window.scrollTo(0, document.querySelector('#run-search')"
                  ".getBoundingClientRect().bottom + window.scrollY - 120)")


def node_table(page: Any) -> None:
    page.locator("#view-table").click()
    page.locator("#node-rows tr").nth(len(NODES) - 1).wait_for()
    page.locator("#node-rows").get_by_text("up").first.wait_for()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    user = getpass.getuser()
    with tempfile.TemporaryDirectory(prefix="marco-screens-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        secret = create_secret(work / "secret")
        pki = TestPki(work / "pki")
        token = TokenSigner(load_secret(secret)).issue(user)
        agents = [AgentProcess(secret, work / name / "state", node_name=name,
                               extra_args=["--log-level", "warning"], pki=pki)
                  for name in NODES]
        static = [arg for a in agents for arg in ("--node", f"{a.node_name}={a.host}:{a.port}")]
        controller = ControllerProcess(secret, work, pam_service="login", pki=pki,
                                       extra_args=["--no-discovery", *static])
        try:
            wait_for(lambda: set(NODES) <= set(controller.inventory_hosts(token)), timeout=120,
                     what="the nodes listed")
            run_id = ended_command_run(controller, token, list(NODES), COMMAND.strip(),
                                       timeout=120)
            with sync_playwright() as playwright:
                browser = launch(playwright, trust=pki.controller_cert)
                for theme in ("light", "dark"):
                    shoot(browser, f"{controller.url}/runs/{run_id}", token, theme,
                          args.out / f"run-{theme}.png", run_page)
                    shoot(browser, controller.url + "/", token, theme,
                          args.out / f"nodes-{theme}.png", node_table)
                browser.close()
        finally:
            controller.stop()
            for agent in agents:
                agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
