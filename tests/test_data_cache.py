"""The cache directory and atomic .npz writes."""

from pathlib import Path

import numpy as np

from agent.data import cache


def test_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "c"))
    assert cache.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()
    monkeypatch.delenv(cache.ENV_VAR)
    assert cache.cache_dir(create=False) == Path.home() / ".cache" / "meta-agent"


def test_key_depends_on_params_and_version():
    k = cache.cache_key({"a": 1, "b": (1, 2)}, 1)
    assert k == cache.cache_key({"b": [1, 2], "a": 1}, 1)
    assert k != cache.cache_key({"a": 2, "b": (1, 2)}, 1)
    assert k != cache.cache_key({"a": 1, "b": (1, 2)}, 2)


def test_atomic_write_and_rebuild_of_corrupt_file(tmp_path):
    path = cache.cache_path("t", {"x": 1}, directory=tmp_path)
    calls = []

    def build():
        calls.append(1)
        return {"a": np.arange(5, dtype=np.uint8), "names": np.array(["x", "yy"])}

    first = cache.cached_npz(path, build)
    second = cache.cached_npz(path, build)
    assert len(calls) == 1 and second["names"].tolist() == ["x", "yy"]
    np.testing.assert_array_equal(first["a"], second["a"])
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left
    path.write_bytes(b"truncated")
    again = cache.cached_npz(path, build)
    assert len(calls) == 2 and again["a"].tolist() == [0, 1, 2, 3, 4]
    cache.cached_npz(path, build, refresh=True)
    assert len(calls) == 3
