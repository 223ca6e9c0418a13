"""The runs API (docs/runs.md) against a real controller and real agents: a run from start to
recap, listing and paging, owners only, bad input, command and deploy runs whose output
outlives their agents, a restart, the per-user cap, the settings."""

from __future__ import annotations

import re
import secrets
import signal
import urllib.parse
from typing import Any

import pytest

from controller.__main__ import build_parser, load_config
from controller.context import run_limits
from controller.runstore import RunLimits
from marco.client import AgentClient
from marco.errors import ConfigError
from marco.tokens import TokenSigner
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
            assert call(controller, "GET", f"/api/runs/{run_id}/output", token=token)[0] == 404
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


def output_lines(execution: dict[str, Any]) -> list[str]:
    return [line for event in execution["events"] for line in event["lines"]]


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
    assert run["status"] == "ok" and run["hosts"] == names and run["meta"] == {"cwd": "/tmp"}
    assert {h: (c["ok"], c["failed"], c["rc"]) for h, c in run["stats"].items()} == {
        name: (1, 0, 0) for name in names}
    assert sorted((e["host"], e["execution_id"]) for e in run["events"]
                  if e["type"] == "execution") == sorted(
        (name, r["id"]) for name, r in answer["results"].items())

    def archived() -> list[dict[str, Any]] | None:
        executions = call(controller, "GET", f"/api/runs/{run_id}/output", token=token)[1][
            "executions"]
        return executions if len(executions) == 2 and all(
            e["archived"] for e in executions) else None

    kept = wait_for(archived, what="the run's output archived")
    assert {e["host"]: output_lines(e) for e in kept} == {name: ["kept-42"] for name in names}
    for agent in agents:
        agent.stop()
    status, answer = call(controller, "GET", f"/api/runs/{run_id}/output?host={names[1]}",
                          token=token)
    assert status == 200 and [(e["host"], e["archived"], output_lines(e))
                              for e in answer["executions"]] == [(names[1], True, ["kept-42"])]
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
    live = call(controller, "GET", f"/api/runs/{run_id}/output", token=token)[1]["executions"]
    assert [(e["archived"], output_lines(e)) for e in live] == [(False, ["before"])]
    agent.stop(signal.SIGKILL)
    run = wait_ended(controller, token, run_id)
    assert run["status"] == "unreachable" and run["stats"][agent.node_name]["unreachable"] == 1
    kept = wait_for(lambda: call(controller, "GET", f"/api/runs/{run_id}/output",
                                 token=token)[1]["executions"], what="the output's record")
    assert [(e["execution_id"], e["archived"]) for e in kept] == [(execution_id, False)]


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
    kept = wait_for(lambda: (e := call(controller, "GET", f"/api/runs/{run['id']}/output",
                                       token=token)[1]["executions"]) and all(
        x["archived"] for x in e) and e, what="the deploy's output archived")
    assert sorted((e["host"], output_lines(e)) for e in kept) == [
        (n, ["deployed"]) for n in sorted(names)]
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
                 "--runs-max-per-user", "--runs-max-bytes-per-user"):
        with pytest.raises(ConfigError, match=flag[2:].replace("-", "_")):
            load_config(build_parser().parse_args([flag, "0"]), {})


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
