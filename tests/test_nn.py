"""Backbones and normalisation policies: shapes, exact meta-gradients, vmap safety, purity."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch
import torch.nn.functional as F

from agent.algorithms.base import TaskTensors
from agent.algorithms.maml import MAML
from agent.nn import NORMS, build_model, embed, estimate_running_stats, forward
from agent.nn.norm import Norm

SMALL = {"conv4": 4, "resnet12": 2}  # widths that keep every test fast


def make_tasks(n, shape, *, seed=0, ways=3, shots=2, queries=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = lambda k: torch.randn(k * ways, *shape, generator=g, dtype=dtype)  # noqa: E731
    y = lambda k: torch.arange(ways).repeat(k)  # noqa: E731
    return [TaskTensors(x(shots), y(shots), x(queries), y(queries), n_way=ways) for _ in range(n)]


def make_maml(arch, norm, *, shape=(1, 16, 16), steps=2, inner_lr=0.05, seed=1):
    """A float64 MAML with perturbed norm parameters and, for "frozen", estimated statistics."""
    model = build_model(arch, in_shape=shape, out_dim=3, norm=norm, width=SMALL.get(arch), steps=steps)
    maml = MAML(model, inner_lr=inner_lr, inner_steps=2)
    meta = maml.init_meta(torch.Generator().manual_seed(seed), torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # away from the identity, so each norm parameter matters
        for name, t in meta.items():
            if "norm" in name and t.requires_grad:
                t.add_(0.3 * torch.randn(t.shape, generator=g, dtype=t.dtype))
    if norm == "frozen":
        xs = [t.support_x for t in make_tasks(4, shape, seed=seed + 2)]
        buffers = estimate_running_stats(model, maml.params_of(meta), maml.buffers_of(meta), xs)
        meta.update({"buffers." + k: v for k, v in buffers.items()})
    return maml, meta


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


# -- shapes and the factory ------------------------------------------------------------------

@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("arch, shape", [("conv4", (1, 28, 28)), ("resnet12", (1, 28, 28)), ("resnet12", (3, 84, 84))])
def test_shapes(arch, shape, norm):
    model = build_model(arch, in_shape=shape, out_dim=5, norm=norm, width=SMALL[arch], steps=3)
    params, buffers = model.init_state(torch.Generator().manual_seed(0))
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(1))
    for step in (0, 3, 9):
        assert forward(model, params, buffers, x, step).shape == (4, 5)
        assert embed(model, params, buffers, x, step).shape == (4, model.feature_dim)
    assert forward(model, params, buffers, x.flatten(1)).shape == (4, 5)  # flat inputs are reshaped


def test_feature_dims_and_defaults():
    assert build_model("conv4", in_shape=(1, 28, 28), out_dim=5).feature_dim == 64
    assert build_model("conv4", in_shape=(3, 84, 84), out_dim=5).feature_dim == 1600
    resnet = build_model("resnet12", in_shape=(3, 84, 84), out_dim=0)
    assert resnet.feature_dim == 640 and resnet.head is None
    assert [b.conv1.out_channels for b in resnet.features.blocks] == [64, 160, 320, 640]
    assert build_model("resnet12", in_shape=(1, 28, 28), out_dim=5, width=(8, 16, 32, 64)).feature_dim == 64
    assert build_model("conv4", in_shape=(1, 28, 28), out_dim=5).features.blocks[0].norm.policy == "batch"
    mlp = build_model("mlp", in_shape=(2, 3), out_dim=1, hidden=(8,))
    params, buffers = mlp.init_state()
    assert forward(mlp, params, buffers, torch.zeros(4, 2, 3)).shape == (4, 1)


@pytest.mark.parametrize("kwargs, word", [
    ({"arch": "vgg"}, "arch"),
    ({"norm": "layer"}, "norm"),
    ({"arch": "mlp", "norm": "batch"}, "norm"),
    ({"in_shape": (28, 28)}, "in_shape"),
    ({"in_shape": (1, 8, 8)}, "in_shape"),
    ({"arch": "resnet12", "in_shape": (1, 8, 8)}, "in_shape"),
    ({"in_shape": (1, 0, 28)}, "in_shape"),
    ({"out_dim": -1}, "out_dim"),
    ({"steps": -1}, "steps"),
    ({"width": 0}, "width"),
    ({"arch": "resnet12", "width": (8, 16)}, "width"),
])
def test_build_model_errors_name_the_argument(kwargs, word):
    args = {"arch": "conv4", "in_shape": (1, 28, 28), "out_dim": 5, **kwargs}
    with pytest.raises(ValueError, match=word):
        build_model(args.pop("arch"), **args)


def test_norm_parameters_are_named_and_initialised_as_identity():
    model = build_model("resnet12", in_shape=(1, 16, 16), out_dim=3, norm="per_step", width=2, steps=4)
    params, _ = model.init_state(torch.Generator().manual_seed(0))
    norms = {k: v for k, v in params.items() if "norm" in k}
    assert "features.blocks.0.norm1.weight" in norms and "features.blocks.3.shortcut_norm.bias" in norms
    assert len(norms) == 4 * 4 * 2
    for name, t in norms.items():
        assert t.shape[0] == 5  # steps + 1 rows
        assert torch.equal(t, torch.ones_like(t) if name.endswith("weight") else torch.zeros_like(t))
    frozen = build_model("conv4", in_shape=(1, 16, 16), out_dim=3, norm="frozen", width=2)
    assert sorted(frozen.init_state()[1])[:2] == ["features.blocks.0.norm.running_mean", "features.blocks.0.norm.running_var"]
    assert not [k for k in build_model("conv4", in_shape=(1, 16, 16), out_dim=3, norm="none").state_dict() if "norm" in k]


# -- exact second-order meta-gradients ------------------------------------------------------

@pytest.mark.parametrize("arch, norm", [("conv4", n) for n in NORMS] + [("resnet12", "batch")])
def test_meta_gradient_matches_finite_differences(arch, norm):
    maml, meta = make_maml(arch, norm)
    tasks = make_tasks(2, (1, 16, 16))
    _, grads = maml.meta_gradient(meta, tasks, use_vmap=False)
    picks = [n for n in grads if "norm" in n][:2] + [n for n in grads if "conv" in n][:1] + ["params.head.weight"]
    h = 1e-6
    for name in picks:
        idx = tuple(min(1, n - 1) for n in meta[name].shape)  # per-step tensors: row 1, the second inner step
        losses = []
        for sign in (1, -1):
            bumped = meta[name].detach().clone()
            bumped[idx] += sign * h
            losses.append(maml.meta_gradient({**meta, name: bumped.requires_grad_(True)}, tasks, use_vmap=False)[0])
        fd = (losses[0] - losses[1]) / (2 * h)
        assert fd == pytest.approx(grads[name][idx].item(), rel=1e-5, abs=1e-8), name


# -- vmap against the loop ------------------------------------------------------------------

def test_vmap_matches_loop_for_batch_norm_with_affine_outside():
    maml, meta = make_maml("conv4", "batch")
    tasks = make_tasks(3, (1, 16, 16))
    _, loop = maml.meta_gradient(meta, tasks, use_vmap=False)  # agrees with FD (test above)
    _, vmapped = maml.meta_gradient(meta, tasks, use_vmap=True)
    assert max_diff(loop, vmapped) < 1e-10


class _FusedAffineNorm(Norm):
    """Batch norm with the affine inside ``F.batch_norm``: what vmap gets wrong."""

    def forward(self, x, step=0):
        return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)


def test_fused_affine_batch_norm_breaks_vmap_second_order(monkeypatch):
    # Why Norm applies its affine outside F.batch_norm (pytorch/functorch#534). If this fails,
    # torch has fixed the bug: delete this test.
    maml, meta = make_maml("conv4", "batch")
    for block in maml.model.features.blocks:
        monkeypatch.setattr(block.norm, "__class__", _FusedAffineNorm)
    tasks = make_tasks(3, (1, 16, 16))
    _, loop = maml.meta_gradient(meta, tasks, use_vmap=False)
    _, vmapped = maml.meta_gradient(meta, tasks, use_vmap=True)
    assert max_diff(loop, vmapped) > 1e-4


@pytest.mark.parametrize("arch", ["conv4", "resnet12"])
def test_batch_statistics_models_are_not_vmappable(arch):
    # Regression guard: with batch statistics the default meta-gradient path is the loop.
    tasks = make_tasks(3, (1, 16, 16))
    for norm in NORMS:
        maml, _ = make_maml(arch, norm)
        per_example = norm in ("frozen", "group", "none")
        assert maml.model.vmappable is per_example
        assert maml.can_vmap(tasks) is per_example
    assert build_model("mlp", in_shape=(1,), out_dim=1).vmappable


@pytest.mark.parametrize("arch, norm", [("mlp", "none"), ("conv4", "group"), ("conv4", "frozen"), ("resnet12", "group")])
def test_vmap_matches_loop_for_per_example_models(arch, norm):
    if arch == "mlp":
        model = build_model("mlp", in_shape=(4,), out_dim=3, hidden=(8, 8))
        maml = MAML(model, inner_lr=0.1, inner_steps=2)
        meta, tasks = maml.init_meta(torch.Generator().manual_seed(0), torch.float64), make_tasks(3, (4,))
    else:
        (maml, meta), tasks = make_maml(arch, norm), make_tasks(3, (1, 16, 16))
    _, loop = maml.meta_gradient(meta, tasks, use_vmap=False)
    _, vmapped = maml.meta_gradient(meta, tasks, use_vmap=True)
    assert max_diff(loop, vmapped) < 1e-10


# -- frozen statistics ------------------------------------------------------------------------

@pytest.mark.parametrize("norm, transductive", [("frozen", False), ("group", False), ("batch", True), ("per_step", True)])
def test_support_predictions_and_the_query_set(norm, transductive):
    maml, meta = make_maml("conv4", norm)
    params, buffers = maml.params_of(meta), maml.buffers_of(meta)
    (a, b) = make_tasks(2, (1, 16, 16))
    n = len(a.support_x)
    with_a = forward(maml.model, params, buffers, torch.cat([a.support_x, a.query_x]))[:n]
    with_b = forward(maml.model, params, buffers, torch.cat([a.support_x, b.query_x]))[:n]
    assert torch.allclose(with_a, with_b, atol=1e-12) is not transductive


def test_estimate_running_stats_reproduces_batch_statistics_and_is_pure():
    maml, meta = make_maml("conv4", "frozen")
    params, buffers = maml.params_of(meta), maml.buffers_of(meta)
    before = {k: v.clone() for k, v in buffers.items()}
    xs = [t.support_x for t in make_tasks(3, (1, 16, 16), seed=5)]
    new = estimate_running_stats(maml.model, params, buffers, xs)
    assert new is not buffers and sorted(new) == sorted(buffers)
    assert all(torch.equal(before[k], buffers[k]) for k in buffers)
    assert not any(v.requires_grad for v in new.values())
    # Frozen with the estimated buffers == batch statistics over the same inputs.
    batch = build_model("conv4", in_shape=(1, 16, 16), out_dim=3, norm="batch", width=4)
    x = torch.cat(xs)
    assert torch.allclose(forward(maml.model, params, new, x), forward(batch, params, {}, x), atol=1e-10)
    # Models without frozen layers get an equal copy back.
    model = build_model("conv4", in_shape=(1, 16, 16), out_dim=3, norm="group", width=4)
    assert estimate_running_stats(model, dict(model.named_parameters()), {}, [x.float() for x in xs]) == {}


# -- per-step normalisation --------------------------------------------------------------------

def test_per_step_rows_select_affine_and_receive_gradients():
    maml, meta = make_maml("conv4", "per_step", steps=4)
    params, buffers = maml.params_of(meta), maml.buffers_of(meta)
    x = make_tasks(1, (1, 16, 16))[0].support_x
    outs = [forward(maml.model, params, buffers, x, step) for step in range(7)]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])
    assert torch.equal(outs[4], outs[5]) and torch.equal(outs[4], outs[6])  # clamped to the last row
    # inner_steps=2 uses rows 0 and 1 in the inner loop and row 2 for the query prediction.
    _, grads = maml.meta_gradient(meta, make_tasks(2, (1, 16, 16)), use_vmap=False)
    for name in ("params.features.blocks.1.norm.weight", "params.features.blocks.1.norm.bias"):
        used = grads[name].abs().sum(dim=1)
        assert (used[:3] > 0).all() and (used[3:] == 0).all(), name


# -- purity ------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm", NORMS)
def test_module_state_and_passed_dicts_are_untouched(norm):
    maml, meta = make_maml("resnet12", norm)
    module_state = {k: v.clone() for k, v in maml.model.state_dict().items()}
    snapshot = {k: (v, v.detach().clone()) for k, v in meta.items()}
    tasks = make_tasks(2, (1, 16, 16))
    maml.meta_gradient(meta, tasks, use_vmap=False)
    maml.adapt(meta, tasks[0], steps=2)
    estimate_running_stats(maml.model, maml.params_of(meta), maml.buffers_of(meta), [tasks[0].support_x])
    assert meta.keys() == snapshot.keys()
    assert all(meta[k] is t and torch.equal(t.detach(), saved) for k, (t, saved) in snapshot.items())
    assert all(torch.equal(v, module_state[k]) for k, v in maml.model.state_dict().items())
    assert all(p.grad is None for p in maml.model.parameters())


@pytest.mark.parametrize("module", ["agent.nn", "agent.nn.norm", "agent.nn.conv4", "agent.nn.resnet12"])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0
