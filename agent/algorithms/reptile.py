"""Reptile (Nichol, Achiam and Schulman, "On First-Order Meta-Learning Algorithms", 2018).

For each task, take ``inner_steps`` plain gradient steps of size ``inner_lr`` from the
initialisation ``theta`` on the task's data (support and query together: Reptile has no
support/query split in training), reaching ``phi``. :meth:`Reptile.meta_gradient` returns the
task mean of ``theta - phi``, so an SGD outer step with learning rate ``eps`` is exactly Reptile's
interpolation ``theta <- theta + eps * mean(phi - theta)`` (use SGD, not Adam, to keep that
reading; the trainer's ``optimizer: auto`` does).

The reported meta-loss is the mean of ``||theta - phi||^2 / 2``, the surrogate whose gradient is
the Reptile direction (Nichol et al. section 5.2 read Reptile as minimising the expected squared
distance to the task solutions); :meth:`Reptile.meta_loss` returns the same surrogate with
``phi`` held constant. Each inner step releases its graph, so memory does not grow with steps.
Test-time adaptation is the base class's: gradient steps on the support loss.

Examples
--------
>>> import torch
>>> from agent.nn.mlp import MLPFeatures
>>> from agent.nn.model import MetaModel
>>> from agent.algorithms.base import TaskTensors
>>> reptile = Reptile(MetaModel(MLPFeatures(1, (8,)), 8, 1), inner_lr=0.1, inner_steps=3)
>>> meta = reptile.init_meta(torch.Generator().manual_seed(0))
>>> x = torch.linspace(-1, 1, 10).unsqueeze(1)
>>> task = TaskTensors(x[:5], torch.sin(x[:5]), x[5:], torch.sin(x[5:]), "regression")
>>> dist, direction = reptile.meta_gradient(meta, [task])
>>> phi = reptile.adapt(meta, reptile.training_task(task)).params
>>> torch.allclose(direction["params.head.bias"], meta["params.head.bias"] - phi["head.bias"])
True
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from agent.algorithms.base import Algorithm, GradFn, MetaState, TaskTensors, autograd_grad


class Reptile(Algorithm):
    """First-order meta-learning by moving the initialisation towards adapted weights.

    Parameters
    ----------
    model
        The architecture.
    inner_lr, inner_steps
        Plain gradient descent on the task's data (full batch per step).
    """

    name = "reptile"

    def __init__(self, model, *, inner_lr: float = 0.01, inner_steps: int = 5):
        super().__init__(model, inner_lr=inner_lr, inner_steps=inner_steps, first_order=True)

    def __repr__(self) -> str:
        return f"Reptile(inner_lr={self.inner_lr}, inner_steps={self.inner_steps})"

    @staticmethod
    def training_task(task: TaskTensors) -> TaskTensors:
        """The task with its query examples added to the support set (when labelled)."""
        if task.query_y is None:
            return task
        x = torch.cat([task.support_x, task.query_x])
        y = torch.cat([task.support_y, task.query_y])
        return TaskTensors(x, y, task.query_x, task.query_y, task.kind, task.n_way)

    def direction(self, meta: MetaState, task: TaskTensors) -> dict[str, Tensor]:
        """``theta - phi`` for one task, per parameter (``params.``-prefixed, constants)."""
        with torch.enable_grad():
            phi = self.adapt(meta, self.training_task(task)).params
        return {f"params.{n}": (p - phi[n]).detach() for n, p in self.params_of(meta).items()}

    def meta_loss(self, meta: MetaState, task: TaskTensors, *, grad_fn: GradFn = autograd_grad,
                  progress: float = 1.0) -> Tensor:
        """``||theta - stopgrad(phi)||^2 / 2``: its gradient w.r.t. ``theta`` is the Reptile direction."""
        d = self.direction(meta, task)
        return sum(((meta[n] - (meta[n].detach() - v)) ** 2).sum() for n, v in d.items()) / 2

    def can_vmap(self, tasks: Sequence[TaskTensors]) -> bool:
        return False  # the inner loop is first-order and graph-free; a loop is as fast

    def meta_gradient(self, meta: MetaState, tasks: Sequence[TaskTensors], *, progress: float = 1.0,
                      use_vmap: bool | None = None) -> tuple[float, dict[str, Tensor]]:
        """Mean ``||theta - phi||^2 / 2`` and the mean Reptile direction ``theta - phi``."""
        grads = {n: torch.zeros_like(meta[n]) for n in self.trainable(meta)}
        total = 0.0
        for task in tasks:
            for n, v in self.direction(meta, task).items():
                total += 0.5 * float((v ** 2).sum()) / len(tasks)
                if n in grads:
                    grads[n] += v / len(tasks)
        return total, grads
