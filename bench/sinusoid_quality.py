"""Sinusoid MAML quality after a fixed CPU budget, beside the learn2learn anchor from peers.md.

Meta-training is the project's own trainer (``agent.training.meta_train``) on
``configs/sinusoid-maml.yaml``: the Finn et al. 2017 protocol (MLP 1-40-40-1, second-order MAML,
1 inner step at lr 0.01, K=10 support + 10 query, meta-batch 25, Adam 1e-3), batched with vmap,
stopped by wall time (``--seconds``). Evaluation: 1000 fixed test tasks
(``agent.data.sinusoid.fixed_test_set``, seed 12345, query = 100-point grid on [-5, 5]) at K=5
and K=10, query MSE before adaptation and after 1 and 10 inner steps (lr 0.01), with
``agent.evaluation.score_task``. Reported: mean ± 95% t-interval (``agent.stats.mean_ci``;
non-finite task scores are left out and counted), median, and the number of tasks whose MSE
after 10 steps is higher than after 1. A last column scores the agent's own test-time policy for
extra steps, ``agent.compute.guarded_adapt(max_steps=10)`` (watches the support loss, halves the
step on a rise, keeps the best state), which is what the agent runs instead of 10 blind steps.

The learn2learn numbers are not measured here: they are quoted from ``shared/notes/peers.md``
(learn2learn 0.2.0, 240 s, 15,173 meta-steps on this machine type, same evaluation protocol).

    python bench/sinusoid_quality.py --seconds 240 --metasgd --out bench/results/sinusoid_quality.json
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent), str(_HERE)]

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402
from agent.config import load, with_overrides  # noqa: E402
from agent.compute import guarded_adapt  # noqa: E402
from agent.data.sinusoid import fixed_test_set  # noqa: E402
from agent.evaluation import score_task  # noqa: E402
from agent.stats import mean_ci  # noqa: E402
from agent.training import meta_train  # noqa: E402

CONFIG = _HERE.parent / "configs" / "sinusoid-maml.yaml"
STEPS = (0, 1, 10)


def train(algorithm: str, seconds: float, seed: int, threads: int):
    cfg = with_overrides(load(CONFIG), {
        "algorithm.name": algorithm, "train.steps": 10**9, "train.time_limit_s": float(seconds),
        "train.val_every": 0, "train.val_tasks": 20, "train.checkpoint_every": 0, "train.seed": seed,
        "train.threads": threads, "train.use_vmap": True,
    })
    with tempfile.TemporaryDirectory(prefix="bench-sine-") as out:
        t0, c0 = time.perf_counter(), time.process_time()
        res = meta_train(cfg, out, resume=False, progress=False, log_every=0)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return res, wall, cpu


def evaluate(alg, meta, k: int, n_tasks: int) -> dict:
    tasks = fixed_test_set("sinusoid", n_tasks=n_tasks, seed=12345, grid=100, k_shot=k)
    rows = []
    for t in tasks:
        row = score_task(alg, meta, t, STEPS)
        state, _ = guarded_adapt(alg, meta, t, 10)
        with torch.no_grad():
            row["mse@guarded10"] = float(torch.nn.functional.mse_loss(alg.predict(meta, state, t.query_x), t.query_y))
        rows.append(row)
    out = {}
    for s in (*STEPS, "guarded10"):
        v = np.array([r[f"mse@{s}"] for r in rows], dtype=float)
        finite = v[np.isfinite(v)]
        ci = mean_ci(v, nan_policy="omit") if finite.size >= 2 else None
        out[s] = {"mean": ci.mean if ci else float("nan"), "half_width": ci.half_width if ci else float("nan"),
                  "median": float(np.median(finite)) if finite.size else float("nan"),
                  "n": int(finite.size), "non_finite": int(v.size - finite.size)}
    a1 = np.array([r["mse@1"] for r in rows])
    a10 = np.array([r["mse@10"] for r in rows])
    out["worse_after_10_than_1"] = int(np.sum(~(a10 <= a1)))  # NaN counts as worse
    out["n_tasks"] = len(rows)
    return out


def num(x: float) -> str:
    return f"{x:.3f}" if abs(x) < 1000 else f"{x:.3g}"


def cell(e: dict) -> str:
    extra = f", {e['non_finite']} non-finite left out" if e["non_finite"] else ""
    return f"{num(e['mean'])} ± {num(e['half_width'])} (median {num(e['median'])}{extra})"


def compare(e: dict, peer: float) -> str:
    lo, hi = e["mean"] - e["half_width"], e["mean"] + e["half_width"]
    if not np.isfinite(e["mean"]):
        return "no finite mean"
    if e["mean"] > 100 * peer:
        return f"worse: the mean is dominated by diverging tasks (median {num(e['median'])})"
    word = "better (lower)" if hi < peer else "worse (higher)" if lo > peer else "l2l inside our CI"
    return f"{e['mean'] / peer:.2f}x of l2l; {word}"


def main(argv=None) -> int:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=240.0, help="meta-training wall-time budget per algorithm")
    p.add_argument("--test-tasks", type=int, default=1000)
    p.add_argument("--metasgd", action="store_true", help="also train and evaluate Meta-SGD with the same budget")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.test_tasks = min(args.seconds, 2.0), 20
    common.setup_threads(args.threads)
    info = common.print_header("bench/sinusoid_quality.py: sinusoid MAML quality after a CPU budget", args)
    results = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "peer": common.PEER_SINUSOID, "runs": {}}
    algs = ["maml"] + (["metasgd"] if args.metasgd else [])
    summary_rows, peer_rows, train_rows = [], [], []
    for name in algs:
        print(f"meta-training {name} for {args.seconds:.0f} s (vmap, {args.threads} thread(s)) ...", flush=True)
        res, wall, cpu = train(name, args.seconds, args.seed, args.threads)
        print(f"  {res.step} meta-steps in {res.seconds:.1f} s ({res.steps_per_s:.0f} steps/s), skipped {res.skipped}, "
              f"process cpu/wall {cpu / wall:.2f}", flush=True)
        run = {"meta_steps": res.step, "train_seconds": res.seconds, "steps_per_s": res.steps_per_s,
               "skipped": res.skipped, "cpu_per_wall": cpu / wall, "eval": {}}
        t0 = time.perf_counter()
        for k in (5, 10):
            e = evaluate(res.algorithm, res.meta, k, args.test_tasks)
            run["eval"][f"K={k}"] = e
            summary_rows.append([name, f"K={k}", cell(e[0]), cell(e[1]), cell(e[10]), f"{e['worse_after_10_than_1']}/{e['n_tasks']}",
                                 cell(e["guarded10"])])
            if name == "maml":
                for s, label, ours in ((1, "1 step", "1 step"), (10, "10 steps", "10 steps"),
                                       ("guarded10", "10 steps", "<=10 steps, guarded")):
                    peer = common.PEER_SINUSOID[f"K={k}"][label]
                    peer_rows.append([f"K={k}", ours, f"{num(e[s]['mean'])} ± {num(e[s]['half_width'])}", num(e[s]['median']),
                                      f"{peer:.2f} ({label})", compare(e[s], peer)])
        run["eval_seconds"] = time.perf_counter() - t0
        results["runs"][name] = run
        train_rows.append([name, res.step, f"{res.seconds:.1f}", f"{res.steps_per_s:.0f}", res.skipped, f"{cpu / wall:.2f}"])
    print()
    print("### Meta-training (agent.training.meta_train, vmap path, wall-time budget)")
    print(common.table(["algorithm", "meta-steps", "seconds", "steps/s", "skipped steps", "process cpu/wall"], train_rows))
    print()
    print(f"### Query MSE on {args.test_tasks} fixed test tasks (mean ± 95% CI, median); inner lr 0.01")
    print(common.table(["algorithm", "K", "before adaptation", "after 1 step", "after 10 steps", "tasks worse at 10 than 1",
                                                   "<= 10 steps, guarded (agent.compute.guarded_adapt)"],
                       summary_rows))
    print()
    print("### Ours (MAML) beside learn2learn 0.2.0 (peer numbers QUOTED from shared/notes/peers.md, not measured here:")
    print("### 240 s / 15,173 meta-steps on this machine type, same 1000 tasks and grid)")
    print(common.table(["K", "steps", "ours mean ± CI", "ours median", "l2l (quoted)", "ours vs l2l"], peer_rows))
    m = results["runs"]["maml"]
    print(f"\nours: {m['meta_steps']} meta-steps in {m['train_seconds']:.0f} s; l2l (quoted): 15,173 in 240 s")
    common.write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
