"""Where task records come from: a JSON Lines file, stdin, a spool directory.

Every source hands out :class:`Record` objects (one raw line each) and is told explicitly when
records are done with (:meth:`Source.ack`). The position a source reports for a checkpoint is
that of the last acknowledged record, so a restart resumes after the last record whose answer
is safe; records read but not acknowledged are read again. The same shape fits a broker with
consumer groups later (acknowledge = commit the offset).

Lines longer than ``max_record_bytes`` are never held in memory whole: the source skips to the
end of the line and hands out a record with ``oversized=True`` so the agent can answer with an
error line.

Examples
--------
>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "tasks.jsonl"
>>> _ = path.write_text('{"a": 1}\\n{"a": 2}\\n')
>>> source = JsonlFileSource(path)
>>> [r.data for r in source.poll(0)]
[b'{"a": 1}', b'{"a": 2}']
>>> source.ack(source.last_position); source.position()
{'offset': 18}
>>> source.poll(0), source.exhausted
([], True)
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Protocol

DEFAULT_MAX_RECORD_BYTES = 16 * 1024 * 1024
_CHUNK = 1 << 16


@dataclass(frozen=True)
class Record:
    """One raw input line (without its newline) and where it ends in its source."""

    data: bytes
    position: Any
    oversized: bool = False
    size: int = 0


class Source(Protocol):
    """What the agent needs from a source of records."""

    exhausted: bool

    def poll(self, timeout: float) -> list[Record]:
        """Records available now, waiting up to ``timeout`` seconds for the first one."""

    def ack(self, position: Any) -> None:
        """Everything up to and including ``position`` has been answered."""

    def position(self) -> dict:
        """JSON-able position of the last acknowledged record (for checkpoints)."""

    def close(self) -> None:
        """Release files."""


class LineReader:
    """Reads complete lines from a binary stream with a bounded buffer.

    A line without its newline yet stays pending (a growing file may complete it later).
    """

    def __init__(self, stream: BinaryIO, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES, start: int = 0):
        self.stream = stream
        self.max_record_bytes = int(max_record_bytes)
        self.offset = start  # byte offset of the start of the pending data
        self._buffer = bytearray()
        self._discarding = False  # inside an oversized line: drop bytes until the newline
        self._discarded = 0

    def read_lines(self, max_lines: int = 256) -> list[tuple[bytes, int, bool, int]]:
        """Complete lines as ``(data, end_offset, oversized, size)``; at most ``max_lines``."""
        out: list[tuple[bytes, int, bool, int]] = []
        while len(out) < max_lines:
            newline = self._buffer.find(b"\n")
            if newline < 0:
                if self._discarding:
                    self._discarded += len(self._buffer)
                    self.offset += len(self._buffer)
                    self._buffer.clear()
                elif len(self._buffer) > self.max_record_bytes:
                    self._discarding, self._discarded = True, len(self._buffer)
                    self.offset += len(self._buffer)
                    self._buffer.clear()
                chunk = self.stream.read(_CHUNK) if hasattr(self.stream, "read") else b""
                if not chunk:
                    break
                self._buffer += chunk
                continue
            line = bytes(self._buffer[:newline])
            del self._buffer[: newline + 1]
            self.offset += newline + 1
            if self._discarding:
                size = self._discarded + newline
                self._discarding, self._discarded = False, 0
                out.append((b"", self.offset, True, size))
            elif len(line) > self.max_record_bytes:
                out.append((b"", self.offset, True, len(line)))
            else:
                line = line.rstrip(b"\r")
                if line.strip():
                    out.append((line, self.offset, False, len(line)))
        return out


class JsonlFileSource:
    """A JSON Lines file, read once (``follow=False``) or followed as it grows.

    Position is the byte offset after the last acknowledged line.
    """

    def __init__(self, path: str | os.PathLike, *, follow: bool = False, position: dict | None = None,
                 max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES, poll_interval: float = 0.05):
        self.path = Path(path)
        self.follow = follow
        self.poll_interval = poll_interval
        start = int((position or {}).get("offset", 0))
        self._file = open(self.path, "rb")
        self._file.seek(start)
        self._reader = LineReader(self._file, max_record_bytes, start)
        self._acked = start
        self.last_position: int = start
        self.exhausted = False

    def poll(self, timeout: float) -> list[Record]:
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            lines = self._reader.read_lines()
            if lines:
                self.last_position = lines[-1][1]
                return [Record(d, end, over, size) for d, end, over, size in lines]
            if not self.follow:
                self.exhausted = True
                return []
            if time.monotonic() >= deadline:
                return []
            time.sleep(self.poll_interval)

    def ack(self, position: int) -> None:
        self._acked = max(self._acked, int(position))

    def position(self) -> dict:
        return {"offset": self._acked}

    def close(self) -> None:
        self._file.close()


class StdinSource:
    """Standard input. Not seekable: the position counts lines, for information only."""

    def __init__(self, stream: BinaryIO | None = None, *, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES):
        self._stream = stream if stream is not None else sys.stdin.buffer
        self._reader = LineReader(_NonBlockingLines(self._stream), max_record_bytes)
        self._acked = 0
        self._count = 0
        self.last_position = 0
        self.exhausted = False

    def poll(self, timeout: float) -> list[Record]:
        lines = self._reader.read_lines(max_lines=1)
        if not lines:
            self.exhausted = True
            return []
        out = []
        for d, _end, over, size in lines:
            self._count += 1
            out.append(Record(d, self._count, over, size))
        self.last_position = self._count
        return out

    def ack(self, position: int) -> None:
        self._acked = max(self._acked, int(position))

    def position(self) -> dict:
        return {"lines": self._acked}

    def close(self) -> None:
        pass


class _NonBlockingLines:
    """Adapts a pipe so each ``read`` returns what one ``readline``-sized read gives.

    Reading a pipe with ``read(n)`` blocks until ``n`` bytes arrive; a producer that writes one
    task and waits for its answer would deadlock. ``read1`` returns what is there.
    """

    def __init__(self, stream: BinaryIO):
        self._stream = stream

    def read(self, n: int) -> bytes:
        read1 = getattr(self._stream, "read1", None)
        return read1(n) if read1 is not None else self._stream.read(n)


class SpoolDirSource:
    """A spool directory: producers write ``name.tmp`` and rename it to ``name.jsonl``.

    Files are taken in name order. A renamed file is complete, so once read to its end it waits
    only for its records to be acknowledged, then moves to ``done/``; reading goes on with the
    next file meanwhile. ``.npz`` files referenced by tasks sit beside them (the directory is
    the data root for ``npz`` references) and stay where they are. The position is the file of
    the last acknowledged record and the byte offset in it.
    """

    def __init__(self, directory: str | os.PathLike, *, follow: bool = True, position: dict | None = None,
                 max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES, poll_interval: float = 0.1):
        self.directory = Path(directory)
        self.done = self.directory / "done"
        self.done.mkdir(parents=True, exist_ok=True)
        self.follow = follow
        self.poll_interval = poll_interval
        self.max_record_bytes = max_record_bytes
        position = position or {}
        self._acked: tuple[str | None, int] = (position.get("file"), int(position.get("offset", 0)))
        self._current: Path | None = None
        self._file: BinaryIO | None = None
        self._reader: LineReader | None = None
        self._read_to_end: dict[str, int] = {}  # fully read, awaiting acknowledgement: name -> size
        self.last_position: tuple[str, int] | None = None
        self.exhausted = False
        if self._acked[0] is not None:  # files before the acknowledged one were all answered
            for path in self._spooled():
                if path.name < self._acked[0]:
                    self._retire(path.name)

    def _spooled(self) -> list[Path]:
        return sorted(p for p in self.directory.glob("*.jsonl") if p.is_file())

    def _open_next(self) -> bool:
        for path in self._spooled():
            if path.name not in self._read_to_end:
                start = self._acked[1] if self._acked[0] == path.name else 0
                self._current, self._file = path, open(path, "rb")
                self._file.seek(start)
                self._reader = LineReader(self._file, self.max_record_bytes, start)
                return True
        return False

    def poll(self, timeout: float) -> list[Record]:
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            if self._file is not None or self._open_next():
                lines = self._reader.read_lines()
                if lines:
                    name = self._current.name
                    self.last_position = (name, lines[-1][1])
                    return [Record(d, (name, end), over, size) for d, end, over, size in lines]
                name = self._current.name
                self._read_to_end[name] = self._reader.offset
                self._file.close()
                self._current = self._file = self._reader = None
                if self._acked == (name, self._read_to_end[name]) or self._read_to_end[name] == 0:
                    self._retire(name)
                continue
            if not self.follow:
                self.exhausted = True
                return []
            if time.monotonic() >= deadline:
                return []
            time.sleep(self.poll_interval)

    def _retire(self, name: str) -> None:
        self._read_to_end.pop(name, None)
        path = self.directory / name
        if path.exists():
            os.replace(path, self.done / name)

    def ack(self, position: tuple[str, int]) -> None:
        name, offset = position
        self._acked = (name, int(offset))
        for pending, size in list(self._read_to_end.items()):
            if pending < name or (pending == name and offset >= size):
                self._retire(pending)

    def position(self) -> dict:
        return {"file": self._acked[0], "offset": self._acked[1]}

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def iter_records(source: Source, timeout: float = 0.2) -> Iterator[Record]:
    """Records one by one until the source is exhausted (for read-once sources and tests)."""
    while not source.exhausted:
        yield from source.poll(timeout)
