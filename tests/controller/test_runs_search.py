"""Searching a run's whole output (docs/runs.md, `GET /api/runs/ID/search`) against a real
controller and real agents: a line of a 100,000-line run, case, literal text, escapes, the
filters, pages with a cursor, owners only, the per-user bound, the lines bound, and a search
during a run that reads what only the agent holds yet."""

from __future__ import annotations

import threading
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from controller.__main__ import build_parser, load_config
from marco.errors import ConfigError
from marco.tokens import TokenSigner
from tests.controller.test_runs_api import (
    SilentNode,
    executions,
    gate,  # noqa: F401 (a fixture)
    new_run,
    send,
    static_cluster,
    wait_ended,
)
from tests.support.command_runs import archived_command_run
from tests.support.controller_process import ControllerProcess
from tests.support.http import call
from tests.support.users import UnixUser
from tests.support.waiting import wait_for

Cluster = tuple[ControllerProcess, list[str]]
# Lines for case, literal text and escapes: seq 0 .. 6.
PRINTF = (r"printf 'Hello World\nhello world\nHELLO\na.b*c\naxbbc\n"
          r"\033[1;31mred\033[0m alert\n(x|y) z\n'")


def search(controller: ControllerProcess, token: str, run_id: str,
           **query: Any) -> tuple[int, Any]:
    """GET .../search with these arguments (a list gives a repeated one)."""
    return call(controller, "GET", f"/api/runs/{run_id}/search?"
                f"{urllib.parse.urlencode(query, doseq=True)}", token=token)


def found(controller: ControllerProcess, token: str, run_id: str,
          **query: Any) -> dict[str, Any]:
    status, answer = search(controller, token, run_id, **query)
    assert status == 200, answer
    return dict(answer)


def seqs(answer: dict[str, Any]) -> list[int]:
    return [hit["seq"] for hit in answer["hits"]]


def exited(client: Any, execution_id: str) -> bool:
    return bool(client.execution(execution_id)["state"] != "running")


def test_a_line_of_a_finished_100000_line_run_is_found(cluster: Cluster, alice: UnixUser,
                                                       bob: UnixUser,
                                                       signer: TokenSigner) -> None:
    controller, names = cluster
    token = signer.issue(alice.name)
    run_id = archived_command_run(controller, token, [names[0]], "seq 1 100000")
    (execution,) = executions(controller, token, run_id)
    answer = found(controller, token, run_id, q="77777")
    assert (answer["count"], answer["complete"], answer["next"]) == (1, True, None)
    (hit,) = answer["hits"]
    assert isinstance(hit.pop("time"), float)  # the node's clock when the line was read
    assert hit == {"execution_id": execution["execution_id"], "host": names[0],
                   "task_id": None, "seq": 77776, "stream": "stdout", "text": "77777",
                   "at": [[0, 5]]}
    assert found(controller, token, run_id, q="no such line") == {
        "hits": [], "count": 0, "complete": True, "next": None}
    # 19 lines hold 9999 (9999, 19999, ..., 99999 and 99990 .. 99998): pages of 4 through
    # them, each hit once, in order.
    every = found(controller, token, run_id, q="9999")
    assert every["count"] == 19 and len(every["hits"]) == 19 and every["next"] is None
    pages: list[list[int]] = []
    after = ""
    while len(pages) < 10:  # a cursor that does not move on fails here, not in a loop
        page = found(controller, token, run_id, q="9999", limit=4, after=after)
        assert page["count"] == 19 and page["complete"]
        pages.append(seqs(page))
        if page["next"] is None:
            break
        after = page["next"]
    assert [len(p) for p in pages] == [4, 4, 4, 4, 3]
    assert [seq for p in pages for seq in p] == seqs(every)
    assert all("9999" in str(seq + 1) for seq in seqs(every))
    # Another user's run is a 404, like a missing one; bad arguments are a 400.
    status, answer = search(controller, signer.issue(bob.name), run_id, q="77777")
    assert status == 404 and answer["error"] == "not_found"
    assert search(controller, token, "r" + "0" * 20, q="x")[0] == 404
    for bad in ({"q": ""}, {}, {"q": "x" * 201}, {"q": "a\nb"}, {"q": "x", "case": 2},
                {"q": "x", "stream": "stdin"}, {"q": "x", "limit": 0},
                {"q": "x", "limit": 1001}, {"q": "x", "failed": "yes"},
                {"q": "x", "after": "no-cursor"}):
        status, answer = search(controller, token, run_id, **bad)
        assert status == 400 and answer["error"] == "bad_request", bad
    assert found(controller, token, run_id, q="x" * 200)["count"] == 0


def test_text_is_literal_without_escapes_and_case_blind_by_default(
        cluster: Cluster, alice: UnixUser, signer: TokenSigner) -> None:
    controller, names = cluster
    token = signer.issue(alice.name)
    run_id = archived_command_run(controller, token, [names[1]], PRINTF)
    assert seqs(found(controller, token, run_id, q="hello")) == [0, 1, 2]
    assert seqs(found(controller, token, run_id, q="hello", case=1)) == [1]
    assert seqs(found(controller, token, run_id, q="HeLLo W")) == [0, 1]
    (hit,) = found(controller, token, run_id, q="a.b*c")["hits"]  # not axbbc: no regex
    assert (hit["seq"], hit["text"]) == (3, "a.b*c")
    assert seqs(found(controller, token, run_id, q="(x|y)")) == [6]
    assert seqs(found(controller, token, run_id, q=".")) == [3]
    (hit,) = found(controller, token, run_id, q="red alert")["hits"]  # across the escapes
    assert (hit["seq"], hit["text"], hit["at"]) == (5, "red alert", [[0, 9]])
    assert found(controller, token, run_id, q="31m")["count"] == 0
    (hit,) = found(controller, token, run_id, q="l", case=1, stream="stdout")["hits"][:1]
    assert (hit["seq"], hit["at"]) == (0, [[2, 3], [3, 4], [9, 10]])


def test_filters_narrow_by_host_task_stream_and_failed_hosts(
        start_agent, start_controller, unique_name, alice: UnixUser,
        signer: TokenSigner) -> None:
    """A run whose first host failed: `failed=1` searches its output alone; `host`
    (repeatable), `task` and `stream` narrow too."""
    controller, agents = static_cluster(start_agent, start_controller, unique_name)
    first, second = (a.node_name for a in agents)
    token = signer.issue(alice.name)
    wait_for(lambda: {first, second} <= set(controller.inventory_hosts(token)),
             what="nodes alive")
    run_id = new_run(controller, token, hosts=[first, second])
    started: dict[str, str] = {}
    for agent, task, rc in ((agents[0], "t1", 1), (agents[1], "t2", 0)):
        with agent.client(token) as client:
            execution_id = started[agent.node_name] = client.start(
                f"echo out-{agent.node_name}; echo err-{agent.node_name} >&2; exit {rc}",
                tags={"run": run_id, "task": task, "host": agent.node_name})
            wait_for(lambda: exited(client, execution_id),  # noqa: B023 (waited for here)
                     what="the execution to exit")
    status, answer = send(controller, token, run_id, {"type": "recap", "stats": {
        first: {"failed": 1}, second: {"ok": 1}}})
    assert status == 200, answer
    wait_ended(controller, token, run_id)
    wait_for(lambda: len(found := executions(controller, token, run_id)) == 2
             and all(e["archived"] for e in found), what="both executions stored")

    def hosts(**query: Any) -> list[tuple[str, str]]:
        return [(hit["host"], hit["text"]) for hit in
                found(controller, token, run_id, **query)["hits"]]

    assert sorted(hosts(q="out-")) == sorted([(first, f"out-{first}"), (second, f"out-{second}")])
    assert hosts(q="out-", failed=1) == [(first, f"out-{first}")]
    assert hosts(q="out-", failed=1, host=second) == []
    assert hosts(q="out-", host=second) == [(second, f"out-{second}")]
    assert sorted(hosts(q="out-", host=[first, second])) == sorted(hosts(q="out-"))
    assert hosts(q="out-", task="t2") == [(second, f"out-{second}")]
    assert sorted(hosts(q="-", stream="stderr")) == sorted(
        [(first, f"err-{first}"), (second, f"err-{second}")])
    assert hosts(q="err-", stream="stdout") == []
    (hit,) = found(controller, token, run_id, q="err-", host=first)["hits"]
    assert (hit["stream"], hit["task_id"], hit["execution_id"]) == (
        "stderr", "t1", started[first])


def test_a_search_during_a_run_reads_what_only_the_agent_holds(
        start_agent, start_controller, unique_name, alice: UnixUser, signer: TokenSigner,
        gate: Path) -> None:  # noqa: F811 (the fixture)
    """A running execution whose first lines are stored: a search finds a line in the store
    and one its agent alone holds yet."""
    controller, (agent,) = static_cluster(start_agent, start_controller, unique_name, agents=1)
    node, token = agent.node_name, signer.issue(alice.name)
    wait_for(lambda: node in controller.inventory_hosts(token), what="node alive")
    run_id = new_run(controller, token, hosts=[node])
    with agent.client(token) as client:
        execution_id = client.start(
            f"echo stored-needle; seq 1 3; until [ -e {gate}/more ]; do sleep 0.05; done; "
            f"echo live-needle; until [ -e {gate}/end ]; do sleep 0.05; done",
            tags={"run": run_id, "task": "t1", "host": node})
        wait_for(lambda: client.execution(execution_id)["next_seq"] == 4, what="4 lines")
        send(controller, token, run_id, {"type": "host_result", "task_id": "t1", "host": node,
                                         "status": "ok"})  # collects lines 0-3
        wait_for(lambda: executions(controller, token, run_id)[0]["stored_seq"] == 4,
                 what="4 lines stored")
        (gate / "more").touch()
        wait_for(lambda: client.execution(execution_id)["next_seq"] == 5, what="5 lines")
    assert executions(controller, token, run_id, "?live=0")[0]["stored_seq"] == 4
    answer = found(controller, token, run_id, q="needle")
    assert [(h["seq"], h["text"]) for h in answer["hits"]] == [
        (0, "stored-needle"), (4, "live-needle")]
    assert (answer["count"], answer["complete"]) == (2, True)
    (gate / "end").touch()


def test_a_search_scans_at_most_runs_search_lines(start_agent, start_controller, unique_name,
                                                  alice: UnixUser, signer: TokenSigner) -> None:
    """Beyond runs_search_lines a search stops and says it is not complete; runs_search_hits
    bounds (and is the default of) `limit`."""
    controller, (agent,) = static_cluster(start_agent, start_controller, unique_name,
                                          "--runs-search-lines", "1000",
                                          "--runs-search-hits", "5", agents=1)
    token = signer.issue(alice.name)
    wait_for(lambda: agent.node_name in controller.inventory_hosts(token), what="node alive")
    run_id = archived_command_run(controller, token, [agent.node_name], "seq 1 2000")
    assert found(controller, token, run_id, q="1500") == {
        "hits": [], "count": 0, "complete": False, "next": None}
    answer = found(controller, token, run_id, q="99")
    assert answer["count"] == 19 and not answer["complete"]  # 99, 199, ..., 990-999
    assert seqs(answer) == [98, 198, 298, 398, 498] and answer["next"] is not None
    assert search(controller, token, run_id, q="99", limit=6)[0] == 400


def test_a_users_searches_at_once_are_bounded(start_controller, alice: UnixUser,
                                              bob: UnixUser, signer: TokenSigner,
                                              unique_name) -> None:
    """With runs_search_per_user 1, a search of alice's while her first waits on a hung
    agent answers 429; bob's does not; once the first has answered, hers go again."""
    silent = SilentNode()
    name = unique_name("hung")
    controller = start_controller(extra_args=[
        "--no-discovery", "--node", f"{name}=127.0.0.1:{silent.port}",
        "--runs-search-per-user", "1", "--runs-read-agent-timeout", "600"])
    alices, bobs = signer.issue(alice.name), signer.issue(bob.name)
    run_id = new_run(controller, alices, hosts=[name])  # running: its host is asked
    bobs_run = new_run(controller, bobs)  # no host: nobody to ask
    first: list[Any] = []
    waiting = threading.Thread(target=lambda: first.append(search(
        controller, alices, run_id, q="x")), daemon=True)
    waiting.start()
    try:
        wait_for(lambda: f"run {run_id}: a listing of {alice.name} asks 1 node" in
                 controller.log(), what="the first search asking the hung agent")
        status, answer = search(controller, alices, run_id, q="y")
        assert status == 429 and answer["error"] == "too_many_searches", answer
        assert found(controller, bobs, bobs_run, q="x")["count"] == 0
        assert first == []  # still waiting on the hung agent
    finally:
        silent.release()
        waiting.join(timeout=60)
    assert first == [(200, {"hits": [], "count": 0, "complete": True, "next": None})]
    assert search(controller, alices, run_id, q="y")[0] == 200  # its turn is back


def test_lines_are_matched_as_shown_and_q_as_typed(cluster: Cluster, alice: UnixUser,
                                                   signer: TokenSigner) -> None:
    """`\\r` and `\\b` overwrite as on the page (a progress line shows `100%` and is found by
    it alone); `q` keeps its spaces; a hit gives at most 20 occurrences, all in its 500
    characters; a cursor the search never comes to is a 400, not an empty page."""
    controller, names = cluster
    token = signer.issue(alice.name)
    run_id = archived_command_run(controller, token, [names[0]],
                         r"printf '  foo\nfoo\n10%%\r55%%\r100%%\nabc\rX\nab\bc\n'; "
                         r"head -c 600 /dev/zero | tr '\0' z; echo")
    assert found(controller, token, run_id, q="55%")["count"] == 0
    (hit,) = found(controller, token, run_id, q="100%")["hits"]
    assert (hit["seq"], hit["text"], hit["at"]) == (2, "100%", [[0, 4]])
    assert seqs(found(controller, token, run_id, q="Xbc")) == [3]
    assert seqs(found(controller, token, run_id, q="ac")) == [4]
    assert found(controller, token, run_id, q="abc")["count"] == 0
    assert seqs(found(controller, token, run_id, q="  foo")) == [0]
    assert seqs(found(controller, token, run_id, q="foo")) == [0, 1]
    assert seqs(found(controller, token, run_id, q=" ")) == [0]
    (hit,) = found(controller, token, run_id, q="z")["hits"]
    assert len(hit["text"]) == 500 and hit["at"] == [[n, n + 1] for n in range(20)]
    first = found(controller, token, run_id, q="foo", limit=1)
    assert first["next"] is not None and first["count"] == 2
    position, _, place = first["next"].partition(":")
    for after in (f"{int(position) + 1}:{place}", f"{position}:other:0"):
        status, answer = search(controller, token, run_id, q="foo", after=after)
        assert status == 400 and answer["error"] == "bad_request", after
    assert seqs(found(controller, token, run_id, q="foo", after=first["next"])) == [1]


def test_a_search_stops_at_its_deadline(start_controller, alice: UnixUser,
                                        signer: TokenSigner, unique_name) -> None:
    """With runs_search_seconds 1, a search waiting on a hung agent (600 s to answer) answers
    what it found, not complete."""
    silent = SilentNode()
    name = unique_name("hung")
    controller = start_controller(extra_args=[
        "--no-discovery", "--node", f"{name}=127.0.0.1:{silent.port}",
        "--runs-search-seconds", "1", "--runs-read-agent-timeout", "600"])
    token = signer.issue(alice.name)
    run_id = new_run(controller, token, hosts=[name])
    try:
        assert found(controller, token, run_id, q="x") == {
            "hits": [], "count": 0, "complete": False, "next": None}
        assert f"run {run_id}: a search of {alice.name} stops: its time is up" \
            in controller.log()
    finally:
        silent.release()


def test_a_search_whose_client_went_away_stops(start_controller, alice: UnixUser,
                                               signer: TokenSigner, unique_name) -> None:
    """With runs_search_per_user 1, a search waiting on a hung agent holds alice's slot (429)
    until its client goes away; then it stops and the slot is hers again."""
    silent = SilentNode()
    name = unique_name("hung")
    controller = start_controller(extra_args=[
        "--no-discovery", "--node", f"{name}=127.0.0.1:{silent.port}",
        "--runs-search-per-user", "1", "--runs-read-agent-timeout", "600",
        "--runs-search-seconds", "600"])
    token = signer.issue(alice.name)
    run_id = new_run(controller, token, hosts=[name])
    other = new_run(controller, token)  # no host: nobody to ask
    conn = controller.connection(timeout=60)
    try:
        conn.request("GET", f"/api/runs/{run_id}/search?q=x",
                     headers={"Authorization": f"Bearer {token}"})
        wait_for(lambda: f"run {run_id}: a listing of {alice.name} asks 1 node" in
                 controller.log(), what="the search asking the hung agent")
        status, answer = search(controller, token, other, q="x")
        assert status == 429 and answer["error"] == "too_many_searches", answer
        conn.close()
        wait_for(lambda: search(controller, token, other, q="x")[0] == 200,
                 what="the slot back once the client went away")
        assert f"run {run_id}: a search of {alice.name} stops: its client went away" \
            in controller.log()
    finally:
        conn.close()
        silent.release()


def test_searches_at_once_are_bounded_in_all(start_controller, alice: UnixUser, bob: UnixUser,
                                             signer: TokenSigner, unique_name) -> None:
    """With runs_search_at_once 1, bob's search while alice's waits on a hung agent answers
    429, whoever he is; once hers has answered, his goes."""
    silent = SilentNode()
    name = unique_name("hung")
    controller = start_controller(extra_args=[
        "--no-discovery", "--node", f"{name}=127.0.0.1:{silent.port}",
        "--runs-search-at-once", "1", "--runs-read-agent-timeout", "600"])
    alices, bobs = signer.issue(alice.name), signer.issue(bob.name)
    run_id = new_run(controller, alices, hosts=[name])
    bobs_run = new_run(controller, bobs)
    first: list[Any] = []
    waiting = threading.Thread(target=lambda: first.append(search(
        controller, alices, run_id, q="x")), daemon=True)
    waiting.start()
    try:
        wait_for(lambda: f"run {run_id}: a listing of {alice.name} asks 1 node" in
                 controller.log(), what="alice's search asking the hung agent")
        status, answer = search(controller, bobs, bobs_run, q="x")
        assert status == 429 and answer["error"] == "too_many_searches", answer
        assert "the controller has 1 searches" in answer["message"]
    finally:
        silent.release()
        waiting.join(timeout=60)
    assert first and first[0][0] == 200
    assert search(controller, bobs, bobs_run, q="x")[0] == 200


def test_a_node_that_failed_is_not_asked_again_in_a_search(
        start_agent, start_controller, unique_name, alice: UnixUser, signer: TokenSigner,
        gate: Path) -> None:  # noqa: F811 (the fixture)
    """Three executions of a running run registered on a node that then goes away: one
    search reads the first from its agent, fails, and does not ask for the other two."""
    controller, (agent,) = static_cluster(start_agent, start_controller, unique_name, agents=1)
    node, token = agent.node_name, signer.issue(alice.name)
    wait_for(lambda: node in controller.inventory_hosts(token), what="node alive")
    run_id = new_run(controller, token, hosts=[node])
    with agent.client(token) as client:
        ids = [client.start(f"until [ -e {gate}/end ]; do sleep 0.05; done",
                            tags={"run": run_id, "task": f"t{n}", "host": node})
               for n in range(3)]
    wait_for(lambda: {e["execution_id"] for e in executions(controller, token, run_id)}
             == set(ids), what="the three executions registered")
    agent.stop()
    answer = found(controller, token, run_id, q="x")
    assert answer["count"] == 0
    failed = [line for line in controller.log().splitlines()
              if f"run {run_id}: output of" in line and "not read" in line]
    assert len(failed) == 1, failed
    assert all(not e["archived"] for e in executions(controller, token, run_id, "?live=0"))


def test_search_settings_refuse_zero() -> None:
    for flag in ("--runs-search-per-user", "--runs-search-hits", "--runs-search-query-chars",
                 "--runs-search-lines", "--runs-search-chars", "--runs-search-seconds",
                 "--runs-search-at-once"):
        with pytest.raises(ConfigError, match=flag[2:].replace("-", "_")):
            load_config(build_parser().parse_args([flag, "0"]), {})
