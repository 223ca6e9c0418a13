"""100 real agents in network namespaces on one bridge (issue 15, item 1).

Usage (root, from the repo root, under the test lock):
``flock /tmp/marco-tests.lock .venv/bin/python bench/hundred_agents.py [--agents 100]
[--forks 50] [--stagger 0] [--listing-deadline 60] [--json FILE] [--no-playbook]``

N network namespaces on one bridge (tests/support/netns.py), a real controller alone in the
first one (out of reach of the root namespace's mDNS sockets), and one real `marco-agent` in
each of the others with its own certificate from the cluster CA, all N started at once (one
`Popen` after the other, no wait between; with `--stagger S`, one every S seconds). Agents not
listed within `--listing-deadline` are named, stopped and left out of what follows. Measured:

- per agent, from its process's start: serving (its log), announcing (its log), found by the
  controller (the controller's log), listed (seen in `/api/inventory`, polled every 50 ms):
  p50 and max;
- the mDNS packets sent: UDP datagrams out of every namespace (`/proc/PID/net/snmp` of a
  process in it; mDNS is their only UDP) from the start to all listed, and 2 s later; and
  the datagrams the controller's namespace received and dropped for a full socket buffer;
- each agent's RSS and CPU (user + system) once all are listed, and before the herd one agent
  started alone: its CPU to serving and to listed, and the CPU of importing `agent.__main__`;
- the page: one `/page-socket` watching all N nodes (the controller runs with
  `--page-max-nodes N`), time until it had a status of every node;
- one `ansible-playbook` (command + copy, no facts, `--forks`) across all N through the
  controller's inventory (playbooks/inventory.marco.yml, the `marco` connection), as a real
  user; then the same play with `-c local` against N aliases of localhost, in the same run:
  wall time, failed and unreachable hosts, the ratio.

Everything (processes, namespaces, bridge, the user) is removed at the end, on an error, on
Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import tornado.httpclient
import tornado.websocket

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from listing_time import log_times  # noqa: E402

from marco.tokens import TokenSigner, create_secret, load_secret  # noqa: E402
from tests.support.controller_process import ControllerProcess  # noqa: E402
from tests.support.netns import NamespaceHost, NamespaceNetwork  # noqa: E402
from tests.support.paths import BIN, PLAYBOOKS  # noqa: E402
from tests.support.pki import TestPki  # noqa: E402
from tests.support.run import RunNames, sweep_leftovers, this_run  # noqa: E402
from tests.support.users import UnixUser, create_user, remove_user  # noqa: E402

DEADLINE = 180.0  # seconds for all agents to be listed, or the page to see them, before failing
POLL = 0.05
PLAYBOOK_TIMEOUT = 900.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
PLAY = """- hosts: all
  gather_facts: false
  tasks:
    - command: /bin/true
    - copy:
        content: "{{ inventory_hostname }}\\n"
        dest: "{{ many_dir }}/{{ inventory_hostname }}.txt"
"""
RECAP = re.compile(r"^(\S+)\s+:\s+(ok=.*)$", re.M)


@dataclass
class Agent:
    """One agent process of the herd and its times (wall clock, from `began`)."""

    name: str
    host: NamespaceHost
    log: Path
    process: subprocess.Popen[bytes]
    began: float
    listed: float = 0.0


@dataclass
class Herd:
    """The bench's things, all removed by `close`."""

    work: Path
    run: RunNames
    network: NamespaceNetwork
    secret: Path
    pki: TestPki
    signer: TokenSigner
    user: UnixUser | None = None
    controller: ControllerProcess | None = None
    agents: list[Agent] = field(default_factory=list)

    def close(self) -> None:
        for agent in self.agents:
            if agent.process.poll() is None:
                agent.process.send_signal(signal.SIGTERM)
        for agent in self.agents:
            try:
                agent.process.wait(15)
            except subprocess.TimeoutExpired:
                agent.process.kill()
                agent.process.wait()
        if self.controller is not None:
            self.controller.stop()
        self.network.destroy()  # kills whatever is left in the namespaces
        if self.user is not None:
            remove_user(self.user.name)


def raise_on_sigterm() -> None:
    """SIGTERM ends the bench like Ctrl-C: through the `finally` that removes everything."""
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, handler)


def udp_counters(pid: int) -> dict[str, int]:
    """The UDP counters so far of the network namespace of process `pid` (its net/snmp)."""
    lines = [line.split() for line in Path(f"/proc/{pid}/net/snmp").read_text().splitlines()
             if line.startswith("Udp:")]
    header, values = lines[:2]
    return {key: int(value) for key, value in zip(header[1:], values[1:], strict=True)}


def udp_out(pid: int) -> int:
    """UDP datagrams sent so far from the network namespace of process `pid`."""
    return udp_counters(pid)["OutDatagrams"]


def udp_lost(pid: int) -> dict[str, int]:
    """Datagrams the namespace of `pid` received, and dropped for a full socket buffer."""
    counters = udp_counters(pid)
    return {"received": counters["InDatagrams"], "dropped_rcvbuf": counters["RcvbufErrors"],
            "errors": counters["InErrors"]}


def cpu_rss(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) and RSS in MiB of process `pid`."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE / 2**20
    return cpu, rss


def agent_args(herd: Herd, name: str, host: NamespaceHost) -> list[str]:
    state = herd.work / "agents" / name
    return ["ip", "netns", "exec", host.name, sys.executable, "-m", "agent",
            "--bind", host.address, "--port", "7370", "--secret-file", str(herd.secret),
            "--state-dir", str(state), "--node-name", name, "--log-level", "info",
            "--announce", "--groups", "many", *herd.pki.agent_args(name)]


def start_agent(herd: Herd, name: str, host: NamespaceHost) -> Agent:
    log = herd.work / "agents" / f"{name}.log"
    args = agent_args(herd, name, host)  # certificates issued before the clock starts
    began = time.time()
    process = subprocess.Popen(args, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    agent = Agent(name, host, log, process, began)
    herd.agents.append(agent)
    return agent


def inventory(herd: Herd, token: str) -> set[str]:
    assert herd.controller is not None
    return set(herd.controller.inventory_hosts(token))


def wait_listed(herd: Herd, names: set[str], token: str, deadline: float = DEADLINE,
                stop: threading.Event | None = None) -> dict[str, float]:
    """Poll /api/inventory until every name of `names` is in it, `deadline` seconds pass or
    `stop` is set: when each was first seen (wall clock)."""
    seen: dict[str, float] = {}
    ends = time.monotonic() + deadline
    while len(seen) < len(names) and time.monotonic() < ends:
        if stop is not None and stop.is_set():
            break
        now = time.time()
        for name in inventory(herd, token) & names - set(seen):
            seen[name] = now
        for agent in list(herd.agents):  # the herd grows while this polls
            if agent.name in names and agent.process.poll() is not None:
                raise RuntimeError(f"agent {agent.name} exited: {agent.log.read_text()[-2000:]}")
        time.sleep(POLL)
    return seen


def import_cpu(samples: int = 5) -> float:
    """Median CPU seconds of a fresh Python importing agent.__main__ (all the agent's imports)."""
    costs = []
    for _ in range(samples):
        before = os.times()
        subprocess.run([sys.executable, "-c", "import agent.__main__"], cwd=ROOT, check=True)
        after = os.times()
        costs.append(after.children_user + after.children_system
                     - before.children_user - before.children_system)
    return statistics.median(costs)


def solo(herd: Herd, token: str) -> dict[str, float]:
    """One agent started alone (in the last namespace, of its own): CPU at serving and at
    listed, wall time to listed."""
    agent = start_agent(herd, f"solo-{herd.run.tag}", herd.network.hosts[-1])
    deadline = time.monotonic() + DEADLINE
    while not log_times(agent.log, r"serving node"):
        if time.monotonic() > deadline or agent.process.poll() is not None:
            raise RuntimeError(f"the solo agent did not serve: {agent.log.read_text()[-2000:]}")
        time.sleep(0.01)
    at_serving, _ = cpu_rss(agent.process.pid)
    seen = wait_listed(herd, {agent.name}, token)
    if agent.name not in seen:
        raise RuntimeError(f"the solo agent was not listed within {DEADLINE} s")
    agent.listed = seen[agent.name]
    at_listed, rss = cpu_rss(agent.process.pid)
    agent.process.send_signal(signal.SIGTERM)
    agent.process.wait(15)
    herd.agents.remove(agent)
    deadline = time.monotonic() + DEADLINE
    while agent.name in inventory(herd, token):
        if time.monotonic() > deadline:
            raise RuntimeError("the solo agent did not leave the inventory")
        time.sleep(POLL)
    return {"cpu_to_serving_s": at_serving, "cpu_to_listed_s": at_listed,
            "to_listed_s": agent.listed - agent.began, "rss_mib": rss}


def summary(values: list[float]) -> dict[str, float]:
    finite = [v for v in values if v == v]  # NaN: a step whose log line was not found
    if not finite:
        return {"p50": float("nan"), "max": float("nan"), "missing": len(values)}
    return {"p50": round(statistics.median(finite), 3), "max": round(max(finite), 3),
            "missing": len(values) - len(finite)}


def steps(herd: Herd, agents: list[Agent]) -> dict[str, dict[str, float]]:
    """Start → serving, announcing, found by the controller, listed: p50 and max."""
    assert herd.controller is not None
    controller_log = herd.controller.log_path
    found_lines = controller_log.read_text(errors="replace")

    def first(times: list[float], agent: Agent) -> float:
        return times[0] - agent.began if times else float("nan")

    result = {"serving": [], "announcing": [], "found": [], "listed": []}  # type: dict[str, list[float]]
    for agent in agents:
        result["serving"].append(first(log_times(agent.log, r"serving node"), agent))
        result["announcing"].append(first(log_times(agent.log, r"announcing "), agent))
        found = (log_times(controller_log, rf"node {re.escape(agent.name)} found at")
                 if f"node {agent.name} found at" in found_lines else [])
        result["found"].append(found[-1] - agent.began if found else float("nan"))
        result["listed"].append(agent.listed - agent.began)
    return {key: summary(values) for key, values in result.items()}


async def page_sees_all(herd: Herd, token: str, names: list[str]) -> float:
    """Seconds until one page socket watching every node had a status of each."""
    assert herd.controller is not None
    request = tornado.httpclient.HTTPRequest(
        f"{herd.controller.ws_url}/page-socket", headers={"Authorization": f"Bearer {token}"},
        ssl_options=herd.controller.ssl_context, connect_timeout=60, request_timeout=60)
    began = time.monotonic()
    ws = await tornado.websocket.websocket_connect(request, max_message_size=64 << 20)
    try:
        for name in names:
            await ws.write_message(json.dumps({"type": "watch", "node": name}))
        seen: set[str] = set()
        while len(seen) < len(names):
            left = DEADLINE - (time.monotonic() - began)
            message = await asyncio.wait_for(ws.read_message(), max(left, 0.1))
            if message is None:
                raise RuntimeError(f"the page socket closed: {ws.close_code} {ws.close_reason}")
            event = json.loads(message)
            if event.get("type") == "error":
                raise RuntimeError(f"the page socket refused: {event}")
            for one in event["statuses"] if event.get("type") == "statuses" else [event]:
                if one.get("type") == "status":
                    seen.add(one["node"])
        return time.monotonic() - began
    finally:
        ws.close()


def recap(output: str) -> dict[str, dict[str, int]]:
    return {host: {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", fields)}
            for host, fields in RECAP.findall(output)}


def playbook(herd: Herd, token: str, forks: int, local: int = 0) -> dict[str, Any]:
    """The play across the controller's inventory, or (`local` > 0) `-c local` against that
    many aliases of localhost: wall time, hosts ok, failed, unreachable."""
    assert herd.controller is not None and herd.user is not None
    home = herd.work / "ansible-home"
    home.mkdir(exist_ok=True)
    play = herd.work / "many.yml"
    play.write_text(PLAY)
    env = {"PATH": f"{BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
           "MARCO_CONTROLLER": herd.controller.url, "MARCO_TOKEN": token,
           "ANSIBLE_CONFIG": str(PLAYBOOKS / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
           **herd.pki.client_env()}
    args = [str(BIN / "ansible-playbook"), str(play), "--forks", str(forks)]
    if local:
        target = herd.work / "local-out"
        target.mkdir(exist_ok=True)
        hosts = herd.work / "local-hosts.ini"
        hosts.write_text("".join(f"l{i} ansible_connection=local\n" for i in range(1, local + 1)))
        args += ["-i", str(hosts), "-c", "local", "-e", f"many_dir={target}"]
    else:
        target = Path(herd.user.home) / f"many-{herd.run.tag}"
        subprocess.run(["install", "-d", "-o", herd.user.name, str(target)], check=True)
        args += ["-e", f"many_dir={target}"]
    began = time.monotonic()
    out = subprocess.run(args, cwd=PLAYBOOKS, env=env, capture_output=True, text=True,
                         timeout=PLAYBOOK_TIMEOUT)
    wall = time.monotonic() - began
    (herd.work / f"playbook-{'local' if local else 'marco'}.log").write_text(out.stdout + out.stderr)
    hosts_recap = recap(out.stdout)
    return {"wall_s": round(wall, 2), "rc": out.returncode, "hosts": len(hosts_recap),
            "ok_hosts": sum(1 for r in hosts_recap.values()
                            if not r.get("failed") and not r.get("unreachable")),
            "failed": sum(r.get("failed", 0) for r in hosts_recap.values()),
            "unreachable": sum(r.get("unreachable", 0) for r in hosts_recap.values()),
            "files": len(list(target.glob("*.txt")))}


def herd_phase(herd: Herd, count: int, token: str, deadline: float,
               stagger: float = 0.0) -> dict[str, Any]:
    """Start `count` agents at once (or one every `stagger` seconds); their steps, mDNS packets, CPU and RSS once all are listed
    (or `deadline` passed: those not listed by then are named and left out of what follows)."""
    assert herd.controller is not None
    controller_pid = herd.controller.process.pid
    controller_before, lost_before = udp_out(controller_pid), udp_lost(controller_pid)
    hosts = herd.network.hosts[1:count + 1]
    names = [f"m{index}-{herd.run.tag}" for index in range(1, count + 1)]
    for name in names:
        herd.pki.agent_bundle(name)  # issued before the clock starts
    load_before = os.getloadavg()[0]
    agents: list[Agent] = []
    stop = threading.Event()
    with ThreadPoolExecutor(1) as pool:  # polls while the agents start
        polling = pool.submit(wait_listed, herd, set(names), token, deadline, stop)
        try:
            for name, host in zip(names, hosts, strict=True):
                agents.append(start_agent(herd, name, host))
                time.sleep(stagger)  # pacing the starts, when asked: not waiting for anything
        finally:
            spawned = time.time() - agents[0].began if agents else 0.0
            if len(agents) < count:  # a start failed: the poller stops too
                stop.set()
        seen = polling.result()
    listed: list[Agent] = []
    unlisted: list[Agent] = []
    for agent in agents:
        agent.listed = seen.get(agent.name, 0.0)
        (listed if agent.listed else unlisted).append(agent)
    all_listed = max(agent.listed for agent in listed) - agents[0].began
    usage = [cpu_rss(agent.process.pid) for agent in agents]
    # Fresh namespaces count from 0: what an agent's namespace sent is all the agent sent.
    packets_to_listed = sum(udp_out(agent.process.pid) for agent in agents)
    controller_to_listed = udp_out(controller_pid) - controller_before
    time.sleep(2.0)  # the repeated announcements count for the round
    packets_round = sum(udp_out(agent.process.pid) for agent in agents)
    controller_round = udp_out(controller_pid) - controller_before
    lost = udp_lost(controller_pid)
    for agent in unlisted:  # left out of the page and the playbook
        agent.process.send_signal(signal.SIGTERM)
        agent.process.wait(15)
    return {
        "agents": count, "stagger_s": stagger, "listed": len(listed), "unlisted": sorted(a.name for a in unlisted),
        "spawn_all_s": round(spawned, 3), "load_before": load_before,
        "first_start_to_last_listed_s": round(all_listed, 3),
        "steps_from_start_s": steps(herd, listed),
        "mdns_packets_to_last_listed": {"agents": packets_to_listed,
                                        "controller": controller_to_listed},
        "mdns_packets_plus_2s": {"agents": packets_round, "controller": controller_round},
        "controller_udp_in": {key: lost[key] - lost_before[key] for key in lost},
        "agent_cpu_s": {**summary([cpu for cpu, _ in usage]),
                        "sum": round(sum(cpu for cpu, _ in usage), 2)},
        "agent_rss_mib": {**summary([rss for _, rss in usage]),
                          "sum": round(sum(rss for _, rss in usage), 1)},
        "controller_cpu_rss": cpu_rss(controller_pid),
    }


def bench(herd: Herd, options: argparse.Namespace) -> dict[str, Any]:
    began = time.monotonic()
    herd.network.create()
    created = time.monotonic() - began
    herd.user = create_user(herd.run.user("many"))
    host = herd.network.hosts[0]
    herd.controller = ControllerProcess(
        herd.secret, herd.work, pam_service="login", bind=host.address,
        mdns_interfaces=[host.address], pki=herd.pki, netns=host.name,
        extra_args=["--log-level", "info", "--health-interval", "2",
                    "--page-max-nodes", str(max(options.agents, 64)),
                    "--discovery-receive-buffer", str(options.receive_buffer)])
    token = herd.signer.issue(herd.user.name)
    results: dict[str, Any] = {"namespaces_created_s": round(created, 1),
                               "import_cpu_s": round(import_cpu(), 3),
                               "solo": solo(herd, token)}
    results["herd"] = herd_phase(herd, options.agents, token, options.listing_deadline,
                                 options.stagger)
    print(json.dumps(results, indent=2), file=sys.stderr)
    names = [agent.name for agent in herd.agents if agent.process.poll() is None]
    results["page_all_statuses_s"] = round(asyncio.run(page_sees_all(herd, token, names)), 2)
    if not options.no_playbook:
        marco = playbook(herd, token, options.forks)
        local = playbook(herd, token, options.forks, local=len(names))
        results["playbook"] = {"marco": marco, "local": local,
                               "ratio": round(marco["wall_s"] / local["wall_s"], 2)}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=100)
    parser.add_argument("--forks", type=int, default=50)
    parser.add_argument("--listing-deadline", type=float, default=60.0,
                        help="seconds for the herd to be listed; the rest are left out")
    parser.add_argument("--stagger", type=float, default=0.0,
                        help="seconds between two agents' starts (default 0: all at once)")
    parser.add_argument("--no-playbook", action="store_true")
    parser.add_argument("--receive-buffer", type=int, default=4 * 1024 * 1024,
                        help="the controller's --discovery-receive-buffer (0: the system's)")
    parser.add_argument("--json", type=Path)
    options = parser.parse_args()
    if os.geteuid() != 0:
        print("hundred_agents.py needs root (network namespaces, a Unix user)", file=sys.stderr)
        return 2
    if not 1 <= options.agents <= 230:
        print("--agents: 1 to 230 (one /24 for the bridge)", file=sys.stderr)
        return 2
    raise_on_sigterm()
    sweep_leftovers()
    run = this_run()
    work = Path(tempfile.mkdtemp(prefix="hundred-agents-"))
    os.chmod(work, 0o755)
    (work / "agents").mkdir()
    network = NamespaceNetwork(options.agents + 2, run, network=0)
    secret = work / "secret"
    create_secret(secret)
    pki = TestPki(work / "pki", controller_names=(network.hosts[0].address,))
    herd = Herd(work, run, network, secret, pki, TokenSigner(load_secret(secret)))
    try:
        results = bench(herd, options)
    finally:
        herd.close()
        print(f"logs in {work}", file=sys.stderr)
    print(json.dumps(results, indent=2))
    if options.json:
        options.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
