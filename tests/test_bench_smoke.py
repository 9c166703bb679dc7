"""Smoke test of the benchmark scripts: each runs in ``--quick`` mode as a subprocess, exits 0 and
prints its tables (and writes its JSON). Timings and accuracies are NOT checked: quick mode's
numbers mean nothing, and the real runs are documented in ``bench/README.md``."""

import pytest

from conftest import require_system
from helpers import run_bench_script


def test_speed_quick(tmp_path):
    stdout, data = run_bench_script("speed", tmp_path)
    assert "torch " in stdout and "threads 1" in stdout
    assert "### Meta-training step" in stdout and "### Gradient check" in stdout and "### Adaptation latency" in stdout
    assert "| MLP second order: ours (vmap) vs plain" in stdout and "| Conv4 1 step SO: ours (loop) vs plain" in stdout
    assert "DIFFER" not in stdout  # the gradient check itself is a correctness check, not a timing
    assert {"mlp_meta_step", "conv4_meta_step", "sinusoid_adaptation", "machine"} <= set(data)


def test_sinusoid_quality_quick(tmp_path):
    stdout, data = run_bench_script("sinusoid_quality", tmp_path)
    assert "### Query MSE" in stdout and "l2l (quoted)" in stdout and "QUOTED from shared/notes/peers.md" in stdout
    assert "| K=10 | 10 steps" in stdout
    assert data["runs"]["maml"]["meta_steps"] > 0
    assert set(data["runs"]["maml"]["eval"]) == {"K=5", "K=10"}


def test_glyphs_accuracy_quick(tmp_path):
    from agent.data.glyphs import discover_fonts

    require_system("fonts-noto-core / fonts-freefont-ttf", bool(discover_fonts()))
    pytest.importorskip("fontTools", reason="fontTools reads the font cmaps")
    stdout, data = run_bench_script("glyphs_accuracy", tmp_path)
    assert "### Accuracy (%)" in stdout and "pixel nearest centroid" in stdout and "ProtoNet" in stdout
    assert "MAML (FO), 3 steps" in stdout
    for shot in ("1-shot", "5-shot"):
        assert data["shots"][shot]["class_overlap"] == 0
