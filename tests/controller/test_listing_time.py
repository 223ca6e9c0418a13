"""A new agent is listed soon after it starts, and only when it is safe (issue 15, item 5).

Real agents and a real controller on loopback, discovered by zeroconf. The speed itself is
measured by bench/listing_time.py, never asserted here: these tests bound it generously and check
what listing fast must not cost: a name held by one agent at a time, and the secret proof.
"""

from __future__ import annotations

import asyncio
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from zeroconf import ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

from marco.protocol import SERVICE_TYPE
from marco.tokens import TokenSigner, create_secret
from tests.support.agent_process import AgentProcess
from tests.support.controller_process import ControllerProcess
from tests.support.daemon import stop_all
from tests.support.pki import TestPki
from tests.support.users import UnixUser
from tests.support.waiting import wait_for

LISTED_WITHIN = 15.0  # seconds: a generous bound (about 0.6 s when idle, see the bench)


def listed_port(controller: ControllerProcess, token: str, name: str) -> int | None:
    """The port /api/inventory lists `name` at, None while it is not listed."""
    host = controller.inventory_hosts(token).get(name)
    return None if host is None else int(host["ansible_port"])


def ports_listed_in_turn(controller: ControllerProcess, name: str) -> list[int]:
    """The ports the controller's registry put `name` at, in order (its 'found at' and 'is up
    at' log lines): each is a moment the inventory pointed at that agent."""
    pattern = rf"node {re.escape(name)} (?:found|is up) at 127\.0\.0\.1:(\d+)"
    return [int(port) for port in re.findall(pattern, controller.log())]


def test_a_new_agent_is_listed_within_a_bound(start_agent, start_controller, signer: TokenSigner,
                                              alice: UnixUser, unique_name) -> None:
    token = signer.issue(alice.name)
    controller = start_controller()
    name = unique_name("fast")
    began = time.monotonic()
    agent = start_agent(node_name=name, announce=True)
    wait_for(lambda: listed_port(controller, token, name) == agent.port, LISTED_WITHIN,
             what=f"{name} in /api/inventory", interval=0.01)
    print(f"\n{name} listed {time.monotonic() - began:.3f} s after its process started")
    # The controller resolved and proved it on its announcement, and says how long each took.
    assert re.search(rf"listed {re.escape(name)}: resolved in [\d.]+ s, proved in [\d.]+ s",
                     controller.log())


def test_two_agents_started_at_once_with_one_name_are_never_both_listed(
        secret_file: Path, tmp_path: Path, pki: TestPki, start_controller,
        signer: TokenSigner, alice: UnixUser, unique_name) -> None:
    """Both pass the name check before either announces; each then hears the other announce
    the name, and the one that started later withdraws and exits (code 2, as on a clash found
    at start). The inventory names one of them and never goes back and forth."""
    token = signer.issue(alice.name)
    controller = start_controller()
    name = unique_name("twin")
    pki.agent_bundle(name)  # one certificate for the name, issued before both start

    def start(index: int) -> AgentProcess:
        return AgentProcess(secret_file, tmp_path / f"twin{index}" / "state", node_name=name,
                            announce=True, pki=pki)

    with ThreadPoolExecutor(2) as pool:
        agents = list(pool.map(start, (0, 1)))
    try:
        exited = wait_for(lambda: [a for a in agents if a.process.poll() is not None],
                          LISTED_WITHIN, what="one of the twins to give up the name")
        assert len(exited) == 1, "both twins gave up the name"
        loser = exited[0]
        survivor = next(agent for agent in agents if agent is not loser)
        assert loser.process.returncode == 2, loser.log()
        reason = re.search(r"already announced|announced at the same time", loser.log())
        assert reason, loser.log()
        print(f"\nthe loser: {reason.group(0)}; listed in turn: "
              f"{ports_listed_in_turn(controller, name)}, survivor {survivor.port}")
        wait_for(lambda: listed_port(controller, token, name) == survivor.port, LISTED_WITHIN,
                 what="the survivor in /api/inventory")
        assert survivor.process.poll() is None
        turns = ports_listed_in_turn(controller, name)
        # The loser may have been listed first (it proved itself first); once the survivor is
        # listed, the name never goes back to the loser.
        assert turns and turns[-1] == survivor.port, turns
        assert loser.port not in turns[turns.index(survivor.port):], turns
    finally:
        stop_all(agents)


def test_the_controller_keeps_a_name_with_the_agent_that_still_holds_it(
        secret_file: Path, tmp_path: Path, pki: TestPki, start_agent, start_controller,
        signer: TokenSigner, alice: UnixUser, unique_name) -> None:
    """A second responder announces a listed node's name, pointing at another real agent of
    the cluster with that name (it proves itself): the controller keeps the agent listed first
    while it still answers, and never lists the other under the name."""
    token = signer.issue(alice.name)
    controller = start_controller()
    name = unique_name("held")
    holder = start_agent(node_name=name, announce=True)
    wait_for(lambda: listed_port(controller, token, name) == holder.port, LISTED_WITHIN,
             what="the holder in /api/inventory")
    other = AgentProcess(secret_file, tmp_path / "other" / "state", node_name=name, pki=pki)

    async def announce_the_other() -> None:
        zc = AsyncZeroconf(interfaces=["127.0.0.1"])
        # A later `since`: the holder keeps its name (and announces it again) rather than yield.
        info = ServiceInfo(SERVICE_TYPE, f"{name}.{SERVICE_TYPE}", port=other.port,
                           properties={"node": name, "proto": "1", "tls": "1",
                                       "since": f"{time.time() + 3600:.3f}"},
                           server=f"{name}.local.", parsed_addresses=["127.0.0.1"])
        try:
            await zc.async_register_service(info, cooperating_responders=True)
            deadline = time.monotonic() + LISTED_WITHIN
            while "still holds" not in controller.log():
                assert time.monotonic() < deadline, "the controller never weighed the clash"
                await asyncio.sleep(0.05)
        finally:
            await zc.async_close()  # no goodbye: that would be a forged one for the holder

    try:
        asyncio.run(announce_the_other())
        assert listed_port(controller, token, name) == holder.port
        assert other.port not in ports_listed_in_turn(controller, name)
        assert holder.process.poll() is None, holder.log()
    finally:
        other.stop()


def test_an_agent_failing_the_secret_proof_is_never_listed(
        tmp_path: Path, pki: TestPki, start_agent, start_controller, signer: TokenSigner,
        alice: UnixUser, unique_name) -> None:
    """A real agent with a valid certificate but another cluster's secret announces itself:
    the controller resolves it at once, the proof fails, and it is not listed; a real agent
    announced after it is listed meanwhile, so its announcement was handled."""
    token = signer.issue(alice.name)
    controller = start_controller()
    stranger_secret = tmp_path / "other-secret"
    create_secret(stranger_secret)
    stranger_name, good_name = unique_name("stranger"), unique_name("good")
    stranger = AgentProcess(stranger_secret, tmp_path / "stranger" / "state",
                            node_name=stranger_name, announce=True, pki=pki)
    try:
        wait_for(lambda: f"as node {stranger_name} without proof of the cluster secret"
                 in controller.log(), LISTED_WITHIN, what="the failed proof")
        good = start_agent(node_name=good_name, announce=True)
        wait_for(lambda: listed_port(controller, token, good_name) == good.port, LISTED_WITHIN,
                 what="the good agent in /api/inventory")
        assert stranger_name not in controller.inventory_hosts(token)
        nodes = {node["name"] for node in controller.get_json("/api/nodes", token)["nodes"]}
        assert stranger_name not in nodes
        assert stranger.process.poll() is None  # it still runs and announces: just not listed
    finally:
        stranger.stop()
