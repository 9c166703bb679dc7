"""Helpers shared by several test files (import as ``from helpers import ...``)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from agent.task import Task, to_wire

ROOT = Path(__file__).resolve().parents[1]


def run_bench_script(name: str, tmp_path: Path, *extra: str) -> tuple[str, dict]:
    """Run ``bench/<name>.py --quick`` as a subprocess; its stdout and its JSON output."""
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), "--quick", "--out", str(out), *extra],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout, json.loads(out.read_text())


def write_sine_inputs(path: Path, n: int, seed: int = 0, shots: int = 10) -> list[str]:
    """n sine tasks (a third with delayed feedback), with bad lines mixed in; returns the task ids."""
    rng = np.random.default_rng(seed)
    ids, lines, owed = [], [], []
    for i in range(n):
        a, ph = rng.uniform(0.1, 5), rng.uniform(0, np.pi)
        x, xq = rng.uniform(-5, 5, (shots, 1)), rng.uniform(-5, 5, (shots, 1))
        delayed = i % 3 == 0
        task = Task(f"t-{i:05d}", "regression", x, a * np.sin(x - ph), xq, None if delayed else a * np.sin(xq - ph))
        lines.append(json.dumps(to_wire(task)))
        ids.append(task.id)
        if delayed:
            owed.append({"type": "feedback", "id": task.id, "y": (a * np.sin(xq - ph)).tolist()})
        if len(owed) > 2:
            lines.append(json.dumps(owed.pop(0)))
        if i % 50 == 7:
            lines.append('{"type": "task", "id": ')  # bad_json, no id
    path.write_text("\n".join(lines) + "\n")
    return ids


def task_line(i: int) -> bytes:
    """One wire-format sine task line with inline labels (5 support, 3 query points), seeded by ``i``."""
    rng = np.random.default_rng(i)
    x, q = rng.uniform(-5, 5, (5, 1)), rng.uniform(-5, 5, (3, 1))
    return json.dumps({"type": "task", "id": f"t-{i}", "kind": "regression",
                       "support": {"x": x.tolist(), "y": np.sin(x).tolist()},
                       "query": {"x": q.tolist(), "y": np.sin(q).tolist()}}).encode()
