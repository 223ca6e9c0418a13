"""Per-run names for everything a test run makes outside its temp dirs, and the sweep of what
runs that died left behind.

Users, groups, the PAM service, the sudoers drop-in, network namespaces, bridges, subnets and
`/srv` paths are machine-global: two suites on one machine (or two pytest-xdist workers) would
collide on fixed names. Each carries the tag of the process that made it, its pid in hex, so
runs never share a name, and a later run removes what a dead run left (its pid is gone).
"""

from __future__ import annotations

import contextlib
import functools
import grp
import ipaddress
import os
import pwd
import re
import shutil
import signal
import subprocess
from pathlib import Path

from tests.support.processes import alive
from tests.support.users import remove_user

PAM_DIR = Path("/etc/pam.d")
SUDOERS_DIR = Path("/etc/sudoers.d")
SRV = Path("/srv")
LOCAL_BIN = Path("/usr/local/bin")
# Where runs leave files, and the names they give them.
LEFTOVER_FILES = ((PAM_DIR, "marco-test*"), (SUDOERS_DIR, "marcotest*"), (SRV, "marcotest-*"),
                  (SRV, "marco-fuzz-root"), (LOCAL_BIN, "marcotest-*"))
# Names made by runs before names carried a tag; removed by every run.
UNTAGGED = re.compile(r"^(marcotest-(alice|bob|carol|g1|g2)|marcoload-\d\d|marco-test|marcotest"
                      r"|marco-fuzz-root|marcotest-shell|marcobr-.*|marco-(t|e2e)-h\d+)$")
TAGGED = re.compile(r"^(?:marcotest|marcoload|marco-test|marco|mb)-([0-9a-f]+)(?:-|$)")


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=False, capture_output=True, text=True)


class RunNames:
    """The names one test process uses; `tag` is its pid in hex (6 digits at most)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.tag = f"{pid:x}"
        self._subnets: dict[int, str] = {}

    def user(self, role: str) -> str:
        """A Unix user (or group) name: `marcotest-TAG-ROLE`, at most 32 characters."""
        name = f"marcotest-{self.tag}-{role}"
        assert len(name) <= 32, name
        return name

    def load_user(self, index: int) -> str:
        return f"marcoload-{self.tag}-{index:02d}"

    @property
    def pam_service(self) -> str:
        return f"marco-test-{self.tag}"

    @property
    def sudoers(self) -> Path:
        """A sudoers drop-in (no dot in the name: sudo skips files with one)."""
        return SUDOERS_DIR / f"marcotest-{self.tag}"

    def srv(self, name: str) -> Path:
        return SRV / f"marcotest-{self.tag}-{name}"

    def local_bin(self, name: str) -> Path:
        return LOCAL_BIN / f"marcotest-{self.tag}-{name}"

    def namespace(self, network: int, host: int) -> str:
        return f"marco-{self.tag}-n{network}h{host}"

    def bridge(self, network: int) -> str:
        """A bridge name; its veths add `vN`, and interface names have 15 characters at most."""
        return f"mb-{self.tag}-{network}"

    def subnet(self, network: int) -> str:
        """The first three octets of a /24 for one network: 10.213.x for network 0, 10.214.x
        for 1, ..., x from the pid and free when first asked (then kept for the run)."""
        if network not in self._subnets:
            used = _addresses_in_use()
            for step in range(250):
                candidate = f"10.{213 + network}.{(self.pid + step) % 250 + 1}"
                if ipaddress.ip_network(f"{candidate}.0/24") not in used:
                    self._subnets[network] = candidate
                    break
            else:
                raise RuntimeError("no free /24 for the test network namespaces")
        return self._subnets[network]

    def gateways(self) -> tuple[str, ...]:
        """The bridge addresses of the run's networks 0 and 1, where netns tests' controllers
        listen: names on the controller's certificate."""
        return tuple(f"{self.subnet(n)}.1" for n in (0, 1))


@functools.cache
def this_run() -> RunNames:
    """The names of this process's run (each pytest-xdist worker is a run of its own)."""
    return RunNames(os.getpid())


def _addresses_in_use() -> set[ipaddress.IPv4Network]:
    out = _ip("-4", "-o", "addr", "show").stdout
    return {ipaddress.IPv4Interface(address).network
            for address in re.findall(r"inet (\S+)", out)}


def _leftover(name: str) -> bool:
    """True for a name of a run whose process is gone, or of the runs before tags."""
    if UNTAGGED.match(name):
        return True
    match = TAGGED.match(name)
    return match is not None and not alive(int(match.group(1), 16))


RUN_VARIABLE = "MARCO_TEST_RUN"  # in every daemon a test starts: the tag of its run


def _daemons_of_dead_runs() -> list[int]:
    """Processes whose environment names a run (RUN_VARIABLE) that is gone: daemons a killed
    test run left behind (their parent, pytest, died without stopping them)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or a kernel thread
            continue
        prefix = RUN_VARIABLE.encode() + b"="
        tag = next((v[len(prefix):] for v in environ if v.startswith(prefix)), None)
        if tag and re.fullmatch(rb"[0-9a-f]+", tag) and not alive(int(tag, 16)):
            found.append(int(entry.name))
    return found


def sweep_leftovers() -> list[str]:
    """Remove what dead runs left: daemons, users, groups, files, namespaces, bridges;
    returns them."""
    removed: list[str] = []
    for daemon in _daemons_of_dead_runs():
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon, signal.SIGKILL)
            removed.append(f"process {daemon}")
    for entry in pwd.getpwall():
        if entry.pw_name.startswith(("marcotest-", "marcoload-")) and _leftover(entry.pw_name):
            remove_user(entry.pw_name)
            removed.append(f"user {entry.pw_name}")
    for group in grp.getgrall():
        if group.gr_name.startswith("marcotest-") and _leftover(group.gr_name):
            subprocess.run(["groupdel", group.gr_name], check=False, capture_output=True)
            removed.append(f"group {group.gr_name}")
    for directory, pattern in LEFTOVER_FILES:
        for path in directory.glob(pattern):
            if _leftover(path.name):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(str(path))
    for line in _ip("netns", "list").stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith("marco-") and _leftover(name):
            for pid in _ip("netns", "pids", name).stdout.split():
                subprocess.run(["kill", "-KILL", pid], check=False, capture_output=True)
            _ip("netns", "del", name)
            removed.append(f"netns {name}")
    for line in _ip("-o", "link", "show", "type", "bridge").stdout.splitlines():
        name = line.split(":")[1].strip() if ":" in line else ""
        if name.startswith(("mb-", "marcobr-")) and _leftover(name):
            _ip("link", "del", name)
            removed.append(f"bridge {name}")
    return removed
