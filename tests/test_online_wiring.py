"""OnlineIntelligence's credit assignment: the arm that answered is what learns (issue 4 gaps).

After a post-probe switch/fallback (or an escalation of a fixed-budget arm) the answer comes from
another (algorithm, budget) than the plan's arm: the selector must learn that arm's reward with that
attempt's compute, and the failure predictor must learn the label with the answering arm's
features, never with the first attempt's probe features."""

import math

import numpy as np
import pytest

from agent.agent import Agent
from agent.config import Config
from agent.online.selector import Arm, ContextFreeSelector, ContextualSelector
from agent.online.wiring import OnlineIntelligence, arm_features
from agent.task import Task

AGENT = {"in_shape": [1], "out_dim": 1, "arms": [{"algorithm": "maml"}, {"algorithm": "anil"}]}


def intel(**sections) -> OnlineIntelligence:
    d = {"agent": AGENT, "compute": {"levels": [[1, 1], [5, 1]]}, "selector": {"arms": ["maml@1", "anil@5"], "burn_in": 1}}
    d.update(sections)
    return OnlineIntelligence(Config.from_dict(d), seed=0)


def test_arm_features_one_hot_and_steps():
    f = arm_features({"a": 2.0}, "anil", 0, ["maml", "anil"])
    assert f == {"a": 2.0, "alg=maml": 0.0, "alg=anil": 1.0, "arm_log_steps": 0.0}
    assert arm_features({}, "maml", 10, ["maml"])["arm_log_steps"] == pytest.approx(math.log(11))


def test_p_pre_is_the_failure_probability_of_the_planned_arm():
    # maml@1 always fails, anil@5 never: the same task features, different arms.
    oi = intel(selector={"arms": ["maml@1", "anil@5"], "burn_in": 1, "epsilon": 0.5})
    rng = np.random.default_rng(0)
    for t in range(400):
        x = {"z": float(rng.normal())}
        plan = oi.plan(f"t{t}", x)
        oi.post(f"t{t}", x, {"probe": 0.0}, plan)
        info = oi.record(f"t{t}", plan, x, plan.arm.algorithm, plan.arm.budget, plan.arm.budget, plan.arm.budget, 0.5)
        failed = plan.arm.algorithm == "maml"
        oi.learn(f"t{t}", info["x"], info["arm"], 0.2 if failed else 0.9, failed, info["compute"], 0.0, {})
    x = {"z": 0.0}
    p = {a.algorithm: oi.predictor.predict_pre(arm_features(x, a.algorithm, a.budget, ["maml", "anil"])) for a in oi.arms}
    assert p["maml"] > 0.8 and p["anil"] < 0.2, p
    assert oi.predictor.summary()["pre"]["rocauc"] > 0.9


def test_switch_credits_the_answering_arm_and_revises_the_predictor_entry():
    oi = intel()
    oi.journal = []
    x = {"z": 1.0}
    plan = oi.plan("a", x)
    assert plan.arm == Arm("maml", 1) and plan.features["alg=maml"] == 1.0
    oi.post("a", x, {"probe": 3.0}, plan)
    assert oi.predictor.pending["a"].x_post is not None
    # switched: anil answered with 5 steps; 1 + 5 calls spent in all
    info = oi.record("a", plan, x, "anil", 5, 5, 6, 0.9)
    assert info["arm"] == "anil@5" and info["compute"] == 5.0 and info["total_compute"] == 6.0 and info["planned"] == "maml@1"
    entry = oi.predictor.pending["a"]
    assert entry.x_pre["alg=anil"] == 1.0 and entry.x_pre["alg=maml"] == 0.0 and entry.x_post is None and entry.p_post is None
    oi.learn("a", info["x"], info["arm"], 0.7, False, info["compute"], 0.01, {})
    assert oi.selector.counts == {Arm("maml", 1): 0, Arm("anil", 5): 1}
    assert oi.reward_n == {"maml@1": 0, "anil@5": 1} and oi.mean_reward("anil@5") == pytest.approx(0.7 - 0.05)
    assert oi.predictor.n_learned == {"pre": 1, "post": 0}
    assert oi.journal[0]["arm"] == "anil@5" and oi.journal[0]["p_post"] is None and oi.journal[0]["reward"] == pytest.approx(0.65)


def test_unswitched_answer_keeps_the_plan_and_both_stages():
    oi = intel()
    x = {"z": 1.0}
    plan = oi.plan("a", x)
    oi.post("a", x, {"probe": 3.0}, plan)
    info = oi.record("a", plan, x, "maml", 1, 1, 1, 0.1)
    assert info["arm"] == "maml@1" and info["compute"] == 1.0
    oi.learn("a", info["x"], info["arm"], 0.7, False, info["compute"], 0.0, {})
    assert oi.predictor.n_learned == {"pre": 1, "post": 1} and oi.selector.counts[Arm("maml", 1)] == 1


def test_escalation_outside_the_arms_teaches_the_predictor_but_not_the_selector():
    oi = intel(selector={"arms": ["maml@1", "anil@5"], "burn_in": 0})
    x = {"z": 1.0}
    plan = oi.plan("a", x)
    plan_arm = plan.arm
    oi.post("a", x, {"probe": 3.0}, plan)
    steps = 7 if plan_arm.algorithm == "maml" else 9  # a budget that is no arm's
    info = oi.record("a", plan, x, plan_arm.algorithm, steps, steps, steps + plan_arm.budget, 0.9)
    assert info["arm"] is None
    assert oi.predictor.pending["a"].x_pre["arm_log_steps"] == pytest.approx(math.log1p(steps))
    oi.learn("a", info["x"], info["arm"], 0.7, False, info["compute"], 0.0, {})
    assert sum(oi.selector.counts.values()) == 0 and oi.predictor.n_learned["pre"] == 1


def test_adaptive_arm_keeps_credit_for_its_escalation_with_the_total_compute():
    oi = intel(selector={"arms": ["maml@0"]})
    x = {"z": 1.0}
    plan = oi.plan("a", x)
    oi.post("a", x, {"probe": 3.0}, plan)
    info = oi.record("a", plan, x, "maml", 5, 5, 6, 0.9)  # probe at 1 step, escalated to 5
    assert info["arm"] == "maml@0" and info["compute"] == 6.0
    assert oi.predictor.pending["a"].x_post is not None  # same arm: the probe describes it


@pytest.mark.parametrize("make", [lambda arms: ContextualSelector(arms, burn_in=2, seed=0),
                                  lambda arms: ContextFreeSelector(arms, "ucb", burn_in=2, seed=0)])
def test_burn_in_round_robin_counts_choices_while_labels_are_pending(make):
    arms = ["a@1", "b@1", "c@1"]
    sel = make(arms)
    picks = [str(sel.choose({"x": 1.0})) for _ in range(6)]  # no label arrives in between
    assert picks == arms + arms


def test_agent_switch_never_trains_the_post_stage_on_the_first_attempt():
    config = {"model": {"arch": "mlp", "hidden": [16]}, "agent": {**AGENT, "arms": [{"algorithm": "maml"}, {"algorithm": "metasgd"}]},
              "compute": {"levels": [[1, 1], [3, 1]], "holdout": None}, "memory": {"capacity": 50, "warm_start": "off"}, "online": {"replay": 1},
              "selector": {"arms": ["maml@1", "metasgd@1"], "burn_in": 2},
              "failure": {"warmup": 0, "escalate": 0.0, "switch": 0.0, "fallback": 1.0, "abstain": 1.0}}
    agent = Agent.from_config(config)
    agent.intel.journal = []
    rng = np.random.default_rng(0)
    for i in range(6):
        x, xq = rng.uniform(-5, 5, (8, 1)), rng.uniform(-5, 5, (8, 1))
        out = agent.step(Task(f"t{i}", "regression", x, np.sin(x), xq, np.sin(xq)))
        assert "switched" in out.flags
        row = agent.intel.journal[-1]
        assert row["arm"] == f"{out.algorithm}@1" and row["compute"] == out.budget["steps"] == 1
    assert agent.intel.predictor.n_learned == {"pre": 6, "post": 0}


def test_input_drift_flags_a_covariate_shift_without_any_label():
    from agent.config import ConfigError

    config = {"model": {"arch": "mlp", "hidden": [16]}, "agent": {"in_shape": [1], "out_dim": 1},
              "compute": {"levels": [[1, 1]], "holdout": None}, "memory": {"enabled": False}, "online": {"enabled": False},
              "drift": {"widen_tasks": 0}}
    agent = Agent.from_config(config)
    rng = np.random.default_rng(5)
    flagged = []
    for i in range(600):
        x = rng.uniform(-5, 5, (10, 1))
        y = np.sin(x) if i < 300 else 20 * x + 5  # a new family from task 300; labels never come
        out = agent.step(Task(f"t{i}", "regression", x, y, rng.uniform(-5, 5, (5, 1))))
        if "drift" in out.flags:
            flagged.append(i)
    assert flagged and all(300 <= i < 400 for i in flagged), flagged
    assert agent.intel.drift.n_updates == 0 and agent.intel.drift.n_detections["input"] == len(flagged)
    assert agent.registry.get_sample_value("metaagent_drift_events_total", {"signal": "input", "detector": "adwin"}) == len(flagged)
    with pytest.raises(ConfigError, match="drift.input_detector"):
        Config.from_dict({"drift": {"input_detector": "hddm_a"}})
    with pytest.raises(ValueError, match="drift.input_feature"):
        OnlineIntelligence(Config.from_dict({"drift": {"input_feature": "shoe_size"}}))


def test_an_arm_chosen_but_never_credited_is_not_scored_as_untried():
    # Its answers always went to another arm (switched away): an infinite "untried" score would
    # make the selector choose it forever.
    sel = ContextualSelector(["a@1", "b@1"], burn_in=1, epsilon=0.0, seed=0)
    assert sel.choose({"x": 1.0}) == Arm("a", 1)  # burn-in: a first; its answer is credited to b
    sel.learn({"x": 1.0}, "b@1", 0.5)
    sc = sel.scores({"x": 1.0})
    assert math.isfinite(sc[Arm("a", 1)]) and math.isfinite(sc[Arm("b", 1)])


def test_failure_predictor_pending_store_is_bounded_like_the_agents():
    # An unlabelled task the agent dropped from its pending table can never be learned from, so
    # the predictor keeps no more than the agent does (plus one micro-batch).
    config = {"model": {"arch": "mlp", "hidden": [8]}, "agent": {**AGENT, "micro_batch": 2},
              "limits": {"pending_max": 5}}
    agent = Agent.from_config(config)
    assert agent.intel.predictor.max_pending == 7
    rng = np.random.default_rng(0)
    for i in range(20):
        x, xq = rng.uniform(-5, 5, (6, 1)), rng.uniform(-5, 5, (4, 1))
        agent.step(Task(f"u{i}", "regression", x, np.sin(x), xq, None))
    assert len(agent.pending) == 5 and len(agent.intel.predictor.pending) <= 7
