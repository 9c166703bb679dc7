"""Atomic, verified checkpoint directories.

A checkpoint is a directory ``<root>/ckpt-000123`` holding named files and a ``manifest.json``
that lists every file with its size and SHA-256, the format version, the step and free-form
metadata. :func:`save` writes everything into a hidden temporary directory in ``root``, fsyncs
each file and the directory, then renames it into place, so a reader sees a whole checkpoint or
none. :func:`latest_good` verifies checksums and falls back to the previous checkpoint, with a
logged warning, when the newest is corrupt or incomplete.

What a file holds is chosen by its name:

* ``*.pt``: any object of tensors, dicts, lists and numbers, written with ``torch.save`` and read
  with ``torch.load(..., weights_only=True)`` (never arbitrary pickles);
* ``*.json``: JSON data;
* anything else: ``bytes`` or ``str`` written as is.

The module knows nothing about training: the meta-trainer and the streaming agent both store
their state with it.

Examples
--------
>>> import tempfile, torch
>>> root = tempfile.mkdtemp()
>>> path = save(root, 7, {"meta.pt": {"w": torch.ones(2)}, "state.json": {"step": 7}})
>>> path.name
'ckpt-000007'
>>> ckpt = latest_good(root)
>>> ckpt.step, ckpt.load("state.json"), ckpt.load("meta.pt")["w"].tolist()
(7, {'step': 7}, [1.0, 1.0])
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = ["FORMAT_VERSION", "MANIFEST", "CheckpointError", "Checkpoint", "save", "list_checkpoints",
           "verify", "open_checkpoint", "latest_good", "resolve", "prune"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PREFIX = "ckpt-"
_TMP_PREFIX = ".tmp-" + PREFIX
_NAME = re.compile(r"^ckpt-(\d+)$")
_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint directory."""

    path: Path
    step: int
    manifest: dict

    @property
    def files(self) -> list[str]:
        return sorted(self.manifest["files"])

    @property
    def meta(self) -> dict:
        return self.manifest.get("meta", {})

    def load(self, name: str, *, verify: bool = False) -> Any:
        """Read file ``name`` back (tensors with ``weights_only=True``)."""
        if name not in self.manifest["files"]:
            raise CheckpointError(f"{self.path}: no file {name!r} (has: {', '.join(self.files)})")
        data = (self.path / name).read_bytes()
        if verify and _sha256(data) != self.manifest["files"][name]["sha256"]:
            raise CheckpointError(f"{self.path / name}: checksum mismatch")
        return _decode(name, data)

    def __contains__(self, name: str) -> bool:
        return name in self.manifest["files"]


# -- writing ----------------------------------------------------------------------------------
def save(root: str | os.PathLike, step: int, files: Mapping[str, Any], *, meta: Mapping[str, Any] | None = None,
         keep: int | None = None) -> Path:
    """Write checkpoint ``step`` atomically under ``root`` and return its path.

    Parameters
    ----------
    root
        Directory of checkpoints (created when missing).
    step
        Non-negative step number; the directory is ``ckpt-{step:06d}``. An existing checkpoint of
        the same step is replaced (atomically: the new one is complete before the old goes).
    files
        File name -> content (see the module docstring for how names choose the encoding).
    meta
        Small JSON metadata stored in the manifest.
    keep
        Keep only the newest ``keep`` checkpoints (``None``: keep all).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root)
    final = root / f"{PREFIX}{int(step):06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{int(step):06d}-{os.getpid()}-", dir=root))
    try:
        entries = {}
        for name, value in files.items():
            if not _FILE.match(name) or name == MANIFEST:
                raise ValueError(f"invalid checkpoint file name {name!r}")
            data = _encode(name, value)
            _write_synced(tmp / name, data)
            entries[name] = {"sha256": _sha256(data), "size": len(data)}
        manifest = {"format": FORMAT_VERSION, "step": int(step), "created": time.time(),
                    "files": entries, "meta": dict(meta or {})}
        _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        _fsync_dir(tmp)
        if final.exists():
            old = root / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        prune(root, keep)
    return final


def prune(root: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints; returns the deleted paths."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    doomed = list_checkpoints(root)[:-keep]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


# -- reading ----------------------------------------------------------------------------------
def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Checkpoint directories under ``root``, oldest first (temporary directories excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def verify(path: str | os.PathLike) -> list[str]:
    """Problems found in checkpoint ``path`` (empty when it is complete and intact)."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return ["no manifest (incomplete checkpoint)"]
    except (OSError, ValueError) as e:
        return [f"unreadable manifest: {e}"]
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return ["malformed manifest"]
    if manifest.get("format") != FORMAT_VERSION:
        return [f"unsupported format {manifest.get('format')!r} (this version reads {FORMAT_VERSION})"]
    problems = []
    for name, entry in sorted(manifest["files"].items()):
        if not isinstance(name, str) or not _FILE.match(name) or name == MANIFEST or not isinstance(entry, dict):
            # A name like "../x" would make verification (and loading) read outside the checkpoint.
            problems.append(f"{name!r}: invalid file name or entry")
            continue
        try:
            data = (path / name).read_bytes()
        except OSError:
            problems.append(f"{name}: missing")
            continue
        if len(data) != entry.get("size") or _sha256(data) != entry.get("sha256"):
            problems.append(f"{name}: checksum mismatch")
    return problems


def open_checkpoint(path: str | os.PathLike, *, check: bool = True) -> Checkpoint:
    """Open one checkpoint directory, verifying it unless ``check`` is false."""
    path = Path(path)
    if check:
        problems = verify(path)
        if problems:
            raise CheckpointError(f"{path}: {'; '.join(problems)}")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read manifest: {e}") from None
    return Checkpoint(path, int(manifest["step"]), manifest)


def latest_good(root: str | os.PathLike) -> Checkpoint | None:
    """The newest intact checkpoint under ``root`` (``None`` when there is none).

    Corrupt or incomplete checkpoints are skipped with a warning on the ``agent.checkpoint``
    logger naming what is wrong; they are left on disk for inspection.
    """
    for path in reversed(list_checkpoints(root)):
        problems = verify(path)
        if not problems:
            return open_checkpoint(path, check=False)
        log.warning("checkpoint %s is unusable (%s); falling back to the previous one", path, "; ".join(problems))
    return None


def resolve(path: str | os.PathLike) -> Checkpoint:
    """A checkpoint from a checkpoint directory, a directory of checkpoints, or a run directory.

    A run directory is one with a ``checkpoints/`` subdirectory. Raises :class:`CheckpointError`
    when nothing usable is found.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if (path / MANIFEST).exists():
        return open_checkpoint(path)
    for root in (path / "checkpoints", path):
        found = latest_good(root)
        if found is not None:
            return found
    raise CheckpointError(f"{path}: no intact checkpoint found")


# -- encoding ---------------------------------------------------------------------------------
def _encode(name: str, value: Any) -> bytes:
    if name.endswith(".pt"):
        buf = io.BytesIO()
        torch.save(value, buf)
        return buf.getvalue()
    if name.endswith(".json"):
        # Compact: ``indent`` would make json fall back from its C encoder to the pure-Python one
        # (~10x slower on the agent's pending.json, megabytes at a time).
        return json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=True).encode()
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{name}: give bytes or str for files that are not .pt or .json, got {type(value).__name__}")


def _decode(name: str, data: bytes) -> Any:
    if name.endswith(".pt"):
        try:
            return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as e:  # weights_only refused a global: code, not tensors
            first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{name}: refused, not plain tensors/containers ({first.strip()[:200]})") from None
        except (RuntimeError, EOFError) as e:  # not a torch file at all
            raise CheckpointError(f"{name}: unreadable tensor file ({e})") from None
    if name.endswith(".json"):
        return json.loads(data)
    return data


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale_temps(root: Path) -> None:
    """Remove temporary directories left by writers that are no longer running."""
    for p in root.iterdir():
        if not (p.name.startswith(_TMP_PREFIX) or p.name.startswith(".old-" + PREFIX)):
            continue
        m = re.search(r"-(\d+)-[^-]*$", p.name) if p.name.startswith(_TMP_PREFIX) else re.search(r"-(\d+)$", p.name)
        pid = int(m.group(1)) if m else None
        if pid is not None and pid != os.getpid() and _alive(pid):
            continue
        if pid == os.getpid() and p.name.startswith(_TMP_PREFIX):
            continue  # possibly another thread of ours writing right now
        shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
