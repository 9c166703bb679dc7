"""ANIL: almost no inner loop (Raghu, Raghu, Bengio and Vinyals, "Rapid Learning or Feature Reuse?", ICLR 2020).

MAML whose inner loop adapts only the linear head (``head.*``); the features are meta-trained in
the outer loop (second order through the head updates unless ``first_order``). The features of
a task are computed once (support at ``start``, query once per query loss) and the inner steps
run on the head alone, so no inner gradient touches the feature extractor. Features use the
normalisation of step 0 (they do not change during adaptation).

Examples
--------
>>> import torch
>>> from agent.nn.mlp import MLPFeatures
>>> from agent.nn.model import MetaModel
>>> from agent.algorithms.base import TaskTensors
>>> model = MetaModel(MLPFeatures(1, (16,)), 16, 1, vmappable=True)
>>> alg = ANIL(model, inner_lr=0.1, inner_steps=2)
>>> meta = alg.init_meta(torch.Generator().manual_seed(0))
>>> x = torch.rand(10, 1, generator=torch.Generator().manual_seed(1))
>>> task = TaskTensors(x, torch.sin(x), x, torch.sin(x), "regression")
>>> state = alg.adapt(meta, task)
>>> sorted(n for n in state.params if not torch.equal(state.params[n], meta["params." + n]))
['head.bias', 'head.weight']
>>> loss, grads = alg.meta_gradient(meta, [task])
>>> bool(grads["params.features.layers.0.weight"].abs().sum() > 0)
True
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from agent.algorithms.base import Adapted, Algorithm, MetaState, Params, TaskTensors, task_loss
from agent.nn.model import head

_FEATURES = "support_features"


class ANIL(Algorithm):
    """ANIL: the inner loop adapts the head only, on features computed once per task.

    Parameters are those of :class:`~agent.algorithms.base.Algorithm`; the model needs a head
    (``out_dim > 0``).
    """

    name = "anil"

    def __init__(self, model, *, inner_lr: float = 0.01, inner_steps: int = 1, first_order: bool = False):
        if model.head is None:
            raise ValueError("ANIL needs a model with a linear head (out_dim > 0)")
        super().__init__(model, inner_lr=inner_lr, inner_steps=inner_steps, first_order=first_order)

    def start(self, meta: MetaState, task: TaskTensors) -> Adapted:
        """Meta parameters, and the support features in ``extras["support_features"]``."""
        params = self.params_of(meta)
        return Adapted(params, {_FEATURES: self.embed(meta, params, task.support_x, 0)}, 0)

    def _features(self, meta: MetaState, state: Adapted, task: TaskTensors) -> Tensor:
        feats = state.extras.get(_FEATURES)
        return self.embed(meta, state.params, task.support_x, 0) if feats is None else feats

    def inner_objective(self, meta: MetaState, state: Adapted, task: TaskTensors) -> tuple[Callable[[Params], Tensor], Params]:
        """The head's support loss on the cached features, and the head parameters."""
        feats = self._features(meta, state, task)
        heads = {n: p for n, p in state.params.items() if n.startswith("head.")}
        kind, y, n_way = task.kind, task.support_y, task.n_way
        return (lambda h: task_loss(kind, head(h, feats), y, n_way)), heads

    def predict(self, meta: MetaState, state: Adapted, x: Tensor) -> Tensor:
        """Features of ``x`` (step 0) through the adapted head."""
        return head(state.params, self.embed(meta, state.params, x, 0))

    def support_loss(self, meta: MetaState, state: Adapted, task: TaskTensors) -> Tensor:
        """Support loss from the cached features."""
        return task_loss(task.kind, head(state.params, self._features(meta, state, task)), task.support_y, task.n_way)
