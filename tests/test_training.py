"""Meta-training (learning, exact resume, guards, time limit) and evaluation (scores, t-intervals, files)."""

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from agent.algorithms.base import TaskTensors
from agent.checkpoint import latest_good
from agent.config import Config, ConfigError
from agent.evaluation import evaluate, mean_t_interval, score_task, write_results
from agent.training import (TrainingError, apply_meta_gradient, build_setup, init_meta, load_meta, make_optimizer,
                            meta_train, sample_batch)


class Sinusoid:
    """A small sinusoid sampler (the MAML protocol), independent of agent.data."""

    def __init__(self, k_shot=5, k_query=5, nan=False):
        self.k_shot, self.k_query, self.nan = k_shot, k_query, nan

    def sample(self, rng):
        a, phase = rng.uniform(0.1, 5.0), rng.uniform(0, np.pi)
        x = rng.uniform(-5, 5, (self.k_shot + self.k_query, 1))
        y = a * np.sin(x + phase)
        if self.nan:
            y[:] = np.nan
        t = lambda v: torch.as_tensor(v, dtype=torch.float32)  # noqa: E731
        return TaskTensors(t(x[: self.k_shot]), t(y[: self.k_shot]), t(x[self.k_shot:]), t(y[self.k_shot:]), "regression")


FAMILIES = {"train": Sinusoid(), "val": Sinusoid()}


def config(**train):
    base = {"meta_batch": 4, "steps": 12, "outer_lr": 0.01, "val_every": 4, "val_tasks": 8, "checkpoint_every": 4}
    return Config.from_dict({"model": {"arch": "mlp", "hidden": [16, 16]},
                             "algorithm": {"name": "maml", "inner_lr": 0.01, "inner_steps": 1},
                             "data": {"family": "sinusoid", "k_shot": 5, "k_query": 5},
                             "train": {**base, **train}})


def same_meta(a, b):
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def without_time(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def test_sinusoid_maml_reduces_validation_loss(tmp_path):
    cfg = config(steps=400, meta_batch=8, val_every=400, val_tasks=32, checkpoint_every=0, outer_lr=0.01)
    result = meta_train(cfg, tmp_path, progress=False, families=FAMILIES)
    first, last = result.history[0], result.history[-1]
    assert (first["step"], last["step"], result.reason, result.skipped) == (0, 400, "done", 0)
    assert last["val_loss"] < 0.8 * first["val_loss"], result.history
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 400]
    assert latest_good(tmp_path / "checkpoints").step == 400


def test_resume_after_crash_equals_uninterrupted_run(tmp_path):
    cfg = config()
    whole = meta_train(cfg, tmp_path / "a", progress=False, families=FAMILIES)

    def crash(step, outcome):
        if step == 7:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        meta_train(cfg, tmp_path / "b", progress=False, families=FAMILIES, on_step=crash)
    assert latest_good(tmp_path / "b" / "checkpoints").step == 4  # the crash lost steps 5-7
    resumed = meta_train(cfg, tmp_path / "b", progress=False, families=FAMILIES)
    assert resumed.step == 12 and resumed.reason == "done"
    assert same_meta(whole.meta, resumed.meta)  # bit for bit
    assert without_time(whole.history) == without_time(resumed.history)
    a, b = latest_good(tmp_path / "a" / "checkpoints"), latest_good(tmp_path / "b" / "checkpoints")
    sa, sb = a.load("optimizer.pt")["state"], b.load("optimizer.pt")["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    metrics = [json.loads(l)["step"] for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert metrics == [0, 4, 8, 12]


def test_stop_and_resume_with_more_steps_in_float64(tmp_path):
    cfg = config(dtype="float64", steps=8, checkpoint_every=0)
    whole = meta_train(cfg, tmp_path / "a", progress=False, families=FAMILIES)
    part = meta_train(cfg, tmp_path / "b", progress=False, families=FAMILIES, max_steps=3)
    assert (part.step, part.reason) == (3, "max_steps")
    assert latest_good(tmp_path / "b" / "checkpoints").step == 3
    rest = meta_train(cfg, tmp_path / "b", progress=False, families=FAMILIES)
    assert rest.meta["params.head.weight"].dtype == torch.float64
    assert same_meta(whole.meta, rest.meta)
    # finished runs resume as a no-op; --no-resume starts again from scratch
    again = meta_train(cfg, tmp_path / "b", progress=False, families=FAMILIES)
    assert again.step == 8 and same_meta(again.meta, whole.meta)
    fresh = meta_train(config(dtype="float64", steps=2, checkpoint_every=0), tmp_path / "b", resume=False,
                       progress=False, families=FAMILIES)
    assert fresh.step == 2 and latest_good(tmp_path / "b" / "checkpoints").step == 2
    assert len(list((tmp_path / "b").glob("checkpoints.replaced-*"))) == 1


def test_resume_refuses_a_different_trajectory(tmp_path):
    meta_train(config(steps=2), tmp_path, progress=False, families=FAMILIES)
    with pytest.raises(ConfigError, match=r"^train.meta_batch: differs from the run being resumed"):
        meta_train(config(steps=4, meta_batch=5), tmp_path, progress=False, families=FAMILIES)
    longer = meta_train(config(steps=4), tmp_path, progress=False, families=FAMILIES)  # more steps is fine
    assert longer.step == 4


def test_non_finite_step_is_skipped_and_state_kept():
    setup = build_setup(config(), families=FAMILIES)
    meta = init_meta(setup)
    names = setup.algorithm.trainable(meta)
    opt = make_optimizer(setup.config, [meta[n] for n in names])
    good = sample_batch(FAMILIES["train"], 0, 0, 4)
    assert apply_meta_gradient(setup.algorithm, meta, opt, good).applied
    before = {k: v.detach().clone() for k, v in meta.items()}
    opt_before = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    bad = sample_batch(Sinusoid(nan=True), 0, 1, 4)
    outcome = apply_meta_gradient(setup.algorithm, meta, opt, bad)
    assert not outcome.applied and not math.isfinite(outcome.loss)
    assert same_meta(before, {k: v.detach() for k, v in meta.items()})
    assert all(torch.equal(opt_before[k], v) for k, v in opt.state_dict()["state"][0].items())
    # an update that overflows is undone (parameters and optimizer state restored)
    sgd = torch.optim.SGD([meta[n] for n in names], lr=3e38)
    assert not apply_meta_gradient(setup.algorithm, meta, sgd, good).applied
    assert same_meta(before, {k: v.detach() for k, v in meta.items()})


def test_too_many_bad_steps_abort(tmp_path):
    fams = {"train": Sinusoid(nan=True), "val": Sinusoid()}
    with pytest.raises(TrainingError, match="3 consecutive non-finite steps"):
        meta_train(config(max_bad_steps=3), tmp_path, progress=False, families=fams)


def test_time_limit_stops_with_a_checkpoint(tmp_path):
    result = meta_train(config(steps=10_000, time_limit_s=0.3, checkpoint_every=0), tmp_path, progress=False,
                        families=FAMILIES)
    assert result.reason == "time_limit" and 0 < result.step < 10_000
    assert latest_good(tmp_path / "checkpoints").step == result.step


def test_sampling_is_a_pure_function_of_seed_and_step():
    a = sample_batch(FAMILIES["train"], 3, 17, 2)
    b = sample_batch(FAMILIES["train"], 3, 17, 2)
    c = sample_batch(FAMILIES["train"], 3, 18, 2)
    assert torch.equal(a[1].query_y, b[1].query_y) and not torch.equal(a[1].query_y, c[1].query_y)


def test_threads_are_restored(tmp_path):
    before = torch.get_num_threads()
    meta_train(config(steps=1, threads=2), tmp_path, progress=False, families=FAMILIES)
    assert torch.get_num_threads() == before


# -- evaluation --------------------------------------------------------------------------------
def test_mean_t_interval_matches_scipy():
    x = np.random.default_rng(0).normal(2.0, 3.0, size=37)
    iv = mean_t_interval(x, 0.95)
    low, high = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert iv.low == pytest.approx(low, rel=1e-12) and iv.high == pytest.approx(high, rel=1e-12)
    assert mean_t_interval([1.0]).half_width == math.inf and mean_t_interval([]).n == 0
    diverged = mean_t_interval([1.0, math.inf])
    assert diverged.mean == math.inf and math.isnan(diverged.low)


def test_eval_scores_before_and_after_and_writes_files(tmp_path):
    result = meta_train(config(steps=20, checkpoint_every=0), tmp_path, progress=False, families=FAMILIES)
    ckpt = latest_good(tmp_path / "checkpoints")
    setup = build_setup(result_config := config(steps=20, checkpoint_every=0), families=FAMILIES)
    meta = load_meta(ckpt, setup.algorithm)
    assert same_meta({k: v.detach() for k, v in meta.items()}, {k: v.detach() for k, v in result.meta.items()})
    res = evaluate(setup.algorithm, meta, FAMILIES["val"], episodes=25, steps=[1, 5], seed=1)
    assert res.steps == [0, 1, 5] and len(res.rows) == 25
    assert res.summary["mse@0"].mean != res.summary["mse@5"].mean  # the inner loop ran
    col = [r["mse@5"] for r in res.rows]
    low, high = stats.t.interval(0.95, 24, loc=np.mean(col), scale=stats.sem(col))
    assert res.summary["mse@5"].low == pytest.approx(low) and res.summary["mse@5"].high == pytest.approx(high)
    # episodes are independent of how many run
    assert evaluate(setup.algorithm, meta, FAMILIES["val"], episodes=3, steps=[1, 5], seed=1).rows == res.rows[:3]
    paths = write_results(res, tmp_path / "eval", info={"config": result_config.data.family})
    rows = [json.loads(l) for l in paths["jsonl"].read_text().splitlines()]
    assert rows == res.rows
    assert paths["csv"].read_text().splitlines()[0] == "episode,loss@0,mse@0,loss@1,mse@1,loss@5,mse@5"
    summary = json.loads(paths["summary"].read_text())
    assert summary["summary"]["mse@5"]["n"] == 25 and summary["config"] == "sinusoid"


def test_score_task_classification_accuracy():
    from agent.algorithms import build
    from agent.nn import build_model

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g)
    task = TaskTensors(x, torch.tensor([0, 1, 2, 0, 1, 2]), x, torch.tensor([0, 1, 2, 0, 1, 2]))
    alg = build("maml", build_model("mlp", in_shape=(4,), out_dim=3, hidden=(8,)), inner_lr=0.5)
    meta = alg.init_meta(torch.Generator().manual_seed(0))
    row = score_task(alg, meta, task, [0, 10])
    assert set(row) == {"loss@0", "accuracy@0", "loss@10", "accuracy@10"}
    assert row["loss@10"] < row["loss@0"] and 0.0 <= row["accuracy@10"] <= 1.0


def test_sigint_stops_between_steps_with_a_checkpoint(tmp_path):
    import os
    import signal

    def interrupt(step, outcome):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    # the handler found before the run (default_int_handler in a terminal; SIG_IGN when the test
    # process was started in the background by a non-interactive shell)
    before = signal.getsignal(signal.SIGINT)
    result = meta_train(config(), tmp_path, progress=False, families=FAMILIES, on_step=interrupt)
    assert (result.reason, result.step) == ("signal", 3)
    assert latest_good(tmp_path / "checkpoints").step == 3
    assert signal.getsignal(signal.SIGINT) is before  # handler restored


def test_progress_bar_on_a_terminal(tmp_path):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    from agent.training import _Display

    term = Terminal()
    display = _Display(10, enabled=True, log_every=0, stream=term)
    display.update(1, 0.5, None)
    display.update(10, 0.25, {"val_loss": 0.125, "val_accuracy": 0.5})
    display.close()
    text = term.getvalue()
    assert text.startswith("\r[") and "10/10" in text and "steps/s" in text and "val 0.1250 acc 0.500" in text


def test_two_trainers_cannot_share_a_run_directory(tmp_path):
    import fcntl

    tmp_path.joinpath(".lock").touch()
    with open(tmp_path / ".lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another process's lock (flock locks are per open file)
        with pytest.raises(TrainingError, match="in use by another meta-training process"):
            meta_train(config(steps=1), tmp_path, progress=False, families=FAMILIES)
    assert meta_train(config(steps=1), tmp_path, progress=False, families=FAMILIES).step == 1


def test_frozen_norm_statistics_follow_the_training_data(tmp_path):
    """With ``norm: frozen`` the buffers are measured on support sets, not left at 0/1."""
    from agent.training import meta_train

    cfg = Config.from_dict({
        "model": {"arch": "conv4", "norm": "frozen", "width": 4},
        "algorithm": {"name": "fomaml", "inner_lr": 0.05, "inner_steps": 1},
        "data": {"family": "digits", "n_way": 3, "k_shot": 1, "k_query": 2},
        "train": {"meta_batch": 2, "steps": 2, "val_every": 0, "val_tasks": 2, "checkpoint_every": 0},
    })
    result = meta_train(cfg, tmp_path / "run", progress=False)
    means = [v for k, v in result.meta.items() if k.startswith("buffers.") and k.endswith("mean")]
    assert means and any(float(m.abs().max()) > 0 for m in means)
