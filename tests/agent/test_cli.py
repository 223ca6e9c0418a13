"""The marco-agent command line: help, config layering, refusals with one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from agent.__main__ import build_parser, load_config
from tests.support.paths import ROOT


def agent_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def test_help_lists_the_options() -> None:
    out = agent_cli("--help")
    assert out.returncode == 0
    for flag in ("--bind", "--port", "--secret-file", "--state-dir", "--mdns-interface",
                 "--node-name", "--groups", "--config", "init-secret", "MARCO_PORT"):
        assert flag in out.stdout


def test_refuses_to_start_with_a_bad_secret_in_one_line(tmp_path: Path) -> None:
    missing = agent_cli("--secret-file", str(tmp_path / "nope"), "--no-announce")
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1 and "does not exist" in missing.stderr
    public = tmp_path / "public"
    public.write_text("p" * 64)
    public.chmod(0o644)
    out = agent_cli("--secret-file", str(public))
    assert out.returncode == 2 and "chmod 600" in out.stderr and out.stderr.count("\n") == 1
    short = tmp_path / "short"
    short.write_text("abc")
    short.chmod(0o600)
    out = agent_cli("--secret-file", str(short))
    assert out.returncode == 2 and "at least 32" in out.stderr


def test_init_secret_creates_a_private_file(tmp_path: Path) -> None:
    target = tmp_path / "conf" / "secret"
    out = agent_cli("init-secret", "--secret-file", str(target))
    assert out.returncode == 0, out.stderr
    assert target.stat().st_mode & 0o777 == 0o600
    again = agent_cli("init-secret", "--secret-file", str(target))
    assert again.returncode == 2 and "already exists" in again.stderr


def test_layering_defaults_file_env_flags(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('port = 7001\nnode_name = "from-file"\ngroups = ["web", "db"]\n'
                      'bind = "127.0.0.2"\n')
    parser = build_parser()
    values = load_config(parser.parse_args(["--config", str(config)]), {})
    assert (values.port, values.node_name, values.groups, values.bind) == (
        7001, "from-file", ["web", "db"], "127.0.0.2")
    env = {"MARCO_PORT": "7002", "MARCO_GROUPS": "lab"}
    values = load_config(parser.parse_args(["--config", str(config)]), env)
    assert (values.port, values.groups) == (7002, ["lab"])
    values = load_config(parser.parse_args(["--config", str(config), "--port", "7003",
                                            "--groups", "a,b", "--groups", "c"]), env)
    assert (values.port, values.groups, values.node_name) == (7003, ["a", "b", "c"], "from-file")
    defaults = load_config(parser.parse_args([]), {"MARCO_CONFIG": ""})
    assert (defaults.bind, defaults.port) == ("127.0.0.1", 7370)


def test_config_errors_are_clear(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("colour = 'blue'\n")
    out = agent_cli("--config", str(bad))
    assert out.returncode == 2 and "unknown setting(s): colour" in out.stderr
    out = agent_cli("--config", str(tmp_path / "missing.toml"))
    assert out.returncode == 2 and "does not exist" in out.stderr
    out = agent_cli("--port", "x", "--secret-file", "/dev/null")
    assert out.returncode == 2 and "bad value for port" in out.stderr
