"""The agent's online intelligence: the River pieces of :mod:`agent.online` held together.

:class:`OnlineIntelligence` owns the failure predictor, the arm selector, the drift monitor and
the A/B experiments of one :class:`~agent.agent.Agent`, and nothing that touches tensors: the
agent computes features and adapts, this object decides (arm, budget, action) and learns from
outcomes. Everything it holds pickles, so the whole object is the River state the checkpoint
saves (authenticated by :mod:`agent.online.persist`).

Pure helpers (:func:`arm_specs`, :func:`quality_of`, :func:`bump`) are module functions.

Conventions
-----------
* Arms are ``algorithm@steps`` (:class:`~agent.online.selector.Arm`): an algorithm of
  ``agent.arms`` with a base budget of ``steps`` inner steps and one member, or ``@0``: a budget
  picked from ``compute.levels`` by the failure probability (``choose_budget``).
* Quality is in [0, 1], higher is better, for both kinds: the query accuracy (classification), or
  ``1 / (1 + nmse)`` with ``nmse`` the query MSE over the target variance (regression: 1 is a
  perfect fit, 0.5 is "as good as predicting the mean"). A diverged task has quality NaN, which
  :func:`~agent.online.selector.reward` maps to -1.
* Reward = quality - lam * inner-step calls spent (all members, backtracks, re-answers).
* Credit goes to what answered (:meth:`OnlineIntelligence.record`). A post-probe ``switch`` or
  ``fallback`` (or an ``escalate`` of a fixed-budget arm, or an experiment's override) answers
  with another (algorithm, budget) than the plan's arm: the selector then learns that arm's
  reward with the compute of the answering attempt only (nothing when it is not one of the
  arms), and the failure predictor learns the label with the *answering* arm's indicator
  features in the pre stage and not at all in the post stage (its probe features describe the
  first attempt, whose outcome is never scored).
* The failure predictor sees the arm: the task features plus ``alg=<name>`` (one-hot over
  ``agent.arms``) and ``arm_log_steps`` (``log1p`` of the arm's base steps, 0 for adaptive), so
  ``P(failure)`` is the probability that *this* arm fails on the task (:func:`arm_features`).

Examples
--------
>>> from agent.config import Config
>>> cfg = Config.from_dict({"agent": {"arms": [{"algorithm": "maml"}, {"algorithm": "anil", "budget": 1}]},
...                         "compute": {"levels": [[1, 1], [5, 1]]}})
>>> [str(a) for a in arm_specs(cfg)]
['maml@0', 'anil@5']
>>> quality_of({"accuracy": 0.8}), quality_of({"mse": 1.0, "nmse": 1.0})
(0.8, 0.5)
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

from agent.compute import Budget, BudgetLevels
from agent.online.arm_memory import ArmMemory
from agent.online.drift import DriftEvent, DriftMonitor
from agent.online.experiments import Experiment
from agent.online.features import PRE_KEYS
from agent.online.failure import ACTIONS, DecisionThresholds, FailurePredictor, decide
from agent.online.selector import Arm, ContextFreeSelector, ContextualSelector, make_regressor, parse_arm, reward

__all__ = ["OnlineIntelligence", "Plan", "arm_specs", "arm_features", "quality_of", "bump", "STATE_VERSION"]

#: features :attr:`DriftConfig.input_feature` may name: the pre-features plus the agent's own two
INPUT_FEATURES = (*PRE_KEYS, "difficulty", "log_norm_init_loss")

#: version of the pickled :class:`OnlineIntelligence` layout (checked on restore)
STATE_VERSION = 1


def arm_specs(config) -> list[Arm]:
    """The selector's arms from ``selector.arms``, or one per ``agent.arms`` entry (see module notes)."""
    if config.selector.arms:
        return [parse_arm(s) for s in config.selector.arms]
    out: list[Arm] = []
    for a in config.agent.arms:
        steps = 0 if a.budget == "adaptive" else config.compute.levels[min(int(a.budget), len(config.compute.levels) - 1)][0]
        arm = Arm(a.algorithm, int(steps))
        if arm not in out:
            out.append(arm)
    return out


def arm_features(x: Mapping[str, float], algorithm: str, steps: int, algorithms) -> dict[str, float]:
    """``x`` plus the arm's indicators: ``alg=<name>`` one-hot over ``algorithms``, ``arm_log_steps``.

    Examples
    --------
    >>> arm_features({"shots": 5.0}, "anil", 9, ["maml", "anil"])
    {'shots': 5.0, 'alg=maml': 0.0, 'alg=anil': 1.0, 'arm_log_steps': 2.302585092994046}
    """
    out = dict(x)
    for a in algorithms:
        out[f"alg={a}"] = 1.0 if a == algorithm else 0.0
    out["arm_log_steps"] = math.log1p(max(0, int(steps)))
    return out


def quality_of(score: Mapping[str, Any]) -> float:
    """Quality in [0, 1] of a scored task (NaN when it diverged); see the module notes."""
    if "accuracy" in score:
        return float(score["accuracy"])
    nmse = float(score.get("nmse", math.inf))
    return 1.0 / (1.0 + nmse) if math.isfinite(nmse) else math.nan


def bump(budget: Budget, levels: BudgetLevels) -> Budget:
    """The cheapest level of ``levels`` costing more than ``budget`` (``budget`` itself at the top).

    Examples
    --------
    >>> lv = BudgetLevels.from_config({"levels": [[1, 1], [5, 1], [10, 2]]})
    >>> bump(Budget(1), lv), bump(Budget(3), lv), bump(Budget(10, 2), lv)
    (Budget(steps=5, members=1), Budget(steps=5, members=1), Budget(steps=10, members=2))
    """
    for i in range(len(levels)):
        if levels[i].units > budget.units:
            return levels[i]
    return budget


@dataclass
class Plan:
    """What was decided for one task before adaptation."""

    arm: Arm
    algorithm: str
    base: Budget | None  # None: adaptive (pick a level by p_fail)
    p_pre: float
    warm: bool
    variants: dict[str, str] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    lam: float = 0.0
    features: dict[str, float] = field(default_factory=dict)  # x plus the arm's indicators (the predictor's input)
    drift: list = field(default_factory=list)  # input-drift events raised by this task's features


class OnlineIntelligence:
    """Failure predictor, selector, drift monitor and experiments of one agent (module docstring).

    Parameters
    ----------
    config
        The agent's :class:`~agent.config.Config` (sections ``selector``, ``failure``, ``drift``,
        ``experiments``).
    seed
        Seed of the selector's rng.

    Attributes
    ----------
    journal
        ``None``, or a list to which :meth:`learn` appends one dict per labelled task (task id,
        credited arm, quality, failed, compute, reward, the predictor's ``p_pre``/``p_post``
        made before the label, drift events): for benchmarks and audits.
    """

    journal: list | None = None  # class defaults, so states pickled before these existed load
    algorithms: list | None = None
    input_feature: str | None = None
    counterfactual_rate: float = 0.0
    counterfactual_tasks: int = 0
    counterfactual_steps: float = 0.0
    _cf_rng: random.Random | None = None

    def __init__(self, config, seed: int = 0):
        sc, fc, dc = config.selector, config.failure, config.drift
        self.version = STATE_VERSION
        self.arms = arm_specs(config)
        self.policy = sc.policy
        self.lam = float(sc.lam)
        if sc.policy == "contextual":
            self.selector = ContextualSelector(self.arms, make_regressor(sc.model, seed),
                                               exploration=sc.exploration, epsilon=sc.epsilon, bonus=sc.bonus,
                                               burn_in=sc.burn_in, seed=seed,
                                               evidence=ArmMemory(self.arms, k=sc.evidence_k)
                                               if sc.evidence_k and len(self.arms) > 1 else None)  # one arm: nothing to choose
            # evaluating the other arms on a labelled task (learning compute, counted apart)
            self.counterfactual_rate = float(sc.counterfactual)
            self._cf_rng = random.Random(seed)
        elif sc.policy == "fixed":
            self.selector = None  # the agent's original Policy decides
        else:
            self.selector = ContextFreeSelector(self.arms, sc.policy, burn_in=max(1, sc.burn_in),
                                                reward_range=tuple(sc.reward_range), seed=seed)
        self.thresholds = DecisionThresholds(fc.escalate, fc.switch, fc.fallback, fc.abstain)
        # A task the agent no longer holds as pending (limits.pending_max) can never get its label:
        # the predictor's own store is bounded alike (plus one micro-batch planned before learning).
        self.predictor = FailurePredictor(thresholds=self.thresholds, prior=fc.prior, window_size=fc.window,
                                          max_pending=config.limits.pending_max + config.agent.micro_batch)
        self.warmup = int(fc.warmup)
        default = config.agent.arms[config.agent.default_arm]
        self.safe_arm = parse_arm(fc.safe_arm) if fc.safe_arm else Arm(default.algorithm, 0 if default.budget == "adaptive"
                                                                        else int(config.compute.levels[min(int(default.budget), len(config.compute.levels) - 1)][0]))
        self.drift = DriftMonitor(dc.quality_detector, dc.failure_detector, dc.input_detector) if dc.enabled else None
        self.input_feature = dc.input_feature
        if dc.enabled and dc.input_detector != "none" and dc.input_feature not in INPUT_FEATURES:
            raise ValueError(f"drift.input_feature: {dc.input_feature!r} is not a pre-adaptation feature; "
                             f"known: {', '.join(INPUT_FEATURES)}")
        self.boost = (float(dc.boost_factor), int(dc.boost_tasks))
        self.widen_tasks = int(dc.widen_tasks)
        self.widen_left = 0
        self.algorithms = list(dict.fromkeys(a.algorithm for a in config.agent.arms))
        self.experiments = {e.name: Experiment(e.name, e.variants, e.split or None, e.metric, e.alpha,
                                               min_samples=e.min_samples) for e in config.experiments}
        self.actions: Counter = Counter()
        self.reward_sum: dict[str, float] = {str(a): 0.0 for a in self.arms}
        self.reward_n: dict[str, int] = {str(a): 0 for a in self.arms}
        self.drift_pending = 0  # drift events not yet shown in an output record's flags

    # -- before adaptation --------------------------------------------------------------------
    @property
    def warm(self) -> bool:
        """Whether the predictor has learned from ``warmup`` labelled tasks (its p_fail is used)."""
        return self.predictor.n_learned["pre"] >= self.warmup

    def _features(self, x: Mapping[str, float], algorithm: str, steps: int) -> dict[str, float]:
        return arm_features(x, algorithm, steps, self.algorithms or list(dict.fromkeys(a.algorithm for a in self.arms)))

    @property
    def uses_embedding(self) -> bool:
        """Whether the selector reads the task embedding (an arm memory, ``selector.evidence_k``)."""
        return getattr(self.selector, "evidence", None) is not None

    def plan(self, task_id: str, x: Mapping[str, float], embedding=None) -> Plan:
        """Arm, experiment variants and pre-stage P(failure) of that arm for a task with pre-features ``x``
        (and ``embedding``, the task embedding, for the selector's arm memory)."""
        if isinstance(self.selector, ContextualSelector):
            arm = self.selector.choose(x, embedding=embedding)
        else:
            arm = self.selector.choose(x) if self.selector is not None else self.arms[0]
        variants, overrides = {}, {}
        for name, exp in self.experiments.items():
            v = exp.assign(task_id)
            variants[name] = v
            overrides.update(exp.overrides(v))
        algorithm = str(overrides.get("algorithm", arm.algorithm))
        base = None if arm.budget == 0 else Budget(int(arm.budget))
        if "steps" in overrides:
            base = Budget(int(overrides["steps"]))
        feats = self._features(x, algorithm, 0 if base is None else base.steps)
        p_pre = self.predictor.predict_pre(feats)
        events = []
        if self.drift is not None and getattr(self, "input_feature", None) in x:
            events = self.drift.update_input(float(x[self.input_feature]))
            self._drifted(events)
        return Plan(arm, algorithm, base, p_pre, self.warm, variants, overrides, float(overrides.get("lam", self.lam)),
                    feats, events)

    def escalate_pre(self, plan: Plan) -> bool:
        """Whether to start one budget level higher: a warm pre-stage ``escalate``, or a recent drift."""
        widen = self.widen_left > 0
        if widen:
            self.widen_left -= 1
        return widen or (plan.warm and decide(p_pre=plan.p_pre, thresholds=self.thresholds) == "escalate")

    # -- after the probe ----------------------------------------------------------------------
    def post(self, task_id: str, x_pre: Mapping[str, float], x_probe: Mapping[str, float], plan: Plan) -> tuple[float, str]:
        """Post-stage P(failure) (remembered for the delayed label) and the action it calls for."""
        _, p_post = self.predictor.observe(task_id, plan.features or x_pre, x_probe)
        action = decide(p_post, thresholds=self.thresholds) if plan.warm else "none"
        return float(p_post), action

    def alternative(self, x: Mapping[str, float], exclude: str, embedding=None) -> Arm | None:
        """The best arm (by the selector's prediction: the arm memory's estimate for a task
        ``embedding`` where there is one) whose algorithm is not ``exclude``."""
        others = [a for a in self.arms if a.algorithm != exclude]
        if not others:
            return None
        if isinstance(self.selector, ContextualSelector):
            pred = self.selector.predict(x, embedding)
            return max(others, key=lambda a: pred[a])
        return others[0]

    def counterfactual_arms(self, credited: str | None) -> list[Arm]:
        """The arms to evaluate on a labelled task besides the ``credited`` one: every other arm on a
        ``selector.counterfactual`` share of the tasks (drawn with this object's own seeded rng),
        none otherwise or without a contextual selector."""
        rate = self.counterfactual_rate
        if rate <= 0 or not isinstance(self.selector, ContextualSelector) or self._cf_rng is None:
            return []
        if rate < 1 and self._cf_rng.random() >= rate:
            return []
        return [a for a in self.arms if str(a) != credited]

    def learn_counterfactual(self, x: Mapping[str, float] | None, rows, lam: float, embedding=None) -> None:
        """Teach the selector the other arms' rewards on a labelled task: ``rows`` of
        ``(arm, quality, inner-step calls)`` from evaluating them (adapted on the support, scored on
        the query). Their compute is learning compute, summed in ``counterfactual_steps``."""
        rows = list(rows)
        if not rows or not isinstance(self.selector, ContextualSelector) or x is None:
            return
        self.counterfactual_tasks += 1
        for arm, quality, compute in rows:
            self.counterfactual_steps += float(compute)
            self.selector.learn(x, parse_arm(arm), reward(quality, compute, lam), embedding=embedding, pulled=False)

    def count(self, action: str) -> None:
        self.actions[action] += 1

    def credit(self, plan: Plan, algorithm: str, steps: int) -> Arm | None:
        """The arm credited with an answer by ``algorithm`` with ``steps`` base steps (module notes).

        The plan's arm when that arm answered (its own budget, or any budget of an adaptive
        ``@0`` arm); else ``algorithm@steps`` or ``algorithm@0`` when one of the arms; else ``None``.
        """
        a = plan.arm
        if algorithm == a.algorithm and (a.budget == 0 or int(steps) == a.budget) and "algorithm" not in plan.overrides \
                and "steps" not in plan.overrides:
            return a
        for cand in (Arm(algorithm, int(steps)), Arm(algorithm, 0)):
            if cand in self.arms:
                return cand
        return None

    def record(self, task_id: str, plan: Plan, x: Mapping[str, float], algorithm: str, steps: int,
               answer_compute: float, total_compute: float, p_fail: float) -> dict[str, Any]:
        """What :meth:`learn` needs when the labels arrive (JSON-able), after the task was answered.

        ``algorithm``/``steps``: what answered (base steps of its budget); ``answer_compute``: the
        inner-step calls of the answering attempt; ``total_compute``: of every attempt. Credits
        the answer (:meth:`credit`); when another arm than planned answered, the failure
        predictor's pending entry is revised to the answering arm's features and its post-stage
        features are dropped (see the module notes).
        """
        arm = self.credit(plan, algorithm, steps)
        plain = arm == plan.arm and "algorithm" not in plan.overrides and "steps" not in plan.overrides
        feats = self._features(x, algorithm, plan.arm.budget if plain else (arm.budget if arm is not None else int(steps)))
        if feats != plan.features:
            self.predictor.revise(task_id, feats)
        return {"x": dict(x), "arm": None if arm is None else str(arm), "lam": plan.lam, "variants": dict(plan.variants),
                "compute": float(total_compute if plain else answer_compute), "total_compute": float(total_compute),
                "planned": str(plan.arm), "predicted": bool(p_fail >= 0.5)}

    # -- when labels arrive -------------------------------------------------------------------
    def learn(self, task_id: str, x: Mapping[str, float] | None, arm: str | None, quality: float, failed: bool,
              compute: float, lam: float, variants: Mapping[str, str], embedding=None) -> dict[str, Any]:
        """Feed an outcome to every piece; returns ``{"reward", "drift": [DriftEvent]}``.

        ``arm`` is the credited arm (:meth:`record`; ``None``: the selector learns nothing) and
        ``compute`` the compute charged to it; ``embedding``: the task's, for the arm memory.
        """
        pending = self.predictor.pending.get(task_id)
        probs = (pending.p_pre, pending.p_post) if pending is not None else (None, None)
        self.predictor.learn(task_id, failed=failed)
        r = reward(quality, compute, lam)
        if self.selector is not None and arm is not None and x is not None:
            a = parse_arm(arm)
            if a in self.selector.counts:
                if isinstance(self.selector, ContextualSelector):
                    self.selector.learn(x, a, r, embedding=embedding)
                else:
                    self.selector.learn(x, a, r)
        if arm in self.reward_n:
            self.reward_sum[arm] += r
            self.reward_n[arm] += 1
        for name, v in variants.items():
            exp = self.experiments.get(name)
            if exp is not None and v in exp.counts:
                exp.record(v, r if exp.metric == "reward" else quality)
        events: list[DriftEvent] = []
        if self.drift is not None:
            events = self.drift.update(quality=quality if math.isfinite(quality) else 0.0, failed=failed)
            self._drifted(events)
        if self.journal is not None:
            self.journal.append({"id": task_id, "arm": arm, "quality": quality, "failed": bool(failed),
                                 "compute": float(compute), "reward": r, "p_pre": probs[0], "p_post": probs[1],
                                 "drift": [e.signal for e in events], "x": dict(x) if x is not None else None})
        return {"reward": r, "drift": events}

    def _drifted(self, events) -> None:
        """React to drift events: boost the selector's exploration, widen budgets, flag the next output."""
        if not events:
            return
        if self.selector is not None and self.boost[1] > 0:
            self.selector.boost_exploration(*self.boost)
        self.widen_left = self.widen_tasks
        self.drift_pending += 1

    def mean_reward(self, arm: str) -> float:
        """Mean reward of ``arm`` so far (NaN before its first labelled pull)."""
        n = self.reward_n.get(arm, 0)
        return self.reward_sum[arm] / n if n else math.nan

    def take_drift_flag(self) -> bool:
        """Whether a drift was detected since the last output record (consumes the flag)."""
        if self.drift_pending:
            self.drift_pending = 0
            return True
        return False

    def status(self) -> dict[str, Any]:
        """Experiments' status (effect, CI, p-value, samples, winner) and the predictor's summary."""
        return {"experiments": {n: e.status().as_dict() for n, e in self.experiments.items()},
                "failure": self.predictor.summary(), "actions": {a: self.actions.get(a, 0) for a in ACTIONS},
                "drift": dict(self.drift.n_detections) if self.drift is not None else {},
                "selector": {str(a): n for a, n in self.selector.counts.items()} if self.selector is not None else {},
                "counterfactual": {"tasks": self.counterfactual_tasks, "steps": self.counterfactual_steps}}
