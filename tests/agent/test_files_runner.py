"""PUT and GET /v1/files through the user's warm module runner (issue 14, item 2): a real root
agent, real users, real AnsiballZ payloads warming the runner. Each answer says which path ran
(`via`, `X-Marco-Via`) and equals what the cold helper gives."""

from __future__ import annotations

import asyncio
import functools
import grp
import io
import os
import shutil
import signal
import stat
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from agent.files import ColdHelper, FileReader, FileService, FileWriter
from agent.runners import Runner
from agent.users import UserIdentity, UserResolver
from marco.client import AgentClient
from marco.errors import MarcoError
from marco.tls import ClientTls
from marco.tokens import SERVICE_MAX_AGE, SERVICE_SALT, TokenSigner, load_secret
from tests.support.agent_process import AgentProcess
from tests.support.ansiballz_payloads import PIPELINED, module_payload
from tests.support.pki import TestPki
from tests.support.runner_harness import FAKE_HELLO, in_child, pool_of, start_task, until
from tests.support.users import UnixUser
from tests.support.waiting import wait_for


@pytest.fixture(scope="module")
def data() -> bytes:
    """Several pipe and read chunks of binary, and some UTF-8."""
    return os.urandom(3 * 1024 * 1024 + 17) + "ünïcödé ✓".encode()


@pytest.fixture
def agent(start_agent: Callable[..., AgentProcess]) -> AgentProcess:
    """An agent of this test alone: its runners are this test's."""
    return start_agent()


@pytest.fixture
def open_tmp(tmp_path: Path) -> Path:
    """`tmp_path`, which the test users may enter (pytest makes its directories 0700)."""
    for path in (tmp_path, *tmp_path.parents):
        if path == Path(tempfile.gettempdir()):
            break
        os.chmod(path, 0o755)
    return tmp_path


@pytest.fixture
def group_dir(open_tmp: Path, alice: UnixUser) -> Path:
    """A directory only alice's supplementary groups may write to."""
    path = open_tmp / "shared"
    path.mkdir()
    group = min(g.gr_gid for g in grp.getgrall() if alice.name in g.gr_mem)
    os.chown(path, 0, group)
    os.chmod(path, 0o770)
    return path


def client(agent: AgentProcess, signer: TokenSigner, user: str) -> AgentClient:
    return agent.client(signer.issue(user), timeout=60)


PYTHON = "/usr/bin/python3"  # the interpreter of PIPELINED modules


def warm_up(c: AgentClient) -> int:
    """Run a pipelined module so that the user's runner is alive and idle; its pid."""
    result = c.run(PIPELINED, stdin=module_payload("command", {"_raw_params": "true"}))
    assert result.rc == 0 and result.via == "runner", (result.runner_note, result.stderr)
    runners = c.status()["runners"]
    assert len(runners) == 1
    return int(runners[0]["pid"])


def get(agent: AgentProcess, signer: TokenSigner, user: str,
        path: str) -> tuple[int, dict[str, str], bytes]:
    """GET /v1/files raw: status, headers, body."""
    conn = agent.connection(timeout=60)
    try:
        conn.request("GET", f"/v1/files?path={_quote(path)}",
                     headers={"Authorization": f"Bearer {signer.issue(user)}"})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def _quote(path: str) -> str:
    return quote(path, safe="")


def put(c: AgentClient, data: bytes, path: str, **kwargs: Any) -> dict[str, Any]:
    return c.put_file(io.BytesIO(data), path, size=len(data), **kwargs)


def outcome(call: Callable[[], Any]) -> Any:
    """What a file call gives: its answer, or its error's class and message."""
    try:
        return call()
    except MarcoError as error:
        return type(error).__name__, error.message


def test_put_and_get_go_through_the_runner_as_cold(
        agent: AgentProcess, signer: TokenSigner, alice: UnixUser, group_dir: Path,
        data: bytes) -> None:
    with client(agent, signer, alice.name) as c:
        cold = put(c, data, str(group_dir / "cold.bin"), mode=0o640)
        cold_get = get(agent, signer, alice.name, str(group_dir / "cold.bin"))
        warm_up(c)
        warm = put(c, data, str(group_dir / "warm.bin"), mode=0o640)
        warm_get = get(agent, signer, alice.name, str(group_dir / "warm.bin"))
        runners = c.status()["runners"]
    assert (cold.pop("via"), warm.pop("via")) == ("process", "runner")
    assert warm == {**cold, "path": str(group_dir / "warm.bin")}
    for name in ("cold.bin", "warm.bin"):
        info = os.stat(group_dir / name)
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (
            alice.uid, alice.gid, 0o640)
        assert (group_dir / name).read_bytes() == data
    assert (cold_get[0], warm_get[0]) == (200, 200)
    assert (cold_get[1]["X-Marco-Via"], warm_get[1]["X-Marco-Via"]) == ("process", "runner")
    assert cold_get[1]["X-Marco-Mode"] == warm_get[1]["X-Marco-Mode"] == "0640"
    assert cold_get[2] == warm_get[2] == data
    assert runners[0]["tasks"] == 0  # the helpers were its tasks, and they ended


def test_errors_through_the_runner_are_the_cold_ones(
        agent: AgentProcess, signer: TokenSigner, alice: UnixUser, bob: UnixUser,
        open_tmp: Path) -> None:
    tmp_path = open_tmp
    (tmp_path / "exists").write_bytes(b"x")
    os.chmod(tmp_path / "exists", 0o644)
    (tmp_path / "dir").mkdir()
    cases: list[Callable[[AgentClient], Any]] = [
        lambda c: put(c, b"a", "/nonexistent-dir/f"),
        lambda c: put(c, b"a", os.path.join(bob.home, "f")),
        lambda c: put(c, b"a", str(tmp_path / "exists"), overwrite=False),
        lambda c: put(c, b"a", str(tmp_path / "dir")),
        lambda c: put(c, b"a", "~/made-warm/sub/f", mkdir=True),
        lambda c: put(c, b"a", "~/made-warm/sub/g", mkdir=True),  # it exists now: 409
        lambda c: c.get_file("/nonexistent-dir/f", io.BytesIO()),
        lambda c: c.get_file(os.path.join(bob.home, "f"), io.BytesIO()),
        lambda c: c.get_file(str(tmp_path / "dir"), io.BytesIO()),
    ]
    raw = [str(tmp_path / "dir"), "/nonexistent-dir/f"]
    with client(agent, signer, alice.name) as c:
        cold = [outcome(functools.partial(case, c)) for case in cases]
        cold_raw = [get(agent, signer, alice.name, path)[:2] for path in raw]
        _remove_made(alice)
        warm_up(c)
        warm = [outcome(functools.partial(case, c)) for case in cases]
        warm_raw = [get(agent, signer, alice.name, path)[:2] for path in raw]
    assert [type(item) for item in cold] == [tuple] * 4 + [dict] + [tuple] * 4, cold
    assert (cold[4].pop("via"), warm[4].pop("via")) == ("process", "runner")
    assert warm == cold
    assert [status for status, _ in warm_raw] == [status for status, _ in cold_raw] == [400, 404]
    assert ([headers.get("X-Marco-Via") for _, headers in cold_raw + warm_raw]
            == [None] * 4)  # an error answer names no path: the same either way


def _remove_made(alice: UnixUser) -> None:
    made = Path(alice.home) / "made-warm"  # test_files.py uses ~/made
    (made / "sub" / "f").unlink()
    (made / "sub").rmdir()
    made.rmdir()


def test_overwrite_false_through_the_runner(agent: AgentProcess, signer: TokenSigner,
                                            alice: UnixUser) -> None:
    with client(agent, signer, alice.name) as c:
        warm_up(c)
        first = put(c, b"first", "keep-warm.txt", overwrite=False)
        again = outcome(lambda: put(c, b"second", "keep-warm.txt", overwrite=False))
    assert first["via"] == "runner" and first["size"] == 5
    assert again == ("Conflict", f"{alice.home}/keep-warm.txt exists and overwrite is false")
    assert (Path(alice.home) / "keep-warm.txt").read_bytes() == b"first"


def test_an_aborted_upload_through_the_runner_leaves_nothing(
        agent: AgentProcess, signer: TokenSigner, alice: UnixUser) -> None:
    target = Path(alice.home) / "aborted" / "big.bin"
    with client(agent, signer, alice.name) as c:
        warm_up(c)
        put(c, b"", "~/aborted/.keep", mkdir=True)
        conn = agent.connection(timeout=60)
        conn.putrequest("PUT", f"/v1/files?path={_quote(str(target))}")
        conn.putheader("Authorization", f"Bearer {signer.issue(alice.name)}")
        conn.putheader("Content-Length", str(10 * 1024 * 1024))
        conn.endheaders()
        conn.send(b"x" * (1024 * 1024))
        # The helper is the runner's task while the upload runs.
        wait_for(lambda: c.status()["runners"][0]["tasks"] == 1, what="the helper running")
        wait_for(lambda: [n for n in os.listdir(target.parent) if n.endswith(".tmp")],
                 what="the upload's temporary file")
        conn.close()
        wait_for(lambda: c.status()["runners"][0]["tasks"] == 0, what="the helper ending")
    assert sorted(os.listdir(target.parent)) == [".keep"]


@pytest.mark.parametrize("how", ["runner off", "no runner yet"])
def test_without_a_live_runner_files_go_by_process(
        start_agent: Callable[..., AgentProcess], signer: TokenSigner, alice: UnixUser,
        how: str) -> None:
    agent = start_agent(extra_args=["--no-runner"] if how == "runner off" else [])
    with client(agent, signer, alice.name) as c:
        if how == "runner off":
            assert c.run(PIPELINED, stdin=module_payload("command", {"_raw_params": "true"})
                         ).via == "process"
        answer = put(c, b"data", "plain.txt")
        got = get(agent, signer, alice.name, "plain.txt")
        assert c.status()["runners"] == []  # no runner was started for a file
    assert answer["via"] == "process"
    assert (got[0], got[1]["X-Marco-Via"], got[2]) == (200, "process", b"data")


def test_a_runner_killed_between_two_puts(agent: AgentProcess, signer: TokenSigner,
                                          alice: UnixUser) -> None:
    with client(agent, signer, alice.name) as c:
        pid = warm_up(c)
        first = put(c, b"one", "twice.txt")
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: c.status()["runners"] == [], what="the killed runner forgotten")
        second = put(c, b"two", "twice.txt")
    assert (first["via"], second["via"]) == ("runner", "process")
    assert (Path(alice.home) / "twice.txt").read_bytes() == b"two"


def test_another_users_runner_never_serves_a_file(agent: AgentProcess, signer: TokenSigner,
                                                  alice: UnixUser, bob: UnixUser) -> None:
    with client(agent, signer, bob.name) as b, client(agent, signer, alice.name) as a:
        warm_up(b)
        mine = put(a, b"alice's", "owner.txt")
        got = get(agent, signer, alice.name, "owner.txt")
        theirs = put(b, b"bob's", "owner.txt")
    assert (mine["via"], got[1]["X-Marco-Via"], theirs["via"]) == ("process", "process",
                                                                   "runner")
    for user, data in ((alice, b"alice's"), (bob, b"bob's")):
        path = Path(user.home) / "owner.txt"
        assert path.read_bytes() == data and path.stat().st_uid == user.uid


def test_a_runner_on_another_interpreter_file_never_serves_a_file(
        start_agent: Callable[..., AgentProcess], signer: TokenSigner, alice: UnixUser,
        open_tmp: Path) -> None:
    """The helper's interpreter is the agent's `helper_python`: a runner of another file (here
    /usr/bin/python3 against a copy of it) does not run it; a link to the same file does."""
    copy = open_tmp / "python3-copy"
    shutil.copy2(os.path.realpath(PYTHON), copy)
    link = open_tmp / "python3-link"
    link.symlink_to(os.path.realpath(PYTHON))
    answers = []
    for helper_python in (copy, link):
        agent = start_agent(extra_args=["--helper-python", str(helper_python)])
        with client(agent, signer, alice.name) as c:
            warm_up(c)
            answers.append(put(c, b"data", "interp.txt"))
            agent.stop()
    assert [answer["via"] for answer in answers] == ["process", "runner"]


# -- the helper's answers are the user's process's: checked ----------------------------------

LIAR = """
import sys
sys.stdout.write(sys.argv[1] + "\\n")
sys.stdout.flush()
sys.stdin.buffer.read()
sys.stdout.write(sys.argv[2] + "\\n")
"""
READY = '{"ok": true, "ready": true}'
FORGED_COMMITS = {
    "another path": '{"ok": true, "path": "/etc/shadow", "size": 3, "mode": "0644"}',
    "another size": '{"ok": true, "path": "/tmp/x", "size": 4, "mode": "0644"}',
    "a size as text": '{"ok": true, "path": "/tmp/x", "size": "3", "mode": "0644"}',
    "a mode with a newline": '{"ok": true, "path": "/tmp/x", "size": 3, "mode": "0644\\nX: y"}',
    "no mode": '{"ok": true, "path": "/tmp/x", "size": 3}',
}
FORGED_READS = {
    "not JSON": "{nope",
    "not an object": "[1]",
    "a negative size": '{"ok": true, "size": -1, "mode": "0644"}',
    "a size as text": '{"ok": true, "size": "12", "mode": "0644"}',
    "a mode with a newline": '{"ok": true, "size": 1, "mode": "0644\\r\\nX-Evil: 1"}',
    "an error status not a number": '{"ok": false, "status": [403], "error": "x"}',
}


async def _liar(first: str, second: str = "") -> ColdHelper:
    """A real process answering as a lying helper would: `first`, then after EOF `second`."""
    return await ColdHelper.start(sys.executable, "-I", "-S", "-c", LIAR, first, second,
                                  stdin=asyncio.subprocess.PIPE)


@pytest.mark.parametrize("case", sorted(FORGED_COMMITS))
def test_an_upload_answer_not_matching_the_upload_is_refused(case: str) -> None:
    async def upload() -> None:
        process = await _liar(READY, FORGED_COMMITS[case])
        writer = FileWriter(process, "runner", "/tmp/x")
        await writer.ready()
        await writer.write(b"abc")
        with pytest.raises(MarcoError, match="does not match the upload"):
            await writer.commit()
        await _ended(process)
    asyncio.run(upload())


@pytest.mark.parametrize("case", sorted(FORGED_READS))
def test_a_download_status_line_that_is_not_one_is_refused(case: str) -> None:
    async def download() -> None:
        process = await _liar(FORGED_READS[case])
        assert process.stdin is not None
        process.stdin.close()
        with pytest.raises(MarcoError) as raised:
            await FileReader(process, "runner").ready()
        assert type(raised.value) is MarcoError  # a 500, not what the line claims
        await _ended(process)
    asyncio.run(download())


async def _ended(process: asyncio.subprocess.Process) -> None:
    """Read what is left and reap it, so that its transport closes within this loop."""
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            await stream.read()
    await process.wait()
    await asyncio.sleep(0)  # the transport's close callbacks


def test_a_revocation_ends_a_helper_with_its_runner(
        agent: AgentProcess, signer: TokenSigner, alice: UnixUser, pki: TestPki) -> None:
    """A revoked user's runner quits, and what it runs, a file helper included, ends with it
    (a helper at once, by SIGTERM, cleanly): nothing of the user's stays."""
    target = Path(alice.home) / "revoked.bin"
    with client(agent, signer, alice.name) as c:
        warm_up(c)
    conn = agent.connection(timeout=60)
    conn.putrequest("PUT", f"/v1/files?path={_quote(str(target))}")
    conn.putheader("Authorization", f"Bearer {signer.issue(alice.name)}")
    conn.putheader("Content-Length", str(10 * 1024 * 1024))
    conn.endheaders()
    conn.send(b"x" * 1024)
    wait_for(lambda: len(_processes_of(alice.uid)) == 2, what="the runner and its helper")
    service = TokenSigner(load_secret(agent.secret_file), SERVICE_MAX_AGE,
                          salt=SERVICE_SALT).issue("controller")
    controller = ClientTls(str(pki.ca_file), str(pki.controller_cert), str(pki.controller_key))
    with agent.client(service, tls=controller) as c:
        assert c.push_revocations({alice.name: time.time()})["updated"] == [alice.name]
    wait_for(lambda: not _processes_of(alice.uid), timeout=30, what="the user's processes ending")
    conn.close()
    assert not target.exists()
    assert not [name for name in os.listdir(alice.home) if name.endswith(".tmp")]


def _processes_of(uid: int) -> list[int]:
    """Pids of the live processes whose real uid is `uid`."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            status = Path(f"/proc/{name}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields["Uid"].split()[0]) == uid and fields["State"].split()[0] != "Z":
            pids.append(int(name))
    return pids


# -- a runner that is the user's, hostile (issue 14, review 8) ---------------------------------
# A fake runner (the pool's `source` seam, as tests/agent/test_runners.py) that runs modules as
# a real one would, and whose file helpers misbehave as `MODE` says; it keeps every pipe end the
# agent hands it for a helper, as a user's runner may.

HOSTILE_LOOP = r'''
import signal, time
MODE, REPORT = %(mode)r, %(report)r
kept, helpers = [], {}
def helper_child(message, fds):
    if MODE == "keep":  # the real helper on the agent's pipes
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        os.execv(sys.executable, [sys.executable, "-I", "-S", "-c", message["source"],
                                  *message["argv"]])
    if MODE == "long":  # a status line over the agent's limit, no newline, alive
        os.write(fds[1], b"{" * (300 * 1024))
    if MODE == "stderr":  # no status line, 8 MiB of stderr
        os.close(fds[1])
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        written = 0
        try:
            while written < 8 * 1024 * 1024:
                written += os.write(fds[2], b"e" * 65536)
        except OSError:
            pass
        with open(REPORT, "w") as report:
            report.write(str(written))
        os._exit(0)
    if MODE == "early":
        os._exit(0)
    time.sleep(3600)
    os._exit(0)
while True:
    data, fds, _, _ = socket.recv_fds(sock, 1 << 20, 8)
    if not data:
        break
    message = json.loads(data)
    if message["op"] == "quit":
        sys.exit(0)
    if message["op"] == "preload":
        send({"op": "preloaded", "ms": 1.0, "entries": {}})
    elif message["op"] == "run":
        for fd in fds:
            os.close(fd)
        child = os.fork()
        if child == 0:
            os._exit(0)
        send({"op": "started", "id": message["id"], "pid": child})
        send({"op": "exited", "id": message["id"], "status": os.waitpid(child, 0)[1]})
    elif message["op"] == "helper":
        child = os.fork()
        if child == 0:
            helper_child(message, fds)
        if MODE == "stderr":  # EOF on stdout when the child closes it
            for fd in fds:
                os.close(fd)
        else:
            kept.append(fds)  # never closed: the agent must not wait on them
        send({"op": "started", "id": message["id"], "pid": child})
        if MODE == "early":  # an exit report at once, the write ends kept
            send({"op": "exited", "id": message["id"], "status": 0})
        elif MODE in ("keep", "stderr"):
            send({"op": "exited", "id": message["id"], "status": os.waitpid(child, 0)[1]})
        else:
            helpers[message["id"]] = child
    elif message["op"] == "signal" and message["id"] in helpers:
        child = helpers.pop(message["id"])
        os.kill(child, message["signal"])
        send({"op": "exited", "id": message["id"], "status": os.waitpid(child, 0)[1]})
'''


TRUE = module_payload("command", {"_raw_params": "true"})


def hostile_runner(mode: str, report: str = "") -> str:
    return FAKE_HELLO + HOSTILE_LOOP % {"mode": mode, "report": report}


def agent_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@asynccontextmanager
async def hostile_files(mode: str, user: UserIdentity, report: str = "",
                        status_seconds: float = 30.0) -> AsyncIterator[tuple[FileService, Runner]]:
    """A FileService whose helpers the user's live hostile runner forks, and that runner."""
    async with pool_of(source=hostile_runner(mode, report)) as pool:
        await (await start_task(pool, user, TRUE)).ended()  # the runner is live
        runner = pool.helper_runner(user, os.path.realpath(PYTHON))
        assert runner is not None
        yield FileService(UserResolver(), PYTHON, pool, status_seconds), runner


def test_a_runner_keeping_the_pipe_ends_leaks_no_fd(alice: UnixUser, open_tmp: Path) -> None:
    """50 uploads and downloads through a runner that keeps its copies of the pipe ends: each
    ends (the exit report ends the download's EOF wait) and the agent's fd count stays flat."""
    user = UserResolver().resolve(alice.name)
    shutil.chown(open_tmp, alice.name)
    body = os.urandom(300 * 1024)

    async def scenario() -> None:
        async with hostile_files("keep", user) as (files, runner):
            before = agent_fds()
            for i in range(25):
                writer = await files.open_writer(user, f"{open_tmp}/f{i}", "0644", True)
                await writer.write(body)
                assert (await writer.commit())["size"] == len(body)
                assert writer.via == "runner"
            await until(lambda: agent_fds() == before, "the agent's ends closed")
            for i in range(25):
                async with asyncio.timeout(30):
                    reader = await files.open_reader(user, f"{open_tmp}/f{i}")
                    assert b"".join([c async for c in reader.chunks()]) == body
            await until(lambda: agent_fds() == before, "the agent's ends closed")
            assert runner.task_count == 0

    in_child(scenario)


def test_an_early_exit_report_ends_the_wait(alice: UnixUser) -> None:
    """A runner that reports `exited` at once and keeps the write ends: the request ends with
    the helper's failure instead of waiting for an EOF that never comes."""
    user = UserResolver().resolve(alice.name)

    async def scenario() -> None:
        async with hostile_files("early", user) as (files, runner):
            before = agent_fds()
            for opening in (files.open_reader(user, "/etc/hostname"),
                            files.open_writer(user, "/tmp/x", "0644", True)):
                async with asyncio.timeout(20):
                    with pytest.raises(MarcoError, match="file helper failed: no output"):
                        await opening
            await until(lambda: agent_fds() == before, "the agent's ends closed")
            assert runner.task_count == 0

    in_child(scenario)


def test_a_silent_helper_is_ended_by_the_status_deadline(alice: UnixUser) -> None:
    """A helper that never writes its status line (its runner keeps the pipe ends, reports no
    exit): past the status deadline it is killed through the runner and its fds closed."""
    user = UserResolver().resolve(alice.name)

    async def scenario() -> None:
        async with hostile_files("silent", user, status_seconds=0.5) as (files, runner):
            before = agent_fds()
            async with asyncio.timeout(20):
                with pytest.raises(MarcoError, match="no status line within 0.5 s"):
                    await files.open_reader(user, "/etc/hostname")
            await until(lambda: agent_fds() == before, "the agent's ends closed")
            await until(lambda: runner.task_count == 0, "the helper killed")

    in_child(scenario)


def test_an_over_long_status_line_is_a_clear_error(alice: UnixUser) -> None:
    """A status line past the reader's limit with no newline: a MarcoError (a 500 that says
    so), the helper killed, the agent's fds closed."""
    user = UserResolver().resolve(alice.name)

    async def scenario() -> None:
        async with hostile_files("long", user) as (files, runner):
            before = agent_fds()
            async with asyncio.timeout(20):
                with pytest.raises(MarcoError) as raised:
                    await files.open_writer(user, "/tmp/x", "0644", True)
            assert raised.value.status == 500
            assert raised.value.message == "file helper failed: status line too long"
            await until(lambda: agent_fds() == before, "the agent's ends closed")
            await until(lambda: runner.task_count == 0, "the helper killed")

    in_child(scenario)


def test_a_failed_helpers_stderr_is_read_bounded(alice: UnixUser, open_tmp: Path) -> None:
    """A helper that fails with 8 MiB of stderr: the agent reads a bounded head of it and
    closes the pipe; the helper gets EPIPE long before its 8 MiB are taken."""
    user = UserResolver().resolve(alice.name)
    report = open_tmp / "written"
    os.chmod(open_tmp, 0o777)

    async def scenario() -> None:
        async with hostile_files("stderr", user, str(report)) as (files, _):
            async with asyncio.timeout(20):
                with pytest.raises(MarcoError, match="file helper failed: e+$"):
                    await files.open_reader(user, "/etc/hostname")

    in_child(scenario)
    wait_for(lambda: report.exists() and report.read_text(), what="the helper's count")
    assert int(report.read_text()) < 2 * 1024 * 1024
