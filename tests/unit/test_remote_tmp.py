"""RemoteTmp (ansible_plugins/core/remote_tmp.py) against ansible-core's real `sh` shell plugin:
which commands it answers, which it defers, and when the deferred mkdir must run first."""

from __future__ import annotations

import shlex

import pytest
from ansible.plugins.loader import shell_loader

from ansible_plugins.core.remote_tmp import RemoteTmp

HOME = "/home/alice"
BASE = f"{HOME}/.ansible/tmp"


def wrapped(inner: str) -> str:
    """What _low_level_execute_command hands the connection for `inner`."""
    return "/bin/sh -c " + shlex.quote(inner + " && sleep 0")


@pytest.fixture
def shell() -> object:
    plugin = shell_loader.get("sh")
    plugin.set_options()
    return plugin


@pytest.fixture
def tmp(shell: object) -> RemoteTmp:
    remote = RemoteTmp(shell)
    remote.learn("alice", HOME)
    return remote


def make_tmp(shell: object, tmp: RemoteTmp, basefile: str = "ansible-tmp-1-2") -> str:
    command = wrapped(shell._mkdtemp2(basefile=basefile, tmpdir=BASE).command)  # type: ignore[attr-defined]
    answered = tmp.answer(command, None, becoming=False)
    assert answered is not None
    (rc, out, _), _ = answered
    assert (rc, out) == (0, f"{basefile}={BASE}/{basefile}\n".encode())
    return command


def test_echo_home_is_answered_only_for_the_callers_own_home(shell, tmp) -> None:
    for path in ("~", "~alice"):
        answered = tmp.answer(wrapped(shell._expand_user2(path).command), None, becoming=False)
        assert answered is not None and answered[0] == (0, b"/home/alice\n", b""), path
    for path in ("~bob", "~/x", "$HOME"):
        assert tmp.answer(wrapped(shell._expand_user2(path).command), None, False) is None, path
    # A command that merely reads the same is not one the shell plugin generated.
    assert tmp.answer("/bin/sh -c 'echo ~ ; sleep 0'", None, becoming=False) is None


def test_nothing_is_answered_without_a_home_from_the_agent(shell) -> None:
    tmp = RemoteTmp(shell)  # an older agent names no home
    assert tmp.answer(wrapped(shell._expand_user2("~").command), None, False) is None
    command = wrapped(shell._mkdtemp2(basefile="ansible-tmp-1", tmpdir=BASE).command)
    assert tmp.answer(command, None, becoming=False) is None


def test_nothing_is_answered_when_off_under_become_or_with_stdin(shell, tmp) -> None:
    command = wrapped(shell._expand_user2("~").command)
    assert tmp.answer(command, None, becoming=True) is None
    assert tmp.answer(command, b"data", becoming=False) is None
    tmp.enabled = False
    assert tmp.answer(command, None, becoming=False) is None


def test_a_tmp_the_shell_would_transform_is_not_deferred(shell, tmp) -> None:
    for tmpdir in ("~/.ansible/tmp", "$HOME/tmp", "/tmp/a b", "/tmp/../etc", "relative/tmp"):
        command = wrapped(shell._mkdtemp2(basefile="ansible-tmp-1", tmpdir=tmpdir).command)
        assert tmp.answer(command, None, becoming=False) is None, tmpdir
    system = wrapped(shell._mkdtemp2(basefile="ansible-tmp-1", system=True, tmpdir="/tmp").command)
    assert tmp.answer(system, None, becoming=False) is None


def test_the_first_upload_into_the_tmp_makes_it(shell, tmp) -> None:
    make_tmp(shell, tmp)
    assert not tmp.upload_makes_tmp(f"{BASE}/other/file")
    assert tmp.deferred_command("/bin/sh -c 'true'") is None  # does not name the tmp
    assert tmp.upload_makes_tmp(f"{BASE}/ansible-tmp-1-2/source")
    assert not tmp.upload_makes_tmp(f"{BASE}/ansible-tmp-1-2/again")  # made once
    assert tmp.deferred_command(f"cat {BASE}/ansible-tmp-1-2/source") is None


def test_a_command_naming_the_tmp_runs_the_real_mkdir_first(shell, tmp) -> None:
    command = make_tmp(shell, tmp)
    payload = b'{"_ansible_tmpdir": "' + f"{BASE}/ansible-tmp-1-2/".encode() + b'"}'
    assert tmp.deferred_command("/bin/sh -c '/usr/bin/python3 && sleep 0'", payload) == command
    assert tmp.deferred_command("anything naming ansible-tmp-1-2") is None  # once
    assert not tmp.upload_makes_tmp(f"{BASE}/ansible-tmp-1-2/source")  # it exists: no mkdir


def test_removing_a_tmp_never_made_needs_no_command(shell, tmp) -> None:
    make_tmp(shell, tmp)
    remove = wrapped(shell.remove(f"{BASE}/ansible-tmp-1-2/", recurse=True))
    answered = tmp.answer(remove, None, becoming=False)
    assert answered is not None and answered[0] == (0, b"", b"")
    assert tmp.pending is None
    # Once made, the removal is a real command.
    make_tmp(shell, tmp, "ansible-tmp-3-4")
    assert tmp.upload_makes_tmp(f"{BASE}/ansible-tmp-3-4/source")
    assert tmp.answer(wrapped(shell.remove(f"{BASE}/ansible-tmp-3-4/", recurse=True)), None,
                      becoming=False) is None
