"""Omniglot and mini-ImageNet from a directory the user already has (nothing is downloaded).

Omniglot, in the layout of the official repository's zips (also what torchvision unpacks)::

    root/images_background/<Alphabet>/<character>/*.png     (30 alphabets, 964 characters)
    root/images_evaluation/<Alphabet>/<character>/*.png     (20 alphabets, 659 characters)

``root`` may also be a parent of those folders (for example ``omniglot-py/``). Each
(alphabet, character) pair is a class and the alphabet is its group. Splits: background
alphabets make ``train`` except a deterministic share held out as ``val``; the evaluation
alphabets make ``test``, the usual alphabet-level split. Images are inverted (strokes bright,
like MNIST and the glyphs) and resized to ``size``×``size``.

mini-ImageNet, in either of its two usual layouts::

    root/images/*.jpg + root/train.csv, val.csv, test.csv     (Ravi & Larochelle: filename,label)
    root/train/<wnid>/*.jpg, root/val/<wnid>/*.jpg, root/test/<wnid>/*.jpg

Images are RGB ``uint8`` ``(n, size, size, 3)``; the splits are the data set's own.

Decoding tens of thousands of files takes a while, so results are cached (see
:mod:`agent.data.cache`) under a key made of the resolved path, the file count and the size.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from agent.data.cache import cache_path, cached_npz
from agent.data.episodes import LabelledSet

__all__ = ["load_omniglot", "load_miniimagenet", "OMNIGLOT_ENV_VAR", "MINIIMAGENET_ENV_VAR"]

OMNIGLOT_ENV_VAR = "META_AGENT_OMNIGLOT"
MINIIMAGENET_ENV_VAR = "META_AGENT_MINIIMAGENET"
_VERSION = 1
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir())


def _resolve_root(root: str | os.PathLike | None, env: str, marker: Sequence[str], what: str) -> Path:
    root = root if root is not None else os.environ.get(env)
    if not root:
        raise FileNotFoundError(f"{what}: pass root= or set ${env} to your local copy (nothing is downloaded)")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{what}: {root} is not a directory")
    # Accept the folder itself or a parent up to two levels above it.
    children = _subdirs(root)
    for cand in [root, *children, *(g for d in children for g in _subdirs(d))]:
        if any((cand / m).exists() for m in marker):
            return cand
    raise FileNotFoundError(f"{what}: none of {list(marker)} found in {root} or its subfolders")


def _load_gray(path: Path, size: int, invert: bool) -> np.ndarray:
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = im.convert("L")
        if invert:
            im = ImageOps.invert(im)
        if im.size != (size, size):
            im = im.resize((size, size), Image.BOX if im.size[0] > size else Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def _load_rgb(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def _with_cache(name: str, params: dict, build, cache: bool):
    if not cache:
        return {k: np.asarray(v) for k, v in build().items()}
    return cached_npz(cache_path(name, params, version=_VERSION), build, compress=False)


def load_omniglot(root: str | os.PathLike | None = None, size: int = 28, val_fraction: float = 0.2,
                  seed: int = 0, cache: bool = True) -> LabelledSet:
    """Omniglot from ``root`` (or ``$META_AGENT_OMNIGLOT``) as a :class:`LabelledSet`.

    Parameters
    ----------
    size
        Output side length (28 is the usual few-shot resolution).
    val_fraction
        Share of the background alphabets held out as the ``val`` split (chosen with ``seed``).
    cache
        Keep the decoded arrays in the cache directory.
    """
    root = _resolve_root(root, OMNIGLOT_ENV_VAR, ("images_background", "images_evaluation"), "Omniglot")
    sets = [s for s in ("images_background", "images_evaluation") if (root / s).is_dir()]
    chars = [(s, a, c) for s in sets for a in _subdirs(root / s) for c in _subdirs(a)]
    if not chars:
        raise FileNotFoundError(f"Omniglot: no <alphabet>/<character>/ folders under {root}")
    n_files = sum(len(_images_in(c)) for _, _, c in chars)
    params = {"root": str(root.resolve()), "size": size, "chars": len(chars), "files": n_files}

    def build():
        xs, ys, gs, which = [], [], [], []
        alphabets = sorted({(s, a.name) for s, a, _ in chars})
        alpha_id = {k: i for i, k in enumerate(alphabets)}
        for label, (s, a, c) in enumerate(chars):
            for f in _images_in(c):
                xs.append(_load_gray(f, size, invert=True))
                ys.append(label)
                gs.append(alpha_id[(s, a.name)])
        return {"x": np.stack(xs), "y": np.array(ys), "groups": np.array(gs),
                "class_names": np.array([f"{a.name}/{c.name}" for _, a, c in chars]),
                "group_names": np.array([a for _, a in alphabets]),
                "group_background": np.array([s == "images_background" for s, _ in alphabets])}

    arr = _with_cache("omniglot", params, build, cache)
    data = LabelledSet(arr["x"], arr["y"], arr["groups"], class_names=arr["class_names"], group_names=arr["group_names"])
    background = np.flatnonzero(arr["group_background"])
    evaluation = np.flatnonzero(~arr["group_background"])
    held = np.random.default_rng(seed).permutation(background)
    n_val = int(round(val_fraction * len(background)))
    if len(background) > 1:
        n_val = min(max(n_val, 1 if val_fraction > 0 else 0), len(background) - 1)
    val_groups, train_groups = held[:n_val], held[n_val:]
    class_group = data.class_groups()
    pick = lambda gs: np.array(sorted(c for c, g in class_group.items() if g in set(gs.tolist())), dtype=np.int64)  # noqa: E731
    data.splits = {"train": pick(train_groups), "val": pick(val_groups), "test": pick(evaluation)}
    return data


def _read_split_csv(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if rows and [h.strip().lower() for h in rows[0][:2]] == ["filename", "label"]:
        rows = rows[1:]
    return [(r[0].strip(), r[1].strip()) for r in rows if len(r) >= 2]


def load_miniimagenet(root: str | os.PathLike | None = None, size: int = 84, cache: bool = True) -> LabelledSet:
    """mini-ImageNet from ``root`` (or ``$META_AGENT_MINIIMAGENET``), CSV or per-class layout.

    Returns RGB ``uint8`` images ``(n, size, size, 3)``, one class per WordNet id, and the
    data set's ``train``/``val``/``test`` class splits.
    """
    root = _resolve_root(root, MINIIMAGENET_ENV_VAR, ("train.csv", "train"), "mini-ImageNet")
    entries: list[tuple[str, str, Path]] = []  # (split, wnid, file)
    if (root / "train.csv").is_file():
        images = root / "images"
        for split in ("train", "val", "test"):
            if (root / f"{split}.csv").is_file():
                entries += [(split, label, images / name) for name, label in _read_split_csv(root / f"{split}.csv")]
        missing = [str(p) for _, _, p in entries if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"mini-ImageNet: {len(missing)} listed images missing, e.g. {missing[0]}")
    else:
        for split in ("train", "val", "test"):
            if (root / split).is_dir():
                entries += [(split, d.name, f) for d in _subdirs(root / split) for f in _images_in(d)]
    if not entries:
        raise FileNotFoundError(f"mini-ImageNet: no images found under {root}")
    wnids = sorted({w for _, w, _ in entries})
    label_of = {w: i for i, w in enumerate(wnids)}
    params = {"root": str(root.resolve()), "size": size, "files": len(entries), "classes": len(wnids)}

    def build():
        return {"x": np.stack([_load_rgb(p, size) for _, _, p in entries]),
                "y": np.array([label_of[w] for _, w, _ in entries])}

    arr = _with_cache("miniimagenet", params, build, cache)
    splits: dict[str, set[int]] = {}
    for split, w, _ in entries:
        splits.setdefault(split, set()).add(label_of[w])
    overlap = [(a, b) for a in splits for b in splits if a < b and splits[a] & splits[b]]
    if overlap:
        raise ValueError(f"mini-ImageNet: classes shared between splits {overlap}")
    return LabelledSet(arr["x"], arr["y"], splits={k: np.array(sorted(v)) for k, v in splits.items()},
                       class_names=np.array(wnids))
