"""The online intelligence wired into the Agent: selector, failure predictor and actions, drift,
A/B experiments, and authenticated persistence of the River state."""

import hashlib
import json
import logging
import os
import stat

import numpy as np
import pytest

from agent.agent import Agent
from agent.config import Config
from agent.online.selector import Arm
from agent.online.wiring import OnlineIntelligence
from agent.task import Task

BASE = {"model": {"arch": "mlp", "hidden": [16]}, "agent": {"in_shape": [1], "out_dim": 1},
        "compute": {"levels": [[1, 1], [3, 1]], "holdout": None}, "memory": {"capacity": 50},
        "online": {"replay": 1}}


def cfg(**sections):
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE.items()}
    for k, v in sections.items():
        out[k] = {**out.get(k, {}), **v} if isinstance(v, dict) else v
    return out


def sine(rng, i, amp=None, labels=True, k=8):
    a = rng.uniform(0.5, 2.0) if amp is None else amp
    phase = rng.uniform(0, np.pi)
    x, xq = rng.uniform(-5, 5, (k, 1)), rng.uniform(-5, 5, (k, 1))
    return Task(f"t{i:05d}", "regression", x, a * np.sin(x - phase), xq, a * np.sin(xq - phase) if labels else None)


def auc(scores, labels):
    s, y = np.asarray(scores), np.asarray(labels, dtype=bool)
    pos, neg = s[y], s[~y]
    return float(np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg]))


def test_selector_shifts_to_the_better_arm_per_family():
    # Two arms; family A rewards maml@1, family B rewards anil@3 (a cheap stub of the outcomes).
    config = Config.from_dict(cfg(agent={"in_shape": [1], "out_dim": 1, "arms": [{"algorithm": "maml"}, {"algorithm": "anil"}]},
                                  selector={"arms": ["maml@1", "anil@3"], "burn_in": 3}))
    intel = OnlineIntelligence(config, seed=0)
    rng = np.random.default_rng(0)
    picks = {0: [], 1: []}
    for t in range(600):
        fam = t % 2
        x = {"shots": 5.0 + 10 * fam + rng.normal(), "target_std": 1.0 + fam + 0.1 * rng.normal()}
        plan = intel.plan(f"s{t}", x)
        good = (plan.arm.algorithm == "maml") == (fam == 0)
        q = 0.8 if good else 0.4
        intel.learn(f"s{t}", x, str(plan.arm), q + 0.05 * rng.normal(), q < 0.5, plan.arm.budget, 0.0, {})
        if t >= 300:
            picks[fam].append(plan.arm.algorithm)
    best = {0: "maml", 1: "anil"}
    share = {f: np.mean([p == best[f] for p in picks[f]]) for f in picks}
    assert share[0] > 0.75 and share[1] > 0.75, share  # uniform would give 0.5


def test_failure_predictor_tracks_failures_after_warmup():
    # Wide sines whose query is shifted away fail (normalised MSE > 3); narrow consistent ones pass.
    agent = Agent.from_config(cfg(failure={"warmup": 30, "escalate": 1.0, "switch": 1.0, "fallback": 1.0, "abstain": 1.0},
                                  online={"enabled": False, "fail_threshold": 3.0}, drift={"enabled": False}))
    rng = np.random.default_rng(1)
    ps, fails = [], []
    for i in range(150):
        hard = rng.random() < 0.5
        amp = 5.0 if hard else 1.0
        x, xq = rng.uniform(-5, 5, (8, 1)), rng.uniform(-5, 5, (8, 1))
        task = Task(f"f{i}", "regression", x, amp * np.sin(x), xq, amp * np.sin(xq) + (10.0 if hard else 0.0))
        before = agent.counters["failures"]
        out = agent.step(task)
        if i >= 50:
            ps.append(out.p_fail)
            fails.append(agent.counters["failures"] > before)
    assert 0 < sum(fails) < len(fails)
    assert auc(ps, fails) > 0.6
    get = agent.registry.get_sample_value
    total = sum(get("metaagent_failure_predictions_total", {"predicted": p, "actual": a}) for p in ("true", "false")
                for a in ("true", "false"))
    assert total == 150
    assert get("metaagent_failure_predictor_rocauc", {"stage": "pre"}) > 0.6


def _run(agent, n, rng, **kw):
    return [agent.step(sine(rng, i, **kw)) for i in range(n)]


def test_abstain_threshold_flags_likely_wrong_and_counts():
    agent = Agent.from_config(cfg(failure={"warmup": 0, "escalate": 0.0, "switch": 0.0, "fallback": 0.0, "abstain": 0.0}))
    outs = _run(agent, 5, np.random.default_rng(2))
    assert all("likely_wrong" in o.flags for o in outs)
    assert agent.registry.get_sample_value("metaagent_decisions_total", {"action": "abstain"}) == 5


def test_switch_and_fallback_are_applied_and_counted():
    arms = {"in_shape": [1], "out_dim": 1, "arms": [{"algorithm": "maml"}, {"algorithm": "metasgd"}]}
    sw = Agent.from_config(cfg(agent=arms, selector={"arms": ["maml@1", "metasgd@1"], "burn_in": 2},
                               failure={"warmup": 0, "escalate": 0.0, "switch": 0.0, "fallback": 1.0, "abstain": 1.0}))
    outs = _run(sw, 4, np.random.default_rng(3))
    # burn-in plans maml twice; each is switched to metasgd and credited to it (the answering arm)
    assert [o.algorithm for o in outs[:2]] == ["metasgd", "metasgd"]
    assert sw.intel.selector.counts == {a: sum(o.algorithm == a.algorithm for o in outs) for a in (Arm("maml", 1), Arm("metasgd", 1))}
    assert all("switched" in o.flags for o in outs)
    assert sw.registry.get_sample_value("metaagent_decisions_total", {"action": "switch"}) == 4
    fb = Agent.from_config(cfg(agent=arms, selector={"arms": ["maml@1"]},
                               failure={"warmup": 0, "escalate": 0.0, "switch": 0.0, "fallback": 0.0, "abstain": 1.0,
                                        "safe_arm": "metasgd@3"}))
    outs = _run(fb, 4, np.random.default_rng(3))
    assert all(o.algorithm == "metasgd" and "fallback" in o.flags and o.budget["steps"] == 3 for o in outs)
    assert fb.registry.get_sample_value("metaagent_decisions_total", {"action": "fallback"}) == 4
    esc = Agent.from_config(cfg(selector={"arms": ["maml@1"]}, compute={"levels": [[1, 1], [3, 1], [5, 1]]},
                                failure={"warmup": 0, "escalate": 0.0, "switch": 1.0, "fallback": 1.0, "abstain": 1.0}))
    outs = _run(esc, 3, np.random.default_rng(3))  # pre-stage: 1 -> 3 steps; post-probe: 3 -> 5
    assert all("widened" in o.flags and "escalated" in o.flags and o.budget["steps"] == 5 for o in outs)
    assert esc.intel.status()["actions"]["escalate"] == 3


def test_planted_quality_drop_raises_a_drift_flag_and_metric():
    agent = Agent.from_config(cfg(online={"enabled": False}, memory={"enabled": False},
                                  compute={"levels": [[1, 1]], "holdout": None}, failure={"warmup": 1000}))
    rng = np.random.default_rng(4)
    flags = []
    for i in range(400):
        t = sine(rng, i, amp=1.0)
        if i >= 200:  # labels become unrelated noise: quality collapses
            t = Task(t.id, t.kind, t.support_x, t.support_y, t.query_x, 10 * rng.normal(size=t.query_y.shape))
        flags.append(agent.step(t).flags)
    drifted = [i for i, f in enumerate(flags) if "drift" in f]
    assert drifted and min(drifted) > 200, drifted
    get = agent.registry.get_sample_value
    assert get("metaagent_drift_events_total", {"signal": "quality", "detector": "adwin"}) >= 1
    assert agent.intel.widen_left > 0 or any("widened" in f for f in flags)


def _exp_agent(variants, n, seed):
    agent = Agent.from_config(cfg(online={"enabled": False}, memory={"enabled": False},
                                  compute={"levels": [[5, 1]], "holdout": None}, failure={"warmup": 10_000},
                                  drift={"enabled": False},
                                  experiments=[{"name": "exp", "variants": variants, "alpha": 0.05}]))
    rng = np.random.default_rng(seed)
    for i in range(n):
        agent.step(sine(rng, i, amp=1.0))
    return agent


def test_aa_experiment_declares_no_winner():
    agent = _exp_agent({"a": {}, "b": {}}, 150, 5)
    st = agent.status()["experiments"]["exp"]
    assert st["winner"] is None and sum(st["samples"].values()) == 150
    assert agent.registry.get_sample_value("metaagent_experiment_samples", {"experiment": "exp", "variant": "a"}) > 30


def test_planted_difference_is_detected():
    agent = _exp_agent({"a": {"inner_lr": 0.01}, "b": {"inner_lr": 0.3, "steps": 0}}, 250, 6)
    st = agent.status()["experiments"]["exp"]
    assert st["winner"] == "a", st
    get = agent.registry.get_sample_value
    assert get("metaagent_experiment_winner", {"experiment": "exp", "variant": "a"}) == 1
    assert get("metaagent_experiment_p_value", {"experiment": "exp", "variant": "b"}) <= 0.05


def test_save_load_round_trip_keeps_river_state(tmp_path, monkeypatch):
    monkeypatch.delenv("META_AGENT_STATE_KEY", raising=False)
    config = cfg(failure={"warmup": 5}, agent={"in_shape": [1], "out_dim": 1, "arms": [{"algorithm": "maml"},
                                                                                         {"algorithm": "anil"}]})
    agent = Agent.from_config(config)
    rng = np.random.default_rng(7)
    _run(agent, 20, rng)
    agent.save(tmp_path / "ck")
    key = tmp_path / "ck" / "state.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    clone = Agent.load(tmp_path / "ck")
    tasks = [sine(rng, 100 + i) for i in range(8)]
    a = [agent.step(t) for t in tasks]
    b = [clone.step(t) for t in tasks]
    for x, y in zip(a, b):
        assert (x.algorithm, x.budget, x.flags, x.p_fail) == (y.algorithm, y.budget, y.flags, y.p_fail)
        np.testing.assert_allclose(x.predictions, y.predictions, rtol=1e-6, atol=1e-7)
    assert agent.intel.selector.counts == clone.intel.selector.counts
    probe = {"difficulty": 0.3, "init_loss": 1.0}
    assert agent.intel.predictor.predict_pre(probe) == clone.intel.predictor.predict_pre(probe)


def test_tampered_river_state_is_refused_and_the_previous_checkpoint_used(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("META_AGENT_STATE_KEY", "a test key of enough length")
    agent = Agent.from_config(cfg())
    rng = np.random.default_rng(8)
    _run(agent, 5, rng)
    agent.save(tmp_path / "ck")
    agent.step(sine(rng, 99))
    agent.counters["records"] += 1  # the checkpoint step (records read from a stream)
    newest = agent.save(tmp_path / "ck")
    # an attacker who also rewrites the manifest: only the HMAC can tell
    path = newest / "online.state"
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0xFF
    path.write_bytes(bytes(blob))
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest["files"]["online.state"]["sha256"] = hashlib.sha256(bytes(blob)).hexdigest()
    (newest / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.ERROR, logger="agent.agent"):
        restored = Agent.load(tmp_path / "ck")
    assert restored.counters["tasks"] == 5
    assert any("refused" in r.getMessage() and "HMAC" in r.getMessage() for r in caplog.records)
    from agent.online.persist import StateError
    with pytest.raises(StateError):
        Agent.load(newest)
