"""Simulated agents against a real controller (issue 15): the simulator is what the controller
sees of agents (zeroconf announcement, mutual TLS, health with the secret proof, goodbye)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from marco.tokens import TokenSigner
from tests.support.pki import TestPki
from tests.support.sim_agents import SimulatorProcess
from tests.support.waiting import wait_for

COUNT = 50


def node_names(controller: Any, token: str) -> set[str]:
    """Every node the controller's registry holds, alive or not (`/api/nodes`)."""
    return {node["name"] for node in controller.get_json("/api/nodes", token)["nodes"]}


def test_fifty_simulated_agents_are_listed_and_leave_with_their_goodbyes(
        start_controller, pki: TestPki, secret_file: Path, signer: TokenSigner, tmp_path: Path,
        unique_name) -> None:
    token = signer.issue("sim-viewer")
    controller = start_controller()
    prefix = unique_name("sim")
    simulator = SimulatorProcess(pki, secret_file, tmp_path, prefix, COUNT + 1,
                                 bad_proof=[f"{prefix}-{COUNT}"])
    impostor = f"{prefix}-{COUNT}"
    wanted = set(simulator.names) - {impostor}
    try:
        def all_listed() -> bool:
            hosts = controller.inventory_hosts(token)
            assert impostor not in hosts, "a simulated agent without the secret proof is listed"
            return wanted <= set(hosts)
        wait_for(all_listed, 60, f"{COUNT} simulated agents in /api/inventory")
        ports = simulator.nodes
        hosts = controller.inventory_hosts(token)
        assert all(hosts[name]["ansible_port"] == ports[name] for name in wanted)
        # The controller did try the impostor (its proof was refused), and never listed it.
        wait_for(lambda: f"answers as node {impostor} without proof" in controller.log(), 30,
                 "the controller to refuse the impostor's proof")
        assert impostor not in node_names(controller, token)
        assert impostor not in controller.inventory_hosts(token)
    finally:
        assert simulator.stop() == 0, simulator.log()
    # Goodbyes remove the nodes from the registry (a health failure would only mark them down).
    wait_for(lambda: not wanted & node_names(controller, token), 30,
             "the simulated agents' goodbyes to remove them")


def test_an_agent_whose_first_health_check_fails_is_listed_without_announcing_again(
        start_controller, pki: TestPki, secret_file: Path, signer: TokenSigner, tmp_path: Path,
        unique_name) -> None:
    """Its announcement was seen and its proof lost once: the controller tries it again (its
    repeated announcements are identical packets, which zeroconf does not pass on)."""
    token = signer.issue("sim-viewer")
    controller = start_controller()
    prefix = unique_name("simretry")
    unlucky = f"{prefix}-1"
    simulator = SimulatorProcess(pki, secret_file, tmp_path, prefix, 3,
                                 fail_first_health=[unlucky])
    try:
        wait_for(lambda: set(simulator.names) <= set(controller.inventory_hosts(token)), 30,
                 "the three simulated agents in /api/inventory, the unlucky one too")
        assert f"failing a health check of {unlucky}" in simulator.log()
    finally:
        assert simulator.stop() == 0, simulator.log()
