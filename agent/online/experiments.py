"""Online A/B experiments with always-valid inference (mixture SPRT).

An :class:`Experiment` declares variants (each a dict of config overrides: inner lr, steps,
algorithm, lambda, ...), a traffic split and a metric. A task is assigned to a variant by a
*stable* hash of ``experiment name + task id`` (SHA-256, never Python's salted ``hash``), so the
same task always lands in the same variant, across processes and restarts.

The test is the mixture sequential probability ratio test (mSPRT) of Johari, Pekelis and Walsh
("Always valid inference", 2017; Johari et al., Operations Research 2022) for the difference of
means ``theta = mean(variant) - mean(control)``. With ``n_a``, ``n_b`` observations, sample
means and variances, the difference estimate ``d`` is approximately normal with variance
``V = s_a^2 / n_a + s_b^2 / n_b``. Mixing the likelihood ratio of ``theta`` against ``theta0``
over a normal prior ``theta ~ N(theta0, tau^2)`` gives the closed form

    Lambda = sqrt(V / (V + tau^2)) * exp(tau^2 (d - theta0)^2 / (2 V (V + tau^2)))

``Lambda`` is a nonnegative martingale under the null, so by Ville's inequality
``P(sup_n Lambda_n >= 1/alpha) <= alpha``: the always-valid p-value ``p_n = min(p_{n-1}, 1/Lambda_n)``
may be monitored after every observation, and the test stops (a winner is declared) the first time
``p_n <= alpha``. Inverting the test gives the confidence sequence

    |theta - d| < sqrt(2 V (V + tau^2) / tau^2 * (log(1/alpha) + log((V + tau^2) / V) / 2))

which is intersected over time (it stays valid uniformly in time).

Choices, documented because they matter:

* The variances are estimated online (Welford) and plugged in, as Johari et al. do in practice;
  the guarantee is then asymptotic, so no test is made before ``min_samples`` observations per
  variant, and a variance floor ``var_floor`` avoids degenerate zero-variance starts.
* ``tau`` is the prior standard deviation of the effect. By default it is ``tau_scale`` times the
  pooled standard deviation (a standardised effect size prior, 0.5 by default: tuned for effects
  of a fraction of a standard deviation); a fixed ``tau`` may be given instead.
* With more than two variants each one is compared with the control (the first variant) at level
  ``alpha / (k - 1)`` (Bonferroni), which keeps the family-wise error at ``alpha``.

Examples
--------
>>> import random
>>> rng = random.Random(1)
>>> exp = Experiment("lr", {"a": {"inner_lr": 0.01}, "b": {"inner_lr": 0.05}}, alpha=0.05)
>>> exp.assign("task-42") == exp.assign("task-42")
True
>>> for i in range(4000):
...     v = exp.assign(f"t{i}")
...     exp.record(v, rng.gauss(0.70 if v == "a" else 0.75, 0.1))
...     if exp.status().winner is not None:
...         break
>>> st = exp.status()
>>> st.winner, st.p_value <= 0.05, st.ci[0] > 0
('b', True, True)
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["Experiment", "ExperimentStatus", "Comparison", "MSPRT", "assign_fraction", "msprt_lambda"]


def assign_fraction(experiment: str, task_id: str) -> float:
    """A stable number in [0, 1) from SHA-256 of ``experiment`` and ``task_id``.

    Examples
    --------
    >>> assign_fraction("exp", "t1") == assign_fraction("exp", "t1")
    True
    >>> 0.0 <= assign_fraction("exp", "t1") < 1.0
    True
    """
    h = hashlib.sha256(f"{experiment}\x00{task_id}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def msprt_lambda(d: float, v: float, tau2: float, theta0: float = 0.0) -> float:
    """The normal-mixture likelihood ratio for an estimate ``d`` with variance ``v``.

    Examples
    --------
    >>> round(msprt_lambda(0.0, 1.0, 1.0), 4)  # no evidence: below 1
    0.7071
    >>> msprt_lambda(3.0, 0.1, 1.0) > 20
    True
    """
    z = tau2 * (d - theta0) ** 2 / (2.0 * v * (v + tau2))
    return math.sqrt(v / (v + tau2)) * math.exp(min(z, 700.0))


class _Welford:
    __slots__ = ("n", "mean", "m2")

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: float) -> None:
        self.n += 1
        delta = x - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (x - self.mean)

    @property
    def var(self) -> float:
        return self.m2 / (self.n - 1) if self.n > 1 else 0.0


class MSPRT:
    """Two-sample mSPRT for ``mean(b) - mean(a)`` with a running p-value and confidence sequence.

    Parameters
    ----------
    alpha
        Level of the test and of the confidence sequence.
    tau
        Prior standard deviation of the effect; ``None``: ``tau_scale`` times the pooled sd.
    min_samples
        Observations needed in each sample before the test is evaluated.
    var_floor
        Lower bound of each sample variance.

    Examples
    --------
    >>> t = MSPRT(alpha=0.05)
    >>> for i in range(200):
    ...     t.update_a(0.0 + (i % 5) * 0.1)
    ...     t.update_b(0.3 + (i % 5) * 0.1)
    >>> t.p_value < 1e-6, t.ci[0] < 0.3 < t.ci[1]
    (True, True)
    """

    def __init__(self, alpha: float = 0.05, *, tau: float | None = None, tau_scale: float = 0.5,
                 min_samples: int = 10, var_floor: float = 1e-8):
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.alpha = float(alpha)
        self.tau = tau
        self.tau_scale = float(tau_scale)
        self.min_samples = max(2, int(min_samples))
        self.var_floor = float(var_floor)
        self.a, self.b = _Welford(), _Welford()
        self.p_value = 1.0
        self.ci = (-math.inf, math.inf)
        self.stopped_at: int | None = None

    def update_a(self, x: float) -> None:
        self.a.update(float(x))
        self._test()

    def update_b(self, x: float) -> None:
        self.b.update(float(x))
        self._test()

    @property
    def effect(self) -> float:
        """``mean(b) - mean(a)`` (NaN until both samples have data)."""
        return self.b.mean - self.a.mean if self.a.n and self.b.n else math.nan

    def _test(self) -> None:
        a, b = self.a, self.b
        if a.n < self.min_samples or b.n < self.min_samples:
            return
        va, vb = max(a.var, self.var_floor), max(b.var, self.var_floor)
        v = va / a.n + vb / b.n
        if self.tau is not None:
            tau2 = float(self.tau) ** 2
        else:
            pooled = ((a.n - 1) * va + (b.n - 1) * vb) / (a.n + b.n - 2)
            tau2 = self.tau_scale**2 * pooled
        d = b.mean - a.mean
        lam = msprt_lambda(d, v, tau2)
        self.p_value = min(self.p_value, 1.0 / lam if lam > 0 else 1.0, 1.0)
        half = math.sqrt(2.0 * v * (v + tau2) / tau2 * (math.log(1.0 / self.alpha) + 0.5 * math.log((v + tau2) / v)))
        lo, hi = max(self.ci[0], d - half), min(self.ci[1], d + half)
        if lo > hi:  # the running intersection emptied (a plug-in variance artefact): keep the newest
            lo, hi = d - half, d + half
        self.ci = (lo, hi)
        if self.stopped_at is None and self.p_value <= self.alpha:
            self.stopped_at = a.n + b.n


@dataclass(frozen=True)
class Comparison:
    """One variant against the control: effect = mean(variant) - mean(control)."""

    variant: str
    control: str
    effect: float
    ci: tuple[float, float]
    p_value: float
    significant: bool


@dataclass(frozen=True)
class ExperimentStatus:
    """Where an experiment stands (what metrics and ``meta-agent report`` show)."""

    name: str
    metric: str
    samples: dict[str, int]
    means: dict[str, float]
    comparisons: list[Comparison] = field(default_factory=list)
    winner: str | None = None

    @property
    def effect(self) -> float:
        """Effect of the first comparison (the two-variant case)."""
        return self.comparisons[0].effect if self.comparisons else math.nan

    @property
    def ci(self) -> tuple[float, float]:
        return self.comparisons[0].ci if self.comparisons else (-math.inf, math.inf)

    @property
    def p_value(self) -> float:
        return min((c.p_value for c in self.comparisons), default=1.0)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "metric": self.metric, "samples": dict(self.samples), "means": dict(self.means),
                "winner": self.winner,
                "comparisons": [{"variant": c.variant, "control": c.control, "effect": c.effect, "ci": list(c.ci),
                                 "p_value": c.p_value, "significant": c.significant} for c in self.comparisons]}


class Experiment:
    """An online A/B(/n) test: stable assignment, recording, and an mSPRT decision.

    Parameters
    ----------
    name
        Experiment name (part of the assignment hash: experiments split independently).
    variants
        ``{variant name: config overrides}``; the first variant is the control.
    split
        Traffic weights per variant (default equal); normalised.
    metric
        Name of the metric recorded (for reports), e.g. ``"query_accuracy"`` or ``"reward"``.
    alpha
        Family-wise level of the test.
    higher_is_better
        Direction of the metric (``False`` for an MSE).
    tau, tau_scale, min_samples
        See :class:`MSPRT`.
    """

    def __init__(self, name: str, variants: Mapping[str, Mapping[str, Any]], split: Mapping[str, float] | None = None,
                 metric: str = "quality", alpha: float = 0.05, *, higher_is_better: bool = True,
                 tau: float | None = None, tau_scale: float = 0.5, min_samples: int = 10):
        if len(variants) < 2:
            raise ValueError("an experiment needs at least two variants")
        self.name = str(name)
        self.variants = {str(k): dict(v) for k, v in variants.items()}
        names = list(self.variants)
        weights = {k: float((split or {}).get(k, 0.0 if split else 1.0)) for k in names}
        if split and set(split) - set(names):
            raise ValueError(f"split names unknown variants: {sorted(set(split) - set(names))}")
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError("split weights must be >= 0 with a positive sum")
        total = sum(weights.values())
        self.split = {k: w / total for k, w in weights.items()}
        self.metric = metric
        self.alpha = float(alpha)
        self.higher_is_better = bool(higher_is_better)
        self.control = names[0]
        level = self.alpha / (len(names) - 1)
        self.tests = {v: MSPRT(level, tau=tau, tau_scale=tau_scale, min_samples=min_samples) for v in names[1:]}
        self.counts = {v: 0 for v in names}
        self.sums = {v: 0.0 for v in names}
        self._cum = []
        acc = 0.0
        for k in names:
            acc += self.split[k]
            self._cum.append((acc, k))

    def __repr__(self) -> str:
        return f"Experiment({self.name!r}, variants={list(self.variants)}, split={self.split}, metric={self.metric!r})"

    def assign(self, task_id: str) -> str:
        """The variant of ``task_id`` (stable: a SHA-256 of the experiment name and the id)."""
        u = assign_fraction(self.name, str(task_id))
        for edge, k in self._cum:
            if u < edge:
                return k
        return self._cum[-1][1]

    def overrides(self, variant: str) -> dict[str, Any]:
        """The config overrides of ``variant`` (a copy)."""
        return dict(self.variants[variant])

    def record(self, variant: str, value: float) -> None:
        """Record one observation of the metric for ``variant`` (non-finite values are ignored)."""
        if variant not in self.counts:
            raise KeyError(f"unknown variant {variant!r}")
        value = float(value)
        if not math.isfinite(value):
            return
        self.counts[variant] += 1
        self.sums[variant] += value
        if variant == self.control:
            for t in self.tests.values():
                t.update_a(value)
        else:
            self.tests[variant].update_b(value)

    def status(self) -> ExperimentStatus:
        """Effects, confidence sequences, always-valid p-values, samples and the winner (or ``None``)."""
        comps = []
        for v, t in self.tests.items():
            comps.append(Comparison(v, self.control, t.effect, t.ci, t.p_value, t.p_value <= t.alpha))
        sign = 1.0 if self.higher_is_better else -1.0
        winner = None
        better = [c for c in comps if c.significant and sign * c.effect > 0]
        if better:
            winner = max(better, key=lambda c: sign * c.effect).variant
        elif comps and all(c.significant and sign * c.effect < 0 for c in comps):
            winner = self.control
        means = {v: (self.sums[v] / n if n else math.nan) for v, n in self.counts.items()}
        return ExperimentStatus(self.name, self.metric, dict(self.counts), means, comps, winner)
