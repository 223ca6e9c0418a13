"""One WebSocket per page (issue 15, item 3): statuses and the user's own output of every
watched node over /page-socket; one upstream status subscription per node (the agent's
status-only service subscription), one output upstream per (user, node)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import psutil
import pytest
from tornado import httpclient, websocket

from marco.client import AgentStream
from marco.errors import PermissionDenied
from marco.tls import ClientTls
from marco.tokens import SERVICE_MAX_AGE, SERVICE_SALT, TokenSigner, load_secret
from tests.support.agent_process import AgentProcess
from tests.support.controller_process import ControllerProcess
from tests.support.http import call, login_cookie
from tests.support.pki import TestPki
from tests.support.users import UnixUser
from tests.support.waiting import wait_for

DEADLINE = 30.0


class Page:
    """One page socket as a browser holds it: the events it got, by type."""

    def __init__(self, ws: websocket.WebSocketClientConnection) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.write_message(json.dumps(message))

    async def until(self, match: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        """Read until an event matches (every event read is kept)."""
        for event in self.events:
            if match(event):
                return event
        deadline = time.monotonic() + DEADLINE
        while True:
            message = await asyncio.wait_for(self.ws.read_message(), deadline - time.monotonic())
            assert message is not None, f"page socket closed ({self.ws.close_code}) before {what}"
            event = json.loads(message)
            # Statuses come batched, one frame for all nodes: kept one by one.
            for one in event["statuses"] if event["type"] == "statuses" else [event]:
                self.events.append(one)
                if match(one):
                    return one

    def lines(self, execution_id: str) -> list[str]:
        return [line for e in self.events if e["type"] == "output" and e["id"] == execution_id
                for line in e["lines"]]


async def open_page(controller: ControllerProcess, cookie: str | None) -> Page:
    headers = {"Cookie": cookie} if cookie else {}
    ws = await websocket.websocket_connect(httpclient.HTTPRequest(
        f"{controller.ws_url}/page-socket", headers=headers, ssl_options=controller.ssl_context))
    return Page(ws)


def _controller_over(start_controller, *agents: AgentProcess) -> ControllerProcess:
    nodes = [arg for a in agents for arg in ("--node", f"{a.node_name}={a.host}:{a.port}")]
    # A connection per health check, closed after it: a kept one would count as an upstream.
    return start_controller(extra_args=["--no-discovery", "--health-connection-max-age", "0",
                                        *nodes])


def _upstreams(controller: ControllerProcess, agent: AgentProcess) -> int:
    """The controller's established TCP connections to the agent's port."""
    process = psutil.Process(controller.process.pid)
    return sum(1 for c in process.net_connections("tcp")
               if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port == agent.port)


def _run(controller: ControllerProcess, token: str, node: str, command: str) -> str:
    status, body = call(controller, "POST", "/api/run", {"nodes": [node], "command": command},
                        token)
    assert status == 200 and body["results"][node]["ok"], body
    return str(body["results"][node]["id"])


def _exit_of(execution_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e["type"] == "exit" and e["id"] == execution_id


def test_one_socket_carries_status_and_only_each_users_output(
        start_agent, start_controller, alice: UnixUser, bob: UnixUser,
        signer: TokenSigner) -> None:
    agent = start_agent(node_name="ps1")
    controller = _controller_over(start_controller, agent)
    node = agent.node_name
    cookies = {user.name: login_cookie(controller, user) for user in (alice, bob)}

    async def scenario() -> None:
        pages = {"alice1": await open_page(controller, cookies[alice.name]),
                 "alice2": await open_page(controller, cookies[alice.name]),
                 "bob": await open_page(controller, cookies[bob.name])}
        for name, page in pages.items():
            await page.until(lambda e: e["type"] == "ready", "ready")
            await page.send({"type": "watch", "node": node})
            hello = await page.until(lambda e: e["type"] == "hello", "hello")
            assert hello["node"] == node and hello["user"] == (bob if name == "bob" else alice).name
            status = await page.until(lambda e: e["type"] == "status", "a status")
            assert status["node"] == node and "cpu" in status["status"]
        ids = {alice.name: _run(controller, signer.issue(alice.name), node, "echo alice-line"),
               bob.name: _run(controller, signer.issue(bob.name), node, "echo bob-line")}
        for name, page in pages.items():
            owner = bob.name if name == "bob" else alice.name
            await page.until(_exit_of(ids[owner]), f"the exit of {owner}'s command")
        # Anything of alice's sent to bob's page was sent before now: a status taken later
        # comes after it on his socket.
        seen = time.time()
        for page in pages.values():
            await page.until(lambda e: e["type"] == "status" and e["status"]["time"] > seen,
                             "a status taken after both commands ended")
        for name in ("alice1", "alice2"):
            assert pages[name].lines(ids[alice.name]) == ["alice-line"]
            assert not [e for e in pages[name].events if e.get("id") == ids[bob.name]]
        assert pages["bob"].lines(ids[bob.name]) == ["bob-line"]
        assert not [e for e in pages["bob"].events if e.get("id") == ids[alice.name]]
        assert all(e["node"] == node for p in pages.values() for e in p.events[1:])
        for page in pages.values():
            page.ws.close()

    asyncio.run(scenario())


def test_status_is_subscribed_once_per_node_and_dropped_with_the_last_page(
        start_agent, start_controller, alice: UnixUser, bob: UnixUser) -> None:
    agent = start_agent(node_name="ps2")
    controller = _controller_over(start_controller, agent)
    node = agent.node_name
    cookies = {user.name: login_cookie(controller, user) for user in (alice, bob)}

    async def scenario() -> None:
        pages = [await open_page(controller, cookies[alice.name]) for _ in range(3)]
        pages.append(await open_page(controller, cookies[bob.name]))
        for page in pages:
            await page.send({"type": "watch", "node": node})
            await page.until(lambda e: e["type"] == "status", "a status")
        # One status subscription for the node, one output stream per user: 3, not 4 or 8.
        await asyncio.to_thread(wait_for, lambda: _upstreams(controller, agent) == 3,
                                what="1 status + 2 output upstreams")
        await pages[0].send({"type": "unwatch", "node": node})
        pages[1].ws.close()
        await asyncio.to_thread(wait_for, lambda: _upstreams(controller, agent) == 3,
                                what="the same upstreams while pages still watch")
        for page in pages[2:]:
            page.ws.close()
        await asyncio.to_thread(wait_for, lambda: _upstreams(controller, agent) == 0,
                                what="no upstream once no page watches the node")

    asyncio.run(scenario())


def test_page_socket_refuses_without_login_and_names_unknown_nodes(
        start_agent, start_controller, alice: UnixUser) -> None:
    agent = start_agent(node_name="ps3")
    controller = _controller_over(start_controller, agent)
    cookie = login_cookie(controller, alice)

    async def scenario() -> None:
        page = await open_page(controller, None)
        assert await page.ws.read_message() is None and page.ws.close_code == 4401
        with pytest.raises(httpclient.HTTPClientError) as refused:
            await websocket.websocket_connect(httpclient.HTTPRequest(
                f"{controller.ws_url}/page-socket", ssl_options=controller.ssl_context,
                headers={"Cookie": cookie, "Origin": "https://evil.example"}))
        assert refused.value.code == 403
        page = await open_page(controller, cookie)
        await page.send({"type": "watch", "node": "no-such-node"})
        gone = await page.until(lambda e: e["type"] == "gone", "gone")
        assert gone["node"] == "no-such-node" and gone["code"] == 4404
        await page.send({"type": "replay", "node": agent.node_name, "id": "x", "since": 0})
        error = await page.until(lambda e: e["type"] == "error", "an error")
        assert error["request"] == "replay" and error["node"] == agent.node_name
        page.ws.close()

    asyncio.run(scenario())


def _service_stream(agent: AgentProcess, tls: ClientTls) -> AgentStream:
    token = TokenSigner(load_secret(agent.secret_file), SERVICE_MAX_AGE,
                        salt=SERVICE_SALT).issue("controller")
    return agent.async_client(token, tls=tls).stream()


def test_agent_service_subscription_is_status_only_and_needs_the_controller_cert(
        start_agent, alice: UnixUser, signer: TokenSigner, pki: TestPki) -> None:
    agent = start_agent(node_name="ps4")
    controller_tls = ClientTls(str(pki.ca_file), str(pki.controller_cert),
                               str(pki.controller_key), str(pki.crl_file))

    async def scenario() -> None:
        service = _service_stream(agent, controller_tls)
        hello = await service.connect()
        assert hello["service"] is True and hello["executions"] == []
        await service.send({"type": "replay", "id": "x", "since": 0})
        refused = await service.read()
        assert refused is not None and refused["type"] == "error"
        assert refused["request"] == "replay"
        await service.send({"type": "subscribe", "status": True})
        execution = await agent.async_client(signer.issue(alice.name)).start(
            ["echo", "secret-line"])
        await asyncio.to_thread(wait_for, lambda: agent.client(signer.issue(alice.name))
                                .execution(execution)["state"] != "running", what="the end")
        ended = time.time()
        while True:  # up to a status taken after the end: its output would come before
            event = await service.read()
            assert event is not None and event["type"] == "status", event
            if event["status"]["time"] > ended:
                break
        service.close()
        # The test client's certificate is not the controller's: refused, secret or not.
        with pytest.raises(PermissionDenied):
            await _service_stream(agent, pki.client_tls()).connect()

    asyncio.run(scenario())


def test_page_sockets_of_a_user_are_bounded_by_a_setting(
        start_agent, start_controller, alice: UnixUser) -> None:
    agent = start_agent(node_name="ps5")
    nodes = ["--node", f"{agent.node_name}={agent.host}:{agent.port}"]
    controller = start_controller(extra_args=["--no-discovery", "--page-max-per-user", "1",
                                              *nodes])
    cookie = login_cookie(controller, alice)

    async def scenario() -> None:
        first = await open_page(controller, cookie)
        await first.until(lambda e: e["type"] == "ready", "ready")
        second = await open_page(controller, cookie)
        assert await second.ws.read_message() is None and second.ws.close_code == 4429
        first.ws.close()

    asyncio.run(scenario())


def _cookie_token(cookie: str) -> str:
    """The token inside the login cookie (Tornado's signed value, version 2)."""
    import base64
    raw = cookie.split("marco_token=")[1].split(";")[0].strip('"')
    return base64.b64decode(raw.split("|")[4].split(":", 1)[1]).decode()


def test_a_logout_closes_the_page_of_that_login_even_on_a_shared_feed(
        start_agent, start_controller, alice: UnixUser) -> None:
    """Two logins of alice: page A opens the (alice, node) output feed with its token, page B
    joins it. Logging out B's token closes page B at once (review 8: it kept receiving the
    feed opened with A's token); page A goes on."""
    agent = start_agent(node_name="ps9")
    controller = _controller_over(start_controller, agent)
    node = agent.node_name
    first = login_cookie(controller, alice)
    second = wait_for(lambda: (c := login_cookie(controller, alice))
                      and _cookie_token(c) != _cookie_token(first) and c,
                      timeout=DEADLINE, what="a second login with its own token")

    async def scenario() -> None:
        pages = [await open_page(controller, cookie) for cookie in (first, second)]
        for page in pages:
            await page.until(lambda e: e["type"] == "ready", "ready")
            await page.send({"type": "watch", "node": node})
            await page.until(lambda e: e["type"] == "hello", "hello")
        status, _ = await asyncio.to_thread(call, controller, "POST", "/api/logout", None,
                                            _cookie_token(second))
        assert status == 200
        # The first login's token: one the test issued now could equal the voided one.
        execution = await asyncio.to_thread(_run, controller, _cookie_token(first), node,
                                            "echo after-logout")
        await pages[0].until(_exit_of(execution), "the exit on the page still logged in")
        with pytest.raises(AssertionError, match="closed"):
            await pages[1].until(_exit_of(execution), "nothing on the logged-out page")
        assert pages[1].ws.close_code == 4401
        assert pages[1].lines(execution) == []

    asyncio.run(scenario())
