"""Marco's demo on this machine: a fresh secret, three agents on loopback, a command on all of
them with every line printed live as it happens. The controller, its web viewer and the example
playbook join this demo as they are built (see the README's status section).

    scripts/demo [--once] [--agents 3] [--command "..."]
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
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

from agent.client import AsyncAgentClient  # noqa: E402
from agent.tokens import TokenSigner, create_secret, load_secret  # noqa: E402

DEMO_COMMAND = ("echo \"hello from $(hostname) as $(id -un) in $PWD\"; "
                "for i in 1 2 3 4 5; do echo \"step $i of 5\"; sleep 0.3; done; "
                "echo 'a warning on stderr' >&2; uname -sr")
COLOURS = ["\033[36m", "\033[35m", "\033[33m", "\033[32m", "\033[34m"]
RED, RESET = "\033[31m", "\033[0m"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def demo_user() -> str:
    """The user commands run as: the one who ran sudo, else whoever runs the demo."""
    return os.environ.get("SUDO_USER") if os.geteuid() == 0 and os.environ.get("SUDO_USER") \
        else getpass.getuser()


class LocalAgents:
    """N marco-agent processes on 127.0.0.1, each with its own port, state dir and log."""

    def __init__(self, workdir: Path, secret: Path, count: int) -> None:
        self.workdir, self.secret, self.count = workdir, secret, count
        self.nodes: list[tuple[str, int, subprocess.Popen[bytes]]] = []

    def start(self) -> None:
        for index in range(1, self.count + 1):
            name, port = f"demo-{index}", free_port()
            log = open(self.workdir / f"{name}.log", "wb")
            process = subprocess.Popen(
                [sys.executable, "-m", "agent", "--bind", "127.0.0.1", "--port", str(port),
                 "--secret-file", str(self.secret), "--state-dir", str(self.workdir / name),
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
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=1).close()
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


async def run_everywhere(nodes: list[tuple[str, int]], token: str, command: str) -> dict[str, int | None]:
    """Start `command` on every node and print each line live, prefixed by its node."""
    width = max(len(name) for name, _ in nodes)

    async def one(index: int, name: str, port: int) -> int | None:
        api = AsyncAgentClient("127.0.0.1", port, token)
        stream = api.stream()
        await stream.connect()
        execution_id = await api.start(command, label="marco demo")
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
    return {name: rc for (name, _), rc in zip(nodes, results)}


def main() -> int:
    parser = argparse.ArgumentParser(description="Run Marco's demo on this machine.")
    parser.add_argument("--once", action="store_true", help="run the demo once and exit")
    parser.add_argument("--agents", type=int, default=3, help="how many local agents (3)")
    parser.add_argument("--command", default=DEMO_COMMAND, help="shell command to run everywhere")
    parser.add_argument("--keep", action="store_true", help="keep the temporary state dir")
    args = parser.parse_args()
    if not sys.stdout.isatty():
        global COLOURS, RED, RESET
        COLOURS, RED, RESET = [""], "", ""

    workdir = Path(tempfile.mkdtemp(prefix="marco-demo-"))
    os.chmod(workdir, 0o700)
    secret = create_secret(workdir / "secret")
    user = demo_user()
    token = TokenSigner(load_secret(secret)).issue(user)
    agents = LocalAgents(workdir, secret, args.agents)
    print(f"Marco demo: state in {workdir}; commands run as {user!r}"
          + ("" if os.geteuid() == 0 else " (agents run as you: they serve only you)"))
    try:
        agents.start()
        nodes = [(name, port) for name, port, _ in agents.nodes]
        for name, port in nodes:
            print(f"  agent {name} on http://127.0.0.1:{port} (announced as {name}._marco._tcp.local.)")
        print(f"\nRunning on {len(nodes)} nodes, live:\n")
        results = asyncio.run(run_everywhere(nodes, token, args.command))
        print("\nexit codes: " + ", ".join(f"{name}={rc}" for name, rc in results.items()))
        ok = all(rc == 0 for rc in results.values())
        if not args.once:
            print("\nThe agents keep running. Try, in another terminal:\n"
                  f"  export MARCO_TOKEN={token}\n"
                  f"  curl -H \"Authorization: Bearer $MARCO_TOKEN\" "
                  f"'http://127.0.0.1:{nodes[0][1]}/v1/executions?wait=1' -d '{{\"argv\": [\"id\"]}}'\n"
                  "Press Ctrl-C to stop.")
            try:
                signal.pause()
            except KeyboardInterrupt:
                pass
        return 0 if ok else 1
    finally:
        agents.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
