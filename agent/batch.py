"""Guarded adaptation of several tasks at once: lockstep inner steps under ``torch.func.vmap``.

:func:`guarded_adapt_batch` gives every task exactly what :func:`agent.compute.guarded_adapt`
would give it alone (the same accepted, rejected and backtracked steps, the same early stop, the
same best state and :class:`~agent.compute.AdaptTrace`), but runs the tasks of one shape in
lockstep: each *tick* every task still adapting tries one inner step, and the tries of all the
tasks that share a step size and an inner-step index are one vmapped call of the algorithm's own
``step`` and ``support_loss``. What differs per task (its step-size scale, current and best
loss, plateau counter, backtrack attempt, ``max_steps``) lives in plain per-task numbers; the
candidate, current and best parameters in stacked tensors, one row per task.

The guard's decisions are the loop's: a task whose try is accepted moves on; a rejected try
halves that task's scale and the task retries at the next tick (its scale then differs from the
others', so it joins another vmapped call for that tick); a task that stops (plateau, zero loss,
no descending retry, ``max_steps`` reached) leaves the batch. Per-task results equal the loop's
up to float32 rounding (a batched matrix product may sum in another order), so a decision that
sits on a tie at rounding level could differ; step counts are otherwise identical.

The agent's features pass (:func:`start_batch`, :func:`start_one`) differentiates the support
loss at the meta-parameters anyway; with ``keep_start`` it keeps that gradient and loss, and
``guarded_adapt_batch(..., starts=...)`` (or ``guarded_adapt(..., start=...)``) takes the first
step from them instead of running the model again: the same result, bit for bit.

What is not batched falls back to the per-task loop (the same results by construction):
closed-form algorithms (``iterative`` false), models whose ``vmappable`` is false (batch
normalisation: statistics across the batch would mix tasks), held-out step selection
(``holdout``), and tasks whose shapes, kind or ways match no other task of the call.

Examples
--------
>>> import torch
>>> from agent.algorithms.maml import MAML
>>> from agent.algorithms.base import TaskTensors
>>> from agent.compute import guarded_adapt
>>> from agent.nn.mlp import MLPFeatures
>>> from agent.nn.model import MetaModel
>>> maml = MAML(MetaModel(MLPFeatures(1, (16,)), 16, 1, vmappable=True), inner_lr=0.5)
>>> meta = maml.init_meta(torch.Generator().manual_seed(0))
>>> g = torch.Generator().manual_seed(1)
>>> tasks = []
>>> for a in (0.5, 2.0, 4.0):
...     x = 10 * torch.rand(8, 1, generator=g) - 5
...     tasks.append(TaskTensors(x, a * torch.sin(x), x, a * torch.sin(x), "regression"))
>>> batched = guarded_adapt_batch(maml, meta, tasks, 6)
>>> looped = [guarded_adapt(maml, meta, t, 6) for t in tasks]
>>> [tr.steps for _, tr in batched] == [tr.steps for _, tr in looped]
True
>>> [tr.backtracks for _, tr in batched] == [tr.backtracks for _, tr in looped]
True
>>> all(abs(a.best_loss - b.best_loss) <= 1e-4 * (1 + b.best_loss) for (_, a), (_, b) in zip(batched, looped))
True
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from agent.algorithms.base import Adapted, Algorithm, MetaState, TaskTensors, func_grad, plain_inner_loop
from agent.compute import AdaptTrace, _finite, guarded_adapt
from agent.nn.model import embed, subdict

__all__ = ["guarded_adapt_batch", "predict_batch", "embed_batch", "start_batch", "start_one", "start_loss_batch",
           "batchable", "shape_key"]


def shape_key(task: TaskTensors) -> tuple:
    """What tasks must share to be adapted in one vmapped call: shapes, dtypes, kind and ways."""
    return (tuple(task.support_x.shape), task.support_x.dtype, tuple(task.support_y.shape), task.support_y.dtype,
            task.kind, task.n_way)


def batchable(algorithm: Algorithm) -> bool:
    """True when :func:`guarded_adapt_batch` can vmap ``algorithm`` (else it loops)."""
    return bool(algorithm.iterative and getattr(algorithm.model, "vmappable", False))


def guarded_adapt_batch(algorithm: Algorithm, meta: MetaState | Sequence[MetaState], tasks: Sequence[TaskTensors],
                        max_steps: int | Sequence[int], *, patience: int = 2, min_rel_improvement: float = 1e-3,
                        backtrack: bool = True, max_backtracks: int = 4, min_steps: int = 1,
                        holdout: float | str | None = None, generator: torch.Generator | None = None,
                        starts: Sequence[tuple[dict, Tensor] | None] | None = None) -> list[tuple[Adapted, AdaptTrace]]:
    """:func:`~agent.compute.guarded_adapt` for each task, with tasks of one shape in lockstep.

    Parameters
    ----------
    algorithm, meta
        As for :func:`~agent.compute.guarded_adapt`: one meta state for every task, or a sequence
        of one per task (e.g. memory warm starts, :func:`agent.compute.overlay` of one meta
        state; the entries that are not the same tensor object in every task's meta are stacked
        and vmapped with the task).
    tasks
        The tasks, in any mix of shapes; tasks of equal :func:`shape_key` are batched together.
    max_steps
        One limit for all tasks, or one per task.
    patience, min_rel_improvement, backtrack, max_backtracks, min_steps, holdout, generator
        As for :func:`~agent.compute.guarded_adapt`. With ``holdout`` every task is adapted by
        :func:`~agent.compute.guarded_adapt` in order (the generator is drawn as by that loop).
    starts
        One per task: the ``start`` of :func:`start_batch` (``keep_start``) for the same tasks,
        meta state and algorithm, so that the steps from the start state reuse its gradients
        and losses (the same result); ``None`` entries or per-task meta states: computed here.

    Returns
    -------
    list of (Adapted, AdaptTrace)
        One per task, in order.
    """
    tasks = list(tasks)
    n = len(tasks)
    if isinstance(max_steps, (int,)) and not isinstance(max_steps, bool):
        limits = [int(max_steps)] * n
    else:
        limits = [int(m) for m in max_steps]
        if len(limits) != n:
            raise ValueError(f"max_steps has {len(limits)} entries for {n} tasks")
    for m in limits:
        if m < 0:
            raise ValueError(f"max_steps must be >= 0, got {m}")
    metas = _metas(meta, n)
    starts = list(starts) if starts is not None else [None] * n
    if len(starts) != n:
        raise ValueError(f"starts has {len(starts)} entries for {n} tasks")
    guard = dict(patience=patience, min_rel_improvement=min_rel_improvement, backtrack=backtrack,
                 max_backtracks=max_backtracks, min_steps=min_steps)
    if holdout is not None or not batchable(algorithm):
        return [guarded_adapt(algorithm, mt, t, m, holdout=holdout, generator=generator, start=st, **guard)
                for mt, t, m, st in zip(metas, tasks, limits, starts)]
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tasks):
        groups.setdefault(shape_key(t), []).append(i)
    out: list[Any] = [None] * n
    for idx in groups.values():
        if len(idx) == 1:
            out[idx[0]] = guarded_adapt(algorithm, metas[idx[0]], tasks[idx[0]], limits[idx[0]], start=starts[idx[0]],
                                        **guard)
            continue
        for i, res in zip(idx, _guard_batch(algorithm, [metas[i] for i in idx], [tasks[i] for i in idx],
                                            [limits[i] for i in idx], starts=[starts[i] for i in idx], **guard)):
            out[i] = res
    return out


def _metas(meta: MetaState | Sequence[MetaState], n: int) -> list[MetaState]:
    """One meta state per task (the same object ``n`` times for a shared one)."""
    if isinstance(meta, dict):
        return [meta] * n
    metas = list(meta)
    if len(metas) != n:
        raise ValueError(f"meta has {len(metas)} entries for {n} tasks")
    return metas


def _split_metas(metas: list[MetaState]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(shared, stacked)``: the entries that are one object in every meta state, and the
    others stacked (one row per task, detached) for vmap."""
    first = metas[0]
    for m in metas[1:]:
        if m.keys() != first.keys():
            raise ValueError("per-task meta states must have the same entries")
    varying = [k for k in first if any(m[k] is not first[k] for m in metas[1:])]
    shared = {k: v for k, v in first.items() if k not in varying}
    stacked = {k: torch.stack([m[k].detach() for m in metas]) for k in varying}
    return shared, stacked


def start_loss_batch(algorithm: Algorithm, meta: MetaState | Sequence[MetaState],
                     tasks: Sequence[TaskTensors]) -> list[float]:
    """``float(algorithm.support_loss(meta, algorithm.start(meta, task), task))`` per task (no
    gradient), vmapped over tasks of one :func:`shape_key`; ``meta`` shared or one per task.

    This screens memory warm starts: the support loss of every candidate state of every task of
    a micro-batch, in one call.

    Examples
    --------
    >>> import torch
    >>> from agent.algorithms.maml import MAML
    >>> from agent.algorithms.base import TaskTensors
    >>> from agent.compute import overlay
    >>> from agent.nn.mlp import MLPFeatures
    >>> from agent.nn.model import MetaModel
    >>> maml = MAML(MetaModel(MLPFeatures(1, (8,)), 8, 1, vmappable=True), inner_lr=0.5)
    >>> meta = maml.init_meta(torch.Generator().manual_seed(0))
    >>> x = torch.linspace(-3, 3, 6).reshape(6, 1)
    >>> t = TaskTensors(x, torch.sin(x), x, None, "regression")
    >>> metas = [meta, overlay(meta, {"head.bias": [1.0]})]
    >>> got = start_loss_batch(maml, metas, [t, t])
    >>> with torch.no_grad():
    ...     want = [float(maml.support_loss(m, maml.start(m, t), t)) for m in metas]
    >>> all(abs(a - b) <= 1e-5 * (1 + b) for a, b in zip(got, want))
    True
    """
    tasks = list(tasks)
    metas = _metas(meta, len(tasks))
    out: list[Any] = [None] * len(tasks)
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tasks):
        groups.setdefault(shape_key(t) if batchable(algorithm) else (i,), []).append(i)
    with torch.no_grad():
        for idx in groups.values():
            if len(idx) == 1:
                i = idx[0]
                out[i] = float(algorithm.support_loss(metas[i], algorithm.start(metas[i], tasks[i]), tasks[i]))
                continue
            kind, n_way = tasks[idx[0]].kind, tasks[idx[0]].n_way
            shared, stacked = _split_metas([metas[i] for i in idx])
            order = list(metas[idx[0]])
            sx = torch.stack([tasks[i].support_x for i in idx])
            sy = torch.stack([tasks[i].support_y for i in idx])

            def fn(mv, x, y):
                m = {k: mv[k] if k in mv else shared[k] for k in order}
                t = TaskTensors(x, y, x, None, kind, n_way)
                return algorithm.support_loss(m, algorithm.start(m, t), t)

            for i, v in zip(idx, torch.func.vmap(fn)(stacked, sx, sy).tolist()):
                out[i] = v
    return out


def _rows(d: dict[str, Tensor], rows: Tensor | None) -> dict[str, Tensor]:
    return d if rows is None else {k: v.index_select(0, rows) for k, v in d.items()}


def _guard_batch(algorithm: Algorithm, metas: list[MetaState], tasks: list[TaskTensors], limits: list[int], *,
                 patience: int, min_rel_improvement: float, backtrack: bool, max_backtracks: int,
                 min_steps: int, starts: Sequence[tuple[dict, Tensor] | None] | None = None
                 ) -> list[tuple[Adapted, AdaptTrace]]:
    """The loop of ``agent.compute._guard``, unrolled into ticks over tasks of one shape.

    For a :func:`~agent.algorithms.base.plain_inner_loop` algorithm and one meta state shared by
    every task, every task starts from the same parameters: the steps from the start state take
    them unbatched (``in_dims=None``), the way :func:`start_batch` differentiates the same loss,
    so its gradients and losses (``starts``, one ``(gradient, loss)`` per task) are exactly these
    steps' own and are used instead of computing them again.
    """
    n = len(tasks)
    kind, n_way = tasks[0].kind, tasks[0].n_way
    sx = torch.stack([t.support_x for t in tasks])
    sy = torch.stack([t.support_y for t in tasks])
    shared, mvs = _split_metas(metas)  # mvs: the per-task entries (empty for one shared meta)
    order = list(metas[0])
    start_step = [0]
    # One shared start state: params_of(meta) for every task, no extras.
    p0 = algorithm.params_of(shared) if not mvs and plain_inner_loop(algorithm) else None
    if p0 is None or starts is None or any(st is None for st in starts):
        starts = None

    def merged(mv: dict) -> MetaState:
        return {k: mv[k] if k in mv else shared[k] for k in order} if mv else shared

    def as_task(x: Tensor, y: Tensor) -> TaskTensors:
        return TaskTensors(x, y, x, None, kind, n_way)

    def start_fn(mv, x, y):
        meta = merged(mv)
        t = as_task(x, y)
        s = algorithm.start(meta, t)
        start_step[0] = s.step
        return s.params, s.extras, algorithm.support_loss(meta, s, t)

    def step_fn(scale: float, k: int, from_start: bool = False, reuse: bool = False):
        # ``from_start``: from the shared start state (p0 and no extras, unbatched); with
        # ``reuse``, the step takes the starts' gradient and loss (``at``).
        def fn(mv, p, e, x, y, g=None, v=None):
            meta = merged(mv)
            t = as_task(x, y)
            at = {"at": (g, v)} if reuse else {}
            c = algorithm.step(meta, Adapted(p, e, k), t, lr_scale=scale, grad_fn=func_grad, **at)
            prev = c.prev_loss if c.prev_loss is not None else torch.full((), math.nan)
            return c.params, c.extras, algorithm.support_loss(meta, c, t), prev
        return torch.func.vmap(fn, in_dims=((0, None, None, 0, 0) if from_start else (0,) * 5) + ((0, 0) if reuse else ()))

    with torch.no_grad():
        if starts is not None:
            g0 = {k: torch.stack([st[0][k] for st in starts]) for k in p0}
            l0 = torch.stack([st[1].reshape(()) for st in starts])
            params, extras, loss0 = {k: v.unsqueeze(0).expand(n, *v.shape) for k, v in p0.items()}, {}, l0
        else:
            params, extras, loss0 = torch.func.vmap(start_fn)(mvs, sx, sy)
        # Expanded views of meta (the start state) become real rows that can be overwritten.
        cur_p = {k: v.detach().clone() for k, v in params.items()}
        cur_e = {k: v.detach().clone() for k, v in extras.items()}
        best_p = {k: v.clone() for k, v in cur_p.items()}
        best_e = {k: v.clone() for k, v in cur_e.items()}
        best_prev = torch.full((n,), math.nan, dtype=loss0.dtype)
        k0 = start_step[0]

        traces = [AdaptTrace() for _ in range(n)]
        cur_loss = [_finite(v) for v in loss0.tolist()]
        for tr, v in zip(traces, cur_loss):
            tr.losses.append(v)
        first = [min(min_steps, m) for m in limits]
        best_loss = [cur_loss[i] if first[i] <= 0 else math.inf for i in range(n)]
        best_step: list[int | None] = [k0 if first[i] <= 0 else None for i in range(n)]  # None: not yet
        scale = [1.0] * n
        flat = [0] * n
        attempt = [0] * n
        step = [k0] * n
        tries = max_backtracks + 1 if backtrack else 1
        active = [m > 0 for m in limits]

        while any(active):
            buckets: dict[tuple[float, int], list[int]] = {}
            for i in range(n):
                if active[i]:
                    buckets.setdefault((scale[i], step[i]), []).append(i)
            for (s, k), idx in buckets.items():
                whole = len(idx) == n
                sel = None if whole else torch.tensor(idx)
                bx, by = (sx, sy) if whole else (sx.index_select(0, sel), sy.index_select(0, sel))
                if p0 is not None and k == k0:  # still at the shared start state
                    extra = (_rows(g0, sel), l0 if whole else l0.index_select(0, sel)) if starts is not None else ()
                    cp, ce, closs, cprev = step_fn(s, k, True, starts is not None)(mvs, p0, {}, bx, by, *extra)
                else:
                    cp, ce, closs, cprev = step_fn(s, k)(_rows(mvs, sel), _rows(cur_p, sel), _rows(cur_e, sel), bx, by)
                acc_rows, acc_tasks, best_rows, best_tasks = [], [], [], []
                for j, (i, raw) in enumerate(zip(idx, closs.tolist())):
                    tr = traces[i]
                    loss = _finite(raw)
                    tr.step_calls += 1
                    if loss == math.inf:
                        tr.diverged = True
                    elif k + 1 >= first[i] and loss < best_loss[i]:
                        best_loss[i], best_step[i] = loss, k + 1
                        best_rows.append(j)
                        best_tasks.append(i)
                    if loss <= cur_loss[i] or (not backtrack and loss < math.inf):
                        rel = (cur_loss[i] - loss) / max(abs(cur_loss[i]), 1e-12)
                        cur_loss[i] = loss
                        tr.losses.append(loss)
                        step[i] = k + 1
                        attempt[i] = 0
                        acc_rows.append(j)
                        acc_tasks.append(i)
                        flat[i] = flat[i] + 1 if rel < min_rel_improvement else 0
                        done = len(tr.losses) - 1
                        if loss == 0.0 or flat[i] >= patience:
                            tr.early_stopped = done < limits[i]
                            active[i] = False
                        elif done >= limits[i]:
                            active[i] = False
                        continue
                    if backtrack and attempt[i] < max_backtracks:
                        scale[i] *= 0.5
                        tr.backtracks += 1
                    attempt[i] += 1
                    if attempt[i] >= tries:  # no retry descended (or a non-finite step without backtracking)
                        tr.early_stopped = True
                        active[i] = False
                if acc_rows:
                    _put(cur_p, acc_tasks, cp, acc_rows, n)
                    _put(cur_e, acc_tasks, ce, acc_rows, n)
                if best_rows:
                    _put(best_p, best_tasks, cp, best_rows, n)
                    _put(best_e, best_tasks, ce, best_rows, n)
                    best_prev.index_copy_(0, torch.tensor(best_tasks), cprev.index_select(0, torch.tensor(best_rows)))

    out = []
    for i, tr in enumerate(traces):
        tr.steps = len(tr.losses) - 1
        tr.lr_scale = scale[i]
        if best_step[i] is None or best_step[i] == k0:
            # The start state (no finite candidate, or min_steps 0 and no candidate beat it; a
            # candidate always has a larger step index), built by the algorithm as the loop has it.
            state = algorithm.start(metas[i], tasks[i])
            tr.best_loss = tr.losses[0]
        else:
            prev = best_prev[i]
            state = Adapted({k: v[i] for k, v in best_p.items()}, {k: v[i] for k, v in best_e.items()},
                            best_step[i], None if math.isnan(float(prev)) else prev)
            tr.best_loss = best_loss[i]
        tr.best_step = state.step
        out.append((state, tr))
    return out


def _put(dst: dict[str, Tensor], tasks: list[int], src: dict[str, Tensor], rows: list[int], n: int) -> None:
    """``dst[k][tasks] = src[k][rows]`` for every entry (``rows`` ascending, as ``tasks``)."""
    if len(tasks) == n:  # every task, in order: a copy of the whole result (never an alias)
        for k in dst:
            dst[k] = src[k].clone()
        return
    t = torch.tensor(tasks)
    whole = next((len(rows) == v.shape[0] for v in src.values()), True)
    r = None if whole else torch.tensor(rows)
    for k in dst:
        dst[k].index_copy_(0, t, src[k] if r is None else src[k].index_select(0, r))


def predict_batch(algorithm: Algorithm, meta: MetaState, states: Sequence[Adapted], xs: Sequence[Tensor]) -> list[Tensor]:
    """``algorithm.predict(meta, state, x)`` for each pair, vmapped over pairs that share shapes.

    Pairs batch together when their inputs, parameters and extras have the same shapes and their
    states the same inner-step index (the model may depend on it); the rest are predicted one by
    one. Runs without a graph.

    Examples
    --------
    >>> import torch
    >>> from agent.algorithms.maml import MAML
    >>> from agent.nn.mlp import MLPFeatures
    >>> from agent.nn.model import MetaModel
    >>> maml = MAML(MetaModel(MLPFeatures(1, (8,)), 8, 1, vmappable=True))
    >>> meta = maml.init_meta(torch.Generator().manual_seed(0))
    >>> s = maml.start(meta, None)
    >>> x = [torch.randn(4, 1), torch.randn(4, 1)]
    >>> outs = predict_batch(maml, meta, [s, s], x)
    >>> all(torch.allclose(o, maml.predict(meta, s, xi)) for o, xi in zip(outs, x))
    True
    """
    return _map_states(algorithm, meta, states, xs, lambda a, m, s, x: a.predict(m, s, x))


def embed_batch(algorithm: Algorithm, meta: MetaState, states: Sequence[Adapted], xs: Sequence[Tensor]) -> list[Tensor]:
    """``algorithm.embed(meta, state.params, x, state.step)`` for each pair, batched as :func:`predict_batch`."""
    return _map_states(algorithm, meta, states, xs, lambda a, m, s, x: a.embed(m, s.params, x, s.step))


def _map_states(algorithm, meta, states, xs, fn) -> list[Tensor]:
    states, xs = list(states), list(xs)
    out: list[Any] = [None] * len(states)
    with torch.no_grad():
        groups: dict[tuple, list[int]] = {}
        if getattr(algorithm.model, "vmappable", False):
            for i, (s, x) in enumerate(zip(states, xs)):
                key = (s.step, tuple(x.shape), x.dtype, tuple((k, tuple(v.shape)) for k, v in s.params.items()),
                       tuple((k, tuple(v.shape)) for k, v in s.extras.items()))
                groups.setdefault(key, []).append(i)
        else:
            groups = {(i,): [i] for i in range(len(states))}
        for idx in groups.values():
            if len(idx) == 1:
                i = idx[0]
                out[i] = fn(algorithm, meta, states[i], xs[i])
                continue
            k = states[idx[0]].step
            p = {name: torch.stack([states[i].params[name] for i in idx]) for name in states[idx[0]].params}
            e = {name: torch.stack([states[i].extras[name] for i in idx]) for name in states[idx[0]].extras}
            x = torch.stack([xs[i] for i in idx])
            res = torch.func.vmap(lambda p_, e_, x_: fn(algorithm, meta, Adapted(p_, e_, k), x_))(p, e, x)
            for j, i in enumerate(idx):
                out[i] = res[j]
    return out


def start_batch(algorithm: Algorithm, meta: MetaState, tasks: Sequence[TaskTensors], *,
                grad: bool = True, keep_start: bool = False) -> list[tuple]:
    """Per task, at the meta-parameters: the backbone's support features, the support loss and its gradient norm.

    The same numbers as :func:`agent.memory.task_embedding`'s and
    :func:`agent.online.features.pre_features`' forward pass (``embed`` of the support inputs
    under ``params.*``/``buffers.*``) and :func:`agent.online.features._init_loss_and_grad` (the
    support loss of ``algorithm.start`` and the L2 norm of its gradient with respect to every
    floating ``params.*`` entry), up to float rounding, for tasks of one :func:`shape_key`, in one
    vmapped call when :func:`batchable`; a task alone (or any task of an algorithm that cannot be
    batched) by plain autograd, exactly as those functions compute it. Without ``grad`` the norm
    is NaN and no backward runs. With ``keep_start`` each entry has a fourth element, the
    ``start`` that :func:`guarded_adapt_batch` (and, for a task alone,
    :func:`~agent.compute.guarded_adapt`) takes: ``(gradient, loss)``, or ``None`` where
    :func:`start_one` would give none.

    Examples
    --------
    >>> import torch
    >>> from agent.algorithms.maml import MAML
    >>> from agent.online.features import _init_loss_and_grad
    >>> from agent.nn.mlp import MLPFeatures
    >>> from agent.nn.model import MetaModel
    >>> maml = MAML(MetaModel(MLPFeatures(1, (8,)), 8, 1, vmappable=True))
    >>> meta = maml.init_meta(torch.Generator().manual_seed(0))
    >>> x = torch.linspace(-1, 1, 5).unsqueeze(1)
    >>> tasks = [TaskTensors(x, a * x, x, None, "regression") for a in (1.0, 2.0)]
    >>> (f, loss, gnorm), _ = start_batch(maml, meta, tasks)
    >>> want = _init_loss_and_grad(maml, meta, tasks[0])
    >>> abs(loss - want[0]) < 1e-6 and abs(gnorm - want[1]) < 1e-5, tuple(f.shape)
    (True, (5, 8))
    """
    tasks = list(tasks)
    out: list[Any] = [None] * len(tasks)
    names = [k for k, v in meta.items() if k.startswith("params.") and v.is_floating_point()]
    shared = {k: meta[k].detach() for k in names}
    rest = {k: v.detach() for k, v in meta.items() if k not in shared}
    model = algorithm.model
    # the gradient is the first inner step's (start_one's conditions)
    reuse = keep_start and grad and plain_inner_loop(algorithm) and not any(k.startswith("params.") for k in rest)
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tasks):
        groups.setdefault(shape_key(t), []).append(i)
    for idx in groups.values():
        kind, n_way = tasks[idx[0]].kind, tasks[idx[0]].n_way

        def loss_fn(p, x, y):
            m = {**rest, **p}
            t = TaskTensors(x, y, x, None, kind, n_way)
            return algorithm.support_loss(m, algorithm.start(m, t), t)

        def one(p, x, y):
            g = {}
            if grad:
                g, loss = torch.func.grad_and_value(loss_fn)(p, x, y)
                sq = sum((v.double() ** 2).sum() for v in g.values()) if g else torch.zeros((), dtype=torch.float64)
            else:
                loss, sq = loss_fn(p, x, y), torch.full((), math.nan, dtype=torch.float64)
            m = {**rest, **p}
            f = embed(model, subdict(m, "params.") or dict(m), subdict(m, "buffers."), x)
            return f, loss, sq, (g if reuse else {})

        if len(idx) == 1 or not batchable(algorithm):
            for i in idx:
                r = _start_one(algorithm, shared, rest, tasks[i], grad)
                out[i] = (*r[:3], r[3] if reuse else None) if keep_start else r[:3]
            continue
        sx = torch.stack([tasks[i].support_x for i in idx])
        sy = torch.stack([tasks[i].support_y for i in idx])
        with torch.no_grad():
            f, loss, sq, g = torch.func.vmap(one, in_dims=(None, 0, 0))(shared, sx, sy)
        for j, (i, lv, sv) in enumerate(zip(idx, loss.tolist(), sq.tolist())):
            out[i] = (f[j], lv, math.sqrt(sv) if sv == sv else math.nan)
            if keep_start:
                out[i] += (({k[len("params."):]: v[j] for k, v in g.items()}, loss[j]) if reuse and g else None,)
    return out


def start_one(algorithm: Algorithm, meta: MetaState, task: TaskTensors, *,
              grad: bool = True) -> tuple[Tensor, float, float, tuple[dict, Tensor] | None]:
    """:func:`start_batch` for one task, plus what the guard's first step can reuse.

    Returns ``(support features, initial loss, gradient norm, start)``: the first three as
    :func:`start_batch` gives them, and ``start`` the ``(gradient, loss)`` that
    :func:`~agent.compute.guarded_adapt` takes as ``start`` (gradient keyed like
    ``algorithm.params_of(meta)``, zeros where the loss does not reach), or ``None`` without
    ``grad``, for an algorithm that is not a :func:`~agent.algorithms.base.plain_inner_loop`
    (its first step descends another objective), or when some ``params.*`` entry is not floating.

    Examples
    --------
    >>> import torch
    >>> from agent.algorithms.maml import MAML
    >>> from agent.compute import guarded_adapt
    >>> from agent.nn.mlp import MLPFeatures
    >>> from agent.nn.model import MetaModel
    >>> maml = MAML(MetaModel(MLPFeatures(1, (8,)), 8, 1), inner_lr=0.3)
    >>> meta = maml.init_meta(torch.Generator().manual_seed(0))
    >>> x = torch.linspace(-1, 1, 5).unsqueeze(1)
    >>> task = TaskTensors(x, 2 * x, x, None, "regression")
    >>> f, loss, gnorm, start = start_one(maml, meta, task)
    >>> _, plain = guarded_adapt(maml, meta, task, 5)
    >>> _, reused = guarded_adapt(maml, meta, task, 5, start=start)
    >>> reused.losses == plain.losses and reused.losses[0] == loss
    True
    """
    return start_batch(algorithm, meta, [task], grad=grad, keep_start=True)[0]


def _start_one(algorithm: Algorithm, shared: dict, rest: dict, task: TaskTensors,
               grad: bool) -> tuple[Tensor, float, float, tuple[dict, Tensor] | None]:
    """:func:`start_one`, the computation of ``_init_loss_and_grad`` (``start``: the gradient of
    every ``shared`` entry, unchecked).

    The support features are those the loss's forward pass computed (caught by a forward hook on
    the backbone) when that pass ran the backbone exactly once, on the support inputs; otherwise
    (an algorithm that calls it differently) one more forward pass computes them.
    """
    seen: list = []
    backbone = getattr(algorithm.model, "features", None)
    hook = backbone.register_forward_hook(lambda _m, args, out: seen.append((args[0] if args else None, out))) \
        if isinstance(backbone, torch.nn.Module) else None
    try:
        with torch.enable_grad() if grad else torch.no_grad():
            p = {k: v.detach().requires_grad_(grad) for k, v in shared.items()}
            m = {**rest, **p}
            loss = algorithm.support_loss(m, algorithm.start(m, task), task)
    finally:
        if hook is not None:
            hook.remove()
    start = None
    with torch.enable_grad() if grad else torch.no_grad():
        gnorm = math.nan
        if grad:
            inputs = list(p.values())
            if inputs and loss.requires_grad:
                got = torch.autograd.grad(loss, inputs, materialize_grads=True)
                flat = torch.cat([g.reshape(-1) for g in got]).double()
                gnorm = math.sqrt(float(flat.dot(flat)))  # one float64 sum of squares (few ops: dispatch dominates here)
                start = ({k[len("params."):]: g for k, g in zip(p, got)}, loss.detach())
            else:
                gnorm = 0.0
    with torch.no_grad():
        params = subdict(m, "params.")
        if len(seen) == 1 and seen[0][0] is task.support_x and isinstance(seen[0][1], Tensor):
            f = seen[0][1].detach().clone()  # the same forward pass embed would run
        elif params:  # the algorithm's own functional call: the same forward, less dispatch than torch.func's
            f = algorithm.embed(m, params, task.support_x)
        else:
            f = embed(algorithm.model, dict(m), subdict(m, "buffers."), task.support_x)
    return f, float(loss.detach()), gnorm, start
