"""Tests for agent.stats: each function against scipy (or sklearn) and/or a hand-worked example."""

from __future__ import annotations

import doctest
import itertools
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose, assert_array_equal
from scipy import stats

import agent.stats as S

FAST = settings(max_examples=60, deadline=None)


# ---------------------------------------------------------------------------------------------
# module hygiene
# ---------------------------------------------------------------------------------------------


def test_doctests_pass():
    res = doctest.testmod(S, optionflags=doctest.ELLIPSIS)
    assert res.failed == 0 and res.attempted > 20


def test_import_is_silent():
    out = subprocess.run(
        [sys.executable, "-c", "import agent.stats"], capture_output=True, text=True, check=True
    )
    assert out.stdout == "" and out.stderr == ""


def test_no_global_rng_use():
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    S.bootstrap_ci(np.arange(10.0), n_resamples=50)
    S.class_folds(np.arange(10), 3)
    assert_array_equal(np.random.get_state()[1], before)


def test_every_public_function_has_an_example():
    for name in S.__all__:
        obj = getattr(S, name)
        if callable(obj) and not isinstance(obj, type):
            assert ">>>" in (obj.__doc__ or ""), name


# ---------------------------------------------------------------------------------------------
# mean_ci
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("conf", [0.8, 0.9, 0.95, 0.99])
@pytest.mark.parametrize("n", [2, 3, 10, 101])
def test_mean_ci_matches_scipy(conf, n):
    x = np.random.default_rng(n).gamma(2.0, size=n)
    r = S.mean_ci(x, conf)
    lo, hi = stats.t.interval(conf, n - 1, loc=x.mean(), scale=stats.sem(x))
    assert_allclose([r.low, r.high], [lo, hi], rtol=1e-12)
    ci = stats.ttest_1samp(x, 0.0).confidence_interval(confidence_level=conf)
    assert_allclose([r.low, r.high], [ci.low, ci.high], rtol=1e-12)
    assert r.n == n and r.n_omitted == 0
    assert_allclose(r.std, np.std(x, ddof=1))
    assert_allclose(r.half_width, (r.high - r.low) / 2)


def test_mean_ci_worked_example():
    # mean 2.5, s = sqrt(5/3), t_{0.975, 3} = 3.182446305
    r = S.mean_ci([1.0, 2.0, 3.0, 4.0])
    assert r.mean == 2.5
    assert_allclose(r.half_width, 3.182446305284263 * math.sqrt(5 / 3) / 2, rtol=1e-12)


def test_mean_ci_coverage_normal():
    rng = np.random.default_rng(7)
    x = rng.normal(1.0, 2.0, size=(4000, 5))
    hits = sum(r.low <= 1.0 <= r.high for r in map(S.mean_ci, x))
    assert abs(hits / 4000 - 0.95) < 0.015


def test_mean_ci_edge_cases():
    r = S.mean_ci([3.0])
    assert r.n == 1 and r.mean == 3.0 and math.isnan(r.std)
    assert r.half_width == math.inf and r.low == -math.inf and r.high == math.inf
    r = S.mean_ci([0.1] * 7)
    assert r.half_width == 0.0 and r.low == r.high == pytest.approx(0.1)
    with pytest.raises(ValueError, match="values"):
        S.mean_ci([1.0, np.nan])
    with pytest.raises(ValueError, match="values"):
        S.mean_ci([1.0, np.inf, 2.0])
    r = S.mean_ci([1.0, np.nan, 2.0, np.inf, 3.0], nan_policy="omit")
    assert (r.n, r.n_omitted, r.mean) == (3, 2, 2.0)
    with pytest.raises(ValueError, match="no finite"):
        S.mean_ci([np.nan], nan_policy="omit")
    with pytest.raises(ValueError, match="values"):
        S.mean_ci([])
    with pytest.raises(ValueError, match="confidence"):
        S.mean_ci([1.0, 2.0], confidence=95)
    with pytest.raises(ValueError, match="nan_policy"):
        S.mean_ci([1.0, 2.0], nan_policy="propagate")
    with pytest.raises(ValueError, match="1-D"):
        S.mean_ci([[1.0, 2.0]])


@FAST
@given(st.lists(st.floats(-1e6, 1e6), min_size=2, max_size=30), st.floats(0.5, 0.99))
def test_mean_ci_properties(xs, conf):
    r = S.mean_ci(xs, conf)
    assert r.low <= r.mean <= r.high
    assert S.mean_ci(xs, min(conf + 0.005, 0.999)).half_width >= r.half_width


# ---------------------------------------------------------------------------------------------
# bootstrap_ci
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["percentile", "bca"])
@pytest.mark.parametrize("statistic", [np.mean, np.median, np.std])
def test_bootstrap_same_seed_equals_scipy(method, statistic):
    x = np.random.default_rng(1).lognormal(size=40)
    r = S.bootstrap_ci(x, statistic, confidence=0.9, n_resamples=3000, method=method, rng=42)
    ref = stats.bootstrap(
        (x,), statistic, confidence_level=0.9, n_resamples=3000, method=method,
        rng=np.random.default_rng(42),
    )
    assert_allclose([r.low, r.high], [ref.confidence_interval.low, ref.confidence_interval.high], rtol=1e-10)
    assert_allclose(r.standard_error, ref.standard_error, rtol=1e-10)
    assert r.estimate == pytest.approx(statistic(x))


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_bootstrap_independent_seeds_agree_with_scipy(method):
    # different random streams: agreement only up to Monte Carlo error, so use many resamples
    x = np.random.default_rng(2).exponential(size=30)
    r = S.bootstrap_ci(x, np.mean, n_resamples=40000, method=method, rng=123)
    ref = stats.bootstrap((x,), np.mean, n_resamples=40000, method=method, rng=np.random.default_rng(999))
    width = ref.confidence_interval.high - ref.confidence_interval.low
    assert abs(r.low - ref.confidence_interval.low) < 0.03 * width
    assert abs(r.high - ref.confidence_interval.high) < 0.03 * width


def test_bootstrap_non_vectorised_statistic_and_batches():
    x = np.random.default_rng(3).normal(size=25)
    trimmed = lambda v: stats.trim_mean(v, 0.1)  # noqa: E731 - no `axis` parameter
    r1 = S.bootstrap_ci(x, trimmed, n_resamples=500, rng=5)
    r2 = S.bootstrap_ci(x, lambda v, axis=-1: stats.trim_mean(v, 0.1, axis=axis), n_resamples=500, rng=5)
    assert_allclose([r1.low, r1.high, r1.acceleration], [r2.low, r2.high, r2.acceleration], rtol=1e-12)
    r3 = S.bootstrap_ci(x, np.mean, n_resamples=1000, batch=7, rng=5)
    assert r3 == S.bootstrap_ci(x, np.mean, n_resamples=1000, rng=5)  # batching never changes results
    assert r3.n_resamples == 1000 and r3.low < r3.estimate < r3.high


def test_bootstrap_large_sample_is_batched_and_matches_scipy(monkeypatch):
    monkeypatch.setattr(S, "_BATCH_ELEMENTS", 1000)  # force many bootstrap and jackknife batches
    x = np.random.default_rng(8).lognormal(size=300)
    r = S.bootstrap_ci(x, np.median, n_resamples=2000, rng=3)
    ref = stats.bootstrap((x,), np.median, n_resamples=2000, rng=np.random.default_rng(3))
    assert_allclose([r.low, r.high], [ref.confidence_interval.low, ref.confidence_interval.high], rtol=1e-12)


# Efron & Tibshirani (1993), "An Introduction to the Bootstrap", Table 14.2: spatial test
# scores A (n = 26), theta = plug-in variance = 171.5; 90% intervals (B = 2000):
# percentile [100.8, 233.9], BCa [115.8, 259.6]; jackknife acceleration a = 0.061.
SPATIAL_A = np.array(
    [48, 36, 20, 29, 42, 42, 20, 42, 22, 41, 45, 14, 6, 0, 33, 28, 34, 4, 32, 24, 47, 41, 24, 26, 30, 41],
    dtype=float,
)


def test_bootstrap_bca_efron_tibshirani_worked_example():
    r = S.bootstrap_ci(SPATIAL_A, np.var, confidence=0.90, n_resamples=40000, method="bca", rng=2024)
    assert r.estimate == pytest.approx(171.534, abs=1e-3)
    assert r.acceleration == pytest.approx(0.061, abs=5e-4)  # deterministic (jackknife)
    assert r.low == pytest.approx(115.8, abs=4.0)  # Monte Carlo: book used B = 2000
    assert r.high == pytest.approx(259.6, abs=6.0)
    p = S.bootstrap_ci(SPATIAL_A, np.var, confidence=0.90, n_resamples=40000, method="percentile", rng=2024)
    assert p.low == pytest.approx(100.8, abs=4.0) and p.high == pytest.approx(233.9, abs=6.0)
    assert math.isnan(p.acceleration) and math.isnan(p.bias_correction)


def test_bootstrap_acceleration_closed_form_for_mean():
    # for the mean, the jackknife acceleration is sum(dev^3) / (6 * sum(dev^2)^1.5)
    x = np.random.default_rng(4).gamma(1.5, size=33)
    dev = x - x.mean()
    r = S.bootstrap_ci(x, np.mean, n_resamples=200, rng=0)
    assert_allclose(r.acceleration, np.sum(dev**3) / (6 * np.sum(dev**2) ** 1.5), rtol=1e-10)


def test_bootstrap_degenerate_and_validation():
    r = S.bootstrap_ci([2.0] * 10, n_resamples=100, rng=0)
    assert (r.low, r.high, r.acceleration, r.bias_correction) == (2.0, 2.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="at least 2"):
        S.bootstrap_ci([1.0])
    with pytest.raises(ValueError, match="method"):
        S.bootstrap_ci([1.0, 2.0], method="basic")
    with pytest.raises(ValueError, match="n_resamples"):
        S.bootstrap_ci([1.0, 2.0], n_resamples=0)
    with pytest.raises(ValueError, match="values"):
        S.bootstrap_ci([1.0, np.nan, 3.0])
    r = S.bootstrap_ci([1.0, np.nan, 3.0, 4.0], n_resamples=100, rng=0, nan_policy="omit")
    assert (r.n, r.n_omitted) == (3, 1)
    # a statistic whose replicates all exceed the estimate: BCa undefined -> clear error
    with pytest.raises(ValueError, match="BCa is undefined"):
        S.bootstrap_ci(np.arange(20.0), lambda v: float(v.size - np.unique(v).size), n_resamples=50, rng=0)


def test_bootstrap_reproducible_with_seed():
    x = np.arange(20.0) ** 1.5
    assert S.bootstrap_ci(x, rng=11, n_resamples=300) == S.bootstrap_ci(x, rng=11, n_resamples=300)
    g1, g2 = np.random.default_rng(11), np.random.default_rng(11)
    assert S.bootstrap_ci(x, rng=g1, n_resamples=300) == S.bootstrap_ci(x, rng=g2, n_resamples=300)


# ---------------------------------------------------------------------------------------------
# wilson_interval
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("correction", [False, True])
def test_wilson_matches_scipy(correction):
    scipy_method = "wilsoncc" if correction else "wilson"
    for n, conf in itertools.product([1, 2, 5, 17, 100, 1000], [0.8, 0.95, 0.99]):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            lo, hi = S.wilson_interval(k, n, conf, correction=correction)
            ref = stats.binomtest(k, n).proportion_ci(confidence_level=conf, method=scipy_method)
            assert_allclose([lo, hi], [max(0.0, ref.low), min(1.0, ref.high)], rtol=1e-12, atol=1e-15)
            assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_wilson_worked_example_and_validation():
    # k = 7, n = 10, z = 1.959964: centre (7 + z^2/2)/(10 + z^2), half z/(10+z^2) sqrt(2.1 + z^2/4)
    z = stats.norm.ppf(0.975)
    c, h = (7 + z * z / 2) / (10 + z * z), z / (10 + z * z) * math.sqrt(7 * 3 / 10 + z * z / 4)
    assert_allclose(S.wilson_interval(7, 10), (c - h, c + h), rtol=1e-12)
    assert S.wilson_interval(0, 5)[0] == 0.0 and S.wilson_interval(5, 5)[1] == 1.0
    for bad in [(-1, 5), (6, 5), (1, 0), (1.5, 5)]:
        with pytest.raises(ValueError):
            S.wilson_interval(*bad)
    with pytest.raises(ValueError, match="confidence"):
        S.wilson_interval(1, 5, 1.0)


# ---------------------------------------------------------------------------------------------
# paired t-test, Cohen's d_z
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alternative", ["two-sided", "less", "greater"])
@pytest.mark.parametrize("n", [2, 5, 40])
def test_paired_t_matches_scipy(alternative, n):
    rng = np.random.default_rng(n)
    a = rng.normal(size=n)
    b = a + rng.normal(0.3, 1.0, size=n)
    r = S.paired_t_test(a, b, alternative=alternative, confidence=0.9)
    ref = stats.ttest_rel(a, b, alternative=alternative)
    ci = ref.confidence_interval(confidence_level=0.9)
    assert_allclose([r.statistic, r.pvalue], [ref.statistic, ref.pvalue], rtol=1e-10)
    assert r.df == ref.df == n - 1
    assert_allclose([r.low, r.high], [ci.low, ci.high], rtol=1e-10)
    assert_allclose(r.mean_difference, np.mean(a - b))
    assert_allclose(r.cohens_dz, r.statistic / math.sqrt(n), rtol=1e-10)


def test_paired_t_degenerate():
    r = S.paired_t_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert math.isnan(r.statistic) and math.isnan(r.pvalue)
    r = S.paired_t_test([1.1, 2.1, 3.1], [1.0, 2.0, 3.0])  # not exactly constant in fp: fine
    assert r.pvalue < 1e-6
    r = S.paired_t_test([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])
    assert r.statistic == math.inf and r.pvalue == 0.0 and r.low == r.high == 1.0
    with pytest.raises(ValueError, match="same length"):
        S.paired_t_test([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="at least 2"):
        S.paired_t_test([1.0], [2.0])
    with pytest.raises(ValueError, match="alternative"):
        S.paired_t_test([1.0, 2.0], [2.0, 1.0], alternative="two_sided")
    with pytest.raises(ValueError, match="`b`"):
        S.paired_t_test([1.0, 2.0], [2.0, np.nan])


def test_cohens_dz_worked_example():
    # d = [1, 2, 0, 3]: mean 1.5, sd sqrt(5/3) -> 1.5 / 1.290994 = 1.161895
    assert S.cohens_dz([3, 5, 4, 6], [2, 3, 4, 3]) == pytest.approx(1.5 / math.sqrt(5 / 3), rel=1e-12)
    assert S.cohens_dz([1, 2], [1, 2]) != S.cohens_dz([1, 2], [1, 2])  # NaN
    assert S.cohens_dz([2, 3], [1, 2]) == math.inf
    assert S.cohens_dz([1, 3], [2, 2]) == 0.0


# ---------------------------------------------------------------------------------------------
# Wilcoxon signed-rank, rank-biserial
# ---------------------------------------------------------------------------------------------

# Hollander & Wolfe (1973) depression data, used in R's ?wilcox.test:
# wilcox.test(x, y, paired = TRUE) -> V = 40, p-value = 0.03906 (exact).
HW_X = [1.83, 0.50, 1.62, 2.48, 1.68, 1.88, 1.55, 3.06, 1.30]
HW_Y = [0.878, 0.647, 0.598, 2.05, 1.06, 1.29, 1.06, 3.14, 1.29]


def test_wilcoxon_hollander_wolfe_example():
    r = S.wilcoxon_signed_rank(HW_X, HW_Y)
    assert r.method == "exact" and r.r_plus == 40 and r.r_minus == 5
    assert r.pvalue == pytest.approx(0.0390625, abs=1e-12)  # = 2 * 10 / 2^9
    g = S.wilcoxon_signed_rank(HW_X, HW_Y, alternative="greater")
    assert g.pvalue == pytest.approx(0.01953125, abs=1e-12)  # R: alternative = "greater"
    assert r.rank_biserial == pytest.approx((40 - 5) / 45)


@pytest.mark.parametrize("alternative", ["two-sided", "less", "greater"])
def test_wilcoxon_exact_matches_scipy(alternative):
    rng = np.random.default_rng(11)
    for n in [1, 2, 5, 9, 16, 30, 50]:
        a = rng.normal(size=n)
        b = a + rng.normal(0.4, 1.0, size=n)
        r = S.wilcoxon_signed_rank(a, b, alternative=alternative)
        ref = stats.wilcoxon(a, b, alternative=alternative, method="exact")
        assert r.method == "exact"
        assert_allclose(r.pvalue, ref.pvalue, rtol=1e-10, atol=1e-15)
        ref_stat = min(r.r_plus, r.r_minus) if alternative == "two-sided" else r.r_plus
        assert ref.statistic == ref_stat


@pytest.mark.parametrize("zero_method", ["wilcox", "pratt"])
@pytest.mark.parametrize("correction", [True, False])
@pytest.mark.parametrize("alternative", ["two-sided", "less", "greater"])
def test_wilcoxon_approx_with_ties_and_zeros_matches_scipy(zero_method, correction, alternative):
    rng = np.random.default_rng(5)
    for n in [8, 20, 60, 200]:
        a = rng.integers(0, 6, size=n).astype(float)  # many ties and zero differences
        b = rng.integers(0, 6, size=n).astype(float) - (rng.random(n) < 0.3)
        r = S.wilcoxon_signed_rank(a, b, zero_method=zero_method, correction=correction,
                                   alternative=alternative, method="approx")
        ref = stats.wilcoxon(a, b, zero_method=zero_method, correction=correction,
                             alternative=alternative, method="asymptotic")
        assert_allclose(r.pvalue, ref.pvalue, rtol=1e-10)
        z_ref = ref.zstatistic
        assert_allclose(abs(r.zstatistic) if alternative == "two-sided" else r.zstatistic,
                        abs(z_ref) if alternative == "two-sided" else z_ref, rtol=1e-10)
        assert r.n_zero == int(np.sum(a == b))
        assert r.n == (n if zero_method == "pratt" else n - r.n_zero)


def test_wilcoxon_auto_selection_and_errors():
    rng = np.random.default_rng(0)
    a = rng.normal(size=60)
    assert S.wilcoxon_signed_rank(a, np.zeros(60)).method == "approx"  # n > 50
    assert S.wilcoxon_signed_rank(a[:50], np.zeros(50)).method == "exact"
    tied = [1.0, 2.0, 2.0, -3.0, 4.0]
    assert S.wilcoxon_signed_rank(tied, np.zeros(5)).method == "approx"
    with pytest.raises(ValueError, match="exact"):
        S.wilcoxon_signed_rank(tied, np.zeros(5), method="exact")
    # zeros: fine for exact under "wilcox" (dropped), not under "pratt"
    z = [0.0, 1.0, -2.0, 3.0, 4.0, 5.0]
    r = S.wilcoxon_signed_rank(z, np.zeros(6))
    assert r.method == "exact" and r.n == 5 and r.n_zero == 1
    ref = stats.wilcoxon(z, method="exact")
    assert r.pvalue == pytest.approx(ref.pvalue)
    assert S.wilcoxon_signed_rank(z, np.zeros(6), zero_method="pratt").method == "approx"
    allzero = S.wilcoxon_signed_rank([1.0, 2.0], [1.0, 2.0])
    assert math.isnan(allzero.pvalue) and allzero.n == 0
    for kw in [{"zero_method": "zsplit"}, {"method": "permutation"}, {"alternative": "both"}]:
        with pytest.raises(ValueError, match=next(iter(kw))):
            S.wilcoxon_signed_rank([1.0, 2.0], [0.0, 0.0], **kw)


def test_signed_rank_null_distribution_by_enumeration():
    m = 10
    sums = np.array([sum(r for r, s in zip(range(1, m + 1), signs) if s)
                     for signs in itertools.product([0, 1], repeat=m)])
    expected = np.bincount(sums, minlength=m * (m + 1) // 2 + 1) / 2**m
    assert_allclose(S._signed_rank_null_pmf(m), expected, rtol=1e-14)


def test_rank_biserial_worked_examples():
    # ranks 1..5, T+ = 1+2+4+5 = 12, T- = 3, S = 15
    assert S.rank_biserial([1, 2, -3, 4, 5], np.zeros(5)) == pytest.approx(0.6)
    # d = [0, 1, -2, 3, 3]. wilcox: ranks of 1,2,3,3 = 1,2,3.5,3.5 -> (8 - 2)/10
    d = [0, 1, -2, 3, 3]
    assert S.rank_biserial(d, np.zeros(5)) == pytest.approx(0.6)
    # pratt: ranks of 0,1,2,3,3 = 1,2,3,4.5,4.5 -> T+ = 11, T- = 3, S = 15
    assert S.rank_biserial(d, np.zeros(5), zero_method="pratt") == pytest.approx(8 / 15)
    assert S.rank_biserial([1, 2, 3], [0, 0, 0]) == 1.0
    assert S.rank_biserial([0, 0], [1, 2]) == -1.0
    assert math.isnan(S.rank_biserial([1, 2], [1, 2]))


@FAST
@given(st.lists(st.tuples(st.integers(-5, 5), st.integers(-5, 5)), min_size=1, max_size=25))
def test_rank_biserial_identities(pairs):
    a, b = (np.array(v, dtype=float) for v in zip(*pairs))
    r = S.rank_biserial(a, b)
    w = S.wilcoxon_signed_rank(a, b, method="approx")
    if w.n == 0:
        assert math.isnan(r)
        return
    assert -1.0 <= r <= 1.0
    assert r == pytest.approx(4 * w.r_plus / (w.n * (w.n + 1)) - 1)  # Kerby's simple difference
    assert r == pytest.approx(w.rank_biserial)
    assert S.rank_biserial(b, a) == pytest.approx(-r)


# ---------------------------------------------------------------------------------------------
# Holm
# ---------------------------------------------------------------------------------------------


def test_holm_worked_example():
    # sorted: .005*4 = .02; .01*3 = .03; .03*2 = .06; .04*1 = .04 -> max(.06, .04) = .06
    assert_allclose(S.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02], rtol=1e-12)
    assert_allclose(S.holm([0.5, 0.3]), [0.6, 0.6])
    assert_allclose(S.holm([0.9, 0.8]), [1.0, 1.0])  # capped at 1
    assert_allclose(S.holm([0.02]), [0.02])


def _holm_step_down(p, alpha):
    order = np.argsort(p)
    reject = np.zeros(len(p), dtype=bool)
    for i, idx in enumerate(order):
        if p[idx] <= alpha / (len(p) - i):
            reject[idx] = True
        else:
            break
    return reject


@FAST
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=20), st.sampled_from([0.01, 0.05, 0.1]))
def test_holm_properties(ps, alpha):
    p = np.array(ps)
    adj = S.holm(p)
    assert np.all(adj >= p - 1e-15) and np.all(adj <= 1.0)
    assert np.all(adj <= np.minimum(1.0, len(p) * p) + 1e-15)  # never worse than Bonferroni
    order = np.argsort(p, kind="stable")
    assert np.all(np.diff(adj[order]) >= 0)  # monotone in the p-value order
    assert_array_equal(adj <= alpha, _holm_step_down(p, alpha))


def test_holm_validation():
    for bad in [[0.1, np.nan], [-0.1], [1.5], []]:
        with pytest.raises(ValueError, match="pvalues"):
            S.holm(bad)


# ---------------------------------------------------------------------------------------------
# calibration
# ---------------------------------------------------------------------------------------------

CONF = [0.2, 0.3, 0.6, 0.9, 0.95]
CORR = [0, 1, 1, 1, 0]


def test_reliability_table_worked_example():
    t = S.reliability_table(CONF, CORR, n_bins=2)
    assert_array_equal(t.lower, [0.0, 0.5])
    assert_array_equal(t.upper, [0.5, 1.0])
    assert_array_equal(t.count, [2, 3])
    assert_allclose(t.mean_confidence, [0.25, (0.6 + 0.9 + 0.95) / 3])
    assert_allclose(t.accuracy, [0.5, 2 / 3])
    assert S.expected_calibration_error(CONF, CORR, n_bins=2) == pytest.approx(0.4 * 0.25 + 0.6 * 0.15)
    assert S.maximum_calibration_error(CONF, CORR, n_bins=2) == pytest.approx(0.25)


def test_uniform_bin_edges_are_right_closed():
    t = S.reliability_table([0.0, 0.1, 0.3, 0.30000001, 1.0], [1, 1, 1, 1, 1], n_bins=10)
    assert t.count.tolist() == [2, 0, 1, 1, 0, 0, 0, 0, 0, 1]  # 0 -> first bin, 0.3 -> (0.2, 0.3]
    assert np.isnan(t.accuracy[1]) and np.isnan(t.mean_confidence[1])


def test_quantile_bins_equal_mass_and_ties():
    conf = np.linspace(0.05, 0.95, 12)
    t = S.reliability_table(conf, np.ones(12), n_bins=4, strategy="quantile")
    assert t.count.tolist() == [3, 3, 3, 3]
    assert_allclose(t.upper, conf[[2, 5, 8, 11]])
    tied = [0.5] * 6 + [0.9] * 2
    t = S.reliability_table(tied, [1, 0, 1, 0, 1, 0, 1, 1], n_bins=4, strategy="quantile")
    assert t.count.tolist() == [6, 2]  # ties never split: bins merge
    assert_allclose(t.accuracy, [0.5, 1.0])
    ece = S.expected_calibration_error(tied, [1, 0, 1, 0, 1, 0, 1, 1], n_bins=4, strategy="quantile")
    assert ece == pytest.approx(6 / 8 * 0.0 + 2 / 8 * 0.1)


def _ece_bruteforce(conf, corr, n_bins):
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        m = (conf > lo) & (conf <= hi) if b else (conf >= lo) & (conf <= hi)
        if m.any():
            total += m.sum() * abs(corr[m].mean() - conf[m].mean())
    return total / conf.size


@FAST
@given(
    st.lists(st.tuples(st.floats(0.0, 1.0), st.booleans()), min_size=1, max_size=60),
    st.integers(1, 20),
    st.randoms(use_true_random=False),
)
def test_ece_properties(items, n_bins, rnd):
    conf = np.array([c for c, _ in items])
    corr = np.array([k for _, k in items], dtype=float)
    ece = S.expected_calibration_error(conf, corr, n_bins=n_bins)
    assert ece == pytest.approx(_ece_bruteforce(conf, corr, n_bins), abs=1e-12)
    assert 0.0 <= ece <= S.maximum_calibration_error(conf, corr, n_bins=n_bins) + 1e-12 <= 1 + 1e-12
    perm = list(range(len(items)))
    rnd.shuffle(perm)
    for strategy in ("uniform", "quantile"):  # binning by value: order never matters
        e1 = S.expected_calibration_error(conf, corr, n_bins=n_bins, strategy=strategy)
        e2 = S.expected_calibration_error(conf[perm], corr[perm], n_bins=n_bins, strategy=strategy)
        assert e1 == pytest.approx(e2, abs=1e-12)
    t = S.reliability_table(conf, corr, n_bins=n_bins, strategy="quantile")
    assert t.count.sum() == len(items) and np.all(t.count > 0)


def test_ece_perfect_calibration_and_validation():
    conf = [0.75] * 4 + [0.25] * 4
    corr = [1, 1, 1, 0, 1, 0, 0, 0]
    for strategy in ("uniform", "quantile"):
        assert S.expected_calibration_error(conf, corr, strategy=strategy) == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ValueError, match="confidences"):
        S.expected_calibration_error([1.2], [1])
    with pytest.raises(ValueError, match="correct"):
        S.expected_calibration_error([0.5], [2])
    with pytest.raises(ValueError, match="correct"):
        S.expected_calibration_error([0.5, 0.6], [1])
    with pytest.raises(ValueError, match="n_bins"):
        S.expected_calibration_error([0.5], [1], n_bins=0)
    with pytest.raises(ValueError, match="strategy"):
        S.expected_calibration_error([0.5], [1], strategy="adaptive")
    with pytest.raises(ValueError, match="confidences"):
        S.maximum_calibration_error([np.nan], [1])


def test_brier_worked_examples_and_sklearn():
    assert S.brier_score([0.9, 0.2, 0.6], [1, 0, 0]) == pytest.approx((0.01 + 0.04 + 0.36) / 3)
    p = [[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]
    assert S.brier_score(p, [0, 1]) == pytest.approx((0.09 + 0.04 + 0.01 + 0.01 + 0.81 + 0.64) / 2)
    rng = np.random.default_rng(0)
    pb, yb = rng.random(200), rng.integers(0, 2, 200)
    assert S.brier_score(pb, yb) == pytest.approx(np.mean((pb - yb) ** 2))
    assert S.brier_score(np.stack([1 - pb, pb], 1), yb) == pytest.approx(2 * S.brier_score(pb, yb))
    metrics = pytest.importorskip("sklearn.metrics")
    assert S.brier_score(pb, yb) == pytest.approx(metrics.brier_score_loss(yb, pb))


def test_brier_validation():
    with pytest.raises(ValueError, match="labels"):
        S.brier_score([0.5, 0.5], [0, 2])
    with pytest.raises(ValueError, match="labels"):
        S.brier_score([[0.5, 0.5]], [2])
    with pytest.raises(ValueError, match="sum to 1"):
        S.brier_score([[0.5, 0.6]], [0])
    with pytest.raises(ValueError, match="probs"):
        S.brier_score([1.5], [1])
    with pytest.raises(ValueError, match="labels"):
        S.brier_score([0.5, 0.5], [1])


def _sample_labels(logits, rng):
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    u = rng.random((len(p), 1))
    return (p.cumsum(1) < u).sum(1)


def test_fit_temperature_recovers_three():
    rng = np.random.default_rng(0)
    z = rng.normal(0.0, 2.0, size=(20000, 5))
    y = _sample_labels(z, rng)
    fit = S.fit_temperature(3.0 * z, y)
    assert fit.temperature == pytest.approx(3.0, rel=0.04)
    assert fit.nll_after <= fit.nll_before and not fit.at_bound
    fit1 = S.fit_temperature(z, y)  # already calibrated
    assert fit1.temperature == pytest.approx(1.0, rel=0.04)
    # the optimum is a stationary point of the NLL in T
    nll = lambda t: S._nll(*S._logits_labels(3.0 * z, y), 1.0 / t)  # noqa: E731
    assert nll(fit.temperature) <= min(nll(fit.temperature * 0.99), nll(fit.temperature * 1.01))


def test_fit_temperature_binary_and_overconfident():
    rng = np.random.default_rng(1)
    z = rng.normal(0.0, 1.5, size=20000)
    y = (rng.random(20000) < 1 / (1 + np.exp(-z))).astype(int)
    fit = S.fit_temperature(0.5 * z, y)  # underconfident: T < 1
    assert fit.temperature == pytest.approx(0.5, rel=0.06)
    assert fit.nll_after <= fit.nll_before


@FAST
@given(st.integers(0, 10_000))
def test_fit_temperature_never_worse(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(1, 30)), int(rng.integers(2, 6))
    z = rng.normal(0, rng.uniform(0.1, 10), size=(n, k))
    fit = S.fit_temperature(z, rng.integers(0, k, n))
    assert fit.nll_after <= fit.nll_before + 1e-12
    assert 0.05 <= fit.temperature <= 20.0


def test_fit_temperature_validation():
    with pytest.raises(ValueError, match="labels"):
        S.fit_temperature([[1.0, 2.0]], [2])
    with pytest.raises(ValueError, match="labels"):
        S.fit_temperature([[1.0, 2.0]], [0, 1])
    with pytest.raises(ValueError, match="logits"):
        S.fit_temperature([[np.nan, 1.0]], [0])
    with pytest.raises(ValueError, match="bounds"):
        S.fit_temperature([[1.0, 2.0]], [0], bounds=(2.0, 1.0))


# ---------------------------------------------------------------------------------------------
# class_folds
# ---------------------------------------------------------------------------------------------


@FAST
@given(st.lists(st.integers(0, 40), min_size=2, max_size=120), st.integers(2, 8), st.integers(0, 2**32 - 1))
def test_class_folds_partition_classes(ids, k, seed):
    classes = np.unique(ids)
    if k > classes.size:
        with pytest.raises(ValueError, match="k"):
            S.class_folds(ids, k, rng=seed)
        return
    folds = S.class_folds(ids, k, rng=seed)
    assert len(folds) == k
    tests = np.concatenate([f.test for f in folds])
    assert_array_equal(np.sort(tests), classes)  # each class in exactly one test fold
    for f in folds:
        assert np.intersect1d(f.train, f.test).size == 0
        assert_array_equal(np.union1d(f.train, f.test), classes)
        assert f.test.size >= 1
    sizes = [f.test.size for f in folds]
    assert max(sizes) - min(sizes) <= 1


@FAST
@given(st.lists(st.integers(0, 12), min_size=2, max_size=30, unique=True), st.data())
def test_class_folds_groups_never_split(classes, data):
    groups = [data.draw(st.integers(0, 5)) for _ in classes]
    n_groups = len(set(groups))
    k = data.draw(st.integers(2, 6))
    # repeat entries (e.g. one per example): consistent class -> group mapping
    ids = np.repeat(classes, 2)
    grp = np.repeat(groups, 2)
    if k > n_groups:
        with pytest.raises(ValueError, match="k"):
            S.class_folds(ids, k, rng=0, groups=grp)
        return
    folds = S.class_folds(ids, k, rng=data.draw(st.integers(0, 1000)), groups=grp)
    assert_array_equal(np.sort(np.concatenate([f.test for f in folds])), np.sort(classes))
    fold_of = {c: i for i, f in enumerate(folds) for c in f.test.tolist()}
    by_group = {}
    for c, g in zip(classes, groups):
        by_group.setdefault(g, set()).add(fold_of[c])
    assert all(len(s) == 1 for s in by_group.values())  # a group lives in one fold only
    assert all(f.test.size > 0 and np.intersect1d(f.train, f.test).size == 0 for f in folds)


def test_class_folds_examples_and_validation():
    folds = S.class_folds(["dog", "cat", "dog", "owl", "emu"], 2, rng=1)
    assert sorted(sum((f.test.tolist() for f in folds), [])) == ["cat", "dog", "emu", "owl"]
    a = S.class_folds(np.arange(30), 5, rng=3)
    b = S.class_folds(np.arange(30), 5, rng=3)
    c = S.class_folds(np.arange(30), 5, rng=4)
    assert all(np.array_equal(x.test, y.test) for x, y in zip(a, b))
    assert not all(np.array_equal(x.test, y.test) for x, y in zip(a, c))
    # greedy balancing of groups: sizes 4, 3, 1, 1, 1 into 2 folds -> 5 / 5
    ids = np.arange(10)
    grp = np.array([0, 0, 0, 0, 1, 1, 1, 2, 3, 4])
    sizes = sorted(f.test.size for f in S.class_folds(ids, 2, rng=0, groups=grp))
    assert sizes in ([5, 5], [4, 6])
    with pytest.raises(ValueError, match="more than one group"):
        S.class_folds([1, 1, 2], 2, groups=["x", "y", "z"])
    with pytest.raises(ValueError, match="groups"):
        S.class_folds([1, 2, 3], 2, groups=["x", "y"])
    with pytest.raises(ValueError, match="k"):
        S.class_folds([1, 2, 3], 1)
    with pytest.raises(ValueError, match="class_ids"):
        S.class_folds([], 2)


# ---------------------------------------------------------------------------------------------
# online / continual metrics
# ---------------------------------------------------------------------------------------------


def test_prequential():
    assert_allclose(S.prequential([1, 0, 1, 1]), [1, 0.5, 2 / 3, 0.75])
    v = np.random.default_rng(0).random(50)
    for f in (1.0, 0.9, 0.3):
        s = n = 0.0
        expected = []
        for x in v:
            s, n = f * s + x, f * n + 1
            expected.append(s / n)
        assert_allclose(S.prequential(v, fading=f), expected, rtol=1e-12)
    with pytest.raises(ValueError, match="fading"):
        S.prequential([1.0], fading=0.0)
    with pytest.raises(ValueError, match="values"):
        S.prequential([1.0, np.nan])


def test_accuracy_after_switch():
    v = [1, 1, 0, 0, 1, 1, 0, 1]
    r = S.accuracy_after_switch(v, [2, 6], k=3)
    assert_allclose(r.mean, [1 / 3, 1 / 2])
    assert_array_equal(r.count, [3, 2])
    r = S.accuracy_after_switch(v, [0, 2], k=5)  # truncated at the next switch
    assert_allclose(r.mean, [1.0, 0.4])  # values[2:7] = 0, 0, 1, 1, 0
    assert_array_equal(r.count, [2, 5])
    r = S.accuracy_after_switch(v, [], k=3)
    assert r.mean.size == 0
    for bad in ([2, 2], [5, 3], [-1], [8], [1.5]):
        with pytest.raises(ValueError, match="switch_indices"):
            S.accuracy_after_switch(v, bad, k=2)
    with pytest.raises(ValueError, match="k"):
        S.accuracy_after_switch(v, [1], k=0)


def test_continual_metrics_hand_computed():
    R = np.array([[0.9, 0.1, 0.2], [0.7, 0.8, 0.3], [0.6, 0.7, 0.9]])
    m = S.continual_metrics(R, baseline=[0.1, 0.1, 0.1])
    assert m.acc == pytest.approx((0.6 + 0.7 + 0.9) / 3)
    assert m.bwt == pytest.approx(((0.6 - 0.9) + (0.7 - 0.8)) / 2)
    assert m.fwt == pytest.approx(((0.1 - 0.1) + (0.3 - 0.1)) / 2)
    assert_allclose(m.forgetting_per_task, [0.9 - 0.6, 0.8 - 0.7])
    assert m.forgetting == pytest.approx(0.2)
    assert math.isnan(S.continual_metrics(R).fwt)
    # Chaudhry's max runs over every earlier stage, including before the task was trained:
    R2 = np.array([[0.5, 0.9, 0.0], [0.6, 0.4, 0.0], [0.6, 0.3, 0.8]])
    m2 = S.continual_metrics(R2)
    assert_allclose(m2.forgetting_per_task, [0.0, 0.9 - 0.3])
    assert m2.bwt == pytest.approx(((0.6 - 0.5) + (0.3 - 0.4)) / 2)


def test_continual_metrics_edges():
    m = S.continual_metrics([[0.7]], baseline=[0.1])
    assert m.acc == 0.7 and math.isnan(m.bwt) and math.isnan(m.fwt) and math.isnan(m.forgetting)
    with pytest.raises(ValueError, match="R"):
        S.continual_metrics([[1.0, 2.0]])
    with pytest.raises(ValueError, match="R"):
        S.continual_metrics([[1.0, np.nan], [1.0, 1.0]])
    with pytest.raises(ValueError, match="baseline"):
        S.continual_metrics(np.eye(3), baseline=[0.1, 0.1])


def test_boundary_scores_worked_example():
    s = S.boundary_scores([100, 200, 300], [95, 104, 110, 230, 301], tolerance=10)
    # 100 <- 104 (delay 4); 110 is a repeat -> FP; 95 precedes -> FP; 230 is too late -> FP
    assert (s.tp, s.fp, s.fn) == (2, 3, 1)
    assert s.precision == pytest.approx(0.4) and s.recall == pytest.approx(2 / 3)
    assert s.f1 == pytest.approx(2 * 0.4 * (2 / 3) / (0.4 + 2 / 3))
    assert_array_equal(s.delays, [4.0, np.nan, 1.0])
    assert s.mean_delay == 2.5


def test_boundary_scores_conventions():
    # tolerance is inclusive
    assert S.boundary_scores([10], [15], tolerance=5).tp == 1
    assert S.boundary_scores([10], [16], tolerance=5).tp == 0
    # a detection at/after the next boundary belongs to that boundary, not the earlier one
    s = S.boundary_scores([10, 12], [13], tolerance=5)
    assert_array_equal(s.delays, [np.nan, 1.0])
    assert (s.tp, s.fp, s.fn) == (1, 0, 1)
    s = S.boundary_scores([10, 12], [12], tolerance=5)
    assert_array_equal(s.delays, [np.nan, 0.0])
    # one detection cannot serve two boundaries; duplicate alarms are separate FPs
    s = S.boundary_scores([10], [11, 11], tolerance=5)
    assert (s.tp, s.fp) == (1, 1)
    # unsorted inputs are fine
    assert S.boundary_scores([30, 10], [31, 12], tolerance=3).tp == 2
    # empty sides
    s = S.boundary_scores([10], [], tolerance=5)
    assert math.isnan(s.precision) and s.recall == 0.0 and s.f1 == 0.0
    s = S.boundary_scores([], [3], tolerance=5)
    assert math.isnan(s.recall) and s.precision == 0.0 and s.f1 == 0.0
    s = S.boundary_scores([], [], tolerance=5)
    assert math.isnan(s.f1) and math.isnan(s.mean_delay)
    with pytest.raises(ValueError, match="tolerance"):
        S.boundary_scores([1], [1], tolerance=-1)
    with pytest.raises(ValueError, match="distinct"):
        S.boundary_scores([1, 1], [1], tolerance=1)


@FAST
@given(
    st.lists(st.integers(0, 200), max_size=15, unique=True),
    st.lists(st.integers(0, 200), max_size=20),
    st.integers(0, 30),
)
def test_boundary_scores_properties(true, det, tol):
    s = S.boundary_scores(true, det, tolerance=tol)
    assert s.tp + s.fn == len(true) and s.tp + s.fp == len(det)
    d = s.delays[~np.isnan(s.delays)]
    assert np.all((d >= 0) & (d <= tol))
    # matched detections are distinct alarms: each true boundary's match lies before the next one
    t = np.sort(true)
    matched = t[~np.isnan(s.delays)] + d
    assert np.all(np.diff(matched) > 0)
