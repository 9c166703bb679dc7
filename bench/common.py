"""Shared pieces of the benchmark scripts: argument parsing, header, timing harness, tables, JSON.

Timing method (the one in ``shared/notes/peers.md``): every implementation is called ``reps``
times per round, for ``rounds`` rounds; inside a round the implementations run in a shuffled,
interleaved order (a local ``random.Random``, never the global RNG). Reported: the median
seconds per call over the rounds with quartiles, and the **median of per-round paired ratios**
(A/B from the same round), which cancels most of the slow drift of a shared machine. Each round
also records process-CPU-seconds per wall-second, so a descheduled round shows up (≈ threads
when the process ran all the time, lower when it waited for a core).

Nothing here prints on import or seeds anything globally.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

#: Peer anchors, quoted (not measured here) from ``shared/notes/peers.md`` §0 / §3.5:
#: learn2learn 0.2.0 second-order MAML, 240 s of meta-training (15,173 steps) on this machine
#: type, 1000 fixed test tasks, 100-point query grid. Mean query MSE.
PEER_SINUSOID = {
    "source": "quoted from shared/notes/peers.md (learn2learn 0.2.0, 240 s meta-training, same machine type)",
    "K=10": {"1 step": 0.40, "10 steps": 0.11},
    "K=5": {"1 step": 0.78, "10 steps": 0.36},
}


# -- command line ---------------------------------------------------------------------------
def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every script takes."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test (numbers mean nothing)")
    p.add_argument("--seed", type=int, default=0, help="seed of every generator the script makes")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return p


def setup_threads(n: int) -> None:
    import torch

    torch.set_num_threads(int(n))


# -- header ---------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    import numpy as np
    import torch

    try:
        load = os.getloadavg()
    except OSError:  # pragma: no cover
        load = (float("nan"),) * 3
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "loadavg_1_5_15": [round(x, 2) for x in load],
        "argv": sys.argv[1:],
    }


def print_header(title: str, args: argparse.Namespace) -> dict[str, Any]:
    info = machine_info()
    print(f"== {title} ==")
    print(f"date {info['date_utc']} UTC | python {info['python']} | torch {info['torch']} | numpy {info['numpy']}")
    print(f"cpu {info['cpu']} x{info['cpus']} | torch threads {info['threads']} | load avg {info['loadavg_1_5_15']}")
    print(f"args {' '.join(info['argv']) or '(defaults)'}" + ("  [QUICK MODE: numbers are not meaningful]" if args.quick else ""))
    print()
    return info


# -- timing ---------------------------------------------------------------------------------
@dataclass
class Timings:
    """Seconds per call, one value per round and implementation, plus CPU/wall per round."""

    per_call: dict[str, list[float]] = field(default_factory=dict)
    cpu_per_wall: list[float] = field(default_factory=list)
    reps: int = 1

    def median(self, name: str) -> float:
        return statistics.median(self.per_call[name])

    def quartiles(self, name: str) -> tuple[float, float]:
        v = sorted(self.per_call[name])
        if len(v) < 2:
            return v[0], v[0]
        q = statistics.quantiles(v, n=4, method="inclusive")
        return q[0], q[2]

    def ratio(self, a: str, b: str) -> float:
        """Median over rounds of ``time(a) / time(b)`` from the same round (> 1: ``b`` is faster)."""
        return statistics.median(x / y for x, y in zip(self.per_call[a], self.per_call[b]))

    def ratio_quartiles(self, a: str, b: str) -> tuple[float, float]:
        v = sorted(x / y for x, y in zip(self.per_call[a], self.per_call[b]))
        if len(v) < 2:
            return v[0], v[0]
        q = statistics.quantiles(v, n=4, method="inclusive")
        return q[0], q[2]

    def to_dict(self) -> dict[str, Any]:
        return {
            "reps": self.reps,
            "rounds": len(self.cpu_per_wall),
            "per_call_s": self.per_call,
            "median_s": {k: self.median(k) for k in self.per_call},
            "cpu_per_wall": self.cpu_per_wall,
        }


def interleaved(fns: Mapping[str, Callable[[], Any]], *, rounds: int, reps: int, seed: int = 0,
                warmup: int = 1) -> Timings:
    """Time every function in ``fns`` in ``rounds`` shuffled, interleaved rounds of ``reps`` calls."""
    rng = random.Random(seed)
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    out = Timings({n: [] for n in names}, [], reps)
    for _ in range(rounds):
        order = names[:]
        rng.shuffle(order)
        w0, c0 = time.perf_counter(), time.process_time()
        for n in order:
            fn = fns[n]
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            out.per_call[n].append((time.perf_counter() - t0) / reps)
        wall = time.perf_counter() - w0
        out.cpu_per_wall.append((time.process_time() - c0) / wall if wall > 0 else float("nan"))
    return out


def cpu_line(t: Timings) -> str:
    v = t.cpu_per_wall
    return f"cpu-per-wall over {len(v)} rounds: min {min(v):.2f} median {statistics.median(v):.2f} max {max(v):.2f}"


# -- output ---------------------------------------------------------------------------------
def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (pipes), readable on a terminal and pasteable into the README."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def ms(seconds: float, digits: int = 2) -> str:
    return f"{seconds * 1e3:.{digits}f}"


def fmt_ci(mean: float, half: float, digits: int = 3) -> str:
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def write_json(path: Path | None, obj: Mapping[str, Any]) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(obj), indent=2, allow_nan=True) + "\n")
    print(f"\nwrote {path}")


def _jsonable(o):
    if isinstance(o, Mapping):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if hasattr(o, "item") and callable(o.item):
        try:
            return _jsonable(o.item())
        except (ValueError, TypeError):
            pass
    return o
