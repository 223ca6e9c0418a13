"""agent.ansiballz on real AnsiballZ payloads and shell strings that ansible-core builds.

The payloads and shell strings come from ansible-core itself (tests/unit/ansiballz_build.py, run
once per module in its own process); what the recogniser extracts is checked against Python's
own parse of the payload (ast) and zip reader. cold_exit is checked against real dash.
"""

from __future__ import annotations

import ast
import base64
import io
import json
import os
import signal
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest

from agent.ansiballz import (
    Declined,
    ModuleCommand,
    cold_exit,
    module_command,
    preload_matches,
    zip_entries,
)
from tests.unit.ansiballz_build import ENVIRONMENT, MODULES, PYTHON

BUILDER = Path(__file__).with_name("ansiballz_build.py")
BASIC = "ansible/module_utils/basic.py"
# What a runner preloads (the loader, basic and the legacy profile pair, and their packages).
PRELOADED = ("ansible/__init__.py", "ansible/module_utils/__init__.py", BASIC,
             "ansible/module_utils/_internal/_ansiballz/_loader.py",
             "ansible/module_utils/_internal/_json/_profiles/_module_legacy_m2c.py",
             "ansible/module_utils/_internal/_json/_profiles/_module_legacy_c2m.py")


class Built:
    """The payloads (NAME.payload) and shell strings (shells.json) ansible-core built."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.shells: dict[str, str] = json.loads((folder / "shells.json").read_text())

    def payload(self, name: str) -> bytes:
        return (self.folder / f"{name}.payload").read_bytes()

    def module(self, name: str, shell: str = "pipelined") -> ModuleCommand:
        found = module_command(self.shells[shell], self.payload(name))
        assert isinstance(found, ModuleCommand), found
        return found


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    folder = tmp_path_factory.mktemp("ansiballz")
    env = {**os.environ, "ANSIBLE_LOCAL_TEMP": str(folder / "local")}
    subprocess.run([sys.executable, str(BUILDER), str(folder)], check=True, env=env, cwd=folder,
                   capture_output=True, timeout=300)
    return Built(folder)


def call_keywords(payload: bytes) -> dict[str, object]:
    """The literal keyword arguments of the payload's `_ansiballz_main(...)` call, by ast."""
    last = ast.parse(payload).body[-1]
    assert isinstance(last, ast.If)
    statement = last.body[0]
    assert isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Call)
    found: dict[str, object] = {}
    for keyword in statement.value.keywords:
        try:
            found[str(keyword.arg)] = ast.literal_eval(keyword.value)
        except ValueError:
            continue
    return found


def inflated_entries(zip_data: bytes) -> dict[str, tuple[int, int]]:
    """Member name -> (CRC-32, size) computed from each inflated member."""
    with zipfile.ZipFile(io.BytesIO(zip_data)) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    return {name: (zlib.crc32(data), len(data)) for name, data in members.items()}


def with_keyword(payload: bytes, key: str, value: bytes | None) -> bytes:
    """The payload with the call's `key=...,` line set to `key=value,` (removed for None)."""
    start = payload.rfind(f"\n{key}=".encode()) + 1
    end = payload.index(b"\n", start) + 1
    line = b"" if value is None else key.encode() + b"=" + value + b",\n"
    return payload[:start] + line + payload[end:]


def with_zip(payload: bytes, zip_data: bytes) -> bytes:
    return with_keyword(payload, "zip_data", repr(base64.b64encode(zip_data).decode()).encode())


def changed_member(zip_data: bytes, name: str) -> bytes:
    """The zip with member `name` one line longer."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(zip_data)) as source, \
            zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            data = source.read(info)
            target.writestr(info, data + b"# changed\n" if info.filename == name else data)
    return out.getvalue()


@pytest.mark.parametrize("name", MODULES)
def test_a_real_pipelined_module_is_recognised(built: Built, name: str) -> None:
    payload = built.payload(name)
    found = module_command(built.shells["pipelined"], payload)
    keywords = call_keywords(payload)
    assert isinstance(found, ModuleCommand), found
    assert (found.interpreter, found.env) == (PYTHON, {})
    assert (found.module, found.profile) == (name, "legacy")
    assert (found.module, found.profile) == (keywords["ansible_module"], keywords["profile"])
    assert found.zip_data == base64.b64decode(str(keywords["zip_data"]))
    assert found.entries == inflated_entries(found.zip_data)
    assert {BASIC, f"ansible/modules/{name}.py", *PRELOADED} <= set(found.entries)


def test_environment_assignments_are_kept_with_their_values_in_order(built: Built) -> None:
    found = built.module("command", "environment")
    assert found.interpreter == PYTHON
    assert list(found.env.items()) == list(ENVIRONMENT.items())


@pytest.mark.parametrize(("shell", "reason"), [
    ("sudo", "become"),
    ("su", "become"),
    ("pipelining_off", "pipelining off"),
    ("async", "async"),
    ("env_python", "interpreter arguments"),
    ("python_args", "interpreter arguments"),
    ("chdir", "not a module command"),
    ("raw", "not a module command"),
    ("pythonpath", "environment sets PYTHONPATH"),
    ("ld_preload", "environment sets LD_PRELOAD"),
    ("lang", "environment sets LANG"),
    ("lc_all", "environment sets LC_ALL"),
    ("tz", "environment sets TZ"),
    ("home", "environment sets HOME"),
])
@pytest.mark.parametrize("stdin", ["payload", "empty"])
def test_shells_ansible_builds_for_other_paths_are_declined(built: Built, shell: str,
                                                           reason: str, stdin: str) -> None:
    payload = built.payload("command") if stdin == "payload" else b""
    assert module_command(built.shells[shell], payload) == Declined(reason)


@pytest.mark.parametrize(("shell", "reason"), [
    (None, "not a shell command"),
    ("/bin/bash -c '/usr/bin/python3 && sleep 0'", "not /bin/sh -c"),
    ("/bin/sh -c '/usr/bin/python3 && sleep 0' x", "not /bin/sh -c"),
    ("/bin/sh -c '/usr/bin/python3 && sleep 0", "not /bin/sh -c"),
    ('/bin/sh -c "/usr/bin/python3 && sleep 0"', "shell not quoted as ansible quotes it"),
    ("/bin/sh -c 'FOO=$HOME /usr/bin/python3 && sleep 0'", "shell not quoted as ansible quotes it"),
    ("/bin/sh -c '/usr/bin/python3  && sleep 0'", "shell not quoted as ansible quotes it"),
    ("/bin/sh -c '/usr/bin/python3 || sleep 0'", "not a module command"),
    ("/bin/sh -c '/usr/bin/python3 && sleep 0; id'", "not a module command"),
    ("/bin/sh -c 'FOO=1 FOO=2 /usr/bin/python3 && sleep 0'", "not a module command"),
    ("/bin/sh -c 'python3 && sleep 0'", "interpreter not absolute"),
    ("/bin/sh -c '/usr/bin/env python3 && sleep 0'", "interpreter arguments"),
    ("/bin/sh -c 'PYTHONHOME=/x /usr/bin/python3 && sleep 0'", "environment sets PYTHONHOME"),
    ("/bin/sh -c 'PWD=/x /usr/bin/python3 && sleep 0'", "environment sets PWD"),
])
def test_other_shell_strings_are_declined(built: Built, shell: str | None, reason: str) -> None:
    assert module_command(shell, built.payload("command")) == Declined(reason)


def test_payloads_that_are_not_a_plain_ansiballz_module_are_declined(built: Built) -> None:
    shell = built.shells["pipelined"]
    payload = built.payload("command")
    declined = {
        "extensions": module_command(shell, built.payload("coverage")),
        "non-python module": module_command(built.shells["non_python"],
                                            built.payload("non_python")),
        "a python script": module_command(shell, b"#!/usr/bin/python3\nprint('hi')\n"),
        "no shebang": module_command(shell, payload[payload.index(b"\n"):]),
        "empty": module_command(shell, b""),
        "half": module_command(shell, payload[:len(payload) // 2]),
        "last byte cut": module_command(shell, payload[:-1]),
        "not a zip": module_command(shell, with_zip(payload, b"not a zip file")),
        "not base64": module_command(shell, with_keyword(payload, "zip_data", b"'@@@@'")),
        "no profile": module_command(shell, with_keyword(payload, "profile", None)),
        "odd profile": module_command(shell, with_keyword(payload, "profile", b"'../x'")),
        "odd module": module_command(shell, with_keyword(payload, "ansible_module", b"1")),
    }
    assert {case: found.reason for case, found in declined.items()
            if isinstance(found, Declined)} == {
        "extensions": "ansiballz extensions",
        "non-python module": "not a pipelined module",
        "a python script": "not a pipelined module",
        "no shebang": "not a pipelined module",
        "empty": "not a pipelined module",
        "half": "ansiballz payload truncated",
        "last byte cut": "ansiballz payload truncated",
        "not a zip": "ansiballz zip unreadable",
        "not base64": "ansiballz zip_data is not base64",
        "no profile": "ansiballz call unreadable",
        "odd profile": "ansiballz call unreadable",
        "odd module": "ansiballz call unreadable",
    }


def test_every_truncation_of_a_payload_is_declined(built: Built) -> None:
    shell, payload = built.shells["pipelined"], built.payload("command")
    cuts = [*range(0, len(payload), 997), *range(len(payload) - 100, len(payload))]
    assert [cut for cut in cuts
            if not isinstance(module_command(shell, payload[:cut]), Declined)] == []


def test_a_damaged_zip_directory_never_raises(built: Built) -> None:
    zip_data = built.module("stat").zip_data
    outcomes = set()
    for offset in range(zip_data.index(b"PK\x01\x02"), len(zip_data)):
        damaged = bytearray(zip_data)
        damaged[offset] ^= 0xFF
        outcomes.add(type(zip_entries(bytes(damaged))))
    assert outcomes == {dict, type(None)}


def test_preload_matches_the_same_ansible_core_and_not_a_changed_one(built: Built) -> None:
    command, copy = built.module("command"), built.module("copy")
    preloaded = {name: command.entries[name] for name in PRELOADED}
    changed = module_command(built.shells["pipelined"],
                             with_zip(built.payload("stat"), changed_member(
                                 built.module("stat").zip_data, BASIC)))
    assert isinstance(changed, ModuleCommand)
    missing = {name: value for name, value in copy.entries.items() if name != BASIC}
    assert preload_matches(preloaded, copy.entries)
    assert preload_matches(json.loads(json.dumps(preloaded)), copy.entries)
    assert preload_matches({}, copy.entries)
    assert not preload_matches(preloaded, changed.entries)
    assert not preload_matches(preloaded, missing)
    assert changed.entries[BASIC][0] != command.entries[BASIC][0]


def test_preload_matches_compares_crc_and_size() -> None:
    entries = {"a.py": (1, 10), "b.py": (2, 20)}
    assert preload_matches({"a.py": (1, 10)}, entries)
    assert not preload_matches({"a.py": (9, 10)}, entries)
    assert not preload_matches({"a.py": (1, 11)}, entries)
    assert not preload_matches({"c.py": (1, 10)}, entries)


@pytest.mark.parametrize(("signum", "core", "expected"), [
    (signal.SIGSEGV, False, (139, b"Segmentation fault\n")),
    (signal.SIGSEGV, True, (139, b"Segmentation fault (core dumped)\n")),
    (signal.SIGKILL, False, (137, b"Killed\n")),
    (signal.SIGTERM, False, (143, b"Terminated\n")),
    (signal.SIGABRT, True, (134, b"Aborted (core dumped)\n")),
    (signal.SIGBUS, False, (135, b"Bus error\n")),
    (signal.SIGINT, False, (130, b"")),
    (signal.SIGPIPE, False, (141, b"")),
    (32, False, (160, b"Unknown signal 32\n")),
    (64, False, (192, b"Real-time signal 30\n")),
])
def test_cold_exit(signum: int, core: bool, expected: tuple[int, bytes]) -> None:
    assert cold_exit(signum, core) == expected


def dash_exit(signum: int, tmp_path: Path) -> tuple[int, bytes]:
    """rc and stderr of the cold path's command for a python killed by `signum`, run as the
    agent runs it: `/bin/sh -c "/bin/sh -c 'python -c ... && sleep 0'"` (no core file)."""
    default = "" if signum == signal.SIGKILL else f"signal.signal({signum}, signal.SIG_DFL); "
    kill = ("import os, resource, signal; resource.setrlimit(resource.RLIMIT_CORE, (0, 0)); "
            f"{default}os.kill(os.getpid(), {signum})")
    inner = f"{sys.executable} -c '{kill}' && sleep 0"
    shell = f'/bin/sh -c "{inner}"'
    done = subprocess.run(["/bin/sh", "-c", shell], cwd=tmp_path, capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=60)
    return done.returncode, done.stderr


@pytest.mark.skipif(os.path.basename(os.path.realpath("/bin/sh")) != "dash",
                    reason="/bin/sh is not dash")
@pytest.mark.parametrize("signum", [signal.SIGSEGV, signal.SIGKILL, signal.SIGTERM,
                                    signal.SIGABRT, signal.SIGBUS, signal.SIGINT,
                                    signal.SIGPIPE, signal.SIGUSR1, 34])
def test_cold_exit_says_what_dash_says(signum: int, tmp_path: Path) -> None:
    assert dash_exit(signum, tmp_path) == cold_exit(signum, False)
