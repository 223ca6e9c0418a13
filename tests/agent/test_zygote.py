"""The module runner's own code (agent/zygote.py), driven by a tiny fake agent that speaks its
message table over a real seqpacket socketpair: the runner is the real source on the target
interpreter, started as a real test user exactly as the pool starts it, preloaded with a real
AnsiballZ payload built by ansible-core. Every task is also run by a cold `python3` reading the
same script from stdin, and the two are compared."""

from __future__ import annotations

import array
import ast
import base64
import io
import json
import os
import resource
import secrets
import selectors
import signal
import socket
import subprocess
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import agent
from agent.users import UserIdentity, UserResolver
from tests.support.ansiballz_payloads import module_payload
from tests.support.users import UnixUser, create_user, remove_user
from tests.support.waiting import wait_for

PYTHON = "/usr/bin/python3"
SOURCE = Path(agent.__file__).with_name("zygote.py").read_text()
DEADLINE = 30.0
MASKED = ("start", "end", "delta", "elapsed")  # the modules' own clock readings


@dataclass
class Ran:
    """A task's end: raw wait status (runner) or returncode (cold), and its output."""

    status: int
    stdout: bytes
    stderr: bytes
    pid: int = 0

    @property
    def rc(self) -> int:
        return os.waitstatus_to_exitcode(self.status)

    def json(self) -> dict[str, Any]:
        result = json.loads(self.stdout)
        assert isinstance(result, dict)
        return {k: v for k, v in result.items() if k not in MASKED}


class Running:
    """A task the fake agent started: its pipes' agent ends."""

    def __init__(self, fake: FakeAgent, task_id: str, stdin_w: int, stdout_r: int,
                 stderr_r: int, payload: bytes) -> None:
        self.fake, self.id = fake, task_id
        self.stdout_r, self.stderr_r = stdout_r, stderr_r
        self.writer = threading.Thread(target=_write_and_close, args=(stdin_w, payload))
        self.writer.start()
        started, fds = fake.expect(task_id, "started")
        assert fds == [], "a runner sends the agent no fd"
        self.pid = started["pid"]

    def finish(self) -> Ran:
        """Read the task's output to EOF, then its exit message."""
        out = _read_pipes(self.stdout_r, self.stderr_r)
        self.writer.join(DEADLINE)
        exited, _ = self.fake.expect(self.id, "exited")
        return Ran(exited["status"], out[self.stdout_r], out[self.stderr_r], self.pid)


class FakeAgent:
    """The agent's side of the table, as simple as a test can make it."""

    def __init__(self, user: UserIdentity, nproc: int = 0) -> None:
        self.user = user
        self.sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen(
            [PYTHON, "-c", SOURCE, str(child.fileno())], pass_fds=(child.fileno(),),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=user.clean_environment(), cwd="/", start_new_session=True,
            preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc)))
            if nproc else None, **UserResolver().popen_identity(user))
        child.close()
        self.inbox: list[tuple[dict[str, Any], list[int]]] = []
        self.tasks = 0
        self.stderr: str | None = None
        self.hello, _ = self.expect(None, "hello")

    def send(self, message: dict[str, Any], fds: list[int] | None = None,
             raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(message).encode()
        ancillary = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                     if fds else [])
        self.sock.sendmsg([data], ancillary)

    def expect(self, task_id: str | None, *ops: str) -> tuple[dict[str, Any], list[int]]:
        """The next message of one of `ops` (of task `task_id`), keeping others for later."""
        deadline = time.monotonic() + DEADLINE
        while True:
            for item in self.inbox:
                if item[0]["op"] in ops and item[0].get("id") == task_id:
                    self.inbox.remove(item)
                    return item
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {ops} for {task_id} (inbox {self.inbox})"
            self.sock.settimeout(remaining)
            data, ancdata, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(16))
            assert data, f"the runner closed its socket: {self.logs()}"
            fds = [fd for level, kind, raw in ancdata
                   if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
                   for fd in array.array("i", raw)]
            self.inbox.append((json.loads(data), fds))

    def preload(self, payload: bytes) -> dict[str, Any]:
        memfd = os.memfd_create("zip")
        os.write(memfd, zip_of(payload))
        self.send({"op": "preload", "profile": "legacy"}, [memfd])
        os.close(memfd)
        return self.expect(None, "preloaded", "preload_failed")[0]

    def start(self, payload: bytes, cwd: str | None = None, env: dict[str, str] | None = None,
              procs_fd: int | None = None, nproc: int | None = None) -> Running:
        self.tasks += 1
        task_id = f"task-{self.tasks}"
        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        stderr_r, stderr_w = os.pipe()
        message: dict[str, Any] = {"op": "run", "id": task_id, "cwd": cwd or self.user.home,
                                   "env": env if env is not None else task_env(self.user)}
        if nproc is not None:
            message["nproc"] = nproc
        fds = [stdin_r, stdout_w, stderr_w] + ([procs_fd] if procs_fd is not None else [])
        self.send(message, fds)
        for fd in (stdin_r, stdout_w, stderr_w):
            os.close(fd)
        return Running(self, task_id, stdin_w, stdout_r, stderr_r, payload)

    def run(self, payload: bytes, **kwargs: Any) -> Ran:
        return self.start(payload, **kwargs).finish()

    def ended(self) -> int:
        """The runner's exit code, once it has exited."""
        return int(self.proc.wait(DEADLINE))

    def logs(self) -> str:
        """The runner's stderr, once it has exited."""
        if self.proc.poll() is None:
            return "(running)"
        if self.stderr is None:
            assert self.proc.stderr is not None
            self.stderr = self.proc.stderr.read().decode(errors="replace")
        return self.stderr

    def close(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(DEADLINE)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.logs()
            for pipe in (self.proc.stdout, self.proc.stderr):
                if pipe is not None:
                    pipe.close()


def _write_and_close(fd: int, data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BrokenPipeError:
        pass
    finally:
        os.close(fd)


def _read_pipes(*fds: int) -> dict[int, bytes]:
    """Every fd read to EOF (then closed), within the deadline."""
    out = {fd: bytearray() for fd in fds}
    with selectors.DefaultSelector() as selector:
        for fd in fds:
            selector.register(fd, selectors.EVENT_READ)
        deadline = time.monotonic() + DEADLINE
        while selector.get_map():
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"output not ended: {out}"
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, 65536)
                if chunk:
                    out[key.fd] += chunk
                else:
                    selector.unregister(key.fd)
                    os.close(key.fd)
    return {fd: bytes(data) for fd, data in out.items()}


def zip_of(payload: bytes) -> bytes:
    start = payload.index(b"zip_data='", payload.rindex(b'if __name__ == "__main__":'))
    start += len(b"zip_data='")
    return base64.b64decode(payload[start:payload.index(b"'", start)])


def task_env(user: UserIdentity, **extra: str) -> dict[str, str]:
    """What the agent gives a task: the clean environment, the execution's own, PWD."""
    env = user.clean_environment()
    env.update({"MARCO_EXECUTION_ID": "e-test", "PWD": user.home})
    env.update(extra)
    return env


def cold(user: UserIdentity, payload: bytes, cwd: str | None = None,
         env: dict[str, str] | None = None) -> Ran:
    """The same script run the cold way: `python3` reading it from stdin, as the user."""
    done = subprocess.run([PYTHON], input=payload, capture_output=True, cwd=cwd or user.home,
                          env=env if env is not None else task_env(user),
                          start_new_session=True, timeout=DEADLINE,
                          **UserResolver().popen_identity(user))
    code = done.returncode
    status = -code if code < 0 else code << 8  # a raw status without the core-dump bit
    return Ran(status, done.stdout, done.stderr)


def script(text: str) -> bytes:
    return ("#!/usr/bin/python3\n" + text.strip() + "\n").encode()


@pytest.fixture(scope="module")
def command() -> bytes:
    return module_payload("command", {"_raw_params": "echo héllo 'a b'; pwd; env | sort",
                                      "_uses_shell": True})


@pytest.fixture
def user(alice: UnixUser) -> UserIdentity:
    return UserResolver().resolve(alice.name)


@pytest.fixture
def fake(user: UserIdentity) -> Iterator[FakeAgent]:
    runner = FakeAgent(user)
    yield runner
    runner.close()


@pytest.fixture
def warm(fake: FakeAgent, command: bytes) -> FakeAgent:
    """A runner preloaded with the command module's payload."""
    answer = fake.preload(command)
    assert answer["op"] == "preloaded", answer
    return fake


# -- start and preload ------------------------------------------------------------------------

def test_source_is_python38_and_stdlib_only() -> None:
    tree = ast.parse(SOURCE, feature_version=(3, 8))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"agent", "marco", "tests"}, imported
    for newer in ("removeprefix", "removesuffix", "waitstatus_to_exitcode"):
        assert newer not in SOURCE


def test_hello_and_preloaded_entries(fake: FakeAgent, command: bytes) -> None:
    assert fake.hello["pid"] == fake.proc.pid
    python = subprocess.run([PYTHON, "-c", "import platform; print(platform.python_version())"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert fake.hello["python"] == python
    answer = fake.preload(command)
    assert answer["op"] == "preloaded" and answer["ms"] > 0
    members = {info.filename: [info.CRC, info.file_size]
               for info in zipfile.ZipFile(io.BytesIO(zip_of(command))).infolist()}
    entries = answer["entries"]
    for name in ("ansible/__init__.py", "ansible/module_utils/basic.py",
                 "ansible/module_utils/_internal/_ansiballz/_loader.py",
                 "ansible/module_utils/_internal/_json/_profiles/_module_legacy_m2c.py"):
        assert entries[name] == members[name]
    assert all(members[name] == crc_size for name, crc_size in entries.items())
    assert "ansible/modules/command.py" not in entries  # the module itself runs per task


def test_a_bad_zip_answers_preload_failed_and_the_runner_quits(fake: FakeAgent) -> None:
    memfd = os.memfd_create("zip")
    os.write(memfd, b"not a zip")
    fake.send({"op": "preload"}, [memfd])
    os.close(memfd)
    answer, _ = fake.expect(None, "preload_failed")
    assert "BadZipFile" in answer["error"]
    assert fake.ended() == 0
    assert not _runner_dirs(fake)


# -- tasks as a cold interpreter runs them --------------------------------------------------

def test_command_module_result_equals_a_cold_run(warm: FakeAgent, command: bytes) -> None:
    ran, expected = warm.run(command), cold(warm.user, command)
    assert (ran.rc, ran.stderr) == (expected.rc, expected.stderr) == (0, b"")
    assert ran.json() == expected.json()
    lines = ran.json()["stdout"].splitlines()
    assert lines[:2] == ["héllo a b", warm.user.home]
    assert "LC_CTYPE=C.UTF-8" in lines and "MARCO_EXECUTION_ID=e-test" in lines


@pytest.mark.parametrize("module, args", [
    ("file", {"path": "/tmp", "state": "directory"}),
    ("uri", {"url": "http://127.0.0.1:9/", "timeout": 5}),
])
def test_modules_needing_module_utils_not_preloaded(warm: FakeAgent, module: str,
                                                    args: dict[str, Any]) -> None:
    payload = module_payload(module, args)
    ran, expected = warm.run(payload), cold(warm.user, payload)
    assert (ran.rc, ran.stderr) == (expected.rc, expected.stderr)
    assert ran.json() == expected.json()
    assert "module_stderr" not in ran.json() and "exception" not in ran.json()


PROBE = script("""
import __main__, json, os, resource, signal, sys, tempfile, time
print(json.dumps({
    "namespace": [[k, repr(v)] for k, v in vars(__main__).items()],
    "environ": dict(os.environ), "argv": sys.argv, "orig_argv": sys.orig_argv[1:],
    "path": sys.path, "cwd": os.getcwd(), "tmp": tempfile.gettempdir(), "tz": time.tzname,
    "stdio": [[s.encoding, s.errors, s.line_buffering, s.mode, s.seekable(), s.fileno(),
               s is getattr(sys, "__" + n + "__")]
              for n, s in (("stdin", sys.stdin), ("stdout", sys.stdout), ("stderr", sys.stderr))],
    "stdin": sys.stdin.read(),
    "signals": {n: str(signal.getsignal(getattr(signal, n))) for n in
                ("SIGINT", "SIGCHLD", "SIGPIPE", "SIGXFSZ", "SIGTERM", "SIGUSR1", "SIGHUP")},
    "nproc": resource.getrlimit(resource.RLIMIT_NPROC),
    "fds": sorted(os.listdir("/proc/self/fd")),
}, sort_keys=True))
""")


def test_interpreter_state_equals_a_cold_run(warm: FakeAgent) -> None:
    """What a script sees of its interpreter (namespace, environment with C-locale coercion,
    argv, sys.path, cwd, TMPDIR, TZ, stdio objects, signal handlers, fds) is a cold one's."""
    env = task_env(warm.user, TMPDIR="/var/tmp", TZ="Asia/Kolkata")
    ran, expected = warm.run(PROBE, env=env), cold(warm.user, PROBE, env=env)
    assert ran.stderr == expected.stderr == b""
    seen, want = json.loads(ran.stdout), json.loads(expected.stdout)
    assert seen == want
    assert seen["environ"]["LC_CTYPE"] == "C.UTF-8" and seen["tmp"] == "/var/tmp"
    assert seen["tz"] == ["IST", "IST"]


def test_a_task_leaves_nothing_to_the_next(warm: FakeAgent) -> None:
    """Task A changes globals, a preloaded module, the environment, cwd, a signal handler,
    starts a thread and registers an atexit handler; its own shutdown runs them (as a cold
    interpreter's does), and task B, forked from the same runner, sees none of it."""
    first = script("""
import atexit, json, os, signal, sys, threading, time
LEFTOVER = 1
json.dumps = None
import ansible.module_utils.basic as basic
basic.AnsibleModule = None
os.environ["LEFTOVER"] = "1"
os.chdir("/")
sys.path.append("/leftover")
signal.signal(signal.SIGUSR1, lambda *a: None)
def late():
    time.sleep(0.2)
    print("thread joined", flush=True)
threading.Thread(target=late).start()
atexit.register(print, "atexit ran")
""")
    second = script("""
import atexit, json, os, signal, sys, threading
import ansible.module_utils.basic as basic
print(json.dumps({"global": "LEFTOVER" in globals(), "env": "LEFTOVER" in os.environ,
    "cwd": os.getcwd(), "path": "/leftover" in sys.path,
    "usr1": signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL,
    "threads": threading.active_count(), "atexit": atexit._ncallbacks(),
    "basic": basic.AnsibleModule is not None}))
""")
    before = json.loads(warm.run(second).stdout)
    assert before == {
        "global": False, "env": False, "cwd": warm.user.home, "path": False, "usr1": True,
        "threads": 1, "atexit": before["atexit"], "basic": True}
    ran = warm.run(first)
    assert (ran.rc, ran.stdout, ran.stderr) == (0, b"thread joined\natexit ran\n", b"")
    after = warm.run(second)
    assert json.loads(after.stdout) == before, after.stderr


def test_random_state_differs_between_tasks(warm: FakeAgent) -> None:
    draw = script("import random, uuid; print(random.random(), uuid.uuid4())")
    first, second = warm.run(draw).stdout, warm.run(draw).stdout
    assert first.split()[0] != second.split()[0] and first.split()[1] != second.split()[1]


# -- how a task ends ------------------------------------------------------------------------

ENDINGS = {
    "segfault": "import ctypes\nctypes.string_at(0)",
    "os._exit": "import os\nprint('buffered, lost')\nos._exit(3)",
    "sys.exit(msg)": "import sys\nsys.exit('it failed')",
    "exception": "def f():\n    raise ValueError('boom')\nf()",
    "keyboard interrupt": "raise KeyboardInterrupt",
    "syntax error": "def (",
    "exit 0 with output": "print('ok')",
}


@pytest.mark.parametrize("ending", sorted(ENDINGS))
def test_a_task_ends_as_a_cold_run_ends(warm: FakeAgent, ending: str) -> None:
    """Same exit (a signal death stays a signal death) and same output as cold: a
    traceback names <stdin> and no frame of the runner."""
    payload = script(ENDINGS[ending])
    ran, expected = warm.run(payload), cold(warm.user, payload)
    assert (ran.rc, ran.stdout, ran.stderr) == (expected.rc, expected.stdout, expected.stderr)
    if ending == "segfault":
        assert os.WIFSIGNALED(ran.status) and os.WTERMSIG(ran.status) == signal.SIGSEGV
    if ending == "exception":
        assert b'File "<stdin>", line 4, in <module>\n  File "<stdin>", line 3, in f\n' in (
            ran.stderr)
        assert b"<string>" not in ran.stderr
    if ending == "sys.exit(msg)":
        assert (ran.rc, ran.stderr) == (1, b"it failed\n")
    if ending == "os._exit":
        assert (ran.rc, ran.stdout) == (3, b"")


def test_the_child_runs_as_the_user_in_its_own_session(warm: FakeAgent) -> None:
    who = script("import json, os; print(json.dumps([os.getpid(), os.getuid(), os.geteuid(), "
                 "os.getgid(), os.getegid(), sorted(os.getgroups()), os.getsid(0), "
                 "os.getpgid(0), os.getppid()]))")
    running = warm.start(who)
    ran = running.finish()
    user = warm.user
    assert json.loads(ran.stdout) == [ran.pid, user.uid, user.uid, user.gid, user.gid,
                                      sorted(set(user.groups)), ran.pid, ran.pid,
                                      warm.proc.pid]
    assert len(user.groups) > 1  # alice has two extra groups


def test_a_cwd_the_user_cannot_enter(warm: FakeAgent, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    for cwd, reason in (("/nonexistent", "No such file or directory"),
                        (str(locked), "Permission denied")):
        ran = warm.run(script("print('ran')"), cwd=cwd)
        assert ran.rc == 125
        assert ran.stderr.decode() == (
            f"marco-agent: cannot change directory to {cwd!r}: {reason}\n")
        assert ran.stdout == b""


def test_procs_fd_and_nproc(warm: FakeAgent) -> None:
    """The child writes "0" to the cgroup's procs fd before anything else, and caps the
    user's processes when asked; a procs fd it cannot write ends it with 126."""
    procs_r, procs_w = os.pipe()
    ran = warm.run(script("import resource; print(resource.getrlimit(resource.RLIMIT_NPROC))"),
                   procs_fd=procs_w, nproc=777)
    os.close(procs_w)
    assert os.read(procs_r, 10) == b"0"
    assert (ran.rc, ran.stdout) == (0, b"(777, 777)\n")
    failed = warm.run(script("print('ran')"), procs_fd=procs_r)  # a read end: EBADF
    os.close(procs_r)
    assert failed.rc == 126 and failed.stdout == b""
    assert failed.stderr.startswith(b"marco-agent: cannot join the execution's cgroup: ")


def test_a_fork_failure_answers_exited_alone_and_the_runner_goes_on(user: UserIdentity) -> None:
    """A runner that may not fork (RLIMIT_NPROC 1: itself) says `exited` without `started`,
    writes nothing to the task's pipes, and serves the next request."""
    fake = FakeAgent(user, nproc=1)
    try:
        for task_id in ("t1", "t2"):
            pipes = [os.pipe() for _ in range(3)]
            fake.send({"op": "run", "id": task_id, "cwd": "/", "env": task_env(user)},
                      [pipes[0][0], pipes[1][1], pipes[2][1]])
            for _, write_end in pipes:
                os.close(write_end)
            exited, _ = fake.expect(task_id, "exited")
            assert os.waitstatus_to_exitcode(exited["status"]) == 126
            assert not any(m["op"] == "started" for m, _ in fake.inbox)
            out = _read_pipes(pipes[1][0], pipes[2][0])
            assert out == {pipes[1][0]: b"", pipes[2][0]: b""}
            os.close(pipes[0][0])
    finally:
        fake.close()
    assert "cannot fork for task t1: Resource temporarily unavailable" in fake.logs()


# -- the loop -------------------------------------------------------------------------------

def test_tasks_run_at_once_and_signal_reaches_the_session(warm: FakeAgent,
                                                          tmp_path: Path) -> None:
    """A task that runs on does not hold up another; `signal` kills the waiting task's whole
    session (its own child too)."""
    waiting = warm.start(script("""
import subprocess, sys, time
child = subprocess.Popen(["sleep", "600"])
print(child.pid, flush=True)
while True:
    time.sleep(1)
"""))
    grandchild = int(_read_line(waiting.stdout_r))
    quick = warm.run(script("print('quick')"))
    assert (quick.rc, quick.stdout) == (0, b"quick\n")
    warm.send({"op": "signal", "id": waiting.id, "signal": signal.SIGTERM})
    ended = waiting.finish()
    assert os.WIFSIGNALED(ended.status) and os.WTERMSIG(ended.status) == signal.SIGTERM
    wait_for(lambda: _gone(grandchild), DEADLINE, "the task's own child killed")


def test_eof_waits_for_the_children_then_exits(warm: FakeAgent) -> None:
    """The agent closing its socket does not kill a running task: the runner reaps it, then
    exits and removes its warm zip."""
    flag = Path(warm.user.home) / f"go-{secrets.token_hex(4)}"
    running = warm.start(script(f"""
import os, time
while not os.path.exists({str(flag)!r}):
    time.sleep(0.01)
print("finished")
"""))
    assert _runner_dirs(warm)
    warm.sock.close()
    wait_for(lambda: _wchan(warm.proc.pid) == "do_wait", DEADLINE, "the runner in wait()")
    assert warm.proc.poll() is None
    flag.touch()
    out = _read_pipes(running.stdout_r, running.stderr_r)
    flag.unlink()
    assert out[running.stdout_r] == b"finished\n"
    assert warm.ended() == 0
    assert not _runner_dirs(warm)


def test_quit_lets_running_tasks_end_and_report(warm: FakeAgent) -> None:
    flag = Path(warm.user.home) / f"go-{secrets.token_hex(4)}"
    running = warm.start(script(f"""
import os, time
while not os.path.exists({str(flag)!r}):
    time.sleep(0.01)
"""))
    warm.send({"op": "quit"})
    flag.touch()
    assert running.finish().rc == 0
    flag.unlink()
    assert warm.ended() == 0


MALFORMED = {
    "not json": (b"{nope", 0),
    "not an object": (b"[1]", 0),
    "unknown op": (b'{"op": "fly"}', 0),
    "run with two fds": (b'{"op": "run", "id": "x", "cwd": "/", "env": {}}', 2),
    "env with a NUL": (b'{"op": "run", "id": "x", "cwd": "/", "env": {"A": "b\\u0000"}}', 3),
    "signal with fds": (b'{"op": "signal", "id": "x", "signal": 9}', 1),
    "a signal number too big": (b'{"op": "signal", "id": "x", "signal": 99}', 0),
    "too long": (b'{"op": "quit", "pad": "' + b"x" * 70000 + b'"}', 0),
    "nested too deep": (b'{"op": "quit", "x": ' + b"[" * 30000 + b"]" * 30000 + b"}", 0),
    "helper with two fds": (b'{"op": "helper", "id": "h", "argv": [], "source": ""}', 2),
    "helper with four fds": (b'{"op": "helper", "id": "h", "argv": [], "source": ""}', 4),
    "helper argv not a list": (b'{"op": "helper", "id": "h", "argv": "x", "source": ""}', 3),
    "helper argv with a NUL": (
        b'{"op": "helper", "id": "h", "argv": ["a\\u0000"], "source": ""}', 3),
    "helper argv too long": (
        b'{"op": "helper", "id": "h", "argv": ' + json.dumps(["a"] * 17).encode()
        + b', "source": ""}', 3),
    "helper source not text": (b'{"op": "helper", "id": "h", "argv": [], "source": 1}', 3),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_message_ends_the_runner(fake: FakeAgent, case: str) -> None:
    raw, nfds = MALFORMED[case]
    pipes = [os.pipe() for _ in range(nfds)]
    fake.send({}, [r for r, _ in pipes], raw=raw)
    assert fake.ended() == 2
    assert "malformed message from the agent" in fake.logs()
    for r, w in pipes:
        os.close(r)
        os.close(w)


# -- helpers ----------------------------------------------------------------------------------

def _runner_dirs(fake: FakeAgent) -> list[str]:
    """The runner's temporary directories (its warm zip's)."""
    return [name for name in os.listdir("/tmp")
            if name.startswith(f"marco-runner-{fake.proc.pid}-")]


def _read_line(fd: int) -> str:
    data = b""
    deadline = time.monotonic() + DEADLINE
    while not data.endswith(b"\n"):
        assert time.monotonic() < deadline, "no line"
        chunk = os.read(fd, 1)
        assert chunk, "EOF before a line"
        data += chunk
    return data.decode()


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state == "Z"


def _wchan(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return ""


# -- the python site changing under a runner --------------------------------------------------

@pytest.fixture
def siteuser(run: Any) -> Iterator[UserIdentity]:
    """A user of this test alone: its user site is created and changed here."""
    unix = create_user(run.user("site"))
    try:
        yield UserResolver().resolve(unix.name)
    finally:
        remove_user(unix.name)


def _as_user(user: UserIdentity, *argv: str) -> str:
    done = subprocess.run(list(argv), capture_output=True, text=True, check=True, cwd="/",
                          env=user.clean_environment(), timeout=DEADLINE,
                          **UserResolver().popen_identity(user))
    return done.stdout.strip()


def _add_module(user: UserIdentity, where: str, name: str) -> None:
    _as_user(user, PYTHON, "-c", "import os, sys; os.makedirs(sys.argv[1], exist_ok=True); "
             "open(os.path.join(sys.argv[1], sys.argv[2] + '.py'), 'w')"
             ".write('print(\"' + sys.argv[2] + ' imported\")')", where, name)


def _declined_or_ran(fake: FakeAgent, payload: bytes) -> dict[str, Any] | Ran:
    """Start `payload`: the runner's `declined` message, or the task's end."""
    fake.tasks += 1
    task_id = f"task-{fake.tasks}"
    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    stderr_r, stderr_w = os.pipe()
    fake.send({"op": "run", "id": task_id, "cwd": fake.user.home, "env": task_env(fake.user)},
              [stdin_r, stdout_w, stderr_w])
    for fd in (stdin_r, stdout_w, stderr_w):
        os.close(fd)
    answer, _ = fake.expect(task_id, "started", "declined")
    if answer["op"] == "declined":
        for fd in (stdin_w, stdout_r, stderr_r):
            os.close(fd)
        return answer
    _write_and_close(stdin_w, payload)
    out = _read_pipes(stdout_r, stderr_r)
    exited, _ = fake.expect(task_id, "exited")
    return Ran(exited["status"], out[stdout_r], out[stderr_r])


def test_a_user_site_made_after_the_runner_started_is_declined(siteuser: UserIdentity,
                                                               command: bytes) -> None:
    """`pip install --user` made the user site after the runner started: a cold interpreter
    has it on sys.path, the runner has not. The runner declines the task (it runs cold) and
    quits; a new runner sees the module as a cold run does."""
    user_site = _as_user(siteuser, PYTHON, "-c", "import site; print(site.getusersitepackages())")
    imports = script("import r7site")
    fake = FakeAgent(siteuser)
    try:
        assert fake.preload(command)["op"] == "preloaded"
        _add_module(siteuser, user_site, "r7site")
        expected = cold(siteuser, imports)
        assert (expected.rc, expected.stdout) == (0, b"r7site imported\n")
        answer = _declined_or_ran(fake, imports)
        assert answer == {"op": "declined", "id": "task-1", "reason": "python site changed"}
        assert fake.ended() == 0  # it quits: its sys.path is not a cold one's any more
    finally:
        fake.close()
    fresh = FakeAgent(siteuser)
    try:
        assert fresh.preload(command)["op"] == "preloaded"
        ran = _declined_or_ran(fresh, imports)
        assert isinstance(ran, Ran) and (ran.status, ran.stdout) == (0, b"r7site imported\n")
    finally:
        fresh.close()


def test_a_module_added_to_an_existing_site_dir_is_seen_warm(siteuser: UserIdentity,
                                                            command: bytes) -> None:
    """A package installed into a site directory already on sys.path: the runner's task sees
    it as a cold run does, without declining."""
    user_site = _as_user(siteuser, PYTHON, "-c", "import site; print(site.getusersitepackages())")
    _add_module(siteuser, user_site, "r7first")
    fake = FakeAgent(siteuser)
    try:
        assert fake.preload(command)["op"] == "preloaded"
        first = _declined_or_ran(fake, script("import r7first"))
        assert isinstance(first, Ran) and first.stdout == b"r7first imported\n"
        _add_module(siteuser, user_site, "r7later")
        ran = _declined_or_ran(fake, script("import r7later"))
        assert isinstance(ran, Ran) and (ran.status, ran.stdout) == (0, b"r7later imported\n")
    finally:
        fake.close()


# -- the file helper op ----------------------------------------------------------------------

HELPER_STATE = """
import os, signal, sys
print(sys.argv)
print(os.getcwd(), os.getsid(0) == os.getpid(), os.getpgid(0) == os.getpid())
print(sorted(os.listdir("/proc/self/fd")))
print(__name__, sorted(globals()))
print(os.getuid(), os.geteuid(), os.getgid(), sorted(os.getgroups()))
print(sorted(os.environ.items()))
print([signal.getsignal(s) for s in (signal.SIGINT, signal.SIGPIPE, signal.SIGCHLD)])
print(repr(sys.stdin.read()), sys.stdout.isatty())
sys.stdout.flush()
raise SystemExit(int(sys.argv[1]))
"""
HELPER_ENDINGS = {
    "exception": "def f():\n    raise ValueError('boom')\nf()\n",
    "sys.exit(msg)": "import sys\nsys.exit('it failed')\n",
    "clean": "print('done')\n",
}


def run_helper(fake: FakeAgent, source: str, argv: list[str],
               stdin: bytes = b"") -> Ran:
    """The `helper` op: a child running `source` as `python3 -I -S -c source argv`."""
    fake.tasks += 1
    helper_id = f"helper-{fake.tasks}"
    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    stderr_r, stderr_w = os.pipe()
    fake.send({"op": "helper", "id": helper_id, "argv": argv, "source": source},
              [stdin_r, stdout_w, stderr_w])
    for fd in (stdin_r, stdout_w, stderr_w):
        os.close(fd)
    return Running(fake, helper_id, stdin_w, stdout_r, stderr_r, stdin).finish()


def cold_helper(user: UserIdentity, source: str, argv: list[str], stdin: bytes = b"") -> Ran:
    """The same as the agent starts its file helper cold: `python3 -I -S -c`, as the user,
    clean environment, cwd /, own session."""
    done = subprocess.run([PYTHON, "-I", "-S", "-c", source, *argv], input=stdin,
                          capture_output=True, cwd="/", env=user.clean_environment(),
                          start_new_session=True, timeout=DEADLINE,
                          **UserResolver().popen_identity(user))
    return Ran(done.returncode << 8, done.stdout, done.stderr)


def test_a_helper_starts_as_python_c_would(warm: FakeAgent) -> None:
    argv = ["7", "write", "/tmp/ü x", "-"]
    ran = run_helper(warm, HELPER_STATE, argv, stdin=b"in")
    expected = cold_helper(warm.user, HELPER_STATE, argv, stdin=b"in")
    assert ran.rc == expected.rc == 7
    assert (ran.stdout.decode(), ran.stderr) == (expected.stdout.decode(), expected.stderr)
    assert ran.stdout.decode().splitlines()[1] == "/ True True"
    assert _gone(ran.pid)  # reaped by the runner, which goes on
    assert run_helper(warm, "print('again')", []).stdout == b"again\n"


@pytest.mark.parametrize("ending", sorted(HELPER_ENDINGS))
def test_a_helper_ends_as_python_c_ends(warm: FakeAgent, ending: str) -> None:
    source = HELPER_ENDINGS[ending]
    ran, expected = run_helper(warm, source, []), cold_helper(warm.user, source, [])
    assert (ran.rc, ran.stdout, ran.stderr) == (expected.rc, expected.stdout, expected.stderr)
    if ending == "exception":
        assert ran.rc == 1 and ran.stderr.startswith(b"Traceback")
        assert b'File "<string>", line 3, in <module>' in ran.stderr


def test_a_helper_is_a_task_of_the_runner(warm: FakeAgent) -> None:
    """Signalled by its id, waited for by quit, in the same id space as runs."""
    sleeper = start_helper(warm, "sleeps", "print('up', flush=True)\nimport time\n"
                           "time.sleep(60)\n")
    assert _read_line(sleeper[1]) == "up\n"
    warm.send({"op": "signal", "id": "sleeps", "signal": signal.SIGTERM})
    exited, _ = warm.expect("sleeps", "exited")
    assert os.WIFSIGNALED(exited["status"]) and os.WTERMSIG(exited["status"]) == signal.SIGTERM
    reader = start_helper(warm, "reads", "import sys\nprint(sys.stdin.read())\n")
    warm.send({"op": "quit"})
    _write_and_close(reader[0], b"after quit")
    assert _read_pipes(reader[1])[reader[1]] == b"after quit\n"
    exited, _ = warm.expect("reads", "exited")
    assert exited["status"] == 0
    assert warm.ended() == 0
    for fd in (sleeper[0], sleeper[1], sleeper[2], reader[2]):
        os.close(fd)


def start_helper(fake: FakeAgent, helper_id: str, source: str) -> tuple[int, int, int]:
    """Start a helper; the agent's ends (stdin_w, stdout_r, stderr_r) once it started."""
    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    stderr_r, stderr_w = os.pipe()
    fake.send({"op": "helper", "id": helper_id, "argv": [], "source": source},
              [stdin_r, stdout_w, stderr_w])
    for fd in (stdin_r, stdout_w, stderr_w):
        os.close(fd)
    fake.expect(helper_id, "started")
    return stdin_w, stdout_r, stderr_r
