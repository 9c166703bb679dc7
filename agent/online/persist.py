"""Authenticated persistence of River state (models, policies, detectors, metrics).

River objects round-trip exactly through :mod:`pickle` (RNG state included), but unpickling runs
code, so a state file must only ever be loaded if this deployment wrote it. Every file therefore
carries an HMAC-SHA256 tag over its header and payload, computed with a secret key, and
:func:`load` checks the tag (in constant time) *before* unpickling anything. A file whose tag does
not match, that was cut short, or that was written by another format, River or Python version is
refused with :class:`StateError`.

The key comes from the environment variable ``META_AGENT_STATE_KEY`` (at least 16 bytes of UTF-8
text; a hex string is fine) or, when that is unset, from a key file: created on first use with 32
random bytes (hex) and mode 0600, and refused when group or others have any access to it, or
when another user (root excepted) owns it.

File layout: ``MAGIC`` line, one JSON header line (the version stamp), the 32-byte tag, then the
pickle (protocol 5). Writes are atomic (temporary file, ``fsync``, ``os.replace``).

Examples
--------
>>> import os, tempfile
>>> from river import preprocessing, linear_model
>>> model = preprocessing.StandardScaler() | linear_model.LogisticRegression()
>>> for i in range(20):
...     model.learn_one({"x": float(i)}, i > 10)
>>> key = b"0123456789abcdef0123456789abcdef"
>>> path = os.path.join(tempfile.mkdtemp(), "model.state")
>>> save(model, path, key=key)
>>> copy = load(path, key=key)
>>> copy.predict_proba_one({"x": 3.0}) == model.predict_proba_one({"x": 3.0})
True
>>> load(path, key=b"another key, another deployment")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
agent.online.persist.StateError: ... authentication failed ...
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import pickle
import secrets
import stat
import sys
from pathlib import Path
from typing import Any

from agent.atomic import atomic_write

__all__ = ["StateError", "save", "load", "dumps", "loads", "load_key", "version_stamp", "ENV_KEY", "SCHEMA"]

ENV_KEY = "META_AGENT_STATE_KEY"
MAGIC = b"META-AGENT-ONLINE-STATE\n"
SCHEMA = 1
_TAG_LEN = 32
_MIN_KEY = 16


class StateError(Exception):
    """A state file was refused: bad key, tampered or truncated file, or version mismatch."""


def version_stamp() -> dict[str, Any]:
    """What a state file records about its writer (compared on load).

    Examples
    --------
    >>> sorted(version_stamp())
    ['python', 'river', 'schema']
    """
    import river

    return {"schema": SCHEMA, "river": river.__version__, "python": f"{sys.version_info[0]}.{sys.version_info[1]}"}


def _default_key_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "meta-agent" / "state.key"


def load_key(key_file: str | os.PathLike | None = None) -> bytes:
    """The HMAC key: ``$META_AGENT_STATE_KEY`` if set, else the key file (created 0600 if absent).

    Raises
    ------
    StateError
        The key is shorter than 16 bytes, or the key file is accessible to group or others,
        is not a regular file, or belongs to another user (root excepted).
    """
    env = os.environ.get(ENV_KEY)
    if env:
        key = env.encode("utf-8")
        if len(key) < _MIN_KEY:
            raise StateError(f"{ENV_KEY} must hold at least {_MIN_KEY} bytes")
        return key
    path = Path(key_file) if key_file is not None else _default_key_file()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written in full to a private temporary file, then linked into place (atomic, fails if the
        # name exists): a concurrent first start reads a whole key, never an empty file.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:  # created concurrently: read theirs
                pass
            except OSError:  # a file system without hard links: a rename (last writer wins)
                os.replace(tmp, path)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)
    # Checks on the file that is then read (no swap in between); O_NONBLOCK: a FIFO cannot hang us.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise StateError(f"key file {path} is not a regular file")
    with os.fdopen(fd, "rb") as fh:
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise StateError(f"key file {path} has mode {mode:o}; it must not be accessible to group or others "
                             "(chmod 600)")
        if hasattr(os, "geteuid") and st.st_uid not in (os.geteuid(), 0):
            raise StateError(f"key file {path} belongs to user {st.st_uid}, not to this user ({os.geteuid()}) or root")
        key = fh.read().strip()
    if len(key) < _MIN_KEY:
        raise StateError(f"key file {path} holds fewer than {_MIN_KEY} bytes")
    return key


def _key(key: bytes | str | None, key_file) -> bytes:
    if key is None:
        return load_key(key_file)
    key = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    if len(key) < _MIN_KEY:
        raise StateError(f"the state key must hold at least {_MIN_KEY} bytes")
    return key


def dumps(obj: Any, *, key: bytes | str | None = None, key_file=None, extra: dict | None = None) -> bytes:
    """``obj`` pickled and authenticated (see the module docstring for the layout).

    ``extra`` is JSON-able metadata stored in the header (authenticated, not compared on load).
    """
    k = _key(key, key_file)
    header = dict(version_stamp())
    if extra:
        header["extra"] = extra
    head = json.dumps(header, sort_keys=True).encode("utf-8") + b"\n"
    payload = pickle.dumps(obj, protocol=5)
    tag = hmac.new(k, MAGIC + head + payload, hashlib.sha256).digest()
    return MAGIC + head + tag + payload


def loads(blob: bytes, *, key: bytes | str | None = None, key_file=None, check_versions: bool = True) -> Any:
    """Verify and unpickle a blob from :func:`dumps`.

    Raises
    ------
    StateError
        Wrong magic, bad tag (tampered, truncated or another key), or, with ``check_versions``,
        a schema, River or Python version other than this one.
    """
    k = _key(key, key_file)
    if not blob.startswith(MAGIC):
        raise StateError("not a meta-agent online state file (bad magic)")
    nl = blob.find(b"\n", len(MAGIC))
    if nl < 0 or len(blob) < nl + 1 + _TAG_LEN:
        raise StateError("state file is truncated")
    head = blob[len(MAGIC):nl + 1]
    tag = blob[nl + 1:nl + 1 + _TAG_LEN]
    payload = blob[nl + 1 + _TAG_LEN:]
    expected = hmac.new(k, MAGIC + head + payload, hashlib.sha256).digest()
    if not hmac.compare_digest(tag, expected):
        raise StateError("state file authentication failed (HMAC mismatch): it was modified, truncated, "
                         "or written with another key; refusing to unpickle it")
    try:
        header = json.loads(head)
    except ValueError as exc:  # authenticated but unparsable: a writer bug
        raise StateError(f"state header is not JSON: {exc}") from None
    if check_versions:
        mine = version_stamp()
        diff = {f: (header.get(f), mine[f]) for f in mine if header.get(f) != mine[f]}
        if diff:
            detail = ", ".join(f"{f}: file {a!r} vs running {b!r}" for f, (a, b) in diff.items())
            raise StateError(f"state file version mismatch ({detail}); rebuild the state from the replay log")
    return pickle.loads(payload)


def save(obj: Any, path: str | os.PathLike, *, key: bytes | str | None = None, key_file=None,
         extra: dict | None = None) -> None:
    """Write ``obj`` to ``path`` atomically, authenticated (see :func:`dumps`)."""
    blob = dumps(obj, key=key, key_file=key_file, extra=extra)
    atomic_write(path, lambda f: f.write(blob))


def load(path: str | os.PathLike, *, key: bytes | str | None = None, key_file=None, check_versions: bool = True) -> Any:
    """Read, verify and unpickle a file written by :func:`save` (see :func:`loads`)."""
    return loads(Path(path).read_bytes(), key=key, key_file=key_file, check_versions=check_versions)
