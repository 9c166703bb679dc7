"""Offline task families: everything a stream or a benchmark samples tasks from.

A *family* has ``kind`` (``"regression"`` or ``"classification"``), ``name`` and
``sample(rng) -> TaskTensors``, deterministic given the ``numpy.random.Generator``.
:func:`make_family` builds one by name:

=====================  ===========================================================================
name                   what
=====================  ===========================================================================
``sinusoid``           Finn et al. 2017 sine regression (``k_shot``, ``k_query``, ranges, ``noise``)
``sinusoid-*``         shifted variants: ``-frequency``, ``-extrapolate``, ``-noise``,
                       ``-noise-large``, ``-amplitude``, ``-phase``
``harmonic`` ...       other function classes: ``harmonic``, ``linear``, ``quadratic``, ``abs``,
                       ``tanh``
``glyphs``             font-rendered Omniglot analogue, split by script (60/20/20)
``fashion``            Fashion-MNIST (Debian IDX files), all 10 classes; ``split`` picks images
``digits``             scikit-learn 8×8 digits upsampled to 28×28; ``split`` picks images
``omniglot``           a local Omniglot copy (``root=`` or ``$META_AGENT_OMNIGLOT``)
``miniimagenet``       a local mini-ImageNet copy (``root=`` or ``$META_AGENT_MINIIMAGENET``)
=====================  ===========================================================================

Image families take ``n_way`` (5), ``k_shot`` (1), ``k_query`` (15), ``split`` (``"train"``,
``"val"``, ``"test"`` or ``"all"``) and ``classes=`` to pin the classes; other keywords go to
the loader. Loaded data sets are memoised per process, so building several families from one
data set decodes it once.

Examples
--------
>>> import numpy as np
>>> fam = make_family("sinusoid-noise", k_shot=5)
>>> fam.kind, fam.noise, tuple(fam.sample(np.random.default_rng(0)).support_x.shape)
('regression', 0.1, (5, 1))
>>> digits = make_family("digits", split="test", n_way=5, k_shot=1, k_query=2)
>>> tuple(digits.sample(np.random.default_rng(0)).query_x.shape)
(10, 1, 28, 28)
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

from agent.data.episodes import SPLITS, ClassFamily, EpisodeSampler, LabelledSet, split_classes
from agent.data.sinusoid import FAMILIES as FUNCTION_FAMILIES
from agent.data.sinusoid import FunctionFamily, fixed_test_set
from agent.data.sinusoid import make_family as make_function_family

__all__ = ["TaskFamily", "IMAGE_FAMILIES", "FUNCTION_FAMILIES", "family_names", "make_family", "load_dataset",
           "LabelledSet", "EpisodeSampler", "ClassFamily", "FunctionFamily", "split_classes", "fixed_test_set"]

IMAGE_FAMILIES = ("glyphs", "fashion", "digits", "omniglot", "miniimagenet")


@runtime_checkable
class TaskFamily(Protocol):
    """What streams need from a family."""

    kind: str
    name: str

    def sample(self, rng: np.random.Generator) -> Any: ...


def family_names() -> list[str]:
    """All names :func:`make_family` accepts."""
    return sorted(FUNCTION_FAMILIES) + list(IMAGE_FAMILIES)


_DATASETS: dict[tuple, LabelledSet] = {}


def _freeze(kwargs: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()))


def load_dataset(name: str, **kwargs) -> LabelledSet:
    """The :class:`LabelledSet` behind an image family (memoised per process)."""
    key = (name, _freeze(kwargs))
    if key not in _DATASETS:
        loaders: dict[str, Callable[..., LabelledSet]] = {
            "glyphs": _glyphs, "fashion": _fashion, "digits": _digits, "omniglot": _omniglot,
            "miniimagenet": _miniimagenet,
        }
        if name not in loaders:
            raise ValueError(f"unknown image family {name!r}; known: {list(IMAGE_FAMILIES)}")
        _DATASETS[key] = loaders[name](**kwargs)
    return _DATASETS[key]


def _glyphs(**kw):
    from agent.data.glyphs import load_glyphs

    return load_glyphs(**kw)


def _fashion(root=None):
    from agent.data.images import load_fashion_mnist

    return load_fashion_mnist(root, part="all")


def _digits(size=28):
    from agent.data.images import load_digits

    return load_digits(size)


def _omniglot(**kw):
    from agent.data.folders import load_omniglot

    return load_omniglot(**kw)


def _miniimagenet(**kw):
    from agent.data.folders import load_miniimagenet

    return load_miniimagenet(**kw)


def _sample_split(data: LabelledSet, split: str, fractions=(0.6, 0.2, 0.2), seed: int = 0,
                  fixed_test: np.ndarray | None = None) -> LabelledSet:
    """Split *images* (not classes) per class, for the few-class OOD sets whose classes are all
    used; ``fixed_test`` marks an official test part, which then becomes ``test`` exactly."""
    if split == "all":
        return data
    keep = np.zeros(len(data), dtype=bool)
    rng = np.random.default_rng(seed)
    for c, idx in data.indices().items():
        if fixed_test is not None:
            test = idx[fixed_test[idx]]
            rest = rng.permutation(idx[~fixed_test[idx]])
            n_val = int(round(len(rest) * fractions[1] / (fractions[0] + fractions[1])))
            parts = {"train": rest[n_val:], "val": rest[:n_val], "test": test}
        else:
            perm = rng.permutation(idx)
            a = int(round(len(perm) * fractions[0]))
            b = a + int(round(len(perm) * fractions[1]))
            parts = {"train": perm[:a], "val": perm[a:b], "test": perm[b:]}
        keep[parts[split]] = True
    return LabelledSet(data.x[keep], data.y[keep], class_names=data.class_names, meta=data.meta)


def make_family(name: str, split: str = "train", *, n_way: int = 5, k_shot: int | None = None,
                k_query: int | None = None, classes=None, split_seed: int = 0, fractions=(0.6, 0.2, 0.2), **kwargs):
    """A task family by name (see the module table).

    Parameters
    ----------
    name
        A function family (``sinusoid``, ``sinusoid-frequency``, ...) or an image family.
    split
        ``"train"``, ``"val"``, ``"test"`` or ``"all"``. For glyphs, Omniglot and mini-ImageNet
        it selects disjoint *classes* (glyphs: by script with ``fractions`` and ``split_seed``;
        the others: their own splits). For Fashion-MNIST (train 50k / val 10k / official test
        10k) and digits (60/20/20 per class) it selects *images* of all 10 classes. Ignored by
        function families.
    n_way, k_shot, k_query
        Episode shape for image families (defaults 5, 1, 15); function families take
        ``k_shot`` and ``k_query`` (defaults 10, 10).
    classes
        Use exactly these class labels instead of a split (e.g. digits 0–4 for the "5/5" demo).
    kwargs
        Function-family fields, or loader arguments (``root``, ``size``, glyph settings such as
        ``samples``, ``max_chars``, ``max_scripts``, ``seed``, ``cache``).
    """
    if name in FUNCTION_FAMILIES:
        shape = {k: v for k, v in (("k_shot", k_shot), ("k_query", k_query)) if v is not None}
        return make_function_family(name, **shape, **kwargs)
    if name not in IMAGE_FAMILIES:
        raise ValueError(f"unknown family {name!r}; known: {family_names()}")
    if split not in (*SPLITS, "all"):
        raise ValueError(f"split must be one of {SPLITS + ('all',)}, got {split!r}")
    data = load_dataset(name, **kwargs)
    if name == "fashion":
        fixed = np.zeros(len(data), dtype=bool)
        fixed[60000:] = len(data) == 70000  # the official test file comes last
        data = _sample_split(data, split, (50, 10, 10), split_seed, fixed if fixed.any() else None)
    elif name == "digits":
        data = _sample_split(data, split, fractions, split_seed)
    if classes is not None:
        chosen = np.asarray(list(classes), dtype=np.int64)
    elif split == "all" or name in ("fashion", "digits"):
        chosen = data.classes
    elif name == "glyphs":
        chosen = split_classes(data, fractions, by=True, seed=split_seed)[split]
    else:
        chosen = data.splits[split]
    return ClassFamily(data, n_way, 1 if k_shot is None else k_shot, 15 if k_query is None else k_query,
                       classes=chosen, name=name, split=split)

