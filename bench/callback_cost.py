"""What the marco_runs callback costs a playbook: the same playbook with and without it.

    sudo .venv/bin/python bench/callback_cost.py [--tasks 40] [--hosts 4] [--rounds 5]

A real controller (HTTPS) and one real agent (mutual TLS) on loopback; the inventory names
the agent `--hosts` times, so each task gives that many results. The playbook is `--tasks` x
`command: /bin/true` through the marco connection. Three variants, interleaved round by round
so drift hits all alike: without the callback (`ANSIBLE_CALLBACKS_ENABLED=`), with it (the run
recorded on the controller), and with it while the controller cannot be reached (a bound,
non-listening port). "Without" uses a copy of playbooks/ansible.cfg with the callback left out,
so it is not even loaded. Wall time of `ansible-playbook`, median of the rounds; the cost per task
x host is the difference to the run without the callback divided by tasks x hosts.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from marco.tokens import TokenSigner, create_secret, load_secret  # noqa: E402
from tests.support.agent_process import AgentProcess  # noqa: E402
from tests.support.controller_process import ControllerProcess  # noqa: E402
from tests.support.pki import TestPki  # noqa: E402

BIN = Path(sys.executable).parent
VARIANTS = ("without", "with", "unreachable")


def write_inputs(work: Path, agent: AgentProcess, tasks: int, hosts: int) -> tuple[Path, Path]:
    """The playbook and an inventory naming the one agent `hosts` times."""
    play = work / "bench.yml"
    play.write_text("- hosts: all\n  gather_facts: false\n  tasks:\n"
                    + "".join(f"    - name: true {i}\n      ansible.builtin.command: /bin/true\n"
                              for i in range(tasks)))
    inventory = work / "hosts.json"
    inventory.write_text(json.dumps({"all": {"hosts": {f"h{i}": {
        "ansible_host": agent.host, "ansible_port": agent.port, "marco_node": agent.node_name,
        "ansible_connection": "marco.fleet.marco"} for i in range(hosts)}}}))
    return play, inventory


def config_without_callback(work: Path) -> Path:
    """playbooks/ansible.cfg without `callbacks_enabled` (ANSIBLE_COLLECTIONS_PATH, set for
    every variant, finds the collection)."""
    text = (ROOT / "playbooks" / "ansible.cfg").read_text()
    path = work / "ansible-without-callback.cfg"
    path.write_text("".join(line for line in text.splitlines(keepends=True)
                            if not line.startswith("callbacks_enabled")))
    return path


def timed_run(play: Path, inventory: Path, env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    out = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(inventory), str(play)],
                         env=env, cwd=ROOT / "playbooks", capture_output=True, text=True,
                         timeout=300)  # a hang (a deadlocked worker) is a failure
    elapsed = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"ansible-playbook failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
    return elapsed, out.stdout + out.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="marco-callback-bench-", dir="/var/tmp") as tmp, \
            socket.socket() as closed:
        work = Path(tmp)
        closed.bind(("127.0.0.1", 0))  # bound, never listening: every connection is refused
        secret = create_secret(work / "secret")
        pki = TestPki(work / "pki")
        controller = ControllerProcess(secret, work, pam_service="login", pki=pki,
                                       extra_args=["--no-discovery"])
        agent = AgentProcess(secret, work / "agent" / "state", node_name="bench",
                             extra_args=["--log-level", "warning"], pki=pki)
        play, inventory = write_inputs(work, agent, args.tasks, args.hosts)
        base = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
        base.update(MARCO_TOKEN=TokenSigner(load_secret(secret)).issue(getpass.getuser()),
                    ANSIBLE_CONFIG=str(ROOT / "playbooks" / "ansible.cfg"), ANSIBLE_FORKS="10",
                    ANSIBLE_COLLECTIONS_PATH=str(ROOT / "ansible_plugins"),
                    ANSIBLE_NOCOLOR="1", HOME=str(work), **pki.client_env())
        envs = {"without": {**base, "ANSIBLE_CONFIG": str(config_without_callback(work)),
                            "MARCO_CONTROLLER": controller.url},
                "with": {**base, "MARCO_CONTROLLER": controller.url},
                "unreachable": {**base, "MARCO_CONTROLLER":
                                f"https://127.0.0.1:{closed.getsockname()[1]}"}}
        times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        try:
            timed_run(play, inventory, envs["with"])  # warm caches (and check it records)
            for round_ in range(args.rounds):
                for variant in VARIANTS:
                    elapsed, output = timed_run(play, inventory, envs[variant])
                    recorded = "Marco run: " in output
                    if recorded != (variant == "with"):
                        raise SystemExit(f"{variant}: recorded={recorded}\n{output[-2000:]}")
                    times[variant].append(elapsed)
                print(f"round {round_ + 1}: " + "  ".join(
                    f"{v} {times[v][-1]:.2f}s" for v in VARIANTS), flush=True)
        finally:
            agent.stop()
            controller.stop()
    results = args.tasks * args.hosts
    medians = {variant: statistics.median(t) for variant, t in times.items()}
    print(f"\n{args.tasks} tasks x {args.hosts} hosts = {results} results, "
          f"median of {args.rounds} rounds\n")
    print("| variant | wall s | ratio to without | cost per task x host |")
    print("|---|---:|---:|---:|")
    for variant in VARIANTS:
        extra_ms = (medians[variant] - medians["without"]) / results * 1000
        print(f"| {variant} | {medians[variant]:.2f} | "
              f"{medians[variant] / medians['without']:.3f}x | {extra_ms:+.2f} ms |")


if __name__ == "__main__":
    main()
