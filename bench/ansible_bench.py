"""Ansible through `local`, `ssh`, Mitogen and Marco, all in the same run, transports interleaved.

    sudo .venv/bin/python bench/ansible_bench.py [--nodes 1 10] [--runs 3] [--json FILE] [--quick]
    .venv/bin/python bench/ansible_bench.py --tables FILE     # the tables of a saved --json

Playbooks: 30 x `command: /bin/true`, 30 x `copy`, one task printing 200,000 lines. Nodes are
inventory hosts on this machine. Transports, round-robin within each round (the order turns by
one each round, so no transport always follows the same one):
- `local`: N `local` hosts;
- `ssh`: pipelining, ControlMaster=auto, ControlPersist=60s, to an sshd the bench starts on
  loopback (127.0.0.1..N, one address per node, so each node gets its own connection) with a
  throwaway host key and client key, logging in as root with HOME set (sshd `SetEnv`) to a
  throwaway home whose `.bashrc` and `.profile` are empty: a real one (pyenv init here) costs
  ~145 ms per ssh command, which is not what is measured;
- `mitogen`: strategy `mitogen_linear` of the installed `mitogen` (`pip install -e .[bench]`)
  over that same sshd and inventory;
- `marco`: N agents on loopback ports serving mutual TLS, as installed;
- `marco (runner off)`: the same agents with `-e marco_runner=false`.
Each run starts cold: a fresh ControlPath directory, its masters told to exit after the run,
and the sshd's sessions gone before the next run. PYTHONUNBUFFERED is unset for every
transport alike. Wall time, median of the runs, ratios to `local` and to Mitogen, ms per task;
CPU seconds of ansible-playbook and everything it started (its rusage), of the node side (the
sshd's sessions; the agents, the commands they reaped and their module runners from /proc),
and the agents' and runners' RSS. Needs root and openssh-server (installed by apt if missing).
"""

from __future__ import annotations

import argparse
import getpass
import importlib.metadata
import importlib.util
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from marco.tokens import TokenSigner, create_secret, load_secret  # noqa: E402
from tests.support.agent_process import AgentProcess  # noqa: E402
from tests.support.pki import TestPki  # noqa: E402
from tests.support.waiting import wait_for  # noqa: E402

BIN = Path(sys.executable).parent
TASKS = 30
TRANSPORTS = ("local", "ssh", "mitogen", "marco", "marco (runner off)")
PLAYBOOK_TIMEOUT = 3600.0  # seconds: a run that hangs ends the bench instead of the session
RSS_INTERVAL = 0.25  # seconds between two RSS samples (the sampler runs during every run alike)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MB = 1024 * 1024


@dataclass(frozen=True)
class Playbook:
    name: str
    path: Path
    tasks: int  # tasks per host: overhead per task is divided by this


def playbooks(work: Path) -> dict[str, Playbook]:
    """cmd30, copy30 (and its directory task), seq200k (the task and its check)."""
    books = {
        "cmd30": ("30 x command", "    - command: /bin/true\n" * TASKS, TASKS),
        "copy30": ("30 x copy",
                   "    - file: path=~/marco-bench state=directory\n" + "".join(
                       f"    - copy: content='file {i}\\n' dest=~/marco-bench/{{{{ inventory_hostname }}}}-{i}\n"
                       for i in range(TASKS)), TASKS + 1),
        "seq200k": ("200k lines", "    - shell: seq 1 200000\n      register: out\n"
                    "    - assert: {that: out.stdout_lines | length == 200000}\n", 2),
    }
    out = {}
    for key, (name, tasks, count) in books.items():
        path = work / f"{key}.yml"
        path.write_text(f"- hosts: all\n  gather_facts: false\n  tasks:\n{tasks}")
        out[key] = Playbook(name, path, count)
    return out


def free_port() -> int:
    """A port free now on 127.0.0.1: sshd cannot report one it picked, so it may be taken
    before sshd binds it (rare; the bench can be run again)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def node_address(i: int) -> str:
    """Node i's own loopback address: Mitogen and ssh's ControlPath key a connection by address,
    so aliases of one address would share one connection."""
    return f"127.0.0.{i + 1}"


class Sshd:
    """An sshd on loopback for root, with a fresh host key and client key; sessions get HOME set
    to a throwaway home with an empty .bashrc and .profile (sshd's SetEnv overrides HOME)."""

    def __init__(self, work: Path, nodes: int) -> None:
        if not Path("/usr/sbin/sshd").exists():
            subprocess.run(["apt-get", "install", "-y", "-qq", "openssh-server", "openssh-client"],
                           check=True, stdout=subprocess.DEVNULL,
                           env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        self.dir = work / "ssh"
        self.home = self.dir / "home"
        self.home.mkdir(parents=True)
        for rc in (".bashrc", ".profile"):
            (self.home / rc).write_text("")
        self.port = free_port()
        self.key = self.dir / "client_key"
        for key in (self.dir / "host_key", self.key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        authorized = self.dir / "authorized_keys"
        authorized.write_text((self.dir / "client_key.pub").read_text())
        authorized.chmod(0o600)
        listen = "".join(f"ListenAddress {node_address(i)}\n" for i in range(nodes))
        config = self.dir / "sshd_config"
        config.write_text(f"Port {self.port}\n{listen}HostKey {self.dir / 'host_key'}\n"
                          f"AuthorizedKeysFile {authorized}\nPermitRootLogin prohibit-password\n"
                          "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                          "UsePAM no\nStrictModes no\nPrintMotd no\nUseDNS no\n"
                          f"SetEnv HOME={self.home}\n"
                          f"PidFile {self.dir / 'sshd.pid'}\nMaxStartups 100\nMaxSessions 100\n")
        Path("/run/sshd").mkdir(exist_ok=True)
        self.process = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", str(config),
                                         "-E", str(self.dir / "sshd.log")])
        for i in range(nodes):
            wait_for(lambda: self.accepts(node_address(i)), 10, f"sshd on {node_address(i)}")

    def accepts(self, address: str) -> bool:
        if self.process.poll() is not None:
            raise SystemExit(f"sshd exited: {(self.dir / 'sshd.log').read_text()[-2000:]}")
        try:
            socket.create_connection((address, self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def ssh(self, command: str) -> subprocess.CompletedProcess[str]:
        """`command` over a plain ssh connection (no multiplexing) to the first node."""
        return subprocess.run(["ssh", "-p", str(self.port), "-i", str(self.key), "-o", "BatchMode=yes",
                               "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                               "-o", "LogLevel=error", f"root@{node_address(0)}", command],
                              capture_output=True, text=True, timeout=30)

    def check_empty_rc(self) -> str:
        """What a login runs before a command: `$0`, aliases, HOME and PATH as the session sees
        them; fails unless HOME is the throwaway home and no alias or pyenv came in."""
        out = self.ssh('echo "shell=$0"; alias; echo "HOME=$HOME"; echo "PATH=$PATH"')
        lines = out.stdout.splitlines()
        if (out.returncode != 0 or f"HOME={self.home}" not in lines or "pyenv" in out.stdout
                or any(line.startswith("alias ") for line in lines)):
            raise SystemExit(f"the ssh login does not run with an empty rc:\n{out.stdout}{out.stderr}")
        started = time.perf_counter()
        self.ssh("true")
        return (" / ".join(lines) + f"; `ssh true` without multiplexing: "
                f"{(time.perf_counter() - started) * 1000:.0f} ms")

    def sessions(self) -> list[int]:
        """Pids of the sshd's children: one per open connection."""
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in path.read_text().split()]

    def settle(self, control_dir: Path) -> None:
        """Tell the run's ControlPersist masters to exit and wait until the sshd has reaped every
        session (so its CPU is counted and the next run starts cold)."""
        for sock in control_dir.glob("*"):
            subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "marco-bench"],
                           capture_output=True, timeout=30)
        try:
            wait_for(lambda: not self.sessions(), 30, "the sshd's sessions to end")
        except AssertionError as error:
            print(f"warning: {error}; sessions left: {self.sessions()}", file=sys.stderr)

    def cpu(self) -> float:
        """CPU seconds of the sshd and of the sessions it reaped."""
        own, children = cpu_seconds(self.process.pid) or (0.0, 0.0)
        return own + children

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def cpu_seconds(pid: int) -> tuple[float, float] | None:
    """(own, reaped children's) CPU seconds of `pid` from /proc/PID/stat; None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # fields[0] is stat's field 3 (state)
    utime, stime, cutime, cstime = (int(value) for value in fields[11:15])  # fields 14-17
    return (utime + stime) / CLOCK_TICKS, (cutime + cstime) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """VmRSS of `pid` in bytes; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakRss:
    """The highest RSS each pid reaches while a playbook runs, sampled in a thread (every run,
    whatever its transport, so the sampling's own cost hits all alike)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.peak = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            for pid in self.pids:
                self.peak[pid] = max(self.peak[pid], rss_bytes(pid))
            if self._stop.wait(RSS_INTERVAL):
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class NodeSnapshot:
    """The agents' and their module runners' CPU at one moment (taken outside the timed run)."""

    agents: dict[int, tuple[float, float]]  # agent pid -> (own, reaped children's) CPU s
    runners: dict[int, dict[str, Any]]  # runner pid -> its /v1/status entry + "cpu" (own + children)


class Agents:
    """The marco agents of the bench, and what they and their runners use."""

    def __init__(self, agents: list[AgentProcess], token: str) -> None:
        self.agents, self.token = agents, token

    @property
    def pids(self) -> list[int]:
        return [agent.process.pid for agent in self.agents]

    def snapshot(self) -> NodeSnapshot:
        agents = {pid: cpu_seconds(pid) or (0.0, 0.0) for pid in self.pids}
        runners: dict[int, dict[str, Any]] = {}
        for agent in self.agents:
            for entry in agent.client(self.token).status().get("runners") or []:
                pid = int(entry["pid"])
                own, children = cpu_seconds(pid) or (0.0, 0.0)
                runners[pid] = dict(entry, cpu=own + children, node=agent.node_name)
        return NodeSnapshot(agents, runners)

    def usage(self, before: NodeSnapshot, after: NodeSnapshot, peak: PeakRss) -> dict[str, Any]:
        """What the agents and runners used between two snapshots: CPU seconds (a runner that
        was not there before counts from zero; one that quit meanwhile is in its agent's reaped
        children), peak agent RSS, runners' RSS after the run."""
        runners = []
        for pid, entry in after.runners.items():
            earlier = before.runners.get(pid, {}).get("cpu", 0.0)
            # RSS from /proc (the status entry's own "rss" is kept as reported, unit its own).
            runners.append({"node": entry["node"], "pid": pid, "user": entry.get("user"),
                            "cpu_s": round(entry["cpu"] - earlier, 3),
                            "rss_mb": round(rss_bytes(pid) / MB, 1), "status_rss": entry.get("rss"),
                            "tasks": entry.get("tasks")})
        return {
            "agent_cpu_s": round(sum(after.agents[p][0] - before.agents[p][0] for p in self.pids), 3),
            "exec_cpu_s": round(sum(after.agents[p][1] - before.agents[p][1] for p in self.pids), 3),
            "runner_cpu_s": round(sum(r["cpu_s"] for r in runners), 3),
            "agent_rss_mb": round(max(peak.peak[p] for p in self.pids) / MB, 1),
            "runners": len(runners),
            "runner_rss_mb": round(sum(r["rss_mb"] for r in runners), 1),
            "runner_list": runners,
        }


@dataclass(frozen=True)
class Transport:
    name: str
    inventory: str  # local, ssh or marco
    env: dict[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()


def transports(names: list[str]) -> list[Transport]:
    """The transports asked for; Mitogen's strategy from the installed mitogen package."""
    known = {"local": Transport("local", "local"), "ssh": Transport("ssh", "ssh"),
             "marco": Transport("marco", "marco"),
             "marco (runner off)": Transport("marco (runner off)", "marco",
                                             args=("-e", "marco_runner=false"))}
    if "mitogen" in names:
        spec = importlib.util.find_spec("ansible_mitogen")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("mitogen is not installed: .venv/bin/pip install -e '.[bench]'")
        strategy = Path(list(spec.submodule_search_locations)[0]) / "plugins" / "strategy"
        known["mitogen"] = Transport("mitogen", "ssh", env={
            "ANSIBLE_STRATEGY_PLUGINS": str(strategy), "ANSIBLE_STRATEGY": "mitogen_linear"})
    return [known[name] for name in names]


def inventory(work: Path, kind: str, nodes: int, agents: list[AgentProcess], sshd: Sshd | None) -> Path:
    path = work / f"{kind}-{nodes}.ini"
    if path.exists():
        return path
    lines = []
    for i in range(nodes):
        if kind == "marco":  # mutual TLS, as installed
            agent = agents[i]
            lines.append(f"m{i} ansible_connection=marco.fleet.marco ansible_host=127.0.0.1 "
                         f"ansible_port={agent.port} marco_node={agent.node_name}")
        elif kind == "ssh":
            assert sshd is not None
            lines.append(f"s{i} ansible_connection=ssh ansible_host={node_address(i)} "
                         f"ansible_port={sshd.port} ansible_user=root "
                         f"ansible_ssh_private_key_file={sshd.key}")
        else:
            lines.append(f"l{i} ansible_connection=local")
    path.write_text("[all:vars]\nansible_python_interpreter=/usr/bin/python3\n"
                    + "\n".join(["[all]"] + lines) + "\n")
    return path


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Bench:
    """One bench: its agents, its sshd, its environment; `run` times one playbook run."""

    def __init__(self, work: Path, env: dict[str, str], agents: Agents, sshd: Sshd | None) -> None:
        self.work, self.env, self.agents, self.sshd = work, env, agents, sshd
        self.runs = 0

    def run(self, book: Playbook, transport: Transport, nodes: int) -> dict[str, Any]:
        """Seconds of one ansible-playbook run, its CPU, and the node side's CPU and RSS."""
        self.runs += 1
        hosts = inventory(self.work, transport.inventory, nodes, self.agents.agents, self.sshd)
        control = self.work / "cp" / str(self.runs)  # a fresh ControlPath dir: every run starts cold
        control.mkdir(parents=True)
        # ... and a fresh runtime dir, so marco's kept-connection mux starts cold as well (its
        # first tasks go direct while it starts), as ssh's ControlPersist master does.
        runtime = self.work / "xdg" / str(self.runs)
        runtime.mkdir(mode=0o700, parents=True)
        env = dict(self.env, ANSIBLE_SSH_CONTROL_PATH_DIR=str(control),
                   XDG_RUNTIME_DIR=str(runtime), **transport.env)
        node_before = self.agents.snapshot() if transport.inventory == "marco" else None
        sshd_before = self.sshd.cpu() if self.sshd else 0.0
        cpu_before = children_cpu()
        with PeakRss(self.agents.pids) as peak:
            started = time.perf_counter()
            out = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(hosts), *transport.args,
                                  str(book.path)], cwd=ROOT / "playbooks", env=env,
                                 capture_output=True, text=True, timeout=PLAYBOOK_TIMEOUT)
            seconds = time.perf_counter() - started
        result: dict[str, Any] = {"seconds": round(seconds, 3),
                                  "ansible_cpu_s": round(children_cpu() - cpu_before, 3)}
        if transport.inventory == "ssh" and self.sshd is not None:
            self.sshd.settle(control)
            result["node_cpu_s"] = round(self.sshd.cpu() - sshd_before, 3)
        if node_before is not None:
            usage = self.agents.usage(node_before, self.agents.snapshot(), peak)
            result["marco"] = usage
            result["node_cpu_s"] = round(usage["agent_cpu_s"] + usage["exec_cpu_s"]
                                         + usage["runner_cpu_s"], 3)
        if out.returncode != 0:
            logs = "".join(f"\n--- {agent.node_name}'s log, last lines:\n" + "\n".join(
                agent.log().splitlines()[-30:]) for agent in self.agents.agents[:nodes]
                if transport.inventory == "marco")  # the work dir and its logs go at exit
            raise SystemExit(f"{book.name} over {transport.name}, {nodes} node(s) failed:\n"
                             f"{out.stdout[-3000:]}{out.stderr[-2000:]}{logs}")
        return result


def median_of(runs: list[dict[str, Any]], key: str, sub: str | None = None) -> float | None:
    values = [(r[sub] if sub else r).get(key) for r in runs if sub is None or sub in r]
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def summarise(book: Playbook, nodes: int, cell: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One entry per transport: median seconds, ratios, ms per task, CPU, RSS."""
    medians = {name: statistics.median(r["seconds"] for r in runs) for name, runs in cell.items()}
    local, mitogen = medians.get("local"), medians.get("mitogen")
    out = []
    for name, runs in cell.items():
        seconds = medians[name]
        entry: dict[str, Any] = {
            "playbook": book.name, "key": book.path.stem, "nodes": nodes, "tasks": book.tasks,
            "transport": name, "runs": [r["seconds"] for r in runs], "seconds": round(seconds, 3),
            "vs_local": round(seconds / local, 3) if local else None,
            "vs_mitogen": round(seconds / mitogen, 3) if mitogen else None,
            "ms_per_task": round(seconds / book.tasks * 1000, 1),
            "overhead_ms_per_task": round((seconds - local) / book.tasks * 1000, 1) if local else None,
            "ansible_cpu_s": median_of(runs, "ansible_cpu_s"),
            "node_cpu_s": median_of(runs, "node_cpu_s"),
        }
        if any("marco" in r for r in runs):
            entry["marco"] = {key: median_of(runs, key, "marco") for key in (
                "agent_cpu_s", "exec_cpu_s", "runner_cpu_s", "agent_rss_mb", "runners", "runner_rss_mb")}
            entry["marco"]["runner_list"] = runs[-1]["marco"]["runner_list"]
        out.append(entry)
    return out


def ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def number(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def tables(results: list[dict[str, Any]], names: list[str]) -> str:
    """The markdown tables for bench/README.md."""
    cells: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for entry in results:
        cells.setdefault((entry["playbook"], entry["nodes"]), {})[entry["transport"]] = entry
    others = [n for n in names if n != "local"]
    lines = ["| playbook | nodes | local s | " + " | ".join(others) + " |",
             "|---|---:|---:|" + "---:|" * len(others)]
    for (book, nodes), row in cells.items():
        local = row.get("local", {}).get("seconds")
        lines.append(f"| {book} | {nodes} | {number(local)} | "
                     + " | ".join(ratio(row[n]["vs_local"]) for n in others) + " |")
    lines += ["", "| playbook | nodes | transport | median s | × local | × Mitogen | ms / task "
              "| Δ ms / task vs local | ansible CPU s | node CPU s |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (book, nodes), row in cells.items():
        for name in names:
            e = row[name]
            lines.append(f"| {book} | {nodes} | {name} | {e['seconds']:.2f} | {ratio(e['vs_local'])} | "
                         f"{ratio(e['vs_mitogen'])} | {e['ms_per_task']:.0f} | "
                         f"{number(e['overhead_ms_per_task'], 0)} | {number(e['ansible_cpu_s'])} | "
                         f"{number(e['node_cpu_s'])} |")
    marco = [e for e in results if "marco" in e]
    if marco:
        lines += ["", "| playbook | nodes | transport | agents CPU s | commands CPU s | runners CPU s "
                  "| agent RSS MB (peak, largest) | runners | runners RSS MB |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        for e in marco:
            m = e["marco"]
            lines.append(f"| {e['playbook']} | {e['nodes']} | {e['transport']} | "
                         f"{number(m['agent_cpu_s'])} | {number(m['exec_cpu_s'])} | "
                         f"{number(m['runner_cpu_s'])} | {number(m['agent_rss_mb'], 1)} | "
                         f"{number(m['runners'], 0)} | {number(m['runner_rss_mb'], 1)} |")
    return "\n".join(lines)


def meta(args: argparse.Namespace, names: list[str], ssh_check: str | None) -> dict[str, Any]:
    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    # Agents and plugins run from this work tree: uncommitted changes there are what ran.
    changed = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no",
                              "--", "agent", "marco", "ansible_plugins"],
                             capture_output=True, text=True).stdout.split("\n")
    return {"commit": commit, "uncommitted": [line[3:] for line in changed if line.strip()],
            "ansible_core": version("ansible-core"), "mitogen": version("mitogen"),
            "cpus": os.cpu_count(), "nodes": args.nodes, "runs": args.runs,
            "runs_many": args.runs_many, "playbooks": args.playbooks, "transports": names,
            "forks": 10, "ssh_login": ssh_check, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--runs", type=int, default=3, help="rounds per playbook with 1 node")
    parser.add_argument("--runs-many", type=int, help="rounds with more nodes (default: --runs)")
    parser.add_argument("--playbooks", nargs="+", default=["cmd30", "copy30", "seq200k"],
                        choices=["cmd30", "copy30", "seq200k"])
    parser.add_argument("--transports", nargs="+", default=list(TRANSPORTS), choices=TRANSPORTS)
    parser.add_argument("--json", type=Path, help="write the results here (after every cell)")
    parser.add_argument("--quick", action="store_true",
                        help="validate end to end: 1 node, 1 round, cmd30 only")
    parser.add_argument("--tables", type=Path, metavar="JSON",
                        help="print the tables of an earlier run's --json file; run nothing")
    args = parser.parse_args()
    if args.tables:
        return args
    if args.quick:
        args.nodes, args.runs, args.runs_many, args.playbooks = [1], 1, 1, ["cmd30"]
    if args.runs_many is None:
        args.runs_many = args.runs
    if os.geteuid() != 0:
        raise SystemExit("run as root: the bench starts an sshd and logs in as root")
    return args


def main() -> None:
    args = parse_args()
    if args.tables:
        saved = json.loads(args.tables.read_text())
        print(tables(saved["results"], saved["meta"]["transports"]))
        return
    names = [name for name in TRANSPORTS if name in args.transports]
    chosen = transports(names)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="marco-ansible-bench-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        secret = create_secret(work / "secret")
        token = TokenSigner(load_secret(secret)).issue(getpass.getuser())
        pki = TestPki(work / "pki")
        marco = any(t.inventory == "marco" for t in chosen)
        agents = [AgentProcess(secret, work / f"a{i}" / "state", node_name=f"bench{i}",
                               extra_args=["--log-level", "warning"], pki=pki)
                  for i in range(max(args.nodes) if marco else 0)]
        sshd = None
        try:
            ssh_check = None
            if any(t.inventory == "ssh" for t in chosen):
                sshd = Sshd(work, max(args.nodes))
                ssh_check = sshd.check_empty_rc()
                print(f"ssh login: {ssh_check}", flush=True)
            env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
            env.update(MARCO_TOKEN=token, ANSIBLE_CONFIG=str(ROOT / "playbooks" / "ansible.cfg"),
                       ANSIBLE_FORKS="10", ANSIBLE_PIPELINING="True",
                       ANSIBLE_HOST_KEY_CHECKING="False", ANSIBLE_SSH_ARGS=(
                           "-C -o ControlMaster=auto -o ControlPersist=60s "
                           "-o UserKnownHostsFile=/dev/null"),
                       ANSIBLE_NOCOLOR="1", **pki.client_env())
            bench = Bench(work, env, Agents(agents, token), sshd)
            books = playbooks(work)
            info = meta(args, names, ssh_check)
            print(f"commit {info['commit']}, ansible-core {info['ansible_core']}, mitogen "
                  f"{info['mitogen']}; uncommitted: {', '.join(info['uncommitted']) or 'none'}",
                  flush=True)
            for nodes in args.nodes:
                rounds = args.runs if nodes == 1 else args.runs_many
                for key in args.playbooks:
                    book = books[key]
                    cell: dict[str, list[dict[str, Any]]] = {t.name: [] for t in chosen}
                    for round_ in range(rounds):  # interleaved: drift hits every transport alike
                        turn = round_ % len(chosen)
                        for transport in chosen[turn:] + chosen[:turn]:
                            cell[transport.name].append(bench.run(book, transport, nodes))
                    entries = summarise(book, nodes, cell)
                    results += entries
                    print(f"{book.name}, {nodes} node(s): " + "  ".join(
                        f"{e['transport']} {e['seconds']:.2f}s" for e in entries), flush=True)
                    if args.json:
                        args.json.write_text(json.dumps({"meta": info, "results": results}, indent=1))
        finally:
            if sshd is not None:
                sshd.stop()
            for agent in agents:
                agent.stop()
    print("\n" + tables(results, names))


if __name__ == "__main__":
    main()
