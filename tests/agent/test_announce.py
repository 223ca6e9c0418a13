"""Tests of agent.announce: the interface policy, the TXT record, and real zeroconf on loopback.

The discovery test runs two real marco-agent processes (distinct zeroconf instances
sharing UDP 5353 on 127.0.0.1, as on a real host running several agents), browses from the test
process with QM questions, and stops one agent with SIGTERM to check its goodbye is seen.
No `ip link set lo multicast` is needed: zeroconf sets IP_MULTICAST_IF/IP_ADD_MEMBERSHIP on
127.0.0.1 explicitly, which Linux honours without the MULTICAST flag on lo.
The clash test keeps other zeroconf processes on 127.0.0.1:5353, where zeroconf's own QU probes
miss the defender's unicast answer; Announcer's QM check must still catch the clash.
"""

from __future__ import annotations

import asyncio
import os
import platform
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from zeroconf import (
    DNSIncoming,
    DNSOutgoing,
    DNSQuestionType,
    DNSService,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf
from zeroconf.const import _CLASS_IN, _FLAGS_AA, _FLAGS_QR_RESPONSE, _TYPE_SRV

from agent import __version__
from agent.announce import CLASH_CHECK_SECONDS, Announcement, Announcer, dns_label
from marco.errors import ConfigError
from marco.protocol import PROTOCOL_VERSION, SERVICE_TYPE, choose_mdns_interfaces

REPO = Path(__file__).resolve().parents[2]
WAIT = 10.0  # bound of every wait on the network

# One agent process: announce until SIGTERM/SIGINT, the way the agent's main() wires it.
AGENT = r"""
import asyncio, signal, sys
from agent.announce import Announcement, Announcer

async def main() -> None:
    node, port, tls = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    announcement = Announcement(node=node, port=port, addresses=(), groups=("lab", "web"),
                                tls=tls)
    async with Announcer(announcement, ["127.0.0.1"]):
        print("READY", flush=True)
        await stop.wait()
    print("BYE", flush=True)

asyncio.run(main())
"""

# Other mDNS stacks sharing UDP 5353 on this host: idle zeroconf instances until killed.
BYSTANDER = r"""
import asyncio
from zeroconf.asyncio import AsyncZeroconf

async def main() -> None:
    instances = [AsyncZeroconf(interfaces=["127.0.0.1"]) for _ in range(4)]
    print("READY", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


# --- pure policy and record tests ---------------------------------------------------------------

def test_configured_addresses_win_over_bind() -> None:
    assert choose_mdns_interfaces("127.0.0.1", ["10.0.0.5", "10.0.0.5", "fd00::1"]) == [
        "10.0.0.5", "fd00::1"]
    assert choose_mdns_interfaces("0.0.0.0", ["192.168.1.2"]) == ["192.168.1.2"]


def test_specific_bind_is_used_and_wildcards_announce_nowhere() -> None:
    assert choose_mdns_interfaces("127.0.0.1", []) == ["127.0.0.1"]
    assert choose_mdns_interfaces("192.168.1.2", ()) == ["192.168.1.2"]
    assert choose_mdns_interfaces("[fd00::1]", []) == ["fd00::1"]
    for wildcard in ("0.0.0.0", "::", "", "[::]"):
        assert choose_mdns_interfaces(wildcard, []) == []
    assert choose_mdns_interfaces("node1.example", []) == []


@pytest.mark.parametrize("bad", ["0.0.0.0", "::", "eth0", "224.0.0.251"])
def test_configured_wildcards_and_names_are_config_errors(bad: str) -> None:
    with pytest.raises(ConfigError):
        choose_mdns_interfaces("127.0.0.1", [bad])


def test_txt_record() -> None:
    txt = Announcement("node-01", 7370, ("127.0.0.1",), groups=("lab", "gpu"), tls=True).txt()
    assert set(txt) == {"proto", "version", "node", "os", "arch", "cpus", "groups", "tls",
                        "since"}
    assert txt["proto"] == str(PROTOCOL_VERSION)
    assert txt["version"] == __version__
    assert txt["node"] == "node-01"
    assert txt["arch"] == platform.machine().lower()
    assert txt["cpus"] == str(os.cpu_count())
    assert txt["groups"] == "lab,gpu"
    assert txt["tls"] == "1"
    assert abs(float(txt["since"]) - time.time()) < 3600
    assert txt["os"] and len(txt["os"]) <= 32 and txt["os"] == txt["os"].lower()
    if Path("/etc/os-release").exists():
        assert txt["os"] == platform.freedesktop_os_release()["ID"]
    plain = Announcement("n", 1, ()).txt()
    assert (plain["groups"], plain["tls"]) == ("", "0")


def test_names_are_sanitised_and_bad_values_refused() -> None:
    item = Announcement("Web_01.lab", 7370, ())
    assert item.service_name() == f"web-01-lab.{SERVICE_TYPE}"
    assert item.server_name() == "web-01-lab.local."
    assert dns_label("x" * 100) == "x" * 63
    with pytest.raises(ConfigError):
        Announcement("...", 7370, ())
    with pytest.raises(ConfigError):
        Announcement("n", 0, ())
    with pytest.raises(ConfigError):
        Announcement("n", 7370, (), groups=("a,b",))
    with pytest.raises(ConfigError):
        Announcement("n", 7370, ("0.0.0.0",))
    with pytest.raises(ConfigError):
        Announcement("n", 7370, (), groups=("g" * 300,)).txt()


def test_announcer_refuses_no_interface_or_a_wildcard() -> None:
    item = Announcement("n", 7370, ())
    with pytest.raises(ConfigError):
        Announcer(item, [])
    with pytest.raises(ConfigError):
        Announcer(item, ["0.0.0.0"])


# --- real zeroconf on loopback ------------------------------------------------------------------

def test_address_not_on_this_host_is_a_config_error() -> None:
    async def scenario() -> None:
        # 192.0.2.0/24 is TEST-NET-1 (RFC 5737): never an address of this host.
        announcer = Announcer(Announcement(f"t{os.getpid()}-bad", 7370, ()), ["192.0.2.1"])
        try:
            with pytest.raises(ConfigError, match="192.0.2.1"):
                await asyncio.wait_for(announcer.start(), WAIT)
            assert not announcer.running
        finally:
            await announcer.stop()
            await announcer.stop()  # idempotent

    asyncio.run(scenario())


def test_name_clash_is_a_config_error_even_with_other_mdns_stacks_here() -> None:
    async def scenario() -> None:
        node = f"t{os.getpid()}-clash"
        # Other zeroconf instances on 127.0.0.1:5353 (another process, like avahi or the
        # controller) would receive unicast answers sent to port 5353; the one-shot check asks
        # from a port of its own, where only it can receive them.
        bystander = await _spawn(BYSTANDER)
        first = Announcer(Announcement(node, 7371, ()), ["127.0.0.1"])
        second = Announcer(Announcement(node.upper(), 7372, ()), ["127.0.0.1"])
        try:
            assert await _read_line(bystander) == "READY"
            await asyncio.wait_for(first.start(), WAIT)
            # At once, with the default check: the answer is unicast, not held back by the
            # one-second rule for records multicast just now (the first one's announcements).
            began = time.monotonic()
            with pytest.raises(ConfigError, match="already announced"):
                await asyncio.wait_for(second.start(), WAIT)
            assert first.running and not second.running
            print(f"\nclash found in {time.monotonic() - began:.3f} s")
        finally:
            await second.stop()
            await first.stop()
            bystander.kill()
            await bystander.wait()

    asyncio.run(scenario())


def test_two_announcers_of_one_name_at_once_leave_one() -> None:
    """Both pass the name check before either announces; each hears the other's announcement:
    the one that started later (by its TXT `since`) yields with a ConfigError, the other keeps
    the name."""
    async def scenario() -> None:
        node = f"t{os.getpid()}-twins"
        twins = [Announcer(Announcement(node, 7374 + index, ()), ["127.0.0.1"])
                 for index in range(2)]
        try:
            outcomes = await asyncio.wait_for(
                asyncio.gather(*(twin.start() for twin in twins), return_exceptions=True), WAIT)
            failed = [twin for twin, outcome in zip(twins, outcomes, strict=True)
                      if isinstance(outcome, ConfigError)]
            assert len(failed) == 1, outcomes
            kept = next(twin for twin in twins if twin is not failed[0])
            assert kept.running and kept.conflict is None
            assert not failed[0].running
            if "same time" in str(outcomes[twins.index(failed[0])]):  # else the check caught it
                assert failed[0].conflict is not None
                assert failed[0].announcement.since >= kept.announcement.since
        finally:
            for twin in twins:
                await twin.stop()

    asyncio.run(scenario())


#: Where stop() lands in start(): (the clash check's length, how to see the phase is reached).
START_PHASES: dict[str, tuple[float, Callable[[Announcer], bool]]] = {
    # start() has run up to its first wait (the QM clash check, default length)
    "just begun": (CLASH_CHECK_SECONDS, lambda announcer: announcer._starting is not None),
    # sockets open, the one-shot queries out; a long check so the stop surely lands inside it
    "in the name check": (WAIT, lambda announcer: announcer._zc is not None
                          and not announcer.running),
    # the record is registered; zeroconf announces it three times, 225 ms apart
    "while zeroconf announces": (0.0, lambda announcer: announcer.running),
}


async def _reach(announcer: Announcer, reached: Callable[[Announcer], bool], what: str) -> None:
    """Let the loop run until `reached(announcer)`, with the network deadline."""
    deadline = time.monotonic() + WAIT
    while not reached(announcer):
        assert time.monotonic() < deadline, f"timed out after {WAIT} s waiting for {what}"
        await asyncio.sleep(0.005)


def test_stop_during_start_cancels_it() -> None:
    async def scenario() -> None:
        for phase, (clash_check, reached) in START_PHASES.items():
            announcer = Announcer(Announcement(f"t{os.getpid()}-race", 7373, ()), ["127.0.0.1"],
                                  clash_check=clash_check)
            starting = asyncio.create_task(announcer.start())
            await _reach(announcer, reached, phase)
            assert not starting.done(), f"start() ended before stop() came {phase}"
            await asyncio.wait_for(announcer.stop(), WAIT)
            with pytest.raises(asyncio.CancelledError):
                await starting
            assert not announcer.running, phase
            await announcer.stop()

    asyncio.run(scenario())


async def _spawn(script: str, *args: str) -> asyncio.subprocess.Process:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                                   os.environ.get("PYTHONPATH")])))
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, *args, cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE)


async def _read_line(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    return (await asyncio.wait_for(proc.stdout.readline(), WAIT)).decode().strip()


def test_browser_on_loopback_finds_two_agents_and_sees_one_leave(start_agent) -> None:
    """Two real marco-agent processes announce on 127.0.0.1; a QM browser finds both."""
    tag = f"t{os.getpid()}"
    started = time.monotonic()
    agents = {node: start_agent(node_name=node, announce=True,
                                extra_args=["--groups", "lab,web"])
              for node in (f"{tag}-a", f"{tag}-b")}
    ports = {node: agent.port for node, agent in agents.items()}
    names = {f"{node}.{SERVICE_TYPE}": node for node in ports}

    async def scenario() -> None:
        zc: AsyncZeroconf | None = None
        browser: AsyncServiceBrowser | None = None
        events: asyncio.Queue[tuple[str, ServiceStateChange, float]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def on_change(zeroconf: Zeroconf, service_type: str, name: str,
                      state_change: ServiceStateChange) -> None:
            if name in names:  # other Marco tests may announce on this loopback too
                loop.call_soon_threadsafe(events.put_nowait, (name, state_change, time.monotonic()))

        async def wait_for(wanted: set[str], change: ServiceStateChange) -> float:
            deadline = time.monotonic() + WAIT
            while wanted:
                name, seen, at = await asyncio.wait_for(events.get(), deadline - time.monotonic())
                assert (name, seen) != (f"{tag}-b.{SERVICE_TYPE}", ServiceStateChange.Removed)
                if seen == change:
                    wanted.discard(name)
            return at

        try:
            begin = time.monotonic()
            zc = AsyncZeroconf(interfaces=["127.0.0.1"])
            browser = AsyncServiceBrowser(zc.zeroconf, SERVICE_TYPE, handlers=[on_change],
                                          question_type=DNSQuestionType.QM)
            found = await wait_for(set(names), ServiceStateChange.Added) - begin
            for name, node in names.items():
                info = AsyncServiceInfo(SERVICE_TYPE, name)
                assert await info.async_request(zc.zeroconf, WAIT * 1000,
                                                question_type=DNSQuestionType.QM), name
                assert info.port == ports[node]
                assert info.server == f"{node}.local."
                assert info.parsed_addresses() == ["127.0.0.1"]
                txt = info.decoded_properties
                assert txt["node"] == node
                assert txt["proto"] == str(PROTOCOL_VERSION)
                assert txt["version"] == __version__
                assert txt["groups"] == "lab,web"
                assert txt["tls"] == "1"  # agents serve mutual TLS (not --dev)
                assert txt["cpus"] == str(os.cpu_count())
                assert txt["arch"] and txt["os"]
            resolved = time.monotonic() - begin

            stop_at = time.monotonic()
            rc = await loop.run_in_executor(None, agents[f"{tag}-a"].stop)
            removed = await wait_for({f"{tag}-a.{SERVICE_TYPE}"}, ServiceStateChange.Removed)
            assert rc == 0
            print(f"\nannounce timings: agents started {begin - started:.2f}s before browsing; "
                  f"browser found both in {found:.3f}s, resolved both in {resolved:.3f}s; "
                  f"goodbye seen {removed - stop_at:.3f}s after SIGTERM")
        finally:
            if browser is not None:
                await browser.async_cancel()
            if zc is not None:
                await zc.async_close()

    asyncio.run(scenario())


class _NameAnswerer:
    """Another host's mDNS stack on 127.0.0.1:5353 (shared, like every stack here) that answers
    every one-shot query for `name` by unicast to the asker's port, from port 5353 (a
    responder, RFC 6762 6.7) or, with `from_5353=False`, from a port of its own (not a
    responder: RFC 6762 6 says such a response is ignored)."""

    def __init__(self, name: str, from_5353: bool) -> None:
        self.name, self.answered = name, 0
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.listener.bind(("", 5353))
        self.listener.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                                 socket.inet_aton("224.0.0.251") + socket.inet_aton("127.0.0.1"))
        self.listener.setblocking(False)
        self.sender = self.listener
        if not from_5353:
            self.sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sender.bind(("127.0.0.1", 0))

    def answer(self, data: bytes, source: tuple[str, int]) -> None:
        query = DNSIncoming(data)
        if source[1] == 5353 or query.is_response() or not any(
                q.name.lower() == self.name.lower() for q in query.questions):
            return  # only one-shot queries (from a port other than 5353) for our name
        response = DNSOutgoing(_FLAGS_QR_RESPONSE | _FLAGS_AA, multicast=False, id_=query.id)
        response.add_answer_at_time(DNSService(self.name, _TYPE_SRV, _CLASS_IN, 120, 0, 0, 7379,
                                               "elsewhere.local."), 0)
        self.sender.sendto(response.packets()[0], source)
        self.answered += 1

    def close(self) -> None:
        self.listener.close()
        self.sender.close()


@pytest.mark.parametrize("from_5353", [True, False], ids=["from-5353", "from-another-port"])
def test_only_answers_from_port_5353_count_as_a_name_clash(from_5353: bool) -> None:
    """An answer to the one-shot name check counts only when it comes from port 5353: a
    process answering from another port (anyone on the LAN can) cannot keep an agent from
    starting. The same answer from 5353 is a clash, so the answer itself is a valid one."""
    async def scenario() -> None:
        node = f"t{os.getpid()}-port{int(from_5353)}"
        announcer = Announcer(Announcement(node, 7379, ()), ["127.0.0.1"])
        answerer = _NameAnswerer(announcer.build_info().name, from_5353)
        loop = asyncio.get_running_loop()
        loop.add_reader(answerer.listener, lambda: answerer.answer(
            *answerer.listener.recvfrom(9000)))
        try:
            if from_5353:
                with pytest.raises(ConfigError, match="already announced"):
                    await asyncio.wait_for(announcer.start(), WAIT)
            else:
                await asyncio.wait_for(announcer.start(), WAIT)
                assert announcer.running
            assert answerer.answered > 0  # the check asked, and got the answer
        finally:
            loop.remove_reader(answerer.listener)
            answerer.close()
            await announcer.stop()

    asyncio.run(scenario())
