"""Episodic memory: quality on recurring families with memory on vs off, and k-NN retrieval latency.

(a) **Recurring families.** The built-in ``sinusoid-osaka`` stream (sinusoid / sinusoid-frequency /
linear, p_stay 0.9, K=10, inline labels) with ``recur=1.0``: every switch back into a family
brings back that family's most recent task, and within a segment every record is the same task
with fresh examples. Two agents answer the same records in lockstep (task i by the memory-off
agent, then by the memory-on agent, each ``Agent.step`` timed on its own), from the same
meta-init (a sinusoid MAML meta-trained for ``--train-seconds`` with
``agent.training.meta_train``, loaded through ``agent.init_checkpoint``), identical except
``memory.enabled``. Online meta-learning stays on (it does not read memory, and its replay RNG is
separate, so both agents' meta-parameters follow the same trajectory). The token bucket is
made effectively unlimited (``compute.rate_per_s`` 1e9) so wall-clock speed cannot change a
budget between the two runs.

Memory enters the answer through ``memory.warm_start: select`` (the shipped default, see
``Agent._adapt``): the meta-init is adapted as without memory; a retrieved neighbour's stored
head is adapted too only if, before any step, it fits the new support at least as well as the
meta-init does; the member with the lowest support loss answers. Two budget settings: the
shipped **adaptive** levels ``[[1,1],[5,1],[10,2]]`` and **top level always** (``budget: 2``:
every task 10 steps, up to 1 neighbour member).

Scored: query MSE per task from the emitted predictions. Rows by visit type, from the stream's
ground truth (``stream.info``; the agent never sees it): *novel task, first record* (a new task's
first record: nothing of that task is in memory; the control, memory must not hurt);
*novel task, later records* (earlier records of the same segment are in memory); *recurring
task, first record* (its earlier segment is in memory); *recurring task, later records*;
*family's later visits* (every task of a family's second and later segments); *all*. Reported:
mean MSE off and on, the paired mean difference off - on (> 0: memory helps) with a 95%
paired-t CI and p (``agent.stats.paired_t_test``), the share of tasks answered by a warm start,
and the median time per task off and on.

(b) **Retrieval latency and recall** of ``MemoryBank.query`` (k = 4 as in the shipped config) on
banks of 10k and 100k entries of dim 64 and 128, filled through ``MemoryBank.add`` (so the IVF
index is trained and maintained as in use; ``index_min`` 1000 here so that the 10k banks have
one too). Entries are *clustered* like task embeddings (1,000 random centres, unit-norm noise
of relative size 0.35; queries are fresh draws around the same centres); recall is also measured
on *isotropic* random vectors, the worst case for any partitioning index. Methods, all on one
thread: **numpy BLAS** (the previous scoring path, ``emb @ q`` on numpy's default OpenBLAS
threads, plus argpartition), **exact** (``query(exact=True)``: torch matrix-vector product on
the process's torch threads), **ivf nprobe=P** (the index, exact re-rank of the candidates).
All bank x method pairs are queried in shuffled, interleaved rounds; every query is timed on its
own (``perf_counter``) for p50/p99. Recall@4 = share of the exact top 4 that the method returns.
Goal (issue 3): p99 <= 2 ms at 100k entries, dim 64, on 2 cores.

    python bench/memory_bench.py --train-seconds 60 --tasks 1500 --out bench/results/memory_bench.json
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent), str(_HERE)]

import numpy as np  # noqa: E402

import common  # noqa: E402
from agent.agent import Agent  # noqa: E402
from agent.memory import MemoryBank, MemoryEntry  # noqa: E402
from agent.stats import paired_t_test  # noqa: E402
from agent.streams.synthetic import make_stream  # noqa: E402
from agent.task import parse_record  # noqa: E402
from compute_scaling import train_sinusoid_maml  # noqa: E402


def agent_config(init: str | None, memory: bool, budget, seed: int, threads: int, warm_start: str = "select") -> dict:
    return {
        "model": {"arch": "mlp", "hidden": [40, 40]},
        "agent": {"in_shape": [1], "out_dim": 1, "seed": seed, "threads": threads, "init_checkpoint": init,
                  "arms": [{"algorithm": "maml", "inner_lr": 0.01, "budget": budget}]},
        "compute": {"levels": [[1, 1], [5, 1], [10, 2]], "rate_per_s": 1e9, "capacity": 1e9},
        "memory": {"enabled": memory, "capacity": 2000, "eviction": "reservoir", "dim": 64, "k": 4, "state": "head",
                   "warm_start": warm_start},
        "online": {"enabled": True},
        "metrics": {"addr": "0"},
    }


def stream_tasks(n: int, seed: int):
    stream = make_stream("sinusoid-osaka", n_tasks=n, recur=1.0, seed=seed)
    records = []
    while not stream.exhausted:
        records += stream.poll(0)
    tasks = [parse_record(r.data) for r in records]
    infos = [stream.info(i) for i in range(len(tasks))]
    return tasks, infos


def _mse(out, t) -> float:
    pred = np.asarray(out.predictions, dtype=np.float64).reshape(-1)
    y = np.asarray(t.query_y, dtype=np.float64).reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.mean((pred - y) ** 2))


def run_agents(cfgs: dict[str, dict], tasks) -> dict:
    """The agents in lockstep: per task, each one's MSE and seconds, and whether a warm start answered."""
    agents = {k: Agent.from_config(c) for k, c in cfgs.items()}
    n = len(tasks)
    res = {k: {"mse": np.empty(n), "secs": np.empty(n), "warm": np.zeros(n, dtype=bool)} for k in agents}
    for i, t in enumerate(tasks):
        for name, agent in agents.items():
            t0 = time.perf_counter()
            out = agent.step(t)
            res[name]["secs"][i] = time.perf_counter() - t0
            res[name]["mse"][i] = _mse(out, t)
            res[name]["warm"][i] = "warm_start" in out.flags
    return res


def visit_masks(infos) -> dict[str, np.ndarray]:
    seen_family_segments: dict[str, int] = {}
    later = np.zeros(len(infos), dtype=bool)
    for i, inf in enumerate(infos):
        fam, seg = inf["family"], inf["segment"]
        first = seen_family_segments.setdefault(fam, seg)
        later[i] = seg != first
    idx = np.arange(len(infos))
    start = np.array([inf["start"] for inf in infos])
    recurring = np.array([inf["identity"] != inf["start"] for inf in infos])
    first_record = idx == start
    return {"novel task, first record": ~recurring & first_record,
            "novel task, later records": ~recurring & ~first_record,
            "recurring task, first record": recurring & first_record,
            "recurring task, later records": recurring & ~first_record,
            "family's later visits": later,
            "all": np.ones(len(infos), bool)}


def paired_rows(res: dict, masks: dict, base: str = "off") -> list[dict]:
    off, on, warm = res[base]["mse"], res["on"]["mse"], res["on"]["warm"]
    rows = []
    for name, m in masks.items():
        a, b = off[m], on[m]
        ok = np.isfinite(a) & np.isfinite(b)
        a, b = a[ok], b[ok]
        row = {"subset": name, "n": int(m.sum()), "non_finite_pairs": int((~ok).sum()),
               "warm_share": float(warm[m].mean()) if m.any() else float("nan"),
               "ms_off": float(np.median(res[base]["secs"][m]) * 1e3) if m.any() else float("nan"),
               "ms_on": float(np.median(res["on"]["secs"][m]) * 1e3) if m.any() else float("nan")}
        if a.size >= 2:
            t = paired_t_test(a, b)
            row.update(off=float(a.mean()), on=float(b.mean()), diff=t.mean_difference, low=t.low, high=t.high, p=t.pvalue,
                       better=float(np.mean(b < a)), worse=float(np.mean(b > a)))
        rows.append(row)
    return rows


def part_a(args, init: str | None, log) -> dict:
    tasks, infos = stream_tasks(args.tasks, args.seed)
    masks = visit_masks(infos)
    log(f"stream sinusoid-osaka recur=1.0: {len(tasks)} tasks, {len({i['segment'] for i in infos})} segments; "
        + ", ".join(f"{k}: {int(v.sum())}" for k, v in masks.items()))
    out = {}
    for label, budget in (("adaptive", "adaptive"), ("top level always", 2)):
        w0, c0 = time.perf_counter(), time.process_time()
        res = run_agents({"off": agent_config(init, False, budget, args.seed, args.threads),
                          "on": agent_config(init, True, budget, args.seed, args.threads),
                          "features only": agent_config(init, True, budget, args.seed, args.threads, "off")}, tasks)
        cpw = (time.process_time() - c0) / (time.perf_counter() - w0)
        log(f"  budget {label}: " + ", ".join(f"{k} {v['secs'].sum():.1f} s" for k, v in res.items())
            + f"; {int(res['on']['warm'].sum())} warm-start answers, cpu-per-wall {cpw:.2f}")
        ratio = res["on"]["secs"] / res["off"]["secs"]
        out[label] = {"rows": paired_rows(res, masks), "rows_vs_features_only": paired_rows(res, masks, "features only"),
                      "total_s_off": float(res["off"]["secs"].sum()), "total_s_on": float(res["on"]["secs"].sum()),
                      "total_s_features_only": float(res["features only"]["secs"].sum()),
                      "median_time_ratio_on_off": float(np.median(ratio)), "cpu_per_wall": cpw}
    return out


# -- (b) latency -------------------------------------------------------------------------------
def clustered(n: int, dim: int, centres: np.ndarray, rng: np.random.Generator, noise: float = 0.35) -> np.ndarray:
    c = centres[rng.integers(0, centres.shape[0], n)]
    x = c + noise * np.linalg.norm(c, axis=1, keepdims=True) * _unit_rows(rng.standard_normal((n, dim)))
    return x.astype(np.float32)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def filled_bank(data: np.ndarray, nprobe: int, seed: int) -> MemoryBank:
    n, dim = data.shape
    bank = MemoryBank(n, dim, "reservoir", rng=np.random.default_rng(seed), index="ivf", index_min=1000, nprobe=nprobe)
    for i in range(n):
        bank.add(MemoryEntry(f"t{i}", data[i]))
    return bank


def numpy_blas_query(bank: MemoryBank, q: np.ndarray, k: int) -> np.ndarray:
    """The previous scoring path: numpy (OpenBLAS, default threads) matrix-vector product + argpartition."""
    n = len(bank)
    qn = (q / np.linalg.norm(q)).astype(np.float32)
    s = bank.embeddings @ qn
    idx = np.argpartition(s, n - k)[n - k:]
    return idx[np.argsort(-s[idx])]


def recall(bank: MemoryBank, queries: np.ndarray, k: int, nprobe: int) -> float:
    bank.index.nprobe = nprobe
    hits = []
    for q in queries:
        exact = set(bank.query_indices(q, k, exact=True)[0].tolist())
        hits.append(len(exact & set(bank.query_indices(q, k)[0].tolist())) / k)
    return float(np.mean(hits))


def part_b(args, log) -> dict:
    rng = np.random.default_rng(args.seed)
    sizes = (2_000, 5_000) if args.quick else (10_000, 100_000)
    nprobes = (8, 16)
    banks, queries, centres = {}, {}, {}
    total_q = args.rounds * args.per_round
    for dim in (64, 128):
        centres[dim] = rng.standard_normal((1000, dim))
        for n in sizes:
            t0 = time.perf_counter()
            banks[(n, dim)] = filled_bank(clustered(n, dim, centres[dim], rng), nprobes[0], args.seed)
            queries[(n, dim)] = clustered(total_q, dim, centres[dim], rng)
            ix = banks[(n, dim)].index
            log(f"  filled {n} x {dim} in {time.perf_counter() - t0:.1f} s (IVF: {ix.nlist} lists, {ix.trainings} trainings)")
    # Retraining cost at the largest size (what one add pays when the index is rebuilt).
    big = banks[(sizes[-1], 64)]
    t0 = time.perf_counter()
    big.index.train(big.embeddings)
    train_s = time.perf_counter() - t0

    methods = {"numpy BLAS (previous)": None, "exact": 0, **{f"ivf nprobe={p}": p for p in nprobes}}
    configs = [(n, dim, m) for (n, dim) in banks for m in methods]

    def run(key, q):
        n, dim, m = key
        bank, p = banks[(n, dim)], methods[m]
        if p is None:
            return numpy_blas_query(bank, q, args.k)
        if p == 0:
            return bank.query_indices(q, args.k, exact=True)
        bank.index.nprobe = p
        return bank.query_indices(q, args.k)

    for key in configs:  # warm-up
        for q in queries[key[:2]][:20]:
            run(key, q)
    times = {c: [] for c in configs}
    cpu_per_wall = []
    order_rng = random.Random(args.seed)
    for r in range(args.rounds):
        order = configs[:]
        order_rng.shuffle(order)
        w0, c0 = time.perf_counter(), time.process_time()
        for key in order:
            for q in queries[key[:2]][r * args.per_round:(r + 1) * args.per_round]:
                t0 = time.perf_counter()
                run(key, q)
                times[key].append(time.perf_counter() - t0)
        wall = time.perf_counter() - w0
        cpu_per_wall.append((time.process_time() - c0) / wall)
    rec_q = 200 if not args.quick else 20
    out = {}
    for key, v in times.items():
        a = np.asarray(v)
        n, dim, m = key
        p = methods[m]
        row = {"n": n, "dim": dim, "method": m, "queries": int(a.size), "p50_ms": float(np.percentile(a, 50) * 1e3),
               "p99_ms": float(np.percentile(a, 99) * 1e3), "mean_ms": float(a.mean() * 1e3), "max_ms": float(a.max() * 1e3)}
        if p:
            row["recall_clustered"] = recall(banks[(n, dim)], queries[(n, dim)][:rec_q], args.k, p)
        out[f"{n}x{dim}/{m}"] = row
    # Worst case for recall: isotropic random vectors (no clusters to find).
    iso = {}
    n_iso = sizes[-1]
    iso_bank = filled_bank(rng.standard_normal((n_iso, 64)).astype(np.float32), nprobes[0], args.seed)
    iso_q = rng.standard_normal((rec_q, 64)).astype(np.float32)
    for p in (*nprobes, 32, 64):
        iso[p] = recall(iso_bank, iso_q, args.k, p)
    return {"rows": out, "cpu_per_wall": cpu_per_wall, "k": args.k, "train_seconds_at_max": train_s,
            "train_size": sizes[-1], "recall_isotropic": {"n": n_iso, "dim": 64, "by_nprobe": iso}}


def fmt(x: float, d: int = 4) -> str:
    return f"{x:.{d}f}"


def main(argv=None) -> int:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--train-seconds", type=float, default=60.0, help="meta-training of the MAML init (0: random init)")
    p.add_argument("--tasks", type=int, default=1500, help="stream length for part (a)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--per-round", type=int, default=100, help="queries per bank and method per round")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--skip-a", action="store_true", help="latency only")
    p.add_argument("--skip-b", action="store_true", help="quality only")
    args = p.parse_args(argv)
    if args.quick:
        args.train_seconds, args.tasks, args.rounds, args.per_round = min(args.train_seconds, 1.0), 24, 2, 10
    common.setup_threads(args.threads)
    info = common.print_header("bench/memory_bench.py: episodic memory quality and retrieval latency", args)
    log = lambda s: print(s, flush=True)  # noqa: E731
    results = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
               "blas_threads_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
    if not args.skip_a:
        with tempfile.TemporaryDirectory(prefix="bench-memory-") as out:
            init = None
            if args.train_seconds > 0:
                log(f"meta-training sinusoid MAML for {args.train_seconds:.0f} s ...")
                res = train_sinusoid_maml(args.train_seconds, args.seed, args.threads, out)
                log(f"  {res.step} meta-steps in {res.seconds:.1f} s")
                init, results["meta_steps"] = out, res.step
            results["a"] = part_a(args, init, log)
    if not args.skip_b:
        log("retrieval latency ...")
        results["b"] = part_b(args, log)

    for (label, a), (base, key) in [(x, y) for x in results.get("a", {}).items()
                                    for y in (("off", "rows"), ("features only", "rows_vs_features_only"))]:
        print()
        what = "memory off vs on" if base == "off" else \
            "memory features only (warm_start: off) vs on, i.e. the warm starts' own effect"
        print(f"### (a) query MSE, {what}, paired on the same {args.tasks} task ids; budget: {label}")
        table = []
        for r in a[key]:
            head = [r["subset"], r["n"], f"{100 * r['warm_share']:.0f}%"]
            times = f"{r['ms_off']:.1f} / {r['ms_on']:.1f}"
            if "diff" not in r:
                table.append(head + ["-", "-", "-", "-", "-", times])
                continue
            table.append(head + [fmt(r["off"]), fmt(r["on"]), f"{fmt(r['diff'])} [{fmt(r['low'])}, {fmt(r['high'])}]",
                                 f"{r['p']:.3g}", f"{100 * r['better']:.0f}% / {100 * r['worse']:.0f}%", times])
        b_ = "off" if base == "off" else "feat."
        print(common.table(["tasks", "n", "warm-start answers", f"MSE {b_}", "MSE on", f"{b_} - on, 95% paired-t CI", "p",
                            "on better / worse", f"median ms/task {b_} / on"], table))
        if base == "off":
            print(f"total {a['total_s_off']:.1f} s off, {a['total_s_on']:.1f} s on, {a['total_s_features_only']:.1f} s "
                  f"features only; median per-task time ratio on/off {a['median_time_ratio_on_off']:.2f}; "
                  f"cpu-per-wall {a['cpu_per_wall']:.2f}")
    if "b" in results:
        b = results["b"]
        print()
        print(f"### (b) MemoryBank.query latency and recall@{b['k']}, clustered entries, {args.rounds} interleaved rounds "
              f"x {args.per_round} queries per bank and method, 1 torch thread")
        rows = [[f"{r['n']:,}", r["dim"], r["method"], r["queries"], fmt(r["p50_ms"], 3), fmt(r["p99_ms"], 3),
                 fmt(r["mean_ms"], 3), fmt(r["max_ms"], 2),
                 fmt(r["recall_clustered"], 3) if "recall_clustered" in r else "1 (exact)"]
                for r in b["rows"].values()]
        print(common.table(["entries", "dim", "method", "queries", "p50 ms", "p99 ms", "mean ms", "max ms", "recall@k"], rows))
        v = b["cpu_per_wall"]
        print(f"cpu-per-wall over {len(v)} rounds: min {min(v):.2f} median {statistics.median(v):.2f} max {max(v):.2f}")
        iso = b["recall_isotropic"]
        print(f"recall@{b['k']} on isotropic random vectors ({iso['n']:,} x {iso['dim']}, worst case): "
              + ", ".join(f"nprobe {p}: {r:.3f}" for p, r in iso["by_nprobe"].items()))
        print(f"IVF training on {b['train_size']:,} x 64 (paid by one add per retraining): {b['train_seconds_at_max']:.2f} s")
        print()
        big = max(r["n"] for r in b["rows"].values())
        for r in b["rows"].values():
            if r["n"] == big:
                ok = r["p99_ms"] <= 2.0
                print(f"Goal p99 <= 2 ms at {r['n']:,} entries, dim {r['dim']}, {r['method']}: "
                      f"{'PASS' if ok else 'MISS'} (p99 {r['p99_ms']:.3f} ms)")
    common.write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
