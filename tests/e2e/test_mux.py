"""marco-mux (issue 14, item 4) through the real ansible-playbook: a play's tasks on the three
fleet nodes all go through one mux process of the user (started by the first play's first
task, which goes direct meanwhile), and without a usable mux (switched
off, or a socket directory others could enter) the connection goes direct, saying so at -vvv."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

from marco.tokens import TokenSigner
from tests.e2e.conftest import BIN, PLAYBOOKS, Fleet
from tests.e2e.test_ansible import recap
from tests.support.processes import alive
from tests.support.users import UnixUser
from tests.support.waiting import wait_for

MUX_LINE = re.compile(r"MARCO MUX: (via mux \(pid (\d+)\)|direct \((.*)\))$", re.M)
PLAY = """- hosts: all
  gather_facts: false
  tasks:
    - ansible.builtin.ping:
    - ansible.builtin.command: id -un
      register: who
    - ansible.builtin.assert:
        that: who.stdout == expected_user
    - ansible.builtin.copy:
        content: "mux {{ inventory_hostname }}\\n"
        dest: "~/mux-e2e-{{ inventory_hostname }}.txt"
    - ansible.builtin.file:
        path: "~/mux-e2e-{{ inventory_hostname }}.txt"
        state: absent
"""


def mux_processes(home: Path) -> list[int]:
    """marco-mux processes whose HOME is `home` (the fleet's ansible-playbook's)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"marco.mux_server" in cmdline and f"HOME={home}".encode() in environ \
                and alive(int(entry)):
            found.append(int(entry))
    return found


def play(fleet: Fleet, token: str, path: Path, user: UnixUser, *args: str,
         **environ: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "ansible-playbook"), str(path), "-vvv",
                           "-e", f"expected_user={user.name}", *args], cwd=PLAYBOOKS,
                          env={**fleet.env(token), **environ}, capture_output=True, text=True,
                          timeout=300)


def test_a_play_goes_through_one_mux(fleet: Fleet, signer: TokenSigner, alice: UnixUser,
                                     tmp_path: Path) -> None:
    """The first play of a user with no mux yet goes direct only while the mux starts (no
    task waits for it); the next play's tasks, on three nodes at once, all go through that
    one mux process."""
    path = tmp_path / "mux.yml"
    path.write_text(PLAY)
    home = Path(fleet.env("")["HOME"])
    for pid in mux_processes(home):  # a mux of an earlier test: this test starts its own
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not mux_processes(home), what="no mux of the fleet's HOME")
    token = signer.issue(alice.name)
    first = play(fleet, token, path, alice)
    assert first.returncode == 0, first.stdout[-5000:] + first.stderr[-3000:]
    for _, pid, reason in MUX_LINE.findall(first.stdout):
        assert pid or "starting" in reason, reason
    started = wait_for(lambda: len(mux_processes(home)) == 1 and mux_processes(home),
                       what="the one mux the first play started")
    out = play(fleet, token, path, alice)
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-3000:]
    for name in fleet.names:
        assert recap(out.stdout)[name]["ok"] == 5, out.stdout[-3000:]
    lines = MUX_LINE.findall(out.stdout)
    assert len(lines) >= 4 * len(fleet.names)  # assert runs on the controller
    assert not [line for line in lines if line[0].startswith("direct")], lines
    assert {int(pid) for _, pid, _ in lines} == set(started)
    assert mux_processes(home) == started and len(started) == 1


def test_without_a_usable_mux_the_play_goes_direct(fleet: Fleet, signer: TokenSigner,
                                                   alice: UnixUser, tmp_path: Path) -> None:
    path = tmp_path / "mux.yml"
    path.write_text(PLAY)
    token = signer.issue(alice.name)
    runtime = tmp_path / "runtime"
    (runtime / "marco").mkdir(parents=True)
    runtime.chmod(0o700)
    (runtime / "marco").chmod(0o755)
    for args, environ, reason in (
            (("-e", "marco_mux=false"), {}, "mux off"),
            ((), {"MARCO_MUX": "0"}, "mux off"),
            ((), {"XDG_RUNTIME_DIR": str(runtime)}, "is not private")):
        out = play(fleet, token, path, alice, *args, **environ)
        assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-3000:]
        lines = MUX_LINE.findall(out.stdout)
        assert len(lines) >= 4 * len(fleet.names)  # assert runs on the controller
        assert all(line[0].startswith("direct") and reason in line[2] for line in lines), lines
        for name in fleet.names:
            assert recap(out.stdout)[name]["ok"] == 5
