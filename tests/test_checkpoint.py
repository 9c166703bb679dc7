"""Atomic checkpoint directories: round trip, weights_only loading, corruption fallback, pruning."""

import json
import logging
import os

import numpy as np
import pytest
import torch

from agent import checkpoint as ck


def files(step):
    return {"meta.pt": {"w": torch.full((3,), float(step)), "b": torch.zeros(2, dtype=torch.float64)},
            "state.json": {"step": step, "loss": 0.5},
            "notes.txt": f"step {step}",
            "blob.bin": bytes([step % 256]) * 4}


def test_round_trip_and_manifest(tmp_path):
    path = ck.save(tmp_path, 12, files(12), meta={"kind": "test"})
    assert path.name == "ckpt-000012"
    manifest = json.loads((path / ck.MANIFEST).read_text())
    assert manifest["format"] == ck.FORMAT_VERSION and manifest["step"] == 12 and manifest["meta"] == {"kind": "test"}
    assert sorted(manifest["files"]) == ["blob.bin", "meta.pt", "notes.txt", "state.json"]
    assert all(len(e["sha256"]) == 64 for e in manifest["files"].values())
    c = ck.latest_good(tmp_path)
    assert c.step == 12 and c.meta == {"kind": "test"}
    assert torch.equal(c.load("meta.pt")["w"], torch.full((3,), 12.0))
    assert c.load("state.json") == {"step": 12, "loss": 0.5}
    assert c.load("notes.txt") == b"step 12" and c.load("blob.bin") == b"\x0c" * 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_tensor_files_load_with_weights_only(tmp_path):
    opt = torch.optim.Adam([torch.zeros(3, requires_grad=True)], lr=1e-3)
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    rng_state = {"torch": torch.Generator().manual_seed(3).get_state(),
                 "numpy": np.random.default_rng(5).bit_generator.state}
    path = ck.save(tmp_path, 1, {"optimizer.pt": opt.state_dict(), "rng.pt": rng_state})
    loaded = torch.load(path / "optimizer.pt", weights_only=True)  # plain torch.load, the strict way
    assert torch.equal(loaded["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    rng = torch.load(path / "rng.pt", weights_only=True)
    g = np.random.default_rng()
    g.bit_generator.state = rng["numpy"]
    assert g.integers(1 << 30) == np.random.default_rng(5).integers(1 << 30)
    assert torch.equal(rng["torch"], torch.Generator().manual_seed(3).get_state())


def test_corrupt_newest_falls_back_loudly(tmp_path, caplog):
    for step in (1, 2, 3):
        ck.save(tmp_path, step, files(step))
    newest = tmp_path / "ckpt-000003" / "meta.pt"
    data = bytearray(newest.read_bytes())
    data[-5] ^= 0xFF
    newest.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="agent.checkpoint"):
        c = ck.latest_good(tmp_path)
    assert c.step == 2
    assert any("ckpt-000003" in r.getMessage() and "checksum mismatch" in r.getMessage() for r in caplog.records)
    assert ck.verify(tmp_path / "ckpt-000003") == ["meta.pt: checksum mismatch"]
    with pytest.raises(ck.CheckpointError, match="checksum mismatch"):
        ck.open_checkpoint(tmp_path / "ckpt-000003")


def test_missing_file_and_missing_manifest_are_skipped(tmp_path, caplog):
    for step in (1, 2, 3):
        ck.save(tmp_path, step, files(step))
    os.remove(tmp_path / "ckpt-000003" / "state.json")
    os.remove(tmp_path / "ckpt-000002" / ck.MANIFEST)
    with caplog.at_level(logging.WARNING, logger="agent.checkpoint"):
        assert ck.latest_good(tmp_path).step == 1
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "state.json: missing" in messages and "no manifest" in messages


def test_partial_temp_dir_is_ignored_and_cleaned(tmp_path):
    ck.save(tmp_path, 1, files(1))
    # a writer that died mid-way (pid 999999999 does not exist) left its temp dir behind
    partial = tmp_path / ".tmp-ckpt-000002-999999999-abc"
    partial.mkdir()
    (partial / "meta.pt").write_bytes(b"half")
    assert ck.latest_good(tmp_path).step == 1
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["ckpt-000001"]
    ck.save(tmp_path, 2, files(2))
    assert not partial.exists()
    assert ck.latest_good(tmp_path).step == 2


def test_keep_last_n_and_replace_same_step(tmp_path):
    for step in range(6):
        ck.save(tmp_path, step, files(step), keep=3)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["ckpt-000003", "ckpt-000004", "ckpt-000005"]
    ck.save(tmp_path, 5, {**files(5), "notes.txt": "again"}, keep=3)
    assert ck.latest_good(tmp_path).load("notes.txt") == b"again"
    assert len(ck.list_checkpoints(tmp_path)) == 3


def test_failed_write_leaves_nothing(tmp_path):
    ck.save(tmp_path, 1, files(1))
    with pytest.raises(TypeError):
        ck.save(tmp_path, 2, {"a.json": {"x": 1}, "b.bin": 3.5})
    with pytest.raises(ValueError, match="invalid checkpoint file name"):
        ck.save(tmp_path, 2, {"../evil.json": {}})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-000001"]


def test_resolve_and_empty_root(tmp_path):
    assert ck.latest_good(tmp_path / "nothing") is None
    with pytest.raises(ck.CheckpointError, match="no intact checkpoint"):
        ck.resolve(tmp_path)
    with pytest.raises(ck.CheckpointError, match="no such file"):
        ck.resolve(tmp_path / "nothing")
    ck.save(tmp_path / "run" / "checkpoints", 4, files(4))
    assert ck.resolve(tmp_path / "run").step == 4
    assert ck.resolve(tmp_path / "run" / "checkpoints").step == 4
    assert ck.resolve(tmp_path / "run" / "checkpoints" / "ckpt-000004").step == 4


def test_unsupported_format_is_rejected(tmp_path):
    path = ck.save(tmp_path, 1, files(1))
    manifest = json.loads((path / ck.MANIFEST).read_text())
    manifest["format"] = 99
    (path / ck.MANIFEST).write_text(json.dumps(manifest))
    assert "unsupported format" in ck.verify(path)[0]
    assert ck.latest_good(tmp_path) is None
