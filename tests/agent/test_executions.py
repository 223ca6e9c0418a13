"""Executions over HTTP against a real root agent, as real Unix users."""

from __future__ import annotations

import asyncio
import os
import pwd
import secrets
import time
from typing import Any

import pytest

from agent.users import UserResolver
from marco.client import AgentClient
from marco.errors import AuthenticationError, BadRequest, NotFound, PermissionDenied
from marco.tokens import TokenSigner
from tests.support.agent_process import AgentProcess
from tests.support.processes import alive
from tests.support.users import UnixUser
from tests.support.waiting import wait_for


def client(agent: AgentProcess, signer: TokenSigner, user: str) -> AgentClient:
    return agent.client(signer.issue(user), timeout=60)


def test_runs_as_the_token_user(shared_agent: AgentProcess, signer: TokenSigner,
                                alice: UnixUser) -> None:
    with client(shared_agent, signer, alice.name) as c:
        result = c.run("id -un; id -gn; id -G; pwd; touch made-by-agent; stat -c %U:%G made-by-agent")
    assert result.rc == 0, result.stderr
    name, group, groups, cwd, owner = result.stdout.decode().splitlines()
    assert name == alice.name
    assert group == alice.name
    assert {int(g) for g in groups.split()} == set(os.getgrouplist(alice.name, alice.gid))
    assert len(groups.split()) == 3  # primary + marcotest-g1 + marcotest-g2, never root's 0
    assert cwd == alice.home
    assert owner == f"{alice.name}:{alice.name}"
    assert os.stat(os.path.join(alice.home, "made-by-agent")).st_uid == alice.uid


def test_environment_is_clean(start_agent, signer: TokenSigner, alice: UnixUser) -> None:
    agent = start_agent(env={"AGENT_ONLY_SECRET": "leak"})
    with client(agent, signer, alice.name) as c:
        result = c.run(["env"], env={"EXTRA": "given"})
    env = dict(line.split("=", 1) for line in result.stdout.decode().splitlines())
    assert "AGENT_ONLY_SECRET" not in env
    assert env["HOME"] == alice.home and env["USER"] == env["LOGNAME"] == alice.name
    assert env["SHELL"] == "/bin/bash" and env["PATH"].startswith("/usr/local/bin")
    assert env["EXTRA"] == "given"
    assert set(env) <= {"HOME", "USER", "LOGNAME", "SHELL", "PATH", "EXTRA", "MARCO_EXECUTION_ID",
                        "PWD", "SHLVL", "_", "OLDPWD"}


def test_cwd_is_entered_as_the_user(shared_agent: AgentProcess, signer: TokenSigner,
                                    alice: UnixUser, bob: UnixUser) -> None:
    os.makedirs(os.path.join(alice.home, "sub"), exist_ok=True)
    with client(shared_agent, signer, alice.name) as c:
        assert c.run(["pwd"], cwd="~/sub").stdout.decode().strip() == alice.home + "/sub"
        denied = c.run(["pwd"], cwd=bob.home)
    # bob's home is 0750: alice may not enter it, and the kernel says so.
    assert denied.rc == 125 and b"Permission denied" in denied.stderr


def test_cwd_is_entered_as_the_user_without_cgroups(start_agent, signer: TokenSigner,
                                                    alice: UnixUser, bob: UnixUser) -> None:
    """The same without a cgroup to join (the subreaper, each child capping its processes):
    the directory is still entered after the switch to the user, and a missing one is named."""
    agent = start_agent(extra_args=["--cgroups", "off"])
    with client(agent, signer, alice.name) as c:
        assert c.run(["pwd"], cwd="/").stdout == b"/\n"
        denied = c.run(["pwd"], cwd=bob.home)
        missing = c.run("pwd", cwd="~/no-such-dir")
    assert denied.rc == 125 and b"Permission denied" in denied.stderr and denied.stdout == b""
    assert missing.rc == 125 and missing.stdout == b""
    assert f"{alice.home}/no-such-dir".encode() in missing.stderr
    assert b"No such file or directory" in missing.stderr


def test_programs_exec_refuses_are_reported_as_a_shell_does(
        shared_agent: AgentProcess, signer: TokenSigner, alice: UnixUser) -> None:
    """A command is exec'd directly; what exec refuses still ends like it does in a shell:
    a script without `#!` runs with /bin/sh, a file without x gives 126, in the given cwd."""
    work = os.path.join(alice.home, "exec-refuses")
    os.makedirs(work, exist_ok=True)
    for name, mode in (("no-shebang", 0o755), ("not-executable", 0o644)):
        path = os.path.join(work, name)
        with open(path, "w") as handle:
            handle.write("pwd\necho ran\n")
        os.chmod(path, mode)
        os.chown(path, alice.uid, alice.gid)
    os.chown(work, alice.uid, alice.gid)
    with client(shared_agent, signer, alice.name) as c:
        script = c.run(["./no-shebang"], cwd="~/exec-refuses")
        refused = c.run(["./not-executable"], cwd="~/exec-refuses")
    assert script.rc == 0 and script.stdout == f"{work}\nran\n".encode()
    assert refused.rc == 126 and b"Permission denied" in refused.stderr and refused.stdout == b""


def test_running_executions_hold_no_agent_thread(start_agent, signer: TokenSigner,
                                                 alice: UnixUser) -> None:
    """The agent waits for its children with pidfds on its loop: asyncio's default on Python
    3.11 is a thread per running child."""
    agent = start_agent()

    def threads() -> int:
        return len(os.listdir(f"/proc/{agent.process.pid}/task"))

    with client(agent, signer, alice.name) as c:
        c.run(["true"])  # threads made once, on a first execution, are there from now on
        before = threads()
        ids = [c.start(["sleep", "60"]) for _ in range(8)]
        try:
            assert all(c.execution(i)["state"] == "running" for i in ids)
            assert threads() < before + len(ids)
        finally:
            for execution_id in ids:
                c.stop(execution_id)


def test_seq_million_lines_via_wait(shared_agent: AgentProcess, signer: TokenSigner,
                                    alice: UnixUser) -> None:
    with client(shared_agent, signer, alice.name) as c:
        result = c.run(["seq", "1", "1000000"])
    assert result.rc == 0
    assert result.stdout == "".join(f"{i}\n" for i in range(1, 1_000_001)).encode()


def test_binary_stdin_stdout_round_trip(shared_agent: AgentProcess, signer: TokenSigner,
                                        alice: UnixUser) -> None:
    data = os.urandom(3 * 1024 * 1024) + bytes(range(256)) + b"\x00\xff\n\r"
    with client(shared_agent, signer, alice.name) as c:
        result = c.run(["cat"], stdin=data)
        again = c.run("cat >&2", stdin=b"\xff\xfe\x00")
    assert result.stdout == data and result.stderr == b""
    assert again.stderr == b"\xff\xfe\x00"


def test_exit_codes_signals_and_timeout(shared_agent: AgentProcess, signer: TokenSigner,
                                        alice: UnixUser) -> None:
    with client(shared_agent, signer, alice.name) as c:
        assert c.run("exit 7").rc == 7
        killed = c.run("kill -KILL $$")
        assert killed.rc is None and killed.signal == "SIGKILL"
        started = time.monotonic()
        slow = c.run(["sleep", "60"], timeout=0.5)
    assert slow.timed_out and slow.signal == "SIGTERM"
    assert time.monotonic() - started < 30
    missing = client(shared_agent, signer, alice.name).run(["no-such-command-here"])
    assert missing.rc == 127 and b"No such file" in missing.stderr


def _grandchild_pid(c: AgentClient, execution_id: str) -> int:
    def first_line():
        events = c.output(execution_id)["events"]
        return events[0]["lines"][0] if events else None
    return int(wait_for(first_line))


def test_stop_kills_the_whole_process_group(shared_agent: AgentProcess, signer: TokenSigner,
                                            alice: UnixUser) -> None:
    with client(shared_agent, signer, alice.name) as c:
        execution_id = c.start("sleep 600 & echo $!; sleep 600; wait")
        grandchild = _grandchild_pid(c, execution_id)
        assert alive(grandchild) and pwd.getpwuid(os.stat(f"/proc/{grandchild}").st_uid).pw_name == alice.name
        c.stop(execution_id)
        state = wait_for(lambda: (s := c.execution(execution_id))["state"] != "running" and s)
    assert state["state"] == "killed" and state["signal"] == "SIGTERM" and state["stopped"]
    wait_for(lambda: not alive(grandchild))


def test_stop_escalates_to_sigkill(start_agent, signer: TokenSigner, alice: UnixUser) -> None:
    agent = start_agent(extra_args=["--stop-grace", "0.5"])
    with client(agent, signer, alice.name) as c:
        execution_id = c.start("trap '' TERM; echo ready; while :; do sleep 0.1; done")
        wait_for(lambda: c.output(execution_id)["events"])
        c.stop(execution_id)
        state = wait_for(lambda: (s := c.execution(execution_id))["state"] != "running" and s)
    assert state["signal"] == "SIGKILL"


def test_other_users_executions_do_not_exist_for_them(shared_agent: AgentProcess,
                                                      signer: TokenSigner, alice: UnixUser,
                                                      bob: UnixUser) -> None:
    alices = client(shared_agent, signer, alice.name)
    bobs = client(shared_agent, signer, bob.name)
    execution_id = alices.start(["sleep", "30"], label="alice's")
    try:
        for action in (bobs.execution, bobs.stop, bobs.output):
            with pytest.raises(NotFound):
                action(execution_id)
        assert execution_id not in {e["id"] for e in bobs.executions()}
        assert alices.execution(execution_id)["state"] == "running"  # bob's stop did nothing
    finally:
        alices.stop(execution_id)


def test_replay_by_seq(shared_agent: AgentProcess, signer: TokenSigner, alice: UnixUser) -> None:
    with client(shared_agent, signer, alice.name) as c:
        execution_id = c.start("seq 1 5000; seq 1 3 >&2")
        wait_for(lambda: c.execution(execution_id)["state"] == "exited")
        full = c.output(execution_id)
        part = c.output(execution_id, since=4990)
    stdout = [line for e in full["events"] if e["stream"] == "stdout" for line in e["lines"]]
    stderr = [line for e in full["events"] if e["stream"] == "stderr" for line in e["lines"]]
    assert stdout == [str(i) for i in range(1, 5001)] and stderr == ["1", "2", "3"]
    assert part["events"][0]["seq"] == 4990 and part["next"] == 5003
    lines = [line for e in part["events"] for line in e["lines"]]
    assert lines == [str(i) for i in range(4991, 5001)] + ["1", "2", "3"]


def test_bad_requests_get_clear_errors(shared_agent: AgentProcess, signer: TokenSigner,
                                       alice: UnixUser) -> None:
    c = client(shared_agent, signer, alice.name)
    with pytest.raises(BadRequest, match="exactly one of"):
        c._request("POST", "/v1/executions", {"label": "nothing to run"})
    with pytest.raises(BadRequest, match="base64"):
        c._request("POST", "/v1/executions", {"argv": ["true"], "stdin": "%%%"})
    with pytest.raises(NotFound):
        c.execution("0" * 32)
    with pytest.raises(AuthenticationError, match="Bearer"):
        shared_agent.client(None).executions()
    with pytest.raises(PermissionDenied, match="does not exist on this node"):
        client(shared_agent, signer, "no-such-user-here").executions()


def test_non_root_agent_serves_only_its_own_user(alice: UnixUser, bob: UnixUser) -> None:
    """The rule a non-root agent applies (resolver given alice's uid, as when run by alice)."""
    resolver = UserResolver(agent_uid=alice.uid)
    assert resolver.resolve(alice.name).uid == alice.uid
    assert resolver.popen_identity(resolver.resolve(alice.name)) == {}
    with pytest.raises(PermissionDenied, match="serves only its own user"):
        resolver.resolve(bob.name)


def test_hostile_request_bodies_are_400(shared_agent: AgentProcess, signer: TokenSigner,
                                        alice: UnixUser) -> None:
    token = signer.issue(alice.name)
    for body in ('{"argv": ["sleep", "0.1"], "timeout": NaN}',
                 '{"argv": ["sleep", "0.1"], "timeout": Infinity}',
                 '{"argv": ["true"], "stdin": "é"}',
                 '{"argv": ["A=B", "id"]}',
                 '{"argv": ["true"], "timeout": 1e30}',
                 '{"argv": ["true"], "env": {"A": 1}}',
                 '[1, 2]'):
        conn = shared_agent.connection(timeout=10)
        conn.request("POST", "/v1/executions", body=body.encode(),
                     headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        assert response.status == 400, (body, response.read())
        conn.close()
    # ... and the agent's timers still work afterwards.
    with client(shared_agent, signer, alice.name) as c:
        assert c.run(["sleep", "30"], timeout=0.3).timed_out


def test_wait_capture_is_bounded(start_agent, signer: TokenSigner, alice: UnixUser) -> None:
    """A `?wait=1` answer holds at most --max-capture-bytes of each stream, says so, and the
    rest is still streamed and spooled."""
    agent_ = start_agent(extra_args=["--max-capture-bytes", "100000"])
    with client(agent_, signer, alice.name) as c:
        within = c.run("head -c 100000 /dev/zero")
        assert len(within.stdout) == 100_000 and not within.stdout_truncated
        result = c.run("head -c 300000 /dev/zero | tr '\\0' a; echo; head -c 500 /dev/zero >&2")
        assert result.stdout == b"a" * 100_000 and result.stdout_truncated
        assert len(result.stderr) == 500 and not result.stderr_truncated  # each stream its own
        spooled = sum(len(line) for e in c.output(result.id)["events"] if e["stream"] == "stdout"
                      for line in e["lines"])
        assert spooled == 300_000


def _run_id() -> str:
    """A run id of the contract's shape, unique per call (the shared agent outlives tests)."""
    return "r" + secrets.token_hex(10)


def test_tags_round_trip(shared_agent: AgentProcess, signer: TokenSigner,
                         alice: UnixUser) -> None:
    """Tags given at start come back in the record, the listing and the `started` event."""
    tags = {"run": _run_id(), "task": "0242ac11-0002-task", "host": "web1"}
    token = signer.issue(alice.name)

    async def started_event() -> dict[str, Any]:
        stream = shared_agent.async_client(token).stream()
        await stream.connect()
        try:
            execution_id = await shared_agent.async_client(token).start(["true"], tags=tags)
            while True:
                event = await asyncio.wait_for(stream.read(), 30)
                assert event is not None, "stream closed early"
                if event["type"] == "started" and event["id"] == execution_id:
                    return event
        finally:
            stream.close()

    event = asyncio.run(started_event())
    assert event["tags"] == tags
    with client(shared_agent, signer, alice.name) as c:
        assert c.execution(event["id"])["tags"] == tags
        assert next(e for e in c.executions() if e["id"] == event["id"])["tags"] == tags
        hidden = c.run(["echo", "secret"], tags=tags, no_log=True)
        assert c.execution(hidden.id)["tags"] == tags  # tags are not output: no_log keeps them
        untagged = c.start(["true"])
        assert c.execution(untagged)["tags"] == {}


def test_executions_filtered_by_run(shared_agent: AgentProcess, signer: TokenSigner,
                                    alice: UnixUser, bob: UnixUser) -> None:
    """?run=ID lists only the caller's executions tagged with that run."""
    run, other = _run_id(), _run_id()
    with client(shared_agent, signer, alice.name) as c:
        mine = [c.start(["true"], tags={"run": run, "host": f"h{i}"}) for i in range(2)]
        c.start(["true"], tags={"run": other})
        c.start(["true"])
        assert sorted(e["id"] for e in c.executions(run=run)) == sorted(mine)
        assert c.executions(run=_run_id()) == []
    with client(shared_agent, signer, bob.name) as b:
        bobs = b.start(["true"], tags={"run": run})
        assert [e["id"] for e in b.executions(run=run)] == [bobs]  # never alice's
    with client(shared_agent, signer, alice.name) as c:
        assert bobs not in {e["id"] for e in c.executions(run=run)}


@pytest.mark.parametrize("tags", [
    {f"k{'x' * i}": "v" for i in range(9)},   # nine keys
    {"Run": "x"},                              # an upper-case name
    {"run-id": "x"},                           # a dash
    {"a" * 41: "x"},                           # a name too long
    {"": "x"},                                 # an empty name
    {"run": 7},                                # not a string
    {"run": "x" * 201},                        # a value too long
    ["run", "x"],                              # not an object
])
def test_bad_tags_are_400(shared_agent: AgentProcess, signer: TokenSigner, alice: UnixUser,
                          tags: Any) -> None:
    with client(shared_agent, signer, alice.name) as c, \
            pytest.raises(BadRequest, match="tag"):
        c._request("POST", "/v1/executions", {"argv": ["true"], "tags": tags})


def test_tags_at_their_limits_are_accepted(shared_agent: AgentProcess, signer: TokenSigner,
                                           alice: UnixUser) -> None:
    tags = {"a" * 40: "x" * 200, **{"k" + "_" * i: "" for i in range(7)}}
    with client(shared_agent, signer, alice.name) as c:
        assert c.execution(c.start(["true"], tags=tags))["tags"] == tags


def test_tags_survive_an_agent_restart(start_agent, signer: TokenSigner,
                                       alice: UnixUser) -> None:
    agent = start_agent()
    run = _run_id()
    with client(agent, signer, alice.name) as c:
        finished = c.run(["true"], tags={"run": run, "task": "t1"}).id
    agent.stop()
    again = agent.restarted()
    try:
        with client(again, signer, alice.name) as c:
            assert [e["id"] for e in c.executions(run=run)] == [finished]
            assert c.execution(finished)["tags"] == {"run": run, "task": "t1"}
    finally:
        again.stop()
