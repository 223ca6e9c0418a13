"""Time from an agent process's start to its node in the controller's /api/inventory.

Usage (root, from the repo root, under the test lock):
``flock /tmp/marco-tests.lock python3 bench/listing_time.py [--agents 1 10] [--rounds 5]
[--old 2e027ef]``

A controller and K agents (K from `--agents`), each in a network namespace of its own on one
bridge (tests/support/netns.py), each agent a real `marco-agent` with its own certificate. Each
round starts the K agents at once and polls the controller's /api/inventory every 10 ms until all
are listed; the agents then stop (SIGTERM: goodbyes) and are waited out of the inventory. With
`--old COMMIT` the same rounds run, interleaved, against that commit (a git worktree in /tmp),
its controller and agents on a network of their own.

Reported per version and K: p50 and max of start-to-listed over all agents of all rounds, the
steps of that time read from the daemons' logs (start to serving, serving to announcing with
the name check, announcing to listed by the controller, listed to seen by the poller), and the
mDNS packets sent (UDP datagrams out of the agents' and the controller's namespaces, from each
namespace's /proc/net/snmp: mDNS is their only UDP) from the start to all listed, and over the
whole round.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from marco.tls import server_trust_context  # noqa: E402
from marco.tokens import TokenSigner, create_secret, load_secret  # noqa: E402
from tests.support.netns import NamespaceNetwork  # noqa: E402
from tests.support.pki import TestPki  # noqa: E402
from tests.support.run import RunNames, sweep_leftovers, this_run  # noqa: E402

DEADLINE = 30.0  # seconds for any agent to be listed, or to leave, before the round fails
POLL = 0.01
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


@dataclass
class Version:
    """One code base under test: its tree, network, controller, token."""

    label: str
    tree: Path
    network: NamespaceNetwork
    work: Path
    controller: subprocess.Popen[bytes] | None = None
    api: http.client.HTTPSConnection | None = None
    samples: dict[int, list[dict[str, float]]] = field(default_factory=dict)


def ns_udp_out(namespace: str) -> int:
    """UDP datagrams sent from `namespace` so far (Udp OutDatagrams of its /proc/net/snmp)."""
    text = subprocess.run(["ip", "netns", "exec", namespace, "cat", "/proc/net/snmp"],
                          check=True, capture_output=True, text=True).stdout
    header, values = [line.split() for line in text.splitlines() if line.startswith("Udp:")][:2]
    return int(values[header.index("OutDatagrams")])


def log_times(path: Path, pattern: str) -> list[float]:
    """Wall-clock times of the log lines matching `pattern` (the daemons log local time)."""
    times = []
    for line in path.read_text(errors="replace").splitlines():
        match = LOG_TIME.match(line)
        if match and re.search(pattern, line):
            stamp = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
            times.append(stamp.timestamp())
    return times


def start_controller(version: Version, secret: Path, pki: TestPki) -> None:
    """The controller in the network's first namespace; its API reached over the bridge."""
    host = version.network.hosts[0]
    state = version.work / "controller-state"
    args = ["ip", "netns", "exec", host.name, sys.executable, "-m", "controller",
            "--bind", host.address, "--port", "7380", "--mdns-interface", host.address,
            "--secret-file", str(secret), "--state-dir", str(state), "--pki-dir", str(pki.dir),
            "--log-level", "info"]
    log = open(version.work / "controller.log", "wb")
    version.controller = subprocess.Popen(args, cwd=version.tree, stdout=log,
                                          stderr=subprocess.STDOUT)
    context = server_trust_context(str(pki.ca_file))
    deadline = time.monotonic() + DEADLINE
    while True:
        try:
            api = http.client.HTTPSConnection(host.address, 7380, timeout=5, context=context)
            api.request("GET", "/login")
            api.getresponse().read()
            version.api = api
            return
        except OSError:
            if time.monotonic() > deadline or version.controller.poll() is not None:
                raise RuntimeError(f"{version.label} controller did not start") from None
            time.sleep(0.05)


def listed(version: Version, token: str) -> set[str]:
    assert version.api is not None
    version.api.request("GET", "/api/inventory", headers={"Authorization": f"Bearer {token}"})
    response = version.api.getresponse()
    body = response.read()
    if response.status != 200:
        raise RuntimeError(f"/api/inventory answered {response.status}: {body[:200]!r}")
    return set(json.loads(body)["_meta"]["hostvars"])


def one_round(version: Version, count: int, round_no: int, secret: Path, pki: TestPki,
              token: str) -> None:
    """Start `count` agents at once, time each to listed, stop them, wait them out."""
    hosts = version.network.hosts[1:count + 1]
    names = [f"lt{index + 1}" for index in range(count)]
    for name in names:
        pki.agent_bundle(name)  # issued before the clock starts
    counted = [version.network.hosts[0].name, *(host.name for host in hosts)]
    before = {ns: ns_udp_out(ns) for ns in counted}
    agents: dict[str, tuple[subprocess.Popen[bytes], float, Path]] = {}
    for name, host in zip(names, hosts, strict=True):
        state = version.work / f"r{round_no}-k{count}-{name}"
        log_path = state.with_suffix(".log")
        args = ["ip", "netns", "exec", host.name, sys.executable, "-m", "agent",
                "--bind", host.address, "--port", "7370", "--secret-file", str(secret),
                "--state-dir", str(state), "--node-name", name, "--log-level", "info",
                "--announce", *pki.agent_args(name)]
        began = time.time()
        process = subprocess.Popen(args, cwd=version.tree, stdout=open(log_path, "wb"),
                                   stderr=subprocess.STDOUT)
        agents[name] = (process, began, log_path)
    seen: dict[str, float] = {}
    deadline = time.monotonic() + DEADLINE
    while len(seen) < count:
        now = time.time()
        for name in listed(version, token) & set(names) - set(seen):
            seen[name] = now
        if time.monotonic() > deadline:
            raise RuntimeError(f"{version.label}: {sorted(set(names) - set(seen))} not listed")
        time.sleep(POLL)
    at_listed = {ns: ns_udp_out(ns) for ns in counted}
    time.sleep(2.0)  # the rest of the announcements (zeroconf repeats them) count for the round
    at_end = {ns: ns_udp_out(ns) for ns in counted}
    for process, _, _ in agents.values():
        process.send_signal(signal.SIGTERM)
    for process, _, _ in agents.values():
        process.wait(DEADLINE)
    deadline = time.monotonic() + DEADLINE
    while listed(version, token) & set(names):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{version.label}: agents did not leave the inventory")
        time.sleep(0.05)
    controller_log = version.work / "controller.log"
    sample_round: list[dict[str, float]] = []
    for name, (_, began, log_path) in agents.items():
        serving = log_times(log_path, r"serving node")
        announcing = log_times(log_path, r"announcing ")
        found = log_times(controller_log, rf"node {name} found at")
        sample_round.append({
            "total": seen[name] - began,
            "serving": serving[0] - began if serving else float("nan"),
            "announcing": announcing[0] - began if announcing else float("nan"),
            "found": found[-1] - began if found else float("nan"),
        })
    agent_ns, controller_ns = counted[1:], counted[0]
    sample_round[0].update({
        "mdns_agents_to_listed": sum(at_listed[ns] - before[ns] for ns in agent_ns),
        "mdns_controller_to_listed": at_listed[controller_ns] - before[controller_ns],
        "mdns_agents_round": sum(at_end[ns] - before[ns] for ns in agent_ns),
        "mdns_controller_round": at_end[controller_ns] - before[controller_ns],
    })
    version.samples.setdefault(count, []).extend(sample_round)


def report(versions: list[Version], rounds: int) -> None:
    """One Markdown table: a row per version and K."""
    print("| version | K | agents timed | start→listed p50 | max | start→serving p50 | "
          "start→announcing p50 | start→controller listed p50 | mDNS pkts to listed "
          "(agents+controller, per round) | mDNS pkts per round (+2 s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for version in versions:
        for count, samples in sorted(version.samples.items()):
            def p50(key: str) -> float:
                return statistics.median(s[key] for s in samples)
            packets = [s for s in samples if "mdns_agents_to_listed" in s]
            to_listed = statistics.median(s["mdns_agents_to_listed"] + s["mdns_controller_to_listed"]
                                          for s in packets)
            whole = statistics.median(s["mdns_agents_round"] + s["mdns_controller_round"]
                                      for s in packets)
            agents_part = statistics.median(s["mdns_agents_round"] for s in packets)
            print(f"| {version.label} | {count} | {len(samples)} | {p50('total'):.3f} s | "
                  f"{max(s['total'] for s in samples):.3f} s | {p50('serving'):.3f} s | "
                  f"{p50('announcing'):.3f} s | {p50('found'):.3f} s | {to_listed:.0f} | "
                  f"{whole:.0f} (agents {agents_part:.0f}) |")
    print(f"\n{rounds} rounds; times from each agent process's start (Popen). 'announcing' is "
          "the agent's log line: the new code logs it as the first announcement goes out, the "
          "old one after its three announcements (~0.45 s later).")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--old", default="", help="a commit to compare with (a git worktree)")
    options = parser.parse_args()
    if os.geteuid() != 0:
        print("listing_time.py needs root (network namespaces)", file=sys.stderr)
        return 2
    sweep_leftovers()
    run: RunNames = this_run()
    work = Path(tempfile.mkdtemp(prefix="listing-time-"))
    os.chmod(work, 0o755)
    trees = [("new", ROOT)]
    worktree = None
    if options.old:
        worktree = Path(tempfile.mkdtemp(prefix="listing-old-"))
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree),
                        options.old], check=True, capture_output=True)
        trees.insert(0, (f"old {options.old}", worktree))
    most = max(options.agents)
    versions = [Version(label, tree, NamespaceNetwork(most + 1, run, network=index),
                        work / f"v{index}") for index, (label, tree) in enumerate(trees)]
    secret = work / "secret"
    create_secret(secret)
    token = TokenSigner(load_secret(secret)).issue("root")
    pki = TestPki(work / "pki", controller_names=tuple(
        v.network.hosts[0].address for v in versions))
    try:
        for version in versions:
            version.work.mkdir()
            version.network.create()
            start_controller(version, secret, pki)
        for round_no in range(options.rounds):
            for count in options.agents:
                for version in versions:
                    one_round(version, count, round_no, secret, pki, token)
        report(versions, options.rounds)
    finally:
        for version in versions:
            if version.controller is not None:
                version.controller.send_signal(signal.SIGTERM)
                version.controller.wait(DEADLINE)
            version.network.destroy()
        if worktree is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(worktree)], check=False, capture_output=True)
        print(f"logs in {work}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
