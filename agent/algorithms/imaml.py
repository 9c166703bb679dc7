"""Implicit MAML (Rajeswaran, Finn, Kakade and Levine, "Meta-Learning with Implicit Gradients",
NeurIPS 2019).

The inner loop minimises the proximally regularised support loss

    G(phi) = L_support(phi) + (lam / 2) ||phi - theta||^2

with ``inner_steps`` gradient steps of size ``inner_lr`` from ``phi = theta``. At the minimiser
``phi*``, the implicit function theorem gives ``d phi* / d theta = (I + H / lam)^{-1}`` with ``H``
the Hessian of ``L_support`` at ``phi*``, so the meta-gradient of the query loss is the solution
``v`` of

    ((1 + cg_damping) I + H / lam) v = grad L_query(phi*)

found by ``cg_steps`` iterations of conjugate gradient using Hessian-vector products (double
backward through one support-loss graph). Nothing is differentiated through the inner loop: each
inner step releases its graph, so memory does not depend on ``inner_steps``. The gradient is
exact only when the inner loop has converged (and ``cg_damping = 0``); ``cg_damping > 0``
regularises the solve when ``H / lam`` has eigenvalues near ``-1``. ``first_order=True`` skips
the solve (``v = grad L_query(phi*)``, first-order iMAML).

Test-time adaptation uses the same proximal inner objective (:meth:`IMAML.inner_loss`);
``support_loss`` reports the plain support loss.

Examples
--------
>>> import torch
>>> from agent.nn.mlp import MLPFeatures
>>> from agent.nn.model import MetaModel
>>> from agent.algorithms.base import TaskTensors
>>> imaml = IMAML(MetaModel(MLPFeatures(1, (8,)), 8, 1), inner_lr=0.1, inner_steps=10, lam=2.0)
>>> meta = imaml.init_meta(torch.Generator().manual_seed(0))
>>> x = torch.linspace(-1, 1, 10).unsqueeze(1)
>>> task = TaskTensors(x[:5], torch.sin(x[:5]), x[5:], torch.sin(x[5:]), "regression")
>>> loss, grads = imaml.meta_gradient(meta, [task])
>>> sorted(grads) == sorted(k for k in meta if k.startswith("params."))
True
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from agent.algorithms.base import Adapted, Algorithm, GradFn, MetaState, TaskTensors, autograd_grad, task_loss
from agent.nn.model import Params


def conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor, steps: int, tol: float = 1e-10) -> Tensor:
    """Approximate solution of ``A x = b`` for symmetric positive-definite ``A`` (given as
    ``matvec``) after at most ``steps`` conjugate-gradient iterations from ``x = 0``, stopping
    early once the residual norm falls below ``tol * ||b||``.

    >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
    >>> torch.allclose(conjugate_gradient(lambda v: A @ v, b, 2), torch.linalg.solve(A, b))
    True
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = r @ r
    stop = tol * tol * float(rs) + 1e-300
    for _ in range(steps):
        if float(rs) <= stop:
            break
        ap = matvec(p)
        alpha = rs / (p @ ap)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = r @ r
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x


class IMAML(Algorithm):
    """iMAML: proximal inner loop, implicit meta-gradient by conjugate gradient.

    Parameters
    ----------
    model
        The architecture.
    inner_lr, inner_steps
        Gradient descent on the proximal objective (converge it: the implicit gradient assumes
        ``phi`` minimises ``G``; a step size below ``1 / (lam + L)`` is safe).
    lam
        Proximal strength ``lambda``: larger keeps ``phi`` nearer ``theta``.
    cg_steps
        Conjugate-gradient iterations (each one Hessian-vector product).
    cg_damping
        Added to the diagonal of ``I + H / lam``.
    first_order
        Skip the solve and use the query gradient at ``phi`` as the meta-gradient.
    """

    name = "imaml"

    def __init__(self, model, *, inner_lr: float = 0.01, inner_steps: int = 10, lam: float = 1.0,
                 cg_steps: int = 5, cg_damping: float = 0.0, first_order: bool = False):
        super().__init__(model, inner_lr=inner_lr, inner_steps=inner_steps, first_order=first_order)
        if lam <= 0 or cg_steps < 0 or cg_damping < 0:
            raise ValueError(f"need lam > 0, cg_steps >= 0, cg_damping >= 0; got {lam}, {cg_steps}, {cg_damping}")
        self.lam, self.cg_steps, self.cg_damping = float(lam), int(cg_steps), float(cg_damping)

    def __repr__(self) -> str:
        return (f"IMAML(inner_lr={self.inner_lr}, inner_steps={self.inner_steps}, lam={self.lam}, "
                f"cg_steps={self.cg_steps}, cg_damping={self.cg_damping}, first_order={self.first_order})")

    def inner_loss(self, meta: MetaState, params: Params, task: TaskTensors, step: int) -> Tensor:
        """Support loss plus ``(lam / 2) ||params - theta||^2`` (``theta`` held constant)."""
        theta = self.params_of(meta)
        prox = sum(((params[n] - theta[n].detach()) ** 2).sum() for n in params)
        return super().inner_loss(meta, params, task, step) + 0.5 * self.lam * prox

    def task_gradient(self, meta: MetaState, task: TaskTensors) -> tuple[Tensor, Params]:
        """Query loss at the adapted ``phi`` and the implicit gradient w.r.t. ``theta`` (by name)."""
        with torch.enable_grad():
            return self._task_gradient(meta, task)

    def _task_gradient(self, meta: MetaState, task: TaskTensors) -> tuple[Tensor, Params]:
        state = self.adapt(meta, task)
        names = list(state.params)
        phi = {n: state.params[n].detach().requires_grad_(True) for n in names}
        sizes = [phi[n].numel() for n in names]
        flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
        query_out = self.predict(meta, Adapted(phi, state.extras, state.step), task.query_x)
        query_loss = task_loss(task.kind, query_out, task.query_y, task.n_way)
        gq = torch.autograd.grad(query_loss, [phi[n] for n in names], allow_unused=True)
        b = flat([torch.zeros_like(phi[n]) if g is None else g for n, g in zip(names, gq)])
        if self.first_order or self.cg_steps == 0:
            v = b
        else:
            support = Algorithm.inner_loss(self, meta, phi, task, state.step)  # without the proximal term
            gs = torch.autograd.grad(support, [phi[n] for n in names], create_graph=True, allow_unused=True)
            used = [(n, g) for n, g in zip(names, gs) if g is not None and g.requires_grad]

            def matvec(vec: Tensor) -> Tensor:
                parts = dict(zip(names, vec.split(sizes)))
                hv = torch.autograd.grad([g for _, g in used], [phi[n] for n in names],
                                         grad_outputs=[parts[n].reshape(g.shape) for n, g in used],
                                         retain_graph=True, allow_unused=True) if used else [None] * len(names)
                h = flat([torch.zeros_like(phi[n]) if x is None else x for n, x in zip(names, hv)])
                return (1.0 + self.cg_damping) * vec + h / self.lam

            v = conjugate_gradient(matvec, b, self.cg_steps)
        return query_loss.detach(), {n: t.reshape(phi[n].shape) for n, t in zip(names, v.split(sizes))}

    def meta_loss(self, meta: MetaState, task: TaskTensors, *, grad_fn: GradFn = autograd_grad,
                  progress: float = 1.0) -> Tensor:
        """Query loss at ``phi``, as a surrogate whose gradient w.r.t. ``theta`` is the implicit one.

        The value is the query loss; autograd through it yields ``v`` for ``params.*`` (the
        inner loop is not differentiated). Runs per task (``grad_fn`` is not used).
        """
        loss, v = self.task_gradient(meta, task)
        theta = self.params_of(meta)
        inner = sum((theta[n] * v[n]).sum() for n in v)
        return loss + inner - inner.detach()

    def can_vmap(self, tasks: Sequence[TaskTensors]) -> bool:
        return False  # conjugate gradient uses autograd double backward per task

    def meta_gradient(self, meta: MetaState, tasks: Sequence[TaskTensors], *, progress: float = 1.0,
                      use_vmap: bool | None = None) -> tuple[float, dict[str, Tensor]]:
        """Mean query loss at the adapted weights and the mean implicit meta-gradient."""
        grads = {n: torch.zeros_like(meta[n]) for n in self.trainable(meta)}
        total = 0.0
        for task in tasks:
            loss, v = self.task_gradient(meta, task)
            total += float(loss) / len(tasks)
            for n, g in v.items():
                if f"params.{n}" in grads:
                    grads[f"params.{n}"] += g / len(tasks)
        return total, grads
