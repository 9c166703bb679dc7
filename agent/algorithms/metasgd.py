"""Meta-SGD (Li, Zhou, Chen and Li, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning", 2017).

MAML whose inner step size is a meta-learned tensor of the same shape as each parameter
(``lr.<param>``, initialised to ``inner_lr``): the inner update is ``θ - α ∘ ∇L``, and the outer
loop trains ``θ`` and ``α`` together. The rates receive gradient in first order too, since
the update stays a function of ``α``.

Examples
--------
>>> import torch
>>> from agent.nn.mlp import MLPFeatures
>>> from agent.nn.model import MetaModel
>>> from agent.algorithms.base import TaskTensors
>>> model = MetaModel(MLPFeatures(1, (16,)), 16, 1, vmappable=True)
>>> alg = MetaSGD(model, inner_lr=0.01)
>>> meta = alg.init_meta(torch.Generator().manual_seed(0))
>>> meta["lr.head.weight"].shape == meta["params.head.weight"].shape
True
>>> x = torch.rand(10, 1, generator=torch.Generator().manual_seed(1))
>>> task = TaskTensors(x, torch.sin(x), x, torch.sin(x), "regression")
>>> loss, grads = alg.meta_gradient(meta, [task])
>>> bool(grads["lr.head.weight"].abs().sum() > 0)
True
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from agent.algorithms.base import Algorithm, MetaState, Params
from agent.nn.model import with_prefix


class MetaSGD(Algorithm):
    """Meta-SGD: learned per-element inner rates ``lr.<param>``.

    Parameters are those of :class:`~agent.algorithms.base.Algorithm`; ``inner_lr`` is the
    initial value of every rate.
    """

    name = "metasgd"

    def init_meta(self, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> MetaState:
        """Model state plus ``lr.<param>`` (same shapes, filled with ``inner_lr``, trainable)."""
        meta = super().init_meta(generator, dtype)
        rates = {name: torch.full_like(p, self.inner_lr).detach().requires_grad_(True) for name, p in self.params_of(meta).items()}
        meta.update(with_prefix(rates, "lr."))
        return meta

    def step_sizes(self, meta: MetaState, params: Params, step: int) -> Mapping[str, Tensor | float]:
        """The learned rate tensors (the same at every step)."""
        return {name: meta["lr." + name] for name in params}
