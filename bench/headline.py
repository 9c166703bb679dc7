"""The headline table: offline anchors and the online OSAKA-style stream, full agent and ablations, over seeds.

One command reproduces the README's results table. For each seed ``s`` in ``--seeds``:

**Offline anchors** (``agent.training.meta_train``, short wall-time budgets, stated in the output):

* sinusoid: second-order MAML (``configs/sinusoid-maml.yaml``: MLP 1-40-40-1, 1 inner step at lr
  0.01, K=10, meta-batch 25) trained ``--sine-seconds`` with ``train.seed = s``; query MSE on
  ``--sine-tasks`` fixed test tasks (``fixed_test_set``, seed 12345, 100-point grid) at K=10 and
  K=5, after 1 step and after the agent's guarded policy (``guarded_adapt``, <= 10 steps);
* glyphs: ProtoNet (``configs/glyphs-protonet.yaml``: Conv-4 width 32) trained ``--glyph-seconds``
  per shot count on the train scripts; 5-way accuracy on ``--glyph-episodes`` episodes of the
  held-out test scripts (the same episodes for every seed), 1-shot and 5-shot.

**Online stream**: the ``sinusoid-osaka`` preset (three families: the pre-training sinusoid, a
frequency-shifted sinusoid and lines; a task switch with probability 0.1 per task, recurring
tasks, hidden boundaries, inline labels) with stream seed ``s``, ``--tasks`` tasks, answered by
the agent started from seed ``s``'s offline MAML meta-parameters, through the daemon's own loop
(``Agent.run``) with a run directory and periodic probes (:mod:`agent.probes`: every
``--probe-every`` tasks and at every family switch, ``--probe-tasks`` held-out tasks per family,
5 guarded steps). Variants:

* **full**: two arms (MAML, closed-form ridge head; adaptive budgets), contextual selector, memory,
  test-time compute policy (the shipped ``compute`` defaults: levels 5/7/12 steps by the
  difficulty, plateau stop, escalation), memory warm starts, online meta-updates — the shipped
  defaults everywhere except the arms;
* **no memory**: ``memory.enabled = false`` (no warm starts, no neighbour features);
* **no selector (best fixed arm)**: one arm only; *which* arm is chosen on a separate tuning stream
  (seed ``--tune-seed``, never one of the evaluation seeds) by prequential MSE;
* **no test-time scaling**: one budget level (1 step, 1 member); no escalation, switch or fallback;
* **frozen meta-parameters**: ``online.enabled = false``.

Per run: prequential MSE (mean query MSE of every task, scored before the agent learns from it),
per family, MSE over the 5 tasks after each switch (first visits and revisits of a family),
ACC (final probe MSE, mean over families), BWT / FWT / forgetting (on -MSE: positive BWT and FWT
are improvements; :func:`agent.probes.continual_from_probes`), inner-step units and latency per
task (mean and p95). Across seeds: mean ± 95% t-interval (``agent.stats.mean_ci``), and each
ablation's paired difference to the full agent on the same stream seeds (``paired_t_test``).

    python bench/headline.py --out bench/results/headline.json
"""

from __future__ import annotations

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
from agent import report  # noqa: E402
from agent.agent import Agent  # noqa: E402
from agent.compute import guarded_adapt  # noqa: E402
from agent.config import load, with_overrides  # noqa: E402
from agent.data import make_family  # noqa: E402
from agent.data.sinusoid import fixed_test_set  # noqa: E402
from agent.evaluation import episode_rng, score_task  # noqa: E402
from agent.probes import ProbeSet, Prober, ProbingSource  # noqa: E402
from agent.runlog import RunLogWriter, load_run  # noqa: E402
from agent.stats import mean_ci, paired_t_test  # noqa: E402
from agent.streams.synthetic import make_stream  # noqa: E402
from agent.training import meta_train  # noqa: E402

CONFIGS = _HERE.parent / "configs"
QUICK_GLYPHS = {"samples": 8, "max_chars": 6, "max_scripts": 10}
# ANIL is left out: with an ensemble budget its held-out scoring hits a shape error in
# agent.compute.guarded_adapt (cached support features of the fit part; see bench/README.md).
ARMS = [{"algorithm": "maml", "inner_lr": 0.01, "budget": "adaptive"},
        {"algorithm": "ridge", "budget": "adaptive", "lam": 1.0}]
VARIANTS = ("full", "no memory", "no selector (best fixed arm)", "no test-time scaling", "frozen meta-parameters")
SWITCH_K = 5


# -- offline anchors -----------------------------------------------------------------------------


def train(config: Path, over: dict, out: str):
    cfg = with_overrides(load(config), {"train.steps": 10**9, "train.val_every": 0, "train.checkpoint_every": 0,
                                        "train.threads": 1, **over})
    t0, c0 = time.perf_counter(), time.process_time()
    res = meta_train(cfg, out, resume=False, progress=False, log_every=0)
    return res, (time.process_time() - c0) / max(time.perf_counter() - t0, 1e-9)


def sine_anchor(seed: int, args, out: str) -> dict:
    res, cpw = train(CONFIGS / "sinusoid-maml.yaml", {"train.time_limit_s": float(args.sine_seconds),
                                                       "train.seed": seed, "train.use_vmap": True}, out)
    alg, meta = res.algorithm, res.meta
    row = {"meta_steps": res.step, "seconds": res.seconds, "cpu_per_wall": cpw}
    for k in (10, 5):
        one, guarded = [], []
        for t in fixed_test_set("sinusoid", n_tasks=args.sine_tasks, seed=12345, grid=100, k_shot=k):
            one.append(score_task(alg, meta, t, [1])["mse@1"])
            state, _ = guarded_adapt(alg, meta, t, 10)
            with torch.no_grad():
                guarded.append(float(torch.nn.functional.mse_loss(alg.predict(meta, state, t.query_x), t.query_y)))
        row[f"K={k} 1 step"] = float(np.mean(one))
        row[f"K={k} guarded <=10"] = float(np.mean(guarded))
    return row


def glyph_anchor(seed: int, shot: int, args, episodes) -> dict:
    over = {"data.k_shot": shot, "train.time_limit_s": float(args.glyph_seconds), "train.seed": seed,
            "train.val_tasks": 5 if args.quick else 20}
    if args.quick:
        over.update({"data.k_query": 2, "model.width": 8, **{f"data.{k}": v for k, v in QUICK_GLYPHS.items()}})
    with tempfile.TemporaryDirectory(prefix="bench-headline-glyphs-") as out:
        res, cpw = train(CONFIGS / "glyphs-protonet.yaml", over, out)
    acc = [score_task(res.algorithm, res.meta, t, [0])["accuracy@0"] for t in episodes]
    return {"meta_steps": res.step, "seconds": res.seconds, "cpu_per_wall": cpw, "accuracy": float(np.mean(acc))}


# -- online stream -------------------------------------------------------------------------------


class NullSink:
    """Answers go nowhere (the run directory keeps what is scored)."""

    def write(self, record: dict) -> bool:
        return True

    def close(self) -> None:
        pass


def agent_config(variant: str, seed: int, init: str, arm: int | None = None) -> dict:
    cfg = {
        "model": {"arch": "mlp", "hidden": [40, 40]},
        "agent": {"in_shape": [1], "out_dim": 1, "arms": ARMS, "default_arm": 0, "seed": seed, "init_checkpoint": init,
                  "micro_batch": 8},
        "metrics": {"addr": "0"},
    }
    if variant == "no memory":
        cfg["memory"] = {"enabled": False}
    elif variant == "no selector (best fixed arm)":
        cfg["agent"]["arms"] = [ARMS[arm]]
    elif variant == "no test-time scaling":
        cfg["compute"] = {"levels": [[1, 1]]}
        cfg["failure"] = {"escalate": 1.0, "switch": 1.0, "fallback": 1.0, "abstain": 1.0}
    elif variant == "frozen meta-parameters":
        cfg["online"] = {"enabled": False}
    return cfg


def run_online(cfg: dict, seed: int, args, run_dir: Path, n_tasks: int) -> dict:
    agent = Agent.from_config(cfg)
    stream = make_stream("sinusoid-osaka", seed=seed, n_tasks=n_tasks)
    agent.run_log = RunLogWriter(run_dir, config=agent.config.to_dict(), stream={"preset": "sinusoid-osaka"}, seed=seed)
    prober = Prober(ProbeSet.from_stream(stream, args.probe_tasks), agent.run_log, every_tasks=args.probe_every,
                    steps=5, at_family="every")
    prober.start(agent)
    t0, c0 = time.perf_counter(), time.process_time()
    agent.run(ProbingSource(stream, agent, prober), NullSink())
    prober.final(agent)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    agent.run_log.close()
    return summarise_run(load_run(run_dir), wall, cpu)


def summarise_run(run, wall: float, cpu: float) -> dict:
    lab = run.labelled
    q = run.quality
    out = {"tasks": len(run), "wall_s": wall, "cpu_per_wall": cpu / max(wall, 1e-9),
           "non_finite": int(run.n_nonfinite_quality), "preq_mse": float(np.mean(q[lab]))}
    out["per_family"] = {f: float(np.mean(q[lab & np.array([g == f for g in run.family])])) for f in run.families}
    res, _pos, revisit = report.switch_windows(run, SWITCH_K)
    out["after_switch"] = float(np.mean(res.mean)) if res.mean.size else math.nan
    out["after_switch_first"] = float(np.mean(res.mean[~revisit])) if (~revisit).any() else math.nan
    out["after_switch_revisit"] = float(np.mean(res.mean[revisit])) if revisit.any() else math.nan
    pm = report.probe_matrix(run)
    if isinstance(pm, str):
        out.update(acc=math.nan, bwt=math.nan, fwt=math.nan, forgetting=math.nan, probes=0)
    else:
        cm = pm.continual()
        out.update(acc=-cm.acc, bwt=cm.bwt, fwt=cm.fwt, forgetting=cm.forgetting, probes=int(len(pm.seq)) + 1)
    units = run.budget_units[np.isfinite(run.budget_units)]
    lat = run.latency_ms[np.isfinite(run.latency_ms)]
    out.update(units_mean=float(np.mean(units)), units_p95=float(np.percentile(units, 95)),
               ms_mean=float(np.mean(lat)), ms_p95=float(np.percentile(lat, 95)),
               algorithms={a: int(sum(1 for x in run.algorithm if x == a)) for a in sorted(set(map(str, run.algorithm)))})
    return out


# -- formatting ----------------------------------------------------------------------------------


def num(x: float, digits: int = 3) -> str:
    if not math.isfinite(x):
        return "n/a"
    a = abs(x)
    if a != 0 and (a < 10 ** -(digits - 1) or a >= 1e4):
        return f"{x:.2e}"
    return f"{x:.{digits}f}"


def ci(values, digits: int = 3, scale: float = 1.0) -> str:
    v = np.asarray(values, dtype=float) * scale
    v = v[np.isfinite(v)]
    if v.size == 0:
        return "n/a"
    if v.size == 1:
        return num(float(v[0]), digits)
    c = mean_ci(v)
    return f"{num(c.mean, digits)} ± {num(c.half_width, digits)}"


def paired(a, b, digits: int = 3) -> str:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 2:
        return "n/a"
    t = paired_t_test(a[ok], b[ok])
    if not math.isfinite(t.pvalue):  # identical on every seed
        return f"{num(t.mean_difference, digits)} (identical)"
    return f"{num(t.mean_difference, digits)} [{num(t.low, digits)}, {num(t.high, digits)}] p={t.pvalue:.2g}"


# -- main ----------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="stream and training seeds (>= 2)")
    p.add_argument("--sine-seconds", type=float, default=30.0, help="sinusoid MAML meta-training per seed")
    p.add_argument("--sine-tasks", type=int, default=500, help="fixed sinusoid test tasks")
    p.add_argument("--glyph-seconds", type=float, default=15.0, help="ProtoNet meta-training per seed and shot count")
    p.add_argument("--glyph-episodes", type=int, default=300, help="test-script episodes (5-way, 15 query/class)")
    p.add_argument("--tasks", type=int, default=1000, help="tasks of each online run")
    p.add_argument("--tune-seed", type=int, default=100, help="stream seed that picks the best fixed arm")
    p.add_argument("--tune-tasks", type=int, default=300)
    p.add_argument("--probe-every", type=int, default=100)
    p.add_argument("--probe-tasks", type=int, default=6, help="held-out probe tasks per family")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:2]
        args.sine_seconds, args.sine_tasks, args.glyph_seconds, args.glyph_episodes = 1.0, 20, 1.0, 10
        args.tasks, args.tune_tasks, args.probe_every, args.probe_tasks = 40, 30, 15, 2
    if len(args.seeds) < 2 or args.tune_seed in args.seeds:
        p.error("--seeds needs at least two seeds, none of them --tune-seed")
    common.setup_threads(args.threads)
    info = common.print_header("bench/headline.py: headline table (offline anchors, online stream, ablations)", args)
    t_start = time.perf_counter()
    results: dict = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "sine": {}, "glyphs": {},
                     "online": {}}
    tmp = tempfile.TemporaryDirectory(prefix="bench-headline-")
    root = Path(tmp.name)

    # offline: sinusoid MAML (its meta-parameters start the online agent of the same seed)
    inits = {}
    for s in args.seeds:
        inits[s] = str(root / f"sine-{s}")
        print(f"sinusoid MAML, seed {s}: meta-training {args.sine_seconds:.0f} s ...", flush=True)
        results["sine"][s] = row = sine_anchor(s, args, inits[s])
        print(f"  {row['meta_steps']} meta-steps; K=10 MSE {num(row['K=10 1 step'])} (1 step), "
              f"{num(row['K=10 guarded <=10'])} (guarded)", flush=True)

    # offline: glyphs ProtoNet
    for shot in (1, 5):
        fam_kw = {"n_way": 5, "k_shot": shot, "k_query": 2 if args.quick else 15, **(QUICK_GLYPHS if args.quick else {})}
        test = make_family("glyphs", "test", **fam_kw)
        episodes = [test.sample(episode_rng(2024, i)) for i in range(args.glyph_episodes)]
        for s in args.seeds:
            print(f"glyphs ProtoNet {shot}-shot, seed {s}: meta-training {args.glyph_seconds:.0f} s ...", flush=True)
            r = glyph_anchor(s, shot, args, episodes)
            results["glyphs"].setdefault(f"{shot}-shot", {})[s] = r
            print(f"  {r['meta_steps']} meta-steps; accuracy {100 * r['accuracy']:.2f}%", flush=True)

    # online: pick the best fixed arm on the tuning stream (started from the first seed's weights)
    tune = {}
    for i, arm in enumerate(ARMS):
        cfg = agent_config("no selector (best fixed arm)", args.tune_seed, inits[args.seeds[0]], arm=i)
        r = run_online(cfg, args.tune_seed, args, root / f"tune-{i}", args.tune_tasks)
        tune[arm["algorithm"]] = r["preq_mse"]
        print(f"tuning stream (seed {args.tune_seed}), fixed arm {arm['algorithm']}: prequential MSE {num(r['preq_mse'])}",
              flush=True)
    best = int(np.argmin([tune[a["algorithm"]] for a in ARMS]))
    results["tuning"] = {"seed": args.tune_seed, "tasks": args.tune_tasks, "preq_mse": tune, "best": ARMS[best]["algorithm"]}
    print(f"best fixed arm: {ARMS[best]['algorithm']}", flush=True)

    for s in args.seeds:
        for v in VARIANTS:
            cfg = agent_config(v, s, inits[s], arm=best)
            r = run_online(cfg, s, args, root / f"run-{s}-{v.split()[0]}-{v.split()[-1]}", args.tasks)
            results["online"].setdefault(v, {})[s] = r
            print(f"seed {s} {v}: prequential MSE {num(r['preq_mse'])}, ACC {num(r['acc'])}, BWT {num(r['bwt'])}, "
                  f"units/task {r['units_mean']:.2f}, {r['tasks'] / r['wall_s']:.1f} tasks/s, cpu/wall "
                  f"{r['cpu_per_wall']:.2f}", flush=True)
    tmp.cleanup()
    seeds = args.seeds
    n = len(seeds)

    # -- tables
    print()
    print(f"### Offline anchors, mean ± 95% t-interval over {n} training seeds ({', '.join(map(str, seeds))})")
    rows = []
    sine = results["sine"]
    steps = ", ".join(str(sine[s]["meta_steps"]) for s in seeds)
    for key, label in (("K=10 1 step", "K=10, 1 step"), ("K=10 guarded <=10", "K=10, guarded <= 10 steps"),
                       ("K=5 1 step", "K=5, 1 step"), ("K=5 guarded <=10", "K=5, guarded <= 10 steps")):
        rows.append([f"sinusoid MAML, {label}", "query MSE (lower is better)", ci([sine[s][key] for s in seeds]),
                     f"{args.sine_seconds:.0f} s ({steps} meta-steps)"])
    for shot in ("1-shot", "5-shot"):
        g = results["glyphs"][shot]
        rows.append([f"glyphs ProtoNet 5-way {shot}", "accuracy % (test scripts)",
                     ci([g[s]["accuracy"] for s in seeds], 2, 100.0),
                     f"{args.glyph_seconds:.0f} s ({', '.join(str(g[s]['meta_steps']) for s in seeds)} meta-steps)"])
    print(common.table(["anchor", "metric", "mean ± 95% CI", "training per seed"], rows))
    print(f"sinusoid: {args.sine_tasks} fixed test tasks (seed 12345, 100-point grid); glyphs: {args.glyph_episodes} "
          "episodes of held-out test scripts, 15 query/class.")

    on = results["online"]
    print()
    print(f"### Online stream sinusoid-osaka ({args.tasks} tasks, p_stay 0.9, 3 families, recurring; agent started from "
          f"the seed's offline MAML), mean ± 95% t-interval over {n} stream seeds")
    head = ["variant", "prequential MSE", f"MSE, {SWITCH_K} tasks after a switch", "probe ACC (final MSE)",
            "BWT (−MSE)", "FWT (−MSE)", "forgetting (−MSE)", "inner steps/task (p95)", "ms/task (p95)"]
    rows = []
    for v in VARIANTS:
        r = [on[v][s] for s in seeds]
        name = v if v != "no selector (best fixed arm)" else f"no selector (fixed arm: {ARMS[best]['algorithm']})"
        rows.append([name, ci([x["preq_mse"] for x in r]), ci([x["after_switch"] for x in r]), ci([x["acc"] for x in r]),
                     ci([x["bwt"] for x in r]), ci([x["fwt"] for x in r]), ci([x["forgetting"] for x in r]),
                     f"{ci([x['units_mean'] for x in r], 2)} ({num(float(np.mean([x['units_p95'] for x in r])), 1)})",
                     f"{ci([x['ms_mean'] for x in r], 1)} ({num(float(np.mean([x['ms_p95'] for x in r])), 1)})"])
    print(common.table(head, rows))

    print()
    print("### Ablation minus full agent, paired by stream seed (mean [95% CI] p; positive MSE = the ablation is worse)")
    rows = []
    full = on["full"]
    for v in VARIANTS[1:]:
        r = on[v]
        rows.append([v, paired([r[s]["preq_mse"] for s in seeds], [full[s]["preq_mse"] for s in seeds]),
                     paired([r[s]["after_switch"] for s in seeds], [full[s]["after_switch"] for s in seeds]),
                     paired([r[s]["acc"] for s in seeds], [full[s]["acc"] for s in seeds]),
                     paired([r[s]["units_mean"] for s in seeds], [full[s]["units_mean"] for s in seeds], 2)])
    print(common.table(["variant", "Δ prequential MSE", "Δ MSE after a switch", "Δ probe ACC (MSE)", "Δ inner steps/task"],
                       rows))

    print()
    print("### Full agent: prequential MSE per family and recovery after a switch (mean ± 95% CI over seeds)")
    fams = list(dict.fromkeys(f for s in seeds for f in full[s]["per_family"]))
    rows = [[f, ci([full[s]["per_family"].get(f, math.nan) for s in seeds])] for f in fams]
    rows.append([f"first {SWITCH_K} tasks after a switch into a family seen before",
                 ci([full[s]["after_switch_revisit"] for s in seeds])])
    rows.append([f"first {SWITCH_K} tasks after a switch into a new family", ci([full[s]["after_switch_first"] for s in seeds])])
    print(common.table(["family / window", "query MSE"], rows))
    mix = {a: sum(full[s]["algorithms"].get(a, 0) for s in seeds) for a in [x["algorithm"] for x in ARMS]}
    print(f"full agent's arm mix over all seeds: {mix}; best fixed arm on the tuning stream (seed {args.tune_seed}, "
          f"{args.tune_tasks} tasks): {ARMS[best]['algorithm']} (prequential MSE "
          + ", ".join(f"{a} {num(m)}" for a, m in tune.items()) + ")")
    total = time.perf_counter() - t_start
    results["total_seconds"] = total
    print(f"total wall time {total:.0f} s")
    common.write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
