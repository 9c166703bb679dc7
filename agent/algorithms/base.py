"""What every adaptation algorithm provides, and the shared pieces of the functional core.

An algorithm is a small object holding hyperparameters and a :class:`~agent.nn.model.MetaModel`
(the architecture). All state lives in plain dicts of tensors:

* ``meta`` (:data:`MetaState`): what meta-training learns. Model parameters are stored under
  ``params.<name>``, model buffers (normalisation statistics) under ``buffers.<name>``, and
  algorithm extras under their own prefixes (``lr.<name>`` for Meta-SGD, ``lslr.<name>`` for
  MAML++, ``log_temperature`` for ProtoNet, ...). Tensors with ``requires_grad`` are trainable.
  Saved with ``torch.save`` it loads back with ``weights_only=True``.
* :class:`Adapted`: the task-specific state after some inner steps (fast weights, prototypes,
  a closed-form head).

The adaptation protocol is step-wise so that the test-time compute policy can watch the support
loss, backtrack and stop early: ``start`` gives step 0, ``step`` takes one inner step,
``support_loss`` scores a state. ``adapt`` is the plain loop. ``meta_loss`` is the training
objective for one task and ``meta_gradient`` the gradient of the mean over a batch of tasks.

Gradients inside the inner loop go through a ``grad_fn`` so that one implementation serves two
execution paths: :func:`autograd_grad` for a per-task loop (the fastest eager path), and
:func:`func_grad` (``torch.func.grad``) when tasks are batched under ``torch.func.vmap``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from agent.nn.model import MetaModel, Params, forward, subdict, with_prefix

MetaState = dict[str, Tensor]
GradFn = Callable[[Callable[[Params], Tensor], Params, bool], Params]

CLASSIFICATION = "classification"
REGRESSION = "regression"


@dataclass(frozen=True)
class TaskTensors:
    """One few-shot task as tensors.

    ``support_y``/``query_y`` are int64 class indices ``0..n_way-1`` for classification, float
    targets with a leading sample axis for regression. ``query_y`` may be ``None`` when labels
    come later.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor | None
    kind: str = CLASSIFICATION
    n_way: int | None = None

    def __post_init__(self):
        if self.kind not in (CLASSIFICATION, REGRESSION):
            raise ValueError(f"kind must be {CLASSIFICATION!r} or {REGRESSION!r}, got {self.kind!r}")
        if self.kind == CLASSIFICATION and self.n_way is None:
            object.__setattr__(self, "n_way", int(self.support_y.max().item()) + 1)

    def to(self, dtype: torch.dtype) -> "TaskTensors":
        """The same task with float tensors cast to ``dtype`` (labels keep their type)."""
        cast = lambda t: t if t is None or not t.is_floating_point() else t.to(dtype)  # noqa: E731
        return TaskTensors(cast(self.support_x), cast(self.support_y), cast(self.query_x), cast(self.query_y), self.kind, self.n_way)


@dataclass
class Adapted:
    """Task-specific state after ``step`` inner steps.

    ``params`` are the parameters used for prediction (the whole model for MAML, the same dict
    with a new head for ANIL); ``extras`` carry non-parameter state (prototypes, a ridge head).
    """

    params: Params
    extras: dict[str, Tensor] = field(default_factory=dict)
    step: int = 0


def task_loss(kind: str, output: Tensor, y: Tensor, n_way: int | None = None) -> Tensor:
    """Cross-entropy over the first ``n_way`` logits, or mean squared error."""
    if kind == CLASSIFICATION:
        if n_way is not None and output.shape[-1] > n_way:
            output = output[..., :n_way]
        return F.cross_entropy(output, y)
    return F.mse_loss(output, y.reshape(output.shape))


def autograd_grad(loss_fn: Callable[[Params], Tensor], params: Params, create_graph: bool) -> Params:
    """Gradient of ``loss_fn(params)`` by ``torch.autograd.grad``.

    With ``create_graph`` the result stays differentiable (second-order MAML); without it the
    gradients are constants (first-order). Parameters that do not reach the loss get zeros.
    """
    names = list(params)
    loss = loss_fn(params)
    grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=create_graph, allow_unused=True)
    return {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, grads)}


def func_grad(loss_fn: Callable[[Params], Tensor], params: Params, create_graph: bool) -> Params:
    """Gradient of ``loss_fn(params)`` by ``torch.func.grad``: usable under ``vmap``."""
    grads = torch.func.grad(loss_fn)(params)
    return grads if create_graph else {n: g.detach() for n, g in grads.items()}


def ensure_graph(params: Params) -> Params:
    """Make leaf tensors without grad tracking differentiable (inference-time adaptation)."""
    return {n: p if p.requires_grad else p.detach().requires_grad_(True) for n, p in params.items()}


class Algorithm:
    """Base class: MAML-style gradient adaptation of the whole model.

    Subclasses override the few methods that differ. Hyperparameters are constructor arguments
    and never change during adaptation, so the methods are pure functions of their inputs.

    Parameters
    ----------
    model
        The architecture.
    inner_lr
        Inner-loop step size.
    inner_steps
        Inner steps used by ``adapt`` and ``meta_loss`` when not told otherwise.
    first_order
        Drop second-order terms from the meta-gradient.
    """

    name: ClassVar[str] = "base"
    kinds: ClassVar[frozenset[str]] = frozenset({CLASSIFICATION, REGRESSION})
    iterative: ClassVar[bool] = True  # False for closed-form adaptation (ProtoNet, ridge)

    def __init__(self, model: MetaModel, *, inner_lr: float = 0.01, inner_steps: int = 1, first_order: bool = False):
        if inner_steps < 0:
            raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")
        self.model = model
        self.inner_lr = float(inner_lr)
        self.inner_steps = int(inner_steps)
        self.first_order = bool(first_order)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(inner_lr={self.inner_lr}, inner_steps={self.inner_steps}, first_order={self.first_order})"

    # -- meta state -------------------------------------------------------------------------
    def init_meta(self, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> MetaState:
        """A fresh meta state; trainable tensors have ``requires_grad=True``."""
        params, buffers = self.model.init_state(generator, dtype)
        meta = with_prefix({n: p.requires_grad_(True) for n, p in params.items()}, "params.")
        meta.update(with_prefix(buffers, "buffers."))
        return meta

    @staticmethod
    def params_of(meta: Mapping[str, Tensor]) -> Params:
        return subdict(meta, "params.")

    @staticmethod
    def buffers_of(meta: Mapping[str, Tensor]) -> Params:
        return subdict(meta, "buffers.")

    # -- adaptation -------------------------------------------------------------------------
    def start(self, meta: MetaState, task: TaskTensors) -> Adapted:
        """The state before any inner step."""
        return Adapted(self.params_of(meta), {}, 0)

    def inner_loss(self, meta: MetaState, params: Params, task: TaskTensors, step: int) -> Tensor:
        """Support loss of ``params`` (the quantity the inner loop descends)."""
        out = forward(self.model, params, self.buffers_of(meta), task.support_x, step)
        return task_loss(task.kind, out, task.support_y, task.n_way)

    def step_sizes(self, meta: MetaState, params: Params, step: int) -> Mapping[str, Tensor | float]:
        """Step size per parameter for inner step ``step`` (a float or a tensor)."""
        return {n: self.inner_lr for n in params}

    def step(self, meta: MetaState, state: Adapted, task: TaskTensors, *, lr_scale: float = 1.0,
             create_graph: bool = False, grad_fn: GradFn = autograd_grad) -> Adapted:
        """One inner gradient step from ``state``; ``lr_scale`` shrinks it (backtracking)."""
        params = state.params if create_graph else ensure_graph(state.params)
        grads = grad_fn(lambda p: self.inner_loss(meta, p, task, state.step), params, create_graph)
        rates = self.step_sizes(meta, params, state.step)
        new = {n: params[n] - lr_scale * rates[n] * grads[n] for n in params}
        if not create_graph:
            new = {n: t.detach() for n, t in new.items()}
        return Adapted(new, dict(state.extras), state.step + 1)

    def adapt(self, meta: MetaState, task: TaskTensors, steps: int | None = None, *,
              create_graph: bool = False, grad_fn: GradFn = autograd_grad) -> Adapted:
        """Adapt to ``task`` with ``steps`` inner steps (default ``inner_steps``)."""
        state = self.start(meta, task)
        for _ in range(self.inner_steps if steps is None else int(steps)):
            state = self.step(meta, state, task, create_graph=create_graph, grad_fn=grad_fn)
        return state

    def predict(self, meta: MetaState, state: Adapted, x: Tensor) -> Tensor:
        """Logits (classification, first ``n_way`` columns are meaningful) or regression outputs."""
        return forward(self.model, state.params, self.buffers_of(meta), x, state.step)

    def support_loss(self, meta: MetaState, state: Adapted, task: TaskTensors) -> Tensor:
        """Loss of an adapted state on the support set (what the compute guards monitor)."""
        return task_loss(task.kind, self.predict(meta, state, task.support_x), task.support_y, task.n_way)

    # -- meta-objective ---------------------------------------------------------------------
    def meta_loss(self, meta: MetaState, task: TaskTensors, *, grad_fn: GradFn = autograd_grad,
                  progress: float = 1.0) -> Tensor:
        """Query loss after adapting (differentiable w.r.t. the trainable entries of ``meta``).

        ``progress`` in [0, 1] is the fraction of meta-training done (for annealed schedules).
        """
        state = self._adapt_for_meta(meta, task, grad_fn)
        return task_loss(task.kind, self.predict(meta, state, task.query_x), task.query_y, task.n_way)

    def _adapt_for_meta(self, meta: MetaState, task: TaskTensors, grad_fn: GradFn) -> Adapted:
        # The fast weights must stay connected to meta even in first order: only the inner
        # gradients are treated as constants.
        state = self.start(meta, task)
        for _ in range(self.inner_steps):
            state = self._differentiable_step(meta, state, task, grad_fn)
        return state

    def _differentiable_step(self, meta: MetaState, state: Adapted, task: TaskTensors, grad_fn: GradFn) -> Adapted:
        grads = grad_fn(lambda p: self.inner_loss(meta, p, task, state.step), state.params, not self.first_order)
        if self.first_order:
            grads = {n: g.detach() for n, g in grads.items()}
        rates = self.step_sizes(meta, state.params, state.step)
        return Adapted({n: p - rates[n] * grads[n] for n, p in state.params.items()}, dict(state.extras), state.step + 1)

    def trainable(self, meta: MetaState) -> list[str]:
        """Names of the meta entries that meta-training updates."""
        return [k for k, v in meta.items() if v.requires_grad]

    def meta_gradient(self, meta: MetaState, tasks: Sequence[TaskTensors], *, progress: float = 1.0,
                      use_vmap: bool | None = None) -> tuple[float, dict[str, Tensor]]:
        """Mean meta-loss over ``tasks`` and its gradient w.r.t. the trainable entries.

        Batches the tasks with ``torch.func.vmap`` when the model allows it (no batch-dependent
        normalisation: vmap's second-order gradients through BatchNorm are wrong) and the tasks
        share shapes; otherwise loops, releasing each task's graph before the next.
        """
        names = self.trainable(meta)
        if use_vmap is None:
            use_vmap = self.can_vmap(tasks)
        if use_vmap:
            loss = self._vmapped_loss(meta, tasks, progress)
            grads = torch.autograd.grad(loss, [meta[n] for n in names], allow_unused=True)
            total = loss.detach()
        else:
            grads, total = None, torch.zeros(())
            for task in tasks:
                loss = self.meta_loss(meta, task, progress=progress) / len(tasks)
                g = torch.autograd.grad(loss, [meta[n] for n in names], allow_unused=True)
                grads = list(g) if grads is None else [a if b is None else (b if a is None else a + b) for a, b in zip(grads, g)]
                total = total + loss.detach()
        out = {n: torch.zeros_like(meta[n]) if g is None else g for n, g in zip(names, grads)}
        return float(total), out

    def can_vmap(self, tasks: Sequence[TaskTensors]) -> bool:
        """True when ``tasks`` can be batched with vmap and give the loop's gradients."""
        if not self.model.vmappable or len(tasks) < 2:
            return False
        first = tasks[0]
        shapes = lambda t: (t.support_x.shape, t.support_y.shape, t.query_x.shape, None if t.query_y is None else t.query_y.shape, t.kind, t.n_way)  # noqa: E731
        return all(shapes(t) == shapes(first) for t in tasks)

    def _vmapped_loss(self, meta: MetaState, tasks: Sequence[TaskTensors], progress: float) -> Tensor:
        kind, n_way = tasks[0].kind, tasks[0].n_way
        stack = lambda attr: torch.stack([getattr(t, attr) for t in tasks])  # noqa: E731

        def one(sx, sy, qx, qy):
            task = TaskTensors(sx, sy, qx, qy, kind, n_way)
            return self.meta_loss(meta, task, grad_fn=func_grad, progress=progress)

        losses = torch.func.vmap(one)(stack("support_x"), stack("support_y"), stack("query_x"), stack("query_y"))
        return losses.mean()
