"""``agent.data.make_family``: one ``sample(rng)`` interface over all families."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import require_system

import agent.data as data
from agent.data import TaskFamily, family_names, make_family
from agent.data.images import find_fashion_mnist


def test_names_and_protocol():
    names = family_names()
    for n in ("sinusoid", "sinusoid-frequency", "sinusoid-extrapolate", "sinusoid-noise", "sinusoid-amplitude",
              "sinusoid-phase", "linear", "quadratic", "abs", "tanh", "glyphs", "fashion", "digits", "omniglot",
              "miniimagenet"):
        assert n in names
    fam = make_family("sinusoid")
    assert isinstance(fam, TaskFamily) and fam.k_shot == 10 and fam.k_query == 10
    assert make_family("tanh", split="test", k_shot=3).k_shot == 3  # split is ignored by functions
    with pytest.raises(ValueError, match="unknown family"):
        make_family("cifar")
    with pytest.raises(ValueError, match="split must be"):
        make_family("digits", split="holdout")


def test_digits_splits_images_and_classes():
    parts = {s: make_family("digits", split=s, n_way=5, k_shot=1, k_query=1) for s in ("train", "val", "test")}
    assert isinstance(parts["train"], TaskFamily) and parts["train"].kind == "classification"
    sizes = {s: len(f.dataset) for s, f in parts.items()}
    assert sum(sizes.values()) == 1797 and sizes["train"] > sizes["val"] > 0
    seen = [set(map(bytes, f.dataset.x)) for f in parts.values()]  # the image splits do not overlap
    assert not seen[0] & seen[2] and not seen[1] & seen[2]
    five = make_family("digits", classes=range(5), n_way=5, k_shot=5, k_query=5)
    s_idx, _, q_idx, _ = five.sample_indices(np.random.default_rng(0))
    assert set(five.dataset.y[np.r_[s_idx, q_idx]].tolist()) == set(range(5))
    a = five.sample(np.random.default_rng(7))
    b = five.sample(np.random.default_rng(7))
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_y, b.query_y)


def test_fashion_parts():
    require_system("dataset-fashion-mnist", find_fashion_mnist() is not None)
    sizes = {s: len(make_family("fashion", split=s).dataset) for s in ("train", "val", "test", "all")}
    assert sizes == {"train": 50000, "val": 10000, "test": 10000, "all": 70000}
    task = make_family("fashion", split="test", n_way=10, k_shot=5).sample(np.random.default_rng(0))
    assert task.support_x.shape == (50, 1, 28, 28) and task.n_way == 10


def test_import_is_silent_and_sets_no_global_seed():
    code = ("import numpy, torch; s = numpy.random.get_state()[1].copy(); t = torch.random.get_rng_state();"
            "import agent.data, agent.data.glyphs, agent.data.folders, agent.data.images;"
            "assert (numpy.random.get_state()[1] == s).all() and torch.equal(torch.random.get_rng_state(), t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout == "" and out.stderr == ""
    assert data.__name__ == "agent.data"
