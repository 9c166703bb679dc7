"""Batched guarded adaptation (agent.batch) against a loop of agent.compute.guarded_adapt."""

import math

import pytest
import torch

import agent.batch as batch
from agent.algorithms import build
from agent.algorithms.base import TaskTensors
from agent.batch import guarded_adapt_batch, predict_batch
from agent.compute import guarded_adapt
from agent.nn import build_model
from agent.nn.mlp import MLPFeatures
from agent.nn.model import MetaModel

EXACT = ("steps", "step_calls", "backtracks", "early_stopped", "diverged", "best_step", "lr_scale", "holdout")


def sine_tasks(n, k=10, nq=7, seed=0, amp=(0.1, 5.0)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        a = amp[0] + (amp[1] - amp[0]) * torch.rand((), generator=g)
        p = math.pi * torch.rand((), generator=g)
        x = 10 * torch.rand(k, 1, generator=g) - 5
        xq = 10 * torch.rand(nq, 1, generator=g) - 5
        out.append(TaskTensors(x, a * torch.sin(x - p), xq, a * torch.sin(xq - p), "regression"))
    return out


def blob_tasks(n, n_way=3, shots=4, dim=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        centres = 2 * torch.randn(n_way, dim, generator=g)
        y = torch.arange(n_way).repeat_interleave(shots)
        x = centres[y] + 0.5 * torch.randn(len(y), dim, generator=g)
        out.append(TaskTensors(x, y, x[:5], y[:5], "classification", n_way))
    return out


def mlp(in_dim=1, out_dim=1, hidden=(40, 40)):
    return MetaModel(MLPFeatures(in_dim, hidden), hidden[-1], out_dim, vmappable=True)


def assert_same(alg, meta, tasks, max_steps, **guard):
    """Batched == looped: exact counts and flags, losses and parameters to float32 rounding."""
    limits = max_steps if isinstance(max_steps, list) else [max_steps] * len(tasks)
    got = guarded_adapt_batch(alg, meta, tasks, max_steps, **guard)
    want = [guarded_adapt(alg, meta, t, m, **guard) for t, m in zip(tasks, limits)]
    assert len(got) == len(want)
    for i, ((s, tr), (s0, tr0)) in enumerate(zip(got, want)):
        for f in EXACT:
            assert getattr(tr, f) == getattr(tr0, f), (i, f, getattr(tr, f), getattr(tr0, f))
        assert len(tr.losses) == len(tr0.losses)
        for a, b in zip(tr.losses + [tr.best_loss], tr0.losses + [tr0.best_loss]):
            assert (a == b) if math.isinf(b) else a == pytest.approx(b, rel=1e-4, abs=1e-6), (i, tr.losses, tr0.losses)
        assert s.step == s0.step
        assert s.params.keys() == s0.params.keys() and s.extras.keys() == s0.extras.keys()
        for k in s0.params:
            torch.testing.assert_close(s.params[k], s0.params[k], rtol=1e-4, atol=1e-5)
        for k in s0.extras:
            torch.testing.assert_close(s.extras[k], s0.extras[k], rtol=1e-4, atol=1e-5)
        assert (s.prev_loss is None) == (s0.prev_loss is None)
        if s0.prev_loss is not None:
            assert float(s.prev_loss) == pytest.approx(float(s0.prev_loss), rel=1e-4, abs=1e-6)
    return got, want


@pytest.fixture()
def count_vmap(monkeypatch):
    calls = []
    real = torch.func.vmap

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(torch.func, "vmap", counting)
    return calls


def test_matches_loop_with_backtracks_plateaus_and_mixed_limits(count_vmap):
    # lr 0.05 on a 1-40-40-1 net: big amplitudes overshoot and backtrack, small ones plateau.
    alg = build("maml", mlp(), inner_lr=0.05)
    meta = alg.init_meta(torch.Generator().manual_seed(0))
    tasks = sine_tasks(12, seed=1)
    limits = [0, 1, 2, 3, 5, 8, 10, 10, 12, 4, 6, 10]
    got, _ = assert_same(alg, meta, tasks, limits, patience=2, min_rel_improvement=1e-2)
    traces = [tr for _, tr in got]
    assert any(tr.backtracks for tr in traces), "no task backtracked: the case is not covered"
    assert any(tr.early_stopped and tr.steps < lim for tr, lim in zip(traces, limits)), "no early stop"
    assert any(not tr.early_stopped and tr.steps == lim > 0 for tr, lim in zip(traces, limits))
    assert traces[0].steps == 0 and traces[0].step_calls == 0
    # batched: far fewer vmapped calls than the loop's step calls
    assert 0 < len(count_vmap) < sum(tr.step_calls for tr in traces) / 2


def test_matches_loop_when_steps_diverge():
    # A huge step size: full steps explode (non-finite loss) and are halved; some tasks find a
    # descending step within the backtracks and go on, others stop.
    alg = build("maml", mlp(), inner_lr=1e7)
    meta = alg.init_meta(torch.Generator().manual_seed(0))
    tasks = sine_tasks(6, seed=2, amp=(3.0, 5.0))
    got, _ = assert_same(alg, meta, tasks, 5, max_backtracks=24)
    assert any(tr.diverged and tr.steps == 0 for _, tr in got)
    assert any(tr.steps == 5 for _, tr in got)
    # and without backtracking a non-finite step stops adaptation
    got, _ = assert_same(alg, meta, tasks, 5, backtrack=False)
    assert all(tr.early_stopped for _, tr in got)


def test_all_steps_nonfinite_returns_start_state():
    alg = build("maml", mlp(), inner_lr=1e30)
    meta = alg.init_meta(torch.Generator().manual_seed(0))
    tasks = sine_tasks(4, seed=3, amp=(4.0, 5.0))
    got, want = assert_same(alg, meta, tasks, 3, max_backtracks=1)
    for (s, tr), (s0, _) in zip(got, want):
        assert s.step == 0 and tr.diverged and tr.best_step == 0
        assert all(torch.equal(s.params[k], s0.params[k]) for k in s0.params)


def test_min_steps_zero_and_no_backtracking():
    alg = build("maml", mlp(hidden=(16,)), inner_lr=0.3)
    meta = alg.init_meta(torch.Generator().manual_seed(1))
    tasks = sine_tasks(8, seed=4)
    assert_same(alg, meta, tasks, 6, min_steps=0)
    assert_same(alg, meta, tasks, 6, backtrack=False)
    assert_same(alg, meta, tasks, 6, max_backtracks=0)
    assert_same(alg, meta, tasks, [3, 0, 6, 1, 2, 6, 6, 4], min_steps=2, patience=1)


@pytest.mark.parametrize("name,hyper", [("maml", {"inner_lr": 0.5}), ("anil", {"inner_lr": 0.5}),
                                        ("metasgd", {"inner_lr": 0.5}), ("mamlpp", {"inner_lr": 0.5, "inner_steps": 3})])
def test_classification_algorithms(name, hyper):
    # ANIL caches features in extras; MAML++ has a rate per inner step; Meta-SGD rate tensors.
    alg = build(name, mlp(in_dim=2, out_dim=4, hidden=(16,)), **hyper)
    meta = alg.init_meta(torch.Generator().manual_seed(0))
    tasks = blob_tasks(7, seed=5)
    got, _ = assert_same(alg, meta, tasks, [4, 8, 2, 8, 5, 6, 1])
    assert sum(tr.step_calls for _, tr in got) > 7


def test_mixed_shapes_are_grouped():
    alg = build("maml", mlp(), inner_lr=0.05)
    meta = alg.init_meta(torch.Generator().manual_seed(0))
    tasks = sine_tasks(3, k=5, seed=6) + sine_tasks(4, k=10, seed=7) + sine_tasks(1, k=3, seed=8)
    order = [0, 3, 1, 4, 7, 2, 5, 6]
    assert_same(alg, meta, [tasks[i] for i in order], 5)


def test_unvmappable_model_falls_back_to_the_loop(count_vmap):
    model = build_model("conv4", in_shape=(1, 16, 16), out_dim=3, norm="batch", width=4)
    assert not model.vmappable
    alg = build("maml", model, inner_lr=0.3)
    meta = alg.init_meta(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(9)
    tasks = [TaskTensors(torch.randn(6, 1, 16, 16, generator=g), torch.arange(6) % 3, torch.randn(2, 1, 16, 16, generator=g),
                         None, "classification", 3) for _ in range(3)]
    got = guarded_adapt_batch(alg, meta, tasks, 3)
    want = [guarded_adapt(alg, meta, t, 3) for t in tasks]
    assert not count_vmap
    for (s, tr), (s0, tr0) in zip(got, want):  # the loop itself: identical, not just close
        assert tr.to_dict() == tr0.to_dict()
        assert all(torch.equal(s.params[k], s0.params[k]) for k in s0.params)
    outs = predict_batch(alg, meta, [s for s, _ in got], [t.query_x for t in tasks])
    assert all(torch.equal(o, alg.predict(meta, s, t.query_x)) for o, (s, _), t in zip(outs, got, tasks))


def test_closed_form_and_holdout_use_the_loop(count_vmap):
    tasks = blob_tasks(4, seed=10)
    proto = build("protonet", mlp(in_dim=2, out_dim=0, hidden=(8,)))
    meta = proto.init_meta(torch.Generator().manual_seed(0))
    for (s, tr), t in zip(guarded_adapt_batch(proto, meta, tasks, 5), tasks):
        s0, tr0 = guarded_adapt(proto, meta, t, 5)
        assert tr.to_dict() == tr0.to_dict() and torch.equal(s.extras["prototypes"], s0.extras["prototypes"])
    alg = build("maml", mlp(in_dim=2, out_dim=3, hidden=(8,)), inner_lr=0.5)
    meta = alg.init_meta(torch.Generator().manual_seed(0))
    got = guarded_adapt_batch(alg, meta, tasks, 4, holdout=0.3, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    want = [guarded_adapt(alg, meta, t, 4, holdout=0.3, generator=g) for t in tasks]
    assert [tr.to_dict() for _, tr in got] == [tr.to_dict() for _, tr in want]
    assert not count_vmap


def test_predict_batch_matches_predict():
    alg = build("anil", mlp(in_dim=2, out_dim=3, hidden=(8,)), inner_lr=0.5)
    meta = alg.init_meta(torch.Generator().manual_seed(0))
    tasks = blob_tasks(5, seed=11)
    states = [s for s, _ in guarded_adapt_batch(alg, meta, tasks, [1, 3, 3, 0, 2])]
    xs = [t.query_x for t in tasks[:4]] + [torch.randn(9, 2)]  # another query size
    for o, s, x in zip(predict_batch(alg, meta, states, xs), states, xs):
        torch.testing.assert_close(o, alg.predict(meta, s, x), rtol=1e-5, atol=1e-6)


def test_bad_arguments():
    alg = build("maml", mlp(hidden=(4,)))
    meta = alg.init_meta(torch.Generator().manual_seed(0))
    tasks = sine_tasks(2)
    with pytest.raises(ValueError, match="max_steps"):
        guarded_adapt_batch(alg, meta, tasks, [1])
    with pytest.raises(ValueError, match="max_steps"):
        guarded_adapt_batch(alg, meta, tasks, -1)
    assert guarded_adapt_batch(alg, meta, [], 3) == []
    assert batch.batchable(alg) and not batch.batchable(build("protonet", mlp(hidden=(4,)), ))


def test_start_batch_and_embed_batch_match_the_per_task_functions():
    from agent.batch import embed_batch, start_batch
    from agent.online.features import _embedding, _init_loss_and_grad

    for name, model, tasks in [("maml", mlp(hidden=(16, 16)), sine_tasks(5, seed=12) + sine_tasks(2, k=4, seed=13)),
                               ("anil", mlp(in_dim=2, out_dim=3, hidden=(8,)), blob_tasks(4, seed=14))]:
        alg = build(name, model, inner_lr=0.3)
        meta = alg.init_meta(torch.Generator().manual_seed(0))
        got = start_batch(alg, meta, tasks)
        for (f, loss, gnorm), t in zip(got, tasks):
            want_loss, want_g = _init_loss_and_grad(alg, meta, t)
            assert loss == pytest.approx(want_loss, rel=1e-5) and gnorm == pytest.approx(want_g, rel=1e-5)
            torch.testing.assert_close(f.reshape(f.shape[0], -1).double(), _embedding(alg, meta, t.support_x))
        f, loss, gnorm = start_batch(alg, meta, tasks, grad=False)[0]
        assert math.isnan(gnorm) and loss == pytest.approx(got[0][1])
        states = [s for s, _ in guarded_adapt_batch(alg, meta, tasks, 3)]
        for e, s, t in zip(embed_batch(alg, meta, states, [t.support_x for t in tasks]), states, tasks):
            torch.testing.assert_close(e, alg.embed(meta, s.params, t.support_x, s.step), rtol=1e-5, atol=1e-6)


def test_per_task_meta_states_match_the_loop():
    # One meta state per task (memory warm starts: overlays of one meta with other heads).
    from agent.compute import overlay

    alg = build("maml", mlp(), inner_lr=0.05)
    meta = alg.init_meta(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(5)
    tasks = sine_tasks(7, seed=6)
    metas = [overlay(meta, {"head.weight": torch.randn(1, 40, generator=g) * 0.3, "head.bias": torch.randn(1, generator=g)})
             for _ in tasks[:-2]] + [meta, meta]
    limits = [0, 1, 3, 5, 5, 2, 5]
    got = guarded_adapt_batch(alg, metas, tasks, limits, min_steps=0)
    want = [guarded_adapt(alg, m, t, lim, min_steps=0) for m, t, lim in zip(metas, tasks, limits)]
    assert any(tr.backtracks for _, tr in want)
    for (s, tr), (s0, tr0) in zip(got, want):
        for f in EXACT:
            assert getattr(tr, f) == getattr(tr0, f), f
        assert tr.losses == pytest.approx(tr0.losses, rel=1e-4, abs=1e-6)
        assert tr.best_loss == pytest.approx(tr0.best_loss, rel=1e-4, abs=1e-6)
        for k in s0.params:
            torch.testing.assert_close(s.params[k], s0.params[k], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="meta has 2 entries for 7 tasks"):
        guarded_adapt_batch(alg, metas[:2], tasks, 3)


def test_start_loss_batch_matches_support_loss_at_the_start():
    from agent.compute import overlay

    alg = build("maml", mlp(), inner_lr=0.05)
    meta = alg.init_meta(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(8)
    tasks = sine_tasks(5, seed=9) + sine_tasks(2, k=6, seed=10)  # two shapes
    metas = [overlay(meta, {"head.bias": torch.randn(1, generator=g)}) for _ in tasks]
    got = batch.start_loss_batch(alg, metas, tasks)
    with torch.no_grad():
        want = [float(alg.support_loss(m, alg.start(m, t), t)) for m, t in zip(metas, tasks)]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert len(set(want)) == len(want)
    assert batch.start_loss_batch(alg, meta, tasks[:2]) == pytest.approx(
        [float(alg.support_loss(meta, alg.start(meta, t), t).detach()) for t in tasks[:2]], rel=1e-5)


def test_agent_batched_warm_starts_equal_the_per_task_warm_starts(monkeypatch):
    # An agent whose memory holds earlier tasks: the batched warm-start screening and adaptation
    # (Agent._warm_select_batch) answers every task as the per-task Agent._adapt(first=...) does.
    import numpy as np

    from agent.agent import Agent
    from agent.task import Task

    cfg = {"model": {"arch": "mlp", "hidden": [16, 16]},
           "agent": {"in_shape": [1], "out_dim": 1, "arms": [{"algorithm": "maml", "inner_lr": 0.2, "budget": 1}]},
           "compute": {"levels": [[1, 1], [5, 1], [10, 2]], "rate_per_s": 1e9, "capacity": 1e9},
           "memory": {"enabled": True, "capacity": 100, "warm_start": "select"}, "online": {"enabled": False},
           "failure": {"enabled": False}, "drift": {"enabled": False}}
    rng = np.random.default_rng(3)
    funcs = [(rng.uniform(0.5, 5.0), rng.uniform(0, np.pi)) for _ in range(6)]

    def tasks(first, n):
        out = []
        for i in range(n):
            a, ph = funcs[i % len(funcs)]
            x, xq = rng.uniform(-5, 5, (10, 1)), rng.uniform(-5, 5, (8, 1))
            out.append(Task(f"t-{first + i}", "regression", x, a * np.sin(x - ph), xq, a * np.sin(xq - ph)))
        return out

    warmup, probe = tasks(0, 12), tasks(100, 12)
    batched, single = Agent.from_config(cfg), Agent.from_config(cfg)
    for ag in (batched, single):
        ag.step_many(warmup)
        assert len(ag.memory) == 12
    calls = []
    real = Agent._warm_select_batch
    monkeypatch.setattr(Agent, "_warm_select_batch", lambda self, *a: calls.append(1) or real(self, *a))
    got = batched.step_many(probe)
    assert calls

    def refuse(self, *a):
        raise RuntimeError("per-task path")

    monkeypatch.setattr(Agent, "_warm_select_batch", refuse)
    want = single.step_many(probe)  # falls back to Agent._adapt(first=...) task by task
    assert sum("warm_start" in o.flags for o in want) >= 3, "warm starts never won: the case is not covered"
    for a, b in zip(got, want):
        assert (a.id, a.inner_steps, a.flags, a.budget) == (b.id, b.inner_steps, b.flags, b.budget)
        np.testing.assert_allclose(np.asarray(a.predictions), np.asarray(b.predictions), rtol=1e-4, atol=1e-5)
    assert batched.counters == single.counters


def test_task_embeddings_match_task_embedding():
    import numpy as np

    from agent.memory import random_projection, task_embedding, task_embeddings
    from agent.nn.model import embed

    alg = build("maml", mlp(), inner_lr=0.05)
    meta = alg.init_meta(torch.Generator().manual_seed(0))
    params = {k[len("params."):]: v for k, v in meta.items() if k.startswith("params.")}
    tasks = sine_tasks(6, seed=2) + sine_tasks(3, k=5, seed=3)
    x = tasks[0].support_x
    tasks.append(TaskTensors(x, (x[:, 0] > 0).long(), x, None, "classification", 2))  # the per-task path
    tasks.append(TaskTensors(tasks[0].support_x, torch.zeros(10, 1), tasks[0].query_x, None, "regression"))  # y std 0
    with torch.no_grad():
        feats = [embed(alg.model, params, {}, t.support_x) if t.kind == "regression" else None for t in tasks]
    proj = random_projection(2 * 40 + 5, 32, seed=1)
    for projection in (None, proj):
        got = task_embeddings(alg, meta, tasks, projection=projection, features=feats)
        want = [task_embedding(alg, meta, t, projection=projection) for t in tasks]
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="features has 1 entries for 11 tasks"):
        task_embeddings(alg, meta, tasks, features=feats[:1])


@pytest.mark.parametrize("name", ["maml", "anil", "metasgd", "protonet"])
def test_start_batch_one_task_features_and_no_hook_left(name):
    # A task alone: the support features come from the loss's own forward pass (a hook on the
    # backbone) when it ran the backbone once on the support inputs, else from embed: either way
    # the numbers of _embedding, and the hook is gone afterwards.
    from agent.batch import start_batch
    from agent.online.features import _embedding, _init_loss_and_grad

    model = mlp(in_dim=2, out_dim=0 if name == "protonet" else 3, hidden=(8,))
    alg = build(name, model) if name == "protonet" else build(name, model, inner_lr=0.3)
    meta = alg.init_meta(torch.Generator().manual_seed(0))
    for t in blob_tasks(2, seed=21):
        for grad in (True, False):
            (f, loss, gnorm), = start_batch(alg, meta, [t], grad=grad)
            torch.testing.assert_close(f.reshape(f.shape[0], -1).double(), _embedding(alg, meta, t.support_x))
            want_loss, want_g = _init_loss_and_grad(alg, meta, t)
            assert loss == pytest.approx(want_loss, rel=1e-6)
            assert (gnorm == pytest.approx(want_g, rel=1e-6)) if grad else math.isnan(gnorm)
            assert not f.requires_grad
    assert not model.features._forward_hooks


@pytest.mark.parametrize("name", ["maml", "metasgd", "mamlpp", "anil", "imaml"])
def test_guard_start_from_the_features_pass_gives_the_same_adaptation(name):
    # The agent's features pass (start_one) computes the support loss and its gradient at the
    # meta-parameters; the guard's first step reuses them. Same trace and state, bit for bit,
    # with backtracking from the start state (a large step) and a plateau stop; algorithms
    # whose first step descends another objective get no start (and would ignore one).
    from agent.algorithms.base import plain_inner_loop
    from agent.batch import start_one

    alg = build(name, mlp(hidden=(16,)), inner_lr=2.0 if name != "imaml" else 0.5)
    meta = alg.init_meta(torch.Generator().manual_seed(3))
    backtracked = 0
    for t in sine_tasks(6, seed=31):
        f, loss, gnorm, start = start_one(alg, meta, t)
        assert (start is not None) == plain_inner_loop(alg) == (name in ("maml", "metasgd", "mamlpp"))
        if start is None:  # a gradient of another objective must be ignored: pass a wrong one
            start = ({k: torch.ones_like(v) for k, v in alg.params_of(meta).items()}, torch.tensor(loss))
        want_s, want = guarded_adapt(alg, meta, t, 6, patience=2, max_backtracks=3)
        got_s, got = guarded_adapt(alg, meta, t, 6, patience=2, max_backtracks=3, start=start)
        assert got.to_dict() == want.to_dict()
        assert got.losses[0] == loss
        for k in want_s.params:
            assert torch.equal(got_s.params[k], want_s.params[k]), k
        backtracked += want.backtracks
        # the gradient norm the features report is the norm of the reused gradient
        if plain_inner_loop(alg):
            assert gnorm == pytest.approx(math.sqrt(sum(float(g.double().pow(2).sum()) for g in start[0].values())))
    assert backtracked > 0  # the first step's retries reused the gradient too


def test_agent_one_task_reuses_the_start_gradient_and_answers_the_same(monkeypatch):
    # A task alone: one backward pass fewer per task (the guard's first step takes the features
    # pass's gradient), identical answers, traces and learning.
    import agent.agent as agent_module
    from agent.agent import Agent
    from agent.batch import start_one

    calls = {"n": 0}
    real_grad = torch.autograd.grad

    def counting_grad(*a, **k):
        calls["n"] += 1
        return real_grad(*a, **k)

    def run(reuse):
        monkeypatch.setattr(agent_module, "start_one",
                            start_one if reuse else (lambda *a, **k: start_one(*a, **k)[:3] + (None,)))
        monkeypatch.setattr(torch.autograd, "grad", counting_grad)
        calls["n"] = 0
        a = Agent.from_config({"agent": {"in_shape": [1], "out_dim": 1, "seed": 4, "micro_batch": 1},
                               "metrics": {"addr": "0"}})
        outs = [a.step(t).to_dict() for t in sine_records(25, seed=8)]
        monkeypatch.undo()
        return a, outs, calls["n"]

    plain, plain_out, plain_calls = run(False)
    reused, reused_out, reused_calls = run(True)
    strip = lambda d: {k: v for k, v in d.items() if k != "latency_ms"}  # noqa: E731
    assert [strip(d) for d in reused_out] == [strip(d) for d in plain_out]
    assert plain_calls - reused_calls == 25
    assert plain.status() == reused.status()
    for k in plain.meta:
        assert torch.equal(plain.meta[k], reused.meta[k])



def sine_records(n, seed):
    """``n`` labelled sinusoid tasks as the agent takes them (:class:`agent.task.Task`)."""
    from agent.task import Task

    return [Task(f"t{i}", "regression", t.support_x.numpy(), t.support_y.numpy(), t.query_x.numpy(), t.query_y.numpy())
            for i, t in enumerate(sine_tasks(n, seed=seed))]


@pytest.mark.parametrize("name", ["maml", "metasgd", "mamlpp", "anil"])
def test_batched_guard_reuses_start_batch_gradients_bit_for_bit(name):
    # start_batch(keep_start=True) differentiates the support loss with the parameters
    # unbatched, as the batched guard's steps from the shared start state do: passing its
    # gradients and losses changes nothing, to the last bit, backtracks included.
    from agent.algorithms.base import plain_inner_loop
    from agent.batch import start_batch

    alg = build(name, mlp(hidden=(40, 40)), inner_lr=1.5)
    meta = alg.init_meta(torch.Generator().manual_seed(1))
    tasks = sine_tasks(12, seed=5) + sine_tasks(3, k=6, seed=6)  # two shapes
    pre = start_batch(alg, meta, tasks, keep_start=True)
    assert [len(p) for p in pre] == [4] * len(tasks)
    starts = [p[3] for p in pre]
    assert all((s is not None) == plain_inner_loop(alg) for s in starts)
    with_starts = guarded_adapt_batch(alg, meta, tasks, [6] * 12 + [3] * 3, starts=starts)
    without = guarded_adapt_batch(alg, meta, tasks, [6] * 12 + [3] * 3)
    assert sum(tr.backtracks for _, tr in without) > 0
    for (s, tr), (s0, tr0) in zip(with_starts, without):
        assert tr.to_dict() == tr0.to_dict()
        assert all(torch.equal(s.params[k], s0.params[k]) for k in s0.params)
    # and the losses are the start_batch ones
    assert [tr.losses[0] for _, tr in without] == [p[1] for p in pre]
    # per-task meta states (memory warm starts) do not start from one state: starts are not used
    metas = [{k: v + 0.01 * i for k, v in meta.items()} for i in range(len(tasks))]
    got = guarded_adapt_batch(alg, metas, tasks, 4, starts=starts)
    want = guarded_adapt_batch(alg, metas, tasks, 4)
    assert [tr.to_dict() for _, tr in got] == [tr.to_dict() for _, tr in want]
    with pytest.raises(ValueError, match="starts has 2 entries for 15 tasks"):
        guarded_adapt_batch(alg, meta, tasks, 4, starts=starts[:2])


def test_agent_micro_batch_reuses_the_start_gradients_and_answers_the_same(monkeypatch):
    import agent.agent as agent_module
    from agent.agent import Agent
    from agent.batch import guarded_adapt_batch as real_batch, start_batch

    passed = []

    def spy(*a, **k):
        passed.extend(s is not None for s in k.get("starts") or [])
        return real_batch(*a, **k)

    def run(reuse):
        monkeypatch.setattr(agent_module, "guarded_adapt_batch", spy)
        if not reuse:
            monkeypatch.setattr(agent_module, "start_batch",
                                lambda *a, **k: [p[:3] for p in start_batch(*a, **{**k, "keep_start": False})])
        passed.clear()
        a = Agent.from_config({"agent": {"in_shape": [1], "out_dim": 1, "seed": 4, "micro_batch": 8},
                               "metrics": {"addr": "0"}})
        tasks = sine_records(24, seed=9)
        outs = [o.to_dict() for i in range(0, 24, 8) for o in a.step_many(tasks[i:i + 8])]
        monkeypatch.undo()
        return a, outs, list(passed)

    plain, plain_out, plain_passed = run(False)
    reused, reused_out, reused_passed = run(True)
    assert reused_passed and all(reused_passed) and not any(plain_passed)
    strip = lambda d: {k: v for k, v in d.items() if k != "latency_ms"}  # noqa: E731
    assert [strip(d) for d in reused_out] == [strip(d) for d in plain_out]
    assert plain.status() == reused.status()
