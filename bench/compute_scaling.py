"""Test-time compute scaling: sinusoid query MSE against mean inner-step units (issue 3).

A sinusoid MAML (``configs/sinusoid-maml.yaml``: MLP 1-40-40-1, second order, 1 inner step at
lr 0.01, K=10) is meta-trained for ``--train-seconds`` with ``agent.training.meta_train`` and
used as the meta-initialisation. On the fixed test tasks (``agent.data.sinusoid.fixed_test_set``,
seed 12345, query = 100-point grid on [-5, 5]) at K=5 and K=10 every task is adapted with

* **plain** fixed budgets of 1, 2, 5, 10, 20 inner steps (``algorithm.step``, no guard; one
  20-step trajectory scored at each budget; units = steps);
* **guarded** fixed budgets 1, 2, 5, 10, 20 (``agent.compute.guarded_adapt(max_steps=b)``:
  backtracking, plateau stop with the library defaults, best-so-far; units = ``step_calls``,
  rejected backtrack steps included);
* **agent-style** adaptive: the agent's own ``Difficulty`` (running z-score of the log normalised
  initial support loss, fed task by task) mapped by ``choose_budget`` onto the shipped step
  levels 1/5/10 (members 1), then ``guarded_adapt``;
* **adaptive (tuned)**: a difficulty-driven step budget plus early stopping. Difficulty = the
  empirical CDF of the *absolute* initial support loss (the MSE at the meta-init: large-amplitude
  sines have large losses and gain the most from extra steps), thresholds and the three step
  levels given to ``BudgetLevels``/``choose_budget``, then ``guarded_adapt`` with a looser plateau
  rule (``min_rel_improvement``). The thresholds (as quantiles), step levels and plateau rule are
  picked on a separate **calibration** set (seed 777, never the test tasks): the largest
  calibration gain whose mean units are <= 45% of the best fixed budget's, with no divergence.

A task **diverged** when its query MSE is non-finite or more than 10x its own plain 1-step MSE.
The goal check (issue 3): the adaptive policy reaches >= 90% of the best fixed budget's gain over
1 step (gain = mean MSE(plain 1 step) - mean MSE(row)) at <= 50% of that row's mean units, with
zero diverged tasks. The initial-loss forward pass the adaptive policies spend (and the support
loss evaluations of the guards) are forward passes, not inner steps, and are not counted in units.

    python bench/compute_scaling.py --train-seconds 90 --out bench/results/compute_scaling.json
"""

from __future__ import annotations

import itertools
import math
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent), str(_HERE)]

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402
from agent.agent import Difficulty  # noqa: E402
from agent.compute import Budget, BudgetLevels, choose_budget, guarded_adapt  # noqa: E402
from agent.config import load, with_overrides  # noqa: E402
from agent.data.sinusoid import fixed_test_set  # noqa: E402
from agent.stats import mean_ci  # noqa: E402
from agent.training import meta_train  # noqa: E402

CONFIG = _HERE.parent / "configs" / "sinusoid-maml.yaml"
BUDGETS = (1, 2, 5, 10, 20)
DIVERGE_FACTOR = 10.0
CALIB_SEED = 777
TEST_SEED = 12345
UNITS_SHARE_FOR_TUNING = 0.45  # the tuner aims below the goal's 50% to leave a margin


# -- meta-training (shared with the other issue-3 benches) -----------------------------------
def train_sinusoid_maml(seconds: float, seed: int, threads: int, out_dir: str | Path):
    """Meta-train the sinusoid MAML into ``out_dir`` (a run dir ``agent.init_checkpoint`` accepts)."""
    cfg = with_overrides(load(CONFIG), {
        "train.steps": 10**9, "train.time_limit_s": float(seconds), "train.val_every": 0, "train.val_tasks": 20,
        "train.checkpoint_every": 0, "train.seed": seed, "train.threads": threads, "train.use_vmap": True,
    })
    return meta_train(cfg, out_dir, resume=False, progress=False, log_every=0)


# -- per-task pieces ---------------------------------------------------------------------------
def query_mse(alg, meta, state, t) -> float:
    with torch.no_grad():
        v = float(torch.nn.functional.mse_loss(alg.predict(meta, state, t.query_x), t.query_y))
    return v if math.isfinite(v) else math.inf


def init_loss(alg, meta, t) -> float:
    with torch.no_grad():
        return float(alg.support_loss(meta, alg.start(meta, t), t))


def plain_curve(alg, meta, t) -> dict[int, float]:
    """Query MSE after each budget in BUDGETS along one unguarded trajectory."""
    out, state = {}, alg.start(meta, t)
    for s in range(1, max(BUDGETS) + 1):
        state = alg.step(meta, state, t)
        if s in BUDGETS:
            out[s] = query_mse(alg, meta, state, t)
    return out


def run_guarded(alg, meta, t, max_steps: int, **guard) -> tuple[float, int]:
    state, trace = guarded_adapt(alg, meta, t, max_steps, **guard)
    return query_mse(alg, meta, state, t), trace.step_calls


class TunedPolicy:
    """Difficulty = empirical CDF of the initial support loss on calibration tasks; levels by
    ``choose_budget``; guarded adaptation with a plateau rule."""

    def __init__(self, calib_losses, quantiles, steps, min_rel, patience=2):
        self.sorted = np.sort(np.asarray(calib_losses, dtype=float))
        self.levels = BudgetLevels(tuple(Budget(s) for s in steps), tuple(quantiles))
        self.quantiles, self.steps, self.min_rel, self.patience = tuple(quantiles), tuple(steps), min_rel, patience

    def difficulty(self, l0: float) -> float:
        if not math.isfinite(l0):
            return 1.0
        return float(np.searchsorted(self.sorted, l0, side="right")) / max(len(self.sorted), 1)

    def __call__(self, alg, meta, t) -> tuple[float, int]:
        budget = choose_budget(self.difficulty(init_loss(alg, meta, t)), self.levels, math.inf).budget
        return run_guarded(alg, meta, t, budget.steps, patience=self.patience, min_rel_improvement=self.min_rel)

    def describe(self) -> str:
        q = "/".join(f"{x:.2f}" for x in self.quantiles)
        s = "/".join(str(x) for x in self.steps)
        return f"init-loss quantiles {q} -> max steps {s}; plateau min_rel {self.min_rel}, patience {self.patience}"


def agent_style(alg, meta, tasks) -> tuple[list[float], list[int]]:
    """The agent's own policy in a stream: Difficulty (running) -> choose_budget on steps 1/5/10."""
    levels = BudgetLevels((Budget(1), Budget(5), Budget(10)))
    diff = Difficulty()
    mses, units = [], []
    for t in tasks:
        l0 = init_loss(alg, meta, t)
        var = float(t.support_y.float().var(unbiased=False))
        d = diff.update(l0 / max(var, 1e-6) if math.isfinite(l0) else math.inf)
        b = choose_budget(d, levels, math.inf).budget
        m, u = run_guarded(alg, meta, t, b.steps)
        mses.append(m)
        units.append(u)
    return mses, units


# -- evaluation --------------------------------------------------------------------------------
def fixed_rows(alg, meta, tasks) -> dict[str, dict]:
    rows = {f"plain {b}": {"mse": [], "units": []} for b in BUDGETS}
    rows.update({f"guarded {b}": {"mse": [], "units": []} for b in BUDGETS})
    for t in tasks:
        curve = plain_curve(alg, meta, t)
        for b in BUDGETS:
            rows[f"plain {b}"]["mse"].append(curve[b])
            rows[f"plain {b}"]["units"].append(b)
            m, u = run_guarded(alg, meta, t, b)
            rows[f"guarded {b}"]["mse"].append(m)
            rows[f"guarded {b}"]["units"].append(u)
    return rows


def summarise(row: dict, one_step: np.ndarray) -> dict:
    v = np.asarray(row["mse"], dtype=float)
    u = np.asarray(row["units"], dtype=float)
    finite = v[np.isfinite(v)]
    ci = mean_ci(finite) if finite.size >= 2 else None
    diverged = int(np.sum(~np.isfinite(v) | (v > DIVERGE_FACTOR * one_step)))
    mean_all = float(np.mean(v)) if np.all(np.isfinite(v)) else math.inf
    return {"mean_mse": mean_all, "mean_finite": ci.mean if ci else float("nan"),
            "half_width": ci.half_width if ci else float("nan"),
            "median": float(np.median(finite)) if finite.size else float("nan"),
            "non_finite": int(v.size - finite.size), "diverged": diverged, "mean_units": float(np.mean(u)),
            "max_units": float(np.max(u))}


def best_fixed(summary: dict, base: float) -> tuple[str, float]:
    gains = {name: base - s["mean_mse"] for name, s in summary.items()
             if name.startswith(("plain", "guarded")) and math.isfinite(s["mean_mse"])}
    name = max(gains, key=lambda n: (gains[n], -summary[n]["mean_units"]))
    return name, gains[name]


def tune(alg, meta, calib, log) -> TunedPolicy:
    rows = fixed_rows(alg, meta, calib)
    one = np.asarray(rows["plain 1"]["mse"], dtype=float)
    summ = {n: summarise(r, one) for n, r in rows.items()}
    base = summ["plain 1"]["mean_mse"]
    best, best_gain = best_fixed(summ, base)
    cap = UNITS_SHARE_FOR_TUNING * summ[best]["mean_units"]
    losses = [init_loss(alg, meta, t) for t in calib]
    grid_q = [(0.3, 0.6), (0.4, 0.7), (0.5, 0.8), (0.6, 0.85)]
    grid_s = [(1, 5, 20), (1, 10, 20), (2, 10, 20), (1, 5, 10)]
    grid_r = [0.01, 0.03]
    chosen, chosen_key = None, None
    for q, s, r in itertools.product(grid_q, grid_s, grid_r):
        pol = TunedPolicy(losses, q, s, r)
        res = [pol(alg, meta, t) for t in calib]
        m = np.array([x[0] for x in res])
        u = float(np.mean([x[1] for x in res]))
        div = int(np.sum(~np.isfinite(m) | (m > DIVERGE_FACTOR * one)))
        gain = base - float(np.mean(m)) if np.all(np.isfinite(m)) else -math.inf
        ok = div == 0 and u <= cap
        key = (ok, gain if ok else -u)
        if chosen_key is None or key > chosen_key:
            chosen, chosen_key = pol, key
    log(f"  calibration ({len(calib)} tasks, seed {CALIB_SEED}): best fixed {best} gain {best_gain:.4f} at "
        f"{summ[best]['mean_units']:.2f} units; picked: {chosen.describe()}")
    return chosen


def num(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4f}" if abs(x) < 1000 else f"{x:.3g}"


def evaluate_k(alg, meta, k: int, n_test: int, n_calib: int, log) -> dict:
    calib = fixed_test_set("sinusoid", n_tasks=n_calib, seed=CALIB_SEED, grid=100, k_shot=k)
    tasks = fixed_test_set("sinusoid", n_tasks=n_test, seed=TEST_SEED, grid=100, k_shot=k)
    t0 = time.perf_counter()
    policy = tune(alg, meta, calib, log)
    rows = fixed_rows(alg, meta, tasks)
    m, u = agent_style(alg, meta, tasks)
    rows["agent-style 1/5/10"] = {"mse": m, "units": u}
    res = [policy(alg, meta, t) for t in tasks]
    rows["adaptive (tuned)"] = {"mse": [x[0] for x in res], "units": [x[1] for x in res]}
    one = np.asarray(rows["plain 1"]["mse"], dtype=float)
    summ = {n: summarise(r, one) for n, r in rows.items()}
    base = summ["plain 1"]["mean_mse"]
    best, best_gain = best_fixed(summ, base)
    for s in summ.values():
        s["gain"] = base - s["mean_mse"]
        s["share_of_best_gain"] = s["gain"] / best_gain if best_gain > 0 else float("nan")
        s["units_vs_best"] = s["mean_units"] / summ[best]["mean_units"]
    ad = summ["adaptive (tuned)"]
    passed = ad["share_of_best_gain"] >= 0.9 and ad["units_vs_best"] <= 0.5 and ad["diverged"] == 0
    log(f"  K={k}: evaluated {n_test} test tasks in {time.perf_counter() - t0:.1f} s")
    return {"rows": summ, "best_fixed": best, "best_gain": best_gain, "base_mse": base,
            "policy": policy.describe(), "goal_pass": bool(passed), "n_tasks": n_test}


def main(argv=None) -> int:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--train-seconds", type=float, default=90.0, help="meta-training wall-time budget")
    p.add_argument("--test-tasks", type=int, default=1000)
    p.add_argument("--calib-tasks", type=int, default=200)
    args = p.parse_args(argv)
    if args.quick:
        args.train_seconds, args.test_tasks, args.calib_tasks = min(args.train_seconds, 1.0), 10, 6
    common.setup_threads(args.threads)
    info = common.print_header("bench/compute_scaling.py: sinusoid MSE against test-time compute", args)
    log = lambda s: print(s, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="bench-compute-") as out:
        log(f"meta-training sinusoid MAML for {args.train_seconds:.0f} s ...")
        res = train_sinusoid_maml(args.train_seconds, args.seed, args.threads, out)
    log(f"  {res.step} meta-steps in {res.seconds:.1f} s")
    alg, meta = res.algorithm, res.meta
    results = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "meta_steps": res.step, "K": {}}
    for k in (5, 10):
        results["K"][f"K={k}"] = evaluate_k(alg, meta, k, args.test_tasks, args.calib_tasks, log)
    for k in (5, 10):
        r = results["K"][f"K={k}"]
        print()
        print(f"### K={k}: query MSE on {r['n_tasks']} fixed test tasks against mean inner-step units "
              f"(best fixed: {r['best_fixed']}; adaptive: {r['policy']})")
        rows = []
        for name, s in r["rows"].items():
            extra = f" ({s['non_finite']} non-finite left out)" if s["non_finite"] else ""
            rows.append([name, f"{s['mean_units']:.2f}", f"{s['max_units']:.0f}", f"{num(s['mean_finite'])} ± {num(s['half_width'])}{extra}",
                         num(s["median"]), num(s["gain"]), f"{100 * s['share_of_best_gain']:.1f}%" if math.isfinite(s["gain"]) else "-",
                         f"{100 * s['units_vs_best']:.0f}%", s["diverged"]])
        print(common.table(["policy", "mean units", "max units", "mean MSE ± 95% CI", "median", "gain vs plain 1",
                            "% of best gain", "units vs best", "diverged"], rows))
    print()
    print("### Goal: adaptive >= 90% of the best fixed budget's gain over 1 step at <= 50% of its mean units, 0 diverged")
    for k in (5, 10):
        r = results["K"][f"K={k}"]
        a = r["rows"]["adaptive (tuned)"]
        print(f"K={k}: {'PASS' if r['goal_pass'] else 'MISS'}: {100 * a['share_of_best_gain']:.1f}% of the gain of "
              f"{r['best_fixed']} ({num(r['best_gain'])}) at {100 * a['units_vs_best']:.0f}% of its units "
              f"({a['mean_units']:.2f} vs {r['rows'][r['best_fixed']]['mean_units']:.2f}), {a['diverged']} diverged")
    common.write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
