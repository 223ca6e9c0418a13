"""Faults: the agent killed mid-execution and mid-upload, a full disk under the spool."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from marco.tokens import TokenSigner
from tests.support.agent_process import AgentProcess
from tests.support.users import UnixUser
from tests.support.waiting import wait_for


def test_sigkill_mid_execution_keeps_every_record(start_agent, signer: TokenSigner,
                                                   alice: UnixUser) -> None:
    agent = start_agent()
    client = agent.client(signer.issue(alice.name))
    finished = client.run(["seq", "1", "3000"]).id
    running = client.start("seq 1 500; sleep 600")
    wait_for(lambda: client.output(running)["next"] >= 500, what="output before the kill")
    agent.stop(signal.SIGKILL)
    again = agent.restarted()
    try:
        client = again.client(signer.issue(alice.name))
        replayed = client.output(finished)
        lines = [line for e in replayed["events"] for line in e["lines"]]
        assert lines == [str(i) for i in range(1, 3001)]
        lost = client.execution(running)
        assert lost["state"] == "lost"
        assert [line for e in client.output(running)["events"] for line in e["lines"]] == \
            [str(i) for i in range(1, 501)]
        assert client.run(["true"]).rc == 0  # and it works as before
    finally:
        again.stop()
        subprocess.run(["pkill", "-u", alice.name, "-f", "sleep 600"], check=False)


def test_sigkill_under_a_silent_execution_finds_it_lost(start_agent, signer: TokenSigner,
                                                        alice: UnixUser) -> None:
    """A running execution without output is recorded too (after agent.executions'
    RECORD_DELAY, not at its start: most end sooner and are recorded once, at their end)."""
    agent = start_agent()
    client = agent.client(signer.issue(alice.name))
    running = client.start(["sleep", "600"])
    meta = agent.state_dir / "executions" / running / "meta.json"
    wait_for(meta.exists, what="the running execution's record")
    agent.stop(signal.SIGKILL)
    again = agent.restarted()
    try:
        lost = again.client(signer.issue(alice.name)).execution(running)
        assert lost["state"] == "lost" and lost["command"] == ["sleep", "600"]
    finally:
        again.stop()
        subprocess.run(["pkill", "-u", alice.name, "-f", "sleep 600"], check=False)


def test_sigkill_mid_upload_leaves_no_file(start_agent, signer: TokenSigner,
                                           alice: UnixUser) -> None:
    agent = start_agent()
    token = signer.issue(alice.name)
    with agent.open_socket() as sock:
        sock.sendall(f"PUT /v1/files?path=half.bin HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: Bearer {token}\r\nContent-Length: 50000000\r\n\r\n".encode()
                     + os.urandom(4_000_000))
        wait_for(lambda: any(".marco-" in n for n in os.listdir(alice.home)), what="upload started")
        agent.stop(signal.SIGKILL)
    # The helper (a process of alice's) sees its input end without a commit and cleans up.
    wait_for(lambda: not any(".marco-" in n for n in os.listdir(alice.home)), what="temp file gone")
    assert not (Path(alice.home) / "half.bin").exists()


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_spool_disk_degrades_cleanly(tiny_disk: Path, secret_file: Path, signer: TokenSigner,
                                          alice: UnixUser, pki) -> None:
    agent = AgentProcess(secret_file, tiny_disk / "state", node_name="tiny", pki=pki)
    try:
        client = agent.client(signer.issue(alice.name))
        result = client.run(["seq", "1", "1000000"])  # ~7 MB of output, 2 MB of disk
        assert result.rc == 0
        assert result.stdout == "".join(f"{i}\n" for i in range(1, 1_000_001)).encode()
        state = client.execution(result.id)
        assert state["state"] == "exited" and state["truncated_seq"] is not None
        replay = client.output(result.id)
        assert replay["truncated_seq"] == state["truncated_seq"]
        lines = [line for e in replay["events"] for line in e["lines"]]
        assert lines == [str(i) for i in range(1, len(lines) + 1)]  # a clean prefix, no torn line
        time.sleep(0.2)
        assert client.health()["node"] == "tiny" and client.run(["true"]).rc == 0
    finally:
        agent.stop()
