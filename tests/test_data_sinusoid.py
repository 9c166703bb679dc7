"""Sinusoid regression and the shifted function families."""

import math

import numpy as np
import pytest
import torch

from agent.data.sinusoid import FAMILIES, SinusoidFamily, fixed_test_set, make_family


def test_maml_protocol_ranges_and_function():
    fam = make_family("sinusoid", k_shot=10, k_query=10)
    rng = np.random.default_rng(0)
    params = [fam.sample_params(rng) for _ in range(2000)]
    amp = np.array([p["amplitude"] for p in params])
    phase = np.array([p["phase"] for p in params])
    assert 0.1 <= amp.min() and amp.max() <= 5.0 and amp.max() > 4.9 and amp.min() < 0.2
    assert 0.0 <= phase.min() and phase.max() <= math.pi
    assert all(p["frequency"] == 1.0 for p in params)
    p = params[0]
    task = fam.task(p, rng)
    assert task.kind == "regression" and task.support_x.shape == (10, 1) and task.query_y.shape == (10, 1)
    assert task.support_x.dtype == torch.float32
    x = task.support_x.double().numpy()
    assert np.all((x >= -5) & (x <= 5))
    expected = p["amplitude"] * np.sin(x + p["phase"])
    np.testing.assert_allclose(task.support_y.numpy(), expected, atol=1e-5)


def test_same_generator_state_same_task():
    fam = make_family("sinusoid-noise", k_shot=5, k_query=7)
    a, b = fam.sample(np.random.default_rng(3)), fam.sample(np.random.default_rng(3))
    c = fam.sample(np.random.default_rng(4))
    for name in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.support_y, c.support_y)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_samples_finite_tasks(name):
    fam = make_family(name, k_shot=4, k_query=6)
    assert fam.name == name and fam.kind == "regression"
    for task in fam.sample_many(np.random.default_rng(1), 5):
        assert task.support_x.shape == (4, 1) and task.query_x.shape == (6, 1)
        assert torch.isfinite(task.support_y).all() and torch.isfinite(task.query_y).all()


def test_shifted_families_shift():
    rng = np.random.default_rng(0)
    ext = make_family("sinusoid-extrapolate").sample(rng)
    assert float(ext.support_x.min()) >= 5.0 and float(ext.query_x.max()) <= 10.0
    amp = make_family("sinusoid-amplitude")
    assert all(5.0 <= amp.sample_params(rng)["amplitude"] <= 10.0 for _ in range(100))
    freq = make_family("sinusoid-frequency")
    f = [freq.sample_params(rng)["frequency"] for _ in range(200)]
    assert 0.5 <= min(f) and max(f) <= 2.0 and np.std(f) > 0.1
    # noise: observed targets differ from the clean function by about sigma
    noisy = make_family("sinusoid-noise-large", k_shot=2000)
    p = noisy.sample_params(rng)
    task = noisy.task(p, rng)
    resid = task.support_y.numpy().ravel() - noisy.function(task.support_x.double().numpy().ravel(), **p)
    assert abs(resid.std() - 0.5) < 0.05
    clean_query = noisy.with_(noisy_query=False).task(p, rng)
    np.testing.assert_allclose(clean_query.query_y.numpy().ravel(),
                               noisy.function(clean_query.query_x.double().numpy().ravel(), **p), atol=1e-5)


def test_overrides_and_unknown_name():
    fam = make_family("sinusoid", amplitude=[1.0, 2.0], k_shot=3)
    assert isinstance(fam, SinusoidFamily) and fam.amplitude == (1.0, 2.0) and fam.k_shot == 3
    with pytest.raises(ValueError, match="unknown function family"):
        make_family("cosine")


def test_fixed_test_set_is_fixed():
    a = fixed_test_set("sinusoid", n_tasks=50, k_shot=5)
    b = fixed_test_set(SinusoidFamily(k_shot=5), n_tasks=50)
    assert len(a) == 50
    np.testing.assert_allclose(a[0].query_x.numpy().ravel(), np.linspace(-5, 5, 100), atol=1e-6)
    for t, u in zip(a, b):
        assert torch.equal(t.support_x, u.support_x) and torch.equal(t.query_y, u.query_y)
    assert not torch.equal(a[0].query_y, a[1].query_y)
    assert fixed_test_set("sinusoid", n_tasks=1000)[999].query_x.shape == (100, 1)
