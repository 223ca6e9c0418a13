"""The output viewer in a real browser: a huge finished run, and output streaming live.

    sudo .venv/bin/python bench/output_viewer.py [--lines 1000000] [--rounds 3]
                                                 [--nodes 10] [--rate 1000] [--seconds 10]

A real controller (HTTPS, static nodes) and `--nodes` real agents (mutual TLS) on loopback,
chromium (Debian's, through Playwright). Two parts:

**A finished run**: one command run of `seq 1 LINES` and, as the baseline, one of
`seq 1 1000`, both archived in the controller's store. Interleaved round by round, for each:

- open: from navigating to the run's page to its last line shown (the pane follows the end);
- top: from `Home` in the pane to line `1` shown;
- search: from `Enter` in the search box to the first hit shown, marked, with its count
  (the needle, `77...7` one digit narrower than the last line, is on exactly one line);
- the page's JS heap (Chromium's `Performance.getMetrics`) and the elements in its DOM;
- the search API alone (`GET /api/runs/ID/search`) against reading the whole output as text
  (`GET /api/runs/ID/output.txt`), the server's floor for any client-side search.

**Live output**: a command run on one node, then on all `--nodes`, each printing `--rate` lines
a second for `--seconds` seconds (each line carries its node's `time.time()`), watched by the
run's page and, in a second round, by the main page. Measured in the page: each line's delay
from its printing to its element in the DOM (a MutationObserver; same machine, same clock),
p50/p99; and the frame times (requestAnimationFrame deltas) while it streams, against the same
page with nothing streaming (the baseline, measured just before).
"""

from __future__ import annotations

import argparse
import getpass
import os
import shlex
import statistics
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from marco.tokens import TokenSigner, create_secret, load_secret  # noqa: E402
from tests.support.agent_process import AgentProcess  # noqa: E402
from tests.support.browser import launch  # noqa: E402
from tests.support.command_runs import all_archived, run_of, start_command_run  # noqa: E402
from tests.support.controller_process import ControllerProcess  # noqa: E402
from tests.support.http import call  # noqa: E402
from tests.support.pki import TestPki  # noqa: E402
from tests.support.waiting import wait_for  # noqa: E402

SMALL = 1000
TIMEOUT_MS = 300_000

# Printed by every node: `T <time.time()> <n>` at `rate` lines a second for `seconds`, after a
# pause that lets the watching page open first.
STREAM = ("import sys, time\n"
          "rate, seconds = {rate}, {seconds}\n"
          "time.sleep({pause})\n"
          "start = time.time()\n"
          "for n in range(rate * seconds):\n"
          "    due = start + n / rate\n"
          "    now = time.time()\n"
          "    if due > now: time.sleep(due - now)\n"
          "    sys.stdout.write('T %.6f %d\\n' % (time.time(), n)); sys.stdout.flush()\n")

# Installed in the page: the first sight of each `T <time> <n>` line (its delay), and frame
# times, until `window.benchStop()`.
WATCH = """() => {
  const seen = new Set(), delays = [], frames = [];
  const look = (node) => {
    const text = node.textContent || "";
    const m = /^T (\\d+\\.\\d+) \\d+$/.exec(text);
    if (!m) return false;
    if (!seen.has(text)) { seen.add(text); delays.push(Date.now() / 1000 - Number(m[1])); }
    return true;
  };
  const observer = new MutationObserver((records) => {
    for (const record of records) for (const node of record.addedNodes) {
      if (node.nodeType !== 1) continue;
      if (!look(node)) node.querySelectorAll(".line").forEach(look);
    }
  });
  observer.observe(document.body, { childList: true, subtree: true });
  let last = performance.now(), running = true;
  const frame = (now) => { frames.push(now - last); last = now; if (running) requestAnimationFrame(frame); };
  requestAnimationFrame(frame);
  window.benchStop = () => { running = false; observer.disconnect(); return { delays, frames }; };
}"""

# The frame recorder alone, for the baseline.
FRAMES = """() => {
  const frames = [];
  let last = performance.now(), running = true;
  const frame = (now) => { frames.push(now - last); last = now; if (running) requestAnimationFrame(frame); };
  requestAnimationFrame(frame);
  window.benchStop = () => { running = false; return { delays: [], frames }; };
}"""


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


def needle(lines: int) -> str:
    """`77...7` one digit narrower than `lines` (a power of ten): the one line of `seq 1 LINES`
    that holds it is that number itself."""
    return "7" * (len(str(lines)) - 1)


def open_finished(browser: Any, controller: ControllerProcess, token: str, run_id: str,
                  lines: int) -> dict[str, float]:
    """One look at a finished run's page: open, top, search, memory."""
    context = browser.new_context(extra_http_headers={"Authorization": f"Bearer {token}"},
                                  viewport={"width": 1280, "height": 900})
    page = context.new_page()
    cdp = context.new_cdp_session(page)
    cdp.send("Performance.enable")
    try:
        began = time.perf_counter()
        page.goto(f"{controller.url}/runs/{run_id}")
        page.locator(f'.line:text-is("{lines}")').first.wait_for(state="visible", timeout=TIMEOUT_MS)
        opened = time.perf_counter() - began
        pane = page.locator(".host-pane").first.locator("[tabindex='0']").first
        pane.focus()
        began = time.perf_counter()
        page.keyboard.press("Home")
        page.locator('.line:text-is("1")').first.wait_for(state="visible", timeout=TIMEOUT_MS)
        top = time.perf_counter() - began
        searched = float("nan")
        if page.locator("#search-q").count():
            page.fill("#search-q", needle(lines))
            began = time.perf_counter()
            page.press("#search-q", "Enter")
            page.locator("mark.hit.current").first.wait_for(state="visible", timeout=TIMEOUT_MS)
            searched = time.perf_counter() - began
        metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
        elements = page.evaluate("() => document.getElementsByTagName('*').length")
        return {"open": opened, "top": top, "search": searched,
                "heap_mb": metrics.get("JSHeapUsedSize", 0) / 1e6, "elements": float(elements)}
    finally:
        context.close()


def api_search(controller: ControllerProcess, token: str, run_id: str,
               lines: int) -> tuple[float, float]:
    """Seconds of the search API for the needle, and of reading the run's whole text."""
    query = urllib.parse.urlencode({"q": needle(lines)})
    began = time.perf_counter()
    status, answer = call(controller, "GET", f"/api/runs/{run_id}/search?{query}", token=token)
    searched = time.perf_counter() - began
    if status != 200:
        searched = float("nan")  # no search API in this version
    began = time.perf_counter()
    status, _ = call(controller, "GET", f"/api/runs/{run_id}/output.txt", token=token)
    assert status == 200
    return searched, time.perf_counter() - began


def watch(browser: Any, controller: ControllerProcess, token: str, nodes: list[str],
          where: str, rate: int, seconds: int) -> dict[str, list[float]]:
    """Delays and frame times of a page watching `nodes` stream; its idle frames first."""
    context = browser.new_context(extra_http_headers={"Authorization": f"Bearer {token}"},
                                  viewport={"width": 1280, "height": 900})
    page = context.new_page()
    try:
        if where == "main":
            page.goto(controller.url + "/")
            page.locator(".node").nth(len(nodes) - 1).wait_for(timeout=60_000)
        page.evaluate(FRAMES)
        time.sleep(seconds / 2)
        idle = page.evaluate("() => window.benchStop()")["frames"]
        pause = 4
        run_id = start_command_run(controller, token, nodes,
                           "python3 -c " + shlex.quote(STREAM.format(rate=rate, seconds=seconds,
                                                                     pause=pause)))
        if where == "run":
            page.goto(f"{controller.url}/runs/{run_id}")
            page.locator(".host-pane").nth(len(nodes) - 1).wait_for(timeout=60_000)
        page.evaluate(WATCH)
        wait_for(lambda: run_of(controller, token, run_id)["ended"] is not None,
                 timeout=seconds + pause + 120, what="the run ended")
        time.sleep(2)  # the last lines reach the page
        seen = page.evaluate("() => window.benchStop()")
        return {"idle": idle, "frames": seen["frames"], "delays": seen["delays"]}
    finally:
        context.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--rate", type=int, default=1000, help="lines a second per node")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--skip-finished", action="store_true")
    parser.add_argument("--skip-live", action="store_true")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    user = getpass.getuser()
    with tempfile.TemporaryDirectory(prefix="marco-bench-viewer-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        secret = create_secret(work / "secret")
        pki = TestPki(work / "pki")
        token = TokenSigner(load_secret(secret)).issue(user)
        agents = [AgentProcess(secret, work / f"agent{n}" / "state",
                               node_name=f"view{os.getpid()}n{n}",
                               extra_args=["--log-level", "warning"], pki=pki)
                  for n in range(args.nodes)]
        nodes = [a.node_name for a in agents]
        controller = ControllerProcess(
            secret, work, pam_service="login", pki=pki,
            extra_args=["--no-discovery", *[arg for a in agents
                                            for arg in ("--node", f"{a.node_name}={a.host}:{a.port}")]])
        finished: dict[str, list[dict[str, float]]] = {"big": [], "small": []}
        api: dict[str, list[tuple[float, float]]] = {"big": [], "small": []}
        live: dict[str, dict[str, list[float]]] = {}
        try:
            wait_for(lambda: set(nodes) <= set(controller.inventory_hosts(token)), timeout=60,
                     what="the nodes listed")
            with sync_playwright() as playwright:
                browser = launch(playwright, trust=pki.controller_cert)
                if not args.skip_finished:
                    runs = {"big": (start_command_run(controller, token, nodes[:1], f"seq 1 {args.lines}"),
                                    args.lines),
                            "small": (start_command_run(controller, token, nodes[:1], f"seq 1 {SMALL}"),
                                      SMALL)}
                    for run_id, _ in runs.values():
                        wait_for(lambda r=run_id: all_archived(controller, token, r, 1),
                                 timeout=600, what="the output archived")
                    for n in range(args.rounds):
                        for name, (run_id, lines) in runs.items():
                            finished[name].append(open_finished(browser, controller, token,
                                                                run_id, lines))
                            api[name].append(api_search(controller, token, run_id, lines))
                            print(f"round {n + 1} {name}: {finished[name][-1]} api {api[name][-1]}",
                                  flush=True)
                if not args.skip_live:
                    for where in ("run", "main"):
                        for count in (1, len(nodes)):
                            key = f"{where}/{count}"
                            live[key] = watch(browser, controller, token, nodes[:count], where,
                                              args.rate, args.seconds)
                            print(f"{key}: {len(live[key]['delays'])} lines seen", flush=True)
                browser.close()
        finally:
            controller.stop()
            for agent in agents:
                agent.stop()
    report(args, finished, api, live)
    return 0


def report(args: argparse.Namespace, finished: dict[str, list[dict[str, float]]],
           api: dict[str, list[tuple[float, float]]], live: dict[str, dict[str, list[float]]]) -> None:
    if finished["big"]:
        print(f"\nA finished run: {args.lines:,} lines against {SMALL:,}; medians of "
              f"{args.rounds} interleaved rounds")
        print(f"| measure | {args.lines:,} lines | {SMALL:,} lines | ratio |")
        print("|---|---:|---:|---:|")
        for key, what, scale in (("open", "open the page, last line shown (ms)", 1000),
                                 ("top", "Home, line 1 shown (ms)", 1000),
                                 ("search", "search, first hit shown (ms)", 1000),
                                 ("heap_mb", "JS heap (MB)", 1),
                                 ("elements", "DOM elements", 1)):
            big = statistics.median(r[key] for r in finished["big"]) * scale
            small = statistics.median(r[key] for r in finished["small"]) * scale
            print(f"| {what} | {big:.1f} | {small:.1f} | {big / small:.2f}× |")
        for index, what in ((0, "search API (ms)"), (1, "read the whole output.txt (ms)")):
            big = statistics.median(r[index] for r in api["big"]) * 1000
            small = statistics.median(r[index] for r in api["small"]) * 1000
            print(f"| {what} | {big:.1f} | {small:.1f} | {big / small:.2f}× |")
    if live:
        print(f"\nLive output: {args.rate} lines/s per node for {args.seconds} s")
        print("| page, nodes | lines seen | delay p50 (ms) | delay p99 (ms) | frame p50 / p99 / max "
              "(ms) | idle frame p50 / p99 / max (ms) |")
        print("|---|---:|---:|---:|---:|---:|")
        for key, row in live.items():
            frames, idle, delays = row["frames"], row["idle"], row["delays"]
            print(f"| {key} | {len(delays)} | {percentile(delays, 0.5) * 1000:.0f} | "
                  f"{percentile(delays, 0.99) * 1000:.0f} | {percentile(frames, 0.5):.1f} / "
                  f"{percentile(frames, 0.99):.1f} / {max(frames, default=0):.0f} | "
                  f"{percentile(idle, 0.5):.1f} / {percentile(idle, 0.99):.1f} / "
                  f"{max(idle, default=0):.0f} |")


if __name__ == "__main__":
    sys.exit(main())
