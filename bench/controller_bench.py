"""Controller benchmarks: discovery time, /api/inventory latency, deploy fan-out and memory.

    sudo .venv/bin/python bench/controller_bench.py [--size-mb 100] [--agents 10]

- Discovery: from `Popen(marco-agent)` to the node's presence in /api/inventory (real agents,
  real zeroconf on loopback), median of several starts.
- Inventory latency at 1 and 100 nodes (100 lightweight health responders registered as static
  nodes, so the registry holds 100 live nodes), against the controller's cheapest endpoint
  in the same run.
- Fan-out: one file PUT to /api/deploy for N real agents, against writing N local copies of the
  same file in the same run (the floor: the same bytes hit the same disk), plus the
  controller's peak RSS (VmHWM) for two file sizes, each in a fresh controller process.
"""

from __future__ import annotations

import argparse
import getpass
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from marco.tokens import TokenSigner, create_secret, load_secret  # noqa: E402
from tests.support.agent_process import AgentProcess  # noqa: E402
from tests.support.controller_process import ControllerProcess  # noqa: E402
from tests.support.pki import TestPki  # noqa: E402

RESPONDERS = r"""
import asyncio, sys, tornado.httpserver, tornado.netutil, tornado.web
from marco.tokens import health_proof, load_secret
KEY = load_secret(sys.argv[2])[-1]
class Health(tornado.web.RequestHandler):
    def get(self):
        facts = {"node": "fake", "version": "0.1.0", "proto": 1, "os": "linux"}
        challenge = self.get_query_argument("challenge", None)
        if challenge:  # like a real agent: prove we hold the cluster secret
            facts["proof"] = health_proof(KEY, challenge, "fake")
        self.write(facts)
async def main():
    ports = []
    for _ in range(int(sys.argv[1])):
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
        tornado.httpserver.HTTPServer(tornado.web.Application([(r"/v1/health", Health)])).add_sockets(sockets)
        ports.append(sockets[0].getsockname()[1])
    print(" ".join(map(str, ports)), flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def wait_until(predicate, what: str, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"benchmark stuck: {what} did not happen within {timeout:.0f} s")
        time.sleep(0.02)


def get(controller: ControllerProcess, path: str, token: str) -> tuple[float, bytes]:
    conn = controller.connection(timeout=30)
    started = time.perf_counter()
    conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
    body = conn.getresponse().read()
    elapsed = time.perf_counter() - started
    conn.close()
    return elapsed, body


def latency_ms(controller: ControllerProcess, path: str, token: str, count: int = 300) -> tuple[float, float]:
    samples = sorted(get(controller, path, token)[0] * 1000 for _ in range(count))
    return statistics.median(samples), samples[int(0.99 * len(samples)) - 1]


def discovery(secret: Path, work: Path, controller: ControllerProcess, token: str, runs: int,
              pki: TestPki) -> list[float]:
    times = []
    for run in range(runs):
        name = f"bench-disc-{os.getpid()}-{run}"
        started = time.perf_counter()
        agent = AgentProcess(secret, work / f"disc{run}" / "state", node_name=name, announce=True,
                             pki=pki)
        wait_until(lambda: name in json.loads(get(controller, "/api/inventory", token)[1])["_meta"]["hostvars"],
                   f"{name} in the inventory")
        times.append(time.perf_counter() - started)
        agent.stop()
    return times


def inventory_scaling(secret: Path, work: Path, token: str) -> dict[str, tuple[float, float]]:
    responders = subprocess.Popen([sys.executable, "-c", RESPONDERS, "100", str(secret)],
                                  stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert responders.stdout is not None
    ports = [int(port) for port in responders.stdout.readline().split()]
    results = {}
    try:
        for count in (1, 100):
            nodes = [arg for port in ports[:count] for arg in ("--node", f"n{port}=127.0.0.1:{port}")]
            controller = ControllerProcess(secret, work, extra_args=["--no-discovery", *nodes])
            try:
                wait_until(lambda: len(json.loads(get(controller, "/api/inventory", token)[1])
                                       ["_meta"]["hostvars"]) >= count, f"{count} nodes up")
                results[f"/api/inventory, {count} node(s)"] = latency_ms(controller, "/api/inventory", token)
                if count == 100:
                    results["/api/session (baseline)"] = latency_ms(controller, "/api/session", token)
            finally:
                controller.stop()
    finally:
        responders.kill()
    return results


def deploy(controller: ControllerProcess, nodes: list[str], source: Path, folder: Path, token: str) -> float:
    query = urllib.parse.urlencode({"nodes": ",".join(nodes), "folder": str(folder), "name": "payload"})
    conn = http.client.HTTPSConnection(controller.host, controller.port, timeout=600,
                                       blocksize=1024 * 1024, context=controller.ssl_context)
    started = time.perf_counter()
    with open(source, "rb") as body:
        conn.request("PUT", f"/api/deploy?{query}", body=body,
                     headers={"Authorization": f"Bearer {token}",
                              "Content-Length": str(source.stat().st_size)})
        reply = json.loads(conn.getresponse().read())
    elapsed = time.perf_counter() - started
    assert all(r["ok"] for r in reply["results"].values()), reply
    return elapsed


def local_copies(source: Path, folder: Path, count: int) -> float:
    started = time.perf_counter()
    for index in range(count):
        target = folder / f"copy{index}"
        shutil.copyfile(source, target)
        with open(target, "rb+") as handle:
            os.fsync(handle.fileno())  # the agents fsync too
    return time.perf_counter() - started


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and of its reaped children (the file helpers)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fanout(secret: Path, work: Path, token: str, agents_count: int, size_mb: int, runs: int,
           pki: TestPki) -> dict[str, object]:
    agents = [AgentProcess(secret, work / f"fan{i}" / "state", node_name=f"fan{i}", pki=pki)
              for i in range(agents_count)]
    nodes = [arg for a in agents for arg in ("--node", f"{a.node_name}={a.host}:{a.port}")]
    out: dict[str, object] = {}
    try:
        for mb in (size_mb // 10, size_mb):
            source = work / f"source-{mb}"
            with open(source, "wb") as handle:
                for _ in range(mb):
                    handle.write(os.urandom(1024 * 1024))
            folder = work / f"deployed-{mb}"
            folder.mkdir(exist_ok=True)
            controller = ControllerProcess(secret, work, extra_args=["--no-discovery", *nodes],
                                           pki=pki)
            try:
                wait_until(lambda: len(json.loads(get(controller, "/api/inventory", token)[1])
                                       ["_meta"]["hostvars"]) >= agents_count, "agents up")
                rss_before = peak_rss_mb(controller.process.pid)
                cpu_before = (cpu_seconds(controller.process.pid),
                              sum(cpu_seconds(a.process.pid) for a in agents))
                marco = [deploy(controller, [a.node_name for a in agents], source, folder, token)
                         for _ in range(runs)]
                cpu_controller = (cpu_seconds(controller.process.pid) - cpu_before[0]) / runs
                cpu_agents = (sum(cpu_seconds(a.process.pid) for a in agents) - cpu_before[1]) / runs
                local = [local_copies(source, folder, agents_count) for _ in range(runs)]
                out[f"{mb} MB"] = {"marco_s": statistics.median(marco), "local_s": statistics.median(local),
                                   "rss_start_mb": rss_before,
                                   "rss_peak_mb": peak_rss_mb(controller.process.pid),
                                   "cpu_controller_s": cpu_controller, "cpu_agents_s": cpu_agents}
            finally:
                controller.stop()
            shutil.rmtree(folder)
            source.unlink()
    finally:
        for agent in agents:
            agent.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    user = getpass.getuser()
    with tempfile.TemporaryDirectory(prefix="marco-bench-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        secret = create_secret(work / "secret")
        token = TokenSigner(load_secret(secret)).issue(user)
        pki = TestPki(work / "pki")

        controller = ControllerProcess(secret, work, pki=pki)
        try:
            times = discovery(secret, work, controller, token, 5, pki)
        finally:
            controller.stop()
        print("## Discovery\n")
        print(f"agent start -> in /api/inventory: median {statistics.median(times):.2f} s, "
              f"max {max(times):.2f} s over {len(times)} starts (target <= 2 s)\n")

        print("## /api/inventory latency (controller in --dev mode: the 100 fake agents speak "
              "plain HTTP, and a TLS handshake per request would hide what is measured)\n")
        print("| endpoint | p50 ms | p99 ms |\n|---|---:|---:|")
        for label, (p50, p99) in inventory_scaling(secret, work, token).items():
            print(f"| {label} | {p50:.2f} | {p99:.2f} |")

        print(f"\n## Deploy fan-out to {args.agents} agents (median of {args.runs})\n")
        print("| file | marco /api/deploy s | local copies s | ratio | controller RSS start -> peak MB "
              "| CPU s per deploy: controller / agents+helpers |")
        print("|---|---:|---:|---:|---:|---:|")
        for label, r in fanout(secret, work, token, args.agents, args.size_mb, args.runs,
                               pki).items():
            ratio = r["marco_s"] / r["local_s"]  # type: ignore[operator]
            print(f"| {label} | {r['marco_s']:.2f} | {r['local_s']:.2f} | {ratio:.2f}x | "
                  f"{r['rss_start_mb']:.0f} -> {r['rss_peak_mb']:.0f} | "
                  f"{r['cpu_controller_s']:.2f} / {r['cpu_agents_s']:.2f} |")


if __name__ == "__main__":
    main()
