"""Failure predictor: learnability under delayed labels, cold start, bounds, decisions, metrics."""

import math
import random
import warnings

import pytest
from river import tree

from agent.online.failure import (ACTIONS, DecisionThresholds, FailureDefinition, FailurePredictor, Reliability,
                                  decide)


def _stream(n, seed=0):
    rng = random.Random(seed)
    for i in range(n):
        x = {f"x{j}": rng.gauss(0, 1) for j in range(5)}
        logit = 2.0 * x["x0"] - 1.5 * x["x1"] - 1.0
        acc = 0.4 if rng.random() < 1 / (1 + math.exp(-logit)) else 0.8
        yield f"t{i}", x, {**x, "probe": x["x0"] + rng.gauss(0, 0.5)}, acc


def test_learnable_failure_signal_reaches_auc_with_delayed_labels():
    fp = FailurePredictor(failure=FailureDefinition("accuracy_below", 0.6), window_size=500)
    delay, queue = 20, []
    for tid, x_pre, x_post, acc in _stream(2500):
        fp.observe(tid, x_pre)
        fp.observe(tid, x_pre, x_post)
        queue.append((tid, acc))
        if len(queue) > delay:
            t, a = queue.pop(0)
            assert fp.learn(t, quality=a) is (a < 0.6)
    s = fp.summary()
    # the window (last 500 labels) lies well after warm-up
    assert s["pre"]["rocauc"] >= 0.75, s
    assert s["post"]["rocauc"] >= 0.75, s
    assert s["pre"]["brier"] < 0.2 and s["pre"]["logloss"] < 0.6
    assert s["pre"]["ece"] < 0.1
    assert s["pending"] == delay and s["n_learned"]["pre"] == 2500 - delay


def test_cold_start_prior_and_empty_proba_models():
    # tree models return {} before learning and {True: 1.0} after one True: use proba.get(True, prior)
    fp = FailurePredictor(model=tree.HoeffdingTreeClassifier(), prior=0.3)
    assert fp.predict_pre({"a": 1.0}) == 0.3
    assert tree.HoeffdingTreeClassifier().predict_proba_one({"a": 1.0}) == {}
    fp.learn_one({"a": 1.0}, False)
    assert fp.pre.predict_proba_one({"a": 1.0}) == {False: 1.0}  # no True key at all
    assert fp.predict_pre({"a": 1.0}) == 0.0
    fp.learn_one({"a": 1.0}, True)
    assert 0.0 < fp.predict_pre({"a": 1.0}) < 1.0


def test_pending_store_is_bounded_and_unknown_ids_ignored():
    fp = FailurePredictor(max_pending=3)
    for i in range(5):
        fp.observe(f"t{i}", {"a": float(i)})
    assert list(fp.pending) == ["t2", "t3", "t4"] and fp.n_dropped == 2
    assert fp.learn("t0", quality=0.1) is None
    assert fp.learn("t3", quality=0.1) is True
    assert fp.learn("t3", quality=0.1) is None  # joined once


def test_failure_definitions():
    acc = FailureDefinition("accuracy_below", 0.6)
    mse = FailureDefinition("mse_above", 0.5)
    div = FailureDefinition("diverged")
    assert acc.is_failure(0.5) and not acc.is_failure(0.7) and acc.is_failure(0.9, diverged=True)
    assert mse.is_failure(0.6) and not mse.is_failure(0.1) and mse.is_failure(float("nan"))
    assert not div.is_failure(0.0) and div.is_failure(float("inf")) and div.is_failure(diverged=True)
    with pytest.raises(ValueError):
        FailureDefinition("loss_above", 1.0)


def test_decisions_and_counts():
    t = DecisionThresholds(escalate=0.3, switch=0.5, fallback=0.7, abstain=0.9)
    assert [decide(p, thresholds=t) for p in (0.1, 0.35, 0.55, 0.75, 0.95)] == list(ACTIONS)
    assert decide(p_pre=0.95, thresholds=t) == "escalate"  # pre stage only escalates
    assert decide(p_post=0.1, p_pre=0.95, thresholds=t) == "none"  # the probe overrides
    fp = FailurePredictor(thresholds=t)
    for p in (0.1, 0.95, 0.95):
        fp.decide(p)
    assert fp.summary()["actions"] == {"none": 1, "escalate": 0, "switch": 0, "fallback": 0, "abstain": 2}
    with pytest.raises(ValueError):
        DecisionThresholds(escalate=0.9, switch=0.5)


def test_rolling_metrics_take_the_class_without_deprecation_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fp = FailurePredictor()
        fp.learn_one({"a": 1.0}, True, p=0.8)
        fp.learn_one({"a": 0.0}, False, p=0.2)
    s = fp.summary()["pre"]
    assert s["rocauc"] == 1.0 and s["brier"] == pytest.approx(0.04)


def test_reliability_table_bins():
    r = Reliability(n_bins=10)
    for i in range(1000):
        p = (i % 10) / 10 + 0.05
        r.update(i % 100 < p * 100, p)
    tab = r.table()
    assert len(tab) == 10 and all(n == 100 for _, _, n in tab)
    assert r.ece() < 0.05
