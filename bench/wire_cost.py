"""What the wire format of `POST /v1/executions?wait=1` costs: binary vs JSON (issue 14, item 3).

Usage (as root, from the repo root): ``python3 bench/wire_cost.py [--runs 20] [--rounds 5]``

One real agent (mutual TLS, `--log-level warning`, this checkout) and a real Unix user made for
the bench. Two kept `AgentClient`s, one with the binary form (the default: stdin raw after a
JSON head, the answer's stdout and stderr raw) and one with `binary=False` (base64 in JSON both
ways), run the same calls; rounds alternate between them so drift hits both alike. Cases:

- `module`: `run(PIPELINED, stdin=<a real ansible-core `command` payload, ~173 KB>,
  runner=False)`, a cold pipelined module as the connection plugin sends it;
- `cat`: `run(["cat"], stdin=<the same payload>)`, the payload there and back without a Python
  start (the wire's share is larger);
- `output`: `run("head -c 5000000 /dev/zero")`, a 5 MB answer.

Reported per case and form: the median round's wall time per call, the client's CPU per call
(this process: it does nothing else) and the agent's own CPU per call (utime + stime from
/proc, without its reaped children's, which are the command's), and the request body's size.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from marco.agent_api import AgentRequests  # noqa: E402
from marco.client import AgentClient, ExecutionResult  # noqa: E402
from marco.tokens import TokenSigner, create_secret, load_secret  # noqa: E402
from tests.support.agent_process import AgentProcess  # noqa: E402
from tests.support.ansiballz_payloads import PIPELINED, module_payload  # noqa: E402
from tests.support.pki import TestPki  # noqa: E402
from tests.support.run import this_run  # noqa: E402
from tests.support.users import create_user, remove_user  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
FORMS = ("binary", "json")


def agent_cpu(pid: int) -> float:
    """Seconds of CPU the process itself used (utime + stime, not its children's)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


class Case:
    """One call, its check, and how many calls a round makes of it."""

    def __init__(self, name: str, call: Callable[[AgentClient], ExecutionResult],
                 check: Callable[[ExecutionResult], bool], runs: int,
                 request_bytes: Callable[[bool], int]) -> None:
        self.name, self.call, self.check, self.runs = name, call, check, runs
        self.request_bytes = request_bytes

    def round(self, client: AgentClient, agent_pid: int) -> tuple[float, float, float]:
        """(wall ms, client CPU ms, agent CPU ms) per call over `runs` calls."""
        self.once(client)  # warm: the connection exists before timing starts
        agent0, client0, wall0 = agent_cpu(agent_pid), time.process_time(), time.perf_counter()
        for _ in range(self.runs):
            self.once(client)
        wall, mine = time.perf_counter() - wall0, time.process_time() - client0
        agent = agent_cpu(agent_pid) - agent0
        return wall * 1000 / self.runs, mine * 1000 / self.runs, agent * 1000 / self.runs

    def once(self, client: AgentClient) -> None:
        result = self.call(client)
        if not self.check(result):
            raise SystemExit(f"{self.name} failed: rc {result.rc}, {result.stderr[-300:]!r}")


def cases(runs: int) -> list[Case]:
    payload = module_payload("command", {"_raw_params": "true"})

    def size(command: list[str] | str, stdin: bytes, **kwargs: object) -> Callable[[bool], int]:
        def measure(binary: bool) -> int:
            body = AgentRequests("t", binary=binary).run(command, stdin, **kwargs).body  # type: ignore[arg-type]
            return len(body or b"")
        return measure

    return [
        Case("module", lambda c: c.run(PIPELINED, stdin=payload, runner=False),
             lambda r: r.rc == 0 and b'"changed": true' in r.stdout, runs,
             size(PIPELINED, payload, runner=False)),
        Case("cat", lambda c: c.run(["cat"], stdin=payload),
             lambda r: r.rc == 0 and r.stdout == payload, runs * 5, size(["cat"], payload)),
        Case("output", lambda c: c.run("head -c 5000000 /dev/zero"),
             lambda r: r.rc == 0 and len(r.stdout) == 5_000_000, runs,
             size("head -c 5000000 /dev/zero", b"")),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="module calls per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per form")
    args = parser.parse_args()
    user = create_user(this_run().user("wirebench"))
    all_cases = cases(args.runs)
    times: dict[tuple[str, str], list[tuple[float, float, float]]] = {
        (case.name, form): [] for case in all_cases for form in FORMS}
    with tempfile.TemporaryDirectory(prefix="marco-wire-bench-", dir="/tmp") as tmp:
        work = Path(tmp)
        secret = create_secret(work / "secret")
        token = TokenSigner(load_secret(secret)).issue(user.name)
        agent = AgentProcess(secret, work / "state", node_name="bench", pki=TestPki(work / "pki"),
                             extra_args=["--log-level", "warning"])
        clients = {form: agent.client(token, timeout=120, binary=form == "binary")
                   for form in FORMS}
        try:
            for number in range(args.rounds):
                for case in all_cases:
                    order = FORMS if number % 2 == 0 else FORMS[::-1]
                    for form in order:
                        times[case.name, form].append(
                            case.round(clients[form], agent.process.pid))
                print(f"round {number + 1}: " + "  ".join(
                    f"{name}/{form} {t[-1][0]:.2f} ms" for (name, form), t in times.items()),
                    flush=True)
            assert clients["binary"].binary, "the agent refused the binary form"
        finally:
            for client in clients.values():
                client.close()
            agent.stop()
            remove_user(user.name)
    print(f"\n{args.rounds} interleaved rounds, medians per call "
          f"(module: {args.runs} calls a round, cat: {args.runs * 5}, output: {args.runs}):")
    print("| case | form | request bytes | wall ms | client CPU ms | agent CPU ms |")
    print("|---|---|---:|---:|---:|---:|")
    for case in all_cases:
        for form in FORMS:
            rounds = times[case.name, form]
            wall, mine, agent_ms = (statistics.median(r[i] for r in rounds) for i in range(3))
            print(f"| {case.name} | {form} | {case.request_bytes(form == 'binary')} | "
                  f"{wall:.2f} | {mine:.2f} | {agent_ms:.2f} |")


if __name__ == "__main__":
    main()
