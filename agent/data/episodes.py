"""N-way K-shot episodes from a labelled image set, and class splits that never leak.

:class:`LabelledSet` holds images (``uint8`` ``(n, H, W)`` grayscale or ``(n, H, W, 3)``
colour, or floats in [0, 1]), integer class labels and optionally a group per sample (the
script or alphabet a character belongs to), plus named class splits when the data set defines
its own (Omniglot's background/evaluation, mini-ImageNet's Ravi split).
:func:`split_classes` partitions classes into train/val/test, by group when given, so that no
class (and no alphabet) appears in two splits. :class:`EpisodeSampler` draws tasks from one
split's classes: ``n_way`` classes in random order relabelled ``0..n_way-1``, ``k_shot``
support and ``k_query`` query images each, as float32 ``(n, C, H, W)`` tensors in [0, 1].

Examples
--------
>>> import numpy as np
>>> x = np.arange(40 * 4 * 4, dtype=np.uint8).reshape(40, 4, 4)
>>> data = LabelledSet(x, np.repeat(np.arange(10), 4))
>>> splits = split_classes(data, fractions=(0.6, 0.2, 0.2), seed=0)
>>> [len(splits[s]) for s in ("train", "val", "test")]
[6, 2, 2]
>>> sampler = EpisodeSampler(data, n_way=3, k_shot=1, k_query=2, classes=splits["train"])
>>> task = sampler.sample(np.random.default_rng(0))
>>> tuple(task.support_x.shape), tuple(task.query_x.shape), sorted(task.support_y.tolist())
((3, 1, 4, 4), (6, 1, 4, 4), [0, 1, 2])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from agent.algorithms.base import CLASSIFICATION, TaskTensors

__all__ = ["SPLITS", "LabelledSet", "split_classes", "EpisodeSampler", "ClassFamily", "draw_examples", "to_float_images"]

SPLITS = ("train", "val", "test")


@dataclass(eq=False, repr=False)
class LabelledSet:
    """Images with integer class labels.

    Parameters
    ----------
    x
        ``(n, H, W)`` or ``(n, H, W, C)`` images, ``uint8`` in [0, 255] or float in [0, 1]
        (``(n, C, H, W)`` floats are accepted too).
    y
        ``(n,)`` integer class labels (any integers, not necessarily contiguous).
    groups
        Optional ``(n,)`` group id per sample (script, alphabet); every class must lie in a
        single group. Splits made ``by`` groups keep whole groups together.
    splits
        Optional named class splits defined by the data set itself.
    class_names, group_names
        Optional readable names indexed by label / group id.
    meta
        Anything else the loader wants to keep (code points of glyphs, source paths).
    """

    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray | None = None
    splits: dict[str, np.ndarray] = field(default_factory=dict)
    class_names: np.ndarray | None = None
    group_names: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.x = np.asarray(self.x)
        self.y = np.asarray(self.y).astype(np.int64, copy=False).reshape(-1)
        if len(self.x) != len(self.y):
            raise ValueError(f"x has {len(self.x)} samples but y has {len(self.y)}")
        if self.groups is not None:
            self.groups = np.asarray(self.groups).astype(np.int64, copy=False).reshape(-1)
            if len(self.groups) != len(self.y):
                raise ValueError("groups must have one entry per sample")
        self.splits = {k: np.asarray(v, dtype=np.int64) for k, v in self.splits.items()}
        self._index: dict[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.y)

    def __repr__(self) -> str:
        return (f"LabelledSet(n={len(self)}, shape={tuple(self.x.shape[1:])}, dtype={self.x.dtype}, "
                f"classes={len(self.classes)}, groups={None if self.groups is None else len(np.unique(self.groups))}, "
                f"splits={ {k: len(v) for k, v in self.splits.items()} })")

    @property
    def classes(self) -> np.ndarray:
        """Sorted distinct labels."""
        return np.unique(self.y)

    def indices(self) -> dict[int, np.ndarray]:
        """Sample indices per class (computed once)."""
        if self._index is None:
            order = np.argsort(self.y, kind="stable")
            labels, starts = np.unique(self.y[order], return_index=True)
            self._index = {int(c): idx for c, idx in zip(labels, np.split(order, starts[1:]))}
        return self._index

    def class_groups(self) -> dict[int, int]:
        """The group of each class (requires ``groups``)."""
        if self.groups is None:
            raise ValueError("this set has no groups")
        out = {}
        for c, idx in self.indices().items():
            g = np.unique(self.groups[idx])
            if len(g) != 1:
                raise ValueError(f"class {c} spans several groups {g.tolist()}")
            out[c] = int(g[0])
        return out

    def subset(self, classes: Iterable[int]) -> "LabelledSet":
        """The samples of ``classes`` only (labels unchanged)."""
        keep = np.isin(self.y, np.asarray(list(classes), dtype=np.int64))
        return LabelledSet(self.x[keep], self.y[keep], None if self.groups is None else self.groups[keep],
                           class_names=self.class_names, group_names=self.group_names, meta=self.meta)


def split_classes(data: LabelledSet | np.ndarray, fractions: Sequence[float] = (0.6, 0.2, 0.2),
                  by: np.ndarray | Mapping[int, int] | bool | None = None, seed: int = 0,
                  names: Sequence[str] = SPLITS) -> dict[str, np.ndarray]:
    """Deterministically partition classes into disjoint splits.

    Parameters
    ----------
    data
        A :class:`LabelledSet` or an array of labels (one per sample or one per class).
    fractions
        Share of classes (or of groups, with ``by``) per split; rounded, the last split takes
        the remainder.
    by
        Split whole groups rather than classes: ``True`` uses ``data.groups``; an array gives a
        group per sample of ``data``; a mapping gives a group per class.
    seed
        Seed of the permutation (the split is a pure function of it and the labels).

    Returns
    -------
    dict
        ``{name: sorted array of class labels}``.

    Examples
    --------
    >>> y = np.arange(12)
    >>> s = split_classes(y, by={c: c // 3 for c in y}, fractions=(0.5, 0.25, 0.25))
    >>> len({int(c) // 3 for c in s["train"]}), len(s["val"]), len(s["test"])
    (2, 3, 3)
    """
    if len(fractions) != len(names):
        raise ValueError("one fraction per split name")
    labels = data.y if isinstance(data, LabelledSet) else np.asarray(data).reshape(-1)
    classes = np.unique(labels)
    if by is None or by is False:
        class_group = {int(c): int(c) for c in classes}
    elif by is True:
        if not isinstance(data, LabelledSet):
            raise ValueError("by=True needs a LabelledSet with groups")
        class_group = data.class_groups()
    elif isinstance(by, Mapping):
        class_group = {int(c): int(by[int(c)]) for c in classes}
    else:
        groups = np.asarray(by).reshape(-1)
        if len(groups) != len(labels):
            raise ValueError("by must give one group per sample")
        class_group = {}
        for c, g in zip(labels.tolist(), groups.tolist()):
            if class_group.setdefault(int(c), int(g)) != int(g):
                raise ValueError(f"class {c} spans several groups")
    units = np.array(sorted(set(class_group.values())), dtype=np.int64)
    perm = np.random.default_rng(seed).permutation(units)
    total = float(sum(fractions))
    bounds = np.round(np.cumsum(fractions) / total * len(units)).astype(int)
    bounds[-1] = len(units)
    out, start = {}, 0
    for name, stop in zip(names, bounds):
        chosen = set(perm[start:stop].tolist())
        out[name] = np.array(sorted(c for c, g in class_group.items() if g in chosen), dtype=np.int64)
        start = stop
    return out


def to_float_images(x: np.ndarray) -> torch.Tensor:
    """``uint8`` or float images to float32 ``(n, C, H, W)`` in [0, 1]."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)  # HWC -> CHW
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t.float().div_(255.0) if x.dtype == np.uint8 else t.float()


def draw_examples(index, classes, k_shot: int, k_query: int, rng: np.random.Generator, *, shuffle: bool = True
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint support and query examples of ``classes``, labelled ``0..len(classes)-1`` in that order.

    ``index[c]`` holds the example indices of class ``c``. Returns ``(support_idx, support_y,
    query_idx, query_y)``, each set shuffled (one permutation per set) unless ``shuffle`` is false.
    """
    s_idx, q_idx = [], []
    for c in classes:
        pick = rng.choice(index[int(c)], size=k_shot + k_query, replace=False)
        s_idx.append(pick[:k_shot])
        q_idx.append(pick[k_shot:])
    s_idx, q_idx = np.concatenate(s_idx), np.concatenate(q_idx)
    s_y, q_y = np.repeat(np.arange(len(classes)), k_shot), np.repeat(np.arange(len(classes)), k_query)
    if shuffle:
        ps, pq = rng.permutation(len(s_idx)), rng.permutation(len(q_idx))
        s_idx, s_y, q_idx, q_y = s_idx[ps], s_y[ps], q_idx[pq], q_y[pq]
    return s_idx, s_y, q_idx, q_y


class EpisodeSampler:
    """Draws N-way K-shot classification tasks from some classes of a :class:`LabelledSet`.

    Parameters
    ----------
    dataset
        The images.
    n_way, k_shot, k_query
        Classes per task, support and query images per class.
    classes
        The classes this sampler may use (a split); default all. Classes with fewer than
        ``k_shot + k_query`` images are dropped.
    shuffle
        Shuffle the support and query order (otherwise grouped by class); streams that present
        one example at a time want it.
    """

    kind = CLASSIFICATION

    def __init__(self, dataset: LabelledSet, n_way: int = 5, k_shot: int = 1, k_query: int = 15,
                 classes: Iterable[int] | None = None, shuffle: bool = True):
        self.dataset = dataset
        self.n_way, self.k_shot, self.k_query = int(n_way), int(k_shot), int(k_query)
        self.shuffle = bool(shuffle)
        index = dataset.indices()
        wanted = dataset.classes if classes is None else np.unique(np.asarray(list(classes), dtype=np.int64))
        unknown = [int(c) for c in wanted if int(c) not in index]
        if unknown:
            raise ValueError(f"classes not in the data set: {unknown[:10]}")
        need = self.k_shot + self.k_query
        self.classes = np.array([c for c in wanted if len(index[int(c)]) >= need], dtype=np.int64)
        if len(self.classes) < self.n_way:
            raise ValueError(f"only {len(self.classes)} classes have >= {need} images; need n_way={self.n_way}")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n_way={self.n_way}, k_shot={self.k_shot}, k_query={self.k_query}, "
                f"classes={len(self.classes)})")

    def sample_indices(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Sample indices and task labels: ``(support_idx, support_y, query_idx, query_y)``."""
        chosen = rng.choice(self.classes, size=self.n_way, replace=False)  # random order = random relabelling
        return draw_examples(self.dataset.indices(), chosen, self.k_shot, self.k_query, rng, shuffle=self.shuffle)

    def sample(self, rng: np.random.Generator) -> TaskTensors:
        """One task; deterministic given the generator's state."""
        s_idx, s_y, q_idx, q_y = self.sample_indices(rng)
        x = self.dataset.x
        return TaskTensors(to_float_images(x[s_idx]), torch.from_numpy(s_y), to_float_images(x[q_idx]),
                           torch.from_numpy(q_y), kind=CLASSIFICATION, n_way=self.n_way)

    def sample_many(self, rng: np.random.Generator, n: int) -> list[TaskTensors]:
        """``n`` tasks in sequence from one generator."""
        return [self.sample(rng) for _ in range(n)]


class ClassFamily(EpisodeSampler):
    """An :class:`EpisodeSampler` with a name and split: the image counterpart of the function
    families, so streams can mix both through ``sample(rng)``.

    >>> x = np.zeros((20, 2, 2), dtype=np.uint8)
    >>> fam = ClassFamily(LabelledSet(x, np.repeat(np.arange(5), 4)), n_way=2, k_shot=1, k_query=1, name="toy")
    >>> fam.name, fam.kind, fam.sample(np.random.default_rng(1)).n_way
    ('toy', 'classification', 2)
    """

    def __init__(self, dataset: LabelledSet, n_way: int = 5, k_shot: int = 1, k_query: int = 15,
                 classes: Iterable[int] | None = None, shuffle: bool = True, name: str = "images",
                 split: str | None = None):
        super().__init__(dataset, n_way, k_shot, k_query, classes, shuffle)
        self.name, self.split = name, split

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, split={self.split!r}, n_way={self.n_way}, k_shot={self.k_shot}, k_query={self.k_query}, classes={len(self.classes)})"
