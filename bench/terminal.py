"""Terminal benchmark (issue 16): keystroke echo latency and `cat` throughput in a terminal,
Marco's ways against `ssh -tt` on loopback, interleaved in one run.

    sudo flock /tmp/marco-tests.lock .venv/bin/python bench/terminal.py [--keys 300]
        [--megabytes 100] [--rounds 3]

The ways, each to the same throwaway user's terminal on this machine:
- `ssh -tt`: the OpenSSH client in a pseudo-terminal the bench holds (as a terminal emulator
  would) to an sshd the bench starts on a free loopback port, with a throwaway host key and
  authorized key;
- `marco shell`: the CLI in the same kind of pseudo-terminal, straight to the agent (mutual
  TLS), --no-record;
- `direct`: TerminalClient in this process straight to the agent's /v1/terminal;
- `relay`: a WebSocket in this process to the controller's /terminal/NODE (login cookie), which
  relays to the agent and records the session as a run (the controller's default).

Latency: the terminal runs `stty raw -echo; cat`; one byte is sent, the clock stops when it
comes back; `--keys` bytes one after the other, p50 and p99. Throughput: the terminal runs
`cat` of a `--megabytes` MB text file; the clock runs from a marker printed before it to the
session's end, all output read. Each round runs every way (the order turns by one each
round); ratios are against ssh's median in the same run. It loads the machine: run it under
the tests' lock.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fcntl  # noqa: E402

from tornado import httpclient, websocket  # noqa: E402

from marco.terminal_client import TerminalClient  # noqa: E402
from marco.tls import server_trust_context  # noqa: E402
from marco.tokens import TokenSigner, create_secret, load_secret  # noqa: E402
from tests.support.agent_process import AgentProcess  # noqa: E402
from tests.support.controller_process import ControllerProcess  # noqa: E402
from tests.support.http import login_cookie  # noqa: E402
from tests.support.pki import TestPki  # noqa: E402
from tests.support.users import UnixUser, create_user, remove_user  # noqa: E402
from tests.support.waiting import wait_for  # noqa: E402

MARCO = Path(sys.executable).parent / "marco"
USER = "mbenchterm"
PAM_SERVICE = "marco-bench-terminal"
ECHO_COMMAND = "stty raw -echo; echo READY; exec cat"
READY = b"READY"
WAIT = 60.0  # seconds any one step may take before the bench gives up
CHUNK = 1 << 16


def free_port() -> int:
    """A port free now on 127.0.0.1 (sshd cannot report one it picked)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Sshd:
    """An sshd on a free loopback port with a throwaway host key, letting `user` in with a
    throwaway client key (in the user's ~/.ssh/authorized_keys, as usual)."""

    def __init__(self, work: Path, user: UnixUser) -> None:
        self.dir, self.user = work / "ssh", user
        self.dir.mkdir()
        self.port = free_port()
        self.key = self.dir / "client_key"
        for key in (self.dir / "host_key", self.key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                           check=True)
        ssh_dir = Path(user.home) / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        (ssh_dir / "authorized_keys").write_text((self.dir / "client_key.pub").read_text())
        for path in (ssh_dir, ssh_dir / "authorized_keys"):
            os.chown(path, user.uid, user.gid)
        config = self.dir / "sshd_config"
        config.write_text(f"Port {self.port}\nListenAddress 127.0.0.1\n"
                          f"HostKey {self.dir / 'host_key'}\nPasswordAuthentication no\n"
                          "KbdInteractiveAuthentication no\nUsePAM no\nPrintMotd no\n"
                          "PrintLastLog no\nUseDNS no\n"
                          f"AllowUsers {user.name}\nPidFile {self.dir / 'sshd.pid'}\n")
        Path("/run/sshd").mkdir(exist_ok=True)
        self.process = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", str(config),
                                         "-E", str(self.dir / "sshd.log")])
        wait_for(self.accepts, 10, "sshd listening")

    def accepts(self) -> bool:
        if self.process.poll() is not None:
            raise SystemExit(f"sshd exited: {(self.dir / 'sshd.log').read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def argv(self, command: str) -> list[str]:
        return ["ssh", "-tt", "-p", str(self.port), "-i", str(self.key), "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=error", f"{self.user.name}@127.0.0.1", command]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


class PtyProgram:
    """A client program (ssh, marco shell) in a pseudo-terminal the bench holds."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        self.process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                                        env=env, start_new_session=True)
        os.close(slave)  # the master reads EIO once the program and its children are gone
        self.seen = b""

    def read(self, timeout: float = WAIT) -> bytes:
        """The next output (b"" once the program closed the terminal)."""
        readable, _, _ = select.select([self.master], [], [], timeout)
        if not readable:
            raise SystemExit(f"no output from {self.process.args!r} in {timeout} s")
        try:
            return os.read(self.master, CHUNK)
        except OSError:  # EIO: the slave side is closed
            return b""

    def until(self, marker: bytes) -> None:
        while marker not in self.seen:
            chunk = self.read()
            if not chunk:
                raise SystemExit(f"{self.process.args!r} ended before {marker!r}: {self.seen!r}")
            self.seen += chunk
        self.seen = self.seen[self.seen.index(marker) + len(marker):]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        os.close(self.master)


class PtyWay:
    """ssh -tt or marco shell: a program in a pseudo-terminal."""

    def __init__(self, name: str, argv: Callable[[str], list[str]], env: dict[str, str]) -> None:
        self.name, self.argv, self.env = name, argv, env

    async def latencies(self, keys: int) -> list[float]:
        program = PtyProgram(self.argv(ECHO_COMMAND), self.env)
        try:
            program.until(READY)
            times = []
            for _ in range(keys):
                started = time.perf_counter()
                os.write(program.master, b"x")
                program.until(b"x")
                times.append(time.perf_counter() - started)
            return times
        finally:
            program.close()

    async def cat_seconds(self, path: Path) -> tuple[float, int]:
        program = PtyProgram(self.argv(f"echo READY; cat {path}"), self.env)
        try:
            program.until(READY)
            started, received = time.perf_counter(), len(program.seen)
            while chunk := program.read():
                received += len(chunk)
            program.process.wait(WAIT)
            return time.perf_counter() - started, received
        finally:
            program.close()


class SocketWay:
    """A terminal socket read in this process: the agent's, or the controller's relay."""

    def __init__(self, name: str, connect: Callable[[str], Awaitable[Any]]) -> None:
        self.name, self.connect = name, connect

    async def latencies(self, keys: int) -> list[float]:
        client = await self.connect(ECHO_COMMAND)
        try:
            await until(client, READY)
            times = []
            for _ in range(keys):
                started = time.perf_counter()
                await client.send(b"x")
                await until(client, b"x")
                times.append(time.perf_counter() - started)
            return times
        finally:
            client.close()

    async def cat_seconds(self, path: Path) -> tuple[float, int]:
        client = await self.connect(f"echo READY; cat {path}")
        try:
            rest = await until(client, READY)
            started, received = time.perf_counter(), len(rest)
            while (frame := await client.read()) is not None:
                if isinstance(frame, bytes):
                    received += len(frame)
                elif frame.get("type") == "exit":
                    break
            return time.perf_counter() - started, received
        finally:
            client.close()


async def until(client: Any, marker: bytes) -> bytes:
    """Read output frames until `marker`; what came after it."""
    seen = b""
    while marker not in seen:
        frame = await asyncio.wait_for(client.read(), WAIT)
        if frame is None or (isinstance(frame, dict) and frame.get("type") == "exit"):
            raise SystemExit(f"the terminal ended before {marker!r}: {seen!r}")
        if isinstance(frame, bytes):
            seen += frame
    return seen[seen.index(marker) + len(marker):]


class RelayClient:
    """The controller's /terminal/NODE as the page uses it: the login cookie, the page's
    origin, the `open` message without a token; frames as TerminalClient reads them."""

    def __init__(self, controller: ControllerProcess, node: str, cookie: str) -> None:
        self.controller, self.node, self.cookie = controller, node, cookie
        self.ws: websocket.WebSocketClientConnection | None = None

    async def open(self, command: str) -> RelayClient:
        assert self.controller.pki is not None
        request = httpclient.HTTPRequest(
            f"{self.controller.ws_url}/terminal/{self.node}",
            headers={"Cookie": self.cookie, "Origin": self.controller.url},
            ssl_options=server_trust_context(str(self.controller.pki.ca_file)))
        self.ws = await websocket.websocket_connect(request, max_message_size=1 << 24)
        await self.ws.write_message(json.dumps({"type": "open", "cols": 80, "rows": 24,
                                                "term": "xterm", "command": command,
                                                "session": None}))
        return self

    async def send(self, data: bytes) -> None:
        assert self.ws is not None
        await self.ws.write_message(data, binary=True)

    async def read(self) -> bytes | dict[str, Any] | None:
        assert self.ws is not None
        message = await self.ws.read_message()
        if message is None or isinstance(message, bytes):
            return message
        return dict(json.loads(message))

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()


class Bench:
    """The daemons, the user, the sshd, and the ways to reach the user's terminal."""

    def __init__(self, work: Path) -> None:
        self.work = work
        secret = work / "secret"
        create_secret(secret)
        self.signer = TokenSigner(load_secret(secret))
        self.pki = TestPki(work / "pki")
        remove_user(USER)
        self.user = create_user(USER)
        os.chmod(work, 0o755)
        Path("/etc/pam.d", PAM_SERVICE).write_text("auth required pam_unix.so nodelay\n"
                                                   "account required pam_unix.so\n")
        self.controller = ControllerProcess(secret, work, pam_service=PAM_SERVICE, pki=self.pki)
        self.node = f"bench-term-{os.getpid()}"
        self.agent = AgentProcess(secret, work / "agent" / "state", node_name=self.node,
                                  announce=True, pki=self.pki)
        token = self.signer.issue(self.user.name)
        wait_for(lambda: self.node in self.controller.inventory_hosts(token), 30,
                 "the agent discovered")
        self.sshd = Sshd(work, self.user)
        self.home = self.login()
        self.cookie = login_cookie(self.controller, self.user)

    def login(self) -> Path:
        """A HOME where `marco login` stored the user's credentials (for marco shell)."""
        home = self.work / "cli-home"
        home.mkdir()
        subprocess.run([str(MARCO), "login", "--user", self.user.name, "--password-stdin"],
                       input=self.user.password + "\n", text=True, check=True,
                       capture_output=True, env=self.cli_env(home))
        return home

    def cli_env(self, home: Path) -> dict[str, str]:
        return {"PATH": os.environ["PATH"], "HOME": str(home), "TERM": "xterm",
                "MARCO_CONTROLLER": self.controller.url,
                "MARCO_TLS_CA": str(self.pki.ca_file)}

    def ways(self) -> list[Any]:
        async def direct(command: str) -> TerminalClient:
            client = TerminalClient.for_node(self.agent.host, self.agent.port,
                                             self.signer.issue(self.user.name),
                                             self.pki.client_tls(), node=self.node)
            await client.open(80, 24, term="xterm", command=command)
            return client

        async def relay(command: str) -> RelayClient:
            return await RelayClient(self.controller, self.node, self.cookie).open(command)

        ssh_env = {"PATH": os.environ["PATH"], "HOME": str(self.work), "TERM": "xterm"}
        return [PtyWay("ssh -tt", self.sshd.argv, ssh_env),
                PtyWay("marco shell",
                       lambda command: [str(MARCO), "shell", self.node, "--no-record", "--",
                                        command], self.cli_env(self.home)),
                SocketWay("direct", direct), SocketWay("relay", relay)]

    def stop(self) -> None:
        for step in (self.sshd.stop, self.agent.stop, self.controller.stop):
            try:
                step()
            except Exception as error:  # noqa: BLE001 (the rest still stops)
                print(f"stopping: {error}", file=sys.stderr)
        Path("/etc/pam.d", PAM_SERVICE).unlink(missing_ok=True)
        remove_user(USER)


def text_file(path: Path, megabytes: int) -> Path:
    """`megabytes` MB of printable lines, readable by the bench's user."""
    line = (b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" * 2)[:99] + b"\n"
    with path.open("wb") as out:
        block = line * 10_000
        for _ in range(megabytes):
            out.write(block)
    path.chmod(0o644)
    return path


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def measure(ways: list[Any], keys: int, data: Path,
                  rounds: int) -> dict[str, dict[str, list[float]]]:
    """Every way, every round, the order turned by one each round."""
    figures: dict[str, dict[str, list[float]]] = {
        way.name: {"latency": [], "seconds": [], "bytes": []} for way in ways}
    for number in range(rounds):
        for way in ways[number % len(ways):] + ways[:number % len(ways)]:
            times = await way.latencies(keys)
            seconds, received = await way.cat_seconds(data)
            figures[way.name]["latency"] += times
            figures[way.name]["seconds"].append(seconds)
            figures[way.name]["bytes"].append(received)
            print(f"round {number + 1} {way.name:12} p50 {percentile(times, 0.5) * 1000:.3f} ms"
                  f"  cat {received / seconds / 1e6:.1f} MB/s", file=sys.stderr, flush=True)
    return figures


def report(figures: dict[str, dict[str, list[float]]], megabytes: int) -> str:
    ssh = figures["ssh -tt"]
    ssh_p50 = percentile(ssh["latency"], 0.5)
    ssh_rate = statistics.median(b / s for b, s in zip(ssh["bytes"], ssh["seconds"], strict=True))
    rows = ["| way | echo p50 | echo p99 | p50 vs ssh | cat MB/s | vs ssh |",
            "|---|---|---|---|---|---|"]
    for name, f in figures.items():
        p50, p99 = percentile(f["latency"], 0.5), percentile(f["latency"], 0.99)
        rate = statistics.median(b / s for b, s in zip(f["bytes"], f["seconds"], strict=True))
        rows.append(f"| {name} | {p50 * 1000:.3f} ms | {p99 * 1000:.3f} ms | "
                    f"{p50 / ssh_p50:.2f}× | {rate / 1e6:.1f} | {rate / ssh_rate:.2f}× |")
    rows.append(f"\n(cat of {megabytes} MB: bytes through the terminal, \\r\\n included)")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=300, help="keystrokes per way and round")
    parser.add_argument("--megabytes", type=int, default=100, help="size of the cat'ed file")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ways", nargs="*", help="only these ways (ssh -tt always)")
    args = parser.parse_args()
    if os.geteuid() != 0 or not shutil.which("sshd", path="/usr/sbin:/usr/bin"):
        raise SystemExit("run as root, with openssh-server installed")
    work = Path(tempfile.mkdtemp(prefix="marco-bench-terminal-"))
    bench = Bench(work)
    try:
        data = text_file(work / "data.txt", args.megabytes)
        ways = [w for w in bench.ways()
                if not args.ways or w.name in args.ways or w.name == "ssh -tt"]
        figures = asyncio.run(measure(ways, args.keys, data, args.rounds))
        print(report(figures, args.megabytes))
    finally:
        bench.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
