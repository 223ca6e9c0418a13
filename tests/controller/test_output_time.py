"""A run's stored output keeps the time of each output event its agent gave (docs/protocol.md
"Output events and `seq`"): a real controller runs a command on a real agent, collects its
output, and answers the same times once the agent is gone."""

from __future__ import annotations

import urllib.parse
from typing import Any

from marco.tokens import TokenSigner
from tests.support.controller_process import ControllerProcess
from tests.support.http import call
from tests.support.users import UnixUser
from tests.support.waiting import wait_for

TWO_LINES = "echo a; sleep 0.3; echo b"


def stored_output(controller: ControllerProcess, token: str, run_id: str,
                  execution_id: str) -> dict[str, Any]:
    query = urllib.parse.urlencode({"execution": execution_id, "since": 0})
    status, answer = call(controller, "GET", f"/api/runs/{run_id}/output?{query}", token=token)
    assert status == 200, answer
    return dict(answer)


def swept(controller: ControllerProcess, token: str, run_id: str) -> list[dict[str, Any]]:
    """The run's executions once it has ended and all of them are stored whole."""
    status, run = call(controller, "GET", f"/api/runs/{run_id}", token=token)
    assert status == 200, run
    if not run["ended"]:
        return []
    status, answer = call(controller, "GET", f"/api/runs/{run_id}/executions", token=token)
    assert status == 200, answer
    found = list(answer["executions"])
    return found if found and all(e["state"] == "ended" for e in found) else []


def stamps(events: list[dict[str, Any]]) -> list[tuple[str, int, list[str], float]]:
    return [(e["stream"], e["seq"], e["lines"], e["time"]) for e in events]


def test_a_runs_stored_output_keeps_each_events_time(start_agent, start_controller,
                                                     alice: UnixUser, signer: TokenSigner,
                                                     unique_name) -> None:
    agent = start_agent(node_name=unique_name("time"))
    node, token = agent.node_name, signer.issue(alice.name)
    controller = start_controller(
        extra_args=["--no-discovery", "--node", f"{node}={agent.host}:{agent.port}"])
    wait_for(lambda: node in controller.inventory_hosts(token), what="node alive")
    status, answer = call(controller, "POST", "/api/run",
                          {"nodes": [node], "command": TWO_LINES}, token)
    assert status == 200, answer
    run_id, execution_id = answer["run"]["id"], answer["results"][node]["id"]
    wait_for(lambda: swept(controller, token, run_id), what="the run's output stored")
    given = agent.client(token).output(execution_id)
    execution = given["execution"]
    agent.stop()  # what follows comes from the controller's store alone
    page = stored_output(controller, token, run_id, execution_id)
    assert page["end"] and page["archived"]
    assert stamps(page["events"]) == stamps(given["events"])
    (_, _, first_lines, first), (_, _, second_lines, second) = stamps(page["events"])
    assert (first_lines, second_lines) == (["a"], ["b"])
    assert execution["started"] <= first < second <= execution["ended"]
    assert second - first >= 0.25
