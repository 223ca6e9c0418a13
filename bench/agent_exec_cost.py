"""Per-execution cost of the agent: `POST /v1/executions?wait=1` of `true`, before and after.

Usage (as root, from the repo root):
``python3 bench/agent_exec_cost.py --base SHA [--step SHA ...] [--new PATH] [--runs 200]
[--rounds 7]``

Real agents (mutual TLS, `--log-level warning`) run side by side: one from a git worktree of
`--base` (made under /tmp, removed afterwards), one per `--step` commit likewise (to see what
each change brings), one from `--new` (default: this checkout, as it is on disk). Each runs `python -m agent` with its own tree as the working directory, so
it imports its own `agent` and `marco`. One kept `AgentClient` per agent, as a real Unix user
made for the bench, runs `true` `--runs` times per round; rounds alternate between the agents
so drift hits both alike. Reported per agent: the median round's wall time per execution and
the agent's CPU time per execution (its own utime + stime from /proc, without the reaped
children's, which are the command's).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tests.support.daemon as daemon  # noqa: E402
from marco.tokens import TokenSigner, create_secret, load_secret  # noqa: E402
from tests.support.agent_process import AgentProcess  # noqa: E402
from tests.support.paths import ROOT  # noqa: E402
from tests.support.pki import TestPki  # noqa: E402
from tests.support.run import this_run  # noqa: E402
from tests.support.users import create_user, remove_user  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def agent_cpu(pid: int) -> float:
    """Seconds of CPU the process itself used (utime + stime, not its children's)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def start_agent(tree: Path, secret: Path, state: Path, name: str, pki: TestPki) -> AgentProcess:
    """An agent started from `tree`: DaemonProcess runs `python -m agent` with cwd=ROOT, so
    ROOT is pointed at the tree while it starts."""
    saved, daemon.ROOT = daemon.ROOT, tree
    try:
        return AgentProcess(secret, state, node_name=name, pki=pki,
                            extra_args=["--log-level", "warning"])
    finally:
        daemon.ROOT = saved


def one_round(agent: AgentProcess, token: str, runs: int) -> tuple[float, float]:
    """(wall ms, agent CPU ms) per execution over `runs` executions of `true`."""
    with agent.client(token, timeout=60) as client:
        client.run(["true"])  # the connection is made and kept before timing starts
        cpu0, wall0 = agent_cpu(agent.process.pid), time.perf_counter()
        for _ in range(runs):
            result = client.run(["true"])
            if result.rc != 0:
                raise SystemExit(f"true failed: {result}")
        wall, cpu = time.perf_counter() - wall0, agent_cpu(agent.process.pid) - cpu0
    return wall * 1000 / runs, cpu * 1000 / runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="commit of the agent before the changes")
    parser.add_argument("--step", nargs="*", default=[], help="commits in between, also run")
    parser.add_argument("--new", type=Path, default=ROOT, help="tree of the changed agent")
    parser.add_argument("--runs", type=int, default=200, help="executions per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds per agent")
    args = parser.parse_args()
    user = create_user(this_run().user("execbench"))
    with tempfile.TemporaryDirectory(prefix="marco-exec-bench-", dir="/tmp") as tmp:
        work = Path(tmp)
        trees = {"base": work / "agent-base",
                 **{commit[:7]: work / f"agent-{commit[:7]}" for commit in args.step}}
        for commit, tree in zip([args.base, *args.step], trees.values(), strict=True):
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree),
                            commit], check=True, capture_output=True)
        trees["new"] = args.new
        agents: dict[str, AgentProcess] = {}
        try:
            secret = create_secret(work / "secret")
            token = TokenSigner(load_secret(secret)).issue(user.name)
            pki = TestPki(work / "pki")
            for name, tree in trees.items():
                agents[name] = start_agent(tree, secret, work / name / "state", name, pki)
            times: dict[str, list[tuple[float, float]]] = {name: [] for name in agents}
            for number in range(args.rounds):
                for name, agent in agents.items():
                    times[name].append(one_round(agent, token, args.runs))
                print(f"round {number + 1}: " + "  ".join(
                    f"{name} {t[-1][0]:.2f} ms ({t[-1][1]:.2f} ms CPU)"
                    for name, t in times.items()), flush=True)
        finally:
            for agent in agents.values():
                agent.stop()
            for name, tree in trees.items():
                if name != "new":
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                    str(tree)], check=False)
            remove_user(user.name)
    wall = {name: statistics.median(w for w, _ in t) for name, t in times.items()}
    cpu = {name: statistics.median(c for _, c in t) for name, t in times.items()}
    print(f"\n{args.rounds} rounds of {args.runs} executions of `true`, medians per execution:")
    print("| agent | wall ms | agent CPU ms | wall / base | CPU / base |")
    print("|---|---:|---:|---:|---:|")
    for name in agents:
        print(f"| {name} | {wall[name]:.2f} | {cpu[name]:.2f} | "
              f"{wall[name] / wall['base']:.2f}x | {cpu[name] / cpu['base']:.2f}x |")


if __name__ == "__main__":
    main()
