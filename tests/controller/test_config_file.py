"""The controller's settings come in layers: defaults < TOML config file < MARCO_* environment
< command-line flags; a bad file or value stops it with one line naming the culprit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from controller.__main__ import build_parser, load_config
from controller.config import ControllerConfig
from tests.support.controller_process import ControllerProcess
from tests.support.http import call
from tests.support.paths import ROOT
from tests.support.users import UnixUser


def login(controller: ControllerProcess, user: UnixUser, password: str) -> tuple[int, dict]:
    status, body = call(controller, "POST", "/api/token",
                        {"user": user.name, "password": password})
    return status, body if isinstance(body, dict) else {}


def settings(tmp_path: Path, text: str, environ: dict[str, str],
             *flags: str) -> ControllerConfig:
    """What the controller's own start-up code makes of a file, an environment and flags."""
    path = tmp_path / "controller.toml"
    path.write_text(text)
    return load_config(build_parser().parse_args(["--config", str(path), *flags]), environ)


def test_the_file_sets_options_of_a_running_controller(start_controller, alice: UnixUser,
                                                       tmp_path: Path) -> None:
    config = tmp_path / "controller.toml"
    config.write_text("# a site's settings\ntoken_max_age = 1234\nlogin-max-failures = 1\n")
    controller = start_controller(extra_args=["--config", str(config)])
    status, body = login(controller, alice, alice.password)
    assert status == 200 and body["max_age"] == 1234
    assert login(controller, alice, "wrong")[0] == 401
    assert login(controller, alice, alice.password)[0] == 429  # one failure was the limit


def test_environment_beats_the_file_and_flags_beat_both(start_controller, alice: UnixUser,
                                                        tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "controller.toml"
    config.write_text("token_max_age = 1000\n")
    monkeypatch.setenv("MARCO_CONFIG", str(config))  # the file named by the environment
    monkeypatch.setenv("MARCO_TOKEN_MAX_AGE", "2000")
    from_env = start_controller()
    assert login(from_env, alice, alice.password)[1]["max_age"] == 2000
    from_flag = start_controller(extra_args=["--token-max-age", "3000"])
    assert login(from_flag, alice, alice.password)[1]["max_age"] == 3000


def test_layers_for_lists_and_switches(tmp_path: Path) -> None:
    text = ('node = ["a=192.0.2.1:7370", "b=192.0.2.2:7370"]\ndiscovery = false\n'
            'mdns_interface = "192.0.2.9, 192.0.2.10"\nhealth_interval = 1.5\n')
    from_file = settings(tmp_path, text, {})
    assert from_file.node == ["a=192.0.2.1:7370", "b=192.0.2.2:7370"]
    assert from_file.mdns_interface == ["192.0.2.9", "192.0.2.10"]
    assert from_file.discovery is False and from_file.health_interval == 1.5
    assert from_file.token_max_age == 12 * 3600  # not in the file: the default
    env = {"MARCO_NODE": "c=192.0.2.3:7370,d=192.0.2.4:7370", "MARCO_DISCOVERY": "yes"}
    from_env = settings(tmp_path, text, env)
    assert from_env.node == ["c=192.0.2.3:7370", "d=192.0.2.4:7370"] and from_env.discovery
    assert from_env.mdns_interface == ["192.0.2.9", "192.0.2.10"]  # the file's, untouched
    from_flags = settings(tmp_path, text, env, "--node", "e=192.0.2.5:7370", "--no-discovery")
    assert from_flags.node == ["e=192.0.2.5:7370"] and from_flags.discovery is False


def controller_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`marco-controller ... list-certs`: a command that exits at once once the settings load
    (a file that loads by mistake cannot leave a server running)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MARCO_")}
    return subprocess.run([sys.executable, "-m", "controller", *args, "list-certs"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env={**environ, **env})


@pytest.mark.parametrize(("text", "expected"), [
    ("token_max_age = \n", "Invalid value (at line 1, column 17)"),
    ("[controller]\nport = 7380\n", "unknown setting(s): controller"),
    ("tokne_max_age = 60\n", "unknown setting(s): tokne_max_age"),
    ('token_max_age = "soon"\n', "bad value for token_max_age: invalid literal for int()"),
    ("health_interval = [1]\n", "bad value for health_interval"),
    ('dev = "maybe"\n', "bad value for dev: not a boolean: 'maybe'"),
])
def test_a_bad_file_is_one_line_naming_it(tmp_path: Path, text: str, expected: str) -> None:
    config = tmp_path / "controller.toml"
    config.write_text(text)
    out = controller_cli("--config", str(config), "--pki-dir", str(tmp_path / "pki"))
    assert out.returncode == 2 and out.stdout == "", out
    assert out.stderr.startswith("marco-controller: ") and f"{config}: " in out.stderr, out
    assert expected in out.stderr, out
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_a_missing_or_unreadable_file_and_a_bad_variable(tmp_path: Path) -> None:
    pki = ("--pki-dir", str(tmp_path / "pki"))
    missing = tmp_path / "none.toml"
    for out in (controller_cli("--config", str(missing), *pki),
                controller_cli(*pki, MARCO_CONFIG=str(missing))):
        assert out.returncode == 2, out
        assert out.stderr == f"marco-controller: config file {missing} does not exist\n"
    out = controller_cli("--config", str(tmp_path), *pki)  # a directory
    assert out.returncode == 2
    assert out.stderr == f"marco-controller: cannot read config file {tmp_path}: Is a directory\n"
    out = controller_cli(*pki, MARCO_TOKEN_MAX_AGE="soon")
    assert out.returncode == 2 and out.stderr.startswith(
        "marco-controller: MARCO_TOKEN_MAX_AGE: bad value for token_max_age"), out.stderr
    assert out.stderr.count("\n") == 1
