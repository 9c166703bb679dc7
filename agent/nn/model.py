"""A backbone used functionally: architecture in an ``nn.Module``, state in plain dicts.

Every algorithm works on parameter dicts (``{"features.layers.0.weight": tensor, ...}``) and
calls the module through :func:`torch.func.functional_call`, so adaptation never mutates the
module and the same code runs per task in a loop or batched under :func:`torch.func.vmap`.

Parameter names follow one convention: the feature extractor lives under ``features.`` and the
linear output layer under ``head.``; ANIL, ProtoNet and the head-only algorithms rely on it.
Normalisation layers carry ``norm`` in their names (initialised to the identity).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

Params = dict[str, Tensor]


class MetaModel(nn.Module):
    """A feature extractor followed by an optional linear head.

    Parameters
    ----------
    features
        A module whose ``forward(x, step=0)`` returns a ``(batch, feature_dim)`` tensor. ``step``
        is the inner-loop step, used by per-step normalisation (MAML++); others ignore it.
    feature_dim
        Width of the features.
    out_dim
        Outputs of the head (ways for classification, target size for regression); ``0`` means
        no head (ProtoNet uses the features directly).
    vmappable
        True when the features have no batch-dependent state, so tasks can be batched with
        ``torch.func.vmap`` and give the same gradients as a per-task loop.

    Examples
    --------
    >>> import torch
    >>> from agent.nn.mlp import MLPFeatures
    >>> model = MetaModel(MLPFeatures(1, (40, 40)), 40, 1, vmappable=True)
    >>> params, buffers = model.init_state(torch.Generator().manual_seed(0))
    >>> forward(model, params, buffers, torch.zeros(5, 1)).shape
    torch.Size([5, 1])
    """

    def __init__(self, features: nn.Module, feature_dim: int, out_dim: int, *, vmappable: bool = False):
        super().__init__()
        self.features = features
        self.feature_dim = int(feature_dim)
        self.out_dim = int(out_dim)
        self.head = nn.Linear(feature_dim, out_dim) if out_dim else None
        self.vmappable = bool(vmappable)

    def forward(self, x: Tensor, step: int = 0) -> Tensor:
        f = self.features(x, step)
        return self.head(f) if self.head is not None else f

    def init_state(self, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> tuple[Params, Params]:
        """Fresh parameters and buffers, drawn from ``generator`` (no global RNG is touched)."""
        params = {name: _init_tensor(name, torch.empty(p.shape, dtype=dtype), generator) for name, p in self.named_parameters()}
        buffers = {name: b.detach().clone().to(dtype) if b.is_floating_point() else b.detach().clone() for name, b in self.named_buffers()}
        return params, buffers


def _init_tensor(name: str, t: Tensor, generator: torch.Generator | None) -> Tensor:
    """Deterministic initialisation from ``generator`` by naming convention.

    Normalisation layers (any parameter whose name contains ``norm``) start as the identity:
    scale 1, shift 0. Other biases start at 0. Weights are uniform in ``±1/sqrt(fan_in)``, the
    scale of PyTorch's default ``nn.Linear``/``nn.Conv2d`` initialisation.
    """
    leaf = name.rsplit(".", 1)[-1]
    if "norm" in name:
        return t.fill_(1.0) if leaf == "weight" else t.zero_()
    if leaf == "bias" or t.dim() < 2:
        return t.zero_()
    bound = 1.0 / t[0].numel() ** 0.5
    return t.uniform_(-bound, bound, generator=generator)


def forward(model: MetaModel, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor, step: int = 0) -> Tensor:
    """Run the whole model on ``x`` with the given state."""
    return functional_call(model, {**buffers, **params}, (x,), {"step": step}, strict=False)


def embed(model: MetaModel, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor, step: int = 0) -> Tensor:
    """Features of ``x`` (the input to the head)."""
    state = {**subdict(buffers, "features."), **subdict(params, "features.")}
    return functional_call(model.features, state, (x, step), strict=False)


def head(params: Mapping[str, Tensor], features: Tensor) -> Tensor:
    """Apply the linear head stored under ``head.`` to ``features``."""
    return torch.nn.functional.linear(features, params["head.weight"], params["head.bias"])


def subdict(d: Mapping[str, Tensor], prefix: str) -> Params:
    """Entries of ``d`` under ``prefix``, with the prefix removed."""
    n = len(prefix)
    return {k[n:]: v for k, v in d.items() if k.startswith(prefix)}


def with_prefix(d: Mapping[str, Tensor], prefix: str) -> Params:
    """Entries of ``d`` with ``prefix`` added to every key."""
    return {prefix + k: v for k, v in d.items()}
