"""Test-time compute: budgets, token bucket, guarded adaptation, ensembles."""

import math

import numpy as np
import pytest
import torch

from agent.algorithms.base import Adapted, TaskTensors
from agent.algorithms.maml import MAML
from agent.compute import (
    AdaptTrace,
    Budget,
    BudgetLevels,
    TokenBucket,
    choose_budget,
    ensemble_predict,
    ensemble_weights,
    guarded_adapt,
    overlay,
    split_task,
)
from agent.nn.mlp import MLPFeatures
from agent.nn.model import MetaModel


def sine_task(g: torch.Generator, k: int = 5, nq: int = 50) -> TaskTensors:
    """Finn et al.'s sinusoid: amplitude U[0.1, 5], phase U[0, pi], x U[-5, 5]."""
    a = 0.1 + 4.9 * torch.rand((), generator=g)
    p = math.pi * torch.rand((), generator=g)
    x = 10 * torch.rand(k, 1, generator=g) - 5
    xq = 10 * torch.rand(nq, 1, generator=g) - 5
    return TaskTensors(x, a * torch.sin(x - p), xq, a * torch.sin(xq - p), "regression")


def blob_task(g: torch.Generator, centres: torch.Tensor, shots: int, nq: int = 12) -> TaskTensors:
    n_way = centres.shape[0]
    y = torch.arange(n_way).repeat_interleave(shots)
    yq = torch.arange(n_way).repeat(nq // n_way)
    x = centres[y] + 0.3 * torch.randn(len(y), centres.shape[1], generator=g)
    xq = centres[yq] + 0.3 * torch.randn(len(yq), centres.shape[1], generator=g)
    return TaskTensors(x, y, xq, yq, "classification", n_way)


def sine_maml(lr: float, seed: int = 0):
    maml = MAML(MetaModel(MLPFeatures(1, (40, 40)), 40, 1), inner_lr=lr)
    return maml, maml.init_meta(torch.Generator().manual_seed(seed))


def support(alg, meta, state, task) -> float:
    with torch.no_grad():
        return float(alg.support_loss(meta, state, task))


# ---------------------------------------------------------------------------------------------
# Budgets and the token bucket
# ---------------------------------------------------------------------------------------------
def test_budget_validation():
    assert Budget(0, 1).units == 0
    for bad in [(-1, 1), (1, 0), (1.5, 1), (True, 1)]:
        with pytest.raises(ValueError):
            Budget(*bad)


def test_budget_levels_from_config_and_errors():
    levels = BudgetLevels.from_config([[1, 1], {"steps": 5}, Budget(10, 3)])
    assert [b.units for b in levels.levels] == [1, 5, 30]
    assert BudgetLevels.from_config(levels.to_config()) == levels
    with pytest.raises(ValueError):
        BudgetLevels.from_config([[10, 1], [1, 1]])  # not ordered by cost
    with pytest.raises(ValueError):
        BudgetLevels.from_config([{"steps": 1, "memebers": 2}])
    with pytest.raises(ValueError):
        BudgetLevels.from_config({"levels": [[1, 1], [2, 1]], "thresholds": [0.5, 0.7]})
    with pytest.raises(ValueError):
        BudgetLevels.from_config({"levels": [[1, 1]], "extra": 1})
    with pytest.raises(ValueError):
        BudgetLevels.from_config([])


def test_choose_budget_monotone_and_capped():
    levels = BudgetLevels.from_config({"levels": [[1, 1], [5, 1], [10, 3]], "thresholds": [0.2, 0.6]})
    picked = [choose_budget(d, levels, 1e9).level for d in [0.0, 0.1, 0.2, 0.5, 0.6, 0.99, 1.0, 7.0, -1.0]]
    assert picked == [0, 0, 1, 1, 2, 2, 2, 2, 0]
    assert choose_budget(float("nan"), levels, 1e9).level == 2  # unknown difficulty: spend what is allowed
    c = choose_budget(0.9, levels, 29.9)
    assert (c.level, c.wanted, c.capped) == (1, 2, True)
    c = choose_budget(0.9, levels, -5.0)  # bucket in debt: the cheapest level is still granted
    assert (c.level, c.capped) == (0, True)
    assert choose_budget(0.0, levels, 0.0, min_level=1).level == 1
    with pytest.raises(ValueError):
        choose_budget(0.5, levels, 10, min_level=3)


def test_token_bucket_with_fake_clock():
    now = [100.0]
    b = TokenBucket(rate_per_s=4.0, capacity=10.0, clock=lambda: now[0])
    assert b.available() == 10.0
    assert b.try_take(6) and not b.try_take(5)
    assert b.available() == 4.0
    now[0] += 0.5
    assert b.available() == 6.0
    now[0] += 100
    assert b.available() == 10.0  # capped
    b.take(13)
    assert b.available() == -3.0 and not b.try_take(0.5)
    b.refund(100)
    assert b.available() == 10.0
    now[0] -= 50  # a clock that steps back never removes tokens
    assert b.available() == 10.0
    for bad in [-1, float("nan"), float("inf")]:
        with pytest.raises(ValueError):
            b.take(bad)
    with pytest.raises(ValueError):
        TokenBucket(-1, 10)
    with pytest.raises(ValueError):
        TokenBucket(1, 0)


def test_token_bucket_state_round_trip():
    now = [0.0]
    b = TokenBucket(2.0, 8.0, clock=lambda: now[0])
    b.take(5)
    state = b.state_dict()
    assert state == {"rate_per_s": 2.0, "capacity": 8.0, "tokens": 3.0}
    later = [1000.0]
    c = TokenBucket.from_state_dict(state, clock=lambda: later[0])
    assert c.available() == 3.0  # downtime earns nothing
    later[0] += 1
    assert c.available() == 5.0


# ---------------------------------------------------------------------------------------------
# The shipped adaptive policy: difficulty ranking, config, the agent's budget choice
# ---------------------------------------------------------------------------------------------
def test_difficulty_is_the_mid_rank_ecdf_of_the_window():
    from scipy.stats import percentileofscore

    from agent.agent import Difficulty

    rng = np.random.default_rng(0)
    values = rng.lognormal(size=60).round(1)  # ties included
    d = Difficulty(window=25, warmup=5)
    for i, v in enumerate(values):
        window = values[max(0, i - 25):i]
        got = d.update(float(v))
        want = 0.5 if i < 5 else percentileofscore(window, v, kind="mean") / 100
        assert got == pytest.approx(want, abs=1e-12), i
    assert d.estimate(float("inf")) == 1.0 and d.estimate(float("nan")) == 1.0
    n = len(d._recent["regression"])
    d.update(float("nan"))  # non-finite signals are not ranked against later tasks
    assert len(d._recent["regression"]) == n == 25


def test_difficulty_signal_kinds_and_state():
    from agent.agent import Difficulty

    d = Difficulty(window=10, warmup=3)
    for v in (1.0, 2.0, 3.0, 4.0):
        d.update({"init_loss": v, "norm_init_loss": 1.0, "n_way": 0.0})
    # classification is ranked on its own: still in warm-up though four regression tasks were seen
    assert d.estimate({"init_loss": 9.0, "norm_init_loss": 1.0, "n_way": 5.0}) == 0.5
    for n_way in (2, 5, 10):  # the loss at chance, log(n_way), is the same signal for any ways
        d.update({"init_loss": math.log(n_way), "norm_init_loss": 1.0, "n_way": float(n_way)})
    assert d._recent["classification"] == pytest.approx([1.0, 1.0, 1.0])
    assert d.estimate(2.5) == pytest.approx(0.5)  # regression: 2 of 4 below
    norm = Difficulty("norm_init_loss", window=10, warmup=0)
    assert norm.value({"init_loss": 8.0, "norm_init_loss": 0.5, "n_way": 0.0}) == ("regression", 0.5)
    # state round trip; a state of another signal, or the old running-moments format, is dropped
    e = Difficulty(window=10, warmup=3)
    e.load_state_dict(d.state_dict())
    assert e.estimate(2.5) == d.estimate(2.5) and e._seen == d._seen
    norm.load_state_dict(d.state_dict())
    assert norm._recent == {}
    e.load_state_dict({"n": 40, "mean": 0.1, "var": 1.0})
    assert e.estimate(2.5) == 0.5
    with pytest.raises(ValueError, match="signal"):
        Difficulty("loss")


def test_compute_config_builds_levels_and_guard():
    from agent.config import ComputeConfig, Config, ConfigError

    cc = Config.from_dict({"compute": {"levels": [[2], [4, 1], [9, 2]], "thresholds": [0.2, 0.9],
                                       "min_rel_improvement": 0.05, "patience": 3}}).compute
    levels = cc.budget_levels()
    assert levels.levels == (Budget(2), Budget(4), Budget(9, 2)) and levels.thresholds == (0.2, 0.9)
    assert cc.guard_kwargs() == {"patience": 3, "min_rel_improvement": 0.05, "max_backtracks": 4}
    shipped = ComputeConfig()
    assert [b.steps for b in shipped.budget_levels().levels] == [5, 7, 12] and shipped.thresholds is None
    assert shipped.difficulty == "init_loss" and shipped.budget_by == "difficulty"
    with pytest.raises(ConfigError, match="compute.levels"):
        Config.from_dict({"compute": {"levels": [[1], [5]], "thresholds": [0.2, 0.5]}})
    with pytest.raises(ConfigError, match="compute.difficulty"):
        Config.from_dict({"compute": {"difficulty": "variance"}})
    with pytest.raises(ConfigError, match="compute.min_rel_improvement"):
        Config.from_dict({"compute": {"min_rel_improvement": -0.1}})


def test_shipped_demo_config_is_the_default_compute_section():
    from pathlib import Path

    from agent.config import ComputeConfig, load

    demo = load(Path(__file__).resolve().parents[1] / "agent" / "configs" / "demo.yaml").compute
    assert demo == ComputeConfig()


def _agent_budgets(amplitudes, **compute):
    from agent.agent import Agent
    from agent.task import Task

    cfg = {"model": {"arch": "mlp", "hidden": [16, 16]}, "agent": {"in_shape": [1], "out_dim": 1},
           "compute": {"levels": [[1, 1], [3, 1]], "difficulty_warmup": 4, "min_rel_improvement": 0.0, **compute},
           "memory": {"enabled": False}, "online": {"enabled": False}, "failure": {"enabled": False}}
    agent = Agent.from_config(cfg)
    rng = np.random.default_rng(0)
    budgets = []
    for i, a in enumerate(amplitudes):
        x, q = rng.uniform(-5, 5, (10, 1)), rng.uniform(-5, 5, (5, 1))
        budgets.append(agent.step(Task(f"t{i}", "regression", x, a * np.sin(x), q, a * np.sin(q))).budget["steps"])
    return budgets


def test_agent_spends_more_steps_on_large_absolute_losses():
    """After warm-up the top level goes to the tasks with the largest initial loss (large
    amplitudes). Ranking the variance-normalised loss instead does not follow the amplitude."""
    warm = [0.5, 1.0, 2.0, 4.0]
    budgets = _agent_budgets(warm + [0.2, 5.0, 0.3, 4.5])
    assert budgets[:4] == [3, 3, 3, 3]  # warm-up: difficulty 0.5 -> the upper of two levels
    assert budgets[4:] == [1, 3, 1, 3]
    assert _agent_budgets(warm + [0.2, 5.0, 0.3, 4.5], difficulty="norm_init_loss")[4:] != [1, 3, 1, 3]


def test_agent_budget_equals_the_policy_pieces():
    """The agent's per-task budget is exactly task_features -> Difficulty -> choose_budget (what
    bench/compute_scaling.py's agent row calls)."""
    from agent.agent import Agent, Difficulty, task_features
    from agent.algorithms.base import TaskTensors as TT
    from agent.task import Task

    cfg = {"model": {"arch": "mlp", "hidden": [16, 16]}, "agent": {"in_shape": [1], "out_dim": 1},
           "compute": {"difficulty_warmup": 3}, "memory": {"enabled": False}, "online": {"enabled": False},
           "failure": {"enabled": False}}
    agent = Agent.from_config(cfg)
    cc = agent.config.compute
    diff, levels = Difficulty.from_config(cc), cc.budget_levels()
    alg, meta = agent.algorithms[0], agent.meta
    rng = np.random.default_rng(3)
    for i in range(12):
        a = rng.uniform(0.1, 5)
        x, q = rng.uniform(-5, 5, (8, 1)), rng.uniform(-5, 5, (4, 1))
        tt = TT(torch.tensor(x, dtype=torch.float32), torch.tensor(a * np.sin(x), dtype=torch.float32),
                torch.tensor(q, dtype=torch.float32), None, "regression")
        want = choose_budget(diff.update(task_features(alg, meta, tt)), levels, math.inf).budget
        got = agent.step(Task(f"t{i}", "regression", x, a * np.sin(x), q)).budget
        assert got == want.to_dict(), i


def test_plateau_rule_only_truncates_the_trajectory():
    """guarded_adapt(m, rule) = guarded_adapt(M, rule) when that run accepted fewer than m steps,
    else guarded_adapt(m, min_rel_improvement=0): the identity bench/compute_scaling.py scores
    its calibration grid with. Checked with backtracking (too large an lr) and without."""
    g = torch.Generator().manual_seed(5)
    for lr in (0.02, 0.3):
        maml, meta = sine_maml(lr)
        for _ in range(3):
            task = sine_task(g, k=5)
            for min_rel, patience in ((1e-3, 2), (0.05, 1), (0.1, 2)):
                long_state, long_trace = guarded_adapt(maml, meta, task, 12, min_rel_improvement=min_rel, patience=patience)
                for m in (1, 2, 3, 5, 8, 12):
                    state, trace = guarded_adapt(maml, meta, task, m, min_rel_improvement=min_rel, patience=patience)
                    if m > long_trace.steps or m == 12:
                        ref_state, ref = long_state, long_trace
                    else:
                        ref_state, ref = guarded_adapt(maml, meta, task, m, min_rel_improvement=0.0)
                    assert (trace.step_calls, trace.best_step, trace.best_loss) == (ref.step_calls, ref.best_step, ref.best_loss)
                    assert all(torch.equal(state.params[k], ref_state.params[k]) for k in state.params)


# ---------------------------------------------------------------------------------------------
# Guarded adaptation
# ---------------------------------------------------------------------------------------------
def test_guard_never_nan_never_worse_than_one_step():
    """The property from notes/anchors.md §1.1, with an inner lr large enough that plain 10-step
    adaptation diverges on a sizeable share of K=5 sinusoid tasks."""
    maml, meta = sine_maml(lr=0.2)
    g = torch.Generator().manual_seed(1)
    n, plain_bad, plain_worse = 120, 0, 0
    for i in range(n):
        task = sine_task(g)
        one = support(maml, meta, maml.adapt(meta, task, 1), task)
        ten = support(maml, meta, maml.adapt(meta, task, 10), task)
        plain_bad += not math.isfinite(ten)
        plain_worse += not ten <= one
        state, trace = guarded_adapt(maml, meta, task, 10)
        got = support(maml, meta, state, task)
        assert math.isfinite(got), i
        assert got <= one, (i, got, one)
        assert got == trace.best_loss
        assert all(math.isfinite(v) for v in trace.losses)
        assert trace.losses == sorted(trace.losses, reverse=True)  # accepted steps only descend
        assert trace.steps == len(trace.losses) - 1 <= 10
        assert trace.steps + trace.backtracks <= trace.step_calls <= trace.steps + trace.backtracks + 1
    # The scenario is real: plain multi-step adaptation blows up on a good share of the tasks.
    assert plain_bad >= n // 20 and plain_worse >= n // 10, (plain_bad, plain_worse)


@pytest.mark.parametrize("holdout", [0.4, "loo"])
def test_guard_with_holdout_keeps_the_invariant(holdout):
    maml, meta = sine_maml(lr=0.2)
    g = torch.Generator().manual_seed(2)
    for i in range(25):
        task = sine_task(g, k=6)
        one = support(maml, meta, maml.adapt(meta, task, 1), task)
        state, trace = guarded_adapt(maml, meta, task, 8, holdout=holdout, generator=torch.Generator().manual_seed(i))
        got = support(maml, meta, state, task)
        assert math.isfinite(got) and got <= one
        assert trace.holdout == ("loo" if holdout == "loo" else "split")
        assert trace.holdout_loss is not None and trace.holdout_loss == min(trace.holdout_losses[1:])
        assert 1 <= trace.best_step <= 8


def test_guard_with_a_sane_lr_takes_steps_and_improves():
    maml, meta = sine_maml(lr=0.01)
    task = sine_task(torch.Generator().manual_seed(3), k=10)
    one = support(maml, meta, maml.adapt(meta, task, 1), task)
    state, trace = guarded_adapt(maml, meta, task, 20, min_rel_improvement=0.0)
    assert trace.steps == 20 and trace.backtracks == 0 and not trace.early_stopped and not trace.diverged
    assert state.step == 20 and trace.best_loss < one
    # Plateau rule: demanding 50% improvement per step stops after `patience` flat steps.
    _, trace = guarded_adapt(maml, meta, task, 20, patience=2, min_rel_improvement=0.5)
    assert trace.early_stopped and trace.steps == 2


def test_guard_edge_cases():
    maml, meta = sine_maml(lr=0.2)
    task = sine_task(torch.Generator().manual_seed(4))
    state, trace = guarded_adapt(maml, meta, task, 0)
    assert state.step == 0 and trace.steps == 0 and trace.step_calls == 0
    # Without backtracking the best state is still kept, and a non-finite step stops adaptation.
    g = torch.Generator().manual_seed(5)
    for _ in range(30):
        task = sine_task(g)
        one = support(maml, meta, maml.adapt(meta, task, 1), task)
        state, trace = guarded_adapt(maml, meta, task, 10, backtrack=False)
        assert trace.backtracks == 0 and support(maml, meta, state, task) <= one
    # min_steps=0 lets the start state win when every step hurts.
    huge, meta2 = sine_maml(lr=1e4)
    state, trace = guarded_adapt(huge, meta2, task, 3, min_steps=0, max_backtracks=0)
    assert state.step == 0 and trace.best_loss == trace.losses[0]
    with pytest.raises(ValueError):
        guarded_adapt(maml, meta, task, -1)


def test_guard_all_steps_non_finite_falls_back_to_start():
    class Exploding(MAML):
        def step(self, meta, state, task, **kw):
            return Adapted({n: torch.full_like(p, float("nan")) for n, p in state.params.items()}, {}, state.step + 1)

    alg = Exploding(MetaModel(MLPFeatures(1, (8,)), 8, 1))
    meta = alg.init_meta(torch.Generator().manual_seed(0))
    task = sine_task(torch.Generator().manual_seed(0))
    state, trace = guarded_adapt(alg, meta, task, 5, max_backtracks=2)
    assert state.step == 0 and trace.diverged and trace.early_stopped
    assert trace.step_calls == 3 and trace.backtracks == 2 and math.isfinite(trace.best_loss)


def test_non_iterative_algorithm_returns_closed_form():
    class ClosedForm(MAML):
        iterative = False

        def adapt(self, meta, task, steps=None, **kw):
            return Adapted(self.params_of(meta), {"closed": torch.ones(1)}, 0)

    alg = ClosedForm(MetaModel(MLPFeatures(1, (8,)), 8, 1))
    meta = alg.init_meta(torch.Generator().manual_seed(0))
    task = sine_task(torch.Generator().manual_seed(0))
    state, trace = guarded_adapt(alg, meta, task, 10)
    assert "closed" in state.extras and trace.steps == 0 and trace.step_calls == 0
    _, trace = guarded_adapt(alg, meta, task, 10, holdout="loo")
    assert trace.holdout == "loo" and math.isfinite(trace.holdout_loss)


def test_split_task():
    y = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    task = TaskTensors(torch.arange(7.0).unsqueeze(1), y, torch.zeros(2, 1), None)
    fit, held = split_task(task, 0.5, torch.Generator().manual_seed(0))
    assert sorted(fit.support_y.tolist() + held.support_y.tolist()) == y.tolist()
    assert set(fit.support_y.tolist()) == {0, 1, 2}  # no class lost
    assert held.support_y.tolist().count(2) == 0 and held.n_way == fit.n_way == 3
    again = split_task(task, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(again[1].support_x, held.support_x)
    reg = TaskTensors(torch.arange(5.0).unsqueeze(1), torch.arange(5.0), torch.zeros(1, 1), None, "regression")
    fit, held = split_task(reg, 0.2)
    assert fit.support_x.shape[0] == 4 and held.support_x.shape[0] == 1
    one_shot = TaskTensors(torch.zeros(3, 1), torch.arange(3), torch.zeros(1, 1), None)
    assert split_task(one_shot, 0.5) is None
    with pytest.raises(ValueError):
        split_task(reg, 1.0)


# ---------------------------------------------------------------------------------------------
# Ensembles
# ---------------------------------------------------------------------------------------------
def test_ensemble_weights():
    w = ensemble_weights([0.1, 0.2, float("nan"), float("inf")])
    assert w.tolist()[2:] == [0.0, 0.0] and abs(float(w.sum()) - 1) < 1e-12 and w[0] > w[1]
    w = ensemble_weights([1.0, 2.0], "softmax", temperature=0.5)
    assert torch.allclose(w, torch.softmax(torch.tensor([-2.0, -4.0], dtype=torch.float64), 0))
    assert ensemble_weights([float("nan")] * 4).tolist() == [0.25] * 4
    with pytest.raises(ValueError):
        ensemble_weights([1.0], "mean")


def test_overlay():
    maml, meta = sine_maml(lr=0.01)
    head = {"head.bias": torch.tensor([7.0])}
    out = overlay(meta, head)
    assert float(out["params.head.bias"].detach()) == 7.0 and float(meta["params.head.bias"].detach()) == 0.0
    assert out["params.head.weight"] is meta["params.head.weight"]
    assert out["params.head.bias"].requires_grad
    assert overlay(meta, None) is meta
    adapted = maml.adapt(meta, sine_task(torch.Generator().manual_seed(0)), 1)
    assert torch.equal(overlay(meta, adapted)["params.head.weight"], adapted.params["head.weight"])
    with pytest.raises(KeyError):
        overlay(meta, {"nope": torch.zeros(1)})


def _fitted(alg, meta, task, steps):
    state = alg.start(meta, task)
    for _ in range(steps):
        state = alg.step(meta, state, task)
    return state


def test_ensemble_regression_weights_the_good_member():
    maml, meta = sine_maml(lr=0.01)
    g = torch.Generator().manual_seed(6)
    a, p = 2.0, 0.5
    x = 10 * torch.rand(60, 1, generator=g) - 5
    rich = TaskTensors(x, a * torch.sin(x - p), x, None, "regression")
    good = _fitted(MAML(maml.model, inner_lr=0.05), meta, rich, 300)  # a past task, same function
    bad = {"head.weight": meta["params.head.weight"] * 40 + 3}
    xs = 10 * torch.rand(8, 1, generator=g) - 5
    xq = torch.linspace(-5, 5, 30).unsqueeze(1)
    task = TaskTensors(xs, a * torch.sin(xs - p), xq, a * torch.sin(xq - p), "regression")
    out = ensemble_predict(maml, meta, task, [good, bad], max_steps=5, holdout=0.25)
    assert out.weights[0] > 0.95 and out.best == 0
    assert abs(float(out.weights.sum()) - 1) < 1e-12
    preds = [maml.predict(overlay(meta, i), s, xq).double().detach() for i, s in zip([good, bad], out.members)]
    mean = out.weights[0] * preds[0] + out.weights[1] * preds[1]
    assert torch.allclose(out.prediction, mean)
    assert out.spread.shape == out.prediction.shape and bool((out.spread >= 0).all())
    assert out.confidence.shape == (30,) and bool(((out.confidence > 0) & (out.confidence <= 1)).all())
    assert out.step_calls == sum(t.step_calls for t in out.traces) > 0
    # The ensemble is about as good as its good member on the query set.
    q = lambda pred: float(((pred - task.query_y.double()) ** 2).mean())  # noqa: E731
    assert q(out.prediction) < 1.2 * q(preds[0]) and q(preds[0]) < q(preds[1])


def test_ensemble_classification_averages_probabilities():
    model = MetaModel(MLPFeatures(2, (16,)), 16, 3)
    maml = MAML(model, inner_lr=0.1)
    meta = maml.init_meta(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(7)
    centres = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0]])
    past = blob_task(g, centres, shots=30)
    good = _fitted(maml, meta, past, 100)
    bad = {"head.weight": -30 * good.params["head.weight"], "head.bias": -30 * good.params["head.bias"]}
    task = blob_task(g, centres, shots=4)
    out = ensemble_predict(maml, meta, task, [None, good, bad], max_steps=3, holdout="loo")
    assert out.prediction.shape == (12, 3)
    assert torch.allclose(out.prediction.sum(1), torch.ones(12, dtype=torch.float64))
    assert out.weights[1] > out.weights[2] and out.weights[2] < 0.05
    assert torch.equal(out.confidence, out.prediction.max(1).values)
    logits = [maml.predict(overlay(meta, i), s, task.query_x).double().detach()
              for i, s in zip([None, good, bad], out.members)]
    w = out.weights[:, None, None]
    probs = (w * torch.stack([torch.softmax(z, 1) for z in logits])).sum(0)
    assert torch.allclose(out.prediction, probs)  # the mixture of the members' distributions...
    via_logits = torch.softmax((w * torch.stack(logits)).sum(0), 1)
    assert not torch.allclose(out.prediction, via_logits, atol=1e-3)  # ...not softmax of mean logits
    assert (out.prediction.argmax(1) == task.query_y).float().mean() >= 0.9


def test_ensemble_one_shot_falls_back_to_support_scores():
    model = MetaModel(MLPFeatures(2, (8,)), 8, 3)
    maml = MAML(model, inner_lr=0.1)
    meta = maml.init_meta(torch.Generator().manual_seed(0))
    task = blob_task(torch.Generator().manual_seed(8), torch.eye(3)[:, :2] * 3, shots=1, nq=6)
    out = ensemble_predict(maml, meta, task, [None], max_steps=2, holdout=0.5)
    assert out.traces[0].holdout == "none" and out.scores == [out.traces[0].best_loss]
    assert out.weights.tolist() == [1.0]


def test_ensemble_member_with_nan_output_gets_zero_weight():
    maml, meta = sine_maml(lr=0.01)
    task = sine_task(torch.Generator().manual_seed(9), k=8)
    nan_init = {"head.bias": torch.tensor([float("nan")])}
    out = ensemble_predict(maml, meta, task, [None, nan_init], max_steps=2)
    assert out.weights.tolist() == [1.0, 0.0] and bool(torch.isfinite(out.prediction).all())
    with pytest.raises(ValueError):
        ensemble_predict(maml, meta, task, [], max_steps=2)


def test_trace_is_plain_data():
    maml, meta = sine_maml(lr=0.01)
    _, trace = guarded_adapt(maml, meta, sine_task(torch.Generator().manual_seed(0)), 3)
    assert isinstance(trace, AdaptTrace) and set(trace.to_dict()) >= {"losses", "steps", "backtracks", "early_stopped", "diverged"}


@pytest.mark.parametrize("name", ["anil", "finetune"])
def test_holdout_scores_head_algorithms_on_the_held_out_inputs(name):
    # ANIL and the fine-tune head cache the support set's features in the adapted state; the
    # held-out curve must come from the held-out inputs, not from the fit part's cache (this
    # used to raise a shape error).
    from agent.algorithms import build
    from agent.compute import split_task

    model = MetaModel(MLPFeatures(1, (16,)), 16, 1)
    alg = build(name, model, inner_lr=0.05)
    meta = alg.init_meta(torch.Generator().manual_seed(0))
    task = sine_task(torch.Generator().manual_seed(4), k=10)
    state, trace = guarded_adapt(alg, meta, task, 4, holdout=0.3, generator=torch.Generator().manual_seed(1))
    assert trace.holdout == "split" and all(math.isfinite(v) for v in trace.holdout_losses)
    fit, held = split_task(task, 0.3, torch.Generator().manual_seed(1))
    start = alg.start(meta, fit)
    with torch.no_grad():
        expected = float(((alg.predict(meta, start, held.support_x) - held.support_y) ** 2).mean())
    assert trace.holdout_losses[0] == pytest.approx(expected, rel=1e-5)
