"""Mutual TLS on a real agent: who gets in and who does not, with the errors people see."""

from __future__ import annotations

import asyncio
import datetime
import shutil
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from controller.pki import ClusterPki
from marco.client import AgentClient
from marco.errors import CertificateRefused
from marco.tls import ClientTls, describe_tls_error
from marco.tokens import SERVICE_MAX_AGE, SERVICE_SALT, TokenSigner, load_secret
from tests.support.agent_process import AgentProcess
from tests.support.daemon import ROOT
from tests.support.pki import TestPki
from tests.support.users import UnixUser
from tests.support.waiting import wait_for


def _described(error: ssl.SSLError, what: str) -> str:
    refused = describe_tls_error(error, what)
    assert refused is not None, f"{error!r} not recognised as a refusal"
    return refused.message


def handshake(agent: AgentProcess, context: ssl.SSLContext) -> bytes:
    """Open TLS with `context` and ask for /v1/health; the agent's answer, or the error."""
    with socket.create_connection((agent.host, agent.port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=agent.node_name) as sock:
            # TLS 1.3: a refused client certificate shows up as an alert after the handshake.
            # Read it before sending anything: a request the agent never reads would turn its
            # close into a reset that can overtake the alert.
            sock.settimeout(1.0)
            try:
                early = sock.recv(65536)
            except TimeoutError:  # nothing came: the certificate was accepted
                early = b""
            sock.settimeout(10)
            if early:
                return early
            sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return sock.recv(65536)


def push_crl(agent: AgentProcess, pki: TestPki, pem: bytes) -> dict[str, Any]:
    """PUT /v1/crl as the controller sends it (its certificate, the service token)."""
    service = TokenSigner(load_secret(agent.secret_file), SERVICE_MAX_AGE,
                          salt=SERVICE_SALT).issue("controller")
    controller = ClientTls(str(pki.ca_file), str(pki.controller_cert), str(pki.controller_key))
    return asyncio.run(agent.async_client(service, tls=controller).push_crl(pem))


def trusting(pki: ClusterPki) -> ssl.SSLContext:
    """A client context that trusts the cluster CA and presents no certificate."""
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    return context


def test_clients_without_a_good_certificate_are_refused(shared_agent: AgentProcess, pki: TestPki,
                                                        tmp_path: Path) -> None:
    # The test client's own certificate works.
    assert handshake(shared_agent, pki.client_tls().context_for("shared")).startswith(b"HTTP/1.1 200")

    # No certificate at all.
    with pytest.raises(ssl.SSLError) as none:
        handshake(shared_agent, trusting(pki))
    assert "requires a client certificate" in _described(none.value, "agent")

    # A certificate from another CA (a foreign cluster, or self-made).
    foreign = ClusterPki(tmp_path / "foreign")
    foreign.init()
    bundle = foreign.issue("intruder", "client", out_dir=tmp_path / "intruder")
    context = trusting(pki)
    context.load_cert_chain(bundle.cert_file, bundle.key_file)
    with pytest.raises(ssl.SSLError) as other_ca:
        handshake(shared_agent, context)
    assert "not from its CA" in _described(other_ca.value, "agent")

    # An agent's certificate is not a client certificate (extended key usage).
    node = pki.agent_bundle("shared")
    context = trusting(pki)
    context.load_cert_chain(node / "agent.pem", node / "agent.key")
    with pytest.raises(ssl.SSLError) as wrong_kind:
        handshake(shared_agent, context)
    assert "UNSUPPORTED_CERTIFICATE" in str(wrong_kind.value), wrong_kind.value


def test_expired_client_certificates_are_refused_by_both_sides(shared_agent: AgentProcess,
                                                               pki: TestPki, tmp_path: Path) -> None:
    bundle = pki.issue_expired("short-lived", "client", out_dir=tmp_path / "short")
    # Our own client, refused, looks at its certificate and says what to do.
    stale = ClientTls(str(pki.ca_file), str(bundle.cert_file), str(bundle.key_file))
    with pytest.raises(CertificateRefused, match=r"client certificate .* expired on .*marco login"):
        AgentClient(shared_agent.host, shared_agent.port, "t", tls=stale, node="shared").health()
    # An agent refuses it too (a client that did not check).
    context = trusting(pki)
    context.load_cert_chain(bundle.cert_file, bundle.key_file)
    with pytest.raises(ssl.SSLError) as expired:
        handshake(shared_agent, context)
    assert "expired" in _described(expired.value, "agent")


def test_a_revoked_client_certificate_is_refused_once_the_crl_changes(
        start_agent, pki: TestPki, signer: TokenSigner, alice: UnixUser, tmp_path: Path) -> None:
    agent = start_agent(node_name="crl-node")
    bundle = pki.issue("laptop-7", "client", out_dir=tmp_path / "laptop")
    laptop = ClientTls(str(pki.ca_file), str(bundle.cert_file), str(bundle.key_file))
    client = AgentClient(agent.host, agent.port, signer.issue(alice.name), tls=laptop,
                         node="crl-node")
    assert client.run(["true"]).rc == 0
    client.close()
    pki.revoke("laptop-7")  # rewrites the CA's crl.pem; an admin copies it to the node,
    shutil.copyfile(pki.crl_file, pki.agent_bundle("crl-node") / "crl.pem")
    # which the agent notices on its next look at its TLS files (every 5 s) and logs.
    wait_for(lambda: "TLS files changed" in agent.log(), timeout=15,
             what="the agent to reload its TLS files")
    with pytest.raises(CertificateRefused) as refused:
        AgentClient(agent.host, agent.port, "t", tls=laptop, node="crl-node").health()
    # Our client sends its request at once, so the agent's alert may be lost in the TLS 1.3
    # race; the handshake helper reads the alert first, and it says "revoked".
    assert "revoked" in refused.value.message or "refused our client certificate" in \
        refused.value.message, refused.value.message
    context = trusting(pki)
    context.load_cert_chain(bundle.cert_file, bundle.key_file)
    with pytest.raises(ssl.SSLError) as alert:
        handshake(agent, context)
    assert "revoked" in _described(alert.value, "agent")
    # Everyone else still gets in.
    assert agent.client(signer.issue(alice.name)).run(["true"]).rc == 0


def test_clients_refuse_an_expired_or_misnamed_agent(start_agent, pki: TestPki,
                                                     tmp_path: Path) -> None:
    agent = start_agent(node_name="named-right")
    with pytest.raises(CertificateRefused, match="not valid for 'someone-else'"):
        AgentClient(agent.host, agent.port, "t", tls=pki.client_tls(), node="someone-else").health()

    bundle = pki.issue("fading", "agent", out_dir=tmp_path / "fading")
    fading = start_agent(node_name="fading", extra_args=[
        "--tls-cert", str(bundle.cert_file), "--tls-key", str(bundle.key_file)])
    assert fading.client("t").health()
    # Its certificate file is replaced by one that expired yesterday (same key). A CRL push
    # makes the agent reload its TLS files at once (else it looks every 5 s), certificate too.
    now = datetime.datetime.now(datetime.UTC)
    pki.redate(bundle, now - datetime.timedelta(days=2), now - datetime.timedelta(days=1))
    held = x509.load_pem_x509_crl((pki.agent_bundle("fading") / "crl.pem").read_bytes())
    assert push_crl(fading, pki, pki.crl_dated(held.last_update_utc
                                               + datetime.timedelta(seconds=1)))["updated"]
    assert "TLS files changed" in fading.log()
    with pytest.raises(CertificateRefused, match="certificate has expired"):
        fading.client("t").health()


def test_an_agent_needs_its_certificate_unless_in_loopback_dev_mode(secret_file: Path,
                                                                    tmp_path: Path) -> None:
    def agent_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "agent", "--secret-file", str(secret_file),
                               "--state-dir", str(tmp_path / "state"), "--no-announce", *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)

    out = agent_cli("--tls-cert", str(tmp_path / "missing.pem"))
    assert out.returncode == 2 and "missing.pem does not exist" in out.stderr
    out = agent_cli("--dev", "--bind", "0.0.0.0")
    assert out.returncode == 2 and "only binds a loopback address" in out.stderr


def test_dev_mode_says_so_loudly(start_agent) -> None:
    agent = start_agent(node_name="dev-node", pki=None)
    assert agent.url.startswith("http://")
    assert "DEVELOPMENT MODE" in agent.log()


def test_crl_pushes_need_the_controller_and_the_cluster_ca(shared_agent: AgentProcess,
                                                           pki: TestPki, signer: TokenSigner,
                                                           alice: UnixUser, tmp_path: Path) -> None:
    from marco.errors import AuthenticationError, BadRequest, Conflict, PermissionDenied

    service = TokenSigner(load_secret(shared_agent.secret_file), SERVICE_MAX_AGE,
                          salt=SERVICE_SALT).issue("controller")
    foreign = ClusterPki(tmp_path / "foreign")
    foreign.init()

    controller = ClientTls(str(pki.ca_file), str(pki.controller_cert), str(pki.controller_key))

    async def push(token: str, pem: bytes, tls: ClientTls = controller) -> dict:
        return await shared_agent.async_client(token, tls=tls).push_crl(pem)

    # CRLs a second older and newer than the one the agent holds (CRL times have one-second
    # precision; product CRLs are dated 5 minutes back, so the newer one is not in the future).
    held = x509.load_pem_x509_crl((pki.agent_bundle("shared") / "crl.pem").read_bytes())
    older = pki.crl_dated(held.last_update_utc - datetime.timedelta(seconds=1))
    newer = pki.crl_dated(held.last_update_utc + datetime.timedelta(seconds=1))
    with pytest.raises(AuthenticationError):  # a user's token is not the controller's
        asyncio.run(push(signer.issue(alice.name), newer))
    with pytest.raises(PermissionDenied):  # nor is a node's or user's certificate
        asyncio.run(push(service, newer, pki.client_tls()))
    with pytest.raises(BadRequest, match="not signed by this cluster's CA"):
        asyncio.run(push(service, foreign.crl_file.read_bytes()))
    with pytest.raises(BadRequest, match="not a PEM"):
        asyncio.run(push(service, b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n"))
    assert asyncio.run(push(service, newer))["updated"] is True
    assert asyncio.run(push(service, newer))["updated"] is False
    with pytest.raises(Conflict):
        asyncio.run(push(service, older))  # an older CRL never replaces a newer one
