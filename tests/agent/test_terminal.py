"""Interactive terminals (/v1/terminal, docs/terminals.md) through a real agent as real users,
over the shared TerminalClient."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.isolation import Isolation, IsolationSettings
from agent.terminal import OpenRequest, TerminalManager, TerminalSettings
from agent.users import UserResolver
from marco import protocol
from marco.client import agent_socket_target
from marco.errors import (
    AuthenticationError,
    BadRequest,
    Conflict,
    NotFound,
    PermissionDenied,
    TooManySockets,
    TryAgain,
)
from marco.revocations import token_digest
from marco.terminal_client import TerminalClient
from marco.tls import ClientTls
from marco.tokens import SERVICE_MAX_AGE, SERVICE_SALT, TokenSigner, load_secret
from tests.support.agent_process import AgentProcess
from tests.support.pki import TestPki
from tests.support.run import RunNames
from tests.support.users import UnixUser, create_user, remove_user
from tests.support.waiting import wait_for

READ_TIMEOUT = 30.0
RSS_MARGIN_KIB = 16 * 1024  # allocator noise; unbounded buffering of `yes` is hundreds of MiB


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 240))


def terminal(agent: AgentProcess, token: str) -> TerminalClient:
    return TerminalClient.for_node(agent.host, agent.port, token, agent.tls, agent.node_name)


async def read_until(client: TerminalClient, pattern: str, timeout: float = READ_TIMEOUT) -> str:
    """Output until `pattern` (a regex) appears in it; the text read so far is returned."""
    seen = b""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, seen.decode("utf-8", "replace")):
        frame = await asyncio.wait_for(client.read(), max(deadline - time.monotonic(), 0.01))
        assert isinstance(frame, bytes), f"expected output, got {frame!r} after {seen[-500:]!r}"
        seen += frame
    return seen.decode("utf-8", "replace")


async def read_to_exit(client: TerminalClient,
                       timeout: float = READ_TIMEOUT) -> tuple[str, dict[str, Any]]:
    """All output up to the `exit` message, then the normal close."""
    seen = b""
    deadline = time.monotonic() + timeout
    while True:
        frame = await asyncio.wait_for(client.read(), max(deadline - time.monotonic(), 0.01))
        if isinstance(frame, bytes):
            seen += frame
            continue
        assert isinstance(frame, dict) and frame["type"] == "exit", (frame, seen[-500:])
        assert await asyncio.wait_for(client.read(), READ_TIMEOUT) is None
        return seen.decode("utf-8", "replace"), frame


async def drain(client: TerminalClient) -> None:
    """Read (output, control messages) until the socket closed normally."""
    while await asyncio.wait_for(client.read(), READ_TIMEOUT) is not None:
        pass


async def wait_async(predicate: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    """wait_for without blocking the loop (the client keeps reading meanwhile)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def processes_of(uid: int, name: str) -> list[int]:
    out = subprocess.run(["pgrep", "-u", str(uid), "-x", name], capture_output=True, text=True)
    return [int(pid) for pid in out.stdout.split()]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def audit_events(agent: AgentProcess) -> list[dict[str, Any]]:
    path = agent.state_dir / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def agent(start_agent: Callable[..., AgentProcess], alice: UnixUser,
          bob: UnixUser) -> AgentProcess:
    return start_agent()


def test_a_command_runs_as_the_user_in_a_pty_of_theirs(agent: AgentProcess, signer: TokenSigner,
                                                         alice: UnixUser) -> None:
    command = ("tty; stat -c 'owner=%U mode=%a' $(tty); id -un; pwd; "
               "echo \"term=$TERM id=$MARCO_TERMINAL\"")

    async def scenario() -> tuple[str, dict[str, Any], dict[str, Any]]:
        client = terminal(agent, signer.issue(alice.name))
        started = await client.open(80, 24, term="vt100", command=command)
        output, end = await read_to_exit(client)
        return output, started, end

    output, started, end = run(scenario())
    assert started["reattached"] is False and started["shell"] == "/bin/bash"
    assert re.search(r"^/dev/pts/\d+\r$", output, re.M), output
    assert f"owner={alice.name} mode=620" in output
    assert f"\n{alice.name}\r\n{alice.home}\r\n" in output
    assert f"term=vt100 id={started['session']}" in output
    assert end == {"type": "exit", "status": 0, "signal": None, "reason": "exited"}


@pytest.fixture
def sh_user(run: RunNames) -> Iterator[UnixUser]:
    """A user whose login shell is /bin/sh (dash), which, unlike bash, does not take a
    controlling terminal by itself."""
    user = create_user(run.user("sh"))
    subprocess.run(["usermod", "--shell", "/bin/sh", user.name], check=True)
    yield user
    remove_user(user.name)


def test_the_pty_is_the_controlling_terminal(agent: AgentProcess, signer: TokenSigner,
                                             sh_user: UnixUser) -> None:
    async def scenario() -> str:
        client = terminal(agent, signer.issue(sh_user.name))
        started = await client.open(80, 24, command="(exec 3</dev/tty) && echo controlling=yes")
        assert started["shell"] == "/bin/sh"
        return (await read_to_exit(client))[0]

    assert "controlling=yes" in run(scenario())


def test_stty_size_follows_a_resize(agent: AgentProcess, signer: TokenSigner,
                                    alice: UnixUser) -> None:
    async def scenario() -> None:
        client = terminal(agent, signer.issue(alice.name))
        await client.open(100, 30, command="stty size; read line; stty size")
        await read_until(client, r"30 100")
        await client.resize(120, 40)
        await client.send(b"\n")
        output, end = await read_to_exit(client)
        assert "40 120" in output and end["status"] == 0

    run(scenario())


@pytest.fixture
def sudoer(run: RunNames, alice: UnixUser) -> Iterator[UnixUser]:
    """alice may sudo with her password (a tagged drop-in: a crashed run's is swept)."""
    path = Path(f"{run.sudoers}-terminal")
    path.write_text(f"{alice.name} ALL=(ALL) ALL\n")
    path.chmod(0o440)
    yield alice
    path.unlink(missing_ok=True)


def test_sudo_asks_for_the_password_at_the_terminal(agent: AgentProcess, signer: TokenSigner,
                                                    sudoer: UnixUser) -> None:
    async def scenario() -> None:
        client = terminal(agent, signer.issue(sudoer.name))
        await client.open(80, 24, command="sudo -k; sudo -p 'PASSWORD FOR SUDO: ' true; "
                                          "echo sudo-rc=$?")
        await read_until(client, "PASSWORD FOR SUDO: ")
        await client.send(sudoer.password.encode() + b"\n")
        output, end = await read_to_exit(client)
        assert "sudo-rc=0" in output and sudoer.password not in output
        assert end["status"] == 0

    run(scenario())


def test_ctrl_c_interrupts_the_foreground_job_and_the_shell_goes_on(
        agent: AgentProcess, signer: TokenSigner, alice: UnixUser) -> None:
    async def scenario() -> None:
        client = terminal(agent, signer.issue(alice.name))
        await client.open(80, 24)
        await client.send(b"sleep 100\n")
        await wait_async(lambda: processes_of(alice.uid, "sleep"), "sleep to run")
        await client.send(b"\x03")
        await wait_async(lambda: not processes_of(alice.uid, "sleep"), "sleep to be interrupted")
        await client.send(b"echo still-$((6*7))\n")
        await read_until(client, "still-42")
        await client.send(b"exit 7\n")
        _, end = await read_to_exit(client)
        assert end == {"type": "exit", "status": 7, "signal": None, "reason": "exited"}

    run(scenario())


def test_a_login_shell_gives_its_exit_status(agent: AgentProcess, signer: TokenSigner,
                                             alice: UnixUser) -> None:
    async def scenario() -> dict[str, Any]:
        client = terminal(agent, signer.issue(alice.name))
        await client.open(80, 24)
        await client.send(b"echo $0; exit 3\n")
        output, end = await read_to_exit(client)
        assert "-bash" in output  # a login shell, as `login` starts it
        return end

    assert run(scenario())["status"] == 3


def test_a_command_gives_its_status_or_signal(agent: AgentProcess, signer: TokenSigner,
                                              alice: UnixUser) -> None:
    async def scenario(command: str) -> dict[str, Any]:
        client = terminal(agent, signer.issue(alice.name))
        await client.open(80, 24, command=command)
        return (await read_to_exit(client))[1]

    assert run(scenario("exit 5"))["status"] == 5
    killed = run(scenario("kill -KILL $$"))
    assert killed["status"] is None and killed["signal"] == "KILL"


def test_yes_for_ten_seconds_leaves_the_agent_rss_flat(agent: AgentProcess, signer: TokenSigner,
                                                       alice: UnixUser) -> None:
    async def scenario() -> tuple[int, int, int]:
        client = terminal(agent, signer.issue(alice.name))
        await client.open(80, 24, command="yes")
        received = len(await read_until(client, "y\r\ny\r\n"))
        before = rss_kib(agent.process.pid)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            # Not reading for a while (the agent must stop reading the pty), then fast.
            await asyncio.sleep(1.5)
            burst_end = time.monotonic() + 0.5
            while time.monotonic() < burst_end:
                frame = await asyncio.wait_for(client.read(), READ_TIMEOUT)
                assert isinstance(frame, bytes)
                received += len(frame)
        after = rss_kib(agent.process.pid)
        await client.signal("INT")
        _, end = await read_to_exit(client)
        assert end["signal"] == "INT"
        return before, after, received

    before, after, received = run(scenario())
    assert received > 1024 * 1024, "yes should have moved while read"
    assert after - before < RSS_MARGIN_KIB, (before, after)


def test_only_the_owner_can_reattach(agent: AgentProcess, signer: TokenSigner, alice: UnixUser,
                                     bob: UnixUser) -> None:
    async def scenario() -> None:
        first = terminal(agent, signer.issue(alice.name))
        session = (await first.open(80, 24))["session"]
        marker = Path(alice.home) / f"detached-{session}"
        await first.send(f"sleep 1; echo later-$((2+3)); touch {marker}\n".encode())
        await first.detach()
        await drain(first)
        await wait_async(marker.exists, "output while detached")  # kept in the scrollback
        with pytest.raises(NotFound):
            await terminal(agent, signer.issue(bob.name)).open(80, 24, session=session)
        with pytest.raises(NotFound):
            await terminal(agent, signer.issue(alice.name)).open(80, 24, session="0" * 32)
        again = terminal(agent, signer.issue(alice.name))
        started = await again.open(80, 24, session=session)
        assert started["reattached"] is True and started["session"] == session
        await read_until(again, "later-5")
        await again.send(b"exit\n")
        _, end = await read_to_exit(again)
        assert end["reason"] == "exited"

    run(scenario())


def test_bad_tokens_and_bad_opens_are_refused(agent: AgentProcess, signer: TokenSigner,
                                              alice: UnixUser) -> None:
    async def scenario() -> None:
        with pytest.raises(AuthenticationError):
            await terminal(agent, "not-a-token").open(80, 24)
        with pytest.raises(BadRequest):
            await terminal(agent, signer.issue(alice.name)).open(0, 24)
        with pytest.raises(BadRequest):
            await terminal(agent, signer.issue(alice.name)).open(80, 24, term="x; rm -rf /")

    run(scenario())


@pytest.fixture
def no_login_user(run: RunNames) -> Iterator[UnixUser]:
    user = create_user(run.user("nologin"))
    subprocess.run(["usermod", "--shell", "/usr/sbin/nologin", user.name], check=True)
    yield user
    remove_user(user.name)


def test_an_account_without_a_login_shell_is_refused(agent: AgentProcess, signer: TokenSigner,
                                                     no_login_user: UnixUser) -> None:
    client = terminal(agent, signer.issue(no_login_user.name))
    with pytest.raises(PermissionDenied):
        run(client.open(80, 24, command="id"))
    assert client.close_code == 4403


def test_terminals_off_are_refused(start_agent: Callable[..., AgentProcess], signer: TokenSigner,
                                   alice: UnixUser) -> None:
    agent = start_agent(extra_args=["--no-terminals"])
    with pytest.raises(PermissionDenied):
        run(terminal(agent, signer.issue(alice.name)).open(80, 24))


def test_the_per_user_cap_counts_detached_sessions(start_agent: Callable[..., AgentProcess],
                                                   signer: TokenSigner, alice: UnixUser,
                                                   bob: UnixUser) -> None:
    agent = start_agent(extra_args=["--terminal-max-per-user", "2"])

    async def scenario() -> None:
        first = terminal(agent, signer.issue(alice.name))
        await first.open(80, 24)
        await first.detach()  # still counts
        await drain(first)
        await terminal(agent, signer.issue(alice.name)).open(80, 24)
        third = terminal(agent, signer.issue(alice.name))
        with pytest.raises(TooManySockets):
            await third.open(80, 24)
        assert third.close_code == 4429
        await terminal(agent, signer.issue(bob.name)).open(80, 24)  # a cap of each user

    run(scenario())


def test_an_idle_terminal_ends(start_agent: Callable[..., AgentProcess], signer: TokenSigner,
                               alice: UnixUser) -> None:
    agent = start_agent(extra_args=["--terminal-idle-timeout", "1"])

    async def scenario() -> dict[str, Any]:
        client = terminal(agent, signer.issue(alice.name))
        await client.open(80, 24)
        return (await read_to_exit(client))[1]

    end = run(scenario())
    assert end["reason"] == "idle" and end["signal"] == "HUP", end


def test_a_logged_out_token_ends_its_terminal(agent: AgentProcess, pki: TestPki,
                                              signer: TokenSigner, alice: UnixUser) -> None:
    token = signer.issue(alice.name)
    service = TokenSigner(load_secret(agent.secret_file), SERVICE_MAX_AGE,
                          salt=SERVICE_SALT).issue("controller")
    controller = ClientTls(str(pki.ca_file), str(pki.controller_cert), str(pki.controller_key))

    async def scenario() -> dict[str, Any]:
        client = terminal(agent, token)
        await client.open(80, 24)
        await client.send(b"echo ready-$((3*3))\n")
        await read_until(client, "ready-9")
        await agent.async_client(service, tls=controller).push_revocations(
            {}, {token_digest(token): time.time() + 3600})
        return (await read_to_exit(client))[1]

    assert run(scenario())["reason"] == "logged out"


def test_the_audit_log_has_start_and_end_without_the_command(
        agent: AgentProcess, signer: TokenSigner, alice: UnixUser) -> None:
    command = "echo secret-$((40+2)); exit 4"

    async def scenario() -> str:
        client = terminal(agent, signer.issue(alice.name))
        session = (await client.open(80, 24, command=command))["session"]
        await read_to_exit(client)
        return str(session)

    session = run(scenario())

    def records() -> list[dict[str, Any]] | None:
        found = [e for e in audit_events(agent) if e.get("session") == session]
        return found if found and found[-1]["event"] == "terminal_end" else None

    events = wait_for(records, what="the terminal's audit records")
    start, end = events
    assert start["event"] == "terminal_start" and start["user"] == alice.name
    assert start["command_sha256"] == hashlib.sha256(command.encode()).hexdigest()
    assert end["reason"] == "exited" and end["status"] == 4
    assert isinstance(end["duration"], float) and end["duration"] >= 0
    assert end["bytes_out"] > 0
    assert "secret-$((40+2))" not in (agent.state_dir / "audit.log").read_text()


def test_a_terminal_ends_when_its_token_expires(start_agent: Callable[..., AgentProcess],
                                                signer: TokenSigner, alice: UnixUser) -> None:
    agent = start_agent(extra_args=["--token-max-age", "3"])

    async def scenario() -> dict[str, Any]:
        client = terminal(agent, signer.issue(alice.name))
        await client.open(80, 24)
        return (await read_to_exit(client))[1]

    assert run(scenario())["reason"] == "expired"


def test_a_detached_session_ends_after_the_grace(start_agent: Callable[..., AgentProcess],
                                                 signer: TokenSigner, alice: UnixUser) -> None:
    agent = start_agent(extra_args=["--terminal-detach-grace", "1"])

    async def scenario() -> str:
        client = terminal(agent, signer.issue(alice.name))
        session = str((await client.open(80, 24))["session"])
        client.close()  # a lost connection detaches as `detach` does
        return session

    session = run(scenario())
    wait_for(lambda: [e for e in audit_events(agent) if e.get("session") == session
                      and e["event"] == "terminal_end" and e["reason"] == "detached"],
             what="the detached session to end")
    with pytest.raises(NotFound):
        run(terminal(agent, signer.issue(alice.name)).open(80, 24, session=session))


def test_input_the_pty_does_not_take_is_bounded(start_agent: Callable[..., AgentProcess],
                                                signer: TokenSigner, alice: UnixUser) -> None:
    """A program that never reads: the client's sends wait (TCP), the agent keeps at most
    terminal_input_max_bytes and one message, and after terminal_input_stall with nothing
    taken the socket closes 4408 and the session detaches (still there to reattach)."""
    agent = start_agent(extra_args=["--terminal-input-max-bytes", "65536",
                                    "--terminal-input-stall", "1"])
    offered = 64 * 1024 * 1024  # far more than every buffer on the way holds

    async def scenario() -> int:
        client = terminal(agent, signer.issue(alice.name))
        # Raw and without echo, so the pty neither drops an overlong line (canonical mode
        # does) nor echoes it back.
        started = await client.open(80, 24, command="stty raw -echo; echo ready; sleep 100")
        await read_until(client, "ready")
        sent = 0
        with pytest.raises(TryAgain):  # from a send after the close, or from the read
            while sent < offered:
                await client.send(b"x" * 65536)
                sent += 65536
            await drain(client)
        assert client.close_code == protocol.CLOSE_INPUT_BACKLOG
        again = terminal(agent, signer.issue(alice.name))
        assert (await again.open(80, 24, session=started["session"]))["reattached"] is True
        await again.signal("KILL")
        await read_to_exit(again)
        return sent

    assert run(scenario()) < offered


def test_input_faster_than_the_program_reads_arrives_whole(
        start_agent: Callable[..., AgentProcess], signer: TokenSigner, alice: UnixUser) -> None:
    """4 MiB sent at once through a 64 KiB input bound: flow-controlled, not refused."""
    agent = start_agent(extra_args=["--terminal-input-max-bytes", "65536"])
    size = 4 * 1024 * 1024

    async def scenario() -> tuple[str, dict[str, Any]]:
        client = terminal(agent, signer.issue(alice.name))
        await client.open(80, 24, command=f"stty raw -echo; echo ready; head -c {size} | wc -c")
        await read_until(client, "ready")
        chunk = b"0123456789abcdef" * 1000
        for start in range(0, size, len(chunk)):
            await client.send(chunk[:size - start])
        return await read_to_exit(client, timeout=120)

    output, end = run(scenario())
    assert f"{size}\n" in output and end["status"] == 0, (output[-200:], end)


def test_echo_off_does_not_show_the_input(agent: AgentProcess, signer: TokenSigner,
                                          alice: UnixUser) -> None:
    async def scenario() -> tuple[str, dict[str, Any]]:
        client = terminal(agent, signer.issue(alice.name))
        await client.open(80, 24, command='read line; echo "got-${#line}"', echo=False)
        await client.send(b"hunter2\n")
        return await read_to_exit(client)

    output, end = run(scenario())
    assert "got-7" in output and "hunter2" not in output and end["status"] == 0, output


def test_a_reattach_takes_an_attached_session_over(agent: AgentProcess, signer: TokenSigner,
                                                   alice: UnixUser) -> None:
    async def scenario() -> None:
        first = terminal(agent, signer.issue(alice.name))
        session = (await first.open(80, 24))["session"]
        second = terminal(agent, signer.issue(alice.name))
        assert (await second.open(80, 24, session=session))["reattached"] is True
        with pytest.raises(Conflict):
            await drain(first)
        assert first.close_code == protocol.CLOSE_TAKEN_OVER
        await second.send(b"echo taken-$((6*7))\n")
        await read_until(second, "taken-42")
        await second.send(b"exit\n")
        assert (await read_to_exit(second))[1]["reason"] == "exited"

    run(scenario())


def test_a_reattach_counts_against_the_socket_cap(start_agent: Callable[..., AgentProcess],
                                                  signer: TokenSigner, alice: UnixUser) -> None:
    agent = start_agent(extra_args=["--max-sockets-per-user", "1"])

    async def scenario() -> None:
        first = terminal(agent, signer.issue(alice.name))
        detached = (await first.open(80, 24))["session"]
        await first.detach()
        await drain(first)
        attached = (await terminal(agent, signer.issue(alice.name)).open(80, 24))["session"]
        third = terminal(agent, signer.issue(alice.name))
        with pytest.raises(TooManySockets):  # a second socket, as a new open would be
            await third.open(80, 24, session=detached)
        assert third.close_code == protocol.CLOSE_TOO_MANY_SOCKETS
        # Taking the attached one over replaces its socket: no more sockets than before.
        taker = terminal(agent, signer.issue(alice.name))
        assert (await taker.open(80, 24, session=attached))["reattached"] is True

    run(scenario())


def test_an_http_answer_instead_of_the_upgrade_is_said(agent: AgentProcess,
                                                       signer: TokenSigner,
                                                       alice: UnixUser) -> None:
    """An agent without /v1/terminal answers 404 to the upgrade: NotFound saying so (by the
    status), not 'unreachable'."""
    url, context, what = agent_socket_target(agent.host, agent.port, "/v1/no-terminal-here",
                                             agent.tls, agent.node_name)
    client = TerminalClient(url, signer.issue(alice.name), context, what, agent.tls)
    with pytest.raises(NotFound) as raised:
        run(client.open(80, 24))
    assert raised.value.hint and "upgrade" in raised.value.hint


def test_leftovers_that_leave_the_session_die_with_it_without_cgroups(
        start_agent: Callable[..., AgentProcess], signer: TokenSigner, alice: UnixUser) -> None:
    """With --cgroups off the subreaper finds a session's processes by its session and by
    MARCO_EXECUTION_ID=terminal-ID: one that left the session (setsid) dies with it too."""
    agent = start_agent(extra_args=["--cgroups", "off"])
    marker = f"sleep 77{agent.port}"

    def leftovers() -> list[str]:
        out = subprocess.run(["pgrep", "-u", str(alice.uid), "-f", marker],
                             capture_output=True, text=True)
        return out.stdout.split()

    async def scenario() -> dict[str, Any]:
        client = terminal(agent, signer.issue(alice.name))
        await client.open(80, 24, command=f"setsid -f {marker}; echo forked; exit 0")
        return (await read_to_exit(client))[1]

    try:
        assert run(scenario())["status"] == 0
        wait_for(lambda: not leftovers(), what="the setsid'd sleep to be killed")
    finally:
        subprocess.run(["pkill", "-KILL", "-u", str(alice.uid), "-f", marker], check=False)


def test_a_client_that_stops_reading_is_not_dropped(start_agent: Callable[..., AgentProcess],
                                                    signer: TokenSigner,
                                                    alice: UnixUser) -> None:
    """Its output held back by flow control, the client answers no ping (its pong is behind
    the unread output): the agent keeps it, as a stopped terminal. Pings every 1 s, 1 s for
    the pong: Tornado's ping timeout dropped it after about 2 s."""
    agent = start_agent(extra_args=["--websocket-ping-interval", "1",
                                    "--websocket-ping-timeout", "1"])

    async def scenario() -> dict[str, Any]:
        client = terminal(agent, signer.issue(alice.name))
        await client.open(80, 24, command="yes")
        await read_until(client, "y\r\ny\r\n")
        await asyncio.sleep(5)  # not reading for several ping intervals: what is tested
        await read_until(client, "y\r\n" * 1000)  # still flowing
        await client.signal("INT")
        return (await read_to_exit(client))[1]

    assert run(scenario())["signal"] == "INT"


def test_piped_input_to_a_slow_silent_reader_is_not_dropped(
        start_agent: Callable[..., AgentProcess], signer: TokenSigner, alice: UnixUser) -> None:
    """A program that takes its input slowly and prints nothing (`mysql < dump.sql`): while
    the agent holds input for room in the pty, Tornado reads nothing more of the socket, the
    client's pongs included; that is no dead client (review 10b: closed 1001 after 2 s)."""
    agent = start_agent(extra_args=["--terminal-input-max-bytes", "65536",
                                    "--websocket-ping-interval", "1",
                                    "--websocket-ping-timeout", "1"])
    size = 1024 * 1024

    async def scenario() -> tuple[str, int | None]:
        client = terminal(agent, signer.issue(alice.name))
        await client.open(80, 24, echo=False, command=(
            "stty raw -echo; echo ready; i=0; "
            f"while [ $i -lt {size // 8192} ]; do head -c 8192 >/dev/null; sleep 0.1; "
            "i=$((i+1)); done; echo all-read"))
        await read_until(client, "ready")
        await asyncio.sleep(3)  # the pongs of the pings so far are in: nothing is unread
        chunk = b"x" * 16384
        for _ in range(size // len(chunk)):
            await client.send(chunk)  # waits while the agent holds input back
        return await read_until(client, "all-read", timeout=60), client.close_code

    text, code = run(scenario())
    assert "all-read" in text and code is None


class UnusedPeer:
    """The socket of a session that must never be attached (it ends while it starts)."""

    def write_message(self, message: str | bytes, binary: bool = False) -> Any:
        raise AssertionError(f"an ended session was attached: {message!r:.80}")

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        raise AssertionError("an ended session closed a socket")


def test_a_session_ended_while_it_starts_is_hung_up_and_not_attached(alice: UnixUser,
                                                                     bob: UnixUser) -> None:
    """A logout while the shell is still being started (in this process: the session is
    registered, its Popen done, its start not yet answered): the start fails, the pty is
    closed, the program killed at once (it ignores the hang-up), the session forgotten."""
    marker = "sleep 7713"

    async def scenario() -> None:
        manager = TerminalManager(TerminalSettings(), Isolation(IsolationSettings("off", 0, 0)),
                                  UserResolver())
        user = manager.resolver.resolve(alice.name)
        starting = asyncio.create_task(manager.start(
            user, "token", time.time() + 3600,
            OpenRequest(80, 24, command=f"trap '' HUP; {marker}"), UnusedPeer(), "test"))
        await asyncio.sleep(0)  # one step of the start: up to its wait for the new process
        (session,) = manager.sessions.values()
        assert session.pid is None, "the start was not caught while it starts"

        def refuse(token: str) -> None:
            raise AuthenticationError("logged out")

        manager.check_tokens(refuse)
        with pytest.raises(AuthenticationError):
            await starting
        assert session.master == -1 and session.reason == "logged out"
        await asyncio.wait_for(asyncio.shield(session.done), READ_TIMEOUT)
        assert not manager.sessions and session.returncode is not None

    try:
        run(scenario())
    finally:
        subprocess.run(["pkill", "-KILL", "-u", str(alice.uid), "-f", marker], check=False)


def test_stopping_the_agent_ends_its_terminals(start_agent: Callable[..., AgentProcess],
                                               signer: TokenSigner, alice: UnixUser) -> None:
    agent = start_agent()

    async def scenario() -> dict[str, Any]:
        client = terminal(agent, signer.issue(alice.name))
        await client.open(80, 24, command="trap '' HUP; sleep 100")  # ignores the hang-up
        await wait_async(lambda: processes_of(alice.uid, "sleep"), "sleep to run")
        stopping = asyncio.get_running_loop().run_in_executor(None, agent.stop)
        _, end = await read_to_exit(client)
        await stopping
        return end

    end = run(scenario())
    assert end["reason"] == "stopping" and end["signal"] == "KILL", end
    assert not processes_of(alice.uid, "sleep")


def test_terminal_sockets_count_against_the_socket_cap(start_agent: Callable[..., AgentProcess],
                                                       signer: TokenSigner,
                                                       alice: UnixUser) -> None:
    agent = start_agent(extra_args=["--max-sockets-per-user", "1"])

    async def scenario() -> None:
        await terminal(agent, signer.issue(alice.name)).open(80, 24)
        second = terminal(agent, signer.issue(alice.name))
        with pytest.raises(TooManySockets):
            await second.open(80, 24)
        assert second.close_code == 4429

    run(scenario())
