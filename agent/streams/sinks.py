"""Where answers go: JSON Lines on stdout or in a file, one line per task or error.

A file sink remembers which task ids it already holds, so that after a crash and a replay
from the last checkpoint no id is written twice: on open it reads the ids written after the
offset the checkpoint recorded (:meth:`JsonlSink.offset`).

Examples
--------
>>> import io
>>> out = io.StringIO()
>>> sink = JsonlSink(stream=out)
>>> sink.write({"id": "t-1", "predictions": [0, 1]})
True
>>> sink.write({"id": "t-1", "predictions": [0, 1]})  # already answered: not written again
False
>>> out.getvalue()
'{"id": "t-1", "predictions": [0, 1]}\\n'
"""

from __future__ import annotations

import json
import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import TextIO


class RecentIds:
    """A bounded set of recently seen ids (oldest forgotten first)."""

    def __init__(self, capacity: int = 1_000_000):
        self.capacity = int(capacity)
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, task_id: str) -> None:
        self._ids[task_id] = None
        self._ids.move_to_end(task_id)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def to_list(self) -> list[str]:
        return list(self._ids)

    @classmethod
    def from_list(cls, ids: list[str], capacity: int = 1_000_000) -> "RecentIds":
        out = cls(capacity)
        for i in ids:
            out.add(i)
        return out


def _drop_torn_last_line(path: Path) -> None:
    """Cut a last line that has no newline: a process killed mid-write left it half written.

    Appending after it would glue the next answer onto the fragment and corrupt both lines.
    """
    if not path.exists():
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        end = size
        while end > 0:  # scan back in blocks for the last complete line
            start = max(0, end - 65536)
            f.seek(start)
            newline = f.read(end - start).rfind(b"\n")
            if newline >= 0:
                f.truncate(start + newline + 1)
                return
            end = start
        f.truncate(0)


class JsonlSink:
    """Answers as JSON Lines, to ``path`` (appended) or a text ``stream`` (stdout by default).

    Parameters
    ----------
    path
        Output file; appended to, flushed after every line.
    stream
        A text stream to use instead of a file.
    resume_offset
        For a file: the byte offset recorded by the last checkpoint. Ids written after it (by
        a run that crashed later) are read back so they are not written again.
    fsync
        Call ``os.fsync`` after every line (slower; survives power loss, not just a crash).
    """

    def __init__(self, path: str | os.PathLike | None = None, *, stream: TextIO | None = None,
                 resume_offset: int | None = None, fsync: bool = False, max_ids: int = 1_000_000):
        self.path = Path(path) if path is not None else None
        self.fsync = fsync
        self.written = RecentIds(max_ids)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _drop_torn_last_line(self.path)
            if resume_offset is not None and self.path.exists():
                self._read_back(resume_offset)
            self._stream: TextIO = open(self.path, "a", encoding="utf-8")
        else:
            self._stream = stream if stream is not None else sys.stdout

    def _read_back(self, offset: int) -> None:
        with open(self.path, "rb") as f:
            f.seek(offset)
            for line in f:
                try:
                    task_id = json.loads(line).get("id")
                except (ValueError, AttributeError):
                    continue  # a torn last line from a crash: ignore it
                if isinstance(task_id, str) and "error" not in json.loads(line):
                    self.written.add(task_id)

    def write(self, record: dict) -> bool:
        """Write one answer; returns False (and writes nothing) if its id was answered already.

        Error lines are always written: a repeated bad record deserves a repeated answer.
        """
        task_id = record.get("id")
        is_error = "error" in record
        if not is_error and isinstance(task_id, str):
            if task_id in self.written:
                return False
            self.written.add(task_id)
        self._stream.write(json.dumps(record, separators=(", ", ": "), allow_nan=False) + "\n")
        self._stream.flush()
        if self.fsync and self.path is not None:
            os.fsync(self._stream.fileno())
        return True

    def offset(self) -> int | None:
        """Bytes written so far to the file (None for a stream)."""
        if self.path is None:
            return None
        self._stream.flush()
        return self._stream.tell()

    def close(self) -> None:
        if self.path is not None:
            self._stream.close()
