"""Closed-form ridge-regression head (R2-D2: Bertinetto, Henriques, Torr and Vedaldi,
"Meta-learning with differentiable closed-form solvers", ICLR 2019).

The support embeddings ``X`` (with a constant column appended for the bias) are regressed onto
the targets ``Y`` (one-hot for classification, the targets as-is for regression) with

    W = X^T (X X^T + lambda I)^{-1} Y          (Woodbury / dual form, an n x n system)
      = (X^T X + lambda I)^{-1} X^T Y          (primal form, a (d+1) x (d+1) system)

The two are equal; :func:`ridge_solve` solves whichever system is smaller (few-shot support sets
make the dual the usual case). Outputs are ``exp(log_scale) * [f(x), 1] W + offset``: R2-D2's
learned calibration, which gives the cross-entropy a usable scale for classification (for
regression it starts as the identity). ``log_lambda``, ``log_scale`` and ``offset`` are
trainable meta entries, and everything is differentiable, so the features are meta-learned
through the solve. The bias column is regularised like the weights, as in R2-D2.

Examples
--------
>>> import torch
>>> from agent.nn.mlp import MLPFeatures
>>> from agent.nn.model import MetaModel
>>> from agent.algorithms.base import TaskTensors
>>> ridge = RidgeHead(MetaModel(MLPFeatures(1, (16,)), 16, 0), lam=0.1)
>>> meta = ridge.init_meta(torch.Generator().manual_seed(0))
>>> x = torch.linspace(-1, 1, 8).unsqueeze(1)
>>> task = TaskTensors(x, 2 * x, x, 2 * x, "regression")
>>> state = ridge.adapt(meta, task)
>>> state.extras["ridge_weight"].shape  # 16 features + bias, 1 output
torch.Size([17, 1])
>>> loss, grads = ridge.meta_gradient(meta, [task])
>>> sorted(k for k in grads if not k.startswith("params."))
['log_lambda', 'log_scale', 'offset']
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from agent.algorithms.base import CLASSIFICATION, Adapted, Algorithm, GradFn, MetaState, TaskTensors, autograd_grad, task_loss
from agent.algorithms.protonet import one_hot


def with_bias_column(x: Tensor) -> Tensor:
    """``x`` with a column of ones appended."""
    return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)


def ridge_solve(x: Tensor, y: Tensor, lam: Tensor | float) -> Tensor:
    """Ridge weights ``argmin_W ||x W - y||^2 + lam ||W||^2`` for ``x`` (n, d), ``y`` (n, k).

    Solves the dual (Woodbury) system ``(x x^T + lam I) a = y, W = x^T a`` when ``n <= d`` and
    the primal normal equations otherwise; both are differentiable.
    """
    n, d = x.shape[-2], x.shape[-1]
    if n <= d:
        eye = torch.eye(n, dtype=x.dtype, device=x.device)
        return x.transpose(-1, -2) @ torch.linalg.solve(x @ x.transpose(-1, -2) + lam * eye, y)
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    return torch.linalg.solve(x.transpose(-1, -2) @ x + lam * eye, x.transpose(-1, -2) @ y)


class RidgeHead(Algorithm):
    """Differentiable closed-form ridge head on meta-learned features (R2-D2).

    Parameters
    ----------
    model
        The feature extractor; a head, if the model has one, is ignored and left out of the meta
        state.
    lam
        Initial ridge penalty (``log_lambda`` stores its log).
    scale, offset
        Initial output calibration ``scale * output + offset``.
    learn_lambda, learn_scale
        Whether ``log_lambda`` / ``log_scale`` and ``offset`` are trainable.
    """

    name = "ridge"
    iterative = False
    needs_head: ClassVar[bool] = False  # build the model with out_dim=0: the head is our own

    def __init__(self, model, *, lam: float = 1.0, scale: float = 1.0, offset: float = 0.0,
                 learn_lambda: bool = True, learn_scale: bool = True):
        if lam <= 0 or scale <= 0:
            raise ValueError(f"lam and scale must be > 0, got {lam}, {scale}")
        super().__init__(model, inner_lr=0.0, inner_steps=0)
        self.lam, self.scale, self.offset = float(lam), float(scale), float(offset)
        self.learn_lambda, self.learn_scale = bool(learn_lambda), bool(learn_scale)

    def __repr__(self) -> str:
        return f"RidgeHead(lam={self.lam}, scale={self.scale}, offset={self.offset}, learn_lambda={self.learn_lambda}, learn_scale={self.learn_scale})"

    def init_meta(self, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> MetaState:
        meta = {k: v for k, v in super().init_meta(generator, dtype).items() if not k.startswith("params.head.")}
        meta["log_lambda"] = torch.tensor(math.log(self.lam), dtype=dtype).requires_grad_(self.learn_lambda)
        meta["log_scale"] = torch.tensor(math.log(self.scale), dtype=dtype).requires_grad_(self.learn_scale)
        meta["offset"] = torch.tensor(self.offset, dtype=dtype).requires_grad_(self.learn_scale)
        return meta

    @staticmethod
    def targets(task: TaskTensors, dtype: torch.dtype) -> Tensor:
        """Regression targets of the support set: one-hot classes, or ``y`` as ``(n, k)``."""
        if task.kind == CLASSIFICATION:
            return one_hot(task.support_y, task.n_way, dtype)
        return task.support_y.reshape(task.support_y.shape[0], -1).to(dtype)

    def start(self, meta: MetaState, task: TaskTensors) -> Adapted:
        """Solve for the head on the support set (differentiable w.r.t. ``meta``)."""
        params = self.params_of(meta)
        x = with_bias_column(self.embed(meta, params, task.support_x))
        w = ridge_solve(x, self.targets(task, x.dtype), torch.exp(meta["log_lambda"]))
        return Adapted(params, {"ridge_weight": w}, 0)

    def step(self, meta: MetaState, state: Adapted, task: TaskTensors, *, lr_scale: float = 1.0,
             create_graph: bool = False, grad_fn: GradFn = autograd_grad) -> Adapted:
        """No inner steps: the state is already final and is returned unchanged."""
        return Adapted(state.params, dict(state.extras), state.step)

    def predict(self, meta: MetaState, state: Adapted, x: Tensor) -> Tensor:
        """``exp(log_scale) * [f(x), 1] W + offset`` (logits or regression outputs)."""
        f = with_bias_column(self.embed(meta, state.params, x))
        return torch.exp(meta["log_scale"]) * (f @ state.extras["ridge_weight"]) + meta["offset"]

    def meta_loss(self, meta: MetaState, task: TaskTensors, *, grad_fn: GradFn = autograd_grad,
                  progress: float = 1.0) -> Tensor:
        """Query loss of the closed-form head fitted on the support set."""
        state = self.start(meta, task)
        return task_loss(task.kind, self.predict(meta, state, task.query_x), task.query_y, task.n_way)
