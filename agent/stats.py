"""Statistics for evaluating the agent: intervals, paired tests, calibration, CV folds, online metrics.

Everything here is a pure function over numpy arrays (scipy underneath). Nothing is seeded
globally: functions that draw random numbers take an ``rng`` argument (``None``, an ``int`` seed
or a :class:`numpy.random.Generator`), passed through :func:`numpy.random.default_rng`.

Conventions that matter when numbers are published:

* **Nothing is dropped silently.** Non-finite inputs raise ``ValueError`` unless the function
  has a ``nan_policy="omit"`` argument, in which case the number omitted is reported in the
  result (``n_omitted``).
* **Undefined quantities are NaN or infinite, never a made-up finite number.** For example a
  t-interval from one observation has infinite width, precision with no detections is NaN.
* Standard deviations are sample standard deviations (``ddof=1``).
* Confidence levels are two-sided unless an ``alternative`` argument says otherwise.

Sections: intervals (:func:`mean_ci`, :func:`bootstrap_ci`, :func:`wilson_interval`); paired
comparisons (:func:`paired_t_test`, :func:`wilcoxon_signed_rank`, :func:`cohens_dz`,
:func:`rank_biserial`, :func:`holm`); calibration (:func:`reliability_table`,
:func:`expected_calibration_error`, :func:`maximum_calibration_error`, :func:`brier_score`,
:func:`fit_temperature`); meta-learning cross-validation (:func:`class_folds`); online and
continual metrics (:func:`prequential`, :func:`accuracy_after_switch`,
:func:`continual_metrics`, :func:`boundary_scores`).
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Callable, NamedTuple

import numpy as np
from scipy import optimize, signal, special
from scipy import stats as _st

__all__ = [
    "MeanCI",
    "BootstrapCI",
    "PairedTTest",
    "WilcoxonResult",
    "ReliabilityTable",
    "TemperatureFit",
    "Fold",
    "SwitchWindows",
    "ContinualMetrics",
    "BoundaryScores",
    "mean_ci",
    "bootstrap_ci",
    "wilson_interval",
    "paired_t_test",
    "wilcoxon_signed_rank",
    "cohens_dz",
    "rank_biserial",
    "holm",
    "reliability_table",
    "expected_calibration_error",
    "maximum_calibration_error",
    "brier_score",
    "fit_temperature",
    "class_folds",
    "prequential",
    "accuracy_after_switch",
    "continual_metrics",
    "boundary_scores",
]

_ALTERNATIVES = ("two-sided", "less", "greater")
_BATCH_ELEMENTS = 1 << 22  # resampled values per vectorised statistic call (bootstrap, jackknife)


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _as_1d_float(x, name: str, *, allow_nonfinite: bool = False, min_size: int = 1) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"`{name}` must be a 1-D array of real numbers") from exc
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"`{name}` must be 1-D, got shape {arr.shape}")
    if arr.size < min_size:
        raise ValueError(f"`{name}` needs at least {min_size} value(s), got {arr.size}")
    if not allow_nonfinite and not np.all(np.isfinite(arr)):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise ValueError(f"`{name}` contains {bad} non-finite value(s) (NaN or inf)")
    return arr


def _check_confidence(confidence, name: str = "confidence") -> float:
    if isinstance(confidence, bool) or not isinstance(confidence, numbers.Real):
        raise ValueError(f"`{name}` must be a real number in (0, 1), got {confidence!r}")
    c = float(confidence)
    if not (0.0 < c < 1.0):
        raise ValueError(f"`{name}` must be in the open interval (0, 1), got {confidence!r}")
    return c


def _check_choice(value, name: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}")
    return value


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"`{name}` must be an integer, got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value!r}")
    return int(value)


def _handle_nan_policy(arr: np.ndarray, name: str, nan_policy: str) -> tuple[np.ndarray, int]:
    _check_choice(nan_policy, "nan_policy", ("raise", "omit"))
    finite = np.isfinite(arr)
    n_bad = int(arr.size - np.count_nonzero(finite))
    if n_bad and nan_policy == "raise":
        raise ValueError(
            f"`{name}` contains {n_bad} non-finite value(s) (NaN or inf); "
            "clean the data or pass nan_policy='omit' (the count is then reported as n_omitted)"
        )
    return arr[finite], n_bad


def _paired_differences(a, b) -> np.ndarray:
    a = _as_1d_float(a, "a")
    b = _as_1d_float(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"`a` and `b` must have the same length (paired), got {a.size} and {b.size}")
    return a - b


# --------------------------------------------------------------------------------------------
# Intervals
# --------------------------------------------------------------------------------------------


class MeanCI(NamedTuple):
    """Result of :func:`mean_ci`."""

    mean: float
    low: float
    high: float
    half_width: float
    n: int
    std: float
    confidence: float
    n_omitted: int


def mean_ci(values, confidence: float = 0.95, *, nan_policy: str = "raise") -> MeanCI:
    r"""Mean with the exact Student-t confidence interval.

    The interval is :math:`\bar x \pm t_{(1+c)/2,\,n-1}\, s/\sqrt n` with ``s`` the sample
    standard deviation (``ddof=1``). It is exact for normally distributed values and
    asymptotically valid otherwise; for skewed metrics with small ``n`` consider
    :func:`bootstrap_ci`.

    Parameters
    ----------
    values : array_like, 1-D
        Observations (e.g. one accuracy per evaluation episode or seed).
    confidence : float, default 0.95
        Two-sided confidence level in (0, 1).
    nan_policy : {"raise", "omit"}, default "raise"
        What to do with NaN/inf values: raise ``ValueError``, or leave them out and report how
        many were left out in ``n_omitted``.

    Returns
    -------
    MeanCI
        ``mean, low, high, half_width, n, std, confidence, n_omitted``. ``n`` counts the values
        used. With ``n == 1`` the spread is unknown: ``std`` is NaN, ``half_width`` is ``inf``
        and the interval is ``(-inf, inf)``. Constant values give a zero-width interval.

    Raises
    ------
    ValueError
        If no (finite) values remain, ``confidence`` is outside (0, 1), or non-finite values are
        present with ``nan_policy="raise"``.

    Examples
    --------
    >>> r = mean_ci([1.0, 2.0, 3.0, 4.0])
    >>> print(f"{r.mean:.2f} [{r.low:.4f}, {r.high:.4f}] n={r.n}")
    2.50 [0.4457, 4.5543] n=4
    >>> mean_ci([0.7]).half_width
    inf
    >>> mean_ci([1.0, float("nan"), 3.0], nan_policy="omit").n_omitted
    1
    """
    c = _check_confidence(confidence)
    arr = _as_1d_float(values, "values", allow_nonfinite=True)
    arr, n_bad = _handle_nan_policy(arr, "values", nan_policy)
    n = arr.size
    if n == 0:
        raise ValueError("`values` has no finite values")
    mean = float(np.mean(arr))
    if n == 1:
        return MeanCI(mean, -math.inf, math.inf, math.inf, 1, math.nan, c, n_bad)
    std = 0.0 if np.ptp(arr) == 0 else float(np.std(arr, ddof=1))
    tcrit = float(_st.t.ppf(0.5 + c / 2.0, df=n - 1))
    half = tcrit * std / math.sqrt(n)
    return MeanCI(mean, mean - half, mean + half, half, n, std, c, n_bad)


class BootstrapCI(NamedTuple):
    """Result of :func:`bootstrap_ci`."""

    estimate: float
    low: float
    high: float
    confidence: float
    method: str
    n_resamples: int
    standard_error: float
    bias_correction: float
    acceleration: float
    n: int
    n_omitted: int


def _vectorized_statistic(statistic: Callable) -> Callable:
    """Return ``f(x2d) -> 1-D`` applying ``statistic`` to each row of ``x2d``."""
    try:
        params = inspect.signature(statistic).parameters
        takes_axis = "axis" in params
    except (TypeError, ValueError):  # builtins / ufunc-likes without a signature
        takes_axis = False
    if takes_axis:
        return lambda x: np.asarray(statistic(x, axis=-1), dtype=float)
    return lambda x: np.asarray([statistic(row) for row in x], dtype=float)


def bootstrap_ci(
    values,
    statistic: Callable = np.mean,
    confidence: float = 0.95,
    n_resamples: int = 9999,
    method: str = "bca",
    rng=None,
    *,
    batch: int | None = None,
    nan_policy: str = "raise",
) -> BootstrapCI:
    r"""Nonparametric bootstrap confidence interval (percentile or BCa) for a 1-D sample.

    Resamples the ``n`` values with replacement ``n_resamples`` times and evaluates
    ``statistic`` on each resample. Endpoints are quantiles of the bootstrap distribution
    (linear interpolation, ``numpy.quantile``'s default):

    * ``"percentile"``: the :math:`\alpha/2` and :math:`1-\alpha/2` quantiles.
    * ``"bca"`` (bias-corrected and accelerated, Efron 1987; Efron & Tibshirani 1993, ch. 14):
      quantile levels :math:`\Phi\big(z_0 + (z_0+z_q)/(1-a(z_0+z_q))\big)` for
      :math:`z_q = \Phi^{-1}(\alpha/2), \Phi^{-1}(1-\alpha/2)`, where the bias correction
      :math:`z_0 = \Phi^{-1}(\hat p)` with :math:`\hat p` the fraction of replicates below the
      estimate (ties count one half), and the acceleration comes from the jackknife,
      :math:`a = \sum_i d_i^3 / (6 (\sum_i d_i^2)^{3/2})`, :math:`d_i = \bar\theta_{(\cdot)} -
      \theta_{(i)}`.

    The resampling draws ``rng.integers(0, n, (n_resamples, n))`` exactly as
    ``scipy.stats.bootstrap`` does, so with the same seed the two give the same interval.

    Parameters
    ----------
    values : array_like, 1-D
        The sample (at least 2 values). For paired data pass the per-pair differences.
    statistic : callable, default numpy.mean
        ``statistic(x) -> float``. If it accepts an ``axis`` keyword it is called once per
        batch as ``statistic(x2d, axis=-1)``; otherwise once per resample.
    confidence : float, default 0.95
        Two-sided confidence level in (0, 1).
    n_resamples : int, default 9999
        Number of bootstrap resamples (>= 1; use thousands for stable endpoints).
    method : {"bca", "percentile"}, default "bca"
    rng : None, int or numpy.random.Generator
        Source of randomness (passed to ``numpy.random.default_rng``).
    batch : int, optional
        Resamples per vectorised call, to bound memory. ``None`` picks it so that a batch holds
        about 4 million resampled values. The result does not depend on ``batch``: the index
        stream drawn from ``rng`` is the same however it is split.
    nan_policy : {"raise", "omit"}, default "raise"
        Non-finite values raise, or are omitted and counted in ``n_omitted``.

    Returns
    -------
    BootstrapCI
        ``estimate`` (statistic of the data), ``low``, ``high``, ``standard_error`` (sd of the
        replicates, ``ddof=1``), ``bias_correction`` (:math:`z_0`) and ``acceleration``
        (:math:`a`; both NaN for ``"percentile"``), plus the settings used.

    Notes
    -----
    Degenerate cases: if every jackknife value is identical the acceleration is 0/0 and is set
    to 0 (the BCa interval reduces to the bias-corrected BC interval); constant data therefore
    give the zero-width interval at the constant. If every replicate lies strictly on one side
    of the estimate, :math:`z_0` is infinite and BCa is undefined: a ``ValueError`` is raised
    (``scipy.stats.bootstrap`` returns NaN with a warning instead).

    Examples
    --------
    >>> x = [2.1, 3.4, 1.9, 5.6, 4.4, 3.3, 2.8, 4.1]
    >>> r = bootstrap_ci(x, n_resamples=2000, rng=0)
    >>> r.low < r.estimate < r.high
    True
    >>> print(f"{r.estimate:.3f}")
    3.450
    """
    c = _check_confidence(confidence)
    n_resamples = _check_int(n_resamples, "n_resamples", 1)
    _check_choice(method, "method", ("percentile", "bca"))
    if not callable(statistic):
        raise ValueError("`statistic` must be callable")
    if batch is not None:
        batch = _check_int(batch, "batch", 1)
    arr = _as_1d_float(values, "values", allow_nonfinite=True)
    arr, n_bad = _handle_nan_policy(arr, "values", nan_policy)
    n = arr.size
    if n < 2:
        raise ValueError(f"`values` needs at least 2 finite values for a bootstrap, got {n}")
    gen = np.random.default_rng(rng)
    stat = _vectorized_statistic(statistic)

    theta_hat = float(stat(arr[None, :])[0])
    step = batch or max(1, _BATCH_ELEMENTS // n)
    reps = []
    for start in range(0, n_resamples, step):
        size = min(step, n_resamples - start)
        idx = gen.integers(0, n, (size, n))
        reps.append(stat(arr[idx]))
    theta_b = np.concatenate(reps)
    if theta_b.shape != (n_resamples,):
        raise ValueError("`statistic` must return one scalar per sample")
    if not np.all(np.isfinite(theta_b)) or not math.isfinite(theta_hat):
        raise ValueError("`statistic` returned non-finite values on the data or a resample")

    alpha = (1.0 - c) / 2.0
    if method == "percentile":
        levels = np.array([alpha, 1.0 - alpha])
        z0 = a = math.nan
    else:
        p_hat = (np.count_nonzero(theta_b < theta_hat) + np.count_nonzero(theta_b <= theta_hat)) / (
            2.0 * n_resamples
        )
        if p_hat <= 0.0 or p_hat >= 1.0:
            raise ValueError(
                "BCa is undefined: every bootstrap replicate lies on one side of the estimate "
                "(infinite bias correction); use method='percentile' or more resamples"
            )
        z0 = float(special.ndtri(p_hat))
        # jackknife: leave-one-out statistics, row i of the index matrix skips observation i
        base = np.arange(n - 1)[None, :]
        rows = max(1, _BATCH_ELEMENTS // n)
        theta_i = np.concatenate(
            [
                stat(arr[base + (base >= np.arange(i, min(i + rows, n))[:, None])])
                for i in range(0, n, rows)
            ]
        )
        d = theta_i.mean() - theta_i
        den = float(np.sum(d**2))
        a = float(np.sum(d**3) / (6.0 * den**1.5)) if den > 0 else 0.0
        zq = special.ndtri(np.array([alpha, 1.0 - alpha]))
        den_q = 1.0 - a * (z0 + zq)
        if np.any(den_q <= 0):  # |a| <= 1/6 always, so only for extreme z0 / confidence
            raise ValueError(
                f"BCa is undefined here (1 - a*(z0 + z) <= 0 with a={a:.3g}, z0={z0:.3g}); "
                "use method='percentile' or a lower confidence"
            )
        levels = special.ndtr(z0 + (z0 + zq) / den_q)
    low, high = np.quantile(theta_b, levels)
    se = float(np.std(theta_b, ddof=1)) if n_resamples > 1 else math.nan
    return BootstrapCI(
        theta_hat, float(low), float(high), c, method, n_resamples, se, z0, a, n, n_bad
    )


def wilson_interval(
    successes: int,
    n: int,
    confidence: float = 0.95,
    *,
    correction: bool = False,
) -> tuple[float, float]:
    r"""Wilson score interval for a binomial proportion.

    .. math:: \frac{k + z^2/2}{n + z^2} \pm \frac{z}{n + z^2}\sqrt{\frac{k(n-k)}{n} + \frac{z^2}{4}}

    with :math:`z = \Phi^{-1}((1+c)/2)`. With ``correction=True`` the continuity-corrected
    version (Newcombe 1998, method 4) is returned. The lower bound is exactly 0 when
    ``successes == 0`` and the upper bound exactly 1 when ``successes == n``.

    Parameters
    ----------
    successes : int
        Number of successes, ``0 <= successes <= n``.
    n : int
        Number of trials (>= 1).
    confidence : float, default 0.95
        Two-sided confidence level in (0, 1).
    correction : bool, default False
        Apply the continuity correction.

    Returns
    -------
    tuple of float
        ``(low, high)``, within [0, 1].

    Examples
    --------
    >>> lo, hi = wilson_interval(7, 10)
    >>> print(f"{lo:.4f} {hi:.4f}")
    0.3968 0.8922
    >>> wilson_interval(0, 20)[0]
    0.0
    """
    n = _check_int(n, "n", 1)
    k = _check_int(successes, "successes", 0)
    if k > n:
        raise ValueError(f"`successes` must be <= n ({n}), got {k}")
    c = _check_confidence(confidence)
    if not isinstance(correction, (bool, np.bool_)):
        raise ValueError(f"`correction` must be a bool, got {correction!r}")
    z = float(special.ndtri(0.5 + c / 2.0))
    p = k / n
    q = 1.0 - p
    denom = 2.0 * (n + z * z)
    center = (2.0 * k + z * z) / denom
    if correction:
        lo = 0.0 if k == 0 else center - (1 + z * math.sqrt(z * z - 2 - 1 / n + 4 * p * (n * q + 1))) / denom
        hi = 1.0 if k == n else center + (1 + z * math.sqrt(z * z + 2 - 1 / n + 4 * p * (n * q - 1))) / denom
    else:
        delta = z / denom * math.sqrt(4.0 * n * p * q + z * z)
        lo = 0.0 if k == 0 else center - delta
        hi = 1.0 if k == n else center + delta
    return max(0.0, float(lo)), min(1.0, float(hi))


# --------------------------------------------------------------------------------------------
# Paired comparisons
# --------------------------------------------------------------------------------------------


class PairedTTest(NamedTuple):
    """Result of :func:`paired_t_test`."""

    statistic: float
    df: int
    pvalue: float
    mean_difference: float
    low: float
    high: float
    std_difference: float
    cohens_dz: float
    n: int
    confidence: float
    alternative: str


def paired_t_test(
    a, b, *, confidence: float = 0.95, alternative: str = "two-sided"
) -> PairedTTest:
    r"""Paired (dependent-samples) t-test of ``mean(a - b) == 0``.

    With differences :math:`d = a - b`: :math:`t = \bar d / (s_d/\sqrt n)`, ``df = n - 1``,
    and the confidence interval for the mean difference is
    :math:`\bar d \pm t_{crit}\, s_d/\sqrt n` (one-sided bound for one-sided alternatives, the
    other end infinite, as in ``scipy.stats.ttest_rel``).

    Parameters
    ----------
    a, b : array_like, 1-D, same length (>= 2)
        Paired measurements, e.g. accuracy of two methods on the same episodes.
    confidence : float, default 0.95
        Confidence level of the interval for the mean difference.
    alternative : {"two-sided", "less", "greater"}, default "two-sided"
        ``"greater"`` tests ``mean(a - b) > 0``.

    Returns
    -------
    PairedTTest
        ``statistic`` (t), ``df``, ``pvalue``, ``mean_difference`` (``mean(a - b)``),
        ``low``/``high`` (interval for the mean difference), ``std_difference``,
        ``cohens_dz`` (:func:`cohens_dz`), ``n``, ``confidence``, ``alternative``.

    Notes
    -----
    When all differences are identical the standard error is exactly zero: if they are all 0
    the test is undefined (``statistic`` and ``pvalue`` NaN); otherwise ``statistic`` is
    :math:`\pm\infty` with the p-value of that limit. Identical differences are detected
    exactly, so floating-point noise in ``np.std`` cannot produce a spuriously huge t.

    Examples
    --------
    >>> a = [0.71, 0.64, 0.80, 0.77, 0.69, 0.73]
    >>> b = [0.66, 0.63, 0.74, 0.70, 0.69, 0.68]
    >>> r = paired_t_test(a, b)
    >>> print(f"t={r.statistic:.3f} df={r.df} p={r.pvalue:.4f}")
    t=3.464 df=5 p=0.0180
    >>> print(f"diff={r.mean_difference:.4f} [{r.low:.4f}, {r.high:.4f}]")
    diff=0.0400 [0.0103, 0.0697]
    """
    c = _check_confidence(confidence)
    _check_choice(alternative, "alternative", _ALTERNATIVES)
    d = _paired_differences(a, b)
    n = d.size
    if n < 2:
        raise ValueError(f"a paired t-test needs at least 2 pairs, got {n}")
    mean = float(np.mean(d))
    sd = 0.0 if np.ptp(d) == 0 else float(np.std(d, ddof=1))
    se = sd / math.sqrt(n)
    df = n - 1
    with np.errstate(divide="ignore", invalid="ignore"):
        t = float(np.divide(mean, se)) if se > 0 else (math.nan if mean == 0 else math.copysign(math.inf, mean))
    if math.isnan(t):
        p = math.nan
    elif alternative == "two-sided":
        p = float(2.0 * _st.t.sf(abs(t), df))
    elif alternative == "greater":
        p = float(_st.t.sf(t, df))
    else:
        p = float(_st.t.cdf(t, df))
    p = min(p, 1.0) if not math.isnan(p) else p
    if alternative == "two-sided":
        h = float(_st.t.ppf(0.5 + c / 2.0, df)) * se
        low, high = mean - h, mean + h
    elif alternative == "greater":
        low, high = mean - float(_st.t.ppf(c, df)) * se, math.inf
    else:
        low, high = -math.inf, mean + float(_st.t.ppf(c, df)) * se
    return PairedTTest(t, df, p, mean, low, high, sd, cohens_dz(a, b), n, c, alternative)


def cohens_dz(a, b) -> float:
    r"""Cohen's :math:`d_z` for paired data: mean difference over the sd of the differences.

    :math:`d_z = \overline{(a-b)} / s_{a-b}` (``ddof=1``); note :math:`d_z = t/\sqrt n` for the
    paired t statistic. This is *not* the between-groups :math:`d` (which divides by a pooled
    sd of ``a`` and ``b``) and is not comparable with it when ``a`` and ``b`` are correlated.

    Parameters
    ----------
    a, b : array_like, 1-D, same length (>= 2)

    Returns
    -------
    float
        ``d_z``; ``+/-inf`` if all differences are equal and non-zero, NaN if they are all 0.

    Examples
    --------
    >>> print(f"{cohens_dz([3.0, 5.0, 4.0, 6.0], [2.0, 3.0, 4.0, 3.0]):.4f}")
    1.1619
    """
    d = _paired_differences(a, b)
    if d.size < 2:
        raise ValueError(f"Cohen's d_z needs at least 2 pairs, got {d.size}")
    mean = float(np.mean(d))
    if np.ptp(d) == 0:
        return math.nan if mean == 0 else math.copysign(math.inf, mean)
    return mean / float(np.std(d, ddof=1))


class WilcoxonResult(NamedTuple):
    """Result of :func:`wilcoxon_signed_rank`."""

    statistic: float
    pvalue: float
    r_plus: float
    r_minus: float
    zstatistic: float
    rank_biserial: float
    n: int
    n_zero: int
    method: str
    zero_method: str
    alternative: str


def _signed_ranks(d: np.ndarray, zero_method: str):
    """Ranks of |d| for the signed-rank test. Returns (ranks of non-zero d, signs, n_ranked, ties)."""
    if zero_method == "wilcox":
        d = d[d != 0]
    ranks = _st.rankdata(np.abs(d)) if d.size else np.zeros(0)
    nz = d != 0
    has_ties = np.unique(np.abs(d[nz])).size < np.count_nonzero(nz)
    return ranks[nz], np.sign(d[nz]), d.size, bool(has_ties)


def _signed_rank_null_pmf(m: int) -> np.ndarray:
    """P(T+ = s), s = 0..m(m+1)/2, for ranks 1..m each added with probability 1/2."""
    pmf = np.zeros(m * (m + 1) // 2 + 1)
    pmf[0] = 1.0
    top = 0
    for k in range(1, m + 1):
        pmf[k : top + k + 1] = 0.5 * (pmf[k : top + k + 1] + pmf[: top + 1])
        pmf[:k] *= 0.5
        top += k
    return pmf


def wilcoxon_signed_rank(
    a,
    b,
    *,
    zero_method: str = "wilcox",
    correction: bool = True,
    alternative: str = "two-sided",
    method: str = "auto",
) -> WilcoxonResult:
    r"""Wilcoxon signed-rank test on paired samples (``d = a - b``, H0: d symmetric about 0).

    Absolute differences are ranked (midranks for ties); :math:`T^+` / :math:`T^-` are the rank
    sums of positive / negative differences.

    **Zero differences.** ``zero_method="wilcox"`` (default, Wilcoxon 1945) discards zero
    differences before ranking, so ``n`` is the number of non-zero pairs. ``"pratt"`` (Pratt
    1959) ranks the zeros together with the rest, then drops their ranks from both sums; the
    null mean and variance are adjusted accordingly (Cureton 1967). Both conventions match
    ``scipy.stats.wilcoxon``.

    **p-value.** ``method="exact"`` uses the exact null distribution of :math:`T^+`, valid only
    when the ranks are exactly 1..n (no tied :math:`|d|`, and no zeros under ``"pratt"``);
    ``"approx"`` uses the normal approximation with mean :math:`\sum r_i / 2` and variance
    :math:`\sum r_i^2 / 4` over the ranked non-zero differences (this is the usual
    tie-corrected variance :math:`n(n+1)(2n+1)/24 - \sum (t^3-t)/48`) and, if ``correction``,
    a 0.5 continuity correction towards the mean. ``"auto"`` picks ``"exact"`` when it is
    valid and ``n <= 50``, else ``"approx"``. (Unlike scipy's ``"auto"``, this never falls
    back to a Monte Carlo permutation test, so results are deterministic.)

    Parameters
    ----------
    a, b : array_like, 1-D, same length
    zero_method : {"wilcox", "pratt"}, default "wilcox"
    correction : bool, default True
        Continuity correction for the normal approximation (ignored by the exact test).
    alternative : {"two-sided", "less", "greater"}, default "two-sided"
        ``"greater"``: differences tend to be positive (``a`` larger).
    method : {"auto", "exact", "approx"}, default "auto"

    Returns
    -------
    WilcoxonResult
        ``statistic`` (= :math:`T^+`; note scipy reports :math:`\min(T^+, T^-)` for
        two-sided tests), ``pvalue``, ``r_plus``, ``r_minus``, ``zstatistic`` (signed,
        continuity-corrected if requested; NaN for the exact test), ``rank_biserial``
        (:func:`rank_biserial`), ``n`` (number of ranked differences, zeros included for
        ``"pratt"``), ``n_zero``, ``method`` (the one used), ``zero_method``, ``alternative``.
        If every difference is zero the test is undefined and ``pvalue`` is NaN.

    Examples
    --------
    >>> a = [1.83, 0.50, 1.62, 2.48, 1.68, 1.88, 1.55, 3.06, 1.30]
    >>> b = [0.878, 0.647, 0.598, 2.05, 1.06, 1.29, 1.06, 3.14, 1.29]
    >>> r = wilcoxon_signed_rank(a, b)
    >>> print(r.method, r.r_plus, r.r_minus, f"{r.pvalue:.5f}")
    exact 40.0 5.0 0.03906
    """
    _check_choice(zero_method, "zero_method", ("wilcox", "pratt"))
    _check_choice(alternative, "alternative", _ALTERNATIVES)
    _check_choice(method, "method", ("auto", "exact", "approx"))
    if not isinstance(correction, (bool, np.bool_)):
        raise ValueError(f"`correction` must be a bool, got {correction!r}")
    d = _paired_differences(a, b)
    n_zero = int(np.count_nonzero(d == 0))
    ranks, signs, n_ranked, has_ties = _signed_ranks(d, zero_method)
    r_plus = float(np.sum(ranks[signs > 0]))
    r_minus = float(np.sum(ranks[signs < 0]))
    total = n_ranked * (n_ranked + 1) / 2.0
    rbc = (r_plus - r_minus) / total if total > 0 else math.nan
    exact_ok = (not has_ties) and (zero_method == "wilcox" or n_zero == 0)
    if method == "exact" and not exact_ok:
        raise ValueError(
            "method='exact' needs untied |a - b| (and no zero differences with zero_method='pratt'); "
            "use method='approx'"
        )
    used = method if method != "auto" else ("exact" if exact_ok and n_ranked <= 50 else "approx")
    m = ranks.size  # non-zero differences
    if m == 0:
        return WilcoxonResult(0.0, math.nan, 0.0, 0.0, math.nan, rbc, n_ranked, n_zero, used, zero_method, alternative)
    if used == "exact":
        pmf = _signed_rank_null_pmf(m)
        cdf = np.cumsum(pmf)
        sf = np.cumsum(pmf[::-1])[::-1]  # P(T+ >= s)
        t = int(round(r_plus))
        p_le, p_ge = float(min(cdf[t], 1.0)), float(min(sf[t], 1.0))
        p = {"less": p_le, "greater": p_ge, "two-sided": min(1.0, 2.0 * min(p_le, p_ge))}[alternative]
        z = math.nan
    else:
        mu = float(np.sum(ranks)) / 2.0
        sigma = math.sqrt(float(np.sum(ranks**2)) / 4.0)
        diff = r_plus - mu
        if correction:
            cc = {"greater": 0.5, "less": -0.5, "two-sided": 0.5 * float(np.sign(diff))}[alternative]
            diff -= cc
        z = diff / sigma
        if alternative == "two-sided":
            p = float(min(1.0, 2.0 * special.ndtr(-abs(z))))
        elif alternative == "greater":
            p = float(special.ndtr(-z))
        else:
            p = float(special.ndtr(z))
    return WilcoxonResult(r_plus, p, r_plus, r_minus, z, rbc, n_ranked, n_zero, used, zero_method, alternative)


def rank_biserial(a, b, *, zero_method: str = "wilcox") -> float:
    r"""Matched-pairs rank-biserial correlation (Kerby 2014 "simple difference" form).

    :math:`r = (T^+ - T^-) / S`, with :math:`T^\pm` the signed-rank sums of ``d = a - b`` and
    :math:`S = n(n+1)/2` the total rank sum: the proportion of rank mass favouring ``a`` minus
    the proportion favouring ``b``; in [-1, 1]. Under ``"wilcox"`` zero differences are
    dropped (``n`` = non-zero pairs, so :math:`S = T^+ + T^-`); under ``"pratt"`` they keep
    their ranks in :math:`S` and so pull ``r`` towards 0.

    Parameters
    ----------
    a, b : array_like, 1-D, same length
    zero_method : {"wilcox", "pratt"}, default "wilcox"

    Returns
    -------
    float
        ``r``; NaN when nothing is ranked (all differences zero under ``"wilcox"``).

    Examples
    --------
    Differences 1, 2, -3, 4, 5 have ranks 1..5, :math:`T^+ = 12`, :math:`T^- = 3`:

    >>> rank_biserial([1, 2, -3, 4, 5], [0, 0, 0, 0, 0])
    0.6
    """
    _check_choice(zero_method, "zero_method", ("wilcox", "pratt"))
    d = _paired_differences(a, b)
    ranks, signs, n_ranked, _ = _signed_ranks(d, zero_method)
    total = n_ranked * (n_ranked + 1) / 2.0
    if total == 0:
        return math.nan
    return float((np.sum(ranks[signs > 0]) - np.sum(ranks[signs < 0])) / total)


def holm(pvalues) -> np.ndarray:
    r"""Holm–Bonferroni step-down adjusted p-values (family-wise error control).

    With the ``m`` p-values sorted ascending :math:`p_{(1)} \le \dots \le p_{(m)}`:
    :math:`\tilde p_{(i)} = \min\{1, \max_{j \le i} (m - j + 1)\, p_{(j)}\}`, returned in the
    input order. Rejecting every hypothesis with :math:`\tilde p \le \alpha` is exactly Holm's
    step-down procedure at level :math:`\alpha`, valid under arbitrary dependence.

    Parameters
    ----------
    pvalues : array_like, 1-D
        p-values in [0, 1] (no NaN: a missing test must be decided on, not skipped).

    Returns
    -------
    numpy.ndarray
        Adjusted p-values, same order and length as the input.

    Examples
    --------
    >>> holm([0.01, 0.04, 0.03, 0.005]).tolist()
    [0.03, 0.06, 0.06, 0.02]
    """
    p = _as_1d_float(pvalues, "pvalues")
    if np.any((p < 0) | (p > 1)):
        raise ValueError("`pvalues` must lie in [0, 1]")
    m = p.size
    order = np.argsort(p, kind="stable")
    adj_sorted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adj_sorted
    return out


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


class ReliabilityTable(NamedTuple):
    """Result of :func:`reliability_table`; one entry per bin."""

    lower: np.ndarray
    upper: np.ndarray
    count: np.ndarray
    mean_confidence: np.ndarray
    accuracy: np.ndarray


def _calibration_inputs(confidences, correct) -> tuple[np.ndarray, np.ndarray]:
    conf = _as_1d_float(confidences, "confidences")
    if np.any((conf < 0) | (conf > 1)):
        raise ValueError("`confidences` must lie in [0, 1]")
    corr = _as_1d_float(correct, "correct")
    if corr.shape != conf.shape:
        raise ValueError(
            f"`correct` must have the same length as `confidences`, got {corr.size} and {conf.size}"
        )
    if np.any((corr != 0) & (corr != 1)):
        raise ValueError("`correct` must be boolean or 0/1")
    return conf, corr


def reliability_table(confidences, correct, n_bins: int = 15, strategy: str = "uniform") -> ReliabilityTable:
    r"""Per-bin count, mean confidence and accuracy (the data behind a reliability diagram).

    Bins are right-closed, :math:`(l, u]`, with the first bin also containing its lower edge.

    * ``"uniform"``: ``n_bins`` equal-width bins with edges ``i / n_bins`` (so e.g. 0.3 with 10
      bins falls in (0.2, 0.3]); empty bins are kept, with NaN mean confidence and accuracy.
    * ``"quantile"``: equal-mass bins. The sorted confidences are cut into ``n_bins`` runs
      whose sizes differ by at most one; each run's largest confidence is its bin's upper
      edge and values are then binned *by value*, so tied confidences always share a bin and
      the result does not depend on input order. Consequently ties can merge bins (fewer than
      ``n_bins`` are returned) and counts are only approximately equal when ties straddle a
      cut. ``lower`` of a quantile bin is the previous bin's (exclusive) upper edge, or the
      smallest confidence for the first bin.

    Parameters
    ----------
    confidences : array_like, 1-D
        Predicted probability of the predicted class (top-label confidence), in [0, 1].
    correct : array_like, 1-D
        Whether each prediction was right (bool or 0/1).
    n_bins : int, default 15
    strategy : {"uniform", "quantile"}, default "uniform"

    Returns
    -------
    ReliabilityTable
        Arrays ``lower``, ``upper``, ``count``, ``mean_confidence``, ``accuracy``.

    Examples
    --------
    >>> t = reliability_table([0.2, 0.3, 0.6, 0.9, 0.95], [0, 1, 1, 1, 0], n_bins=2)
    >>> t.count.tolist(), t.mean_confidence.round(4).tolist(), t.accuracy.round(4).tolist()
    ([2, 3], [0.25, 0.8167], [0.5, 0.6667])
    """
    conf, corr = _calibration_inputs(confidences, correct)
    n_bins = _check_int(n_bins, "n_bins", 1)
    _check_choice(strategy, "strategy", ("uniform", "quantile"))
    if strategy == "uniform":
        edges = np.arange(n_bins + 1) / n_bins
        lower, upper = edges[:-1], edges[1:]
        idx = np.searchsorted(upper[:-1], conf, side="left")
    else:
        srt = np.sort(conf)
        ends = np.cumsum([len(ch) for ch in np.array_split(np.arange(srt.size), n_bins)])
        upper = np.unique(srt[ends[ends > 0] - 1])
        lower = np.concatenate([[srt[0]], upper[:-1]])
        idx = np.searchsorted(upper, conf, side="left")
    nb = upper.size
    count = np.bincount(idx, minlength=nb)
    sum_conf = np.bincount(idx, weights=conf, minlength=nb)
    sum_corr = np.bincount(idx, weights=corr, minlength=nb)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, sum_conf / count, np.nan)
        acc = np.where(count > 0, sum_corr / count, np.nan)
    return ReliabilityTable(lower.astype(float), upper.astype(float), count, mean_conf, acc)


def expected_calibration_error(
    confidences, correct, n_bins: int = 15, strategy: str = "uniform"
) -> float:
    r"""Expected calibration error, :math:`\sum_b (n_b / N)\,|\mathrm{acc}_b - \mathrm{conf}_b|`.

    Binning as in :func:`reliability_table` (``"uniform"`` = equal-width as in Guo et al. 2017
    but with 0 included in the first bin; ``"quantile"`` = equal-mass). ECE is biased upwards
    for small samples and depends on ``n_bins``: always report the binning used.

    Parameters
    ----------
    confidences, correct, n_bins, strategy
        See :func:`reliability_table`.

    Returns
    -------
    float
        ECE in [0, 1].

    Examples
    --------
    Bin (0, 0.5]: confidence 0.25, accuracy 0.5; bin (0.5, 1]: 0.8167 vs 0.6667, so
    ECE = 2/5 * 0.25 + 3/5 * 0.15:

    >>> print(f"{expected_calibration_error([0.2, 0.3, 0.6, 0.9, 0.95], [0, 1, 1, 1, 0], n_bins=2):.4f}")
    0.1900
    """
    t = reliability_table(confidences, correct, n_bins=n_bins, strategy=strategy)
    nz = t.count > 0
    gaps = np.abs(t.accuracy[nz] - t.mean_confidence[nz])
    return float(np.sum(t.count[nz] * gaps) / np.sum(t.count))


def maximum_calibration_error(
    confidences, correct, n_bins: int = 15, strategy: str = "uniform"
) -> float:
    r"""Maximum calibration error: the largest :math:`|\mathrm{acc}_b - \mathrm{conf}_b|` over non-empty bins.

    Parameters
    ----------
    confidences, correct, n_bins, strategy
        See :func:`reliability_table`.

    Returns
    -------
    float
        MCE in [0, 1]. Very sensitive to sparsely populated bins.

    Examples
    --------
    >>> print(f"{maximum_calibration_error([0.2, 0.3, 0.6, 0.9, 0.95], [0, 1, 1, 1, 0], n_bins=2):.4f}")
    0.2500
    """
    t = reliability_table(confidences, correct, n_bins=n_bins, strategy=strategy)
    nz = t.count > 0
    return float(np.max(np.abs(t.accuracy[nz] - t.mean_confidence[nz])))


def brier_score(probs, labels) -> float:
    r"""Brier score (mean squared error of probabilistic predictions; lower is better).

    * Binary: ``probs`` 1-D, the probability of class 1; ``labels`` in {0, 1}. Score
      :math:`\frac1N\sum_i (p_i - y_i)^2`, in [0, 1].
    * Multiclass: ``probs`` of shape (N, K) with rows summing to 1 (tolerance 1e-4);
      ``labels`` integer class indices in [0, K). Score
      :math:`\frac1N\sum_i\sum_k (p_{ik} - [y_i = k])^2` (Brier 1950), in [0, 2].

    The two forms differ by a factor of 2 for K = 2 (the (N, 2) form counts both columns);
    state which one you report.

    Parameters
    ----------
    probs : array_like, shape (N,) or (N, K)
    labels : array_like of int, shape (N,)

    Returns
    -------
    float

    Examples
    --------
    >>> print(f"{brier_score([0.9, 0.2, 0.6], [1, 0, 0]):.4f}")
    0.1367
    >>> print(f"{brier_score([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], [0, 1]):.4f}")
    0.8000
    """
    p = np.asarray(probs, dtype=float)
    y = np.asarray(labels)
    if p.ndim not in (1, 2):
        raise ValueError(f"`probs` must be 1-D (binary) or 2-D (N, K), got shape {p.shape}")
    if p.shape[0] == 0:
        raise ValueError("`probs` is empty")
    if y.ndim != 1 or y.shape[0] != p.shape[0]:
        raise ValueError(f"`labels` must be 1-D with length {p.shape[0]}, got shape {y.shape}")
    if not np.all(np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError("`probs` must be finite probabilities in [0, 1]")
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_)):
        yf = y.astype(float)
        if not np.all(np.isfinite(yf)) or np.any(yf != np.round(yf)):
            raise ValueError("`labels` must be integers")
        y = yf.astype(np.int64)
    y = y.astype(np.int64)
    if p.ndim == 1:
        if np.any((y != 0) & (y != 1)):
            raise ValueError("`labels` must be 0 or 1 for binary (1-D) `probs`")
        return float(np.mean((p - y) ** 2))
    k = p.shape[1]
    if np.any((y < 0) | (y >= k)):
        raise ValueError(f"`labels` must be class indices in [0, {k})")
    if not np.allclose(p.sum(axis=1), 1.0, rtol=0, atol=1e-4):
        raise ValueError("rows of `probs` must sum to 1")
    onehot = np.zeros_like(p)
    onehot[np.arange(p.shape[0]), y] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


class TemperatureFit(NamedTuple):
    """Result of :func:`fit_temperature`."""

    temperature: float
    nll_before: float
    nll_after: float
    at_bound: bool


def _logits_labels(logits, labels) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, dtype=float)
    if z.ndim == 1:  # binary: logit of class 1
        z = np.stack([np.zeros_like(z), z], axis=1)
    if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] < 2:
        raise ValueError(f"`logits` must have shape (N,) or (N, K) with K >= 2 and N >= 1, got {np.shape(logits)}")
    if not np.all(np.isfinite(z)):
        raise ValueError("`logits` contains non-finite values")
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != z.shape[0]:
        raise ValueError(f"`labels` must be 1-D with length {z.shape[0]}, got shape {y.shape}")
    yf = y.astype(float)
    if not np.all(np.isfinite(yf)) or np.any(yf != np.round(yf)) or np.any((yf < 0) | (yf >= z.shape[1])):
        raise ValueError(f"`labels` must be integer class indices in [0, {z.shape[1]})")
    return z, yf.astype(np.int64)


def _nll(z: np.ndarray, y: np.ndarray, beta: float) -> float:
    s = beta * z
    return float(np.mean(special.logsumexp(s, axis=1) - s[np.arange(y.size), y]))


def fit_temperature(logits, labels, *, bounds: tuple[float, float] = (0.05, 20.0)) -> TemperatureFit:
    r"""Fit the temperature ``T > 0`` minimising the NLL of ``softmax(logits / T)`` (Guo et al. 2017).

    Fit on held-out calibration episodes, never on the episodes you then report. The mean NLL
    is convex in :math:`\beta = 1/T`, so a bounded scalar search over :math:`\beta` (Brent,
    ``scipy.optimize.minimize_scalar``) finds the global optimum within ``bounds``. The
    returned fit never has a higher NLL than ``T = 1`` (guaranteed, since ``T = 1`` is also
    evaluated when it lies inside ``bounds``).

    Parameters
    ----------
    logits : array_like, shape (N, K) or (N,)
        Uncalibrated logits; a 1-D array is the binary logit of class 1 (sigmoid model).
    labels : array_like of int, shape (N,)
        True class indices.
    bounds : (float, float), default (0.05, 20.0)
        Search interval for ``T``.

    Returns
    -------
    TemperatureFit
        ``temperature``, ``nll_before`` (at T = 1), ``nll_after`` (at the fitted T; mean nats
        per example) and ``at_bound`` (True if the optimum hit ``bounds``: widen them).

    Examples
    --------
    >>> z = [[4.0, 0.0], [0.0, 4.0], [4.0, 0.0], [0.0, 4.0]]
    >>> fit = fit_temperature(z, [0, 1, 1, 0])
    >>> fit.nll_after <= fit.nll_before, fit.temperature > 10
    (True, True)
    """
    z, y = _logits_labels(logits, labels)
    try:
        t_lo, t_hi = (float(v) for v in bounds)
    except (TypeError, ValueError) as exc:
        raise ValueError("`bounds` must be a pair of floats (t_min, t_max)") from exc
    if not (0 < t_lo < t_hi < math.inf):
        raise ValueError(f"`bounds` must satisfy 0 < t_min < t_max < inf, got {bounds!r}")
    b_lo, b_hi = 1.0 / t_hi, 1.0 / t_lo
    res = optimize.minimize_scalar(
        lambda b: _nll(z, y, b), bounds=(b_lo, b_hi), method="bounded", options={"xatol": 1e-10}
    )
    beta, nll_after = float(res.x), float(res.fun)
    nll_before = _nll(z, y, 1.0)
    for cand in (b_lo, b_hi) + ((1.0,) if b_lo <= 1.0 <= b_hi else ()):
        v = _nll(z, y, cand)
        if v < nll_after:
            beta, nll_after = cand, v
    tol = 1e-6 * (b_hi - b_lo)
    at_bound = bool(beta - b_lo <= tol or b_hi - beta <= tol)
    return TemperatureFit(1.0 / beta, nll_before, nll_after, at_bound)


# --------------------------------------------------------------------------------------------
# Meta-learning cross-validation
# --------------------------------------------------------------------------------------------


class Fold(NamedTuple):
    """One fold of :func:`class_folds`: sorted unique class ids for meta-training and testing."""

    train: np.ndarray
    test: np.ndarray


def class_folds(class_ids, k: int, rng=None, groups=None) -> list[Fold]:
    """K-fold cross-validation over *classes* (or groups of classes), never over examples.

    Meta-learning evaluation needs test classes the learner never saw in meta-training. Each
    unit (a class, or a group such as a task family or script when ``groups`` is given) is
    placed in exactly one test fold, and a fold's train set is every other class, so no class
    appears on both sides and every class is tested exactly once.

    Parameters
    ----------
    class_ids : array_like, 1-D
        Class identifier per item (repeats allowed, e.g. one per example); the folds are built
        over the unique values.
    k : int
        Number of folds, ``2 <= k <= number of units``.
    rng : None, int or numpy.random.Generator
        Randomness for the assignment of units to folds.
    groups : array_like, 1-D, optional
        Group of each entry of ``class_ids`` (same length). All classes of a group go to the
        same fold; a class listed under two different groups raises ``ValueError`` (it would
        leak). Groups are shuffled and then assigned greedily to the fold with the fewest
        classes so far, which balances folds by number of classes.

    Returns
    -------
    list of Fold
        ``k`` folds of ``(train, test)`` arrays of class ids. Without groups, test folds are a
        random partition with sizes differing by at most one.

    Examples
    --------
    >>> folds = class_folds(["a", "b", "c", "d", "e"], k=2, rng=0)
    >>> sorted(c for f in folds for c in f.test.tolist())
    ['a', 'b', 'c', 'd', 'e']
    >>> [len(f.test) for f in folds]
    [3, 2]
    >>> all(set(f.train).isdisjoint(f.test) for f in folds)
    True
    """
    ids = np.asarray(class_ids)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"`class_ids` must be a non-empty 1-D array, got shape {ids.shape}")
    k = _check_int(k, "k", 2)
    gen = np.random.default_rng(rng)
    classes = np.unique(ids)
    if groups is None:
        if k > classes.size:
            raise ValueError(f"`k` ({k}) exceeds the number of classes ({classes.size})")
        perm = gen.permutation(classes.size)
        tests = [np.sort(classes[p]) for p in np.array_split(perm, k)]
    else:
        grp = np.asarray(groups)
        if grp.shape != ids.shape:
            raise ValueError(f"`groups` must have the same length as `class_ids`, got {grp.shape} and {ids.shape}")
        pairs = np.unique(np.stack([np.unique(ids, return_inverse=True)[1], np.unique(grp, return_inverse=True)[1]]), axis=1)
        cls_idx, grp_idx = pairs
        if np.unique(cls_idx).size != cls_idx.size:
            dup = classes[np.unique(cls_idx[np.r_[False, cls_idx[1:] == cls_idx[:-1]]])]
            raise ValueError(f"`groups`: class(es) {dup.tolist()[:5]} belong to more than one group; folds would leak")
        n_groups = int(grp_idx.max()) + 1
        if k > n_groups:
            raise ValueError(f"`k` ({k}) exceeds the number of groups ({n_groups})")
        members = [cls_idx[grp_idx == g] for g in range(n_groups)]
        sizes = np.zeros(k, dtype=int)
        fold_members: list[list[np.ndarray]] = [[] for _ in range(k)]
        for g in gen.permutation(n_groups):
            # fewest classes first; among equals, fewest groups (so no fold stays empty)
            f = min(range(k), key=lambda j: (sizes[j], len(fold_members[j])))
            fold_members[f].append(members[g])
            sizes[f] += members[g].size
        tests = [np.sort(classes[np.concatenate(m)]) for m in fold_members]
    return [Fold(np.setdiff1d(classes, t), t) for t in tests]


# --------------------------------------------------------------------------------------------
# Online and continual metrics
# --------------------------------------------------------------------------------------------


def prequential(values, *, fading: float = 1.0) -> np.ndarray:
    r"""Prequential (test-then-train) curve: running mean of a per-step metric.

    ``out[t] = sum_{i<=t} f^{t-i} v_i / sum_{i<=t} f^{t-i}`` with fading factor ``f``
    (Gama, Sebastião & Rodrigues 2013). ``fading=1`` is the plain cumulative mean.

    Parameters
    ----------
    values : array_like, 1-D
        Per-step metric recorded *before* learning from that step (e.g. 0/1 correctness).
    fading : float in (0, 1], default 1.0

    Returns
    -------
    numpy.ndarray
        Same length as ``values``.

    Examples
    --------
    >>> prequential([1, 0, 1, 1]).tolist()
    [1.0, 0.5, 0.6666666666666666, 0.75]
    >>> prequential([1, 0], fading=0.5).tolist()
    [1.0, 0.3333333333333333]
    """
    v = _as_1d_float(values, "values")
    if isinstance(fading, bool) or not isinstance(fading, numbers.Real) or not (0.0 < float(fading) <= 1.0):
        raise ValueError(f"`fading` must be in (0, 1], got {fading!r}")
    f = float(fading)
    if f == 1.0:
        return np.cumsum(v) / np.arange(1, v.size + 1)
    num = signal.lfilter([1.0], [1.0, -f], v)
    den = signal.lfilter([1.0], [1.0, -f], np.ones_like(v))
    return num / den


class SwitchWindows(NamedTuple):
    """Result of :func:`accuracy_after_switch`: one entry per switch."""

    mean: np.ndarray
    count: np.ndarray


def accuracy_after_switch(values, switch_indices, k: int) -> SwitchWindows:
    """Mean of a per-step metric over the ``k`` steps starting at each task switch.

    The window for a switch at ``s`` is ``values[s : min(s + k, next_switch, len(values))]``:
    it never runs into the next switch's regime nor past the end of the stream. Truncated
    windows are reported, not hidden: ``count`` gives each window's length, which is less
    than ``k`` when truncated.

    Parameters
    ----------
    values : array_like, 1-D
        Per-step metric (e.g. prequential 0/1 correctness), index = step.
    switch_indices : array_like of int
        Strictly increasing step indices of the switches, each in ``[0, len(values))``.
    k : int
        Window length (>= 1).

    Returns
    -------
    SwitchWindows
        ``mean`` (float array) and ``count`` (int array), one per switch.

    Examples
    --------
    >>> r = accuracy_after_switch([1, 1, 0, 0, 1, 1, 0, 1], [2, 6], k=3)
    >>> r.mean.tolist(), r.count.tolist()
    ([0.3333333333333333, 0.5], [3, 2])
    """
    v = _as_1d_float(values, "values")
    k = _check_int(k, "k", 1)
    s = np.asarray(switch_indices)
    if s.ndim != 1:
        raise ValueError("`switch_indices` must be 1-D")
    if s.size and not (np.issubdtype(s.dtype, np.integer) or np.all(np.asarray(s, float) == np.round(np.asarray(s, float)))):
        raise ValueError("`switch_indices` must be integers")
    s = s.astype(np.int64)
    if s.size and (s[0] < 0 or s[-1] >= v.size):
        raise ValueError(f"`switch_indices` must lie in [0, {v.size})")
    if np.any(np.diff(s) <= 0):
        raise ValueError("`switch_indices` must be strictly increasing")
    nxt = np.append(s[1:], v.size)
    ends = np.minimum(np.minimum(s + k, nxt), v.size)
    csum = np.concatenate([[0.0], np.cumsum(v)])
    count = ends - s
    mean = (csum[ends] - csum[s]) / count
    return SwitchWindows(mean.astype(float), count.astype(np.int64))


class ContinualMetrics(NamedTuple):
    """Result of :func:`continual_metrics`."""

    acc: float
    bwt: float
    fwt: float
    forgetting: float
    forgetting_per_task: np.ndarray


def continual_metrics(R, baseline=None) -> ContinualMetrics:
    r"""Continual-learning summary metrics from a probe matrix.

    ``R[i, j]`` is the performance (higher is better) on task/family ``j`` after training
    stage ``i``, where stage ``i`` trains on task ``i``; ``R`` is ``T x T``.

    * ``ACC = mean_j R[T-1, j]`` (final average performance).
    * ``BWT = 1/(T-1) sum_{j<T-1} (R[T-1, j] - R[j, j])`` (backward transfer; negative =
      forgetting). GEM, Lopez-Paz & Ranzato 2017.
    * ``FWT = 1/(T-1) sum_{j>=1} (R[j-1, j] - b_j)`` with ``b`` the performance of the
      untrained (e.g. randomly initialised) model on each task; NaN if ``baseline`` is None.
      GEM, Lopez-Paz & Ranzato 2017.
    * Forgetting (Chaudhry et al. 2018): for each ``j < T-1``,
      ``f_j = max_{l < T-1} R[l, j] - R[T-1, j]`` (the max runs over all earlier stages, as in
      the paper, including those before task ``j`` was trained); ``forgetting`` is their mean.

    Parameters
    ----------
    R : array_like, shape (T, T)
    baseline : array_like, shape (T,), optional

    Returns
    -------
    ContinualMetrics
        ``acc, bwt, fwt, forgetting, forgetting_per_task`` (length ``T-1``). With ``T == 1``
        BWT, FWT and forgetting are NaN (undefined) and ``forgetting_per_task`` is empty.

    Examples
    --------
    >>> R = [[0.9, 0.1, 0.2], [0.7, 0.8, 0.3], [0.6, 0.7, 0.9]]
    >>> m = continual_metrics(R, baseline=[0.1, 0.1, 0.1])
    >>> print(f"ACC={m.acc:.4f} BWT={m.bwt:.4f} FWT={m.fwt:.4f} F={m.forgetting:.4f}")
    ACC=0.7333 BWT=-0.2000 FWT=0.1000 F=0.2000
    """
    r = np.asarray(R, dtype=float)
    if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] == 0:
        raise ValueError(f"`R` must be a non-empty square (T, T) matrix, got shape {r.shape}")
    if not np.all(np.isfinite(r)):
        raise ValueError("`R` contains non-finite values")
    T = r.shape[0]
    acc = float(np.mean(r[-1]))
    if baseline is not None:
        b = _as_1d_float(baseline, "baseline")
        if b.size != T:
            raise ValueError(f"`baseline` must have length T={T}, got {b.size}")
    if T == 1:
        return ContinualMetrics(acc, math.nan, math.nan, math.nan, np.zeros(0))
    bwt = float(np.mean(r[-1, :-1] - np.diag(r)[:-1]))
    fwt = math.nan if baseline is None else float(np.mean(np.diag(r, k=1) - b[1:]))
    f_j = np.max(r[:-1, :-1], axis=0) - r[-1, :-1]
    return ContinualMetrics(acc, bwt, fwt, float(np.mean(f_j)), f_j)


class BoundaryScores(NamedTuple):
    """Result of :func:`boundary_scores`."""

    precision: float
    recall: float
    f1: float
    tp: int
    fp: int
    fn: int
    delays: np.ndarray
    mean_delay: float


def boundary_scores(true_boundaries, detected, tolerance) -> BoundaryScores:
    """Precision, recall, F1 and detection delays of detected task boundaries (change points).

    A true boundary at ``t`` is detected by the **first** detection ``d`` with
    ``t <= d <= t + tolerance`` and ``d`` before the next true boundary (a detection at or
    after the next boundary belongs to that one). Each true boundary is matched to at most one
    detection and each detection to at most one boundary; other detections are false
    positives (including repeated alarms for the same boundary and alarms before it).

    ``precision = tp / n_detected`` (NaN if nothing was detected), ``recall = tp / n_true``
    (NaN if there are no true boundaries) and ``F1 = 2 tp / (2 tp + fp + fn)`` (NaN only if
    both are empty; 0 when one side is empty and the other is not).

    Parameters
    ----------
    true_boundaries : array_like, 1-D
        Times (step indices) of true boundaries; distinct.
    detected : array_like, 1-D
        Times of detections (alarms); duplicates count as separate alarms.
    tolerance : float
        Largest allowed delay, ``>= 0`` (inclusive).

    Returns
    -------
    BoundaryScores
        ``precision, recall, f1, tp, fp, fn``, ``delays`` (``d - t`` per true boundary, in
        sorted order, NaN when missed) and ``mean_delay`` over detected boundaries (NaN if
        none).

    Examples
    --------
    >>> s = boundary_scores([100, 200, 300], [95, 104, 110, 230, 301], tolerance=10)
    >>> print(s.tp, s.fp, s.fn, f"{s.precision:.2f} {s.recall:.3f} {s.f1:.2f}")
    2 3 1 0.40 0.667 0.50
    >>> s.delays.tolist(), s.mean_delay
    ([4.0, nan, 1.0], 2.5)
    """
    t = np.sort(_as_1d_float(true_boundaries, "true_boundaries", min_size=0))
    d = np.sort(_as_1d_float(detected, "detected", min_size=0))
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not (0 <= float(tolerance) < math.inf):
        raise ValueError(f"`tolerance` must be a finite number >= 0, got {tolerance!r}")
    if np.any(np.diff(t) == 0):
        raise ValueError("`true_boundaries` must be distinct")
    tol = float(tolerance)
    delays = np.full(t.size, np.nan)
    nxt = np.append(t[1:], np.inf)
    for i, ti in enumerate(t):
        j = np.searchsorted(d, ti, side="left")  # first detection >= ti
        if j < d.size and d[j] - ti <= tol and d[j] < nxt[i]:
            delays[i] = d[j] - ti
    tp = int(np.count_nonzero(~np.isnan(delays)))
    fp = int(d.size - tp)
    fn = int(t.size - tp)
    precision = tp / d.size if d.size else math.nan
    recall = tp / t.size if t.size else math.nan
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else math.nan
    mean_delay = float(np.nanmean(delays)) if tp else math.nan
    return BoundaryScores(float(precision), float(recall), float(f1), tp, fp, fn, delays, mean_delay)
