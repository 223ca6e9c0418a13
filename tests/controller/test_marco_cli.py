"""The `marco` CLI against a real controller and agents: login, nodes, status, run, Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from marco.client import AgentClient
from marco.tokens import TokenSigner
from tests.support.controller_process import ControllerProcess
from tests.support.users import UnixUser

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
    assert nobody.returncode == 1 and "no-such-node" in nobody.stderr


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
