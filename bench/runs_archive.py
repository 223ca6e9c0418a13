"""What keeping a run's output costs the controller, and reading it back.

    sudo .venv/bin/python bench/runs_archive.py [--lines 1000000] [--rounds 3]

A real controller (HTTPS) and a real agent (mutual TLS, announced by zeroconf on loopback). Each
round is one `marco run`-style command run (`POST /api/run`) of `seq 1 LINES` on the agent; the
controller collects the output as the execution exits (docs/runs.md "Keeping output"). Measured
per round:

- CPU seconds of the controller process from the POST until the output is archived, against the
  agent's CPU seconds over the same window (it ran, spooled and served the same lines);
- the bytes the run takes in the store (its `bytes`: compressed chunks, events and row), against
  the raw output and the agent's spool files for the execution;
- reading every line back, 20,000 a call, through `GET /api/runs/ID/output` (from the store),
  against reading them from the agent itself (`GET /v1/executions/ID/output`), interleaved.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from marco.client import AgentClient  # noqa: E402
from marco.tokens import TokenSigner, create_secret, load_secret  # noqa: E402
from tests.support.agent_process import AgentProcess  # noqa: E402
from tests.support.controller_process import ControllerProcess  # noqa: E402
from tests.support.http import call  # noqa: E402
from tests.support.pki import TestPki  # noqa: E402

PAGE = 20_000
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def wait(what: str, check: Any, timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def archived(controller: ControllerProcess, token: str, run_id: str) -> list[dict[str, Any]]:
    """The run's executions once the run has ended and every one is archived, else []."""
    status, run = call(controller, "GET", f"/api/runs/{run_id}?limit=1", token=token)
    if status != 200 or run["ended"] is None:
        return []
    status, answer = call(controller, "GET", f"/api/runs/{run_id}/executions", token=token)
    executions = answer.get("executions", []) if status == 200 else []
    return executions if executions and all(e["archived"] for e in executions) else []


def read_from_store(controller: ControllerProcess, token: str, run_id: str,
                    execution_id: str) -> int:
    lines, since = 0, 0
    while True:
        status, page = call(controller, "GET", f"/api/runs/{run_id}/output?execution="
                            f"{execution_id}&since={since}&limit={PAGE}", token=token)
        assert status == 200, page
        lines += sum(len(e["lines"]) for e in page["events"])
        if page["end"] or page["next"] == since:
            return lines
        since = page["next"]


def read_from_agent(client: AgentClient, execution_id: str) -> int:
    lines, since = 0, 0
    while True:
        page = client.output(execution_id, since=since, limit=PAGE)
        lines += sum(len(e["lines"]) for e in page["events"])
        if not page["events"] or page["next"] <= since:
            return lines
        since = page["next"]


def run_bytes(state_dir: Path, run_id: str) -> int:
    with sqlite3.connect(f"file:{state_dir / 'runs.sqlite3'}?mode=ro", uri=True) as db:
        return int(db.execute("SELECT bytes FROM runs WHERE id = ?", (run_id,)).fetchone()[0])


def spool_bytes(agent_state: Path, execution_id: str) -> int:
    return sum(p.stat().st_size for p in agent_state.rglob("*")
               if p.is_file() and execution_id in str(p))


def one_round(controller: ControllerProcess, agent: AgentProcess, client: AgentClient,
              token: str, lines: int) -> dict[str, float]:
    before = cpu_seconds(controller.process.pid), cpu_seconds(agent.process.pid)
    status, answer = call(controller, "POST", "/api/run",
                          {"nodes": [agent.node_name], "command": f"seq 1 {lines}"}, token)
    assert status == 200, answer
    run_id = answer["run"]["id"]
    executions = wait("the output archived", lambda: archived(controller, token, run_id))
    after = cpu_seconds(controller.process.pid), cpu_seconds(agent.process.pid)
    execution_id = executions[0]["execution_id"]
    reads: dict[str, float] = {}
    for source in ("store", "agent"):
        began = time.perf_counter()
        got = (read_from_store(controller, token, run_id, execution_id) if source == "store"
               else read_from_agent(client, execution_id))
        reads[source] = time.perf_counter() - began
        assert got == lines, (source, got)
    return {"controller_cpu": after[0] - before[0], "agent_cpu": after[1] - before[1],
            "store_bytes": run_bytes(controller.state_dir, run_id),
            "spool_bytes": spool_bytes(agent.state_dir, execution_id),
            "read_store": reads["store"], "read_agent": reads["agent"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    user = getpass.getuser()
    with tempfile.TemporaryDirectory(prefix="marco-bench-archive-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        secret = create_secret(work / "secret")
        pki = TestPki(work / "pki")
        token = TokenSigner(load_secret(secret)).issue(user)
        controller = ControllerProcess(secret, work, pam_service="login", pki=pki)
        agent = AgentProcess(secret, work / "agent" / "state", node_name=f"bench{os.getpid()}",
                             extra_args=["--log-level", "warning"], announce=True, pki=pki)
        rows = []
        try:
            wait("the agent discovered", lambda: agent.node_name in controller.inventory_hosts(
                token), timeout=30)
            with agent.client(token, timeout=120) as client:
                for n in range(args.rounds):
                    rows.append(one_round(controller, agent, client, token, args.lines))
                    print(f"round {n + 1}: " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float)
                                                         else f"{k} {v}"
                                                         for k, v in rows[-1].items()),
                          flush=True)
        finally:
            agent.stop()
            controller.stop()
    med = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
    raw = sum(len(str(n)) + 1 for n in range(1, args.lines + 1))
    print(f"\n{args.lines} lines, median of {args.rounds} rounds")
    print("| measure | controller (store) | agent | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| CPU s, run to archived | {med['controller_cpu']:.2f} | {med['agent_cpu']:.2f} | "
          f"{med['controller_cpu'] / med['agent_cpu']:.2f}× |")
    print(f"| bytes kept (raw output {raw / 1e6:.1f} MB) | {med['store_bytes'] / 1e6:.2f} MB | "
          f"{med['spool_bytes'] / 1e6:.2f} MB | {med['store_bytes'] / med['spool_bytes']:.2f}× |")
    print(f"| read every line back, {PAGE} a call (s) | {med['read_store']:.2f} | "
          f"{med['read_agent']:.2f} | {med['read_store'] / med['read_agent']:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
