"""Smoke test of the issue-4 benchmark (``bench/online_bench.py``): it runs in ``--quick`` mode as a
subprocess, exits 0, prints the three benchmarks with their goal lines, and writes its JSON. The
numbers and PASS/MISS verdicts are NOT checked (quick mode's numbers mean nothing; the real run is
in ``bench/README.md``), except the counterfactual check, which is exact by construction: where the
selector pulled an arm, its reward equals that fixed arm's reward on the same task."""

from helpers import run_bench_script


def test_online_bench_quick(tmp_path):
    stdout, data = run_bench_script("online_bench", tmp_path)
    for heading in ("### 1. Failure predictor", "### 2. Selector", "### 3. Drift", "Reliability of the pre-adaptation"):
        assert heading in stdout
    assert "Goal: pre-adaptation ROC AUC >= 0.75" in stdout and "Goal: close >= 50% of the gap" in stdout
    assert stdout.count("-> PASS") + stdout.count("-> MISS") == 2
    assert "| selector | input" in stdout and "| selector | all signals | family changes" in stdout and "Best arm per family:" in stdout
    seed = data["selector"]["per_seed"][0]
    assert set(seed["arms"]) == set(data["arms"]) and seed["oracle"] >= max(seed["arms"].values())
    assert seed["counterfactual_max_dev"] < 1e-9
    assert sum(seed["picks"].values()) == data["failure"]["per_seed"][0]["n"] + data["args"]["warmup"]
    assert {"pre", "post"} <= set(data["failure"]["per_seed"][0])
    assert data["drift"]["selector"]["flags_match"] is True
