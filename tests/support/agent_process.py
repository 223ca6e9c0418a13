"""Start a real `marco-agent` process on loopback for a test and stop it afterwards."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Sequence


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class AgentProcess:
    """One agent process; `stop()` sends SIGTERM like an admin or systemd would."""

    def __init__(self, secret_file: Path, state_dir: Path, node_name: str = "test-node",
                 extra_args: Sequence[str] = (), bind: str = "127.0.0.1",
                 port: int | None = None, announce: bool = False,
                 preexec_user: int | None = None, env: dict[str, str] | None = None) -> None:
        self.host = bind
        self.port = port or free_port(bind)
        self.node_name = node_name
        self.log_path = state_dir.parent / f"{node_name}-{self.port}.log"
        args = [sys.executable, "-m", "agent", "--bind", bind, "--port", str(self.port),
                "--secret-file", str(secret_file), "--state-dir", str(state_dir),
                "--node-name", node_name, "--log-level", "debug",
                "--announce" if announce else "--no-announce", *extra_args]
        self._log = open(self.log_path, "wb")
        child_env = dict(os.environ, **(env or {}))
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=child_env, cwd=Path(__file__).parents[2],
                                        user=preexec_user)
        self.wait_healthy()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def wait_healthy(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"agent exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/v1/health", timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"agent did not become healthy:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode
