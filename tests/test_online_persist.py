"""Authenticated River state: identical predictions after restore, tampering and key problems refused."""

import os
import random
import stat

import pytest

from agent.online import persist
from agent.online.drift import DriftMonitor
from agent.online.failure import FailurePredictor
from agent.online.persist import StateError, load, load_key, save
from agent.online.selector import ContextualSelector

KEY = b"k" * 32


def _trained():
    rng = random.Random(0)
    fp, sel, mon = FailurePredictor(), ContextualSelector(["a@1", "b@2"], seed=0), DriftMonitor()
    for i in range(300):
        x = {"u": rng.gauss(0, 1), "v": rng.gauss(0, 1)}
        fp.observe(f"t{i}", x)
        fp.learn(f"t{i}", quality=0.3 if x["u"] > 0.5 else 0.9)
        arm = sel.choose(x)
        sel.learn(x, arm, x["u"] if arm.algorithm == "a" else -x["u"])
        mon.update(quality=rng.gauss(0.8, 0.05), failed=rng.random() < 0.1)
    return {"failure": fp, "selector": sel, "drift": mon}


def test_round_trip_predictions_identical(tmp_path):
    state = _trained()
    path = tmp_path / "online.state"
    save(state, path, key=KEY, extra={"step": 300})
    copy = load(path, key=KEY)
    rng = random.Random(1)
    for i in range(200):
        x = {"u": rng.gauss(0, 1), "v": rng.gauss(0, 1)}
        assert copy["failure"].predict_pre(x) == state["failure"].predict_pre(x)
        a, b = state["selector"].choose(x), copy["selector"].choose(x)
        assert a == b
        for s in (state, copy):
            s["selector"].learn(x, a, 0.5)
            s["failure"].observe(f"n{i}", x)
            s["failure"].learn(f"n{i}", quality=0.5)
        q = rng.gauss(0.5, 0.05)
        assert state["drift"].update(quality=q) == copy["drift"].update(quality=q)
    assert copy["failure"].summary() == state["failure"].summary()


def test_tampered_truncated_or_foreign_files_refused(tmp_path):
    path = tmp_path / "s.state"
    save(_trained()["failure"], path, key=KEY)
    blob = bytearray(path.read_bytes())
    blob[-10] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(StateError, match="authentication failed"):
        load(path, key=KEY)
    save({"x": 1}, path, key=KEY)
    with pytest.raises(StateError, match="authentication failed"):
        load(path, key=b"another-key-of-enough-length")
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(StateError):
        load(path, key=KEY)
    path.write_bytes(b"\x80\x05not ours")
    with pytest.raises(StateError, match="magic"):
        load(path, key=KEY)


def test_version_stamp_mismatch_refused(tmp_path, monkeypatch):
    path = tmp_path / "s.state"
    save([1, 2], path, key=KEY)
    real = persist.version_stamp()
    monkeypatch.setattr(persist, "version_stamp", lambda: {**real, "river": "0.0.1"})
    with pytest.raises(StateError, match="version mismatch"):
        load(path, key=KEY)
    assert load(path, key=KEY, check_versions=False) == [1, 2]


def test_key_from_env_or_private_key_file(tmp_path, monkeypatch):
    monkeypatch.delenv(persist.ENV_KEY, raising=False)
    kf = tmp_path / "cfg" / "state.key"
    key = load_key(kf)
    assert stat.S_IMODE(kf.stat().st_mode) == 0o600 and len(key) == 64
    assert load_key(kf) == key  # reused
    save({"a": 1}, tmp_path / "x.state", key_file=kf)
    assert load(tmp_path / "x.state", key_file=kf) == {"a": 1}
    os.chmod(kf, 0o644)
    with pytest.raises(StateError, match="mode 644"):
        load_key(kf)
    monkeypatch.setenv(persist.ENV_KEY, "from-the-environment-0123")
    assert load_key(kf) == b"from-the-environment-0123"  # the environment wins
    with pytest.raises(StateError, match="authentication failed"):
        load(tmp_path / "x.state")
    monkeypatch.setenv(persist.ENV_KEY, "short")
    with pytest.raises(StateError, match="at least 16"):
        load_key()
