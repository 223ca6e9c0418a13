"""Start a real Marco daemon (`python -m agent` or `python -m controller`) for a test."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tests.support.paths import ROOT


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class DaemonProcess:
    """One daemon process, waited for until `health_path` answers; `stop()` sends SIGTERM."""

    module = ""
    health_path = ""

    def __init__(self, args: Sequence[str], log_path: Path, host: str, port: int,
                 env: dict[str, str] | None = None, netns: str | None = None,
                 user: int | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        self.host, self.port, self.log_path = host, port, log_path
        self.ssl_context = ssl_context
        command = [sys.executable, "-m", self.module, *args]
        if netns:
            command = ["ip", "netns", "exec", netns, *command]
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=dict(os.environ, **(env or {})), cwd=ROOT, user=user)
        self.netns = netns
        self.wait_healthy()

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def connection(self, timeout: float = 30) -> http.client.HTTPConnection:
        """An http.client connection to the daemon (HTTPS, as the test client, with TLS)."""
        if self.ssl_context is None:
            return http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        return http.client.HTTPSConnection(self.host, self.port, timeout=timeout,
                                           context=self.ssl_context)

    def open_socket(self, timeout: float = 30) -> socket.socket:
        """A raw stream to the daemon (inside TLS when it serves TLS), for hand-made requests."""
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        if self.ssl_context is not None:
            return self.ssl_context.wrap_socket(sock, server_hostname=self.host)
        return sock

    def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.module} exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + self.health_path, timeout=1,
                                            context=self.ssl_context):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.module} did not become healthy:\n{self.log()}")

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
