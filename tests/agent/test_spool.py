"""The execution spool's on-disk life: files made only when needed, directories reused."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from agent.spool import META_FILE, OUTPUT_FILE, ExecutionSpool, SpareDirs

EVENT = '{"type":"output","id":"x","stream":"stdout","seq":0,"lines":["hi"],"time":1.0}'


def test_a_silent_execution_makes_no_output_file(tmp_path: Path) -> None:
    """output.jsonl is made by the first output: none for a silent execution, whose spool
    still reads back empty; one with output reads it back."""
    silent = ExecutionSpool.create(tmp_path / "silent", 1 << 20)
    silent.close()
    assert not (tmp_path / "silent" / OUTPUT_FILE).exists()
    assert silent.read(0, 100) == [] and silent.size == 0
    spoken = ExecutionSpool.create(tmp_path / "spoken", 1 << 20)
    spoken.append(EVENT, 0, 1)
    spoken.close()
    spoken.append(EVENT, 1, 1)  # after close: not stored
    assert [e["lines"] for e in spoken.read(0, 100)] == [["hi"]]
    assert (tmp_path / "spoken" / OUTPUT_FILE).stat().st_size == spoken.size


def test_a_removed_spool_directory_serves_the_next_spool_empty(tmp_path: Path) -> None:
    """remove() moves the emptied directory out of the records; the next spool is made by
    renaming it back (same inode), empty and private."""
    records, spares = tmp_path / "executions", SpareDirs()
    records.mkdir()
    (tmp_path / "spare").mkdir()
    spares.open(tmp_path / "spare")
    old = ExecutionSpool.create(records / "old", 1 << 20, spares=spares)
    old.append(EVENT, 0, 1)
    old.write_meta({"id": "old"})
    inode = (records / "old").stat().st_ino
    old.remove()
    assert os.listdir(records) == [] and len(spares) == 1
    new = ExecutionSpool.create(records / "new", 1 << 20, spares=spares)
    info = (records / "new").stat()
    assert info.st_ino == inode and stat.S_IMODE(info.st_mode) == 0o700
    assert os.listdir(records / "new") == [] and len(spares) == 0
    assert new.read(0, 100) == []
    new.write_meta({"id": "new"})
    assert ExecutionSpool.read_meta(records / "new") == {"id": "new"}


def test_spare_directories_are_bounded_and_an_earlier_runs_are_removed(tmp_path: Path) -> None:
    records, spare_root, spares = tmp_path / "executions", tmp_path / "spare", SpareDirs(limit=1)
    records.mkdir()
    spare_root.mkdir()
    (spare_root / "7").mkdir()  # left by an agent that stopped
    spares.open(spare_root)
    assert os.listdir(spare_root) == []
    for name in ("a", "b"):
        spool = ExecutionSpool.create(records / name, 1 << 20, spares=spares)
        spool.write_meta({"id": name})
    for name in ("a", "b"):
        ExecutionSpool(records / name, 1 << 20).remove()  # loaded from disk: not kept
    assert os.listdir(records) == [] and len(spares) == 0
    spools = [ExecutionSpool.create(records / name, 1 << 20, spares=spares) for name in "cd"]
    for spool in spools:
        spool.write_meta({"id": spool.directory.name})
        (spool.directory / (META_FILE + ".tmp")).write_bytes(b"torn")
    for spool in spools:
        spool.remove()
    assert os.listdir(records) == [] and len(spares) == 1
    assert [os.listdir(spare_root / name) for name in os.listdir(spare_root)] == [[]]
