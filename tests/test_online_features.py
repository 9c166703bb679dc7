"""Task features: stable keys, finiteness, meaning of the geometry and probe features, memory; doctests."""

import doctest
import importlib
import math

import numpy as np
import pytest
import torch

from agent.algorithms import build
from agent.algorithms.base import TaskTensors
from agent.memory import MemoryBank, MemoryEntry, task_embedding
from agent.nn.mlp import MLPFeatures
from agent.nn.model import MetaModel
from agent.online.features import PRE_KEYS, PROBE_KEYS, finite, pre_features, probe_features


def _cls_task(sep, seed=0, ways=3, shots=5):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(ways).repeat_interleave(shots)
    centres = torch.randn(ways, 4, generator=g) * sep
    x = centres[y] + torch.randn(len(y), 4, generator=g)
    return TaskTensors(x, y, x, None)


def _alg(name="maml", out=3, din=4):
    alg = build(name, MetaModel(MLPFeatures(din, (16,)), 16, out), inner_lr=0.1) if name != "protonet" else \
        build(name, MetaModel(MLPFeatures(din, (16,)), 16, 0))
    return alg, alg.init_meta(torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["maml", "anil", "protonet"])
def test_keys_stable_and_finite(name):
    alg, meta = _alg(name)
    f = pre_features(alg, meta, _cls_task(2.0))
    p = probe_features(alg, meta, _cls_task(2.0), steps=2)
    assert tuple(f) == PRE_KEYS and tuple(p) == PROBE_KEYS
    assert all(isinstance(v, float) and math.isfinite(v) for v in {**f, **p}.values())


def test_separable_tasks_score_higher_geometry():
    alg, meta = _alg()
    easy = pre_features(alg, meta, _cls_task(6.0))
    hard = pre_features(alg, meta, _cls_task(0.1))
    assert easy["fisher_ratio"] > hard["fisher_ratio"] and easy["proto_margin"] > hard["proto_margin"]
    assert probe_features(alg, meta, _cls_task(6.0))["loo_score"] > probe_features(alg, meta, _cls_task(0.1))["loo_score"]
    imbalanced = TaskTensors(torch.randn(6, 4), torch.tensor([0, 0, 0, 0, 0, 1]), torch.randn(2, 4), None)
    assert pre_features(alg, meta, imbalanced)["class_balance"] < 0.7


def test_regression_probe_and_loo_proxy():
    alg = build("maml", MetaModel(MLPFeatures(1, (32,)), 32, 1), inner_lr=0.01)
    meta = alg.init_meta(torch.Generator().manual_seed(0))
    x = torch.linspace(-3, 3, 20).unsqueeze(1)
    smooth = TaskTensors(x, 0.5 * x, x, None, "regression")
    noise = TaskTensors(x, torch.randn(20, 1, generator=torch.Generator().manual_seed(1)), x, None, "regression")
    ps, pn = probe_features(alg, meta, smooth, steps=1), probe_features(alg, meta, noise, steps=1)
    assert ps["loo_nmse"] < pn["loo_nmse"] and ps["loo_score"] > pn["loo_score"]
    f = pre_features(alg, meta, smooth)
    assert f["is_classification"] == 0.0 and f["ridge_r2"] > 0.5 and f["init_grad_norm"] > 0


def test_nonfinite_meta_gives_sentinels_and_flag():
    alg, meta = _alg()
    bad = {k: v * float("nan") if v.is_floating_point() else v for k, v in meta.items()}
    f = pre_features(alg, bad, _cls_task(2.0))
    p = probe_features(alg, bad, _cls_task(2.0))
    assert f["nonfinite"] > 0 and p["probe_nonfinite"] > 0
    assert all(math.isfinite(v) for v in {**f, **p}.values())
    assert finite({"x": float("inf"), "y": -1e9}) == {"x": 0.0, "y": -1e6, "nonfinite": 1.0}


def test_memory_neighbours_and_outcomes():
    alg, meta = _alg()
    task = _cls_task(2.0)
    emb = task_embedding(alg, meta, task)
    bank = MemoryBank(capacity=8, dim=emb.shape[0], rng=np.random.default_rng(0))
    bank.add(MemoryEntry("same", emb, quality=0.4, failed=True))
    bank.add(MemoryEntry("far", -emb, quality=0.9, failed=False))
    bank.add(MemoryEntry("unknown", emb * 0.9 + 0.1))
    f = pre_features(alg, meta, task, bank, k=2)
    assert f["mem_size"] == 3.0 and f["mem_sim_max"] == pytest.approx(1.0, abs=1e-5)
    assert f["mem_quality_mean"] == pytest.approx(0.4) and f["mem_fail_rate"] == 1.0 and f["mem_missing"] == 0.0
    empty = pre_features(alg, meta, task, MemoryBank(capacity=2, dim=emb.shape[0]))
    assert empty["mem_missing"] == 1.0 and empty["mem_size"] == 0.0


@pytest.mark.parametrize("module", ["__init__", "features", "failure", "selector", "drift", "experiments", "persist"])
def test_online_doctests(module):
    mod = importlib.import_module("agent.online" if module == "__init__" else f"agent.online.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_import_is_silent():
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run([sys.executable, "-c", "import agent.online.features, agent.online.failure, agent.online.selector, "
                          "agent.online.drift, agent.online.experiments, agent.online.persist"],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    assert out.stdout == "" and out.stderr == ""


def test_init_loo_nmse_equals_explicit_leave_one_out_refits():
    # The hat-matrix shortcut must equal n explicit ridge refits, each without one support point.
    from agent.online.features import _embedding

    alg = build("maml", MetaModel(MLPFeatures(1, (8,)), 8, 1), inner_lr=0.01)
    meta = alg.init_meta(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(2)
    x = torch.rand(12, 1, generator=g) * 6 - 3
    y = torch.sin(x) + 0.1 * torch.randn(12, 1, generator=g)
    f = pre_features(alg, meta, TaskTensors(x, y, x, None, "regression"))
    with torch.no_grad():
        a = torch.cat([_embedding(alg, meta, x), torch.ones(12, 1, dtype=torch.float64)], 1)
    yd = y.double()
    lam = 1e-2 * float((a @ a.T).diagonal().mean()) + 1e-9
    errs = []
    for i in range(12):
        keep = torch.arange(12) != i
        ak, yk = a[keep], yd[keep]
        alpha = torch.linalg.solve(ak @ ak.T + lam * torch.eye(11, dtype=torch.float64), yk)  # kernel (dual) ridge
        errs.append(float((a[i] @ (ak.T @ alpha) - yd[i]) ** 2))
    expected = np.mean(errs) / float(yd.var(unbiased=False))
    assert f["init_loo_nmse"] == pytest.approx(expected, rel=1e-6)
    assert f["init_loo_score"] == pytest.approx(1 / (1 + expected), rel=1e-6)
    cls = pre_features(*_alg(), _cls_task(6.0))
    assert cls["init_loo_score"] == pytest.approx(1.0) and cls["init_loo_nmse"] == 0.0


def _reg_task(seed, n=10, din=1, dout=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, din, generator=g) * 6 - 3
    y = torch.sin(x.sum(1, keepdim=True)).repeat(1, dout) * (1 + seed) + 0.1 * torch.randn(n, dout, generator=g)
    return TaskTensors(x, y, x, None, "regression")


def test_batched_support_stats_and_probe_loo_equal_the_per_task_ones():
    # support_stats_many / loo_nmse_many batch the numpy work of pre_features / probe_features
    # over tasks of one shape: the same numbers, and None where a task is not batched.
    from agent.online.features import loo_nmse_many, support_stats_many

    alg = build("maml", MetaModel(MLPFeatures(1, (8,)), 8, 1), inner_lr=0.01)
    meta = alg.init_meta(torch.Generator().manual_seed(0))
    from agent.online.features import _embedding, _ridge

    cls = _cls_task(2.0)
    tasks = [_reg_task(s) for s in range(4)] + [_reg_task(7, n=6), _reg_task(8, n=6), _reg_task(9, n=1),
                                                _reg_task(10, dout=2), _reg_task(11),
                                                TaskTensors(cls.support_x[:, :1], cls.support_y, cls.support_x[:, :1], None)]

    with torch.no_grad():
        feats = [_embedding(alg, meta, t.support_x).float() for t in tasks]
    feats[3] = None  # no features: computed task by task
    stats = support_stats_many(tasks, feats)
    loos = loo_nmse_many(tasks, feats)
    batched = [i for i, s in enumerate(stats) if s is not None]
    assert batched == [0, 1, 2, 4, 5, 7, 8]  # not: no features (3), one example (6), classification (9)
    assert [i for i, v in enumerate(loos) if v is not None] == batched
    for i in batched:
        want = pre_features(alg, meta, tasks[i], features=feats[i], loss_and_grad=False)
        got = pre_features(alg, meta, tasks[i], features=None, loss_and_grad=False, stats=stats[i])
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-10, abs=1e-12), (i, k)
        assert loos[i] == pytest.approx(_ridge(feats[i].double(), tasks[i].support_y)["loo_nmse"], rel=1e-10)
        if tasks[i].support_y.shape[1] == 1:  # the model has one output
            p_want = probe_features(alg, meta, tasks[i], steps=1, features=feats[i])
            p_got = probe_features(alg, meta, tasks[i], steps=1, loo_nmse=loos[i])
            assert p_got == pytest.approx(p_want, rel=1e-10, abs=1e-12)


def test_support_statistics_match_a_torch_statement_of_their_definition():
    # pre_features computes these in float64 numpy; written out again in torch here.
    from agent.online.features import _embedding

    alg = build("maml", MetaModel(MLPFeatures(2, (8,)), 8, 1), inner_lr=0.01)
    meta = alg.init_meta(torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 2, generator=g) * 3
    y = x[:, :1] ** 2 + 0.1 * torch.randn(7, 1, generator=g)
    got = pre_features(alg, meta, TaskTensors(x, y, x, None, "regression"), loss_and_grad=False)
    with torch.no_grad():
        f = _embedding(alg, meta, x)
    xd, yd = x.double(), y.double()
    want = {"input_spread": float(xd.std(0, unbiased=False).mean()),
            "emb_spread": float((f - f.mean(0)).pow(2).sum(1).mean().sqrt()),
            "emb_norm": float(f.norm(dim=1).mean()), "target_std": float(yd.std(unbiased=False)),
            "dims": 2.0, "support_size": 7.0, "shots": 7.0}
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-12), k
