"""The small pure modules: settings layering, revocation tables, the socket hub, the block
coalescer, per-address connection accounting. No root, no network, milliseconds."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pytest

from agent.hub import StreamHub
from marco.chunks import Coalescer
from marco.errors import BadRequest, ConfigError
from marco.revocations import DeniedTokens, Revocations, token_digest
from marco.settings import Option, add_options, load_settings

OPTIONS = [Option("port", 7370, "port", kind=int), Option("groups", [], "groups", repeatable=True),
           Option("dev", False, "dev", flag=True)]


def settings(argv: list[str], environ: dict[str, str], config: Path | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_options(parser, OPTIONS)
    args = parser.parse_args(argv + (["--config", str(config)] if config else []))
    return load_settings(OPTIONS, args, environ, "/nonexistent/marco.toml")


def test_settings_layers_defaults_file_environment_flags(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('port = 1\ngroups = ["a", "b"]\ndev = true\n')
    assert settings([], {}) == {"port": 7370, "groups": [], "dev": False}
    assert settings([], {}, config) == {"port": 1, "groups": ["a", "b"], "dev": True}
    assert settings([], {"MARCO_PORT": "2", "MARCO_GROUPS": "c,d"}, config)["port"] == 2
    assert settings(["--port", "3", "--groups", "e", "--no-dev"], {"MARCO_PORT": "2"}, config) \
        == {"port": 3, "groups": ["e"], "dev": False}


def test_settings_errors_name_their_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="MARCO_PORT"):
        settings([], {"MARCO_PORT": "many"})
    config = tmp_path / "bad.toml"
    config.write_text("colour = 1\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        settings([], {}, config)
    with pytest.raises(ConfigError, match="does not exist"):
        settings([], {}, tmp_path / "missing.toml")


def test_revocations_keep_the_later_time_and_survive_a_reload(tmp_path: Path) -> None:
    table = Revocations(tmp_path / "r.json")
    assert table.update({"alice": 100.0, "bob": 5}) == ["alice", "bob"]
    assert table.update({"alice": 50.0}) == []  # an older time never wins
    again = Revocations(tmp_path / "r.json")
    again.load()
    assert again.not_before("alice") == 100.0 and again.not_before("carol") is None
    with pytest.raises(BadRequest):
        table.update({"alice": float("nan")})
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o600


def test_denied_tokens_expire_and_check_their_input(tmp_path: Path) -> None:
    denied = DeniedTokens(tmp_path / "d.json")
    now = time.time()
    assert denied.update({token_digest("t1"): now + 60, token_digest("t2"): now - 1}) \
        == [token_digest("t1")]
    assert denied.denied("t1") and not denied.denied("t2")
    with pytest.raises(BadRequest):
        denied.update({"not-a-digest": now + 60})
    assert json.loads((tmp_path / "d.json").read_text()) == {token_digest("t1"): now + 60}


class Socket:
    def __init__(self, fail: bool = False) -> None:
        self.got: list[str] = []
        self.fail = fail

    def send(self, message: str) -> None:
        if self.fail:
            raise RuntimeError("broken")
        self.got.append(message)


def test_hub_sends_each_users_events_to_that_user_only() -> None:
    hub = StreamHub()
    alice, alice2, bob, broken = Socket(), Socket(), Socket(), Socket(fail=True)
    for user, socket in (("alice", alice), ("alice", alice2), ("bob", bob), ("alice", broken)):
        hub.add(user, socket)
    hub.publish("alice", "m1")
    assert alice.got == alice2.got == ["m1"] and bob.got == []
    assert hub.count("alice") == 2  # the broken socket was dropped, the others kept
    hub.remove("bob", bob)
    assert hub.count("bob") == 0 and len(hub.all_sockets()) == 2


def test_coalescer_joins_small_pieces_and_passes_big_ones_as_they_are() -> None:
    blocks = Coalescer(min_size=10)
    assert blocks.add(b"abc") is None and blocks.add(b"defg") is None
    assert blocks.add(b"hijk") == b"abcdefghijk"
    big = b"x" * 20
    assert blocks.add(big) is big
    assert blocks.add(b"y") is None and blocks.flush() == b"y" and blocks.flush() == b""
