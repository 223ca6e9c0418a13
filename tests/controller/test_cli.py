"""The marco-controller command line: help, refusals with one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from marco.client import AgentClient
from marco.tls import ClientTls
from marco.tokens import TokenSigner
from tests.support.paths import ROOT
from tests.support.pki import TestPki
from tests.support.users import UnixUser


def controller_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "controller", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env=dict(os.environ))


def test_help_lists_the_options() -> None:
    out = controller_cli("--help")
    assert out.returncode == 0
    for flag in ("--bind", "--port", "--secret-file", "--pam-service", "--mdns-interface",
                 "--node", "--token-max-age", "--config", "MARCO_PAM_SERVICE"):
        assert flag in out.stdout


def test_refuses_su_and_a_missing_secret(secret_file: Path, tmp_path: Path) -> None:
    out = controller_cli("--secret-file", str(secret_file), "--pam-service", "su", "--dev")
    assert out.returncode == 2 and "lets root in" in out.stderr and out.stderr.count("\n") == 1
    out = controller_cli("--secret-file", str(tmp_path / "none"))
    assert out.returncode == 2 and "does not exist" in out.stderr
    out = controller_cli("--secret-file", str(secret_file), "--node", "host:notaport", "--dev")
    assert out.returncode == 2 and "port must be a number" in out.stderr


def test_no_cluster_ca_and_dev_mode_off_loopback_are_refused(secret_file: Path,
                                                             tmp_path: Path) -> None:
    out = controller_cli("--secret-file", str(secret_file), "--pki-dir", str(tmp_path / "none"))
    assert out.returncode == 2 and "marco-controller init" in out.stderr
    out = controller_cli("--secret-file", str(secret_file), "--dev", "--bind", "0.0.0.0")
    assert out.returncode == 2 and "loopback" in out.stderr and out.stderr.count("\n") == 1


def test_admin_commands_make_a_cluster_issue_and_revoke(tmp_path: Path) -> None:
    """init -> CA, secret, controller certificate; issue-agent -> a bundle an agent starts
    with; revoke-cert -> the serial is in the CRL; list-certs shows it."""
    pki, secret = tmp_path / "pki", tmp_path / "secret"
    common = ("--pki-dir", str(pki), "--secret-file", str(secret))
    out = controller_cli(*common, "init", "--name", "192.0.2.7")
    assert out.returncode == 0, out.stderr
    assert secret.stat().st_mode & 0o777 == 0o600 and (pki / "ca.key").stat().st_mode & 0o777 == 0o600
    san = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in",
                          str(pki / "controller.pem")], capture_output=True, text=True).stdout
    assert "192.0.2.7" in san and "127.0.0.1" in san
    again = controller_cli(*common, "init")
    assert again.returncode == 2 and "already holds a CA" in again.stderr

    bundle = tmp_path / "web1.marco"
    out = controller_cli(*common, "issue-agent", "web1", "--out", str(bundle))
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in bundle.iterdir()) == ["agent.key", "agent.pem", "ca.pem",
                                                        "crl.pem", "secret"]
    assert (bundle / "agent.key").stat().st_mode & 0o777 == 0o600
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(pki / "ca.pem"),
                               str(bundle / "agent.pem")], capture_output=True, text=True)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    bad = controller_cli(*common, "issue-agent", "../etc", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "letters, digits" in bad.stderr

    out = controller_cli(*common, "revoke-cert", "web1")
    assert out.returncode == 0, out.stderr
    crl = subprocess.run(["openssl", "crl", "-noout", "-text", "-in", str(pki / "crl.pem")],
                         capture_output=True, text=True).stdout
    serial = subprocess.run(["openssl", "x509", "-noout", "-serial", "-in",
                             str(bundle / "agent.pem")], capture_output=True, text=True).stdout
    assert serial.split("=")[1].strip().lstrip("0") in crl.replace(" ", "").upper()
    listing = controller_cli(*common, "list-certs").stdout
    assert "web1" in listing and "revoked" in listing and "marco-controller" in listing

    # The controller's certificate renews with its names kept.
    before = (pki / "controller.pem").read_bytes()
    out = controller_cli(*common, "renew-controller", "--name", "marco.example.org")
    assert out.returncode == 0, out.stderr
    assert (pki / "controller.pem").read_bytes() != before
    san = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in",
                          str(pki / "controller.pem")], capture_output=True, text=True).stdout
    assert "192.0.2.7" in san and "marco.example.org" in san

    # A bundle never goes through a symlink nor into a directory others can read.
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "trap").symlink_to(tmp_path / "elsewhere")
    out = controller_cli(*common, "issue-agent", "web2", "--out", str(tmp_path / "trap"))
    assert out.returncode == 2 and "symbolic link" in out.stderr
    (tmp_path / "open").mkdir(mode=0o755)
    (tmp_path / "open").chmod(0o755)
    out = controller_cli(*common, "issue-agent", "web2", "--out", str(tmp_path / "open"))
    assert out.returncode == 2 and "0700" in out.stderr
    assert not any((tmp_path / "elsewhere").iterdir()) and not any((tmp_path / "open").iterdir())


def test_an_issue_client_bundle_is_a_client_identity_agents_accept(
        start_agent, pki: TestPki, signer: TokenSigner, alice: UnixUser, tmp_path: Path,
        unique_name) -> None:
    """What `issue-client` writes is enough for mutual TLS with a real agent of the cluster."""
    name = unique_name("robot")
    out = tmp_path / "robot.marco"
    done = controller_cli("--pki-dir", str(pki.dir), "issue-client", name, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["ca.pem", "client.key", "client.pem", "crl.pem"]
    assert (out / "client.key").stat().st_mode & 0o777 == 0o600
    robot = ClientTls(str(out / "ca.pem"), str(out / "client.pem"), str(out / "client.key"),
                      str(out / "crl.pem"))
    agent = start_agent(node_name=unique_name("ic"))
    with AgentClient(agent.host, agent.port, signer.issue(alice.name), node=agent.node_name,
                     tls=robot) as client:
        answer = client.run(["id", "-un"])
    assert answer.rc == 0 and answer.stdout.decode().strip() == alice.name
    listing = controller_cli("--pki-dir", str(pki.dir), "list-certs").stdout.splitlines()
    assert [line.split()[:2] for line in listing if line.startswith(name)] == [[name, "client"]]


def test_issue_client_refuses_bad_input_with_one_line(tmp_path: Path) -> None:
    pki, secret = tmp_path / "pki", tmp_path / "secret"
    common = ("--pki-dir", str(pki), "--secret-file", str(secret))
    no_ca = controller_cli(*common, "issue-client", "robot", "--out", str(tmp_path / "x"))
    assert no_ca.returncode == 2 and "marco-controller init" in no_ca.stderr
    assert controller_cli(*common, "init").returncode == 0
    bad = controller_cli(*common, "issue-client", "robot/../x", "--out", str(tmp_path / "b"))
    assert bad.returncode == 2 and "letters, digits" in bad.stderr and bad.stderr.count("\n") == 1
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    out = controller_cli(*common, "issue-client", "robot", "--out", str(a_file))
    assert out.returncode == 2 and out.stderr == (f"marco-controller: {a_file} exists and is not "
                                                  "a directory: give a directory for the bundle\n")
    assert a_file.read_text() == "keep me"
    first = tmp_path / "robot.marco"
    assert controller_cli(*common, "issue-client", "robot", "--out", str(first)).returncode == 0
    key = (first / "client.key").read_bytes()
    again = controller_cli(*common, "issue-client", "robot2", "--out", str(first))
    assert again.returncode == 2 and "already holds a bundle" in again.stderr, again.stderr
    assert again.stderr.count("\n") == 1 and (first / "client.key").read_bytes() == key
    for out in (no_ca, bad, again):
        assert "Traceback" not in out.stderr
