"""iMAML, Reptile, ProtoNet, fine-tuned heads (Baseline, Baseline++) and the ridge head.

Every meta-gradient is checked against an independent plain-autograd reference in
``reference.py`` and against central finite differences (float64, tiny MLPs).
"""

from __future__ import annotations

import doctest
import importlib
import math

import pytest
import torch
from torch import nn

from agent.algorithms import build
from agent.algorithms.base import TaskTensors
from agent.algorithms.heads import BaselinePlusPlus, FineTuneHead
from agent.algorithms.imaml import IMAML, conjugate_gradient
from agent.algorithms.maml import MAML
from agent.algorithms.protonet import ProtoNet, predictive_entropy
from agent.algorithms.reptile import Reptile
from agent.algorithms.ridge import RidgeHead, ridge_solve, with_bias_column
from agent.nn.mlp import MLPFeatures
from agent.nn.model import MetaModel

from reference import (fitted_head_by_hand, imaml_dense_gradient, loss_by_hand, mlp_by_hand, proximal_solution,
                       proximal_unrolled_gradient, prototype_logits_by_hand, reptile_direction_by_hand, ridge_primal)

DT = torch.float64
MODULES = ["imaml", "reptile", "protonet", "heads", "ridge"]


# -- fixtures -----------------------------------------------------------------------------------
def mlp(in_dim=2, hidden=(6,), out_dim=0):
    return MetaModel(MLPFeatures(in_dim, hidden), hidden[-1], out_dim, vmappable=True)


def regression_task(seed, n_support=6, n_query=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n_support + n_query, 1, generator=g, dtype=DT) * 4 - 2
    y = torch.sin(1.5 * x) + 0.3 * seed
    return TaskTensors(x[:n_support], y[:n_support], x[n_support:], y[n_support:], "regression")


def classification_task(seed, n_way=3, shots=3, queries=4, noise=0.6, in_dim=2):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_way, in_dim, generator=g, dtype=DT) * 2
    ys, yq = torch.arange(n_way).repeat(shots), torch.arange(n_way).repeat(queries)
    xs = centres[ys] + noise * torch.randn(len(ys), in_dim, generator=g, dtype=DT)
    xq = centres[yq] + noise * torch.randn(len(yq), in_dim, generator=g, dtype=DT)
    return TaskTensors(xs, ys, xq, yq, "classification", n_way)


def params(meta):
    return {n[len("params."):]: t for n, t in meta.items() if n.startswith("params.")}


def finite_difference(loss_of_meta, meta, name, index, eps=1e-6):
    def at(h):
        shifted = dict(meta)
        t = meta[name].detach().clone()
        t.view(-1)[index] += h
        shifted[name] = t.requires_grad_(meta[name].requires_grad)
        return float(loss_of_meta(shifted).detach())
    return (at(eps) - at(-eps)) / (2 * eps)


def check_fd(alg, meta, grads, tasks, entries=2, rtol=1e-5, atol=1e-7):
    """Central differences of the mean meta-loss on the first and last entries of each tensor."""
    loss = lambda m: sum(alg.meta_loss(m, t).detach() for t in tasks) / len(tasks)  # noqa: E731
    for name, g in grads.items():
        for index in sorted({0, g.numel() - 1})[:entries]:
            fd = finite_difference(loss, meta, name, index)
            assert fd == pytest.approx(float(g.reshape(-1)[index]), rel=rtol, abs=atol), (name, index)


def assert_close(a, b, rtol=1e-8, atol=1e-10):
    assert set(a) == set(b)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=rtol, atol=atol, msg=n)


def peak_live_saved_tensors(fn):
    """Peak number of tensors saved for backward and alive at once while ``fn`` runs."""
    live, peak = [0], [0]

    class Box:
        __slots__ = ("t",)

        def __init__(self, t):
            self.t = t
            live[0] += 1
            peak[0] = max(peak[0], live[0])

        def __del__(self):
            live[0] -= 1

    with torch.autograd.graph.saved_tensors_hooks(Box, lambda box: box.t):
        fn()
    return peak[0]


# -- iMAML --------------------------------------------------------------------------------------
IMAML_HYPER = dict(lam=5.0, inner_lr=0.15)  # G's curvature stays in ~[3, 11]: GD contracts by ~0.65 a step


def imaml_setup(steps, cg_steps=40, **kw):
    alg = IMAML(mlp(1, (5,), 1), inner_steps=steps, cg_steps=cg_steps, **{**IMAML_HYPER, **kw})
    meta = alg.init_meta(torch.Generator().manual_seed(3), DT)
    task = regression_task(1)
    support = lambda p: loss_by_hand("regression", mlp_by_hand(p, task.support_x), task.support_y)  # noqa: E731
    query = lambda p: loss_by_hand("regression", mlp_by_hand(p, task.query_x), task.query_y)  # noqa: E731
    return alg, meta, task, support, query


def test_conjugate_gradient_solves_spd_system():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g, dtype=DT)
    a, b = m @ m.T + 0.5 * torch.eye(6, dtype=DT), torch.randn(6, generator=g, dtype=DT)
    torch.testing.assert_close(conjugate_gradient(lambda v: a @ v, b, 6), torch.linalg.solve(a, b))


def test_imaml_matches_dense_implicit_gradient():
    alg, meta, task, support, query = imaml_setup(steps=200)
    loss, grads = alg.meta_gradient(meta, [task])
    phi = proximal_solution(params(meta), support, alg.lam, alg.inner_lr, 200)
    v, hess = imaml_dense_gradient(phi, support, query, alg.lam)
    assert torch.linalg.eigvalsh(torch.eye(len(hess), dtype=DT) + hess / alg.lam).min() > 0  # CG's operator is SPD
    assert loss == pytest.approx(float(query(phi).detach()), rel=1e-10)
    assert_close(grads, {f"params.{n}": t for n, t in v.items()}, rtol=1e-7, atol=1e-9)
    # damping and first order
    _, damped = IMAML(alg.model, inner_steps=200, cg_steps=40, cg_damping=0.3, **IMAML_HYPER).meta_gradient(meta, [task])
    v_damped, _ = imaml_dense_gradient(phi, support, query, alg.lam, damping=0.3)
    assert_close(damped, {f"params.{n}": t for n, t in v_damped.items()}, rtol=1e-7, atol=1e-9)
    _, fo = IMAML(alg.model, inner_steps=200, first_order=True, **IMAML_HYPER).meta_gradient(meta, [task])
    p = {n: t.clone().requires_grad_(True) for n, t in phi.items()}
    gq = dict(zip(p, torch.autograd.grad(query(p), list(p.values()))))
    assert_close(fo, {f"params.{n}": t for n, t in gq.items()})


def test_imaml_finite_differences_at_the_proximal_solution():
    alg, meta, task, support, query = imaml_setup(steps=200)
    _, grads = alg.meta_gradient(meta, [task])

    def query_at_solution(m):
        return query(proximal_solution(params(m), support, alg.lam, alg.inner_lr, 200))

    for name in ["params.features.layers.0.weight", "params.head.weight", "params.head.bias"]:
        for index in (0, grads[name].numel() - 1):
            fd = finite_difference(query_at_solution, meta, name, index)
            assert fd == pytest.approx(float(grads[name].reshape(-1)[index]), rel=1e-6, abs=1e-9), (name, index)


def test_imaml_approaches_unrolled_proximal_maml_as_steps_grow():
    errors = []
    for steps in (2, 10, 120):
        alg, meta, task, support, query = imaml_setup(steps=steps)
        _, grads = alg.meta_gradient(meta, [task])
        unrolled = proximal_unrolled_gradient(params(meta), support, query, alg.lam, alg.inner_lr, steps)
        diff = torch.cat([(grads[f"params.{n}"] - g).reshape(-1) for n, g in unrolled.items()]).norm()
        errors.append(float(diff / torch.cat([g.reshape(-1) for g in unrolled.values()]).norm()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-6, errors


def test_imaml_memory_is_flat_in_inner_steps():
    alg, meta, task, _, _ = imaml_setup(steps=5, cg_steps=5)
    few = peak_live_saved_tensors(lambda: IMAML(alg.model, inner_steps=5, cg_steps=5, **IMAML_HYPER).meta_gradient(meta, [task]))
    many = peak_live_saved_tensors(lambda: IMAML(alg.model, inner_steps=50, cg_steps=5, **IMAML_HYPER).meta_gradient(meta, [task]))
    assert many == few
    # the measurement does see graphs kept across steps: second-order MAML's grows with the steps
    maml = lambda k: MAML(alg.model, inner_lr=0.1, inner_steps=k).meta_gradient(meta, [task], use_vmap=False)  # noqa: E731
    assert peak_live_saved_tensors(lambda: maml(50)) > 5 * peak_live_saved_tensors(lambda: maml(5))


def test_imaml_meta_loss_is_a_surrogate_for_the_implicit_gradient():
    alg, meta, task, _, _ = imaml_setup(steps=30, cg_steps=10)
    loss, grads = alg.meta_gradient(meta, [task])
    surrogate = alg.meta_loss(meta, task)
    assert float(surrogate.detach()) == pytest.approx(loss, rel=1e-12)
    auto = torch.autograd.grad(surrogate, [meta[n] for n in grads])
    assert_close(grads, dict(zip(grads, auto)))


# -- Reptile ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_reptile_direction_is_theta_minus_phi(kind):
    if kind == "regression":
        model, tasks = mlp(1, (6,), 1), [regression_task(1), regression_task(2)]
    else:
        model, tasks = mlp(2, (6,), 3), [classification_task(1), classification_task(2)]
    alg = Reptile(model, inner_lr=0.2, inner_steps=4)
    meta = alg.init_meta(torch.Generator().manual_seed(0), DT)
    loss, grads = alg.meta_gradient(meta, tasks)
    by_hand = []
    for t in tasks:
        x, y = torch.cat([t.support_x, t.query_x]), torch.cat([t.support_y, t.query_y])
        by_hand.append(reptile_direction_by_hand(params(meta), lambda p: loss_by_hand(kind, mlp_by_hand(p, x), y), 0.2, 4))
    mean = {f"params.{n}": sum(d[n] for d in by_hand) / 2 for n in by_hand[0]}
    assert_close(grads, mean)
    assert loss == pytest.approx(sum(0.5 * sum(float((v ** 2).sum()) for v in d.values()) for d in by_hand) / 2, rel=1e-10)
    # an SGD step of size eps on this "gradient" is Reptile's interpolation towards phi
    eps = 0.3
    for n, g in grads.items():
        phi_mean = meta[n].detach() - mean[n]
        torch.testing.assert_close(meta[n].detach() - eps * g, meta[n].detach() + eps * (phi_mean - meta[n].detach()))
    # meta_loss is the surrogate ||theta - stopgrad(phi)||^2 / 2 with that gradient
    auto = torch.autograd.grad(alg.meta_loss(meta, tasks[0]), [meta[n] for n in grads])
    assert_close(dict(zip(grads, auto)), {f"params.{n}": v for n, v in by_hand[0].items()})


# -- ProtoNet -----------------------------------------------------------------------------------
class Identity(nn.Module):
    def forward(self, x, step=0):
        return x


def test_protonet_hand_computed_example():
    # class 0 at (0,0),(2,0): prototype (1,0); class 1 at (0,2),(0,4): prototype (0,3); query (2,1)
    xs = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 4.0]], dtype=DT)
    task = TaskTensors(xs, torch.tensor([0, 0, 1, 1]), torch.tensor([[2.0, 1.0]], dtype=DT), torch.tensor([1]))
    cases = {
        "sqeuclidean": [-(1 + 1) / 0.5, -(4 + 4) / 0.5],  # d = 2 and 8, tau = 0.5
        "cosine": [-(1 - 2 / math.sqrt(5)) / 0.5, -(1 - 1 / math.sqrt(5)) / 0.5],  # cos = 2/sqrt5 and 1/sqrt5
    }
    for distance, logits in cases.items():
        alg = ProtoNet(MetaModel(Identity(), 2, 0), distance=distance, temperature=0.5)
        meta = alg.init_meta(dtype=DT)
        state = alg.adapt(meta, task)
        torch.testing.assert_close(state.extras["prototypes"], torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=DT))
        out = alg.predict(meta, state, task.query_x)
        torch.testing.assert_close(out, torch.tensor([logits], dtype=DT))
        p1 = math.exp(logits[1]) / (math.exp(logits[0]) + math.exp(logits[1]))
        assert float(alg.meta_loss(meta, task).detach()) == pytest.approx(-math.log(p1), rel=1e-12)
        entropy = -(p1 * math.log(p1) + (1 - p1) * math.log(1 - p1))
        assert float(predictive_entropy(out.detach())[0]) == pytest.approx(entropy, rel=1e-12)


@pytest.mark.parametrize("distance", ["sqeuclidean", "cosine"])
def test_protonet_meta_gradient_matches_reference_and_fd(distance):
    alg = ProtoNet(mlp(2, (6,)), distance=distance)
    meta = alg.init_meta(torch.Generator().manual_seed(0), DT)
    tasks = [classification_task(1), classification_task(2)]
    loss, grads = alg.meta_gradient(meta, tasks, use_vmap=False)
    assert "log_temperature" in grads and not any(n.startswith("params.head") for n in meta)

    p = {n: t.detach().clone().requires_grad_(True) for n, t in params(meta).items()}
    log_t = meta["log_temperature"].detach().clone().requires_grad_(True)
    ref = sum(loss_by_hand("classification", prototype_logits_by_hand(
        mlp_by_hand(p, t.support_x), t.support_y, mlp_by_hand(p, t.query_x), 3, distance, log_t.exp()), t.query_y) for t in tasks) / 2
    ref_grads = torch.autograd.grad(ref, [*p.values(), log_t])
    assert loss == pytest.approx(float(ref.detach()), rel=1e-12)
    assert_close(grads, {**{f"params.{n}": g for n, g in zip(p, ref_grads)}, "log_temperature": ref_grads[-1]})
    check_fd(alg, meta, grads, tasks)


def test_protonet_entropy_drops_with_temperature_and_rejects_regression():
    alg = ProtoNet(mlp(2, (6,)))
    meta = alg.init_meta(torch.Generator().manual_seed(0), DT)
    task = classification_task(1)
    entropies = []
    for tau in (4.0, 1.0, 0.25):
        meta["log_temperature"] = torch.tensor(math.log(tau), dtype=DT)
        state = alg.adapt(meta, task)
        entropies.append(float(predictive_entropy(alg.predict(meta, state, task.query_x).detach()).mean()))
    assert entropies[0] > entropies[1] > entropies[2]
    assert not alg.iterative and alg.step(meta, state, task).extras["prototypes"] is state.extras["prototypes"]
    with pytest.raises(ValueError, match="classification"):
        alg.start(meta, regression_task(0))


# -- ridge head ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n,d", [(5, 9), (9, 5)])  # dual (Woodbury) and primal branches
def test_ridge_solve_equals_primal_normal_equations(n, d):
    g = torch.Generator().manual_seed(n)
    x, y = torch.randn(n, d, generator=g, dtype=DT), torch.randn(n, 3, generator=g, dtype=DT)
    torch.testing.assert_close(ridge_solve(x, y, 0.7), ridge_primal(x, y, 0.7), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_ridge_head_matches_reference_and_fd(kind):
    if kind == "classification":
        tasks, width = [classification_task(1), classification_task(2)], 3
    else:
        tasks, width = [regression_task(1), regression_task(2)], 1
    alg = RidgeHead(mlp(tasks[0].support_x.shape[1], (7,)), lam=0.5, scale=2.0, offset=0.1)
    meta = alg.init_meta(torch.Generator().manual_seed(0), DT)
    loss, grads = alg.meta_gradient(meta, tasks, use_vmap=False)
    assert sorted(n for n in grads if not n.startswith("params.")) == ["log_lambda", "log_scale", "offset"]

    p = {n: t.detach().clone().requires_grad_(True) for n, t in params(meta).items()}
    extra = {n: meta[n].detach().clone().requires_grad_(True) for n in ("log_lambda", "log_scale", "offset")}
    one = lambda e: torch.cat([e, torch.ones(len(e), 1, dtype=DT)], 1)  # noqa: E731
    ref = 0
    for t in tasks:
        y = torch.eye(width, dtype=DT)[t.support_y] if kind == "classification" else t.support_y
        w = ridge_primal(one(mlp_by_hand(p, t.support_x)), y, extra["log_lambda"].exp())
        out = extra["log_scale"].exp() * one(mlp_by_hand(p, t.query_x)) @ w + extra["offset"]
        ref = ref + loss_by_hand(kind, out, t.query_y) / 2
    ref_grads = torch.autograd.grad(ref, [*p.values(), *extra.values()])
    assert loss == pytest.approx(float(ref.detach()), rel=1e-10)
    assert_close(grads, dict(zip([f"params.{n}" for n in p] + list(extra), ref_grads)))
    check_fd(alg, meta, grads, tasks)
    # the adapted head is the primal ridge solution on the embedded support set
    state = alg.adapt(meta, tasks[0])
    y = torch.eye(width, dtype=DT)[tasks[0].support_y] if kind == "classification" else tasks[0].support_y
    x = with_bias_column(mlp_by_hand(params(meta), tasks[0].support_x))
    torch.testing.assert_close(state.extras["ridge_weight"], ridge_primal(x, y, 0.5), rtol=1e-10, atol=1e-12)


# -- fine-tuned heads ---------------------------------------------------------------------------
@pytest.mark.parametrize("which,kind", [("finetune", "regression"), ("finetune", "classification"),
                                        ("baselinepp", "classification")])
def test_head_meta_gradient_matches_reference_and_fd(which, kind):
    if kind == "regression":
        tasks, width = [regression_task(1), regression_task(2)], 1
    else:
        tasks, width = [classification_task(1), classification_task(2)], 3
    model = mlp(tasks[0].support_x.shape[1], (6,))
    alg = (FineTuneHead(model, inner_lr=0.3, inner_steps=3) if which == "finetune"
           else BaselinePlusPlus(model, inner_lr=0.3, inner_steps=3, scale=4.0))
    meta = alg.init_meta(torch.Generator().manual_seed(0), DT)
    loss, grads = alg.meta_gradient(meta, tasks, use_vmap=False)

    p = {n: t.detach().clone().requires_grad_(True) for n, t in params(meta).items()}
    inputs = list(p.values())
    scale = None
    if which == "baselinepp":
        scale = meta["log_scale"].detach().clone().requires_grad_(True)
        inputs.append(scale)
    ref = 0
    for t in tasks:
        head = fitted_head_by_hand(mlp_by_hand(p, t.support_x), t.support_y, kind, width, 0.3, 3,
                                   None if scale is None else scale.exp())
        ref = ref + loss_by_hand(kind, head(mlp_by_hand(p, t.query_x)), t.query_y) / 2
    ref_grads = torch.autograd.grad(ref, inputs)
    assert loss == pytest.approx(float(ref.detach()), rel=1e-10)
    assert_close(grads, dict(zip([f"params.{n}" for n in p] + (["log_scale"] if scale is not None else []), ref_grads)))
    check_fd(alg, meta, grads, tasks)


def test_finetune_first_order_ignores_the_support_path():
    task = classification_task(1)
    alg = FineTuneHead(mlp(2, (6,)), inner_lr=0.3, inner_steps=3, first_order=True)
    meta = alg.init_meta(torch.Generator().manual_seed(0), DT)
    _, grads = alg.meta_gradient(meta, [task])
    p = {n: t.detach().clone().requires_grad_(True) for n, t in params(meta).items()}
    head = fitted_head_by_hand(mlp_by_hand(p, task.support_x).detach(), task.support_y, "classification", 3, 0.3, 3)
    ref = loss_by_hand("classification", head(mlp_by_hand(p, task.query_x)), task.query_y)
    assert_close(grads, {f"params.{n}": g for n, g in zip(p, torch.autograd.grad(ref, list(p.values())))})


@pytest.mark.parametrize("which", ["finetune", "baselinepp"])
def test_head_support_accuracy_increases_with_steps(which):
    task = classification_task(7, n_way=4, shots=5, noise=1.2, in_dim=3)  # linearly separable in the features
    model = mlp(3, (32,))
    alg = FineTuneHead(model, inner_lr=1.0) if which == "finetune" else BaselinePlusPlus(model, inner_lr=1.0, scale=10.0)
    meta = alg.init_meta(torch.Generator().manual_seed(0), DT)
    accuracy = []
    for steps in (0, 10, 300):
        state = alg.adapt(meta, task, steps)
        accuracy.append(float((alg.predict(meta, state, task.support_x).argmax(1) == task.support_y).double().mean()))
    assert accuracy[0] < accuracy[1] <= accuracy[2] and accuracy[2] >= 0.9, accuracy
    # test-time steps move only the head and drop the graph to the features
    assert state.extras["support_emb"].grad_fn is None and state.params["head.weight"].grad_fn is None
    assert all(torch.equal(state.params[n], meta[f"params.{n}"]) for n in params(meta))
    assert alg.support_loss(meta, state, task) < alg.support_loss(meta, alg.start(meta, task), task)


# -- shared -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["protonet", "ridge", "finetune", "baselinepp"])
def test_vmap_matches_loop(name):
    alg = build(name, mlp(2, (6,)), **({"inner_steps": 2, "inner_lr": 0.3} if name in ("finetune", "baselinepp") else {}))
    meta = alg.init_meta(torch.Generator().manual_seed(0), DT)
    tasks = [classification_task(s) for s in range(3)]
    assert alg.can_vmap(tasks)
    a, b = alg.meta_gradient(meta, tasks, use_vmap=True), alg.meta_gradient(meta, tasks, use_vmap=False)
    assert a[0] == pytest.approx(b[0], rel=1e-12)
    assert_close(a[1], b[1])


def test_registry_and_flags():
    model = mlp(2, (6,))
    for name, cls in [("imaml", IMAML), ("reptile", Reptile), ("protonet", ProtoNet), ("finetune", FineTuneHead),
                      ("baselinepp", BaselinePlusPlus), ("ridge", RidgeHead)]:
        alg = build(name, model)
        assert type(alg) is cls and alg.name == name
    assert not ProtoNet.iterative and not RidgeHead.iterative and IMAML.iterative and Reptile.iterative
    assert ProtoNet.kinds == BaselinePlusPlus.kinds == frozenset({"classification"})
    assert not any(cls.needs_head for cls in (ProtoNet, RidgeHead, FineTuneHead, BaselinePlusPlus))  # built with out_dim=0
    assert not IMAML(model).can_vmap([classification_task(0)] * 2) and not Reptile(model).can_vmap([classification_task(0)] * 2)


@pytest.mark.parametrize("module", MODULES)
def test_doctests(module):
    result = doctest.testmod(importlib.import_module(f"agent.algorithms.{module}"))
    assert result.attempted > 0 and result.failed == 0
