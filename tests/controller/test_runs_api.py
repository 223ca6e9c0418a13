"""The runs API (docs/runs.md) against a real controller and real agents: a run from start to
recap, listing and paging, owners only, bad input, command and deploy runs whose output
outlives their agents, a restart, the per-user cap, the settings; events, executions and
output read in pages, from the store and then the agents, and from the store alone once a run's
nodes are swept."""

from __future__ import annotations

import contextlib
import re
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.__main__ import build_parser, load_config
from controller.context import read_limits, run_limits
from controller.run_output import ReadLimits
from controller.runstore import RunLimits
from marco.client import AgentClient
from marco.errors import ConfigError, MarcoError
from marco.tokens import TokenSigner
from tests.support.agent_process import AgentProcess
from tests.support.controller_process import ControllerProcess
from tests.support.http import call, login_cookie
from tests.support.pki import TestPki
from tests.support.users import UnixUser
from tests.support.waiting import wait_for

RUN_ID = re.compile(r"r[0-9a-f]{20}")


def new_run(controller: ControllerProcess, token: str, **fields: Any) -> str:
    body = {"kind": "playbook", "title": "ansible-playbook site.yml", **fields}
    status, answer = call(controller, "POST", "/api/runs", body, token)
    assert status == 201, answer
    return str(answer["id"])


def send(controller: ControllerProcess, token: str, run_id: str,
         *events: dict[str, Any]) -> tuple[int, Any]:
    return call(controller, "POST", f"/api/runs/{run_id}/events", {"events": list(events)},
                token)


def get_run(controller: ControllerProcess, token: str, run_id: str) -> dict[str, Any]:
    status, run = call(controller, "GET", f"/api/runs/{run_id}", token=token)
    assert status == 200, run
    return dict(run)


def recap(**stats: Any) -> dict[str, Any]:
    return {"type": "recap", "stats": stats}


def test_a_playbook_run_from_start_to_recap(cluster, alice: UnixUser,
                                            signer: TokenSigner) -> None:
    controller, names = cluster
    token = signer.issue(alice.name)
    status, answer = call(controller, "POST", "/api/runs",
                          {"kind": "playbook", "title": "ansible-playbook site.yml -l web",
                           "hosts": [names[0]], "meta": {"check": True}}, token)
    assert status == 201 and RUN_ID.fullmatch(answer["id"])
    run_id = answer["id"]
    assert answer["url"] == f"/runs/{run_id}"
    status, answer = send(controller, token, run_id,
                          {"type": "play_start", "play": "web", "play_id": "p1", "time": 1.5},
                          {"type": "task_start", "task": "ping", "task_id": "t1",
                           "play_id": "p1", "action": "ansible.builtin.ping"},
                          {"type": "host_result", "task_id": "t1", "host": names[1],
                           "status": "failed", "msg": "boom", "rc": 2, "duration": 0.1})
    assert (status, answer) == (200, {"accepted": 3, "next_seq": 4})
    run = get_run(controller, token, run_id)
    assert run["owner"] == alice.name and run["status"] == "running" and run["ended"] is None
    assert run["hosts"] == [names[0], names[1]]  # a result's host joins the run
    assert run["meta"] == {"check": True} and run["url"] == f"/runs/{run_id}"
    assert [(e["seq"], e["type"]) for e in run["events"]] == [
        (1, "play_start"), (2, "task_start"), (3, "host_result")]
    assert run["events"][0]["time"] == 1.5 and run["events"][2]["msg"] == "boom"
    stats = {names[0]: {"ok": 2, "changed": 1}, names[1]: {"ok": 1, "failed": 1}}
    assert send(controller, token, run_id, recap(**stats))[0] == 200
    run = get_run(controller, token, run_id)
    assert run["status"] == "failed" and run["ended"] is not None
    assert run["stats"][names[1]] == {"ok": 1, "changed": 0, "failed": 1, "unreachable": 0,
                                      "skipped": 0}
    assert [e["seq"] for e in get_run(controller, token, f"{run_id}?since=3")["events"]] == [4]
    # Ended: no more events, no second end.
    assert send(controller, token, run_id, {"type": "play_start"})[0] == 409
    assert call(controller, "POST", f"/api/runs/{run_id}/finish", {}, token)[0] == 409


def test_the_status_a_run_ends_with(cluster, alice: UnixUser, signer: TokenSigner) -> None:
    controller, names = cluster
    token = signer.issue(alice.name)
    ok, unreachable, failed, cut, told = (new_run(controller, token) for _ in range(5))
    send(controller, token, ok, recap(**{names[0]: {"ok": 3, "skipped": 1}}))
    send(controller, token, unreachable,
         recap(**{names[0]: {"ok": 1}, names[1]: {"unreachable": 1}}))
    send(controller, token, failed,  # a failure beats an unreachable host
         recap(**{names[0]: {"unreachable": 1}, names[1]: {"ok": 1, "failed": 1}}))
    assert call(controller, "POST", f"/api/runs/{cut}/finish", None, token)[0] == 200
    status, answer = call(controller, "POST", f"/api/runs/{told}/finish", {"status": "failed"},
                          token)
    assert status == 200 and answer["status"] == "failed" and answer["ended"] is not None
    assert [get_run(controller, token, r)["status"] for r in (ok, unreachable, failed, cut)] == [
        "ok", "unreachable", "failed", "interrupted"]


def test_listing_is_newest_first_with_filters_and_pages(cluster, alice: UnixUser,
                                                        signer: TokenSigner) -> None:
    controller, _ = cluster
    token = signer.issue(alice.name)
    marker = f"listing-{secrets.token_hex(4)}"
    made = [new_run(controller, token, kind=("command", "shell")[i % 2],
                    title=f"echo {marker} {i}") for i in range(5)]
    call(controller, "POST", f"/api/runs/{made[1]}/finish", {"status": "failed"}, token)

    def page(query: str) -> tuple[list[str], bool]:
        status, answer = call(controller, "GET", f"/api/runs?q={marker}&{query}", token=token)
        assert status == 200, answer
        return [r["id"] for r in answer["runs"]], answer["more"]

    # Newest first by id: the start second, then a random part within one second.
    newest_first = sorted(made, reverse=True)
    first, more = page("limit=2")
    assert first == newest_first[:2] and more
    second, more = page(f"limit=2&before={first[-1]}")
    assert second == newest_first[2:4] and more
    assert page(f"limit=2&before={second[-1]}") == (newest_first[4:], False)
    assert page("kind=shell")[0] == sorted([made[3], made[1]], reverse=True)
    assert page("status=failed")[0] == [made[1]]
    assert page("kind=shell&status=running")[0] == [made[3]]
    status, answer = call(controller, "GET", f"/api/runs?q={marker.upper()}&limit=1",
                          token=token)
    assert status == 200 and answer["runs"][0]["id"] == newest_first[0]
    assert "events" not in answer["runs"][0]
    for bad in ("kind=nope", "status=nope", "limit=0", "limit=x", "before=nope"):
        assert call(controller, "GET", f"/api/runs?{bad}", token=token)[0] == 400, bad


def test_a_user_sees_only_their_own_runs(cluster, alice: UnixUser, bob: UnixUser,
                                         signer: TokenSigner) -> None:
    controller, _ = cluster
    alices, bobs = signer.issue(alice.name), signer.issue(bob.name)
    theirs = {alices: new_run(controller, alices, title="alice's own"),
              bobs: new_run(controller, bobs, title="bob's own")}
    missing = "r" + "0" * 20
    for token, other in ((alices, theirs[bobs]), (bobs, theirs[alices])):
        status, listing = call(controller, "GET", "/api/runs?limit=500", token=token)
        assert status == 200 and theirs[token] in [r["id"] for r in listing["runs"]]
        assert other not in [r["id"] for r in listing["runs"]]
        for run_id in (other, missing):  # another user's run is exactly a missing one
            status, answer = call(controller, "GET", f"/api/runs/{run_id}", token=token)
            assert (status, answer) == (404, {"error": "not_found",
                                              "message": f"no run {run_id}"})
            assert call(controller, "GET", f"/api/runs/{run_id}/executions",
                        token=token)[0] == 404
            assert call(controller, "GET", f"/api/runs/{run_id}/output?execution=e",
                        token=token)[0] == 404
            assert send(controller, token, run_id, {"type": "play_start"})[0] == 404
            assert call(controller, "POST", f"/api/runs/{run_id}/finish", {}, token)[0] == 404
    assert get_run(controller, bobs, theirs[bobs])["status"] == "running"  # untouched
    assert call(controller, "GET", "/api/runs/nonsense", token=alices)[0] == 404
    # The page's cookie is a login too; no login at all is a 401 everywhere.
    cookie = login_cookie(controller, alice)
    status, answer = call(controller, "GET", f"/api/runs/{theirs[alices]}",
                          headers={"Cookie": cookie})
    assert status == 200 and answer["title"] == "alice's own"
    run_id, xsrf = theirs[alices], cookie.split("_xsrf=")[1]
    no_login = {"Cookie": f"_xsrf={xsrf}", "X-XSRFToken": xsrf}  # past the XSRF check
    for method, path in (("GET", "/api/runs"), ("POST", "/api/runs"),
                         ("GET", f"/api/runs/{run_id}"), ("GET", f"/api/runs/{run_id}/output"),
                         ("GET", f"/api/runs/{run_id}/executions"),
                         ("POST", f"/api/runs/{run_id}/events"),
                         ("POST", f"/api/runs/{run_id}/finish")):
        status, answer = call(controller, method, path, {"kind": "playbook", "title": "x"},
                              headers=no_login)
        assert status == 401 and answer["error"] == "unauthenticated", (method, path)


def test_bad_input_is_a_400(cluster, alice: UnixUser, signer: TokenSigner) -> None:
    controller, _ = cluster
    token = signer.issue(alice.name)
    bodies: list[Any] = [b"not json", [], {"kind": "nope", "title": "x"}, {"kind": "command"},
                         {"kind": "command", "title": " "},
                         {"kind": "command", "title": "x" * 1001},
                         {"kind": "command", "title": "x", "hosts": "web"},
                         {"kind": "command", "title": "x", "hosts": [""]},
                         {"kind": "command", "title": "x", "meta": []},
                         {"kind": "command", "title": "x", "meta": {"big": "x" * 17_000}}]
    for body in bodies:
        status, answer = call(controller, "POST", "/api/runs", body, token)
        assert status == 400 and answer["error"] == "bad_request", body
    run_id = new_run(controller, token)
    for events in ([], ["x"], [{"type": "nope"}], [{"type": "play_start", "time": "noon"}],
                   [{"type": "host_result", "host": 7}],
                   [{"type": "play_start", "play": "x" * 70_000}],
                   [{"type": "play_start"}] * 1001,
                   [recap(web={"ok": "1"})], [recap(web={"ok": True})],
                   [recap(web={"bogus": 1})], [{"type": "recap", "stats": []}]):
        status, answer = send(controller, token, run_id, *events)
        assert status == 400 and answer["error"] == "bad_request", events[:1]
    assert call(controller, "POST", f"/api/runs/{run_id}/events", {"events": "x"}, token)[0] == 400
    assert call(controller, "POST", f"/api/runs/{run_id}/finish", {"status": "running"},
                token)[0] == 400
    run = get_run(controller, token, run_id)
    assert run["events"] == [] and run["status"] == "running"  # nothing of it was kept


def static_cluster(start_agent, start_controller, unique_name, *extra: str,
                   agents: int = 2) -> tuple[ControllerProcess, list[Any]]:
    """A controller with its own agents as static nodes (so a test may stop them)."""
    started = [start_agent(node_name=unique_name("runs")) for _ in range(agents)]
    nodes = [arg for a in started for arg in ("--node", f"{a.node_name}={a.host}:{a.port}")]
    return start_controller(extra_args=["--no-discovery", *nodes, *extra]), started


def wait_ended(controller: ControllerProcess, token: str, run_id: str) -> dict[str, Any]:
    return wait_for(lambda: (run := get_run(controller, token, run_id))["ended"] and run,
                    what=f"run {run_id} ended")


def executions(controller: ControllerProcess, token: str, run_id: str,
               query: str = "") -> list[dict[str, Any]]:
    status, answer = call(controller, "GET", f"/api/runs/{run_id}/executions{query}",
                          token=token)
    assert status == 200, answer
    return list(answer["executions"])


def output_page(controller: ControllerProcess, token: str, run_id: str, execution_id: str,
                since: int = 0, limit: int | None = None) -> dict[str, Any]:
    query = {"execution": execution_id, "since": since, **({"limit": limit} if limit else {})}
    status, answer = call(controller, "GET",
                          f"/api/runs/{run_id}/output?{urllib.parse.urlencode(query)}",
                          token=token)
    assert status == 200, answer
    return dict(answer)


def page_lines(page: dict[str, Any]) -> list[str]:
    return [line for event in page["events"] for line in event["lines"]]


def output_lines(controller: ControllerProcess, token: str, run_id: str,
                 execution_id: str) -> list[str]:
    """Every line of one execution there is now, page by page as clients read them."""
    lines: list[str] = []
    since = 0
    while True:
        page = output_page(controller, token, run_id, execution_id, since)
        lines += page_lines(page)
        if page["end"] or page["next"] == since:
            return lines
        since = page["next"]


def archived_executions(controller: ControllerProcess, token: str, run_id: str,
                        count: int) -> list[dict[str, Any]]:
    """The run's executions once all `count` are archived."""
    return wait_for(lambda: (found := executions(controller, token, run_id)) and len(
        found) == count and all(e["archived"] for e in found) and found,
                    what=f"the {count} executions of run {run_id} archived")


def test_a_command_run_ends_by_rc_and_its_output_outlives_the_agents(
        start_agent, start_controller, alice: UnixUser, signer: TokenSigner,
        unique_name) -> None:
    controller, agents = static_cluster(start_agent, start_controller, unique_name)
    names = [a.node_name for a in agents]
    token = signer.issue(alice.name)
    wait_for(lambda: set(names) <= set(controller.inventory_hosts(token)), what="nodes alive")
    status, answer = call(controller, "POST", "/api/run",
                          {"nodes": names, "command": "echo kept-$((6*7))", "cwd": "/tmp"},
                          token)
    assert status == 200 and all(r["ok"] for r in answer["results"].values()), answer
    run_id = answer["run"]["id"]
    assert answer["run"]["url"] == f"/runs/{run_id}"
    for agent in agents:  # each execution carries the run's tags
        execution = agent.client(token).execution(answer["results"][agent.node_name]["id"])
        assert execution["tags"] == {"run": run_id, "host": agent.node_name}
    run = wait_ended(controller, token, run_id)
    assert run["kind"] == "command" and run["title"] == "echo kept-$((6*7))"
    assert run["status"] == "ok" and run["hosts"] == names
    assert run["meta"] == {"cwd": "/tmp", "command": "echo kept-$((6*7))"}
    assert {h: (c["ok"], c["failed"], c["rc"]) for h, c in run["stats"].items()} == {
        name: (1, 0, 0) for name in names}
    assert sorted((e["host"], e["execution_id"]) for e in run["events"]
                  if e["type"] == "execution") == sorted(
        (name, r["id"]) for name, r in answer["results"].items())

    kept = archived_executions(controller, token, run_id, 2)
    assert {e["host"]: output_lines(controller, token, run_id, e["execution_id"])
            for e in kept} == {name: ["kept-42"] for name in names}
    for agent in agents:
        agent.stop()
    kept = executions(controller, token, run_id, f"?host={names[1]}")
    assert [(e["host"], e["node"], e["archived"]) for e in kept] == [(names[1], names[1], True)]
    assert output_lines(controller, token, run_id, kept[0]["execution_id"]) == ["kept-42"]
    # A shell run whose command fails ends failed, with its rc.
    agents = [agent.restarted() for agent in agents]
    try:
        wait_for(lambda: names[0] in controller.inventory_hosts(token), what="node back")
        status, answer = call(controller, "POST", "/api/run",
                              {"nodes": [names[0]], "command": "echo no; exit 3",
                               "kind": "shell"}, token)
        assert status == 200, answer
        run = wait_ended(controller, token, answer["run"]["id"])
        assert (run["kind"], run["status"]) == ("shell", "failed")
        assert run["stats"][names[0]]["rc"] == 3 and run["stats"][names[0]]["failed"] == 1
        assert call(controller, "POST", "/api/run", {"nodes": [names[0]], "command": "id",
                                                     "kind": "playbook"}, token)[0] == 400
    finally:
        for agent in agents:
            agent.stop()


def test_a_restarted_controller_keeps_every_run_and_interrupts_running_ones(
        start_controller, alice: UnixUser, signer: TokenSigner) -> None:
    first = start_controller()
    token = signer.issue(alice.name)
    running, ended = new_run(first, token, title="left running"), new_run(first, token)
    send(first, token, running, {"type": "play_start", "play": "p"})
    send(first, token, ended, {"type": "play_start", "play": "p"}, recap(web={"ok": 1}))
    before = get_run(first, token, ended)
    first.stop()
    second = first.restarted()
    try:
        assert get_run(second, token, ended) == before
        run = get_run(second, token, running)
        assert run["status"] == "interrupted" and run["ended"] is not None
        assert [e["type"] for e in run["events"]] == ["play_start"]
        listed = call(second, "GET", "/api/runs", token=token)[1]["runs"]
        assert [r["id"] for r in listed] == sorted([running, ended], reverse=True)
    finally:
        second.stop()


def test_running_runs_are_capped_per_user(start_controller, alice: UnixUser, bob: UnixUser,
                                          signer: TokenSigner) -> None:
    controller = start_controller(extra_args=["--runs-max-running-per-user", "2"])
    alices, bobs = signer.issue(alice.name), signer.issue(bob.name)
    first, _ = new_run(controller, alices), new_run(controller, alices)
    status, answer = call(controller, "POST", "/api/runs",
                          {"kind": "command", "title": "one too many"}, alices)
    assert status == 429 and answer["error"] == "too_many_runs" and "at most 2" in answer["message"]
    new_run(controller, bobs)  # per user: bob is not held up by alice's runs
    call(controller, "POST", f"/api/runs/{first}/finish", {"status": "ok"}, alices)
    new_run(controller, alices)  # one ended: room again


def test_a_run_whose_agent_is_gone_ends_unreachable_and_stays_readable(
        start_agent, start_controller, alice: UnixUser, signer: TokenSigner,
        unique_name) -> None:
    controller, (agent,) = static_cluster(start_agent, start_controller, unique_name, agents=1)
    token = signer.issue(alice.name)
    wait_for(lambda: agent.node_name in controller.inventory_hosts(token), what="node alive")
    # A command the node refuses (longer than its max_command_bytes) ends its run failed.
    status, answer = call(controller, "POST", "/api/run",
                          {"nodes": [agent.node_name], "command": "true " + "x" * 300_000},
                          token)
    assert status == 200 and not answer["results"][agent.node_name]["ok"], answer
    run = wait_ended(controller, token, answer["run"]["id"])
    assert run["status"] == "failed" and run["stats"][agent.node_name]["failed"] == 1
    status, answer = call(controller, "POST", "/api/run",
                          {"nodes": [agent.node_name], "command": "echo before; sleep 600"},
                          token)
    run_id, execution_id = answer["run"]["id"], answer["results"][agent.node_name]["id"]
    client = agent.client(token)
    wait_for(lambda: client.output(execution_id)["events"], what="the first line")
    client.close()
    live = executions(controller, token, run_id)
    assert [(e["execution_id"], e["archived"], e["state"]) for e in live] == [
        (execution_id, False, "running")]
    page = output_page(controller, token, run_id, execution_id)
    assert (page_lines(page), page["end"]) == (["before"], False)
    agent.stop(signal.SIGKILL)
    run = wait_ended(controller, token, run_id)
    assert run["status"] == "unreachable" and run["stats"][agent.node_name]["unreachable"] == 1
    # Still listed from the store: not archived, its state unknown (its agent cannot answer).
    kept = executions(controller, token, run_id)
    assert [(e["execution_id"], e["archived"], e["state"]) for e in kept] == [
        (execution_id, False, None)]
    assert output_page(controller, token, run_id, execution_id)["end"] is False


def test_a_deploy_is_a_run(cluster, alice: UnixUser, signer: TokenSigner, pki: TestPki) -> None:
    controller, names = cluster
    token = signer.issue(alice.name)
    name = f"runs-deploy-{secrets.token_hex(4)}.txt"
    answers: list[dict[str, Any]] = []

    def deploy(folder: str, command: str = "") -> dict[str, Any]:
        query = urllib.parse.urlencode({"nodes": ",".join(names), "folder": folder,
                                        "name": name, "command": command})
        status, answer = call(controller, "PUT", f"/api/deploy?{query}", b"deployed\n", token)
        assert status == 200, answer
        answers.append(answer)
        return wait_ended(controller, token, answer["run"]["id"])

    run = deploy("~", f"cat {name}")
    for node, where in controller.inventory_hosts(token).items():
        if node in names:  # each node lists the command under the run's tag
            with AgentClient(where["ansible_host"], where["ansible_port"], token,
                             tls=pki.client_tls(), node=node) as client:
                tagged = client.executions(run=run["id"])
            assert [(e["id"], e["tags"]) for e in tagged] == [
                (answers[0]["results"][node]["execution"], {"run": run["id"], "host": node})]
    assert (run["kind"], run["status"], run["hosts"]) == ("deploy", "ok", names)
    assert run["title"] == f"deploy ~/{name} && cat {name}"
    kept = archived_executions(controller, token, run["id"], len(names))
    assert sorted((e["host"], output_lines(controller, token, run["id"], e["execution_id"]))
                  for e in kept) == [(n, ["deployed"]) for n in sorted(names)]
    run = deploy("~")  # a copy alone
    assert run["status"] == "ok" and {h: c["ok"] for h, c in run["stats"].items()} == {
        n: 1 for n in names}
    run = deploy("/etc", "true")  # a folder alice may not write: nothing runs
    assert run["status"] == "failed" and all(c["failed"] == 1 for c in run["stats"].values())
    assert not [e for e in get_run(controller, token, run["id"])["events"]
                if e["type"] == "execution"]


def test_runs_settings_reach_the_store_and_refuse_zero() -> None:
    environ = {"MARCO_RUNS_RETENTION_DAYS": "7", "MARCO_RUNS_MAX_BYTES": "1000"}
    config = load_config(build_parser().parse_args(["--runs-max-per-user", "5"]), environ)
    assert run_limits(config) == RunLimits(retention_days=7, max_bytes=1000,
                                           max_per_user=5)
    for flag in ("--runs-retention-days", "--runs-max-bytes", "--runs-max-running-per-user",
                 "--runs-max-per-user", "--runs-max-bytes-per-user", "--runs-events-page",
                 "--runs-events-page-bytes", "--runs-output-page-lines",
                 "--runs-read-agent-timeout", "--runs-read-agents-at-once",
                 "--runs-read-listings-per-user"):
        with pytest.raises(ConfigError, match=flag[2:].replace("-", "_")):
            load_config(build_parser().parse_args([flag, "0"]), {})
    config = load_config(build_parser().parse_args(
        ["--runs-read-agent-timeout", "3", "--runs-read-listings-per-user", "2",
         "--runs-output-page-lines", "100"]), {"MARCO_RUNS_READ_AGENTS_AT_ONCE": "5"})
    assert read_limits(config) == ReadLimits(agent_timeout=3, agents_at_once=5,
                                             listings_per_user=2, output_lines=100)


def test_a_refused_batch_stores_nothing(cluster, alice: UnixUser, signer: TokenSigner) -> None:
    """Hosts are checked before the events are stored: a 400 leaves the run as it was."""
    controller, names = cluster
    token = signer.issue(alice.name)
    run_id = new_run(controller, token, hosts=[names[0]])
    for batch in ([{"type": "play_start", "play": "p"},
                   {"type": "host_result", "host": "h" * 256, "status": "ok"}],
                  [{"type": "play_start", "play": "p"}, recap(**{"": {"ok": 1}})],
                  [{"type": "play_start", "play": "p"}, recap(**{"h" * 256: {"ok": 1}})]):
        status, answer = send(controller, token, run_id, *batch)
        assert status == 400 and answer["error"] == "bad_request", answer
    run = get_run(controller, token, run_id)
    assert (run["events"], run["hosts"], run["status"]) == ([], [names[0]], "running")


def test_a_run_ends_once_a_second_end_is_a_409(cluster, alice: UnixUser,
                                                signer: TokenSigner) -> None:
    controller, _ = cluster
    token = signer.issue(alice.name)
    run_id = new_run(controller, token)
    status, first = call(controller, "POST", f"/api/runs/{run_id}/finish", {"status": "ok"},
                         token)
    assert status == 200 and first["status"] == "ok", first
    status, answer = call(controller, "POST", f"/api/runs/{run_id}/finish",
                          {"status": "interrupted"}, token)
    assert status == 409 and answer["error"] == "conflict", answer
    assert send(controller, token, run_id, recap(web={"failed": 1}))[0] == 409
    run = get_run(controller, token, run_id)
    assert (run["status"], run["ended"], run["events"]) == ("ok", first["ended"], [])


def test_events_come_in_pages_with_more(cluster, alice: UnixUser, signer: TokenSigner) -> None:
    controller, _ = cluster
    token = signer.issue(alice.name)
    run_id = new_run(controller, token)
    send(controller, token, run_id, *({"type": "play_start", "play": f"p{n}"} for n in range(7)))

    def page(query: str) -> tuple[list[int], bool]:
        status, answer = call(controller, "GET", f"/api/runs/{run_id}?{query}", token=token)
        assert status == 200, answer
        return [e["seq"] for e in answer["events"]], answer["more"]

    assert page("limit=3") == ([1, 2, 3], True)
    assert page("since=3&limit=3") == ([4, 5, 6], True)
    assert page("since=6&limit=3") == ([7], False)
    assert page("since=4&limit=3") == ([5, 6, 7], False)  # exactly the rest: no more
    assert page("") == ([1, 2, 3, 4, 5, 6, 7], False)
    assert page("since=7") == ([], False)
    for bad in ("limit=0", "limit=5001", "limit=x", "since=-1", "since=x",
                f"since={2 ** 63}", f"wait={2 ** 63}"):
        status, answer = call(controller, "GET", f"/api/runs/{run_id}?{bad}", token=token)
        assert status == 400 and answer["error"] == "bad_request", bad


def agent_client(controller: ControllerProcess, token: str, node: str,
                 pki: TestPki) -> AgentClient:
    """A client to one of the cluster's nodes, where the controller says it is."""
    where = controller.inventory_hosts(token)[node]
    return AgentClient(where["ansible_host"], where["ansible_port"], token,
                       tls=pki.client_tls(), node=node)


def test_executions_are_listed_by_host_and_task(cluster, alice: UnixUser,
                                                signer: TokenSigner, pki: TestPki) -> None:
    """A playbook's executions as the agents tag them: per inventory host (a delegated one
    runs on another node) and task; another run's are not listed."""
    controller, names = cluster
    token = signer.issue(alice.name)
    run_id = new_run(controller, token, hosts=names)
    other_run = new_run(controller, token, hosts=[names[0]])
    started: dict[tuple[str, str, str], str] = {}
    with agent_client(controller, token, names[0], pki) as first, \
            agent_client(controller, token, names[1], pki) as second:
        for node, client in ((names[0], first), (names[1], second)):
            for task in ("t1", "t2"):
                started[node, node, task] = client.start(
                    f"echo {task}", tags={"run": run_id, "task": task, "host": node})
        # `web` is not a node: its task ran delegated to the first node.
        started["web", names[0], "t3"] = first.start("echo web", tags={
            "run": run_id, "task": "t3", "host": "web"})
        other = first.start("echo other", tags={"run": other_run, "task": "t1",
                                                "host": names[0]})
    expected = {eid: key for key, eid in started.items()}

    def listed(query: str = "") -> dict[str, tuple[str, str, str | None]]:
        return {e["execution_id"]: (e["host"], e["node"], e["task_id"])
                for e in executions(controller, token, run_id, query)}

    def ids(keep: Any) -> set[str]:
        return {eid for eid, key in expected.items() if keep(*key)}

    found = wait_for(lambda: (e := executions(controller, token, run_id)) and all(
        x["state"] == "exited" for x in e) and e, what="the run's executions exited")
    assert {e["execution_id"]: (e["host"], e["node"], e["task_id"]) for e in found} == expected
    assert all(e["next_seq"] == 1 and e["truncated_seq"] is None for e in found)
    assert set(listed(f"?host={names[0]}")) == ids(lambda host, node, task: host == names[0])
    assert set(listed("?task=t1")) == ids(lambda host, node, task: task == "t1")
    assert set(listed(f"?host={names[1]}&task=t2")) == {started[names[1], names[1], "t2"]}
    # The delegated one is known by its host, found where it ran.
    assert listed("?host=web") == {started["web", names[0], "t3"]: ("web", names[0], "t3")}
    assert listed("?host=nowhere") == {} and listed("?task=t9") == {}
    assert [e["execution_id"] for e in executions(controller, token, other_run)] == [other]
    call(controller, "POST", f"/api/runs/{run_id}/finish", {}, token)
    call(controller, "POST", f"/api/runs/{other_run}/finish", {}, token)


@pytest.fixture
def gate() -> Iterator[Path]:
    """A folder whose files a test creates to let its user's commands go on (they wait for
    them: `until [ -e ... ]`); readable by everyone, removed after the test."""
    folder = Path(tempfile.mkdtemp(prefix="marco-gate-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_output_pages_cross_from_the_store_to_the_agent(
        start_agent, start_controller, alice: UnixUser, bob: UnixUser, signer: TokenSigner,
        unique_name, gate: Path) -> None:
    """A running execution whose first lines are stored: a page starts in the store and goes
    on at its agent; `end` once it has ended and every line is read."""
    controller, (agent,) = static_cluster(start_agent, start_controller, unique_name, agents=1)
    node, token = agent.node_name, signer.issue(alice.name)
    wait_for(lambda: node in controller.inventory_hosts(token), what="node alive")
    run_id = new_run(controller, token, hosts=[node])
    with agent.client(token) as client:
        execution_id = client.start(
            f"seq 1 5; until [ -e {gate}/more ]; do sleep 0.05; done; seq 6 9; "
            f"until [ -e {gate}/end ]; do sleep 0.05; done",
            tags={"run": run_id, "task": "t1", "host": node})
        wait_for(lambda: client.execution(execution_id)["next_seq"] == 5, what="5 lines")
    # Its result collects what the agent has so far: lines 0-4 stored, the execution running.
    send(controller, token, run_id, {"type": "host_result", "task_id": "t1", "host": node,
                                     "status": "ok"})

    def listed() -> dict[str, Any]:
        (execution,) = executions(controller, token, run_id)
        return execution

    wait_for(lambda: listed()["stored_seq"] == 5, what="5 lines stored")
    (gate / "more").touch()
    nine = wait_for(lambda: (e := listed())["next_seq"] == 9 and e, what="9 lines")
    assert {k: v for k, v in nine.items() if k not in ("started", "ended", "rc")} == {
        "host": node, "node": node, "execution_id": execution_id, "task_id": "t1",
        "archived": False, "stored_seq": 5, "next_seq": 9, "state": "running",
        "truncated_seq": None}
    assert isinstance(nine["started"], float) and (nine["ended"], nine["rc"]) == (None, None)
    page = output_page(controller, token, run_id, execution_id, 0, limit=3)
    assert (page_lines(page), page["next"], page["end"]) == (["1", "2", "3"], 3, False)
    assert {k: page[k] for k in ("execution_id", "host", "node", "task_id", "archived")} == {
        "execution_id": execution_id, "host": node, "node": node, "task_id": "t1",
        "archived": False}
    page = output_page(controller, token, run_id, execution_id, 3, limit=4)  # store, then agent
    assert (page_lines(page), page["next"], page["end"]) == (["4", "5", "6", "7"], 7, False)
    assert [e["seq"] for e in page["events"]][0] == 3
    page = output_page(controller, token, run_id, execution_id, 7)
    assert (page_lines(page), page["next"], page["end"]) == (["8", "9"], 9, False)
    page = output_page(controller, token, run_id, execution_id, 1)
    assert (page_lines(page), page["next"]) == ([str(n) for n in range(2, 10)], 9)
    (gate / "end").touch()
    page = wait_for(lambda: (p := output_page(controller, token, run_id, execution_id, 9))[
        "end"] and p, what="the end of its output")
    assert (page["events"], page["next"]) == ([], 9)
    # Bad pages are a 400; an execution the run does not have is a 404, for anyone.
    path = f"/api/runs/{run_id}/output"
    for bad in ("", "?since=0", f"?execution={execution_id}&limit=0",
                f"?execution={execution_id}&limit=20001", f"?execution={execution_id}&limit=x",
                f"?execution={execution_id}&since=-1",
                f"?execution={execution_id}&since={2 ** 63}"):
        status, answer = call(controller, "GET", path + bad, token=token)
        assert status == 400 and answer["error"] == "bad_request", bad
    assert call(controller, "GET", f"{path}?execution=nope", token=token)[0] == 404
    other_run = new_run(controller, token, hosts=[node])
    bobs = signer.issue(bob.name)
    bobs_run = new_run(controller, bobs, hosts=[node])
    for who, where in ((token, other_run), (bobs, bobs_run), (bobs, run_id)):
        status, answer = call(controller, "GET",
                              f"/api/runs/{where}/output?execution={execution_id}", token=who)
        assert status == 404 and answer["error"] == "not_found", (who, where)
    assert call(controller, "GET", f"/api/runs/{run_id}/executions", token=bobs)[0] == 404


def settled_log(agent: AgentProcess, token: str) -> None:
    """Until the agent's access log holds every request answered so far: a request's line is
    written after its answer has gone, so a test that counts lines asks for a marker (a 404)
    and waits for its line, which comes after the lines of every earlier request."""
    marker = secrets.token_hex(8)
    with agent.client(token) as client, contextlib.suppress(MarcoError):
        client.execution(marker)
    wait_for(lambda: marker in agent.log(), what="the agent's access log written")


def agent_requests(agent: AgentProcess, *names: str) -> int:
    """How many requests the agent's access log shows naming any of `names` (after
    `settled_log`)."""
    return sum(1 for line in agent.log().splitlines()
               if any(name in line for name in names) and "/v1/" in line)


def test_an_ended_run_is_read_from_the_store_alone(start_agent, start_controller,
                                                   alice: UnixUser, signer: TokenSigner,
                                                   unique_name) -> None:
    """Once a run has ended and its node's executions are all stored (swept), listing and
    reading them asks no agent: the same answer with the agent up, or gone, with each
    execution's start, end and exit code as its agent gave them."""
    controller, (agent,) = static_cluster(start_agent, start_controller, unique_name, agents=1)
    node, token = agent.node_name, signer.issue(alice.name)
    wait_for(lambda: node in controller.inventory_hosts(token), what="node alive")
    status, answer = call(controller, "POST", "/api/run",
                          {"nodes": [node], "command": "seq 1 3; sleep 0.3"}, token)
    assert status == 200, answer
    run_id, execution_id = answer["run"]["id"], answer["results"][node]["id"]
    assert wait_ended(controller, token, run_id)["status"] == "ok"
    # The agent is up and would say `exited`: `ended` is the store's word alone.
    found = wait_for(lambda: (e := executions(controller, token, run_id)) and e[0][
        "state"] == "ended" and e, what="the node swept")
    assert [(e["execution_id"], e["archived"], e["stored_seq"], e["next_seq"], e["rc"])
            for e in found] == [(execution_id, True, 3, 3, 0)]
    with agent.client(token) as client:
        said = client.execution(execution_id)
    assert (found[0]["started"], found[0]["ended"]) == (said["started"], said["ended"])
    assert found[0]["ended"] - found[0]["started"] >= 0.3  # it slept that long
    settled_log(agent, token)
    asked = agent_requests(agent, run_id, execution_id)
    assert asked > 0  # the log shows the watcher's and the collector's requests
    page = output_page(controller, token, run_id, execution_id)
    assert (page_lines(page), page["next"], page["archived"], page["end"]) == (
        ["1", "2", "3"], 3, True, True)
    assert executions(controller, token, run_id, f"?host={node}") == found
    assert agent_requests(agent, run_id, execution_id) == asked
    agent.stop()
    assert executions(controller, token, run_id) == found
    assert output_page(controller, token, run_id, execution_id) == page


def test_a_cut_execution_ends_where_its_agent_cut_it(start_agent, start_controller,
                                                     alice: UnixUser, signer: TokenSigner,
                                                     unique_name, gate: Path) -> None:
    """An execution whose agent stopped keeping its output (over its spool) has no line past
    its truncated_seq: once it has ended, reading up to there is its end."""
    agent = start_agent(node_name=unique_name("runs"), extra_args=["--spool-max-bytes", "2000"])
    controller = start_controller(extra_args=["--no-discovery", "--node",
                                              f"{agent.node_name}={agent.host}:{agent.port}"])
    node, token = agent.node_name, signer.issue(alice.name)
    wait_for(lambda: node in controller.inventory_hosts(token), what="node alive")
    run_id = new_run(controller, token, hosts=[node])
    with agent.client(token) as client:
        execution_id = client.start(
            f"seq 1 5; until [ -e {gate}/big ]; do sleep 0.05; done; "
            f"head -c 3000 /dev/zero | tr '\\0' x; echo; seq 7 9; "
            f"until [ -e {gate}/end ]; do sleep 0.05; done",
            tags={"run": run_id, "host": node})
        wait_for(lambda: client.execution(execution_id)["next_seq"] == 5, what="5 lines")
        (gate / "big").touch()  # a line of its own, over the spool: cut from seq 5 on
        wait_for(lambda: client.execution(execution_id)["next_seq"] == 9, what="9 lines")
    (listed,) = executions(controller, token, run_id)
    assert (listed["state"], listed["next_seq"], listed["truncated_seq"]) == ("running", 9, 5)
    page = output_page(controller, token, run_id, execution_id)
    assert (page_lines(page), page["next"], page["end"]) == (["1", "2", "3", "4", "5"], 5, False)
    assert output_page(controller, token, run_id, execution_id, 5)["end"] is False
    (gate / "end").touch()
    page = wait_for(lambda: (p := output_page(controller, token, run_id, execution_id, 5))[
        "end"] and p, what="the end of its kept output")
    assert (page["events"], page["next"]) == ([], 5)
    call(controller, "POST", f"/api/runs/{run_id}/finish", {}, token)


def test_an_answer_of_events_is_bounded_by_bytes(start_controller, alice: UnixUser,
                                                  signer: TokenSigner) -> None:
    """runs_events_page_bytes cuts an answer before its count does (5,000 events of 64 KiB
    would be 320 MiB): `more` says the rest follows, and reading on gives every event once."""
    controller = start_controller(extra_args=["--no-discovery", "--runs-events-page-bytes",
                                              "5000"])
    token = signer.issue(alice.name)
    run_id = new_run(controller, token)
    send(controller, token, run_id, *({"type": "play_start", "play": f"{n:02d}" + "p" * 1000}
                                      for n in range(12)))
    seen: list[int] = []
    since, more = 0, True
    while more:
        status, answer = call(controller, "GET", f"/api/runs/{run_id}?since={since}",
                              token=token)
        assert status == 200, answer
        assert 0 < len(answer["events"]) <= 4, len(answer["events"])  # 4 x 1 kB fit in 5 kB
        seen += [e["seq"] for e in answer["events"]]
        since, more = seen[-1], answer["more"]
    assert seen == list(range(1, 13))


def listing_requests(agent: AgentProcess, run_id: str) -> int:
    """How many times the agent listed the run's executions (the access log)."""
    return sum(1 for line in agent.log().splitlines() if f"/v1/executions?run={run_id}" in line)


def test_listings_ask_an_agent_only_for_what_the_store_lacks(
        start_agent, start_controller, alice: UnixUser, signer: TokenSigner, unique_name,
        gate: Path) -> None:
    """`live=0` asks no agent (a page's polls between its live looks); a live listing asks
    the run's hosts, what they list is registered, and an execution stored whole reads
    `ended` from the store alone."""
    controller, (agent,) = static_cluster(start_agent, start_controller, unique_name, agents=1)
    node, token = agent.node_name, signer.issue(alice.name)
    wait_for(lambda: node in controller.inventory_hosts(token), what="node alive")
    run_id = new_run(controller, token, hosts=[node])
    with agent.client(token) as client:
        execution_id = client.start(f"echo one; until [ -e {gate}/end ]; do sleep 0.05; done",
                                    tags={"run": run_id, "task": "t1", "host": node})
    # Nothing stored of the host yet: its agent is asked, and what it lists is registered.
    (found,) = wait_for(lambda: executions(controller, token, run_id), what="listed")
    assert (found["execution_id"], found["state"], found["archived"]) == (
        execution_id, "running", False)
    settled_log(agent, token)
    assert listing_requests(agent, run_id) >= 1
    asked = listing_requests(agent, run_id)
    status, answer = call(controller, "GET", f"/api/runs/{run_id}/executions?live=0",
                          token=token)
    assert status == 200 and answer["live"] is False, answer
    assert [(e["execution_id"], e["state"]) for e in answer["executions"]] == [
        (execution_id, None)]
    assert listing_requests(agent, run_id) == asked
    (gate / "end").touch()
    wait_for(lambda: client_state(agent, token, execution_id) == "exited", what="exited")
    send(controller, token, run_id, {"type": "host_result", "task_id": "t1", "host": node,
                                     "status": "ok"})
    wait_for(lambda: executions(controller, token, run_id, "?live=0")[0]["archived"],
             what="the execution stored whole")
    # Stored whole, it reads from the store alone with live=0; a live listing still asks
    # the node while the run runs (a playbook's next task may start there).
    settled_log(agent, token)
    asked = listing_requests(agent, run_id)
    for query in ("", f"&host={node}", "&task=t1", f"&host={node}&task=t1"):
        status, answer = call(controller, "GET",
                              f"/api/runs/{run_id}/executions?live=0{query}", token=token)
        assert status == 200 and answer["live"] is False, answer
        assert [(e["execution_id"], e["state"]) for e in answer["executions"]] == [
            (execution_id, "ended")]
    assert listing_requests(agent, run_id) == asked
    status, answer = call(controller, "GET", f"/api/runs/{run_id}/executions", token=token)
    assert status == 200 and answer["live"] is True, answer
    assert wait_for(lambda: listing_requests(agent, run_id) > asked, what="the node asked")
    call(controller, "POST", f"/api/runs/{run_id}/finish", {}, token)


def client_state(agent: AgentProcess, token: str, execution_id: str) -> str:
    with agent.client(token) as client:
        return str(client.execution(execution_id)["state"])


class SilentNode:
    """A TCP port that takes connections and never answers them: a hung agent."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                self.held.append(self.server.accept()[0])
            except OSError:
                return

    def release(self) -> None:
        """Close what is held and stop listening: later connections are refused (shutdown
        wakes the accept() of the other thread, which close() alone leaves listening)."""
        self.server.shutdown(socket.SHUT_RDWR)
        self.thread.join(timeout=10)
        self.server.close()
        for conn in self.held:
            conn.close()


def test_a_users_listings_asking_agents_at_once_are_bounded(
        start_controller, alice: UnixUser, signer: TokenSigner, unique_name) -> None:
    """With runs_read_listings_per_user 1, a listing made while another of the same user
    waits on a hung agent answers at once from the store (`live` false), asking nobody."""
    silent = SilentNode()
    name = unique_name("hung")
    controller = start_controller(extra_args=[
        "--no-discovery", "--node", f"{name}=127.0.0.1:{silent.port}",
        "--runs-read-listings-per-user", "1", "--runs-read-agent-timeout", "600"])
    token = signer.issue(alice.name)
    run_id = new_run(controller, token, hosts=[name])
    first: list[Any] = []
    waiting = threading.Thread(target=lambda: first.append(call(
        controller, "GET", f"/api/runs/{run_id}/executions", token=token)), daemon=True)
    waiting.start()
    try:
        wait_for(lambda: f"run {run_id}: a listing of {alice.name} asks 1 node" in
                 controller.log(), what="the first listing asking the hung agent")
        status, answer = call(controller, "GET", f"/api/runs/{run_id}/executions", token=token)
        assert (status, answer) == (200, {"executions": [], "live": False, "more": False})
        assert first == []  # still waiting on the hung agent
    finally:
        silent.release()
        waiting.join(timeout=60)
    assert first == [(200, {"executions": [], "live": True, "more": False})]
    status, answer = call(controller, "GET", f"/api/runs/{run_id}/executions", token=token)
    assert (status, answer) == (200, {"executions": [], "live": True, "more": False})  # its turn is back


def test_executions_come_in_pages(start_controller, alice: UnixUser,
                                  signer: TokenSigner) -> None:
    """runs_executions_page bounds one answer (a run may hold 20,000 executions): `more` says
    stored executions follow, `offset` reads on, and every one is given once, in order."""
    controller = start_controller(extra_args=["--no-discovery", "--runs-executions-page", "2"])
    token = signer.issue(alice.name)
    run_id = new_run(controller, token)
    send(controller, token, run_id, *({"type": "execution", "host": f"h{n}",
                                       "execution_id": f"e{n}", "task_id": "t1"}
                                      for n in range(5)))
    pages: list[tuple[list[str], bool]] = []
    offset, more = 0, True
    while more:
        status, answer = call(controller, "GET",
                              f"/api/runs/{run_id}/executions?offset={offset}", token=token)
        assert status == 200, answer
        pages.append(([e["execution_id"] for e in answer["executions"]], answer["more"]))
        offset, more = offset + len(answer["executions"]), answer["more"]
    assert pages == [(["e0", "e1"], True), (["e2", "e3"], True), (["e4"], False)]
    status, answer = call(controller, "GET", f"/api/runs/{run_id}/executions?limit=1&offset=3"
                          "&task=t1", token=token)
    assert [e["execution_id"] for e in answer["executions"]] == ["e3"] and answer["more"]
    for bad in ("limit=3", "limit=0", "offset=-1", f"offset={2 ** 63}"):
        status, answer = call(controller, "GET", f"/api/runs/{run_id}/executions?{bad}",
                              token=token)
        assert status == 400 and answer["error"] == "bad_request", bad


def test_read_settings_beyond_what_the_store_gives_are_refused() -> None:
    """A page setting over what one store read gives would make every read a 400."""
    for flag, most in (("--runs-events-page", 100_000), ("--runs-executions-page", 99_999),
                       ("--runs-output-page-lines", 100_000),
                       ("--runs-collect-page-lines", 100_000)):
        load_config(build_parser().parse_args([flag, str(most)]), {})
        with pytest.raises(ConfigError, match=flag[2:].replace("-", "_")):
            load_config(build_parser().parse_args([flag, str(most + 1)]), {})


def test_an_ended_runs_executions_its_agents_alone_know_are_listed(
        start_agent, start_controller, unique_name, alice: UnixUser, signer: TokenSigner,
        pki: TestPki) -> None:
    """A controller restarted mid-run ends it without a final collection, so an execution
    no collection stored is known only to its agent: listing the run still asks that agent
    (its node is not swept), so the output stays readable while the agent holds it."""
    controller, (agent,) = static_cluster(start_agent, start_controller, unique_name, agents=1)
    token = signer.issue(alice.name)
    run_id = new_run(controller, token, hosts=[agent.node_name])
    with AgentClient(agent.host, agent.port, token, tls=pki.client_tls(),
                     node=agent.node_name) as client:
        execution_id = client.start("echo only-the-agent-knows", tags={
            "run": run_id, "task": "t1", "host": agent.node_name})
        wait_for(lambda: client.execution(execution_id)["state"] != "running",
                 what="the execution to exit")
    controller.stop()
    restarted = controller.restarted()
    try:
        assert get_run(restarted, token, run_id)["status"] == "interrupted"
        status, answer = call(restarted, "GET", f"/api/runs/{run_id}/executions", token=token)
        assert status == 200, answer
        assert [e["execution_id"] for e in answer["executions"]] == [execution_id]
    finally:
        restarted.stop()


def test_a_listing_in_pages_gives_each_execution_once(start_agent, start_controller,
                                                      unique_name, alice: UnixUser,
                                                      signer: TokenSigner) -> None:
    """Pages of one execution: the agents are asked on the last page only, and what they
    list that earlier pages gave is not given again."""
    controller, agents = static_cluster(start_agent, start_controller, unique_name,
                                        "--runs-executions-page", "1", agents=2)
    token = signer.issue(alice.name)
    status, answer = call(controller, "POST", "/api/run",
                          {"nodes": [a.node_name for a in agents], "command": "sleep 60"},
                          token)  # running: no node is swept, so the agents are asked
    assert status == 200, answer
    run_id = answer["run"]["id"]
    started = {r["id"] for r in answer["results"].values()}
    seen: list[str] = []
    offset, more = 0, True
    while more:
        status, page = call(controller, "GET",
                            f"/api/runs/{run_id}/executions?offset={offset}", token=token)
        assert status == 200, page
        assert page["live"] is True
        seen += [e["execution_id"] for e in page["executions"]]
        offset += 1 if page["more"] else 0
        more = page["more"]
    assert sorted(seen) == sorted(started)


def test_a_users_downloads_at_once_are_bounded(start_agent, start_controller, unique_name,
                                               alice: UnixUser, bob: UnixUser,
                                               signer: TokenSigner) -> None:
    """A download holds its connection and a page while it goes: with runs_downloads_per_user
    1, a second download of alice's while her first is held answers 429; bob's does not."""
    controller, (agent,) = static_cluster(start_agent, start_controller, unique_name,
                                          "--runs-downloads-per-user", "1", agents=1)
    alices, bobs = signer.issue(alice.name), signer.issue(bob.name)
    run_ids = []
    for token in (alices, bobs):
        status, answer = call(controller, "POST", "/api/run",
                              {"nodes": [agent.node_name], "command": "seq 1 1000000"}, token)
        assert status == 200, answer
        run_ids.append(answer["run"]["id"])

        def stored(token: str = token, run_id: str = answer["run"]["id"]) -> bool:
            found = executions(controller, token, run_id, "?live=0")
            return bool(found) and bool(found[0]["archived"])

        wait_for(stored, timeout=60, what="the output stored")
    held = controller.connection()
    held.connect()
    held.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # it is not read: the
    held.request("GET", f"/api/runs/{run_ids[0]}/output.txt",  # controller waits to send
                 headers={"Authorization": f"Bearer {alices}"})
    first = held.getresponse()
    assert first.status == 200 and first.read(100).startswith(f"{agent.node_name} | 1\n".encode())
    status, answer = call(controller, "GET", f"/api/runs/{run_ids[0]}/output.txt", token=alices)
    assert status == 429 and answer["error"] == "too_many_downloads", answer
    status, _ = call(controller, "GET", f"/api/runs/{run_ids[1]}/output.txt?ansi=strip",
                     token=bobs)
    assert status == 200
    held.close()  # the first download is abandoned: its place is free again
    wait_for(lambda: call(controller, "GET", f"/api/runs/{run_ids[0]}/output.jsonl",
                          token=alices)[0] == 200, what="alice's next download")
