"""The main page with 1,000 nodes in a real browser (issue 15, item 2), against 100 in the same run.

    sudo flock /tmp/marco-tests.lock .venv/bin/python bench/page_nodes.py \
        [--counts 100,1000] [--rounds 3] [--health-interval 30] [--json FILE]

One process of simulated agents (tests/support/sim_agents.py, not announced: each with its
own port and certificate, health with the secret proof, status once a second while watched;
node i in group rack(i mod 10)) serves the largest count. They are static nodes of the
controllers' config, never announced: zeroconf on one loopback lists at most ~640 of 1,000
(bench/README.md, "Controller at scale"), and the page, not discovery, is measured here. One
real controller per count (HTTPS, mutual TLS to the agents) lists the first N of them, all up
before the page opens; `--health-interval` is long so the controller's health checks of 1,100
nodes do not take the 2 cores from the browser.

Per count and round, a fresh browser context (Debian's chromium through Playwright, a Bearer
token as the page's login) at 1280x800:

- load: navigation to the table showing its first row and the node count final ("N up / N"),
  on the page's clock (performance.now() from the navigation's start);
- status: frame times (requestAnimationFrame deltas p50/p99) and long tasks (PerformanceObserver
  `longtask`, >50 ms) over `--status-seconds` once the rows in sight show their status: the
  page's watched nodes' statuses arrive on its socket and the node list (N nodes) is fetched
  every 2 s;
- scroll: the table from top to bottom, 150 px a frame, frame times and long tasks;
- search / group: time from the input (or change) event to the next frame's end, median over
  a few values; "select all": the same for a click on "all" (every shown node ticked);
- main thread: its busy and script time over the status window (CDP Performance.getMetrics
  TaskDuration and ScriptDuration), in percent of the window;
- DOM elements and JS heap (CDP Performance.getMetrics after a garbage collection);
- cards: time to switch to the cards view (a click on "Cards"), and the DOM elements then.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from marco.tokens import TokenSigner, create_secret, load_secret  # noqa: E402
from tests.support.browser import launch  # noqa: E402
from tests.support.controller_process import ControllerProcess  # noqa: E402
from tests.support.daemon import stop_all  # noqa: E402
from tests.support.http import call  # noqa: E402
from tests.support.pki import TestPki  # noqa: E402
from tests.support.sim_agents import SimulatorProcess  # noqa: E402
from tests.support.waiting import wait_for  # noqa: E402

GROUPS = [f"rack{i}" for i in range(10)]
PREFIX = "sc"
VIEWPORT = {"width": 1280, "height": 800}
TIMEOUT_MS = 120_000
SEARCHES = ("sc-99", "rack3", "sc-1", "sc-5")

# In every page before its own scripts: frame deltas while recording, long tasks, statuses.
INSTRUMENT = """(() => {
  const bench = window.__bench = { frames: [], longTasks: [], statuses: 0, recording: false };
  let last = 0;
  const tick = (now) => {
    if (bench.recording && last) bench.frames.push(now - last);
    last = now;
    requestAnimationFrame(tick);
  };
  requestAnimationFrame(tick);
  bench.start = () => { bench.frames = []; bench.longTasks = []; bench.recording = true; };
  bench.stop = () => { bench.recording = false; return { frames: bench.frames, longTasks: bench.longTasks }; };
  new PerformanceObserver((list) => {
    if (bench.recording) for (const e of list.getEntries()) bench.longTasks.push(e.duration);
  }).observe({ type: "longtask" });
  const Native = window.WebSocket;
  window.WebSocket = class extends Native {
    constructor(...args) {
      super(...args);
      this.addEventListener("message", (m) => {
        const event = JSON.parse(m.data);
        if (event.type === "statuses") bench.statuses += event.statuses.length;
        else if (event.type === "status") bench.statuses += 1;
      });
    }
  };
})();"""

# Resolves after the frame that follows now has been rendered.
NEXT_FRAME = "() => new Promise((r) => requestAnimationFrame(() => setTimeout(r, 0)))"

SCROLL = """async (step) => {
  const wrap = document.getElementById("node-table-wrap");
  const frame = () => new Promise((r) => requestAnimationFrame(r));
  wrap.scrollTop = 0;
  await frame(); await frame();
  window.__bench.start();
  while (wrap.scrollTop + wrap.clientHeight < wrap.scrollHeight - 1) {
    wrap.scrollTop += step;
    await frame();
  }
  await frame();
  return window.__bench.stop();
}"""

# Time from an input's event to the end of the next frame, and the rows the table then has.
APPLY = """async ([selector, value, kind]) => {
  const input = document.querySelector(selector);
  const began = performance.now();
  input.value = value;
  input.dispatchEvent(new Event(kind, { bubbles: true }));
  await new Promise((r) => requestAnimationFrame(() => setTimeout(r, 0)));
  return [performance.now() - began, Number(document.getElementById("node-table").getAttribute("aria-rowcount")) - 1];
}"""

CLICK = """async (selector) => {
  const began = performance.now();
  document.querySelector(selector).click();
  await new Promise((r) => requestAnimationFrame(() => setTimeout(r, 0)));
  return performance.now() - began;
}"""

LOADED = """(count) => {
  const first = document.querySelector("#node-rows tr[data-node]");
  const table = document.getElementById("node-table");
  return first && first.getBoundingClientRect().height > 0
    && document.getElementById("node-count").textContent === `${count} up / ${count}`
    && table.getAttribute("aria-rowcount") === String(count + 1) ? performance.now() : false;
}"""

# Every row in sight shows a CPU figure (its status came).
STATUS_SHOWN = """() => {
  const wrap = document.getElementById("node-table-wrap"), box = wrap.getBoundingClientRect();
  const rows = [...document.querySelectorAll("#node-rows tr[data-node]")].filter((tr) => {
    const r = tr.getBoundingClientRect(); return r.top >= box.top && r.bottom <= box.bottom; });
  return rows.length > 0 && rows.every((tr) => /%$/.test(tr.querySelector(".col-cpu").textContent));
}"""


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def frames_summary(recorded: dict[str, list[float]]) -> dict[str, float]:
    frames, long_tasks = recorded["frames"], recorded["longTasks"]
    return {"frames": len(frames), "p50": percentile(frames, 0.5), "p99": percentile(frames, 0.99),
            "max": max(frames, default=float("nan")), "long_tasks": len(long_tasks),
            "long_ms": sum(long_tasks), "long_max": max(long_tasks, default=0.0)}


def main_thread(cdp: Any) -> tuple[float, float, float]:
    """The page's main-thread task seconds, script seconds, and the clock (CDP metrics)."""
    metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
    return metrics["TaskDuration"], metrics["ScriptDuration"], metrics["Timestamp"]


def start_controller(work: Path, secret_file: Path, pki: TestPki, specs: list[str],
                     health_interval: float) -> ControllerProcess:
    """A controller with the given static nodes and no discovery."""
    config = work / f"controller-{len(specs)}.toml"
    config.write_text(f"discovery = false\nnode = {json.dumps(specs)}\n")
    return ControllerProcess(secret_file, work, pam_service="login", pki=pki,
                             extra_args=["--config", str(config), "--health-interval",
                                         str(health_interval), "--log-level", "info"])


def all_checked(controller: ControllerProcess, token: str, count: int) -> bool:
    """Every node up with the facts of a health check (a static node is listed up, without
    facts or groups, before its first check)."""
    status, answer = call(controller, "GET", "/api/nodes", token=token)
    return status == 200 and sum(n["alive"] and "version" in n["txt"]
                                 for n in answer["nodes"]) == count


def measure(browser: Any, controller: ControllerProcess, token: str, count: int,
            status_seconds: float) -> dict[str, Any]:
    """One fresh page over `count` nodes: every figure the module's docstring lists."""
    context = browser.new_context(viewport=VIEWPORT,
                                  extra_http_headers={"Authorization": f"Bearer {token}"})
    context.add_init_script(INSTRUMENT)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        page.goto(controller.url + "/")
        load_ms = page.wait_for_function(LOADED, arg=count, polling="raf").json_value()
        if page.get_attribute("#view-table", "aria-pressed") != "true":
            page.click("#view-table")  # 50 nodes or fewer open as cards
        page.wait_for_function(STATUS_SHOWN, polling=100)
        cdp = context.new_cdp_session(page)
        cdp.send("Performance.enable")
        before = main_thread(cdp)
        page.evaluate("window.__bench.statuses = 0; window.__bench.start()")
        time.sleep(status_seconds)  # a window of the page's own life, measured in it
        status = frames_summary(page.evaluate("window.__bench.stop()"))
        after = main_thread(cdp)
        status["statuses_per_s"] = page.evaluate("window.__bench.statuses") / status_seconds
        status["busy_pct"] = 100 * (after[0] - before[0]) / (after[2] - before[2])
        status["script_pct"] = 100 * (after[1] - before[1]) / (after[2] - before[2])
        scroll = frames_summary(page.evaluate(SCROLL, 150))
        searches = []
        for value in SEARCHES:
            searches.append(page.evaluate(APPLY, ["#node-search", value, "input"])[0])
            page.evaluate(APPLY, ["#node-search", "", "input"])
        group_ms, grouped = page.evaluate(APPLY, ["#node-group", "rack3", "change"])
        assert grouped == len([i for i in range(count) if i % 10 == 3]), grouped
        page.evaluate(APPLY, ["#node-group", "", "change"])
        select_all = page.evaluate(CLICK, "#select-all")
        select_none = page.evaluate(CLICK, "#select-none")
        cdp.send("HeapProfiler.collectGarbage")
        metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
        elements = page.evaluate("document.getElementsByTagName('*').length")
        cards_ms = page.evaluate(CLICK, "#view-cards")
        cards_elements = page.evaluate("document.getElementsByTagName('*').length")
        return {"count": count, "load_ms": load_ms, "status": status, "scroll": scroll,
                "search_ms": statistics.median(searches), "group_ms": group_ms,
                "select_all_ms": select_all, "select_none_ms": select_none,
                "elements": elements, "dom_nodes": metrics.get("Nodes"),
                "heap_mib": metrics.get("JSHeapUsedSize", 0) / 2**20,
                "cards_ms": cards_ms, "cards_elements": cards_elements}
    finally:
        context.close()


def median_of(rows: list[dict[str, Any]], *path: str) -> float:
    values = []
    for row in rows:
        value: Any = row
        for key in path:
            value = value[key]
        values.append(float(value))
    return statistics.median(values)


def report(results: dict[int, list[dict[str, Any]]]) -> None:
    """Medians over the rounds, one column per count."""
    counts = sorted(results)
    lines = [("load: first rows and count final (ms)", ("load_ms",)),
             ("status window: frame p50 (ms)", ("status", "p50")),
             ("status window: frame p99 (ms)", ("status", "p99")),
             ("status window: frame max (ms)", ("status", "max")),
             ("status window: long tasks", ("status", "long_tasks")),
             ("status window: long-task ms", ("status", "long_ms")),
             ("status window: statuses/s", ("status", "statuses_per_s")),
             ("status window: main thread busy (%)", ("status", "busy_pct")),
             ("status window: script (%)", ("status", "script_pct")),
             ("scroll: frames", ("scroll", "frames")),
             ("scroll: frame p50 (ms)", ("scroll", "p50")),
             ("scroll: frame p99 (ms)", ("scroll", "p99")),
             ("scroll: frame max (ms)", ("scroll", "max")),
             ("scroll: long tasks", ("scroll", "long_tasks")),
             ("search applied (ms, median)", ("search_ms",)),
             ("group filter applied (ms)", ("group_ms",)),
             ("select all (ms)", ("select_all_ms",)),
             ("select none (ms)", ("select_none_ms",)),
             ("DOM elements", ("elements",)),
             ("DOM nodes (CDP)", ("dom_nodes",)),
             ("JS heap after GC (MiB)", ("heap_mib",)),
             ("switch to cards (ms)", ("cards_ms",)),
             ("DOM elements with the cards", ("cards_elements",))]
    print("| | " + " | ".join(f"{c} nodes" for c in counts) + " |")
    print("|---|" + "---|" * len(counts))
    for label, path in lines:
        print(f"| {label} | " + " | ".join(f"{median_of(results[c], *path):.1f}"
                                            for c in counts) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="100,1000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--health-interval", type=float, default=30.0)
    parser.add_argument("--status-seconds", type=float, default=6.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    counts = sorted(int(c) for c in args.counts.split(","))
    from playwright.sync_api import sync_playwright

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the daemons inherit it
    with tempfile.TemporaryDirectory(prefix="marco-bench-page-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        secret_file = create_secret(work / "secret")
        token = TokenSigner(load_secret(secret_file)).issue("pagebench")
        pki = TestPki(work / "pki")
        began = time.perf_counter()
        sims = SimulatorProcess(pki, secret_file, work, PREFIX, max(counts),
                                extra_args=["--no-announce", "--spread-groups",
                                            "--groups", ",".join(GROUPS)])
        specs = sims.static_nodes()
        controllers: dict[int, ControllerProcess] = {}
        results: dict[int, list[dict[str, Any]]] = {count: [] for count in counts}
        try:
            for count in counts:
                controllers[count] = start_controller(work, secret_file, pki, specs[:count],
                                                      args.health_interval)
            for count, controller in controllers.items():
                wait_for(lambda: all_checked(controller, token, count),  # noqa: B023 - waited here
                         180, f"{count} nodes up")
            print(f"{max(counts)} simulated agents and {len(counts)} controllers up in "
                  f"{time.perf_counter() - began:.1f} s", flush=True)
            with sync_playwright() as playwright:
                browser = launch(playwright, trust=pki.controller_cert)
                for count, controller in controllers.items():  # warm-up
                    measure(browser, controller, token, count, 1.0)
                for round_ in range(args.rounds):
                    for count, controller in controllers.items():
                        row = measure(browser, controller, token, count, args.status_seconds)
                        results[count].append(row)
                        print(f"round {round_ + 1}, {count} nodes: {json.dumps(row)}", flush=True)
                browser.close()
        finally:
            stop_all(list(controllers.values()))
            sims.stop()
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return 0


if __name__ == "__main__":
    sys.exit(main())
