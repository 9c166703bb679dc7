"""Backbones used functionally (see :mod:`agent.nn.model`) and :func:`build_model` to make one.

Examples
--------
>>> import torch
>>> model = build_model("conv4", in_shape=(1, 28, 28), out_dim=5, norm="group", width=8)
>>> params, buffers = model.init_state(torch.Generator().manual_seed(0))
>>> forward(model, params, buffers, torch.zeros(3, 1, 28, 28)).shape
torch.Size([3, 5])
>>> model.vmappable  # GroupNorm is per-example
True
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

from agent.nn.conv4 import Conv4Features
from agent.nn.mlp import MLPFeatures
from agent.nn.model import MetaModel, embed, forward, head
from agent.nn.norm import NORMS, PER_EXAMPLE, Norm, check_norm, estimate_running_stats
from agent.nn.resnet12 import WIDTHS, ResNet12Features, widths_for

ARCHS = ("mlp", "conv4", "resnet12")

__all__ = ["ARCHS", "NORMS", "MetaModel", "Norm", "build_model", "embed", "estimate_running_stats", "forward", "head"]


def build_model(arch: str, *, in_shape: Sequence[int] | int, out_dim: int, norm: str | None = None, steps: int = 5,
                width: int | Sequence[int] | None = None, hidden: Sequence[int] = (40, 40)) -> MetaModel:
    """A :class:`MetaModel` with the named backbone.

    Parameters
    ----------
    arch
        ``"mlp"``, ``"conv4"`` or ``"resnet12"``.
    in_shape
        Shape of one input: ``(channels, height, width)`` for the conv nets; any shape (or an
        int) for the MLP, which flattens it.
    out_dim
        Outputs of the linear head; ``0`` for none (features only, as ProtoNet uses).
    norm
        Normalisation policy, one of :data:`NORMS`; defaults to ``"batch"`` (standard MAML)
        for the conv nets. The MLP has no normalisation, so it takes only ``"none"``.
    steps
        Inner steps with their own affine under ``norm="per_step"``; later steps share the last.
    width
        Conv-4: filters per block (default 64). ResNet-12: the base width, scaled 1 : 2.5 : 5 :
        10 (default 64, i.e. ``(64, 160, 320, 640)``), or the four block widths.
    hidden
        MLP layer widths.

    Notes
    -----
    ``vmappable`` is set only when every normalisation is per-example (``"frozen"``,
    ``"group"``, ``"none"``; always for the MLP). Batch statistics make ``vmap``'s second-order
    gradients unreliable, and on CPU ``vmap`` over convolutions is slower than a loop anyway.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if not _int_at_least(out_dim, 0):
        raise ValueError(f"out_dim must be an int >= 0, got {out_dim!r}")
    if not _int_at_least(steps, 0):
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
    if not shape or not all(_int_at_least(s, 1) for s in shape):
        raise ValueError(f"in_shape must be positive ints, got {in_shape!r}")
    if arch == "mlp":
        if norm not in (None, "none"):
            raise ValueError(f"norm must be 'none' for arch 'mlp' (it has no normalisation), got {norm!r}")
        features = MLPFeatures(math.prod(shape), hidden)
        return MetaModel(features, features.out_dim, out_dim, vmappable=True)
    norm = check_norm("batch" if norm is None else norm)
    if len(shape) != 3:
        raise ValueError(f"in_shape must be (channels, height, width) for arch {arch!r}, got {in_shape!r}")
    if arch == "conv4":
        width = 64 if width is None else width
        if not _int_at_least(width, 1):
            raise ValueError(f"width must be a positive int for arch 'conv4', got {width!r}")
        features = Conv4Features(shape, width, norm=norm, steps=steps)
    else:
        if width is None or _int_at_least(width, 1):
            widths = widths_for(width) if width else WIDTHS
        else:
            widths = tuple(width) if isinstance(width, (tuple, list)) else ()
        if len(widths) != 4 or not all(_int_at_least(v, 1) for v in widths):
            raise ValueError(f"width must be a positive int or four positive ints for arch 'resnet12', got {width!r}")
        features = ResNet12Features(shape, widths, norm=norm, steps=steps)
    return MetaModel(features, features.out_dim, out_dim, vmappable=norm in PER_EXAMPLE)


def _int_at_least(v, low: int) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= low
