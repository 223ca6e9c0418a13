"""The `marco` CLI against a real controller and agents: login, nodes, status, run, Ctrl-C."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from marco.client import AgentClient
from marco.tokens import TokenSigner
from tests.support.controller_process import ControllerProcess
from tests.support.users import UnixUser
from tests.support.waiting import wait_for

MARCO = Path(sys.executable).parent / "marco"


def marco(home: Path, controller: ControllerProcess, *args: str, stdin: str = "",
          timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "MARCO_CONTROLLER": controller.url}
    if controller.pki is not None:  # the CA is public: users get it with their install
        env["MARCO_TLS_CA"] = str(controller.pki.ca_file)
    return subprocess.run([str(MARCO), *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_login_nodes_status_run(cluster, alice: UnixUser, signer: TokenSigner,
                                tmp_path: Path) -> None:
    controller, names = cluster
    bad = marco(tmp_path, controller, "login", "--user", alice.name, "--password-stdin", stdin="nope\n")
    assert bad.returncode == 1 and "wrong user name or password" in bad.stderr
    assert not (tmp_path / ".config" / "marco" / "token").exists()
    ok = marco(tmp_path, controller, "login", "--user", alice.name, "--password-stdin",
               stdin=alice.password + "\n")
    assert ok.returncode == 0, ok.stderr
    token_file = tmp_path / ".config" / "marco" / "token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert token_file.parent.stat().st_mode & 0o777 == 0o700
    assert signer.verify(token_file.read_text().strip()) == alice.name
    # login also made a key here and got a short-lived client certificate for it
    key_file = token_file.parent / "client.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert "CN=" + alice.name in subprocess.run(
        ["openssl", "x509", "-noout", "-subject", "-in", str(token_file.parent / "client.pem")],
        capture_output=True, text=True).stdout.replace(" ", "")

    nodes = marco(tmp_path, controller, "nodes")
    assert nodes.returncode == 0 and all(name in nodes.stdout for name in names)
    status = marco(tmp_path, controller, "status")
    assert status.returncode == 0 and all(name in status.stdout for name in names)
    assert "GiB" in status.stdout

    run = marco(tmp_path, controller, "run", "--nodes", ",".join(names), "--",
                "echo hi from $(id -un); echo oops >&2; exit 3")
    assert run.returncode == 1
    for name in names:
        assert f"| hi from {alice.name}" in run.stdout and name in run.stdout
        assert "! oops" in run.stderr
    assert "FAILED" in run.stderr and all(f"{name}=3" in run.stderr for name in names)
    nobody = marco(tmp_path, controller, "run", "--nodes", "no-such-node", "--", "true")
    assert nobody.returncode == 2 and "unknown node(s): no-such-node" in nobody.stderr  # usage


def test_ctrl_c_stops_the_remote_executions(cluster, alice: UnixUser, signer: TokenSigner,
                                            tmp_path: Path, pki) -> None:
    controller, names = cluster
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "MARCO_CONTROLLER": controller.url,
           "MARCO_TOKEN": signer.issue(alice.name), "PYTHONUNBUFFERED": "1",
           **pki.client_env()}
    process = subprocess.Popen([str(MARCO), "run", "--", "echo started; sleep 600"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    seen = 0
    deadline = time.monotonic() + 30
    while seen < len(names) and time.monotonic() < deadline:
        if "started" in process.stdout.readline():
            seen += 1
    assert seen == len(names)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 1 and "SIGTERM" in err, err
    inventory = controller.get_json("/api/inventory", signer.issue(alice.name))["_meta"]["hostvars"]
    for name in names:
        host = inventory[name]
        with AgentClient(host["ansible_host"], host["ansible_port"], signer.issue(alice.name),
                         tls=pki.client_tls(), node=name) as client:
            sleeping = [e for e in client.executions() if e["command"] == "echo started; sleep 600"]
        assert sleeping and all(e["state"] == "killed" and e["stopped"] for e in sleeping)


def marco_at(home: Path, url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The CLI with only HOME, the controller URL and `env`: no stored login unless made."""
    return subprocess.run([str(MARCO), *args], capture_output=True, text=True, timeout=60,
                          input="", env={"PATH": os.environ["PATH"], "HOME": str(home),
                                         "MARCO_CONTROLLER": url, **env})


def one_clear_line(out: subprocess.CompletedProcess[str]) -> str:
    """A refusal: exit 1, one `marco: ...` line on stderr, no traceback."""
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stderr.startswith("marco: ") and out.stderr.count("\n") == 1, out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    return out.stderr


@pytest.fixture
def refusing_url() -> Iterator[str]:
    """An https URL on a port bound but not listening: every connection is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"https://127.0.0.1:{sock.getsockname()[1]}"


def test_not_logged_in_says_to_log_in(start_controller, tmp_path: Path) -> None:
    controller = start_controller()
    ca = {"MARCO_TLS_CA": str(controller.ca_file)}
    for command in (["nodes"], ["status"], ["run", "--", "true"], ["logout", "--everywhere"]):
        line = one_clear_line(marco_at(tmp_path, controller.url, *command, **ca))
        assert "no Marco token" in line and "marco login" in line, (command, line)
    # A plain logout with nothing stored has nothing to void: it says so, and succeeds.
    out = marco_at(tmp_path, controller.url, "logout", **ca)
    assert out.returncode == 0 and out.stdout == "not logged in\n" and out.stderr == "", out


def test_an_unreachable_controller_is_one_clear_line(refusing_url: str, signer: TokenSigner,
                                                     alice: UnixUser, tmp_path: Path,
                                                     pki) -> None:
    env = {"MARCO_TOKEN": signer.issue(alice.name), **pki.client_env()}
    for command in (["nodes"], ["status"], ["run", "--", "true"], ["logout", "--everywhere"]):
        line = one_clear_line(marco_at(tmp_path, refusing_url, *command, **env))
        assert f"cannot reach the controller at {refusing_url}" in line, (command, line)
        assert "Connection refused" in line, line
    login = marco_at(tmp_path, refusing_url, "login", "--password-stdin", **pki.client_env())
    assert f"cannot reach the controller at {refusing_url}" in one_clear_line(login)
    assert not (tmp_path / ".config" / "marco").exists()  # nothing stored
    # No CA to trust an https controller with: the fix, not an SSL error.
    line = one_clear_line(marco_at(tmp_path, refusing_url, "nodes",
                                   MARCO_TOKEN=env["MARCO_TOKEN"]))
    assert "give its CA" in line and "MARCO_TLS_CA" in line, line


def test_logout_with_the_controller_unreachable_forgets_the_token(
        refusing_url: str, signer: TokenSigner, alice: UnixUser, tmp_path: Path, pki) -> None:
    stored = tmp_path / ".config" / "marco" / "token"
    stored.parent.mkdir(parents=True)
    stored.write_text(signer.issue(alice.name) + "\n")
    out = marco_at(tmp_path, refusing_url, "logout", **pki.client_env())
    assert out.returncode == 0 and out.stdout == "logged out\n", out
    assert f"could not void the token at {refusing_url}" in out.stderr
    assert "stays valid on the nodes until it expires" in out.stderr
    assert "Traceback" not in out.stderr and not stored.exists()


# -- issue 12: --version, --json, exit codes, runs and their logs ---------------------------------

def logged_in(home: Path, controller: ControllerProcess, user: UnixUser) -> Path:
    """`home` where `marco login` stored `user`'s token and client certificate."""
    home.mkdir(exist_ok=True)
    out = marco(home, controller, "login", "--user", user.name, "--password-stdin",
                stdin=user.password + "\n")
    assert out.returncode == 0, out.stderr
    return home


def test_version_is_the_installed_packages(tmp_path: Path) -> None:
    out = subprocess.run([str(MARCO), "--version"], capture_output=True, text=True, timeout=60,
                         env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    assert out.returncode == 0 and out.stderr == "", out
    assert out.stdout == f"marco {importlib.metadata.version('marco')}\n"


def test_status_json_and_exit_codes(cluster, alice: UnixUser, start_agent, unique_name,
                                    signer: TokenSigner, tmp_path: Path) -> None:
    controller, names = cluster
    home = logged_in(tmp_path / "alice", controller, alice)
    status = marco(home, controller, "status", "--json")
    assert status.returncode == 0, status.stderr
    listed = {entry["name"]: entry for entry in json.loads(status.stdout)}
    assert set(names) <= set(listed)
    for name in names:
        assert listed[name]["ok"] and listed[name]["error"] is None
        assert listed[name]["status"]["cpu"]["count"] >= 1  # the agent's own status

    failed = marco(home, controller, "run", "--nodes", names[0], "--", "false")
    assert failed.returncode == 1 and f"FAILED: {names[0]}=1" in failed.stderr, failed.stderr
    assert marco(home, controller, "run", "--nodes", names[0], "--", "true").returncode == 0
    usage = marco(home, controller, "run", "--nodes", names[0])  # no command
    assert usage.returncode == 2 and "give the command" in usage.stderr, usage.stderr

    # A node the controller knows and sees down: 4, and the others still run.
    gone = start_agent(unique_name("gone"), announce=True)
    token = signer.issue(alice.name)
    wait_for(lambda: gone.node_name in controller.inventory_hosts(token), what="gone discovered")
    gone.stop(signal.SIGKILL)  # no goodbye: the controller keeps it, and its probes fail
    wait_for(lambda: {n["name"]: n["alive"] for n in controller.get_json("/api/nodes", token)[
        "nodes"]}.get(gone.node_name) is False, what="the controller to see it down")
    down = marco(home, controller, "run", "--json", "--nodes", f"{names[0]},{gone.node_name}",
                 "--", "exit 3")
    assert down.returncode == 4, down.stdout + down.stderr
    document = json.loads(down.stdout)
    assert document["status"] == "unreachable"
    assert document["nodes"][names[0]]["status"] == "failed"
    assert document["nodes"][names[0]]["rc"] == 3
    assert document["nodes"][gone.node_name]["status"] == "unreachable"
    assert document["nodes"][gone.node_name]["code"] == "unreachable"
    status_down = marco(home, controller, "status", "--json", names[0], gone.node_name)
    assert status_down.returncode == 4, status_down.stderr
    entries = {e["name"]: e for e in json.loads(status_down.stdout)}
    assert entries[names[0]]["ok"] and not entries[gone.node_name]["ok"]
    assert entries[gone.node_name]["error"]["error"] == "unreachable"


RUN_LINE = re.compile(r"^run (r[0-9a-f]{20})  (\S+)$", re.M)
LINES = ["héllo ✓ ünïcode", "  two  spaces\tand a tab", ""]  # printed exactly, on stdout
ERROR_LINE = "ërror on stderr"


def printed_lines(host: str) -> list[str]:
    """What `marco logs` prints of LINES and ERROR_LINE run on `host`."""
    return [f"{host} | {line}" for line in LINES] + [f"{host} ! {ERROR_LINE}"]


def test_a_run_is_listed_and_its_logs_are_exact(cluster, alice: UnixUser, bob: UnixUser,
                                                tmp_path: Path) -> None:
    controller, names = cluster
    home = logged_in(tmp_path / "alice", controller, alice)
    command = "printf '%s\\n' " + " ".join(shlex.quote(line) for line in LINES) \
        + f"; echo {shlex.quote(ERROR_LINE)} >&2"
    run = marco(home, controller, "run", "--nodes", ",".join(names), "--", command)
    assert run.returncode == 0, run.stderr
    found = RUN_LINE.search(run.stderr)
    assert found, run.stderr
    run_id, url = found.groups()
    assert url == f"{controller.url}/runs/{run_id}"

    listed = marco(home, controller, "runs", "--json")
    assert listed.returncode == 0, listed.stderr
    mine = {r["id"]: r for r in json.loads(listed.stdout)}
    assert mine[run_id]["kind"] == "command" and mine[run_id]["title"] == command
    assert mine[run_id]["owner"] == alice.name and mine[run_id]["hosts"] == names
    table = marco(home, controller, "runs", "--kind", "command")
    assert table.stdout.startswith("RUN "), table
    assert re.search(rf"^{run_id}\s+(running|ok)\s+command\s", table.stdout, re.M), table
    # The header and one run (ids sort by start second, then at random: not necessarily ours).
    assert len(marco(home, controller, "runs", "--limit", "1").stdout.splitlines()) == 2
    other_kind = marco(home, controller, "runs", "--json", "--kind", "playbook")
    assert run_id not in other_kind.stdout

    logs = marco(home, controller, "logs", run_id)
    assert logs.returncode == 0 and logs.stderr == "", logs.stderr
    expected = [line for name in names for line in printed_lines(name)]
    assert sorted(logs.stdout.split("\n")[:-1]) == sorted(expected), logs.stdout
    one = marco(home, controller, "logs", run_id, "--host", names[1])
    assert sorted(one.stdout.split("\n")[:-1]) == sorted(printed_lines(names[1])), one.stdout

    # Bob: another user's run is a clear 404 and is not in his list.
    bob_home = logged_in(tmp_path / "bob", controller, bob)
    refused = one_clear_line(marco(bob_home, controller, "logs", run_id))
    assert "404" in refused and run_id in refused, refused
    assert run_id not in marco(bob_home, controller, "runs", "--json").stdout
    assert "not a run id" in marco(bob_home, controller, "logs", "r123").stderr


def test_run_json_and_logs_follow(cluster, alice: UnixUser, tmp_path: Path) -> None:
    controller, names = cluster
    home = logged_in(tmp_path / "alice", controller, alice)
    gate = Path(tempfile.mkdtemp(prefix="marco-gate-"))  # alice's command waits for a file here
    os.chmod(gate, 0o755)
    command = f"echo first; while [ ! -e {gate}/go ]; do sleep 0.05; done; echo second; exit 5"
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "MARCO_CONTROLLER": controller.url,
           "MARCO_TLS_CA": str(controller.ca_file), "PYTHONUNBUFFERED": "1"}
    earlier = set(run_ids(home, controller))
    started: list[subprocess.Popen[str]] = []
    try:
        started.append(subprocess.Popen([str(MARCO), "run", "--json", "--nodes", names[0], "--",
                                         command], env=env, stdout=subprocess.PIPE, text=True))
        run_id = wait_for(lambda: next(iter(set(run_ids(home, controller)) - earlier), None),
                          what="the new run listed")
        started.append(subprocess.Popen([str(MARCO), "logs", "--follow", run_id], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True))
        running, follow = started
        assert follow.stdout is not None
        assert follow.stdout.readline() == f"{names[0]} | first\n"  # live, before the end
        (gate / "go").touch()
        rest, err = follow.communicate(timeout=60)
        assert follow.returncode == 0 and rest == f"{names[0]} | second\n", (rest, err)
        document, _ = running.communicate(timeout=60)
    finally:
        for process in started:  # a failed assert leaves them running
            if process.poll() is None:
                process.kill()
                process.wait()
        shutil.rmtree(gate)
    assert running.returncode == 1
    # --follow reads the run only for its end: one event per look, never a page of them.
    looks = re.findall(rf"GET /api/runs/{run_id}(\?\S*)? ", controller.log())
    assert looks and all(query == "?limit=1" for query in looks), looks
    result = json.loads(document)
    assert result["run"]["id"] == run_id and result["status"] == "failed"
    assert result["nodes"][names[0]]["rc"] == 5
    assert result["nodes"][names[0]]["execution_id"]


def run_ids(home: Path, controller: ControllerProcess) -> list[str]:
    """The ids of the caller's runs, newest first."""
    listed = marco(home, controller, "runs", "--json", "--limit", "1000")
    assert listed.returncode == 0, listed.stderr
    return [run["id"] for run in json.loads(listed.stdout)]


def test_logs_print_a_long_output_once_in_order(cluster, alice: UnixUser,
                                                tmp_path: Path) -> None:
    """12,000 lines: more than one page of the output API (5,000 lines); `marco logs` and
    `marco logs --follow` print every line exactly once, in order."""
    controller, names = cluster
    home = logged_in(tmp_path / "alice", controller, alice)
    run = marco(home, controller, "run", "--nodes", names[0], "--", "seq 1 12000")
    assert run.returncode == 0, run.stderr
    found = RUN_LINE.search(run.stderr)
    assert found, run.stderr
    expected = [f"{names[0]} | {n}" for n in range(1, 12001)]
    for args in (["logs", found.group(1)], ["logs", "--follow", found.group(1)]):
        logs = marco(home, controller, *args)
        assert logs.returncode == 0 and logs.stderr == "", logs.stderr
        assert logs.stdout.splitlines() == expected, args


def test_logs_read_every_page_of_executions(start_agent, start_controller, alice: UnixUser,
                                            signer: TokenSigner, unique_name,
                                            tmp_path: Path) -> None:
    """A run with more executions than one answer of GET .../executions gives
    (runs_executions_page 1 here, 5,000 by default): `marco logs` reads on from `offset`
    while `more`, and prints every node's lines."""
    agents = [start_agent(node_name=unique_name("page")) for _ in range(2)]
    controller = start_controller(extra_args=[
        "--no-discovery", "--runs-executions-page", "1",
        *(arg for a in agents for arg in ("--node", f"{a.node_name}={a.host}:{a.port}"))])
    names = sorted(a.node_name for a in agents)
    token = signer.issue(alice.name)
    wait_for(lambda: set(names) <= set(controller.inventory_hosts(token)), what="nodes alive")
    home = logged_in(tmp_path / "alice", controller, alice)
    run = marco(home, controller, "run", "--nodes", ",".join(names), "--", "echo hello")
    assert run.returncode == 0, run.stderr
    found = RUN_LINE.search(run.stderr)
    assert found, run.stderr
    logs = marco(home, controller, "logs", found.group(1))
    assert logs.returncode == 0, logs.stderr
    assert sorted(logs.stdout.splitlines()) == [f"{name} | hello" for name in names]
