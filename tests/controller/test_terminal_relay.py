"""The controller's terminal relay /terminal/NODE and its recordings (issue 16): a real
controller and agent, real Unix users, a real WebSocket with the login cookie; the recording
kept as a run of kind `terminal` and downloaded as asciicast v2."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import psutil
import pytest
from tornado import httpclient, web, websocket
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from marco.protocol import TERMINAL_PATH
from marco.tokens import TokenSigner
from tests.support.agent_process import AgentProcess
from tests.support.controller_process import ControllerProcess
from tests.support.http import call, login_cookie
from tests.support.users import UnixUser
from tests.support.waiting import wait_for

DEADLINE = 30.0


class Terminal:
    """One browser's terminal socket: the control messages and the output it read."""

    def __init__(self, ws: websocket.WebSocketClientConnection) -> None:
        self.ws = ws
        self.messages: list[dict[str, Any]] = []
        self.output = b""

    async def open(self, cols: int = 80, rows: int = 24, **more: Any) -> dict[str, Any]:
        await self.send({"type": "open", "cols": cols, "rows": rows, **more})
        return await self.message("started")

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.write_message(json.dumps(message))

    async def type(self, text: str) -> None:
        await self.ws.write_message(text.encode(), binary=True)

    async def read(self, deadline: float) -> bool:
        """One frame kept; False once the socket closed."""
        frame = await asyncio.wait_for(self.ws.read_message(), deadline - time.monotonic())
        if frame is None:
            return False
        if isinstance(frame, bytes):
            self.output += frame
        else:
            self.messages.append(json.loads(frame))
        return True

    async def until(self, done: Callable[[], Any], what: str) -> Any:
        deadline = time.monotonic() + DEADLINE
        while not (found := done()):
            assert await self.read(deadline), \
                f"socket closed ({self.ws.close_code} {self.ws.close_reason}) before {what}"
        return found

    async def message(self, kind: str) -> dict[str, Any]:
        return await self.until(lambda: next((m for m in self.messages if m["type"] == kind),
                                             None), f"a {kind} message")

    async def printed(self, text: str) -> None:
        await self.until(lambda: text.encode() in self.output, f"{text!r} printed")

    async def closed(self) -> int | None:
        """Read to the close; its code."""
        deadline = time.monotonic() + DEADLINE
        while await self.read(deadline):
            pass
        return self.ws.close_code


async def connect(controller: ControllerProcess, cookie: str | None, node: str) -> Terminal:
    headers = {"Cookie": cookie} if cookie else {}
    ws = await websocket.websocket_connect(httpclient.HTTPRequest(
        f"{controller.ws_url}/terminal/{node}", headers=headers,
        ssl_options=controller.ssl_context))
    return Terminal(ws)


def controller_over(start_controller: Callable[..., ControllerProcess], agent: AgentProcess,
                    *more: str) -> ControllerProcess:
    return start_controller(extra_args=["--no-discovery", "--node",
                                        f"{agent.node_name}={agent.host}:{agent.port}", *more])


def cast_of(controller: ControllerProcess, token: str, run_id: str) -> tuple[int, Any]:
    """The status and the lines of a run's .cast download."""
    conn = controller.connection(timeout=30)
    conn.request("GET", f"/api/runs/{run_id}/cast", headers={"Authorization": f"Bearer {token}"})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    if response.status != 200:
        return response.status, body
    assert response.getheader("Content-Type") == "application/x-asciicast"
    assert response.getheader("Content-Disposition") == f'attachment; filename="{run_id}.cast"'
    return 200, [json.loads(line) for line in body.decode().splitlines()]


def upstreams(controller: ControllerProcess, agent: AgentProcess) -> int:
    """The controller's established TCP connections to the agent's port."""
    process = psutil.Process(controller.process.pid)
    return sum(1 for c in process.net_connections("tcp")
               if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port == agent.port)


def output_text(lines: list[Any]) -> str:
    return "".join(frame[2] for frame in lines[1:] if frame[1] == "o")


# -- recorded runs through the API (no terminal needed) --------------------------------------


def test_term_events_are_checked_and_a_terminal_run_downloads_as_cast(
        start_agent, start_controller, alice: UnixUser, bob: UnixUser,
        signer: TokenSigner) -> None:
    agent = start_agent(node_name="tr0")
    controller = controller_over(start_controller, agent)
    n1 = agent.node_name
    token, other = signer.issue(alice.name), signer.issue(bob.name)
    meta = {"node": n1, "cols": 90, "rows": 30, "term": "xterm-256color",
            "shell": "/bin/bash", "command": None, "session": "s1"}
    status, run = call(controller, "POST", "/api/runs", {"kind": "terminal", "title":
                                                         "shell on n1", "hosts": [n1],
                                                         "meta": meta}, token)
    assert status == 201, run
    events = f"/api/runs/{run['id']}/events"
    for bad in ([[0.1, "i", "typed"]], [[0.1, "o"]], "text", [[-1, "o", "x"]]):
        status, body = call(controller, "POST", events,
                            {"events": [{"type": "term", "frames": bad}]}, token)
        assert status == 400 and "frames" in body["message"], (bad, body)
    status, body = call(controller, "POST", events, {"events": [
        {"type": "host_result", "host": n1, "task_id": "t", "status": "ok"}]}, token)
    assert status == 400 and "terminal run takes no host_result" in body["message"], body
    status, body = call(controller, "POST", events, {"events": [
        {"type": "term", "frames": [[0.25, "o", "$ echo $((6*7))\r\n42\r\n"],
                                    [1.5, "r", "100x40"]]},
        {"type": "recap", "stats": {n1: {"ok": 1, "rc": 0}}}]}, token)
    assert status == 200, body
    assert call(controller, "GET", f"/api/runs/{run['id']}", None, token)[1]["status"] == "ok"
    status, lines = cast_of(controller, token, run["id"])
    assert status == 200
    assert lines[0] == {"version": 2, "width": 90, "height": 30, "timestamp": lines[0]["timestamp"],
                        "title": "shell on n1",
                        "env": {"TERM": "xterm-256color", "SHELL": "/bin/bash"}}
    assert lines[1:] == [[0.25, "o", "$ echo $((6*7))\r\n42\r\n"], [1.5, "r", "100x40"]]
    assert cast_of(controller, other, run["id"])[0] == 404  # another user's: as missing
    status, command_run = call(controller, "POST", "/api/runs", {"kind": "command",
                                                                 "title": "true"}, token)
    assert cast_of(controller, token, command_run["id"])[0] == 404  # not a terminal's
    status, body = call(controller, "POST", f"/api/runs/{command_run['id']}/events",
                        {"events": [{"type": "term", "frames": []}]}, token)
    assert status == 400 and "command run takes no term" in body["message"], body
    asks_no_agent(controller, token, run["id"], n1)


def asks_no_agent(controller: ControllerProcess, token: str, run_id: str, node: str) -> None:
    """A terminal run has no executions: its listing asks no agent, and its end collects
    nothing (a command run on the same node ended after it is collected, and it is not)."""
    status, body = call(controller, "GET", f"/api/runs/{run_id}/executions", None, token)
    assert status == 200 and body["executions"] == [], body
    assert f"run {run_id}: a listing of" not in controller.log()
    status, later = call(controller, "POST", "/api/runs", {"kind": "command", "title": "later",
                                                           "hosts": [node]}, token)
    assert call(controller, "POST", f"/api/runs/{later['id']}/finish", {"status": "ok"},
                token)[0] == 200
    wait_for(lambda: f"collecting run {later['id']} on {node}" in controller.log(),
             what="the later run's final collection")
    assert f"collecting run {run_id}" not in controller.log()


# -- the relay ---------------------------------------------------------------------------------


def test_a_shell_through_the_relay_is_recorded_as_a_run(
        start_agent, start_controller, alice: UnixUser, bob: UnixUser,
        signer: TokenSigner) -> None:
    agent = start_agent(node_name="tr1")
    controller = controller_over(start_controller, agent)
    node, token = agent.node_name, signer.issue(alice.name)
    cookie = login_cookie(controller, alice)

    async def session() -> str:
        term = await connect(controller, cookie, node)
        started = await term.open(cols=80, rows=24)
        assert started["shell"] and not started["reattached"]
        recording = await term.message("recording")
        assert recording["url"] == f"/runs/{recording['run']}"
        await term.type("echo $((6*7))\r")
        await term.printed("42\r\n")
        await term.send({"type": "resize", "cols": 100, "rows": 33})
        await term.type("stty size\r")
        await term.printed("33 100\r\n")
        await term.type("exit 3\r")
        exit_message = await term.message("exit")
        assert exit_message["status"] == 3 and exit_message["reason"] == "exited"
        assert await term.closed() == 1000
        return str(recording["run"])

    run_id = asyncio.run(session())
    status, run = call(controller, "GET", f"/api/runs/{run_id}", None, token)
    assert status == 200 and run["kind"] == "terminal" and run["title"] == f"shell on {node}"
    assert run["status"] == "failed" and run["ended"] is not None
    assert run["stats"][node]["failed"] == 1 and run["stats"][node]["rc"] == 3
    assert run["meta"]["node"] == node and run["meta"]["cols"] == 80
    assert [e["type"] for e in run["events"]][-1] == "recap"
    status, lines = cast_of(controller, token, run_id)
    assert status == 200 and lines[0]["version"] == 2 and lines[0]["width"] == 80
    assert "42\r\n" in output_text(lines) and "33 100" in output_text(lines)
    assert [frame[2] for frame in lines[1:] if frame[1] == "r"] == ["100x33"]
    assert cast_of(controller, signer.issue(bob.name), run_id)[0] == 404


def test_recording_off_makes_no_run(start_agent, start_controller, alice: UnixUser,
                                    signer: TokenSigner) -> None:
    agent = start_agent(node_name="tr2")
    controller = controller_over(start_controller, agent, "--no-terminal-record")
    cookie = login_cookie(controller, alice)

    async def session() -> Terminal:
        term = await connect(controller, cookie, agent.node_name)
        await term.open()
        await term.type("echo $((6*7)); exit\r")
        await term.printed("42\r\n")
        assert await term.closed() == 1000
        return term

    term = asyncio.run(session())
    assert [m["type"] for m in term.messages] == ["started", "exit"]
    status, body = call(controller, "GET", "/api/runs?kind=terminal", None,
                        signer.issue(alice.name))
    assert status == 200 and body["runs"] == []


def test_what_cannot_be_opened_is_said_before_the_close(
        start_agent, start_controller, alice: UnixUser) -> None:
    agent = start_agent(node_name="tr3")
    controller = controller_over(start_controller, agent)
    cookie = login_cookie(controller, alice)

    async def refusals() -> None:
        term = await connect(controller, cookie, "no-such-node")
        assert await term.closed() == 4404
        assert term.messages == [{"type": "error", "code": 4404, "message":
                                  "no node named 'no-such-node' is known to the controller"}]
        term = await connect(controller, None, agent.node_name)  # not logged in
        assert await term.closed() == 4401
        assert term.messages[0]["code"] == 4401 and "log in" in term.messages[0]["message"]
        term = await connect(controller, cookie, agent.node_name)
        await term.send({"type": "open", "cols": 80, "rows": 24, "session": "s-unknown"})
        assert await term.closed() == 4404  # the agent's own code
        [error] = term.messages
        assert error["type"] == "error" and error["code"] == 4404
        assert error["message"].startswith(f"the agent on {agent.node_name} refused")
        term = await connect(controller, cookie, agent.node_name)
        await term.send({"type": "open", "cols": 0, "rows": 24})
        assert await term.closed() == 4400
        assert "cols" in term.messages[0]["message"]
        with pytest.raises(httpclient.HTTPClientError) as refused:  # another site's page
            await websocket.websocket_connect(httpclient.HTTPRequest(
                f"{controller.ws_url}/terminal/{agent.node_name}",
                headers={"Cookie": cookie, "Origin": "https://elsewhere.example"},
                ssl_options=controller.ssl_context))
        assert refused.value.code == 403

    asyncio.run(refusals())


def test_relays_per_user_are_bounded(start_agent, start_controller, alice: UnixUser,
                                     bob: UnixUser) -> None:
    agent = start_agent(node_name="tr4")
    controller = controller_over(start_controller, agent, "--terminal-relays-per-user", "1")
    cookie = login_cookie(controller, alice)

    async def scenario() -> None:
        first = await connect(controller, cookie, agent.node_name)
        await first.open()
        second = await connect(controller, cookie, agent.node_name)
        assert await second.closed() == 4429
        assert second.messages[0]["code"] == 4429
        assert "1 terminals of yours are open" in second.messages[0]["message"]
        other = await connect(controller, login_cookie(controller, bob), agent.node_name)
        await other.open()  # another user's count is their own
        await first.type("exit\r")
        assert await first.closed() == 1000
        # Its slot is free once the controller has seen the close.
        deadline = time.monotonic() + DEADLINE
        while True:
            third = await connect(controller, cookie, agent.node_name)
            await third.send({"type": "open", "cols": 80, "rows": 24})
            if await third.read(deadline) and third.messages[0]["type"] == "started":
                break
            assert third.messages[0]["code"] == 4429 and time.monotonic() < deadline
        other.ws.close()
        third.ws.close()

    asyncio.run(scenario())


def test_closing_the_browser_detaches_the_session(start_agent, start_controller,
                                                  alice: UnixUser, signer: TokenSigner) -> None:
    agent = start_agent(node_name="tr5")
    # A connection per health check, closed after it: a kept one would count as an upstream.
    controller = controller_over(start_controller, agent, "--health-connection-max-age", "0")
    cookie, token = login_cookie(controller, alice), signer.issue(alice.name)

    def run_of(run_id: str) -> dict[str, Any]:
        return call(controller, "GET", f"/api/runs/{run_id}", None, token)[1]

    async def leave() -> tuple[str, str]:
        term = await connect(controller, cookie, agent.node_name)
        started = await term.open()
        run_id = (await term.message("recording"))["run"]
        await term.type("KEPT=$((6*7))\r")
        term.ws.close()
        return started["session"], run_id

    session, first = asyncio.run(leave())
    wait_for(lambda: upstreams(controller, agent) == 0, what="the agent's socket closed")
    assert wait_for(lambda: run_of(first)["ended"] is not None, what="the first run's end")
    assert run_of(first)["status"] == "interrupted"

    async def back() -> str:
        term = await connect(controller, cookie, agent.node_name)
        started = await term.open(session=session)
        assert started["reattached"] and started["session"] == session
        run_id = (await term.message("recording"))["run"]
        await term.type("echo $KEPT; exit 0\r")
        await term.printed("42\r\n")
        assert await term.closed() == 1000
        return str(run_id)

    second = asyncio.run(back())
    assert second != first and run_of(second)["status"] == "ok"
    assert run_of(second)["stats"][agent.node_name] == {
        "ok": 1, "changed": 0, "failed": 0, "unreachable": 0, "skipped": 0, "rc": 0}


def test_a_slow_browser_slows_the_program_not_the_controller(
        start_agent, start_controller, alice: UnixUser) -> None:
    """`yes` in a terminal whose browser stops reading: `yes` stops writing (the pty is
    full: the agent stopped reading it, the relay read no more of the agent) and the
    controller's memory stays within a bound meanwhile."""
    agent = start_agent(node_name="tr6")
    controller = controller_over(start_controller, agent)
    cookie = login_cookie(controller, alice)
    process = psutil.Process(controller.process.pid)

    async def scenario() -> None:
        term = await connect(controller, cookie, agent.node_name)
        started = await term.open()
        await term.message("recording")
        before = process.memory_info().rss
        await term.type("yes\r")
        await term.printed("y\r\ny\r\n")  # from now on the browser reads nothing
        shell = psutil.Process(started["pid"])
        yes = wait_for(lambda: next((p for p in shell.children() if p.name() == "yes"), None),
                       what="yes running")
        written = [-1]

        def stalled() -> bool:
            grown = process.memory_info().rss - before
            assert grown < 64 << 20, f"the controller grew by {grown} bytes"
            now = yes.io_counters().write_chars
            still, written[0] = now == written[0], now
            return still

        wait_for(stalled, timeout=60, interval=0.5, what="yes blocked on the full terminal")
        term.ws.close()

    asyncio.run(scenario())


def test_a_recording_is_written_as_it_goes_and_stops_at_its_cap(
        start_agent, start_controller, alice: UnixUser, signer: TokenSigner) -> None:
    agent = start_agent(node_name="tr7")
    controller = controller_over(start_controller, agent, "--terminal-record-max-bytes", "2000")
    cookie, token = login_cookie(controller, alice), signer.issue(alice.name)

    def recorded(run_id: str) -> str:
        events = call(controller, "GET", f"/api/runs/{run_id}", None, token)[1]["events"]
        return "".join(f[2] for e in events if e["type"] == "term" for f in e["frames"])

    async def session() -> str:
        term = await connect(controller, cookie, agent.node_name)
        await term.open()
        run_id = str((await term.message("recording"))["run"])
        await term.type("echo $((6*7))\r")
        await term.printed("42\r\n")
        # Kept while the session goes on (a batch is due 0.5 s after the last one).
        wait_for(lambda: "42\r\n" in recorded(run_id), what="the 42 recorded")
        await term.type("seq 1 3000; exit\r")
        await term.printed("\r\n3000\r\n")  # the session goes on past the cap
        assert await term.closed() == 1000
        return run_id

    run_id = asyncio.run(session())
    status, lines = cast_of(controller, token, run_id)
    assert status == 200
    text = output_text(lines)
    assert "42\r\n" in text and "\r\n3000\r\n" not in text
    assert text.endswith("\r\n[marco: recording stopped at 2000 bytes]\r\n")
    assert call(controller, "GET", f"/api/runs/{run_id}", None, token)[1]["status"] == "ok"


def test_a_store_that_refuses_leaves_the_terminal_going(
        start_agent, start_controller, alice: UnixUser, signer: TokenSigner) -> None:
    """Past the running runs cap a terminal is not recorded (and says so); past the user's
    bytes cap its recording stops, once; both sessions go on, and the recorded run still
    ends with the exit status."""
    agent = start_agent(node_name="tr8")
    controller = controller_over(start_controller, agent, "--runs-max-running-per-user", "1",
                                 "--runs-max-bytes-per-user", "4000")
    cookie, token = login_cookie(controller, alice), signer.issue(alice.name)

    async def sessions() -> str:
        first = await connect(controller, cookie, agent.node_name)
        await first.open()
        run_id = str((await first.message("recording"))["run"])
        second = await connect(controller, cookie, agent.node_name)
        await second.open()
        unrecorded = await second.message("recording")
        assert unrecorded["run"] is None and unrecorded["url"] is None
        assert unrecorded["message"].startswith("not recorded: ")
        await second.type("echo $((6*7)); exit\r")
        await second.printed("42\r\n")
        assert await second.closed() == 1000
        await first.type("seq 1 5000; exit 0\r")
        await first.printed("\r\n5000\r\n")
        assert await first.closed() == 1000
        return run_id

    run_id = asyncio.run(sessions())
    run = call(controller, "GET", f"/api/runs/{run_id}", None, token)[1]
    assert run["status"] == "ok" and run["stats"][agent.node_name]["rc"] == 0, run
    assert "5000" not in output_text(cast_of(controller, token, run_id)[1])
    assert controller.log().count(f"terminal run {run_id}: recording stopped") == 1


class RogueTerminal(websocket.WebSocketHandler):
    """A node's /v1/terminal that speaks for the relay: besides `started`, output and `exit`
    it sends `recording` and `error` messages of its own, and one of a made-up type."""

    async def on_message(self, message: str | bytes) -> None:
        if not isinstance(message, str) or json.loads(message).get("type") != "open":
            return
        for text in ({"type": "started", "session": "s-rogue", "shell": "/bin/sh", "pid": 1,
                      "reattached": False},
                     {"type": "recording", "run": "r-evil", "url": "/\\evil.example/x"},
                     {"type": "error", "code": 4404, "message": "spoofed by the node"},
                     {"type": "surprise"}):
            await self.write_message(json.dumps(text))
        await self.write_message(b"rogue output\r\n", binary=True)
        await self.write_message(json.dumps({"type": "exit", "status": 0, "signal": None,
                                             "reason": "exited"}))
        self.close(1000)


def test_only_the_agents_started_and_exit_reach_the_browser(
        start_controller, alice: UnixUser, signer: TokenSigner) -> None:
    """A node (here a rogue one, on a --dev cluster where anything may announce itself)
    cannot speak for the relay: its recording, error and unknown messages are dropped; the
    browser gets its started, output and exit, and the relay's own recording message."""

    async def scenario() -> tuple[Terminal, str]:
        [sock] = bind_sockets(0, "127.0.0.1")
        server = HTTPServer(web.Application([(TERMINAL_PATH, RogueTerminal)]))
        server.add_sockets([sock])
        port = sock.getsockname()[1]
        controller = start_controller(pki=None, extra_args=[
            "--no-discovery", "--node", f"rogue=127.0.0.1:{port}"])
        try:
            term = await connect(controller, login_cookie(controller, alice), "rogue")
            await term.open()
            await term.printed("rogue output")
            assert await term.closed() == 1000
            return term, controller.log()
        finally:
            server.stop()

    term, log = asyncio.run(scenario())
    kinds = [m["type"] for m in term.messages]
    assert kinds == ["started", "recording", "exit"], term.messages
    [recording] = [m for m in term.messages if m["type"] == "recording"]
    assert recording["run"] != "r-evil" and recording["url"] == f"/runs/{recording['run']}"
    assert "'surprise' message not passed on" in log


def test_a_failing_run_store_stops_the_recording_not_the_terminal(
        start_agent, start_controller, alice: UnixUser, signer: TokenSigner) -> None:
    """The run store failing under a recording (its events table gone: not a refusal of the
    error ladder but a database error): the recording stops and the page is told, the
    failure is logged without the output, the terminal goes on, and its run still ends with
    the exit status."""
    agent = start_agent(node_name="tr9")
    controller = controller_over(start_controller, agent)
    cookie, token = login_cookie(controller, alice), signer.issue(alice.name)
    database = controller.state_dir / "runs.sqlite3"

    def events_table(name: str, to: str) -> None:
        with contextlib.closing(sqlite3.connect(database, timeout=30)) as db:
            db.execute(f"ALTER TABLE {name} RENAME TO {to}")
            db.commit()

    async def session() -> str:
        term = await connect(controller, cookie, agent.node_name)
        await term.open()
        run_id = str((await term.message("recording"))["run"])
        events_table("events", "events_away")  # every write of events fails from now on
        await term.type("echo secret-$((6*7)); seq 1 2000\r")
        stopped = await term.until(lambda: next((m for m in term.messages
                                                 if m.get("stopped")), None), "the stop")
        assert stopped == {"type": "recording", "run": run_id, "url": f"/runs/{run_id}",
                           "stopped": True, "message": "recording stopped: the run store failed"}
        await term.type("echo still-$((40+2)); exit 0\r")
        await term.printed("still-42\r\n")
        assert (await term.message("exit"))["status"] == 0
        assert await term.closed() == 1000
        return run_id

    run_id = asyncio.run(session())
    events_table("events_away", "events")
    run = call(controller, "GET", f"/api/runs/{run_id}", None, token)[1]
    assert run["status"] == "ok" and run["stats"][agent.node_name]["rc"] == 0, run
    log = controller.log()
    assert f"terminal run {run_id}: recording stopped: the run store failed " \
           "(OperationalError at " in log
    assert "secret-42" not in log


def test_a_session_taken_over_is_said_to_the_browser_it_left(
        start_agent, start_controller, alice: UnixUser) -> None:
    """The same user's reattach from another browser takes the session over: the first
    browser is told so and closed with the agent's 4409, the second goes on in the shell."""
    agent = start_agent(node_name="tr10")
    controller = controller_over(start_controller, agent)
    cookie = login_cookie(controller, alice)

    async def scenario() -> Terminal:
        first = await connect(controller, cookie, agent.node_name)
        started = await first.open()
        await first.type("KEPT=$((6*7))\r")
        second = await connect(controller, cookie, agent.node_name)
        assert (await second.open(session=started["session"]))["reattached"]
        assert await first.closed() == 4409
        await second.type("echo taken-$KEPT; exit\r")
        await second.printed("taken-42\r\n")
        assert await second.closed() == 1000
        return first

    first = asyncio.run(scenario())
    assert first.messages[-1] == {"type": "error", "code": 4409, "message":
                                  f"the session on {agent.node_name} was taken over by another "
                                  "connection of yours"}
