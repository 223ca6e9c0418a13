"""A stop reaches every process an execution started, also those that left its process group,
and one user's fork bomb leaves the agent serving others: real root agents, real users, the
machine's real cgroups (and the subreaper fallback, forced with `--cgroups off`)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.cgroups import cgroup2_mount
from marco.client import AgentClient
from marco.tokens import TokenSigner
from tests.support.agent_process import AgentProcess
from tests.support.processes import alive
from tests.support.users import UnixUser
from tests.support.waiting import wait_for

# The grandchild prints its own pid, leaves the session (setsid) and outlives its parent shell;
# with stdout and stderr redirected it does not hold the execution's pipes open.
ESCAPING = "setsid sh -c 'echo $$; exec sleep 1000 >/dev/null 2>&1' &"
# A fork bomb bounded without limits too (2^10 shells, each with a sleep), so that it cannot
# take the machine down when the limit is missing; each shell sleeps until stopped.
BOMB = "b() { if [ $1 -gt 0 ]; then b $(($1-1)) & b $(($1-1)) & fi; sleep 300; }; b 9"
PIDS_LIMIT = 64


def _client(agent: AgentProcess, signer: TokenSigner, user: str) -> AgentClient:
    return agent.client(signer.issue(user), timeout=60)


def _first_line(c: AgentClient, execution_id: str) -> str:
    def line() -> str | None:
        events = c.output(execution_id)["events"]
        return events[0]["lines"][0] if events else None
    return str(wait_for(line, what="the execution's first line"))


def _lines(c: AgentClient, execution_id: str) -> list[str]:
    """Every output line the execution has printed so far."""
    return [line for event in c.output(execution_id)["events"] for line in event["lines"]]


def _processes_of(user: str) -> list[int]:
    """The user's live processes (zombies are dead; reaping them is their parent's business)."""
    found = subprocess.run(["pgrep", "-u", user], capture_output=True, text=True).stdout
    return [int(pid) for pid in found.split() if alive(int(pid))]


def _cgroups_usable() -> bool:
    return os.geteuid() == 0 and cgroup2_mount(Path("/proc/self/mountinfo").read_text()) is not None


@pytest.fixture
def no_processes_left(alice: UnixUser) -> Iterator[Callable[[], list[int]]]:
    """Alice starts and ends the test without processes, whatever the test did."""
    subprocess.run(["pkill", "-KILL", "-u", alice.name], check=False)
    wait_for(lambda: not _processes_of(alice.name), what="no processes of alice before the test")
    yield lambda: _processes_of(alice.name)
    subprocess.run(["pkill", "-KILL", "-u", alice.name], check=False)
    wait_for(lambda: not _processes_of(alice.name), what="no processes of alice after the test")


@pytest.mark.parametrize("mode", ["on", "off"])
def test_stop_kills_a_grandchild_that_left_the_session(
        start_agent: Callable[..., AgentProcess], signer: TokenSigner, alice: UnixUser,
        no_processes_left: Callable[[], list[int]], mode: str) -> None:
    if mode == "on" and not _cgroups_usable():
        pytest.skip("no cgroup v2 on this machine")
    agent = start_agent(extra_args=["--cgroups", mode, "--stop-grace", "1"])
    with _client(agent, signer, alice.name) as c:
        assert c.health()["isolation"] == ("cgroup" if mode == "on" else "subreaper")
        execution_id = c.start(ESCAPING + " sleep 1000")
        grandchild = int(_first_line(c, execution_id))
        assert alive(grandchild) and os.getsid(grandchild) == grandchild
        c.stop(execution_id)
        state = wait_for(lambda: (s := c.execution(execution_id))["state"] != "running" and s)
        assert state["stopped"]
        wait_for(lambda: not alive(grandchild), timeout=15, what="the grandchild to be killed")
    wait_for(lambda: not no_processes_left(), timeout=15, what="no process of the execution")


@pytest.mark.parametrize("mode", ["on", "off"])
def test_leftovers_run_on_until_their_execution_is_stopped(
        start_agent: Callable[..., AgentProcess], signer: TokenSigner, alice: UnixUser,
        no_processes_left: Callable[[], list[int]], mode: str) -> None:
    """A background daemon outlives the command that started it (as over ssh, and as
    Ansible's async tasks need); stopping the finished execution still ends it."""
    if mode == "on" and not _cgroups_usable():
        pytest.skip("no cgroup v2 on this machine")
    agent = start_agent(extra_args=["--cgroups", mode, "--stop-grace", "1"])
    with _client(agent, signer, alice.name) as c:
        execution_id = c.start(ESCAPING)
        grandchild = int(_first_line(c, execution_id))
        wait_for(lambda: c.execution(execution_id)["state"] == "exited", what="the shell's exit")
        assert alive(grandchild)
        c.stop(execution_id)
        wait_for(lambda: not alive(grandchild), timeout=15, what="the leftover to be killed")
    wait_for(lambda: not no_processes_left(), timeout=15, what="no process of the execution")


@pytest.mark.parametrize("mode", ["on", "off"])
def test_leftovers_go_with_their_forgotten_execution(
        start_agent: Callable[..., AgentProcess], signer: TokenSigner, alice: UnixUser,
        no_processes_left: Callable[[], list[int]], mode: str) -> None:
    """Once retention forgets an execution, nothing could stop its leftovers by id: they are
    killed with the record."""
    if mode == "on" and not _cgroups_usable():
        pytest.skip("no cgroup v2 on this machine")
    agent = start_agent(extra_args=["--cgroups", mode, "--retention-count", "1"])
    with _client(agent, signer, alice.name) as c:
        execution_id = c.start(ESCAPING)
        grandchild = int(_first_line(c, execution_id))
        wait_for(lambda: c.execution(execution_id)["state"] == "exited", what="the shell's exit")
        assert alive(grandchild)
        c.run(["true"])
        c.run(["true"])  # retention keeps one finished execution: the first is forgotten
        assert execution_id not in {e["id"] for e in c.executions()}
        wait_for(lambda: not alive(grandchild), timeout=15, what="the leftover to be killed")
    wait_for(lambda: not no_processes_left(), timeout=15, what="no process of the execution")


def test_fork_bomb_leaves_the_agent_serving_others(
        start_agent: Callable[..., AgentProcess], signer: TokenSigner, alice: UnixUser,
        bob: UnixUser, no_processes_left: Callable[[], list[int]]) -> None:
    agent = start_agent(extra_args=["--max-pids-per-user", str(PIDS_LIMIT), "--stop-grace", "1"])
    with _client(agent, signer, alice.name) as alices, _client(agent, signer, bob.name) as bobs:
        bomb = alices.start(BOMB, timeout=120)
        # The bomb has met the limit once a shell of it could not fork (dash: "Cannot fork").
        # Counting its live processes instead raced with the shells that exit on that error.
        wait_for(lambda: any("fork" in line for line in _lines(alices, bomb)), timeout=30,
                 what="the fork bomb to meet the per-user limit")
        started = time.monotonic()
        result = bobs.run(["true"])
        assert result.rc == 0 and time.monotonic() - started < 20
        assert alices.execution(bomb)["state"] == "running"
        assert len(no_processes_left()) <= PIDS_LIMIT
        alices.stop(bomb)
        wait_for(lambda: not no_processes_left(), timeout=20,
                 what="every process of alice to be gone after the stop")
