"""Offline meta-training: the outer loop, validation, checkpoints and exact resumption.

The functional core is :func:`sample_batch` (the tasks of step ``t`` are a pure function of
``(seed, t)``), :func:`apply_meta_gradient` (one outer update: gradient, non-finite guard,
clipping, optimiser step) and :func:`validate` (mean query scores on a fixed task set). The
imperative shell, :func:`meta_train`, owns time, files, signals and the progress display.

Determinism: there is no global seeding. The initial meta state comes from a
``torch.Generator`` seeded with ``train.seed``; step ``t`` draws its meta-batch from
``numpy.random.default_rng([seed, 0, t])``; validation tasks from ``[seed, 1, i]``. A checkpoint
therefore needs no RNG state beyond the step number, and a resumed run repeats exactly the
computation of an uninterrupted one (bit for bit, on the same machine and thread count).

Run directory layout::

    out_dir/config.yaml          the resolved configuration
    out_dir/metrics.jsonl        one line per validation
    out_dir/checkpoints/ckpt-*   see :mod:`agent.checkpoint`: meta.pt, optimizer.pt, state.json

Examples
--------
>>> import tempfile
>>> from agent.config import Config
>>> cfg = Config.from_dict({"model": {"hidden": [16, 16]}, "algorithm": {"name": "maml"},
...                         "data": {"family": "sinusoid", "k_shot": 5, "k_query": 5},
...                         "train": {"meta_batch": 4, "steps": 6, "val_every": 3, "val_tasks": 8}})
>>> result = meta_train(cfg, tempfile.mkdtemp(), progress=False)
>>> result.step, result.reason, [r["step"] for r in result.history]
(6, 'done', [0, 3, 6])
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from agent import checkpoint as ckpt
from agent.algorithms import algorithm_class, build
from agent.algorithms.base import CLASSIFICATION, Algorithm, MetaState, TaskTensors
from agent.config import Config, ConfigError
from agent.evaluation import score_task
from agent.nn.model import subdict, with_prefix
from agent.nn.norm import estimate_running_stats

__all__ = ["TrainingError", "Setup", "StepOutcome", "TrainResult", "build_setup", "make_family", "sample_batch",
           "apply_meta_gradient", "validate", "meta_train", "load_meta", "torch_threads"]

log = logging.getLogger(__name__)

TRAIN_STREAM, VAL_STREAM, PROBE_STREAM = 0, 1, 2
DTYPES = {"float32": torch.float32, "float64": torch.float64}
# train.* keys that change the trajectory; a resumed run must agree on them (others may change)
_TRAJECTORY_KEYS = ("meta_batch", "outer_lr", "optimizer", "grad_clip", "seed", "dtype", "use_vmap", "val_tasks")


class TrainingError(RuntimeError):
    """Meta-training cannot continue (e.g. too many consecutive non-finite steps)."""


# -- building ---------------------------------------------------------------------------------
def make_family(config: Config, split: str):
    """The task family of ``config.data`` for ``split`` (``"train"``, ``"val"`` or ``"test"``)."""
    import agent.data as data

    make = getattr(data, "make_family", None)
    kwargs = config.data.family_kwargs()
    try:
        if make is not None:
            return make(config.data.family, split=split, **kwargs)
        from agent.data.sinusoid import make_family as make_function_family  # until agent.data exports one

        kwargs.pop("n_way", None)
        return make_function_family(config.data.family, **kwargs)
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError("data", f"cannot make family {config.data.family!r} ({split}): {e}") from None


@dataclass
class Setup:
    """Everything meta-training builds from a config."""

    config: Config
    algorithm: Algorithm
    families: dict[str, Any]
    dtype: torch.dtype

    @property
    def model(self):
        return self.algorithm.model


def _out_dim(cls: type, name: str, task: TaskTensors, config: Config) -> int:
    if getattr(cls, "needs_head", name != "protonet") is False:
        return 0  # the embedding is the output
    if task.kind == CLASSIFICATION:
        return int(config.data.n_way or task.n_way)
    return int(math.prod(task.query_y.shape[1:]) if task.query_y is not None else math.prod(task.support_y.shape[1:]))


def build_setup(config: Config, *, families: Mapping[str, Any] | None = None) -> Setup:
    """Model, algorithm and the train/val families for ``config``.

    ``families`` (split -> object with ``sample(rng)``) replaces :func:`make_family`, e.g. in tests.
    The model's input shape and output size come from a probe task of the train family.
    """
    from agent.nn import build_model

    fams = dict(families) if families is not None else {s: make_family(config, s) for s in ("train", "val")}
    probe = fams["train"].sample(np.random.default_rng([config.train.seed, PROBE_STREAM]))
    cls = algorithm_class(config.algorithm.name)
    kinds = getattr(cls, "kinds", None)
    if kinds is not None and probe.kind not in kinds:
        raise ConfigError("algorithm.name", f"{config.algorithm.name!r} does not handle {probe.kind} tasks")
    try:
        model = build_model(config.model.arch, in_shape=tuple(probe.support_x.shape[1:]),
                            out_dim=_out_dim(cls, config.algorithm.name, probe, config), **config.model.build_kwargs())
    except (TypeError, ValueError) as e:
        raise ConfigError("model", str(e)) from None
    try:
        algorithm = build(config.algorithm.name, model, **config.algorithm.hyper())
    except (TypeError, ValueError) as e:
        raise ConfigError("algorithm", str(e)) from None
    return Setup(config, algorithm, fams, DTYPES[config.train.dtype])


def init_meta(setup: Setup) -> MetaState:
    """The initial meta state, drawn from a generator seeded with ``train.seed``."""
    return setup.algorithm.init_meta(torch.Generator().manual_seed(setup.config.train.seed), setup.dtype)


def make_optimizer(config: Config, params: Sequence[torch.Tensor]) -> torch.optim.Optimizer:
    """Adam, or plain SGD for Reptile (``optimizer: auto``), over the trainable tensors."""
    kind = config.train.optimizer
    if kind == "auto":
        kind = "sgd" if config.algorithm.name == "reptile" else "adam"
    if kind == "sgd":
        return torch.optim.SGD(params, lr=config.train.outer_lr)
    return torch.optim.Adam(params, lr=config.train.outer_lr)


# -- functional core --------------------------------------------------------------------------
def sample_batch(family, seed: int, step: int, size: int, dtype: torch.dtype = torch.float32) -> list[TaskTensors]:
    """The meta-batch of outer step ``step``: a pure function of ``(seed, step)``."""
    rng = np.random.default_rng([int(seed), TRAIN_STREAM, int(step)])
    return [family.sample(rng).to(dtype) for _ in range(size)]


def validation_tasks(family, seed: int, n: int, dtype: torch.dtype = torch.float32) -> list[TaskTensors]:
    """The fixed validation set: task ``i`` from ``default_rng([seed, 1, i])``."""
    return [family.sample(np.random.default_rng([int(seed), VAL_STREAM, i])).to(dtype) for i in range(n)]


@dataclass(frozen=True)
class StepOutcome:
    """What one outer step did."""

    loss: float
    grad_norm: float
    applied: bool  # False when skipped (non-finite loss, gradient or result)


def _all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def apply_meta_gradient(algorithm: Algorithm, meta: MetaState, optimizer: torch.optim.Optimizer, tasks: Sequence[TaskTensors],
                        *, progress: float = 1.0, grad_clip: float | None = None, use_vmap: bool | None = None) -> StepOutcome:
    """One outer step on ``tasks``; leaves ``meta`` and the optimiser unchanged when it is not finite.

    A step is skipped when the loss or the gradient is not finite, and undone (parameters and
    optimiser state restored) when the update itself produces non-finite values.
    """
    names = algorithm.trainable(meta)
    loss, grads = algorithm.meta_gradient(meta, tasks, progress=progress, use_vmap=use_vmap)
    glist = [grads[n] for n in names]
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in glist]))) if glist else 0.0
    if not (math.isfinite(loss) and math.isfinite(norm)):
        return StepOutcome(loss, norm, False)
    params = [meta[n] for n in names]
    for p, g in zip(params, glist):
        p.grad = g.detach().to(p.dtype)
    if grad_clip is not None and norm > grad_clip:
        scale = grad_clip / (norm + 1e-6)
        for p in params:
            p.grad.mul_(scale)
    saved = [p.detach().clone() for p in params]
    saved_opt = copy.deepcopy(optimizer.state_dict())
    optimizer.step()
    for p in params:
        p.grad = None
    if not _all_finite([p.detach() for p in params]):
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        optimizer.load_state_dict(saved_opt)
        return StepOutcome(loss, norm, False)
    return StepOutcome(loss, norm, True)


def refresh_frozen_stats(algorithm: Algorithm, meta: MetaState, tasks: Sequence[TaskTensors]) -> None:
    """Set the ``frozen`` normalisation statistics to those of the batch's support sets.

    Frozen-statistics models normalise with buffers, never with the batch at hand (so a query
    set cannot influence support predictions); meta-training keeps those buffers current by
    measuring them on the support inputs of every meta-batch.
    """
    buffers = subdict(meta, "buffers.")
    if not buffers:
        return
    with torch.no_grad():
        fresh = estimate_running_stats(algorithm.model, subdict(meta, "params."), buffers,
                                       [t.support_x for t in tasks])
    meta.update(with_prefix(fresh, "buffers."))


def validate(algorithm: Algorithm, meta: MetaState, tasks: Sequence[TaskTensors], steps: int | None = None) -> dict[str, float]:
    """Mean query loss (and accuracy for classification) after ``steps`` inner steps."""
    s = algorithm.inner_steps if steps is None else int(steps)
    rows = [score_task(algorithm, meta, t, [s]) for t in tasks]
    out = {"val_loss": float(np.mean([r[f"loss@{s}"] for r in rows]))}
    if rows and f"accuracy@{s}" in rows[0]:
        out["val_accuracy"] = float(np.mean([r[f"accuracy@{s}"] for r in rows]))
    return out


# -- state files ------------------------------------------------------------------------------
def _meta_files(meta: MetaState, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> dict[str, Any]:
    return {"meta.pt": {k: v.detach().clone() for k, v in meta.items()},
            "optimizer.pt": optimizer.state_dict(),
            "state.json": dict(state)}


def load_meta(checkpoint: ckpt.Checkpoint, algorithm: Algorithm | None = None, dtype: torch.dtype | None = None) -> MetaState:
    """The meta state stored in a training checkpoint, trainable entries marked ``requires_grad``."""
    stored = checkpoint.load("meta.pt")
    trainable = set(checkpoint.load("state.json").get("trainable", [])) if "state.json" in checkpoint else set()
    meta = {}
    for k, v in stored.items():
        t = v if dtype is None or not v.is_floating_point() else v.to(dtype)
        meta[k] = t.requires_grad_(True) if k in trainable else t
    if algorithm is not None:
        expected = algorithm.init_meta(None, next(iter(meta.values())).dtype if meta else torch.float32)
        missing, unexpected = set(expected) - set(meta), set(meta) - set(expected)
        bad = [k for k in set(expected) & set(meta) if expected[k].shape != meta[k].shape]
        if missing or unexpected or bad:
            raise ckpt.CheckpointError(
                f"{checkpoint.path}: meta state does not fit {algorithm!r} on this model "
                f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}, wrong shape {sorted(bad)[:3]})")
    return meta


def _check_resumable(config: Config, stored: Mapping[str, Any], path: Path) -> None:
    now = config.to_dict()
    diffs = [s for s in ("model", "algorithm", "data") if now[s] != stored.get(s)]
    diffs += [f"train.{k}" for k in _TRAJECTORY_KEYS if now["train"][k] != stored.get("train", {}).get(k)]
    if diffs:
        raise ConfigError(diffs[0], f"differs from the run being resumed in {path} (also: {', '.join(diffs[1:]) or 'nothing else'}); "
                                    "use another --out or --no-resume")


# -- the shell --------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """How a meta-training call ended."""

    step: int
    reason: str  # "done", "time_limit", "max_steps", "signal"
    history: list[dict[str, Any]]
    skipped: int
    seconds: float
    steps_per_s: float
    checkpoint: Path | None
    meta: MetaState = field(repr=False, default_factory=dict)
    algorithm: Algorithm | None = field(repr=False, default=None)

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


class _Signals:
    """Turn the first SIGINT/SIGTERM into a flag checked between steps (main thread only)."""

    def __init__(self):
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._old[sig] = signal.signal(sig, self._handle)
                except (ValueError, OSError):
                    pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


class _Display:
    """Progress bar on a TTY; optional plain log lines every ``log_every`` steps otherwise."""

    def __init__(self, total: int, enabled: bool, log_every: int, stream=None):
        self.total, self.enabled, self.log_every = total, enabled, log_every
        self.stream = stream or sys.stderr
        self.t0, self.s0, self.last = time.perf_counter(), None, 0.0

    def update(self, step: int, loss: float, val: Mapping[str, Any] | None) -> None:
        now = time.perf_counter()
        if self.s0 is None:
            self.s0, self.t0 = step - 1, now - 1e-9
        rate = (step - self.s0) / max(now - self.t0, 1e-9)
        vtxt = ""
        if val:
            vtxt = f" val {val['val_loss']:.4f}" + (f" acc {val['val_accuracy']:.3f}" if "val_accuracy" in val else "")
        if self.enabled and (now - self.last > 0.1 or step == self.total):
            self.last = now
            width = 24
            done = int(width * step / max(self.total, 1))
            self.stream.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{self.total} {rate:.1f} steps/s loss {loss:.4f}{vtxt}  ")
            self.stream.flush()
        elif not self.enabled and self.log_every and step % self.log_every == 0:
            log.info("step %d/%d loss %.5f %.1f steps/s%s", step, self.total, loss, rate, vtxt)

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def meta_train(config: Config, out_dir: str | Path, *, resume: bool = True, progress: bool | None = None,
               log_every: int | None = None, families: Mapping[str, Any] | None = None, max_steps: int | None = None,
               on_step: Callable[[int, StepOutcome], None] | None = None) -> TrainResult:
    """Meta-train ``config`` into ``out_dir``; resume from its last good checkpoint when asked.

    Parameters
    ----------
    resume
        Continue from ``out_dir/checkpoints`` when it holds a checkpoint (the configuration must
        agree on everything that shapes the trajectory; ``train.steps`` may grow). Without
        ``resume`` existing checkpoints are moved aside to ``checkpoints.replaced-<time>``.
    progress
        Progress bar on stderr; default: only when stderr is a terminal.
    log_every
        Plain ``logging`` lines every N steps when there is no progress bar (default
        ``train.log_every``; 0 for none).
    families
        Split -> family, replacing :func:`make_family`.
    max_steps
        Stop (with a checkpoint) after this many steps in this call, as an interruption would.
    on_step
        Called after every outer step with ``(step, outcome)``.
    """
    with torch_threads(config.train.threads), _run_lock(Path(out_dir)):
        return _meta_train(config, Path(out_dir), resume=resume, progress=progress, log_every=log_every, families=families,
                           max_steps=max_steps, on_step=on_step)


def _meta_train(config, out, *, resume, progress, log_every, families, max_steps, on_step) -> TrainResult:
    tc = config.train
    ckpt_root = out / "checkpoints"
    setup = build_setup(config, families=families)
    algorithm = setup.algorithm
    meta = init_meta(setup)
    names = algorithm.trainable(meta)
    if not names:
        raise ConfigError("algorithm", f"{config.algorithm.name!r} has nothing to meta-train")
    optimizer = make_optimizer(config, [meta[n] for n in names])
    step, skipped, bad_run, history, acc = 0, 0, 0, [], [0.0, 0]
    previous_seconds = 0.0

    if not resume and ckpt.list_checkpoints(ckpt_root):
        # a fresh run must not leave an older run's later checkpoints to be resumed by mistake
        aside = out / f"checkpoints.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        ckpt_root.rename(aside)
        log.warning("not resuming: moved the existing checkpoints to %s", aside)
    found = ckpt.latest_good(ckpt_root) if resume else None
    if found is not None:
        state = found.load("state.json")
        _check_resumable(config, state.get("config", {}), found.path)
        meta = load_meta(found, algorithm)
        optimizer = make_optimizer(config, [meta[n] for n in names])
        optimizer.load_state_dict(found.load("optimizer.pt"))
        step, skipped, bad_run = state["step"], state["skipped"], state["bad_run"]
        history, acc, previous_seconds = state["history"], state["loss_acc"], state["seconds"]
        log.info("resuming %s from step %d", out, step)

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(config.to_yaml())
    with open(out / "metrics.jsonl", "w") as f:  # the history up to the resumed step
        f.writelines(json.dumps(r) + "\n" for r in history)

    val_tasks = validation_tasks(setup.families["val"], tc.seed, tc.val_tasks, setup.dtype)

    def record(at: int) -> dict[str, Any]:
        row = {"step": at, **validate(algorithm, meta, val_tasks),
               "train_loss": acc[0] / acc[1] if acc[1] else None, "skipped": skipped,
               "seconds": round(previous_seconds + time.perf_counter() - t0, 3)}
        acc[0], acc[1] = 0.0, 0
        history.append(row)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    def save(at: int) -> Path:
        state = {"step": at, "skipped": skipped, "bad_run": bad_run, "history": history, "loss_acc": acc,
                 "seconds": previous_seconds + time.perf_counter() - t0, "trainable": names,
                 "config": config.to_dict(), "algorithm": repr(algorithm)}
        return ckpt.save(ckpt_root, at, _meta_files(meta, optimizer, state), keep=tc.keep_checkpoints,
                         meta={"kind": "meta-train", "step": at})

    t0 = time.perf_counter()
    display = _Display(tc.steps, _isatty(sys.stderr) if progress is None else progress,
                       tc.log_every if log_every is None else log_every)
    if step == 0 and not history:
        record(0)
    last_ckpt: Path | None = found.path if found is not None else None
    start_step, reason = step, "done"
    with _Signals() as sigs:
        while step < tc.steps:
            if sigs.received is not None:
                reason = "signal"
                break
            if tc.time_limit_s is not None and time.perf_counter() - t0 >= tc.time_limit_s:
                reason = "time_limit"
                break
            if max_steps is not None and step - start_step >= max_steps:
                reason = "max_steps"
                break
            tasks = sample_batch(setup.families["train"], tc.seed, step, tc.meta_batch, setup.dtype)
            if config.model.norm == "frozen":
                refresh_frozen_stats(algorithm, meta, tasks)
            outcome = apply_meta_gradient(algorithm, meta, optimizer, tasks, progress=step / max(tc.steps, 1),
                                          grad_clip=tc.grad_clip, use_vmap=tc.use_vmap)
            step += 1
            if outcome.applied:
                bad_run = 0
                acc[0] += outcome.loss
                acc[1] += 1
            else:
                skipped += 1
                bad_run += 1
                log.warning("step %d: non-finite meta-gradient or update (loss %s); step skipped", step, outcome.loss)
                if bad_run >= tc.max_bad_steps:
                    raise TrainingError(f"{bad_run} consecutive non-finite steps at step {step}; "
                                        "lower train.outer_lr or algorithm.inner_lr, or set train.grad_clip")
            val = record(step) if (tc.val_every and step % tc.val_every == 0) or step == tc.steps else None
            if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step != tc.steps:
                last_ckpt = save(step)
            display.update(step, outcome.loss, val or (history[-1] if history else None))
            if on_step is not None:
                on_step(step, outcome)
    display.close()
    if step != start_step or last_ckpt is None:
        last_ckpt = save(step)
    seconds = time.perf_counter() - t0
    if reason != "done":
        log.info("stopped at step %d/%d (%s); checkpoint %s", step, tc.steps, reason, last_ckpt)
    return TrainResult(step, reason, history, skipped, seconds, (step - start_step) / max(seconds, 1e-9),
                       last_ckpt, meta, algorithm)


@contextlib.contextmanager
def _run_lock(out: Path):
    """Hold an exclusive lock on ``out/.lock`` so that two trainers never share a run directory."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(out / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise TrainingError(f"{out} is in use by another meta-training process") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def torch_threads(n: int):
    """Use ``n`` intra-op threads inside the block, then restore the previous setting.

    Small models run fastest on one thread; more threads on a busy machine can make them tens of
    times slower (spinning workers).
    """
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
