"""The agent's warm module runners (agent/runners.py): a real RunnerPool on a real loop starts
real runners (agent/zygote.py, or a fake runner's code through the pool's `source` seam) as
real test users, and runs real AnsiballZ payloads built by ansible-core.

Each scenario runs in a forked process of its own: the pool's Isolation (cgroups here) moves
its process into a private cgroup tree, which the pytest worker itself is kept out of."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from agent.runners import (
    OUTPUT_PER_MINUTE,
    RunnerDeclined,
    RunnerDied,
    RunnerPool,
)
from agent.users import UserIdentity, UserResolver
from tests.support.ansiballz_payloads import module_payload, replace_member
from tests.support.processes import alive
from tests.support.runner_harness import (
    FAKE_HELLO,
    in_child,
    pool_of,
    run_task,
    start_task,
    until,
)
from tests.support.users import UnixUser, create_user, remove_user


def identity(user: UnixUser) -> UserIdentity:
    return UserResolver().resolve(user.name)


def uid_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        line = next(line for line in handle if line.startswith("Uid:"))
    return int(line.split()[1])


def runner_pids(pool: RunnerPool) -> list[int]:
    return [runner["pid"] for runner in pool.status()]


# -- payloads ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def echo() -> bytes:
    return module_payload("command", {"_raw_params": "echo warm"})


@pytest.fixture(scope="module")
def sleeper() -> bytes:
    return module_payload("command", {"_raw_params": "sleep 60"})


@pytest.fixture(scope="module")
def changed(echo: bytes) -> bytes:
    """The echo payload as another ansible-core would send it: basic.py differs."""
    return replace_member(echo, "ansible/module_utils/basic.py", b"\nMARCO_CHANGED = True\n")


@pytest.fixture
def users(alice: UnixUser, bob: UnixUser) -> Iterator[tuple[UserIdentity, UserIdentity]]:
    yield identity(alice), identity(bob)


# -- with the real runner (agent/zygote.py) ----------------------------------------------------

def test_warm_launch_runs_the_module_and_reuses_its_runner(users, echo: bytes) -> None:
    alice, _ = users

    async def scenario() -> None:
        async with pool_of() as pool:
            first = await run_task(pool, alice, echo)
            assert first.rc == 0, first.stderr
            assert first.result()["stdout"] == "warm" and first.result()["rc"] == 0
            assert first.launched.note.startswith("new runner (preload ")
            [runner] = pool.status()
            assert uid_of(runner["pid"]) == alice.uid and runner["python"].startswith("3.")
            with open(f"/proc/{runner['pid']}/cgroup") as handle:  # its own, under the user's
                assert f"/{alice.name}/runner-" in handle.read()
            second = await run_task(pool, alice, echo)
            assert second.rc == 0 and second.result()["stdout"] == "warm", second.stderr
            assert second.launched.note == f"warm (runner {runner['pid']}, task 2)"
            assert runner_pids(pool) == [runner["pid"]]
            assert second.launched.pid not in (first.launched.pid, runner["pid"])
            assert pool.status()[0]["rss"] > 0 and pool.status()[0]["tasks"] == 0

    in_child(scenario)


def test_two_users_get_two_runners(users, echo: bytes) -> None:
    alice, bob = users

    async def scenario() -> None:
        async with pool_of() as pool:
            for user in (alice, bob):
                ran = await run_task(pool, user, echo)
                assert ran.rc == 0, ran.stderr
            by_user = {runner["user"]: runner["pid"] for runner in pool.status()}
            assert set(by_user) == {alice.name, bob.name}
            assert by_user[alice.name] != by_user[bob.name]
            assert uid_of(by_user[alice.name]) == alice.uid
            assert uid_of(by_user[bob.name]) == bob.uid

    in_child(scenario)


def test_concurrent_first_launches_share_one_runner(users, echo: bytes) -> None:
    alice, _ = users

    async def scenario() -> None:
        async with pool_of() as pool:
            ran = await asyncio.gather(*(run_task(pool, alice, echo) for _ in range(3)))
            assert [r.rc for r in ran] == [0, 0, 0]
            assert len(pool.status()) == 1
            assert sorted(r.launched.note.split(" (")[0] for r in ran) == [
                "new runner", "warm", "warm"]

    in_child(scenario)


def test_a_task_does_not_wait_for_another(users, echo: bytes, sleeper: bytes) -> None:
    alice, _ = users

    async def scenario() -> None:
        async with pool_of() as pool:
            long = await start_task(pool, alice, sleeper)
            quick = await run_task(pool, alice, echo)   # same runner, while `long` runs
            assert quick.rc == 0 and quick.launched.note.startswith("warm"), quick.stderr
            assert pool.status()[0]["tasks"] == 1
            with open(f"/proc/{long.launched.pid}/cgroup") as handle:  # the agent moved it
                assert handle.read().rstrip().endswith(f"/{alice.name}/{long.execution_id}")
            long.launched.signal(signal.SIGTERM)
            ended = await long.ended()
            assert os.WIFSIGNALED(ended.status) and os.WTERMSIG(ended.status) == signal.SIGTERM

    in_child(scenario)


def test_changed_module_utils_get_a_second_runner(users, echo: bytes, changed: bytes) -> None:
    alice, _ = users

    async def scenario() -> None:
        async with pool_of() as pool:
            assert (await run_task(pool, alice, echo)).rc == 0
            [old] = runner_pids(pool)
            ran = await run_task(pool, alice, changed)
            assert ran.rc == 0 and ran.launched.note.startswith("new runner"), ran.stderr
            assert old in runner_pids(pool) and len(runner_pids(pool)) == 2
            again = await run_task(pool, alice, echo)  # the old one stays warm
            assert again.launched.note == f"warm (runner {old}, task 2)"

    in_child(scenario)


def test_changed_module_utils_are_declined_when_no_room(users, echo: bytes, sleeper: bytes,
                                                        changed: bytes) -> None:
    alice, _ = users

    async def scenario() -> None:
        async with pool_of(max_per_user=1) as pool:
            busy = await start_task(pool, alice, sleeper)
            with pytest.raises(RunnerDeclined) as declined:
                await start_task(pool, alice, changed)
            assert declined.value.reason == "module_utils differ"
            busy.launched.signal(signal.SIGKILL)
            await busy.ended()
            # idle now: the least recently used runner makes room for the new payload
            ran = await run_task(pool, alice, changed)
            assert ran.rc == 0 and ran.launched.note.startswith("new runner"), ran.stderr
            assert len(runner_pids(pool)) == 1

    in_child(scenario)


def test_the_least_recently_used_idle_runner_makes_room(users, echo: bytes,
                                                         changed: bytes) -> None:
    alice, _ = users
    third = replace_member(echo, "ansible/module_utils/basic.py", b"\nMARCO_THIRD = 3\n")

    async def scenario() -> None:
        async with pool_of(max_per_user=2) as pool:
            assert (await run_task(pool, alice, echo)).rc == 0
            [used] = runner_pids(pool)
            assert (await run_task(pool, alice, changed)).rc == 0
            [older] = set(runner_pids(pool)) - {used}
            assert (await run_task(pool, alice, echo)).launched.note.startswith(f"warm (runner {used},")
            ran = await run_task(pool, alice, third)
            assert ran.rc == 0 and ran.launched.note.startswith("new runner"), ran.stderr
            assert used in runner_pids(pool) and older not in runner_pids(pool)
            await until(lambda: not alive(older), "the least recently used runner's exit")

    in_child(scenario)


def test_runner_limit(users, sleeper: bytes, echo: bytes) -> None:
    alice, bob = users

    async def scenario() -> None:
        async with pool_of(max_total=1) as pool:
            busy = await start_task(pool, alice, sleeper)
            with pytest.raises(RunnerDeclined) as declined:
                await start_task(pool, bob, echo)
            assert declined.value.reason == "runner limit"
            busy.launched.signal(signal.SIGKILL)
            await busy.ended()
            assert (await run_task(pool, bob, echo)).rc == 0
            assert [r["user"] for r in pool.status()] == [bob.name]

    in_child(scenario)


def test_runner_off(users, echo: bytes) -> None:
    alice, _ = users

    async def scenario() -> None:
        async with pool_of(enabled=False) as pool:
            with pytest.raises(RunnerDeclined) as declined:
                await start_task(pool, alice, echo)
            assert declined.value.reason == "runner off" and pool.status() == []

    in_child(scenario)


def test_runner_killed_between_tasks_is_replaced(users, echo: bytes) -> None:
    alice, _ = users

    async def scenario() -> None:
        async with pool_of() as pool:
            assert (await run_task(pool, alice, echo)).rc == 0
            [first] = runner_pids(pool)
            os.kill(first, signal.SIGKILL)  # the test's own doing, as the user could
            await until(lambda: not pool.status(), "the dead runner forgotten")
            ran = await run_task(pool, alice, echo)
            assert ran.rc == 0 and ran.launched.note.startswith("new runner"), ran.stderr
            assert runner_pids(pool) != [first]

    in_child(scenario)


def test_runner_killed_during_a_task_fails_it(users, sleeper: bytes, echo: bytes) -> None:
    alice, _ = users

    async def scenario() -> None:
        async with pool_of() as pool:
            task = await start_task(pool, alice, sleeper)
            [runner] = runner_pids(pool)
            os.kill(runner, signal.SIGKILL)
            with pytest.raises(RunnerDied):
                await task.ended()
            assert (await run_task(pool, alice, echo)).rc == 0

    in_child(scenario)


def test_idle_runner_quits(users, echo: bytes) -> None:
    alice, _ = users

    async def scenario() -> None:
        async with pool_of(idle_seconds=0.3) as pool:
            task = await start_task(pool, alice, echo)
            [pid] = runner_pids(pool)  # while its task runs, it is not idle
            assert (await task.ended()).rc == 0
            await until(lambda: not pool.status(), "the idle runner retired")
            await until(lambda: not alive(pid), "the idle runner's exit")

    in_child(scenario)


def test_close_user_and_close(users, echo: bytes) -> None:
    alice, bob = users

    async def scenario() -> None:
        async with pool_of() as pool:
            for user in (alice, bob):
                assert (await run_task(pool, user, echo)).rc == 0
            pids = {r["user"]: r["pid"] for r in pool.status()}
            await pool.close_user(alice.name)
            assert not alive(pids[alice.name])
            assert [r["user"] for r in pool.status()] == [bob.name]
            await pool.close()
            assert pool.status() == [] and not alive(pids[bob.name])
            with pytest.raises(RunnerDeclined):
                await start_task(pool, bob, echo)

    in_child(scenario)


# -- with a fake runner: what the pool does with a runner that lies ----------------------------

FAKE_LOOP = r'''
while True:
    data, fds, _, _ = socket.recv_fds(sock, 65536, 8)
    for fd in fds:
        os.close(fd)
    if not data:
        break
    message = json.loads(data)
    if message["op"] == "quit":
        sys.exit(0)
    if message["op"] == "preload":
        send(%(preloaded)s)
    elif message["op"] == "run":
        child = os.fork()
        if child == 0:
            os._exit(0)
        send(%(started)s, %(fds)s)
        send({"op": "exited", "id": message["id"], "status": 0})
while True:
    pass
'''
LEGIT_STARTED = '{"op": "started", "id": message["id"], "pid": child}'


def fake_runner(preloaded: str = '{"op": "preloaded", "ms": 1.0, "entries": {}}',
                started: str = LEGIT_STARTED, fds: str = "()") -> str:
    """A runner that answers as told (Python expressions); by default as a real one would,
    its task a child that exits 0 at once. It exits when asked to quit, never on EOF: after
    a lie, only a kill ends it."""
    return (FAKE_HELLO + FAKE_LOOP) % {"preloaded": preloaded, "started": started, "fds": fds}


def memfds_named(name: str) -> list[str]:
    """This process's fds that are the memfd `name`."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == f"/memfd:{name} (deleted)":
                found.append(fd)
        except OSError:
            pass
    return found


async def _fake_is_killed(source: str, user: UserIdentity, payload: bytes) -> None:
    async with pool_of(source=source) as pool:
        with pytest.raises(RunnerDeclined) as declined:
            await start_task(pool, user, payload)
        assert declined.value.reason == "runner died"
        assert pool.status() == []
        await until(lambda: not fakes_of(user), "the fake runner killed")


def fakes_of(user: UserIdentity) -> list[str]:
    """The user's fake runners still running (a zombie has no command line to match)."""
    return subprocess.run(["pgrep", "-u", str(user.uid), "-f", "3[.]fake"],
                          capture_output=True, text=True).stdout.split()


def test_a_well_behaved_fake_runner_runs_tasks(users, echo: bytes) -> None:
    """The fake's lies below are what gets it killed, not the fake itself."""
    alice, _ = users

    async def scenario() -> None:
        async with pool_of(source=fake_runner()) as pool:
            ran = await run_task(pool, alice, echo)
            assert ran.status == 0 and ran.launched.note.startswith("new runner")
            assert [r["python"] for r in pool.status()] == ["3.fake"]

    in_child(scenario)


def test_a_runner_that_does_not_preload_in_time_is_killed(users, echo: bytes) -> None:
    alice, _ = users

    async def scenario() -> None:
        async with pool_of(source=fake_runner(preloaded="None"), preload_seconds=0.5) as pool:
            with pytest.raises(RunnerDeclined) as declined:
                await start_task(pool, alice, echo)
            assert declined.value.reason == "preload failed: timed out after 0.5 s"
            assert pool.status() == []
            await until(lambda: not fakes_of(alice), "the fake runner killed")

    in_child(scenario)


def test_a_failed_start_is_not_tried_again_at_once(users, echo: bytes) -> None:
    """preload_failed declines with the runner's words (control characters escaped), for the
    launches waiting on that start too; the next task runs cold at once instead of starting
    another runner."""
    alice, _ = users
    with tempfile.NamedTemporaryFile(prefix="marco-runner-starts-") as handle:
        os.chmod(handle.name, 0o666)  # the fake runner, as the user, counts its starts here
        _failed_start_once(alice, echo, Path(handle.name))


def _failed_start_once(alice: UserIdentity, echo: bytes, starts: Path) -> None:
    source = (f"open({str(starts)!r}, 'a').write('started\\n')\n"
              + fake_runner(preloaded='{"op": "preload_failed", "error": "boom\\x1b[31m"}'))

    async def scenario() -> None:
        async with pool_of(source=source) as pool:
            for tries in (3, 1):  # concurrent first launches share the one failed start
                failed = await asyncio.gather(*(start_task(pool, alice, echo)
                                                for _ in range(tries)), return_exceptions=True)
                assert [getattr(f, "reason", f) for f in failed] == [
                    "preload failed: boom\\x1b[31m"] * tries
            assert starts.read_text() == "started\n"

    in_child(scenario)


def test_a_runners_output_is_read_and_logged_bounded(users, echo: bytes) -> None:
    """200 KB on its stderr before hello (more than a pipe holds: it must be read), of which
    at most 64 KiB reach the debug log, the rest counted as dropped."""
    alice, _ = users
    source = "import sys\nsys.stderr.write('e' * 200000)\nsys.stderr.flush()\n" + fake_runner()

    async def scenario() -> None:
        handler = _Records()
        records = handler.records
        logger = logging.getLogger("agent.runners")
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        async with pool_of(source=source) as pool:
            assert (await run_task(pool, alice, echo)).status == 0
        said = sum(len(_arg(r, 1)) for r in records if r.msg == "%s said: %r")
        dropped = [_arg(r, 1) for r in records if "dropped" in str(r.msg)]
        assert said == OUTPUT_PER_MINUTE and dropped == [200000 - OUTPUT_PER_MINUTE]

    in_child(scenario)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _arg(record: logging.LogRecord, index: int) -> Any:
    return cast(tuple[Any, ...], record.args)[index]


def test_a_runner_sending_garbage_is_killed(users, echo: bytes) -> None:
    alice, _ = users
    source = fake_runner(preloaded=repr(b"\xff{not json"))
    in_child(lambda: _fake_is_killed(source, alice, echo))


@pytest.mark.parametrize("preloaded", [
    '{"op": "preloaded", "entries": {"ansible/__init__.py": ["crc", 1]}}',
    '{"op": "preloaded", "entries": []}',
    '{"op": "hello", "python": "3"}',
    '{"op": "exited", "id": "nope", "status": 0}',
    # valid JSON one byte over the bound, read whole (no MSG_TRUNC)
    """b'{"op":"preloaded","entries":{},"x":"' + b"y" * (65537 - 38) + b'"}'""",
    'b"[" * 60000',
    'b"x" * 70000',
])
def test_a_runner_sending_a_malformed_message_is_killed(users, echo: bytes,
                                                        preloaded: str) -> None:
    alice, _ = users
    in_child(lambda: _fake_is_killed(fake_runner(preloaded=preloaded), alice, echo))


def test_a_runner_reporting_another_pid_is_killed_and_nothing_signalled(users,
                                                                         echo: bytes) -> None:
    """pid 1, and a root process of the test's: never signalled, the runner is killed."""
    alice, _ = users
    for victim in ("1", "VICTIM"):
        bystander = subprocess.Popen(["sleep", "120"])
        try:
            pid = str(bystander.pid) if victim == "VICTIM" else victim
            started = '{"op": "started", "id": message["id"], "pid": ' + pid + "}"
            source = fake_runner(started=started)
            in_child(lambda: _fake_is_killed(source, alice, echo))  # noqa: B023
            assert bystander.poll() is None  # still running: nothing was signalled by pid
        finally:
            bystander.kill()
            bystander.wait()


def test_fds_a_runner_sends_are_closed(users, echo: bytes) -> None:
    """An fd sent with any op is refused by the kernel, or closed (in another thread)."""
    alice, _ = users
    opened = 'os.memfd_create("marco-fake-fd")'

    async def scenario() -> None:
        for source in (fake_runner(started='{"op": "started", "id": message["id"], '
                                           '"pid": os.getpid()}', fds=f"[{opened}]"),
                       fake_runner(preloaded='{"op": "preloaded", "entries": {}}',
                                   started='{"op": "exited", "id": "x", "status": 0}',
                                   fds=f"[{opened}, {opened}]")):
            async with pool_of(source=source) as pool:
                with pytest.raises(RunnerDeclined):
                    await start_task(pool, alice, echo)
            await until(lambda: memfds_named("marco-fake-fd") == [], "the fds closed")

    in_child(scenario)


LINGERING_RUNNER = r'''
import array, json, os, select, socket, struct, sys
sock = socket.socket(fileno=int(sys.argv[1]))
def send(message, fds=()):
    socket.send_fds(sock, [json.dumps(message).encode()], list(fds))
peer = socket.create_connection(("127.0.0.1", %(port)d))
peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
peer.setblocking(False)
for _ in range(100):  # until the peer's window is shut: the queue then stays unsent
    try:
        while True:
            peer.send(b"x" * 65536)
    except BlockingIOError:
        pass
    if not select.select([], [peer], [], 0.5)[1]:
        break
peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 3600))
hello = json.dumps({"op": "hello", "pid": os.getpid(), "python": "3.fake"}).encode()
try:
    sock.sendmsg([hello], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                            array.array("i", [peer.fileno()]))])
    peer.close()  # the agent holds the last reference now
except PermissionError:  # refused by the agent's kernel (SO_PASSRIGHTS): go on without
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()
    sock.send(hello)
'''
SINK = r'''
import socket, sys, time
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
listener.bind(("127.0.0.1", 0))
listener.listen(1)
print(listener.getsockname()[1], flush=True)
accepted, _ = listener.accept()
time.sleep(float(sys.argv[1]))  # never reads; its end (a reset) ends any linger
'''
SINK_SECONDS = 60.0


def test_a_runner_sending_a_lingering_socket_does_not_block_the_agent(users,
                                                                      echo: bytes) -> None:
    """A TCP socket with a full send queue and SO_LINGER, whose peer never reads, sent as
    the runner's last reference: closing it on the loop would block the whole agent until
    the peer goes (the sink, after SINK_SECONDS). The launch must be answered while the sink
    is still there (refused by the kernel, or the runner killed and the fd closed aside)."""
    alice, _ = users
    sink = subprocess.Popen(["python3", "-c", SINK, str(SINK_SECONDS)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert sink.stdout is not None
        port = int(sink.stdout.readline())
        source = (LINGERING_RUNNER % {"port": port}
                  + FAKE_LOOP % {"preloaded": '{"op": "preloaded", "entries": {}}',
                                 "started": LEGIT_STARTED, "fds": "()"})

        async def scenario() -> None:
            async with pool_of(source=source) as pool:
                try:
                    ran = await run_task(pool, alice, echo)
                    assert ran.status == 0
                except RunnerDeclined as declined:
                    assert declined.reason == "runner died"
                assert alive(sink.pid), "the agent's loop waited for the sink to go"

        in_child(scenario)
    finally:
        sink.kill()
        sink.wait()


def test_the_runner_gets_its_socket_as_argv_and_no_other_fd(users, echo: bytes) -> None:
    """The socket's number is the runner's last argument, and its only socket: no placeholder
    fd of the agent's is dup'ed in between (a thread could own that number)."""
    alice, _ = users

    async def scenario() -> None:
        async with pool_of() as pool:
            assert (await run_task(pool, alice, echo)).rc == 0
            [pid] = runner_pids(pool)
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
            sockets = [int(fd) for fd in os.listdir(f"/proc/{pid}/fd")
                       if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")]
            assert len(argv) == 4 and sockets == [int(argv[3])]

    in_child(scenario)


def test_a_killed_runner_leaves_no_temporary_directory(users, echo: bytes) -> None:
    """A runner SIGKILLed (by the user, the OOM killer) cannot remove its warm zip's directory:
    the agent does, when it sees the runner gone."""
    alice, _ = users

    async def scenario() -> None:
        async with pool_of() as pool:
            assert (await run_task(pool, alice, echo)).rc == 0
            [pid] = runner_pids(pool)
            prefix = f"marco-runner-{pid}-"
            assert [n for n in os.listdir("/tmp") if n.startswith(prefix)]
            os.kill(pid, signal.SIGKILL)
            await until(lambda: not [n for n in os.listdir("/tmp") if n.startswith(prefix)],
                        "the dead runner's directory removed")

    in_child(scenario)


def test_what_a_runner_forked_ends_with_it(users, echo: bytes) -> None:
    """A process the runner's own code started (its site, a preload) stays in the runner's
    cgroup, where no execution names it: it is killed when the runner is gone, also when the
    runner quit as asked (then no dead socket has it killed)."""
    alice, _ = users
    marker = f"3600.{secrets.randbelow(10 ** 6)}"
    source = (f"import subprocess\nsubprocess.Popen(['sleep', '{marker}'], "
              "start_new_session=True)\n" + fake_runner())

    def strays() -> list[str]:
        return subprocess.run(["pgrep", "-u", str(alice.uid), "-f", f"sleep {marker}"],
                              capture_output=True, text=True).stdout.split()

    async def scenario() -> None:
        async with pool_of(source=source) as pool:
            assert pool.isolation.mode == "cgroup"
            assert (await run_task(pool, alice, echo)).status == 0
            assert strays()
            await pool.close_user(alice.name)  # it quits and exits as asked
            await until(lambda: not strays(), "what the runner left killed")

    try:
        in_child(scenario)
    finally:
        subprocess.run(["pkill", "-KILL", "-u", str(alice.uid), "-f", f"sleep {marker}"],
                       check=False)


def test_retire_user_does_not_wait(users, echo: bytes) -> None:
    """Revocation retires a user's runners without waiting for them: gone from the pool at
    once, their processes soon; another user's stay."""
    alice, bob = users

    async def scenario() -> None:
        async with pool_of() as pool:
            for user in (alice, bob):
                assert (await run_task(pool, user, echo)).rc == 0
            pids = {r["user"]: r["pid"] for r in pool.status()}
            pool.retire_user(alice.name)  # sync: nothing to await
            assert [r["user"] for r in pool.status()] == [bob.name]
            await until(lambda: not alive(pids[alice.name]), "alice's runner gone")
            assert alive(pids[bob.name])

    in_child(scenario)


@pytest.fixture
def siteuser(run: Any) -> Iterator[UserIdentity]:
    """A user of this test alone: its user site is created here."""
    unix = create_user(run.user("site"))
    try:
        yield identity(unix)
    finally:
        remove_user(unix.name)


def test_a_runner_whose_python_site_changed_declines_and_is_replaced(siteuser: UserIdentity,
                                                                     echo: bytes) -> None:
    """The user site appeared after the runner started (pip --user): the task is declined
    (it runs cold), the runner leaves the pool and quits, the next task gets a new one."""
    ask = "import site; print(site.getusersitepackages())"
    site = subprocess.run(["/usr/bin/python3", "-c", ask], capture_output=True, text=True, check=True, cwd="/",
                          env=siteuser.clean_environment(),
                          **UserResolver().popen_identity(siteuser)).stdout.strip()

    async def scenario() -> None:
        async with pool_of() as pool:
            assert (await run_task(pool, siteuser, echo)).rc == 0
            [pid] = runner_pids(pool)
            make = "import os, sys; os.makedirs(sys.argv[1])"
            subprocess.run(["/usr/bin/python3", "-c", make, site], check=True, cwd="/", env=siteuser.clean_environment(),
                           **UserResolver().popen_identity(siteuser))
            with pytest.raises(RunnerDeclined) as declined:
                await start_task(pool, siteuser, echo)
            assert declined.value.reason == "python site changed"
            assert pool.status() == []
            await until(lambda: not alive(pid), "the runner quit")
            again = await run_task(pool, siteuser, echo)
            assert again.rc == 0 and again.launched.note.startswith("new runner")

    in_child(scenario)
