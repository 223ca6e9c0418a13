"""Thirty real agents in network namespaces on one bridge, all listed by a controller of their
own, and one `ansible-playbook` across all of them through its inventory (issue 15, item 1, at
the size CI affords; bench/hundred_agents.py runs 100)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from marco.tokens import TokenSigner
from tests.e2e.test_ansible import recap
from tests.support.agent_process import AgentProcess
from tests.support.controller_process import ControllerProcess
from tests.support.daemon import stop_all
from tests.support.netns import NamespaceHost, NamespaceNetwork
from tests.support.paths import BIN, PLAYBOOKS
from tests.support.pki import TestPki
from tests.support.run import RunNames
from tests.support.users import UnixUser
from tests.support.waiting import wait_for

COUNT = 30
NETWORK = 2  # 0 and 1 are test_discovery's and the e2e fleet's
STARTING_AT_ONCE = 10
PLAY = """- hosts: all
  gather_facts: false
  tasks:
    - command: id -un
      register: who
    - assert: {that: who.stdout == expected_user}
    - copy:
        content: "{{ inventory_hostname }}\\n"
        dest: "{{ many_dir }}/{{ inventory_hostname }}.txt"
"""


@pytest.fixture
def network(run: RunNames) -> Iterator[NamespaceNetwork]:
    """A controller's namespace and COUNT agents' on one bridge, removed even on failure."""
    net = NamespaceNetwork(COUNT + 1, run, network=NETWORK).create()
    yield net
    net.destroy()


def start_agents(network: NamespaceNetwork, secret_file: Path, tmp_path: Path, pki: TestPki,
                 run: RunNames) -> list[AgentProcess]:
    """One agent per namespace but the first, STARTING_AT_ONCE at a time (each waited until it
    serves); all stopped if one fails to start."""
    started: list[AgentProcess] = []
    pki.client_tls()  # the CA's files are written here, before the threads (one writer)
    for index in range(1, len(network.hosts)):
        pki.agent_bundle(f"many{index}-{run.tag}")

    def start(indexed: tuple[int, NamespaceHost]) -> AgentProcess:
        index, host = indexed
        agent = AgentProcess(secret_file, tmp_path / f"m{index}" / "state",
                             node_name=f"many{index}-{run.tag}", bind=host.address,
                             announce=True, netns=host.name, pki=pki)
        started.append(agent)
        return agent

    try:
        with ThreadPoolExecutor(STARTING_AT_ONCE) as pool:
            return list(pool.map(start, enumerate(network.hosts[1:], 1)))
    except BaseException:
        stop_all(started)
        raise


def playbook(controller: ControllerProcess, pki: TestPki, token: str, tmp_path: Path,
             user: UnixUser, target: Path) -> subprocess.CompletedProcess[str]:
    """The play across the controller's inventory (playbooks/inventory.marco.yml), forks 30."""
    play = tmp_path / "many.yml"
    play.write_text(PLAY)
    home = tmp_path / "ansible-home"
    home.mkdir()
    env = {"PATH": f"{BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
           "MARCO_CONTROLLER": controller.url, "MARCO_TOKEN": token,
           "ANSIBLE_CONFIG": str(PLAYBOOKS / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
           **pki.client_env()}
    return subprocess.run([str(BIN / "ansible-playbook"), str(play), "--forks", str(COUNT),
                           "-e", f"many_dir={target}", "-e", f"expected_user={user.name}"],
                          cwd=PLAYBOOKS, env=env, capture_output=True, text=True, timeout=300)


def left_behind(network: NamespaceNetwork, agents: list[AgentProcess]) -> list[str]:
    """The herd's namespaces, bridge and agent processes still there."""
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    bridge = subprocess.run(["ip", "link", "show", network.bridge], capture_output=True)
    return ([host.name for host in network.hosts if host.name in namespaces.split()]
            + ([network.bridge] if bridge.returncode == 0 else [])
            + [agent.node_name for agent in agents if agent.process.poll() is None])


def test_thirty_agents_listed_and_one_playbook_across_them(
        network: NamespaceNetwork, secret_file: Path, tmp_path: Path, run: RunNames,
        pam_service: str, signer: TokenSigner, alice: UnixUser) -> None:
    controller_host = network.hosts[0]
    # A CA of the test's own: the controller's certificate names its namespace's address.
    pki = TestPki(tmp_path / "pki", controller_names=(controller_host.address,))
    controller = ControllerProcess(secret_file, tmp_path, pam_service=pam_service,
                                   bind=controller_host.address,
                                   mdns_interfaces=[controller_host.address], pki=pki,
                                   netns=controller_host.name,
                                   extra_args=["--health-interval", "2"])
    agents: list[AgentProcess] = []
    target = Path(alice.home) / f"many-{run.tag}"
    try:
        agents = start_agents(network, secret_file, tmp_path, pki, run)
        names = {agent.node_name for agent in agents}
        token = signer.issue(alice.name)
        hosts = wait_for(lambda: names <= set(h := controller.inventory_hosts(token)) and h,
                         timeout=120, what=f"{COUNT} namespace agents in the inventory")
        assert {hosts[agent.node_name]["ansible_host"] for agent in agents} == {
            host.address for host in network.hosts[1:]}

        subprocess.run(["install", "-d", "-o", alice.name, str(target)], check=True)
        out = playbook(controller, pki, token, tmp_path, alice, target)
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
        result = recap(out.stdout)
        assert set(result) == names, sorted(set(result) ^ names)
        for name in names:
            assert result[name]["failed"] == 0 and result[name]["unreachable"] == 0, result[name]
            assert result[name]["ok"] == 3, result[name]
            made = target / f"{name}.txt"
            assert made.read_text() == f"{name}\n"
            assert made.stat().st_uid == alice.uid  # written as alice by each agent
    finally:
        stop_all([*agents, controller])
        network.destroy()
        shutil.rmtree(target, ignore_errors=True)
    assert left_behind(network, agents) == []
