"""Paths Ansible users hit through the marco connection, each with a clear answer and no hang:
no token, a task timeout and the connection's command timeout, a wrong become password, a
become method that needs a terminal, fetching a missing file. One playbook run on one fleet
host covers them all (JSON output, each task asserted on its own)."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from marco.protocol import MAX_LABEL_CHARS
from marco.tokens import TokenSigner
from tests.e2e.conftest import BIN, PLAYBOOKS, Fleet
from tests.support.run import this_run
from tests.support.users import UnixUser
from tests.support.waiting import wait_for

MISSING = "/nonexistent-marco-user-paths/missing.txt"

# Ansible core has no JSON output (that callback lives in ansible.posix): this stdout callback
# prints every task result as one JSON document at the end, the way that one does.
CALLBACK = """
import json
from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "stdout"
    CALLBACK_NAME = "marco_results"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.results = []

    def _keep(self, result, status):
        task = getattr(result, "task", None) or result._task
        answer = getattr(result, "result", None) or result._result
        self.results.append({"task": task.get_name(), "status": status,
                             "result": json.loads(self._dump_results(answer))})

    def v2_runner_on_ok(self, result, **kwargs):
        self._keep(result, "ok")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._keep(result, "failed")

    def v2_runner_on_unreachable(self, result):
        self._keep(result, "unreachable")

    def v2_runner_on_skipped(self, result):
        self._keep(result, "skipped")

    def v2_playbook_on_stats(self, stats):
        self._display.display(json.dumps({"results": self.results}))
"""

PLAYBOOK = f"""
- name: User paths
  hosts: all
  gather_facts: false
  tasks:
    - name: No token
      ansible.builtin.ping:
      vars:
        marco_token: ""
      ignore_unreachable: true
    - name: Task timeout
      ansible.builtin.command: sleep 97
      timeout: 2
      ignore_errors: true
    - name: Command timeout
      ansible.builtin.command: sleep 98
      vars:
        marco_command_timeout: 2
      ignore_errors: true
    - name: Wrong become password
      ansible.builtin.command: id -un
      become: true
      vars:
        marco_token: "{{{{ bob_token }}}}"
        ansible_become_password: not-the-password
      ignore_errors: true
    - name: Become with su and a password
      ansible.builtin.command: id -un
      become: true
      become_method: ansible.builtin.su
      vars:
        ansible_become_password: any-password
      ignore_errors: true
    - name: Become with su and no password
      ansible.builtin.command: id -un
      become: true
      become_method: ansible.builtin.su
      ignore_errors: true
    - name: Fetch a missing file
      ansible.builtin.fetch:
        src: {MISSING}
        dest: "{{{{ fetch_dir }}}}/"
        fail_on_missing: true
      ignore_errors: true
    - name: Fetch a missing file, allowed
      ansible.builtin.fetch:
        src: {MISSING}
        dest: "{{{{ fetch_dir }}}}/"
        fail_on_missing: false
    - name: Still reachable
      ansible.builtin.command: echo still-here

- name: A play whose name is longer than an execution label may be {"x" * 1200}
  hosts: all
  gather_facts: false
  tasks:
    - name: Under a very long play name
      ansible.builtin.command: echo long-name-ok
"""


@pytest.fixture(scope="module")
def sudoers(alice: UnixUser, bob: UnixUser) -> Iterator[Path]:
    """bob may use sudo with his password (so a wrong one is refused by sudo itself)."""
    path = Path(f"{this_run().sudoers}-user-paths")  # tagged: a crashed run's is swept
    path.write_text(f"{bob.name} ALL=(ALL) ALL\n")
    path.chmod(0o440)
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def played(fleet: Fleet, signer: TokenSigner, alice: UnixUser, bob: UnixUser, sudoers: Path,
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The playbook's JSON report, run once on the first fleet host with no MARCO_TOKEN in
    the environment (the token comes from a host variable, which one task empties)."""
    workdir = tmp_path_factory.mktemp("user-paths")
    play = workdir / "user_paths.yml"
    play.write_text(PLAYBOOK)
    (workdir / "callbacks").mkdir()
    (workdir / "callbacks" / "marco_results.py").write_text(CALLBACK)
    fetched = workdir / "fetched"
    agent = fleet.agents[0]
    inventory = workdir / "hosts.json"
    inventory.write_text(json.dumps({"all": {"hosts": {agent.node_name: {
        "ansible_host": agent.host, "ansible_connection": "marco.fleet.marco",
        "marco_token": signer.issue(alice.name), "bob_token": signer.issue(bob.name)}}}}))
    env = {key: value for key, value in fleet.env("").items() if key != "MARCO_TOKEN"}
    assert not (Path(env["HOME"]) / ".config" / "marco" / "token").exists()  # never logged in
    out = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(inventory), str(play),
                          "-e", f"fetch_dir={fetched}"], cwd=PLAYBOOKS,
                         env={**env, "ANSIBLE_STDOUT_CALLBACK": "marco_results",
                              "ANSIBLE_CALLBACK_PLUGINS": str(workdir / "callbacks")},
                         capture_output=True, text=True, timeout=240)
    assert "Traceback" not in out.stdout + out.stderr, out.stderr[-3000:]
    assert out.stdout.startswith("{"), out.stdout[-2000:] + out.stderr[-3000:]
    report: dict[str, Any] = json.loads(out.stdout)
    report["fetched"] = fetched
    return report


def result(report: dict[str, Any], task: str) -> dict[str, Any]:
    """One task's result on the (only) host."""
    for entry in report["results"]:
        if entry["task"] == task:
            return dict(entry["result"], status=entry["status"])
    raise AssertionError(f"no task {task!r} in the report")


def executions(fleet: Fleet, signer: TokenSigner, user: UnixUser, task: str) -> list[dict[str, Any]]:
    """The user's executions for `task` (by their label) on the first fleet host."""
    with fleet.agents[0].client(signer.issue(user.name)) as client:
        return [e for e in client.executions() if f"/ {task} @" in e["label"]]


def ended_by_the_stop(execution: dict[str, Any]) -> bool:
    """Ended by the agent's SIGTERM (or SIGKILL): killed by it, or a shell that exited with
    128 + the signal of its child, which is how `sh -c 'python3 && ...'` reports it when the
    child dies first (a race of the two processes in one group, both signalled). In a warm
    runner the module's own process may also see its command (`sleep`) killed first and exit
    1 itself, reporting the failure, before its signal lands (seen under CI load): a non-zero
    exit there is the stop too (the caller has already seen it end long before `sleep 97`)."""
    fatal = {signal.SIGTERM, signal.SIGKILL}
    if execution["state"] == "killed":
        return execution["signal"] in {s.name for s in fatal}
    if execution["state"] != "exited":
        return False
    if execution.get("via") == "runner" and execution["rc"] not in (0, None):
        return True
    return execution["rc"] in {128 + s for s in fatal}


def test_no_token_is_unreachable_with_the_login_hint(played: dict[str, Any]) -> None:
    answer = result(played, "No token")
    assert answer["status"] == "unreachable", answer
    assert "no Marco token" in answer["msg"] and "marco login" in answer["msg"], answer


def test_task_timeout_fails_the_task_and_stops_the_command(
        played: dict[str, Any], fleet: Fleet, signer: TokenSigner, alice: UnixUser) -> None:
    answer = result(played, "Task timeout")
    assert answer["status"] == "failed" and "Timed out after 2 second" in answer["msg"], answer
    # The task gave up: so must the command on the node, not sleep on for its 97 s.
    ran = executions(fleet, signer, alice, "Task timeout")
    assert ran, "no execution of the task on the node"
    wait_for(lambda: all(e["state"] != "running"
                         for e in executions(fleet, signer, alice, "Task timeout")),
             what=f"the timed-out task's command stopped on the node: {ran}")
    after = executions(fleet, signer, alice, "Task timeout")
    stopped = [e for e in after if e["stopped"]]
    # Each as (id, state, rc, signal, via, runner note): what a failure needs to be read.
    shown = [(e["id"][:8], e["state"], e.get("rc"), e.get("signal"), e.get("via"),
              e.get("runner_note")) for e in after]
    assert stopped and all(ended_by_the_stop(e) for e in stopped), shown


def test_command_timeout_is_enforced_by_the_agent(played: dict[str, Any], fleet: Fleet,
                                                  signer: TokenSigner, alice: UnixUser) -> None:
    answer = result(played, "Command timeout")
    assert answer["status"] == "failed", answer
    assert "ran longer than 2 s and was stopped" in answer["msg"], answer
    ran = executions(fleet, signer, alice, "Command timeout")
    timed_out = [e for e in ran if e["timed_out"]]
    assert len(timed_out) == 1 and ended_by_the_stop(timed_out[0]), ran


def test_wrong_become_password_is_refused_by_sudo(played: dict[str, Any]) -> None:
    answer = result(played, "Wrong become password")
    assert answer["status"] == "failed", answer
    assert "sudo refused the password" in answer["msg"], answer
    assert "not-the-password" not in json.dumps(answer)


def test_a_become_method_that_needs_a_terminal_fails_clearly(played: dict[str, Any]) -> None:
    for task in ("Become with su and a password", "Become with su and no password"):
        answer = result(played, task)
        assert answer["status"] == "failed", answer
        assert "needs a terminal" in answer["msg"] and "use sudo" in answer["msg"], answer


def test_fetching_a_missing_file(played: dict[str, Any]) -> None:
    refused = result(played, "Fetch a missing file")
    assert refused["status"] == "failed", refused
    assert refused["msg"] == "the remote file does not exist, not transferring, ignored", refused
    allowed = result(played, "Fetch a missing file, allowed")
    assert allowed["status"] == "ok" and allowed["changed"] is False, allowed
    assert allowed["file"] == MISSING and "does not exist" in allowed["msg"], allowed
    fetched: Path = played["fetched"]
    assert not fetched.exists() or not any(fetched.rglob("*"))  # nothing, not even a partial file


def test_a_very_long_play_name_is_shortened_in_the_label_not_refused(
        played: dict[str, Any], fleet: Fleet, signer: TokenSigner, alice: UnixUser) -> None:
    answer = result(played, "Under a very long play name")
    assert answer["status"] == "ok" and answer["stdout"] == "long-name-ok", answer
    labels = [e["label"] for e in executions(fleet, signer, alice, "Under a very long play name")]
    assert labels and all(len(label) <= MAX_LABEL_CHARS and "…" in label for label in labels)


def test_the_host_stays_usable_after_every_failure(played: dict[str, Any]) -> None:
    answer = result(played, "Still reachable")
    assert answer["status"] == "ok" and answer["stdout"] == "still-here", answer
