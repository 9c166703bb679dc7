"""Prototypical networks (Snell, Swersky and Zemel, "Prototypical Networks for Few-shot
Learning", NeurIPS 2017).

The model has no head: its features are the embedding. Adaptation is closed-form: the
prototype of each class is the mean embedding of its support examples, and a query is scored by
``-d(f(x), prototype_c) / tau`` with ``d`` the squared Euclidean distance (the paper's choice) or
the cosine distance ``1 - cos``. The temperature ``tau = exp(log_temperature)`` is a trainable
entry of the meta state. The meta-objective is the query cross-entropy.

The helpers :func:`class_means` and :func:`one_hot` are written with comparisons and matrix
products only, so they run under ``torch.func.vmap`` (tasks batched in ``meta_gradient``).

Examples
--------
>>> import torch
>>> from agent.nn.mlp import MLPFeatures
>>> from agent.nn.model import MetaModel
>>> from agent.algorithms.base import TaskTensors
>>> proto = ProtoNet(MetaModel(MLPFeatures(2, (8,)), 8, 0), distance="sqeuclidean")
>>> meta = proto.init_meta(torch.Generator().manual_seed(0))
>>> x = torch.tensor([[0.0, 1.0], [0.1, 0.9], [1.0, 0.0], [0.9, 0.1]])
>>> task = TaskTensors(x, torch.tensor([0, 0, 1, 1]), x, torch.tensor([0, 0, 1, 1]))
>>> state = proto.adapt(meta, task)
>>> state.extras["prototypes"].shape
torch.Size([2, 8])
>>> proto.predict(meta, state, x).shape
torch.Size([4, 2])
>>> loss, grads = proto.meta_gradient(meta, [task])
>>> "log_temperature" in grads
True
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from agent.algorithms.base import CLASSIFICATION, Adapted, Algorithm, GradFn, MetaState, TaskTensors, autograd_grad, task_loss

DISTANCES = ("sqeuclidean", "cosine")


def one_hot(y: Tensor, n_way: int, dtype: torch.dtype) -> Tensor:
    """``(n, n_way)`` indicator matrix of int labels ``y`` (vmap-safe, unlike ``F.one_hot``)."""
    return (y.unsqueeze(-1) == torch.arange(n_way, device=y.device)).to(dtype)


def class_means(emb: Tensor, y: Tensor, n_way: int) -> Tensor:
    """``(n_way, dim)`` mean of the rows of ``emb`` per class; a class without examples gets 0."""
    onehot = one_hot(y, n_way, emb.dtype)
    return onehot.transpose(-1, -2) @ emb / onehot.sum(-2).clamp_min(1.0).unsqueeze(-1)


def pairwise_distance(a: Tensor, b: Tensor, distance: str) -> Tensor:
    """``(len(a), len(b))`` squared Euclidean or cosine (``1 - cos``) distances."""
    if distance == "sqeuclidean":
        return (a.unsqueeze(-2) - b.unsqueeze(-3)).pow(2).sum(-1)
    if distance == "cosine":
        return 1.0 - F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(-1, -2)
    raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")


def predictive_entropy(logits: Tensor) -> Tensor:
    """Entropy (nats) of ``softmax(logits)`` along the last axis, one value per row.

    >>> round(predictive_entropy(torch.zeros(1, 4)).item(), 4)  # log(4): uniform over 4 classes
    1.3863
    """
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


class ProtoNet(Algorithm):
    """Prototypical network: nearest class mean in embedding space, softmax over ``-d / tau``.

    Parameters
    ----------
    model
        The embedding network; a head, if the model has one, is ignored and left out of the meta
        state (build it with ``out_dim=0``).
    distance
        ``"sqeuclidean"`` (Snell et al.) or ``"cosine"``.
    temperature
        Initial ``tau``; default 1 for squared Euclidean, 0.1 for cosine (cosine distances lie in
        [0, 2], so logits need a sharper scale).
    learn_temperature
        Whether ``log_temperature`` is trainable.
    """

    name = "protonet"
    kinds = frozenset({CLASSIFICATION})
    iterative = False
    needs_head: ClassVar[bool] = False  # build the model with out_dim=0: the features are the embedding

    def __init__(self, model, *, distance: str = "sqeuclidean", temperature: float | None = None,
                 learn_temperature: bool = True):
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        super().__init__(model, inner_lr=0.0, inner_steps=0)
        self.distance = distance
        self.temperature = float(temperature if temperature is not None else (1.0 if distance == "sqeuclidean" else 0.1))
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        self.learn_temperature = bool(learn_temperature)

    def __repr__(self) -> str:
        return f"ProtoNet(distance={self.distance!r}, temperature={self.temperature}, learn_temperature={self.learn_temperature})"

    def init_meta(self, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> MetaState:
        meta = {k: v for k, v in super().init_meta(generator, dtype).items() if not k.startswith("params.head.")}
        meta["log_temperature"] = torch.tensor(math.log(self.temperature), dtype=dtype).requires_grad_(self.learn_temperature)
        return meta

    def start(self, meta: MetaState, task: TaskTensors) -> Adapted:
        """Prototypes of the support classes (differentiable w.r.t. the features)."""
        if task.kind != CLASSIFICATION:
            raise ValueError("ProtoNet supports classification tasks only")
        params = self.params_of(meta)
        emb = self.embed(meta, params, task.support_x)
        return Adapted(params, {"prototypes": class_means(emb, task.support_y, task.n_way)}, 0)

    def step(self, meta: MetaState, state: Adapted, task: TaskTensors, *, lr_scale: float = 1.0,
             create_graph: bool = False, grad_fn: GradFn = autograd_grad) -> Adapted:
        """No inner steps: the state is already final and is returned unchanged."""
        return Adapted(state.params, dict(state.extras), state.step)

    def predict(self, meta: MetaState, state: Adapted, x: Tensor) -> Tensor:
        """Logits ``-d(f(x), prototypes) / tau``, one column per class."""
        emb = self.embed(meta, state.params, x)
        return -pairwise_distance(emb, state.extras["prototypes"], self.distance) * torch.exp(-meta["log_temperature"])

    def meta_loss(self, meta: MetaState, task: TaskTensors, *, grad_fn: GradFn = autograd_grad,
                  progress: float = 1.0) -> Tensor:
        """Query cross-entropy given the support prototypes."""
        state = self.start(meta, task)
        return task_loss(task.kind, self.predict(meta, state, task.query_x), task.query_y, task.n_way)

    predictive_entropy = staticmethod(predictive_entropy)
