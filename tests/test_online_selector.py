"""Selector: regret on a contextual environment, baselines, River bandit traps, determinism."""

import pickle
import random

import pytest
from river import bandit, proba

from agent.online.selector import (REGRESSORS, Arm, ContextFreeSelector, ContextualSelector, make_regressor, parse_arm,
                                   reward)

ARMS = [Arm("maml", 5), Arm("protonet", 0), Arm("anil", 10)]


def _env(seed, n):
    """No single arm is best everywhere: maml wins for a > 0, protonet for a < 0, anil in between."""
    rng = random.Random(seed)
    for _ in range(n):
        x = {"a": rng.gauss(0, 1), "b": rng.gauss(0, 1), "c": rng.uniform(0, 1)}
        mu = {ARMS[0]: 0.5 + 0.15 * x["a"], ARMS[1]: 0.5 - 0.15 * x["a"], ARMS[2]: 0.55 + 0.05 * x["b"]}
        yield x, mu, rng


def _run(sel, seed=0, n=3000):
    got, fixed, oracle = 0.0, dict.fromkeys(ARMS, 0.0), 0.0
    for x, mu, rng in _env(seed, n):
        arm = sel.choose(x)
        sel.learn(x, arm, mu[arm] + rng.gauss(0, 0.1))
        got += mu[arm]
        for a in ARMS:
            fixed[a] += mu[a]
        oracle += max(mu.values())
    return got / n, max(fixed.values()) / n, oracle / n, sum(fixed.values()) / len(ARMS) / n


@pytest.mark.parametrize("exploration", ["egreedy", "ucb"])
def test_contextual_selector_closes_half_the_gap_to_the_oracle(exploration):
    mean, best_single, oracle, uniform = _run(ContextualSelector(ARMS, exploration=exploration, seed=0))
    closed = (mean - best_single) / (oracle - best_single)
    assert closed >= 0.5, (mean, best_single, oracle)
    assert mean > uniform + 0.05
    # River's context-free baseline can at best match the best single arm
    base, *_ = _run(ContextFreeSelector(ARMS, "ucb", seed=0))
    assert base <= best_single + 0.005 < mean


def test_burn_in_is_round_robin_and_seeded_choices_repeat():
    sel = ContextualSelector(ARMS, burn_in=2, seed=3)
    first = []
    for _ in range(6):
        a = sel.choose({"a": 0.0})
        first.append(a)
        sel.learn({"a": 0.0}, a, 0.5)
    assert first == ARMS + ARMS
    runs = []
    for _ in range(2):
        s = ContextualSelector(ARMS, seed=7)
        runs.append([(a := s.choose(x), s.learn(x, a, mu[a]))[0] for x, mu, _ in _env(1, 300)])
    assert runs[0] == runs[1]


def test_boost_exploration_raises_random_pulls_for_a_while():
    sel = ContextualSelector(ARMS, epsilon=0.0, bonus=0.0, burn_in=1, seed=0)
    for a in ARMS:
        sel.learn({"a": 1.0}, a, 1.0 if a == ARMS[0] else 0.0)
    assert {sel.choose({"a": 1.0}) for _ in range(50)} == {ARMS[0]}
    sel.epsilon = 0.1
    sel.boost_exploration(10.0, duration=50)
    picks = [sel.choose({"a": 1.0}) for _ in range(50)]
    assert len(set(picks)) == 3 and sel.boost_remaining == 0
    assert sum(sel.choose({"a": 1.0}) != ARMS[0] for _ in range(100)) < 20


def test_reward_helper_and_arm_parsing():
    assert reward(0.8, 2.0, 0.1) == pytest.approx(0.6)
    assert reward(float("nan"), 0.0, 0.1) == -1.0
    assert parse_arm("maml@5") == Arm("maml", 5) and str(Arm("anil", 10)) == "anil@10"
    with pytest.raises(ValueError):
        ContextualSelector(["a@1", "a@1"])
    with pytest.raises(ValueError):
        ContextualSelector(ARMS).learn({}, ARMS[0], float("nan"))


# -- River traps --------------------------------------------------------------------------------

def test_trap_thompson_default_reward_obj_raises_but_wrapper_works():
    with pytest.raises(TypeError):
        bandit.ThompsonSampling().pull(["a", "b"])
    sel = ContextFreeSelector(ARMS, "thompson", seed=0)
    for _ in range(300):
        a = sel.choose({})
        sel.learn({}, a, 0.9 if a == ARMS[1] else 0.3)
    assert max(sel.counts, key=sel.counts.get) == ARMS[1]


def test_trap_beta_counts_any_truthy_reward_as_success():
    b = proba.Beta()
    b.update(0.3)
    assert b.alpha == 2  # River: 0.3 counted as a full success
    sel = ContextFreeSelector(["x@0"], "thompson", burn_in=0, seed=0)
    for _ in range(400):
        sel.learn({}, "x@0", 0.3)
    post = sel.policy._rewards["x@0"]
    mean = post.alpha / (post.alpha + post.beta)
    assert mean == pytest.approx(0.3, abs=0.06)  # Bernoulli-ised: the posterior mean tracks 0.3


def test_trap_burn_in_lands_in_reward_scaler():
    assert bandit.BayesUCB(burn_in=3).reward_scaler == 3  # the River bug
    sel = ContextFreeSelector(ARMS, "bayes_ucb", burn_in=3, seed=0)
    assert not sel.policy.reward_scaler and sel.policy.burn_in == 0  # (0: the default burn_in, harmless)
    picks = []
    for _ in range(9):
        a = sel.choose({})
        picks.append(a)
        sel.learn({}, a, 0.5)
    assert picks == ARMS * 3


def test_trap_exp3_update_on_arm_it_never_drew():
    with pytest.raises(KeyError):
        bandit.Exp3(gamma=0.1).update("a", 1.0)
    sel = ContextFreeSelector(ARMS, "exp3", burn_in=1, seed=0, reward_range=(-1.0, 1.0))
    for a in ARMS:  # burn-in pulls do not go through Exp3._pull
        assert sel.choose({}) == a
        sel.learn({}, a, 0.5)
    sel.learn({}, ARMS[2], 0.5)  # a delayed update for an arm chosen elsewhere
    for _ in range(300):
        a = sel.choose({})
        sel.learn({}, a, 0.9 if a == ARMS[0] else -0.5)
    assert max(sel.counts, key=sel.counts.get) == ARMS[0]


@pytest.mark.parametrize("policy", ["ucb", "epsilon_greedy", "random"])
def test_context_free_policies_run(policy):
    sel = ContextFreeSelector(ARMS, policy, seed=0)
    for _ in range(100):
        a = sel.choose({"ignored": 1.0})
        sel.learn({}, a, 0.5)
    assert sel.n == 100 and sum(sel.counts.values()) == 100


@pytest.mark.parametrize("make", [lambda: ContextualSelector(ARMS, seed=0), lambda: ContextFreeSelector(ARMS, "thompson", seed=0),
                                  lambda: ContextualSelector(ARMS, make_regressor("arf", 0), seed=0),
                                  lambda: ContextualSelector(ARMS, make_regressor("knn"), seed=0)])
def test_pickle_round_trip_continues_identically(make):
    sel = make()
    for x, mu, _ in _env(2, 200):
        a = sel.choose(x)
        sel.learn(x, a, mu[a])
    copy = pickle.loads(pickle.dumps(sel))
    for x, mu, _ in _env(3, 200):
        a, b = sel.choose(x), copy.choose(x)
        assert a == b
        sel.learn(x, a, mu[a])
        copy.learn(x, b, mu[b])


def _band_env(seed, n):
    """Arm 0 wins for |a| > 1, arm 1 inside: not linear in ``a``, so a linear model cannot separate them."""
    rng = random.Random(seed)
    for _ in range(n):
        x = {"a": rng.gauss(0, 1.2), "b": rng.gauss(0, 1)}
        outer = abs(x["a"]) > 1.0
        mu = {ARMS[0]: 0.7 if outer else 0.4, ARMS[1]: 0.4 if outer else 0.7, ARMS[2]: 0.5}
        yield x, mu, rng


@pytest.mark.parametrize("name", ["arf", "knn"])
def test_nonlinear_regressors_beat_the_linear_model_on_a_band_context(name):
    def run(sel):
        got = oracle = 0.0
        for x, mu, rng in _band_env(0, 1500):
            arm = sel.choose(x)
            sel.learn(x, arm, mu[arm] + rng.gauss(0, 0.05))
            got += mu[arm]
            oracle += max(mu.values())
        return got / 1500, oracle / 1500
    lin, oracle = run(ContextualSelector(ARMS, make_regressor("linear"), seed=0))
    got, _ = run(ContextualSelector(ARMS, make_regressor(name, 0), seed=0))
    assert got > lin + 0.05, (got, lin, oracle)
    assert got > oracle - 0.08, (got, oracle)


def test_make_regressor_names_and_bad_name():
    assert set(REGRESSORS) == {"linear", "arf", "knn"}
    with pytest.raises(ValueError, match="selector.model"):
        make_regressor("svm")


@pytest.mark.parametrize("name", ["linear", "arf", "knn"])
def test_config_model_reaches_the_selector(name):
    from agent.config import Config, with_overrides
    from agent.online.wiring import OnlineIntelligence
    cfg = with_overrides(Config(), {"selector.model": name, "selector.arms": ["maml@1", "maml@5"]})
    intel = OnlineIntelligence(cfg)
    model = intel.selector.models[Arm("maml", 1)]
    assert type(make_regressor(name)).__name__ == type(model).__name__


def test_single_arm_chooses_without_predicting():
    """With one arm there is nothing to choose: no per-arm prediction runs (it was most of the
    River cost per task in the daemon), the arm still learns and is counted."""
    sel = ContextualSelector(["maml@0"], seed=0, burn_in=1)
    calls = []
    model = sel.models[sel.arms[0]]
    real = model.predict_one
    model.predict_one = lambda x: calls.append(x) or real(x)
    for t in range(20):
        arm = sel.choose({"shots": float(t)})
        sel.learn({"shots": float(t)}, arm, 0.5)
    assert str(sel.choose({"shots": 1.0}, explore=False)) == "maml@0"
    assert calls == [] and sel.counts[sel.arms[0]] == 20
    two = ContextualSelector(["maml@0", "ridge@0"], seed=0, burn_in=1)
    seen = []
    for a in two.arms:
        m = two.models[a]
        m.predict_one = (lambda r: lambda x: seen.append(x) or r(x))(m.predict_one)
    for t in range(5):
        two.learn({"shots": 1.0}, two.choose({"shots": 1.0}), 0.5)
    assert seen  # with a choice to make, the arms are predicted
