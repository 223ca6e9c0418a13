"""The bounded on-disk record of one execution: `meta.json` plus its output events.

Every output event the owner's sockets receive is appended here first (one JSON object a line),
so a late or reconnecting viewer can replay from any `seq` without a gap, also after an agent
restart. Past `max_bytes` the spool stops storing output and records the first seq it dropped
(`truncated_seq`): replay then says so instead of silently skipping lines.
"""

from __future__ import annotations

import bisect
import json
import os
import shutil
from pathlib import Path
from typing import Any

from marco.atomic import write_atomic

from .budget import Account

META_FILE = "meta.json"
OUTPUT_FILE = "output.jsonl"
SPARE_MAX = 32  # emptied spool directories kept for new executions


class SpareDirs:
    """Emptied spool directories kept for the next executions, in a directory of their own
    (the spool root holds records only). Once a user has `retention_count` records, every new
    execution's spool is made as an old one is removed: two renames cost the file system less
    than rmdir and then mkdir (the directory's inode and block are not freed and allocated
    again). Until `open` names the directory, none is kept."""

    def __init__(self, limit: int = SPARE_MAX) -> None:
        self.limit = limit
        self.root: Path | None = None
        self._dirs: list[Path] = []
        self._count = 0

    def __len__(self) -> int:
        return len(self._dirs)

    def open(self, root: Path) -> None:
        """Keep spares in `root` (a private directory of the agent), emptied of an earlier
        run's."""
        for leftover in root.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)
        self.root, self._dirs = root, []

    def make(self, directory: Path) -> None:
        """Create `directory` (mode 0700): a kept one renamed, else a new one. The new name
        is a fresh random execution id, never an existing directory."""
        while self._dirs:
            try:
                os.rename(self._dirs.pop(), directory)
                return
            except OSError:
                continue  # gone (removed by hand): try the next, or make one
        directory.mkdir(mode=0o700, parents=True)

    def keep(self, directory: Path) -> bool:
        """Move an emptied directory here for `make`; False when enough are kept (or it
        cannot be moved): the caller removes it."""
        if self.root is None or len(self._dirs) >= self.limit:
            return False
        self._count += 1
        spare = self.root / str(self._count)
        try:
            os.rename(directory, spare)
        except OSError:
            return False
        self._dirs.append(spare)
        return True


class ExecutionSpool:
    """Appends output events of one execution and reads them back from a seq."""

    def __init__(self, directory: Path, max_bytes: int, account: Account | None = None) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.truncated_seq: int | None = None
        # The owner's disk budget: output the budget refuses is cut like output past max_bytes.
        self.account = account
        self._meta_size = 0
        self._size = 0
        self._fd: int | None = None
        self._writable = False          # a spool `create` made takes output until `close`
        self._spares: SpareDirs | None = None  # where `remove` leaves its emptied directory
        self._starts: list[int] = []    # first seq of each stored event
        self._offsets: list[int] = []   # byte offset of each stored event
        self._indexed = False

    @classmethod
    def create(cls, directory: Path, max_bytes: int, account: Account | None = None,
               spares: SpareDirs | None = None) -> ExecutionSpool:
        """A new spool in `directory` (made from one of `spares` if any is kept); its
        `remove` gives the emptied directory back to `spares`."""
        if spares is None:
            directory.mkdir(mode=0o700, parents=True)
        else:
            spares.make(directory)
        spool = cls(directory, max_bytes, account)
        spool._spares = spares
        # output.jsonl is made by the first append: a silent execution (most Ansible shell
        # steps, every no_log one) costs no file to create now and unlink at expiry.
        spool._writable = True
        spool._indexed = True
        return spool

    @classmethod
    def open_existing(cls, directory: Path, max_bytes: int,
                      account: Account | None = None) -> ExecutionSpool:
        """A finished execution's spool found on disk at start-up (indexed on first read),
        charged to its owner's budget."""
        spool = cls(directory, max_bytes, account)
        for name in (OUTPUT_FILE, META_FILE):
            try:
                size = (directory / name).stat().st_size
            except FileNotFoundError:
                size = 0
            if name == OUTPUT_FILE:
                spool._size = size
            else:
                spool._meta_size = size
        if account is not None:
            account.charge(spool.disk_bytes)
        return spool

    def append(self, encoded_event: str, first_seq: int, line_count: int) -> None:
        """Store one output event (already JSON-encoded) covering `line_count` lines."""
        if self.truncated_seq is not None or not self._writable:
            return
        data = (encoded_event + "\n").encode("utf-8")
        if self._size + len(data) > self.max_bytes or (
                self.account is not None and not self.account.try_charge(len(data))):
            self.truncated_seq = first_seq
            return
        try:
            if self._fd is None:
                self._fd = os.open(self.directory / OUTPUT_FILE,
                                   os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            written = os.write(self._fd, data)
        except OSError:
            written = -1
        if written != len(data):
            # Disk full or similar: keep the execution going, stop storing, say where, and
            # cut a torn last line so the record stays readable.
            if self.account is not None:
                self.account.release(len(data))
            self.truncated_seq = first_seq
            try:
                if self._fd is not None:
                    os.ftruncate(self._fd, self._size)
            except OSError:
                pass
            return
        self._starts.append(first_seq)
        self._offsets.append(self._size)
        self._size += len(data)

    @property
    def size(self) -> int:
        """Bytes of output stored."""
        return self._size

    @property
    def disk_bytes(self) -> int:
        """Bytes on disk: output and meta.json."""
        return self._size + self._meta_size

    def close(self) -> None:
        self._writable = False
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def write_meta(self, meta: dict[str, Any]) -> None:
        """Replace meta.json atomically (charged to the owner's budget: commands are capped,
        so it is small, and always written)."""
        try:  # UTF-8 as it is (escaped text can take 6 bytes a character, 12 an emoji) ...
            data = json.dumps(meta, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:  # ... unless a lone surrogate needs escaping
            data = json.dumps(meta).encode("ascii")
        write_atomic(self.directory / META_FILE, data, 0o600)
        if self.account is not None:
            self.account.charge(len(data) - self._meta_size)
        self._meta_size = len(data)

    @staticmethod
    def read_meta(directory: Path) -> dict[str, Any]:
        with open(directory / META_FILE, encoding="utf-8") as handle:
            return json.load(handle)

    def read(self, since: int, max_lines: int, max_bytes: int = 1 << 62) -> list[dict[str, Any]]:
        """Output events holding lines with seq >= since, the first one trimmed to start there;
        at most about `max_lines` lines and `max_bytes` bytes of stored events (at least one)."""
        self._ensure_index()
        index = bisect.bisect_right(self._starts, since) - 1
        index = max(index, 0)
        if not self._offsets or index >= len(self._offsets):
            return []
        events: list[dict[str, Any]] = []
        total = size = 0
        with open(self.directory / OUTPUT_FILE, "rb") as handle:
            handle.seek(self._offsets[index])
            for raw in handle:
                if events and size + len(raw) > max_bytes:
                    break
                size += len(raw)
                event = json.loads(raw)
                lines = event["lines"]
                end = event["seq"] + len(lines)
                if end <= since:
                    continue
                if event["seq"] < since:
                    event["lines"] = lines[since - event["seq"]:]
                    event["seq"] = since
                events.append(event)
                total += len(event["lines"])
                if total >= max_lines:
                    break
        return events

    def _ensure_index(self) -> None:
        if self._indexed:
            return
        offset = 0
        try:
            with open(self.directory / OUTPUT_FILE, "rb") as handle:
                for raw in handle:
                    if not raw.endswith(b"\n"):
                        break  # torn last write of a crashed agent
                    self._starts.append(json.loads(raw)["seq"])
                    self._offsets.append(offset)
                    offset += len(raw)
        except FileNotFoundError:
            pass
        self._indexed = True

    def remove(self) -> None:
        self.close()
        try:  # the files the spool makes, without rmtree's walk: this runs on every exit
            for name in (OUTPUT_FILE, META_FILE, META_FILE + ".tmp"):
                (self.directory / name).unlink(missing_ok=True)
            # Only this agent writes in a spool it made: emptied of those, the directory is
            # empty and may serve a new execution.
            if self._spares is None or not self._spares.keep(self.directory):
                self.directory.rmdir()
            self._spares = None
        except FileNotFoundError:
            pass
        except OSError:  # something else in it (a crash's meta.json.tmp)
            shutil.rmtree(self.directory, ignore_errors=True)
        if self.account is not None:
            self.account.release(self.disk_bytes)
        self._size = self._meta_size = 0
