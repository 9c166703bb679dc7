"""Write a file so that readers see the old content or the new, never a half-written one.

Examples
--------
>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "state.json"
>>> atomic_write(path, lambda f: f.write(b'{"ok": true}'))
>>> path.read_text()
'{"ok": true}'
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object], *, fsync: bool = True,
                 mode: int | None = None) -> None:
    """Call ``write(binary_file)`` on a temporary file beside ``path``, then rename it into place.

    The rename is atomic on POSIX within one file system; with ``fsync`` the data is on disk
    before it, so a crash or power loss leaves either version. ``mode`` sets the permissions
    (a temporary file starts private, 0600). On any failure the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
