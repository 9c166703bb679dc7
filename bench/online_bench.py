"""Online intelligence on the agent's own mixed stream (issue 4): failure predictor, selector, drift.

Every number comes from the real :class:`agent.agent.Agent` answering a hidden-switch synthetic
stream (:class:`agent.streams.synthetic.SyntheticStream`, OSAKA-style): 1-D regression whose
task switches with probability 0.01 per record (so about every 100 records; a switch draws the
family ``sinusoid`` 0.5, ``sinusoid-phase`` 0.2 (phases in [pi, 2 pi], unseen in
pre-training), ``linear`` 0.15 or ``quadratic`` 0.15, and a new task of it, or with probability
0.5 brings back that family's last task); K=10 support, 10 query, inline labels). The agent
starts from a sinusoid MAML (``configs/sinusoid-maml.yaml``, the OSAKA pre-training
distribution) meta-trained for ``--pretrain-steps`` meta-steps (a count, not seconds, so a
loaded machine gives the same start) and keeps learning online (FTML-style outer steps with
replay, as shipped).

Arms (``selector.arms``): ``maml@1``, ``maml@5`` (MAML, inner lr 0.01, 1 or 5 steps),
``ridge@1`` (closed-form ridge head on the shared features: no inner steps) and ``finetune@10``
(a zero-initialised linear head fine-tuned for 10 steps at lr 0.1). Reward = quality - lam *
inner-step calls, quality = 1 / (1 + query MSE / query variance), lam = ``--lam`` (0.005).

Per stream seed the same task sequence is answered by one agent per fixed arm and by the agent
with the contextual selector. The online meta-updates use the default learner (MAML) on the
labelled tasks whatever arm answered, every arm has a fixed budget of one member, and memory
warm starts are off (``memory.warm_start: off``; memory only feeds the features), so each
fixed-arm run is the selector run's exact counterfactual: the reward any arm would have had on
any task of the selector run (the script checks this on the tasks the selector gave to each arm).
Post-probe actions and the post-drift budget widening are off in these runs (they would change
the budget of the fixed arms); a last run, "agent as shipped", turns the failure actions on.

1. **Failure predictor** (selector run): the pre-adaptation ``P(failure)`` of the chosen arm,
   predicted before the label (progressive validation), failure = normalised query MSE above
   ``online.fail_threshold`` (0.5). ROC AUC after a warm-up of ``--warmup`` tasks (goal >= 0.75),
   ECE and reliability table (10 equal-width bins, :func:`agent.stats.reliability_table`), Brier,
   log loss, River's rolling metrics at the end (window 500), and selective accuracy (share of
   non-failed answers) when abstaining on the top 10% of p_fail vs answering everything.
2. **Selector**: mean reward of the selector, the best single arm in hindsight, uniform random
   (the mean over arms), the per-task oracle (best arm on each task) and, for reference, the
   per-family oracle (best arm per family in hindsight). Goal: the selector closes >= 50% of the
   gap between the best single arm and the per-task oracle. The per-family table shows that no
   single arm is best everywhere. The selector as shipped learns from each labelled task the
   answering arm's reward and, on a ``selector.counterfactual`` share of them (default all), the
   other arms' too, evaluated by the agent on the labelled task (adapted on the support, scored on
   the query; it never changes an answer: the counterfactual check covers it): that learning
   compute is printed apart from the answering compute, which alone enters the reward.
   ``--counterfactual 0`` gives the bandit-feedback-only selector, ``--evidence-k 0`` the per-arm
   regressors without the arm memory.
3. **Drift**: the agent's drift alarms (ADWIN on the log normalised initial support loss, before
   labels: the ``input`` signal; ADWIN on quality and HDDM_A on failures, at the label: the
   ``drift`` flag shows on the same outcome for an input alarm, on the next for an outcome alarm),
   per signal and together (one alarm per task), against the true boundaries:
   *family changes* (the distribution shifts) and all boundaries (also a new task of the same
   family). Precision, recall, F1 (:func:`agent.stats.boundary_scores`, tolerance ``--tolerance``
   tasks) and the median detection delay. No numeric goal in the issue: reported as measured.

    python bench/online_bench.py --seeds 3 --out bench/results/online_bench.json
"""

from __future__ import annotations

import math
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent), str(_HERE)]

import numpy as np  # noqa: E402
from scipy.stats import mannwhitneyu  # noqa: E402

import common  # noqa: E402
from agent.agent import Agent  # noqa: E402
from agent.config import SelectorConfig, load, with_overrides  # noqa: E402
from agent.stats import boundary_scores, brier_score, expected_calibration_error, mean_ci, reliability_table  # noqa: E402
from agent.streams.synthetic import SyntheticStream  # noqa: E402
from agent.task import parse_record  # noqa: E402
from agent.training import meta_train  # noqa: E402

MODES = {"sinusoid": 0.5, "sinusoid-phase": 0.2, "linear": 0.15, "quadratic": 0.15}
ARMS = ("maml@1", "maml@5", "ridge@1", "finetune@10")
OFF = {"escalate": 1.0, "switch": 1.0, "fallback": 1.0, "abstain": 1.0}
AUC_GOAL, GAP_GOAL, ABSTAIN_SHARE = 0.75, 0.5, 0.10


def pretrain(steps: int, seed: int, threads: int, out_dir: str):
    """Meta-train the sinusoid MAML of ``configs/sinusoid-maml.yaml`` for ``steps`` meta-steps into ``out_dir``."""
    cfg = with_overrides(load(_HERE.parent / "configs" / "sinusoid-maml.yaml"), {
        "train.steps": int(steps), "train.time_limit_s": None, "train.val_every": 0, "train.val_tasks": 20,
        "train.checkpoint_every": 0, "train.seed": seed, "train.threads": threads, "train.use_vmap": True})
    return meta_train(cfg, out_dir, resume=False, progress=False, log_every=0)


def base_config(init: str, lam: float, arms, policy: str = "contextual", actions: bool = False,
                model: str | None = None, selector: dict | None = None) -> dict:
    return {
        "model": {"arch": "mlp", "hidden": [40, 40]},
        "agent": {"in_shape": [1], "out_dim": 1, "init_checkpoint": init, "seed": 0,
                  "arms": [{"algorithm": "maml", "inner_lr": 0.01}, {"algorithm": "ridge"},
                           {"algorithm": "finetune", "inner_lr": 0.1}]},
        "compute": {"levels": [[1, 1], [5, 1], [10, 1]]},
        # memory warm starts would make an answer depend on which arms answered earlier tasks (a
        # neighbour's stored state), breaking the exact counterfactuals: memory only feeds features
        "memory": {"warm_start": "off"},
        "selector": {"policy": policy, "arms": list(arms), "lam": lam, "burn_in": 3,
                     **({"model": model} if model else {}), **(selector or {})},
        # shipped thresholds (agent/configs/demo.yaml) when actions are on; otherwise never reached
        "failure": {"warmup": 30} if actions else {"warmup": 30, **OFF},
        "drift": {"widen_tasks": 50 if actions else 0},
    }


def make_stream(seed: int, n: int) -> SyntheticStream:
    return SyntheticStream(MODES, n_tasks=n, seed=seed, p_stay=0.99, recur=0.5, labels="inline", k_shot=10, k_query=10,
                           name="online-bench")


def run(config: dict, seed: int, n: int) -> dict:
    """One agent over the stream: per task (in order) id, family, journal row, outcome flags."""
    agent = Agent.from_config(config)
    agent.intel.journal = journal = []
    stream = make_stream(seed, n)
    rows, t0 = [], time.perf_counter()
    while not stream.exhausted:
        for rec in stream.poll(0):
            task = parse_record(rec.data)
            out = agent.step(task)
            stream.ack(rec.position)
            j = journal[-1]
            assert j["id"] == task.id
            rows.append({**j, "family": task.meta["family"], "flags": list(out.flags), "algorithm": out.algorithm,
                         "steps": out.budget["steps"]})
    wall = time.perf_counter() - t0
    mon = agent.intel.drift
    events = [(e.signal, e.index) for e in mon.events] if mon is not None else []
    cf = agent.intel.status()["counterfactual"]
    return {"rows": rows, "wall_s": wall, "summary": agent.intel.predictor.summary(), "events": events, "counterfactual": cf,
            "boundaries": stream.boundaries_upto(n), "families": [r["family"] for r in rows]}


# -- statistics -------------------------------------------------------------------------------
def auc(p, y) -> float:
    """ROC AUC = Mann-Whitney U / (n_pos n_neg) (ties count one half); NaN with one class only."""
    p, y = np.asarray(p, float), np.asarray(y, bool)
    if y.all() or not y.any():
        return math.nan
    return float(mannwhitneyu(p[y], p[~y], alternative="two-sided").statistic / (y.sum() * (~y).sum()))


def log_loss(p, y) -> float:
    p = np.clip(np.asarray(p, float), 1e-12, 1 - 1e-12)
    y = np.asarray(y, float)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def selective(p, failed, share: float) -> tuple[float, float]:
    """(accuracy answering all, accuracy after abstaining on the ``share`` highest p); accuracy = not failed."""
    p, ok = np.asarray(p, float), ~np.asarray(failed, bool)
    keep = np.argsort(p, kind="stable")[: int(round(len(p) * (1 - share)))]
    return float(ok.mean()), float(ok[keep].mean())


def failure_block(sel_runs: list[dict], warmup: int) -> dict:
    per_seed, pooled = [], defaultdict(list)
    for r in sel_runs:
        rows = r["rows"][warmup:]
        y = [x["failed"] for x in rows]
        out = {"n": len(rows), "fail_rate": float(np.mean(y))}
        for stage in ("pre", "post"):
            p = [x[f"p_{stage}"] for x in rows]
            out[stage] = {"auc": auc(p, y), "ece": expected_calibration_error(p, y, n_bins=10), "brier": brier_score(p, y),
                          "log_loss": log_loss(p, y), "rolling_end": {k: r["summary"][stage][k] for k in ("rocauc", "logloss", "brier")}}
            acc_all, acc_sel = selective(p, y, ABSTAIN_SHARE)
            out[stage]["selective"] = {"all": acc_all, "abstain_top10": acc_sel}
            pooled[f"p_{stage}"] += p
        pooled["y"] += y
        per_seed.append(out)
    t = reliability_table(pooled["p_pre"], pooled["y"], n_bins=10)
    rel = [{"bin": f"({lo:.1f}, {hi:.1f}]", "n": int(c), "mean_p": float(m), "observed": float(a)}
           for lo, hi, c, m, a in zip(t.lower, t.upper, t.count, t.mean_confidence, t.accuracy) if c]
    return {"per_seed": per_seed, "pooled_auc_pre": auc(pooled["p_pre"], pooled["y"]),
            "pooled_auc_post": auc(pooled["p_post"], pooled["y"]),
            "pooled_ece_pre": expected_calibration_error(pooled["p_pre"], pooled["y"], n_bins=10), "reliability_pre": rel}


def selector_block(seed_runs: list[dict]) -> dict:
    """Selector vs best arm / random / oracles, from the fixed-arm counterfactuals on the same ids."""
    per_seed = []
    fam_rewards: dict = defaultdict(lambda: defaultdict(list))
    gaps, diffs = [], []
    for runs in seed_runs:
        sel = runs["selector"]["rows"]
        ids = [r["id"] for r in sel]
        R = np.array([[row["reward"] for row in runs[a]["rows"]] for a in ARMS])  # arms x tasks
        for a in ARMS:
            assert [row["id"] for row in runs[a]["rows"]] == ids
        s = np.array([r["reward"] for r in sel])
        fams = np.array([r["family"] for r in sel])
        # counterfactual check: where the selector pulled arm a, its reward is the fixed run's
        idx = {a: i for i, a in enumerate(ARMS)}
        dev = max((abs(r["reward"] - R[idx[r["arm"]], t]) for t, r in enumerate(sel) if r["arm"] in idx), default=0.0)
        means = R.mean(1)
        best = int(np.argmax(means))
        oracle = R.max(0).mean()
        fam_oracle = sum(R[:, fams == f].mean(1).max() * np.mean(fams == f) for f in set(fams))
        gap = (s.mean() - means[best]) / (oracle - means[best]) if oracle > means[best] + 1e-9 else math.nan
        fam_gap = (s.mean() - means[best]) / (fam_oracle - means[best]) if fam_oracle > means[best] + 1e-9 else math.nan
        picks = {a: int(sum(r["arm"] == a for r in sel)) for a in ARMS}
        per_seed.append({"selector": float(s.mean()), "arms": dict(zip(ARMS, means.tolist())), "best_arm": ARMS[best],
                         "random": float(means.mean()), "oracle": float(oracle), "family_oracle": float(fam_oracle),
                         "gap_closed": gap, "family_gap_closed": fam_gap, "counterfactual_max_dev": float(dev),
                         "picks": picks, "selector_late": float(s[len(s) // 2:].mean()),
                         "oracle_late": float(R.max(0)[len(s) // 2:].mean()), "best_late": float(R[best, len(s) // 2:].mean())})
        per_seed[-1]["answer_steps"] = float(np.mean([r["compute"] for r in sel]))
        per_seed[-1]["counterfactual_steps"] = runs["selector"]["counterfactual"]["steps"] / len(sel)
        per_seed[-1]["counterfactual_tasks"] = runs["selector"]["counterfactual"]["tasks"]
        if "shipped" in runs:
            per_seed[-1]["shipped"] = float(np.mean([r["reward"] for r in runs["shipped"]["rows"]]))
        gaps.append(gap)
        diffs += (s - R[best]).tolist()
        for f in set(fams):
            m = fams == f
            for a in ARMS:
                fam_rewards[f][a] += R[idx[a], m].tolist()
            fam_rewards[f]["selector"] += s[m].tolist()
            fam_rewards[f]["oracle"] += R.max(0)[m].tolist()
            fam_rewards[f]["_picks"] += [r["arm"] for r, k in zip(sel, m) if k]
    fam = {}
    for f, d in sorted(fam_rewards.items()):
        cols = {k: float(np.mean(v)) for k, v in d.items() if k != "_picks"}
        pk = d["_picks"]
        cols["best_arm"] = max(ARMS, key=lambda a: cols[a])
        cols["n"] = len(d["selector"])
        cols["selector_top_pick"] = max(ARMS, key=pk.count) if pk else "-"
        fam[f] = cols
    ci = mean_ci(diffs) if len(diffs) > 1 else None
    return {"per_seed": per_seed, "families": fam, "gap_closed_mean": float(np.nanmean(gaps)) if gaps else math.nan,
            "selector_minus_best_ci": None if ci is None else [ci.mean, ci.half_width]}


def drift_block(seed_runs: list[dict], tol: int, names=("selector", "maml@5")) -> dict:
    """Boundary scores of the alarms per signal and of their union (one alarm per task), per run kind."""
    out = {}
    for name in names:
        res = {"tasks": 0, "flags_match": True}
        agg: dict = {}
        for runs in seed_runs:
            r = runs[name]
            rows, fams = r["rows"], r["families"]
            res["tasks"] += len(rows)
            by = defaultdict(set)
            for sig, idx in r["events"]:  # outcome signals: index = labelled task; input: answered task
                by[sig].add(idx)
            by["any"] = set().union(*by.values()) if by else set()
            # the outcome 'drift' flag: on the same task for an input alarm, the next one for an outcome alarm
            expect = sorted(by["input"] | {i + 1 for s_ in ("quality", "failure") for i in by[s_] if i + 1 < len(rows)})
            res["flags_match"] &= [i for i, x in enumerate(rows) if "drift" in x["flags"]] == expect
            true = {"family": [b for b in r["boundaries"] if fams[b] != fams[b - 1]], "all": r["boundaries"]}
            for sig in ("input", "quality", "failure", "any"):
                for k, tb in true.items():
                    s_ = boundary_scores(tb, sorted(by[sig]), tol)
                    a = agg.setdefault((sig, k), {"alarms": 0, "tp": 0, "fp": 0, "fn": 0, "delays": []})
                    a["alarms"] += len(by[sig])
                    for f in ("tp", "fp", "fn"):
                        a[f] += getattr(s_, f)
                    a["delays"] += [d for d in s_.delays.tolist() if not math.isnan(d)]
        for (sig, k), a in agg.items():
            tp, fp, fn = a["tp"], a["fp"], a["fn"]
            res[f"{sig}/{k}"] = {"alarms": a["alarms"], "true": tp + fn, "tp": tp, "fp": fp, "fn": fn,
                                  "precision": tp / (tp + fp) if tp + fp else math.nan,
                                  "recall": tp / (tp + fn) if tp + fn else math.nan,
                                  "f1": 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else math.nan,
                                  "median_delay": float(np.median(a["delays"])) if a["delays"] else math.nan}
        out[name] = res
    return out


# -- printing ---------------------------------------------------------------------------------
def f3(v) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def print_failure(fb: dict) -> bool:
    print("### 1. Failure predictor (selector run, after warm-up; progressive: p predicted before each label)")
    rows = []
    for i, s in enumerate(fb["per_seed"]):
        for st in ("pre", "post"):
            q = s[st]
            rows.append([i, st, s["n"], f3(s["fail_rate"]), f3(q["auc"]), f3(q["ece"]), f3(q["brier"]), f3(q["log_loss"]),
                         " / ".join(f3(q["rolling_end"][k]) for k in ("rocauc", "logloss", "brier")),
                         f3(q["selective"]["all"]), f3(q["selective"]["abstain_top10"])])
    print(common.table(["seed", "stage", "tasks", "fail rate", "ROC AUC", "ECE", "Brier", "log loss",
                        "River rolling AUC / log loss / Brier (end)", "sel. acc (all)", "sel. acc (abstain top 10%)"], rows))
    print("\nReliability of the pre-adaptation p_fail (all seeds pooled, 10 equal-width bins):")
    print(common.table(["bin", "tasks", "mean p_fail", "observed failure rate"],
                       [[r["bin"], r["n"], f3(r["mean_p"]), f3(r["observed"])] for r in fb["reliability_pre"]]))
    aucs = [s["pre"]["auc"] for s in fb["per_seed"]]
    ok = all(a >= AUC_GOAL for a in aucs)
    print(f"\nGoal: pre-adaptation ROC AUC >= {AUC_GOAL} after warm-up: per seed {', '.join(f3(a) for a in aucs)}; "
          f"pooled {f3(fb['pooled_auc_pre'])} (post-probe {f3(fb['pooled_auc_post'])}); pooled ECE {f3(fb['pooled_ece_pre'])} "
          f"-> {verdict(ok)}")
    return ok


def print_selector(sb: dict) -> bool:
    print("\n### 2. Selector: mean reward on the same task ids (reward = quality - lam * inner steps)")
    rows = []
    for i, s in enumerate(sb["per_seed"]):
        rows.append([i, *(f3(s["arms"][a]) for a in ARMS), s["best_arm"], f3(s["random"]), f3(s["selector"]),
                     f3(s["oracle"]), f3(s["family_oracle"]), f3(s.get("shipped", math.nan)), f3(s["gap_closed"]),
                     f3(s["family_gap_closed"]), f"{s['counterfactual_max_dev']:.1e}"])
    print(common.table(["seed", *ARMS, "best arm", "uniform random", "selector", "per-task oracle", "per-family oracle",
                        "agent as shipped", "gap closed (task oracle)", "gap closed (family oracle)", "cf. check max |dev|"], rows))
    print("\nPer family (all seeds pooled): mean reward per arm; the best arm differs by family")
    fr = []
    for f, c in sb["families"].items():
        fr.append([f, c["n"], *(("**" + f3(c[a]) + "**") if a == c["best_arm"] else f3(c[a]) for a in ARMS),
                   f3(c["selector"]), c["selector_top_pick"], f3(c["oracle"])])
    print(common.table(["family", "tasks", *ARMS, "selector", "selector's top pick", "per-task oracle"], fr))
    print("\nSelector picks per seed: " + "; ".join(", ".join(f"{a} {n}" for a, n in s["picks"].items()) for s in sb["per_seed"]))
    print("Selector compute per task: answering (inner-step calls, in the reward) "
          + ", ".join(f"{s['answer_steps']:.2f}" for s in sb["per_seed"])
          + "; learning from counterfactual evaluations of the other arms (selector.counterfactual; not in the reward) "
          + ", ".join(f"{s['counterfactual_steps']:.2f} on {s['counterfactual_tasks']} tasks" for s in sb["per_seed"]))
    late = "; ".join(f"selector {f3(s['selector_late'])} best arm {f3(s['best_late'])} oracle {f3(s['oracle_late'])}"
                     for s in sb["per_seed"])
    print(f"Second half of each stream: {late}")
    if sb["selector_minus_best_ci"]:
        m, h = sb["selector_minus_best_ci"]
        print(f"Selector - best single arm, per task, pooled: {m:+.4f} ± {h:.4f} (95% t-interval; tasks are not independent)")
    best_fams = {c["best_arm"] for c in sb["families"].values()}
    bests = ", ".join(f"{f}: {c['best_arm']}" for f, c in sb["families"].items())
    print(f"Best arm per family: {bests} "
          f"-> no single arm best everywhere: {'yes' if len(best_fams) > 1 else 'NO'}")
    g = sb["gap_closed_mean"]
    ok = not math.isnan(g) and g >= GAP_GOAL
    print(f"Goal: close >= {GAP_GOAL:.0%} of the gap best single arm -> per-task oracle: mean over seeds {f3(g)} -> {verdict(ok)}")
    return ok


def print_drift(db: dict, tol: int) -> None:
    print(f"\n### 3. Drift: alarms vs true boundaries (tolerance {tol} tasks; all seeds pooled)")
    rows = []
    for name, r in db.items():
        for sig in ("any", "input", "quality", "failure"):
            for k in ("family", "all"):
                q = r[f"{sig}/{k}"]
                rows.append([name, "all signals" if sig == "any" else sig, "family changes" if k == "family" else "all boundaries",
                             q["true"], q["alarms"], q["tp"], q["fp"], f3(q["precision"]), f3(q["recall"]), f3(q["f1"]),
                             f3(q["median_delay"])])
    print(common.table(["run", "signal", "boundaries", "true", "alarms", "TP", "FP", "precision", "recall", "F1",
                        "median delay"], rows))
    for name, r in db.items():
        print(f"{name}: {1000 * r['any/all']['alarms'] / max(1, r['tasks']):.1f} alarm tasks per 1000; outcome 'drift' "
              f"flags where the alarms say: {'yes' if r['flags_match'] else 'NO'}")


def main(argv=None) -> dict:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="stream seeds: seed, seed+1, ...")
    p.add_argument("--tasks", type=int, default=1000, help="tasks per stream")
    p.add_argument("--pretrain-steps", type=int, default=3000, help="meta-steps of sinusoid MAML pre-training")
    p.add_argument("--lam", type=float, default=0.005, help="reward = quality - lam * inner steps")
    p.add_argument("--warmup", type=int, default=100, help="tasks left out of the failure-predictor scores")
    p.add_argument("--tolerance", type=int, default=100, help="drift: largest delay that counts as a detection")
    p.add_argument("--selector-model", default=None, choices=("linear", "arf", "knn"),
                   help="selector.model of the contextual runs (default: the config default)")
    p.add_argument("--counterfactual", type=float, default=None,
                   help="selector.counterfactual of the contextual runs (default: the config default)")
    p.add_argument("--evidence-k", type=int, default=None,
                   help="selector.evidence_k of the contextual runs (default: the config default; 0: regressors only)")
    p.add_argument("--no-shipped", action="store_true", help="skip the run with the failure actions on")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.tasks, args.pretrain_steps, args.warmup, args.tolerance = 1, 60, 100, 10, 30
    common.setup_threads(args.threads)
    info = common.print_header("online intelligence on the agent's mixed stream (issue 4)", args)
    extra = {k: v for k, v in (("counterfactual", args.counterfactual), ("evidence_k", args.evidence_k)) if v is not None}
    with tempfile.TemporaryDirectory(prefix="bench-online-") as tmp:
        t0 = time.perf_counter()
        tr = pretrain(args.pretrain_steps, args.seed, args.threads, tmp)
        print(f"pre-training: sinusoid MAML, {tr.step} meta-steps in {time.perf_counter() - t0:.0f} s; "
              f"stream: {MODES}, p_stay 0.99, {args.tasks} tasks x {args.seeds} seeds; arms {', '.join(ARMS)}; lam {args.lam}; "
              f"selector.model {args.selector_model or SelectorConfig().model}, "
              f"evidence_k {extra.get('evidence_k', SelectorConfig().evidence_k)}, "
              f"counterfactual {extra.get('counterfactual', SelectorConfig().counterfactual)}")
        seed_runs, walls = [], defaultdict(float)
        for k in range(args.seeds):
            s = args.seed + k
            runs = {a: run(base_config(tmp, args.lam, [a]), s, args.tasks) for a in ARMS}
            runs["selector"] = run(base_config(tmp, args.lam, ARMS, model=args.selector_model, selector=extra), s, args.tasks)
            if not args.no_shipped:
                runs["shipped"] = run(base_config(tmp, args.lam, ARMS, actions=True, model=args.selector_model, selector=extra),
                                      s, args.tasks)
            for name, r in runs.items():
                walls[name] += r["wall_s"]
            seed_runs.append(runs)
            took = ", ".join(f"{n} {r['wall_s']:.0f} s" for n, r in runs.items())
            print(f"seed {s}: done ({took})", flush=True)
    print(f"load avg now {common.machine_info()['loadavg_1_5_15']}\n")
    fb = failure_block([r["selector"] for r in seed_runs], args.warmup)
    sb = selector_block(seed_runs)
    db = drift_block(seed_runs, args.tolerance)
    ok_f = print_failure(fb)
    ok_s = print_selector(sb)
    print_drift(db, args.tolerance)
    if "shipped" in seed_runs[0]:
        acts = defaultdict(int)
        for runs in seed_runs:
            for r in runs["shipped"]["rows"]:
                for fl in ("escalated", "switched", "fallback", "likely_wrong"):
                    acts[fl] += fl in r["flags"]
        print(f"\nAgent as shipped (selector + failure actions at the demo thresholds + drift widening): actions {dict(acts)}; "
              f"mean reward per seed {', '.join(f3(s.get('shipped', math.nan)) for s in sb['per_seed'])} "
              f"(selector without actions {', '.join(f3(s['selector']) for s in sb['per_seed'])})")
    print(f"\nVerdicts: failure predictor AUC {verdict(ok_f)}; selector gap {verdict(ok_s)}; drift: reported (no goal)")
    result = {"info": info, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "arms": ARMS, "modes": MODES, "failure": fb, "selector": sb, "drift": db,
              "walls_s": dict(walls), "goals": {"auc": ok_f, "gap": ok_s}}
    common.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
