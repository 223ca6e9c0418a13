"""marco-mux's KnownHomes: whom a token ran as on an agent, for a task's `echo ~`."""

from __future__ import annotations

from marco.mux_server import KnownHomes, Target

AGENT = Target("192.0.2.1", 7370, "web1", 30.0, None)
OTHER = Target("192.0.2.2", 7370, "web2", 30.0, None)


def test_a_home_is_known_per_agent_and_token_only() -> None:
    homes = KnownHomes()
    homes.learn(AGENT, "token-a", "alice", "/home/alice")
    assert homes.known(AGENT, "token-a") == ("alice", "/home/alice")
    assert homes.known(AGENT, "token-b") == ("", "")
    assert homes.known(OTHER, "token-a") == ("", "")
    homes.learn(AGENT, "token-a", "", "")  # an older agent's answer names nobody: kept
    assert homes.known(AGENT, "token-a") == ("alice", "/home/alice")


def test_homes_are_bounded_and_expire() -> None:
    homes = KnownHomes(limit=2)
    for number in range(3):
        homes.learn(AGENT, f"token-{number}", "alice", "/home/alice")
    assert homes.known(AGENT, "token-0") == ("", "")  # the least recent went
    assert homes.known(AGENT, "token-2") == ("alice", "/home/alice")
    stale = KnownHomes(max_age=-1.0)  # every answer is already too old
    stale.learn(AGENT, "token-a", "alice", "/home/alice")
    assert stale.known(AGENT, "token-a") == ("", "")
