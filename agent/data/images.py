"""Small image data sets available offline: Fashion-MNIST (IDX files) and scikit-learn's digits.

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package, which installs the four
standard IDX files under ``/usr/share/datasets/fashion-mnist``; ``$META_AGENT_FASHION_MNIST``
or a ``root`` argument points elsewhere. Gzipped and raw files are both read. The digits are
the 8×8 images bundled with scikit-learn (1797 images, no download), upsampled to 28×28 so they
can stand in for MNIST in OOD modes (OSAKA's role for it).

Both loaders return a :class:`~agent.data.episodes.LabelledSet` of ``uint8`` ``(n, 28, 28)``
images, bright strokes on a dark background (as MNIST and the rendered glyphs).

Examples
--------
>>> import tempfile, os, numpy as np
>>> with tempfile.TemporaryDirectory() as d:
...     path = write_idx(os.path.join(d, "x-idx3-ubyte.gz"), np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
...     read_idx(path).shape
(2, 3, 4)
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from agent.data.episodes import LabelledSet

__all__ = ["read_idx", "write_idx", "find_fashion_mnist", "load_fashion_mnist", "load_digits",
           "FASHION_ENV_VAR", "FASHION_CLASSES"]

FASHION_ENV_VAR = "META_AGENT_FASHION_MNIST"
# Standard install locations of Debian's dataset packages (under /usr/share, /usr/local/share).
_FASHION_DIRS = ("/usr/share/datasets/fashion-mnist", "/usr/local/share/datasets/fashion-mnist")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")

# IDX type codes (LeCun's MNIST format): all multi-byte values are big-endian.
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
              np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def _open(path: str | os.PathLike):
    # Sniff the gzip magic rather than trusting the file name.
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or raw) into an array of its native shape.

    Raises ``ValueError`` on a bad magic number or a size that does not match the header.
    """
    with _open(path) as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic)")
    code, ndim = data[2], data[3]
    if code not in _IDX_TYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02x}")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_TYPES[code])
    body = data[4 + 4 * ndim:]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(body) != expected:
        raise ValueError(f"{path}: expected {expected} data bytes for shape {dims}, found {len(body)}")
    return np.frombuffer(body, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file (gzipped when the name ends in ``.gz``); for fixtures."""
    array = np.asarray(array)
    dtype = array.dtype if array.dtype.itemsize == 1 else array.dtype.newbyteorder(">")
    if dtype not in _IDX_CODES:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    header = bytes([0, 0, _IDX_CODES[dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(dtype).tobytes()
    path = Path(path)
    with (gzip.open(path, "wb") if path.suffix == ".gz" else open(path, "wb")) as f:
        f.write(payload)
    return path


def _idx_file(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def find_fashion_mnist(root: str | os.PathLike | None = None) -> Path | None:
    """The directory holding the Fashion-MNIST IDX files, or ``None`` when not installed.

    Looks at ``root``, then ``$META_AGENT_FASHION_MNIST``, then the Debian install locations.
    """
    candidates = [root] if root is not None else [os.environ.get(FASHION_ENV_VAR), *_FASHION_DIRS]
    for c in candidates:
        if c and _idx_file(Path(c), "train-images-idx3-ubyte") is not None:
            return Path(c)
    return None


def load_fashion_mnist(root: str | os.PathLike | None = None, part: str = "all") -> LabelledSet:
    """Fashion-MNIST as a :class:`LabelledSet` (labels 0–9, see ``FASHION_CLASSES``).

    Parameters
    ----------
    root
        Directory of the IDX files (default: found by :func:`find_fashion_mnist`).
    part
        ``"train"`` (60,000 images), ``"test"`` (10,000) or ``"all"`` (train then test).
    """
    found = find_fashion_mnist(root)
    if found is None:
        raise FileNotFoundError(f"Fashion-MNIST IDX files not found (root={root!r}, ${FASHION_ENV_VAR}, "
                                f"{', '.join(_FASHION_DIRS)}); install Debian's dataset-fashion-mnist")
    parts = {"train": ["train"], "test": ["t10k"], "all": ["train", "t10k"]}.get(part)
    if parts is None:
        raise ValueError(f"part must be 'train', 'test' or 'all', got {part!r}")
    xs, ys = [], []
    for prefix in parts:
        x = read_idx(_idx_file(found, f"{prefix}-images-idx3-ubyte"))
        labels_path = _idx_file(found, f"{prefix}-labels-idx1-ubyte")
        if labels_path is None:
            raise FileNotFoundError(f"{found}: {prefix}-labels-idx1-ubyte missing")
        y = read_idx(labels_path)
        if len(x) != len(y):
            raise ValueError(f"{found}: {len(x)} {prefix} images but {len(y)} labels")
        xs.append(x.astype(np.uint8, copy=False))
        ys.append(y.astype(np.int64))
    return LabelledSet(np.concatenate(xs), np.concatenate(ys), class_names=np.array(FASHION_CLASSES))


def load_digits(size: int = 28) -> LabelledSet:
    """scikit-learn's bundled 8×8 digits (1797 images), upsampled to ``size``×``size`` ``uint8``.

    >>> d = load_digits()
    >>> d.x.shape, d.x.dtype, len(d.classes)
    ((1797, 28, 28), dtype('uint8'), 10)
    """
    from PIL import Image
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    small = np.clip(bunch.images * (255.0 / 16.0), 0, 255).astype(np.uint8)  # values are 0..16
    if size == small.shape[1]:
        x = small
    else:
        x = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in small])
    return LabelledSet(x, bunch.target.astype(np.int64), class_names=np.array([str(i) for i in range(10)]))
