"""Choosing an (algorithm, compute budget) pair per task.

Arms are :class:`Arm` pairs such as ``maml@5`` or ``protonet@0``. The reward of a pull is
``quality - lam * compute`` (:func:`reward`), so a cheaper arm wins when it is about as good.

:class:`ContextualSelector` keeps one River regressor per arm (class default
``StandardScaler | LinearRegression``; :func:`make_regressor` builds ``linear``, ``arf`` or ``knn``
by name, the ``selector.model`` option, whose default ``knn`` was chosen by replaying the
issue-4 stream on seeds other than the benchmark's) that predicts the reward from the task
features, and picks the arm with the best prediction plus exploration:

* ``"egreedy"``: with probability ``epsilon`` a uniformly random arm, otherwise
  ``argmax pred + bonus / sqrt(n_arm)`` (a count bonus that favours rarely tried arms);
* ``"ucb"``: ``argmax pred + bonus * sqrt(log N / n_arm)`` over the per-arm predictions.

With an ``evidence`` store (:class:`~agent.online.arm_memory.ArmMemory`, the ``selector.evidence_k``
option) and a task embedding passed to :meth:`ContextualSelector.choose`, the prediction of an
arm is instead its k-NN reward estimate over similar past tasks and the bonus is
``bonus / sqrt(1 + evidence)`` (the summed similarity weight): a per-task estimate that the
regressors, over global features, average away. The regressors still learn every reward (they
answer for tasks without an embedding, and :meth:`ContextualSelector.predict` without one).

Until every arm has been chosen ``burn_in`` times the selector goes round-robin (cold start);
the round-robin counts choices (or labelled pulls, if more), so delayed labels (or an answer credited to
another arm after a switch) do not make it pick the same lagging arm again and again.
:meth:`ContextualSelector.boost_exploration` multiplies ``epsilon`` and ``bonus`` for a number of
choices (what a drift detection calls). Randomness comes only from a seeded
:class:`random.Random` held by the selector (and pickled with it).

:class:`ContextFreeSelector` puts River's context-free policies (``bandit.UCB``,
``bandit.EpsilonGreedy``, ``bandit.ThompsonSampling``, ``bandit.BayesUCB``, ``bandit.Exp3``,
``bandit.RandomPolicy``) behind the same ``choose``/``learn`` interface as baselines, working
around River 0.26 traps:

* ``ThompsonSampling()`` with its default reward object raises ``TypeError``: a ``proba.Beta()``
  is always passed;
* ``proba.Beta`` (Thompson, BayesUCB) counts any truthy reward as a success: rewards are mapped
  to [0, 1] and Bernoulli-ised with the selector's own seeded rng;
* ``BayesUCB``/``LinUCBDisjoint`` put ``burn_in`` into ``reward_scaler``: River's ``burn_in`` is
  never passed, the wrapper does the round-robin itself;
* ``Exp3.update`` on an arm that ``Exp3`` itself did not draw raises ``KeyError`` (burn-in, or a
  delayed update): the wrapper fills in the arm's current Exp3 probability first; Exp3 also
  needs rewards in [0, 1], so they are rescaled from ``reward_range``.

Examples
--------
>>> sel = ContextualSelector(["maml@5", "protonet@0"], seed=0, burn_in=2)
>>> for t in range(300):
...     x = {"shots": float(t % 2)}
...     arm = sel.choose(x)
...     good = (arm.algorithm == "maml") == (x["shots"] == 1.0)
...     sel.learn(x, arm, 1.0 if good else 0.0)
>>> str(sel.choose({"shots": 1.0}, explore=False)), str(sel.choose({"shots": 0.0}, explore=False))
('maml@5', 'protonet@0')
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from agent.online.arm_memory import ArmMemory
from river import bandit, forest, linear_model, neighbors, optim, preprocessing, proba, stats

__all__ = ["Arm", "parse_arm", "reward", "ContextualSelector", "ContextFreeSelector", "POLICIES", "REGRESSORS",
           "make_regressor"]


@dataclass(frozen=True, order=True)
class Arm:
    """An (algorithm, budget) pair; ``str(arm)`` is ``"algorithm@budget"``."""

    algorithm: str
    budget: int = 0

    def __str__(self) -> str:
        return f"{self.algorithm}@{self.budget}"


def parse_arm(spec: "Arm | str | tuple") -> Arm:
    """An :class:`Arm` from ``"maml@5"``, ``("maml", 5)`` or an ``Arm``.

    Examples
    --------
    >>> parse_arm("maml@5"), parse_arm(("anil", 10)), parse_arm("protonet")
    (Arm(algorithm='maml', budget=5), Arm(algorithm='anil', budget=10), Arm(algorithm='protonet', budget=0))
    """
    if isinstance(spec, Arm):
        return spec
    if isinstance(spec, str):
        name, _, budget = spec.partition("@")
        return Arm(name, int(budget) if budget else 0)
    name, budget = spec
    return Arm(str(name), int(budget))


def reward(quality: float, compute_units: float, lam: float) -> float:
    """``quality - lam * compute_units``; a non-finite quality (diverged) counts as ``-lam * compute - 1``.

    Examples
    --------
    >>> reward(0.9, 4.0, 0.05)
    0.7
    >>> reward(float("nan"), 1.0, 0.1)
    -1.1
    """
    if not math.isfinite(quality):
        quality = -1.0
    return float(quality) - float(lam) * float(compute_units)


def _arms(arms: Iterable) -> list[Arm]:
    out = [parse_arm(a) for a in arms]
    if not out:
        raise ValueError("at least one arm is needed")
    if len(set(out)) != len(out):
        raise ValueError("arms must be distinct")
    return out


class _Boost:
    """Exploration multiplier for a number of choices (shared by both selectors)."""

    def _init_boost(self):
        self._boost_factor = 1.0
        self._boost_left = 0
        self.chosen = {a: 0 for a in self.arms}

    def _burn_in_arm(self) -> "Arm | None":
        """The next round-robin arm while some arm was chosen fewer than ``burn_in`` times."""
        chosen = getattr(self, "chosen", None) or self.counts  # states pickled before ``chosen`` existed
        turns = {a: max(chosen[a], self.counts[a]) for a in self.arms}  # learned without a choice counts too
        lagging = min(turns.values())
        if lagging >= self.burn_in:
            return None
        return next(a for a in self.arms if turns[a] == lagging)

    def _note_choice(self, arm: "Arm") -> "Arm":
        if getattr(self, "chosen", None) is not None:
            self.chosen[arm] += 1
        return arm

    def boost_exploration(self, factor: float, duration: int) -> None:
        """Multiply exploration by ``factor`` for the next ``duration`` choices (e.g. after drift)."""
        if factor < 1 or duration < 0:
            raise ValueError("factor must be >= 1 and duration >= 0")
        self._boost_factor = float(factor)
        self._boost_left = int(duration)

    def _tick_boost(self) -> float:
        if self._boost_left > 0:
            self._boost_left -= 1
            return self._boost_factor
        return 1.0

    @property
    def boost_remaining(self) -> int:
        return self._boost_left


def default_regressor():
    """``StandardScaler | LinearRegression`` with a faster intercept (rewards sit far from 0)."""
    return preprocessing.StandardScaler() | linear_model.LinearRegression(optimizer=optim.SGD(0.01), intercept_lr=0.05)


#: names accepted by :func:`make_regressor` (``selector.model`` in the config)
REGRESSORS = ("linear", "arf", "knn")


def make_regressor(name: str = "linear", seed: int | None = 0):
    """A River reward regressor by name: ``linear`` (:func:`default_regressor`), ``arf`` or ``knn``.

    ``arf`` is ``forest.ARFRegressor`` (10 trees, seeded; no scaling needed), ``knn`` is
    ``StandardScaler | neighbors.KNNRegressor`` (10 neighbours, distance-weighted, window 500).

    Examples
    --------
    >>> type(make_regressor("arf")).__name__
    'ARFRegressor'
    >>> make_regressor("tree")
    Traceback (most recent call last):
    ...
    ValueError: selector.model: unknown regressor 'tree'; known: linear, arf, knn
    """
    if name == "linear":
        return default_regressor()
    if name == "arf":
        return forest.ARFRegressor(n_models=10, seed=seed)
    if name == "knn":
        return preprocessing.StandardScaler() | neighbors.KNNRegressor(
            n_neighbors=10, aggregation_method="weighted_mean",
            engine=neighbors.LazySearch(window_size=500))
    raise ValueError(f"selector.model: unknown regressor {name!r}; known: {', '.join(REGRESSORS)}")


def _checked(arm, known, reward: float) -> tuple["Arm", float]:
    """``arm`` parsed and known to the policy, ``reward`` a finite float (else KeyError / ValueError)."""
    arm = parse_arm(arm)
    if arm not in known:
        raise KeyError(f"unknown arm {arm}")
    r = float(reward)
    if not math.isfinite(r):
        raise ValueError("reward must be finite (use reward() to map a diverged task)")
    return arm, r


class ContextualSelector(_Boost):
    """Per-arm River regressors of the reward from task features, with exploration.

    Parameters
    ----------
    arms
        Arms (``Arm``, ``"algo@budget"`` or ``(algo, budget)``).
    model
        A River regressor cloned once per arm (default :func:`default_regressor`).
    exploration
        ``"egreedy"`` (epsilon-greedy plus count bonus) or ``"ucb"``.
    epsilon
        Random-arm probability for ``"egreedy"``.
    bonus
        Coefficient ``c`` of the count bonus ``c / sqrt(n)`` (egreedy) or ``c * sqrt(log N / n)`` (ucb);
        default 0.05 for egreedy and 0.3 for ucb (UCB has no random pulls, so a small bonus
        lets an arm whose model learned slowly during burn-in starve).
    burn_in
        Round-robin pulls per arm before the models decide.
    seed
        Seed of the selector's own rng.
    evidence
        An :class:`~agent.online.arm_memory.ArmMemory` over these arms (or ``True`` for one with
        the default settings): per-task k-NN estimates for tasks whose embedding is given.

    Examples
    --------
    With evidence, the best arm can differ between two tasks with the same features (here every
    arm's reward is learned on every task, as the agent's counterfactual evaluations give it):

    >>> import numpy as np
    >>> sel = ContextualSelector(["a@1", "b@1"], seed=0, burn_in=1, evidence=True)
    >>> e = {0: np.array([1.0, 0.0]), 1: np.array([0.0, 1.0])}
    >>> for t in range(40):
    ...     _ = sel.choose({}, embedding=e[t % 2])
    ...     for arm in sel.arms:
    ...         sel.learn({}, arm, 1.0 if (arm.algorithm == "a") == (t % 2 == 0) else 0.0, embedding=e[t % 2])
    >>> str(sel.choose({}, explore=False, embedding=e[0])), str(sel.choose({}, explore=False, embedding=e[1]))
    ('a@1', 'b@1')
    """

    evidence: ArmMemory | None = None  # class default: states pickled before it existed load
    tasks: int = 0

    def __init__(self, arms: Sequence, model=None, *, exploration: str = "egreedy", epsilon: float = 0.05,
                 bonus: float | None = None, burn_in: int = 5, seed: int | None = 0,
                 evidence: "ArmMemory | bool | None" = None):
        if exploration not in ("egreedy", "ucb"):
            raise ValueError(f"exploration must be 'egreedy' or 'ucb', got {exploration!r}")
        self.arms = _arms(arms)
        self.model = model if model is not None else default_regressor()
        self.models = {a: self.model.clone() for a in self.arms}
        self.exploration = exploration
        self.epsilon = float(epsilon)
        self.bonus = float(bonus if bonus is not None else (0.05 if exploration == "egreedy" else 0.3))
        self.burn_in = int(burn_in)
        self.seed = seed
        self._rng = random.Random(seed)
        self.counts = {a: 0 for a in self.arms}
        self.mean_reward = {a: stats.Mean() for a in self.arms}
        self.n = 0
        self.tasks = 0  # choices made while exploring: the clock of the evidence rows
        if evidence is True:
            evidence = ArmMemory(self.arms)
        if evidence is False:
            evidence = None
        if evidence is not None and set(evidence.arms) != set(self.arms):
            raise ValueError("evidence: its arms must be the selector's arms")
        self.evidence = evidence
        self._init_boost()

    def __repr__(self) -> str:
        return f"ContextualSelector(arms={[str(a) for a in self.arms]}, exploration={self.exploration!r}, n={self.n})"

    def _evidence(self, embedding) -> dict | None:
        """``{arm: (estimate, evidence)}`` from the arm memory, or None without memory or embedding."""
        if self.evidence is None or embedding is None:
            return None
        return self.evidence.estimate(embedding, self.tasks)

    def predict(self, features: Mapping[str, float], embedding=None) -> dict[Arm, float]:
        """Predicted reward of each arm for ``features`` (the evidence estimate where there is one)."""
        out = {}
        for a, m in self.models.items():
            p = m.predict_one(dict(features)) if self.counts[a] or self.mean_reward[a].n else 0.0
            out[a] = float(p) if p is not None and math.isfinite(p) else 0.0
        ev = self._evidence(embedding)
        if ev is not None:
            out.update({a: est for a, (est, _) in ev.items() if math.isfinite(est)})
        return out

    def scores(self, features: Mapping[str, float], factor: float = 1.0, embedding=None) -> dict[Arm, float]:
        """Prediction plus exploration bonus per arm (what :meth:`choose` maximises when exploiting)."""
        c = self.bonus * factor
        ev = self._evidence(embedding)
        if ev is not None:
            return {a: (est + c / math.sqrt(1.0 + w)) if math.isfinite(est) else math.inf for a, (est, w) in ev.items()}
        preds = self.predict(features)
        total = max(1, sum(self.counts.values()))
        out = {}
        chosen = getattr(self, "chosen", None) or self.counts
        for a, p in preds.items():
            n = max(self.counts[a], chosen[a])  # chosen but never credited (switched away) still counts
            if n == 0:
                out[a] = math.inf
            elif self.exploration == "ucb":
                out[a] = p + c * math.sqrt(math.log(total + 1) / n)
            else:
                out[a] = p + c / math.sqrt(n)
        return out

    def choose(self, features: Mapping[str, float], *, explore: bool = True, embedding=None) -> Arm:
        """The arm for a task with ``features`` (round-robin during burn-in); ``embedding``: the
        task's embedding, for the evidence estimates (ignored without an arm memory)."""
        factor = self._tick_boost() if explore else 1.0
        if explore:
            self.tasks += 1
            arm = self._burn_in_arm()
            if arm is not None:
                return self._note_choice(arm)
            if self.exploration == "egreedy" and self._rng.random() < min(1.0, self.epsilon * factor):
                return self._note_choice(self._rng.choice(self.arms))
        if len(self.arms) == 1:  # nothing to choose: no per-arm predictions (they cost more than the rest)
            return self._note_choice(self.arms[0]) if explore else self.arms[0]
        sc = self.scores(features, factor, embedding) if explore else self.predict(features, embedding)
        best = max(sc.values())
        arm = next(a for a in self.arms if sc[a] == best)
        return self._note_choice(arm) if explore else arm

    def learn(self, features: Mapping[str, float], arm, reward: float, embedding=None, *, pulled: bool = True) -> None:
        """Update ``arm``'s model (and the arm memory, given the task's ``embedding``) with the
        observed reward (call when the labels arrive). ``pulled`` false: a reward of an arm that did
        not answer (a counterfactual evaluation): learned, but not counted as a pull (``counts``,
        ``n``: the burn-in and the count bonus see only what answered)."""
        arm, r = _checked(arm, self.models, reward)
        self.models[arm].learn_one(dict(features), r)
        if self.evidence is not None and embedding is not None:
            self.evidence.add(embedding, arm, r, self.tasks)
        if pulled:
            self.counts[arm] += 1
            self.n += 1
        self.mean_reward[arm].update(r)


# -- River's context-free policies as baselines ------------------------------------------------

#: policy name -> whether River's policy needs 0/1 rewards (a Beta reward object)
POLICIES = {"ucb": False, "epsilon_greedy": False, "thompson": True, "bayes_ucb": True, "exp3": False, "random": False}


class ContextFreeSelector(_Boost):
    """A River context-free bandit policy behind the :class:`ContextualSelector` interface.

    Parameters
    ----------
    arms
        Arms, as for :class:`ContextualSelector`.
    policy
        One of :data:`POLICIES`.
    burn_in
        Round-robin pulls per arm, done here (never passed to River; see the module notes).
    reward_range
        ``(low, high)`` used to map rewards to [0, 1] for Thompson, BayesUCB and Exp3.
    seed
        Seed of the River policy and of this wrapper's rng.
    params
        Policy parameters: ``delta`` (UCB, default 0.1), ``epsilon`` (default 0.1) and ``decay``
        (epsilon-greedy), ``gamma`` (Exp3, default 0.1).

    Examples
    --------
    >>> sel = ContextFreeSelector(["a@1", "b@1"], policy="thompson", seed=0)
    >>> for _ in range(200):
    ...     arm = sel.choose({})
    ...     sel.learn({}, arm, 0.9 if arm.algorithm == "b" else 0.2)
    >>> sel.counts[Arm("b", 1)] > sel.counts[Arm("a", 1)]
    True
    """

    def __init__(self, arms: Sequence, policy: str = "ucb", *, burn_in: int = 1,
                 reward_range: tuple[float, float] = (0.0, 1.0), seed: int | None = 0, **params):
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
        self.arms = _arms(arms)
        self.policy_name = policy
        self.burn_in = int(burn_in)
        lo, hi = reward_range
        if not hi > lo:
            raise ValueError("reward_range must be (low, high) with high > low")
        self.reward_range = (float(lo), float(hi))
        self.seed = seed
        self._rng = random.Random(None if seed is None else seed + 1)
        self.params = dict(params)
        self.policy = self._build(policy, seed, params)
        self._ids = {str(a): a for a in self.arms}
        self.counts = {a: 0 for a in self.arms}
        self.n = 0
        self._init_boost()

    @staticmethod
    def _build(name: str, seed, params):
        if name == "ucb":
            return bandit.UCB(delta=params.get("delta", 0.1), seed=seed)
        if name == "epsilon_greedy":
            return bandit.EpsilonGreedy(epsilon=params.get("epsilon", 0.1), decay=params.get("decay", 0.0), seed=seed)
        if name == "thompson":
            # the default reward_obj raises TypeError in River 0.26
            return bandit.ThompsonSampling(reward_obj=proba.Beta(), seed=seed)
        if name == "bayes_ucb":
            # never pass burn_in: BayesUCB forwards it positionally into reward_scaler
            return bandit.BayesUCB(reward_obj=proba.Beta(), seed=seed)
        if name == "exp3":
            return bandit.Exp3(gamma=params.get("gamma", 0.1), seed=seed)
        return bandit.RandomPolicy(seed=seed)

    def __repr__(self) -> str:
        return f"ContextFreeSelector(policy={self.policy_name!r}, arms={[str(a) for a in self.arms]}, n={self.n})"

    def choose(self, features: Mapping[str, float] | None = None, *, explore: bool = True) -> Arm:
        """The next arm (``features`` are ignored: the policy is context-free)."""
        factor = self._tick_boost() if explore else 1.0
        if not explore:
            return self._ids[self.policy.pull([str(a) for a in self.arms])]
        arm = self._burn_in_arm()
        if arm is not None:
            return self._note_choice(arm)
        if factor > 1.0 and self._rng.random() < min(1.0, 0.1 * (factor - 1.0)):
            return self._note_choice(self._rng.choice(self.arms))
        return self._note_choice(self._ids[self.policy.pull([str(a) for a in self.arms])])

    def _unit(self, r: float) -> float:
        lo, hi = self.reward_range
        return min(1.0, max(0.0, (r - lo) / (hi - lo)))

    def learn(self, features: Mapping[str, float] | None, arm, reward: float) -> None:
        """Update the policy with ``arm``'s reward (mapped for policies that need it)."""
        arm, r = _checked(arm, self.counts, reward)
        key = str(arm)
        if POLICIES[self.policy_name]:
            # proba.Beta counts any truthy value as a success: Bernoulli-ise the [0, 1] reward
            r = 1 if self._rng.random() < self._unit(r) else 0
        elif self.policy_name == "exp3":
            r = self._unit(r)
            probs = self.policy._probabilities
            if key not in probs:  # an arm Exp3 did not draw itself (burn-in, delayed update): KeyError in River
                ids = [str(a) for a in self.arms]
                w = self.policy._weights
                total = sum(w[i] for i in ids)
                g = self.policy.gamma
                probs[key] = (1 - g) * w[key] / total + g / len(ids)
        self.policy.update(key, r)
        self.counts[arm] += 1
        self.n += 1
