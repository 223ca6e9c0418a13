"""Runs do not collide: machine-global names carry the run's tag, and what a run that died left
behind is removed by the next one, while a live run's things are left alone."""

from __future__ import annotations

import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.netns import NamespaceNetwork, ip
from tests.support.run import RunNames, sweep_leftovers, this_run
from tests.support.users import create_user, remove_user

pytestmark = [pytest.mark.root, pytest.mark.netns]  # users, /etc files, namespaces


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def leave_behind(run: RunNames) -> list[Path]:
    """What a run that was SIGKILLed half-way leaves: a user, files, a namespace network."""
    create_user(run.user("alice"), groups=[run.user("g1")])
    files = [Path("/etc/pam.d") / run.pam_service, run.sudoers, run.srv("fuzz-root")]
    files[0].write_text("auth required pam_deny.so\n")
    files[1].write_text("# nothing\n")
    files[2].mkdir()
    NamespaceNetwork(1, run, network=0).create()
    return files


def namespaces() -> str:
    return ip("netns", "list").stdout


def bridges() -> str:
    return ip("-o", "link", "show", "type", "bridge").stdout


def test_a_dead_runs_leftovers_are_swept_and_a_live_runs_are_kept(run: RunNames) -> None:
    dead, alive = RunNames(dead_pid()), this_run()
    assert dead.tag != alive.tag and alive is run
    files = leave_behind(dead)
    mine = create_user(alive.user("keepme"))
    try:
        removed = sweep_leftovers()
        assert f"user {dead.user('alice')}" in removed and f"group {dead.user('g1')}" in removed
        with pytest.raises(KeyError):
            pwd.getpwnam(dead.user("alice"))
        assert not any(path.exists() for path in files)
        assert dead.namespace(0, 1) not in namespaces() and dead.bridge(0) not in bridges()
        assert pwd.getpwnam(mine.name).pw_uid == mine.uid  # this run's own user stays
    finally:
        remove_user(mine.name)


def test_names_fit_the_system_limits(run: RunNames) -> None:
    """useradd takes 32 characters, interface names 15; the widest pid is 0x400000."""
    widest = RunNames(0x3FFFFF)
    assert len(widest.user("alice")) <= 32 and len(widest.load_user(60)) <= 32
    assert len(f"{widest.bridge(1)}v100") <= 15
    assert run.subnet(0) != run.subnet(1)
