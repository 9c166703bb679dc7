"""bench/headline.py runs end to end in --quick mode and prints its three tables (numbers not checked)."""

import math

from helpers import run_bench_script


def test_headline_quick(tmp_path):
    out, res = run_bench_script("headline", tmp_path)
    for title in ("### Offline anchors", "### Online stream sinusoid-osaka", "### Ablation minus full agent",
                  "### Full agent: prequential MSE per family"):
        assert title in out
    assert set(res["online"]) == {"full", "no memory", "no selector (best fixed arm)", "no test-time scaling",
                                  "frozen meta-parameters"}
    runs = [r for v in res["online"].values() for r in v.values()]
    assert len(runs) == 10 and all(r["tasks"] == 40 and r["probes"] >= 3 for r in runs)
    assert all(math.isfinite(r["preq_mse"]) for r in runs)
    frozen = res["online"]["frozen meta-parameters"]
    assert all(r["bwt"] == 0 and r["fwt"] == 0 for r in frozen.values())  # frozen weights: probes never move
