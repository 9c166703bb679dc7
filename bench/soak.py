"""Soak and backpressure benchmark of the daemon (issue 7).

Writes ``--tasks`` sine regression tasks (half with inline labels, half never labelled, so the
pending-feedback table fills to its bound) into one file up front, then runs
``python -m agent run --input FILE --follow --max-tasks N`` on it. The source is therefore
always far ahead of the agent (the backpressure case: a producer much faster than the agent);
the agent must read it in bounded chunks. Every ``--every`` tasks it samples the daemon's RSS
(``/proc/<pid>/status``), the latency p50/p99 of the answers in that window (their
``latency_ms``), and from the metrics endpoint the memory-bank size, the pending table and the
number of exported series (no unbounded labels) and the mean checkpoint duration, and from the
newest checkpoint the number of answered ids the agent remembers (``limits.seen_ids`` bounds
it), the checkpoint's size and its River state's size (any state that grows shows there). Rows are printed as they are
measured, so a run cut short is still informative. Prints the table and the verdicts:
RSS flat within 10% after warm-up (the first 20% of tasks), and p99 stable (the last window's
p99 within 2x the first post-warm-up window's)::

    python bench/soak.py --tasks 100000
    python bench/soak.py --quick
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import parser, print_header, setup_threads, write_json  # noqa: E402

CONFIG = {"model": {"arch": "mlp", "hidden": [16, 16]}, "agent": {"in_shape": [1], "out_dim": 1},
          "compute": {"levels": [[1, 1], [3, 1]]}, "memory": {"capacity": 2000},
          "online": {"every": 4, "replay": 3, "replay_capacity": 200},
          "limits": {"pending_max": 1000, "seen_ids": 20000},
          "checkpoint": {"every_s": 30.0, "keep": 2}}


def write_tasks(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            a, ph = rng.uniform(0.1, 5), rng.uniform(0, math.pi)
            xs = [rng.uniform(-5, 5) for _ in range(15)]
            ys = [a * math.sin(x - ph) for x in xs]
            rec = {"type": "task", "id": f"s-{i}", "kind": "regression",
                   "support": {"x": [[round(x, 4)] for x in xs[:10]], "y": [[round(y, 4)] for y in ys[:10]]},
                   "query": {"x": [[round(x, 4)] for x in xs[10:]]}}
            if i % 2:
                rec["query"]["y"] = [[round(y, 4)] for y in ys[10:]]
            f.write(json.dumps(rec, separators=(",", ":")) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (``/proc/<pid>/stat``)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def newest_checkpoint(state_dir: Path) -> dict:
    """From the newest checkpoint: answered ids held, total size and River state size (MiB)."""
    for ckpt in sorted(state_dir.glob("ckpt-*"), reverse=True):
        try:
            files = json.loads((ckpt / "manifest.json").read_text())["files"]
            return {"seen_ids": len(json.loads((ckpt / "state.json").read_text())["seen_ids"]),
                    "checkpoint_mib": sum(f["size"] for f in files.values()) / 2**20,
                    "river_mib": files["online.state"]["size"] / 2**20}
        except (OSError, ValueError, KeyError):  # pruned or being written meanwhile: try the previous one
            continue
    return {"seen_ids": None, "checkpoint_mib": None, "river_mib": None}


def scrape(port: int) -> dict:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return {}
    out = {"series": sum(1 for line in text.splitlines() if line and not line.startswith("#"))}
    for line in text.splitlines():
        for name in ("metaagent_memory_entries", "metaagent_feedback_pending", "metaagent_checkpoint_duration_seconds_sum",
                     "metaagent_checkpoint_duration_seconds_count"):
            if line.startswith(name + " "):
                out[name] = float(line.split()[1])
    return out


def main(argv=None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=100_000, help="tasks (--quick: 2000)")
    p.add_argument("--every", type=int, default=None, help="sample every N tasks (default: tasks/20)")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)
    setup_threads(args.threads)
    info = print_header("soak: daemon on a long stream", args)
    n = 2000 if args.quick else args.tasks
    every = args.every or max(100, n // 20)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="soak-"))
    work.mkdir(parents=True, exist_ok=True)
    for name in ("out.jsonl",):
        (work / name).unlink(missing_ok=True)
    t0 = time.perf_counter()
    write_tasks(work / "in.jsonl", n, seed=args.seed)
    size_mib = (work / "in.jsonl").stat().st_size / 2**20
    print(f"wrote {n} tasks ({size_mib:.0f} MiB) in {time.perf_counter() - t0:.1f}s -> {work}")
    (work / "cfg.json").write_text(json.dumps(CONFIG))
    port = free_port()
    state_dir = work / f"state-{os.getpid()}-{time.time_ns()}"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", "cfg.json", "--input", "in.jsonl",
                             "--follow", "--max-tasks", str(n), "--output", "out.jsonl",
                             "--state-dir", str(state_dir), "--set", f"agent.threads={args.threads}",
                             "--metrics-addr", f"127.0.0.1:{port}", "--progress", "off"],
                            cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rows, window, done, offset, buf = [], [], 0, 0, b""
    started = time.perf_counter()
    print("\n| tasks | elapsed s | tasks/s | daemon cpu/wall | load 1m | RSS MiB | p50 ms | p99 ms | memory bank "
          "| pending | ids seen | series | checkpoint s | checkpoint MiB | River state MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    last_cpu, last_ck = 0.0, (0.0, 0.0)
    while True:
        alive = proc.poll() is None
        try:
            with open(work / "out.jsonl", "rb") as f:
                f.seek(offset)
                chunk = f.read()
        except FileNotFoundError:
            chunk = b""
        offset += len(chunk)
        buf += chunk
        *complete, buf = buf.split(b"\n")
        for line in complete:
            rec = json.loads(line)
            if "latency_ms" in rec:
                window.append(rec["latency_ms"])
                done += 1
                if done % every == 0 or done == n:
                    m = scrape(port) if alive else {}
                    elapsed = time.perf_counter() - started
                    try:
                        cpu = cpu_seconds(proc.pid)
                    except OSError:
                        cpu = float("nan")
                    row = {"tasks": done, "elapsed": elapsed, "rss": rss_kib(proc.pid) / 1024 if alive else float("nan"),
                           "p50": float(np.percentile(window, 50)), "p99": float(np.percentile(window, 99)),
                           "memory": m.get("metaagent_memory_entries"), "pending": m.get("metaagent_feedback_pending"),
                           "series": m.get("series"), **newest_checkpoint(state_dir), "load1": os.getloadavg()[0]}
                    span = max(elapsed - (rows[-1]["elapsed"] if rows else 0), 1e-9)
                    rate = (done - (rows[-1]["tasks"] if rows else 0)) / span
                    row["tasks_per_s"], row["cpu_per_wall"] = rate, (cpu - last_cpu) / span
                    last_cpu = cpu
                    ck = (m.get("metaagent_checkpoint_duration_seconds_sum"), m.get("metaagent_checkpoint_duration_seconds_count"))
                    row["checkpoint_s"] = None  # mean duration of the checkpoints written in this window
                    if None not in ck and ck[1] > last_ck[1]:
                        row["checkpoint_s"] = (ck[0] - last_ck[0]) / (ck[1] - last_ck[1])
                        last_ck = ck
                    rows.append(row)
                    window = []
                    fmt = lambda v, f="{:.0f}": "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f.format(v)  # noqa: E731
                    print(f"| {done} | {elapsed:.0f} | {rate:.0f} | {fmt(row['cpu_per_wall'], '{:.2f}')} | {row['load1']:.1f} "
                          f"| {fmt(row['rss'])} | {row['p50']:.1f} | {row['p99']:.1f} | {fmt(row['memory'])} "
                          f"| {fmt(row['pending'])} | {fmt(row['seen_ids'])} | {fmt(row['series'])} "
                          f"| {fmt(row['checkpoint_s'], '{:.2f}')} | {fmt(row['checkpoint_mib'], '{:.1f}')} "
                          f"| {fmt(row['river_mib'], '{:.1f}')} |", flush=True)
        if not alive:
            break
        time.sleep(0.2)
    err = proc.stderr.read().decode()
    if proc.returncode != 0:
        print(f"daemon exit code {proc.returncode}: {err[-2000:]}")
        return 1
    warm = [r for r in rows if r["tasks"] > 0.2 * n and not math.isnan(r["rss"])]
    verdicts = []
    if len(warm) >= 2:
        lo, hi = min(r["rss"] for r in warm), max(r["rss"] for r in warm)
        verdicts.append(("RSS flat within 10% after warm-up", hi <= 1.10 * lo, f"{lo:.0f}..{hi:.0f} MiB (+{100 * (hi / lo - 1):.1f}%)"))
        half = warm[len(warm) // 2:]
        slope = np.polyfit([r["tasks"] for r in half], [r["rss"] for r in half], 1)[0] * 10_000 if len(half) >= 3 else 0.0
        verdicts.append(("RSS not trending up over the second half of the run (< 1% of RSS per 10k tasks)",
                         slope < 0.01 * lo, f"{slope:+.1f} MiB per 10k tasks (least squares)"))
        p99_first, p99_last = warm[0]["p99"], warm[-1]["p99"]
        verdicts.append(("p99 stable (last window <= 2x first after warm-up)", p99_last <= 2 * p99_first,
                         f"{p99_first:.1f} -> {p99_last:.1f} ms"))
        # On a shared machine latency follows the CPU share the daemon got; windows in which it ran
        # nearly all the time compare like with like.
        free = [r for r in warm if r.get("cpu_per_wall", 0) >= 0.9]
        if len(free) >= 2:
            p99s = [r["p99"] for r in free]
            verdicts.append(("p99 stable in uncontended windows (daemon cpu/wall >= 0.9; max <= 2x min)",
                             max(p99s) <= 2 * min(p99s), f"{len(free)} windows, p99 {min(p99s):.1f}..{max(p99s):.1f} ms"))
        for key, name, bound in (("memory", "memory bank", CONFIG["memory"]["capacity"]),
                                 ("pending", "pending feedback", CONFIG["limits"]["pending_max"]),
                                 ("seen_ids", "ids seen", CONFIG["limits"]["seen_ids"])):
            vals = [r[key] for r in rows if r[key] is not None]
            if vals:
                verdicts.append((f"{name} bounded (<= {bound})", max(vals) <= bound, f"max {max(vals):.0f}"))
        series = [r["series"] for r in warm if r["series"] is not None]
        if series:
            verdicts.append(("metric series bounded", max(series) == min(series) or max(series) <= 1.05 * min(series),
                             f"{min(series):.0f}..{max(series):.0f}"))
    print(f"\n{done} tasks in {time.perf_counter() - started:.0f}s; input file {size_mib:.0f} MiB read with --follow "
          f"(backpressure: the reader is always ahead of the agent)")
    for name, ok, detail in verdicts:
        print(f"{'PASS' if ok else 'MISS'}: {name}: {detail}")
    write_json(args.out, {"machine": info, "tasks": n, "config": CONFIG, "rows": rows,
                          "verdicts": [{"name": a, "pass": b, "detail": c} for a, b, c in verdicts]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
