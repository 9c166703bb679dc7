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
Each ``step`` also records, for free, the support loss of the state it started from
(:attr:`Adapted.prev_loss`), so a policy that watches the loss need not run the forward twice.

Gradients inside the inner loop go through a ``grad_fn`` so that one implementation serves two
execution paths: :func:`autograd_grad` for a per-task loop (the fastest eager path), and
:func:`func_grad` (``torch.func.grad``) when tasks are batched under ``torch.func.vmap``.

Speed notes (measured on the 1-40-40-1 sinusoid MLP, 25 tasks, 1 thread): the model is called
through :class:`FunctionalModel`, which swaps the tensors into the module's parameter slots
directly and costs about half of ``torch.func.functional_call``; the meta-gradient takes one
``torch.autograd.grad`` per task (loop, memory freed task by task) or one over the vmapped
mean (batched); first-order inner gradients under ``vmap`` are taken under ``torch.no_grad`` so
the outer graph does not record them.

Examples
--------
>>> import torch
>>> from agent.nn.mlp import MLPFeatures
>>> from agent.nn.model import MetaModel
>>> alg = Algorithm(MetaModel(MLPFeatures(1, (8,)), 8, 1, vmappable=True), inner_lr=0.1)
>>> meta = alg.init_meta(torch.Generator().manual_seed(0), torch.float64)
>>> x = torch.linspace(-1, 1, 8, dtype=torch.float64).unsqueeze(1)
>>> task = TaskTensors(x, 2 * x, x, 2 * x, REGRESSION)
>>> s0 = alg.start(meta, task)
>>> s1 = alg.step(meta, s0, task)
>>> bool(alg.support_loss(meta, s1, task) < alg.support_loss(meta, s0, task))
True
>>> bool(torch.isclose(s1.prev_loss, alg.support_loss(meta, s0, task)))
True
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agent.nn.model import MetaModel, Params, subdict, with_prefix

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
    with a new head for ANIL); ``extras`` carry non-parameter state (prototypes, a ridge head,
    ANIL's cached features). ``prev_loss`` is the support loss of the state this one was stepped
    from (a by-product of the step; ``None`` at ``start`` or when the ``grad_fn`` gives no value).
    """

    params: Params
    extras: dict[str, Tensor] = field(default_factory=dict)
    step: int = 0
    prev_loss: Tensor | None = None


def task_loss(kind: str, output: Tensor, y: Tensor, n_way: int | None = None) -> Tensor:
    """Cross-entropy over the first ``n_way`` logits, or mean squared error."""
    if kind == CLASSIFICATION:
        if n_way is not None and output.shape[-1] > n_way:
            output = output[..., :n_way]
        return F.cross_entropy(output, y)
    return F.mse_loss(output, y.reshape(output.shape))


# -- fast functional calls --------------------------------------------------------------------

class FunctionalModel:
    """Call a module with tensors from a dict in place of its parameters and buffers.

    Same results as ``torch.func.functional_call(module, state, args, strict=False)``, and safe
    under ``torch.func.grad``/``vmap``, at about half the cost for small models: the slot of
    every parameter and buffer (``module._parameters``/``_buffers`` of its owner) is looked up
    once (so build it after the module is complete), and each call writes the tensors there and
    restores the originals afterwards. Like ``functional_call`` it is not thread-safe for
    concurrent calls on one module.

    Examples
    --------
    >>> import torch
    >>> lin = torch.nn.Linear(2, 1)
    >>> fm = FunctionalModel.of(lin)
    >>> w = {"weight": torch.ones(1, 2), "bias": torch.zeros(1)}
    >>> fm(w, lin, torch.ones(3, 2)).flatten().tolist()
    [2.0, 2.0, 2.0]
    >>> bool(lin.weight.eq(1).all())  # the module itself is untouched
    False
    """

    _cache: ClassVar["weakref.WeakKeyDictionary[nn.Module, FunctionalModel]"] = weakref.WeakKeyDictionary()

    def __init__(self, module: nn.Module):
        self.module = module
        slots: dict[str, tuple[dict, str]] = {}
        for prefix, sub in module.named_modules(remove_duplicate=False):
            head = prefix + "." if prefix else ""
            for leaf in sub._parameters:
                slots.setdefault(head + leaf, (sub._parameters, leaf))
            for leaf in sub._buffers:
                slots.setdefault(head + leaf, (sub._buffers, leaf))
        self.slots = slots

    @classmethod
    def of(cls, module: nn.Module) -> "FunctionalModel":
        """The (cached) instance for ``module``."""
        fm = cls._cache.get(module)
        if fm is None:
            fm = cls._cache[module] = cls(module)
        return fm

    def __call__(self, state: Mapping[str, Tensor], target: nn.Module, *args, **kwargs):
        """Run ``target`` (the module or one of its submodules) with ``state`` swapped in.

        ``state`` is keyed by names relative to the module given at construction; a name that
        is not a parameter or buffer there raises ``KeyError``.
        """
        slots = self.slots
        saved = []
        try:
            for name, tensor in state.items():
                slot = slots.get(name)
                if slot is None:
                    raise KeyError(f"{name!r} is not a parameter or buffer of {type(self.module).__name__}")
                d, leaf = slot
                saved.append((d, leaf, d[leaf]))
                d[leaf] = tensor
            return target(*args, **kwargs)
        finally:
            for d, leaf, old in reversed(saved):
                d[leaf] = old


# -- inner-loop gradients ---------------------------------------------------------------------

def ensure_graph(params: Params) -> Params:
    """Make tensors without grad tracking differentiable leaves (inference-time adaptation)."""
    return {n: p if p.requires_grad else p.detach().requires_grad_(True) for n, p in params.items()}


def autograd_grad_and_value(loss_fn: Callable[[Params], Tensor], params: Params,
                            create_graph: bool) -> tuple[Params, Tensor]:
    """Gradient and value of ``loss_fn(params)`` by ``torch.autograd.grad``.

    With ``create_graph`` the gradients stay differentiable (second-order MAML); without it they
    are constants (first order) and the value is detached. Parameters that do not reach the
    loss get zeros. Works inside ``torch.no_grad`` (inference-time adaptation).
    """
    with torch.enable_grad():
        params = ensure_graph(params)
        loss = loss_fn(params)
        grads = torch.autograd.grad(loss, params, create_graph=create_graph, materialize_grads=True)
    return grads, (loss if create_graph else loss.detach())


def autograd_grad(loss_fn: Callable[[Params], Tensor], params: Params, create_graph: bool) -> Params:
    """Gradient of ``loss_fn(params)`` by ``torch.autograd.grad`` (see :func:`autograd_grad_and_value`)."""
    return autograd_grad_and_value(loss_fn, params, create_graph)[0]


def func_grad_and_value(loss_fn: Callable[[Params], Tensor], params: Params,
                        create_graph: bool) -> tuple[Params, Tensor]:
    """Gradient and value of ``loss_fn(params)`` by ``torch.func.grad_and_value``: usable under ``vmap``.

    Without ``create_graph`` the computation runs under ``torch.no_grad`` so that an enclosing
    autograd graph (the meta-gradient) does not record it; ``torch.func`` transforms still
    differentiate inside.
    """
    if create_graph:
        return torch.func.grad_and_value(loss_fn)(params)
    with torch.no_grad():
        grads, loss = torch.func.grad_and_value(loss_fn)(params)
    return {n: g.detach() for n, g in grads.items()}, loss.detach()


def func_grad(loss_fn: Callable[[Params], Tensor], params: Params, create_graph: bool) -> Params:
    """Gradient of ``loss_fn(params)`` by ``torch.func.grad`` (see :func:`func_grad_and_value`)."""
    return func_grad_and_value(loss_fn, params, create_graph)[0]


_WITH_VALUE: dict[Callable, Callable] = {autograd_grad: autograd_grad_and_value, func_grad: func_grad_and_value}


def grad_and_value_fn(grad_fn: GradFn) -> Callable[[Callable[[Params], Tensor], Params, bool], tuple[Params, Tensor | None]]:
    """The gradient-and-value variant of ``grad_fn`` (value ``None`` for an unknown ``grad_fn``)."""
    fn = _WITH_VALUE.get(grad_fn)
    if fn is None:
        if grad_fn in _WITH_VALUE.values():
            return grad_fn  # already a grad-and-value function
        return lambda loss_fn, params, create_graph: (grad_fn(loss_fn, params, create_graph), None)
    return fn


class Algorithm:
    """Base class: MAML-style gradient adaptation of the whole model.

    Subclasses override the few methods that differ. Hyperparameters are constructor arguments
    and never change during adaptation, so the methods are pure functions of their inputs.

    Hooks for subclasses: :meth:`inner_objective` (which parameters the inner loop updates and
    the loss it descends), :meth:`step_sizes` (per-parameter, per-step rates),
    :meth:`query_loss`, :meth:`step_weights` (multi-step loss) and :meth:`first_order_at`
    (derivative-order annealing).

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
        self._fm = FunctionalModel.of(model)

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

    # -- model calls ------------------------------------------------------------------------
    def forward(self, meta: MetaState, params: Mapping[str, Tensor], x: Tensor, step: int = 0) -> Tensor:
        """The whole model on ``x`` with ``params`` and the buffers of ``meta``."""
        state = self.buffers_of(meta)
        state.update(params)
        return self._fm(state, self.model, x, step)

    def embed(self, meta: MetaState, params: Mapping[str, Tensor], x: Tensor, step: int = 0) -> Tensor:
        """Features of ``x`` (the input to the head); head entries of ``params`` are ignored."""
        state = self.buffers_of(meta)
        state.update(params)
        return self._fm(state, self.model.features, x, step)

    # -- adaptation -------------------------------------------------------------------------
    def start(self, meta: MetaState, task: TaskTensors) -> Adapted:
        """The state before any inner step."""
        return Adapted(self.params_of(meta), {}, 0)

    def inner_loss(self, meta: MetaState, params: Params, task: TaskTensors, step: int) -> Tensor:
        """Support loss of ``params`` (the quantity the inner loop descends)."""
        return task_loss(task.kind, self.forward(meta, params, task.support_x, step), task.support_y, task.n_way)

    def inner_objective(self, meta: MetaState, state: Adapted, task: TaskTensors) -> tuple[Callable[[Params], Tensor], Params]:
        """The inner loop's loss function and the parameters it updates, at ``state``.

        Returns ``(loss_fn, params)``: ``params`` is the subset of ``state.params`` that a step
        changes and ``loss_fn(params)`` the support loss as a function of it. The default updates
        every parameter with :meth:`inner_loss`; ANIL returns the head and a loss on cached
        features.
        """
        return (lambda p: self.inner_loss(meta, p, task, state.step)), state.params

    def step_sizes(self, meta: MetaState, params: Params, step: int) -> Mapping[str, Tensor | float]:
        """Step size per parameter for inner step ``step`` (a float or a tensor)."""
        return dict.fromkeys(params, self.inner_lr)

    def _update(self, meta: MetaState, state: Adapted, params: Params, grads: Params, scale: float) -> Params:
        rates = self.step_sizes(meta, params, state.step)
        if scale != 1.0:
            new = {n: p - (scale * rates[n]) * grads[n] for n, p in params.items()}
        else:
            new = {n: p - rates[n] * grads[n] for n, p in params.items()}
        if len(new) == len(state.params):
            return new
        out = dict(state.params)
        out.update(new)
        return out

    def step(self, meta: MetaState, state: Adapted, task: TaskTensors, *, lr_scale: float = 1.0,
             create_graph: bool = False, grad_fn: GradFn = autograd_grad,
             at: tuple[Params, Tensor] | None = None) -> Adapted:
        """One inner gradient step from ``state``; ``lr_scale`` shrinks it (backtracking).

        Without ``create_graph`` the new state is detached from ``meta`` (inference); with it the
        step is differentiable to second order. The returned state's ``prev_loss`` is the
        support loss of ``state`` (detached without ``create_graph``).

        ``at``: ``(gradient, loss)`` of the inner objective at ``state`` when the caller computed
        them already (:func:`plain_inner_loop` algorithms at their start state, see
        :func:`agent.batch.start_one`); the step then only applies the update. Inference only.
        """
        loss_fn, params = self.inner_objective(meta, state, task)
        if at is not None and not create_graph:
            grads, loss = at
        else:
            grads, loss = grad_and_value_fn(grad_fn)(loss_fn, params, create_graph)
        if create_graph:
            return Adapted(self._update(meta, state, params, grads, lr_scale), dict(state.extras), state.step + 1, loss)
        with torch.no_grad():
            new = self._update(meta, state, params, grads, lr_scale)
        return Adapted(_detached(new), _detached(state.extras), state.step + 1, loss)

    def adapt(self, meta: MetaState, task: TaskTensors, steps: int | None = None, *,
              create_graph: bool = False, grad_fn: GradFn = autograd_grad) -> Adapted:
        """Adapt to ``task`` with ``steps`` inner steps (default ``inner_steps``)."""
        state = self.start(meta, task)
        for _ in range(self.inner_steps if steps is None else int(steps)):
            state = self.step(meta, state, task, create_graph=create_graph, grad_fn=grad_fn)
        return state

    def predict(self, meta: MetaState, state: Adapted, x: Tensor) -> Tensor:
        """Logits (classification, first ``n_way`` columns are meaningful) or regression outputs."""
        return self.forward(meta, state.params, x, state.step)

    def support_loss(self, meta: MetaState, state: Adapted, task: TaskTensors) -> Tensor:
        """Loss of an adapted state on the support set (what the compute guards monitor)."""
        return task_loss(task.kind, self.predict(meta, state, task.support_x), task.support_y, task.n_way)

    def query_loss(self, meta: MetaState, state: Adapted, task: TaskTensors) -> Tensor:
        """Loss of an adapted state on the query set (the meta-objective's term)."""
        return task_loss(task.kind, self.predict(meta, state, task.query_x), task.query_y, task.n_way)

    # -- meta-objective ---------------------------------------------------------------------
    def step_weights(self, progress: float) -> Sequence[float] | None:
        """Weights of the query losses after inner steps ``1..inner_steps``; ``None``: last only."""
        return None

    def first_order_at(self, progress: float) -> bool:
        """Whether the meta-gradient drops second-order terms at training ``progress``."""
        return self.first_order

    def meta_loss(self, meta: MetaState, task: TaskTensors, *, grad_fn: GradFn = autograd_grad,
                  progress: float = 1.0) -> Tensor:
        """Query loss after adapting (differentiable w.r.t. the trainable entries of ``meta``).

        ``progress`` in [0, 1] is the fraction of meta-training done (for annealed schedules).
        With :meth:`step_weights` the loss is the weighted sum of the query losses after every
        inner step (MAML++'s multi-step loss).
        """
        first_order = self.first_order_at(progress)
        weights = self.step_weights(progress)
        state = self.start(meta, task)
        n = self.inner_steps
        total = None
        for k in range(n):
            state = self._differentiable_step(meta, state, task, grad_fn, first_order)
            if weights is not None and k < n - 1 and weights[k] != 0:
                term = weights[k] * self.query_loss(meta, state, task)
                total = term if total is None else total + term
        last = self.query_loss(meta, state, task)
        if weights is not None and n > 0:
            last = weights[n - 1] * last
        return last if total is None else total + last

    def _differentiable_step(self, meta: MetaState, state: Adapted, task: TaskTensors, grad_fn: GradFn,
                             first_order: bool | None = None) -> Adapted:
        # The fast weights stay connected to meta even in first order: only the inner gradients
        # are constants.
        if first_order is None:
            first_order = self.first_order
        loss_fn, params = self.inner_objective(meta, state, task)
        grads = grad_fn(loss_fn, params, not first_order)
        return Adapted(self._update(meta, state, params, grads, 1.0), state.extras, state.step + 1)

    def trainable(self, meta: MetaState) -> list[str]:
        """Names of the meta entries that meta-training updates."""
        return [k for k, v in meta.items() if v.requires_grad]

    def meta_gradient(self, meta: MetaState, tasks: Sequence[TaskTensors], *, progress: float = 1.0,
                      use_vmap: bool | None = None) -> tuple[float, dict[str, Tensor]]:
        """Mean meta-loss over ``tasks`` and its gradient w.r.t. the trainable entries.

        Batches the tasks with ``torch.func.vmap`` when :meth:`can_vmap` allows it (no
        batch-dependent normalisation: vmap's second-order gradients through BatchNorm are wrong,
        and tasks of one shape); otherwise loops with one ``torch.autograd.grad`` per task,
        releasing each task's graph before the next.
        """
        names = self.trainable(meta)
        inputs = [meta[n] for n in names]
        if not tasks:
            raise ValueError("meta_gradient needs at least one task")
        if use_vmap is None:
            use_vmap = self.can_vmap(tasks)
        with torch.enable_grad():
            if use_vmap:
                loss = self._vmapped_loss(meta, tasks, progress)
                total = loss.detach()
                grads = _grad(loss, inputs)
            else:
                grads, total, scale = None, None, 1.0 / len(tasks)
                for task in tasks:
                    loss = self.meta_loss(meta, task, progress=progress) * scale
                    g = _grad(loss, inputs)
                    grads = g if grads is None else [a + b for a, b in zip(grads, g)]
                    total = loss.detach() if total is None else total + loss.detach()
        return float(total), dict(zip(names, grads))

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


_INNER_LOOP_METHODS = ("forward", "start", "inner_objective", "inner_loss", "step", "predict", "support_loss")


def plain_inner_loop(algorithm: "Algorithm") -> bool:
    """Whether ``algorithm`` descends the plain support loss of every ``params.*`` entry from
    ``params_of(meta)``: none of the methods that define the inner loop is overridden (MAML,
    FOMAML, Meta-SGD and MAML++ differ only in step sizes). Then the gradient of
    ``support_loss(meta, start(meta, task), task)`` with respect to the ``params.*`` entries is
    the first inner step's gradient, and a caller that computed it may pass it to :meth:`Algorithm.step` (``at``).

    Examples
    --------
    >>> from agent.algorithms import build
    >>> from agent.nn.mlp import MLPFeatures
    >>> from agent.nn.model import MetaModel
    >>> model = MetaModel(MLPFeatures(1, (8,)), 8, 1)
    >>> [plain_inner_loop(build(n, model)) for n in ("maml", "metasgd", "mamlpp", "anil", "imaml", "protonet")]
    [True, True, True, False, False, False]
    """
    cls = type(algorithm)
    return algorithm.iterative and all(getattr(cls, m) is getattr(Algorithm, m) for m in _INNER_LOOP_METHODS)


def _detached(d: Mapping) -> dict:
    """``d`` with its tensors detached (a no-op for those without grad)."""
    return {k: v.detach() if isinstance(v, Tensor) and v.requires_grad else v for k, v in d.items()}


def _grad(loss: Tensor, inputs: list[Tensor]) -> list[Tensor]:
    """``d loss / d inputs`` with zeros for inputs that the loss does not reach."""
    if not inputs:
        return []
    if not loss.requires_grad:
        return [torch.zeros_like(t) for t in inputs]
    return list(torch.autograd.grad(loss, inputs, materialize_grads=True))
