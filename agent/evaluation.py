"""Few-shot evaluation: episodes, per-episode scores before and after adaptation, t-intervals.

Each episode is a task drawn from a family with its own generator ``default_rng([seed, i])``, so
episode ``i`` is the same task whatever the number of episodes or the order they run in. The
algorithm adapts on the support set and is scored on the query set after each requested number
of inner steps (``0`` is the meta-learned initialisation, "before adaptation"): query loss, and
accuracy for classification or mean squared error for regression.

The functional core (:func:`score_task`, :func:`mean_t_interval`, :func:`summarise`) is pure;
:func:`evaluate` runs episodes, :func:`write_results` writes files and :func:`evaluate_checkpoint`
does both for a training checkpoint.

Examples
--------
>>> import numpy as np, torch
>>> from agent.nn.mlp import MLPFeatures
>>> from agent.nn.model import MetaModel
>>> from agent.algorithms import build
>>> from agent.algorithms.base import TaskTensors
>>> class Lines:  # a tiny regression family: y = a·x
...     def sample(self, rng):
...         a, x = rng.uniform(-1, 1), torch.as_tensor(rng.uniform(-1, 1, (10, 1)), dtype=torch.float32)
...         return TaskTensors(x[:5], a * x[:5], x[5:], a * x[5:], "regression")
>>> alg = build("maml", MetaModel(MLPFeatures(1, (8,)), 8, 1, vmappable=True), inner_lr=0.1)
>>> meta = alg.init_meta(torch.Generator().manual_seed(0))
>>> result = evaluate(alg, meta, Lines(), episodes=20, steps=[1, 5], seed=0)
>>> result.metrics
['loss@0', 'mse@0', 'loss@1', 'mse@1', 'loss@5', 'mse@5']
>>> iv = result.summary["mse@5"]
>>> iv.n, iv.low <= iv.mean <= iv.high
(20, True)
"""

from __future__ import annotations

import csv
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from agent.algorithms.base import CLASSIFICATION, Algorithm, MetaState, TaskTensors, task_loss
from agent.stats import mean_ci

__all__ = ["Interval", "EvalResult", "mean_t_interval", "score_task", "summarise", "evaluate", "evaluate_checkpoint",
           "write_results", "episode_rng"]


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided t confidence interval."""

    mean: float
    low: float
    high: float
    half_width: float
    std: float
    n: int
    confidence: float

    def __str__(self) -> str:
        return f"{self.mean:.4g} ± {self.half_width:.2g}"


def mean_t_interval(values: Iterable[float], confidence: float = 0.95) -> Interval:
    """Mean of ``values`` with the exact Student-t interval ``mean ± t_{(1+c)/2, n-1} · s / √n``.

    Uses :func:`agent.stats.mean_ci`. With one value the interval is infinite; with none,
    everything is NaN; with a non-finite value the mean is non-finite and the bounds NaN.

    Examples
    --------
    >>> iv = mean_t_interval([1.0, 2.0, 3.0, 4.0])
    >>> round(iv.mean, 3), round(iv.half_width, 3)
    (2.5, 2.054)
    """
    x = np.asarray(list(values), dtype=np.float64)
    n = int(x.size)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n == 0:
        nan = float("nan")
        return Interval(nan, nan, nan, nan, nan, 0, confidence)
    if np.isfinite(x).all():
        r = mean_ci(x, confidence)
        return Interval(r.mean, r.low, r.high, r.half_width, r.std, r.n, confidence)
    # a diverged episode (inf/NaN loss) makes the mean non-finite: report that honestly
    mean = float(x.mean())
    return Interval(mean, float("nan"), float("nan"), float("nan"), float("nan"), n, confidence)


def episode_rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    """The generator of episode ``index``: independent of how many episodes run, and in which order."""
    return np.random.default_rng([int(seed), int(stream), int(index)])


def _scores(algorithm: Algorithm, meta: MetaState, state, task: TaskTensors) -> dict[str, float]:
    with torch.no_grad():
        out = algorithm.predict(meta, state, task.query_x)
        loss = float(task_loss(task.kind, out, task.query_y, task.n_way))
        if task.kind == CLASSIFICATION:
            logits = out[..., : task.n_way] if task.n_way else out
            return {"loss": loss, "accuracy": float((logits.argmax(-1) == task.query_y).double().mean())}
    return {"loss": loss, "mse": loss}


def score_task(algorithm: Algorithm, meta: MetaState, task: TaskTensors, steps: Sequence[int] = (0,)) -> dict[str, float]:
    """Query scores of ``task`` after each number of inner steps in ``steps``.

    Returns ``{"loss@s": ..., "accuracy@s" or "mse@s": ...}`` for every ``s`` (sorted). The inner
    loop runs once, up to the largest ``s``. Algorithms that do not iterate (ProtoNet, closed-form
    heads) give the same scores for every ``s``.
    """
    if task.query_y is None:
        raise ValueError("evaluation needs query labels")
    wanted = sorted({int(s) for s in steps})
    if not wanted or wanted[0] < 0:
        raise ValueError(f"steps must be non-negative, got {steps!r}")
    row: dict[str, float] = {}
    state = algorithm.start(meta, task)
    done = 0
    for s in wanted:
        while done < s and algorithm.iterative:
            state = algorithm.step(meta, state, task)
            done += 1
        for k, v in _scores(algorithm, meta, state, task).items():
            row[f"{k}@{s}"] = v
    return row


def summarise(rows: Sequence[Mapping[str, float]], confidence: float = 0.95) -> dict[str, Interval]:
    """Mean and t-interval of every metric column in ``rows`` (the ``episode`` column excluded)."""
    keys = [k for k in rows[0] if k != "episode"] if rows else []
    return {k: mean_t_interval([r[k] for r in rows], confidence) for k in keys}


@dataclass
class EvalResult:
    """Per-episode rows and their summary."""

    rows: list[dict[str, float]]
    summary: dict[str, Interval]
    steps: list[int]
    kind: str
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> list[str]:
        return list(self.summary)

    def headline(self) -> str:
        """One line per inner-step count: the main metric with its interval."""
        main = "accuracy" if self.kind == CLASSIFICATION else "mse"
        lines = []
        for s in self.steps:
            iv = self.summary[f"{main}@{s}"]
            scale, unit = (100.0, "%") if main == "accuracy" else (1.0, "")
            lines.append(f"steps={s}: {main} {iv.mean * scale:.3f}{unit} ± {iv.half_width * scale:.3f}{unit} "
                         f"({int(iv.confidence * 100)}% CI, n={iv.n}), loss {self.summary[f'loss@{s}'].mean:.4f}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "steps": self.steps, "episodes": len(self.rows), "seconds": self.seconds,
                "summary": {k: asdict(v) for k, v in self.summary.items()}, **self.info}


def evaluate(algorithm: Algorithm, meta: MetaState, family, *, episodes: int = 600, steps: Sequence[int] | int | None = None,
             seed: int = 0, confidence: float = 0.95, dtype: torch.dtype | None = None,
             on_episode: Callable[[int, dict], None] | None = None) -> EvalResult:
    """Evaluate ``algorithm`` with meta state ``meta`` on ``episodes`` tasks from ``family``.

    Parameters
    ----------
    family
        Anything with ``sample(rng) -> TaskTensors``.
    steps
        Inner-step counts to score after (``0``, before adaptation, is always added); default
        ``algorithm.inner_steps``.
    seed
        Episode ``i`` uses :func:`episode_rng` ``(seed, i)``.
    dtype
        Cast tasks to this float type (default: the dtype of the meta state).
    on_episode
        Called with ``(index, row)`` after each episode (progress reporting).
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if steps is None:
        steps = [algorithm.inner_steps]
    elif isinstance(steps, int):
        steps = [steps]
    wanted = sorted({0, *(int(s) for s in steps)})
    if dtype is None:
        dtype = next((v.dtype for v in meta.values() if v.is_floating_point()), torch.float32)
    start = time.perf_counter()
    rows, kind = [], None
    for i in range(episodes):
        task = family.sample(episode_rng(seed, i)).to(dtype)
        kind = task.kind
        row = {"episode": i, **score_task(algorithm, meta, task, wanted)}
        rows.append(row)
        if on_episode is not None:
            on_episode(i, row)
    return EvalResult(rows, summarise(rows, confidence), wanted, kind, time.perf_counter() - start)


def write_results(result: EvalResult, out_dir: str | Path, *, info: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write ``episodes.jsonl``, ``episodes.csv`` and ``summary.json`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"jsonl": out / "episodes.jsonl", "csv": out / "episodes.csv", "summary": out / "summary.json"}
    with open(paths["jsonl"], "w") as f:
        for row in result.rows:
            f.write(json.dumps(row) + "\n")
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(result.rows[0]) if result.rows else ["episode"])
        writer.writeheader()
        writer.writerows(result.rows)
    summary = result.to_dict()
    summary.update(info or {})
    paths["summary"].write_text(json.dumps(summary, indent=1, allow_nan=True) + "\n")
    return paths


def evaluate_checkpoint(checkpoint, config=None, *, out_dir: str | Path | None = None, progress: bool | None = False,
                        family=None) -> tuple[EvalResult, dict[str, Path]]:
    """Evaluate a training checkpoint as ``config.eval`` says, and write the results.

    Parameters
    ----------
    checkpoint
        A checkpoint directory, a directory of checkpoints or a run directory (see
        :func:`agent.checkpoint.resolve`), or an opened :class:`~agent.checkpoint.Checkpoint`.
    config
        A :class:`~agent.config.Config`; default: the one stored in the checkpoint.
    out_dir
        Where to write; default ``<run dir>/eval-<split>-<step>``.
    family
        Replaces ``make_family(config, config.eval.split)``.
    """
    from agent import checkpoint as ckpt
    from agent.config import Config
    from agent.training import DTYPES, build_setup, load_meta, make_family, torch_threads

    found = checkpoint if isinstance(checkpoint, ckpt.Checkpoint) else ckpt.resolve(checkpoint)
    if config is None:
        stored = found.load("state.json").get("config") if "state.json" in found else None
        if stored is None:
            raise ckpt.CheckpointError(f"{found.path}: no stored config; give one")
        config = Config.from_dict(stored)
    ec = config.eval
    family = make_family(config, ec.split) if family is None else family
    setup = build_setup(config, families={"train": family, "val": family})
    meta = load_meta(found, setup.algorithm, DTYPES[config.train.dtype])
    with torch_threads(config.train.threads):
        result = evaluate(setup.algorithm, meta, family, episodes=ec.episodes, steps=list(ec.steps) if ec.steps else None,
                          seed=ec.seed, confidence=ec.confidence, on_episode=EpisodeProgress(ec.episodes, enabled=progress))
    result.info = {"checkpoint": str(found.path), "step": found.step, "family": config.data.family, "split": ec.split,
                   "algorithm": config.algorithm.name, "seed": ec.seed}
    run_dir = found.path.parent.parent if found.path.parent.name == "checkpoints" else found.path.parent
    out = Path(out_dir) if out_dir is not None else run_dir / f"eval-{ec.split}-{found.step:06d}"
    return result, write_results(result, out)


class EpisodeProgress:
    """A one-line progress display on a TTY (nothing otherwise)."""

    def __init__(self, total: int, stream=None, enabled: bool | None = None):
        self.total, self.stream = total, stream or sys.stderr
        self.enabled = _isatty(self.stream) if enabled is None else enabled
        self.t0 = time.perf_counter()

    def __call__(self, i: int, row: dict) -> None:
        if self.enabled and ((i + 1) % 10 == 0 or i + 1 == self.total):
            rate = (i + 1) / max(time.perf_counter() - self.t0, 1e-9)
            self.stream.write(f"\reval {i + 1}/{self.total} ({rate:.1f} episodes/s)")
            if i + 1 == self.total:
                self.stream.write("\n")
            self.stream.flush()


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
