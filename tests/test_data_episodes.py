"""Episode sampling and class splits that never leak."""

import numpy as np
import pytest
import torch

from agent.data.episodes import ClassFamily, EpisodeSampler, LabelledSet, split_classes, to_float_images


def toy(n_classes=30, per_class=12, groups_of=3, shape=(6, 6)):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(n_classes) * 7 + 100, per_class)  # labels need not be contiguous
    x = rng.integers(0, 256, size=(len(y), *shape), dtype=np.uint8)
    x[:, 0, 0] = np.repeat(np.arange(n_classes), per_class)  # lets a test read the class back
    g = (y - 100) // 7 // groups_of
    return LabelledSet(x, y, g)


def test_split_is_disjoint_complete_and_deterministic():
    data = toy()
    s = split_classes(data, seed=1)
    sets = [set(s[k].tolist()) for k in ("train", "val", "test")]
    assert sets[0].isdisjoint(sets[1]) and sets[0].isdisjoint(sets[2]) and sets[1].isdisjoint(sets[2])
    assert set().union(*sets) == set(data.classes.tolist())
    assert [len(v) for v in sets] == [18, 6, 6]
    again = split_classes(data, seed=1)
    assert all(np.array_equal(s[k], again[k]) for k in s)
    assert any(not np.array_equal(s[k], split_classes(data, seed=2)[k]) for k in s)


def test_split_by_groups_keeps_groups_whole():
    data = toy()
    s = split_classes(data, by=True, seed=0)
    cg = data.class_groups()
    groups = {k: {cg[int(c)] for c in v} for k, v in s.items()}
    assert groups["train"].isdisjoint(groups["val"]) and groups["train"].isdisjoint(groups["test"])
    assert groups["val"].isdisjoint(groups["test"])
    assert [len(groups[k]) for k in ("train", "val", "test")] == [6, 2, 2]
    # the same split from a per-sample group array or a class->group mapping
    assert all(np.array_equal(s[k], split_classes(data.y, by=data.groups, seed=0)[k]) for k in s)
    assert all(np.array_equal(s[k], split_classes(data.classes, by=cg, seed=0)[k]) for k in s)
    with pytest.raises(ValueError, match="spans several groups"):
        split_classes(np.array([1, 1]), by=np.array([0, 1]))


def test_sampler_uses_only_its_split_and_relabels():
    data = toy()
    s = split_classes(data, by=True, seed=0)
    for split in ("train", "val", "test"):
        sampler = EpisodeSampler(data, n_way=5, k_shot=2, k_query=3, classes=s[split])
        rng = np.random.default_rng(5)
        first_label_class = set()
        for _ in range(40):
            s_idx, s_y, q_idx, q_y = sampler.sample_indices(rng)
            assert set(data.y[s_idx].tolist()) <= set(s[split].tolist())
            assert set(data.y[q_idx].tolist()) <= set(s[split].tolist())
            assert not set(s_idx.tolist()) & set(q_idx.tolist())  # no image in both
            # one original class per task label, consistent between support and query
            for lab in range(5):
                assert len(set(data.y[s_idx[s_y == lab]]) | set(data.y[q_idx[q_y == lab]])) == 1
            assert np.bincount(s_y).tolist() == [2] * 5 and np.bincount(q_y).tolist() == [3] * 5
            first_label_class.add(int(data.y[s_idx[s_y == 0][0]]))
        assert len(first_label_class) > 1  # label 0 is not always the same class


def test_task_tensors_and_determinism():
    data = toy()
    sampler = EpisodeSampler(data, n_way=4, k_shot=1, k_query=2)
    t = sampler.sample(np.random.default_rng(0))
    assert t.kind == "classification" and t.n_way == 4
    assert t.support_x.shape == (4, 1, 6, 6) and t.query_x.shape == (8, 1, 6, 6)
    assert t.support_x.dtype == torch.float32 and 0 <= float(t.support_x.min()) and float(t.support_x.max()) <= 1
    assert t.support_y.dtype == torch.int64 and sorted(t.support_y.tolist()) == [0, 1, 2, 3]
    u = sampler.sample(np.random.default_rng(0))
    assert torch.equal(t.support_x, u.support_x) and torch.equal(t.query_y, u.query_y)
    v = sampler.sample(np.random.default_rng(1))
    assert not torch.equal(t.query_x, v.query_x)


def test_colour_and_float_images():
    rgb = np.zeros((4, 5, 5, 3), dtype=np.uint8)
    rgb[..., 1] = 255
    out = to_float_images(rgb)
    assert out.shape == (4, 3, 5, 5) and float(out[:, 1].min()) == 1.0 and float(out[:, 0].max()) == 0.0
    flt = np.full((2, 1, 3, 3), 0.5, dtype=np.float32)
    assert to_float_images(flt).shape == (2, 1, 3, 3) and float(to_float_images(flt).max()) == 0.5


def test_sampler_errors_and_small_classes():
    data = toy(n_classes=6, per_class=4)
    with pytest.raises(ValueError, match="need n_way"):
        EpisodeSampler(data, n_way=7, k_shot=1, k_query=1)
    with pytest.raises(ValueError, match="need n_way"):
        EpisodeSampler(data, n_way=2, k_shot=3, k_query=2)  # no class has 5 images
    with pytest.raises(ValueError, match="not in the data set"):
        EpisodeSampler(data, n_way=2, classes=[1, 2])
    fam = ClassFamily(data, n_way=3, k_shot=1, k_query=3, name="toy", split="train")
    assert "toy" in repr(fam) and fam.sample(np.random.default_rng(0)).query_x.shape[0] == 9
    assert "classes=6" in repr(data)
