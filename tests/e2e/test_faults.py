"""The controller restarted under the namespace fleet, every hop mutual TLS. (An agent SIGKILLed
mid-execution and mid-upload is in tests/agent/test_faults.py, one dropped from and back in the
inventory in tests/controller/test_discovery.py, the cable cut there too, a dead agent mid-play
in test_ansible.py: each once.)"""

from __future__ import annotations

from marco.tokens import TokenSigner
from tests.e2e.conftest import Fleet
from tests.support.paths import PLAYBOOKS
from tests.support.users import UnixUser
from tests.support.waiting import wait_for


def test_controller_restart_keeps_tokens_and_rebuilds_the_registry(
        fleet: Fleet, signer: TokenSigner, alice: UnixUser) -> None:
    token = signer.issue(alice.name)
    assert set(fleet.names) <= set(fleet.controller.inventory_hosts(token))
    fleet.controller.stop()
    fleet.controller = fleet.controller.restarted()
    # The token from before the restart is still good, and zeroconf finds all three again.
    wait_for(lambda: set(fleet.names) <= set(fleet.controller.inventory_hosts(token)),
             what="the registry rebuilt")
    out = fleet.ansible(token, "-i", str(PLAYBOOKS / "inventory.marco.yml"),
                        "lab", "-m", "command", "-a", "id -un", tool="ansible")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count(alice.name) == 3
