"""Typed configuration from YAML or a dict; unknown keys and bad values are errors.

A config is a tree of frozen dataclasses, one per section (``model``, ``algorithm``, ``data``,
``train``, ``eval``). Parsing is strict: an unknown key, a wrong type or an out-of-range value
raises :class:`ConfigError` whose message starts with the dotted path of the offending key::

    train.meta_batch: must be >= 1, got 0

Sections ``algorithm`` and ``data`` are *open*: besides their common fields they accept extra
keys that are passed through to the algorithm constructor / the task family (``extra``). The
algorithm's extras are checked against its constructor's signature here; the family's when the
family is built.

Adding a section
----------------
Write a frozen dataclass whose fields have defaults (use :func:`option` for ranges and choices,
a nested dataclass for a sub-section), then add one field to :class:`Config`. Nothing else:
parsing, validation, :meth:`Config.to_dict` and dotted overrides follow from the dataclasses.

Examples
--------
>>> cfg = Config.from_dict({"train": {"meta_batch": 4, "steps": 10}})
>>> cfg.train.meta_batch, cfg.model.arch
(4, 'mlp')
>>> Config.from_dict({"train": {"meta_batch": 0}})
Traceback (most recent call last):
...
agent.config.ConfigError: train.meta_batch: must be >= 1, got 0
>>> Config.from_dict({"trian": {}})
Traceback (most recent call last):
...
agent.config.ConfigError: trian: unknown key (known: model, algorithm, data, train, eval, agent, compute, memory, online, limits, checkpoint, metrics, selector, failure, drift, experiments, probes)
>>> with_overrides(cfg, ["train.steps=20", "algorithm.inner_lr=0.1"]).train.steps
20
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Optional, Union

import yaml

__all__ = [
    "ConfigError",
    "ModelConfig",
    "AlgorithmConfig",
    "DataConfig",
    "TrainConfig",
    "EvalConfig",
    "ArmConfig",
    "AgentConfig",
    "ComputeConfig",
    "MemoryConfig",
    "OnlineConfig",
    "LimitsConfig",
    "CheckpointConfig",
    "MetricsConfig",
    "SelectorConfig",
    "FailureConfig",
    "DriftConfig",
    "ExperimentConfig",
    "ProbesConfig",
    "Config",
    "option",
    "load",
    "with_overrides",
]


class ConfigError(ValueError):
    """A configuration problem; the message starts with the dotted key path."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


def option(default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
           le: float | None = None, lt: float | None = None, choices: Iterable[Any] | None = None,
           default_factory: Any = dataclasses.MISSING, doc: str = "") -> Any:
    """A dataclass field with validation metadata (bounds apply to numbers and to list items)."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": None if choices is None else tuple(choices), "doc": doc}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


# -- sections ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    """The backbone: ``agent.nn.build_model(arch, in_shape=..., out_dim=..., norm=..., **kwargs)``.

    ``hidden`` (MLP layer widths) and ``width`` (channels of conv backbones) are passed only when
    set; ``options`` carries any other backbone keyword.
    """

    arch: str = option("mlp", choices=("mlp", "conv4", "resnet12"))
    norm: Optional[str] = option(None, doc="normalisation policy (agent.nn.NORMS); default: the backbone's")
    hidden: Optional[tuple[int, ...]] = option(None, ge=1)
    width: Optional[int] = option(None, ge=1)
    options: dict[str, Any] = option(default_factory=dict)

    def _validate(self, path: str) -> None:
        try:
            from agent.nn import NORMS
        except ImportError:  # backbones not importable: build_model will check
            return
        if self.norm is not None and self.norm not in NORMS:
            raise ConfigError(f"{path}.norm", f"must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.arch == "mlp" and self.norm not in (None, "none"):
            raise ConfigError(f"{path}.norm", f"the MLP has no normalisation: use none, got {self.norm!r}")

    def build_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``build_model`` besides ``arch``, ``in_shape`` and ``out_dim``."""
        kw: dict[str, Any] = {} if self.norm is None else {"norm": self.norm}
        if self.hidden is not None:
            kw["hidden"] = tuple(self.hidden)
        if self.width is not None:
            kw["width"] = self.width
        kw.update(self.options)
        return kw


@dataclass(frozen=True)
class AlgorithmConfig:
    """The adaptation algorithm; extra keys are the algorithm's own hyperparameters."""

    name: str = "maml"
    inner_lr: float = option(0.01, gt=0.0)
    inner_steps: int = option(1, ge=0)
    first_order: bool = False
    extra: dict[str, Any] = option(default_factory=dict)

    _open = "extra"  # unknown keys of this section go here

    def hyper(self) -> dict[str, Any]:
        """Constructor keywords for ``agent.algorithms.build`` (common ones it accepts + extras)."""
        accepted = _accepted_keywords(self.name)
        common = {"inner_lr": self.inner_lr, "inner_steps": self.inner_steps, "first_order": self.first_order}
        kw = {k: v for k, v in common.items() if accepted is None or k in accepted}
        kw.update(self.extra)
        return kw

    def _validate(self, path: str) -> None:
        from agent.algorithms import NAMES

        if self.name not in NAMES:
            raise ConfigError(f"{path}.name", f"unknown algorithm {self.name!r} (known: {', '.join(NAMES)})")
        accepted = _accepted_keywords(self.name)
        if accepted is not None:
            for key in self.extra:
                if key not in accepted:
                    known = ", ".join(sorted(accepted - {"inner_lr", "inner_steps", "first_order"})) or "none"
                    raise ConfigError(f"{path}.{key}", f"unknown option for algorithm {self.name!r} (its options: {known})")


@dataclass(frozen=True)
class DataConfig:
    """The task family: ``agent.data.make_family(family, split, **kwargs)``; extra keys pass through."""

    family: str = "sinusoid"
    n_way: Optional[int] = option(None, ge=2)
    k_shot: int = option(10, ge=1)
    k_query: int = option(10, ge=1)
    extra: dict[str, Any] = option(default_factory=dict)

    _open = "extra"

    def family_kwargs(self) -> dict[str, Any]:
        """Keywords for ``make_family`` (``n_way`` only when set)."""
        kw: dict[str, Any] = {"k_shot": self.k_shot, "k_query": self.k_query}
        if self.n_way is not None:
            kw["n_way"] = self.n_way
        kw.update(self.extra)
        return kw


@dataclass(frozen=True)
class TrainConfig:
    """Meta-training: outer loop, validation, checkpoints, resources."""

    meta_batch: int = option(25, ge=1)
    steps: int = option(1000, ge=0)
    outer_lr: float = option(1e-3, gt=0.0)
    optimizer: str = option("auto", choices=("auto", "adam", "sgd"), doc="auto: SGD for Reptile, Adam otherwise")
    grad_clip: Optional[float] = option(None, gt=0.0, doc="clip the global gradient norm")
    val_every: int = option(100, ge=0, doc="0: validate only at the end")
    val_tasks: int = option(100, ge=1)
    checkpoint_every: int = option(500, ge=0, doc="0: checkpoint only at the end")
    keep_checkpoints: int = option(3, ge=1)
    max_bad_steps: int = option(100, ge=1, doc="abort after this many consecutive non-finite steps")
    log_every: int = option(0, ge=0, doc="plain log lines every N steps when not on a TTY; 0: none")
    seed: int = option(0, ge=0)
    threads: int = option(1, ge=1)
    time_limit_s: Optional[float] = option(None, gt=0.0)
    dtype: str = option("float32", choices=("float32", "float64"))
    use_vmap: Optional[bool] = None


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation: episodes of the test split, adapted with ``steps`` inner steps."""

    episodes: int = option(600, ge=1)
    seed: int = option(2024, ge=0)
    steps: Optional[tuple[int, ...]] = option(None, ge=0, doc="inner steps to report; default: algorithm.inner_steps")
    split: str = option("test", choices=("train", "val", "test"))
    confidence: float = option(0.95, gt=0.0, lt=1.0)


# -- streaming agent sections (``meta-agent run``, :class:`agent.agent.Agent`) -----------------
@dataclass(frozen=True)
class ArmConfig:
    """One arm the policy can pull: an algorithm with its hyperparameters and a budget rule.

    ``budget`` is ``"adaptive"`` (the difficulty picks a level of ``compute.levels``, capped by
    the token bucket) or a fixed level index. Extra keys are the algorithm's own options.
    """

    algorithm: str = "maml"
    inner_lr: float = option(0.01, gt=0.0)
    first_order: bool = False
    budget: Any = "adaptive"
    extra: dict[str, Any] = option(default_factory=dict)

    _open = "extra"

    def hyper(self) -> dict[str, Any]:
        return AlgorithmConfig(self.algorithm, self.inner_lr, 1, self.first_order, dict(self.extra)).hyper()

    def _validate(self, path: str) -> None:
        AlgorithmConfig(self.algorithm, self.inner_lr, 1, self.first_order, dict(self.extra))._validate(path)
        b = self.budget
        if not (b == "adaptive" or (isinstance(b, int) and not isinstance(b, bool) and b >= 0)):
            raise ConfigError(f"{path}.budget", f"must be 'adaptive' or a level index >= 0, got {_show(b)}")


@dataclass(frozen=True)
class AgentConfig:
    """The agent: input shape, model outputs, arms and the escalation policy.

    ``out_dim`` is the head width: the target size for regression, the most ways for
    classification. Tasks of another input shape are rejected (``dim_mismatch``).
    ``escalate_arm`` (an index into ``arms``) is pulled when the difficulty estimate is at
    least ``escalate_above``; otherwise ``default_arm``.
    """

    in_shape: tuple[int, ...] = option((1,), ge=1)
    out_dim: int = option(1, ge=1)
    arms: tuple[ArmConfig, ...] = (ArmConfig(),)
    default_arm: int = option(0, ge=0)
    escalate_arm: Optional[int] = option(None, ge=0)
    escalate_above: float = option(0.8, ge=0.0, le=1.0)
    init_checkpoint: Optional[str] = option(None, doc="meta-parameters from a `meta-agent train` run")
    micro_batch: int = option(8, ge=1, doc="most waiting tasks handled together")
    seed: int = option(0, ge=0)
    threads: int = option(1, ge=1)
    data_root: Optional[str] = option(None, doc="directory npz references resolve in; none: disabled")

    def _validate(self, path: str) -> None:
        if not self.arms:
            raise ConfigError(f"{path}.arms", "needs at least one arm")
        for key in ("default_arm", "escalate_arm"):
            i = getattr(self, key)
            if i is not None and i >= len(self.arms):
                raise ConfigError(f"{path}.{key}", f"must index arms (0..{len(self.arms) - 1}), got {i}")


@dataclass(frozen=True)
class ComputeConfig:
    """Test-time compute: budget levels ``[steps, members]``, how a task's level is picked, the
    token bucket, the guards.

    A task's difficulty (:class:`agent.agent.Difficulty`) is where its ``difficulty`` signal
    falls among the last ``difficulty_window`` tasks of its kind (an empirical CDF in [0, 1]);
    ``thresholds`` (default: even splits) map it to a level, and the token bucket may lower it.
    The defaults were picked on calibration sinusoid tasks (never the benchmark's test tasks;
    see ``bench/compute_scaling.py``): the absolute initial loss predicts the gain of extra
    steps, the variance-normalised one does not.
    """

    levels: tuple[tuple[int, ...], ...] = ((5, 1), (7, 1), (12, 1))
    thresholds: Optional[tuple[float, ...]] = option(None, ge=0.0, le=1.0, doc="difficulty cut points; none: even splits")
    difficulty: str = option("init_loss", choices=("init_loss", "norm_init_loss"),
                             doc="signal ranked: support loss at the meta-init (classification: / log n_way), "
                                 "or that loss / target variance")
    difficulty_window: int = option(500, ge=1, doc="recent tasks per kind the signal is ranked against")
    difficulty_warmup: int = option(20, ge=0, doc="tasks of a kind before its difficulty leaves 0.5")
    budget_by: str = option("difficulty", choices=("difficulty", "p_fail"),
                            doc="what picks the level: the difficulty, or the failure predictor once warm")
    rate_per_s: float = option(2000.0, ge=0.0, doc="inner-step units earned per second")
    capacity: float = option(4000.0, gt=0.0)
    patience: int = option(2, ge=1)
    min_rel_improvement: float = option(0.01, ge=0.0, doc="plateau: a step improving the support loss less is flat")
    max_backtracks: int = option(4, ge=0)
    holdout: Optional[float] = option(0.3, gt=0.0, lt=1.0, doc="held-out share for ensemble weights")

    def _validate(self, path: str) -> None:
        for i, level in enumerate(self.levels):
            if len(level) not in (1, 2) or any(v < (0 if j == 0 else 1) for j, v in enumerate(level)):
                raise ConfigError(f"{path}.levels[{i}]", f"must be [steps] or [steps, members], got {list(level)}")
        try:
            self.budget_levels()
        except ValueError as e:
            raise ConfigError(f"{path}.levels", str(e)) from None

    def budget_levels(self):
        """The :class:`agent.compute.BudgetLevels` these ``levels`` and ``thresholds`` describe."""
        from agent.compute import BudgetLevels

        return BudgetLevels.from_config({"levels": [list(x) for x in self.levels],
                                         **({} if self.thresholds is None else {"thresholds": list(self.thresholds)})})

    def guard_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`agent.compute.guarded_adapt` (and ``ensemble_predict``)."""
        return {"patience": self.patience, "min_rel_improvement": self.min_rel_improvement,
                "max_backtracks": self.max_backtracks}


@dataclass(frozen=True)
class MemoryConfig:
    """Episodic memory: capacity, eviction, embedding width, retrieval index, warm starts.

    ``warm_start`` ``select``: every answer adapts the meta-initialisation as without memory; a
    retrieved neighbour (similarity >= ``min_similarity``, same algorithm, not failed when
    ``skip_failed``) whose stored state fits the new support set, before any step, at least as
    well as the meta-initialisation does before its adaptation (``accept_against: start``; or
    after it: ``adapted``, far stricter), i.e. loss <= ``accept_ratio`` x that loss, is adapted too,
    with the same budget, and the member with the lowest support loss answers. Up to
    ``max(1, members - 1)`` neighbours per task. ``ensemble``: budgets with several members
    average the meta-initialisation and the nearest neighbours, weighted by held-out loss
    (``compute.holdout``). ``off``: memory only feeds the selector's features.
    """

    enabled: bool = True
    capacity: int = option(2000, ge=1)
    eviction: str = option("reservoir", choices=("reservoir", "diversity"))
    dim: int = option(64, ge=1, le=64, doc="embeddings are projected to this width")
    k: int = option(4, ge=1, doc="neighbours looked up per task")
    state: str = option("head", choices=("head", "full"), doc="what of an adapted state is kept (absolute values)")
    index: str = option("ivf", choices=("exact", "ivf"), doc="k-NN search: exact, or an IVF index on large banks")
    index_min: int = option(20000, ge=1, doc="entries from which the IVF index is used")
    nlist: int = option(0, ge=0, doc="IVF lists; 0: sqrt(entries at training)")
    nprobe: int = option(8, ge=1, doc="IVF lists scanned per query")
    warm_start: str = option("select", choices=("select", "ensemble", "off"), doc="how neighbours' states are used")
    min_similarity: float = option(0.0, ge=-1.0, le=1.0, doc="cosine below which a neighbour is ignored")
    accept_ratio: float = option(1.0, gt=0.0, doc="select: a neighbour's start loss must be <= this x the reference")
    accept_against: str = option("start", choices=("start", "adapted"),
                                 doc="select: reference is the meta-init's support loss before (start) or after (adapted) adapting")
    skip_failed: bool = option(False, doc="ignore neighbours whose task failed")


@dataclass(frozen=True)
class OnlineConfig:
    """Online meta-learning (FTML-style outer steps on labelled tasks, with replay)."""

    enabled: bool = True
    lr: float = option(1e-3, gt=0.0)
    every: int = option(1, ge=1, doc="an outer step every N labelled tasks")
    replay: int = option(7, ge=0, doc="replayed tasks per outer step")
    replay_capacity: int = option(500, ge=1)
    max_grad_norm: float = option(1e3, gt=0.0, doc="a larger gradient norm is a fault: roll back")
    clip: Optional[float] = option(10.0, gt=0.0, doc="clip the global gradient norm below the fault level")
    fail_threshold: float = option(0.5, doc="accuracy below (classification) or normalised MSE above counts as failed")


_POLICIES = ("contextual", "fixed", "ucb", "epsilon_greedy", "thompson", "bayes_ucb", "exp3", "random")
_DETECTORS = ("adwin", "page_hinkley", "kswin", "hddm_a", "hddm_w", "ddm", "eddm", "fhddm", "none")
_VARIANT_KEYS = ("inner_lr", "steps", "algorithm", "lam")


def _check_arm_spec(spec: str, path: str, algorithms: Iterable[str]) -> None:
    name, sep, units = spec.partition("@")
    if name not in algorithms:
        raise ConfigError(path, f"algorithm {name!r} is not one of agent.arms ({', '.join(algorithms)})")
    if sep and not (units.isdigit()):
        raise ConfigError(path, f"must look like 'algorithm@steps' with steps >= 0, got {spec!r}")


@dataclass(frozen=True)
class SelectorConfig:
    """Which (algorithm, budget) arm answers a task (:mod:`agent.online.selector`).

    ``arms`` are ``"algorithm@steps"``: an algorithm of ``agent.arms`` (its hyperparameters) with a
    base budget of ``steps`` inner steps, or ``@0``: a budget picked from ``compute.levels`` by the
    predicted failure probability. Empty: one arm per ``agent.arms`` entry (``@0`` for an
    ``adaptive`` budget, else the steps of its fixed level). ``policy`` ``contextual`` is the
    per-arm River regressor with exploration, plus (``evidence_k`` > 0) per-arm k-NN reward
    estimates over similar past tasks (:mod:`agent.online.arm_memory`), fed by the chosen arm's
    reward and, on a ``counterfactual`` share of the labelled tasks, by evaluating every other arm
    on the labelled task too (adapt on the support, score on the query: learning compute, counted
    in ``counterfactual_steps``, never in the reward); ``fixed`` is the original default/escalate rule of
    ``agent``; the others are River's context-free policies (baselines).
    """

    policy: str = option("contextual", choices=_POLICIES)
    arms: tuple[str, ...] = option((), doc="'algorithm@steps' (0: adaptive); empty: one per agent arm")
    model: str = option("knn", choices=("linear", "arf", "knn"),
                        doc="contextual: per-arm reward regressor (linear, adaptive random forest, k-NN)")
    exploration: str = option("egreedy", choices=("egreedy", "ucb"))
    epsilon: float = option(0.0, ge=0.0, le=1.0, doc="egreedy: random-arm probability (0: greedy plus count bonus)")
    bonus: Optional[float] = option(None, ge=0.0, doc="count bonus; default 0.05 (egreedy) or 0.3 (ucb)")
    burn_in: int = option(3, ge=0, doc="round-robin pulls per arm first")
    lam: float = option(0.005, ge=0.0, doc="reward = quality - lam * inner-step calls")
    reward_range: tuple[float, ...] = option((-1.0, 1.0), doc="reward scale for thompson, bayes_ucb, exp3")
    evidence_k: int = option(10, ge=0, doc="contextual: similar past tasks per arm in the arm memory "
                             "(k-NN reward estimate on the task embedding; needs memory.enabled); 0: regressors only")
    counterfactual: float = option(1.0, ge=0.0, le=1.0,
                                   doc="contextual: share of labelled tasks on which the other arms are also "
                                       "evaluated (learning compute, counted apart); 0: bandit feedback only")

    def _validate(self, path: str) -> None:
        if len(self.reward_range) != 2 or not self.reward_range[1] > self.reward_range[0]:
            raise ConfigError(f"{path}.reward_range", f"must be [low, high] with high > low, got {list(self.reward_range)}")
        if len(set(self.arms)) != len(self.arms):
            raise ConfigError(f"{path}.arms", "arms must be distinct")


@dataclass(frozen=True)
class FailureConfig:
    """The online failure predictor (:mod:`agent.online.failure`) and its actions.

    A River ``StandardScaler | LogisticRegression`` per stage (before adaptation; after the
    probe). Until ``warmup`` labelled tasks, ``p_fail`` is the difficulty estimate and no action
    is taken. Then the pre-stage probability picks the budget (and escalates it at
    ``escalate``), and the post-stage probability picks one action, from the most severe down:
    ``abstain`` (flag ``likely_wrong``), ``fallback`` (re-answer with ``safe_arm``), ``switch``
    (re-answer with the selector's best other algorithm), ``escalate`` (re-answer with the next
    budget level).
    """

    enabled: bool = True
    warmup: int = option(30, ge=0, doc="labelled tasks before p_fail is the predictor's")
    prior: float = option(0.5, ge=0.0, le=1.0, doc="P(failure) before any label")
    escalate: float = option(0.6, ge=0.0, le=1.0)
    switch: float = option(0.8, ge=0.0, le=1.0)
    fallback: float = option(0.9, ge=0.0, le=1.0)
    abstain: float = option(0.97, ge=0.0, le=1.0)
    safe_arm: Optional[str] = option(None, doc="'algorithm@steps' for fallback; default: the default agent arm")
    grad_features: bool = option(True, doc="initial gradient norm as a feature (one backward pass)")
    window: int = option(500, ge=10, doc="rolling window of AUC, log loss, Brier")

    def _validate(self, path: str) -> None:
        if not (self.escalate <= self.switch <= self.fallback <= self.abstain):
            raise ConfigError(path, "thresholds must satisfy escalate <= switch <= fallback <= abstain")


@dataclass(frozen=True)
class DriftConfig:
    """Drift detection on outcomes (:mod:`agent.online.drift`) and the reaction to a detection."""

    enabled: bool = True
    quality_detector: str = option("adwin", choices=_DETECTORS)
    failure_detector: str = option("hddm_a", choices=_DETECTORS)
    input_detector: str = option("adwin", choices=_DETECTORS, doc="on input_feature, before labels (covariate shift)")
    input_feature: str = option("log_norm_init_loss", doc="pre-adaptation task feature the input detector watches")
    boost_factor: float = option(3.0, ge=1.0, doc="selector exploration multiplier after a drift")
    boost_tasks: int = option(100, ge=0, doc="choices the exploration boost lasts")
    widen_tasks: int = option(50, ge=0, doc="tasks answered one budget level higher after a drift")

    def _validate(self, path: str) -> None:
        if self.input_detector in ("hddm_a", "hddm_w", "ddm", "eddm", "fhddm"):
            raise ConfigError(f"{path}.input_detector", f"must take real values, {self.input_detector!r} is a binary detector")


@dataclass(frozen=True)
class ExperimentConfig:
    """An online A/B test (:mod:`agent.online.experiments`).

    ``variants`` maps a variant name to overrides (``inner_lr``, ``steps``, ``algorithm``,
    ``lam``); the first is the control. A task's variant comes from a stable hash of its id.
    """

    name: str = "experiment"
    variants: dict[str, Any] = option(default_factory=dict)
    split: Optional[dict[str, Any]] = None
    metric: str = option("quality", choices=("quality", "reward"))
    alpha: float = option(0.05, gt=0.0, lt=1.0)
    min_samples: int = option(10, ge=2)

    def _validate(self, path: str) -> None:
        if len(self.variants) < 2:
            raise ConfigError(f"{path}.variants", "needs at least two variants")
        for v, over in self.variants.items():
            if not isinstance(over, Mapping):
                raise ConfigError(f"{path}.variants.{v}", "must be a mapping of overrides")
            for k, val in over.items():
                if k not in _VARIANT_KEYS:
                    raise ConfigError(f"{path}.variants.{v}.{k}", f"unknown override (known: {', '.join(_VARIANT_KEYS)})")
                if k in ("inner_lr", "lam") and (isinstance(val, bool) or not isinstance(val, (int, float)) or val < 0):
                    raise ConfigError(f"{path}.variants.{v}.{k}", f"must be a number >= 0, got {_show(val)}")
                if k == "steps" and (isinstance(val, bool) or not isinstance(val, int) or val < 0):
                    raise ConfigError(f"{path}.variants.{v}.{k}", f"must be an integer >= 0, got {_show(val)}")
        for k in (self.split or {}):
            if k not in self.variants:
                raise ConfigError(f"{path}.split.{k}", "not a variant")


@dataclass(frozen=True)
class LimitsConfig:
    """Input limits (:class:`agent.task.Limits`) plus the pending-feedback table's bounds."""

    max_record_bytes: int = option(32 * 2**20, ge=1)
    max_elements: int = option(4 * 2**20, ge=1)
    max_ways: int = option(100, ge=1)
    max_shots: int = option(1000, ge=1)
    max_dim: int = option(65536, ge=1)
    max_query: int = option(10000, ge=1)
    max_json_depth: int = option(32, ge=1)
    pending_ttl_s: float = option(3600.0, gt=0.0)
    pending_max: int = option(10000, ge=1)
    seen_ids: int = option(100000, ge=1, doc="recent task ids kept for duplicate detection")


@dataclass(frozen=True)
class CheckpointConfig:
    """Periodic checkpoints of the running agent."""

    every_s: float = option(30.0, gt=0.0)
    every_tasks: int = option(0, ge=0, doc="also every N tasks; 0: by time only")
    keep: int = option(3, ge=1)


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus exposition of the daemon."""

    addr: str = option("127.0.0.1:9108", doc="host:port, or 0 to disable")


@dataclass(frozen=True)
class ProbesConfig:
    """Periodic probes of the current meta-parameters on fixed held-out tasks of every family
    (:mod:`agent.probes`), written to the run directory (``meta-agent run --run-dir``) for the
    report's ACC, BWT, FWT and forgetting. A probe changes no agent state."""

    enabled: bool = False
    every_tasks: int = option(200, ge=1, doc="a probe every N answered tasks (and one at the end)")
    tasks_per_family: int = option(8, ge=1, doc="held-out tasks per family")
    steps: int = option(5, ge=0, doc="guarded inner steps of the default arm per probe task")
    source: str = option("auto", choices=("auto", "stream", "file", "reservoir"),
                         doc="auto: fresh tasks of a synthetic stream's families, else `file`, else a reservoir")
    file: Optional[str] = option(None, doc="JSON Lines of labelled tasks with meta.family (source file)")
    at_family: str = option("every", choices=("none", "new", "every"),
                            doc="also probe just before the first task of a new family (new) or at every family switch (every)")
    seed: int = option(1, ge=1, doc="probe tasks of a synthetic stream use its seed plus this")


@dataclass(frozen=True)
class Config:
    """The whole configuration. Add a section by adding a field here."""

    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    failure: FailureConfig = field(default_factory=FailureConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    experiments: tuple[ExperimentConfig, ...] = ()
    probes: ProbesConfig = field(default_factory=ProbesConfig)

    def _validate(self, path: str) -> None:
        algorithms = [a.algorithm for a in self.agent.arms]
        for i, spec in enumerate(self.selector.arms):
            _check_arm_spec(spec, f"selector.arms[{i}]", algorithms)
        if self.failure.safe_arm is not None:
            _check_arm_spec(self.failure.safe_arm, "failure.safe_arm", algorithms)
        names = [e.name for e in self.experiments]
        if len(set(names)) != len(names):
            raise ConfigError("experiments", "experiment names must be distinct")
        for i, e in enumerate(self.experiments):
            for v, over in e.variants.items():
                if "algorithm" in over and over["algorithm"] not in algorithms:
                    raise ConfigError(f"experiments[{i}].variants.{v}.algorithm",
                                      f"must be one of agent.arms ({', '.join(algorithms)})")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "Config":
        """Parse and validate a plain dict (``None`` gives the defaults)."""
        return _parse(cls, {} if data is None else data, "")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Config":
        """Parse a YAML file."""
        return load(path)

    def to_dict(self) -> dict[str, Any]:
        """A plain, YAML/JSON-friendly dict that :meth:`from_dict` reads back to an equal config."""
        return _dump(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# -- loading ----------------------------------------------------------------------------------
def load(path: str | Path) -> Config:
    """Read a YAML config file.

    Raises :class:`ConfigError` for a missing file, invalid YAML or an invalid config.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError("", f"cannot read config {str(p)!r}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError("", f"invalid YAML in {str(p)!r}: {e}") from None
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError("", f"{str(p)!r}: top level must be a mapping, got {type(data).__name__}")
    return Config.from_dict(data)


def with_overrides(config: Config, overrides: Iterable[str] | Mapping[str, Any]) -> Config:
    """A copy of ``config`` with dotted-key overrides (``"train.steps=20"`` or ``{"train.steps": 20}``).

    String values are read as YAML scalars (``20`` is an int, ``true`` a bool, ``[1, 5]`` a list).
    """
    data = config.to_dict()
    items = overrides.items() if isinstance(overrides, Mapping) else (_split_override(o) for o in overrides)
    for key, value in items:
        parts = key.split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                raise ConfigError(".".join(parts[: i + 1]), "not a section")
            node = nxt
        node[parts[-1]] = value
    return Config.from_dict(data)


def _split_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError("", f"override must look like section.key=value, got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        raise ConfigError(key.strip(), f"cannot parse value {value!r}") from None


# -- generic machinery ------------------------------------------------------------------------
def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _parse(cls: type, data: Any, path: str) -> Any:
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(path, f"must be a mapping, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    open_field = getattr(cls, "_open", None)
    known = [n for n in fields if n != open_field]
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, raw in data.items():
        if not isinstance(key, str):
            raise ConfigError(path, f"keys must be strings, got {_show(key)}")
        kpath = _join(path, key)
        if key not in fields or key == open_field:
            if open_field is not None:
                extra[key] = _plain(raw, kpath)
                continue
            raise ConfigError(kpath, f"unknown key (known: {', '.join(known)})")
        values[key] = _coerce(hints[key], raw, kpath, fields[key].metadata)
    if open_field is not None:
        values[open_field] = extra
    obj = cls(**values)
    validate = getattr(obj, "_validate", None)
    if validate is not None:
        validate(path)
    return obj


def _coerce(tp: Any, value: Any, path: str, meta: Mapping[str, Any]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if value is None:
            raise ConfigError(path, "must not be null")
        return _coerce(inner[0], value, path, meta) if len(inner) == 1 else value
    if dataclasses.is_dataclass(tp):
        return _parse(tp, {} if value is None else value, path)
    if tp is Any:
        return _plain(value, path)
    if origin is Literal:
        if value not in args:
            raise ConfigError(path, f"must be one of {', '.join(map(repr, args))}, got {_show(value)}")
        return value
    if origin is tuple or origin is list:
        item_t = args[0] if args else Any
        if isinstance(value, (int, float)) and not isinstance(value, bool) and item_t in (int, float):
            value = [value]  # a single number where a list is expected
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"must be a list, got {_show(value)}")
        items = [_coerce(item_t, v, f"{path}[{i}]", meta) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"must be a mapping, got {_show(value)}")
        return {str(k): _plain(v, _join(path, str(k))) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"must be true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(path, f"must be an integer, got {_show(value)}")
        value = int(value)
    elif tp is float:
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-3" as a string
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"must be a number, got {_show(value)}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(path, f"must be finite, got {value}")
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"must be a string, got {_show(value)}")
    _check_range(value, path, meta)
    return value


def _check_range(value: Any, path: str, meta: Mapping[str, Any]) -> None:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(path, f"must be one of {', '.join(map(str, choices))}, got {_show(value)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for key, ok, word in (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
                              ("le", lambda a, b: a <= b, "<="), ("lt", lambda a, b: a < b, "<")):
            bound = meta.get(key)
            if bound is not None and not ok(value, bound):
                raise ConfigError(path, f"must be {word} {bound}, got {value}")


def _plain(value: Any, path: str) -> Any:
    """Check that a pass-through value is plain data (what YAML can hold)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(k): _plain(v, _join(path, str(k))) for k, v in value.items()}
    raise ConfigError(path, f"must be plain data, got {type(value).__name__}")


def _dump(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        out: dict[str, Any] = {}
        open_field = getattr(type(obj), "_open", None)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.name == open_field:
                out.update(_dump(value))
            else:
                out[f.name] = _dump(value)
        return out
    if isinstance(value := obj, (list, tuple)):
        return [_dump(v) for v in value]
    if isinstance(obj, Mapping):
        return {k: _dump(v) for k, v in obj.items()}
    return obj


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _accepted_keywords(name: str) -> set[str] | None:
    """Keyword names the algorithm's constructor accepts (``None``: anything, via ``**kwargs``)."""
    from agent.algorithms import algorithm_class

    try:
        cls = algorithm_class(name)
    except (ImportError, AttributeError):  # not written yet: accept, fail later at build time
        return None
    accepted: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        accepted |= {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in ("self", "model")}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return accepted
    return None
