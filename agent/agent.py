"""The streaming agent: one object that answers few-shot tasks and keeps learning from them.

:class:`Agent` is the imperative shell over the pure parts (algorithms, compute policy, memory):
it owns the meta-parameters, the episodic memory, the pending-feedback table, the token bucket,
the online meta-learner and the Prometheus metrics, and it is the only place with clocks.

Per task (:meth:`Agent.step`):

1. cheap features (support size, ways, shots, support loss at the meta-initialisation) and a
   difficulty estimate in [0, 1] (:class:`Difficulty`: where the initial support loss falls
   among recent tasks of the same kind, ``compute.difficulty``);
2. an arm from the :class:`Policy` (configured default, escalation by difficulty);
3. a budget from :func:`~agent.compute.choose_budget` (the difficulty picks a level of
   ``compute.levels``; with ``compute.budget_by: p_fail`` the failure predictor's probability
   does once it is warm) and the :class:`~agent.compute.TokenBucket`;
4. adaptation with :func:`~agent.compute.guarded_adapt` from the meta-initialisation and,
   when a retrieved memory entry's stored head fits the support set better than the
   meta-initialisation before any step, from that head too; the member with the lower support
   loss answers (``memory.warm_start``; ``ensemble`` averages members instead,
   :func:`~agent.compute.ensemble_predict`);
5. an :class:`~agent.task.Outcome`. When labels are known (inline, or later through
   :meth:`Agent.feedback`) the task is scored, stored in memory, and fed to the online
   meta-learner.

The failure probability ``p_fail`` is the difficulty estimate until the River failure predictor
is wired in (the :class:`Policy` seam is where the River selector goes).

Micro-batches (:meth:`Agent.step_many`; the daemon hands over up to ``agent.micro_batch``
waiting tasks at once) are answered from the agent's state at the batch start: steps 1-3 run
for every task first (the pre-features' forward and backward passes vmapped over the batch),
then the tasks on the plain path (one member) that share an algorithm and shapes are adapted
together, in lockstep under ``torch.func.vmap`` (:mod:`agent.batch`; each task takes exactly the
guarded steps it would take alone), then each task is answered in order, and only then are the
labelled ones learned from, in order. A batch of one is exactly :meth:`Agent.step`.

Examples
--------
A plain Python loop (the README's embedded use):

>>> import numpy as np
>>> from agent.task import Task
>>> agent = Agent.from_config({"agent": {"in_shape": [1], "out_dim": 1},
...                            "compute": {"levels": [[1, 1], [3, 1]]}, "memory": {"capacity": 50}})
>>> rng = np.random.default_rng(0)
>>> for i in range(5):
...     x = rng.uniform(-5, 5, (10, 1)); q = rng.uniform(-5, 5, (5, 1))
...     task = Task(f"t{i}", "regression", x, np.sin(x), q)            # labels come later
...     outcome = agent.step(task)
...     score = agent.feedback(task.id, np.sin(q))
>>> outcome.id, len(outcome.predictions), sorted(score)
('t4', 5, ['failed', 'id', 'mse'])
>>> agent.handle_line(b'{"type": "task", "id": "bad"')[0]["error"]["code"]
'bad_json'
"""

from __future__ import annotations

import bisect
import io
import json
import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from agent import checkpoint as ckpt
from agent.algorithms import Algorithm, TaskTensors, build
from agent.batch import (batchable, embed_batch, guarded_adapt_batch, predict_batch, shape_key, start_batch, start_one,
                         start_loss_batch)
from agent.compute import Budget, TokenBucket, choose_budget, ensemble_predict, guarded_adapt, overlay
from agent.config import Config, load as load_config
from agent.memory import MemoryBank, MemoryEntry, mean_np, random_projection, task_embedding, task_embeddings, var_np
from agent.metrics import INTERNAL_ERROR, Metrics, build_metrics
from agent.online import persist
from agent.online.features import finite, loo_nmse_many, pre_features, probe_features, support_stats_many
from agent.online.wiring import STATE_VERSION, OnlineIntelligence, Plan, bump, quality_of
from agent.task import (BAD_TARGET_SHAPE, CLASSIFICATION, DIM_MISMATCH, DUPLICATE_ID, REGRESSION, TOO_LARGE, Feedback, IdRegistry,
                        Limits, Outcome, Task, TaskError, error_record, parse_record)

__all__ = ["Agent", "Policy", "Difficulty", "task_features", "RunStats"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Pure parts: features, difficulty, policy
# --------------------------------------------------------------------------------------------
def task_features(algorithm: Algorithm, meta: Mapping[str, torch.Tensor], task: TaskTensors) -> dict[str, float]:
    """Cheap features of a task: sizes and the support loss at the meta-initialisation.

    ``norm_init_loss`` makes the initial loss scale-free: divided by the variance of the targets
    (regression: 1 means "no better than predicting the mean") or by ``log(n_way)``
    (classification: 1 means "chance").

    Examples
    --------
    >>> import torch
    >>> from agent.nn import build_model
    >>> alg = build("maml", build_model("mlp", in_shape=1, out_dim=1, hidden=(8,)))
    >>> meta = alg.init_meta(torch.Generator().manual_seed(0))
    >>> x = torch.linspace(-1, 1, 6).unsqueeze(1)
    >>> f = task_features(alg, meta, TaskTensors(x, x, x, None, "regression"))
    >>> f["n_support"], f["shots"], f["init_loss"] > 0
    (6.0, 6.0, True)
    """
    n = int(task.support_x.shape[0])
    with torch.no_grad():
        loss = float(algorithm.support_loss(meta, algorithm.start(meta, task), task))
    if task.kind == CLASSIFICATION:
        n_way = int(task.n_way)
        scale = math.log(max(n_way, 2))
        shots = n / n_way
    else:
        n_way = 0
        scale = float(task.support_y.float().var(unbiased=False)) if n > 1 else 1.0
        shots = n
    norm = loss / max(scale, 1e-6) if math.isfinite(loss) else math.inf
    return {"n_support": float(n), "n_way": float(n_way), "shots": float(shots),
            "n_query": float(task.query_x.shape[0]), "init_loss": loss, "norm_init_loss": norm}


class Difficulty:
    """Difficulty in [0, 1]: where a task's signal falls among recent tasks of its kind.

    The signal (``signal``, from :func:`task_features`) is ``"init_loss"``, the support loss at
    the meta-initialisation (classification: divided by ``log(n_way)``, the loss at chance, so
    that tasks of different ways compare), or ``"norm_init_loss"``, that loss divided by the
    target variance (regression) or ``log(n_way)``. The difficulty is its mid-rank empirical CDF
    among the last ``window`` finite signals of the same kind (regression and classification are
    ranked separately): 0.5 until ``warmup`` such tasks were seen, 1 for a non-finite signal.

    ``"init_loss"`` is the default because it predicts what extra inner steps buy: on sinusoids
    the tasks with large losses (large amplitudes) gain the most absolute MSE from more steps,
    and dividing by the variance removes exactly that (``bench/compute_scaling.py``).

    Examples
    --------
    >>> d = Difficulty(warmup=3, window=4)
    >>> [d.update(v) for v in (1.0, 2.0, 3.0)]           # warm-up: 0.5
    [0.5, 0.5, 0.5]
    >>> d.estimate(0.5), d.estimate(2.0), d.estimate(9.0), d.estimate(float("nan"))
    (0.0, 0.5, 1.0, 1.0)
    >>> d.update({"init_loss": 0.9, "n_way": 5.0})     # classification is ranked on its own
    0.5
    """

    SIGNALS = ("init_loss", "norm_init_loss")

    def __init__(self, signal: str = "init_loss", window: int = 500, warmup: int = 20):
        if signal not in self.SIGNALS:
            raise ValueError(f"difficulty signal must be one of {self.SIGNALS}, got {signal!r}")
        if int(window) < 1 or int(warmup) < 0:
            raise ValueError(f"difficulty window must be >= 1 and warmup >= 0, got {window!r}, {warmup!r}")
        self.signal, self.window, self.warmup = signal, int(window), int(warmup)
        self._recent: dict[str, list[float]] = {}  # arrival order, per kind
        self._sorted: dict[str, list[float]] = {}
        self._seen: dict[str, int] = {}  # finite signals ever added, per kind

    @classmethod
    def from_config(cls, compute: Any) -> "Difficulty":
        """From a :class:`~agent.config.ComputeConfig` (``difficulty``, ``difficulty_window``, ``difficulty_warmup``)."""
        return cls(compute.difficulty, compute.difficulty_window, compute.difficulty_warmup)

    def value(self, features: Mapping[str, float] | float) -> tuple[str, float]:
        """``(kind, signal)`` of a task's features; a bare number is a regression signal."""
        if not isinstance(features, Mapping):
            return REGRESSION, float(features)
        n_way = float(features.get("n_way", 0.0))
        if self.signal == "norm_init_loss":
            v = float(features["norm_init_loss"])
        else:
            v = float(features["init_loss"]) / (math.log(max(n_way, 2.0)) if n_way > 0 else 1.0)
        return (CLASSIFICATION if n_way > 0 else REGRESSION), v

    def estimate(self, features: Mapping[str, float] | float) -> float:
        """The difficulty of a task (features from :func:`task_features`, or a bare signal)."""
        kind, v = self.value(features)
        if not math.isfinite(v):
            return 1.0
        ranked = self._sorted.get(kind, [])
        if self._seen.get(kind, 0) < self.warmup or not ranked:
            return 0.5
        below = bisect.bisect_left(ranked, v)
        equal = bisect.bisect_right(ranked, v) - below
        return (below + 0.5 * equal) / len(ranked)

    def update(self, features: Mapping[str, float] | float) -> float:
        """Estimate for this task, then add its signal to the window."""
        d = self.estimate(features)
        kind, v = self.value(features)
        if math.isfinite(v):
            recent = self._recent.setdefault(kind, [])
            ranked = self._sorted.setdefault(kind, [])
            recent.append(v)
            bisect.insort(ranked, v)
            self._seen[kind] = self._seen.get(kind, 0) + 1
            while len(recent) > self.window:
                del ranked[bisect.bisect_left(ranked, recent.pop(0))]
        return d

    def state_dict(self) -> dict:
        return {"signal": self.signal, "recent": {k: list(v) for k, v in self._recent.items()}, "seen": dict(self._seen)}

    def load_state_dict(self, s: Mapping) -> None:
        """Restore the window; a state of another signal (or the old running-moments format) is
        dropped: its values rank a different quantity."""
        self._recent, self._sorted, self._seen = {}, {}, {}
        if s.get("signal") != self.signal:
            return
        self._seen = {k: int(v) for k, v in s.get("seen", {}).items()}
        for kind, values in s.get("recent", {}).items():
            vals = [float(v) for v in values][-self.window:]
            self._recent[kind] = vals
            self._sorted[kind] = sorted(vals)


class Policy:
    """Chooses an arm for a task from its features; learns from rewards.

    This first policy is fixed and documented: the ``default`` arm, or the ``escalate`` arm when
    the difficulty is at least ``escalate_above``. :meth:`learn` only keeps per-arm reward means
    (for inspection). A River contextual bandit replaces it by implementing the same two methods.

    Examples
    --------
    >>> p = Policy(n_arms=2, default=0, escalate=1, escalate_above=0.8)
    >>> p.choose({"difficulty": 0.2}), p.choose({"difficulty": 0.9})
    (0, 1)
    >>> p.learn({}, 1, 0.5); p.state_dict()["means"]
    [0.0, 0.5]
    """

    def __init__(self, n_arms: int, default: int = 0, escalate: int | None = None, escalate_above: float = 0.8):
        self.n_arms, self.default, self.escalate, self.escalate_above = n_arms, default, escalate, escalate_above
        self.pulls = [0] * n_arms
        self.means = [0.0] * n_arms

    def choose(self, features: Mapping[str, float]) -> int:
        if self.escalate is not None and features.get("difficulty", 0.0) >= self.escalate_above:
            return self.escalate
        return self.default

    def learn(self, features: Mapping[str, float], arm: int, reward: float) -> None:
        if not math.isfinite(reward):
            return
        self.pulls[arm] += 1
        self.means[arm] += (reward - self.means[arm]) / self.pulls[arm]

    def state_dict(self) -> dict:
        return {"pulls": list(self.pulls), "means": list(self.means)}

    def load_state_dict(self, s: Mapping) -> None:
        if len(s["pulls"]) == self.n_arms:
            self.pulls, self.means = list(s["pulls"]), list(s["means"])


def _score(task: Task, predictions: np.ndarray, fail_threshold: float) -> dict[str, Any]:
    y = np.asarray(task.query_y)
    if task.kind == CLASSIFICATION:
        acc = float(np.mean(np.asarray(predictions).reshape(-1) == y.reshape(-1)))
        return {"accuracy": acc, "failed": acc < fail_threshold, "reward": acc}
    pred = np.asarray(predictions, dtype=np.float64).reshape(y.shape[0], -1)
    yy = y.astype(np.float64).reshape(y.shape[0], -1)
    with np.errstate(over="ignore", invalid="ignore"):
        mse = float(mean_np((pred - yy) ** 2))  # np.mean / np.var without their Python wrappers
        nmse = mse / max(float(var_np(yy)), 1e-6)
    ok = math.isfinite(mse)
    return {"mse": mse if ok else math.inf, "nmse": nmse if ok else math.inf,
            "failed": (not ok) or nmse > fail_threshold, "reward": -nmse if ok else -math.inf}


# --------------------------------------------------------------------------------------------
# The agent
# --------------------------------------------------------------------------------------------
@dataclass
class _Pending:
    """An answered task waiting for its labels."""

    task: Task
    arm: int
    features: dict
    predictions: np.ndarray
    budget: dict
    embedding: np.ndarray | None
    state: dict[str, torch.Tensor]
    created: float
    online: dict = field(default_factory=dict)  # features, arm, variants, compute of the online intelligence


@dataclass
class _Adapted:
    """One adaptation's result (see :meth:`Agent._adapt`)."""

    state: Any
    out: torch.Tensor
    conf: torch.Tensor | None
    steps: int
    diverged: bool
    members: int
    flags: list
    probe_loss: float | None = None  # the answering state's support loss when the guard computed it


@dataclass
class _Job:
    """One task planned for adaptation (see :meth:`Agent._plan_task`)."""

    task: Task
    tt: TaskTensors
    feats: dict
    embedding: "_LazyEmbedding"
    x: dict
    plan: Plan
    arm: int
    alg: Algorithm
    p_budget: float
    budget: Budget
    flags: list


def _outcome_or_raise(r: "Outcome | BaseException") -> list[dict]:
    if isinstance(r, BaseException):
        raise r
    return [r.to_dict()]


def _features_from_loss(tt: TaskTensors, loss: float) -> dict[str, float]:
    """:func:`task_features` of a task whose initial support loss is known."""
    n = int(tt.support_x.shape[0])
    if tt.kind == CLASSIFICATION:
        scale, shots, nw = math.log(max(int(tt.n_way), 2)), n / int(tt.n_way), float(tt.n_way)
    else:
        scale, shots, nw = (float(tt.support_y.float().var(unbiased=False)) if n > 1 else 1.0), n, 0.0
    norm = loss / max(scale, 1e-6) if math.isfinite(loss) else math.inf
    return {"n_support": float(n), "n_way": nw, "shots": float(shots),
            "n_query": float(tt.query_x.shape[0]), "init_loss": loss, "norm_init_loss": norm}


def _answer_output(tt: TaskTensors, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Raw query outputs as answered: float64, class probabilities and their confidence."""
    out = out.double()
    if tt.kind != CLASSIFICATION:
        return out, None
    out = torch.softmax(out[..., : int(tt.n_way)], dim=-1)
    return out, out.max(dim=-1).values


def _predictions(task: Task, out: torch.Tensor) -> np.ndarray:
    """The answer's predictions from :func:`_answer_output`'s outputs: class indices, or targets in
    the shape of the task's support targets."""
    if task.kind == CLASSIFICATION:
        return out.argmax(dim=-1).numpy()
    return out.reshape(out.shape[0], *task.support_y.shape[1:]).numpy() if task.support_y.ndim > 1 \
        else out.reshape(-1).numpy()


def _plain_result(tt: TaskTensors, state, trace, out: torch.Tensor) -> _Adapted:
    """What :meth:`Agent._adapt` makes of one guarded adaptation and its query output."""
    out, conf = _answer_output(tt, out)
    return _Adapted(state, out, conf, trace.step_calls, trace.diverged, 1, ["backtracked"] if trace.backtracks else [])


def _pick_member(meta, state, best_loss: float, calls: int, diverged: bool, warm_runs) -> tuple:
    """The meta-initialisation's result against warm-started ``(meta, state, trace)`` runs: the
    lowest support loss answers (ties keep the earlier one); step calls and divergence add up.

    Returns ``(meta, state, calls, diverged, members)``.
    """
    members = 1
    for w_meta, w_state, w_trace in warm_runs:
        calls += w_trace.step_calls
        diverged = diverged or w_trace.diverged
        members += 1
        if w_trace.best_loss < best_loss:
            meta, state, best_loss = w_meta, w_state, w_trace.best_loss
    return meta, state, calls, diverged, members


class _LazyEmbedding:
    """A task's memory embedding (:meth:`Agent._embedding`), computed on the first call only.

    The embedding (a feature forward pass and a float64 ridge solve) is needed only when memory
    is searched (pre-features, ensembles) or written, so most tasks of a cold or disabled memory
    never pay for it, and none pays twice.
    """

    __slots__ = ("_agent", "_tt", "_done", "_value", "_features")

    def __init__(self, agent: "Agent", tt: TaskTensors, features: torch.Tensor | None = None):
        self._agent, self._tt, self._done, self._value, self._features = agent, tt, False, None, features

    def preset(self, value: np.ndarray | None) -> None:
        """Take the embedding computed elsewhere (a micro-batch's :meth:`Agent._embeddings`)."""
        self._value, self._done, self._features = value, True, None

    def __call__(self) -> np.ndarray | None:
        if not self._done:
            self._value, self._done = self._agent._embedding(self._tt, self._features), True
            self._features = None
        return self._value


def _state_nbytes(entry: MemoryEntry | None) -> int:
    """Bytes of a memory entry's state arrays (what :attr:`MemoryBank.nbytes` sums per entry)."""
    return 0 if entry is None else sum(int(a.nbytes) for a in entry.state.values())


STATE_FILE = "online.state"  # River state: HMAC-authenticated pickle (agent.online.persist)
KEY_FILE = "state.key"  # the HMAC key in the checkpoint root when $META_AGENT_STATE_KEY is unset


@dataclass
class RunStats:
    """Counters of one :meth:`Agent.run` call (for progress lines and the daemon's summary)."""

    records: int = 0
    tasks: int = 0
    errors: int = 0
    feedback: int = 0
    written: int = 0
    checkpoints: int = 0
    started: float = field(default_factory=time.monotonic)
    reason: str = ""

    @property
    def tasks_per_s(self) -> float:
        return self.tasks / max(time.monotonic() - self.started, 1e-9)


class _Backoff:
    """Exponential back-off of failed attempts: ``base``, ``2 * base``, ... up to ``cap`` seconds.

    Examples
    --------
    >>> b = _Backoff(1.0, 5.0)
    >>> [b.fail(0.0) for _ in range(5)], b.ready(4.9), b.ready(5.0)
    ([1.0, 2.0, 4.0, 5.0, 5.0], False, True)
    >>> b.reset(); b.ready(0.0), b.failures
    (True, 0)
    """

    def __init__(self, base: float, cap: float):
        self.base, self.cap = float(base), float(cap)
        self.failures, self.retry_at = 0, -math.inf

    def ready(self, now: float) -> bool:
        return now >= self.retry_at

    def fail(self, now: float) -> float:
        """Record a failure at ``now``; returns the delay before the next attempt."""
        delay = min(self.cap, self.base * 2.0 ** min(self.failures, 64))
        self.failures += 1
        self.retry_at = now + delay
        return delay

    def reset(self) -> None:
        self.failures, self.retry_at = 0, -math.inf


class Agent:
    """A streaming few-shot agent (see the module docstring).

    Build it with :meth:`from_config` or :meth:`load`. Not thread-safe: one thread steps it
    (the metrics server only reads the registry).

    Parameters
    ----------
    config
        A validated :class:`~agent.config.Config`.
    registry
        Prometheus registry for the agent's metrics (a fresh one by default).
    clock
        Monotonic seconds for the token bucket and the pending table's TTL (a fake in tests).
    """

    #: longest delay between attempts at a checkpoint that keeps failing (see :meth:`run`)
    CHECKPOINT_BACKOFF_MAX_S = 600.0

    def __init__(self, config: Config, *, registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.monotonic):
        from agent.nn import build_model

        self.config = config
        self.clock = clock
        ac = config.agent
        self.in_shape = tuple(ac.in_shape)
        self.out_dim = int(ac.out_dim)
        self.model = build_model(config.model.arch, in_shape=self.in_shape, out_dim=self.out_dim,
                                 **config.model.build_kwargs())
        self.algorithms: list[Algorithm] = [build(a.algorithm, self.model, **a.hyper()) for a in ac.arms]
        self.generator = torch.Generator().manual_seed(ac.seed)
        self.rng = np.random.default_rng(ac.seed)
        # One meta state shared by every arm: the model's parameters plus each algorithm's extras.
        meta: dict[str, torch.Tensor] = {}
        for alg in self.algorithms:
            for k, v in alg.init_meta(torch.Generator().manual_seed(ac.seed)).items():
                meta.setdefault(k, v)
        if ac.init_checkpoint:
            stored = ckpt.resolve(ac.init_checkpoint).load("meta.pt")
            for k, v in stored.items():
                if k in meta and meta[k].shape == v.shape:
                    meta[k] = v.detach().clone().to(meta[k].dtype).requires_grad_(meta[k].requires_grad)
        self.meta = meta
        self.learner = self.algorithms[ac.default_arm]
        self._trainable = [k for k, v in meta.items() if v.requires_grad]
        self._new_optimizer()
        self._last_good = self._snapshot()

        cc = config.compute
        self.levels = cc.budget_levels()
        self.bucket = TokenBucket(cc.rate_per_s, cc.capacity, clock=clock)
        self.policy = Policy(len(self.algorithms), ac.default_arm, ac.escalate_arm, ac.escalate_above)
        self.difficulty = Difficulty.from_config(cc)
        self.intel = OnlineIntelligence(config, seed=ac.seed)
        self._arm_index = {}
        for i, a in enumerate(ac.arms):
            self._arm_index.setdefault(a.algorithm, i)
        self._variant_algs: dict[tuple[int, float], Algorithm] = {}

        lc = config.limits
        self.limits = Limits(lc.max_record_bytes, lc.max_elements, lc.max_ways, lc.max_shots, lc.max_dim,
                             lc.max_query, lc.max_json_depth)
        self.seen = IdRegistry(lc.seen_ids)
        self.pending: OrderedDict[str, _Pending] = OrderedDict()

        mc = config.memory
        self.memory: MemoryBank | None = None
        self.projection: np.ndarray | None = None
        if mc.enabled:
            raw = 2 * self.model.feature_dim + 5
            dim = raw
            if raw > mc.dim:
                self.projection, dim = random_projection(raw, mc.dim, seed=ac.seed), mc.dim
            self.memory = MemoryBank(mc.capacity, dim, mc.eviction, rng=np.random.default_rng(ac.seed + 1),
                                     **self._index_settings())
        # float64 once, not per embedding (task_embedding(s) project in float64)
        self._projection64 = None if self.projection is None else self.projection.astype(np.float64)
        # MemoryBank.nbytes is O(entries); the memory_bytes gauge is kept from this running total
        # instead (see _memory_add), re-read in full only when the bank object is replaced.
        self._memory_tracked: MemoryBank | None = None
        self._memory_nbytes = 0

        self.replay: list[TaskTensors] = []
        self.replay_seen = 0
        self._online_batch: list[TaskTensors] = []
        self.counters = {"tasks": 0, "errors": 0, "labelled": 0, "failures": 0, "online_updates": 0,
                         "rollbacks": 0, "expired": 0, "records": 0, "checkpoints": 0}
        self.recent: list[float] = []  # recent quality scores (accuracy or MSE) for progress lines
        self.quality_name = "quality"
        self.registry = registry if registry is not None else CollectorRegistry()
        # An agent.runlog.RunLogWriter when a run directory is kept (for `meta-agent report`).
        self.run_log = None
        dc = config.drift
        self.metrics: Metrics = build_metrics(
            self.registry, algorithms=[a.name for a in self.algorithms], arms=[str(a) for a in self.intel.arms],
            detectors={"quality": dc.quality_detector, "failure": dc.failure_detector, "input": dc.input_detector}
            if dc.enabled else {},
            experiments={e.name: list(e.variants) for e in config.experiments})
        self._children: dict[tuple, Any] = {}  # metric children by (metric, label values), see _child
        self.metrics.state.state("starting")
        self.metrics.memory_capacity.set(mc.capacity if self.memory is not None else 0)
        self.stream_state: dict = {}  # source positions and sink offset of the checkpoint loaded

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Config | Mapping | str | Path | None = None, **kwargs) -> "Agent":
        """An agent from a :class:`Config`, a plain dict, or a YAML path (``None``: defaults)."""
        if isinstance(config, (str, Path)):
            config = load_config(config)
        elif not isinstance(config, Config):
            config = Config.from_dict(config)
        return cls(config, **kwargs)

    # -- public API ----------------------------------------------------------------------------
    def step(self, task: Task, *, received: float | None = None) -> Outcome:
        """Answer one task (and learn from it at once when its query labels are inline).

        Raises :class:`~agent.task.TaskError` when the task does not fit the model (input shape,
        too many ways, target size); the agent's state is unchanged then.
        """
        return self.step_many([task], received=received)[0]

    def step_many(self, tasks: Sequence[Task], *, received: float | None = None) -> list[Outcome]:
        """Answer several waiting tasks (a micro-batch) together.

        Tasks are checked first (ids not seen before, shapes that fit the model), so one that
        does not fit raises :class:`~agent.task.TaskError` before any is answered. The tasks'
        initial losses are computed in one vmapped call when the model allows it, and tasks on
        the plain path (one member) of one algorithm and shape are adapted together in lockstep
        under vmap (:func:`agent.batch.guarded_adapt_batch`: per task, the same guarded steps as
        alone). Every answer of the batch comes from the agent's state at the batch start;
        learning from inline labels follows, in order, after all are answered (see
        :meth:`_answer_batch`). One task is exactly :meth:`step`. An internal error on one task
        is raised after the others were answered.
        """
        added = []
        try:
            for t in tasks:
                if not self.seen.add(t.id):
                    e = TaskError(DUPLICATE_ID, "id", f"task {t.id!r} was already seen")
                    e.record_id = t.id
                    raise e
                added.append(t.id)
            return self._step_batch(tasks, received)
        except TaskError:
            for tid in added:
                self.seen.discard(tid)
            raise

    def _step_batch(self, tasks: Sequence[Task], received: float | None) -> list[Outcome]:
        received = time.perf_counter() if received is None else received
        prepared = self._prepare(tasks)
        if len(tasks) == 1:
            return [self._answer(tasks[0], *prepared[0][:2], received, prepared[0][2])]
        results = self._answer_batch([(t, *p) for t, p in zip(tasks, prepared)], received)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results

    def _prepare(self, tasks: Sequence[Task]) -> list[tuple[TaskTensors, dict, tuple | None]]:
        """Checks and features; changes no state, so a failure here leaves the agent as it was.

        Per task: its tensors, its features (:func:`task_features`) and ``(support features,
        initial loss, gradient norm)`` at the meta-parameters (:func:`agent.batch.start_batch`,
        one vmapped pass per shape for a batch; ``None`` where that pass could not run).
        """
        tts = [self._check(t) for t in tasks]
        feats, pre = self._features(tts)
        return list(zip(tts, feats, pre))

    def feedback(self, task_id: str, y: Any) -> dict | None:
        """Labels for a task answered earlier: score it and learn from it.

        Returns the score (``{"id", "accuracy" or "mse", "failed"}``), or ``None`` when no task
        with that id is pending (unknown, already labelled, or expired; counted in the metrics).
        Raises :class:`~agent.task.TaskError` when ``y`` does not fit the task (it stays pending).
        """
        self._expire()
        fb = y if isinstance(y, Feedback) else Feedback(task_id, np.asarray(y))
        entry = self.pending.get(task_id)
        if entry is None:
            self.metrics.feedback_unmatched.inc()
            return None
        task = entry.task.with_feedback(fb)  # raises TaskError on labels that do not fit
        del self.pending[task_id]
        self.metrics.feedback_joined.inc()
        self.metrics.feedback_pending.set(len(self.pending))
        return self._learn(task, task.to_tensors(), entry)

    def handle_line(self, line: bytes | str, *, received: float | None = None) -> list[dict]:
        """One raw record in, output records out; never raises on bad input.

        A task gives its outcome; feedback gives nothing (or an error); a bad record gives
        ``{"id", "error": {"code", "message"}}`` and counts in ``metaagent_input_errors_total``.
        """
        return self.handle_records([line], received=received)[0]

    def handle_records(self, lines: Sequence[bytes | str], *, received: float | None = None) -> list[list[dict]]:
        """Several raw records: waiting tasks are answered together (:meth:`step_many`)."""
        received = time.perf_counter() if received is None else received
        out: list[list[dict]] = [[] for _ in lines]
        batch: list[tuple[int, Task]] = []

        def flush():
            if not batch:
                return
            try:
                prepared = self._prepare([t for _, t in batch])  # ids were registered by the parser
            except Exception:  # noqa: BLE001 - one did not fit: prepare them one by one
                prepared = [None] * len(batch)
            if len(batch) > 1 and all(p is not None for p in prepared):
                results = self._answer_batch([(t, *p) for (_, t), p in zip(batch, prepared)], received)
                for (i, t), r in zip(batch, results):
                    out[i] = self._guarded(lambda r=r: _outcome_or_raise(r), t.id, registered=True)
                batch.clear()
                return
            for (i, t), p in zip(batch, prepared):
                if p is None:
                    out[i] = self._guarded(lambda t=t: [self._step_batch([t], received)[0].to_dict()], t.id,
                                           registered=True)
                else:
                    out[i] = self._guarded(lambda t=t, p=p: [self._answer(t, p[0], p[1], received, p[2]).to_dict()], t.id,
                                           registered=True)
            batch.clear()

        for i, line in enumerate(lines):
            self.counters["records"] += 1
            try:
                record = parse_record(line, limits=self.limits, data_root=self.config.agent.data_root, seen=self.seen)
            except TaskError as e:
                out[i] = [self._error(e.record_id, e.code, e.message)]
                continue
            if isinstance(record, Task):
                batch.append((i, record))
                if len(batch) >= self.config.agent.micro_batch:
                    flush()
            else:
                flush()  # feedback for a task in this batch must come after its answer
                # registered=False: a bad feedback record must not make the agent forget its task's id
                out[i] = self._guarded(lambda r=record: (self.feedback(r.id, r), [])[1], record.id)
        flush()
        return out

    def error_for_oversized(self, size: int) -> dict:
        """The error line for a record a source refused to read (longer than its line limit)."""
        return self._error(None, "record_too_large", f"record is {size} bytes, more than the source's limit")

    # -- internals: one task -------------------------------------------------------------------
    def _guarded(self, fn: Callable[[], list[dict]], task_id: str | None, *, registered: bool = False) -> list[dict]:
        """``fn()``, or an error record when it raises.

        ``registered``: ``fn`` answers the task that registered ``task_id`` in :attr:`seen` (the
        parser did), so a task refused with a :class:`~agent.task.TaskError` is forgotten and may
        be sent again. Feedback and other records never registered the id they name: a bad one
        must not unregister a task that was answered (its duplicate would be answered again).
        """
        try:
            return fn()
        except TaskError as e:
            if registered and task_id is not None:
                self.seen.discard(task_id)
            return [self._error(task_id, e.code, e.message)]
        except Exception as e:  # noqa: BLE001 - a bug or numerical trouble must not stop the stream
            log.exception("internal error on record %r", task_id)
            return [self._error(task_id, INTERNAL_ERROR, f"{type(e).__name__}: {e}")]

    def _child(self, metric, *values: str):
        """``metric.labels(*values)`` (label values in the metric's label order), looked up once:
        the per-task metric updates then skip prometheus_client's label validation and lock."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def _error(self, task_id: str | None, code: str, message: str) -> dict:
        self.counters["errors"] += 1
        self.metrics.input_errors.labels(code=code).inc()
        return error_record(task_id, code, message)

    def _check(self, task: Task) -> TaskTensors:
        shape = tuple(task.support_x.shape[1:])
        try:
            if shape != self.in_shape:
                raise TaskError(DIM_MISMATCH, "support.x", f"examples have shape {shape}, the model takes {self.in_shape}")
            if task.kind == CLASSIFICATION and task.n_way > self.out_dim:
                raise TaskError(TOO_LARGE, "support.y", f"has {task.n_way} classes, the model has {self.out_dim} outputs")
            if task.kind != CLASSIFICATION:
                size = int(np.prod(task.support_y.shape[1:])) if task.support_y.ndim > 1 else 1
                if size != self.out_dim:
                    raise TaskError(BAD_TARGET_SHAPE, "support.y", f"targets have {size} elements, the model has {self.out_dim} outputs")
        except TaskError as e:
            e.record_id = task.id
            raise
        return task.to_tensors()

    def _features(self, tts: Sequence[TaskTensors]) -> tuple[list[dict], list[tuple | None]]:
        # Initial losses, gradient norms and support features (agent.batch.start_batch): one
        # vmapped pass per shape over a micro-batch, plain autograd for a task alone; the
        # pre-features and the memory embedding reuse them instead of running the model again.
        alg = self.learner
        pre: list = [None] * len(tts)
        if batchable(alg) or len(tts) == 1:
            try:
                grad = self.config.failure.grad_features
                # with the gradient and loss for the guard's first step (start_one, keep_start)
                pre = [start_one(alg, self.meta, tts[0], grad=grad)] if len(tts) == 1 else \
                    start_batch(alg, self.meta, tts, grad=grad, keep_start=True)
            except Exception:  # noqa: BLE001 - an exotic model under vmap: fall back to the loop
                log.exception("batched features failed; computing them task by task")
                pre = [None] * len(tts)
        feats = [task_features(alg, self.meta, tt) if p is None else _features_from_loss(tt, p[1]) for p, tt in zip(pre, tts)]
        return feats, pre

    def _answer_batch(self, items: Sequence[tuple[Task, TaskTensors, dict, tuple | None]],
                      received: float) -> list["Outcome | BaseException"]:
        """Answer a micro-batch: plan every task, adapt groups together, finish, then learn.

        1. Every task is planned in order (:meth:`_plan_task`: difficulty, pre-features, arm and
           budget) before any is adapted, so planning sees the agent as it was at the batch start
           (token bucket, memory, failure predictor, selector), except for the running difficulty
           statistics and the plan's own bookkeeping, which advance task by task as in a loop.
        2. Tasks on the plain path (one ensemble member) whose algorithm and model can be batched
           (:func:`agent.batch.batchable`) are grouped by algorithm and shapes, and each group is
           adapted by :func:`agent.batch.guarded_adapt_batch` (each task gets exactly what
           :func:`~agent.compute.guarded_adapt` gives it alone) and predicted in one vmapped call.
           Other tasks use :meth:`_adapt` one by one. A group that raises falls back to that too.
        3. Each task is finished in order (:meth:`_finish`: probe and post action, outcome,
           metrics, pending entry) with the meta-parameters of the batch start.
        4. Tasks with inline labels are learned from, in order (memory, online learners, online
           meta-updates), only after every task of the batch was answered.

        So every answer of a micro-batch comes from the state at the batch start; learning from
        the batch shows in the next one. Returns an :class:`Outcome` or the exception raised for
        each task, in order.
        """
        results: list = [None] * len(items)
        jobs: list[tuple[int, _Job]] = []
        embs = self._embeddings([(tt, pre) for _, tt, _, pre in items])
        stats = self._support_stats(items)
        for k, (task, tt, feats, pre) in enumerate(items):
            try:
                jobs.append((k, self._plan_task(task, tt, feats, pre, embedding=embs[k], stats=stats[k])))
            except Exception as e:  # noqa: BLE001 - reported for this task only
                results[k] = e
        groups: dict[tuple, list[tuple[int, _Job]]] = {}
        for k, job in jobs:
            if job.budget.members == 1 and batchable(job.alg):
                key = (id(job.alg), shape_key(job.tt))  # query sizes may differ: predict_batch groups them
                groups.setdefault(key, []).append((k, job))
        done: dict[int, tuple[_Adapted, float]] = {}
        done_traces: dict[int, Any] = {}
        cc = self.config.compute
        warm = self.memory is not None and len(self.memory) > 0 and self.config.memory.warm_start == "select"
        for members in groups.values():
            if len(members) < 2:
                continue
            alg = members[0][1].alg
            t0 = time.perf_counter()
            try:
                pairs = guarded_adapt_batch(alg, self.meta, [j.tt for _, j in members], [j.budget.steps for _, j in members],
                                            starts=[self._start(items[k][3], alg) for k, _ in members], **cc.guard_kwargs())
                outs = predict_batch(alg, self.meta, [s for s, _ in pairs], [j.tt.query_x for _, j in members])
                feats = embed_batch(alg, self.meta, [s for s, _ in pairs], [j.tt.support_x for _, j in members]) \
                    if self.config.failure.enabled else [None] * len(members)
            except Exception:  # noqa: BLE001 - e.g. a model that does not vmap: adapt these one by one
                log.exception("batched adaptation failed; adapting %d tasks one by one", len(members))
                continue
            loos = self._probe_loos([j.tt for _, j in members], feats)
            share = (time.perf_counter() - t0) / len(members)
            for (k, job), (state, trace), out, f, loo in zip(members, pairs, outs, feats, loos):
                probe = {"init_loss": trace.losses[0], "probe_loss": trace.best_loss, "features": f, "loo_nmse": loo}
                done[k] = (_plain_result(job.tt, state, trace, out), share, probe)
                done_traces[k] = trace
        warmed: dict[int, tuple[_Adapted, float]] = {}
        if warm:  # memory warm starts (select) for the batched tasks: screened and adapted in batches too
            job_of = dict(jobs)
            for members in groups.values():
                ks = [k for k, _ in members if k in done]
                if not ks:
                    continue
                t0 = time.perf_counter()
                try:
                    outs = self._warm_select_batch(members[0][1].alg, [(job_of[k], done[k][0], done_traces[k]) for k in ks])
                except Exception:  # noqa: BLE001 - warm-start these tasks one by one below
                    log.exception("batched warm starts failed; trying %d tasks one by one", len(ks))
                    continue
                share = (time.perf_counter() - t0) / len(ks)
                for k, res in zip(ks, outs):
                    warmed[k] = (res, share)
        learn: list[tuple[int, _Job, _Pending]] = []
        for k, job in jobs:
            try:
                if k in warmed:
                    res, adapt_s, probe = done[k]
                    res, extra = warmed[k]
                    adapt_s += extra
                    if "warm_start" in res.flags:
                        probe = None  # the answering state is not the batched one
                elif k in done:
                    res, adapt_s, probe = done[k]
                    if warm:  # memory warm starts (select) for this task, after its batched meta-init run
                        t0 = time.perf_counter()
                        res = self._adapt(job.alg, job.tt, job.budget, job.embedding, first=(res.state, done_traces[k]))
                        adapt_s += time.perf_counter() - t0
                        if "warm_start" in res.flags:
                            probe = None  # the answering state is not the batched one
                else:
                    t0 = time.perf_counter()
                    res = self._adapt(job.alg, job.tt, job.budget, job.embedding)
                    adapt_s, probe = time.perf_counter() - t0, None
                results[k], entry = self._finish(job, res, adapt_s, received, learn=False, probe=probe)
                if entry is not None:
                    learn.append((k, job, entry))
            except Exception as e:  # noqa: BLE001
                results[k] = e
        for k, job, entry in learn:
            try:
                self._learn(job.task, job.tt, entry)
            except Exception as e:  # noqa: BLE001 - the answer is not sent when learning from it failed
                results[k] = e
        return results

    def _start(self, pre: tuple | None, alg: Algorithm) -> tuple | None:
        """The features pass's ``(gradient, loss)`` at the meta-parameters (:func:`agent.batch.start_one`,
        ``start_batch(keep_start=True)``) for ``alg``'s first guarded step: the learner's gradient is
        any plain inner loop's on the same model (the guard ignores it for other algorithms)."""
        if pre is None or len(pre) < 4 or alg.model is not self.learner.model:
            return None
        return pre[3]

    def _answer(self, task: Task, tt: TaskTensors, feats: dict, received: float, pre: tuple | None = None) -> Outcome:
        """Plan, adapt and finish one task (learning from inline labels at once)."""
        job = self._plan_task(task, tt, feats, pre)
        t0 = time.perf_counter()
        res = self._adapt(job.alg, tt, job.budget, job.embedding, start=self._start(pre, job.alg))
        return self._finish(job, res, time.perf_counter() - t0, received)[0]

    def _plan_task(self, task: Task, tt: TaskTensors, feats: dict, pre: tuple | None = None,
                   embedding: tuple | None = None, stats: Mapping[str, float] | None = None) -> "_Job":
        """Difficulty, pre-features, the plan, arm, algorithm and budget of one task.

        ``pre``: ``(support features, initial loss, gradient norm)`` at the meta-parameters from a
        batched pass over the micro-batch (:func:`agent.batch.start_batch`); computed here otherwise.
        ``embedding``: ``(memory embedding,)`` when the micro-batch computed it
        (:meth:`_embeddings`); computed lazily here otherwise. ``stats``: the task's support
        statistics when the micro-batch computed them (:meth:`_support_stats`).
        """
        m, intel, fc = self.metrics, self.intel, self.config.failure
        difficulty = self.difficulty.update(feats)
        feats = dict(feats, difficulty=difficulty)
        # computed when memory is searched or written, once
        lazy = _LazyEmbedding(self, tt, None if pre is None else pre[0])
        if embedding is not None:
            lazy.preset(embedding[0])
        embedding = lazy
        x = self._pre_features(tt, feats, embedding, pre, stats)
        plan = intel.plan(task.id, x, embedding=self._selector_embedding(embedding))
        for e in plan.drift:  # input drift: seen in the features, before any label
            m.drift_events.labels(signal=e.signal, detector=e.detector).inc()
        arm, base = self._arm_and_base(plan, feats)
        alg = self._algorithm(arm, plan.overrides.get("inner_lr"))
        p_budget = plan.p_pre if plan.warm and fc.enabled and self.config.compute.budget_by == "p_fail" else difficulty
        budget, capped = self._budget(base, p_budget)
        flags = ["budget_capped"] if capped else []
        if capped:
            m.budget_capped.inc()
        if intel.escalate_pre(plan):
            budget = bump(budget, self.levels)
            flags.append("widened")
        if str(plan.arm) in intel.reward_n:
            self._child(m.selector_pulls, str(plan.arm)).inc()
        return _Job(task, tt, feats, embedding, x, plan, arm, alg, p_budget, budget, flags)

    def _finish(self, job: "_Job", res: _Adapted, adapt_s: float, received: float, *,
                learn: bool = True, probe: Mapping[str, Any] | None = None) -> tuple[Outcome, _Pending | None]:
        """Probe and post action, the outcome, metrics, and learning or the pending entry.

        ``adapt_s``: seconds the adaptation took (the probe and any re-answer are added).
        ``probe``: what a batched pass knows of the probe already (``init_loss``, ``probe_loss``,
        ``features``; see :func:`~agent.online.features.probe_features`). With
        ``learn`` false a task with inline labels is not learned from here: its pending entry is
        returned (with the embedding of the meta state that answered) for :meth:`_learn` later.
        """
        m, intel, fc = self.metrics, self.intel, self.config.failure
        task, tt, feats, embedding, x, plan = job.task, job.tt, job.feats, job.embedding, job.x, job.plan
        arm, alg, p_budget, budget = job.arm, job.alg, job.p_budget, job.budget
        flags = list(job.flags)
        t0 = time.perf_counter() - adapt_s
        spent = res.steps
        p_fail, action = feats["difficulty"], "none"
        if fc.enabled:
            if probe is None:
                # the same support loss at the meta-parameters
                probe = {"init_loss": feats["init_loss"]} if alg is self.learner else {}
                if res.probe_loss is not None:  # the guard's loss of the answering state: the same forward pass
                    probe["probe_loss"] = res.probe_loss
            probe = probe_features(alg, self.meta, tt, state=res.state, **(probe or {}))
            p_post, action = intel.post(task.id, x, probe, plan)
            if plan.warm:
                p_fail = p_post
            action, alg, budget, res, extra = self._act(action, plan, x, alg, budget, res, tt, embedding, p_budget)
            spent += extra
            intel.count(action)
            self._child(m.decisions, action).inc()
        adapt_s = time.perf_counter() - t0
        self.bucket.take(spent)
        flags += res.flags
        flags += {"escalate": ["escalated"], "switch": ["switched"], "fallback": ["fallback"],
                  "abstain": ["likely_wrong"]}.get(action, [])
        if intel.take_drift_flag():
            flags.append("drift")

        out = res.out
        predictions = _predictions(task, out)
        finite_out = bool(np.isfinite(out.numpy()).all())
        if res.diverged:
            flags.append("diverged")
        if not finite_out:
            flags.append("nonfinite")
        latency = time.perf_counter() - received
        outcome = Outcome(task.id, predictions, None if res.conf is None else res.conf.numpy(), alg.name, budget.to_dict(),
                          spent, p_fail, tuple(flags), latency * 1000.0)

        self.counters["tasks"] += 1
        if self.run_log is not None:
            self.run_log.write_outcome(outcome, seq=self.counters["tasks"] - 1, meta=task.meta, kind=task.kind,
                                       members=res.members)
        self._child(m.tasks, alg.name, "answered" if finite_out and not res.diverged else "diverged").inc()
        self._child(m.adapt_seconds, alg.name).observe(adapt_s)
        self._child(m.task_seconds, alg.name).observe(latency)
        self._child(m.inner_steps, alg.name).observe(spent)
        m.ensemble_members.observe(res.members)
        m.budget_tokens.set(self.bucket.available())
        m.p_fail.observe(p_fail)

        online = intel.record(task.id, plan, x, alg.name, budget.steps, res.steps, spent, p_fail)
        entry = _Pending(task, self._arm_index.get(alg.name, arm), feats, predictions, budget.to_dict(), None,
                         self._compact(res.state), self.clock(), online)
        if task.query_y is not None:
            if not learn:
                entry.embedding = embedding() if self.memory is not None else None
                return outcome, entry
            self._learn(task, tt, entry, embedding=embedding)  # the meta state is unchanged since the answer
        else:
            # Labels come later, after online updates may have changed the meta state: the
            # embedding memory stores must be the one of the state that answered, so it is taken now.
            entry.embedding = embedding() if self.memory is not None else None
            self._expire()
            self.pending[task.id] = entry
            while len(self.pending) > self.config.limits.pending_max:
                self.pending.popitem(last=False)
                self._expired("capacity")
            m.feedback_pending.set(len(self.pending))
        return outcome, None

    # -- internals: the online intelligence's wiring -------------------------------------------
    def _embedding(self, tt: TaskTensors, features: torch.Tensor | None = None) -> np.ndarray | None:
        """The task's memory embedding (default algorithm), or ``None`` without memory or when degenerate.

        ``features``: the support features under the meta-parameters, when a batched pass has them."""
        if self.memory is None:
            return None
        emb = task_embedding(self.learner, self.meta, tt, projection=self._projection64, features=features)
        return emb if np.isfinite(emb).all() and np.any(emb) else None

    def _embeddings(self, items: Sequence[tuple[TaskTensors, tuple | None]]) -> list[tuple | None]:
        """A micro-batch's memory embeddings, ``(value,)`` per task as :meth:`_embedding` gives
        it, from one :func:`~agent.memory.task_embeddings` call (batched ridge solves) over the
        batched support features; ``None`` entries (embedded lazily, one by one) without memory
        or when the batched call fails."""
        if self.memory is None or len(items) < 2:
            return [None] * len(items)
        try:
            vals = task_embeddings(self.learner, self.meta, [tt for tt, _ in items], projection=self._projection64,
                                   features=[None if pre is None else pre[0] for _, pre in items])
        except Exception:  # noqa: BLE001 - e.g. a malformed task: each task embeds itself (and reports its error)
            return [None] * len(items)
        return [(v if np.isfinite(v).all() and np.any(v) else None,) for v in vals]

    def _selector_embedding(self, embedding: "_LazyEmbedding | None") -> np.ndarray | None:
        """The task embedding for the selector's arm memory (``None`` when it has none)."""
        if embedding is None or self.memory is None or not self.intel.uses_embedding:
            return None
        return embedding()

    def _support_stats(self, items: Sequence[tuple]) -> list[dict | None]:
        """A micro-batch's support statistics for the pre-features, from one
        :func:`~agent.online.features.support_stats_many` call (batched ridge fits) over the
        batched support features; ``None`` entries (computed task by task) when the call fails."""
        if len(items) < 2:
            return [None] * len(items)
        try:
            return support_stats_many([it[1] for it in items], [None if it[3] is None else it[3][0] for it in items])
        except Exception:  # noqa: BLE001 - e.g. a malformed task: each task computes its own (and reports its error)
            return [None] * len(items)

    @staticmethod
    def _probe_loos(tts: Sequence[TaskTensors], features: Sequence) -> list[float | None]:
        """The probe's ridge leave-one-out errors of a batched group (:func:`~agent.online.features.loo_nmse_many`);
        ``None`` entries (computed task by task) without features or when the call fails."""
        if len(tts) < 2 or any(f is None for f in features):
            return [None] * len(tts)
        try:
            return loo_nmse_many(tts, features)
        except Exception:  # noqa: BLE001
            return [None] * len(tts)

    def _pre_features(self, tt: TaskTensors, feats: Mapping[str, float], embedding: "_LazyEmbedding",
                      pre: tuple | None = None, stats: Mapping[str, float] | None = None) -> dict[str, float]:
        """:func:`~agent.online.features.pre_features` plus the difficulty (a cold-start prior).

        Memory is searched (and the embedding computed) only when it holds entries: an empty or
        disabled memory gives the same "no neighbours" features without one. ``pre``: support
        features, initial loss and gradient norm from a batched pass (:func:`agent.batch.start_batch`);
        ``stats``: support statistics from :meth:`_support_stats`.
        """
        emb = embedding() if self.memory is not None and len(self.memory) else None
        grad = self.config.failure.grad_features
        x = pre_features(self.learner, self.meta, tt, self.memory if emb is not None else None,
                         embedding=emb, k=self.config.memory.k, loss_and_grad=grad,
                         features=None if pre is None else pre[0], init=None if pre is None or not grad else pre[1:3],
                         stats=stats)
        extra = finite({"difficulty": feats["difficulty"],
                        "log_norm_init_loss": math.log(max(feats["norm_init_loss"], 1e-12))
                        if math.isfinite(feats["norm_init_loss"]) else math.nan}, flag="bad")
        bad = extra.pop("bad")
        x.update(extra)  # x is finite already (pre_features): only the two new values are checked
        x["nonfinite"] += bad
        return x

    def _arm_and_base(self, plan: Plan, feats: Mapping[str, float]) -> tuple[int, Budget | None]:
        """Index into ``agent.arms`` and base budget (``None``: adaptive) for the plan."""
        if self.intel.selector is None:  # selector.policy: fixed (the original escalation rule)
            i = self.policy.choose(feats)
            a = self.config.agent.arms[i]
            base = None if a.budget == "adaptive" else self.levels[min(int(a.budget), len(self.levels) - 1)]
            plan.arm = next((x for x in self.intel.arms if x.algorithm == a.algorithm), plan.arm)
            if "algorithm" in plan.overrides:
                i = self._arm_index[plan.algorithm]
            if "steps" in plan.overrides:
                base = plan.base
            return i, base
        return self._arm_index[plan.algorithm], plan.base

    def _algorithm(self, index: int, inner_lr: float | None = None) -> Algorithm:
        """Arm ``index``'s algorithm, rebuilt with another ``inner_lr`` for an experiment variant."""
        if inner_lr is None:
            return self.algorithms[index]
        key = (index, float(inner_lr))
        if key not in self._variant_algs:
            a = self.config.agent.arms[index]
            hyper = dict(a.hyper())
            if "inner_lr" in hyper:
                hyper["inner_lr"] = float(inner_lr)
            self._variant_algs[key] = build(a.algorithm, self.model, **hyper)
        return self._variant_algs[key]

    def _budget(self, base: Budget | None, p: float) -> tuple[Budget, bool]:
        if base is not None:
            return base, False
        choice = choose_budget(p, self.levels, self.bucket.available())
        return choice.budget, choice.capped

    def _act(self, action: str, plan: Plan, x, alg: Algorithm, budget: Budget, res: _Adapted, tt: TaskTensors,
             embedding, p_budget: float) -> tuple[str, Algorithm, Budget, _Adapted, int]:
        """Apply a post-probe action: re-answer with more compute, another or the safe algorithm.

        Returns the action actually applied (``"none"`` when it could not change anything),
        the answering algorithm, budget and result, and the extra inner-step calls spent.
        """
        target = None
        if action == "escalate":
            nb = bump(budget, self.levels)
            if nb == budget:
                return "none", alg, budget, res, 0
            target = (alg, nb)
        elif action in ("switch", "fallback"):
            # switch: by the arm memory's estimates where the selector has one, as when choosing
            arm = self.intel.alternative(x, alg.name, embedding=self._selector_embedding(embedding)) \
                if action == "switch" else self.intel.safe_arm
            if arm is None or (arm.algorithm == alg.name and action == "switch"):
                return "none", alg, budget, res, 0
            nb, _ = self._budget(None if arm.budget == 0 else Budget(int(arm.budget)), p_budget)
            target = (self.algorithms[self._arm_index[arm.algorithm]], nb)
        if target is None:
            return action, alg, budget, res, 0  # none, abstain: the answer stands (abstain flags it)
        new = self._adapt(target[0], tt, target[1], embedding)
        return action, target[0], target[1], new, new.steps

    def _index_settings(self) -> dict:
        mc = self.config.memory
        return {"index": mc.index, "index_min": mc.index_min, "nlist": mc.nlist, "nprobe": mc.nprobe,
                "index_seed": self.config.agent.seed + 2}

    def _neighbours(self, budget: Budget, embedding) -> list:
        """Memory neighbours for this answer (empty when memory is off, empty or not used here)."""
        mc = self.config.memory
        if self.memory is None or not len(self.memory) or mc.warm_start == "off":
            return []
        if mc.warm_start == "ensemble" and budget.members < 2:
            return []
        emb = embedding()
        if emb is None:
            return []
        t0 = time.perf_counter()
        neighbours = self.memory.query(emb, mc.k)
        self.metrics.memory_retrieval_seconds.observe(time.perf_counter() - t0)
        return neighbours

    def _adapt(self, alg: Algorithm, tt: TaskTensors, budget: Budget, embedding,
               first: tuple | None = None, start: tuple | None = None) -> _Adapted:
        """Guarded adaptation from the meta-initialisation, plus warm starts from memory.

        ``first``: the meta-initialisation's ``(state, trace)`` when it was already adapted (a
        micro-batch, :func:`agent.batch.guarded_adapt_batch`); only the warm starts run here then.
        ``start``: the support loss's gradient and value at the meta-parameters from the features
        pass (:func:`agent.batch.start_one`), for the guard's first step (the same result, one
        forward and backward pass fewer).

        ``memory.warm_start`` ``select`` (see :class:`~agent.config.MemoryConfig`): the
        meta-initialisation is adapted exactly as without memory; a neighbour's stored state is a
        candidate only if, before any step, its support loss is at most ``accept_ratio`` times the
        meta-initialisation's before adaptation (``accept_against: start``): an honest comparison,
        as neither state has seen this support set. ``adapted`` compares with the
        meta-initialisation's loss after its adaptation, an optimistic value, so it is far
        stricter. Each candidate is adapted with the same budget (zero steps allowed) and the
        member with the lowest support loss answers; ties go to the meta-initialisation. ``ensemble``: the
        held-out-weighted average of :func:`~agent.compute.ensemble_predict` over the
        meta-initialisation and the nearest neighbours, for budgets with several members.
        """
        m, cc, mc = self.metrics, self.config.compute, self.config.memory
        guard = cc.guard_kwargs()
        neighbours = self._neighbours(budget, embedding) if alg.iterative else []
        if mc.warm_start == "ensemble" and neighbours:
            inits = [None] + self._inits(alg, neighbours, budget.members - 1)
            if len(inits) > 1:
                res = ensemble_predict(alg, self.meta, tt, inits, max_steps=budget.steps, holdout=cc.holdout,
                                       generator=self.generator, **guard)
                m.memory_hits.inc(len(inits) - 1)
                return _Adapted(res.members[res.best], res.prediction, res.confidence, res.step_calls,
                                any(tr.diverged for tr in res.traces), len(inits), ["ensemble"])
        state, trace = guarded_adapt(alg, self.meta, tt, budget.steps, start=start, **guard) if first is None else first
        meta, calls, diverged, members, flags = self.meta, trace.step_calls, trace.diverged, 1, []
        if trace.backtracks:
            flags.append("backtracked")
        if mc.warm_start == "select" and neighbours:
            screened = []
            for init in self._inits(alg, neighbours, mc.k):
                w_meta = overlay(self.meta, init)
                with torch.no_grad():
                    loss0 = float(alg.support_loss(w_meta, alg.start(w_meta, tt), tt))
                if self._warm_accepted(loss0, trace):
                    screened.append((loss0, len(screened), w_meta))
            screened.sort(key=lambda t: t[:2])
            runs = [(w_meta, *guarded_adapt(alg, w_meta, tt, budget.steps, min_steps=0, **guard))
                    for _, _, w_meta in screened[: max(1, budget.members - 1)]]
            meta, state, calls, diverged, members = _pick_member(meta, state, trace.best_loss, calls, diverged, runs)
            if members > 1:
                m.memory_hits.inc(members - 1)
            if meta is not self.meta:
                flags.append("warm_start")
        with torch.no_grad():
            out, conf = _answer_output(tt, alg.predict(meta, state, tt.query_x))
        # A warm member's state holds its adapted parameters (started from the neighbour's), so
        # _compact stores what answered.
        return _Adapted(state, out, conf, calls, diverged, members, flags,
                        trace.best_loss if meta is self.meta and first is None else None)

    def _warm_accepted(self, loss0: float, trace) -> bool:
        """Whether a warm start whose support loss before any step is ``loss0`` is a candidate,
        against the meta-initialisation's ``trace`` (``memory.accept_against``, ``accept_ratio``)."""
        mc = self.config.memory
        ref = trace.best_loss if mc.accept_against == "adapted" else trace.losses[0]
        return math.isfinite(loss0) and loss0 <= mc.accept_ratio * ref

    def _warm_select_batch(self, alg: Algorithm, items: Sequence[tuple["_Job", _Adapted, Any]]) -> list[_Adapted]:
        """:meth:`_adapt` with ``first`` (memory warm starts, ``select``) for tasks of one batched
        group: ``items`` are ``(job, batched result, meta-init trace)`` with one-member budgets.

        The candidates' screening losses (every neighbour of every task) are one
        :func:`~agent.batch.start_loss_batch` call and the screened candidates are adapted by one
        :func:`~agent.batch.guarded_adapt_batch` call with one meta state per candidate; the
        decisions are :meth:`_adapt`'s, task by task, so the results equal it to float rounding.
        A task without candidates keeps its batched result.
        """
        m, mc = self.metrics, self.config.memory
        guard = self.config.compute.guard_kwargs()
        cands: list[tuple[int, dict]] = []
        for i, (job, _res, _trace) in enumerate(items):
            neighbours = self._neighbours(job.budget, job.embedding) if alg.iterative else []
            cands += [(i, overlay(self.meta, init)) for init in self._inits(alg, neighbours, mc.k)]
        losses = start_loss_batch(alg, [w for _, w in cands], [items[i][0].tt for i, _ in cands]) if cands else []
        screened: list[list] = [[] for _ in items]
        for (i, w_meta), loss0 in zip(cands, losses):
            if self._warm_accepted(loss0, items[i][2]):
                screened[i].append((loss0, len(screened[i]), w_meta))
        runs: list[tuple[int, dict]] = []
        for i, lst in enumerate(screened):
            lst.sort(key=lambda t: t[:2])
            runs += [(i, w_meta) for _, _, w_meta in lst[: max(1, items[i][0].budget.members - 1)]]
        adapted = guarded_adapt_batch(alg, [w for _, w in runs], [items[i][0].tt for i, _ in runs],
                                      [items[i][0].budget.steps for i, _ in runs], min_steps=0, **guard) if runs else []
        per_task: list[list] = [[] for _ in items]
        for (i, w_meta), (w_state, w_trace) in zip(runs, adapted):
            per_task[i].append((w_meta, w_state, w_trace))
        out = []
        for (job, res, trace), warm_runs in zip(items, per_task):
            if not warm_runs:
                out.append(res)
                continue
            meta, state, calls, diverged, members = _pick_member(self.meta, res.state, trace.best_loss, res.steps,
                                                                 res.diverged, warm_runs)
            flags = list(res.flags)
            m.memory_hits.inc(members - 1)
            if meta is self.meta:
                out.append(_Adapted(state, res.out, res.conf, calls, diverged, members, flags))
                continue
            flags.append("warm_start")
            with torch.no_grad():
                answer, conf = _answer_output(job.tt, alg.predict(meta, state, job.tt.query_x))
            out.append(_Adapted(state, answer, conf, calls, diverged, members, flags))
        return out

    def _inits(self, alg: Algorithm, neighbours, n: int) -> list[dict]:
        """Warm starts from memory: up to ``n`` neighbours' stored states (absolute parameter
        values) that pass the gates: similarity >= ``memory.min_similarity``, the same algorithm,
        not failed (``memory.skip_failed``), shapes matching the current parameters."""
        mc, out = self.config.memory, []
        for entry, sim in neighbours:
            if len(out) >= n:
                break
            if entry.algorithm != alg.name or not entry.state or sim < mc.min_similarity:
                continue
            if mc.skip_failed and entry.failed:
                continue
            init = {}
            for k, v in entry.state.items():
                ref = self.meta.get("params." + k)
                if ref is None or tuple(ref.shape) != tuple(v.shape):
                    init = None
                    break
                init[k] = torch.as_tensor(v, dtype=ref.dtype)
            if init:
                out.append(init)
        return out

    def _compact(self, state) -> dict[str, torch.Tensor]:
        """What memory keeps of an adapted state: the adapted head (or every parameter), as
        absolute values. Absolute values stay a valid warm start when online meta-learning moves
        the meta-parameters (a delta would be re-based on a head it was never computed from)."""
        keep_all = self.config.memory.state == "full"
        out = {}
        for k, v in state.params.items():
            if not (keep_all or k.startswith("head.")):
                continue
            ref = self.meta.get("params." + k)
            if ref is not None and ref.shape == v.shape:
                out[k] = v.detach().clone()
        return out

    # -- internals: learning -------------------------------------------------------------------
    def _learn(self, task: Task, tt: TaskTensors, entry: _Pending, embedding: "_LazyEmbedding | None" = None) -> dict:
        """Score a labelled task, store it in memory, feed the online learners.

        ``embedding``: the task's lazy embedding when it is learned from right after its answer
        (inline labels); otherwise ``entry.embedding``, taken when it was answered.
        """
        m, alg = self.metrics, self.algorithms[entry.arm]
        score = _score(task, entry.predictions, self.config.online.fail_threshold)
        self.counters["labelled"] += 1
        if self.run_log is not None:
            self.run_log.write_score(task.id, score.get("accuracy", score.get("mse")), bool(score["failed"]))
        self._child(m.labelled, alg.name).inc()
        if "accuracy" in score:
            self._child(m.query_accuracy, alg.name).observe(score["accuracy"])
            quality = score["accuracy"]
        else:
            if math.isfinite(score["mse"]):
                self._child(m.query_mse, alg.name).observe(score["mse"])
            quality = -score["mse"]
        self.quality_name = "accuracy" if "accuracy" in score else "mse"
        self.recent.append(score.get("accuracy", score.get("mse")))
        del self.recent[:-200]
        if score["failed"]:
            self.counters["failures"] += 1
            self._child(m.failures, alg.name).inc()
        self.policy.learn(entry.features, entry.arm, score["reward"])
        if self.memory is not None and math.isfinite(quality):
            emb = entry.embedding if embedding is None else embedding()
            if emb is not None:
                self._memory_add(MemoryEntry(task.id, emb, {k: v.numpy() for k, v in entry.state.items()},
                                             alg.name, entry.budget, quality, bool(score["failed"]), timestamp=time.time()))
        online_emb = None
        if entry.online and self.memory is not None and self.intel.uses_embedding:
            online_emb = entry.embedding if embedding is None else embedding()
        cf = self._counterfactuals(task, tt, entry) if entry.online else []  # before the meta state moves on
        if self.config.online.enabled:
            self._online_batch.append(tt)
            if len(self._online_batch) >= self.config.online.every:
                self._online_update()
        out = {"id": task.id, "failed": bool(score["failed"])}
        out.update({k: score[k] for k in ("accuracy", "mse") if k in score})
        if entry.online and self._learn_online(task.id, score, entry.online, online_emb, cf):
            out["drift"] = True
        return out

    def _counterfactuals(self, task: Task, tt: TaskTensors, entry: _Pending) -> list[tuple[str, float, int]]:
        """``(arm, quality, inner-step calls)`` of the other arms on a labelled task, for the selector
        (``selector.counterfactual``; none on the other tasks): each adapted from the current meta
        state on the support set with its base budget (one member, no warm start; an adaptive ``@0``
        arm: the first level) and scored on the query. Learning compute: summed by the online
        intelligence (``counterfactual_steps``), never charged to a reward or the token bucket."""
        rows = []
        guard = self.config.compute.guard_kwargs()
        for arm in self.intel.counterfactual_arms(entry.online.get("arm")):
            alg = self.algorithms[self._arm_index[arm.algorithm]]
            steps = int(arm.budget) if arm.budget else self.levels[0].steps
            state, trace = guarded_adapt(alg, self.meta, tt, steps, **guard)
            with torch.no_grad():
                out, _ = _answer_output(tt, alg.predict(self.meta, state, tt.query_x))
            score = _score(task, _predictions(task, out), self.config.online.fail_threshold)
            rows.append((str(arm), quality_of(score), trace.step_calls))
        return rows

    def _memory_add(self, entry: MemoryEntry) -> None:
        """Offer ``entry`` to memory; update the entries and bytes gauges in O(1).

        :meth:`MemoryBank.add` returns what left the bank (an evicted or replaced entry, or the
        offered one when reservoir sampling discards it), so the bytes held change by the new
        entry's state minus that one's: the same number :attr:`MemoryBank.nbytes` would sum.
        """
        mem = self.memory
        if self._memory_tracked is not mem:  # a bank this agent has not counted (first use, replaced)
            self._memory_tracked, self._memory_nbytes = mem, mem.nbytes
        gone = mem.add(entry)  # converts entry.state to arrays: count after
        self._memory_nbytes += _state_nbytes(entry) - _state_nbytes(gone)
        self.metrics.memory_entries.set(len(mem))
        self.metrics.memory_bytes.set(self._memory_nbytes)

    def _learn_online(self, task_id: str, score: Mapping[str, Any], info: Mapping[str, Any], embedding=None,
                      counterfactual=()) -> bool:
        """Feed a labelled outcome (and the other arms' ``counterfactual`` rows, :meth:`_counterfactuals`)
        to the online intelligence and export its state; True on a drift."""
        m, intel = self.metrics, self.intel
        failed = bool(score["failed"])
        quality = quality_of(score)
        got = intel.learn(task_id, info.get("x"), info.get("arm"), quality, failed, float(info.get("compute", 0)),
                          float(info.get("lam", intel.lam)), info.get("variants", {}), embedding=embedding)
        intel.learn_counterfactual(info.get("x"), counterfactual, float(info.get("lam", intel.lam)), embedding)
        for cf_arm, _, cf_steps in counterfactual:
            self._child(m.selector_counterfactual_steps, cf_arm).inc(cf_steps)
        self._child(m.failure_predictions, str(bool(info.get("predicted"))).lower(), str(failed).lower()).inc()
        for stage, q in intel.predictor.quality.items():
            summ = q.summary()
            self._child(m.failure_predictor_rocauc, stage).set(summ["rocauc"])
            self._child(m.failure_predictor_logloss, stage).set(summ["logloss"])
            self._child(m.failure_predictor_brier, stage).set(summ["brier"])
        arm = info.get("arm")
        if arm in intel.reward_n:
            self._child(m.selector_reward, arm).set(intel.mean_reward(arm))
        for e in got["drift"]:
            m.drift_events.labels(signal=e.signal, detector=e.detector).inc()
        for name in info.get("variants", {}):
            self._export_experiment(name)
        return bool(got["drift"])

    def _export_experiment(self, name: str) -> None:
        exp = self.intel.experiments.get(name)
        if exp is None:
            return
        st, m = exp.status(), self.metrics
        comps = {c.variant: c for c in st.comparisons}
        for v, n in st.samples.items():
            m.experiment_samples.labels(experiment=name, variant=v).set(n)
            m.experiment_winner.labels(experiment=name, variant=v).set(1.0 if st.winner == v else 0.0)
            if v in comps:
                m.experiment_p_value.labels(experiment=name, variant=v).set(comps[v].p_value)
                m.experiment_effect.labels(experiment=name, variant=v).set(comps[v].effect)

    def status(self) -> dict[str, Any]:
        """The online intelligence's state: experiments (effect, CI, p-value, samples, winner),
        failure-predictor quality, actions applied, drift detections and selector pulls."""
        return self.intel.status()

    def _new_optimizer(self) -> None:
        self.optimizer = torch.optim.Adam([self.meta[k] for k in self._trainable], lr=self.config.online.lr)

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.meta.items()}

    def _rollback(self, reason: str) -> None:
        with torch.no_grad():
            for k, v in self._last_good.items():
                self.meta[k].copy_(v)
        self._new_optimizer()  # Adam's moments may hold the fault
        self.counters["rollbacks"] += 1
        self.metrics.online_rollbacks.labels(reason=reason).inc()
        log.warning("online meta-update rolled back (%s)", reason)

    def _online_update(self) -> None:
        """One FTML-style outer step on the new labelled tasks plus a replay sample.

        Boundary-blind: no task family or drift signal is used. A non-finite loss, an exploding
        gradient or non-finite parameters roll back to the last good meta-parameters, and the
        offending tasks are not kept for replay.
        """
        oc = self.config.online
        new, self._online_batch = self._online_batch, []
        batch = list(new)
        if self.replay and oc.replay:
            idx = self.rng.choice(len(self.replay), size=min(oc.replay, len(self.replay)), replace=False)
            batch += [self.replay[i] for i in idx]
        try:
            loss, grads = self.learner.meta_gradient(self.meta, batch)
        except (RuntimeError, ValueError) as e:  # numerical trouble inside autograd
            log.warning("online meta-gradient failed: %s", e)
            self._rollback("nonfinite_loss")
            return
        self.metrics.online_loss.set(loss if math.isfinite(loss) else float("nan"))
        if not math.isfinite(loss):
            return self._rollback("nonfinite_loss")
        norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))
        if not math.isfinite(norm) or norm > oc.max_grad_norm:
            return self._rollback("grad_norm")
        scale = min(1.0, oc.clip / (norm + 1e-12)) if oc.clip else 1.0
        for k in self._trainable:
            g = grads.get(k)
            self.meta[k].grad = None if g is None else (g * scale).to(self.meta[k].dtype)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not all(bool(torch.isfinite(self.meta[k]).all()) for k in self._trainable):
            return self._rollback("nonfinite_params")
        self._last_good = self._snapshot()
        self.counters["online_updates"] += 1
        self.metrics.online_updates.inc()
        for tt in new:  # reservoir sampling keeps a uniform sample of the labelled stream
            self.replay_seen += 1
            if len(self.replay) < oc.replay_capacity:
                self.replay.append(tt)
            else:
                j = int(self.rng.integers(0, self.replay_seen))
                if j < oc.replay_capacity:
                    self.replay[j] = tt

    def _expire(self) -> None:
        ttl, now = self.config.limits.pending_ttl_s, self.clock()
        while self.pending:
            first = next(iter(self.pending.values()))
            if now - first.created < ttl:
                break
            self.pending.popitem(last=False)
            self._expired("ttl")
        self.metrics.feedback_pending.set(len(self.pending))

    def _expired(self, reason: str) -> None:
        self.counters["expired"] += 1
        self.metrics.feedback_expired.labels(reason=reason).inc()

    # -- checkpoints ---------------------------------------------------------------------------
    def state_files(self, stream: Mapping | None = None, *, key: bytes | None = None,
                    key_file: str | Path | None = None) -> dict[str, Any]:
        """The checkpoint's files (see :meth:`save`); ``key``/``key_file`` authenticate the River state."""
        now = self.clock()
        pending_meta, pending_tensors = [], {}
        for i, (tid, p) in enumerate(self.pending.items()):
            pending_meta.append({"task": p.task.to_dict(), "arm": p.arm, "features": p.features,
                                 "predictions": np.asarray(p.predictions).tolist(), "budget": p.budget,
                                 "age_s": now - p.created, "online": p.online})
            pending_tensors[str(i)] = {"state": p.state, "embedding": None if p.embedding is None
                                       else torch.from_numpy(np.array(p.embedding))}
        files: dict[str, Any] = {
            "meta.pt": self._snapshot(),
            "online.pt": {"optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                          "replay": [_tt_dict(t) for t in self.replay],
                          "batch": [_tt_dict(t) for t in self._online_batch]},  # labelled since the last update
            "pending.pt": pending_tensors,
            "pending.json": pending_meta,
            "state.json": {
                "config": self.config.to_dict(), "counters": dict(self.counters),
                "seen_ids": list(self.seen._ids), "bucket": self.bucket.state_dict(),
                "policy": self.policy.state_dict(), "difficulty": self.difficulty.state_dict(),
                "rng": self.rng.bit_generator.state, "replay_seen": self.replay_seen,
                "stream": dict(stream or {}), "saved_at": time.time(),
            },
        }
        files[STATE_FILE] = persist.dumps(self.intel, key=key, key_file=key_file,
                                          extra={"state_version": STATE_VERSION})
        if self.memory is not None:
            state = self.memory.state_dict()
            buf = io.BytesIO()
            blob = np.frombuffer(json.dumps(state["meta"]).encode(), dtype=np.uint8)
            np.savez(buf, __meta__=blob, **state["arrays"])
            files["memory.npz"] = buf.getvalue()
        return files

    def save(self, directory: str | Path, *, stream: Mapping | None = None, keep: int | None = None) -> Path:
        """Write a checkpoint under ``directory`` atomically (see :mod:`agent.checkpoint`).

        Files: ``meta.pt`` (meta-parameters; ``torch.load(weights_only=True)``), ``online.pt``
        (Adam state, generator state, replay tasks, labelled tasks waiting for the next update),
        ``memory.npz`` (the memory bank, no pickle), ``pending.json`` + ``pending.pt`` (tasks
        awaiting feedback), ``state.json`` (config, counters, answered ids, token bucket, policy,
        difficulty statistics, RNG state, and
        ``stream``: source positions and the sink offset the caller passes), and ``online.state``:
        the River state (failure predictor, selector, drift monitor, experiments) pickled with an
        HMAC tag and a version stamp (:mod:`agent.online.persist`; the key is
        ``$META_AGENT_STATE_KEY`` or ``state.key`` in ``directory``, created with mode 0600).
        """
        t0 = time.perf_counter()
        try:
            step = self.counters["records"]
            files = self.state_files(stream, key_file=Path(directory) / KEY_FILE)
            path = ckpt.save(directory, step, files, keep=keep or self.config.checkpoint.keep,
                             meta={"kind": "agent", "tasks": self.counters["tasks"]})
        except Exception:
            self.metrics.checkpoint_failures.inc()
            raise
        self.counters["checkpoints"] += 1
        self.metrics.checkpoint_seconds.observe(time.perf_counter() - t0)
        self.metrics.checkpoint_last_success.set(time.time())
        return path

    @classmethod
    def load(cls, directory: str | Path, **kwargs) -> "Agent":
        """An agent from a checkpoint (a checkpoint dir, or a dir of them: the newest good one).

        A checkpoint whose River state is refused (HMAC mismatch: tampered, or another key;
        another River or Python version) is logged as an error and the previous good checkpoint
        is tried instead; :class:`~agent.online.persist.StateError` when none is left.
        """
        directory = Path(directory)
        first = ckpt.resolve(directory)
        candidates = [first]
        if first.path.resolve() != directory.resolve():  # a directory of checkpoints: older ones may stand in
            older = [p for p in ckpt.list_checkpoints(first.path.parent) if p.name < first.path.name]
            candidates += [ckpt.open_checkpoint(p, check=False) for p in reversed(older) if not ckpt.verify(p)]
        error = None
        for found in candidates:
            try:
                state = found.load("state.json")
                agent = cls(Config.from_dict(state["config"]), **kwargs)
                agent._restore(found, state)
            except persist.StateError as e:
                log.error("checkpoint %s refused: online state %s; falling back to the previous checkpoint", found.path, e)
                error = e
                continue
            except (ckpt.CheckpointError, KeyError, ValueError, OSError) as e:
                # A manifest can be self-consistent and still lack a file the agent needs.
                log.error("checkpoint %s unusable (%s: %s); falling back to the previous checkpoint",
                          found.path, type(e).__name__, e)
                error = e
                continue
            return agent
        raise persist.StateError(f"{directory}: no usable checkpoint ({error})")

    def _restore(self, found: ckpt.Checkpoint, state: dict) -> None:
        if STATE_FILE in found:  # first: a refused River state must leave nothing half-restored
            intel = persist.loads(found.load(STATE_FILE), key_file=found.path.parent / KEY_FILE)
            if getattr(intel, "version", None) != STATE_VERSION:
                raise persist.StateError(f"online state layout {getattr(intel, 'version', None)} is not {STATE_VERSION}")
            self.intel = intel
        stored = found.load("meta.pt")
        with torch.no_grad():
            for k, v in stored.items():
                if k in self.meta:
                    self.meta[k].copy_(v)
        online = found.load("online.pt")
        self._new_optimizer()
        self.optimizer.load_state_dict(online["optimizer"])
        self.generator.set_state(online["generator"])
        self.replay = [_tt_from(d) for d in online["replay"]]
        self._online_batch = [_tt_from(d) for d in online.get("batch", [])]
        self._last_good = self._snapshot()
        self.counters.update(state["counters"])
        self.seen = IdRegistry(self.config.limits.seen_ids, state["seen_ids"])
        self.bucket = TokenBucket.from_state_dict(state["bucket"], clock=self.clock)
        self.policy.load_state_dict(state["policy"])
        self.difficulty.load_state_dict(state["difficulty"])
        self.rng.bit_generator.state = state["rng"]
        self.replay_seen = int(state["replay_seen"])
        self.stream_state = state.get("stream", {})
        if self.memory is not None and "memory.npz" in found:
            with np.load(io.BytesIO(found.load("memory.npz")), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            meta = json.loads(arrays.pop("__meta__").tobytes().decode())
            self.memory = MemoryBank.from_state_dict({"meta": meta, "arrays": arrays})
            self.memory.configure_index(**self._index_settings())  # kept if the settings match
            self._memory_tracked, self._memory_nbytes = self.memory, self.memory.nbytes
            self.metrics.memory_entries.set(len(self.memory))
            self.metrics.memory_bytes.set(self._memory_nbytes)
        now = self.clock()
        tensors = found.load("pending.pt")
        from agent.task import task_from_dict
        for i, p in enumerate(found.load("pending.json")):
            t = tensors[str(i)]
            emb = t["embedding"]
            self.pending[p["task"]["id"]] = _Pending(
                task_from_dict(p["task"], limits=self.limits), p["arm"], p["features"], np.asarray(p["predictions"]),
                p["budget"], None if emb is None else emb.numpy(), t["state"], now - float(p["age_s"]), p.get("online", {}))
        self.metrics.feedback_pending.set(len(self.pending))

    # -- the loop ------------------------------------------------------------------------------
    def run(self, source, sink, *, stop: threading.Event | None = None, feedback_source=None,
            checkpoint_dir: str | Path | None = None, checkpoint_every_s: float | None = None,
            checkpoint_every_tasks: int | None = None, max_tasks: int | None = None,
            poll_timeout: float = 0.2, on_progress: Callable[["Agent", RunStats], None] | None = None,
            progress_every_s: float = 1.0) -> RunStats:
        """Poll ``source``, answer micro-batches, write answers to ``sink``, acknowledge.

        A record is acknowledged only after its answers are written, and checkpoints record the
        acknowledged source position with the sink's offset, so a restart from any checkpoint
        loses no answered task and (with a file sink) writes no id twice. Returns when the
        source is exhausted (read-once sources), ``max_tasks`` tasks were answered, or ``stop``
        is set (the current micro-batch is finished first); a final checkpoint is written when
        ``checkpoint_dir`` is given.

        Checkpoints are due every ``checkpoint_every_s`` seconds of the agent's clock and/or every
        ``checkpoint_every_tasks`` tasks, checked after every micro-batch; with
        ``checkpoint_every_tasks`` a micro-batch is cut where the count is reached, so a checkpoint
        follows exactly every that many answered tasks (a restart replays fewer). A failed one
        (full or dead disk) is logged and counted in ``metaagent_checkpoint_failures_total`` and the stream goes on; the next attempt waits a
        back-off delay that starts at ``checkpoint_every_s`` (at 1 s when that is infinite, i.e.
        time-based checkpoints are off, or 0), doubles per consecutive failure up to
        :attr:`CHECKPOINT_BACKOFF_MAX_S` and resets on the next success. The final checkpoint is
        always attempted.
        """
        stop = stop or threading.Event()
        cc = self.config.checkpoint
        every_s = cc.every_s if checkpoint_every_s is None else checkpoint_every_s
        every_tasks = cc.every_tasks if checkpoint_every_tasks is None else checkpoint_every_tasks
        stats = RunStats()
        last_progress = time.monotonic()
        last_ckpt = self.clock()
        tasks_at_ckpt = 0
        backoff = _Backoff(every_s if 0 < every_s < math.inf else 1.0, self.CHECKPOINT_BACKOFF_MAX_S)
        micro = self.config.agent.micro_batch
        self.metrics.state.state("running")

        def stream_state():
            s = {"source": source.position(), "sink_offset": sink.offset() if hasattr(sink, "offset") else None}
            if feedback_source is not None:
                s["feedback"] = feedback_source.position()
            return s

        def maybe_checkpoint():
            nonlocal last_ckpt, tasks_at_ckpt
            if checkpoint_dir is None:
                return
            now = self.clock()
            due = now - last_ckpt >= every_s or bool(every_tasks and stats.tasks - tasks_at_ckpt >= every_tasks)
            if due and backoff.ready(now):
                ok = self._checkpoint(checkpoint_dir, stream_state())
                stats.checkpoints += 1
                if ok:
                    backoff.reset()
                    last_ckpt, tasks_at_ckpt = now, stats.tasks
                else:  # still due; retried once the back-off delay has passed
                    delay = backoff.fail(now)
                    log.warning("checkpoint: %d consecutive failures, next attempt in %.0f s",
                                backoff.failures, delay)

        def handle(src, records):
            start = 0
            while start < len(records):
                size = micro
                owed = every_tasks - (stats.tasks - tasks_at_ckpt) if every_tasks and checkpoint_dir is not None else 0
                if owed > 0:  # end the micro-batch where a checkpoint falls due (overdue ones: back-off)
                    size = min(size, owed)
                chunk = records[start:start + size]
                start += size
                plain = [r for r in chunk if not r.oversized]
                answers = iter(self.handle_records([r.data for r in plain]))
                for r in chunk:
                    outs = [self.error_for_oversized(r.size)] if r.oversized else next(answers)
                    for d in outs:
                        stats.written += bool(sink.write(d))
                        if "error" in d:
                            stats.errors += 1
                        elif "predictions" in d:
                            stats.tasks += 1
                    if not outs:
                        stats.feedback += 1
                    stats.records += 1
                    src.ack(r.position)
                maybe_checkpoint()
                if stop.is_set() or (max_tasks is not None and stats.tasks + stats.errors >= max_tasks):
                    return False
            return True

        try:
            while True:
                if stop.is_set():
                    stats.reason = "stopped"
                    break
                if max_tasks is not None and stats.tasks + stats.errors >= max_tasks:
                    stats.reason = "max_tasks"
                    break
                got = False
                if feedback_source is not None and not feedback_source.exhausted:
                    fb = feedback_source.poll(0.0)
                    got = bool(fb)
                    if fb and not handle(feedback_source, fb):
                        continue
                records = source.poll(0.0 if got else poll_timeout) if not source.exhausted else []
                if records:
                    got = True
                    if max_tasks is not None:
                        records = records[: max(0, max_tasks - stats.tasks - stats.errors) or len(records)]
                    handle(source, records)
                elif source.exhausted and (feedback_source is None or feedback_source.exhausted):
                    stats.reason = "exhausted"
                    break
                maybe_checkpoint()  # also when idle: time-based checkpoints and back-off retries
                wall = time.monotonic()
                if on_progress is not None and wall - last_progress >= progress_every_s:
                    on_progress(self, stats)
                    last_progress = wall
        finally:
            self.metrics.state.state("draining")
            if checkpoint_dir is not None:
                self._checkpoint(checkpoint_dir, stream_state())
                stats.checkpoints += 1
            if on_progress is not None:
                on_progress(self, stats)
            self.metrics.state.state("stopped")
        return stats

    def _checkpoint(self, directory, stream) -> bool:
        """:meth:`save`; False (logged, and counted by :meth:`save`) when it failed."""
        try:
            self.save(directory, stream=stream)
        except Exception:  # noqa: BLE001 - a failed checkpoint is counted; the stream goes on
            log.exception("checkpoint failed")
            return False
        return True

    def summary(self) -> dict[str, Any]:
        """Counters and the mean recent quality, for progress lines."""
        s = dict(self.counters)
        s["memory"] = len(self.memory) if self.memory is not None else 0
        s["pending"] = len(self.pending)
        finite = [v for v in self.recent if math.isfinite(v)]
        s["recent_quality"] = float(np.mean(finite)) if finite else None
        s["quality_name"] = self.quality_name
        return s


def _tt_dict(t: TaskTensors) -> dict:
    return {"support_x": t.support_x, "support_y": t.support_y, "query_x": t.query_x, "query_y": t.query_y,
            "kind": t.kind, "n_way": t.n_way}


def _tt_from(d: Mapping) -> TaskTensors:
    return TaskTensors(d["support_x"], d["support_y"], d["query_x"], d["query_y"], d["kind"], d["n_way"])
