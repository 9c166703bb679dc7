"""Run directories: writer/reader round trip, delayed score join, restart-append and crash safety."""

import json
import threading

import numpy as np
import pytest

from agent.runlog import RunLogWriter, is_run_dir, load_run
from agent.task import Outcome


def _outcome(i, **kw):
    d = {"id": f"t{i}", "algorithm": "maml", "budget": {"steps": 5, "members": 2}, "inner_steps": 10,
         "p_fail": 0.25, "flags": ["ensemble"], "latency_ms": 12.5}
    d.update(kw)
    return d


def test_round_trip_from_an_outcome_object(tmp_path):
    out = Outcome("a-1", np.array([0, 1]), np.array([0.9, 0.8]), "protonet", {"steps": 0, "members": 1}, 0,
                  0.125, ("drift",), 3.5)
    with RunLogWriter(tmp_path, config={"agent": {"k": 1}}, stream={"preset": "demo"}, seed=3) as log:
        rec = log.write_outcome(out, seq=7, meta={"family": "sine", "segment": 2, "other": "dropped"},
                                kind="classification", quality=0.5, failed=True)
    assert "predictions" not in rec and rec["boundary"] is True  # "drift" flag counts as a detection
    run = load_run(tmp_path)
    assert run.ids == ["a-1"] and run.seq.tolist() == [7.0] and run.family == ["sine"]
    assert run.segment.tolist() == [2.0] and run.algorithm == ["protonet"] and run.members.tolist() == [1.0]
    assert run.p_fail.tolist() == [0.125] and run.flags == [["drift"]] and run.latency_ms.tolist() == [3.5]
    assert run.quality.tolist() == [0.5] and run.failed.tolist() == [1.0] and run.boundary.tolist() == [1.0]
    assert run.budget_units.tolist() == [0.0]  # defaults to inner steps
    assert run.info["seed"] == 3 and run.info["stream"] == {"preset": "demo"} and run.info["format_version"] == 1
    assert run.config == {"agent": {"k": 1}}
    assert (tmp_path / "config.yaml").is_file() and is_run_dir(tmp_path)


def test_delayed_scores_join_by_id(tmp_path):
    with RunLogWriter(tmp_path) as log:
        for i in range(4):
            log.write_outcome(_outcome(i), seq=i, kind="regression", meta={"family": None, "segment": None})
        log.write_score("t2", 0.3, False)
        log.write_score("t0", 1.5, True)
        log.write_score("t0", 1.25, True)  # a corrected score: the last one wins
        log.write_score("ghost", 0.1, False)
    run = load_run(tmp_path)
    assert run.ids == ["t0", "t1", "t2", "t3"]
    np.testing.assert_array_equal(run.quality, [1.25, np.nan, 0.3, np.nan])
    np.testing.assert_array_equal(run.failed, [1.0, np.nan, 0.0, np.nan])
    assert run.labelled.tolist() == [True, False, True, False]
    assert run.n_orphan_scores == 1 and run.metric_names == ["mse"]
    assert run.family == [None] * 4 and np.isnan(run.segment).all()
    assert not run.has_detector and run.families == []


def test_score_written_before_restart_joins_outcome_after(tmp_path):
    with RunLogWriter(tmp_path, seed=1) as log:
        log.write_outcome(_outcome(0), seq=0, kind="classification")
    with RunLogWriter(tmp_path, seed=1) as log:
        log.write_score("t0", 1.0, False)
    assert load_run(tmp_path).quality.tolist() == [1.0]


def test_restart_appends_and_keeps_the_last_answer(tmp_path):
    with RunLogWriter(tmp_path, config={"a": 1}, seed=5) as log:
        for i in range(3):
            log.write_outcome(_outcome(i), seq=i, kind="classification", quality=0.5, failed=False)
        log.write_probe(0, {"x": 0.5}, seq=3, memory=3)
    started = json.loads((tmp_path / "run.json").read_text())["started"]
    # restart from a checkpoint taken after task 1: task 2 is answered again, then the stream goes on
    with RunLogWriter(tmp_path, config={"a": 2}, seed=5) as log:
        for i in range(2, 5):
            log.write_outcome(_outcome(i, algorithm="protonet"), seq=i, kind="classification", quality=1.0,
                              failed=False)
        log.write_probe(1, {"x": 0.9}, seq=5, memory=5)
    run = load_run(tmp_path)
    assert run.ids == ["t0", "t1", "t2", "t3", "t4"] and run.n_duplicates == 1
    assert run.algorithm[2] == "protonet" and run.quality.tolist() == [0.5, 0.5, 1.0, 1.0, 1.0]
    assert [p["memory"] for p in run.probes] == [3, 5]
    assert run.info["started"] == started and len(run.info["restarts"]) == 1
    assert run.info["restarts"][0]["config"] == "config-1"  # the changed config is kept beside the first
    assert (tmp_path / "config-1.yaml").is_file() and run.config == {"a": 1}


def test_torn_last_line_after_a_crash(tmp_path):
    with RunLogWriter(tmp_path) as log:
        log.write_outcome(_outcome(0), seq=0, kind="classification", quality=1.0, failed=False)
    with open(tmp_path / "outcomes.jsonl", "a") as f:
        f.write('{"type":"outcome","id":"t1","se')  # killed mid-write
    with RunLogWriter(tmp_path) as log:
        log.write_outcome(_outcome(1), seq=1, kind="classification", quality=0.0, failed=True)
    run = load_run(tmp_path)
    assert run.ids == ["t0", "t1"] and run.n_corrupt == 1 and run.quality.tolist() == [1.0, 0.0]


def test_records_are_visible_while_the_writer_is_open(tmp_path):
    log = RunLogWriter(tmp_path)
    log.write_outcome(_outcome(0), seq=0, kind="classification")
    assert load_run(tmp_path).ids == ["t0"]  # flushed per record: a report can read a live run
    log.flush()
    log.close()
    log.close()  # idempotent


def test_concurrent_writers_threads_do_not_interleave(tmp_path):
    with RunLogWriter(tmp_path) as log:
        def work(k):
            for i in range(200):
                log.write_outcome(_outcome(f"{k}-{i}", id=f"{k}-{i}"), seq=k * 1000 + i, kind="classification")
                log.write_score(f"{k}-{i}", 1.0, False)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    run = load_run(tmp_path)
    assert len(run) == 800 and run.n_corrupt == 0 and run.labelled.all()


def test_boundaries_and_switches(tmp_path):
    fams = ["a"] * 3 + ["b"] * 2 + ["b"] * 2 + ["a"] * 2
    segs = [0, 0, 0, 1, 1, 2, 2, 3, 3]
    with RunLogWriter(tmp_path) as log:
        for i, (f, s) in enumerate(zip(fams, segs)):
            log.write_outcome(_outcome(i), seq=i, kind="classification", meta={"family": f, "segment": s},
                              boundary=i in (4, 7))
    run = load_run(tmp_path)
    assert run.segment_boundaries().tolist() == [3, 5, 7]
    assert run.family_switches().tolist() == [3, 7]
    assert run.detected_boundaries().tolist() == [4, 7] and run.has_detector
    assert run.families == ["a", "b"]
    sub = run.select(np.array([f == "b" for f in run.family]))
    assert sub.ids == ["t3", "t4", "t5", "t6"]


def test_not_a_run_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        load_run(tmp_path)


def test_non_finite_values_are_stored_as_null(tmp_path):
    with RunLogWriter(tmp_path) as log:
        log.write_outcome(_outcome(0, p_fail=float("nan"), latency_ms=np.float32(2.0)), seq=np.int64(0),
                          kind="regression", quality=float("inf"), failed=True)
    line = (tmp_path / "outcomes.jsonl").read_text().strip()
    assert '"p_fail":null' in line and '"quality":"inf"' in line  # a diverged task's MSE is kept, not dropped
    run = load_run(tmp_path)
    assert np.isnan(run.p_fail[0]) and run.failed.tolist() == [1.0] and run.latency_ms.tolist() == [2.0]
    assert run.quality.tolist() == [float("inf")] and not run.labelled.any() and run.n_nonfinite_quality == 1


def test_agent_writes_its_run_directory(tmp_path):
    """An Agent with a run log records every answer and every score, delayed ones joined by id."""
    import numpy as np

    from agent.agent import Agent
    from agent.runlog import RunLogWriter, load_run
    from agent.task import Task

    agent = Agent.from_config({"agent": {"in_shape": [1], "out_dim": 1}, "compute": {"levels": [[1, 1]]}})
    agent.run_log = RunLogWriter(tmp_path / "run", config=agent.config.to_dict(), seed=0)
    rng = np.random.default_rng(0)
    for i in range(4):
        x, q = rng.uniform(-5, 5, (6, 1)), rng.uniform(-5, 5, (4, 1))
        inline = i % 2 == 0
        task = Task(f"t{i}", "regression", x, np.sin(x), q, np.sin(q) if inline else None, meta={"family": "sine"})
        agent.step(task)
        if not inline:
            agent.feedback(task.id, np.sin(q))
    agent.run_log.close()
    run = load_run(tmp_path / "run")
    assert run.ids == ["t0", "t1", "t2", "t3"]
    assert run.family == ["sine"] * 4
    assert np.isfinite(run.quality).all() and set(run.failed.tolist()) <= {0.0, 1.0}
