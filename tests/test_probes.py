"""Periodic probes: side-effect free scoring, the schedule in the daemon's loop, and ACC/BWT/FWT."""

import argparse
import doctest
import io
import json
import math

import numpy as np
import pytest
import torch

from agent import probes, stats
from agent.agent import Agent
from agent.config import ConfigError, Config
from agent.probes import ProbeSet, Prober, ProbingSource, continual_from_probes, probe_scores
from agent.runlog import RunLogWriter, load_run
from agent.streams import JsonlSink
from agent.streams.synthetic import make_stream
from agent.task import Task, to_wire

CONFIG = {"model": {"arch": "mlp", "hidden": [16, 16]}, "agent": {"in_shape": [1], "out_dim": 1},
          "compute": {"levels": [[1, 1], [3, 2]]}, "metrics": {"addr": "0"}}


def sine_task(i, rng, family="sine", segment=None, labelled=True):
    x, q = rng.uniform(-5, 5, (8, 1)), rng.uniform(-5, 5, (6, 1))
    a = 1.0 if family == "sine" else 3.0
    meta = {"family": family} if segment is None else {"family": family, "segment": segment}
    return Task(f"t{i}", "regression", x, a * np.sin(x), q, a * np.sin(q) if labelled else None, meta=meta)


# -- ACC, BWT, FWT, forgetting ------------------------------------------------------------------


def test_continual_from_probes_equals_gem_on_a_classic_sequence():
    """One contiguous stage per family, a probe at the end of each: GEM's square-matrix metrics."""
    rng = np.random.default_rng(3)
    T, L = 4, 25
    R = rng.uniform(0, 1, (T, T))
    b = rng.uniform(0, 0.3, T)
    m = continual_from_probes(R, [L * (i + 1) for i in range(T)], range(T * L), np.repeat(np.arange(T), L), b)
    ref = stats.continual_metrics(R, b)
    assert m.acc == pytest.approx(ref.acc) and m.bwt == pytest.approx(ref.bwt)
    assert m.fwt == pytest.approx(ref.fwt) and m.forgetting == pytest.approx(ref.forgetting)
    np.testing.assert_allclose(m.forgetting_per_family[:-1], ref.forgetting_per_task)
    assert math.isnan(m.bwt_per_family[-1]) and math.isnan(m.fwt_per_family[0])
    assert m.gaps.tolist() == [1, 1, 1, 0]


def test_continual_from_probes_recurring_worked_example():
    """Families A, B, A, B (10 tasks each), probes every 5 tasks, by hand."""
    fam = [0] * 10 + [1] * 10 + [0] * 10 + [1] * 10
    seq = [5, 10, 15, 20, 25, 30, 35, 40]
    A = [0.5, 0.7, 0.6, 0.5, 0.75, 0.8, 0.7, 0.65]
    B = [0.1, 0.2, 0.4, 0.6, 0.5, 0.45, 0.55, 0.7]
    R = np.array([A, B]).T
    m = continual_from_probes(R, seq, range(40), fam, baseline=[0.0, 0.05])
    # A: absence 10..19 -> probes at 10 (first after its visit) and 20 (last before it returns): 0.5 - 0.7;
    #    absence after its last visit (ends 29): probes 30 .. 40 (final): 0.65 - 0.8
    assert m.bwt_per_family[0] == pytest.approx(((0.5 - 0.7) + (0.65 - 0.8)) / 2)
    # B: its absence 20..29: probes 20 and 30: 0.45 - 0.6; it is in play at the end
    assert m.bwt_per_family[1] == pytest.approx(0.45 - 0.6)
    assert m.gaps.tolist() == [2, 1]
    assert m.acc == pytest.approx((0.65 + 0.7) / 2)
    assert m.forgetting_per_family.tolist() == pytest.approx([0.8 - 0.65, 0.6 - 0.7])
    # FWT: A is seen first (no probe after training before it); B: probe at 10 - baseline
    assert math.isnan(m.fwt_per_family[0]) and m.fwt_per_family[1] == pytest.approx(0.2 - 0.05)
    assert m.after_last_visit.tolist() == pytest.approx([0.8, 0.7])


def test_continual_from_probes_rejects_bad_input():
    with pytest.raises(ValueError, match="probe_seq"):
        continual_from_probes([[1.0]], [0], [0], [0])
    with pytest.raises(ValueError, match="task_family"):
        continual_from_probes([[1.0]], [5], [0], [3])
    with pytest.raises(ValueError, match="baseline"):
        continual_from_probes([[1.0]], [5], [0], [0], baseline=[1.0, 2.0])


# -- scoring without side effects ---------------------------------------------------------------


def agent_state(agent):
    reg = sorted((m.name, tuple(sorted(s.labels.items())), s.name, s.value)
                 for m in agent.registry.collect() for s in m.samples if not s.name.endswith("_created"))
    return {
        "meta": {k: v.detach().clone() for k, v in agent.meta.items()},
        "grads": {k: None if v.grad is None else v.grad.clone() for k, v in agent.meta.items()},
        "counters": dict(agent.counters), "memory": len(agent.memory), "seen": len(agent.seen),
        "pending": len(agent.pending), "replay": len(agent.replay), "recent": list(agent.recent),
        "rng": json.dumps(agent.rng.bit_generator.state), "gen": agent.generator.get_state().clone(),
        "registry": reg, "online_batch": len(agent._online_batch),
        "opt": {k: [t.clone() if torch.is_tensor(t) else t for t in v.values()] for k, v in agent.optimizer.state.items()},
    }


def test_probe_scores_change_no_agent_state():
    agent = Agent.from_config(CONFIG)
    rng = np.random.default_rng(0)
    for i in range(12):
        agent.step(sine_task(i, rng, "sine" if i < 6 else "big"))
    ps = ProbeSet(3, "file")
    prng = np.random.default_rng(1)
    for i in range(6):
        ps.offer(sine_task(100 + i, prng, "sine" if i % 2 else "big", segment=i))
    before = agent_state(agent)
    scores, metric = probe_scores(agent, ps, steps=3)
    after = agent_state(agent)
    assert metric == "mse" and set(scores) == {"sine", "big"} and all(math.isfinite(v) for v in scores.values())
    for k in before:
        if k in ("meta", "grads"):
            for name in before[k]:
                a, b = before[k][name], after[k][name]
                assert (a is None and b is None) or torch.equal(a, b), (k, name)
        elif k == "gen":
            assert torch.equal(before[k], after[k])
        elif k == "opt":
            assert len(before[k]) == len(after[k])
        else:
            assert before[k] == after[k], k
    # the same probe again gives the same numbers (no hidden state)
    assert probe_scores(agent, ps, steps=3)[0] == scores


def test_probe_set_offer_keeps_one_task_per_segment_and_persists(tmp_path):
    rng = np.random.default_rng(0)
    ps = ProbeSet(2, "reservoir")
    ps.persist(tmp_path)
    kept = [ps.offer(sine_task(i, rng, "sine", segment=i // 3)) for i in range(9)]
    assert kept == [True, False, False, True, False, False, False, False, False]
    assert not ps.offer(sine_task(50, rng, "sine", segment=9, labelled=False))
    assert not ps.offer(Task("nofam", "regression", np.zeros((2, 1)), np.zeros((2, 1)), np.zeros((1, 1)), np.zeros((1, 1))))
    again = ProbeSet(2, "reservoir")
    again.persist(tmp_path)  # a restart reads the same tasks back
    assert [t.id for t in again.families["sine"]] == [t.id for t in ps.families["sine"]] == ["t0", "t3"]


def test_probe_set_from_file_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    f = tmp_path / "probe.jsonl"
    f.write_text("\n".join(json.dumps(to_wire(sine_task(i, rng, ("a", "b")[i % 2]))) for i in range(6)) + "\n")
    ps = ProbeSet.from_file(f, 2)
    assert {k: [t.id for t in v] for k, v in ps.families.items()} == {"a": ["t0", "t2"], "b": ["t1", "t3"]}
    (tmp_path / "bad.jsonl").write_text('{"type": "task", "id": "x"}\n')
    with pytest.raises(ValueError, match="probes.file: .*line 1"):
        ProbeSet.from_file(tmp_path / "bad.jsonl", 2)


def test_probe_set_from_stream_is_held_out():
    stream = make_stream("sinusoid-osaka", seed=5, n_tasks=50)
    ps = ProbeSet.from_stream(stream, 3)
    assert list(ps.families) == ["sinusoid", "sinusoid-frequency", "linear"]
    probe_x = {t.support_x.tobytes() for ts in ps.families.values() for t in ts}
    stream_x = set()
    for r in stream.poll(0):
        rec = json.loads(r.data)
        stream_x.add(np.asarray(rec["support"]["x"], dtype=np.float32).tobytes())
    assert not probe_x & stream_x
    with pytest.raises(ValueError, match="probes.seed"):
        ProbeSet.from_stream(stream, 3, seed_offset=0)


def test_config_probes_section_is_validated():
    assert Config.from_dict({"probes": {"enabled": True, "every_tasks": 50}}).probes.every_tasks == 50
    with pytest.raises(ConfigError, match="probes.at_family"):
        Config.from_dict({"probes": {"at_family": "sometimes"}})
    with pytest.raises(ConfigError, match="probes.every_tasks"):
        Config.from_dict({"probes": {"every_tasks": 0}})


# -- the schedule in the agent's loop ----------------------------------------------------------


def run_stream(tmp_path, name, *, probe, every=20, n=90, at_family="every"):
    # micro_batch 1: the probe points split the source's batches, and a micro-batch's features come
    # from one vmapped call (equal to the per-task ones up to float rounding only)
    agent = Agent.from_config({**CONFIG, "agent": {**CONFIG["agent"], "micro_batch": 1}})
    stream = make_stream("sinusoid-osaka", seed=2, n_tasks=n)
    src = stream
    prober = None
    if probe:
        agent.run_log = RunLogWriter(tmp_path / name)
        prober = Prober(ProbeSet.from_stream(stream, 2), agent.run_log, every_tasks=every, steps=2, at_family=at_family)
        prober.start(agent)
        src = ProbingSource(stream, agent, prober)
    out = tmp_path / f"{name}.jsonl"
    sink = JsonlSink(out)
    agent.run(src, sink)
    if prober is not None:
        prober.final(agent)
        agent.run_log.close()
    sink.close()
    return agent, stream, [json.loads(x) for x in out.read_text().splitlines()]


def test_probing_source_schedule_and_identical_answers(tmp_path):
    agent, stream, probed = run_stream(tmp_path, "probed", probe=True)
    _, _, plain = run_stream(tmp_path, "plain", probe=False)
    # probing changes nothing the agent does
    assert [d["id"] for d in probed] == [d["id"] for d in plain]
    assert [d["predictions"] for d in probed] == [d["predictions"] for d in plain]
    assert [d["p_fail"] for d in probed] == [d["p_fail"] for d in plain]
    run = load_run(tmp_path / "probed")
    seqs = [p["seq"] for p in run.probes]
    fams = [stream.info(i)["family"] for i in range(90)]
    switches = [i for i in range(1, 90) if fams[i] != fams[i - 1]]
    expected = sorted({0, 90} | set(range(20, 90, 20)) | set(switches))
    assert seqs == expected
    assert [p["step"] for p in run.probes] == list(range(len(seqs)))
    assert all(set(p["scores"]) == {"sinusoid", "sinusoid-frequency", "linear"} for p in run.probes)
    assert run.probes[-1]["memory"] == len(agent.memory) and run.probes[0]["metric"] == "mse"


def test_probing_at_new_families_only(tmp_path):
    _, stream, _ = run_stream(tmp_path, "new", probe=True, every=1000, at_family="new")
    fams = [stream.info(i)["family"] for i in range(90)]
    firsts = sorted({fams.index(f) for f in set(fams)})
    assert [p["seq"] for p in load_run(tmp_path / "new").probes] == sorted({0, *firsts, 90})


def test_daemon_writes_probes_and_the_report_shows_continual_metrics(tmp_path):
    from agent import report
    from agent.daemon import add_arguments, run_daemon

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(CONFIG))
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--stream", "sinusoid-osaka", "--config", str(cfg), "--max-tasks", "120", "--run-dir",
                         str(tmp_path / "run"), "--output", str(tmp_path / "out.jsonl"), "--metrics-addr", "0",
                         "--set", "probes.enabled=true", "--set", "probes.every_tasks=40",
                         "--set", "probes.tasks_per_family=2", "--set", "probes.steps=2"])
    assert run_daemon(args, stderr=io.StringIO()) == 0
    run = load_run(tmp_path / "run")
    assert len(run) == 120 and run.probes[0]["seq"] == 0 and run.probes[-1]["seq"] == 120
    pm = report.probe_matrix(run)
    assert not isinstance(pm, str) and pm.R.shape == (len(run.probes) - 1, 3)
    cm = pm.continual()
    assert math.isfinite(cm.acc) and math.isfinite(cm.bwt) and math.isfinite(cm.forgetting)
    assert cm.acc == pytest.approx(-np.mean([run.probes[-1]["scores"][f] for f in pm.families]))
    sec = {s.title: s for s in report.build_sections(run, figures=False)}["Continual metrics (ACC, BWT, FWT, forgetting)"]
    assert sec.tables and sec.tables[0].rows[1][1] != "n/a"


def test_daemon_without_run_dir_warns_and_runs(tmp_path, caplog):
    from agent.daemon import add_arguments, run_daemon

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(CONFIG))
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--stream", "sinusoid-osaka", "--config", str(cfg), "--max-tasks", "5", "--output",
                         str(tmp_path / "out.jsonl"), "--metrics-addr", "0", "--set", "probes.enabled=true"])
    with caplog.at_level("WARNING"):
        assert run_daemon(args, stderr=io.StringIO()) == 0
    assert "no --run-dir" in caplog.text


def test_doctests():
    assert doctest.testmod(probes).failed == 0


def test_daemon_restart_continues_probe_numbering(tmp_path):
    from agent.daemon import add_arguments, run_daemon

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(CONFIG))
    p = argparse.ArgumentParser()
    add_arguments(p)
    common = ["--stream", "sinusoid-osaka", "--config", str(cfg), "--run-dir", str(tmp_path / "run"), "--state-dir",
              str(tmp_path / "state"), "--output", str(tmp_path / "out.jsonl"), "--metrics-addr", "0",
              "--set", "probes.enabled=true", "--set", "probes.every_tasks=25", "--set", "probes.at_family=none",
              "--set", "probes.tasks_per_family=2", "--set", "probes.steps=1"]
    assert run_daemon(p.parse_args([*common, "--max-tasks", "30"]), stderr=io.StringIO()) == 0
    first = load_run(tmp_path / "run").probes
    assert [q["seq"] for q in first] == [0, 25, 30]
    assert run_daemon(p.parse_args([*common, "--max-tasks", "30"]), stderr=io.StringIO()) == 0  # resumes at 30
    run = load_run(tmp_path / "run")
    assert len(run) == 60 and [q["seq"] for q in run.probes] == [0, 25, 30, 50, 60]
    assert [q["step"] for q in run.probes] == [0, 1, 2, 3, 4]
