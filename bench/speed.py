"""Meta-training step time and per-task adaptation latency: ours against a plain autograd loop.

Setups (``shared/notes/peers.md`` §3.2–3.4):

* sinusoid MLP 1-40-40-1, 25 tasks, K=10 support + 10 query, inner lr 0.01, 1 inner step,
  second and first order;
* Conv-4 (64 filters, batch norm with batch statistics) + linear head, 5-way 1-shot, 15 query
  per class, 4 tasks, inner lr 0.4, 1 and 5 inner steps (second order; first order with
  ``--conv-first-order``).

"ours" is ``algorithm.meta_gradient(meta, tasks)`` on its default path (vmap for the MLP, a
per-task loop for Conv-4). "plain" is written below: ``torch.func.functional_call`` +
``torch.autograd.grad(create_graph=True)`` per inner step and ``backward`` per task, which
peers.md measured as fast as learn2learn here (l2l/autograd_loop = 1.09 on the MLP, 0.99 on
Conv-4). Both run in the same process, interleaved (see ``common.py``), from the same initial
parameters and the same pre-sampled tasks. Speed-up = plain / ours (median of per-round paired
ratios); > 1 means ours is faster.

Adaptation latency (sinusoid, no meta-graph): adapt one task with 1 or 10 steps and predict 100
query points; ours ``algorithm.adapt`` + ``predict`` per task, and 25 tasks at once with
``torch.func.vmap`` over the same ``adapt``/``predict`` (per-task time = call / 25), against
the plain detach + ``autograd.grad`` loop.

    python bench/speed.py --out bench/results/speed.json
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent), str(_HERE)]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.func import functional_call  # noqa: E402

import common  # noqa: E402
from agent.algorithms import build  # noqa: E402
from agent.algorithms.base import REGRESSION, TaskTensors, func_grad  # noqa: E402
from agent.data import make_family  # noqa: E402
from agent.data.episodes import EpisodeSampler, LabelledSet  # noqa: E402
from agent.nn import build_model  # noqa: E402


# -- the plain baseline ---------------------------------------------------------------------
def _loss(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if kind == REGRESSION:
        return F.mse_loss(out, y.reshape(out.shape))
    return F.cross_entropy(out, y)


def plain_meta_grad(model, params: dict, tasks, inner_lr: float, steps: int, first_order: bool) -> dict:
    """Per-task loop: functional_call + autograd.grad (create_graph unless first order), backward per task."""
    for p in params.values():
        p.grad = None
    names = list(params)
    scale = 1.0 / len(tasks)
    for t in tasks:
        fast = params
        for _ in range(steps):
            loss = _loss(t.kind, functional_call(model, fast, (t.support_x,)), t.support_y)
            grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=not first_order)
            fast = {n: fast[n] - inner_lr * g for n, g in zip(names, grads)}
        (_loss(t.kind, functional_call(model, fast, (t.query_x,)), t.query_y) * scale).backward()
    return {n: params[n].grad for n in names}


def plain_adapt_predict(model, params: dict, task, inner_lr: float, steps: int) -> torch.Tensor:
    """Inference-time adaptation: detached leaves, autograd.grad without a graph, then predict."""
    fast = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    names = list(fast)
    for _ in range(steps):
        loss = _loss(task.kind, functional_call(model, fast, (task.support_x,)), task.support_y)
        grads = torch.autograd.grad(loss, [fast[n] for n in names])
        with torch.no_grad():
            fast = {n: (fast[n] - inner_lr * g).requires_grad_(True) for n, g in zip(names, grads)}
    with torch.no_grad():
        return functional_call(model, fast, (task.query_x,))


# -- ours ------------------------------------------------------------------------------------
def ours_adapt_predict(alg, meta, task, steps: int) -> torch.Tensor:
    state = alg.adapt(meta, task, steps)
    with torch.no_grad():
        return alg.predict(meta, state, task.query_x)


def ours_batched_adapt_predict(alg, meta, sx, sy, qx, steps: int) -> torch.Tensor:
    """25 tasks in one call: vmap over the algorithm's own adapt/predict (func_grad inner gradients)."""
    def one(sx_, sy_, qx_):
        task = TaskTensors(sx_, sy_, qx_, None, REGRESSION)
        return alg.predict(meta, alg.adapt(meta, task, steps, grad_fn=func_grad), qx_)

    with torch.no_grad():
        return torch.func.vmap(one)(sx, sy, qx)


# -- helpers ---------------------------------------------------------------------------------
def grad_diff(ours: dict, plain: dict) -> tuple[float, float, bool]:
    """Max |ours - plain| over all entries, max |plain|, and whether they are bit-identical."""
    diff = max(float((ours["params." + n] - g).abs().max()) for n, g in plain.items())
    scale = max(float(g.abs().max()) for g in plain.values())
    same = all(torch.equal(ours["params." + n], g) for n, g in plain.items())
    return diff, scale, same


def verdict(diff: float, scale: float, same: bool) -> str:
    if same:
        return "bit-identical"
    return "agree (rel. 1e-5)" if diff <= 1e-5 * max(1.0, scale) else "DIFFER"


def leaf_params(meta: dict) -> dict:
    """The plain loop's own copy of the initial parameters (independent leaves)."""
    return {k[len("params."):]: v.detach().clone().requires_grad_(True) for k, v in meta.items() if k.startswith("params.")}


def conv_tasks(n_tasks: int, n_way: int, k_shot: int, k_query: int, rng: np.random.Generator):
    """Random 28x28 images in ``n_way`` classes (timing only; content does not matter)."""
    n_classes, per_class = 20, k_shot + k_query
    x = rng.integers(0, 256, size=(n_classes * per_class, 28, 28), dtype=np.uint8)
    y = np.repeat(np.arange(n_classes), per_class)
    sampler = EpisodeSampler(LabelledSet(x, y), n_way, k_shot, k_query)
    return [sampler.sample(rng) for _ in range(n_tasks)]


def speedup_row(label, t: "common.Timings", ours: str, plain: str, goal: float | None):
    r = t.ratio(plain, ours)
    lo, hi = t.ratio_quartiles(plain, ours)
    status = "" if goal is None else ("PASS" if r >= goal else "MISS")
    return [label, common.ms(t.median(ours)), common.ms(t.median(plain)), f"{r:.2f}x", f"[{lo:.2f}, {hi:.2f}]",
            f">= {goal:.1f}x {status}" if goal is not None else "-"]


# -- sections --------------------------------------------------------------------------------
def bench_mlp(args, results):
    print("## (a) sinusoid MLP 1-40-40-1, 25 tasks, K=10 (+10 query), 1 inner step, lr 0.01: meta-gradient per meta-step")
    fam = make_family("sinusoid", k_shot=10, k_query=10)
    rng = np.random.default_rng([args.seed, 1])
    n_tasks = 25
    tasks = [fam.sample(rng) for _ in range(n_tasks)]
    model = build_model("mlp", in_shape=1, out_dim=1)
    rows, checks, out = [], [], {}
    for order, fo in (("second order", False), ("first order", True)):
        alg = build("maml", model, inner_lr=0.01, inner_steps=1, first_order=fo)
        meta = alg.init_meta(torch.Generator().manual_seed(args.seed))
        params = leaf_params(meta)
        _, g_ours = alg.meta_gradient(meta, tasks)
        _, g_loop = alg.meta_gradient(meta, tasks, use_vmap=False)
        g_plain = {k: v.clone() for k, v in plain_meta_grad(model, params, tasks, 0.01, 1, fo).items()}
        d, s, same = grad_diff(g_ours, g_plain)
        d2, _, same2 = grad_diff(g_loop, g_plain)
        checks.append([f"MLP {order}", "ours default (vmap)", f"{d:.2e}", f"{s:.3g}", verdict(d, s, same)])
        # the same check in float64: vmap's float32 differences are rounding, not a different gradient
        meta64 = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in meta.items()}
        tasks64 = [t.to(torch.float64) for t in tasks]
        _, g64 = alg.meta_gradient(meta64, tasks64)
        p64 = {k: v.clone() for k, v in plain_meta_grad(model, leaf_params(meta64), tasks64, 0.01, 1, fo).items()}
        d64, s64, same64 = grad_diff(g64, p64)
        checks.append([f"MLP {order} (float64)", "ours default (vmap)", f"{d64:.2e}", f"{s64:.3g}",
                       "bit-identical" if same64 else ("agree (rel. 1e-12)" if d64 <= 1e-12 * max(1.0, s64) else "DIFFER")])
        checks.append([f"MLP {order}", "ours loop path", f"{d2:.2e}", f"{s:.3g}", verdict(d2, s, same2)])
        t = common.interleaved({
            "ours": lambda: alg.meta_gradient(meta, tasks),
            "ours_loop": lambda: alg.meta_gradient(meta, tasks, use_vmap=False),
            "plain": lambda: plain_meta_grad(model, params, tasks, 0.01, 1, fo),
        }, rounds=args.rounds, reps=args.reps, seed=args.seed)
        rows.append(speedup_row(f"MLP {order}: ours (vmap) vs plain", t, "ours", "plain", 5.0))
        rows.append(speedup_row(f"MLP {order}: ours loop path vs plain (info)", t, "ours_loop", "plain", None))
        print(f"  [{order}] {common.cpu_line(t)}")
        out[order] = {"timings": t.to_dict(), "speedup_plain_over_ours": t.ratio("plain", "ours"),
                      "speedup_plain_over_ours_loop": t.ratio("plain", "ours_loop"),
                      "max_abs_diff_vs_plain": d, "max_abs_diff_vs_plain_float64": d64, "max_abs_diff_loop_vs_plain": d2, "max_abs_grad": s,
                      "bit_identical": same, "loop_bit_identical": same2}
    results["mlp_meta_step"] = out
    return rows, checks


def bench_conv(args, results):
    print(f"## (b) Conv-4 ({args.conv_width} filters, batch-stat BN) 5-way 1-shot, 15 query/class, {args.conv_tasks} tasks, "
          f"inner lr 0.4: meta-gradient per meta-step")
    rng = np.random.default_rng([args.seed, 2])
    tasks = conv_tasks(args.conv_tasks, 5, 1, args.conv_query, rng)
    model = build_model("conv4", in_shape=(1, 28, 28), out_dim=5, norm="batch", width=args.conv_width)
    rows, checks, out = [], [], {}
    orders = [("SO", False)] + ([("FO", True)] if args.conv_first_order else [])
    for steps in args.conv_steps:
        for order, fo in orders:
            alg = build("maml", model, inner_lr=0.4, inner_steps=steps, first_order=fo)
            meta = alg.init_meta(torch.Generator().manual_seed(args.seed))
            params = leaf_params(meta)
            _, g_ours = alg.meta_gradient(meta, tasks)
            g_plain = {k: v.clone() for k, v in plain_meta_grad(model, params, tasks, 0.4, steps, fo).items()}
            d, s, same = grad_diff(g_ours, g_plain)
            label = f"Conv4 {steps} step{'s' if steps > 1 else ''} {order}"
            checks.append([label, "ours default (loop)", f"{d:.2e}", f"{s:.3g}", verdict(d, s, same)])
            t = common.interleaved({
                "ours": lambda: alg.meta_gradient(meta, tasks),
                "plain": lambda: plain_meta_grad(model, params, tasks, 0.4, steps, fo),
            }, rounds=args.conv_rounds, reps=args.conv_reps, seed=args.seed)
            rows.append(speedup_row(f"{label}: ours (loop) vs plain", t, "ours", "plain", 1.0))
            print(f"  [{label}] {common.cpu_line(t)}")
            out[label] = {"timings": t.to_dict(), "speedup_plain_over_ours": t.ratio("plain", "ours"),
                          "max_abs_diff_vs_plain": d, "max_abs_grad": s, "bit_identical": same}
    results["conv4_meta_step"] = out
    return rows, checks


def bench_adapt(args, results):
    print("## (c) sinusoid adaptation latency per task (K=10 support, predict 100 query points, no meta-graph)")
    fam = make_family("sinusoid", k_shot=10, k_query=100)
    rng = np.random.default_rng([args.seed, 3])
    n = 25
    tasks = [fam.sample(rng) for _ in range(n)]
    sx, sy, qx = (torch.stack([getattr(t, a) for t in tasks]) for a in ("support_x", "support_y", "query_x"))
    model = build_model("mlp", in_shape=1, out_dim=1)
    alg = build("maml", model, inner_lr=0.01, inner_steps=1)
    meta = alg.init_meta(torch.Generator().manual_seed(args.seed))
    params = leaf_params(meta)
    rows, out = [], {}
    for steps in (1, 10):
        # the same predictions from all three paths
        p_plain = torch.stack([plain_adapt_predict(model, params, t, 0.01, steps) for t in tasks])
        p_ours = torch.stack([ours_adapt_predict(alg, meta, t, steps) for t in tasks])
        p_vmap = ours_batched_adapt_predict(alg, meta, sx, sy, qx, steps)
        d1, d2 = float((p_ours - p_plain).abs().max()), float((p_vmap - p_plain).abs().max())
        k = {"i": 0}

        def next_task():
            k["i"] = (k["i"] + 1) % n
            return tasks[k["i"]]

        t = common.interleaved({
            "ours": lambda: ours_adapt_predict(alg, meta, next_task(), steps),
            "plain": lambda: plain_adapt_predict(model, params, next_task(), 0.01, steps),
            "ours_vmap25": lambda: ours_batched_adapt_predict(alg, meta, sx, sy, qx, steps),
        }, rounds=args.rounds, reps=args.adapt_reps, seed=args.seed)
        per = {name: [v / (n if name == "ours_vmap25" else 1) for v in t.per_call[name]] for name in t.per_call}
        tt = common.Timings(per, t.cpu_per_wall, t.reps)
        for name, label, diff in (("ours", "ours, 1 task per call", d1), ("ours_vmap25", "ours, 25 tasks per vmap call", d2)):
            r = tt.ratio("plain", name)
            lo, hi = tt.ratio_quartiles("plain", name)
            rows.append([f"{steps}", label, common.ms(tt.median(name), 3), common.ms(tt.median("plain"), 3),
                         f"{r:.2f}x", f"[{lo:.2f}, {hi:.2f}]", f"{diff:.1e}"])
        print(f"  [{steps} step(s)] {common.cpu_line(t)}")
        out[f"{steps} steps"] = {"per_task_s": per, "median_per_task_s": {k2: tt.median(k2) for k2 in per},
                                 "speedup_plain_over_ours": tt.ratio("plain", "ours"),
                                 "speedup_plain_over_ours_vmap25": tt.ratio("plain", "ours_vmap25"),
                                 "max_abs_pred_diff": {"ours": d1, "ours_vmap25": d2}, "cpu_per_wall": t.cpu_per_wall}
    results["sinusoid_adaptation"] = out
    return rows


def bench_train_step(args, results):
    """Where a sinusoid meta-training step spends its time (ours only): the parts of one
    ``agent.training`` step, interleaved like the rest."""
    from agent.training import apply_meta_gradient, sample_batch

    print("## (d) sinusoid meta-training step, broken down (ours only; what meta_train does per step)")
    fam = make_family("sinusoid", k_shot=10, k_query=10)
    model = build_model("mlp", in_shape=1, out_dim=1)
    alg = build("maml", model, inner_lr=0.01, inner_steps=1)
    meta = alg.init_meta(torch.Generator().manual_seed(args.seed))
    opt = torch.optim.Adam([meta[n] for n in alg.trainable(meta)], lr=1e-3)
    tasks = sample_batch(fam, args.seed, 0, 25)
    i = {"step": 0}

    def sample():
        i["step"] += 1
        return sample_batch(fam, args.seed, i["step"], 25)

    t = common.interleaved({
        "sample_batch (25 tasks)": sample,
        "meta_gradient (vmap)": lambda: alg.meta_gradient(meta, tasks),
        "apply_meta_gradient (meta_gradient + checks + Adam)": lambda: apply_meta_gradient(alg, meta, opt, tasks),
    }, rounds=args.rounds, reps=args.reps, seed=args.seed)
    print(f"  {common.cpu_line(t)}")
    results["sinusoid_train_step"] = t.to_dict()
    total = t.median("sample_batch (25 tasks)") + t.median("apply_meta_gradient (meta_gradient + checks + Adam)")
    rows = [[name, common.ms(t.median(name), 3), f"{t.median(name) / total:.0%}"] for name in t.per_call]
    rows.append(["sample + apply (one meta_train step, approx.)", common.ms(total, 3), "100%"])
    return rows


def main(argv=None) -> int:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15, help="rounds for the MLP and adaptation timings")
    p.add_argument("--reps", type=int, default=10, help="MLP meta-steps per implementation per round")
    p.add_argument("--adapt-reps", type=int, default=20, help="adaptation calls per implementation per round")
    p.add_argument("--conv-rounds", type=int, default=7)
    p.add_argument("--conv-reps", type=int, default=2)
    p.add_argument("--conv-steps", type=int, nargs="+", default=[1, 5])
    p.add_argument("--conv-width", type=int, default=64)
    p.add_argument("--conv-tasks", type=int, default=4)
    p.add_argument("--conv-query", type=int, default=15)
    p.add_argument("--conv-first-order", action="store_true", help="also time first-order Conv-4 steps")
    p.add_argument("--sections", nargs="+", default=["mlp", "conv", "adapt", "step"], choices=["mlp", "conv", "adapt", "step"])
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.reps, args.adapt_reps = 2, 1, 2
        args.conv_rounds, args.conv_reps, args.conv_width, args.conv_query, args.conv_tasks = 2, 1, 8, 3, 2
        args.conv_steps = [1]
    common.setup_threads(args.threads)
    info = common.print_header("bench/speed.py: ours vs a plain per-task autograd.grad loop", args)
    results: dict = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}}
    heads = ["setup", "ours ms", "plain ms", "speed-up (plain/ours)", "IQR of paired ratio", "goal"]
    rows, checks, arows = [], [], []
    if "mlp" in args.sections:
        r, c = bench_mlp(args, results)
        rows += r
        checks += c
    if "conv" in args.sections:
        r, c = bench_conv(args, results)
        rows += r
        checks += c
    if "adapt" in args.sections:
        arows = bench_adapt(args, results)
    srows = bench_train_step(args, results) if "step" in args.sections else []
    print()
    if rows:
        print("### Meta-training step (meta-gradient of the mean query loss), median ms per step")
        print(common.table(heads, rows))
        print()
        print("### Gradient check: ours vs plain loop (float32 unless marked), max abs difference over all entries")
        print(common.table(["setup", "ours path", "max abs diff", "max abs grad", "verdict"], checks))
        print()
    if arows:
        print("### Adaptation latency per task, median ms (25 tasks batched: call time / 25)")
        print(common.table(["steps", "ours", "ours ms/task", "plain loop ms/task", "speed-up (plain/ours)",
                            "IQR of paired ratio", "max abs pred diff"], arows))
    if srows:
        print()
        print("### Sinusoid meta-training step broken down (ours), median ms per call")
        print(common.table(["part", "ms", "share of a step"], srows))
    goals = [r for r in rows if r[-1] != "-"]
    if goals:
        print()
        print("Goals: " + "; ".join(f"{r[0].split(':')[0]} {r[3]} ({r[-1]})" for r in goals))
    common.write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
