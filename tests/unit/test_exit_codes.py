"""An execution's exit code outside the signed 32-bit range (issue 13, review finding 12): an
agent's summary gives none, the store refuses it as a bad request (SQLite would raise an
OverflowError past 64 bits, which no handler takes for a MarcoError)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.agent_records import times
from controller.runstore import SqliteRunStore
from marco.errors import BadRequest
from tests.unit.test_runstore import make_run


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteRunStore]:
    opened = SqliteRunStore(tmp_path / "runs.sqlite3")
    yield opened
    opened.close()


def test_an_agents_exit_code_outside_32_bits_is_none() -> None:
    for rc in (0, 1, -1, 255, 2**31 - 1, -(2**31)):
        assert times({"rc": rc})["rc"] == rc
    for bad in (2**31, -(2**31) - 1, 2**63, 2**64, -(2**64), True, 1.0, "1"):
        assert times({"rc": bad})["rc"] is None, bad


def test_the_store_refuses_an_exit_code_outside_32_bits(store: SqliteRunStore) -> None:
    run = make_run()
    store.create(run)
    fields: dict[str, Any] = {"host": "web1", "node": "node1", "task_id": "t1", "events": []}
    for index, rc in enumerate((2**31, -(2**31) - 1, 2**64)):
        with pytest.raises(BadRequest, match="rc must be"):
            store.add_output("alice", run.id, execution_id=f"e{index}", rc=rc, **fields)
    record = store.add_output("alice", run.id, execution_id="ok", rc=2**31 - 1, **fields)
    assert record.rc == 2**31 - 1
    assert store.add_output("alice", run.id, execution_id="low", rc=-(2**31), **fields).rc \
        == -(2**31)
