"""The controller behind a load balancer (issue 15): only a trusted proxy's X-Forwarded-For /
X-Real-Ip / X-Forwarded-Proto are believed, so the login lockout, the connection bounds and a
registration's address see each client, and nobody else can pass for another address."""

from __future__ import annotations

import http.client
import json
import ssl
from typing import Any

import pytest

from controller.__main__ import build_parser, load_config
from marco.errors import ConfigError
from marco.tokens import TokenSigner
from tests.support.connections import closed_by_peer, health_from, stalled_connection
from tests.support.controller_process import ControllerProcess
from tests.support.proxy import forwarding_proxy
from tests.support.users import UnixUser
from tests.support.waiting import wait_for

GUESSER = "marcotest-nobody"  # failures for a user that does not exist lock no real user


def call(host: str, port: int, context: ssl.SSLContext | None, method: str, path: str,
         body: bytes | None = None, source: str = "127.0.0.1",
         headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    """One request on a new connection from `source`; the response is read."""
    conn = http.client.HTTPSConnection(host, port, timeout=30, context=context,
                                       source_address=(source, 0))
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    response.body = response.read()  # type: ignore[attr-defined]
    conn.close()
    return response


def token_call(controller: ControllerProcess, user: str, password: str,
               source: str = "127.0.0.1", **headers: str) -> tuple[int, Any]:
    """POST /api/token straight to the controller from `source` with `headers`
    (X_Forwarded_For=... is sent as X-Forwarded-For)."""
    response = call(controller.host, controller.port, controller.ssl_context, "POST",
                    "/api/token", json.dumps({"user": user, "password": password}).encode(),
                    source, {name.replace("_", "-"): value for name, value in headers.items()})
    return response.status, json.loads(response.body)  # type: ignore[attr-defined]


def login_cookie(controller: ControllerProcess, user: UnixUser, source: str,
                 **headers: str) -> str:
    """The login cookie's Set-Cookie line after the login form, sent with `headers`."""
    sent = {name.replace("_", "-"): value for name, value in headers.items()}
    form = call(controller.host, controller.port, controller.ssl_context, "GET", "/login",
                source=source, headers=sent)
    xsrf = next(value.split(";")[0].split("=", 1)[1] for name, value in form.getheaders()
                if name.lower() == "set-cookie" and value.startswith("_xsrf="))
    body = f"_xsrf={xsrf}&username={user.name}&password={user.password}&next=/".encode()
    answer = call(controller.host, controller.port, controller.ssl_context, "POST", "/login",
                  body, source, {**sent, "Cookie": f"_xsrf={xsrf}",
                                 "Content-Type": "application/x-www-form-urlencoded"})
    assert answer.status == 302, answer.status
    return next(value for name, value in answer.getheaders()
                if name.lower() == "set-cookie" and not value.startswith("_xsrf="))


def fail_twice(controller: ControllerProcess, source: str, **headers: str) -> None:
    for _ in range(2):
        status, body = token_call(controller, GUESSER, "wrong", source, **headers)
        assert (status, body["error"]) == (401, "unauthenticated"), body


def test_forwarded_headers_from_an_untrusted_peer_are_ignored(start_controller, alice: UnixUser,
                                                              bob: UnixUser) -> None:
    """A peer that is not a trusted proxy cannot pass for other addresses: its failures count
    against its own address whatever it forwards, and its X-Forwarded-Proto is ignored."""
    controller = start_controller(extra_args=[
        "--no-discovery", "--login-max-failures", "2", "--login-lockout", "300",
        "--trusted-proxies", "127.0.0.9", "--trusted-proxies", "192.0.2.0/24"])
    fail_twice(controller, "127.0.0.2", X_Forwarded_For="10.9.0.1")
    assert token_call(controller, bob.name, bob.password, "127.0.0.2",
                      X_Forwarded_For="10.9.0.2")[0] == 429
    assert token_call(controller, bob.name, bob.password, "127.0.0.2",
                      X_Real_Ip="10.9.0.3")[0] == 429
    assert f"failed login for '{GUESSER}' from 127.0.0.2" in controller.log()
    assert token_call(controller, bob.name, bob.password, "127.0.0.3",
                      X_Forwarded_For="127.0.0.2")[0] == 200
    assert "Secure" in login_cookie(controller, alice, "127.0.0.3", X_Forwarded_Proto="http")


def test_a_trusted_proxy_forwards_each_clients_address(start_controller, alice: UnixUser,
                                                       bob: UnixUser, signer: TokenSigner) -> None:
    """Through a trusted proxy the lockout counts the forwarded client (the right-most
    X-Forwarded-For entry that is not a proxy, else X-Real-Ip): one guessing client is locked
    out, another client through the same proxy is not; what the guesser writes into
    X-Forwarded-For itself does not move it; the scheme is the forwarded one."""
    controller = start_controller(extra_args=[
        "--no-discovery", "--login-max-failures", "2", "--login-lockout", "300",
        "--trusted-proxies", "127.0.0.1", "--trusted-proxies", "127.0.0.64/30"])
    fail_twice(controller, "127.0.0.1", X_Forwarded_For="10.8.0.1")
    assert token_call(controller, bob.name, bob.password,
                      X_Forwarded_For="10.8.0.1")[0] == 429
    # The guesser's own claim is left of what the proxy appended; a chain of proxies too.
    assert token_call(controller, bob.name, bob.password,
                      X_Forwarded_For="10.8.0.2, 10.8.0.1")[0] == 429
    assert token_call(controller, bob.name, bob.password,
                      X_Forwarded_For="10.8.0.2, 10.8.0.1, 127.0.0.65")[0] == 429
    assert token_call(controller, bob.name, bob.password, X_Real_Ip="10.8.0.1")[0] == 429
    assert f"failed login for '{GUESSER}' from 10.8.0.1" in controller.log()
    status, body = token_call(controller, bob.name, bob.password, X_Forwarded_For="10.8.0.2")
    assert status == 200 and signer.verify(body["token"]) == bob.name
    # Through the real proxy (its source 127.0.0.1): each client is its own address.
    with forwarding_proxy(controller, source="127.0.0.1") as proxy:
        def via_proxy(source: str, user: str, password: str, **headers: str) -> int:
            return call("127.0.0.1", proxy.server_address[1], controller.ssl_context, "POST",
                        "/api/token", json.dumps({"user": user, "password": password}).encode(),
                        source, {k.replace("_", "-"): v for k, v in headers.items()}).status
        assert via_proxy("127.0.0.5", bob.name, bob.password) == 200
        assert [via_proxy("127.0.0.6", GUESSER + "2", "x") for _ in range(2)] == [401, 401]
        assert via_proxy("127.0.0.6", bob.name, bob.password,
                         X_Forwarded_For="127.0.0.5") == 429
        assert via_proxy("127.0.0.5", bob.name, bob.password) == 200
    assert "Secure" not in login_cookie(controller, alice, "127.0.0.1",
                                        X_Forwarded_Proto="http")
    assert "Secure" in login_cookie(controller, alice, "127.0.0.1", X_Forwarded_Proto="https")


def test_a_registration_through_a_trusted_proxy_gets_the_agents_address(
        start_controller, start_agent, signer: TokenSigner, alice: UnixUser,
        unique_name) -> None:
    """An agent registering through a load balancer without naming its address is listed at
    the address the proxy forwards (where its registration came from), not the proxy's."""
    controller = start_controller(extra_args=["--no-discovery", "--trusted-proxies",
                                              "127.0.0.7"])
    token = signer.issue(alice.name)
    name = unique_name("proxied")
    with forwarding_proxy(controller, source="127.0.0.7") as proxy:
        # A wildcard bind: the agent names no address, the controller takes the source's.
        agent = start_agent(node_name=name, bind="0.0.0.0",
                            extra_args=["--controller", proxy.url, "--register-retry-max", "1"])
        hosts = wait_for(lambda: name in (h := controller.inventory_hosts(token)) and h,
                         what="the agent registered through the proxy")
    assert (hosts[name]["ansible_host"], hosts[name]["ansible_port"]) == ("127.0.0.1",
                                                                         agent.port)


def test_a_trusted_proxy_is_bounded_by_the_global_cap_not_per_address(start_controller) -> None:
    """A trusted proxy carries many clients: it may hold more connections than one address
    may; every connection together is held to --max-connections."""
    controller = start_controller(extra_args=[
        "--no-discovery", "--handshake-timeout", "30", "--trusted-proxies", "127.0.0.2",
        "--max-pending-connections-per-address", "3", "--max-connections-per-address", "3",
        "--max-connections", "8"])
    held = [stalled_connection(controller, source="127.0.0.2") for _ in range(6)]
    held += [stalled_connection(controller, source="127.0.0.3") for _ in range(2)]
    try:
        with stalled_connection(controller, source="127.0.0.4") as extra:
            wait_for(lambda: closed_by_peer(extra), timeout=10,
                     what="the connection over --max-connections to be closed")
        assert not any(closed_by_peer(sock) for sock in held), "a held connection was closed"
        assert "(limit max_connections)" in controller.log()
    finally:
        for sock in held:
            sock.close()

    def served() -> bool:  # a refusal shows as a closed connection, until the others are gone
        try:
            return health_from(controller, "/login", source="127.0.0.4") == 200
        except OSError:
            return False

    wait_for(served, what="a connection served once the others are gone")


def test_a_trusted_proxy_must_be_an_address_or_a_network() -> None:
    """A typo must not widen the trust: host bits in a network, or a name, are refused."""
    for value in ("10.0.0.1/8", "lb.example.org", "10.0.0.0/33"):
        with pytest.raises(ConfigError, match="trusted_proxies"):
            load_config(build_parser().parse_args(["--trusted-proxies", value]), {})
    config = load_config(build_parser().parse_args(["--trusted-proxies", "10.0.0.5",
                                                    "--trusted-proxies", "fd00::/64"]), {})
    assert config.connection_limits().trusted_proxies == ("10.0.0.5/32", "fd00::/64")
