"""Faults on the namespace fleet, every hop mutual TLS: an agent SIGKILLed mid-execution and
mid-upload and restarted, and the controller restarted. (The cable cut is in
tests/controller/test_discovery.py, a dead agent mid-play in test_ansible.py, the full spool disk
in tests/agent/test_faults.py: a disk has nothing to do with namespaces.)"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from marco.tokens import TokenSigner
from tests.e2e.conftest import Fleet
from tests.support.controller_process import ControllerProcess
from tests.support.users import UnixUser
from tests.support.waiting import wait_for


def inventory(controller: ControllerProcess, token: str) -> dict:
    return controller.get_json("/api/inventory", token)["_meta"]["hostvars"]


def test_agent_killed_mid_execution_and_mid_upload_then_restarted(
        fleet: Fleet, signer: TokenSigner, alice: UnixUser) -> None:
    token = signer.issue(alice.name)
    victim = fleet.agents[2]
    client = victim.client(token)
    finished = client.run(["seq", "1", "2000"]).id
    running = client.start("seq 1 300; sleep 600")
    wait_for(lambda: client.output(running)["next"] >= 300, what="output before the kill")
    client.close()
    with victim.open_socket() as upload:  # mid-upload: 3 of 40 MB sent over TLS
        upload.sendall(f"PUT /v1/files?path=half-{os.getpid()}.bin HTTP/1.1\r\nHost: x\r\n"
                       f"Authorization: Bearer {token}\r\nContent-Length: 40000000\r\n\r\n".encode()
                       + os.urandom(3_000_000))
        wait_for(lambda: any(".marco-" in n for n in os.listdir(alice.home)), what="upload started")
        victim.stop(signal.SIGKILL)
    wait_for(lambda: victim.node_name not in inventory(fleet.controller, token),
             what="the controller noticing the dead agent")
    wait_for(lambda: not any(".marco-" in n for n in os.listdir(alice.home)), what="temp file gone")
    assert not (Path(alice.home) / f"half-{os.getpid()}.bin").exists()

    again = victim.restarted()
    fleet.agents[2] = again
    try:
        wait_for(lambda: victim.node_name in inventory(fleet.controller, token),
                 what="the agent back in the inventory")
        client = again.client(token)
        lines = [line for e in client.output(finished)["events"] for line in e["lines"]]
        assert lines == [str(i) for i in range(1, 2001)]
        assert client.execution(running)["state"] == "lost"
        assert [line for e in client.output(running)["events"] for line in e["lines"]] == \
            [str(i) for i in range(1, 301)]
        assert client.run(["true"]).rc == 0
    finally:
        subprocess.run(["pkill", "-u", alice.name, "-f", "sleep 600"], check=False)


def test_controller_restart_keeps_tokens_and_rebuilds_the_registry(
        fleet: Fleet, signer: TokenSigner, alice: UnixUser, secret_file: Path,
        pam_service: str) -> None:
    token = signer.issue(alice.name)
    assert set(fleet.names) <= set(inventory(fleet.controller, token))
    old = fleet.controller
    old.stop()
    fleet.controller = ControllerProcess(secret_file, fleet.workdir, pam_service=pam_service,
                                         bind=fleet.network.gateway,
                                         mdns_interfaces=[fleet.network.gateway], pki=fleet.pki)
    # The token from before the restart is still good, and zeroconf finds all three again.
    wait_for(lambda: set(fleet.names) <= set(inventory(fleet.controller, token)),
             what="the registry rebuilt")
    out = fleet.ansible(token, "-i", str(Path(__file__).parents[2] / "playbooks" /
                                        "inventory.marco.yml"),
                        "lab", "-m", "command", "-a", "id -un", tool="ansible")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count(alice.name) == 3
