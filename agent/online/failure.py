"""Online failure prediction with delayed labels, decisions and calibration tracking.

:class:`FailurePredictor` holds two River binary classifiers predicting ``P(failure)``:

* the *pre* stage sees features available before adaptation (drives the compute budget);
* the *post* stage sees those plus the probe features after 1-2 inner steps (drives escalation,
  switching, fallback and abstention).

What counts as a failure is a :class:`FailureDefinition`: query accuracy below a threshold, MSE
above one, or divergence (a non-finite outcome). Divergence always counts as a failure.

Labels arrive late: :meth:`FailurePredictor.observe` stores a task's features and the
probabilities predicted for it under its id (a bounded FIFO store; the oldest pending task is
dropped when full), and :meth:`FailurePredictor.learn` joins the outcome by id, updates the
online quality metrics with the probabilities *predicted before the label* (progressive
validation) and then trains both stages. Before any label, and whenever a model returns no
probability for ``True`` (tree and forest models return ``{}`` at cold start), the prior is used:
``proba.get(True, prior)``.

Quality per stage: :class:`~river.metrics.RollingROCAUC` (``window_size`` 500),
``utils.Rolling(metrics.LogLoss, window_size)`` (River 0.26 takes the class), a rolling Brier
score, and a cumulative reliability table (bins of predicted probability vs observed rate) with
its expected calibration error.

Examples
--------
>>> fp = FailurePredictor(failure=FailureDefinition("accuracy_below", 0.5), prior=0.2)
>>> fp.predict_pre({"margin": 1.0})  # cold start: the prior
0.2
>>> for i in range(400):
...     m = (i % 20) / 10 - 1  # margin in [-1, 1)
...     _ = fp.observe(f"t{i}", {"margin": m})
...     _ = fp.learn(f"t{i}", quality=0.3 if m < 0 else 0.9)
>>> fp.predict_pre({"margin": -0.9}) > 0.8 > 0.2 > fp.predict_pre({"margin": 0.9})
True
>>> decide(0.97, thresholds=DecisionThresholds())
'abstain'
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping

from river import linear_model, metrics, optim, preprocessing, utils

__all__ = ["FailureDefinition", "DecisionThresholds", "ACTIONS", "decide", "Reliability", "StageQuality",
           "FailurePredictor", "default_classifier"]

ACTIONS = ("none", "escalate", "switch", "fallback", "abstain")
_KINDS = ("accuracy_below", "mse_above", "diverged")


@dataclass(frozen=True)
class FailureDefinition:
    """What a failure is: ``accuracy_below`` / ``mse_above`` a ``threshold``, or only ``diverged``.

    Examples
    --------
    >>> FailureDefinition("accuracy_below", 0.6).is_failure(0.55)
    True
    >>> FailureDefinition("mse_above", 0.5).is_failure(0.2), FailureDefinition("diverged").is_failure(float("inf"))
    (False, True)
    """

    kind: str = "accuracy_below"
    threshold: float = 0.5

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"failure kind must be one of {_KINDS}, got {self.kind!r}")

    def is_failure(self, value: float | None = None, diverged: bool = False) -> bool:
        """Whether an outcome (accuracy or MSE, per ``kind``) is a failure; divergence always is."""
        if diverged or value is None or not math.isfinite(float(value)):
            return True if (diverged or value is not None) else False
        if self.kind == "accuracy_below":
            return float(value) < self.threshold
        if self.kind == "mse_above":
            return float(value) > self.threshold
        return False


@dataclass(frozen=True)
class DecisionThresholds:
    """P(failure) levels at which each action starts (checked from the most severe down).

    ``pre`` stage decisions only ever escalate (more compute); the post stage may escalate,
    switch algorithm, fall back to the safe algorithm, or abstain (flag ``likely_wrong``).
    """

    escalate: float = 0.5
    switch: float = 0.7
    fallback: float = 0.85
    abstain: float = 0.95

    def __post_init__(self):
        if not (self.escalate <= self.switch <= self.fallback <= self.abstain):
            raise ValueError("thresholds must satisfy escalate <= switch <= fallback <= abstain")


def decide(p_post: float | None = None, p_pre: float | None = None, thresholds: DecisionThresholds | None = None) -> str:
    """The action for the predicted failure probabilities (see :data:`ACTIONS`).

    With ``p_post`` (after the probe) every action is possible; with only ``p_pre`` the choice is
    ``"escalate"`` or ``"none"``.

    Examples
    --------
    >>> t = DecisionThresholds()
    >>> decide(0.1, thresholds=t), decide(0.6, thresholds=t), decide(0.75, thresholds=t), decide(0.9, thresholds=t)
    ('none', 'escalate', 'switch', 'fallback')
    >>> decide(p_pre=0.99, thresholds=t)
    'escalate'
    """
    t = thresholds or DecisionThresholds()
    if p_post is not None and math.isfinite(p_post):
        for action, level in (("abstain", t.abstain), ("fallback", t.fallback), ("switch", t.switch), ("escalate", t.escalate)):
            if p_post >= level:
                return action
        return "none"
    if p_pre is not None and math.isfinite(p_pre) and p_pre >= t.escalate:
        return "escalate"
    return "none"


class Reliability:
    """Cumulative reliability table: per probability bin, count, mean prediction, observed rate.

    Examples
    --------
    >>> r = Reliability(n_bins=2)
    >>> for p, y in [(0.1, False), (0.2, True), (0.9, True), (0.8, True)]:
    ...     r.update(y, p)
    >>> [(round(m, 2), round(o, 2), n) for m, o, n in r.table()]
    [(0.15, 0.5, 2), (0.85, 1.0, 2)]
    >>> round(r.ece(), 3)
    0.25
    """

    def __init__(self, n_bins: int = 10):
        self.n_bins = int(n_bins)
        self.n = [0] * self.n_bins
        self.sum_p = [0.0] * self.n_bins
        self.sum_y = [0.0] * self.n_bins

    def update(self, y: bool, p: float) -> None:
        b = min(self.n_bins - 1, max(0, int(p * self.n_bins)))
        self.n[b] += 1
        self.sum_p[b] += p
        self.sum_y[b] += float(y)

    def table(self) -> list[tuple[float, float, int]]:
        """``(mean predicted, observed rate, count)`` for each non-empty bin."""
        return [(sp / n, sy / n, n) for sp, sy, n in zip(self.sum_p, self.sum_y, self.n) if n]

    def ece(self) -> float:
        """Expected calibration error (count-weighted mean |predicted - observed|); NaN when empty."""
        total = sum(self.n)
        if not total:
            return math.nan
        return sum(abs(sp - sy) for sp, sy in zip(self.sum_p, self.sum_y)) / total


class StageQuality:
    """Online quality of one stage's predictions: rolling ROC AUC, log loss, Brier; reliability."""

    def __init__(self, window_size: int = 500, n_bins: int = 10):
        self.rocauc = metrics.RollingROCAUC(window_size=window_size)
        self.logloss = utils.Rolling(metrics.LogLoss, window_size=window_size)
        self.brier = utils.Rolling(metrics.MSE, window_size=window_size)
        self.reliability = Reliability(n_bins)
        self.n = 0

    def update(self, y: bool, p: float) -> None:
        p = min(1.0, max(0.0, float(p)))
        self.rocauc.update(bool(y), p)
        self.logloss.update(bool(y), p)
        self.brier.update(float(y), p)
        self.reliability.update(bool(y), p)
        self.n += 1

    def summary(self) -> dict[str, float]:
        """``{"rocauc", "logloss", "brier", "ece", "n"}`` (NaN where undefined yet)."""
        return {"rocauc": float(self.rocauc.get()) if self.n else math.nan,
                "logloss": float(self.logloss.get()) if self.n else math.nan,
                "brier": float(self.brier.get()) if self.n else math.nan,
                "ece": self.reliability.ece(), "n": float(self.n)}


def default_classifier():
    """``StandardScaler | LogisticRegression(optimizer=optim.SGD(0.05))`` (the planning notes' pick)."""
    return preprocessing.StandardScaler() | linear_model.LogisticRegression(optimizer=optim.SGD(0.05))


@dataclass
class _Pending:
    x_pre: dict
    p_pre: float
    x_post: dict | None = None
    p_post: float | None = None
    extra: dict = field(default_factory=dict)


class FailurePredictor:
    """Two-stage online failure predictor with a pending store joined by task id.

    Parameters
    ----------
    model
        A River binary classifier (cloned for each stage); default :func:`default_classifier`.
    failure
        The :class:`FailureDefinition`.
    thresholds
        :class:`DecisionThresholds` for :meth:`decide`.
    prior
        P(failure) used before any label and when a model has no probability for ``True``.
    max_pending
        Bound of the pending store (oldest dropped first; counted in ``n_dropped``).
    window_size, n_bins
        Rolling window of the quality metrics; bins of the reliability table.
    """

    def __init__(self, model=None, failure: FailureDefinition | None = None, *, thresholds: DecisionThresholds | None = None,
                 prior: float = 0.5, max_pending: int = 10_000, window_size: int = 500, n_bins: int = 10):
        base = model if model is not None else default_classifier()
        self.model = base
        self.pre = base.clone()
        self.post = base.clone()
        self.failure = failure or FailureDefinition()
        self.thresholds = thresholds or DecisionThresholds()
        if not 0.0 <= prior <= 1.0:
            raise ValueError("prior must be in [0, 1]")
        self.prior = float(prior)
        self.max_pending = int(max_pending)
        self.pending: OrderedDict[str, _Pending] = OrderedDict()
        self.quality = {"pre": StageQuality(window_size, n_bins), "post": StageQuality(window_size, n_bins)}
        self.n_learned = {"pre": 0, "post": 0}
        self.n_failures = 0
        self.n_dropped = 0
        self.action_counts: Counter = Counter()

    def __repr__(self) -> str:
        return f"FailurePredictor(failure={self.failure}, n_learned={self.n_learned}, pending={len(self.pending)})"

    # -- prediction ---------------------------------------------------------------------------
    def _p(self, model, stage: str, x: Mapping[str, float]) -> float:
        if self.n_learned[stage] == 0:
            return self.prior
        proba = model.predict_proba_one(dict(x))
        # tree/forest models return {} at cold start and {False: 1.0} after only successes
        if True in proba:
            p = float(proba[True])
        elif False in proba:
            p = 1.0 - float(proba[False])
        else:
            p = proba.get(True, self.prior)
        p = float(p)
        return p if math.isfinite(p) else self.prior

    def predict_pre(self, x: Mapping[str, float]) -> float:
        """P(failure) from pre-adaptation features."""
        return self._p(self.pre, "pre", x)

    def predict_post(self, x: Mapping[str, float]) -> float:
        """P(failure) from pre-adaptation plus probe features (pass them merged)."""
        return self._p(self.post, "post", x)

    def decide(self, p_post: float | None = None, p_pre: float | None = None) -> str:
        """:func:`decide` with this predictor's thresholds; the action is counted in ``action_counts``."""
        action = decide(p_post, p_pre, self.thresholds)
        self.action_counts[action] += 1
        return action

    # -- delayed labels -----------------------------------------------------------------------
    def observe(self, task_id: str, x_pre: Mapping[str, float], x_post: Mapping[str, float] | None = None,
                **extra: Any) -> tuple[float, float | None]:
        """Predict for a task and remember features and predictions until its label arrives.

        Calling it again for the same id adds the post-probe features. Returns ``(p_pre, p_post)``.
        """
        entry = self.pending.get(task_id)
        if entry is None:
            entry = _Pending(dict(x_pre), self.predict_pre(x_pre))
            self.pending[task_id] = entry
            while len(self.pending) > self.max_pending:
                self.pending.popitem(last=False)
                self.n_dropped += 1
        if x_post is not None:
            merged = {**entry.x_pre, **x_post}
            entry.x_post = merged
            entry.p_post = self.predict_post(merged)
        entry.extra.update(extra)
        return entry.p_pre, entry.p_post

    def revise(self, task_id: str, x_pre: Mapping[str, float]) -> bool:
        """Replace a pending task's pre-stage features (and prediction) and drop its post stage.

        For an answer that did not come from what the features described (the agent switched
        algorithm after the probe): the label will be about ``x_pre``, and the probe features
        describe an attempt whose outcome is never known. The new ``p_pre`` is predicted now,
        before the label, so the quality metrics stay progressive. Returns ``False`` when the
        id is not pending.
        """
        entry = self.pending.get(task_id)
        if entry is None:
            return False
        entry.x_pre, entry.p_pre = dict(x_pre), self.predict_pre(x_pre)
        entry.x_post = entry.p_post = None
        return True

    def learn(self, task_id: str, *, quality: float | None = None, diverged: bool = False,
              failed: bool | None = None) -> bool | None:
        """Join the outcome of ``task_id`` with its pending features and learn.

        The label is ``failed`` when given, else ``failure.is_failure(quality, diverged)``.
        Returns the label, or ``None`` when the id is not pending (unknown, already learned or
        dropped).
        """
        entry = self.pending.pop(task_id, None)
        if entry is None:
            return None
        y = bool(failed) if failed is not None else self.failure.is_failure(quality, diverged)
        self.learn_one(entry.x_pre, y, stage="pre", p=entry.p_pre)
        if entry.x_post is not None:
            self.learn_one(entry.x_post, y, stage="post", p=entry.p_post)
        self.n_failures += int(y)
        return y

    def learn_one(self, x: Mapping[str, float], y: bool, *, stage: str = "pre", p: float | None = None) -> None:
        """Learn one labelled example for ``stage`` directly (``p``: the earlier prediction, for metrics)."""
        model = self.pre if stage == "pre" else self.post
        if p is None:
            p = self._p(model, stage, x)
        self.quality[stage].update(bool(y), p)
        model.learn_one(dict(x), bool(y))
        self.n_learned[stage] += 1

    def summary(self) -> dict[str, Any]:
        """Quality of both stages, counts and decisions (for metrics and reports)."""
        return {"pre": self.quality["pre"].summary(), "post": self.quality["post"].summary(),
                "n_learned": dict(self.n_learned), "n_failures": self.n_failures, "pending": len(self.pending),
                "dropped": self.n_dropped, "actions": {a: self.action_counts.get(a, 0) for a in ACTIONS}}
