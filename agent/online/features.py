"""Cheap task features for the failure predictor and the selector.

:func:`pre_features` is computed before adaptation, from the support set only: task shape
(ways, shots, input dimension, support size), class balance (normalised label entropy), input
spread, the geometry of the support set in the meta model's embedding space (prototype margin,
Fisher ratio, spread; via :func:`agent.nn.model.embed` on the meta parameters), a leave-one-out
score of the support set in that embedding (``init_loo_score``: nearest-prototype accuracy, or
``1 / (1 + init_loo_nmse)`` with the closed-form ridge LOO error over the target variance; a
direct estimate of how well a head fitted on these features generalises), the nearest
episodic-memory entries and their outcomes, and the support loss and gradient norm at the
initialisation. :func:`probe_features` is computed after a short probe (1-2 inner steps): loss
drop, and a leave-one-out score of the support set (nearest-prototype accuracy for
classification; for regression the closed-form ridge leave-one-out error on the embedding,
relative to the target variance).

The task's family label is never read (nor any field but the tensors). Every value is a finite
float: a NaN or infinity is replaced by a sentinel (0) and counted in ``nonfinite`` (a flag
feature; ``nonfinite > 0`` usually means a divergent initialisation). Keys are the same for every
task of a kind, so River models see a stable feature set.

Examples
--------
>>> import torch
>>> from agent.algorithms import build
>>> from agent.algorithms.base import TaskTensors
>>> from agent.nn.mlp import MLPFeatures
>>> from agent.nn.model import MetaModel
>>> alg = build("maml", MetaModel(MLPFeatures(2, (16,)), 16, 3), inner_lr=0.1)
>>> meta = alg.init_meta(torch.Generator().manual_seed(0))
>>> g = torch.Generator().manual_seed(1)
>>> y = torch.arange(3).repeat_interleave(5)
>>> x = torch.randn(15, 2, generator=g) + 3 * torch.nn.functional.one_hot(y, 3)[:, :2].float()
>>> task = TaskTensors(x, y, x, None)
>>> f = pre_features(alg, meta, task)
>>> f["ways"], f["shots"], f["support_size"], round(f["class_balance"], 6), f["nonfinite"]
(3.0, 5.0, 15.0, 1.0, 0.0)
>>> p = probe_features(alg, meta, task, steps=2)
>>> 0.0 <= p["loo_score"] <= 1.0 and p["loss_drop"] > 0
True
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from agent.algorithms.base import CLASSIFICATION, Adapted, TaskTensors
from agent.memory import mean_np, var_np
from agent.nn.model import embed, subdict

__all__ = ["pre_features", "probe_features", "memory_features", "finite", "support_stats_many", "loo_nmse_many",
           "PRE_KEYS", "PROBE_KEYS"]

_EPS = 1e-12
_CLIP = 1e6

PRE_KEYS = ("is_classification", "ways", "shots", "log_shots", "dims", "support_size", "class_balance",
            "input_spread", "emb_spread", "emb_norm", "proto_margin", "fisher_ratio", "log_fisher_ratio",
            "target_std", "ridge_r2", "init_loo_score", "init_loo_nmse",
            "init_loss", "log_init_loss", "init_grad_norm", "log_init_grad_norm",
            "mem_size", "mem_sim_max", "mem_sim_mean", "mem_known", "mem_quality_mean", "mem_fail_rate",
            "mem_missing", "nonfinite")
PROBE_KEYS = ("probe_steps", "probe_loss", "loss_drop", "loss_drop_ratio", "loo_score", "loo_nmse",
              "probe_nonfinite")


def finite(features: Mapping[str, Any], flag: str = "nonfinite", sentinel: float = 0.0) -> dict[str, float]:
    """Floats with NaN/inf replaced by ``sentinel`` and clipped to +-1e6; ``flag`` counts replacements.

    Examples
    --------
    >>> finite({"a": float("nan"), "b": 2})
    {'a': 0.0, 'b': 2.0, 'nonfinite': 1.0}
    """
    out: dict[str, float] = {}
    bad = 0
    for k, v in features.items():
        v = float(v)
        if not math.isfinite(v):
            bad += 1
            v = sentinel
        out[k] = min(_CLIP, max(-_CLIP, v))
    out[flag] = float(out.get(flag, 0.0) + bad)
    return out


def _meta_parts(algorithm, meta: Mapping[str, Tensor]) -> tuple[Any, dict, dict]:
    model = getattr(algorithm, "model", algorithm)
    params = subdict(meta, "params.") or dict(meta)
    return model, params, subdict(meta, "buffers.")


def _embedding(algorithm, meta, x: Tensor, params: Mapping[str, Tensor] | None = None, step: int = 0) -> Tensor:
    model, p, buffers = _meta_parts(algorithm, meta)
    if params is not None:
        p = dict(params)
    f = embed(model, p, buffers, x, step)
    return f.reshape(f.shape[0], -1).double()


def _class_geometry(f: Tensor, y: Tensor, n_way: int) -> dict[str, float]:
    """Prototype margin, Fisher ratio and LOO nearest-prototype accuracy of embeddings ``f``."""
    y = y.long()
    counts = torch.bincount(y, minlength=n_way).double()
    present = (counts > 0).nonzero().flatten()
    sums = torch.zeros(n_way, f.shape[1], dtype=f.dtype).index_add_(0, y, f)
    protos = sums / counts.clamp_min(1)[:, None]
    d = torch.cdist(f, protos[present]).pow(2)  # (n, classes present)
    pos = torch.searchsorted(present, y)
    own = d.gather(1, pos[:, None]).squeeze(1)
    other = d.clone()
    other.scatter_(1, pos[:, None], math.inf)
    nearest_other = other.min(1).values if present.numel() > 1 else torch.full_like(own, math.nan)
    margin = ((nearest_other - own) / (nearest_other + own + _EPS)).mean()
    within = own.mean()
    centre = f.mean(0)
    between = (counts[present, None] * (protos[present] - centre).pow(2)).sum() / counts.sum()
    fisher = between / (within + _EPS)
    # leave-one-out: the held-out point's own prototype excludes it (classes of size 1 lose it)
    n_own = counts[y]
    loo_own_proto = (sums[y] - f) / (n_own - 1).clamp_min(1)[:, None]
    d_own_loo = (f - loo_own_proto).pow(2).sum(1)
    d_own_loo = torch.where(n_own > 1, d_own_loo, torch.full_like(d_own_loo, math.inf))
    loo_acc = (d_own_loo < other.min(1).values).double().mean() if present.numel() > 1 else torch.tensor(1.0)
    return {"proto_margin": float(margin), "fisher_ratio": float(fisher),
            "log_fisher_ratio": math.log1p(max(float(fisher), 0.0)), "loo_acc": float(loo_acc)}


def _ridge(f: Tensor, y: Tensor, ridge: float = 1e-2) -> dict[str, float]:
    """Train R^2 and leave-one-out normalised MSE of a ridge regression of ``y`` on ``f`` (hat matrix).

    In float64 numpy: for few-shot sizes (n x n systems) each torch op would cost more in
    dispatch than in arithmetic.
    """
    n = f.shape[0]
    return _ridge_np(f.detach().double().numpy(), y.detach().reshape(n, -1).double().numpy(), ridge)


def _ridge_np(a: np.ndarray, y: np.ndarray, ridge: float = 1e-2) -> dict[str, float]:
    """:func:`_ridge` on float64 arrays ``a`` (n, d) and ``y`` (n, outputs): :func:`_ridge_batch`
    of one system."""
    fits = _ridge_batch(a[None], y[None], ridge)
    if fits is None:  # a singular or non-finite system: no fit
        return {"ridge_r2": math.nan, "loo_nmse": math.nan}
    return {"ridge_r2": float(fits[0][0]), "loo_nmse": float(fits[1][0])}


def _ridge_batch(a: np.ndarray, y: np.ndarray, ridge: float = 1e-2) -> tuple[np.ndarray, np.ndarray] | None:
    """Train R^2 and leave-one-out normalised MSE (hat matrix) of ridge regressions of stacked
    systems ``a`` (b, n, d) and ``y`` (b, n, outputs): the arrays ``(ridge_r2, loo_nmse)``, or
    ``None`` when one system is singular (then each is fitted alone)."""
    n = a.shape[1]
    # kernel form with an intercept column of ones: [a 1] [a 1]^T = a a^T + 1; n x n, cheap for few-shot sizes
    gram = a @ a.transpose(0, 2, 1) + 1.0
    lam = ridge * mean_np(gram.diagonal(axis1=1, axis2=2), 1) + 1e-9
    with np.errstate(all="ignore"):
        try:
            hat = gram @ np.linalg.inv(gram + lam[:, None, None] * np.eye(n))
        except np.linalg.LinAlgError:
            return None
        resid = y - hat @ y
        var = var_np(y, 1).sum(1) + _EPS
        sq = (resid * resid).sum(2)
        lev = np.maximum(1.0 - hat.diagonal(axis1=1, axis2=2), 1e-6)
        return 1.0 - mean_np(sq, 1) / var, mean_np(sq / (lev * lev), 1) / var


def _stackable(tasks, features) -> dict[tuple, list[int]]:
    """Regression tasks (more than one support example) with features, grouped by shapes."""
    groups: dict[tuple, list[int]] = {}
    for i, (t, f) in enumerate(zip(tasks, features)):
        if t.kind != CLASSIFICATION and f is not None and t.support_x.shape[0] > 1:
            groups.setdefault((tuple(t.support_x.shape), tuple(f.shape), tuple(t.support_y.shape)), []).append(i)
    return groups


def _stack(tensors, idx: list[int], n: int) -> np.ndarray:
    return np.stack([tensors[i].detach().reshape(n, -1).numpy() for i in idx]).astype(np.float64)


def support_stats_many(tasks, features) -> list[dict[str, float] | None]:
    """The support statistics :func:`pre_features` computes for a regression task, batched.

    For each regression task with more than one support example and its backbone ``features``
    (one per task, e.g. from :func:`agent.batch.start_batch`): ``input_spread``, ``emb_spread``,
    ``emb_norm``, ``target_std``, ``ridge_r2`` and ``loo_nmse``, the numbers of
    :func:`pre_features` to float64 rounding, computed once per group of tasks with the same shapes
    (stacked float64 arrays, one batched ridge solve); ``None`` for any other task. Pass an entry
    to :func:`pre_features` as ``stats``.

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(3, 8, 1, generator=g)
    >>> tasks = [TaskTensors(xi, torch.sin(xi), xi, None, "regression") for xi in x]
    >>> feats = [torch.cat([xi, xi ** 2, torch.cos(xi)], 1) for xi in x]
    >>> many = support_stats_many(tasks, feats)
    >>> one = pre_features(None, {}, tasks[1], features=feats[1], loss_and_grad=False)
    >>> abs(many[1]["ridge_r2"] - one["ridge_r2"]) < 1e-12 and abs(many[1]["emb_norm"] - one["emb_norm"]) < 1e-12
    True
    """
    tasks, features = list(tasks), list(features)
    out: list[dict[str, float] | None] = [None] * len(tasks)
    for idx in _stackable(tasks, features).values():
        n = tasks[idx[0]].support_x.shape[0]
        xs = _stack([t.support_x for t in tasks], idx, n)
        fs = _stack(features, idx, n)
        ys = _stack([t.support_y for t in tasks], idx, n)
        fits = _ridge_batch(fs, ys)
        if fits is None:
            continue
        input_spread = mean_np(np.sqrt(var_np(xs, 1)), 1)
        centred = fs - mean_np(fs, 1)[:, None, :]
        emb_spread = np.sqrt(mean_np((centred * centred).sum(2), 1))
        emb_norm = mean_np(np.sqrt((fs * fs).sum(2)), 1)
        target_std = np.sqrt(var_np(ys.reshape(len(idx), -1), 1))
        rows = zip(idx, input_spread.tolist(), emb_spread.tolist(), emb_norm.tolist(), target_std.tolist(),
                   fits[0].tolist(), fits[1].tolist())
        for i, a, b, c, d, r2, loo in rows:
            out[i] = {"input_spread": a, "emb_spread": b, "emb_norm": c, "target_std": d, "ridge_r2": r2, "loo_nmse": loo}
    return out


def loo_nmse_many(tasks, features) -> list[float | None]:
    """The ridge leave-one-out ``loo_nmse`` of :func:`probe_features` for each regression task
    with more than one support example and its probed ``features``, one batched solve per group
    of shapes (as :func:`support_stats_many`); ``None`` for any other task. Pass an entry to
    :func:`probe_features` as ``loo_nmse``."""
    tasks, features = list(tasks), list(features)
    out: list[float | None] = [None] * len(tasks)
    for idx in _stackable(tasks, features).values():
        n = tasks[idx[0]].support_x.shape[0]
        fits = _ridge_batch(_stack(features, idx, n), _stack([t.support_y for t in tasks], idx, n))
        if fits is not None:
            for i, loo in zip(idx, fits[1].tolist()):
                out[i] = loo
    return out


def memory_features(memory, embedding: np.ndarray | None, k: int = 5) -> dict[str, float]:
    """Nearest memory entries: similarity (max, mean of top ``k``) and their known outcomes.

    ``mem_quality_mean`` and ``mem_fail_rate`` average over the top ``k`` entries whose outcome
    is known (``mem_known`` of them); without any, they are 0 and ``mem_missing`` is 1.

    Examples
    --------
    >>> memory_features(None, None)["mem_missing"]
    1.0
    """
    out = {"mem_size": 0.0, "mem_sim_max": 0.0, "mem_sim_mean": 0.0, "mem_known": 0.0,
           "mem_quality_mean": 0.0, "mem_fail_rate": 0.0, "mem_missing": 1.0}
    if memory is None or embedding is None or len(memory) == 0:
        return out
    hits = memory.query(embedding, k)
    out["mem_size"] = float(len(memory))
    if not hits:
        return out
    sims = [s for _, s in hits]
    out["mem_sim_max"] = float(max(sims))
    out["mem_sim_mean"] = float(sum(sims) / len(sims))
    quals = [e.quality for e, _ in hits if e.quality is not None and math.isfinite(e.quality)]
    fails = [float(e.failed) for e, _ in hits if e.failed is not None]
    out["mem_known"] = float(max(len(quals), len(fails)))
    if quals:
        out["mem_quality_mean"] = float(sum(quals) / len(quals))
    if fails:
        out["mem_fail_rate"] = float(sum(fails) / len(fails))
    out["mem_missing"] = 0.0 if (quals or fails) else 1.0
    return out


def _init_loss_and_grad(algorithm, meta: Mapping[str, Tensor], task: TaskTensors) -> tuple[float, float]:
    """Support loss at the initialisation and the norm of its gradient w.r.t. the meta parameters."""
    with torch.enable_grad():
        leaves = {k: (v.detach().requires_grad_(True) if k.startswith("params.") and v.is_floating_point() else v.detach())
                  for k, v in meta.items()}
        state = algorithm.start(leaves, task)
        loss = algorithm.support_loss(leaves, state, task)
        inputs = [v for k, v in leaves.items() if k.startswith("params.") and v.requires_grad]
        if not inputs or not loss.requires_grad:
            return float(loss.detach()), 0.0
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    sq = sum(float(g.double().pow(2).sum()) for g in grads if g is not None)
    return float(loss.detach()), math.sqrt(sq)


def pre_features(algorithm, meta: Mapping[str, Tensor], task: TaskTensors, memory=None, *,
                 embedding: np.ndarray | None = None, k: int = 5, loss_and_grad: bool = True,
                 features: Tensor | None = None, init: tuple[float, float] | None = None,
                 stats: Mapping[str, float] | None = None) -> dict[str, float]:
    """Features available before adaptation (see the module docstring).

    Parameters
    ----------
    algorithm
        The algorithm (its ``.model`` embeds; ``start``/``support_loss`` give the initial loss).
    meta
        The meta state.
    task
        The task; only the support set is read.
    memory
        An :class:`agent.memory.MemoryBank` or ``None``.
    embedding
        The task embedding for the memory query; computed with
        :func:`agent.memory.task_embedding` when ``memory`` is given and this is ``None``.
    k
        Neighbours read from memory.
    loss_and_grad
        Compute the initial support loss and gradient norm (one forward and backward).
    features, init
        Precomputed by a caller that batches tasks: the backbone's features of the support
        inputs under ``meta``, and ``(initial support loss, its gradient norm)``.
    stats
        For a regression task, its :func:`support_stats_many` entry (computed for a batch of
        tasks at once): the support statistics are then taken from it.
    """
    x, y = task.support_x, task.support_y
    n = int(x.shape[0])
    cls = task.kind == CLASSIFICATION
    out: dict[str, float] = dict.fromkeys(PRE_KEYS, 0.0)
    out["is_classification"] = 1.0 if cls else 0.0
    out["support_size"] = float(n)
    out["dims"] = float(math.prod(x.shape[1:])) if x.dim() > 1 else 1.0
    if cls:
        stats = None
    if stats is not None:
        out["input_spread"], out["emb_spread"], out["emb_norm"] = stats["input_spread"], stats["emb_spread"], stats["emb_norm"]
    else:
        # In float64 numpy: for few-shot sizes every torch op costs more in dispatch than in arithmetic.
        out["input_spread"] = float(mean_np(np.sqrt(var_np(x.detach().reshape(n, -1).numpy().astype(np.float64), 0)))) \
            if n > 1 else 0.0
        if features is None:
            with torch.no_grad():
                features = _embedding(algorithm, meta, x)
        fn = features.detach().reshape(features.shape[0], -1).numpy().astype(np.float64)
        centred = fn - mean_np(fn, 0)
        out["emb_spread"] = math.sqrt(float(mean_np((centred * centred).sum(1))))
        out["emb_norm"] = float(mean_np(np.sqrt((fn * fn).sum(1))))
    if cls:
        f = torch.from_numpy(fn)
        ways = int(task.n_way)
        counts = torch.bincount(y.long(), minlength=ways).double()
        p = counts[counts > 0] / counts.sum()
        out["ways"] = float(ways)
        out["shots"] = float(n) / ways
        out["class_balance"] = float(-(p * p.log()).sum() / math.log(ways)) if ways > 1 else 1.0
        geo = _class_geometry(f, y, ways)
        out.update({k_: geo[k_] for k_ in ("proto_margin", "fisher_ratio", "log_fisher_ratio")})
        out["init_loo_score"] = geo["loo_acc"]
    else:
        out["ways"] = 0.0
        out["shots"] = float(n)
        out["class_balance"] = 1.0
        if stats is not None:
            out["target_std"], r = stats["target_std"], stats
        else:
            yn = y.detach().reshape(n, -1).numpy().astype(np.float64)
            out["target_std"] = math.sqrt(var_np(yn)) if n > 1 else 0.0
            r = _ridge_np(fn, yn) if n > 1 else None
        if n > 1:
            out["ridge_r2"], out["init_loo_nmse"] = r["ridge_r2"], min(r["loo_nmse"], 1e3)
            out["init_loo_score"] = 1.0 / (1.0 + r["loo_nmse"]) if math.isfinite(r["loo_nmse"]) else 0.0
    out["log_shots"] = math.log1p(out["shots"])
    if loss_and_grad:
        loss, gnorm = _init_loss_and_grad(algorithm, meta, task) if init is None else init
        out["init_loss"], out["init_grad_norm"] = loss, gnorm
        out["log_init_loss"] = math.log1p(max(loss, 0.0)) if math.isfinite(loss) else math.nan
        out["log_init_grad_norm"] = math.log1p(gnorm) if math.isfinite(gnorm) else math.nan
    if memory is not None and embedding is None and len(memory):
        from agent.memory import task_embedding

        embedding = task_embedding(algorithm, meta, task)
    out.update(memory_features(memory, embedding, k))
    return finite(out)


def probe_features(algorithm, meta: Mapping[str, Tensor], task: TaskTensors, *, steps: int = 1,
                   state: Adapted | None = None, init_loss: float | None = None, probe_loss: float | None = None,
                   features: Tensor | None = None, loo_nmse: float | None = None) -> dict[str, float]:
    """Features after a short probe of ``steps`` inner steps (or of a given probe ``state``).

    ``loss_drop`` is ``init_loss - probe_loss`` (support losses) and ``loss_drop_ratio`` the
    drop relative to the initial loss. ``loo_score`` is the leave-one-out nearest-prototype
    accuracy of the support set in the probed embedding (classification) or ``1 / (1 + loo_nmse)``
    with ``loo_nmse`` the ridge leave-one-out MSE over the target variance (regression): higher
    is better for both. Non-finite values are replaced and counted in ``probe_nonfinite``.
    ``probe_loss`` (the support loss of ``state``) and ``features`` (the support inputs'
    features under ``state``) may be passed by a caller that has them already, and so may
    ``loo_nmse`` (regression; from :func:`loo_nmse_many` over a batch).
    """
    out: dict[str, float] = dict.fromkeys(PROBE_KEYS, 0.0)
    with torch.no_grad():
        start = algorithm.start(meta, task) if init_loss is None or state is None else None
        if init_loss is None:
            init_loss = float(algorithm.support_loss(meta, start, task))
        if state is None:
            state = start
            for _ in range(int(steps)):
                state = algorithm.step(meta, state, task)
        if probe_loss is None:
            probe_loss = float(algorithm.support_loss(meta, state, task))
        out["probe_steps"] = float(state.step)
        out["probe_loss"] = probe_loss
        out["loss_drop"] = init_loss - probe_loss
        out["loss_drop_ratio"] = (init_loss - probe_loss) / (abs(init_loss) + 1e-8)
        n = task.support_x.shape[0]
        if features is None and not (loo_nmse is not None and task.kind != CLASSIFICATION and n > 1):
            features = algorithm.embed(meta, state.params, task.support_x, state.step)
        if task.kind == CLASSIFICATION:
            f = features.reshape(n, -1).double()
            out["loo_score"] = _class_geometry(f, task.support_y, int(task.n_way))["loo_acc"]
        elif n > 1:
            if loo_nmse is None:
                loo_nmse = _ridge(features.reshape(n, -1), task.support_y)["loo_nmse"]
            out["loo_nmse"] = loo_nmse
            out["loo_score"] = 1.0 / (1.0 + out["loo_nmse"]) if math.isfinite(out["loo_nmse"]) else math.nan
    return finite(out, flag="probe_nonfinite")
