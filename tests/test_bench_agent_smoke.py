"""Smoke test of the issue-3 benchmark scripts (compute scaling, memory, agent throughput): each runs
in ``--quick`` mode as a subprocess, exits 0, prints its tables and goal lines and writes its JSON.
Timings, MSEs and PASS/MISS verdicts are NOT checked: quick mode's numbers mean nothing, and the
real runs are documented in ``bench/README.md``."""

from helpers import run_bench_script


def test_compute_scaling_quick(tmp_path):
    stdout, data = run_bench_script("compute_scaling", tmp_path)
    assert "### sinusoid K=5: query MSE" in stdout and "### sinusoid K=10: query MSE" in stdout
    for row in ("| plain 20", "| guarded 20", "| agent (shipped 5/7/12)", "| adaptive (tuned)"):
        assert row in stdout
    assert "### Goal: adaptive" in stdout and "agent defaults pick" in stdout
    assert stdout.count("sinusoid K=5 adaptive (tuned): PASS") + stdout.count("sinusoid K=5 adaptive (tuned): MISS") == 1
    assert set(data["settings"]) == {"sinusoid K=5", "sinusoid K=10"}
    assert all(isinstance(v["rows"]["adaptive (tuned)"]["diverged"], int) for v in data["settings"].values())


def test_compute_scaling_glyphs_quick(tmp_path):
    stdout, data = run_bench_script("compute_scaling", tmp_path, "--glyphs", "--no-sinusoid")
    assert "### glyphs 5-way 1-shot: query accuracy %" in stdout and "| guarded 20" in stdout
    assert set(data["settings"]) == {"glyphs 5-way 1-shot"}


def test_memory_bench_quick(tmp_path):
    stdout, data = run_bench_script("memory_bench", tmp_path)
    assert "### (a) query MSE, memory off vs on" in stdout and "| family's later visits" in stdout
    assert "### (b) MemoryBank.query latency" in stdout and "Goal p99 <= 2 ms" in stdout
    assert set(data["a"]) == {"adaptive", "top level always"}
    assert data["b"]["rows"]


def test_daemon_throughput_quick(tmp_path):
    stdout, data = run_bench_script("daemon_throughput", tmp_path, "--profile", "--conv4-tasks", "2")
    assert "| bare loop" in stdout and "| agent mb=1" in stdout and "| agent mb=8" in stdout
    assert "### Image tasks (info)" in stdout and "| Conv4 width 4" in stdout
    conv = data["conv4"]["widths"]["4"]
    assert conv["step_calls"]["agent"] == conv["step_calls"]["bare"] > 0  # the same adaptation
    assert "overhead <= 10%" in stdout and "throughput above the bare loop" in stdout
    assert "top 10 cumulative" in stdout and "guarded_adapt" in stdout
    assert data["agent_stats"]["errors"] == 0 and data["agent_stats"]["tasks"] == data["agent_stats"]["written"]
