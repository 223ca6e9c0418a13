"""The output spool and the per-user disk budget, without an agent: pure file and bookkeeping
logic, no root, milliseconds."""

from __future__ import annotations

import json
from pathlib import Path

from agent.budget import DiskBudget
from agent.spool import META_FILE, ExecutionSpool


def event(seq: int, lines: list[str]) -> str:
    return json.dumps({"type": "output", "id": "x", "stream": "stdout", "seq": seq,
                       "lines": lines})


def test_replay_from_any_seq_trims_the_first_event(tmp_path: Path) -> None:
    spool = ExecutionSpool.create(tmp_path / "e", 1 << 20)
    spool.append(event(0, ["a", "b", "c"]), 0, 3)
    spool.append(event(3, ["d", "e"]), 3, 2)
    assert [e["lines"] for e in spool.read(0, 100)] == [["a", "b", "c"], ["d", "e"]]
    assert [(e["seq"], e["lines"]) for e in spool.read(2, 100)] == [(2, ["c"]), (3, ["d", "e"])]
    assert spool.read(5, 100) == []
    reopened = ExecutionSpool.open_existing(tmp_path / "e", 1 << 20)
    assert [e["seq"] for e in reopened.read(4, 100)] == [4]


def test_past_max_bytes_the_spool_says_where_it_stopped(tmp_path: Path) -> None:
    spool = ExecutionSpool.create(tmp_path / "e", 150)
    spool.append(event(0, ["x" * 20]), 0, 1)
    spool.append(event(1, ["y" * 200]), 1, 1)
    spool.append(event(2, ["z"]), 2, 1)  # nothing after the cut, even if it would fit
    assert spool.truncated_seq == 1 and [e["seq"] for e in spool.read(0, 100)] == [0]


def test_budget_charges_output_and_meta_and_releases_on_removal(tmp_path: Path) -> None:
    budget = DiskBudget(10_000)
    spool = ExecutionSpool.create(tmp_path / "e", 1 << 20, budget.account("alice"))
    spool.write_meta({"command": "é" * 100})
    meta_size = (tmp_path / "e" / META_FILE).stat().st_size
    assert meta_size < 300  # UTF-8, not \\u escapes
    spool.append(event(0, ["a" * 100]), 0, 1)
    assert budget.used("alice") == spool.disk_bytes == meta_size + spool.size
    assert budget.used("bob") == 0
    spool.remove()
    assert budget.used("alice") == 0 and not budget.exhausted("alice")


def test_a_refused_charge_cuts_the_spool_and_marks_the_user_until_something_is_freed(
        tmp_path: Path) -> None:
    budget = DiskBudget(500)
    first = ExecutionSpool.create(tmp_path / "a", 1 << 20, budget.account("alice"))
    first.append(event(0, ["a" * 300]), 0, 1)
    second = ExecutionSpool.create(tmp_path / "b", 1 << 20, budget.account("alice"))
    second.append(event(0, ["b" * 300]), 0, 1)
    assert second.truncated_seq == 0 and budget.exhausted("alice")
    first.remove()
    assert not budget.exhausted("alice")


def test_make_room_is_asked_before_a_charge_is_refused() -> None:
    freed: list[str] = []
    budget: DiskBudget

    def make_room(user: str) -> bool:
        if freed:
            return False
        freed.append(user)
        budget.release(user, 400)
        return True

    budget = DiskBudget(500, make_room)
    budget.charge("alice", 400)
    assert budget.try_charge("alice", 300) and freed == ["alice"]
    assert budget.used("alice") == 300
    assert not budget.try_charge("alice", 300)  # nothing more to free
