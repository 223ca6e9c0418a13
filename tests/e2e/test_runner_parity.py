"""The warm module runner (issue 14) through the real ansible-playbook: one playbook of varied
tasks (tests/e2e/playbooks/runner/parity.yml) run on one fleet node with `marco_runner=true` and
with `marco_runner=false`, every registered result written as JSON by the playbook, and the two
documents equal once what differs from run to run is masked (tmp paths, times, job ids, random
values). Then what each run must show on its own: isolation between tasks, crashes shaped like
cold ones, the -vvv path lines, and one runner per user with that user's uid."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from marco.tokens import TokenSigner
from tests.e2e.conftest import Fleet
from tests.support.processes import alive
from tests.support.run import SUDOERS_DIR, RunNames
from tests.support.users import UnixUser
from tests.support.waiting import wait_for

PLAYS = Path(__file__).parent / "playbooks" / "runner"
PARITY = PLAYS / "parity.yml"
WARM = PLAYS / "warm.yml"
# The connection's `marco_runner` var per run; names of one length, so are the paths in them.
MODES = {"warm": "true", "cold": "false"}

# Keys whose values differ between two runs of one task whichever path ran it.
VOLATILE_KEYS = frozenset({"start", "end", "delta", "atime", "mtime", "ctime", "inode",
                           "ansible_job_id", "results_file", "attempts", "random", "uuid",
                           "MARCO_EXECUTION_ID"})
# Per-run temporary paths: the connection's remote tmp, async job files, the payload zips
# (the wrapper's own, or the runner's warm.zip a preloaded module_util was imported from).
TMP_PATHS = ((re.compile(r"ansible-tmp-[0-9.]+-\d+-\d+"), "ansible-tmp-<TMP>"),
             (re.compile(r"ansible_[\w.]+_payload_[\w-]+/ansible_[\w.]+_payload\.zip"), "<ZIP>"),
             (re.compile(r"/tmp/marco-runner-[\w-]+/warm\.zip"), "<ZIP>"),
             (re.compile(r"\.ansible_async/j?[0-9.]+"), ".ansible_async/<JOB>"),
             (re.compile(r"\bj\d{6,}\.\d+\b"), "<JOB>"))
# Facts that are the same on one node from one run to the next (others hold times, free memory).
STABLE_FACTS = ("ansible_user_id", "ansible_user_uid", "ansible_user_gid", "ansible_user_dir",
                "ansible_user_shell", "ansible_user_gecos", "ansible_effective_user_id",
                "ansible_effective_group_id", "ansible_real_user_id", "ansible_real_group_id",
                "ansible_python", "ansible_python_version", "ansible_system", "ansible_kernel",
                "ansible_machine", "ansible_architecture", "ansible_distribution",
                "ansible_distribution_version", "ansible_distribution_release",
                "ansible_os_family", "ansible_pkg_mgr", "ansible_env", "ansible_selinux",
                "ansible_apparmor", "ansible_fips", "ansible_hostname", "ansible_nodename",
                "ansible_fqdn", "ansible_interfaces", "ansible_all_ipv4_addresses",
                "ansible_processor_count", "ansible_processor_vcpus", "ansible_memtotal_mb",
                "ansible_cmdline", "ansible_is_chroot", "ansible_lsb", "ansible_local")
BIG_OUTPUT_KEYS = ("stdout", "stderr", "stdout_lines", "stderr_lines")
TASK_HEADER = re.compile(r"^TASK \[(.*?)\] \**$", re.M)
PATH_LINE = re.compile(r"MARCO RUNNER (runner|process): (.*)$", re.M)


@dataclass
class PlaybookRun:
    """One run of parity.yml: its -vvv output, its results as written, and its folders."""

    mode: str
    output: str
    results: dict[str, Any]
    base: str
    fetch_dir: Path

    def task_output(self, task: str) -> str:
        """The -vvv text of one task, from its TASK line to the next."""
        parts = TASK_HEADER.split(self.output)
        sections = dict(zip(parts[1::2], parts[2::2], strict=True))
        assert task in sections, f"no TASK [{task}] in the {self.mode} run's output"
        return sections[task]

    def paths(self, task: str) -> list[tuple[str, str]]:
        """(via, note) of every execution the task's -vvv text reports."""
        return PATH_LINE.findall(self.task_output(task))


@pytest.fixture(scope="module")
def sudo_to_bob(alice: UnixUser, bob: UnixUser, run: RunNames) -> Iterator[str]:
    """A sudo rule for the parity play's become task: alice may become bob, no password."""
    rule = SUDOERS_DIR / f"marcotest-{run.tag}-runner"  # no dot: sudo skips such names
    rule.write_text(f"{alice.name} ALL=({bob.name}) NOPASSWD: ALL\n")
    rule.chmod(0o440)
    # bob's remote tmp exists before the first become (else its creation warns, once).
    remote_tmp = Path(bob.home) / ".ansible" / "tmp"
    remote_tmp.mkdir(parents=True, exist_ok=True)
    for made in (remote_tmp.parent, remote_tmp):
        os.chown(made, bob.uid, bob.gid)
        made.chmod(0o700)
    yield bob.name
    rule.unlink(missing_ok=True)


def _failure(output: str) -> str:
    """Where a -vvv run went wrong: its last failed task (ignored failures come before the one
    that ended the play; the output holds MBs of results) and its recap."""
    last = max(output.rfind("fatal: "), output.rfind("[ERROR]"))
    head = output[max(last - 1500, 0):last + 3000] if last >= 0 else ""
    return f"{head}\n...\n{output[-1500:]}"


def _run_parity(fleet: Fleet, token: str, mode: str, user: UnixUser, become_to: str,
                workdir: Path, blob: Path) -> PlaybookRun:
    base = f"{user.home}/marco-runner-{mode}"
    shutil.rmtree(base, ignore_errors=True)
    fetch_dir = workdir / f"fetched-{mode}"
    results_file = workdir / f"results-{mode}.json"
    out = fleet.ansible(token, str(PARITY), "-vvv", "--limit", fleet.names[0],
                        "-e", f"marco_runner={MODES[mode]}",
                        "-e", f"marco_tmp_shortcuts={MODES[mode]}", "-e", f"base={base}",
                        "-e", f"binary_src={blob}", "-e", f"fetch_dir={fetch_dir}",
                        "-e", f"results_file={results_file}", "-e", f"become_to={become_to}")
    assert out.returncode == 0, f"{mode} run:\n{_failure(out.stdout)}\n{out.stderr[-3000:]}"
    return PlaybookRun(mode, out.stdout, json.loads(results_file.read_text()), base, fetch_dir)


@pytest.fixture(scope="module")
def runs(fleet: Fleet, signer: TokenSigner, alice: UnixUser, sudo_to_bob: str,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, PlaybookRun]]:
    """parity.yml as alice on the first node: warm first (runner and tmp shortcuts on, so its
    runner starts within the play), then cold (both off)."""
    workdir = tmp_path_factory.mktemp("runner-parity")
    blob = workdir / "blob.bin"
    blob.write_bytes(os.urandom(3 * 1024 * 1024) + bytes(range(256)))
    token = signer.issue(alice.name)
    done = {mode: _run_parity(fleet, token, mode, alice, sudo_to_bob, workdir, blob)
            for mode in MODES}
    yield done
    for one in done.values():
        shutil.rmtree(one.base, ignore_errors=True)


def _digest(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return f"sha256:{hashlib.sha256(text.encode()).hexdigest()} ({len(text)} chars)"


def _without_volatile(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_volatile(v) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_without_volatile(v) for v in value]
    return value


def _stderr_shape(text: str) -> list[str]:
    """A module's stderr as its first and last non-empty lines: a traceback's frames name
    where the module ran from, its first line and the exception's line do not."""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[:1] + lines[-1:]


def masked(one: PlaybookRun) -> dict[str, Any]:
    """The run's results with what legitimately differs between two runs masked."""
    text = json.dumps(one.results, sort_keys=True)
    text = text.replace(one.base, "<BASE>").replace(str(one.fetch_dir), "<FETCH>")
    for pattern, replacement in TMP_PATHS:
        text = pattern.sub(replacement, text)
    results = _without_volatile(json.loads(text))
    facts = results["r_setup"].pop("ansible_facts")
    results["r_setup"]["stable_facts"] = {name: facts.get(name) for name in STABLE_FACTS}
    for listed in ("ansible_interfaces", "ansible_all_ipv4_addresses"):  # from sets
        results["r_setup"]["stable_facts"][listed] = sorted(facts.get(listed) or [])
    results["r_stat_binary"]["stat"].pop("version", None)  # the inode's generation number
    results["r_find"]["files"].sort(key=lambda found: found["path"])  # directory order
    for key in BIG_OUTPUT_KEYS:
        results["r_big"][key] = _digest(results["r_big"][key])
    for result in results.values():
        if isinstance(result, dict) and "module_stderr" in result:
            result["module_stderr"] = _stderr_shape(result["module_stderr"])
    return results


def _differences(warm: Any, cold: Any, where: str = "") -> list[str]:
    """Every path where the two documents differ, with both values (short)."""
    if isinstance(warm, dict) and isinstance(cold, dict):
        found = []
        for key in sorted(set(warm) | set(cold)):
            found += _differences(warm.get(key, "<missing>"), cold.get(key, "<missing>"),
                                  f"{where}.{key}")
        return found
    if isinstance(warm, list) and isinstance(cold, list) and len(warm) == len(cold):
        return [d for i, (a, b) in enumerate(zip(warm, cold, strict=True))
                for d in _differences(a, b, f"{where}[{i}]")]
    if warm == cold:
        return []
    return [f"{where}: warm {json.dumps(warm)[:300]} / cold {json.dumps(cold)[:300]}"]


def test_every_result_is_the_same_warm_and_off(runs: dict[str, PlaybookRun]) -> None:
    warm, cold = masked(runs["warm"]), masked(runs["cold"])
    assert len(warm) >= 40 and warm["r_setup"]["stable_facts"]["ansible_user_id"]
    assert _differences(warm, cold) == []


def test_files_travel_whole_both_ways(runs: dict[str, PlaybookRun],
                                      tmp_path_factory: pytest.TempPathFactory) -> None:
    for one in runs.values():
        sent = one.results["r_copy_binary"]
        assert sent["changed"] and sent["size"] == 3 * 1024 * 1024 + 256
        fetched = (one.fetch_dir / "blob.bin").read_bytes()
        assert hashlib.sha1(fetched).hexdigest() == sent["checksum"] == one.results["r_fetch"]["checksum"]
        assert one.results["r_stat_binary"]["stat"]["checksum"] == hashlib.sha256(fetched).hexdigest()
        assert one.results["r_copy_again"]["changed"] is False
        big = one.results["r_big"]
        assert len(big["stdout_lines"]) == 400000 and big["stdout_lines"][-1] == "400000"
        assert len(big["stderr_lines"]) == 100000


def test_commands_quoting_environment_and_tempdir(runs: dict[str, PlaybookRun]) -> None:
    for one in runs.values():
        results, home = one.results, str(Path(one.base).parent)
        # The command module expands $VARIABLES in its arguments itself (no shell).
        assert results["r_argv"]["stdout"] == f"héllo wörld ✓|it's|a \"q\"|{home}|`id`||"
        assert results["r_command"]["stdout"] == f"it's|a \"q\"|ünï|{home}|"
        assert results["r_shell"]["stdout_lines"] == ["üNï 42 SINGLE $HOME", "tab\there"]  # tr maps bytes
        assert results["r_shell"]["stderr"] == "to stderr ✓"
        assert results["r_shell_rc"]["rc"] == 7 and results["r_shell_rc"]["failed"]
        assert results["r_env"]["stdout"] == "[a b  c][ünï ✓ 'q' \"dq\"][]"
        assert results["r_stdin"]["stdout"] == "from stdin: ünï\nsecond line"
        seen = results["r_probe_env"]["seen"]
        assert seen["environ"]["FOO"] == "with  spaces" and seen["environ"]["TMPDIR"] == f"{one.base}/tmp"
        assert seen["tempdir"] == f"{one.base}/tmp"  # not a tempdir cached from an earlier task
        assert results["r_probe"]["seen"]["tempdir"] != seen["tempdir"]
        assert results["r_async"]["finished"] and results["r_async"]["stdout"] == "async-polled ✓"
        assert results["r_async_status"]["stdout"] == "async-later ✓"
        assert results["r_no_log"]["stdout"] == "not-to-be-shown"
        assert "not-to-be-shown" not in one.output


def test_become_works_both_ways(runs: dict[str, PlaybookRun], bob: UnixUser) -> None:
    for one in runs.values():
        assert one.results["r_become"]["stdout"] == bob.name


def test_crashes_end_like_cold_ones(runs: dict[str, PlaybookRun]) -> None:
    """Each way a module ends badly gives the same rc, failed and stderr with the runner on as
    with it off (and as today's cold path: test_every_result_is_the_same_warm_and_off)."""
    for one in runs.values():
        results = one.results
        assert results["r_fail_json"]["failed"] and results["r_fail_json"]["detail"] == {"code": 42}
        assert results["r_fail_json"]["msg"] == "refused: ünïcode 'quoted'"
        assert results["r_segfault"]["failed"] and results["r_segfault"]["rc"] == 139
        assert "Segmentation fault" in results["r_segfault"]["module_stderr"]
        assert results["r_exit3"]["failed"] and results["r_exit3"]["rc"] == 3
        assert results["r_exit3"]["module_stdout"] == "partial output, no JSON\n"
        assert results["r_sys_exit"]["rc"] == 1
        assert results["r_sys_exit"]["module_stderr"].strip() == "bye from the module: ünï"
        assert results["r_no_json"]["failed"] and "did not handle its own exit" in results["r_no_json"]["msg"]
        raised = results["r_raise"]
        assert raised["failed"] and "boom from the module: ünï" in json.dumps(raised, ensure_ascii=False)


def test_a_task_leaves_nothing_behind_for_the_next(runs: dict[str, PlaybookRun]) -> None:
    """Module A changes its process every way it can; module B, next on the same host (the
    same runner when warm), sees a process like a fresh one; A's atexit ran after its
    2 s non-daemon thread ended, as a real interpreter shutdown does."""
    for one in runs.values():
        plain = one.results["r_probe"]["seen"]
        seen = one.results["r_isolation_b"]["seen"]
        assert seen["atexit_file"] == "atexit ran, thread done"
        assert not seen["module_util_global"] and not seen["exit_json_patched"]
        assert seen["warnings"] == [] and "MARCO_LEAK" not in seen["environ"]
        assert not seen["path_leak"] and seen["excepthook_default"]
        assert seen["signals"]["SIGUSR1"] == "SIG_DFL" and seen["threads"] == ["MainThread"]
        for same in ("cwd", "signals", "atexit_callbacks", "fds", "limits", "umask"):
            assert seen[same] == plain[same], same
        assert _without_volatile(seen["environ"]) == _without_volatile(plain["environ"])
        assert seen["random"] != one.results["r_isolation_a"]["random"]
        assert seen["uuid"] not in (plain["uuid"], one.results["r_isolation_a"]["uuid"])
    # Warm, A and B were forked by one runner: what B saw is not a second runner's.
    warm = runs["warm"]
    runners = [re.findall(r"warm \(runner (\d+),", note)
               for task in ("Isolation A changes its process", "Isolation B sees none of it")
               for via, note in warm.paths(task) if via == "runner"]
    assert len(runners) == 2 and runners[0] and runners[0] == runners[1], runners


def test_vvv_names_the_path_each_task_took(runs: dict[str, PlaybookRun]) -> None:
    warm, cold = runs["warm"], runs["cold"]
    for task in ("Ping", "Command as a string", "What a module sees, plain",
                 "Isolation A changes its process", "Isolation B sees none of it"):
        assert [p for p in warm.paths(task) if p[0] == "runner"], (task, warm.paths(task))
    # Async runs its wrapper as a file, not a pipelined payload: the process path, working.
    forgotten = warm.paths("Async fire and forget")
    assert forgotten and all(via == "process" for via, _ in forgotten), forgotten
    # become goes the cold way (test_become_works_both_ways: and works).
    became = warm.paths("Become another user")
    assert ("process", "become") in became and not [p for p in became if p[0] == "runner"], became
    assert ("process", "runner off") in cold.paths("Ping")
    assert "MARCO RUNNER runner:" not in cold.output


def test_file_tasks_skip_the_shell_for_home_and_tmp(runs: dict[str, PlaybookRun]) -> None:
    """With tmp shortcuts on, `echo ~` is answered from the home the agent named (through the
    mux, from an earlier task) and the tmp's mkdir waits for the first command or file that
    names the tmp: the copy's stat module carries it (`_ansible_tmpdir`), so the mkdir runs
    first; a script's upload makes it. Fewer commands, the same results
    (test_every_result_is_the_same_warm_and_off); off, every step is a command on the node."""
    warm, cold = runs["warm"], runs["cold"]
    for task in ("Copy a binary file", "Template", "Script with arguments"):
        text = warm.task_output(task)
        assert "MARCO TMP: echo ~ is " in text, (task, text[-3000:])
        assert len(warm.paths(task)) < len(cold.paths(task)), (task, warm.paths(task),
                                                                cold.paths(task))
    copy = warm.task_output("Copy a binary file")
    assert "deferred to the first upload into it" in copy
    assert "MARCO TMP: making the deferred tmp first" in copy
    script = warm.task_output("Script with arguments")
    assert "MARCO TMP: this upload makes the deferred tmp" in script, script[-3000:]
    assert "MARCO TMP:" not in cold.output


def _runners(fleet: Fleet, tokens: list[str]) -> dict[int, dict[str, Any]]:
    """The first node's runners by pid, as GET /v1/status lists them to each of `tokens`."""
    found: dict[int, dict[str, Any]] = {}
    for token in tokens:
        for runner in fleet.agents[0].client(token).status().get("runners", []):
            found[int(runner["pid"])] = runner
    return found


def _uids(pid: int) -> list[int]:
    """Real, effective, saved and filesystem uid of a process, from /proc (one pid namespace)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return [int(field) for field in re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()]  # type: ignore[union-attr]


def test_two_users_get_their_own_runner_as_themselves(fleet: Fleet, signer: TokenSigner,
                                                      alice: UnixUser, bob: UnixUser) -> None:
    tokens = []
    for user in (alice, bob):
        token = signer.issue(user.name)
        out = fleet.ansible(token, str(WARM), "-vvv", "--limit", fleet.names[0],
                            "-e", "marco_runner=true", "-e", f"expected_user={user.name}")
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
        assert "MARCO RUNNER runner:" in out.stdout
        tokens.append(token)
    runners = _runners(fleet, tokens)
    mine = {user.name: [pid for pid, r in runners.items() if r["user"] == user.name]
            for user in (alice, bob)}
    assert mine[alice.name] and mine[bob.name], runners
    assert not set(mine[alice.name]) & set(mine[bob.name])
    for user in (alice, bob):
        for pid in mine[user.name]:
            assert _uids(pid) == [user.uid] * 4, (user.name, pid)


def test_a_runner_killed_between_plays_is_replaced(fleet: Fleet, signer: TokenSigner,
                                                   alice: UnixUser) -> None:
    """kill -9 of the user's runner between two plays: the next play works, on a new runner."""
    token = signer.issue(alice.name)

    def play() -> str:
        out = fleet.ansible(token, str(WARM), "-vvv", "--limit", fleet.names[0],
                            "-e", "marco_runner=true", "-e", f"expected_user={alice.name}")
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
        return out.stdout

    def alices() -> set[int]:
        return {pid for pid, r in _runners(fleet, [token]).items() if r["user"] == alice.name}

    play()
    killed = alices()
    assert killed
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not any(alive(pid) for pid in killed), what="the killed runners dead")
    assert "MARCO RUNNER runner:" in play()
    assert alices() and not alices() & killed
