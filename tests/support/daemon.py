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
from typing import IO

from marco.serving import Listening
from tests.support.paths import ROOT
from tests.support.run import RUN_VARIABLE, this_run
from tests.support.waiting import wait_for


def listening_port(state_dir: Path, pid: int) -> int | None:
    """The port the daemon `pid` wrote to its state dir's listening.json, or None while the
    file is missing or another process's (a SIGKILLed predecessor's stays behind)."""
    listening = Listening.read(state_dir)
    return listening.port if listening is not None and listening.pid == pid else None


class DaemonProcess:
    """One daemon process; `args` give its `--state-dir` and its `--port` (0 for any free
    port, as tests do). It is waited for until it has written the port it got to
    `state_dir`/listening.json and `health_path` answers there; `stop()` sends SIGTERM."""

    module = ""
    health_path = ""

    def __init__(self, args: Sequence[str], log_path: Path, host: str, state_dir: Path,
                 env: dict[str, str] | None = None, netns: str | None = None,
                 user: int | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        self.host, self.log_path, self.state_dir = host, log_path, state_dir
        self.ssl_context = ssl_context
        command = [sys.executable, "-m", self.module, *args]
        if netns:
            # `ip netns exec` execs the command in place: the daemon keeps the Popen pid.
            command = ["ip", "netns", "exec", netns, *command]
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=dict(os.environ, **(env or {}),
                                                 **{RUN_VARIABLE: this_run().tag}),
                                        cwd=ROOT, user=user)
        self.netns = netns
        self.port = self.wait_listening()
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

    def wait_listening(self, timeout: float = 20.0) -> int:
        """The port this process reports in its listening.json (its own, by pid)."""
        def reported() -> int | None:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.module} exited with {self.process.returncode}:\n"
                                   f"{self.log()}")
            return listening_port(self.state_dir, self.process.pid)
        try:
            port: int = wait_for(reported, timeout, f"{self.module} to write listening.json")
        except AssertionError as error:
            raise RuntimeError(f"{error}:\n{self.log()}") from None
        return port

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
        return end_process(self.process, self._log, sig, timeout)


def end_process(process: subprocess.Popen[bytes], log: IO[bytes], sig: int = signal.SIGTERM,
                timeout: float = 15.0) -> int:
    """Send `sig` to a process still running, wait `timeout` for it (then SIGKILL), close its
    log; its exit status."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    log.close()
    return process.returncode


def stop_all(daemons: Sequence[DaemonProcess]) -> None:
    """SIGTERM to every daemon first, then wait for each: they shut down side by side."""
    for daemon in daemons:
        if daemon.process.poll() is None:
            daemon.process.send_signal(signal.SIGTERM)
    for daemon in daemons:
        daemon.stop()
