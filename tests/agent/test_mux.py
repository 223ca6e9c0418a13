"""marco-mux (issue 14, item 4): a real mux process, real agents, real Unix users.

Agent connections are counted by a TCP relay in front of the agent (each accept is one TCP +
TLS connection the mux made), so "kept" is checked on the wire, not by asking the mux.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from marco.errors import (
    AuthenticationError,
    ConfigError,
    MuxUnavailable,
    NotFound,
    PermissionDenied,
)
from marco.mux import LOG_NAME, SOCKET_NAME, ClientGone, Frames
from marco.mux_client import MuxClient
from marco.tls import ClientTls
from marco.tokens import TokenSigner
from tests.support.agent_process import AgentProcess
from tests.support.paths import ROOT
from tests.support.pki import TestPki
from tests.support.processes import alive
from tests.support.users import UnixUser
from tests.support.waiting import wait_for


class Relay:
    """A TCP relay to the agent that counts the connections it accepted."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            upstream = socket.create_connection(self.target)
            self._sockets += [downstream, upstream]
            for source, sink in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (sink, source):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()
        for sock in self._sockets:
            sock.close()


def owner(pid: int) -> int:
    return os.stat(f"/proc/{pid}").st_uid


@pytest.fixture
def muxes() -> Iterator[list[int]]:
    """Mux pids a test started, killed afterwards (they would exit idle on their own)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def private_dirs() -> Iterator[Callable[[UnixUser | None], Path]]:
    """Factory: a fresh directory under /tmp owned by `user` (root without), mode 0700."""
    made: list[Path] = []

    def make(user: UnixUser | None = None) -> Path:
        path = Path(tempfile.mkdtemp(prefix="marco-mux-test-", dir="/tmp"))
        if user is not None:
            os.chown(path, user.uid, user.gid)
        made.append(path)
        return path

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


def tls_copy(pki: TestPki, directory: Path, user: UnixUser | None = None) -> ClientTls:
    """The test client's TLS files copied into `directory` (readable by `user`)."""
    tls = pki.client_tls()
    copies = []
    for name, source in (("ca.pem", tls.ca_file), ("client.pem", tls.cert_file),
                         ("client.key", tls.key_file), ("crl.pem", tls.crl_file)):
        target = directory / name
        shutil.copyfile(str(source), target)
        os.chmod(target, 0o600)
        if user is not None:
            os.chown(target, user.uid, user.gid)
        copies.append(str(target))
    return ClientTls(*copies)


def open_mux(agent: AgentProcess, token: str, tls: ClientTls, runtime: Path,
             port: int | None = None, start: str = "wait", **environ: str) -> MuxClient:
    return MuxClient.open("127.0.0.1", port or agent.port, token, tls=tls, node=agent.node_name,
                          start=start,
                          environ={"PATH": os.environ["PATH"], "HOME": str(runtime),
                                   "XDG_RUNTIME_DIR": str(runtime), **environ})


CLIENT_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from marco.mux_client import MuxClient
from marco.tls import ClientTls
a = json.loads(sys.argv[2])
with MuxClient.open(a["host"], a["port"], a["token"], tls=ClientTls(*a["tls"]),
                    node=a["node"]) as client:
    result = client.run(a["command"])
    print(json.dumps({"pid": client.pid, "rc": result.rc, "stdout": result.stdout.decode(),
                      "id": result.id}))
"""


def run_as(user: UnixUser | None, runtime: Path, arguments: dict[str, Any],
           **popen: Any) -> subprocess.Popen[str]:
    """The client script as `user` (root without), its mux in `runtime`."""
    identity: dict[str, Any] = {} if user is None else {
        "user": user.uid, "group": user.gid, "extra_groups": []}
    return subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, str(ROOT), json.dumps(arguments)],
                            env={"PATH": os.environ["PATH"], "HOME": str(runtime),
                                 "XDG_RUNTIME_DIR": str(runtime)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
                            **identity, **popen)


def client_arguments(agent: AgentProcess, token: str, tls: ClientTls,
                     command: str | list[str]) -> dict[str, Any]:
    return {"host": agent.host, "port": agent.port, "token": token, "node": agent.node_name,
            "tls": [tls.ca_file, tls.cert_file, tls.key_file, tls.crl_file], "command": command}


def test_calls_through_the_mux_keep_one_agent_connection(start_agent, signer: TokenSigner,
                                                        alice: UnixUser, pki: TestPki,
                                                        private_dirs, muxes) -> None:
    """Five 'tasks' (each a new MuxClient: run, put, get, close) make one TCP + TLS
    connection to the agent; answers, files and errors come back as from AgentClient."""
    agent = start_agent()
    relay = Relay(agent.host, agent.port)
    runtime = private_dirs()
    tls = tls_copy(pki, runtime)
    token = signer.issue(alice.name)
    try:
        for number in range(5):
            with open_mux(agent, token, tls, runtime, port=relay.port) as client:
                muxes.append(client.pid)
                result = client.run("echo out $0; echo err >&2; exit 3", stdin=b"")
                assert (result.rc, result.stdout, result.stderr) == (3, b"out /bin/sh\n",
                                                                     b"err\n")
                fed = client.run(["cat"], stdin=bytes(range(256)) * 5000)
                assert fed.stdout == bytes(range(256)) * 5000
                payload = os.urandom(3 * 1024 * 1024 + number)
                client.put_file(io.BytesIO(payload), f"mux-{number}.bin", size=len(payload))
                fetched = io.BytesIO()
                assert client.get_file(f"mux-{number}.bin", fetched) == len(payload)
                assert fetched.getvalue() == payload
                with pytest.raises(NotFound):
                    client.get_file("no-such-file", io.BytesIO())
                # Still usable after an error answer:
                assert client.run(["id", "-un"]).stdout == alice.name.encode() + b"\n"
        assert len(set(muxes)) == 1
        assert relay.accepted == 1
        with open_mux(agent, token, tls, runtime, port=relay.port) as client:
            refused = os.urandom(2 * 1024 * 1024)  # the agent refuses before the body
            with pytest.raises(PermissionDenied):
                client.put_file(io.BytesIO(refused), "/root/mux-refused", size=len(refused))
            assert client.run(["true"]).rc == 0  # on a new connection: a refused upload's
        assert relay.accepted == 2               # is not reusable (AgentClient closes it)
        with open_mux(agent, "forged.token.value", tls, runtime, port=relay.port) as client:
            with pytest.raises(AuthenticationError):
                client.run(["true"])
    finally:
        relay.close()


def test_socket_is_private_and_another_uid_is_refused(start_agent, signer: TokenSigner,
                                                      alice: UnixUser, bob: UnixUser,
                                                      pki: TestPki, private_dirs, muxes) -> None:
    """alice's mux: socket 0600 in a 0700 directory of hers; bob cannot reach the socket, and
    root (whom file modes do not stop) is refused by the peer-uid check, which is logged."""
    agent = start_agent()
    runtime = private_dirs(alice)
    tls = tls_copy(pki, runtime, alice)
    process = run_as(alice, runtime, client_arguments(agent, signer.issue(alice.name), tls,
                                                      ["id", "-un"]))
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    answer = json.loads(out)
    muxes.append(answer["pid"])
    assert answer["stdout"] == alice.name + "\n" and owner(answer["pid"]) == alice.uid
    directory = runtime / "marco"
    for path, mode in ((directory, 0o700), (directory / SOCKET_NAME, 0o600)):
        info = os.lstat(path)
        assert (stat.S_IMODE(info.st_mode), info.st_uid) == (mode, alice.uid), path
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(directory / SOCKET_NAME))
    frames = Frames(sock)
    try:
        assert frames.head()["error"] == MuxUnavailable.code
        with pytest.raises(ClientGone):
            frames.head()  # and closed
    finally:
        frames.close()
    wait_for(lambda: "refused a connection from uid 0" in (directory / LOG_NAME).read_text(),
             what="the refusal in the mux log")
    probe = subprocess.run(
        [sys.executable, "-c", "import socket, sys; s = socket.socket(socket.AF_UNIX); "
         "s.connect(sys.argv[1])", str(directory / SOCKET_NAME)],
        user=bob.uid, group=bob.gid, extra_groups=[], capture_output=True, text=True, timeout=30)
    assert probe.returncode != 0 and "PermissionError" in probe.stderr
    assert alive(answer["pid"])  # a refusal does not stop the mux


def test_a_changed_certificate_gets_a_new_agent_connection(start_agent, signer: TokenSigner,
                                                           alice: UnixUser, pki: TestPki,
                                                           private_dirs, muxes) -> None:
    """A renewed client certificate (its file's mtime changed) is used at once: the next call
    makes a new agent connection instead of reusing the one made with the old file."""
    agent = start_agent()
    relay = Relay(agent.host, agent.port)
    runtime = private_dirs()
    tls = tls_copy(pki, runtime)
    token = signer.issue(alice.name)
    try:
        for _ in range(2):
            with open_mux(agent, token, tls, runtime, port=relay.port) as client:
                muxes.append(client.pid)
                assert client.run(["true"]).rc == 0
        assert relay.accepted == 1
        stamp = os.stat(tls.cert_file).st_mtime
        os.utime(tls.cert_file, (stamp + 10, stamp + 10))
        for _ in range(2):
            with open_mux(agent, token, tls, runtime, port=relay.port) as client:
                assert client.run(["true"]).rc == 0
        assert relay.accepted == 2
    finally:
        relay.close()


def test_two_users_two_muxes_each_audited_as_itself(start_agent, signer: TokenSigner,
                                                    alice: UnixUser, bob: UnixUser,
                                                    pki: TestPki, private_dirs, muxes) -> None:
    """alice and bob each reach the agent through a mux of their own (a process of theirs):
    each command runs, and is audited, as the token's user."""
    agent = start_agent()
    answers = {}
    for user in (alice, bob):
        runtime = private_dirs(user)
        tls = tls_copy(pki, runtime, user)
        process = run_as(user, runtime, client_arguments(agent, signer.issue(user.name), tls,
                                                         "id -un"))
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        answers[user.name] = answer = json.loads(out)
        muxes.append(answer["pid"])
        assert answer["stdout"] == user.name + "\n" and owner(answer["pid"]) == user.uid
    assert answers[alice.name]["pid"] != answers[bob.name]["pid"]

    def started() -> dict[str, str]:
        events = [json.loads(line) for line in (agent.state_dir / "audit.log").read_text()
                  .splitlines()]
        return {event["id"]: event["user"] for event in events
                if event["event"] == "execution.start"}

    expected = {answer["id"]: name for name, answer in answers.items()}
    wait_for(lambda: all(started().get(id_) == name for id_, name in expected.items()),
             what="both users' audit records")


def test_a_dead_mux_is_replaced_and_an_unsafe_directory_refused(start_agent, signer: TokenSigner,
                                                                alice: UnixUser, pki: TestPki,
                                                                private_dirs, muxes) -> None:
    """A mux killed (its socket left behind) is replaced by the next client; a socket
    directory others could enter is never used (the connection then goes direct)."""
    agent = start_agent()
    runtime = private_dirs()
    tls = tls_copy(pki, runtime)
    token = signer.issue(alice.name)
    with open_mux(agent, token, tls, runtime) as client:
        first = client.pid
        muxes.append(first)
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: not alive(first), what="the mux gone")
    assert (runtime / "marco" / SOCKET_NAME).exists()
    with open_mux(agent, token, tls, runtime) as client:
        muxes.append(client.pid)
        assert client.pid != first and client.run(["true"]).rc == 0
    os.chmod(runtime / "marco", 0o755)
    with pytest.raises(MuxUnavailable, match="not private"):
        open_mux(agent, token, tls, runtime)


def test_a_task_never_waits_for_a_mux_to_start(start_agent, signer: TokenSigner,
                                               alice: UnixUser, pki: TestPki, private_dirs,
                                               muxes) -> None:
    """start="background" (the connection's): with no mux, the call is told to go direct and
    a mux starts for the next calls, which find it."""
    agent = start_agent()
    runtime = private_dirs()
    tls = tls_copy(pki, runtime)
    token = signer.issue(alice.name)
    with pytest.raises(MuxUnavailable, match="starting marco-mux for the next tasks"):
        open_mux(agent, token, tls, runtime, start="background")
    client = wait_for(lambda: _opened(agent, token, tls, runtime), what="the mux started")
    muxes.append(client.pid)
    with client:
        assert client.run(["true"]).rc == 0
    with open_mux(agent, token, tls, runtime, start="no") as again:
        assert again.pid == client.pid


def _opened(agent: AgentProcess, token: str, tls: ClientTls, runtime: Path) -> MuxClient | None:
    try:
        return open_mux(agent, token, tls, runtime, start="no")
    except MuxUnavailable:
        return None


def test_the_mux_exits_when_idle(start_agent, signer: TokenSigner, alice: UnixUser,
                                 pki: TestPki, private_dirs, muxes) -> None:
    """MARCO_MUX_IDLE_SECONDS after its last client left, the mux exits and takes its socket
    away; while a client stays connected, it does not."""
    agent = start_agent()
    runtime = private_dirs()
    tls = tls_copy(pki, runtime)
    token = signer.issue(alice.name)
    client = open_mux(agent, token, tls, runtime, MARCO_MUX_IDLE_SECONDS="0.5")
    muxes.append(client.pid)
    second = open_mux(agent, token, tls, runtime)
    assert second.pid == client.pid
    second.close()
    assert client.run(["sleep", "1.5"]).rc == 0  # a call longer than the idle time
    assert alive(client.pid) and client.run(["true"]).rc == 0
    client.close()
    wait_for(lambda: not alive(client.pid), what="the idle mux's exit")
    assert not (runtime / "marco" / SOCKET_NAME).exists()


def test_a_client_hanging_up_mid_call_stops_the_execution(start_agent, signer: TokenSigner,
                                                          alice: UnixUser, pki: TestPki,
                                                          private_dirs, muxes) -> None:
    """An Ansible worker killed mid-call (a task timeout, Ctrl-C): the mux drops that agent
    connection, so the agent stops the execution as it does for a direct caller; the next
    call makes a new connection."""
    agent = start_agent()
    relay = Relay(agent.host, agent.port)
    runtime = private_dirs()
    tls = tls_copy(pki, runtime)
    token = signer.issue(alice.name)
    watcher = agent.client(token)
    arguments = client_arguments(agent, token, tls, ["sleep", "60"])
    arguments["port"] = relay.port
    process = run_as(None, runtime, arguments)
    try:
        running = wait_for(lambda: [e for e in watcher.executions() if e["state"] == "running"],
                           what="the sleep running")
        process.kill()
        process.communicate(timeout=30)
        wait_for(lambda: watcher.execution(running[0]["id"])["state"] != "running",
                 what="the execution stopped")
        assert watcher.execution(running[0]["id"])["stopped"]
        with open_mux(agent, token, tls, runtime, port=relay.port) as client:
            muxes.append(client.pid)
            assert client.run(["true"]).rc == 0
        assert relay.accepted == 2
    finally:
        if process.poll() is None:
            process.kill()
        watcher.close()
        relay.close()


def test_plain_http_goes_to_loopback_only(start_agent, signer: TokenSigner, alice: UnixUser,
                                          private_dirs, muxes) -> None:
    """A --dev agent (no TLS) is reached through the mux on loopback; a plain-HTTP target
    elsewhere is refused by the mux itself, as the connection refuses it (a token never
    crosses a network in clear)."""
    agent = start_agent(pki=None)
    runtime = private_dirs()
    token = signer.issue(alice.name)
    environ = {"PATH": os.environ["PATH"], "HOME": str(runtime), "XDG_RUNTIME_DIR": str(runtime)}
    with MuxClient.open(agent.host, agent.port, token, node=agent.node_name,
                        environ=environ) as client:
        muxes.append(client.pid)
        assert client.run(["id", "-un"]).stdout == alice.name.encode() + b"\n"
    with MuxClient.open("192.0.2.1", agent.port, token, environ=environ) as client:
        with pytest.raises(ConfigError, match="refusing plain HTTP"):
            client.run(["true"])


def test_the_mux_remembers_whom_a_token_ran_as(start_agent, signer: TokenSigner,
                                               alice: UnixUser, bob: UnixUser, pki: TestPki,
                                               private_dirs, muxes) -> None:
    """The `home` call answers from the last result through the mux for that agent and token
    (what a task's `echo ~` needs), without reaching the agent; another token gets nothing."""
    agent = start_agent()
    runtime = private_dirs()
    tls = tls_copy(pki, runtime)
    token = signer.issue(alice.name)
    with open_mux(agent, token, tls, runtime) as client:
        muxes.append(client.pid)
        assert client.known_home() == ("", "")  # nothing ran yet
        assert client.run(["true"]).rc == 0
        assert client.known_home() == (alice.name, alice.home)
    with open_mux(agent, token, tls, runtime) as client:  # the next task
        assert client.known_home() == (alice.name, alice.home)
    with open_mux(agent, signer.issue(bob.name), tls, runtime) as client:
        assert client.known_home() == ("", "")
