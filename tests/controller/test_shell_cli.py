"""`marco shell NODE` (issue 16) in a real pseudo-terminal on the test side, as a real user
logged in with `marco login`, through a real controller (to find the node and record the run)
and a real agent (the terminal)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from marco.asciicast import run_title
from marco.controller_client import ControllerClient
from marco.shell_cli import BACKLOG_BYTES, Recording
from marco.tokens import TokenSigner
from tests.support.agent_process import AgentProcess
from tests.support.controller_process import ControllerProcess
from tests.support.users import UnixUser
from tests.support.waiting import wait_for

MARCO = Path(sys.executable).parent / "marco"
WAIT = 30.0  # seconds any one expected output may take on a loaded machine


def cli_env(home: Path, controller: ControllerProcess, **more: str) -> dict[str, str]:
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "MARCO_CONTROLLER": controller.url,
           "TERM": "xterm", **more}
    if controller.pki is not None:
        env["MARCO_TLS_CA"] = str(controller.pki.ca_file)
    return env


@pytest.fixture(scope="module")
def alice_home(one_agent: tuple[ControllerProcess, AgentProcess], alice: UnixUser,
               tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A HOME where `marco login` stored alice's token and client certificate."""
    controller, _ = one_agent
    home = tmp_path_factory.mktemp("alice-home")
    out = subprocess.run([str(MARCO), "login", "--user", alice.name, "--password-stdin"],
                         input=alice.password + "\n", capture_output=True, text=True,
                         env=cli_env(home, controller), timeout=60)
    assert out.returncode == 0, out.stderr
    return home


class PtyCli:
    """The CLI with a fresh pseudo-terminal as its stdin, stdout and stderr; the test holds
    the master side (what a terminal emulator would) and keeps the slave open to read its
    modes after the CLI exits."""

    def __init__(self, args: list[str], env: dict[str, str], rows: int = 24,
                 cols: int = 80) -> None:
        self.master, self.slave = os.openpty()
        self.set_size(rows, cols)
        self.mode_before = termios.tcgetattr(self.slave)
        self.seen = b""
        self.position = 0  # where the next expect starts looking
        self.process = subprocess.Popen([str(MARCO), *args], stdin=self.slave,
                                        stdout=self.slave, stderr=self.slave, env=env,
                                        start_new_session=True)

    def set_size(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def expect(self, pattern: bytes, timeout: float = WAIT) -> re.Match[bytes]:
        """Read the terminal until `pattern` (a regex) shows after the last match."""
        deadline = time.monotonic() + timeout
        while (found := re.compile(pattern).search(self.seen, self.position)) is None:
            left = deadline - time.monotonic()
            readable, _, _ = select.select([self.master], [], [], max(left, 0))
            if not readable:
                raise AssertionError(f"no {pattern!r} within {timeout} s; the terminal "
                                     f"showed: {self.seen[self.position:]!r}")
            self.seen += os.read(self.master, 65536)
        self.position = found.end()
        return found

    def wait(self, timeout: float = WAIT) -> int:
        return self.process.wait(timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def pty_cli() -> Iterator[Any]:
    """Factory of PtyCli, all closed (killed if still running) at the end."""
    started: list[PtyCli] = []

    def start(*args: str, **kwargs: Any) -> PtyCli:
        cli = PtyCli(list(args), **kwargs)
        started.append(cli)
        return cli

    yield start
    for cli in started:
        cli.close()


def pts_size(pts: str) -> str:
    """The node's terminal's size as its programs see it (`stty size`: rows cols)."""
    return subprocess.run(["stty", "-F", pts, "size"], capture_output=True, text=True,
                          check=False).stdout.strip()


def runs_of(controller: ControllerProcess, signer: TokenSigner, user: UnixUser,
            title: str) -> list[dict[str, Any]]:
    runs = controller.get_json("/api/runs?limit=200", signer.issue(user.name))["runs"]
    return [run for run in runs if run["title"] == title]


def recorded_output(controller: ControllerProcess, signer: TokenSigner, user: UnixUser,
                    run_id: str) -> str:
    run = controller.get_json(f"/api/runs/{run_id}?limit=1000", signer.issue(user.name))
    return "".join(frame[2] for event in run["events"] if event["type"] == "term"
                   for frame in event["frames"] if frame[1] == "o")


def test_an_interactive_shell_in_a_real_terminal(one_agent, alice: UnixUser, alice_home: Path,
                                                 signer: TokenSigner, pty_cli) -> None:
    controller, agent = one_agent
    node = agent.node_name
    before = {run["id"] for run in runs_of(controller, signer, alice, f"shell on {node}")}
    cli = pty_cli("shell", node, env=cli_env(alice_home, controller), rows=24, cols=80)
    # A login shell as alice on a pseudo-terminal of the node's, in her home.
    cli.type(b"tty; id -un; pwd; echo ready-$((6*7))\r")
    pts = cli.expect(rb"(/dev/pts/\d+)").group(1).decode()
    cli.expect(re.escape(alice.name.encode()))
    cli.expect(re.escape(alice.home.encode()))
    cli.expect(b"ready-42")
    assert pts_size(pts) == "24 80"
    # Our window grows: the node's terminal follows, and its programs see it.
    cli.set_size(50, 132)
    cli.process.send_signal(signal.SIGWINCH)
    wait_for(lambda: pts_size(pts) == "50 132", what="the resize on the node")
    cli.type(b"stty size\r")
    cli.expect(rb"\r50 132\r\n")
    # Ctrl-C reaches the node's foreground program, not the CLI; the shell goes on.
    cli.type(b"sleep 100\r")
    wait_for(lambda: subprocess.run(["pgrep", "-u", alice.name, "-x", "sleep"],
                                    capture_output=True).returncode == 0,
             what="sleep running on the node")
    cli.type(b"\x03")
    cli.type(b"echo rc-$?\r")
    cli.expect(b"rc-130")
    assert cli.process.poll() is None
    cli.type(b"exit 3\r")
    assert cli.wait() == 3
    cli.expect(re.escape(f"Connection to {node} closed.".encode()))
    # The terminal is left as it was found (raw mode undone).
    assert termios.tcgetattr(cli.slave) == cli.mode_before
    # The session is a run of kind terminal, its output recorded, ended with its status.
    runs = [run for run in runs_of(controller, signer, alice, f"shell on {node}")
            if run["id"] not in before]
    assert len(runs) == 1, runs
    run = runs[0]
    cli.expect(re.escape(
        f"recorded as run {run['id']}  {controller.url}/runs/{run['id']}".encode()))
    assert run["kind"] == "terminal" and run["hosts"] == [node]
    assert run["status"] == "failed" and run["stats"][node]["rc"] == 3
    assert run["meta"]["node"] == node and run["meta"]["cols"] == 80
    recorded = recorded_output(controller, signer, alice, run["id"])
    assert "ready-42" in recorded and "50 132" in recorded


def test_a_command_gives_its_exit_status(one_agent, alice_home: Path, pty_cli) -> None:
    controller, agent = one_agent
    env = cli_env(alice_home, controller)
    failing = pty_cli("shell", agent.node_name, "--no-record", "--", "false", env=env)
    assert failing.wait() == 1
    assert termios.tcgetattr(failing.slave) == failing.mode_before
    killed = pty_cli("shell", agent.node_name, "--no-record", "--", "kill -TERM $$", env=env)
    assert killed.wait() == 128 + signal.SIGTERM
    output = pty_cli("shell", agent.node_name, "--no-record", "--",
                     "echo out-$((6*7)); test -t 0 && echo on-a-tty", env=env)
    assert output.wait() == 0
    output.expect(b"out-42\r\non-a-tty")


def test_sigterm_restores_the_terminal_and_hangs_up(one_agent, alice: UnixUser,
                                                     alice_home: Path, pty_cli) -> None:
    controller, agent = one_agent
    cli = pty_cli("shell", agent.node_name, "--no-record", "--",
                  "echo up-$((6*7)); sleep 101", env=cli_env(alice_home, controller))
    cli.expect(b"up-42")
    sleeping = ["pgrep", "-u", alice.name, "-f", "^sleep 101$"]
    wait_for(lambda: subprocess.run(sleeping, capture_output=True).returncode == 0,
             what="sleep running on the node")
    cli.process.send_signal(signal.SIGTERM)
    assert cli.wait() == 128 + signal.SIGTERM
    assert termios.tcgetattr(cli.slave) == cli.mode_before
    cli.expect(re.escape(f"Connection to {agent.node_name} closed (SIGTERM).".encode()))
    # The node's foreground programs were hung up, as when an ssh client is killed.
    wait_for(lambda: subprocess.run(sleeping, capture_output=True).returncode == 1,
             what="the node's sleep hung up")


def test_without_a_terminal_the_end_of_stdin_is_one_ctrl_d(one_agent, alice: UnixUser,
                                                           alice_home: Path,
                                                           signer: TokenSigner) -> None:
    controller, agent = one_agent
    node = agent.node_name
    before = {run["id"] for run in runs_of(controller, signer, alice, f"{node}: stty size; cat")}
    # `cat` reads the piped line, then the Ctrl-D the end of stdin types: the end of its input.
    out = subprocess.run([str(MARCO), "shell", node, "--no-record", "--", "stty size; cat"],
                         input="piped-line\n", capture_output=True, text=True,
                         env=cli_env(alice_home, controller, COLUMNS="100", LINES="30"),
                         timeout=60)
    assert out.returncode == 0, out.stderr
    # (the terminal echoes the line too, before or after `stty size` ran)
    assert "30 100\n" in out.stdout and "piped-line" in out.stdout, out.stdout
    assert "Traceback" not in out.stderr and "Connection" not in out.stderr
    # --no-record: no run was made.
    after = {run["id"] for run in runs_of(controller, signer, alice, f"{node}: stty size; cat")}
    assert after == before


def test_clear_errors(one_agent, alice_home: Path, tmp_path: Path) -> None:
    controller, _ = one_agent
    unknown = subprocess.run([str(MARCO), "shell", "no-such-node"], capture_output=True,
                             text=True, env=cli_env(alice_home, controller), timeout=60)
    assert unknown.returncode == 2, unknown
    assert unknown.stderr == "marco: unknown node: no-such-node (see: marco nodes)\n"
    nobody = subprocess.run([str(MARCO), "shell", "anything"], capture_output=True,
                            text=True, env=cli_env(tmp_path, controller), timeout=60)
    assert nobody.returncode == 255, nobody
    assert "no Marco token" in nobody.stderr and "marco login" in nobody.stderr
    assert nobody.stderr.startswith("marco: ") and nobody.stderr.count("\n") == 1
    assert nobody.stderr.count("marco login") == 1, nobody.stderr
    assert "Traceback" not in nobody.stderr


def test_a_controller_that_does_not_record_is_said_once(start_controller, start_agent,
                                                        unique_name, alice: UnixUser,
                                                        signer: TokenSigner,
                                                        tmp_path: Path) -> None:
    controller = start_controller(extra_args=["--no-terminal-record"])
    agent = start_agent(unique_name("node"), announce=True)
    wait_for(lambda: agent.node_name in controller.inventory_hosts(signer.issue(alice.name)),
             what="the agent discovered")
    env = cli_env(tmp_path, controller)
    login = subprocess.run([str(MARCO), "login", "--user", alice.name, "--password-stdin"],
                           input=alice.password + "\n", capture_output=True, text=True,
                           env=env, timeout=60)
    assert login.returncode == 0, login.stderr
    out = subprocess.run([str(MARCO), "shell", agent.node_name, "--",
                          "echo rec-$((6*7)); echo rec-done"],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env,
                         timeout=60)
    # The session went on to its end; the refusal was said once, with its reason.
    assert out.returncode == 0, out.stderr
    assert "rec-42" in out.stdout and "rec-done" in out.stdout
    assert out.stderr.count("not recorded") == 1, out.stderr
    assert "terminal recording is off on this controller" in out.stderr
    assert runs_of(controller, signer, alice,
                   f"{agent.node_name}: echo rec-$((6*7)); echo rec-done") == []


def test_a_node_that_is_down_is_one_clear_line(start_controller, alice: UnixUser,
                                               signer: TokenSigner, tmp_path: Path) -> None:
    with socket.socket() as closed:  # bound, never listening: every connection is refused
        closed.bind(("127.0.0.1", 0))
        controller = start_controller(extra_args=[
            "--node", f"gone=127.0.0.1:{closed.getsockname()[1]}"])
        token = signer.issue(alice.name)
        wait_for(lambda: [node for node in controller.get_json("/api/nodes", token)["nodes"]
                          if node["name"] == "gone" and not node["alive"]
                          and node.get("error")], what="the controller to see gone down")
        out = subprocess.run([str(MARCO), "shell", "gone"], capture_output=True, text=True,
                             env=cli_env(tmp_path, controller, MARCO_TOKEN=token), timeout=60)
    assert out.returncode == 255, out
    assert out.stderr.startswith("marco: the controller sees gone down (")
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_the_node_ending_the_session_is_said_as_ssh_does(start_controller, start_agent,
                                                         unique_name, alice: UnixUser,
                                                         signer: TokenSigner, tmp_path: Path,
                                                         pty_cli) -> None:
    controller = start_controller()
    agent = start_agent(unique_name("node"), announce=True,
                        extra_args=["--terminal-idle-timeout", "1"])
    token = signer.issue(alice.name)
    wait_for(lambda: agent.node_name in controller.inventory_hosts(token),
             what="the agent discovered")
    cli = pty_cli("shell", agent.node_name, "--no-record", "--", "echo idle-$((6*7)); sleep 60",
                  env=cli_env(tmp_path, controller, MARCO_TOKEN=token, **controller.pki.client_env()))
    cli.expect(b"idle-42")
    # Nothing typed, nothing written: the agent ends it for idleness, and the CLI says so.
    assert cli.wait() == 255
    cli.expect(re.escape(f"Connection to {agent.node_name} closed: no input or output for too "
                         "long (the node's terminal_idle_timeout).".encode()))
    assert termios.tcgetattr(cli.slave) == cli.mode_before


def new_runs(controller: ControllerProcess, signer: TokenSigner, user: UnixUser, title: str,
             before: set[str]) -> list[dict[str, Any]]:
    return [run for run in runs_of(controller, signer, user, title) if run["id"] not in before]


def measured(args: list[str], env: dict[str, str], timeout: float = 120.0) -> tuple[int, int]:
    """Run the CLI with stdin and stdout on /dev/null: its exit status and its peak RSS
    (KiB, from wait4: this one process's own)."""
    process = subprocess.Popen([str(MARCO), *args], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    watchdog = threading.Timer(timeout, process.kill)  # a hang fails the test, not the run
    watchdog.start()
    try:
        _, status, usage = os.wait4(process.pid, 0)
    finally:
        watchdog.cancel()
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.stderr is not None
    errors = process.stderr.read().decode()
    process.stderr.close()
    assert "Traceback" not in errors and "not recorded" not in errors, errors
    return process.returncode, usage.ru_maxrss


def test_piped_input_is_not_echoed_into_the_recording(one_agent, alice: UnixUser,
                                                      alice_home: Path,
                                                      signer: TokenSigner) -> None:
    controller, agent = one_agent
    node = agent.node_name
    command = "sleep 1; read -s p; echo got-${#p}"  # the secret arrives before read -s
    before = {run["id"] for run in runs_of(controller, signer, alice, f"{node}: {command}")}
    out = subprocess.run([str(MARCO), "shell", node, "--", command],
                         input="hunter2-secret\n", capture_output=True, text=True,
                         env=cli_env(alice_home, controller), timeout=60)
    assert out.returncode == 0, out.stderr
    assert "got-14" in out.stdout and "hunter2" not in out.stdout, out.stdout
    runs = new_runs(controller, signer, alice, f"{node}: {command}", before)
    assert len(runs) == 1, runs
    recorded = recorded_output(controller, signer, alice, runs[0]["id"])
    assert "got-14" in recorded and "hunter2" not in recorded, recorded


def test_stdin_without_a_final_newline_ends(one_agent, alice_home: Path) -> None:
    controller, agent = one_agent
    for given, count in (("abc", "3"), ("abc\n", "4")):
        out = subprocess.run([str(MARCO), "shell", agent.node_name, "--no-record", "--",
                              "wc -c"], input=given, capture_output=True, text=True,
                             env=cli_env(alice_home, controller), timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.replace("abc", "").split() == [count], out.stdout


def test_a_long_command_is_recorded(one_agent, alice: UnixUser, alice_home: Path,
                                    signer: TokenSigner) -> None:
    controller, agent = one_agent
    node = agent.node_name
    command = "echo long-$((6*7)) " + "x" * 1200
    title = run_title(node, command)
    before = {run["id"] for run in runs_of(controller, signer, alice, title)}
    out = subprocess.run([str(MARCO), "shell", node, "--", command], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, env=cli_env(alice_home, controller),
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "not recorded" not in out.stderr and "long-42" in out.stdout, out.stderr
    runs = new_runs(controller, signer, alice, title, before)
    assert len(runs) == 1, runs
    assert len(title) <= 1000 and runs[0]["meta"]["command"] == command
    assert runs[0]["status"] == "ok"


def test_sigterm_while_the_recording_ends_restores_the_terminal(one_agent, alice: UnixUser,
                                                                alice_home: Path,
                                                                signer: TokenSigner,
                                                                pty_cli) -> None:
    controller, agent = one_agent
    node = agent.node_name
    command = "echo up-$((6*7)); read line; echo bye-$line"
    before = {run["id"] for run in runs_of(controller, signer, alice, f"{node}: {command}")}
    cli = pty_cli("shell", node, "--", command, env=cli_env(alice_home, controller))
    cli.expect(b"up-42")
    wait_for(lambda: new_runs(controller, signer, alice, f"{node}: {command}", before),
             what="the session's run created")
    # The controller stops answering: the recording's end waits on it.
    os.kill(controller.process.pid, signal.SIGSTOP)
    try:
        cli.type(b"now\r")
        cli.expect(re.escape(f"Connection to {node} closed.".encode()))
        # Still waiting on the controller, the terminal is already as it was found.
        assert cli.process.poll() is None
        assert termios.tcgetattr(cli.slave) == cli.mode_before
        cli.process.send_signal(signal.SIGTERM)
        assert cli.wait() == 128 + signal.SIGTERM
        assert termios.tcgetattr(cli.slave) == cli.mode_before
        cli.expect(b"the end of the recording was cut short \\(SIGTERM\\)")
    finally:
        os.kill(controller.process.pid, signal.SIGCONT)


def test_the_recording_keeps_the_cli_small(one_agent, alice: UnixUser, alice_home: Path,
                                           signer: TokenSigner) -> None:
    controller, agent = one_agent
    node = agent.node_name
    command = "yes | head -c 40000000; echo"  # 60 MB through the terminal (\r\n), < the cap
    env = cli_env(alice_home, controller)
    before = {run["id"] for run in runs_of(controller, signer, alice, f"{node}: {command}")}
    status, unrecorded = measured(["shell", node, "--no-record", "--", command], env)
    assert status == 0
    status, recorded = measured(["shell", node, "--", command], env)
    assert status == 0
    # Output waits for the upload past a bounded backlog: a few MiB more at most, not a
    # share of the output's size (as before: one event a request, unbounded: +33 MiB).
    assert recorded < unrecorded + 12 * 1024, (recorded, unrecorded)
    runs = new_runs(controller, signer, alice, f"{node}: {command}", before)
    assert len(runs) == 1 and runs[0]["status"] == "ok", runs


def test_output_waits_for_the_upload_past_a_bounded_backlog(one_agent, alice: UnixUser,
                                                            signer: TokenSigner) -> None:
    """In-process against the real controller, stopped (SIGSTOP) so that nothing is
    posted: output fed to the recording stops at the backlog's bound, then goes on, and
    all of it arrives in order, several events a request, once the controller answers."""
    controller, agent = one_agent
    node = agent.node_name
    client = ControllerClient(controller.url, signer.issue(alice.name),
                              ca=str(controller.pki.ca_file))
    chunk = b"y" * 65536
    said: list[str] = []

    async def feed(recording: Recording, chunks: int) -> None:
        for _ in range(chunks):
            await recording.output(chunk)

    async def session() -> tuple[Recording, bool, int]:
        recording = Recording(client, node, said.append)
        os.kill(controller.process.pid, signal.SIGSTOP)
        try:
            recording.start({"shell": "/bin/sh", "session": "s"}, 80, 24, "xterm", "bounded")
            feeder = asyncio.ensure_future(feed(recording, 32))  # 2 MiB
            for _ in range(20):  # turns of the loop, no time: the feeder blocks or ends
                await asyncio.sleep(0)
            blocked, held = not feeder.done(), recording.recorder.pending_bytes
        finally:
            os.kill(controller.process.pid, signal.SIGCONT)
        await asyncio.wait_for(feeder, WAIT)
        await recording.finish({"ok": 1, "rc": 0})
        return recording, blocked, held

    recording, blocked, held = asyncio.run(session())
    assert blocked and held <= BACKLOG_BYTES + 2 * len(chunk), held
    assert recording.run_id is not None and said == [
        f"recorded as run {recording.run_id}  {recording.url}"], said
    run = controller.get_json(f"/api/runs/{recording.run_id}?limit=1000",
                              signer.issue(alice.name))
    assert run["status"] == "ok"
    assert recorded_output(controller, signer, alice, recording.run_id) == "y" * 32 * 65536
