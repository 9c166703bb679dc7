"""The gradient-based MAML family (MAML, FOMAML, MAML++, Meta-SGD, ANIL).

Meta-gradients are checked against the independent plain-autograd references in
``tests/reference.py`` and against central finite differences (float64), the vmap path against
the loop path, and the step-wise adaptation protocol against ``adapt``.
"""

from __future__ import annotations

import pytest
import torch

import reference as ref
from agent.algorithms import build
from agent.algorithms.base import Algorithm, TaskTensors, autograd_grad, func_grad
from agent.nn.mlp import MLPFeatures
from agent.nn.model import MetaModel

ALGS = ("maml", "fomaml", "mamlpp", "metasgd", "anil")
KINDS = ("classification", "regression")
DT = torch.float64
N_WAY = 3
# MAML++ schedule used in the tests: multi-step loss over the first half, first order for the
# first quarter. At progress 0.3 with 2 steps the weights are [0.2, 0.8] and the order is second.
PP = dict(msl_fraction=0.5, first_order_until=0.25)
PROGRESS = 0.3
PP_WEIGHTS = [0.2, 0.8]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def mlp(kind):
    return MetaModel(MLPFeatures(2, (6, 5)), 5, N_WAY if kind == "classification" else 1, vmappable=True)


def make_task(kind, seed, k=6, q=5):
    g = gen(seed)
    sx, qx = torch.randn(k, 2, generator=g, dtype=DT), torch.randn(q, 2, generator=g, dtype=DT)
    if kind == "classification":
        sy = torch.arange(k) % N_WAY
        qy = torch.randint(0, N_WAY, (q,), generator=g)
        return TaskTensors(sx, sy, qx, qy, kind, N_WAY)
    w = torch.randn(2, 1, generator=g, dtype=DT)
    return TaskTensors(sx, torch.sin(sx @ w), qx, torch.sin(qx @ w), kind)


def make(name, kind, steps=2, lr=0.3, model=None, **kw):
    """Algorithm, float64 meta state (learned rates randomised so that their layout matters), tasks."""
    if name == "mamlpp":
        kw = {**PP, **kw}
    alg = build(name, model if model is not None else mlp(kind), inner_lr=lr, inner_steps=steps, **kw)
    meta = alg.init_meta(gen(0), DT)
    g = gen(7)
    for key, value in meta.items():
        if key.startswith(("lr.", "lslr.")):
            with torch.no_grad():
                value.copy_(lr * (0.5 + torch.rand(value.shape, generator=g, dtype=DT)))
    return alg, meta, [make_task(kind, s) for s in (1, 2, 3)]


def leaves(meta, prefix):
    return {k[len(prefix):]: v.detach().clone().requires_grad_(True) for k, v in meta.items() if k.startswith(prefix)}


def reference_grads(name, alg, meta, tasks, forward=ref.mlp_forward, features=ref.mlp_features):
    """(loss, grads keyed like meta) from tests/reference.py."""
    params = leaves(meta, "params.")
    steps, lr = alg.inner_steps, alg.inner_lr
    if name in ("maml", "fomaml"):
        loss, g = ref.maml_meta_grad(forward, params, tasks, lr=lr, steps=steps, first_order=name == "fomaml")
        return loss, {"params." + n: v for n, v in g.items()}
    if name == "anil":
        loss, g = ref.anil_meta_grad(features, params, tasks, lr=lr, steps=steps)
        return loss, {"params." + n: v for n, v in g.items()}
    if name == "metasgd":
        return ref.metasgd_meta_grad(forward, params, leaves(meta, "lr."), tasks, steps=steps)
    if name == "mamlpp":
        return ref.mamlpp_meta_grad(forward, params, leaves(meta, "lslr."), tasks, steps=steps, weights=PP_WEIGHTS)
    raise AssertionError(name)


def assert_grads_close(got, want, rtol=1e-9, atol=1e-11):
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


# -- (1) against the plain-autograd references -------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ALGS)
def test_meta_gradient_matches_reference(name, kind):
    alg, meta, tasks = make(name, kind, steps=2)
    loss, grads = alg.meta_gradient(meta, tasks, progress=PROGRESS, use_vmap=False)
    want_loss, want = reference_grads(name, alg, meta, tasks)
    assert loss == pytest.approx(want_loss, rel=1e-12)
    assert_grads_close(grads, want)
    assert all(g.abs().sum() > 0 for g in grads.values())


def test_mamlpp_schedule_and_final_only_loss():
    alg, meta, tasks = make("mamlpp", "regression", steps=2)
    assert alg.step_weights(0.0) == [0.5, 0.5]
    assert alg.step_weights(PROGRESS) == pytest.approx(PP_WEIGHTS)
    assert alg.step_weights(0.5) is None and alg.step_weights(1.0) is None
    assert alg.first_order_at(0.2) and not alg.first_order_at(0.25)
    # after the MSL phase, second order on the last step only
    _, grads = alg.meta_gradient(meta, tasks, progress=1.0, use_vmap=False)
    _, want = ref.mamlpp_meta_grad(ref.mlp_forward, leaves(meta, "params."), leaves(meta, "lslr."), tasks, steps=2)
    assert_grads_close(grads, want)
    # during derivative-order annealing: first order, multi-step
    _, grads = alg.meta_gradient(meta, tasks, progress=0.1, use_vmap=False)
    w = [max(0.8 / 2, 0.03 / 2), 0.0]
    w[1] = 1 - w[0]
    _, want = ref.mamlpp_meta_grad(ref.mlp_forward, leaves(meta, "params."), leaves(meta, "lslr."), tasks, steps=2,
                                   first_order=True, weights=w)
    assert_grads_close(grads, want)


# -- (2) against central finite differences ------------------------------------------------------

def _entries(meta, names):
    """A handful of (key, flat index) pairs: two per listed key."""
    out = []
    for k in names:
        n = meta[k].numel()
        out += [(k, 0), (k, n - 1)] if n > 1 else [(k, 0)]
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["maml", "mamlpp", "metasgd", "anil"])
def test_meta_gradient_matches_finite_differences(name, kind):
    alg, meta, tasks = make(name, kind, steps=2)
    _, grads = alg.meta_gradient(meta, tasks, progress=PROGRESS, use_vmap=False)
    keys = ["params.features.layers.0.weight", "params.features.layers.1.bias", "params.head.weight"]
    keys += [k for k in meta if k.startswith(("lr.", "lslr."))][:3]
    eps = 1e-6

    def value(m):
        return float(sum(alg.meta_loss(m, t, progress=PROGRESS).detach() for t in tasks) / len(tasks))

    for key, i in _entries(meta, keys):
        vals = []
        for sign in (1, -1):
            m = {k: v.detach().clone() for k, v in meta.items()}
            m[key].view(-1)[i] += sign * eps
            vals.append(value(m))
        fd = (vals[0] - vals[1]) / (2 * eps)
        assert grads[key].view(-1)[i].item() == pytest.approx(fd, rel=1e-5, abs=1e-8), (key, i)


# -- (3) vmap path == loop path --------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ALGS)
def test_vmap_equals_loop(name, kind):
    alg, meta, tasks = make(name, kind, steps=2)
    assert alg.can_vmap(tasks)
    loss_l, loop = alg.meta_gradient(meta, tasks, progress=PROGRESS, use_vmap=False)
    loss_v, vm = alg.meta_gradient(meta, tasks, progress=PROGRESS, use_vmap=True)
    assert loss_v == pytest.approx(loss_l, rel=1e-12)
    assert_grads_close(vm, loop)
    assert_grads_close(alg.meta_gradient(meta, tasks, progress=PROGRESS)[1], vm)  # default picks vmap


def test_vmap_first_order_phase_equals_loop():
    alg, meta, tasks = make("mamlpp", "classification", steps=3)
    _, loop = alg.meta_gradient(meta, tasks, progress=0.1, use_vmap=False)
    _, vm = alg.meta_gradient(meta, tasks, progress=0.1, use_vmap=True)
    assert_grads_close(vm, loop)


# -- (4) learned rates train ---------------------------------------------------------------------

@pytest.mark.parametrize("name,prefix", [("metasgd", "lr."), ("mamlpp", "lslr.")])
def test_learned_rates_change_under_adam(name, prefix):
    alg, meta, tasks = make(name, "regression", steps=2, lr=0.1)
    keys = [k for k in meta if k.startswith(prefix)]
    assert keys and all(meta[k].requires_grad for k in keys)
    if name == "mamlpp":
        assert all(meta[k].shape == (2,) for k in keys)
    else:
        assert all(meta[k].shape == meta["params." + k[len(prefix):]].shape for k in keys)
    before = {k: meta[k].detach().clone() for k in keys}
    names = alg.trainable(meta)
    opt = torch.optim.Adam([meta[n] for n in names], lr=1e-2)
    for i in range(3):
        _, grads = alg.meta_gradient(meta, tasks, progress=1.0)
        for n in names:
            meta[n].grad = grads[n]
        opt.step()
    for k in keys:
        assert not torch.equal(meta[k].detach(), before[k]), k


# -- (5) FOMAML ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_fomaml_is_the_first_order_formula_and_differs_from_maml(kind, steps):
    fo, meta, tasks = make("fomaml", kind, steps=steps)
    so = build("maml", fo.model, inner_lr=fo.inner_lr, inner_steps=steps)
    _, g_fo = fo.meta_gradient(meta, tasks, use_vmap=False)
    _, g_so = so.meta_gradient(meta, tasks, use_vmap=False)
    want = ref.fomaml_formula(ref.mlp_forward, leaves(meta, "params."), tasks, lr=fo.inner_lr, steps=steps)
    assert_grads_close(g_fo, {"params." + n: v for n, v in want.items()})
    assert max((g_fo[k] - g_so[k]).abs().max().item() for k in g_fo) > 1e-6


def test_zero_steps_fomaml_equals_maml():
    fo, meta, tasks = make("fomaml", "regression", steps=0)
    so = build("maml", fo.model, inner_lr=fo.inner_lr, inner_steps=0)
    assert_grads_close(fo.meta_gradient(meta, tasks)[1], so.meta_gradient(meta, tasks)[1])


# -- (6) the step-wise protocol ------------------------------------------------------------------

def _close_params(a, b):
    assert set(a) == set(b)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ALGS)
def test_adapt_equals_repeated_steps(name):
    alg, meta, tasks = make(name, "classification", steps=2)
    task = tasks[0]
    state = alg.start(meta, task)
    for _ in range(3):  # one more than inner_steps: MAML++ reuses its last rate
        state = alg.step(meta, state, task)
    adapted = alg.adapt(meta, task, steps=3)
    assert adapted.step == state.step == 3
    _close_params(adapted.params, state.params)
    assert not any(p.requires_grad for p in adapted.params.values())
    assert alg.adapt(meta, task).step == 2  # default inner_steps


@pytest.mark.parametrize("name", ALGS)
def test_lr_scale_halves_the_step(name):
    alg, meta, tasks = make(name, "regression", steps=2)
    task = tasks[0]
    s0 = alg.start(meta, task)
    full, half = alg.step(meta, s0, task), alg.step(meta, s0, task, lr_scale=0.5)
    moved = 0
    for n, p in s0.params.items():
        torch.testing.assert_close(half.params[n] - p, 0.5 * (full.params[n] - p), rtol=1e-10, atol=1e-14)
        moved += int(not torch.equal(full.params[n], p.detach()))
    assert moved == (2 if name == "anil" else len(s0.params))


@pytest.mark.parametrize("name", ALGS)
def test_support_loss_decreases_and_prev_loss_is_free(name):
    alg, meta, _ = make(name, "regression", steps=2, lr=0.05)
    x = torch.linspace(-1, 1, 12, dtype=DT).reshape(6, 2)
    task = TaskTensors(x, 0.5 * x[:, :1], x, 0.5 * x[:, :1], "regression")
    state = alg.start(meta, task)
    losses = [alg.support_loss(meta, state, task).item()]
    for _ in range(5):
        new = alg.step(meta, state, task)
        assert new.prev_loss.item() == pytest.approx(losses[-1], rel=1e-12)
        state = new
        losses.append(alg.support_loss(meta, state, task).item())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


@pytest.mark.parametrize("name", ALGS)
def test_inference_under_no_grad_and_vmapped_steps(name):
    alg, meta, tasks = make(name, "classification", steps=2)
    with torch.no_grad():
        state = alg.adapt(meta, tasks[0])
        out = alg.predict(meta, state, tasks[0].query_x)
        _, grads = alg.meta_gradient(meta, tasks, use_vmap=False)
    assert out.shape == (5, N_WAY) and not out.requires_grad
    _close_params(state.params, alg.adapt(meta, tasks[0]).params)
    assert all(g.abs().sum() > 0 for g in grads.values())
    # a batch of tasks adapted in one vmapped call gives the per-task states
    xs, ys = torch.stack([t.support_x for t in tasks]), torch.stack([t.support_y for t in tasks])

    def one(sx, sy):
        t = TaskTensors(sx, sy, sx, sy, "classification", N_WAY)
        return alg.adapt(meta, t, steps=2, grad_fn=func_grad).params

    batched = torch.func.vmap(one)(xs, ys)
    for i, t in enumerate(tasks):
        _close_params({n: v[i] for n, v in batched.items()}, alg.adapt(meta, t, steps=2).params)


def test_anil_inner_loop_touches_only_the_head():
    alg, meta, tasks = make("anil", "classification", steps=2)
    state = alg.adapt(meta, tasks[0], create_graph=True, grad_fn=autograd_grad)
    for n, p in state.params.items():
        assert (p is meta["params." + n]) == n.startswith("features.")
    assert "support_features" in state.extras


def test_create_graph_step_is_differentiable():
    alg, meta, tasks = make("metasgd", "regression", steps=1)
    state = alg.step(meta, alg.start(meta, tasks[0]), tasks[0], create_graph=True)
    loss = alg.query_loss(meta, state, tasks[0])
    g = torch.autograd.grad(loss, [meta["lr.head.weight"], meta["params.head.weight"]])
    torch.testing.assert_close(g[0], alg.meta_gradient(meta, tasks[:1])[1]["lr.head.weight"])


def test_registry_and_repr():
    for name in ALGS:
        alg = build(name, mlp("regression"))
        assert isinstance(alg, Algorithm) and alg.name == name
        assert type(alg).__name__ in repr(alg)


def test_anil_needs_a_head():
    with pytest.raises(ValueError):
        build("anil", MetaModel(MLPFeatures(2, (4,)), 4, 0))


# -- a tiny conv case (Conv-4 with batch statistics: loop path only) ----------------------------------

nn_mod = pytest.importorskip("agent.nn")


def _conv_model(norm, steps=2):
    if not hasattr(nn_mod, "build_model"):
        pytest.skip("agent.nn.build_model not available")
    return nn_mod.build_model("conv4", in_shape=(1, 16, 16), out_dim=N_WAY, norm=norm, width=3, steps=steps)


def _conv_tasks(n=2):
    out = []
    for s in range(n):
        g = gen(100 + s)
        sx, qx = torch.randn(6, 1, 16, 16, generator=g, dtype=DT), torch.randn(4, 1, 16, 16, generator=g, dtype=DT)
        out.append(TaskTensors(sx, torch.arange(6) % N_WAY, qx, torch.tensor([0, 1, 2, 1]), "classification", N_WAY))
    return out


@pytest.mark.parametrize("name", ["maml", "mamlpp", "anil"])
def test_conv_meta_gradient_matches_reference(name):
    model = _conv_model("per_step" if name == "mamlpp" else "batch")
    alg, meta, _ = make(name, "classification", steps=2, lr=0.2, model=model)
    tasks = _conv_tasks()
    assert not alg.can_vmap(tasks)  # batch statistics: the loop path
    _, grads = alg.meta_gradient(meta, tasks, progress=PROGRESS)
    fwd = ref.module_forward(model)
    feats = lambda p, x: torch.func.functional_call(model.features, {k[9:]: v for k, v in p.items() if k.startswith("features.")}, (x, 0))  # noqa: E731
    _, want = reference_grads(name, alg, meta, tasks, forward=fwd, features=feats)
    assert_grads_close(grads, want, rtol=1e-8, atol=1e-10)


def test_conv_group_norm_vmap_equals_loop():
    alg, meta, _ = make("maml", "classification", steps=1, lr=0.2, model=_conv_model("group"))
    tasks = _conv_tasks(3)
    assert alg.can_vmap(tasks)
    assert_grads_close(alg.meta_gradient(meta, tasks, use_vmap=True)[1], alg.meta_gradient(meta, tasks, use_vmap=False)[1])


def test_functional_model_matches_functional_call_and_restores():
    from agent.algorithms.base import FunctionalModel

    model = _conv_model("frozen")
    params, buffers = model.init_state(gen(3), DT)
    g = gen(4)
    state = {k: v + 0.1 * torch.rand(v.shape, generator=g, dtype=DT) for k, v in {**params, **buffers}.items()}
    originals = {k: v for k, v in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items()}
    fm = FunctionalModel.of(model)
    assert FunctionalModel.of(model) is fm
    x = torch.randn(4, 1, 16, 16, generator=g, dtype=DT)
    want = torch.func.functional_call(model, state, (x,), {"step": 0})
    torch.testing.assert_close(fm(state, model, x, 0), want, rtol=0, atol=0)
    feats = fm(state, model.features, x, 0)
    torch.testing.assert_close(torch.nn.functional.linear(feats, state["head.weight"], state["head.bias"]), want, rtol=0, atol=0)
    with pytest.raises(KeyError):
        fm({**state, "nope.weight": torch.zeros(1)}, model, x, 0)
    now = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert all(now[k] is v for k, v in originals.items())
