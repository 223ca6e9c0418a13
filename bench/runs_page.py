"""How the runs pages hold up with many runs, and how soon a task's result shows in its cell.

    sudo .venv/bin/python bench/runs_page.py [--runs 10000] [--rounds 7] [--results 30]

Two real controllers (HTTPS) on loopback, each with its own run store filled before it starts
(through the store itself, like runs that ended long ago): one holds `--runs` ended runs of one
user, the baseline holds 10. Interleaved round by round, against each:

- `GET /api/runs?limit=50` (the list's first page), median of 20 calls per round;
- every run through `GET /api/runs?limit=1000&before=...` (what `marco runs --limit` walks);
- the `/runs` page in chromium (Debian's, through Playwright): from navigation to the first page
  of rows shown (the 50th row visible), a fresh browser context each time.

Then, on the baseline controller, the time from `POST /api/runs/ID/events` of a task's
`host_result` to that task's cell taking its status colour on an open run page, `--results`
times, against the time until the same result is readable through `GET /api/runs/ID?since=`
(the API floor, polled every 10 ms). The page asks every second (POLL_MS in runs.js), so its
latency is bounded by that interval plus one request.
"""

from __future__ import annotations

import argparse
import getpass
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controller.runstore import Run, SqliteRunStore, new_run_id  # noqa: E402
from marco.tokens import TokenSigner, create_secret, load_secret  # noqa: E402
from tests.support.browser import launch  # noqa: E402
from tests.support.controller_process import ControllerProcess  # noqa: E402
from tests.support.http import call  # noqa: E402
from tests.support.pki import TestPki  # noqa: E402

PAGE_ROWS = 50  # PAGE_SIZE in runs.js
POLL_S = 1.0  # POLL_MS in runs.js


def fill_store(state_dir: Path, owner: str, count: int) -> None:
    """`count` ended command runs of `owner`, one a minute back from now."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = SqliteRunStore(state_dir / "runs.sqlite3")
    now = time.time()
    try:
        for n in range(count):
            started = now - 60 * (count - n)
            store.create(Run(id=new_run_id(started), owner=owner, kind="command",
                             title=f"echo run {n} " + "x" * 40, hosts=["n1", "n2", "n3"],
                             started=started, ended=started + 1.5, status="ok",
                             stats={h: {"ok": 1, "rc": 0} for h in ("n1", "n2", "n3")},
                             meta={"cwd": "~"}))
    finally:
        store.close()


def start_controller(work: Path, secret_file: Path, pki: TestPki, owner: str,
                     runs: int) -> ControllerProcess:
    home = work / f"controller-{runs}"
    fill_store(home / "state", owner, runs)
    return ControllerProcess(secret_file, work, pam_service="login", pki=pki, home=home,
                             extra_args=["--no-discovery"])


def api_first_page(controller: ControllerProcess, token: str, stored: int,
                   calls: int = 20) -> float:
    """Median seconds of GET /api/runs?limit=50."""
    times = []
    for _ in range(calls):
        began = time.perf_counter()
        status, answer = call(controller, "GET", f"/api/runs?limit={PAGE_ROWS}", token=token)
        times.append(time.perf_counter() - began)
        assert status == 200 and len(answer["runs"]) == min(PAGE_ROWS, stored), answer
    return statistics.median(times)


def api_walk(controller: ControllerProcess, token: str) -> tuple[float, int]:
    """Seconds to list every run 1,000 at a time, and how many there were."""
    began, seen, before = time.perf_counter(), 0, ""
    while True:
        status, answer = call(controller, "GET", f"/api/runs?limit=1000{before}", token=token)
        assert status == 200, answer
        seen += len(answer["runs"])
        if not answer["more"]:
            return time.perf_counter() - began, seen
        before = f"&before={answer['runs'][-1]['id']}"


def page_load(browser: Any, controller: ControllerProcess, token: str, stored: int) -> float:
    """Seconds from navigating to /runs to its first page of rows shown."""
    context = browser.new_context(extra_http_headers={"Authorization": f"Bearer {token}"})
    page = context.new_page()
    try:
        began = time.perf_counter()
        page.goto(controller.url + "/runs")
        page.locator("tr.run-row").nth(min(PAGE_ROWS, stored) - 1).wait_for(state="visible", timeout=60_000)
        return time.perf_counter() - began
    finally:
        context.close()


def result_latency(browser: Any, controller: ControllerProcess, token: str,
                   results: int) -> tuple[list[float], list[float]]:
    """Seconds from a host_result's POST to its cell coloured on the run page, and to the same
    event being readable through the API, `results` times each (interleaved)."""
    status, answer = call(controller, "POST", "/api/runs",
                          {"kind": "playbook", "title": "latency bench"}, token)
    assert status == 201, answer
    run_id = answer["id"]
    context = browser.new_context(extra_http_headers={"Authorization": f"Bearer {token}"})
    page = context.new_page()
    page.goto(controller.url + f"/runs/{run_id}")
    page_times: list[float] = []
    api_times: list[float] = []
    chance = random.Random(12)
    try:
        for n in range(results):
            for target, times in (("page", page_times), ("api", api_times)):
                task_id = f"t{n}-{target}"
                send(controller, token, run_id, {"type": "task_start", "task": task_id,
                                                 "task_id": task_id, "play_id": "p"})
                seq = last_seq(controller, token, run_id)
                if target == "page":
                    page.locator(f'tr.grid-task[data-task="{task_id}"]').wait_for(
                        timeout=30_000)
                    # The row just appeared, so the page has just asked: a result arriving
                    # at once would always wait a whole interval. Results arrive at any time.
                    time.sleep(chance.uniform(0, POLL_S))
                began = time.perf_counter()
                send(controller, token, run_id, {"type": "host_result", "task_id": task_id,
                                                 "host": "n1", "status": "changed",
                                                 "duration": 0.1})
                if target == "page":
                    page.locator(f'tr.grid-task[data-task="{task_id}"] '
                                 'button.cell.status-changed').wait_for(timeout=30_000)
                else:
                    while last_seq(controller, token, run_id) == seq:
                        time.sleep(0.01)
                times.append(time.perf_counter() - began)
    finally:
        context.close()
        call(controller, "POST", f"/api/runs/{run_id}/finish", {"status": "ok"}, token)
    return page_times, api_times


def send(controller: ControllerProcess, token: str, run_id: str, event: dict[str, Any]) -> None:
    status, answer = call(controller, "POST", f"/api/runs/{run_id}/events",
                          {"events": [event]}, token)
    assert status == 200, answer


def last_seq(controller: ControllerProcess, token: str, run_id: str) -> int:
    status, run = call(controller, "GET", f"/api/runs/{run_id}?since=0", token=token)
    assert status == 200, run
    return max((e["seq"] for e in run["events"]), default=0)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--results", type=int, default=30)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    owner = getpass.getuser()
    with tempfile.TemporaryDirectory(prefix="marco-bench-runs-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        secret_file = create_secret(work / "secret")
        token = TokenSigner(load_secret(secret_file)).issue(owner)
        pki = TestPki(work / "pki")
        filled = time.perf_counter()
        big = start_controller(work, secret_file, pki, owner, args.runs)
        small = start_controller(work, secret_file, pki, owner, 10)
        print(f"stores filled and controllers up in {time.perf_counter() - filled:.1f} s")
        targets = (("big", big, args.runs), ("small", small, 10))
        rows: dict[str, dict[str, list[float]]] = {
            name: {"api": [], "walk": [], "page": []} for name, _, _ in targets}
        try:
            with sync_playwright() as playwright:
                browser = launch(playwright, trust=pki.controller_cert)
                for _, controller, stored in targets:  # warm-up
                    page_load(browser, controller, token, stored)
                for _ in range(args.rounds):
                    for name, controller, stored in targets:
                        rows[name]["api"].append(api_first_page(controller, token, stored))
                        walked, seen = api_walk(controller, token)
                        assert seen == stored, seen
                        rows[name]["walk"].append(walked)
                        rows[name]["page"].append(page_load(browser, controller, token, stored))
                page_times, api_times = result_latency(browser, small, token, args.results)
                browser.close()
        finally:
            big.stop()
            small.stop()
    report(args, rows, page_times, api_times)
    return 0


def report(args: argparse.Namespace, rows: dict[str, dict[str, list[float]]],
           page_times: list[float], api_times: list[float]) -> None:
    med = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in rows.items()}
    print(f"\n{args.rounds} interleaved rounds; medians")
    print(f"| measure | {args.runs} runs | 10 runs | ratio |")
    print("|---|---:|---:|---:|")
    for key, what in (("api", "GET /api/runs?limit=50 (ms)"),
                      ("walk", "list every run, 1,000 per call (ms)"),
                      ("page", "/runs page, first 50 rows shown (ms)")):
        b, s = med["big"][key] * 1000, med["small"][key] * 1000
        print(f"| {what} | {b:.1f} | {s:.1f} | {b / s:.2f}× |")
    print(f"\nhost_result to its cell ({len(page_times)} results): page p50 "
          f"{percentile(page_times, 0.5) * 1000:.0f} ms, p90 "
          f"{percentile(page_times, 0.9) * 1000:.0f} ms, max {max(page_times) * 1000:.0f} ms; "
          f"API floor p50 {percentile(api_times, 0.5) * 1000:.1f} ms, max "
          f"{max(api_times) * 1000:.1f} ms")


if __name__ == "__main__":
    sys.exit(main())
