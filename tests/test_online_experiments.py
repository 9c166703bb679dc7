"""A/B experiments: stable assignment, mSPRT false-winner rate on A/A streams, power, status."""

import hashlib
import math
import random

import pytest

from agent.online.experiments import MSPRT, Experiment, assign_fraction, msprt_lambda

ALPHA = 0.05


def _run(exp, seed, n, effect=0.0, sd=0.1, bernoulli=False):
    rng = random.Random(seed)
    for i in range(n):
        v = exp.assign(f"s{seed}-t{i}")
        mu = 0.7 + (effect if v != exp.control else 0.0)
        exp.record(v, float(rng.random() < mu) if bernoulli else rng.gauss(mu, sd))
        if exp.status().winner is not None:
            return exp.status(), i + 1
    return exp.status(), None


@pytest.mark.parametrize("bernoulli", [False, True])
def test_aa_false_winner_rate_within_nominal_alpha(bernoulli):
    streams = 200
    false = sum(_run(Experiment("aa", {"a": {}, "b": {}}, alpha=ALPHA), s, 600, bernoulli=bernoulli)[0].winner is not None
                for s in range(streams))
    slack = 3 * math.sqrt(ALPHA * (1 - ALPHA) / streams)  # Monte Carlo: 3 binomial sd
    assert false / streams <= ALPHA + slack, false


def test_planted_difference_is_detected():
    found = []
    for s in range(20):
        st, n = _run(Experiment("ab", {"control": {"inner_lr": 0.01}, "treat": {"inner_lr": 0.05}}), 100 + s, 3000, effect=0.03)
        found.append(st.winner)
        if st.winner:
            assert st.ci[0] <= 0.03 <= st.ci[1] or st.ci[0] > 0
    assert found.count("treat") >= 19 and "control" not in found


def test_status_fields_and_lower_is_better():
    exp = Experiment("mse", {"a": {}, "b": {}}, metric="mse", higher_is_better=False)
    st, _ = _run(exp, 7, 3000, effect=-0.05)  # b has the lower MSE
    assert st.winner == "b" and st.effect < 0 and st.p_value <= ALPHA and st.ci[1] < 0
    d = st.as_dict()
    assert d["metric"] == "mse" and sum(d["samples"].values()) > 0 and d["comparisons"][0]["significant"]


def test_assignment_is_a_stable_sha256_and_follows_the_split():
    h = hashlib.sha256(b"exp\x00task-1").digest()
    assert assign_fraction("exp", "task-1") == int.from_bytes(h[:8], "big") / 2.0**64
    exp = Experiment("split", {"a": {}, "b": {}, "c": {}}, split={"a": 0.5, "b": 0.3, "c": 0.2})
    counts = {"a": 0, "b": 0, "c": 0}
    for i in range(20000):
        counts[exp.assign(f"t{i}")] += 1
    assert counts["a"] / 20000 == pytest.approx(0.5, abs=0.02) and counts["c"] / 20000 == pytest.approx(0.2, abs=0.02)
    assert exp.assign("t1") == Experiment("split", {"a": {}, "b": {}, "c": {}}, split={"a": 0.5, "b": 0.3, "c": 0.2}).assign("t1")
    assert exp.overrides("a") == {} and len(exp.tests) == 2  # each variant vs control, Bonferroni


def test_msprt_pieces():
    assert msprt_lambda(0.0, 1.0, 1.0) < 1.0
    t = MSPRT(0.05, min_samples=10)
    for i in range(9):
        t.update_a(0.0)
        t.update_b(1.0)
    assert t.p_value == 1.0  # no test before min_samples
    with pytest.raises(ValueError):
        MSPRT(1.5)
    with pytest.raises(ValueError):
        Experiment("one", {"a": {}})
    exp = Experiment("nan", {"a": {}, "b": {}})
    exp.record("a", float("nan"))
    assert exp.counts["a"] == 0
