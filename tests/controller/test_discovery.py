"""Live discovery against real agents: loopback, network namespaces, deaths without goodbye."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from marco.tokens import TokenSigner
from tests.support.agent_process import AgentProcess
from tests.support.netns import NamespaceNetwork
from tests.support.run import RunNames
from tests.support.users import UnixUser
from tests.support.waiting import wait_for


def test_finds_agents_on_loopback_and_drops_a_killed_one(start_agent, start_controller,
                                                         signer: TokenSigner, alice: UnixUser,
                                                         unique_name) -> None:
    token = signer.issue(alice.name)
    controller = start_controller()
    names = [unique_name("loop"), unique_name("loop")]
    agents = [start_agent(node_name=name, announce=True, extra_args=["--groups", "web,db"])
              for name in names]
    hosts = wait_for(lambda: (h := controller.inventory_hosts(token)) and set(names) <= set(h) and h,
                     what="both agents in the inventory")
    for name, agent in zip(names, agents, strict=True):
        assert hosts[name]["ansible_host"] == "127.0.0.1"
        assert hosts[name]["ansible_port"] == agent.port
        assert hosts[name]["ansible_connection"] == "marco.fleet.marco"
        assert hosts[name]["marco_groups"] == "web,db"
    inventory = controller.get_json("/api/inventory", token)
    assert set(names) <= set(inventory["web"]["hosts"]) and set(names) <= set(inventory["db"]["hosts"])
    # A group per OS, named as the machine names itself (these agents run here).
    os_group = platform.freedesktop_os_release().get("ID", "").lower() or platform.system().lower()
    assert set(names) <= set(inventory[os_group]["hosts"]), sorted(inventory)

    # SIGKILL: no goodbye. The health probe notices; the node leaves the inventory.
    agents[0].stop(signal.SIGKILL)
    wait_for(lambda: names[0] not in controller.inventory_hosts(token), what="dead agent to leave")
    nodes = {n["name"]: n for n in controller.get_json("/api/nodes", token)["nodes"]}
    assert nodes[names[0]]["alive"] is False and nodes[names[1]]["alive"] is True

    # It comes back when it returns (same port, announced again).
    revived = agents[0].restarted()
    try:
        wait_for(lambda: names[0] in controller.inventory_hosts(token), what="agent to return")
    finally:
        revived.stop()
    # A goodbye (SIGTERM) removes it at once.
    wait_for(lambda: names[0] not in controller.inventory_hosts(token), what="goodbye")


def test_static_nodes_need_no_mdns(start_agent, start_controller, signer: TokenSigner,
                                   alice: UnixUser) -> None:
    agent = start_agent(node_name="rack1")
    # The second entry names a node whose certificate the agent does not have: over mutual
    # TLS the controller checks the name, so that entry stays down with the reason.
    controller = start_controller(extra_args=["--no-discovery",
                                              "--node", f"rack1={agent.host}:{agent.port}",
                                              "--node", f"rack9={agent.host}:{agent.port}"])
    token = signer.issue(alice.name)
    hosts = wait_for(lambda: (h := controller.inventory_hosts(token)).get("rack1", {}).get(
        "marco_version") and h, what="static node probed")
    assert hosts["rack1"]["ansible_port"] == agent.port and hosts["rack1"]["marco_node"] == "rack1"
    assert "rack9" not in hosts
    nodes = {n["name"]: n for n in controller.get_json("/api/nodes", token)["nodes"]}
    assert not nodes["rack9"]["alive"] and "not valid for 'rack9'" in nodes["rack9"]["error"]
    agent.stop(signal.SIGKILL)
    wait_for(lambda: "rack1" not in controller.inventory_hosts(token), what="static node down")


def test_inventory_needs_a_login(start_controller) -> None:
    controller = start_controller()
    with pytest.raises(Exception) as caught:
        controller.get_json("/api/inventory", "forged-token")
    assert "401" in str(caught.value)


@pytest.fixture
def network(run: RunNames) -> Any:
    net = NamespaceNetwork(3, run, network=0).create()
    yield net
    net.destroy()


def test_agents_in_network_namespaces_on_a_bridge(network: NamespaceNetwork, secret_file: Path,
                                                  tmp_path: Path, start_controller,
                                                  signer: TokenSigner, alice: UnixUser) -> None:
    token = signer.issue(alice.name)
    controller = start_controller(bind=network.gateway, mdns_interfaces=[network.gateway])
    agents = []
    try:
        for index, host in enumerate(network.hosts):
            agents.append(AgentProcess(secret_file, tmp_path / f"ns{index}" / "state",
                                       node_name=f"nshost{index + 1}", bind=host.address,
                                       announce=True, netns=host.name,
                                       extra_args=["--groups", "lab"], pki=controller.pki))
        started = time.monotonic()
        wanted = {"nshost1", "nshost2", "nshost3"}
        hosts = wait_for(lambda: wanted <= set(h := controller.inventory_hosts(token)) and h,
                         what="three namespace agents")
        print(f"\nthree namespace agents in the inventory {time.monotonic() - started:.2f}s "
              "after they were healthy")
        assert {hosts[f"nshost{i + 1}"]["ansible_host"] for i in range(3)} == {
            h.address for h in network.hosts}
        # Pull one host's cable: it leaves, the others stay.
        network.cut(network.hosts[1])
        wait_for(lambda: "nshost2" not in controller.inventory_hosts(token), what="cut host")
        assert {"nshost1", "nshost3"} <= set(controller.inventory_hosts(token))
        network.reconnect(network.hosts[1])
        wait_for(lambda: "nshost2" in controller.inventory_hosts(token), what="host back")
    finally:
        for agent in agents:
            agent.stop()


def test_ansible_inventory_reads_the_controller(start_agent, start_controller,
                                                signer: TokenSigner, alice: UnixUser,
                                                unique_name, tmp_path: Path) -> None:
    """The real `ansible-inventory` CLI through the `marco-inventory` script."""
    import shutil
    import sys
    script = Path(sys.executable).parent / "marco-inventory"
    assert script.exists(), "marco-inventory is installed with the package (pip install -e .)"
    controller = start_controller()
    name = unique_name("inv")
    start_agent(node_name=name, announce=True, extra_args=["--groups", "web"])
    token = signer.issue(alice.name)
    wait_for(lambda: name in controller.inventory_hosts(token), what="agent")
    env = {"MARCO_CONTROLLER": controller.url, "MARCO_TOKEN": token,
           "MARCO_TLS_CA": str(controller.pki.ca_file),  # to trust the controller's HTTPS
           "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path),
           "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp")}
    ansible_inventory = shutil.which("ansible-inventory", path=env["PATH"])
    assert ansible_inventory
    listed = subprocess.run([ansible_inventory, "-i", str(script), "--list"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    import json
    data = json.loads(listed.stdout)
    assert name in data["web"]["hosts"]
    assert data["_meta"]["hostvars"][name]["ansible_connection"] == "marco.fleet.marco"
    graph = subprocess.run([ansible_inventory, "-i", str(script), "--graph"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert graph.returncode == 0 and "@web:" in graph.stdout and name in graph.stdout
    bad = subprocess.run([str(script), "--list"], env={**env, "MARCO_TOKEN": "forged"},
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "401" in bad.stderr and "marco login" in bad.stderr


def test_impostors_on_the_lan_are_not_nodes(start_agent, start_controller, signer: TokenSigner,
                                            alice: UnixUser, unique_name, pki,
                                            tmp_path: Path) -> None:
    """Anyone can announce `_marco._tcp`. A rogue agent with a certificate from another CA
    (claiming a real node's name) fails the TLS check; one with a stolen certificate of this
    CA but without the cluster secret fails the secret proof. Neither gets a name, and in
    particular neither takes over a real node's name (and the tokens sent to it)."""
    import asyncio
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from zeroconf import ServiceInfo
    from zeroconf.asyncio import AsyncZeroconf

    from controller.pki import ClusterPki
    from marco.protocol import SERVICE_TYPE
    from marco.tls import ServerTlsFiles

    class FakeAgent(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            body = b'{"node": "%s", "version": "0.1.0", "proto": 1, "proof": "00"}' % (
                self.server.claimed.encode())  # type: ignore[attr-defined]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    def fake_agent(ca: ClusterPki, claimed: str) -> ThreadingHTTPServer:
        bundle = ca.issue(claimed, "agent", out_dir=tmp_path / f"{claimed}-bundle")
        server = ThreadingHTTPServer(("127.0.0.1", 0), FakeAgent)
        server.claimed = claimed  # type: ignore[attr-defined]
        context = ServerTlsFiles(str(bundle.cert_file), str(bundle.key_file), str(ca.ca_file),
                                 require_client_cert=False).context()
        server.socket = context.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    token = signer.issue(alice.name)
    victim = unique_name("victim")
    newcomer = unique_name("newcomer")
    foreign = ClusterPki(tmp_path / "foreign-ca")
    foreign.init()
    rogue = fake_agent(foreign, victim)        # the right name, another CA
    rogue_static = fake_agent(foreign, "rack9")
    stolen = fake_agent(pki, newcomer)          # this CA's certificate, no cluster secret
    real = start_agent(node_name=victim, announce=True)
    static = start_agent(node_name="rack9")
    controller = start_controller(extra_args=["--node", f"rack9={static.host}:{static.port}"])
    wait_for(lambda: victim in controller.inventory_hosts(token), what="the real agent")

    async def impostors() -> None:
        zc = AsyncZeroconf(interfaces=["127.0.0.1"])
        infos = [ServiceInfo(SERVICE_TYPE, f"{label}-{os.getpid()}.{SERVICE_TYPE}",
                             port=server.server_address[1],
                             properties={"node": claimed, "proto": "1", "tls": "1"},
                             server=f"{label}-{os.getpid()}.local.", parsed_addresses=["127.0.0.1"])
                 for label, claimed, server in (("evil1", victim, rogue),
                                                ("evil2", "rack9", rogue_static),
                                                ("evil3", newcomer, stolen))]
        try:
            for info in infos:
                await zc.async_register_service(info)
            # The positive events first: the controller saw and refused each impostor.
            seen = (f"refusing {victim} at 127.0.0.1:{rogue.server_address[1]}",
                    f"refusing rack9 at 127.0.0.1:{rogue_static.server_address[1]}",
                    f"as node {newcomer} without proof of the cluster secret")
            deadline = time.monotonic() + 30
            while not all(text in controller.log() for text in seen):
                assert time.monotonic() < deadline, f"refusals not all logged: {seen}"
                await asyncio.sleep(0.2)
            hosts = controller.inventory_hosts(token)
            assert hosts[victim]["ansible_port"] == real.port
            assert hosts["rack9"]["ansible_port"] == static.port
            assert newcomer not in hosts
            nodes = {n["name"] for n in controller.get_json("/api/nodes", token)["nodes"]}
            assert newcomer not in nodes
        finally:
            for info in infos:
                await zc.async_unregister_service(info)
            await zc.async_close()

    try:
        asyncio.run(impostors())
    finally:
        for server in (rogue, rogue_static, stolen):
            server.shutdown()
    log = controller.log()
    assert "without proof of the cluster secret" in log
    assert "not issued by this cluster's CA" in log


def test_a_forged_goodbye_does_not_remove_a_live_node(start_agent, start_controller,
                                                      signer: TokenSigner,
                                                      alice: UnixUser) -> None:
    """Anyone on the LAN can send an mDNS goodbye (a record with TTL 0) for any node's service.
    The controller asks the node first and keeps one that still proves itself; the agent's own
    goodbye comes after it stopped taking connections, so that one still removes it."""
    import asyncio

    from zeroconf import DNSOutgoing, DNSPointer, const
    from zeroconf.asyncio import AsyncZeroconf

    from marco.protocol import SERVICE_TYPE

    token = signer.issue(alice.name)
    agent = start_agent(node_name=f"forged-{os.getpid()}", announce=True)
    other = start_agent(node_name=f"honest-{os.getpid()}", announce=True)
    controller = start_controller()
    wait_for(lambda: {agent.node_name, other.node_name} <= set(controller.inventory_hosts(token)),
             what="the agents")

    async def forge_goodbye() -> None:
        zc = AsyncZeroconf(interfaces=["127.0.0.1"])
        try:
            await zc.zeroconf.async_wait_for_start()  # before it, a send goes nowhere
            goodbye = DNSOutgoing(const._FLAGS_QR_RESPONSE | const._FLAGS_AA)
            goodbye.add_answer_at_time(DNSPointer(SERVICE_TYPE, const._TYPE_PTR,
                                                  const._CLASS_IN, 0,
                                                  f"{agent.node_name}.{SERVICE_TYPE}"), 0)
            zc.zeroconf.async_send(goodbye)
        finally:
            await zc.async_close()

    asyncio.run(forge_goodbye())
    wait_for(lambda: f"a goodbye for node {agent.node_name} came while it still answers"
             in controller.log(), what="the forged goodbye checked")
    assert agent.node_name in controller.inventory_hosts(token)
    assert f"node {agent.node_name} left" not in controller.log()
    other.stop()  # its own goodbye, after it stopped taking connections: believed
    wait_for(lambda: f"node {other.node_name} left" in controller.log(), what="the real goodbye")
    assert other.node_name not in controller.inventory_hosts(token)
    agent.stop()  # the forged goodbye emptied the browser's cache: the health checks see it go
    wait_for(lambda: agent.node_name not in controller.inventory_hosts(token),
             what="the first agent to leave")


def test_controller_restart_rebuilds_the_registry_and_keeps_tokens(
        start_agent, start_controller, signer: TokenSigner, alice: UnixUser, unique_name) -> None:
    token = signer.issue(alice.name)
    name = unique_name("restart")
    start_agent(node_name=name, announce=True)
    first = start_controller()
    wait_for(lambda: name in first.inventory_hosts(token), what="agent")
    first.stop()
    second = first.restarted()  # same state dir and port; the registry lives in memory only
    try:
        wait_for(lambda: name in second.inventory_hosts(token), what="agent after the restart")
    finally:
        second.stop()
