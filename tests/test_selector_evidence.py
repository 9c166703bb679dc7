"""The selector's arm memory (per-arm k-NN evidence on the task embedding) and the agent's
counterfactual evaluations of the other arms: worked examples, a planted per-task preference the
global features cannot show, persistence, and the exactness of the counterfactual rewards."""

import math
import pickle
import random

import numpy as np
import pytest

from agent.agent import Agent
from agent.online.arm_memory import ArmMemory
from agent.online.selector import Arm, ContextualSelector, make_regressor
from agent.task import Task

from test_agent_online import cfg, sine


def test_estimate_is_the_weighted_neighbour_mean_shrunk_to_the_arm_mean():
    mem = ArmMemory(["a"], k=2, power=2.0, recency=0.1, prior=0.5)
    rows = [([1.0, 0.0], 1.0, 0), ([0.6, 0.8], 0.4, 2), ([0.0, 1.0], 0.0, 3)]
    for e, r, t in rows:
        assert mem.add(np.array(e), "a", r, t)
    q, now = np.array([3.0, 1.0]), 5  # unnormalised on purpose: cosine similarity
    u = q / np.linalg.norm(q)
    sims = np.array([np.dot(u, np.array(e) / np.linalg.norm(e)) for e, _, _ in rows])
    top = np.argsort(-sims)[:2]
    w = np.array([sims[i] ** 2 * math.exp(-0.1 * (now - rows[i][2])) for i in top])
    want = (w @ np.array([rows[i][1] for i in top]) + 0.5 * np.mean([r for _, r, _ in rows])) / (w.sum() + 0.5)
    est, ev = mem.estimate(q, now)["a"]
    assert est == pytest.approx(want, rel=1e-12) and ev == pytest.approx(w.sum(), rel=1e-12)


def test_capacity_overwrites_the_oldest_and_bad_input_is_refused():
    mem = ArmMemory(["a", "b"], k=5, capacity=3, recency=0.0)
    for t, r in enumerate([9.0, 1.0, 1.0, 1.0]):  # the 9.0 row is overwritten by the fourth
        mem.add(np.array([1.0, 0.0]), "a", r, t)
    assert len(mem) == 3
    est, ev = mem.estimate(np.array([1.0, 0.0]), 4)["a"]
    assert ev == pytest.approx(3.0) and est == pytest.approx((3.0 + 0.5 * 3.0) / 3.5)  # prior: mean of all 4 rows
    assert mem.estimate(np.array([1.0, 0.0]), 4)["b"] == (pytest.approx(math.nan, nan_ok=True), 0.0)
    assert not mem.add(np.zeros(2), "a", 1.0, 5) and not mem.add(np.array([1.0, 0.0]), "a", math.nan, 5)
    with pytest.raises(KeyError):
        mem.add(np.array([1.0, 0.0]), "c", 1.0, 5)
    with pytest.raises(ValueError, match="embedding"):
        mem.add(np.ones(3), "a", 1.0, 5)
    with pytest.raises(ValueError):
        ArmMemory(["a"], k=0)


ARMS = [Arm("maml", 5), Arm("ridge", 1), Arm("finetune", 10)]


def _clustered(seed, n, dim=8, clusters=6, stay=40):
    """Hidden tasks (clusters of the embedding), each lasting ``stay`` tasks; the best arm depends
    on the cluster only. The features ``x`` are pure noise: a regressor on them cannot see it."""
    rng = random.Random(seed)
    g = np.random.default_rng(seed)
    centres = g.normal(size=(clusters, dim))
    best = [i % len(ARMS) for i in range(clusters)]
    c = 0
    for t in range(n):
        if t % stay == 0:
            c = rng.randrange(clusters)
        emb = centres[c] + 0.1 * g.normal(size=dim)
        mu = {a: 0.6 + (0.2 if i == best[c] else 0.0) for i, a in enumerate(ARMS)}
        yield {"x": rng.gauss(0, 1)}, emb, mu, rng


def _play(sel, full_info, seed=0, n=1200):
    got = 0.0
    fixed = dict.fromkeys(ARMS, 0.0)
    oracle = 0.0
    for x, emb, mu, rng in _clustered(seed, n):
        arm = sel.choose(x, embedding=emb)
        sel.learn(x, arm, mu[arm] + rng.gauss(0, 0.05), embedding=emb)
        if full_info:
            for a in ARMS:
                if a != arm:
                    sel.learn(x, a, mu[a] + rng.gauss(0, 0.05), embedding=emb, pulled=False)
        got += mu[arm]
        oracle += max(mu.values())
        for a in ARMS:
            fixed[a] += mu[a]
    best = max(fixed.values())
    return (got - best) / (oracle - best)


def test_evidence_learns_a_per_task_preference_the_features_cannot_show():
    with_evidence = _play(ContextualSelector(ARMS, make_regressor("knn"), epsilon=0.0, burn_in=3, seed=0,
                                             evidence=True), full_info=True)
    without = _play(ContextualSelector(ARMS, make_regressor("knn"), epsilon=0.0, burn_in=3, seed=0), full_info=True)
    assert with_evidence >= 0.8, with_evidence
    assert without < 0.3, without
    # bandit feedback only (no counterfactual rows): still well above the best single arm
    bandit = _play(ContextualSelector(ARMS, make_regressor("knn"), epsilon=0.05, burn_in=3, seed=0, evidence=True),
                   full_info=False)
    assert bandit >= 0.3, bandit


def test_counterfactual_rows_are_learned_but_not_counted_as_pulls():
    sel = ContextualSelector(ARMS, burn_in=1, seed=0, evidence=True)
    emb = np.array([1.0, 0.0])
    sel.choose({}, embedding=emb)
    sel.learn({}, ARMS[1], 0.5, embedding=emb, pulled=False)
    assert sel.counts[ARMS[1]] == 0 and sel.n == 0 and sel.mean_reward[ARMS[1]].n == 1
    assert sel.evidence.estimate(emb, sel.tasks)[ARMS[1]][1] > 0


def test_pickle_round_trip_with_evidence_continues_identically():
    sel = ContextualSelector(ARMS, make_regressor("knn"), burn_in=2, seed=4, evidence=True)
    stream = list(_clustered(3, 200))
    for x, emb, mu, rng in stream[:120]:
        arm = sel.choose(x, embedding=emb)
        sel.learn(x, arm, mu[arm], embedding=emb)
    copy = pickle.loads(pickle.dumps(sel))
    for x, emb, mu, _ in stream[120:]:
        assert sel.predict(x, emb) == copy.predict(x, emb)
        a, b = sel.choose(x, embedding=emb), copy.choose(x, embedding=emb)
        assert a == b
        sel.learn(x, a, mu[a], embedding=emb)
        copy.learn(x, b, mu[b], embedding=emb)


def _tasks(n, seed, first=0):
    rng = np.random.default_rng(seed)
    return [sine(rng, first + i) for i in range(n)]


SEL = {"arms": ["maml@1", "maml@3", "ridge@1"], "burn_in": 1}
ARMS_CFG = {"in_shape": [1], "out_dim": 1, "arms": [{"algorithm": "maml"}, {"algorithm": "ridge"}]}
QUIET = {"failure": {"warmup": 5, "escalate": 1.0, "switch": 1.0, "fallback": 1.0, "abstain": 1.0},
         "drift": {"widen_tasks": 0}, "memory": {"capacity": 50, "warm_start": "off"}}


def test_agent_counterfactual_rewards_equal_what_each_arm_answers():
    """Each counterfactual row (arm, quality, steps) is exactly what that arm, answering the same task
    in an agent that only has it, scores: the evaluation is the real answer, at the same meta state."""
    tasks = _tasks(25, 1)
    agent = Agent.from_config(cfg(agent=ARMS_CFG, selector={**SEL, "counterfactual": 1.0}, **QUIET))
    rows = {}
    learn = agent.intel.learn_counterfactual

    def spy(x, got, lam, embedding=None):
        got = list(got)
        rows[len(rows)] = got
        return learn(x, got, lam, embedding)

    agent.intel.learn_counterfactual = spy
    agent.intel.journal = journal = []
    for t in tasks:
        agent.step(t)
    assert len(rows) == 25 and all(len(r) == 2 for r in rows.values())  # every other arm, every task
    fixed = {}
    for arm in SEL["arms"]:
        one = Agent.from_config(cfg(agent=ARMS_CFG, selector={**SEL, "arms": [arm], "counterfactual": 0.0}, **QUIET))
        one.intel.journal = j = []
        for t in tasks:
            one.step(t)
        fixed[arm] = [(r["quality"], r["compute"]) for r in j]
    for i, got in rows.items():
        assert journal[i]["arm"] not in {a for a, _, _ in got}
        for arm, quality, steps in got:
            assert (quality, steps) == pytest.approx(fixed[arm][i], abs=1e-9)
    st = agent.intel.status()["counterfactual"]
    assert st["tasks"] == 25 and st["steps"] == sum(s for r in rows.values() for _, _, s in r) > 0
    per_arm = {a: sum(s for r in rows.values() for b, _, s in r if b == a) for a in SEL["arms"]}
    exported = {a: agent.metrics.registry.get_sample_value("metaagent_selector_counterfactual_inner_steps_total",
                                                           {"arm": a}) for a in SEL["arms"]}
    assert exported == pytest.approx(per_arm) and sum(exported.values()) == pytest.approx(st["steps"])
    ev = agent.intel.selector.evidence
    assert all(ev._n[a] == 25 for a in ev.arms)  # the chosen arm's row plus the two counterfactual rows


def test_agent_counterfactual_share_and_off():
    tasks = _tasks(40, 2)
    off = Agent.from_config(cfg(agent=ARMS_CFG, selector={**SEL, "counterfactual": 0.0}, **QUIET))
    half = Agent.from_config(cfg(agent=ARMS_CFG, selector={**SEL, "counterfactual": 0.5}, **QUIET))
    noev = Agent.from_config(cfg(agent=ARMS_CFG, selector={**SEL, "evidence_k": 0}, **QUIET))
    for t in tasks:
        off.step(t)
        half.step(t)
        noev.step(t)
    assert off.intel.status()["counterfactual"] == {"tasks": 0, "steps": 0.0}
    assert 10 <= half.intel.status()["counterfactual"]["tasks"] <= 30
    assert noev.intel.selector.evidence is None and not noev.intel.uses_embedding
    single = Agent.from_config(cfg(agent=ARMS_CFG, selector={**SEL, "arms": ["maml@1"]}, **QUIET))
    assert not single.intel.uses_embedding and single.intel.counterfactual_arms("maml@1") == []
    assert sum(off.intel.selector.evidence._n.values()) == 40  # bandit feedback: one row per task


def test_agent_save_load_keeps_the_arm_memory(tmp_path, monkeypatch):
    monkeypatch.setenv("META_AGENT_STATE_KEY", "a test key of enough length")
    agent = Agent.from_config(cfg(agent=ARMS_CFG, selector=SEL, **QUIET))
    for t in _tasks(30, 3):
        agent.step(t)
    agent.save(tmp_path / "ck")
    clone = Agent.load(tmp_path / "ck")
    assert clone.intel.selector.evidence is not None and len(clone.intel.selector.evidence) == len(agent.intel.selector.evidence)
    for t in _tasks(10, 4, first=1000):
        a, b = agent.step(t), clone.step(t)
        assert (a.algorithm, a.budget, a.flags) == (b.algorithm, b.budget, b.flags)
        np.testing.assert_allclose(a.predictions, b.predictions, rtol=1e-6, atol=1e-7)
    assert agent.intel.status()["counterfactual"] == clone.intel.status()["counterfactual"]
    emb = np.ones(agent.memory.dim)
    assert agent.intel.selector.predict({}, emb) == clone.intel.selector.predict({}, emb)


def test_agent_counterfactuals_on_delayed_labels():
    rng = np.random.default_rng(5)
    agent = Agent.from_config(cfg(agent=ARMS_CFG, selector={**SEL, "counterfactual": 1.0}, **QUIET))
    tasks = [sine(rng, i, labels=False) for i in range(6)]
    full = [sine(np.random.default_rng(5), i) for i in range(6)]  # the same draws, with query labels
    for t in tasks:
        agent.step(t)
    assert agent.intel.status()["counterfactual"]["tasks"] == 0
    for t in full:
        assert agent.feedback(t.id, t.query_y) is not None
    st = agent.intel.status()["counterfactual"]
    assert st["tasks"] == 6 and st["steps"] > 0


def test_switch_alternative_uses_the_arm_memory_for_this_task():
    """The post-probe 'switch' picks the other arm as choosing does: by the arm memory's estimate for
    the task's embedding where there is one (the global regressors otherwise)."""
    arms = {"in_shape": [1], "out_dim": 1,
            "arms": [{"algorithm": "maml"}, {"algorithm": "ridge"}, {"algorithm": "finetune"}]}
    agent = Agent.from_config(cfg(agent=arms, selector={"arms": ["maml@1", "ridge@1", "finetune@5"], "burn_in": 1},
                                  **QUIET))
    intel, x = agent.intel, {"f": 1.0}
    near, far = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    for _ in range(5):  # globally finetune looks better; on tasks like `near` ridge did
        intel.selector.learn(x, Arm("finetune", 5), 0.9, embedding=far)
        intel.selector.learn(x, Arm("ridge", 1), 0.1, embedding=far)
    for t in range(5):  # rows of the arm memory only: the regressors never saw them
        intel.selector.evidence.add(near, Arm("ridge", 1), 0.95, t)
        intel.selector.evidence.add(near, Arm("finetune", 5), 0.05, t)
    assert str(intel.alternative(x, "maml")) == "finetune@5"
    assert str(intel.alternative(x, "maml", embedding=near)) == "ridge@1"
    assert str(intel.alternative(x, "maml", embedding=far)) == "finetune@5"
