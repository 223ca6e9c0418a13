"""The marco_runs callback with the real ansible-playbook, the fleet's agents and controller:
the playbook becomes one run with its tasks and each host's result, a failed host is failed,
a no_log task's secret is nowhere, the connection tags its executions with the run, and a
controller out of reach costs one warning and nothing else."""

from __future__ import annotations

import json
import re
import secrets
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from marco.tokens import TokenSigner
from tests.e2e.conftest import BIN, PLAYBOOKS, Fleet
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
            "output": fleet.controller.get_json(f"/api/runs/{run_id}/output", token)}


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
    text = json.dumps(played["run"]) + json.dumps(played["output"])
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


REFUSED_PLAYBOOK = """
- name: {name}
  hosts: all
  gather_facts: false
  tasks:
    - name: Say hello
      ansible.builtin.debug:
        msg: hello
"""


def test_a_run_whose_recap_cannot_be_sent_is_ended_not_running(
        fleet: Fleet, signer: TokenSigner, alice: UnixUser, tmp_path: Path) -> None:
    """The controller refuses the first batch (its play_start names a play longer than an
    event may be, which the callback does not cut), so every later event, recap included,
    is dropped: the callback ends the run with POST /finish and the recap's status. The
    task is a `debug`: the marco connection refuses a play name that long as its label."""
    name = f"refused-{secrets.token_hex(4)}.yml"
    (tmp_path / name).write_text(REFUSED_PLAYBOOK.format(name="p" * 70_000))
    token = signer.issue(alice.name)
    out = fleet.ansible(token, str(tmp_path / name), "-l", fleet.names[0])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    both = out.stdout + out.stderr
    assert both.count("[WARNING]: marco_runs") == 1 and "Traceback" not in both, both[-3000:]
    link = PERMALINK.search(out.stdout)
    assert link, out.stdout[-2000:]
    run = fleet.controller.get_json(f"/api/runs/{link.group(2)}", token)
    assert run["events"] == [], run["events"][:3]  # the recap never got there
    assert run["status"] == "ok" and run["ended"] is not None, run["status"]
