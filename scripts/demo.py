"""Marco's demo on this machine: a fresh cluster (`marco-controller init`: secret, CA), three
agents on loopback with their certificates (`issue-agent`), the controller that discovers them
by zeroconf, every hop mutual TLS, a command started on all of them through the controller with
every line printed live as it happens, the example playbook (playbooks/deploy.yml) run by the
real `ansible-playbook` through the `marco.fleet.marco` connection with its build output live,
and the web
viewer's URL.

    scripts/demo [--once] [--agents 3] [--port 7380] [--name-prefix demo] [--command "..."]
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from marco.client import AsyncAgentClient  # noqa: E402
from marco.tls import ClientTls, server_trust_context  # noqa: E402
from marco.tokens import TokenSigner, load_secret  # noqa: E402

DEMO_COMMAND = ("echo \"hello from $(hostname) as $(id -un) in $PWD\"; "
                "for i in 1 2 3 4 5; do echo \"step $i of 5\"; sleep 0.3; done; "
                "echo 'a warning on stderr' >&2; uname -sr")
COLOURS = ["\033[36m", "\033[35m", "\033[33m", "\033[32m", "\033[34m"]
RED, RESET = "\033[31m", "\033[0m"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the controller does
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def demo_user() -> str:
    """The user commands run as: the one who ran sudo, else whoever runs the demo."""
    return os.environ.get("SUDO_USER") if os.geteuid() == 0 and os.environ.get("SUDO_USER") \
        else getpass.getuser()


def admin(workdir: Path, *args: str) -> None:
    """One `marco-controller` admin command on the demo's cluster (as an admin would)."""
    done = subprocess.run([sys.executable, "-m", "controller", "--pki-dir", str(workdir / "pki"),
                           "--secret-file", str(workdir / "secret"), *args], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"marco-controller {args[0]} failed: {done.stderr.strip()}")


class LocalAgents:
    """N marco-agent processes on 127.0.0.1, each with its own port, state dir, log and
    certificate bundle (`marco-controller issue-agent`)."""

    def __init__(self, workdir: Path, secret: Path, count: int, tls: ClientTls,
                 prefix: str = "demo") -> None:
        self.workdir, self.secret, self.count, self.tls = workdir, secret, count, tls
        self.prefix = prefix
        self.nodes: list[tuple[str, int, subprocess.Popen[bytes]]] = []

    def start(self) -> None:
        for index in range(1, self.count + 1):
            name, port = f"{self.prefix}-{index}", free_port()
            bundle = self.workdir / f"{name}.marco"
            admin(self.workdir, "issue-agent", name, "--out", str(bundle))
            log = open(self.workdir / f"{name}.log", "wb")
            process = subprocess.Popen(
                [sys.executable, "-m", "agent", "--bind", "127.0.0.1", "--port", str(port),
                 "--secret-file", str(bundle / "secret"), "--state-dir", str(self.workdir / name),
                 "--tls-cert", str(bundle / "agent.pem"), "--tls-key", str(bundle / "agent.key"),
                 "--tls-ca", str(bundle / "ca.pem"), "--tls-crl", str(bundle / "crl.pem"),
                 "--node-name", name, "--groups", "demo", "--mdns-interface", "127.0.0.1"],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            self.nodes.append((name, port, process))
        for name, port, process in self.nodes:
            self._wait_healthy(name, port, process)

    def _wait_healthy(self, name: str, port: int, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"agent {name} exited; see {self.workdir / (name + '.log')}")
            try:
                urllib.request.urlopen(f"https://127.0.0.1:{port}/v1/health", timeout=1,
                                       context=self.tls.context_for(name)).close()
                return
            except OSError:
                time.sleep(0.1)
        raise SystemExit(f"agent {name} did not start; see {self.workdir / (name + '.log')}")

    def stop(self) -> None:
        for _, _, process in self.nodes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for _, _, process in self.nodes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


class LocalController:
    """marco-controller on 127.0.0.1, browsing for the agents on loopback."""

    def __init__(self, workdir: Path, secret: Path, port: int) -> None:
        self.url = f"https://127.0.0.1:{port}"
        self.log = workdir / "controller.log"
        self.trust = server_trust_context(str(workdir / "pki" / "ca.pem"))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "controller", "--bind", "127.0.0.1", "--port", str(port),
             "--secret-file", str(secret), "--mdns-interface", "127.0.0.1",
             "--pki-dir", str(workdir / "pki"), "--state-dir", str(workdir / "controller-state")],
            cwd=ROOT, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)

    def api(self, path: str, token: str, body: object = None) -> dict:
        request = urllib.request.Request(
            self.url + path, data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30, context=self.trust) as reply:
            return json.load(reply)

    def wait_for_nodes(self, token: str, names: set[str], timeout: float = 30) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise SystemExit(f"the controller exited; see {self.log}")
            try:
                if names <= set(self.api("/api/inventory", token)["_meta"]["hostvars"]):
                    return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"the controller did not discover the agents; see {self.log}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


async def run_everywhere(controller: LocalController, nodes: list[tuple[str, int]], token: str,
                         command: str, tls: ClientTls) -> dict[str, int | None]:
    """Start `command` on every node through the controller; print each line live, prefixed."""
    width = max(len(name) for name, _ in nodes)
    streams = {}
    for name, port in nodes:  # subscribe first: no line can be missed
        streams[name] = AsyncAgentClient("127.0.0.1", port, token, tls=tls, node=name).stream()
        await streams[name].connect()
    loop = asyncio.get_running_loop()
    started = await loop.run_in_executor(None, lambda: controller.api(
        "/api/run", token, {"nodes": [n for n, _ in nodes], "command": command,
                            "label": "marco demo"}))
    ids = {name: result.get("id") for name, result in started["results"].items()}

    async def one(index: int, name: str, port: int) -> int | None:
        stream, execution_id = streams[name], ids[name]
        if execution_id is None:
            print(f"{name}: {started['results'][name].get('message')}")
            return None
        prefix = f"{COLOURS[index % len(COLOURS)]}{name:<{width}}{RESET}"
        try:
            while (event := await stream.read()) is not None:
                if event.get("id") != execution_id:
                    continue
                if event["type"] == "output":
                    for line in event["lines"]:
                        if event["stream"] == "stderr":
                            print(f"{prefix} {RED}! {line}{RESET}", flush=True)
                        else:
                            print(f"{prefix} | {line}", flush=True)
                elif event["type"] == "exit":
                    return event["rc"]
        finally:
            stream.close()
        return None

    results = await asyncio.gather(*(one(i, name, port) for i, (name, port) in enumerate(nodes)))
    return {name: rc for (name, _), rc in zip(nodes, results, strict=True)}


async def play_with_live_output(nodes: list[tuple[str, int]], token: str, controller_url: str,
                                playbook: str, tls: ClientTls) -> int:
    """Run `ansible-playbook` through the marco connection; print Ansible's own output and,
    live, the lines of the commands the play runs (Ansible's internal module runs, which go
    through `/bin/sh -c`, are left to Ansible's report)."""
    width = max(len(name) for name, _ in nodes)
    streams = {}
    for name, port in nodes:
        streams[name] = AsyncAgentClient("127.0.0.1", port, token, tls=tls, node=name).stream()
        await streams[name].connect()

    async def follow(index: int, name: str) -> None:
        shown: set[str] = set()
        prefix = f"{COLOURS[index % len(COLOURS)]}{name:<{width}}{RESET}"
        while (event := await streams[name].read()) is not None:
            if event["type"] == "started" and isinstance(event["command"], str) \
                    and not event["command"].startswith("/bin/sh -c"):
                shown.add(event["id"])
            elif event["type"] == "output" and event["id"] in shown:
                mark = f"{RED}!" if event["stream"] == "stderr" else "|"
                for line in event["lines"]:
                    print(f"  {prefix} {mark} {line}{RESET}", flush=True)

    followers = [asyncio.ensure_future(follow(i, name)) for i, (name, _) in enumerate(nodes)]
    env = dict(os.environ, MARCO_CONTROLLER=controller_url, MARCO_TOKEN=token,
               MARCO_CLIENT_CERT=tls.cert_file, MARCO_CLIENT_KEY=tls.key_file,
               MARCO_TLS_CA=tls.ca_file,
               ANSIBLE_CONFIG=str(ROOT / "playbooks" / "ansible.cfg"))
    env.pop("PYTHONUNBUFFERED", None)
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "ansible-playbook"), playbook, cwd=ROOT / "playbooks",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert process.stdout is not None
    while line := await process.stdout.readline():
        print(line.decode(errors="replace").rstrip(), flush=True)
    rc = await process.wait()
    for follower in followers:
        follower.cancel()
    for stream in streams.values():
        stream.close()
    return rc


def main() -> int:
    parser = argparse.ArgumentParser(description="Run Marco's demo on this machine.")
    parser.add_argument("--once", action="store_true", help="run the demo once and exit")
    parser.add_argument("--agents", type=int, default=3, help="how many local agents (3)")
    parser.add_argument("--command", default=DEMO_COMMAND, help="shell command to run everywhere")
    parser.add_argument("--keep", action="store_true", help="keep the temporary state dir")
    parser.add_argument("--port", type=int, default=7380, help="controller port (7380)")
    parser.add_argument("--name-prefix", default="demo", metavar="PREFIX",
                        help="agents are named PREFIX-1, PREFIX-2, ... (demo); zeroconf names "
                             "are shared on the LAN, so two demos at once need two prefixes")
    args = parser.parse_args()
    if not sys.stdout.isatty():
        global COLOURS, RED, RESET
        COLOURS, RED, RESET = [""], "", ""

    workdir = Path(tempfile.mkdtemp(prefix="marco-demo-"))
    os.chmod(workdir, 0o700)
    secret = workdir / "secret"
    admin(workdir, "init")  # the secret, the CA and the controller's certificate
    admin(workdir, "issue-client", "marco-demo", "--out", str(workdir / "client"))
    tls = ClientTls(str(workdir / "client" / "ca.pem"), str(workdir / "client" / "client.pem"),
                    str(workdir / "client" / "client.key"))
    user = demo_user()
    token = TokenSigner(load_secret(secret)).issue(user)
    agents = LocalAgents(workdir, secret, args.agents, tls, args.name_prefix)
    controller: LocalController | None = None
    print(f"Marco demo: state in {workdir}; commands run as {user!r}"
          + ("" if os.geteuid() == 0 else " (agents run as you: they serve only you)"))
    try:
        agents.start()
        nodes = [(name, port) for name, port, _ in agents.nodes]
        for name, port in nodes:
            print(f"  agent {name} on https://127.0.0.1:{port} (mutual TLS; announced as "
                  f"{name}._marco._tcp.local.)")
        port = args.port if port_free(args.port) else free_port()
        controller = LocalController(workdir, secret, port)
        took = controller.wait_for_nodes(token, {name for name, _ in nodes})
        print(f"  controller on {controller.url} discovered all {len(nodes)} agents by zeroconf "
              f"in {took:.1f} s")
        print(f"\nRunning on {len(nodes)} nodes through the controller, live:\n")
        results = asyncio.run(run_everywhere(controller, nodes, token, args.command, tls))
        print("\nexit codes: " + ", ".join(f"{name}={rc}" for name, rc in results.items()))
        ok = all(rc == 0 for rc in results.values())
        print("\nNow the example playbook, through the marco connection "
              "(ansible-playbook playbooks/deploy.yml):\n")
        played = asyncio.run(play_with_live_output(nodes, token, controller.url, "deploy.yml",
                                                   tls))
        print(f"\nansible-playbook exited with {played}")
        ok = ok and played == 0
        print(f"\nViewer: {controller.url}/  (log in with a Unix account of this machine that has "
              f"a password, e.g. {user!r}; set one with: sudo passwd {user}).\n"
              f"Its certificate comes from the demo's own CA ({workdir / 'pki' / 'ca.pem'}): "
              "accept it once in the browser, or import that CA.")
        if not args.once:
            print("Everything keeps running; the output above is in the viewer too. "
                  "Press Ctrl-C to stop.")
            try:
                signal.pause()
            except KeyboardInterrupt:
                pass
        return 0 if ok else 1
    finally:
        if controller is not None:
            controller.stop()
        agents.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
