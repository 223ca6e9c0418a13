"""Three namespace hosts with agents, a controller on the bridge, and a way to run Ansible.

The fleet's node names carry the run's tag: a controller hears every mDNS goodbye on the
machine (its socket takes the group's packets of any interface), so another fleet's `e2e1`
leaving would make it forget its own. One fleet per test run: the e2e tests share it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from marco.tokens import TokenSigner
from tests.support.agent_process import AgentProcess
from tests.support.controller_process import ControllerProcess
from tests.support.daemon import stop_all
from tests.support.netns import NamespaceNetwork
from tests.support.paths import BIN, PLAYBOOKS
from tests.support.pki import TestPki
from tests.support.run import RunNames
from tests.support.users import UnixUser
from tests.support.waiting import wait_for


@dataclass
class Fleet:
    network: NamespaceNetwork
    controller: ControllerProcess
    agents: list[AgentProcess]
    names: list[str]
    workdir: Path
    pki: TestPki

    def env(self, token: str) -> dict[str, str]:
        home = self.workdir / "home"
        home.mkdir(exist_ok=True)
        return {"PATH": f"{BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(home),
                "MARCO_CONTROLLER": self.controller.url, "MARCO_TOKEN": token,
                "ANSIBLE_CONFIG": str(PLAYBOOKS / "ansible.cfg"), "LANG": "C.UTF-8",
                "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_NOCOLOR": "1", **self.pki.client_env()}

    def ansible(self, token: str, *args: str, tool: str = "ansible-playbook",
                timeout: float = 300, **popen: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / tool), *args], cwd=PLAYBOOKS, env=self.env(token),
                              capture_output=True, text=True, timeout=timeout, **popen)  # type: ignore[call-overload]


def only_fleet_of_the_run(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Fails the fleet's setup when another pytest-xdist worker of this run has set up one: the
    e2e tests are meant to run on one worker (tests/conftest.py, PlaceGroupScheduling), and two
    fleets cost twice the setup and would share what is machine-wide (mDNS)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return
    claim = tmp_path_factory.getbasetemp().parent / "e2e-fleet"  # the run's, above the workers'
    try:
        with claim.open("x") as mine:
            mine.write(os.environ["PYTEST_XDIST_WORKER"])
    except FileExistsError:
        pytest.fail(f"worker {claim.read_text()} of this run has an e2e fleet already: the "
                    f"tests/e2e/ tests were spread over pytest-xdist workers", pytrace=False)


@pytest.fixture(scope="session")
def fleet(secret_file: Path, signer: TokenSigner, alice: UnixUser, pam_service: str,
          tmp_path_factory: pytest.TempPathFactory, pki: TestPki, run: RunNames) -> Iterator[Fleet]:
    only_fleet_of_the_run(tmp_path_factory)
    workdir = tmp_path_factory.mktemp("fleet")
    os.chmod(workdir, 0o755)
    network = NamespaceNetwork(3, run, network=1).create()
    controller = None
    agents: list[AgentProcess] = []  # tests may replace members (restarts): stopped all the same
    fleet = None
    try:
        controller = ControllerProcess(secret_file, workdir, pam_service=pam_service,
                                       bind=network.gateway, mdns_interfaces=[network.gateway],
                                       pki=pki)
        for index, host in enumerate(network.hosts, 1):
            agents.append(AgentProcess(secret_file, workdir / f"h{index}" / "state",
                                       node_name=f"e2e{index}-{run.tag}", bind=host.address,
                                       announce=True, netns=host.name,
                                       extra_args=["--groups", "lab"], pki=pki))
        names = [a.node_name for a in agents]
        token = signer.issue(alice.name)
        wait_for(lambda: set(names) <= set(controller.inventory_hosts(token)),
                 what="three namespace agents in the inventory")
        fleet = Fleet(network, controller, agents, names, workdir, pki)
        yield fleet
    finally:
        controllers = {id(c): c for c in (controller, fleet and fleet.controller) if c}
        stop_all([*agents, *controllers.values()])  # the fixture's and any a test restarted
        network.destroy()
