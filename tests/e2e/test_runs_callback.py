"""The marco_runs callback with the real ansible-playbook, the fleet's agents and controller:
the playbook becomes one run with its tasks and each host's result, a failed host is failed,
a no_log task's secret is nowhere, the connection tags its executions with the run, and a
controller out of reach costs one warning and nothing else. The output of every execution is
kept by the controller as the run goes (more tasks than an agent keeps executions, a delegated
task's output from the node it ran on) and survives a restart of the controller."""

from __future__ import annotations

import json
import re
import secrets
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from marco.tokens import TokenSigner
from tests.e2e.conftest import BIN, PLAYBOOKS, Fleet
from tests.support.agent_process import AgentProcess
from tests.support.users import UnixUser
from tests.support.waiting import wait_for

SECRET = "s3cret-" + secrets.token_hex(8)      # only in the no_log task's command
HIDDEN_VAR = "x-var-" + secrets.token_hex(8)   # given with -e: kept out of the run's title

PLAYBOOK = """
- name: Runs callback
  hosts: all
  gather_facts: false
  vars:
    secret_word: "{secret}"
  tasks:
    - name: Say hello
      ansible.builtin.command: echo hello-{{{{ inventory_hostname }}}}
    - name: Keep a secret
      ansible.builtin.command: echo {{{{ secret_word }}}}
      no_log: true
    - name: Fail on one host
      ansible.builtin.command: "false"
      when: inventory_hostname == "{failing}"
    - name: After the failure
      ansible.builtin.command: echo still-here
"""

PERMALINK = re.compile(r"^Marco run: (\S+/runs/(r[0-9a-f]{20}))$", re.M)


@pytest.fixture(scope="module")
def played(fleet: Fleet, signer: TokenSigner, alice: UnixUser,
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One ansible-playbook on the three fleet hosts (the second one fails a task), with the
    callback enabled by playbooks/ansible.cfg; its output, its run and the run's output."""
    play = tmp_path_factory.mktemp("runs-callback") / "runs_callback.yml"
    play.write_text(PLAYBOOK.format(secret=SECRET, failing=fleet.names[1]))
    token = signer.issue(alice.name)
    out = fleet.ansible(token, str(play), "-e", f"unused_var={HIDDEN_VAR}")
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]  # a host failed
    assert "[WARNING]: marco_runs" not in out.stderr, out.stderr[-3000:]
    link = PERMALINK.search(out.stdout)
    assert link, out.stdout[-2000:]
    run_id = link.group(2)
    return {"out": out, "token": token, "permalink": link.group(1), "id": run_id,
            "run": fleet.controller.get_json(f"/api/runs/{run_id}", token),
            "output": stored_output(fleet, token, run_id)}


def executions(fleet: Fleet, token: str, run_id: str, **query: str) -> list[dict[str, Any]]:
    """GET /api/runs/ID/executions (with `host`, `task` filters)."""
    path = f"/api/runs/{run_id}/executions?{urllib.parse.urlencode(query)}"
    found: list[dict[str, Any]] = fleet.controller.get_json(path, token)["executions"]
    return found


def archived_executions(fleet: Fleet, token: str, run_id: str,
                        **query: str) -> list[dict[str, Any]]:
    """The run's executions once every one is stored whole (the controller collects them in
    the background as results arrive and once more after the run's end)."""
    def all_archived() -> list[dict[str, Any]] | None:
        found = executions(fleet, token, run_id, **query)
        return found if found and all(e["archived"] for e in found) else None
    found: list[dict[str, Any]] = wait_for(all_archived, timeout=60,
                                           what=f"the executions of {run_id} {query} stored")
    return found


def read_output(fleet: Fleet, token: str, run_id: str, execution_id: str) -> dict[str, Any]:
    """GET /api/runs/ID/output for one execution, page after page: its `lines` and the last
    page (`archived`, `end`, `node`, ...)."""
    lines: list[str] = []
    since = 0
    while True:
        page = fleet.controller.get_json(
            f"/api/runs/{run_id}/output?execution={execution_id}&since={since}", token)
        lines += [line for event in page["events"] for line in event["lines"]]
        if page["end"] or page["next"] == since:
            return {**page, "lines": lines}
        since = page["next"]


def stored_output(fleet: Fleet, token: str, run_id: str,
                  **query: str) -> dict[str, dict[str, Any]]:
    """Execution id -> its record and its output, once the run's output is all stored."""
    return {e["execution_id"]: {**e, "output": read_output(fleet, token, run_id,
                                                           e["execution_id"])}
            for e in archived_executions(fleet, token, run_id, **query)}


def events(run: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e for e in run["events"] if e["type"] == kind]


def task_ids(run: dict[str, Any]) -> dict[str, str]:
    """Task name -> task id, from the run's task_start events."""
    return {e["task"]: e["task_id"] for e in events(run, "task_start")}


def results(run: dict[str, Any], task: str) -> dict[str, dict[str, Any]]:
    """Host -> its host_result event for the task named `task`."""
    task_id = task_ids(run)[task]
    return {e["host"]: e for e in events(run, "host_result") if e["task_id"] == task_id}


def test_the_playbook_is_one_run_with_its_tasks_and_results(
        played: dict[str, Any], fleet: Fleet) -> None:
    run = played["run"]
    assert played["permalink"] == f"{fleet.controller.url}/runs/{played['id']}"
    listed = fleet.controller.get_json("/api/runs?kind=playbook", played["token"])["runs"]
    assert played["id"] in [r["id"] for r in listed]
    assert run["kind"] == "playbook" and run["title"].startswith("ansible-playbook ")
    assert "runs_callback.yml" in run["title"] and run["meta"]["playbook"].endswith(
        "runs_callback.yml")
    assert [e["play"] for e in events(run, "play_start")] == ["Runs callback"]
    assert list(task_ids(run)) == ["Say hello", "Keep a secret", "Fail on one host",
                                   "After the failure"]
    assert all(e["action"] == "ansible.builtin.command" for e in events(run, "task_start"))
    assert set(fleet.names) <= set(run["hosts"])
    hello = results(run, "Say hello")
    assert set(hello) == set(fleet.names)
    for host, event in hello.items():
        assert event["status"] == "changed" and event["rc"] == 0, event
        assert event["result"]["stdout"] == f"hello-{host}", event
        assert "invocation" not in event["result"] and not any(
            key.startswith("_ansible_") for key in event["result"]), event
        assert isinstance(event["duration"], float) and event["duration"] > 0, event
    [recap] = events(run, "recap")
    assert run["stats"] == recap["stats"] and run["ended"] is not None


def test_a_failed_host_is_failed(played: dict[str, Any], fleet: Fleet) -> None:
    run = played["run"]
    failing = fleet.names[1]
    failed = results(run, "Fail on one host")
    assert failed[failing]["status"] == "failed" and failed[failing]["rc"] == 1, failed
    assert failed[failing]["msg"], failed
    assert {failed[h]["status"] for h in fleet.names if h != failing} == {"skipped"}
    assert failing not in results(run, "After the failure")  # Ansible dropped the host
    assert run["stats"][failing]["failed"] == 1
    assert all(run["stats"][h]["failed"] == 0 for h in fleet.names if h != failing)
    assert run["status"] == "failed"


def test_a_no_log_tasks_secret_appears_nowhere(played: dict[str, Any], fleet: Fleet) -> None:
    secret = results(played["run"], "Keep a secret")
    assert set(secret) == set(fleet.names)
    for event in secret.values():
        assert event["msg"] == "output hidden: no_log" and "result" not in event, event
    assert played["output"], "no output kept"
    text = json.dumps(played["run"]) + json.dumps(played["output"])
    assert "hello-" in text  # the output is there, only the secret is not
    assert SECRET not in text
    assert HIDDEN_VAR not in text  # -e values (passwords, often) stay out of the title
    stored = [path for path in Path(fleet.controller.state_dir).rglob("*") if path.is_file()]
    assert stored, "nothing in the controller's state dir"
    for path in stored:
        assert SECRET.encode() not in path.read_bytes(), path


def test_the_connections_executions_carry_the_run_tag(
        played: dict[str, Any], fleet: Fleet, signer: TokenSigner, alice: UnixUser) -> None:
    ids = task_ids(played["run"])
    for agent in fleet.agents:
        with agent.client(signer.issue(alice.name)) as client:
            tagged = client.executions(run=played["id"])
        assert tagged, f"no execution of the run on {agent.node_name}"
        assert {e["tags"]["host"] for e in tagged} == {agent.node_name}
        assert {e["tags"]["run"] for e in tagged} == {played["id"]}
        assert {e["tags"]["task"] for e in tagged} <= set(ids.values())
        assert ids["Say hello"] in {e["tags"]["task"] for e in tagged}


@pytest.fixture
def refusing_url() -> Iterator[str]:
    """An https URL on a port bound but not listening: every connection is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"https://127.0.0.1:{sock.getsockname()[1]}"


def test_an_unreachable_controller_costs_one_warning(
        fleet: Fleet, signer: TokenSigner, alice: UnixUser, tmp_path: Path,
        refusing_url: str) -> None:
    """The inventory is a file here (the inventory plugin needs the controller too)."""
    agent = fleet.agents[0]
    inventory = tmp_path / "hosts.json"
    inventory.write_text(json.dumps({"all": {"hosts": {agent.node_name: {
        "ansible_host": agent.host, "ansible_connection": "marco.fleet.marco"}}}}))
    play = tmp_path / "unrecorded.yml"
    play.write_text(PLAYBOOK.format(secret=SECRET, failing="no-such-host"))
    token = signer.issue(alice.name)
    out = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(inventory), str(play)],
                         cwd=PLAYBOOKS, env={**fleet.env(token), "MARCO_CONTROLLER": refusing_url},
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    both = out.stdout + out.stderr
    assert both.count("marco_runs") == 1, both[-3000:]
    assert "cannot reach the controller" in both and "Traceback" not in both, both[-3000:]
    assert "Marco run:" not in both
    assert re.search(rf"^{re.escape(agent.node_name)}\s+: ok=3 .*unreachable=0\s+failed=0", out.stdout,
                     re.M), out.stdout[-2000:]
    # Switched off for one invocation: not a word about it.
    quiet = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(inventory), str(play)],
                           cwd=PLAYBOOKS, env={**fleet.env(token), "MARCO_CONTROLLER": refusing_url,
                                               "MARCO_RUNS_ENABLED": "false"},
                           capture_output=True, text=True, timeout=240)
    assert quiet.returncode == 0 and "marco_runs" not in quiet.stdout + quiet.stderr, quiet.stderr


SLOW_PLAYBOOK = """
- name: Interrupted
  hosts: all
  gather_facts: false
  tasks:
    - name: Sleep long
      ansible.builtin.command: sleep 300
"""


def test_ctrl_c_ends_the_run_as_interrupted(fleet: Fleet, signer: TokenSigner,
                                            alice: UnixUser, tmp_path: Path) -> None:
    """No recap (the user pressed Ctrl-C): the callback ends the run as `interrupted` on
    its way out, instead of leaving it running."""
    name = f"interrupted-{secrets.token_hex(4)}.yml"
    (tmp_path / name).write_text(SLOW_PLAYBOOK)
    token = signer.issue(alice.name)
    env = fleet.env(token)
    playbook = subprocess.Popen([str(BIN / "ansible-playbook"), str(tmp_path / name), "-l",
                                 fleet.names[0]], cwd=PLAYBOOKS, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def sleeping_run() -> dict[str, Any] | None:
            runs = fleet.controller.get_json(f"/api/runs?q={name}", token)["runs"]
            run = runs and fleet.controller.get_json(f"/api/runs/{runs[0]['id']}", token)
            return run if run and [e for e in run["events"] if e["type"] == "task_start"] else None

        run = wait_for(sleeping_run, timeout=60, what="the run with its task started")
        assert run["status"] == "running" and run["ended"] is None
        playbook.send_signal(signal.SIGINT)
        output, _ = playbook.communicate(timeout=60)
    finally:
        if playbook.poll() is None:
            playbook.kill()
            playbook.wait()
    ended = fleet.controller.get_json(f"/api/runs/{run['id']}", token)
    assert ended["status"] == "interrupted" and ended["ended"] is not None, output[-2000:]


LONG_NAMES_PLAYBOOK = """
- name: {play}
  hosts: all
  gather_facts: false
  tasks:
    - name: {task}
      ansible.builtin.command: echo long-names
"""


def test_names_larger_than_an_event_are_cut_and_the_run_keeps_its_events(
        fleet: Fleet, signer: TokenSigner, alice: UnixUser, tmp_path: Path) -> None:
    """A play and a task named beyond the controller's 64 KiB per event: cut to 1,000
    characters, the run has every event (one refused batch would have cost all the rest)."""
    name = f"long-names-{secrets.token_hex(4)}.yml"
    (tmp_path / name).write_text(LONG_NAMES_PLAYBOOK.format(play="p" * 70_000, task="t" * 70_000))
    token = signer.issue(alice.name)
    out = fleet.ansible(token, str(tmp_path / name), "-l", fleet.names[0])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "marco_runs" not in out.stdout + out.stderr, out.stderr[-3000:]
    link = PERMALINK.search(out.stdout)
    assert link, out.stdout[-2000:]
    run = fleet.controller.get_json(f"/api/runs/{link.group(2)}", token)
    assert [e["play"] for e in events(run, "play_start")] == ["p" * 999 + "…"]
    assert [e["task"] for e in events(run, "task_start")] == ["t" * 999 + "…"]
    [result] = events(run, "host_result")
    assert result["status"] == "changed" and result["result"]["stdout"] == "long-names"
    assert len(events(run, "recap")) == 1 and run["status"] == "ok"


class Cable:
    """A TCP relay in front of the controller, on the controller's address (its certificate
    names it) and a port of its own: `cut()` refuses new connections (each sets `refused`), as
    a controller gone away would; `mend()` relays again. An exchange already under way when
    the cable is cut finishes: the callback opens a connection per batch, and cutting one
    whose answer is on its way back (the batch the test just saw arrive) would fail that
    batch instead of the one the test means to fail. `close()` closes everything."""

    def __init__(self, listen_host: str, target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server((listen_host, 0))
        self.url = f"https://{listen_host}:{self.server.getsockname()[1]}"
        self.cut_off = False
        self.refused = threading.Event()
        self.open: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        with self.lock:
            self.cut_off = True

    def mend(self) -> None:
        with self.lock:
            self.cut_off = False

    def close(self) -> None:
        with self.lock:
            self.cut_off = True
            for sock in self.open:
                sock.close()
            self.open.clear()
        self.server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return  # closed
            with self.lock:
                if self.cut_off:
                    client.close()
                    self.refused.set()
                    continue
                try:
                    upstream = socket.create_connection(self.target, timeout=10)
                except OSError:
                    client.close()  # the controller itself is away: so is the relay
                    continue
                upstream.settimeout(None)
                self.open += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # cut, or the other side is gone


@pytest.fixture
def cable(fleet: Fleet) -> Iterator[Cable]:
    relay = Cable(fleet.controller.host, (fleet.controller.host, fleet.controller.port))
    yield relay
    relay.close()


GATED_PLAYBOOK = """
- name: Gated
  hosts: all
  gather_facts: false
  tasks:
    - name: Say hello
      ansible.builtin.debug:
        msg: hello
    - name: Wait for the first gate
      ansible.builtin.wait_for:
        path: "{first}"
        timeout: 120
      delegate_to: localhost
    - name: Wait for the second gate
      ansible.builtin.wait_for:
        path: "{second}"
        timeout: 120
      delegate_to: localhost
"""


def test_a_run_whose_recap_cannot_be_sent_is_ended_not_running(
        fleet: Fleet, signer: TokenSigner, alice: UnixUser, tmp_path: Path,
        cable: Cable) -> None:
    """The controller goes away mid-run (the cable to it is cut while a task waits): the
    batch sent then fails, so every later event, recap included, is dropped. The controller
    is back before the playbook ends: the callback ends the run with POST /finish and the
    recap's status, instead of leaving it running."""
    name = f"gated-{secrets.token_hex(4)}.yml"
    first, second = tmp_path / "first-gate", tmp_path / "second-gate"
    (tmp_path / name).write_text(GATED_PLAYBOOK.format(first=first, second=second))
    token = signer.issue(alice.name)
    env = {**fleet.env(token), "MARCO_CONTROLLER": cable.url}
    playbook = subprocess.Popen([str(BIN / "ansible-playbook"), str(tmp_path / name), "-l",
                                 fleet.names[0]], cwd=PLAYBOOKS, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def waiting_run() -> dict[str, Any] | None:
            assert playbook.poll() is None, playbook.communicate()[0][-3000:]  # not at its gate
            runs = fleet.controller.get_json(f"/api/runs?q={name}", token)["runs"]
            run = runs and fleet.controller.get_json(f"/api/runs/{runs[0]['id']}", token)
            tasks = [e["task"] for e in run["events"] if e["type"] == "task_start"] if run else []
            return run if "Wait for the first gate" in tasks else None

        run = wait_for(waiting_run, timeout=60, what="the run waiting at its first gate")
        cable.cut()
        first.touch()  # the first wait ends: its result goes to a controller out of reach
        assert cable.refused.wait(60), "the callback sent nothing while the cable was cut"
        cable.mend()
        second.touch()
        output, _ = playbook.communicate(timeout=120)
    finally:
        if playbook.poll() is None:
            playbook.kill()
            playbook.wait()
    assert playbook.returncode == 0, output[-3000:]
    assert output.count("[WARNING]: marco_runs") == 1 and "Traceback" not in output, output[-3000:]
    ended = fleet.controller.get_json(f"/api/runs/{run['id']}", token)
    assert not events(ended, "recap"), ended["events"]  # the recap never got there
    assert "Wait for the second gate" not in task_ids(ended)  # nor anything after the cut
    assert ended["status"] == "ok" and ended["ended"] is not None, ended["status"]


RETENTION = 20  # finished executions the agent of the retention test keeps per user
MANY_TASKS = 50


def many_tasks_playbook(count: int) -> str:
    tasks = "".join(f"    - name: Task {n}\n      ansible.builtin.command: echo line-of-task-{n}\n"
                    for n in range(1, count + 1))
    return f"- name: Many tasks\n  hosts: all\n  gather_facts: false\n  tasks:\n{tasks}"


def in_inventory(fleet: Fleet, token: str, name: str) -> None:
    """Wait until the controller lists the node again (a stopped agent says goodbye)."""
    wait_for(lambda: name in fleet.controller.inventory_hosts(token),
             what=f"{name} back in the controller's inventory")


@pytest.fixture
def forgetful_agent(fleet: Fleet, signer: TokenSigner,
                    alice: UnixUser) -> Iterator[AgentProcess]:
    """The fleet's first agent, restarted to keep only RETENTION finished executions per
    user (the fleet's keep the default 200), restarted as it was afterwards."""
    usual = fleet.agents[0]
    token = signer.issue(alice.name)
    usual.stop()
    forgetful = AgentProcess(usual.secret_file, usual.state_dir, node_name=usual.node_name,
                             extra_args=[*usual.extra_args, "--retention-count", str(RETENTION)],
                             bind=usual.host, port=usual.port, announce=True,
                             netns=usual.netns, pki=usual.pki)
    fleet.agents[0] = forgetful
    try:
        in_inventory(fleet, token, forgetful.node_name)
        yield forgetful
    finally:
        forgetful.stop()
        fleet.agents[0] = usual.restarted()
        in_inventory(fleet, token, usual.node_name)


def test_more_tasks_than_an_agent_keeps_keep_all_their_output(
        fleet: Fleet, signer: TokenSigner, alice: UnixUser, tmp_path: Path,
        forgetful_agent: AgentProcess) -> None:
    """The agent forgets the playbook's first executions long before the run ends: the
    controller stored each one as its result came, so the run still has every task's output."""
    name = f"many-tasks-{secrets.token_hex(4)}.yml"
    (tmp_path / name).write_text(many_tasks_playbook(MANY_TASKS))
    token = signer.issue(alice.name)
    began = time.monotonic()
    out = fleet.ansible(token, str(tmp_path / name), "-l", forgetful_agent.node_name)
    took = time.monotonic() - began
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    link = PERMALINK.search(out.stdout)
    assert link, out.stdout[-2000:]
    run_id = link.group(2)
    ids = task_ids(fleet.controller.get_json(f"/api/runs/{run_id}", token))
    with forgetful_agent.client(token) as client:
        kept = client.executions(run=run_id)
    assert len(kept) == RETENTION, (len(kept), took)  # the agent forgot the rest
    assert ids["Task 1"] not in {e["tags"]["task"] for e in kept}
    stored = stored_output(fleet, token, run_id)
    assert len(stored) > RETENTION
    for n in range(1, MANY_TASKS + 1):
        lines = [line for e in stored.values() if e["task_id"] == ids[f"Task {n}"]
                 for line in e["output"]["lines"]]
        assert f"line-of-task-{n}" in "\n".join(lines), (n, took)


DELEGATED_PLAYBOOK = """
- name: Delegated
  hosts: all
  gather_facts: false
  tasks:
    - name: Run on the other node
      ansible.builtin.command: echo delegated-from-{{{{ inventory_hostname }}}}
      delegate_to: "{delegate}"
"""


def test_a_delegated_tasks_output_is_in_the_delegating_hosts_cell(
        fleet: Fleet, signer: TokenSigner, alice: UnixUser, tmp_path: Path) -> None:
    """A task of the first host delegated to the second runs on the second's agent, tagged
    with the first host: the callback names the delegate, so the controller collects the
    output there and files it under the first host and the task."""
    host, delegate = fleet.names[0], fleet.names[1]
    name = f"delegated-{secrets.token_hex(4)}.yml"
    (tmp_path / name).write_text(DELEGATED_PLAYBOOK.format(delegate=delegate))
    token = signer.issue(alice.name)
    out = fleet.ansible(token, str(tmp_path / name), "-l", host)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    link = PERMALINK.search(out.stdout)
    assert link, out.stdout[-2000:]
    run_id = link.group(2)
    run = fleet.controller.get_json(f"/api/runs/{run_id}", token)
    [result] = events(run, "host_result")
    assert result["host"] == host and result["delegate"] == delegate, result
    assert run["hosts"] == [host]  # the delegate is no column of the grid
    task = task_ids(run)["Run on the other node"]
    stored = stored_output(fleet, token, run_id, host=host, task=task)
    assert {e["node"] for e in stored.values()} == {delegate}
    text = "\n".join(line for e in stored.values() for line in e["output"]["lines"])
    assert f"delegated-from-{host}" in text, text[-2000:]  # in the module's JSON answer


def test_a_controller_restart_keeps_the_run_its_events_and_output(
        played: dict[str, Any], fleet: Fleet, signer: TokenSigner, alice: UnixUser) -> None:
    """Last in this file: the fleet's controller is restarted (same state dir and port), and
    the playbook's run reads the same as before, its output from the store."""
    token, run_id = played["token"], played["id"]
    before = fleet.controller.get_json(f"/api/runs/{run_id}", token)
    output = stored_output(fleet, token, run_id)
    fleet.controller.stop()
    fleet.controller = fleet.controller.restarted()
    wait_for(lambda: set(fleet.names) <= set(fleet.controller.inventory_hosts(token)),
             what="the fleet's agents in the restarted controller's inventory")
    after = fleet.controller.get_json(f"/api/runs/{run_id}", token)
    assert after == before
    assert stored_output(fleet, token, run_id) == output
    assert any("hello-" in line for e in output.values() for line in e["output"]["lines"])
