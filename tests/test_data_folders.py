"""Omniglot and mini-ImageNet from local folders, on tiny fixtures in their usual layouts."""

import csv

import numpy as np
import pytest
from PIL import Image

from agent.data import make_family
from agent.data.folders import MINIIMAGENET_ENV_VAR, OMNIGLOT_ENV_VAR, load_miniimagenet, load_omniglot


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("META_AGENT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(OMNIGLOT_ENV_VAR, raising=False)
    monkeypatch.delenv(MINIIMAGENET_ENV_VAR, raising=False)


def write_omniglot(root, background=("Alpha_A", "Alpha_B", "Alpha_C", "Alpha_D", "Alpha_E"),
                   evaluation=("Greek", "Hebrew"), chars=3, drawers=4):
    """The official layout: black strokes on a white 105x105 background."""
    for part, alphabets in (("images_background", background), ("images_evaluation", evaluation)):
        for a_i, alphabet in enumerate(alphabets):
            for c in range(chars):
                d = root / part / alphabet / f"character{c + 1:02d}"
                d.mkdir(parents=True)
                for k in range(drawers):
                    im = np.full((105, 105), 255, dtype=np.uint8)
                    im[10 + 5 * c: 60 + 5 * c, 20 + 3 * a_i: 30 + 3 * a_i + k] = 0
                    Image.fromarray(im).convert("1").save(d / f"{c:04d}_{k + 1:02d}.png")
    return root


def test_omniglot_layout(tmp_path):
    write_omniglot(tmp_path / "omniglot-py")
    data = load_omniglot(tmp_path, size=28, cache=False)  # the parent folder is accepted too
    assert data.x.shape == (7 * 3 * 4, 28, 28) and data.x.dtype == np.uint8
    assert len(data.classes) == 21 and data.x[:, 0, 0].max() == 0 and data.x.max() == 255  # inverted
    s = data.splits
    assert set(s) == {"train", "val", "test"} and all(len(v) for v in s.values())
    sets = [set(s[k].tolist()) for k in ("train", "val", "test")]
    assert sets[0].isdisjoint(sets[1]) and sets[0].isdisjoint(sets[2]) and sets[1].isdisjoint(sets[2])
    names = data.class_names
    assert all(names[c].split("/")[0] in ("Greek", "Hebrew") for c in s["test"])
    assert not any(names[c].split("/")[0] in ("Greek", "Hebrew") for c in sets[0] | sets[1])
    # alphabets are whole within a split
    cg = data.class_groups()
    assert {cg[c] for c in sets[0]}.isdisjoint({cg[c] for c in sets[1]})


def test_omniglot_cache_and_family(tmp_path, monkeypatch):
    root = write_omniglot(tmp_path / "data")
    a = load_omniglot(root)
    assert list((tmp_path / "cache").glob("omniglot-*.npz"))
    b = load_omniglot(root)
    np.testing.assert_array_equal(a.x, b.x)
    monkeypatch.setenv(OMNIGLOT_ENV_VAR, str(root))
    fam = make_family("omniglot", split="test", n_way=2, k_shot=1, k_query=3)
    task = fam.sample(np.random.default_rng(0))
    assert task.support_x.shape == (2, 1, 28, 28) and task.query_x.shape == (6, 1, 28, 28)
    assert set(fam.classes.tolist()) <= set(a.splits["test"].tolist())


def test_missing_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="META_AGENT_OMNIGLOT"):
        load_omniglot()
    with pytest.raises(FileNotFoundError, match="images_background"):
        load_omniglot(tmp_path)
    with pytest.raises(FileNotFoundError, match="META_AGENT_MINIIMAGENET"):
        load_miniimagenet()


WNIDS = {"train": ["n01532829", "n01558993", "n01704323"], "val": ["n01855672", "n02091244"],
         "test": ["n01930112", "n01981276"]}


def _jpg(path, colour, size=(100, 80)):
    im = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    im[...] = colour
    Image.fromarray(im).save(path, quality=95)


def write_mini_csv(root, per_class=3):
    (root / "images").mkdir(parents=True)
    for split, wnids in WNIDS.items():
        with open(root / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["filename", "label"])
            for i, wnid in enumerate(wnids):
                for k in range(per_class):
                    name = f"{wnid}{k + 1:08d}.jpg"
                    _jpg(root / "images" / name, (40 * i, 200, 10 * k))
                    w.writerow([name, wnid])
    return root


def write_mini_folders(root, per_class=3):
    for split, wnids in WNIDS.items():
        for i, wnid in enumerate(wnids):
            (root / split / wnid).mkdir(parents=True)
            for k in range(per_class):
                _jpg(root / split / wnid / f"{wnid}_{k}.JPEG", (40 * i, 200, 10 * k))
    return root


@pytest.mark.parametrize("writer", [write_mini_csv, write_mini_folders])
def test_miniimagenet_layouts(tmp_path, writer):
    root = writer(tmp_path / "mini-imagenet")
    data = load_miniimagenet(root, size=16)
    assert data.x.shape == (7 * 3, 16, 16, 3) and data.x.dtype == np.uint8
    assert abs(int(data.x[..., 1].mean()) - 200) <= 3  # colour channels kept in RGB order
    for split, wnids in WNIDS.items():
        assert sorted(data.class_names[data.splits[split]].tolist()) == sorted(wnids)
    fam = make_family("miniimagenet", split="train", root=root, size=16, n_way=3, k_shot=1, k_query=2)
    task = fam.sample(np.random.default_rng(0))
    assert task.support_x.shape == (3, 3, 16, 16) and float(task.support_x.max()) <= 1.0
    assert set(fam.classes.tolist()) == set(data.splits["train"].tolist())


def test_miniimagenet_csv_with_missing_image(tmp_path):
    root = write_mini_csv(tmp_path / "m")
    next((root / "images").iterdir()).unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        load_miniimagenet(root, cache=False)
