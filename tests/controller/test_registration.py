"""Agents beyond one LAN (issue 15): `marco-agent --controller URL` registers with the
controller over TLS, proved by its node certificate, where no multicast reaches."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from marco.tls import server_trust_context
from marco.tokens import TokenSigner
from tests.support.agent_process import AgentProcess
from tests.support.controller_process import ControllerProcess
from tests.support.netns import NamespaceNetwork, ip
from tests.support.pki import TestPki
from tests.support.run import RunNames
from tests.support.users import UnixUser
from tests.support.waiting import wait_for

# Networks of their own (the e2e fleet and the discovery tests use 0 and 1): one bridge for
# the agent, one the controller listens on; only routing joins them, no multicast crosses.
AGENT_NET, CONTROLLER_NET = 2, 3


@pytest.fixture
def network(run: RunNames) -> Iterator[tuple[NamespaceNetwork, NamespaceNetwork]]:
    agents = NamespaceNetwork(1, run, network=AGENT_NET).create()
    controllers = NamespaceNetwork(1, run, network=CONTROLLER_NET).create()
    # The agent's host reaches the controller's subnet through its own bridge's gateway (the
    # root namespace, where the controller listens on the other bridge's address).
    ip("-n", agents.hosts[0].name, "route", "add", f"{controllers.subnet}.0/24", "via",
       agents.gateway)
    yield agents, controllers
    agents.destroy()
    controllers.destroy()


def nodes_of(controller: ControllerProcess, token: str) -> dict[str, Any]:
    return {n["name"]: n for n in controller.get_json("/api/nodes", token)["nodes"]}


def test_an_agent_registers_across_subnets_without_multicast(
        network: tuple[NamespaceNetwork, NamespaceNetwork], secret_file: Path, tmp_path: Path,
        start_controller, signer: TokenSigner, alice: UnixUser, run: RunNames) -> None:
    agents_net, controllers_net = network
    host = agents_net.hosts[0]
    # The controller's certificate must name the address the agent dials (its own CA here).
    pki = TestPki(tmp_path / "pki", controller_names=(controllers_net.gateway,))
    controller = start_controller(pki=pki, bind=controllers_net.gateway,
                                  mdns_interfaces=[controllers_net.gateway],
                                  extra_args=["--registration-ttl", "3"])
    token = signer.issue(alice.name)
    name = f"far-{run.tag}"
    # It announces too, on its own bridge: the controller browses the other one only.
    agent = AgentProcess(secret_file, tmp_path / "far" / "state", node_name=name,
                         bind=host.address, announce=True, netns=host.name, pki=pki,
                         extra_args=["--controller", controller.url, "--register-every", "1"])
    try:
        hosts = wait_for(lambda: name in (h := controller.inventory_hosts(token)) and h,
                         what="the registered agent in the inventory")
        assert hosts[name]["ansible_host"] == host.address  # where its registration came from
        assert hosts[name]["ansible_port"] == agent.port
        assert nodes_of(controller, token)[name]["source"] == "registered"
        # A command at the address and port the inventory gives, over mutual TLS.
        result = agent.client(token).run(["id", "-un"])
        assert (result.rc, result.stdout.decode().strip()) == (0, alice.name)

        agent.stop()  # SIGTERM: it deregisters before it exits
        assert name not in nodes_of(controller, token)

        revived = agent.restarted()
        agent = revived
        wait_for(lambda: name in controller.inventory_hosts(token), what="the agent back")
        agent.stop(signal.SIGKILL)  # no deregistration: gone once its registration expires
        wait_for(lambda: name not in nodes_of(controller, token), what="registration expiry")
    finally:
        agent.stop()
    assert f"{name} found at {host.address}:{agent.port} (mdns)" not in controller.log()


def test_an_agent_starts_while_the_controller_is_down_and_registers_later(
        start_agent, start_controller, signer: TokenSigner, alice: UnixUser,
        unique_name) -> None:
    controller = start_controller()
    url = controller.url
    controller.stop()
    name = unique_name("later")
    agent = start_agent(node_name=name, extra_args=["--controller", url,
                                                    "--register-retry-max", "1"])
    wait_for(lambda: "cannot register with" in agent.log(), what="a failed registration logged")
    controller = start_controller(port=controller.port)
    token = signer.issue(alice.name)
    hosts = wait_for(lambda: name in (h := controller.inventory_hosts(token)) and h,
                     what="the agent registered once the controller is up")
    assert hosts[name]["ansible_port"] == agent.port
    assert f"listed as {name}" in agent.log()


def test_an_agent_registers_with_each_of_two_controllers_on_its_own(
        start_agent, start_controller, signer: TokenSigner, alice: UnixUser,
        unique_name) -> None:
    """Controllers do not share registrations: the agent registers with each. One down does
    not hold up the other, and is registered with once it is up."""
    first, second = start_controller(), start_controller()
    second_port = second.port
    second.stop()
    name = unique_name("both")
    agent = start_agent(node_name=name, extra_args=[
        "--controller", first.url, "--controller", second.url, "--register-retry-max", "1"])
    token = signer.issue(alice.name)
    wait_for(lambda: name in first.inventory_hosts(token), what="listed by the first")
    wait_for(lambda: f"cannot register with {second.url}" in agent.log(),
             what="the second's failure logged")
    second = start_controller(port=second_port)
    hosts = wait_for(lambda: name in (h := second.inventory_hosts(token)) and h,
                     what="listed by the second once it is up")
    assert hosts[name]["ansible_port"] == agent.port
    assert name in first.inventory_hosts(token)
    agent.stop()  # SIGTERM: it deregisters from both
    assert name not in nodes_of(first, token) and name not in nodes_of(second, token)


class WebCertController(ControllerProcess):
    """A controller whose web port presents `--web-cert` from another CA (`web_ca`)."""

    def __init__(self, web_ca: Path, **kwargs: Any) -> None:
        self.web_ca = web_ca
        super().__init__(**kwargs)

    def wait_healthy(self, timeout: float = 20.0) -> None:
        self.ssl_context = server_trust_context(str(self.web_ca))  # the browsers' view
        super().wait_healthy(timeout)


def test_web_cert_with_registration_is_named_on_both_sides(
        start_agent, secret_file: Path, tmp_path: Path, pki: TestPki, pam_service: str,
        unique_name) -> None:
    """--web-cert from another CA (a public one for browsers): the controller warns at
    start-up, and an agent that cannot register there says why."""
    public = TestPki(tmp_path / "public")
    controller = WebCertController(
        public.ca_file, secret_file=secret_file, log_dir=tmp_path, pam_service=pam_service,
        pki=pki, extra_args=["--web-cert", str(public.controller_cert),
                             "--web-key", str(public.controller_key)])
    try:
        wait_for(lambda: "--web-cert with registration on" in controller.log(),
                 what="the controller's warning")
        agent = start_agent(node_name=unique_name("webcert"),
                            extra_args=["--controller", controller.url])
        wait_for(lambda: "not from the cluster CA (--web-cert?)" in agent.log(),
                 what="the agent naming the likely cause")
    finally:
        controller.stop()
    quiet = WebCertController(
        public.ca_file, secret_file=secret_file, log_dir=tmp_path, pam_service=pam_service,
        pki=pki, extra_args=["--web-cert", str(public.controller_cert), "--web-key",
                             str(public.controller_key), "--no-registration"])
    quiet.stop()
    assert "--web-cert with registration on" not in quiet.log_path.read_text()
