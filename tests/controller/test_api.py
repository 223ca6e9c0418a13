"""The controller's HTTP API and relay without a browser: tokens, run, deploy fan-out, relay."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from tornado import httpclient, websocket

from marco.tokens import TokenSigner
from tests.support.controller_process import ControllerProcess
from tests.support.http import call, login_cookie
from tests.support.users import UnixUser


def test_token_for_the_command_line(cluster, alice: UnixUser, signer: TokenSigner) -> None:
    controller, _ = cluster
    status, body = call(controller, "POST", "/api/token", {"user": alice.name, "password": alice.password})
    assert status == 200 and signer.verify(body["token"]) == alice.name
    status, body = call(controller, "POST", "/api/token", {"user": alice.name, "password": "nope"})
    assert status == 401 and body == {"error": "unauthenticated", "message": "wrong user name or password"}
    status, body = call(controller, "POST", "/api/token", b"not json")
    assert status == 400


def test_run_on_chosen_nodes(cluster, alice: UnixUser, signer: TokenSigner) -> None:
    controller, names = cluster
    token = signer.issue(alice.name)
    status, body = call(controller, "POST", "/api/run", {"nodes": names, "command": "id -un"}, token)
    assert status == 200 and set(body["results"]) == set(names)
    assert all(r["ok"] and len(r["id"]) == 32 for r in body["results"].values())
    status, body = call(controller, "POST", "/api/run", {"nodes": ["no-such-node"], "command": "id"}, token)
    assert status == 400 and "no-such-node" in body["message"]
    run = {"nodes": names, "command": "id"}
    # The XSRF check alone: a logged-in browser's POST without the XSRF header is refused ...
    cookie = login_cookie(controller, alice)
    xsrf = cookie.split("_xsrf=")[1]
    assert call(controller, "POST", "/api/run", run, headers={"Cookie": cookie})[0] == 403
    # ... and with it accepted.
    status, body = call(controller, "POST", "/api/run", run,
                        headers={"Cookie": cookie, "X-XSRFToken": xsrf})
    assert status == 200 and set(body["results"]) == set(names), body
    # The login check alone: a valid XSRF pair without a login is 401.
    status, _ = call(controller, "POST", "/api/run", run,
                     headers={"Cookie": f"_xsrf={xsrf}", "X-XSRFToken": xsrf})
    assert status == 401


def test_deploy_fans_out_and_reports_per_node(cluster, alice: UnixUser, signer: TokenSigner,
                                              tmp_path: Path) -> None:
    controller, names = cluster
    token = signer.issue(alice.name)
    payload = os.urandom(20 * 1024 * 1024)
    query = urllib.parse.urlencode({"nodes": ",".join(names), "folder": "~", "name": "fan.bin",
                                    "command": "sha256sum fan.bin"})
    status, body = call(controller, "PUT", f"/api/deploy?{query}", payload, token)
    assert status == 200, body
    assert body["size"] == len(payload)
    assert all(r["ok"] and r["size"] == len(payload) for r in body["results"].values())
    assert all(len(r["execution"]) == 32 for r in body["results"].values())
    assert hashlib.sha256((Path(alice.home) / "fan.bin").read_bytes()).digest() == \
        hashlib.sha256(payload).digest()
    # A folder alice may not write: every node says so, nothing is created.
    query = urllib.parse.urlencode({"nodes": ",".join(names), "folder": "/etc", "name": "marcotest-x"})
    status, body = call(controller, "PUT", f"/api/deploy?{query}", b"x" * 100_000, token)
    assert status == 200
    assert {r["error"] for r in body["results"].values()} == {"forbidden"}
    assert not Path("/etc/marcotest-x").exists()
    status, body = call(controller, "PUT", "/api/deploy?nodes=&name=x", b"x", token)
    assert status == 400


def test_relay_socket_for_agents_the_browser_cannot_reach(cluster, alice: UnixUser,
                                                          signer: TokenSigner) -> None:
    controller, names = cluster
    cookie = login_cookie(controller, alice)
    url = f"{controller.ws_url}/relay/{names[0]}"
    tls = controller.ssl_context

    async def scenario() -> None:
        ws = await websocket.websocket_connect(httpclient.HTTPRequest(url, headers={"Cookie": cookie},
                                                                      ssl_options=tls))
        hello = json.loads(await ws.read_message() or "null")
        assert hello["type"] == "hello" and hello["user"] == alice.name
        token = signer.issue(alice.name)
        status, body = call(controller, "POST", "/api/run", {"nodes": [names[0]], "command": "echo via-relay"}, token)
        execution_id = body["results"][names[0]]["id"]
        lines = []
        while True:
            message = await asyncio.wait_for(ws.read_message(), 20)
            event = json.loads(message or "null")
            if event.get("id") == execution_id and event["type"] == "output":
                lines += event["lines"]
            if event.get("id") == execution_id and event["type"] == "exit":
                break
        assert lines == ["via-relay"]
        ws.close()
        # No login cookie: refused. A foreign page's origin: refused (cookie-authenticated socket).
        ws = await websocket.websocket_connect(httpclient.HTTPRequest(url, ssl_options=tls))
        assert await ws.read_message() is None and ws.close_code == 4401
        with pytest.raises(httpclient.HTTPClientError) as refused:
            await websocket.websocket_connect(httpclient.HTTPRequest(
                url, headers={"Cookie": cookie, "Origin": "https://evil.example"}, ssl_options=tls))
        assert refused.value.code == 403

    asyncio.run(scenario())


def test_pages_refuse_debugging_and_set_safe_headers(cluster) -> None:
    controller, _ = cluster
    conn = controller.connection(timeout=30)
    conn.request("GET", "/login")
    response = conn.getresponse()
    page = response.read().decode()
    assert "default-src 'self'" in response.getheader("Content-Security-Policy")
    assert 'name="_xsrf"' in page
    conn.request("GET", "/")
    response = conn.getresponse()
    response.read()
    assert response.status == 302 and response.getheader("Location").startswith("/login")
    conn.request("GET", "/nope-" + "x" * 10)
    response = conn.getresponse()
    assert response.status == 404 and b"Traceback" not in response.read()


def _static_cluster(start_agent, start_controller, *extra: str):
    agents = [start_agent(node_name=f"st{i}") for i in range(2)]
    nodes = [arg for a in agents for arg in ("--node", f"{a.node_name}={a.host}:{a.port}")]
    return agents, start_controller(extra_args=["--no-discovery", *nodes, *extra])


def _temp_files(home: str) -> list[str]:
    return [name for name in os.listdir(home) if ".marco-" in name]


def test_a_stalled_agent_is_dropped_and_the_others_finish(start_agent, start_controller,
                                                           alice: UnixUser, signer: TokenSigner) -> None:
    import signal
    import threading

    from tests.support.waiting import wait_for
    agents, controller = _static_cluster(start_agent, start_controller, "--deploy-stall-timeout", "2")
    token = signer.issue(alice.name)
    wait_for(lambda: len(controller.inventory_hosts(token)) == 2,
             what="static nodes up")
    payload = os.urandom(1024 * 1024) * 300  # 300 MiB: still flowing when one agent freezes
    query = urllib.parse.urlencode({"nodes": "st0,st1", "folder": "~", "name": "stall.bin"})
    answer: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: answer.update(
        zip(("status", "body"), call(controller, "PUT", f"/api/deploy?{query}", payload, token), strict=True)))
    thread.start()
    # Both uploads under way (each agent's file helper has its temp file), then one freezes.
    wait_for(lambda: len(_temp_files(alice.home)) >= 2, what="both uploads started")
    agents[1].process.send_signal(signal.SIGSTOP)
    try:
        thread.join(120)
    finally:
        agents[1].process.send_signal(signal.SIGCONT)
    assert answer["status"] == 200, answer
    results = answer["body"]["results"]
    assert results["st0"]["ok"] and results["st0"]["size"] == len(payload)
    assert not results["st1"]["ok"] and results["st1"]["error"] == "stalled"
    wait_for(lambda: not _temp_files(alice.home), what="the dropped upload's temp file removed")


def test_a_browser_leaving_mid_deploy_leaves_nothing_behind(start_agent, start_controller,
                                                            alice: UnixUser, signer: TokenSigner) -> None:
    from tests.support.waiting import wait_for
    agents, controller = _static_cluster(start_agent, start_controller)
    token = signer.issue(alice.name)
    wait_for(lambda: len(controller.inventory_hosts(token)) == 2,
             what="static nodes up")
    query = urllib.parse.urlencode({"nodes": "st0,st1", "folder": "~", "name": "left.bin"})
    with controller.open_socket() as sock:
        sock.sendall(f"PUT /api/deploy?{query} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                     f"Content-Length: 100000000\r\n\r\n".encode() + os.urandom(5_000_000))
        wait_for(lambda: _temp_files(alice.home), what="uploads under way")
    wait_for(lambda: not _temp_files(alice.home), timeout=20, what="temp files removed")
    assert not (Path(alice.home) / "left.bin").exists()


def test_bad_node_lists_are_400(cluster, alice: UnixUser, signer: TokenSigner) -> None:
    controller, _ = cluster
    token = signer.issue(alice.name)
    for nodes in ([1], [[1]], "node", {"a": 1}):
        status, body = call(controller, "POST", "/api/run", {"nodes": nodes, "command": "id"}, token)
        assert status == 400 and "list of node names" in body["message"], (nodes, body)


def test_browser_sessions_survive_a_secret_rotation(cluster, alice: UnixUser, pam_service: str,
                                                    secret_file: Path, tmp_path: Path) -> None:
    """A cookie signed before the rotation still logs in after it (versioned cookie keys)."""
    import shutil

    from marco.tokens import rotate_secret
    controller, _ = cluster
    cookie = login_cookie(controller, alice)
    rotated = tmp_path / "rotated-secret"
    shutil.copy(secret_file, rotated)
    rotated.chmod(0o600)
    rotate_secret(rotated)
    after = ControllerProcess(rotated, tmp_path, pam_service=pam_service,
                              extra_args=["--no-discovery"])
    try:
        conn = after.connection(timeout=30)
        conn.request("GET", "/api/session", headers={"Cookie": cookie})
        response = conn.getresponse()
        body = json.loads(response.read())
        assert response.status == 200 and body["user"] == alice.name
    finally:
        after.stop()


def test_the_page_never_receives_the_agents_token(cluster, alice: UnixUser) -> None:
    """The login cookie is HttpOnly; nothing the page's JavaScript can fetch may carry the token
    it holds (an XSS would otherwise take a 12 h agent token away)."""
    controller, _ = cluster
    cookie = login_cookie(controller, alice)
    signed = urllib.parse.unquote(cookie.split("marco_token=")[1].split(";")[0]).strip('"')
    token = base64.b64decode(signed.split("|")[4].split(":")[1]).decode()  # Tornado's v2 value
    assert token.count(".") == 2
    for path in ("/api/session", "/api/nodes", "/"):
        conn = controller.connection(timeout=30)
        conn.request("GET", path, headers={"Cookie": cookie})
        response = conn.getresponse()
        text = response.read().decode()
        assert response.status == 200, path
        assert token not in text and token.split(".")[2] not in text, path
    csp = response.getheader("Content-Security-Policy") or ""
    assert "connect-src 'self';" in csp, csp
