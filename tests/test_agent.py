"""The embedded Agent: the README loop, bad input, delayed feedback, checkpoints, online learning."""

import json
import math

import numpy as np
import pytest
import torch

from agent.agent import Agent, Difficulty, Policy
from agent.task import Task, to_wire

SMALL = {"model": {"arch": "mlp", "hidden": [16, 16]},
         "agent": {"in_shape": [1], "out_dim": 1},
         "compute": {"levels": [[1, 1], [3, 1], [5, 2]]},
         "memory": {"capacity": 100}}


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def sine_task(rng, i, labels=True, k=10, q=10):
    a, phase = rng.uniform(0.1, 5.0), rng.uniform(0, np.pi)
    x, xq = rng.uniform(-5, 5, (k, 1)), rng.uniform(-5, 5, (q, 1))
    return Task(f"t-{i:05d}", "regression", x, a * np.sin(x - phase), xq, a * np.sin(xq - phase) if labels else None)


def line(task):
    return json.dumps(to_wire(task)).encode()


def test_readme_loop_embedded():
    # The README example: a plain loop, labels arriving one task later.
    agent = Agent.from_config(SMALL)
    rng = np.random.default_rng(0)
    previous = None
    for i in range(20):
        task = sine_task(rng, i, labels=False)
        outcome = agent.step(task)
        assert outcome.id == task.id and np.asarray(outcome.predictions).shape == (10, 1)
        assert outcome.algorithm == "maml" and outcome.inner_steps >= 1 and 0 <= outcome.p_fail <= 1
        json.loads(outcome.to_json())
        if previous is not None:
            score = agent.feedback(previous[0], previous[1])
            assert score is not None and math.isfinite(score["mse"])
        truth = task.query_x  # any float labels of the right shape
        previous = (task.id, np.sin(truth))
    assert agent.counters["labelled"] == 19 and len(agent.pending) == 1
    assert len(agent.memory) == 19
    assert agent.counters["online_updates"] == 19


def test_bad_records_interleaved_do_not_touch_state():
    rng = np.random.default_rng(1)
    good = [sine_task(rng, i) for i in range(12)]
    bad = [b'{"type": "task", "id": "x"', b"[1, 2]", json.dumps({"type": "task", "id": "b1", "kind": "regression",
           "support": {"x": [[0.0], [1.0, 2.0]], "y": [0, 1]}, "query": {"x": [[0.0]]}}).encode(),
           json.dumps({"type": "task", "id": "b2", "kind": "regression", "support": {"x": [[0.0, 1.0]], "y": [[1.0]]},
                       "query": {"x": [[0.0, 1.0]]}}).encode(),  # fits the wire, not the model (2 inputs)
           json.dumps({"type": "feedback", "id": "nobody", "y": [1.0]}).encode(),
           line(good[0])]  # a duplicate id
    clean, noisy = Agent.from_config(SMALL, clock=FakeClock()), Agent.from_config(SMALL, clock=FakeClock())
    clean_out = [clean.handle_line(line(t))[0] for t in good]
    noisy_out, errors = [], []
    for i, t in enumerate(good):
        noisy_out += noisy.handle_line(line(t))
        if i < len(bad) and i > 0:
            errors += noisy.handle_line(bad[i - 1])
    errors += noisy.handle_line(bad[-1])
    codes = [e["error"]["code"] for e in errors if "error" in e]
    assert codes == ["bad_json", "bad_json", "ragged_array", "dim_mismatch", "duplicate_id"]
    assert [e["id"] for e in errors if "error" in e][2:] == ["b1", "b2", good[0].id]
    for a, b in zip(clean_out, noisy_out):
        assert a["id"] == b["id"]
        np.testing.assert_allclose(a["predictions"], b["predictions"], rtol=1e-5, atol=1e-6)
    reg = noisy.registry
    assert reg.get_sample_value("metaagent_input_errors_total", {"code": "bad_json"}) == 2
    assert reg.get_sample_value("metaagent_input_errors_total", {"code": "dim_mismatch"}) == 1
    assert reg.get_sample_value("metaagent_feedback_unmatched_total") == 1
    for k in clean.meta:
        torch.testing.assert_close(clean.meta[k], noisy.meta[k])
    # b2 was rejected by the model check: its id is free again
    assert "b2" not in noisy.seen


def test_delayed_feedback_join_ttl_and_capacity():
    clock = FakeClock()
    agent = Agent.from_config({**SMALL, "limits": {"pending_ttl_s": 10.0, "pending_max": 3}}, clock=clock)
    rng = np.random.default_rng(2)
    tasks = [sine_task(rng, i, labels=False) for i in range(6)]
    for t in tasks[:2]:
        agent.step(t)
    clock.now = 5.0
    agent.step(tasks[2])
    assert agent.feedback(tasks[0].id, np.zeros((10, 1)))["id"] == tasks[0].id
    assert agent.feedback(tasks[0].id, np.zeros((10, 1))) is None  # already joined
    clock.now = 12.0  # tasks[1] (t=0) is past its TTL; tasks[2] (t=5) is not
    assert agent.feedback(tasks[1].id, np.zeros((10, 1))) is None
    assert agent.feedback(tasks[2].id, np.zeros((10, 1))) is not None
    for t in tasks[3:]:
        agent.step(t)
    agent.step(sine_task(rng, 99, labels=False))  # 4 pending > pending_max=3: the oldest goes
    reg = agent.registry
    assert reg.get_sample_value("metaagent_feedback_expired_total", {"reason": "ttl"}) == 1
    assert reg.get_sample_value("metaagent_feedback_expired_total", {"reason": "capacity"}) == 1
    assert reg.get_sample_value("metaagent_feedback_joined_total") == 2
    assert reg.get_sample_value("metaagent_feedback_unmatched_total") == 2
    assert reg.get_sample_value("metaagent_feedback_pending") == 3
    # labels that do not fit are an error, and the task stays pending
    from agent.task import TaskError
    with pytest.raises(TaskError):
        agent.feedback(tasks[5].id, np.zeros((3, 1)))
    assert tasks[5].id in agent.pending


def test_save_load_round_trip_gives_identical_predictions(tmp_path):
    cfg = {**SMALL, "compute": {"levels": [[1, 1], [3, 1], [5, 2]]}}
    clock = FakeClock()
    agent = Agent.from_config(cfg, clock=clock)
    rng = np.random.default_rng(3)
    for i in range(40):
        agent.step(sine_task(rng, i, labels=i % 3 != 0))
    path = agent.save(tmp_path / "ckpt", stream={"source": {"offset": 123}})
    assert {"meta.pt", "online.pt", "memory.npz", "pending.json", "pending.pt", "state.json"} <= set(
        p.name for p in path.iterdir())
    torch.load(path / "meta.pt", weights_only=True)
    torch.load(path / "online.pt", weights_only=True)
    clone = Agent.load(tmp_path / "ckpt", clock=FakeClock())
    assert clone.stream_state["source"] == {"offset": 123}
    assert list(clone.pending) == list(agent.pending) and len(clone.memory) == len(agent.memory)
    later = [sine_task(rng, 100 + i, labels=i % 2 == 0) for i in range(15)]
    for t in later:
        a, b = agent.step(t), clone.step(t)
        np.testing.assert_array_equal(np.asarray(a.predictions), np.asarray(b.predictions))
        assert a.budget == b.budget and a.flags == b.flags
    pid = next(iter(agent.pending))
    assert agent.feedback(pid, np.zeros((10, 1))) == clone.feedback(pid, np.zeros((10, 1)))


def test_online_meta_learning_reduces_error_on_a_stationary_stream():
    agent = Agent.from_config({**SMALL, "online": {"lr": 0.003}, "memory": {"enabled": False}})
    rng = np.random.default_rng(4)
    mse = []
    for i in range(300):
        t = sine_task(rng, i)
        o = agent.step(t)
        mse.append(float(np.mean((np.asarray(o.predictions) - t.query_y) ** 2)))
    first, last = np.mean(mse[:75]), np.mean(mse[-75:])
    assert last < 0.85 * first, (first, last)
    assert agent.counters["online_updates"] == 300 and agent.counters["rollbacks"] == 0


def test_nonfinite_loss_rolls_back_and_the_stream_goes_on():
    agent = Agent.from_config(SMALL)
    rng = np.random.default_rng(5)
    for i in range(5):
        agent.step(sine_task(rng, i))
    before = {k: v.detach().clone() for k, v in agent.meta.items()}
    x = rng.uniform(-5, 5, (10, 1))
    huge = Task("poison", "regression", x, np.full((10, 1), 1e30), x, np.full((10, 1), 1e30))  # MSE overflows
    out = agent.handle_line(line(huge))
    assert "predictions" in out[0]
    assert agent.registry.get_sample_value("metaagent_online_rollbacks_total", {"reason": "nonfinite_loss"}) == 1
    for k, v in before.items():
        torch.testing.assert_close(agent.meta[k], v)
    assert all(not torch.equal(t.support_y, huge.to_tensors().support_y) for t in agent.replay)
    for i in range(5):
        o = agent.step(sine_task(rng, 10 + i))
        assert np.isfinite(np.asarray(o.predictions)).all()
    assert agent.counters["rollbacks"] == 1 and agent.counters["online_updates"] == 10


def test_classification_tasks_and_micro_batch():
    cfg = {"model": {"arch": "mlp", "hidden": [16]}, "agent": {"in_shape": [4], "out_dim": 5},
           "compute": {"levels": [[1, 1], [3, 2]]}}
    agent = Agent.from_config(cfg)
    rng = np.random.default_rng(6)
    lines = []
    for i in range(10):
        centers = rng.normal(0, 3, (3, 4))
        y = np.repeat(np.arange(3), 4)
        x = centers[y] + rng.normal(0, 0.5, (12, 4))
        yq = np.arange(3).repeat(2)
        lines.append(line(Task(f"c{i}", "classification", x, y, centers[yq] + rng.normal(0, 0.5, (6, 4)), yq)))
    outs = agent.handle_records(lines)
    for o in outs:
        assert set(np.asarray(o[0]["predictions"]).tolist()) <= {0, 1, 2}
        assert len(o[0]["confidence"]) == 6 and all(0 < c <= 1 for c in o[0]["confidence"])
    assert agent.registry.get_sample_value("metaagent_labelled_tasks_total", {"algorithm": "maml"}) == 10
    too_many = Task("c-big", "classification", rng.normal(size=(6, 4)), np.arange(6), rng.normal(size=(2, 4)))
    assert agent.handle_line(line(too_many))[0]["error"]["code"] == "too_large"


def test_policy_and_difficulty_are_small_pure_parts():
    p = Policy(2, default=0, escalate=1, escalate_above=0.7)
    assert p.choose({"difficulty": 0.69}) == 0 and p.choose({"difficulty": 0.7}) == 1
    d = Difficulty(warmup=2)
    assert d.update(1.0) == 0.5 and d.estimate(float("inf")) == 1.0


def test_escalation_arm_and_fixed_budget():
    cfg = {**SMALL, "agent": {"in_shape": [1], "out_dim": 1, "escalate_arm": 1, "escalate_above": 0.0,
                              "arms": [{"algorithm": "maml"}, {"algorithm": "metasgd", "budget": 0}]},
           "selector": {"policy": "fixed"}}  # the original default/escalate rule
    agent = Agent.from_config(cfg)
    o = agent.step(sine_task(np.random.default_rng(7), 0))
    assert o.algorithm == "metasgd" and o.budget == {"steps": 1, "members": 1}


def test_ensemble_over_memory_neighbours():
    agent = Agent.from_config({**SMALL, "compute": {"levels": [[3, 3]]}, "memory": {"warm_start": "ensemble"}})
    rng = np.random.default_rng(8)
    outs = [agent.step(sine_task(rng, i)) for i in range(6)]
    assert "ensemble" not in outs[0].flags  # empty memory: the meta-init alone
    assert all("ensemble" in o.flags for o in outs[3:])
    assert agent.registry.get_sample_value("metaagent_memory_hits_total") >= 6
    assert agent.registry.get_sample_value("metaagent_memory_retrieval_duration_seconds_count") >= 3


# -- overheads: lazy task embedding, O(1) memory-bytes gauge ---------------------------------
def _count_embeddings(agent, monkeypatch):
    calls = []
    real = agent._embedding

    def counting(tt, *features):
        calls.append(1)
        return real(tt, *features)

    monkeypatch.setattr(agent, "_embedding", counting)
    return calls


def test_embedding_is_computed_only_when_memory_needs_it_and_once_per_task(monkeypatch):
    rng = np.random.default_rng(9)
    off = Agent.from_config({**SMALL, "memory": {"enabled": False}})
    calls = _count_embeddings(off, monkeypatch)
    for i in range(5):
        off.step(sine_task(rng, i))
    assert calls == []  # no memory: never searched nor written

    # Ensembles (members > 1) search memory, pre-features search it, inline labels write it:
    # one embedding per task all the same.
    agent = Agent.from_config({**SMALL, "compute": {"levels": [[3, 3]]}})
    calls = _count_embeddings(agent, monkeypatch)
    for i in range(6):
        agent.step(sine_task(rng, i))
        assert len(calls) == i + 1
    # Delayed labels: taken at answer time (the state that answered), never again at feedback.
    t = sine_task(rng, 50, labels=False)
    agent.step(t)
    assert len(calls) == 7
    agent.feedback(t.id, np.zeros((10, 1)))
    assert len(calls) == 7 and t.id in agent.memory


def test_lazy_embedding_changes_nothing(monkeypatch):
    # The same stream with the embedding forced eagerly (as before) gives identical answers,
    # identical memory and identical meta-parameters.
    import agent.agent as agent_module

    def run(eager):
        if eager:
            init = agent_module._LazyEmbedding.__init__

            def eager_init(self, agent, tt, *features):
                init(self, agent, tt, *features)
                self()

            monkeypatch.setattr(agent_module._LazyEmbedding, "__init__", eager_init)
        else:
            monkeypatch.undo()
        a = Agent.from_config({**SMALL, "compute": {"levels": [[1, 1], [3, 2]]}, "memory": {"capacity": 10}},
                              clock=FakeClock())
        rng = np.random.default_rng(10)
        outs, waiting = [], []
        for i in range(30):
            t = sine_task(rng, i, labels=i % 3 != 0)
            outs.append(a.handle_line(line(t))[0])
            if t.query_y is None:
                waiting.append(t.id)
            if i % 4 == 3 and waiting:
                a.feedback(waiting.pop(0), np.zeros((10, 1)))
        return a, outs

    eager, eager_out = run(True)
    lazy, lazy_out = run(False)
    for x, y in zip(eager_out, lazy_out):
        assert x["predictions"] == y["predictions"] and x["flags"] == y["flags"] and x["budget"] == y["budget"]
    assert [e.task_id for e in eager.memory] == [e.task_id for e in lazy.memory]
    np.testing.assert_array_equal(eager.memory.embeddings, lazy.memory.embeddings)
    for k in eager.meta:
        torch.testing.assert_close(eager.meta[k], lazy.meta[k])


@pytest.mark.parametrize("eviction", ["reservoir", "diversity"])
def test_memory_bytes_gauge_tracks_nbytes_through_evictions_and_restore(tmp_path, eviction):
    cfg = {**SMALL, "memory": {"capacity": 8, "eviction": eviction}, "online": {"enabled": False}}
    agent = Agent.from_config(cfg, clock=FakeClock())
    rng = np.random.default_rng(11)
    gauge = lambda a: a.registry.get_sample_value("metaagent_memory_bytes")  # noqa: E731
    for i in range(40):  # 5x the capacity: evictions, reservoir discards
        agent.step(sine_task(rng, i))
        assert gauge(agent) == agent.memory.nbytes, i
    assert len(agent.memory) == 8
    agent.save(tmp_path / "c")
    clone = Agent.load(tmp_path / "c", clock=FakeClock())
    assert gauge(clone) == clone.memory.nbytes == agent.memory.nbytes
    for i in range(40, 50):
        clone.step(sine_task(rng, i))
        assert gauge(clone) == clone.memory.nbytes


def test_memory_bytes_gauge_does_not_scan_the_bank(monkeypatch):
    from agent.memory import MemoryBank

    agent = Agent.from_config({**SMALL, "online": {"enabled": False}})
    rng = np.random.default_rng(12)
    agent.step(sine_task(rng, 0))
    scans = []
    real = MemoryBank.nbytes.fget
    monkeypatch.setattr(MemoryBank, "nbytes", property(lambda self: scans.append(1) or real(self)))
    for i in range(1, 20):
        agent.step(sine_task(rng, i))
    assert scans == [] and len(agent.memory) == 20
    monkeypatch.undo()
    assert agent.registry.get_sample_value("metaagent_memory_bytes") == agent.memory.nbytes


# ---------------------------------------------------------------------------------------------
# Micro-batches: tasks adapted together (agent.batch), answers from the state at the batch start
# ---------------------------------------------------------------------------------------------
# Nothing learned between tasks changes an answer here (no memory, online learning, failure
# predictor or drift widening; a fixed 5-step budget): a batch must answer as a loop does.
STATIC = {"model": {"arch": "mlp", "hidden": [16, 16]},
          "agent": {"in_shape": [1], "out_dim": 1, "arms": [{"algorithm": "maml", "inner_lr": 0.2, "budget": 1}]},
          "compute": {"levels": [[1, 1], [5, 1], [10, 2]], "rate_per_s": 1e9, "capacity": 1e9},
          "memory": {"enabled": False}, "online": {"enabled": False}, "failure": {"enabled": False},
          "drift": {"enabled": False}}


def _count_batches(monkeypatch):
    import agent.batch as batch

    calls = []
    real = batch._guard_batch

    def counting(alg, meta, tasks, *a, **k):
        calls.append(len(tasks))
        return real(alg, meta, tasks, *a, **k)

    monkeypatch.setattr(batch, "_guard_batch", counting)
    return calls


def test_step_many_adapts_together_and_answers_as_a_loop(monkeypatch):
    calls = _count_batches(monkeypatch)
    rng = np.random.default_rng(11)
    tasks = [sine_task(rng, i, q=8 + i % 3) for i in range(8)] + [sine_task(rng, 8 + i, k=6) for i in range(3)]
    batched = Agent.from_config(STATIC).step_many(tasks)
    assert sorted(calls) == [3, 8]  # two support shapes: two lockstep groups (query sizes may differ)
    calls.clear()
    single = Agent.from_config(STATIC)
    looped = [single.step(t) for t in tasks]
    assert not calls
    assert any("backtracked" in o.flags for o in looped)
    for a, b in zip(batched, looped):
        assert (a.id, a.inner_steps, a.budget, a.flags, a.algorithm) == (b.id, b.inner_steps, b.budget, b.flags, b.algorithm)
        np.testing.assert_allclose(np.asarray(a.predictions), np.asarray(b.predictions), rtol=1e-4, atol=1e-5)


def test_handle_records_batches_and_micro_batch_one_is_step(monkeypatch):
    calls = _count_batches(monkeypatch)
    rng = np.random.default_rng(12)
    tasks = [sine_task(rng, i) for i in range(10)]
    cfg = {**SMALL, "agent": {**SMALL["agent"], "micro_batch": 1}}
    one = Agent.from_config(cfg)
    outs = one.handle_records([line(t) for t in tasks])
    assert not calls  # micro-batch 1: the per-task path
    ref = Agent.from_config(SMALL)
    for o, t in zip(outs, tasks):
        r = ref.step(t).to_dict()
        assert {k: v for k, v in o[0].items() if k != "latency_ms"} == {k: v for k, v in r.items() if k != "latency_ms"}
    assert {**one.counters, "records": 0} == ref.counters and len(one.memory) == len(ref.memory)
    five = Agent.from_config({**SMALL, "agent": {**SMALL["agent"], "micro_batch": 5}})
    outs = five.handle_records([line(t) for t in tasks])
    assert calls and all("predictions" in o[0] for o in outs)
    assert five.counters["labelled"] == 10 and five.counters["online_updates"] == 10


def test_batch_answers_from_the_state_at_its_start_then_learns_in_order():
    # Online meta-learning on: the second task of a batch is answered with the meta-parameters
    # of the batch start (the first task's update comes after every answer), and every task is
    # learned from, in order, with the embedding of the state that answered it.
    rng = np.random.default_rng(13)
    tasks = [sine_task(rng, i) for i in range(6)]
    live = Agent.from_config({**STATIC, "memory": {"capacity": 50}, "online": {"enabled": True}})
    frozen = Agent.from_config(STATIC)
    start_meta = {k: v.detach().clone() for k, v in live.meta.items()}
    got = live.step_many(tasks)
    want = [frozen.step(t) for t in tasks]
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a.predictions), np.asarray(b.predictions), rtol=1e-4, atol=1e-5)
    assert live.counters["online_updates"] == 6 and len(live.memory) == 6
    assert any(not torch.equal(live.meta[k], v) for k, v in start_meta.items())
    from agent.memory import task_embedding

    for t in tasks:  # the embedding of the state that answered, not of the updated one
        emb = task_embedding(live.learner, start_meta, t.to_tensors(), projection=live.projection)
        np.testing.assert_allclose(live.memory.get(t.id).embedding, emb, rtol=1e-5, atol=1e-6)
    # and the next batch is answered from the updated state
    nxt = sine_task(rng, 99)
    after = live.step_many([nxt, sine_task(rng, 100)])[0]
    assert not np.allclose(np.asarray(after.predictions), np.asarray(frozen.step(nxt).predictions))


def test_batch_failures_stay_with_their_task(monkeypatch, caplog):
    import agent.agent as agent_module

    rng = np.random.default_rng(14)
    tasks = [sine_task(rng, i) for i in range(4)]
    agent = Agent.from_config(STATIC)

    def broken(*a, **k):
        raise RuntimeError("no vmap today")

    monkeypatch.setattr(agent_module, "guarded_adapt_batch", broken)
    with caplog.at_level("ERROR"):
        outs = agent.handle_records([line(t) for t in tasks])
    assert all("predictions" in o[0] for o in outs)  # the group fell back to one by one
    assert "batched adaptation failed" in caplog.text
    monkeypatch.undo()
    real_finish = agent._finish

    def finish(job, *a, **k):
        if job.task.id == "t-00102":
            raise ValueError("boom")
        return real_finish(job, *a, **k)

    monkeypatch.setattr(agent, "_finish", finish)
    outs = agent.handle_records([line(sine_task(rng, 100 + i)) for i in range(4)])
    assert [("error" in o[0]) for o in outs] == [False, False, True, False]
    assert outs[2][0]["error"]["code"] == "internal" and agent.counters["tasks"] == 7


def test_batched_features_equal_the_per_task_ones(monkeypatch):
    # The batch path computes the support features, initial loss and gradient norm, and the
    # probe's embedding in vmapped passes; the failure predictor must see the same numbers.
    cfg = {**STATIC, "failure": {"enabled": True}}
    seen = {"batch": [], "loop": []}

    def recorder(agent, key):
        plan, post = agent.intel.plan, agent.intel.post
        monkeypatch.setattr(agent.intel, "plan", lambda tid, x, **kw: (seen[key].append(("pre", tid, x)), plan(tid, x, **kw))[1])
        monkeypatch.setattr(agent.intel, "post", lambda tid, x, probe, p: (seen[key].append(("post", tid, probe)),
                                                                        post(tid, x, probe, p))[1])

    rng = np.random.default_rng(15)
    tasks = [sine_task(rng, i) for i in range(6)]
    batched, looped = Agent.from_config(cfg), Agent.from_config(cfg)
    recorder(batched, "batch")
    recorder(looped, "loop")
    batched.step_many(tasks)
    for t in tasks:
        looped.step(t)
    key = lambda r: (r[1], r[0])  # noqa: E731 - per task: pre, then post
    got, want = sorted(seen["batch"], key=key), sorted(seen["loop"], key=key)
    assert [key(r) for r in got] == [key(r) for r in want] and len(got) == 12
    for (_, _, a), (_, _, b) in zip(got, want):
        assert a.keys() == b.keys()
        for k in b:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k
    # the memory embedding from batched features is the per-task one
    agent = Agent.from_config(SMALL)
    from agent.batch import start_batch

    tts = [t.to_tensors() for t in tasks[:3]]
    for tt, (f, _, _) in zip(tts, start_batch(agent.learner, agent.meta, tts)):
        np.testing.assert_allclose(agent._embedding(tt, f), agent._embedding(tt), rtol=1e-5, atol=1e-6)
