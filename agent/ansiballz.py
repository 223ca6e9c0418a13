"""Recognise a pipelined Ansible module (an AnsiballZ payload) in an execution's shell and stdin.

Pure functions, standard library only: the agent asks `module_command` whether an execution may
run warm in the user's module runner (agent.runners), `preload_matches` whether a runner's
preloaded module_utils are the ones this payload carries, and `cold_exit` what the cold path's
`/bin/sh -c 'python && sleep 0'` reports for a child killed by a signal.

The recogniser accepts only the exact strings ansible-core 2.19 builds for a pipelined module
(`_low_level_execute_command` and the sh shell plugin's `env_prefix`/`build_module_command`):
`/bin/sh -c 'NAME=VALUE... /abs/python && sleep 0'`, every value and the interpreter quoted by
`shlex.quote`. Anything else (become, pipelining off, async, a quoted or expanded word, an
interpreter with arguments, an environment that changes interpreter start-up) is declined with a
short reason, and the execution runs the cold way.
"""

from __future__ import annotations

import ast
import binascii
import io
import re
import shlex
import signal
import zipfile
from dataclasses import dataclass

SHELL = "/bin/sh"
PIPELINED_TAIL = ["&&", "sleep", "0"]
BECOME_MARK = "BECOME-SUCCESS-"
QUOTING = "shell not quoted as ansible quotes it"
WRAPPER_MARK = b"\n_ANSIBALLZ_WRAPPER = True\n"
WRAPPER_HEAD = 8192
CALL_START = b'\nif __name__ == "__main__":\n    _ansiballz_main(\n'
ZIP_START = b"\nzip_data='"
ZIP_END = b"',\n)\n"
SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
PROFILE_NAME = re.compile(r"[A-Za-z0-9_]+\Z")
KEYWORD = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*\Z")
# Read once at interpreter start-up or import (sys.path, stdio encoding, locale, the loader,
# the user site under HOME, the time module's zone): a warm runner cannot honour them per task.
STARTUP_PREFIXES = ("PYTHON", "LD_", "LC_")
STARTUP_NAMES = frozenset({"LANG", "PWD", "TZ", "HOME"})
# The keyword lines of the wrapper's call this module reads; the others it leaves to the wrapper.
NEEDED_KEYWORDS = ("ansible_module", "profile", "extensions")
# dash prints a signal's text into a 32-byte buffer (jobs.c sprint_status).
DASH_SIGNAL_TEXT = 31
SILENT_SIGNALS = frozenset({signal.SIGINT, signal.SIGPIPE})


@dataclass(frozen=True)
class ModuleCommand:
    """A pipelined AnsiballZ module that may run in a warm runner."""

    interpreter: str                          # absolute path, e.g. "/usr/bin/python3"
    env: dict[str, str]                       # NAME=VALUE assignments before the interpreter
    zip_data: bytes                           # the decoded zip
    entries: dict[str, tuple[int, int]]       # zip member name -> (CRC-32, uncompressed size)
    module: str                               # ansible_module='command'
    profile: str                              # profile='legacy'


@dataclass(frozen=True)
class Declined:
    """Why an execution runs the cold way; short and lower case, for -vvv."""

    reason: str


@dataclass(frozen=True)
class _Shell:
    env: dict[str, str]
    interpreter: str


@dataclass(frozen=True)
class _Call:
    module: str
    profile: str
    zip_b64: memoryview


def module_command(shell: str | None, stdin: bytes) -> ModuleCommand | Declined:
    """The module `shell` and `stdin` run if they are a pipelined AnsiballZ module exactly as
    ansible-core builds it, else why not."""
    parsed = _parse_shell(shell)
    if isinstance(parsed, Declined):
        return parsed
    call = _parse_payload(stdin)
    if isinstance(call, Declined):
        return call
    try:
        zip_data = binascii.a2b_base64(call.zip_b64, strict_mode=True)
    except binascii.Error:
        return Declined("ansiballz zip_data is not base64")
    entries = zip_entries(zip_data)
    if entries is None:
        return Declined("ansiballz zip unreadable")
    return ModuleCommand(interpreter=parsed.interpreter, env=parsed.env, zip_data=zip_data,
                         entries=entries, module=call.module, profile=call.profile)


def preload_matches(preloaded: dict[str, tuple[int, int]],
                    entries: dict[str, tuple[int, int]]) -> bool:
    """Every preloaded name is in `entries` with the same (crc, size)."""
    for name, expected in preloaded.items():
        found = entries.get(name)
        # A runner's report arrives as JSON lists; compare the values, not the container.
        if found is None or tuple(found) != tuple(expected):
            return False
    return True


def cold_exit(status_signal: int, core_dumped: bool) -> tuple[int, bytes]:
    """rc and stderr text a `/bin/sh -c 'python && sleep 0'` (dash) gives for a child killed
    by signal `status_signal`: 128+N and glibc's strsignal text, as dash prints it; SIGINT and
    SIGPIPE print nothing."""
    rc = 128 + status_signal
    if status_signal in SILENT_SIGNALS:
        return rc, b""
    text = _signal_text(status_signal)[:DASH_SIGNAL_TEXT]
    if core_dumped:
        text += " (core dumped)"
    return rc, f"{text}\n".encode("ascii", "replace")


def zip_entries(zip_data: bytes) -> dict[str, tuple[int, int]] | None:
    """Member name -> (CRC-32, uncompressed size) from the zip's central directory (nothing is
    inflated), or None when it does not read."""
    try:
        with zipfile.ZipFile(io.BytesIO(zip_data)) as archive:
            return {info.filename: (info.CRC, info.file_size) for info in archive.infolist()}
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, ValueError, EOFError,
            OSError):
        return None


def _signal_text(signum: int) -> str:
    try:
        text = signal.strsignal(signum)
    except ValueError:
        text = None
    # Python answers None where glibc's strsignal (dash's) says "Unknown signal N".
    return text if text is not None else f"Unknown signal {signum}"


def _parse_shell(shell: str | None) -> _Shell | Declined:
    """The environment and interpreter of `/bin/sh -c 'NAME=VALUE... INTERP && sleep 0'`."""
    if shell is None:
        return Declined("not a shell command")
    if BECOME_MARK in shell:
        return Declined("become")
    inner = _sh_c(shell)
    if isinstance(inner, Declined):
        return inner
    words = _split(inner)
    if words is None or words[-3:] != PIPELINED_TAIL:
        return Declined("not a module command")
    env, rest = _assignments(words[:-3])
    if len(rest) != 1 or " " in rest[0] or "\t" in rest[0]:
        return Declined(_why_not_interpreter(rest))
    interpreter = rest[0]
    if not interpreter.startswith("/"):
        return Declined("interpreter not absolute")
    for name in env:
        if name in STARTUP_NAMES or name.startswith(STARTUP_PREFIXES):
            return Declined(f"environment sets {name}")
    if inner != _ansible_inner(env, interpreter):
        return Declined(QUOTING)
    return _Shell(env=env, interpreter=interpreter)


def _sh_c(shell: str) -> str | Declined:
    """The script of `/bin/sh -c SCRIPT`, quoted exactly as ansible quotes it."""
    words = _split(shell)
    if words is None or len(words) != 3 or words[:2] != [SHELL, "-c"]:
        return Declined("not /bin/sh -c")
    inner = words[2]
    # Only shlex.quote's spelling: no expansion or other shell word the split cannot see.
    return inner if shell == f"{SHELL} -c {shlex.quote(inner)}" else Declined(QUOTING)


def _split(text: str) -> list[str] | None:
    try:
        return shlex.split(text)
    except ValueError:
        return None


def _assignments(words: list[str]) -> tuple[dict[str, str], list[str]]:
    """The leading NAME=VALUE words as a dict, and the words after them."""
    env: dict[str, str] = {}
    for index, word in enumerate(words):
        name, equals, value = word.partition("=")
        if not equals or not SHELL_NAME.match(name) or name in env:
            return env, words[index:]
        env[name] = value
    return env, []


def _ansible_inner(env: dict[str, str], interpreter: str) -> str:
    """The inner script as ansible-core writes it (env_prefix, build_module_command,
    append_command)."""
    words = [f"{name}={shlex.quote(value)}" for name, value in env.items()]
    words.append(shlex.quote(interpreter))
    return " ".join(words + PIPELINED_TAIL)


def _why_not_interpreter(rest: list[str]) -> str:
    """The reason a command that is not a lone interpreter is declined."""
    if any("AnsiballZ_async_wrapper" in word for word in rest):
        return "async"
    if any("AnsiballZ_" in word for word in rest):
        return "pipelining off"
    if rest and rest[0].startswith("/") and "&&" not in rest:
        return "interpreter arguments"
    return "not a module command"


def _parse_payload(stdin: bytes) -> _Call | Declined:
    """The wrapper call's module, profile and base64 zip; found from the end of the payload,
    so the cost does not grow with a scan of it."""
    if not stdin.startswith(b"#!") or stdin.find(WRAPPER_MARK, 0, WRAPPER_HEAD) < 0:
        return Declined("not a pipelined module")
    if not stdin.endswith(ZIP_END):
        return Declined("ansiballz payload truncated")
    zip_at = stdin.rfind(ZIP_START)
    call_at = stdin.rfind(CALL_START, 0, zip_at + 1)
    if zip_at < 0 or call_at < 0:
        return Declined("ansiballz payload truncated")
    keywords = _keywords(stdin[call_at + len(CALL_START):zip_at + 1])
    if isinstance(keywords, Declined):
        return keywords
    module, profile, extensions = keywords
    if extensions:
        return Declined("ansiballz extensions")
    zip_b64 = memoryview(stdin)[zip_at + len(ZIP_START):len(stdin) - len(ZIP_END)]
    return _Call(module=module, profile=profile, zip_b64=zip_b64)


def _keywords(lines: bytes) -> tuple[str, str, object] | Declined:
    """ansible_module, profile and extensions of the `key=repr(value),` lines."""
    values: dict[str, bytes] = {}
    for line in lines.split(b"\n")[:-1]:
        key, equals, value = line.partition(b"=")
        if not equals or not value.endswith(b",") or not KEYWORD.match(key):
            return Declined("ansiballz call unreadable")
        values[key.decode("ascii")] = value[:-1]
    try:
        module, profile, extensions = (ast.literal_eval(values[name].decode("utf-8"))
                                       for name in NEEDED_KEYWORDS)
    except (KeyError, ValueError, SyntaxError, MemoryError, RecursionError):
        return Declined("ansiballz call unreadable")
    if not isinstance(module, str) or not isinstance(profile, str) \
            or not PROFILE_NAME.match(profile) or not isinstance(extensions, dict):
        return Declined("ansiballz call unreadable")
    return module, profile, extensions
