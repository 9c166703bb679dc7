"""Glyphs 5-way 1-shot and 5-shot accuracy on held-out scripts: ProtoNet, MAML, pixel nearest centroid.

For each shot count, ProtoNet (``configs/glyphs-protonet.yaml``) and MAML
(``configs/glyphs-maml.yaml``: **first-order** MAML, 3 inner steps at lr 0.4, Conv-4 width 32,
batch statistics) are meta-trained with the project's trainer (``agent.training.meta_train``)
on the glyph *train* scripts for ``--train-seconds`` of wall time each, with ``k_shot`` set to
the shot count being evaluated. All methods are then scored on the same ``--episodes``
episodes drawn from the *test* scripts (class split by script, disjoint from training; episode
``i`` from ``agent.evaluation.episode_rng(seed, i)``), 15 query images per class:

* ProtoNet: nearest prototype in embedding space (``agent.evaluation.score_task``);
* MAML: after the trained number of inner steps (3) and after 10;
* baseline: nearest class centroid on raw pixels (squared Euclidean), no training.

Reported: accuracy mean ± 95% t-interval (``agent.stats.mean_ci``) over episodes, and the
paired difference to the baseline on the same episodes (mean ± 95% CI).

    python bench/glyphs_accuracy.py --train-seconds 120 --out bench/results/glyphs_accuracy.json
"""

from __future__ import annotations

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
from agent.data import make_family  # noqa: E402
from agent.evaluation import episode_rng, score_task  # noqa: E402
from agent.stats import mean_ci  # noqa: E402
from agent.training import meta_train  # noqa: E402

CONFIGS = {"protonet": _HERE.parent / "configs" / "glyphs-protonet.yaml",
           "maml": _HERE.parent / "configs" / "glyphs-maml.yaml"}
QUICK_GLYPHS = {"samples": 8, "max_chars": 6, "max_scripts": 10}


def nearest_centroid(task) -> float:
    """Accuracy of the nearest class mean on raw pixels (squared Euclidean)."""
    sx = task.support_x.reshape(task.support_x.shape[0], -1).double()
    qx = task.query_x.reshape(task.query_x.shape[0], -1).double()
    onehot = (task.support_y.unsqueeze(1) == torch.arange(task.n_way)).double()
    means = onehot.t() @ sx / onehot.sum(0).unsqueeze(1)
    pred = torch.cdist(qx, means).argmin(1)
    return float((pred == task.query_y).double().mean())


def train(method: str, shot: int, args):
    over = {"data.k_shot": shot, "train.steps": 10**9, "train.time_limit_s": float(args.train_seconds),
            "train.val_every": 0, "train.val_tasks": 5 if args.quick else 20, "train.checkpoint_every": 0,
            "train.seed": args.seed, "train.threads": args.threads}
    if args.quick:
        over.update({"data.k_query": 2, "model.width": 8, **{f"data.{k}": v for k, v in QUICK_GLYPHS.items()}})
    cfg = with_overrides(load(CONFIGS[method]), over)
    with tempfile.TemporaryDirectory(prefix="bench-glyphs-") as out:
        t0, c0 = time.perf_counter(), time.process_time()
        res = meta_train(cfg, out, resume=False, progress=False, log_every=0)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return cfg, res, cpu / wall


def ci_cell(values) -> str:
    c = mean_ci(np.asarray(values, dtype=float) * 100.0)
    return f"{c.mean:.2f} ± {c.half_width:.2f}"


def main(argv=None) -> int:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--train-seconds", type=float, default=120.0, help="meta-training wall time per method and shot count")
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    p.add_argument("--eval-seed", type=int, default=2024, help="seed of the test episodes")
    args = p.parse_args(argv)
    if args.quick:
        args.train_seconds, args.episodes = min(args.train_seconds, 1.0), 10
    common.setup_threads(args.threads)
    info = common.print_header("bench/glyphs_accuracy.py: glyphs 5-way accuracy on held-out scripts", args)
    results = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "shots": {}}
    acc_rows, train_rows = [], []
    for shot in args.shots:
        fam_kw = {"n_way": 5, "k_shot": shot, "k_query": 2 if args.quick else 15, **(QUICK_GLYPHS if args.quick else {})}
        test = make_family("glyphs", "test", **fam_kw)
        train_fam = make_family("glyphs", "train", **fam_kw)
        overlap = set(map(int, test.classes)) & set(map(int, train_fam.classes))
        print(f"{shot}-shot: test split {len(test.classes)} classes, train split {len(train_fam.classes)} classes, "
              f"overlap {len(overlap)}", flush=True)
        episodes = [test.sample(episode_rng(args.eval_seed, i)) for i in range(args.episodes)]
        per_method: dict[str, list[float]] = {"pixel nearest centroid": [nearest_centroid(t) for t in episodes]}
        for method in ("protonet", "maml"):
            print(f"  meta-training {method} {shot}-shot for {args.train_seconds:.0f} s ...", flush=True)
            cfg, res, cpw = train(method, shot, args)
            alg, meta = res.algorithm, res.meta
            train_rows.append([f"{shot}-shot", method, repr(alg), res.step, f"{res.seconds:.0f}",
                               f"{res.steps_per_s:.2f}", f"{cpw:.2f}"])
            t0 = time.perf_counter()
            if method == "protonet":
                rows = [score_task(alg, meta, t, [0]) for t in episodes]
                per_method["ProtoNet"] = [r["accuracy@0"] for r in rows]
            else:
                trained = alg.inner_steps
                rows = [score_task(alg, meta, t, [trained, 10]) for t in episodes]
                per_method[f"MAML (FO), {trained} steps"] = [r[f"accuracy@{trained}"] for r in rows]
                per_method["MAML (FO), 10 steps"] = [r["accuracy@10"] for r in rows]
            print(f"    {res.step} meta-steps; evaluated {len(episodes)} episodes in {time.perf_counter() - t0:.1f} s", flush=True)
        base = np.asarray(per_method["pixel nearest centroid"])
        for name, vals in per_method.items():
            diff = "-" if name == "pixel nearest centroid" else ci_cell(np.asarray(vals) - base)
            acc_rows.append([f"{shot}-shot", name, ci_cell(vals), diff])
        results["shots"][f"{shot}-shot"] = {
            "test_classes": len(test.classes), "train_classes": len(train_fam.classes), "class_overlap": len(overlap),
            "accuracy": {k: {"mean": float(np.mean(v)), "half_width": mean_ci(v).half_width, "per_episode": v}
                         for k, v in per_method.items()}}
    results["training"] = [dict(zip(["shots", "method", "algorithm", "meta_steps", "seconds", "steps_per_s", "cpu_per_wall"], r))
                           for r in train_rows]
    print()
    print(f"### Meta-training (agent.training.meta_train, {args.train_seconds:.0f} s wall budget each, train scripts)")
    print(common.table(["shots", "method", "algorithm", "meta-steps", "seconds", "steps/s", "process cpu/wall"], train_rows))
    print()
    print(f"### Accuracy (%) on {args.episodes} test-script episodes, 5-way, {2 if args.quick else 15} query/class: mean ± 95% CI")
    print(common.table(["shots", "method", "accuracy %", "minus pixel baseline (paired) %"], acc_rows))
    common.write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
