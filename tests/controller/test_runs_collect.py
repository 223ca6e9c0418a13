"""Output kept as it happens (docs/runs.md "Keeping output") against a real controller and real
agents: an execution is archived once its host's result arrives, before the run ends; a run of
more executions than the agent keeps loses none; one still running at the end is archived once
it exits; collections are bounded per user; a refused token stops the retries."""

from __future__ import annotations

import asyncio
import re
import secrets
import signal
import sqlite3
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from controller.__main__ import build_parser, load_config
from controller.collector import CollectLimits, OutputCollector
from controller.connector import AgentConnector
from controller.context import collect_limits
from controller.runstore import Run, RunStoreThread, new_run_id
from marco.errors import ConfigError
from marco.nodes import Node, NodeRegistry
from marco.tokens import TokenSigner
from tests.support.agent_process import AgentProcess
from tests.support.controller_process import ControllerProcess
from tests.support.http import call
from tests.support.users import UnixUser
from tests.support.waiting import wait_for


def cluster(start_agent, start_controller, unique_name: Callable[[str], str], token: str,
            agents: int = 1, agent_args: tuple[str, ...] = (),
            controller_args: tuple[str, ...] = ()) -> tuple[ControllerProcess, list[AgentProcess]]:
    """A controller with its own agents as static nodes (so a test may stop them), all alive."""
    started = [start_agent(node_name=unique_name("collect"), extra_args=list(agent_args))
               for _ in range(agents)]
    nodes = [arg for a in started for arg in ("--node", f"{a.node_name}={a.host}:{a.port}")]
    controller = start_controller(extra_args=["--no-discovery", *nodes, *controller_args])
    names = {a.node_name for a in started}
    wait_for(lambda: names <= set(controller.inventory_hosts(token)), what="nodes alive")
    return controller, started


def new_run(controller: ControllerProcess, token: str, hosts: list[str]) -> str:
    status, answer = call(controller, "POST", "/api/runs",
                          {"kind": "playbook", "title": "ansible-playbook collect.yml",
                           "hosts": hosts}, token)
    assert status == 201, answer
    return str(answer["id"])


def start_task(agent: AgentProcess, token: str, run_id: str, task_id: str, command: str) -> str:
    """An execution tagged as the connection plugin tags a task's (run, task, host)."""
    with agent.client(token) as client:
        return client.start(command, tags={"run": run_id, "task": task_id,
                                           "host": agent.node_name})


def wait_exited(agent: AgentProcess, token: str, execution_id: str) -> None:
    with agent.client(token) as client:
        wait_for(lambda: client.execution(execution_id)["state"] != "running",
                 what=f"execution {execution_id} exited")


def send_result(controller: ControllerProcess, token: str, run_id: str, task_id: str,
                *hosts: str) -> None:
    """The callback's task start and the task's result on each host, in one batch."""
    status, answer = call(controller, "POST", f"/api/runs/{run_id}/events", {"events": [
        {"type": "task_start", "task": task_id, "task_id": task_id, "play_id": "p1",
         "action": "ansible.builtin.shell"},
        *({"type": "host_result", "task_id": task_id, "host": host, "status": "changed",
           "msg": "", "rc": 0, "duration": 0.1} for host in hosts)]}, token)
    assert status == 200, answer


def stored(controller: ControllerProcess, token: str, run_id: str) -> dict[str, dict[str, Any]]:
    """The run's executions as the controller lists them, by id."""
    status, answer = call(controller, "GET", f"/api/runs/{run_id}/executions", token=token)
    assert status == 200, answer
    return {e["execution_id"]: e for e in answer["executions"]}


def archived(controller: ControllerProcess, token: str, run_id: str,
             execution_id: str) -> dict[str, Any] | None:
    execution = stored(controller, token, run_id).get(execution_id)
    return execution if execution is not None and execution["archived"] else None


def stored_lines(controller: ControllerProcess, token: str, run_id: str,
                 execution_id: str) -> tuple[list[str], bool]:
    """Every line the controller gives of one execution, page by page, and whether it ended."""
    lines: list[str] = []
    since = 0
    while True:
        status, page = call(controller, "GET", f"/api/runs/{run_id}/output?execution="
                            f"{execution_id}&since={since}", token=token)
        assert status == 200, page
        lines += [line for event in page["events"] for line in event["lines"]]
        if page["end"] or page["next"] <= since:
            return lines, page["end"]
        since = page["next"]


def finish(controller: ControllerProcess, token: str, run_id: str) -> None:
    status, answer = call(controller, "POST", f"/api/runs/{run_id}/finish",
                          {"status": "interrupted"}, token)
    assert status == 200, answer


def collection_log(controller: ControllerProcess, run_id: str) -> list[str]:
    """The controller's log lines about collecting the run."""
    return [line for line in controller.log().splitlines()
            if run_id in line and "collect" in line]


def test_an_execution_is_kept_once_its_result_arrives_before_the_run_ends(
        start_agent, start_controller, alice: UnixUser, signer: TokenSigner,
        unique_name) -> None:
    token = signer.issue(alice.name)
    controller, (agent,) = cluster(start_agent, start_controller, unique_name, token)
    run_id = new_run(controller, token, [agent.node_name])
    execution_id = start_task(agent, token, run_id, "t1", "echo kept-early; echo second")
    wait_exited(agent, token, execution_id)
    send_result(controller, token, run_id, "t1", agent.node_name)
    kept = wait_for(lambda: archived(controller, token, run_id, execution_id),
                    what="the execution archived on its host's result")
    assert (kept["host"], kept["node"], kept["task_id"], kept["stored_seq"]) == (
        agent.node_name, agent.node_name, "t1", 2)
    agent.stop()
    status, run = call(controller, "GET", f"/api/runs/{run_id}", token=token)
    assert status == 200 and run["status"] == "running"  # kept before the run ended
    assert stored_lines(controller, token, run_id, execution_id) == (
        ["kept-early", "second"], True)


def test_a_delegated_result_is_collected_from_its_delegate_and_no_log_has_no_lines(
        start_agent, start_controller, alice: UnixUser, signer: TokenSigner,
        unique_name) -> None:
    """A task delegated to a node runs there for another inventory host: the result names the
    node as `delegate` (#16). A no_log execution is archived with no output at all."""
    token = signer.issue(alice.name)
    controller, (agent,) = cluster(start_agent, start_controller, unique_name, token)
    node, web = agent.node_name, f"web-{secrets.token_hex(3)}"  # web: not a Marco node
    run_id = new_run(controller, token, [web, node])
    with agent.client(token) as client:
        delegated = client.start("echo delegated", tags={"run": run_id, "task": "t1",
                                                         "host": web})
        hidden = client.start("echo secret-value", no_log=True,
                              tags={"run": run_id, "task": "t2", "host": node})
    for execution_id in (delegated, hidden):
        wait_exited(agent, token, execution_id)
    result = {"type": "host_result", "status": "changed", "msg": "", "rc": 0, "duration": 0.1}
    status, answer = call(controller, "POST", f"/api/runs/{run_id}/events", {"events": [
        {**result, "task_id": "t1", "host": web, "delegate": node}]}, token)
    assert status == 200, answer
    kept = wait_for(partial(archived, controller, token, run_id, delegated),
                    what="the delegated execution archived")
    assert (kept["host"], kept["node"], kept["task_id"]) == (web, node, "t1")
    status, answer = call(controller, "POST", f"/api/runs/{run_id}/events", {"events": [
        {**result, "task_id": "t2", "host": node, "msg": "output hidden: no_log"}]}, token)
    assert status == 200, answer
    kept = wait_for(partial(archived, controller, token, run_id, hidden),
                    what="the no_log execution archived")
    assert (kept["host"], kept["stored_seq"]) == (node, 0)
    agent.stop()
    assert stored_lines(controller, token, run_id, delegated) == (["delegated"], True)
    assert stored_lines(controller, token, run_id, hidden) == ([], True)


def test_executions_a_run_names_stay_listed_without_their_agent(
        start_controller, alice: UnixUser, signer: TokenSigner) -> None:
    """An `execution` event registers its execution: listed (not archived) with no agent."""
    controller = start_controller(extra_args=["--no-discovery"])
    token = signer.issue(alice.name)
    run_id = new_run(controller, token, [])
    status, answer = call(controller, "POST", f"/api/runs/{run_id}/events", {"events": [
        {"type": "execution", "host": "web1", "execution_id": "e-gone", "task_id": "t1"},
        {"type": "execution", "host": "web2"}]}, token)  # no id: nothing to register
    assert status == 200, answer
    kept = stored(controller, token, run_id)
    assert [(e["execution_id"], e["host"], e["node"], e["task_id"], e["archived"])
            for e in kept.values()] == [("e-gone", "web1", "web1", "t1", False)]


def test_a_command_runs_executions_are_listed_once_started(
        start_agent, start_controller, alice: UnixUser, signer: TokenSigner,
        unique_name) -> None:
    """POST /api/run registers each execution it starts: an agent killed before anyone read
    it leaves its execution listed, not archived."""
    token = signer.issue(alice.name)
    controller, (agent,) = cluster(start_agent, start_controller, unique_name, token)
    status, answer = call(controller, "POST", "/api/run",
                          {"nodes": [agent.node_name], "command": "exec sleep 60"}, token)
    assert status == 200, answer
    run_id, execution_id = answer["run"]["id"], answer["results"][agent.node_name]["id"]
    agent.stop(signal.SIGKILL)
    wait_for(lambda: call(controller, "GET", f"/api/runs/{run_id}", token=token)[1]["ended"],
             what="the run ended unreachable")
    kept = stored(controller, token, run_id)
    assert [(e["execution_id"], e["node"], e["archived"]) for e in kept.values()] == [
        (execution_id, agent.node_name, False)]


def test_a_command_runs_execution_is_kept_once_it_exits_while_others_run(
        start_agent, start_controller, alice: UnixUser, signer: TokenSigner,
        unique_name) -> None:
    """The watcher asks for an execution's output as soon as it exits, before its run ends:
    of one command on two nodes, the first to take a lock exits, the other waits."""
    token = signer.issue(alice.name)
    controller, agents = cluster(start_agent, start_controller, unique_name, token, agents=2)
    lock, flag = (Path("/tmp") / f"marco-collect-{secrets.token_hex(6)}" for _ in range(2))
    command = (f"echo quick; mkdir {lock} 2>/dev/null && exit 0; "
               f"while [ ! -e {flag} ]; do sleep 0.05; done")
    try:
        status, answer = call(controller, "POST", "/api/run",
                              {"nodes": [a.node_name for a in agents], "command": command},
                              token)
        assert status == 200, answer
        run_id = answer["run"]["id"]
        ids = {a.node_name: answer["results"][a.node_name]["id"] for a in agents}

        def exited() -> str | None:
            for agent in agents:
                with agent.client(token) as client:
                    if client.execution(ids[agent.node_name])["state"] != "running":
                        return agent.node_name
            return None

        quick = wait_for(exited, what="one execution exited")
        wait_for(partial(archived, controller, token, run_id, ids[quick]),
                 what="the exited one archived while the run runs")
        status, run = call(controller, "GET", f"/api/runs/{run_id}", token=token)
        assert status == 200 and run["status"] == "running"
        flag.touch()
        wait_for(lambda: call(controller, "GET", f"/api/runs/{run_id}", token=token)[1][
            "status"] == "ok", what="the run ended ok")
    finally:
        flag.unlink(missing_ok=True)
        if lock.exists():
            lock.rmdir()


def test_a_run_of_more_executions_than_the_agent_keeps_loses_none(
        start_agent, start_controller, alice: UnixUser, signer: TokenSigner,
        unique_name) -> None:
    """The agent forgets all but 5 finished executions; a result per task keeps all 8."""
    token = signer.issue(alice.name)
    controller, (agent,) = cluster(start_agent, start_controller, unique_name, token,
                                   agent_args=("--retention-count", "5"))
    run_id = new_run(controller, token, [agent.node_name])
    tasks = {}
    for number in range(8):
        task_id = f"t{number}"
        execution_id = start_task(agent, token, run_id, task_id, f"echo task-{number}")
        wait_exited(agent, token, execution_id)
        send_result(controller, token, run_id, task_id, agent.node_name)
        wait_for(partial(archived, controller, token, run_id, execution_id),
                 what=f"task {number}'s execution archived")
        tasks[execution_id] = number
    with agent.client(token) as client:
        assert len(client.executions(run=run_id)) == 5  # the agent forgot the first three
    finish(controller, token, run_id)
    agent.stop()
    kept = stored(controller, token, run_id)
    assert sorted(kept) == sorted(tasks)
    for execution_id, number in tasks.items():
        assert (kept[execution_id]["task_id"], kept[execution_id]["archived"]) == (
            f"t{number}", True)
        assert stored_lines(controller, token, run_id, execution_id) == (
            [f"task-{number}"], True)


def test_an_execution_running_when_the_run_ends_is_archived_once_it_exits(
        start_agent, start_controller, alice: UnixUser, signer: TokenSigner,
        unique_name) -> None:
    token = signer.issue(alice.name)
    controller, (agent,) = cluster(start_agent, start_controller, unique_name, token,
                                   controller_args=("--runs-collect-retry", "0.2"))
    run_id = new_run(controller, token, [agent.node_name])
    flag = Path("/tmp") / f"marco-collect-{secrets.token_hex(6)}"
    try:
        execution_id = start_task(agent, token, run_id, "t1", f"echo before; while [ ! -e "
                                  f"{flag} ]; do sleep 0.05; done; echo after")
        with agent.client(token) as client:
            wait_for(lambda: client.output(execution_id)["events"], what="the first line")
        finish(controller, token, run_id)
        # The final collection stores what there is and leaves it unarchived...
        wait_for(lambda: (e := stored(controller, token, run_id).get(execution_id)) and
                 e["stored_seq"] == 1, what="the first line stored")
        assert not stored(controller, token, run_id)[execution_id]["archived"]
        flag.touch()
        # ...and comes back for the rest once the execution has exited.
        kept = wait_for(lambda: archived(controller, token, run_id, execution_id),
                        what="the execution archived after it exited")
        assert kept["stored_seq"] == 2
    finally:
        flag.unlink(missing_ok=True)
    agent.stop()
    assert stored_lines(controller, token, run_id, execution_id) == (["before", "after"], True)


COLLECTING = re.compile(r"collecting run (\S+) on (\S+) \((\d+) of at most (\d+) at once")


def test_a_users_collections_run_one_at_a_time_when_the_bound_is_one(
        start_agent, start_controller, alice: UnixUser, signer: TokenSigner,
        unique_name) -> None:
    token = signer.issue(alice.name)
    controller, agents = cluster(start_agent, start_controller, unique_name, token, agents=3,
                                 controller_args=("--runs-collect-per-user", "1"))
    names = [a.node_name for a in agents]
    run_id = new_run(controller, token, names)
    executions = [start_task(a, token, run_id, "t1", "echo on-" + a.node_name) for a in agents]
    for agent, execution_id in zip(agents, executions, strict=True):
        wait_exited(agent, token, execution_id)
    finish(controller, token, run_id)  # one final collection per node, asked all at once
    for execution_id in executions:
        wait_for(partial(archived, controller, token, run_id, execution_id),
                 what="every node's execution archived")
    lines = collection_log(controller, run_id)
    starts = [m.groups() for line in lines if (m := COLLECTING.search(line))]
    assert sorted(node for _, node, _, _ in starts) == sorted(names), lines
    assert {(running, bound) for _, _, running, bound in starts} == {("1", "1")}, lines
    # Each collection ends before the next starts.
    steps = [line for line in lines if "collecting run" in line or "collected run" in line]
    assert ["collecting run" in line for line in steps] == [True, False] * len(names), steps


def test_a_users_waiting_collections_are_bounded_and_the_end_picks_up_the_rest(
        start_agent, start_controller, alice: UnixUser, signer: TokenSigner,
        unique_name) -> None:
    """One collection at a time and one waiting: of three results in one batch, the third
    node's collection is dropped (logged), and the run's final collection stores it."""
    token = signer.issue(alice.name)
    controller, agents = cluster(start_agent, start_controller, unique_name, token, agents=3,
                                 controller_args=("--runs-collect-per-user", "1",
                                                  "--runs-collect-queue-per-user", "1"))
    names = [a.node_name for a in agents]
    run_id = new_run(controller, token, names)
    executions = [start_task(a, token, run_id, "t1", "echo on-" + a.node_name) for a in agents]
    for agent, execution_id in zip(agents, executions, strict=True):
        wait_exited(agent, token, execution_id)
    send_result(controller, token, run_id, "t1", *names)
    dropped = [line for line in collection_log(controller, run_id) if "dropped" in line]
    assert len(dropped) == 1 and f"collection on {names[2]} dropped" in dropped[0], dropped
    wait_for(partial(archived, controller, token, run_id, executions[1]),
             what="the waiting collection done")
    assert not stored(controller, token, run_id)[executions[2]]["archived"]
    finish(controller, token, run_id)
    wait_for(partial(archived, controller, token, run_id, executions[2]),
             what="the dropped one collected at the end")


def test_a_users_final_collections_are_bounded(start_agent, start_controller,
                                               alice: UnixUser, signer: TokenSigner,
                                               unique_name) -> None:
    """With runs_collect_finals_per_user 1, one final collection is retried while its
    execution runs on; a second run ending meanwhile gets none (logged: its output is read
    from the agent while it holds it); the first is archived."""
    token = signer.issue(alice.name)
    controller, (agent,) = cluster(start_agent, start_controller, unique_name, token,
                                   controller_args=("--runs-collect-finals-per-user", "1",
                                                    "--runs-collect-retry", "0.2"))
    flag = Path("/tmp") / f"marco-collect-{secrets.token_hex(6)}"
    command = f"echo before; while [ ! -e {flag} ]; do sleep 0.05; done; echo after"
    runs = [new_run(controller, token, [agent.node_name]) for _ in range(2)]
    executions = [start_task(agent, token, run_id, "t1", command) for run_id in runs]
    status, answer = call(controller, "POST", f"/api/runs/{runs[1]}/events", {"events": [
        {"type": "execution", "host": agent.node_name, "execution_id": executions[1]}]}, token)
    assert status == 200, answer  # registered: the read side asks its agent for the rest
    refused = (f"final collection on {agent.node_name} not queued: 1 of the user's final "
               "collections are pending already")
    try:
        finish(controller, token, runs[0])
        wait_for(lambda: "again in" in "\n".join(collection_log(controller, runs[0])),
                 what="the first run's collection retried")
        finish(controller, token, runs[1])
        wait_for(lambda: refused in "\n".join(collection_log(controller, runs[1])),
                 what="the second run's final collection not queued")
        assert not [line for line in collection_log(controller, runs[1])
                    if "collecting run" in line]
        flag.touch()
        kept = wait_for(partial(archived, controller, token, runs[0], executions[0]),
                        what="the retried run archived")
        assert kept["stored_seq"] == 2
    finally:
        flag.unlink(missing_ok=True)
    assert refused not in "\n".join(collection_log(controller, runs[0]))
    # The second run's output is still read, live, from the agent.
    wait_exited(agent, token, executions[1])
    assert stored_lines(controller, token, runs[1], executions[1]) == (["before", "after"], True)


def test_collect_settings_reach_the_collector_and_refuse_zero() -> None:
    environ = {"MARCO_RUNS_COLLECT_RETRY": "0.5"}
    config = load_config(build_parser().parse_args(["--runs-collect-per-user", "2",
                                                    "--runs-collect-give-up", "60"]), environ)
    assert collect_limits(config) == CollectLimits(per_user=2, retry=0.5, give_up=60)
    config = load_config(build_parser().parse_args([
        "--runs-collect-finals-per-user", "7", "--runs-collect-retry-max", "9",
        "--runs-collect-page-lines", "100"]), {})
    assert collect_limits(config) == CollectLimits(finals_per_user=7, retry_max=9,
                                                   page_lines=100)
    assert collect_limits(load_config(build_parser().parse_args([]), {})) == CollectLimits(
        per_user=4, queue_per_user=1000, finals_per_user=1000, retry=5, retry_max=60,
        give_up=3600, page_lines=20_000)
    for flag in ("--runs-collect-per-user", "--runs-collect-queue-per-user",
                 "--runs-collect-finals-per-user", "--runs-collect-retry",
                 "--runs-collect-retry-max", "--runs-collect-give-up",
                 "--runs-collect-page-lines"):
        with pytest.raises(ConfigError, match=flag[2:].replace("-", "_")):
            load_config(build_parser().parse_args([flag, "0"]), {})


def test_a_refused_token_stops_the_retries(start_agent, start_controller, alice: UnixUser,
                                           signer: TokenSigner, unique_name) -> None:
    """The agent takes tokens for 3 s only: the final collection's retries, waiting for an
    execution that runs on, meet a refused token and stop (the controller's log says so)."""
    token = signer.issue(alice.name)
    controller, (agent,) = cluster(start_agent, start_controller, unique_name, token,
                                   agent_args=("--token-max-age", "3"),
                                   controller_args=("--runs-collect-retry", "0.2"))
    run_id = new_run(controller, token, [agent.node_name])
    execution_id = start_task(agent, token, run_id, "t1", "echo started; exec sleep 600")
    finish(controller, token, run_id)
    refused = f"run {run_id} of {alice.name}: collection on {agent.node_name} stopped, the " \
              "token was refused"
    wait_for(lambda: refused in controller.log(), what="the collection stopped by the agent")
    fresh = signer.issue(alice.name)
    with agent.client(fresh) as client:
        client.stop(execution_id)
    wait_exited(agent, fresh, execution_id)
    lines = collection_log(controller, run_id)
    stop = next(i for i, line in enumerate(lines) if refused in line)
    assert [line for line in lines[stop + 1:] if "collecting run" in line] == [], lines
    assert f"collected run {run_id} on {agent.node_name}: stopped" in lines[stop + 1]
    assert not stored(controller, fresh, run_id)[execution_id]["archived"]


def test_a_delegate_is_recorded_so_the_final_collection_asks_it_when_its_request_dropped(
        start_agent, start_controller, alice: UnixUser, signer: TokenSigner,
        unique_name) -> None:
    """A delegate is not one of the run's hosts: its node is recorded (add_nodes) as the
    result arrives, so when that collection is dropped (the user's queue is full) the run's
    final collection still asks it (#5)."""
    token = signer.issue(alice.name)
    controller, agents = cluster(start_agent, start_controller, unique_name, token, agents=3,
                                 controller_args=("--runs-collect-per-user", "1",
                                                  "--runs-collect-queue-per-user", "1"))
    names = [a.node_name for a in agents]
    web = f"web-{secrets.token_hex(3)}"  # an inventory host that is not a node
    run_id = new_run(controller, token, [*names[:2], web])
    executions = [start_task(a, token, run_id, "t1", "echo on-" + a.node_name)
                  for a in agents[:2]]
    with agents[2].client(token) as client:
        delegated = client.start("echo delegated", tags={"run": run_id, "task": "t1",
                                                         "host": web})
    for agent, execution_id in zip(agents, [*executions, delegated], strict=True):
        wait_exited(agent, token, execution_id)
    result = {"type": "host_result", "task_id": "t1", "status": "changed", "msg": "", "rc": 0,
              "duration": 0.1}
    status, answer = call(controller, "POST", f"/api/runs/{run_id}/events", {"events": [
        *({**result, "host": name} for name in names[:2]),
        {**result, "host": web, "delegate": names[2]}]}, token)
    assert status == 200, answer
    dropped = [line for line in collection_log(controller, run_id) if "dropped" in line]
    assert len(dropped) == 1 and f"collection on {names[2]} dropped" in dropped[0], dropped
    status, run = call(controller, "GET", f"/api/runs/{run_id}", token=token)
    assert names[2] not in run["hosts"]
    finish(controller, token, run_id)
    kept = wait_for(partial(archived, controller, token, run_id, delegated),
                    what="the delegated execution kept by the final collection")
    assert (kept["host"], kept["node"]) == (web, names[2])
    agents[2].stop()
    assert stored_lines(controller, token, run_id, delegated) == (["delegated"], True)


def test_an_execution_its_agent_no_longer_holds_is_archived_by_the_final_collection(
        start_agent, start_controller, alice: UnixUser, signer: TokenSigner,
        unique_name) -> None:
    """An execution registered for a node that does not hold it (forgotten, or never there)
    is archived with what was stored when the run's final collection finds the node done, so
    the node is swept and not asked again (#8). An `execution` event naming a name that is no
    node gets no collection at all (#4)."""
    token = signer.issue(alice.name)
    controller, (agent,) = cluster(start_agent, start_controller, unique_name, token)
    node, ghost = agent.node_name, f"ghost-{secrets.token_hex(3)}"
    run_id = new_run(controller, token, [node])
    real = start_task(agent, token, run_id, "t1", "echo real")
    wait_exited(agent, token, real)
    status, answer = call(controller, "POST", f"/api/runs/{run_id}/events", {"events": [
        {"type": "execution", "host": node, "execution_id": "e-forgotten", "task_id": "t1"},
        {"type": "execution", "host": ghost, "execution_id": "e-ghost", "task_id": "t1"}]},
        token)
    assert status == 200, answer
    finish(controller, token, run_id)
    kept = wait_for(partial(archived, controller, token, run_id, "e-forgotten"),
                    what="the forgotten execution archived")
    assert (kept["node"], kept["stored_seq"], kept["state"]) == (node, 0, "ended")
    wait_for(lambda: f"collected run {run_id} on {node}: done" in controller.log(),
             what="the final collection done")
    assert archived(controller, token, run_id, real)
    lines = collection_log(controller, run_id)
    assert [line for line in lines if ghost in line] == [], lines
    assert [line for line in lines if "collecting run" in line and node in line], lines
    assert not stored(controller, token, run_id)["e-ghost"]["archived"]


def test_a_final_collection_keeps_no_run_and_a_node_unknown_now_is_not_retried(
        tmp_path: Path) -> None:
    """A final collection's slot keeps the run's id, owner and end, not the Run (its hosts can
    be megabytes, #4); a node the controller does not know is not retried (#4)."""

    async def scenario() -> None:
        store = RunStoreThread(tmp_path / "runs.sqlite3")
        collector = OutputCollector(store, AgentConnector(None), NodeRegistry(),
                                    CollectLimits(retry=0.01))
        hosts = [f"host-{number:05d}-{'x' * 200}" for number in range(10_000)]
        run = Run(id=new_run_id(), owner="alice", kind="playbook", title="big", hosts=hosts,
                  started=time.time(), ended=time.time(), status="ok")
        try:
            collector.request(run, "ghost", "token", final=True)
            (slot,) = collector._slots.values()
            assert not [value for value in vars(slot).values() if isinstance(value, Run)]
            assert (slot.run.id, slot.run.owner, slot.run.ended) == (run.id, "alice", run.ended)
            deadline = time.monotonic() + 20
            while collector._slots and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # the collection runs on this loop
            assert not collector._slots and not collector._users
        finally:
            await collector.close()
            store.close()

    asyncio.run(scenario())


def hold_store(controller: ControllerProcess) -> sqlite3.Connection:
    """Another connection holding the controller's run store's write lock: its writes wait
    and then answer busy (TryAgain) until `rollback()`."""
    db = sqlite3.connect(controller.state_dir / "runs.sqlite3", isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")
    return db


def test_a_watcher_keeps_trying_to_end_its_run_while_the_store_is_busy(
        start_agent, start_controller, alice: UnixUser, signer: TokenSigner,
        unique_name) -> None:
    """The store stays busy past six tries to end a command run (the watcher used to give up
    after five, leaving the run running): once it is free the run ends (#10)."""
    token = signer.issue(alice.name)
    controller, (agent,) = cluster(start_agent, start_controller, unique_name, token,
                                   controller_args=("--runs-collect-retry-max", "0.5"))
    flag = Path("/tmp") / f"marco-collect-{secrets.token_hex(6)}"
    try:
        status, answer = call(controller, "POST", "/api/run",
                              {"nodes": [agent.node_name],
                               "command": f"while [ ! -e {flag} ]; do sleep 0.05; done"},
                              token)
        assert status == 200, answer
        run_id = answer["run"]["id"]
        db = hold_store(controller)
        try:
            flag.touch()
            waits = f"run {run_id}: ending it waits for the store"
            wait_for(lambda: controller.log().count(waits) >= 6, timeout=90,
                     what="six tries to end the run on a busy store")
        finally:
            db.rollback()
            db.close()
        wait_for(lambda: call(controller, "GET", f"/api/runs/{run_id}", token=token)[1][
            "status"] == "ok", what="the run ended ok")
    finally:
        flag.unlink(missing_ok=True)


class NotingStore(RunStoreThread):
    """The real store, noting each method called and its keyword arguments."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def call(self, method_name: str, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((method_name, kwargs))
        return await super().call(method_name, *args, **kwargs)


def test_a_final_collection_reads_only_its_nodes_records(
        start_agent, alice: UnixUser, signer: TokenSigner, unique_name,
        tmp_path: Path) -> None:
    """A run with 300 stored executions on another node: the final collection of this node
    looks its one listed execution up by id and reads only this node's records (#2), never
    the run's every record once per node."""
    token = signer.issue(alice.name)
    agent = start_agent(node_name=unique_name("collect"), pki=None)
    run = Run(id=new_run_id(), owner=alice.name, kind="playbook", title="t",
              hosts=[agent.node_name, "other"], started=time.time())
    execution_id = start_task(agent, token, run.id, "t1", "echo mine")
    wait_exited(agent, token, execution_id)

    async def scenario() -> None:
        store = NotingStore(tmp_path / "runs.sqlite3")
        registry = NodeRegistry()
        registry.upsert(Node(agent.node_name, agent.host, agent.port, source="static"))
        collector = OutputCollector(store, AgentConnector(None), registry)
        try:
            await store.call("create", run)
            for number in range(300):
                await store.call("add_output", run.owner, run.id, host="other", node="other",
                                 execution_id=f"e{number}", task_id="t1", events=[])
            store.calls.clear()
            ended = Run(**{**vars(run), "ended": time.time(), "status": "ok"})
            collector.request(ended, agent.node_name, token, final=True)
            deadline = time.monotonic() + 20
            while collector._slots and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            record = await store.call("execution", run.owner, run.id, execution_id)
            assert record is not None and record.archived and record.next_seq == 1
            assert agent.node_name in await store.call("swept", run.owner, run.id)
        finally:
            await collector.close()
            store.close()
        reads = [(method, kwargs) for method, kwargs in store.calls
                 if method in ("executions", "execution")]
        assert reads[:1] == [("execution", {})]
        assert [kwargs for method, kwargs in reads if method == "executions"] == [
            {"node": agent.node_name}], reads

    asyncio.run(scenario())


def test_output_over_the_users_storage_cap_stops_that_collection(
        start_agent, start_controller, alice: UnixUser, signer: TokenSigner,
        unique_name) -> None:
    """The store refusing output (507: the user's bytes cap) stops that node's collection
    (logged, not retried); the run stays (#14: the store's errors told apart by type)."""
    token = signer.issue(alice.name)
    controller, (agent,) = cluster(start_agent, start_controller, unique_name, token,
                                   controller_args=("--runs-max-bytes-per-user", "50000"))
    run_id = new_run(controller, token, [agent.node_name])
    execution_id = start_task(agent, token, run_id, "t1",
                              "head -c 120000 /dev/urandom | base64")
    wait_exited(agent, token, execution_id)
    send_result(controller, token, run_id, "t1", agent.node_name)
    done = f"collected run {run_id} on {agent.node_name}: "
    outcome = wait_for(lambda: next((line.split(done)[1] for line in controller.log().splitlines()
                                     if done in line), None), what="the collection over")
    assert outcome == "stopped"
    refused = [line for line in collection_log(controller, run_id)
               if "WARNING" in line and f"output from {agent.node_name} not stored" in line]
    assert len(refused) == 1, collection_log(controller, run_id)
    assert not stored(controller, token, run_id)[execution_id]["archived"]
    status, run = call(controller, "GET", f"/api/runs/{run_id}", token=token)
    assert status == 200 and run["status"] == "running"
