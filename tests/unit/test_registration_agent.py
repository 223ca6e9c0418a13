"""The agent's side of registration (issue 15): whom it registers with."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent.__main__ import build_parser, load_config
from agent.config import AgentConfig
from agent.register import JITTER, ControllerLink, Registrar, controller_address, jittered
from marco.errors import AgentUnreachable, ConfigError
from marco.tls import ServerTlsFiles
from tests.support.pki import TestPki


class Challenge(BaseHTTPRequestHandler):
    """Answers every request as a controller would answer the challenge request."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._answer()

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._answer()

    def _answer(self) -> None:
        body = b'{"nonce": "1.2.3", "ttl": 30, "registered": true, "listed": true}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return TestPki(tmp_path_factory.mktemp("register-agent") / "pki")


def serve(cert_file: Path, key_file: Path, ca_file: Path) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Challenge)
    context = ServerTlsFiles(str(cert_file), str(key_file), str(ca_file),
                             require_client_cert=False).context()
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def controller_url(pki: TestPki) -> Iterator[str]:
    """A server with the controller's certificate (OU=controller, names 127.0.0.1)."""
    yield from serve(pki.controller_cert, pki.controller_key, pki.ca_file)


@pytest.fixture
def impostor_url(pki: TestPki, tmp_path: Path) -> Iterator[str]:
    """A server with a node certificate of the cluster that names 127.0.0.1 (OU=agent)."""
    bundle = pki.issue("127.0.0.1", "agent", out_dir=tmp_path / "impostor")
    yield from serve(bundle.cert_file, bundle.key_file, pki.ca_file)


def test_the_agent_registers_with_the_clusters_controller(pki: TestPki,
                                                          controller_url: str) -> None:
    link = ControllerLink(controller_url, str(pki.ca_file), str(pki.crl_file))
    assert link.exchange(lambda nonce: {"nonce": nonce})["listed"] is True


def test_a_node_certificate_naming_the_controllers_host_is_not_the_controller(
        pki: TestPki, impostor_url: str) -> None:
    link = ControllerLink(impostor_url, str(pki.ca_file), str(pki.crl_file))
    with pytest.raises(AgentUnreachable, match="not the controller's"):
        link.exchange(lambda nonce: {"nonce": nonce})


def test_a_controller_of_another_cluster_is_refused(tmp_path: Path,
                                                   controller_url: str) -> None:
    other = TestPki(tmp_path / "other")
    link = ControllerLink(controller_url, str(other.ca_file), str(other.crl_file))
    with pytest.raises(AgentUnreachable, match="not issued by this cluster's CA"):
        link.exchange(lambda nonce: {"nonce": nonce})


@pytest.fixture
def web_cert_url(tmp_path: Path) -> Iterator[str]:
    """A controller's web port with --web-cert: a certificate of another CA (a public one)."""
    public = TestPki(tmp_path / "public")
    yield from serve(public.controller_cert, public.controller_key, public.ca_file)


def test_a_web_certificate_not_from_the_cluster_ca_is_named_as_the_likely_cause(
        pki: TestPki, web_cert_url: str) -> None:
    link = ControllerLink(web_cert_url, str(pki.ca_file), str(pki.crl_file))
    with pytest.raises(AgentUnreachable, match=r"not from the cluster CA \(--web-cert\?\)"):
        link.exchange(lambda nonce: {"nonce": nonce})


def test_the_clusters_certificate_not_naming_the_host_is_no_web_cert_case(
        pki: TestPki, controller_url: str) -> None:
    port = controller_url.rsplit(":", 1)[1]
    link = ControllerLink(f"https://127.1:{port}", str(pki.ca_file), str(pki.crl_file))
    with pytest.raises(AgentUnreachable, match="mismatch") as refused:
        link.exchange(lambda nonce: {"nonce": nonce})
    assert "--web-cert" not in refused.value.message


def agent_config(*argv: str, environ: dict[str, str] | None = None) -> AgentConfig:
    return load_config(build_parser().parse_args(list(argv)), environ or {})


def test_the_agent_registers_with_each_controller_named() -> None:
    urls = ["https://ctl-a.example:7380", "https://ctl-b.example:7380"]
    by_flags = agent_config("--controller", urls[0], "--controller", urls[1])
    by_environment = agent_config(environ={"MARCO_CONTROLLER": ",".join(urls)})
    for config in (by_flags, by_environment):
        registrar = Registrar(config, 7370)
        assert [r.link.url for r in registrar.registrations] == urls
        assert len({id(r) for r in registrar.registrations}) == 2  # each its own retries
    with pytest.raises(ConfigError, match="named twice"):
        Registrar(agent_config("--controller", urls[0], "--controller", urls[0] + "/"), 7370)


def test_the_registered_address_defaults_to_a_specific_bind_address() -> None:
    url = "https://ctl.example:7380"

    def address(*argv: str) -> str:
        registrar = Registrar(agent_config("--controller", url, *argv), 7370)
        return registrar.registrations[0].address

    assert address("--bind", "10.1.2.3") == "10.1.2.3"
    assert address("--bind", "fd00::7") == "fd00::7"
    assert address("--bind", "0.0.0.0") == ""  # a wildcard: where the registration comes from
    assert address("--bind", "::") == ""
    assert address("--bind", "10.1.2.3", "--register-address", "192.0.2.9") == "192.0.2.9"


def test_renewals_and_retries_wait_with_jitter() -> None:
    waits = [jittered(30.0) for _ in range(200)]
    assert all(30 * (1 - JITTER) <= wait <= 30 * (1 + JITTER) for wait in waits)
    assert min(waits) < 27 and max(waits) > 33  # spread, not 30 s for every agent


def test_the_controller_url_must_be_https_with_a_host() -> None:
    assert controller_address("https://ctl.example:7380/") == ("ctl.example", 7380)
    for url in ("http://ctl.example:7380", "https://:7380", "ctl.example", "https://h:99999"):
        with pytest.raises(ConfigError):
            controller_address(url)


def test_the_agents_global_connection_cap_is_a_setting() -> None:
    """max_connections (all addresses together) is the agent's setting too, not a constant."""
    assert agent_config("--max-connections", "5").connection_limits().max_connections == 5
    assert agent_config(environ={"MARCO_MAX_CONNECTIONS": "7"}).connection_limits() \
        .max_connections == 7
