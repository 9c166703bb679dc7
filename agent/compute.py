"""Test-time compute: budgets, a global token bucket, guarded adaptation and ensembles.

The agent may spend more inner steps and more ensemble members on tasks it expects to be hard.
Extra inner steps are not free of risk: a MAML initialisation meta-trained for one step can
diverge when stepped ten times at the same learning rate (on K=5 sinusoids about 10% of tasks
end worse than after one step and a few reach NaN; see ``notes/anchors.md`` §1.1). So every
multi-step adaptation here goes through :func:`guarded_adapt`, which watches the support loss,
halves the step when the loss rises or turns non-finite, stops on a plateau, and returns the
best state it saw. It never returns a state whose support loss is worse than the plain 1-step
result.

Everything here is a pure function of its inputs except :class:`TokenBucket`, whose clock is
injected. Randomness (the held-out split) comes from a ``torch.Generator`` passed in.

Examples
--------
>>> levels = BudgetLevels.from_config([[1, 1], [5, 1], [10, 3]])
>>> bucket = TokenBucket(rate_per_s=10.0, capacity=40.0, clock=lambda: 0.0)
>>> choice = choose_budget(0.9, levels, bucket.available())
>>> choice.budget, choice.capped
(Budget(steps=10, members=3), False)
>>> bucket.try_take(choice.budget.units)
True
>>> choose_budget(0.9, levels, bucket.available()).budget   # only 10 units left
Budget(steps=5, members=1)
"""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from agent.algorithms.base import CLASSIFICATION, Adapted, Algorithm, MetaState, TaskTensors, plain_inner_loop, task_loss

__all__ = [
    "Budget",
    "BudgetLevels",
    "BudgetChoice",
    "choose_budget",
    "TokenBucket",
    "AdaptTrace",
    "guarded_adapt",
    "split_task",
    "overlay",
    "EnsembleResult",
    "ensemble_weights",
    "ensemble_predict",
]


# --------------------------------------------------------------------------------------------
# Budgets
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class Budget:
    """A test-time compute level: ``steps`` inner steps for each of ``members`` ensemble members.

    ``units`` (steps × members) is the nominal cost in inner-step units, the currency of
    :class:`TokenBucket`. Backtracking and held-out scoring can spend more; the actual count is
    in :attr:`AdaptTrace.step_calls` and :attr:`EnsembleResult.step_calls`.

    Examples
    --------
    >>> Budget(5, 3).units
    15
    """

    steps: int
    members: int = 1

    def __post_init__(self):
        for name in ("steps", "members"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "steps" else 1):
                raise ValueError(f"Budget.{name} must be an int >= {0 if name == 'steps' else 1}, got {v!r}")

    @property
    def units(self) -> int:
        return self.steps * self.members

    def to_dict(self) -> dict[str, int]:
        return {"steps": self.steps, "members": self.members}


@dataclass(frozen=True)
class BudgetLevels:
    """Budgets ordered from cheapest to most expensive, with optional difficulty thresholds.

    ``thresholds`` (ascending, one fewer than the levels) split the difficulty axis [0, 1]: a
    difficulty below ``thresholds[0]`` gets level 0, and so on. Without them the axis is split
    evenly.

    Examples
    --------
    >>> levels = BudgetLevels.from_config({"levels": [{"steps": 1}, {"steps": 10, "members": 3}],
    ...                                    "thresholds": [0.3]})
    >>> [b.units for b in levels.levels], levels.level_for(0.2), levels.level_for(0.3)
    ([1, 30], 0, 1)
    """

    levels: tuple[Budget, ...]
    thresholds: tuple[float, ...] | None = None

    def __post_init__(self):
        if not self.levels:
            raise ValueError("BudgetLevels needs at least one level")
        units = [b.units for b in self.levels]
        if units != sorted(units):
            raise ValueError(f"budget levels must be ordered by cost (steps x members), got units {units}")
        if self.thresholds is not None:
            t = tuple(float(x) for x in self.thresholds)
            if len(t) != len(self.levels) - 1 or list(t) != sorted(t) or not all(0.0 <= x <= 1.0 for x in t):
                raise ValueError(f"thresholds must be {len(self.levels) - 1} ascending numbers in [0, 1], got {self.thresholds!r}")
            object.__setattr__(self, "thresholds", t)

    def __len__(self) -> int:
        return len(self.levels)

    def __getitem__(self, i: int) -> Budget:
        return self.levels[i]

    @classmethod
    def from_config(cls, cfg: Any) -> "BudgetLevels":
        """Build from a list of ``[steps, members]`` pairs or ``{"steps", "members"}`` dicts, or a
        dict ``{"levels": [...], "thresholds": [...]}``. Unknown keys are errors."""
        thresholds = None
        if isinstance(cfg, Mapping):
            unknown = set(cfg) - {"levels", "thresholds"}
            if unknown:
                raise ValueError(f"unknown budget config keys: {sorted(unknown)}")
            thresholds = cfg.get("thresholds")
            cfg = cfg.get("levels", ())
        levels = []
        for item in cfg:
            if isinstance(item, Budget):
                levels.append(item)
            elif isinstance(item, Mapping):
                unknown = set(item) - {"steps", "members"}
                if unknown:
                    raise ValueError(f"unknown budget level keys: {sorted(unknown)}")
                levels.append(Budget(item["steps"], item.get("members", 1)))
            else:
                levels.append(Budget(*item))
        return cls(tuple(levels), None if thresholds is None else tuple(thresholds))

    def to_config(self) -> dict[str, Any]:
        out: dict[str, Any] = {"levels": [b.to_dict() for b in self.levels]}
        if self.thresholds is not None:
            out["thresholds"] = list(self.thresholds)
        return out

    def level_for(self, difficulty: float) -> int:
        """The level a difficulty in [0, 1] asks for (NaN asks for the top level)."""
        d = float(difficulty)
        if math.isnan(d):  # an unknown difficulty is treated as hard: spend what is allowed
            return len(self.levels) - 1
        d = min(max(d, 0.0), 1.0)
        if self.thresholds is not None:
            return bisect.bisect_right(self.thresholds, d)
        return min(int(d * len(self.levels)), len(self.levels) - 1)


@dataclass(frozen=True)
class BudgetChoice:
    """What :func:`choose_budget` picked: the ``budget`` at index ``level``, the level the
    difficulty asked for (``wanted``), and whether the token bucket forced it lower."""

    budget: Budget
    level: int
    wanted: int
    capped: bool


def choose_budget(difficulty: float, levels: BudgetLevels, tokens_available: float, *,
                  min_level: int = 0) -> BudgetChoice:
    """Map a predicted difficulty (e.g. a failure probability) to a budget level.

    The level the difficulty asks for is lowered until its cost fits ``tokens_available``.
    ``min_level`` is always granted, even when the bucket cannot pay for it: the agent must still
    answer (the caller charges it with :meth:`TokenBucket.take`, which may go into debt).

    Examples
    --------
    >>> levels = BudgetLevels.from_config([[1, 1], [4, 1], [8, 2]])
    >>> choose_budget(0.1, levels, 100).level, choose_budget(0.5, levels, 100).level
    (0, 1)
    >>> c = choose_budget(1.0, levels, 5)
    >>> c.level, c.wanted, c.capped
    (1, 2, True)
    >>> choose_budget(1.0, levels, 0).budget
    Budget(steps=1, members=1)
    """
    if not 0 <= min_level < len(levels):
        raise ValueError(f"min_level must be in [0, {len(levels)}), got {min_level}")
    wanted = max(levels.level_for(difficulty), min_level)
    level = wanted
    while level > min_level and levels[level].units > tokens_available:
        level -= 1
    return BudgetChoice(levels[level], level, wanted, level < wanted)


# --------------------------------------------------------------------------------------------
# Token bucket
# --------------------------------------------------------------------------------------------
class TokenBucket:
    """A token bucket of inner-step units shared by all tasks: it caps the agent's mean compute.

    Tokens accrue at ``rate_per_s`` up to ``capacity``. :meth:`try_take` is all-or-nothing;
    :meth:`take` always succeeds and may leave the balance negative (a debt repaid by later
    refills) so that compute actually spent beyond a reservation is still charged;
    :meth:`refund` returns units reserved but not spent.

    Parameters
    ----------
    rate_per_s
        Refill rate, units per second of ``clock``.
    capacity
        Maximum balance (the largest burst).
    clock
        Seconds as a float; ``time.monotonic`` by default, a fake in tests.
    tokens
        Starting balance (default: full).

    Examples
    --------
    >>> now = [0.0]
    >>> b = TokenBucket(rate_per_s=2.0, capacity=10.0, clock=lambda: now[0])
    >>> b.try_take(8), b.try_take(8), b.available()
    (True, False, 2.0)
    >>> now[0] = 1.5; b.available()            # 1.5 s at 2 units/s
    5.0
    >>> b.take(7); b.available()               # charged anyway: a debt
    -2.0
    >>> b.refund(1.0); b.available()
    -1.0
    >>> TokenBucket.from_state_dict(b.state_dict(), clock=lambda: 0.0).available()
    -1.0
    """

    def __init__(self, rate_per_s: float, capacity: float, clock: Callable[[], float] = time.monotonic,
                 tokens: float | None = None):
        if not (math.isfinite(rate_per_s) and rate_per_s >= 0):
            raise ValueError(f"rate_per_s must be a finite number >= 0, got {rate_per_s!r}")
        if not (math.isfinite(capacity) and capacity > 0):
            raise ValueError(f"capacity must be a finite number > 0, got {capacity!r}")
        self.rate_per_s = float(rate_per_s)
        self.capacity = float(capacity)
        self.clock = clock
        self._tokens = self.capacity if tokens is None else min(float(tokens), self.capacity)
        self._last = float(clock())

    def __repr__(self) -> str:
        return f"TokenBucket(rate_per_s={self.rate_per_s}, capacity={self.capacity}, tokens={self._tokens:.3g})"

    def _refill(self) -> None:
        now = float(self.clock())
        dt = now - self._last
        if dt > 0:  # a clock that steps back (a restored state, a fake) never removes tokens
            self._tokens = min(self.capacity, self._tokens + dt * self.rate_per_s)
        self._last = now

    def available(self) -> float:
        """Current balance (may be negative after :meth:`take`)."""
        self._refill()
        return self._tokens

    def try_take(self, n: float) -> bool:
        """Take ``n`` units if the balance covers them; otherwise take nothing."""
        n = _check_units(n)
        self._refill()
        if n <= self._tokens:
            self._tokens -= n
            return True
        return False

    def take(self, n: float) -> None:
        """Take ``n`` units unconditionally (the balance may go negative)."""
        n = _check_units(n)
        self._refill()
        self._tokens -= n

    def refund(self, n: float) -> None:
        """Give back ``n`` units reserved but not spent (the balance stays <= capacity)."""
        n = _check_units(n)
        self._refill()
        self._tokens = min(self.capacity, self._tokens + n)

    def state_dict(self) -> dict[str, float]:
        """JSON-able state. Clock readings are not saved: they mean nothing after a restart."""
        self._refill()
        return {"rate_per_s": self.rate_per_s, "capacity": self.capacity, "tokens": self._tokens}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, float], clock: Callable[[], float] = time.monotonic) -> "TokenBucket":
        """Restore; refilling restarts from ``clock()`` now (downtime earns no tokens)."""
        return cls(state["rate_per_s"], state["capacity"], clock, tokens=state["tokens"])


def _check_units(n: float) -> float:
    n = float(n)
    if not (math.isfinite(n) and n >= 0):
        raise ValueError(f"token amounts must be finite and >= 0, got {n!r}")
    return n


# --------------------------------------------------------------------------------------------
# Guarded adaptation
# --------------------------------------------------------------------------------------------
@dataclass
class AdaptTrace:
    """What :func:`guarded_adapt` did.

    Attributes
    ----------
    losses
        Support loss of each accepted state: ``losses[0]`` at the start, ``losses[i]`` after the
        ``i``-th accepted step.
    steps
        Accepted inner steps (``len(losses) - 1``).
    step_calls
        Calls to ``algorithm.step`` (accepted, rejected and held-out fits): the compute spent.
    backtracks
        Steps retried with a halved ``lr_scale``.
    early_stopped
        Stopped before ``max_steps`` (plateau, or no descending step within the backtracks).
    diverged
        Some tried step gave a non-finite loss (it was rejected).
    best_step
        Inner step index (``Adapted.step``) of the returned state.
    best_loss
        Its support loss.
    lr_scale
        The step-size scale in force at the end.
    holdout
        The held-out scheme actually used: ``"none"``, ``"split"`` or ``"loo"``.
    holdout_losses
        Held-out loss per accepted step on the fit part (mean over folds), when held out.
    holdout_loss
        Held-out loss at the chosen step count, or ``None``.
    """

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    step_calls: int = 0
    backtracks: int = 0
    early_stopped: bool = False
    diverged: bool = False
    best_step: int = 0
    best_loss: float = math.nan
    lr_scale: float = 1.0
    holdout: str = "none"
    holdout_losses: list[float] | None = None
    holdout_loss: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _finite(v: float) -> float:
    """``v``, or ``inf`` for a NaN or infinite loss (the guard ranks it worst)."""
    return v if math.isfinite(v) else math.inf


def _loss(algorithm: Algorithm, meta: MetaState, state: Adapted, task: TaskTensors) -> float:
    with torch.no_grad():
        return _finite(float(algorithm.support_loss(meta, state, task)))


def _heldout_loss(algorithm: Algorithm, meta: MetaState, state: Adapted, held: TaskTensors) -> float:
    # Scores examples the state was not fitted on through predict: ``support_loss`` may read
    # caches of the fit part's support set (ANIL's features, the heads' embeddings).
    with torch.no_grad():
        return _finite(float(task_loss(held.kind, algorithm.predict(meta, state, held.support_x), held.support_y, held.n_way)))


def guarded_adapt(algorithm: Algorithm, meta: MetaState, task: TaskTensors, max_steps: int, *,
                  patience: int = 2, min_rel_improvement: float = 1e-3, backtrack: bool = True,
                  max_backtracks: int = 4, min_steps: int = 1, holdout: float | str | None = None,
                  generator: torch.Generator | None = None,
                  start: tuple[Mapping[str, Tensor], Tensor] | None = None) -> tuple[Adapted, AdaptTrace]:
    """Adapt with up to ``max_steps`` inner steps, watching the support loss.

    Each step starts at the current ``lr_scale`` (1 at first). When the new support loss is
    higher than the current one, or not finite, the step is retried from the same state with
    the scale halved, up to ``max_backtracks`` times; the halved scale stays in force for later
    steps. If no retry descends, adaptation stops. It also stops when the relative improvement
    stays below ``min_rel_improvement`` for ``patience`` consecutive steps. Every finite state
    tried with at least ``min_steps`` steps (rejected ones included) is a candidate, and the one
    with the lowest support loss is returned. The full-scale first step is always tried and is a
    candidate, so **the result is never worse on the support set than plain 1-step adaptation**
    (for ``min_steps <= 1 <= max_steps``).

    This is inference-time adaptation: steps run without a graph (``create_graph=False``), so
    the result is not differentiable w.r.t. ``meta``; meta-training uses ``Algorithm.meta_loss``.

    Parameters
    ----------
    algorithm, meta, task
        What to adapt, from where, to what.
    max_steps
        Most accepted inner steps.
    patience, min_rel_improvement
        Plateau rule for early stopping.
    backtrack, max_backtracks
        Halve the step on a rise or a non-finite loss. Without ``backtrack`` a rising step is
        accepted (but the best state is still kept) and a non-finite one stops adaptation.
    min_steps
        Fewest steps a candidate must have; ``0`` lets the start state win.
    holdout
        ``None``: pick the step count by support loss alone. A fraction in (0, 1): hold out that
        share of the support set (stratified by class, see :func:`split_task`), adapt on the rest,
        pick the step count with the lowest held-out loss, then re-adapt on the whole support set
        with at most that many steps. ``"loo"``: the same with leave-one-out folds (one fit per
        support example; meant for tiny supports). The held-out loss is in the trace, for
        ensemble weighting. Where nothing can be held out (1-shot classification, one example)
        this falls back to ``None`` and says so in ``trace.holdout``.
    generator
        Draws the held-out split; without one the split is deterministic (every k-th example).
    start
        ``(gradient, loss)`` of the support loss at the meta-parameters, when the caller computed
        them already (the agent's features pass, :func:`agent.batch.start_one`): gradient keyed
        like ``algorithm.params_of(meta)``. The guard then takes its starting loss and the first
        step's gradient from it instead of running the model again; the result is the same.
        Used only without ``holdout`` and for :func:`~agent.algorithms.base.plain_inner_loop`
        algorithms (ignored otherwise).

    Returns
    -------
    (Adapted, AdaptTrace)
        For non-iterative algorithms (``algorithm.iterative`` is false) the closed-form
        ``algorithm.adapt`` result, with a trace of zero steps.

    Examples
    --------
    >>> import torch
    >>> from agent.nn.mlp import MLPFeatures
    >>> from agent.nn.model import MetaModel
    >>> from agent.algorithms.maml import MAML
    >>> maml = MAML(MetaModel(MLPFeatures(1, (16,)), 16, 1), inner_lr=0.5)  # far too large
    >>> meta = maml.init_meta(torch.Generator().manual_seed(0))
    >>> x = torch.linspace(-5, 5, 5).unsqueeze(1)
    >>> task = TaskTensors(x, 3 * torch.sin(x), x, 3 * torch.sin(x), "regression")
    >>> state, trace = guarded_adapt(maml, meta, task, max_steps=10)
    >>> plain = maml.adapt(meta, task, 1)
    >>> trace.best_loss <= float(maml.support_loss(meta, plain, task))
    True
    >>> trace.backtracks > 0, math.isfinite(trace.best_loss)
    (True, True)
    """
    if max_steps < 0:
        raise ValueError(f"max_steps must be >= 0, got {max_steps}")
    if not algorithm.iterative:
        return _closed_form(algorithm, meta, task, holdout, generator)
    if holdout is None:
        return _guard(algorithm, meta, task, max_steps, patience, min_rel_improvement, backtrack,
                      max_backtracks, min_steps, start=start if start is not None and plain_inner_loop(algorithm) else None)
    folds = _folds(task, holdout, generator)
    if not folds:
        return _guard(algorithm, meta, task, max_steps, patience, min_rel_improvement, backtrack,
                      max_backtracks, min_steps)
    # Held-out curve: adapt on each fit part, score every accepted state on the held-out part.
    curves, calls = [], 0
    for fit, held in folds:
        _, tr, path = _guard(algorithm, meta, fit, max_steps, patience, min_rel_improvement, backtrack,
                             max_backtracks, min_steps, keep_path=True)
        calls += tr.step_calls
        curves.append([_heldout_loss(algorithm, meta, s, held) for s in path])
    length = max(len(c) for c in curves)
    # An early-stopped fold stays at its last state: pad with its last value.
    padded = [c + [c[-1]] * (length - len(c)) for c in curves]
    mean_curve = [sum(col) / len(col) for col in zip(*padded)]
    lo = min(min_steps, max_steps, length - 1)
    chosen = min(range(lo, length), key=lambda i: (mean_curve[i], i))
    state, trace = _guard(algorithm, meta, task, max(chosen, min(1, max_steps)), patience, min_rel_improvement,
                          backtrack, max_backtracks, min_steps)
    trace.step_calls += calls
    trace.holdout = "loo" if holdout == "loo" else "split"
    trace.holdout_losses = mean_curve
    trace.holdout_loss = mean_curve[chosen]
    return state, trace


def _closed_form(algorithm, meta, task, holdout, generator):
    trace = AdaptTrace()
    folds = _folds(task, holdout, generator) if holdout is not None else []
    if folds:
        scores = [_heldout_loss(algorithm, meta, algorithm.adapt(meta, fit), held) for fit, held in folds]
        trace.holdout = "loo" if holdout == "loo" else "split"
        trace.holdout_loss = sum(scores) / len(scores)
        trace.holdout_losses = [trace.holdout_loss]
    state = algorithm.adapt(meta, task)
    trace.best_loss = _loss(algorithm, meta, state, task)
    trace.losses = [trace.best_loss]
    trace.best_step = state.step
    return state, trace


def _guard(algorithm, meta, task, max_steps, patience, min_rel_improvement, backtrack, max_backtracks,
           min_steps, keep_path=False, start=None):
    trace = AdaptTrace()
    cur = algorithm.start(meta, task)
    at = start  # (gradient, loss) at ``cur`` while it is the start state; every retry of the first step reuses it
    cur_loss = _loss(algorithm, meta, cur, task) if at is None else _finite(float(at[1]))
    trace.losses.append(cur_loss)
    path = [cur]
    first = min(min_steps, max_steps)
    best, best_loss = (cur, cur_loss) if first <= 0 else (None, math.inf)
    scale, flat = 1.0, 0

    for _ in range(max_steps):
        accepted = None
        for attempt in range(max_backtracks + 1 if backtrack else 1):
            cand = algorithm.step(meta, cur, task, lr_scale=scale) if at is None else \
                algorithm.step(meta, cur, task, lr_scale=scale, at=at)
            trace.step_calls += 1
            loss = _loss(algorithm, meta, cand, task)
            if loss == math.inf:
                trace.diverged = True
            elif cand.step >= first and (best is None or loss < best_loss):
                best, best_loss = cand, loss
            if loss <= cur_loss or (not backtrack and loss < math.inf):
                accepted = (cand, loss)
                break
            if backtrack and attempt < max_backtracks:
                scale *= 0.5
                trace.backtracks += 1
        if accepted is None:  # no retry descended (or a non-finite step without backtracking)
            trace.early_stopped = True
            break
        cand, loss = accepted
        rel = (cur_loss - loss) / max(abs(cur_loss), 1e-12)
        cur, cur_loss, at = cand, loss, None
        trace.losses.append(cur_loss)
        path.append(cur)
        flat = flat + 1 if rel < min_rel_improvement else 0
        if cur_loss == 0.0 or flat >= patience:
            trace.early_stopped = len(trace.losses) - 1 < max_steps
            break

    if best is None:  # every tried step was non-finite: the start state is the safe answer
        best, best_loss = path[0], trace.losses[0]
    trace.steps = len(trace.losses) - 1
    trace.best_step = best.step
    trace.best_loss = best_loss
    trace.lr_scale = scale
    return (best, trace, path) if keep_path else (best, trace)


# --------------------------------------------------------------------------------------------
# Held-out splits
# --------------------------------------------------------------------------------------------
def _subset(task: TaskTensors, idx: Tensor) -> TaskTensors:
    # The subset becomes the support set; the query is kept (unused by the guards).
    return TaskTensors(task.support_x[idx], task.support_y[idx], task.query_x, task.query_y, task.kind, task.n_way)


def split_task(task: TaskTensors, fraction: float, generator: torch.Generator | None = None
               ) -> tuple[TaskTensors, TaskTensors] | None:
    """Split the support set into a fit part and a held-out part (both as support sets).

    Classification is stratified: only classes with at least two examples give up examples
    (``round(fraction * count)``, at least one, never all), so every class stays in the fit part.
    Regression holds out ``round(fraction * n)`` examples (at least one, never all). Returns
    ``None`` when nothing can be held out. Without ``generator`` the held-out examples are
    evenly spaced in the support order.

    Examples
    --------
    >>> import torch
    >>> y = torch.tensor([0, 0, 0, 1, 1, 2])
    >>> t = TaskTensors(torch.arange(6.).unsqueeze(1), y, torch.zeros(1, 1), None)
    >>> fit, held = split_task(t, 0.5)
    >>> fit.support_y.tolist(), held.support_y.tolist(), held.n_way
    ([0, 1, 2], [0, 0, 1], 3)
    >>> split_task(TaskTensors(torch.zeros(2, 1), torch.tensor([0, 1]), torch.zeros(1, 1), None), 0.5) is None
    True
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction!r}")
    n = task.support_x.shape[0]
    if task.kind == CLASSIFICATION:
        groups = [torch.nonzero(task.support_y == c).flatten() for c in range(int(task.n_way))]
    else:
        groups = [torch.arange(n)]
    held = []
    for g in groups:
        m = g.numel()
        if m < 2:
            continue
        h = min(max(1, round(fraction * m)), m - 1)
        if generator is not None:
            pick = g[torch.randperm(m, generator=generator)[:h]]
        else:
            pick = g[torch.linspace(0, m - 1, h + 2)[1:-1].round().long()] if h < m - 1 else g[1:]
        held.append(pick)
    if not held:
        return None
    held_idx = torch.cat(held).sort().values
    mask = torch.ones(n, dtype=torch.bool)
    mask[held_idx] = False
    return _subset(task, torch.nonzero(mask).flatten()), _subset(task, held_idx)


def _folds(task: TaskTensors, holdout: float | str, generator: torch.Generator | None):
    if holdout == "loo":
        n = task.support_x.shape[0]
        if task.kind == CLASSIFICATION:
            counts = torch.bincount(task.support_y, minlength=int(task.n_way))
            ok = [i for i in range(n) if counts[task.support_y[i]] >= 2]
        else:
            ok = list(range(n)) if n >= 2 else []
        folds = []
        for i in ok:
            keep = torch.tensor([j for j in range(n) if j != i], dtype=torch.long)
            folds.append((_subset(task, keep), _subset(task, torch.tensor([i]))))
        return folds
    if isinstance(holdout, str):
        raise ValueError(f"holdout must be None, a fraction or 'loo', got {holdout!r}")
    split = split_task(task, float(holdout), generator)
    return [split] if split is not None else []


# --------------------------------------------------------------------------------------------
# Ensembles over initialisations
# --------------------------------------------------------------------------------------------
def overlay(meta: MetaState, init: Adapted | Mapping[str, Any] | None) -> MetaState:
    """``meta`` with some entries replaced: the starting point of one ensemble member.

    ``init`` is ``None`` (the meta-initialisation itself), an :class:`Adapted` (its ``params``
    replace ``params.*``), or a dict of tensors or arrays keyed by meta names (``params.head.weight``,
    ``lr.head.weight``) or bare parameter names (``head.weight``). Partial dicts are fine: a
    memory entry that kept only the head overrides only the head.

    Examples
    --------
    >>> import torch
    >>> meta = {"params.head.weight": torch.zeros(1, 2), "params.head.bias": torch.zeros(1)}
    >>> overlay(meta, {"head.bias": [3.0]})["params.head.bias"]
    tensor([3.])
    """
    if init is None:
        return meta
    items = init.params if isinstance(init, Adapted) else init
    out = dict(meta)
    for k, v in items.items():
        key = k if k in meta else "params." + k
        if key not in meta:
            raise KeyError(f"ensemble init entry {k!r} matches nothing in meta")
        ref = meta[key]
        t = torch.as_tensor(v, dtype=ref.dtype).reshape(ref.shape)
        out[key] = t.detach().clone().requires_grad_(ref.requires_grad)
    return out


def ensemble_weights(scores: Sequence[float], weighting: str = "inverse", temperature: float = 1.0,
                     eps: float = 1e-8) -> Tensor:
    """Member weights from held-out losses (lower is better); non-finite losses get weight 0.

    ``"softmax"``: ``exp(-loss / temperature)``; ``"inverse"``: ``1 / (loss + eps)`` (scale-free,
    so the same default suits MSE and cross-entropy). If no loss is finite the weights are
    uniform. They sum to 1.

    Examples
    --------
    >>> ensemble_weights([0.1, 0.3]).round(decimals=4).tolist()
    [0.75, 0.25]
    >>> ensemble_weights([1.0, float("nan")], "softmax").tolist()
    [1.0, 0.0]
    """
    s = torch.tensor([float(v) for v in scores], dtype=torch.float64)
    ok = torch.isfinite(s)
    if not bool(ok.any()):
        return torch.full_like(s, 1.0 / len(s))
    if weighting == "softmax":
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        z = torch.where(ok, -s / temperature, torch.full_like(s, -math.inf))
        return torch.softmax(z, 0)
    if weighting == "inverse":
        w = torch.where(ok, 1.0 / (s.clamp_min(0) + eps), torch.zeros_like(s))
        return w / w.sum()
    raise ValueError(f"weighting must be 'inverse' or 'softmax', got {weighting!r}")


@dataclass
class EnsembleResult:
    """Output of :func:`ensemble_predict`.

    Attributes
    ----------
    prediction
        Classification: ``(n, n_way)`` class probabilities (the weighted mean of the members'
        probabilities). Regression: the weighted mean of the members' outputs.
    confidence
        Classification: the largest probability per row. Regression: ``1 / (1 + spread)``
        averaged over output dimensions, a heuristic in (0, 1].
    spread
        Regression: weighted standard deviation across members, shaped like ``prediction``.
        Classification: weighted standard deviation of the members' probabilities.
    weights
        ``(members,)`` float64, summing to 1.
    scores
        Held-out loss of each member (support loss where nothing could be held out).
    members, traces
        Each member's adapted state and guard trace.
    step_calls
        Inner steps spent in total (the compute to charge).
    """

    prediction: Tensor
    confidence: Tensor
    spread: Tensor
    weights: Tensor
    scores: list[float]
    members: list[Adapted]
    traces: list[AdaptTrace]
    step_calls: int

    @property
    def best(self) -> int:
        """Index of the member with the largest weight."""
        return int(torch.argmax(self.weights))


def ensemble_predict(algorithm: Algorithm, meta: MetaState, task: TaskTensors,
                     inits: Iterable[Adapted | Mapping[str, Any] | None], *, max_steps: int,
                     x: Tensor | None = None, holdout: float | str | None = 0.3, weighting: str = "inverse",
                     temperature: float = 1.0, generator: torch.Generator | None = None,
                     **guard: Any) -> EnsembleResult:
    """Adapt one member per initialisation, weight them by held-out loss, and average.

    Members are usually the meta-initialisation (``None``) plus the adapted states of the
    nearest tasks in episodic memory (see :func:`overlay`). Each is adapted with
    :func:`guarded_adapt`. Its score is the held-out loss: with ``holdout`` a fraction the
    support set is split once (the same split for every member, so scores are comparable), the
    member is adapted on the fit part and scored on the rest, then re-adapted on the whole
    support set with the step count the held-out loss chose; ``"loo"`` uses leave-one-out
    folds (for tiny supports, at one fit per example); ``None``, or a support set that cannot be
    split (1-shot), scores by the support loss itself, which favours members that overfit.

    Classification averages **probabilities**, not logits: averaging logits lets one
    over-confident member dominate and is not a mixture of the members' predictive
    distributions.

    Parameters
    ----------
    x
        Inputs to predict (default: the task's query inputs).
    weighting, temperature
        See :func:`ensemble_weights`.
    generator
        Draws the held-out split.
    **guard
        Passed to :func:`guarded_adapt` (``patience``, ``backtrack``...).

    Examples
    --------
    >>> import torch
    >>> from agent.nn.mlp import MLPFeatures
    >>> from agent.nn.model import MetaModel
    >>> from agent.algorithms.maml import MAML
    >>> maml = MAML(MetaModel(MLPFeatures(2, (8,)), 8, 3), inner_lr=0.1)
    >>> meta = maml.init_meta(torch.Generator().manual_seed(0))
    >>> g = torch.Generator().manual_seed(1)
    >>> task = TaskTensors(torch.randn(9, 2, generator=g), torch.arange(9) % 3, torch.randn(4, 2, generator=g), None)
    >>> other = maml.adapt(meta, task, 3)
    >>> out = ensemble_predict(maml, meta, task, [None, other], max_steps=3)
    >>> out.prediction.shape, bool(torch.allclose(out.prediction.sum(1), torch.ones(4, dtype=torch.float64)))
    (torch.Size([4, 3]), True)
    """
    inits = list(inits)
    if not inits:
        raise ValueError("ensemble_predict needs at least one init")
    x = task.query_x if x is None else x
    if isinstance(holdout, float) and generator is not None:
        # Fix one split for all members by drawing the generator's state once.
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    else:
        seed = None
    members, traces, scores, outputs = [], [], [], []
    for init in inits:
        m_meta = overlay(meta, init)
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        state, trace = guarded_adapt(algorithm, m_meta, task, max_steps, holdout=holdout, generator=gen, **guard)
        members.append(state)
        traces.append(trace)
        scores.append(trace.holdout_loss if trace.holdout_loss is not None else trace.best_loss)
        with torch.no_grad():
            out = algorithm.predict(m_meta, state, x).double()
        if task.kind == CLASSIFICATION:
            out = torch.softmax(out[..., : int(task.n_way)], dim=-1)
        outputs.append(out)
    finite = [bool(torch.isfinite(o).all()) for o in outputs]
    scores_ok = [s if f else math.inf for s, f in zip(scores, finite)]
    weights = ensemble_weights(scores_ok, weighting, temperature)
    if not any(finite):  # nothing usable: the first member's output, whatever it is
        weights = torch.zeros(len(outputs), dtype=torch.float64)
        weights[0] = 1.0
    stack = torch.stack([o if f else torch.zeros_like(o) for o, f in zip(outputs, finite)])
    w = weights.reshape(-1, *([1] * (stack.dim() - 1)))
    mean = (w * stack).sum(0)
    spread = ((w * (stack - mean) ** 2).sum(0)).clamp_min(0).sqrt()
    if task.kind == CLASSIFICATION:
        confidence = mean.max(dim=-1).values
    else:
        confidence = (1.0 / (1.0 + spread)).reshape(spread.shape[0], -1).mean(1)
    return EnsembleResult(mean, confidence, spread, weights, [float(s) for s in scores], members, traces,
                          sum(t.step_calls for t in traces))
