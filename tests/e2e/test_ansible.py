"""The real ansible-playbook / ansible / ansible-inventory / ansible-doc CLIs through Marco:
three agents in network namespaces, found by zeroconf, users and tokens for real."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from marco.tokens import TokenSigner
from tests.e2e.conftest import BIN, PLAYBOOKS, Fleet
from tests.support.agent_process import AgentProcess
from tests.support.pki import TestPki
from tests.support.run import RunNames
from tests.support.tokens import expired_token
from tests.support.users import UnixUser
from tests.support.waiting import wait_for

E2E_PLAY = Path(__file__).parent / "playbooks" / "e2e.yml"


def recap(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP lines -> {host: {ok, changed, unreachable, failed, ...}}."""
    hosts: dict[str, dict[str, int]] = {}
    for host, fields in re.findall(r"^(\S+)\s+:\s+(ok=.*)$", output, re.M):
        hosts[host] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", fields)}
    return hosts


@pytest.fixture
def site_fetched(fleet: Fleet) -> Iterator[None]:
    """site.yml fetches into the checkout's playbooks/fetched/NODE: no file of a past run, and
    none left after this one (the node names carry the run's tag)."""
    def clear() -> None:
        for name in fleet.names:
            shutil.rmtree(PLAYBOOKS / "fetched" / name, ignore_errors=True)
    clear()
    yield
    clear()


def test_site_and_e2e_playbooks_on_three_hosts(fleet: Fleet, signer: TokenSigner,
                                               alice: UnixUser, tmp_path: Path,
                                               site_fetched: None) -> None:
    token = signer.issue(alice.name)
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(5 * 1024 * 1024) + b"\0\xff")
    fetched = tmp_path / "fetched"
    out = fleet.ansible(token, "site.yml", str(E2E_PLAY), "-e", f"binary_src={blob}",
                        "-e", f"fetch_dir={fetched}", "-e", f"expected_user={alice.name}")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    result = recap(out.stdout)
    assert set(fleet.names) <= set(result)
    for name in fleet.names:
        assert result[name]["failed"] == 0 and result[name]["unreachable"] == 0
        assert (fetched / f"{name}.bin").read_bytes() == blob.read_bytes()
        made = Path(alice.home) / "marco-e2e" / name / "dossier-é✓" / "fichier-ü.txt"
        assert made.read_text() == "grüße, 世界 ✓\n"
        assert made.stat().st_uid == alice.uid  # written as alice, not root
        assert (Path(alice.home) / "marco-e2e" / name / "empty").stat().st_size == 0
        assert (PLAYBOOKS / "fetched" / name / "hello.txt").read_text().startswith("héllo")


async def _collect(fleet: Fleet, token: str, seconds: float, events: list[dict[str, Any]],
                   started: asyncio.Event) -> None:
    agent = fleet.agents[0]
    stream = agent.async_client(token).stream()
    await stream.connect()
    started.set()
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            try:
                event = await asyncio.wait_for(stream.read(), max(deadline - time.monotonic(), 0.01))
            except TimeoutError:
                break
            if event is None:
                break
            event["received"] = time.monotonic()
            events.append(event)
    finally:
        stream.close()


async def _until(predicate: Callable[[], object], what: str, timeout: float = 60) -> None:
    """Let the loop run (the watchers collect) until `predicate()` is true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.05)


def _output_with(events: list[dict[str, Any]], line: str) -> dict[str, Any] | None:
    return next((e for e in events if e["type"] == "output" and line in e["lines"]), None)


def _exited(events: list[dict[str, Any]], execution_id: str) -> bool:
    return any(e["type"] == "exit" and e["id"] == execution_id for e in events)


def test_marco_deploy_lines_arrive_live_and_only_for_their_user(fleet: Fleet, signer: TokenSigner,
                                                                alice: UnixUser, bob: UnixUser) -> None:
    alice_events: list[dict[str, Any]] = []
    bob_events: list[dict[str, Any]] = []
    agent = fleet.agents[0]

    async def scenario() -> tuple[str, str]:
        ready_a, ready_b = asyncio.Event(), asyncio.Event()
        watchers = [asyncio.ensure_future(_collect(fleet, signer.issue(alice.name), 60, alice_events, ready_a)),
                    asyncio.ensure_future(_collect(fleet, signer.issue(bob.name), 60, bob_events, ready_b))]
        await ready_a.wait()
        await ready_b.wait()
        env = fleet.env(signer.issue(alice.name))
        process = await asyncio.create_subprocess_exec(
            str(BIN / "ansible-playbook"), "deploy.yml", "--limit", fleet.names[0],
            "-e", "step_seconds=1", cwd=PLAYBOOKS,
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        playbook = asyncio.ensure_future(process.communicate())
        await _until(lambda: _output_with(alice_events, "step: fetch"), "the first step line")
        first = _output_with(alice_events, "step: fetch")
        assert first is not None
        # Live: the line is on alice's socket while the script still runs (4 steps of 1 s left).
        state = (await agent.async_client(signer.issue(alice.name)).execution(first["id"]))["state"]
        output, _ = await playbook
        assert process.returncode == 0, output.decode()[-3000:]
        await _until(lambda: _exited(alice_events, first["id"]), "the build's exit on alice's socket")
        # Bob's own later execution reaches his socket: anything of alice's would come before it.
        mine = await agent.async_client(signer.issue(bob.name)).start(["true"])
        await _until(lambda: _exited(bob_events, mine), "bob's own exit on his socket")
        for watcher in watchers:
            watcher.cancel()
        return state, mine

    state, bobs = asyncio.run(scenario())
    assert state == "running"
    build_id = next(e["id"] for e in alice_events if e["type"] == "output"
                    and "step: fetch" in e["lines"])
    started = next(e for e in alice_events if e["type"] == "started" and e["id"] == build_id)
    # Labelled with play, task and host, so the viewer groups it.
    assert started["label"] == (f"Deploy and build / Upload the build script and run it "
                                f"(live in the viewer) @ {fleet.names[0]}")
    lines = [line for e in alice_events if e["type"] == "output" and e["id"] == build_id
             for line in e["lines"]]
    assert lines[-1] == "done" and "step: package" in lines
    steps = [line for line in lines if line.startswith("step: ")]
    assert steps == [f"step: {s}" for s in ("fetch", "configure", "compile", "test", "package")]
    assert {e["id"] for e in bob_events if e["type"] in ("started", "output", "exit")} == {bobs}


def test_killing_one_agent_mid_play_makes_only_that_host_unreachable(
        fleet: Fleet, signer: TokenSigner, alice: UnixUser, tmp_path: Path) -> None:
    play = tmp_path / "slow.yml"
    play.write_text("- hosts: all\n  gather_facts: false\n  tasks:\n"
                    "    - command: echo one\n"
                    "    - name: Slow\n      command: sleep 6\n"
                    "    - command: echo three\n")
    victim = fleet.agents[1]
    process = subprocess.Popen([str(BIN / "ansible-playbook"), str(play)], cwd=PLAYBOOKS,
                               env=fleet.env(signer.issue(alice.name)), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    watcher = victim.client(signer.issue(alice.name))
    try:
        wait_for(lambda: any("Slow" in e["label"] and e["state"] == "running"
                             for e in watcher.executions()), what="the slow task on the victim")
        victim.stop(signal.SIGKILL)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    result = recap(output)
    assert result[victim.node_name]["unreachable"] == 1, output
    for agent in fleet.agents:
        if agent is not victim:
            assert result[agent.node_name]["failed"] == 0 and result[agent.node_name]["ok"] == 3
    assert "UNREACHABLE" in output and "unreachable" in output.lower()
    # Bring it back for the other tests.
    fleet.agents[1] = victim.restarted()


def test_expired_token_fails_with_the_login_hint(fleet: Fleet, signer: TokenSigner,
                                                 alice: UnixUser) -> None:
    secret = signer._serializer.secret_keys[-1]
    inventory = ",".join(f"{a.host}" for a in fleet.agents[:1]) + ","
    out = fleet.ansible(expired_token(secret, alice.name), "-i", inventory, "all", "-m", "ping",
                        "-c", "marco.fleet.marco", "-e", f"marco_node={fleet.agents[0].node_name}",
                        tool="ansible")
    assert out.returncode != 0
    assert "UNREACHABLE" in out.stdout and "expired" in out.stdout and "marco login" in out.stdout


def test_become_with_sudo(fleet: Fleet, signer: TokenSigner, alice: UnixUser, bob: UnixUser,
                          run: RunNames) -> None:
    sudoers = run.sudoers
    sudoers.write_text(f"{alice.name} ALL=(ALL) NOPASSWD: ALL\n{bob.name} ALL=(ALL) ALL\n")
    sudoers.chmod(0o440)
    try:
        inventory = f"{fleet.agents[0].host},"
        common = ["-i", inventory, "all", "-c", "marco.fleet.marco", "-b", "-m", "command", "-a", "id -un",
                  "-e", f"marco_node={fleet.agents[0].node_name}"]
        ok = fleet.ansible(signer.issue(alice.name), *common, tool="ansible")
        assert ok.returncode == 0 and "root" in ok.stdout, ok.stdout + ok.stderr
        # A password given where sudo does not ask for one must not reach the module as code.
        spare = fleet.ansible(signer.issue(alice.name), *common, "-e",
                              "ansible_become_password=Secret-pass-42", tool="ansible")
        assert spare.returncode == 0 and "root" in spare.stdout, spare.stdout + spare.stderr
        assert "Secret-pass-42" not in spare.stdout + spare.stderr
        started = time.monotonic()
        no_password = fleet.ansible(signer.issue(bob.name), *common, tool="ansible", timeout=120)
        assert no_password.returncode != 0 and time.monotonic() - started < 60  # no hang
        assert "sudo: a password is required" in no_password.stdout, no_password.stdout[-1500:]
        with_password = fleet.ansible(signer.issue(bob.name), *common, "-e",
                                      f"ansible_become_password={bob.password}", tool="ansible")
        assert with_password.returncode == 0 and "root" in with_password.stdout, with_password.stdout
    finally:
        sudoers.unlink()


def test_ansible_doc_and_inventory_graph(fleet: Fleet, signer: TokenSigner, alice: UnixUser) -> None:
    token = signer.issue(alice.name)
    doc = fleet.ansible(token, "-t", "connection", "marco.fleet.marco", tool="ansible-doc")
    assert doc.returncode == 0 and "marco login" in doc.stdout and "marco_token" in doc.stdout
    doc = fleet.ansible(token, "-t", "inventory", "marco.fleet.marco", tool="ansible-doc")
    assert doc.returncode == 0 and "keyed_groups" in doc.stdout
    doc = fleet.ansible(token, "marco.fleet.marco_deploy", tool="ansible-doc")
    assert doc.returncode == 0 and "live" in doc.stdout
    graph = fleet.ansible(token, "--graph", tool="ansible-inventory")
    assert graph.returncode == 0, graph.stderr
    assert "@lab:" in graph.stdout and all(name in graph.stdout for name in fleet.names)
    assert "@arch_" in graph.stdout  # keyed_groups from inventory.marco.yml
    listed = fleet.ansible(token, "-i", str(BIN / "marco-inventory"), "--list", tool="ansible-inventory")
    assert listed.returncode == 0 and all(name in listed.stdout for name in fleet.names)


def test_marco_deploy_creates_overwrite_and_failures(fleet: Fleet, signer: TokenSigner,
                                                     alice: UnixUser, tmp_path: Path) -> None:
    token = signer.issue(alice.name)
    target = f"{fleet.agents[0].host},"
    pin = ["-e", f"marco_node={fleet.agents[0].node_name}"]  # the name its certificate carries
    source = tmp_path / "tool.sh"
    source.write_text("#!/bin/sh\necho tool-v1\n")

    def deploy(args: str) -> subprocess.CompletedProcess[str]:
        return fleet.ansible(token, "-i", target, "all", "-c", "marco.fleet.marco", *pin, "-m", "marco.fleet.marco_deploy",
                             "-a", args, tool="ansible")

    folder = f"~/marco-e2e/deploy-{os.getpid()}"
    assert fleet.ansible(token, "-i", target, "all", "-c", "marco.fleet.marco", *pin, "-m", "file", "-a",
                         f"path={folder} state=directory", tool="ansible").returncode == 0
    first = deploy(f"src={source} dest={folder} mode=0755 command=./tool.sh")
    assert first.returncode == 0 and "tool-v1" in first.stdout and "CHANGED" in first.stdout
    source.write_text("#!/bin/sh\necho tool-v2\n")
    kept = deploy(f"src={source} dest={folder} overwrite=false command=./tool.sh")
    assert kept.returncode == 0 and "tool-v1" in kept.stdout and "kept" in kept.stdout
    skipped = deploy(f"dest={folder} command='echo never' creates=tool.sh")
    assert skipped.returncode == 0 and "skipped, since tool.sh exists" in skipped.stdout
    failed = deploy(f"dest={folder} command='echo bad >&2; exit 4'")
    assert failed.returncode != 0 and '"rc": 4' in failed.stdout and "non-zero return code" in failed.stdout
    missing = deploy(f"src={tmp_path / 'nope.sh'} dest={folder}")
    assert missing.returncode != 0 and "nope.sh" in missing.stdout


def test_the_plugin_refuses_a_rogue_agent_and_foreign_client_certificates(
        fleet: Fleet, signer: TokenSigner, alice: UnixUser, secret_file: Path,
        tmp_path: Path) -> None:
    """A machine that runs a real agent with a certificate from another CA and claims a real
    node's name gets no task (and no token past the handshake); a client certificate from
    another CA is refused by the real agents. Both: UNREACHABLE with the reason."""
    token = signer.issue(alice.name)
    foreign = TestPki(tmp_path / "foreign-ca")
    victim = fleet.agents[0].node_name
    rogue = AgentProcess(secret_file, tmp_path / "rogue" / "state", node_name=victim, pki=foreign)
    try:
        out = fleet.ansible(token, "-i", "127.0.0.1,", "all", "-c", "marco.fleet.marco", "-m", "command",
                            "-a", "echo should-not-run", "-e", f"ansible_port={rogue.port}",
                            "-e", f"marco_node={victim}", tool="ansible")
        assert out.returncode != 0 and "UNREACHABLE" in out.stdout, out.stdout
        assert "not issued by this cluster's CA" in out.stdout
        assert "should-not-run" not in rogue.log()
    finally:
        rogue.stop()

    # The cluster's CA is trusted, but the client's certificate comes from the other one.
    outsider = {**foreign.client_env(), "MARCO_TLS_CA": str(fleet.pki.ca_file)}
    out = subprocess.run([str(BIN / "ansible"), "-i", f"{fleet.agents[0].host},", "all",
                          "-c", "marco.fleet.marco", "-m", "ping", "-e", f"marco_node={victim}"],
                         cwd=PLAYBOOKS, env={**fleet.env(token), **outsider},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "UNREACHABLE" in out.stdout, out.stdout
    assert "client certificate" in out.stdout


def test_no_log_tasks_leave_nothing_on_the_agent_or_the_sockets(fleet: Fleet, signer: TokenSigner,
                                                               alice: UnixUser,
                                                               tmp_path: Path) -> None:
    """A `no_log: true` task's result (its stdout, its module_args) reaches the playbook and
    nothing else: no spool, no meta.json, no socket event, no audit line; the audit log and
    listings show the command censored. A task without no_log, in the same play, is stored
    and streamed (so this test can see a leak when there is one)."""
    import secrets
    secret = "nolog-" + secrets.token_hex(8)
    visible = "visible-" + secrets.token_hex(8)
    play = tmp_path / "nolog.yml"
    play.write_text(
        "- hosts: all\n  gather_facts: false\n  tasks:\n"
        f"    - name: Secret command\n      ansible.builtin.command: echo {secret}-cmd\n"
        "      no_log: true\n"
        f"    - name: Secret deploy\n      marco.fleet.marco_deploy:\n        command: echo {secret}-deploy\n"
        "      no_log: true\n"
        f"    - name: Ordinary command\n      ansible.builtin.command: echo {visible}\n")
    events: list[dict[str, Any]] = []
    agent = fleet.agents[0]

    async def scenario() -> str:
        ready = asyncio.Event()
        watcher = asyncio.ensure_future(_collect(fleet, signer.issue(alice.name), 120, events,
                                                 ready))
        await ready.wait()
        process = await asyncio.create_subprocess_exec(
            str(BIN / "ansible-playbook"), str(play), "--limit", agent.node_name, cwd=PLAYBOOKS,
            env=fleet.env(signer.issue(alice.name)), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        output, _ = await process.communicate()
        # The ordinary task's line is the positive event: once it arrived, all before it did.
        deadline = time.monotonic() + 20
        while not any(visible in json.dumps(e) for e in events) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        watcher.cancel()
        assert process.returncode == 0, output.decode()[-3000:]
        return output.decode()

    output = asyncio.run(scenario())
    assert secret not in output
    assert any(visible in json.dumps(e) for e in events)
    assert not [e for e in events if secret in json.dumps(e)]
    hidden = [e for e in events if e["type"] == "started" and e.get("no_log")]
    assert len(hidden) >= 2 and all(e["command"] == "(hidden: no_log)" for e in hidden)
    assert not [e for e in events if e["type"] == "output" and e["id"] in {h["id"] for h in hidden}]
    # Nothing on the agent's disk: spools, meta.json, audit log, captures.
    stored = [p for p in agent.state_dir.rglob("*") if p.is_file()]
    assert any(visible.encode() in p.read_bytes() for p in stored)
    leaks = [str(p) for p in stored if secret.encode() in p.read_bytes()]
    assert leaks == [] and secret not in agent.log()
    audit = [json.loads(line) for line in (agent.state_dir / "audit.log").read_text().splitlines()]
    censored = [e for e in audit if e["event"] == "execution.start" and e.get("no_log")]
    assert len(censored) >= 2 and all(e["command"] == "(hidden: no_log)" for e in censored)
    client = agent.client(signer.issue(alice.name))
    for started in hidden:
        assert client.execution(started["id"])["command"] == "(hidden: no_log)"
        assert client.output(started["id"])["events"] == []
