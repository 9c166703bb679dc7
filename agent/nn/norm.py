"""Normalisation policies for meta-learning backbones, usable through ``functional_call``.

How a network normalises its activations decides what a few-shot prediction may depend on, so
the policy is a choice, named by a string:

``"batch"``
    Transductive batch statistics, as in MAML (Finn et al. 2017): every forward normalises with
    the statistics of the batch it is given; nothing is stored.
``"frozen"``
    Fixed statistics from the ``running_mean``/``running_var`` buffers. A prediction depends on
    its own input only (no transduction). :func:`estimate_running_stats` computes the buffers.
``"per_step"``
    MAML++ per-step batch normalisation (Antoniou et al. 2019): batch statistics, and a separate
    scale and shift for every inner step, rows of ``(steps + 1, C)`` tensors picked by ``step``
    (clamped to the last row).
``"group"``
    Group normalisation (Wu and He 2018): per-example statistics over channel groups.
``"none"``
    The identity.

Batch normalisation calls ``F.batch_norm`` *without* its weight and bias and applies the affine
transform outside: ``torch.func.vmap`` gives wrong second-order gradients through the fused
affine (pytorch/functorch#534), and correct ones this way. Parameters are named
``<layer>.weight``/``<layer>.bias`` inside a module whose name contains ``norm``, so
:meth:`~agent.nn.model.MetaModel.init_state` starts them at scale 1 and shift 0.
"""

from __future__ import annotations

import contextvars
import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

NORMS = ("batch", "frozen", "per_step", "group", "none")

#: Policies whose output for an example depends on that example only: safe to batch tasks with
#: ``vmap`` and non-transductive.
PER_EXAMPLE = frozenset({"frozen", "group", "none"})

# Set only inside estimate_running_stats: frozen layers then use, and record, batch statistics.
_RECORDING: contextvars.ContextVar[dict | None] = contextvars.ContextVar("norm_recording", default=None)


def check_norm(norm: str) -> str:
    """Return ``norm`` if it names a policy, else raise a ``ValueError`` that names it."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return norm


class Norm(nn.Module):
    """Normalise the channels (axis 1) of ``(N, C, ...)`` inputs under a policy.

    Parameters
    ----------
    channels
        Number of channels ``C``.
    policy
        One of :data:`NORMS`.
    steps
        Inner steps with their own affine row under ``"per_step"`` (rows ``0..steps``).
    groups
        Groups for ``"group"``; the largest divisor of ``channels`` not above it is used.
    eps
        Added to the variance.

    Examples
    --------
    >>> import torch
    >>> norm = Norm(4, "per_step", steps=2)
    >>> norm.weight.shape
    torch.Size([3, 4])
    >>> x = torch.randn(5, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    >>> y = norm(x, step=7)  # the last row, step 2
    >>> abs(y.mean().item()) < 1e-6, round(y.var(correction=0).item(), 3)
    (True, 1.0)
    """

    def __init__(self, channels: int, policy: str = "batch", *, steps: int = 1, groups: int = 8, eps: float = 1e-5):
        super().__init__()
        self.policy = check_norm(policy)
        self.eps = float(eps)
        self.groups = math.gcd(int(groups), int(channels))
        if policy != "none":
            shape = (int(steps) + 1, channels) if policy == "per_step" else (channels,)
            self.weight = nn.Parameter(torch.ones(shape))
            self.bias = nn.Parameter(torch.zeros(shape))
        if policy == "frozen":
            self.register_buffer("running_mean", torch.zeros(channels))
            self.register_buffer("running_var", torch.ones(channels))

    def extra_repr(self) -> str:
        return f"policy={self.policy!r}"

    def forward(self, x: Tensor, step: int = 0) -> Tensor:
        if self.policy == "none":
            return x
        if self.policy == "group":
            x = F.group_norm(x, self.groups, eps=self.eps)
        elif self.policy == "frozen" and _RECORDING.get() is None:
            x = F.batch_norm(x, self.running_mean, self.running_var, training=False, eps=self.eps)
        else:
            if self.policy == "frozen":  # estimating: record the statistics used here
                dims = [0, *range(2, x.dim())]
                _RECORDING.get()[self] = (x.detach().mean(dims), x.detach().var(dims, correction=0))
            x = F.batch_norm(x, None, None, training=True, eps=self.eps)
        w, b = self.weight, self.bias
        if self.policy == "per_step":
            row = min(int(step), w.shape[0] - 1)
            w, b = w[row], b[row]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * w.reshape(shape) + b.reshape(shape)


def estimate_running_stats(model: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor],
                           xs: Sequence[Tensor], step: int = 0) -> dict[str, Tensor]:
    """New buffers whose ``"frozen"`` statistics are those of the inputs ``xs``, taken together.

    One forward pass over ``torch.cat(xs)`` normalises every frozen layer with the batch's mean
    and (biased) variance and records them; layer by layer, each statistic is therefore measured
    on activations already normalised by the statistics before it. With the returned buffers,
    the model maps ``torch.cat(xs)`` exactly as batch normalisation would. Meta-training fills
    the frozen buffers this way: call it on the support inputs of a sample of recent tasks and
    store the result in the meta state (``buffers.<name>``), e.g. every few meta-steps.

    Pure: ``model``, ``params`` and ``buffers`` are left untouched; other buffers are copied
    over. No gradients flow into the statistics.

    Parameters
    ----------
    model
        A module whose ``forward(x, step=0)`` runs its normalisation layers (a ``MetaModel`` or
        a features module; buffer names are relative to it).
    params, buffers
        The state to run it with.
    xs
        Inputs with the same trailing shape (for instance one support set per task).
    step
        Passed to ``forward``.

    Examples
    --------
    >>> import torch
    >>> norm = Norm(2, "frozen")
    >>> params, buffers = dict(norm.named_parameters()), dict(norm.named_buffers())
    >>> x = torch.tensor([[1.0, 10.0], [3.0, 30.0]])
    >>> new = estimate_running_stats(norm, params, buffers, [x[:1], x[1:]])
    >>> new["running_mean"].tolist(), new["running_var"].tolist()
    ([2.0, 20.0], [1.0, 100.0])
    >>> buffers["running_mean"].tolist()  # the caller's dict is unchanged
    [0.0, 0.0]
    """
    names = {m: n for n, m in model.named_modules() if isinstance(m, Norm) and m.policy == "frozen"}
    stats: dict[Norm, tuple[Tensor, Tensor]] = {}
    token = _RECORDING.set(stats)
    try:
        with torch.no_grad():
            functional_call(model, {**buffers, **params}, (torch.cat(list(xs)),), {"step": step}, strict=False)
    finally:
        _RECORDING.reset(token)
    new = dict(buffers)
    for module, (mean, var) in stats.items():
        prefix = names[module] + "." if names[module] else ""
        new[prefix + "running_mean"], new[prefix + "running_var"] = mean, var
    return new
