"""Pipelined Ansible modules over HTTP through a real root agent's module runner (issue 14):
the path each takes, its answer, its output on the stream, stop and exit like the cold path."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from marco.agent_api import AgentRequests
from marco.client import AgentClient
from marco.tokens import TokenSigner
from tests.support.agent_process import AgentProcess
from tests.support.ansiballz_payloads import PIPELINED, module_payload
from tests.support.run import RunNames
from tests.support.users import UnixUser, create_user, remove_user
from tests.support.waiting import wait_for


def client(agent: AgentProcess, signer: TokenSigner, user: str) -> AgentClient:
    return agent.client(signer.issue(user), timeout=60)


def runner_pid(note: str) -> int:
    """The pid in a note "warm (runner PID, task N)"."""
    return int(note.split("runner ", 1)[1].split(",", 1)[0])


def command_payload(command: str) -> bytes:
    return module_payload("command", {"_raw_params": command})


def test_a_pipelined_module_runs_warm_and_answers_as_cold(
        shared_agent: AgentProcess, signer: TokenSigner, alice: UnixUser) -> None:
    payload = command_payload("id -un")
    with client(shared_agent, signer, alice.name) as c:
        first = c.run(PIPELINED, stdin=payload)
        second = c.run(PIPELINED, stdin=payload)
        cold = c.run(PIPELINED, stdin=payload, runner=False)
    for result in (first, second, cold):
        assert result.rc == 0, result.stderr
        assert json.loads(result.stdout)["stdout"] == alice.name
    assert (first.via, second.via, cold.via) == ("runner", "runner", "process")
    assert second.runner_note.startswith("warm (runner ")
    assert cold.runner_note == "not asked (runner: false)"
    with client(shared_agent, signer, alice.name) as c:
        assert c.execution(second.id)["via"] == "runner"
        runners = c.status()["runners"]
    assert [(r["user"], r["pid"]) for r in runners] == [(alice.name, runner_pid(second.runner_note))]


def test_other_commands_and_other_users_never_share_a_runner(
        shared_agent: AgentProcess, signer: TokenSigner, alice: UnixUser,
        bob: UnixUser) -> None:
    payload = command_payload("id -u")
    with client(shared_agent, signer, alice.name) as a, client(shared_agent, signer,
                                                               bob.name) as b:
        plain = a.run("echo hi")
        mine, theirs = a.run(PIPELINED, stdin=payload), b.run(PIPELINED, stdin=payload)
        a_runners, b_runners = a.status()["runners"], b.status()["runners"]
    assert plain.via == "process" and plain.runner_note == "not /bin/sh -c"
    assert json.loads(mine.stdout)["stdout"] == str(alice.uid)
    assert json.loads(theirs.stdout)["stdout"] == str(bob.uid)
    assert mine.via == theirs.via == "runner"
    assert {r["user"] for r in a_runners} == {alice.name}  # each sees only their own
    assert {r["user"] for r in b_runners} == {bob.name}
    assert not {r["pid"] for r in a_runners} & {r["pid"] for r in b_runners}
    for runner, user in ((a_runners[0], alice), (b_runners[0], bob)):
        assert os.stat(f"/proc/{runner['pid']}").st_uid == user.uid


def test_a_signal_ends_a_warm_task_as_the_shell_reports_it(
        shared_agent: AgentProcess, signer: TokenSigner, alice: UnixUser) -> None:
    # The command module execs `kill`, but the module's own process is what dies here:
    # it asks to be killed through a payload-level script that is still pipelined.
    payload = command_payload("sleep 0")  # warms the runner
    crash = payload.replace(b"\nif __name__ == \"__main__\":",
                            b"\nimport os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n"
                            b"if __name__ == \"__main__\":", 1)
    with client(shared_agent, signer, alice.name) as c:
        c.run(PIPELINED, stdin=payload)
        warm = c.run(PIPELINED, stdin=crash)
        cold = c.run(PIPELINED, stdin=crash, runner=False)
    assert warm.via == "runner"
    assert (warm.rc, warm.signal) == (cold.rc, cold.signal) == (139, None)
    assert warm.stderr == cold.stderr


def test_stopping_a_warm_task_kills_it(shared_agent: AgentProcess, signer: TokenSigner,
                                       alice: UnixUser) -> None:
    payload = command_payload("sleep 60")
    with client(shared_agent, signer, alice.name) as c:
        c.run(PIPELINED, stdin=command_payload("true"))
        execution_id = c.start(PIPELINED, stdin=payload)
        wait_for(lambda: c.execution(execution_id)["via"] == "runner", what="warm start")
        c.stop(execution_id)
        wait_for(lambda: c.execution(execution_id)["state"] != "running", timeout=15,
                 what="the stop")
        ended = c.execution(execution_id)
    assert ended["state"] == "killed" and ended["signal"] == "SIGTERM", ended
    assert ended["stopped"] is True


@pytest.fixture
def slow_starter(run: RunNames) -> Iterator[UnixUser]:
    """A user whose every Python takes 1 s to start (a usercustomize that sleeps): their
    module runner's first task spends that second being launched."""
    user = create_user(run.user("slow"))
    site = subprocess.run(["runuser", "-u", user.name, "--", "/usr/bin/python3", "-c",
                           "import site; print(site.getusersitepackages())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run(["runuser", "-u", user.name, "--", "mkdir", "-p", site], check=True)
    path = os.path.join(site, "usercustomize.py")
    with open(path, "w") as handle:
        handle.write("import time\ntime.sleep(1)\n")
    os.chown(path, user.uid, user.gid)
    yield user
    remove_user(user.name)


def test_a_stop_during_a_warm_launch_reaches_the_task(
        shared_agent: AgentProcess, signer: TokenSigner, slow_starter: UnixUser) -> None:
    with client(shared_agent, signer, slow_starter.name) as c:
        answer: list[Any] = []
        waiting = threading.Thread(target=lambda: answer.append(
            c.run(PIPELINED, stdin=command_payload("sleep 60"))))
        waiting.start()
        with client(shared_agent, signer, slow_starter.name) as other:
            listed = wait_for(lambda: other.executions(), what="the execution being started")
            other.stop(listed[0]["id"])  # while its new runner still starts
        waiting.join(timeout=30)
    assert answer, "the task ran on after its stop"
    assert answer[0].stopped and answer[0].signal in ("SIGTERM", "SIGKILL"), answer[0]


def test_a_caller_hanging_up_during_a_warm_launch_stops_the_task(
        shared_agent: AgentProcess, signer: TokenSigner, slow_starter: UnixUser) -> None:
    """A `?wait=1` caller that hangs up while its task's runner is still being launched (the
    execution is listed, its start not over: an Ansible worker killed then) takes the task
    with it once the launch is over, as a hang-up later does."""
    token = signer.issue(slow_starter.name)
    request = AgentRequests(token).run(PIPELINED, stdin=command_payload("sleep 60"))
    conn = shared_agent.connection(timeout=30)
    conn.request(request.method, request.path, body=request.body, headers=request.headers)
    with client(shared_agent, signer, slow_starter.name) as other:
        listed = wait_for(lambda: other.executions(), what="the execution being started")
        conn.close()  # within the runner's 1 s launch
        ended = wait_for(lambda: (e := other.execution(listed[0]["id"]))["state"] != "running"
                         and e, timeout=15, what="the hung-up task stopped")
    assert ended["stopped"] and ended["signal"] in ("SIGTERM", "SIGKILL"), ended


def test_a_death_by_a_real_time_signal_ends_the_execution(
        shared_agent: AgentProcess, signer: TokenSigner, alice: UnixUser) -> None:
    with client(shared_agent, signer, alice.name) as c:
        result = c.run(["/usr/bin/python3", "-c",
                        "import os, signal; os.kill(os.getpid(), signal.SIGRTMIN + 3)"])
    assert (result.rc, result.signal) == (None, "SIGRTMIN+3")


@pytest.mark.parametrize("runner", [True, False], ids=["warm", "cold"])
def test_a_grandchild_holding_the_pipes_does_not_hold_the_answer(
        shared_agent: AgentProcess, signer: TokenSigner, alice: UnixUser, runner: bool) -> None:
    """The module exits; a background process it started keeps its stdout and stderr open.
    The answer comes anyway, EXIT_LINGER after the exit, with the module's result."""
    payload = command_payload("true").replace(
        b"\nif __name__ == \"__main__\":",
        b"\nimport subprocess\nsubprocess.Popen(['sleep', '600'])\nif __name__ == \"__main__\":", 1)
    with client(shared_agent, signer, alice.name) as c:
        result = c.run(PIPELINED, stdin=payload, runner=runner)
    assert result.via == ("runner" if runner else "process")
    assert result.rc == 0 and json.loads(result.stdout)["rc"] == 0, result.stderr
