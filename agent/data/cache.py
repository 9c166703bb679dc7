"""Where generated and converted data sets are kept, and how they are written safely.

The cache directory is ``$META_AGENT_CACHE`` when set, else ``~/.cache/meta-agent``. Every
cached array file is named by a key derived from the parameters that produced it (plus a format
version), so changing a parameter never returns stale data. Writes go to a temporary file in
the same directory and are renamed into place: a reader sees either nothing or a whole file,
even when two processes build the same entry at once.

Examples
--------
>>> import tempfile, numpy as np
>>> with tempfile.TemporaryDirectory() as d:
...     path = cache_path("demo", {"n": 3}, version=1, directory=d)
...     arrays = cached_npz(path, lambda: {"x": np.arange(3)})
...     again = cached_npz(path, lambda: {"x": np.zeros(3)})  # not rebuilt
...     print(path.name.startswith("demo-v1-"), again["x"].tolist())
True [0, 1, 2]
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from agent.atomic import atomic_write

ENV_VAR = "META_AGENT_CACHE"

__all__ = ["ENV_VAR", "cache_dir", "cache_key", "cache_path", "save_npz", "load_npz", "cached_npz"]


def cache_dir(directory: str | os.PathLike | None = None, create: bool = True) -> Path:
    """The cache directory: ``directory``, else ``$META_AGENT_CACHE``, else ``~/.cache/meta-agent``."""
    if directory is None:
        directory = os.environ.get(ENV_VAR) or Path.home() / ".cache" / "meta-agent"
    path = Path(directory).expanduser()
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def _jsonable(value: Any) -> Any:
    # Tuples, paths and numpy scalars must hash the same however the caller spelled them.
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def cache_key(params: Mapping[str, Any], version: int | str = 1) -> str:
    """A short stable hash of ``params`` and ``version``.

    >>> cache_key({"a": 1, "b": (2, 3)}) == cache_key({"b": [2, 3], "a": 1})
    True
    """
    text = json.dumps({"params": _jsonable(params), "version": _jsonable(version)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_path(name: str, params: Mapping[str, Any], version: int | str = 1,
               directory: str | os.PathLike | None = None) -> Path:
    """``<cache dir>/<name>-v<version>-<key>.npz``."""
    return cache_dir(directory) / f"{name}-v{version}-{cache_key(params, version)}.npz"


def save_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], compress: bool = True) -> Path:
    """Write ``arrays`` to ``path`` atomically (temporary file in the same directory + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save = np.savez_compressed if compress else np.savez
    # A cache is shared like any data file (a temporary file starts private): 0644.
    atomic_write(path, lambda f: save(f, **{k: np.asarray(v) for k, v in arrays.items()}), fsync=False, mode=0o644)
    return path


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file, loaded into memory (no pickles)."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def cached_npz(path: str | os.PathLike, build: Callable[[], Mapping[str, np.ndarray]],
               compress: bool = True, refresh: bool = False) -> dict[str, np.ndarray]:
    """Load ``path`` if it exists and is readable, else ``build()`` the arrays and save them.

    A truncated or corrupt file (an interrupted write by a tool that is not atomic) is rebuilt.
    """
    path = Path(path)
    if path.exists() and not refresh:
        try:
            return load_npz(path)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            pass
    arrays = {k: np.asarray(v) for k, v in build().items()}
    save_npz(path, arrays, compress=compress)
    return arrays
