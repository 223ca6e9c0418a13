"""A real controller keeping its runs in a real PostgreSQL server (`--database postgresql://`,
tests/support/postgres.py): a command run through a real agent and a run left running are
stored there, not in the state dir, and a restarted controller reads them back (the output
after its agent is gone) and goes on with the running run."""

from __future__ import annotations

import psycopg

from marco.tokens import TokenSigner
from tests.controller.test_runs_api import (
    archived_executions,
    get_run,
    new_run,
    output_lines,
    send,
    static_cluster,
    wait_ended,
)
from tests.support.http import call
from tests.support.users import UnixUser
from tests.support.waiting import wait_for


def stored_run_ids(url: str) -> set[str]:
    """The run ids in the database, read past the controller."""
    with psycopg.connect(url) as db:
        return {row[0] for row in db.execute("SELECT id FROM runs")}


def test_a_controller_on_postgresql_keeps_runs_and_output_across_a_restart(
        postgres_url: str, start_agent, start_controller, alice: UnixUser,
        signer: TokenSigner, unique_name) -> None:
    controller, agents = static_cluster(start_agent, start_controller, unique_name,
                                        "--database", postgres_url, agents=1)
    node = agents[0].node_name
    token = signer.issue(alice.name)
    wait_for(lambda: node in controller.inventory_hosts(token), what="the node alive")
    status, answer = call(controller, "POST", "/api/run",
                          {"nodes": [node], "command": "echo in-postgres-$((6*7))"}, token)
    assert status == 200 and answer["results"][node]["ok"], answer
    command_run = answer["run"]["id"]
    ended = wait_ended(controller, token, command_run)
    [execution] = archived_executions(controller, token, command_run, 1)
    running = new_run(controller, token, title="left running")
    assert send(controller, token, running, {"type": "play_start", "play": "p"})[0] == 200

    assert stored_run_ids(postgres_url) == {command_run, running}
    assert not (controller.state_dir / "runs.sqlite3").exists()

    agents[0].stop()  # the output is read from the database alone from now on
    controller.stop()
    second = controller.restarted()  # the same options: --database too
    try:
        assert get_run(second, token, command_run) == ended
        assert output_lines(second, token, command_run, execution["execution_id"]) == [
            "in-postgres-42"]
        # Not interrupted: on a shared database, another controller may be serving it (it
        # ends when stale); it goes on here.
        assert send(second, token, running, {"type": "task_start", "task": "t"})[0] == 200
        left = get_run(second, token, running)
        assert left["status"] == "running" and left["ended"] is None
        assert [event["type"] for event in left["events"]] == ["play_start", "task_start"]
    finally:
        second.stop()
