"""Per-execution cost of the agent: `POST /v1/executions?wait=1` of `true`, before and after.

Usage (as root, from the repo root):
``python3 bench/agent_exec_cost.py --base SHA [--step SHA ...] [--new PATH] [--runs 200]
[--rounds 7] [--sequence true|copy]``

`--sequence copy` times what one Ansible `copy` task asks of a node instead of `true`: five
executions (`echo ~`, the remote tmp's mkdir, the pipelined stat module, the pipelined copy
module, `rm -rf` of the tmp) and one `PUT /v1/files` of the source, all over one connection.

Real agents (mutual TLS, `--log-level warning`) run side by side: one from a git worktree of
`--base` (made under /tmp, removed afterwards), one per `--step` commit likewise (to see what
each change brings), one from `--new` (default: this checkout, as it is on disk). Each runs `python -m agent` with its own tree as the working directory, so
it imports its own `agent` and `marco`. One kept `AgentClient` per agent, as a real Unix user
made for the bench, runs `true` `--runs` times per round; rounds alternate between the agents
so drift hits both alike. Reported per agent: the median round's wall time per execution and
the agent's CPU time per execution (its own utime + stime from /proc, without the reaped
children's, which are the command's) and its minor page faults per execution (after each fork
the agent's own first write to each page faults: the copy-on-write tax of forking it).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tests.support.daemon as daemon  # noqa: E402
from marco.client import AgentClient  # noqa: E402
from marco.tokens import TokenSigner, create_secret, load_secret  # noqa: E402
from tests.support.agent_process import AgentProcess  # noqa: E402
from tests.support.ansiballz_payloads import PIPELINED, module_payload  # noqa: E402
from tests.support.paths import ROOT  # noqa: E402
from tests.support.pki import TestPki  # noqa: E402
from tests.support.run import this_run  # noqa: E402
from tests.support.users import create_user, remove_user  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def agent_cpu(pid: int) -> float:
    """Seconds of CPU the process itself used (utime + stime, not its children's)."""
    return agent_usage(pid)[0]


def agent_usage(pid: int) -> tuple[float, int]:
    """(seconds of CPU, minor page faults) of the process itself, not its children's."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS, int(fields[7])


class CopyTask:
    """What one Ansible `copy` task of a small file asks of a node (pipelining on)."""

    executions = 5

    def __init__(self, home: str) -> None:
        self.tmp = f"{home}/.ansible/tmp/bench-copy"
        dest = f"{home}/bench-copy-dest"
        self.stat = module_payload("stat", {"path": dest, "get_checksum": True,
                                            "checksum_algorithm": "sha1"})
        self.copy = module_payload("copy", {"src": f"{self.tmp}/source", "dest": dest,
                                            "mode": "0644", "_original_basename": "source"})

    def run(self, client: AgentClient) -> None:
        for command, stdin in (
                ("/bin/sh -c 'echo ~ && sleep 0'", b""),
                (f"/bin/sh -c '( umask 77 && mkdir -p \"{self.tmp}\" ) && sleep 0'", b""),
                (PIPELINED, self.stat)):
            check(client.run(command, stdin=stdin))
        client.put_file(io.BytesIO(b"copied by the bench\n"), f"{self.tmp}/source")
        for command, stdin in ((PIPELINED, self.copy),
                               (f"/bin/sh -c 'rm -f -r {self.tmp}/ > /dev/null 2>&1 && sleep 0'",
                                b"")):
            check(client.run(command, stdin=stdin))


def check(result: object) -> None:
    if getattr(result, "rc", None) != 0:
        raise SystemExit(f"a bench step failed: {result}")


def start_agent(tree: Path, secret: Path, state: Path, name: str, pki: TestPki) -> AgentProcess:
    """An agent started from `tree`: DaemonProcess runs `python -m agent` with cwd=ROOT, so
    ROOT is pointed at the tree while it starts."""
    saved, daemon.ROOT = daemon.ROOT, tree
    try:
        return AgentProcess(secret, state, node_name=name, pki=pki,
                            extra_args=["--log-level", "warning"])
    finally:
        daemon.ROOT = saved


Sample = tuple[float, float, float]  # wall ms, agent CPU ms, agent minor faults: per unit


def one_round(agent: AgentProcess, token: str, runs: int, task: CopyTask | None) -> Sample:
    """Wall ms, agent CPU ms and agent minor faults per execution of `true` (with `task`: per
    copy task) over `runs` of them."""
    with agent.client(token, timeout=60) as client:
        # The connection is made and kept (and a runner warmed) before timing starts.
        if task is None:
            client.run(["true"])
        else:
            task.run(client)
        (cpu0, faults0), wall0 = agent_usage(agent.process.pid), time.perf_counter()
        for _ in range(runs):
            if task is None:
                check(client.run(["true"]))
            else:
                task.run(client)
        wall = time.perf_counter() - wall0
        cpu, faults = agent_usage(agent.process.pid)
    return wall * 1000 / runs, (cpu - cpu0) * 1000 / runs, (faults - faults0) / runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="commit of the agent before the changes")
    parser.add_argument("--step", nargs="*", default=[], help="commits in between, also run")
    parser.add_argument("--new", type=Path, default=ROOT, help="tree of the changed agent")
    parser.add_argument("--runs", type=int, default=200, help="executions per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds per agent")
    parser.add_argument("--sequence", choices=("true", "copy"), default="true",
                        help="what a run is: one `true`, or one copy task's requests")
    args = parser.parse_args()
    user = create_user(this_run().user("execbench"))
    task = CopyTask(user.home) if args.sequence == "copy" else None
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
            times: dict[str, list[Sample]] = {name: [] for name in agents}
            for number in range(args.rounds):
                for name, agent in agents.items():
                    times[name].append(one_round(agent, token, args.runs, task))
                print(f"round {number + 1}: " + "  ".join(
                    f"{name} {t[-1][0]:.2f} ms ({t[-1][1]:.2f} ms CPU, {t[-1][2]:.0f} faults)"
                    for name, t in times.items()), flush=True)
        finally:
            for agent in agents.values():
                agent.stop()
            for name, tree in trees.items():
                if name != "new":
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                    str(tree)], check=False)
            remove_user(user.name)
    wall, cpu, faults = ({name: statistics.median(sample[index] for sample in t)
                          for name, t in times.items()} for index in range(3))
    unit = "executions of `true`" if task is None else "copy tasks"
    print(f"\n{args.rounds} rounds of {args.runs} {unit}, medians per "
          f"{'execution' if task is None else 'task'}:")
    print("| agent | wall ms | agent CPU ms | agent minor faults | wall / base | CPU / base |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in agents:
        print(f"| {name} | {wall[name]:.2f} | {cpu[name]:.2f} | {faults[name]:.0f} | "
              f"{wall[name] / wall['base']:.2f}x | {cpu[name] / cpu['base']:.2f}x |")


if __name__ == "__main__":
    main()
