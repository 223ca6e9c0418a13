"""`--port 0` on both daemons: each binds any free port, writes where it listens to
STATE_DIR/listening.json (its pid, the real port), logs and announces that port, and removes
the file on SIGTERM; a SIGKILLed one leaves it behind, naming a dead pid. Bad ports are
refused in one line, and 0 is only accepted where a daemon listens (not for a static node)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from zeroconf import DNSQuestionType
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from marco.protocol import SERVICE_TYPE
from marco.serving import LISTENING_FILE, Listening
from tests.support.agent_process import AgentProcess
from tests.support.controller_process import ControllerProcess
from tests.support.daemon import DaemonProcess, listening_port
from tests.support.paths import ROOT

WAIT = 10.0  # seconds, bound of the zeroconf query


def reported(daemon: DaemonProcess) -> Listening:
    """The daemon's listening.json, checked to be its own and to hold a real port."""
    listening = Listening.read(daemon.state_dir)
    assert listening is not None
    assert listening.pid == daemon.process.pid and listening.port == daemon.port
    assert 0 < listening.port < 65536
    return listening


async def announced_port(node: str) -> int | None:
    """The port in `node`'s zeroconf SRV record, as a browser on loopback resolves it."""
    zc = AsyncZeroconf(interfaces=["127.0.0.1"])
    try:
        info = AsyncServiceInfo(SERVICE_TYPE, f"{node}.{SERVICE_TYPE}")
        assert await info.async_request(zc.zeroconf, WAIT * 1000,
                                        question_type=DNSQuestionType.QM), node
        return info.port
    finally:
        await zc.async_close()


def cli(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_agent_on_port_zero_listens_logs_and_announces_the_port_it_got(
        start_agent: Callable[..., AgentProcess], unique_name: Callable[[str], str]) -> None:
    node = unique_name("listen")
    agent = start_agent(node_name=node, announce=True)  # the harness passes --port 0
    listening = reported(agent)
    assert (listening.address, listening.scheme) == ("127.0.0.1", "https")
    assert f"serving node {node} on https://127.0.0.1:{listening.port} as" in agent.log()
    assert asyncio.run(announced_port(node)) == listening.port
    assert agent.stop() == 0
    assert not (agent.state_dir / LISTENING_FILE).exists()


def test_controller_on_port_zero_listens_and_logs_the_port_it_got(
        start_controller: Callable[..., ControllerProcess]) -> None:
    controller = start_controller(extra_args=["--no-discovery"])
    listening = reported(controller)
    assert (listening.address, listening.scheme) == ("127.0.0.1", "https")
    assert f"on https://127.0.0.1:{listening.port} (PAM service" in controller.log()
    assert controller.stop() == 0
    assert not (controller.state_dir / LISTENING_FILE).exists()


def test_a_killed_agents_file_names_a_dead_pid_and_a_restart_writes_its_own(
        start_agent: Callable[..., AgentProcess]) -> None:
    agent = start_agent(pki=None)
    agent.stop(signal.SIGKILL)
    left = Listening.read(agent.state_dir)
    assert left is not None and left.pid == agent.process.pid
    assert listening_port(agent.state_dir, os.getpid()) is None  # not anyone else's port
    again = agent.restarted()
    try:
        assert reported(again).port == agent.port  # back where clients know it
    finally:
        again.stop()


@pytest.mark.parametrize("module", ["agent", "controller"])
def test_bad_ports_are_refused_in_one_line(module: str, secret_file: Path,
                                           tmp_path: Path) -> None:
    for bad in ("70000", "-1", "seven"):
        out = cli(module, "--dev", "--secret-file", str(secret_file), "--state-dir",
                  str(tmp_path), "--port", bad)
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert f"marco-{module}: --port: bad value for port" in out.stderr, out.stderr
    assert not (tmp_path / LISTENING_FILE).exists()


def test_port_zero_is_for_listening_only(secret_file: Path) -> None:
    out = cli("controller", "--dev", "--secret-file", str(secret_file), "--node",
              "rack1=127.0.0.1:0")
    assert out.returncode == 2 and "expected HOST:PORT" in out.stderr, out.stderr
