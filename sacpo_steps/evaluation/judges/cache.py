"""An append-only JSONL cache of raw judge replies, shared by parallel judge jobs.

Paid replies must survive a killed job and must not be bought twice, so each
entry is appended, flushed and fsynced as soon as it arrives. Why JSONL and not
SQLite: the cache lives under `results/` on whatever filesystem the cluster
gives (often NFS), where SQLite's WAL mode is unsafe (it needs shared memory)
and its rollback journal is slow; an append under `fcntl.flock` is safe there,
and the file stays greppable and easy to inspect or prune by hand.

Entries that arrive together are written with one write and one fsync (group
commit, `put_many`): an fsync costs milliseconds, and one per entry would cap a
concurrent judge at a few hundred replies per second on a local disk.

Rules that keep several writers correct:
- a writer holds an exclusive lock for the whole append, so lines never interleave;
- before appending it reads what others appended since, and if the key is
  already there it keeps that entry (first writer wins: one entry per key);
- a line without its newline at the end of the file, under the lock, is a torn
  write of a killed writer: it is terminated and then skipped on read.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("sacpo.judge_cache")

#: bump when the meaning of an entry's fields changes
CACHE_FORMAT = 1


class JudgeCache:
    """Entries (JSON objects with a `key`) by key; in memory only when `path` is None."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self._entries: dict[str, dict[str, Any]] = {}
        self._offset = 0  # bytes of the file read so far, always at a line boundary
        self.skipped = 0  # torn or malformed lines seen
        self._fd: int | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.refresh()
            if self._entries:
                log.info("judge cache %s: %d entries", self.path, len(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> dict[str, Any] | None:
        return self._entries.get(key)

    def _read_new(self, *, locked: bool) -> None:
        """Read complete lines appended since the last read (by anyone)."""
        assert self.path is not None
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        if locked and end < len(data):
            # nobody else is writing: the unterminated tail is a dead writer's torn line
            self._terminate_torn_line()
            end = len(data) + 1
            data += b"\n"
        for line in data[:end].splitlines():
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                entry = None
            if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
                self.skipped += 1
                log.warning("judge cache %s: skipping a torn or malformed line near byte %d",
                            self.path, self._offset)
                continue
            self._entries.setdefault(entry["key"], entry)  # first writer wins
        self._offset += end

    def _terminate_torn_line(self) -> None:
        self._write(b"\n")

    def _open(self) -> int:
        if self._fd is None:
            assert self.path is not None
            created = not self.path.exists()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            if created:  # make the new directory entry durable too
                dir_fd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        return self._fd

    def _write(self, data: bytes) -> None:
        fd = self._open()
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)

    def refresh(self) -> None:
        """Pick up entries that other processes appended (complete lines only)."""
        if self.path is not None:
            self._read_new(locked=False)

    def put(self, key: str, entry: dict[str, Any]) -> dict[str, Any]:
        """Store `entry` under `key` durably; return the entry the cache keeps for `key`.

        That is `entry` itself, or the one another writer stored first.
        """
        return self.put_many([(key, entry)])[0]

    def put_many(self, items: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        """`put` for several entries at once: one locked append, one fsync."""
        new = [{"key": key, "format": CACHE_FORMAT, **entry} for key, entry in items]
        if self.path is None:
            return [self._entries.setdefault(e["key"], e) for e in new]
        fd = self._open()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            self._read_new(locked=True)
            lines = []
            for entry in new:
                if entry["key"] not in self._entries:
                    self._entries[entry["key"]] = entry
                    lines.append(json.dumps(entry, ensure_ascii=False, separators=(",", ":")))
            if lines:
                data = ("\n".join(lines) + "\n").encode("utf-8")
                self._write(data)
                self._offset += len(data)
            return [self._entries[e["key"]] for e in new]
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
