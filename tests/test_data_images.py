"""IDX parsing, Fashion-MNIST and scikit-learn digits."""

import gzip

import numpy as np
import pytest
from conftest import require_system

from agent.data import images
from agent.data.images import find_fashion_mnist, load_digits, load_fashion_mnist, read_idx, write_idx


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, dtype, suffix):
    a = (np.arange(2 * 3 * 5) - 7).astype(dtype).reshape(2, 3, 5)
    if dtype == np.uint8:
        a = np.arange(30, dtype=np.uint8).reshape(2, 3, 5)
    path = write_idx(tmp_path / f"a-idx3-ubyte{suffix}", a)
    b = read_idx(path)
    assert b.shape == a.shape and b.dtype.kind == np.dtype(dtype).kind
    np.testing.assert_array_equal(a, b)


def test_idx_header_by_hand(tmp_path):
    # magic 0x00000801: unsigned bytes, one dimension of 3
    raw = bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9])
    (tmp_path / "l").write_bytes(raw)
    (tmp_path / "l.gz").write_bytes(gzip.compress(raw))
    assert read_idx(tmp_path / "l").tolist() == [7, 8, 9] == read_idx(tmp_path / "l.gz").tolist()
    (tmp_path / "bad").write_bytes(bytes([1, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]))
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(raw[:-1])
    with pytest.raises(ValueError, match="expected 3 data bytes"):
        read_idx(tmp_path / "short")


def fake_fashion(root, n_train=20, n_test=10, gz=True):
    rng = np.random.default_rng(0)
    sfx = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte{sfx}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(root / f"{prefix}-labels-idx1-ubyte{sfx}", (np.arange(n) % 10).astype(np.uint8))
    return root


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_from_fixture(tmp_path, monkeypatch, gz):
    fake_fashion(tmp_path, gz=gz)
    data = load_fashion_mnist(tmp_path)
    assert data.x.shape == (30, 28, 28) and data.x.dtype == np.uint8 and len(data.classes) == 10
    assert len(load_fashion_mnist(tmp_path, part="test")) == 10
    monkeypatch.setenv(images.FASHION_ENV_VAR, str(tmp_path))
    assert find_fashion_mnist() == tmp_path and len(load_fashion_mnist(part="train")) == 20
    with pytest.raises(ValueError):
        load_fashion_mnist(tmp_path, part="everything")


def test_fashion_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "nowhere")


def test_fashion_system_package(monkeypatch):
    monkeypatch.delenv(images.FASHION_ENV_VAR, raising=False)
    require_system("dataset-fashion-mnist", find_fashion_mnist() is not None)
    data = load_fashion_mnist()
    assert data.x.shape == (70000, 28, 28) and np.bincount(data.y).tolist() == [7000] * 10


def test_digits_upsampled():
    d = load_digits()
    assert d.x.shape == (1797, 28, 28) and d.x.dtype == np.uint8
    assert d.x.max() == 255 and d.x[:, 0, 0].max() < 64  # dark background, bright strokes
    assert sorted(np.unique(d.y).tolist()) == list(range(10))
    assert load_digits(size=8).x.shape == (1797, 8, 8)
