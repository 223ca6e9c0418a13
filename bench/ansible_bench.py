"""Ansible through Marco against Ansible's `local` and `ssh` connections, in the same run.

    sudo .venv/bin/python bench/ansible_bench.py [--nodes 1 10] [--runs 3] [--runs-many 1]

Playbooks: 30 x `command: /bin/true`, 30 x `copy`, one task printing 200,000 lines. Nodes are
inventory hosts on this machine: N marco agents on loopback ports (mutual TLS, as installed;
and N more in `--dev` mode, plain HTTP, to show what TLS costs), N aliases of one sshd on
loopback (pipelining and ControlPersist on), N `local` hosts. PYTHONUNBUFFERED is unset for
every transport alike. Wall time, median of the runs; the table gives ratios to `local`.
Needs root, openssh-server and openssh-client (installed by apt when missing).
"""

from __future__ import annotations

import argparse
import getpass
import os
import shutil
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
from tests.support.pki import TestPki  # noqa: E402

BIN = Path(sys.executable).parent
TASKS = 30


def playbooks(work: Path) -> dict[str, Path]:
    books = {
        "30 x command": "    - command: /bin/true\n" * TASKS,
        "30 x copy": "".join(f"    - copy: content='file {i}\\n' dest=~/marco-bench/{{{{ inventory_hostname }}}}-{i}\n"
                             for i in range(TASKS)),
        "200k lines": "    - shell: seq 1 200000\n      register: out\n"
                      "    - assert: {that: out.stdout_lines | length == 200000}\n",
    }
    paths = {}
    for name, tasks in books.items():
        path = work / (name.replace(" ", "_").replace("x", "") + ".yml")
        setup = "    - file: path=~/marco-bench state=directory\n" if "copy" in name else ""
        path.write_text(f"- hosts: all\n  gather_facts: false\n  tasks:\n{setup}{tasks}")
        paths[name] = path
    return paths


def free_port() -> int:
    """A port free now: sshd cannot report one it picked, so it may be taken before sshd binds
    it (rare; a benchmark can be run again)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Sshd:
    """An sshd on loopback for root, with a fresh host key and client key."""

    def __init__(self, work: Path) -> None:
        if not shutil.which("sshd") and not Path("/usr/sbin/sshd").exists():
            subprocess.run(["apt-get", "install", "-y", "-qq", "openssh-server", "openssh-client"],
                           check=True, stdout=subprocess.DEVNULL)
        self.dir = work / "ssh"
        self.dir.mkdir()
        self.port = free_port()
        self.key = self.dir / "client_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.dir / "host_key")], check=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        authorized = self.dir / "authorized_keys"
        authorized.write_text((self.dir / "client_key.pub").read_text())
        authorized.chmod(0o600)
        config = self.dir / "sshd_config"
        config.write_text(f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.dir / 'host_key'}\n"
                          f"AuthorizedKeysFile {authorized}\nPermitRootLogin prohibit-password\n"
                          "PasswordAuthentication no\nUsePAM no\nStrictModes no\n"
                          f"PidFile {self.dir / 'sshd.pid'}\nMaxStartups 100\nMaxSessions 100\n")
        Path("/run/sshd").mkdir(exist_ok=True)
        self.process = subprocess.Popen([shutil.which("sshd") or "/usr/sbin/sshd", "-D", "-f", str(config)])
        time.sleep(0.5)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()


def inventory(work: Path, connection: str, nodes: int, agents: dict[str, list[AgentProcess]],
              sshd: Sshd) -> Path:
    lines = []
    for i in range(nodes):
        if connection == "marco":  # mutual TLS, as installed
            agent = agents["tls"][i]
            lines.append(f"m{i} ansible_connection=marco.fleet.marco ansible_host=127.0.0.1 "
                         f"ansible_port={agent.port} marco_node={agent.node_name}")
        elif connection == "marco-dev":  # plain HTTP (--dev): what TLS costs
            lines.append(f"d{i} ansible_connection=marco.fleet.marco ansible_host=127.0.0.1 "
                         f"ansible_port={agents['dev'][i].port} marco_tls=false")
        elif connection == "ssh":
            lines.append(f"s{i} ansible_connection=ssh ansible_host=127.0.0.1 ansible_port={sshd.port} "
                         f"ansible_user=root ansible_ssh_private_key_file={sshd.key}")
        else:
            lines.append(f"l{i} ansible_connection=local")
    path = work / f"{connection}-{nodes}.ini"
    path.write_text("[all:vars]\nansible_python_interpreter=/usr/bin/python3\n" + "\n".join(["[all]"] + lines) + "\n")
    return path


def run(playbook: Path, hosts: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    out = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(hosts), str(playbook)],
                         cwd=ROOT / "playbooks", env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"{playbook.name} with {hosts.name} failed:\n{out.stdout[-3000:]}{out.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--runs", type=int, default=3, help="runs per cell with 1 node")
    parser.add_argument("--runs-many", type=int, default=1, help="runs per cell with more nodes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="marco-ansible-bench-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        secret = create_secret(work / "secret")
        pki = TestPki(work / "pki")
        agents = {
            "tls": [AgentProcess(secret, work / f"a{i}" / "state", node_name=f"bench{i}",
                                 extra_args=["--log-level", "warning"], pki=pki)
                    for i in range(max(args.nodes))],
            "dev": [AgentProcess(secret, work / f"d{i}" / "state", node_name=f"dev{i}",
                                 extra_args=["--log-level", "warning"])
                    for i in range(max(args.nodes))]}
        sshd = Sshd(work)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
        env.update(MARCO_TOKEN=TokenSigner(load_secret(secret)).issue(getpass.getuser()),
                   ANSIBLE_CONFIG=str(ROOT / "playbooks" / "ansible.cfg"), ANSIBLE_FORKS="10",
                   ANSIBLE_PIPELINING="True", ANSIBLE_HOST_KEY_CHECKING="False",
                   ANSIBLE_SSH_CONTROL_PATH_DIR=str(work / "cp"), ANSIBLE_SSH_ARGS=
                   "-C -o ControlMaster=auto -o ControlPersist=60s -o UserKnownHostsFile=/dev/null",
                   ANSIBLE_NOCOLOR="1", **pki.client_env())
        books = playbooks(work)
        results: dict[tuple[str, int], dict[str, float]] = {}
        try:
            for nodes in args.nodes:
                runs = args.runs if nodes == 1 else args.runs_many
                for name, book in books.items():
                    cell: dict[str, list[float]] = {}
                    for _ in range(runs):  # interleave transports so drift hits all alike
                        for connection in ("local", "marco", "marco-dev", "ssh"):
                            hosts = inventory(work, connection, nodes, agents, sshd)
                            cell.setdefault(connection, []).append(run(book, hosts, env))
                    results[(name, nodes)] = {c: statistics.median(t) for c, t in cell.items()}
                    r = results[(name, nodes)]
                    print(f"{name}, {nodes} node(s): local {r['local']:.2f}s  marco {r['marco']:.2f}s  "
                          f"marco --dev {r['marco-dev']:.2f}s  ssh {r['ssh']:.2f}s", flush=True)
        finally:
            sshd.stop()
            for agent in agents["tls"] + agents["dev"]:
                agent.stop()
    print("\n| playbook | nodes | local s | marco (mTLS) s | marco --dev s | ssh s | marco / local "
          "| marco --dev / local | ssh / local |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (name, nodes), r in results.items():
        print(f"| {name} | {nodes} | {r['local']:.2f} | {r['marco']:.2f} | {r['marco-dev']:.2f} | "
              f"{r['ssh']:.2f} | {r['marco'] / r['local']:.2f}x | "
              f"{r['marco-dev'] / r['local']:.2f}x | {r['ssh'] / r['local']:.2f}x |")


if __name__ == "__main__":
    main()
