"""MAML++ (Antoniou, Edwards and Storkey, "How to train your MAML", ICLR 2019).

MAML with the paper's training fixes that concern the algorithm (the per-step normalisation is
the model's: build it with ``norm="per_step"``; the inner step index reaches every forward):

* **LSLR**, per-layer per-step learned inner rates: ``lslr.<param>`` holds one rate per inner
  step (shape ``(inner_steps,)``, initialised to ``inner_lr``) and is meta-trained. Test-time
  steps beyond ``inner_steps`` reuse the last step's rate.
* **Multi-step loss (MSL)**: the meta-loss is a weighted sum of the query losses after every
  inner step. The weights start uniform and move linearly towards the last step over the first
  ``msl_fraction`` of training (non-final weights never below ``min_step_weight / N``); after
  that only the last step's loss is used, as in the paper.
* **Derivative-order annealing (DA)**: first-order meta-gradients while
  ``progress < first_order_until``, second order afterwards.

``progress`` (fraction of meta-training done, in [0, 1]) is what ``meta_loss``/``meta_gradient``
receive from the trainer.

Examples
--------
>>> import torch
>>> from agent.nn.mlp import MLPFeatures
>>> from agent.nn.model import MetaModel
>>> from agent.algorithms.base import TaskTensors
>>> model = MetaModel(MLPFeatures(1, (16,)), 16, 1, vmappable=True)
>>> alg = MAMLPlusPlus(model, inner_lr=0.01, inner_steps=3, msl_fraction=0.5)
>>> meta = alg.init_meta(torch.Generator().manual_seed(0))
>>> meta["lslr.head.weight"].tolist()
[0.009999999776482582, 0.009999999776482582, 0.009999999776482582]
>>> [round(w, 3) for w in alg.step_weights(0.0)], [round(w, 3) for w in alg.step_weights(0.25)]
([0.333, 0.333, 0.333], [0.167, 0.167, 0.667])
>>> alg.step_weights(0.5) is None, alg.first_order_at(0.1), alg.first_order_at(0.5)
(True, True, False)
>>> x = torch.rand(10, 1, generator=torch.Generator().manual_seed(1))
>>> task = TaskTensors(x, torch.sin(x), x, torch.sin(x), "regression")
>>> loss, grads = alg.meta_gradient(meta, [task, task], progress=0.1)
>>> grads["lslr.head.weight"].shape
torch.Size([3])
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from agent.algorithms.base import Algorithm, MetaState, Params
from agent.nn.model import with_prefix


class MAMLPlusPlus(Algorithm):
    """MAML++: learned per-step rates, multi-step loss, derivative-order annealing.

    Parameters
    ----------
    model
        The architecture (``norm="per_step"`` for per-step normalisation affines).
    inner_lr
        Initial value of every learned rate.
    inner_steps
        Inner steps in meta-training (and the length of each ``lslr`` vector).
    first_order
        Always first order (overrides annealing).
    msl_fraction
        Fraction of training that uses the multi-step loss (paper: 15 of 150 epochs, 0.1).
    first_order_until
        Fraction of training with first-order meta-gradients (paper: 50 of 150 epochs).
    min_step_weight
        Floor of a non-final step weight, times ``1 / inner_steps`` (paper: 0.03).
    learn_rates
        Meta-train the ``lslr`` rates (True in the paper).
    """

    name = "mamlpp"

    def __init__(self, model, *, inner_lr: float = 0.01, inner_steps: int = 1, first_order: bool = False,
                 msl_fraction: float = 0.1, first_order_until: float = 1 / 3, min_step_weight: float = 0.03,
                 learn_rates: bool = True):
        super().__init__(model, inner_lr=inner_lr, inner_steps=inner_steps, first_order=first_order)
        if not 0.0 <= msl_fraction <= 1.0 or not 0.0 <= first_order_until <= 1.0 or not 0.0 <= min_step_weight <= 1.0:
            raise ValueError("msl_fraction, first_order_until and min_step_weight must lie in [0, 1]")
        self.msl_fraction = float(msl_fraction)
        self.first_order_until = float(first_order_until)
        self.min_step_weight = float(min_step_weight)
        self.learn_rates = bool(learn_rates)

    def __repr__(self) -> str:
        return (f"MAMLPlusPlus(inner_lr={self.inner_lr}, inner_steps={self.inner_steps}, first_order={self.first_order}, "
                f"msl_fraction={self.msl_fraction}, first_order_until={self.first_order_until:.3g})")

    def init_meta(self, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> MetaState:
        """Model state plus ``lslr.<param>``: ``inner_steps`` rates per parameter tensor."""
        meta = super().init_meta(generator, dtype)
        n = max(self.inner_steps, 1)
        rates = {name: torch.full((n,), self.inner_lr, dtype=p.dtype).requires_grad_(self.learn_rates)
                 for name, p in self.params_of(meta).items()}
        meta.update(with_prefix(rates, "lslr."))
        return meta

    def step_sizes(self, meta: MetaState, params: Params, step: int) -> Mapping[str, Tensor | float]:
        """Rate of step ``step`` for each parameter (the last learned one beyond ``inner_steps``)."""
        out = {}
        for name in params:
            rates = meta["lslr." + name]
            out[name] = rates[min(step, rates.shape[0] - 1)]
        return out

    def step_weights(self, progress: float) -> Sequence[float] | None:
        """Multi-step loss weights at ``progress``; ``None`` (last step only) once MSL is over."""
        n = self.inner_steps
        if n <= 1 or progress >= self.msl_fraction:
            return None
        done = max(progress, 0.0) / self.msl_fraction
        non_final = max((1.0 - done) / n, self.min_step_weight / n)
        return [non_final] * (n - 1) + [1.0 - (n - 1) * non_final]

    def first_order_at(self, progress: float) -> bool:
        """First order while ``progress < first_order_until`` (or always with ``first_order``)."""
        return self.first_order or progress < self.first_order_until
