"""What the Ansible connection pays per task to reach an agent (issue 14, item 4).

Usage (as root, from the repo root): ``python3 bench/connection_cost.py [--runs 200] [--rounds 7]``

One real agent (mutual TLS, `--log-level warning`, this checkout) and a real Unix user made
for the bench. Each "task" runs `true` the way an Ansible task's connection would:

- `direct`: a new `ClientTls` and `AgentClient` (so a new SSLContext, TCP connection and TLS
  handshake), one `run`, `close` — the connection plugin without the mux;
- `kept`: one `run` over an `AgentClient` kept across tasks (the floor);
- `mux`: a new `MuxClient` (Unix socket connect + greeting) to a running marco-mux that keeps
  the agent connection, one `run`, `close` — the plugin with the mux.

Rounds alternate between the three so drift hits all alike. Reported: the median round's wall
time per task and the agent's own CPU time per task (utime + stime from /proc, without its
reaped children's, which are the command's).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from marco.client import AgentClient  # noqa: E402
from marco.mux_client import MuxClient  # noqa: E402
from marco.tls import ClientTls  # noqa: E402
from marco.tokens import TokenSigner, create_secret, load_secret  # noqa: E402
from tests.support.agent_process import AgentProcess  # noqa: E402
from tests.support.pki import TestPki  # noqa: E402
from tests.support.run import this_run  # noqa: E402
from tests.support.users import create_user, remove_user  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def agent_cpu(pid: int) -> float:
    """Seconds of CPU the process itself used (utime + stime, not its children's)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


class Ways:
    """The three ways a task reaches the agent, each a callable running one task."""

    def __init__(self, agent: AgentProcess, token: str, environ: dict[str, str]) -> None:
        self.agent, self.token, self.environ = agent, token, environ
        assert agent.tls is not None
        self.files = (agent.tls.ca_file, agent.tls.cert_file, agent.tls.key_file,
                      agent.tls.crl_file)
        self.kept = AgentClient(agent.host, agent.port, token, node=agent.node_name,
                                tls=ClientTls(*self.files))
        self.mux_pid: int | None = None

    def direct(self) -> None:
        with AgentClient(self.agent.host, self.agent.port, self.token, node=self.agent.node_name,
                         tls=ClientTls(*self.files)) as client:
            check(client.run(["true"]).rc)

    def kept_run(self) -> None:
        check(self.kept.run(["true"]).rc)

    def mux(self) -> None:
        with MuxClient.open(self.agent.host, self.agent.port, self.token,
                            tls=ClientTls(*self.files), node=self.agent.node_name,
                            environ=self.environ) as client:
            check(client.run(["true"]).rc)
            self.mux_pid = client.pid


def check(rc: int | None) -> None:
    if rc != 0:
        raise SystemExit(f"true failed: rc {rc}")


def one_round(agent: AgentProcess, task: Callable[[], None], runs: int) -> tuple[float, float]:
    """(wall ms, agent CPU ms) per task over `runs` tasks."""
    task()  # warm: a kept connection or the mux exists before timing starts
    cpu0, wall0 = agent_cpu(agent.process.pid), time.perf_counter()
    for _ in range(runs):
        task()
    wall, cpu = time.perf_counter() - wall0, agent_cpu(agent.process.pid) - cpu0
    return wall * 1000 / runs, cpu * 1000 / runs


def stop_mux(pid: int | None) -> None:
    """The bench's mux, told to go (it would exit idle on its own)."""
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="tasks per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds per way")
    args = parser.parse_args()
    user = create_user(this_run().user("connbench"))
    with tempfile.TemporaryDirectory(prefix="marco-conn-bench-", dir="/tmp") as tmp:
        work = Path(tmp)
        runtime = work / "run"
        runtime.mkdir(mode=0o700)
        environ = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
        secret = create_secret(work / "secret")
        token = TokenSigner(load_secret(secret)).issue(user.name)
        agent = AgentProcess(secret, work / "state", node_name="bench", pki=TestPki(work / "pki"),
                             extra_args=["--log-level", "warning"])
        ways = Ways(agent, token, environ)
        tasks = {"direct": ways.direct, "kept": ways.kept_run, "mux": ways.mux}
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in tasks}
        try:
            for number in range(args.rounds):
                for name, task in tasks.items():
                    times[name].append(one_round(agent, task, args.runs))
                print(f"round {number + 1}: " + "  ".join(
                    f"{name} {t[-1][0]:.2f} ms ({t[-1][1]:.2f} ms CPU)"
                    for name, t in times.items()), flush=True)
        finally:
            ways.kept.close()
            stop_mux(ways.mux_pid)
            agent.stop()
            remove_user(user.name)
    wall = {name: statistics.median(w for w, _ in t) for name, t in times.items()}
    cpu = {name: statistics.median(c for _, c in t) for name, t in times.items()}
    print(f"\n{args.rounds} rounds of {args.runs} tasks running `true`, medians per task:")
    print("| way | wall ms | agent CPU ms | wall - kept |")
    print("|---|---:|---:|---:|")
    for name in tasks:
        print(f"| {name} | {wall[name]:.2f} | {cpu[name]:.2f} | "
              f"{wall[name] - wall['kept']:+.2f} |")


if __name__ == "__main__":
    main()
