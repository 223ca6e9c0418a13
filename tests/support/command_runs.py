"""Command runs made through the controller's API (POST /api/run), as the run pages' tests need
them: started, ended, or with every execution's output archived."""

from __future__ import annotations

from typing import Any

from tests.support.controller_process import ControllerProcess
from tests.support.http import call
from tests.support.waiting import wait_for


def start_command_run(controller: ControllerProcess, token: str, nodes: str | list[str],
                      command: str) -> str:
    """A command run on `nodes` (one name or several), not waited for; its id."""
    nodes = [nodes] if isinstance(nodes, str) else nodes
    status, answer = call(controller, "POST", "/api/run", {"nodes": nodes, "command": command},
                          token)
    assert status == 200, answer
    return str(answer["run"]["id"])


def run_of(controller: ControllerProcess, token: str, run_id: str) -> dict[str, Any]:
    """GET /api/runs/ID, which must answer."""
    status, run = call(controller, "GET", f"/api/runs/{run_id}", token=token)
    assert status == 200, run
    return dict(run)


def ended_command_run(controller: ControllerProcess, token: str, nodes: str | list[str],
                      command: str, timeout: float = 60) -> str:
    """A command run, waited for until it has ended; its id."""
    run_id = start_command_run(controller, token, nodes, command)
    wait_for(lambda: run_of(controller, token, run_id)["ended"] is not None, timeout=timeout,
             what=f"run {run_id} ended")
    return run_id


def all_archived(controller: ControllerProcess, token: str, run_id: str, count: int) -> bool:
    """Whether the run lists `count` executions, each archived (its output all stored)."""
    status, found = call(controller, "GET", f"/api/runs/{run_id}/executions", token=token)
    assert status == 200, found
    executions = found["executions"]
    return len(executions) == count and all(e["archived"] for e in executions)


def archived_command_run(controller: ControllerProcess, token: str, nodes: str | list[str],
                         command: str, timeout: float = 120) -> str:
    """A command run ended with every execution archived (its output all stored); its id."""
    count = 1 if isinstance(nodes, str) else len(nodes)
    run_id = start_command_run(controller, token, nodes, command)
    wait_for(lambda: all_archived(controller, token, run_id, count), timeout=timeout,
             what=f"run {run_id}'s executions archived")
    return run_id
