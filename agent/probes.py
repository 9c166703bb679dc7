"""Periodic probes: the current meta-parameters scored on fixed held-out tasks of every family.

A *probe* adapts the agent's default arm to each task of a small, fixed probe set per family
(guarded, ``probes.steps`` inner steps, exactly as the agent would answer with that budget) and
records the mean query quality per family in the run directory (``probes.jsonl``, written by
:meth:`agent.runlog.RunLogWriter.write_probe`). Probes read the agent and change nothing: no
learning, no memory writes, no task counters or metrics, no seen ids, no random draws from the
agent's generators. From a sequence of probes the report computes ACC, BWT, FWT and forgetting
(:func:`continual_from_probes`).

Where the probe tasks come from (``probes.source``):

* ``stream``: a built-in synthetic stream: ``tasks_per_family`` fresh tasks of each of its
  modes, drawn with the stream's own options (shots, ways, splits, digits) but another seed
  (the stream's plus ``probes.seed``), so they are held out from the stream. Every family is
  probed from the first probe on, including before it first appears (forward transfer).
* ``file``: labelled tasks in a JSON Lines file, grouped by ``meta.family`` (the first
  ``tasks_per_family`` of each).
* ``reservoir``: for any other stream, labelled tasks kept from the stream itself, at most one
  per segment (``meta.segment``) until a family has ``tasks_per_family``; then the set is fixed.
  The agent also learned from these tasks, so this mode measures retention of seen tasks, not
  held-out generalisation. The kept tasks are written to ``probe_tasks.jsonl`` in the run
  directory, so a restarted daemon probes the same set.
* ``auto``: ``stream`` for a synthetic stream, else ``file`` when ``probes.file`` is set, else
  ``reservoir``.

Schedule: a baseline probe before the first task (fresh runs with a stream or file probe set),
one every ``every_tasks`` answered tasks, one just before the first task of a family never seen
before (``at_family: new``) or at every family switch (``every``: BWT needs a probe at both ends
of a family's absence), and a final one when the stream ends or the daemon stops. The family
is the evaluation-only ``meta.family``: it decides when the *evaluator* looks, never anything
the agent does. In
the daemon the probes run between micro-batches: :class:`ProbingSource` wraps the task source
and hands the agent records only up to the next probe point.

Examples
--------
>>> import numpy as np
>>> R = np.array([[0.9, 0.1], [0.6, 0.8]])  # two families, a probe after each one's stage
>>> m = continual_from_probes(R, probe_seq=[50, 100], task_seq=range(100), task_family=[0] * 50 + [1] * 50,
...                           baseline=[0.1, 0.1])
>>> print(f"ACC={m.acc:.2f} BWT={m.bwt:.2f} FWT={m.fwt:.2f} forgetting={m.forgetting:.2f}")
ACC=0.70 BWT=-0.30 FWT=0.00 forgetting=0.30
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import numpy as np

from agent.task import Task, TaskError, parse_record, to_wire

__all__ = ["ProbeSet", "Prober", "ProbingSource", "ProbeContinual", "continual_from_probes", "probe_scores",
           "build_prober", "PROBE_TASKS"]

log = logging.getLogger(__name__)

PROBE_TASKS = "probe_tasks.jsonl"


# --------------------------------------------------------------------------------------------
# Probe sets
# --------------------------------------------------------------------------------------------


@dataclass
class ProbeSet:
    """Held-out labelled tasks per family (insertion order = order families were added).

    Parameters
    ----------
    tasks_per_family : int
        Most tasks kept per family.
    mode : {"stream", "file", "reservoir"}
        Where the tasks came from (see the module docstring).
    """

    tasks_per_family: int
    mode: str = "reservoir"
    families: dict[str, list[Task]] = field(default_factory=dict)
    _last_segment: dict[str, Any] = field(default_factory=dict)
    _path: Path | None = None

    def __len__(self) -> int:
        return sum(len(v) for v in self.families.values())

    @classmethod
    def from_stream(cls, stream, tasks_per_family: int, seed_offset: int = 1) -> "ProbeSet":
        """Fresh tasks of every mode of a :class:`~agent.streams.synthetic.SyntheticStream`.

        Each mode's tasks come from a one-mode copy of the stream (same options) with seed
        ``stream.seed + seed_offset`` and a new task at every record (``p_stay=0``).

        Examples
        --------
        >>> from agent.streams.synthetic import make_stream
        >>> ps = ProbeSet.from_stream(make_stream("sinusoid-osaka", seed=3), 2)
        >>> {f: len(t) for f, t in ps.families.items()}
        {'sinusoid': 2, 'sinusoid-frequency': 2, 'linear': 2}
        >>> ps.families["linear"][0].query_y is not None
        True
        """
        from agent.streams.synthetic import SyntheticStream

        if int(seed_offset) < 1:
            raise ValueError(f"probes.seed must be >= 1 (probe tasks must differ from the stream's), got {seed_offset!r}")
        out = cls(int(tasks_per_family), "stream")
        for mode in stream.modes:
            one = SyntheticStream({mode: 1.0}, n_tasks=out.tasks_per_family, seed=stream.seed + int(seed_offset),
                                  p_stay=0.0, labels="inline", n_way=stream.n_way, k_shot=stream.k_shot,
                                  k_query=stream.k_query, split=stream.split, families={mode: stream.families[mode]},
                                  flatten=stream.flatten, digits=stream.digits, id_prefix=f"probe-{mode}-",
                                  batch=out.tasks_per_family)
            one._families = stream._families  # share loaded image data sets (same options)
            out.families[mode] = [parse_record(r.data) for r in one.poll(0)]
        return out

    @classmethod
    def from_file(cls, path: str | Path, tasks_per_family: int) -> "ProbeSet":
        """The first ``tasks_per_family`` labelled tasks of each ``meta.family`` in a JSON Lines file.

        Raises
        ------
        ValueError
            When the file holds no labelled task with a family, naming the line of a bad record.
        """
        out = cls(int(tasks_per_family), "file")
        p = Path(path)
        with open(p, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = parse_record(line)
                except TaskError as e:
                    raise ValueError(f"probes.file: {p} line {n}: {e}") from None
                if isinstance(rec, Task):
                    out.offer(rec)
        if not out.families:
            raise ValueError(f"probes.file: {p} holds no labelled task with meta.family")
        return out

    def offer(self, task: Task) -> bool:
        """Keep ``task`` if it is labelled, has a family, its family is not full and it comes
        from another segment than the family's last kept task; True if kept."""
        fam = task.meta.get("family")
        if fam is None or task.query_y is None:
            return False
        fam = str(fam)
        kept = self.families.setdefault(fam, [])
        seg = task.meta.get("segment")
        if len(kept) >= self.tasks_per_family or (seg is not None and kept and self._last_segment.get(fam) == seg):
            return False
        kept.append(task)
        self._last_segment[fam] = seg
        if self._path is not None:
            with open(self._path, "a", encoding="utf-8") as f:
                f.write(json.dumps(to_wire(task), separators=(",", ":")) + "\n")
                f.flush()
        return True

    def persist(self, run_dir: str | Path) -> None:
        """Keep this (reservoir) set in ``run_dir/probe_tasks.jsonl``: load what is there, append
        what is kept from now on (a restart then probes the same tasks)."""
        path = Path(run_dir) / PROBE_TASKS
        if path.is_file():
            with open(path, "rb") as f:
                for line in f:
                    try:
                        rec = parse_record(line)
                    except TaskError:
                        continue  # a line torn by a crash
                    if isinstance(rec, Task):
                        self.offer(rec)
        self._path = path

    def has(self, family: str) -> bool:
        return bool(self.families.get(family))


# --------------------------------------------------------------------------------------------
# Scoring without side effects
# --------------------------------------------------------------------------------------------


def _task_quality(agent, alg, task: Task, steps: int) -> float:
    import torch

    from agent.agent import _score
    from agent.compute import guarded_adapt

    tt = agent._check(task)  # shape checks only; raises TaskError when the task does not fit
    cc = agent.config.compute
    state, _ = guarded_adapt(alg, agent.meta, tt, max(int(steps), 1) if alg.iterative else 1,
                             patience=cc.patience, max_backtracks=cc.max_backtracks)
    with torch.no_grad():
        out = alg.predict(agent.meta, state, tt.query_x).double()
    if task.kind == "classification":
        pred = out[..., : int(tt.n_way)].argmax(dim=-1).numpy()
    else:
        pred = out.reshape(out.shape[0], -1).numpy()
    s = _score(task, pred, agent.config.online.fail_threshold)
    return float(s.get("accuracy", s.get("mse")))


def probe_scores(agent, probe_set: ProbeSet, steps: int) -> tuple[dict[str, float], str | None]:
    """Mean query quality per family of ``probe_set`` under the agent's current meta-parameters.

    The default arm's algorithm adapts to each task with :func:`agent.compute.guarded_adapt`
    (``steps`` inner steps at most). Nothing of the agent changes. Non-finite task scores (a
    diverged regression) are left out of a family's mean; a family whose tasks do not fit the
    model (or all diverge) is left out.

    Returns
    -------
    (scores, metric)
        ``{family: mean accuracy or MSE}`` and ``"accuracy"``/``"mse"`` (``None`` if empty).
    """
    alg = agent.algorithms[agent.config.agent.default_arm]
    scores: dict[str, float] = {}
    metric = None
    for fam, tasks in probe_set.families.items():
        vals = []
        for t in tasks:
            try:
                vals.append(_task_quality(agent, alg, t, steps))
            except TaskError as e:
                log.warning("probe task %s of family %r does not fit the model: %s", t.id, fam, e)
                continue
            metric = "accuracy" if t.kind == "classification" else "mse"
        finite = [v for v in vals if math.isfinite(v)]
        if finite:
            scores[fam] = float(np.mean(finite))
    return scores, metric


# --------------------------------------------------------------------------------------------
# The schedule
# --------------------------------------------------------------------------------------------


class Prober:
    """Decides when to probe and writes the probes (see the module docstring).

    Parameters
    ----------
    probe_set : ProbeSet
    writer : agent.runlog.RunLogWriter
    every_tasks, steps, at_family
        As in :class:`agent.config.ProbesConfig`.
    step : int
        Number of the next probe (probes already in the run directory on a restart).
    seen : iterable of str
        Families already seen (on a restart).
    """

    def __init__(self, probe_set: ProbeSet, writer, *, every_tasks: int, steps: int, at_family: str = "every",
                 step: int = 0, seen: Iterable[str] = ()):
        if int(every_tasks) < 1:
            raise ValueError(f"probes.every_tasks must be >= 1, got {every_tasks!r}")
        self.probe_set, self.writer = probe_set, writer
        if at_family not in ("none", "new", "every"):
            raise ValueError(f"probes.at_family must be 'none', 'new' or 'every', got {at_family!r}")
        self.every, self.steps, self.at_family = int(every_tasks), int(steps), at_family
        self.current: str | None = None  # family of the last task handed out
        self.step = int(step)
        self.seen: set[str] = set(seen)
        self.last_seq: int | None = None
        self.pending = False  # a new family is next: probe before it
        self.next_due: int | None = None

    def _due_after(self, n: int) -> int:
        return (n // self.every + 1) * self.every

    def start(self, agent) -> None:
        """Baseline probe of a fresh run (before any task), and the first due point."""
        n = int(agent.counters["tasks"])
        self.next_due = self._due_after(n)
        if n == 0 and self.step == 0 and self.probe_set.mode != "reservoir":
            self.probe(agent)

    def observe(self, task: Task) -> bool:
        """Note a task about to be handed to the agent; True if a probe should come before it
        (a new family, or any family switch with ``at_family="every"``)."""
        if self.probe_set.mode == "reservoir":
            self.probe_set.offer(task)
        fam = task.meta.get("family")
        if fam is None:
            return False
        fam = str(fam)
        new, switch = fam not in self.seen, fam != self.current
        self.seen.add(fam)
        self.current = fam
        if self.probe_set.families and ((self.at_family == "new" and new) or (self.at_family == "every" and switch)):
            self.pending = True
            return True
        return False

    def due(self, n_tasks: int) -> bool:
        """Whether a probe is due with ``n_tasks`` answered."""
        if self.next_due is None:
            self.next_due = self._due_after(n_tasks)
        return self.pending or n_tasks >= self.next_due

    def maybe_probe(self, agent) -> dict | None:
        """Probe if due (a pending new family or ``every_tasks`` reached)."""
        n = int(agent.counters["tasks"])
        if self.due(n) and self.last_seq != n:
            return self.probe(agent)
        self.pending = False
        if n >= (self.next_due or 0):
            self.next_due = self._due_after(n)
        return None

    def final(self, agent) -> dict | None:
        """The closing probe (skipped when the last probe was at this point already)."""
        if self.last_seq == int(agent.counters["tasks"]):
            return None
        return self.probe(agent)

    def probe(self, agent) -> dict | None:
        """Score the probe set now and write the probe record."""
        n = int(agent.counters["tasks"])
        self.pending = False
        self.next_due = self._due_after(n)
        if not self.probe_set.families:
            return None
        scores, metric = probe_scores(agent, self.probe_set, self.steps)
        if not scores:
            return None
        memory = len(agent.memory) if agent.memory is not None else 0
        rec = self.writer.write_probe(self.step, scores, seq=n, memory=memory, metric=metric)
        self.step += 1
        self.last_seq = n
        return rec


class ProbingSource:
    """A task source that stops each batch at the next probe point and probes before going on.

    Wraps any :class:`~agent.streams.sources.Source`: :meth:`poll` first runs a probe that is
    due (the records handed out before were answered by then: the agent's loop answers a batch
    before it polls again), then returns records only up to the next probe point (the task
    that reaches ``every_tasks``, or just before a new family's first task) and keeps the rest
    for the next poll. Positions and acknowledgements are the wrapped source's.
    """

    def __init__(self, source, agent, prober: Prober):
        self.source, self.agent, self.prober = source, agent, prober
        self._held: list = []
        self._limits = agent.limits

    @property
    def exhausted(self) -> bool:
        return bool(self.source.exhausted) and not self._held

    @property
    def last_position(self):
        return getattr(self.source, "last_position", None)

    def poll(self, timeout: float = 0.0) -> list:
        prober, agent = self.prober, self.agent
        prober.maybe_probe(agent)
        if self._held:
            records, self._held = self._held, []
        else:
            records = self.source.poll(timeout)
        out: list = []
        n = int(agent.counters["tasks"])
        for i, r in enumerate(records):
            task = None
            if not r.oversized:
                try:
                    rec = parse_record(r.data, limits=self._limits)
                    task = rec if isinstance(rec, Task) else None
                except TaskError:
                    task = None  # the agent answers it with an error line
            if task is not None and prober.observe(task):
                if out:
                    self._held = records[i:]
                    return out
                prober.maybe_probe(agent)  # everything before this record is answered
            out.append(r)
            if task is not None:
                n += 1
                if prober.next_due is not None and n >= prober.next_due and i + 1 < len(records):
                    self._held = records[i + 1:]
                    return out
        return out

    def ack(self, position) -> None:
        self.source.ack(position)

    def position(self):
        return self.source.position()

    def close(self) -> None:
        self.source.close()

    def __getattr__(self, name):  # anything else a caller reads from the wrapped source
        if name == "source":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.source, name)


def build_prober(config, writer, source=None, run_dir: str | Path | None = None, *, seen: Iterable[str] = (),
                 step: int = 0) -> Prober:
    """A :class:`Prober` from a :class:`~agent.config.ProbesConfig` and the task source.

    ``source`` decides ``auto``: a :class:`~agent.streams.synthetic.SyntheticStream` gives a
    ``stream`` probe set. ``run_dir`` keeps a reservoir set across restarts.
    """
    from agent.streams.synthetic import SyntheticStream

    mode = config.source
    if mode == "auto":
        mode = "stream" if isinstance(source, SyntheticStream) else "file" if config.file else "reservoir"
    if mode == "stream":
        if not isinstance(source, SyntheticStream):
            raise ValueError("probes.source: 'stream' needs a built-in synthetic stream (--stream)")
        ps = ProbeSet.from_stream(source, config.tasks_per_family, config.seed)
    elif mode == "file":
        if not config.file:
            raise ValueError("probes.file: must name a JSON Lines file of labelled tasks when probes.source is 'file'")
        ps = ProbeSet.from_file(config.file, config.tasks_per_family)
    else:
        ps = ProbeSet(config.tasks_per_family, "reservoir")
        if run_dir is not None:
            ps.persist(run_dir)
    return Prober(ps, writer, every_tasks=config.every_tasks, steps=config.steps,
                  at_family=config.at_family, step=step, seen=seen)


# --------------------------------------------------------------------------------------------
# ACC, BWT, FWT and forgetting from a sequence of probes
# --------------------------------------------------------------------------------------------


class ProbeContinual(NamedTuple):
    """Result of :func:`continual_from_probes` (per-family arrays are NaN where undefined)."""

    acc: float
    bwt: float
    fwt: float
    forgetting: float
    final: np.ndarray
    bwt_per_family: np.ndarray
    fwt_per_family: np.ndarray
    forgetting_per_family: np.ndarray
    after_last_visit: np.ndarray
    gaps: np.ndarray


def _nanmean(v: np.ndarray) -> float:
    v = v[np.isfinite(v)]
    return float(np.mean(v)) if v.size else math.nan


def continual_from_probes(R, probe_seq, task_seq, task_family, baseline=None) -> ProbeContinual:
    r"""ACC, BWT, FWT and forgetting from probes taken along a stream with recurring families.

    ``R[p, j]`` is the quality (higher is better; pass ``-MSE``) on family ``j`` at probe ``p``,
    taken after ``probe_seq[p]`` tasks were answered (NaN: not probed). The stream's tasks have
    positions ``task_seq`` and family indices ``task_family`` (``-1``: none or not probed). A
    *visit* of ``j`` is a maximal run of consecutive tasks of ``j``; only tasks before the final
    probe ``F`` (the last row) count. Baseline probes (``probe_seq == 0``) go in ``baseline``.

    * ``ACC = mean_j R[F, j]`` over families visited before ``F``.
    * ``BWT_j``: mean over ``j``'s *absences* of ``R[end, j] - R[start, j]``, where ``start`` is the
      first probe after a visit of ``j`` and ``end`` the last probe before its next visit (or
      ``F``); absences without two distinct probes are left out. It measures what training on
      other families does to ``j`` while ``j`` is away; a family still in play at ``F`` has no
      absence to the end, as GEM leaves out the last task.
    * Forgetting ``f_j = max_{p < F} R[p, j] - R[F, j]`` (Chaudhry et al. 2018), for families
      with an absence.
    * ``FWT_j = R[q_j, j] - b_j``, ``q_j`` the last probe at or before ``j``'s first task (and
      after some training): what training on other families did for ``j`` before it was seen.

    With one contiguous stage per family and a probe at the end of each, this is exactly GEM's
    ACC/BWT/FWT (Lopez-Paz & Ranzato 2017) and Chaudhry's forgetting on the square matrix
    (:func:`agent.stats.continual_metrics`).

    Parameters
    ----------
    R : array_like, shape (P, F)
    probe_seq : array_like, shape (P,), strictly increasing, > 0
    task_seq : array_like, shape (N,), increasing
    task_family : array_like of int, shape (N,), in ``-1 .. F-1``
    baseline : array_like, shape (F,), optional
        Quality of the untrained model on each family (needed for FWT).

    Returns
    -------
    ProbeContinual
        The four means (NaN when no family qualifies), their per-family values, ``R`` at the
        first probe after each family's last visit, and the number of absences per family.

    Examples
    --------
    Family 0 is learned, left for family 1, then revisited; family 1 is left at the end:

    >>> R = [[0.8, 0.2], [0.5, 0.9], [0.9, 0.6]]
    >>> m = continual_from_probes(R, [10, 20, 30], range(30), [0] * 10 + [1] * 10 + [0] * 10)
    >>> m.bwt_per_family.round(3).tolist(), m.forgetting_per_family.round(3).tolist(), m.gaps.tolist()
    ([-0.3, -0.3], [-0.1, 0.3], [1, 1])
    """
    r = np.asarray(R, dtype=float)
    if r.ndim != 2 or r.shape[0] == 0 or r.shape[1] == 0:
        raise ValueError(f"`R` must be a non-empty (P, F) matrix, got shape {r.shape}")
    P, F = r.shape
    s = np.asarray(probe_seq, dtype=float)
    ts = np.asarray(task_seq, dtype=float)
    tf = np.asarray(task_family, dtype=np.int64)
    if s.shape != (P,):
        raise ValueError(f"`probe_seq` must have length P={P}, got shape {s.shape}")
    if ts.shape != tf.shape or ts.ndim != 1:
        raise ValueError("`task_seq` and `task_family` must be 1-D of the same length")
    if np.any(s <= 0) or np.any(np.diff(s) <= 0):
        raise ValueError("`probe_seq` must be strictly increasing and > 0 (baseline probes go in `baseline`)")
    if tf.size and (tf.min() < -1 or tf.max() >= F):
        raise ValueError(f"`task_family` must lie in -1 .. {F - 1}")
    b = None
    if baseline is not None:
        b = np.asarray(baseline, dtype=float)
        if b.shape != (F,):
            raise ValueError(f"`baseline` must have length F={F}, got shape {b.shape}")
    keep = ts < s[-1]
    ts, tf = ts[keep], tf[keep]
    # visits: maximal runs of one family, as (family, first seq, last seq)
    runs: list[tuple[int, float, float]] = []
    for q, f in zip(ts, tf):
        if runs and runs[-1][0] == f:
            runs[-1] = (f, runs[-1][1], q)
        else:
            runs.append((int(f), q, q))
    final = np.full(F, np.nan)
    bwt, forget, after, fwt = (np.full(F, np.nan) for _ in range(4))
    gaps = np.zeros(F, dtype=np.int64)
    for j in range(F):
        mine = [(a, z) for f, a, z in runs if f == j]
        if not mine:
            continue
        final[j] = r[-1, j]
        changes = []
        for k, (_a, z) in enumerate(mine):
            start = int(np.searchsorted(s, z + 1, side="left"))  # first probe after the visit
            end = P - 1 if k + 1 == len(mine) else int(np.searchsorted(s, mine[k + 1][0], side="right")) - 1
            if k + 1 == len(mine) and start < P:
                after[j] = r[start, j]
            if start < end and np.isfinite(r[start, j]) and np.isfinite(r[end, j]):
                changes.append(r[end, j] - r[start, j])
        gaps[j] = len(changes)
        if changes:
            bwt[j] = float(np.mean(changes))
            earlier = r[:-1, j]
            forget[j] = float(np.nanmax(earlier)) - r[-1, j]
        if b is not None:
            q = int(np.searchsorted(s, mine[0][0], side="right")) - 1  # last probe at or before the first task
            if q >= 0:
                fwt[j] = r[q, j] - b[j]
    return ProbeContinual(_nanmean(final), _nanmean(bwt), _nanmean(fwt), _nanmean(forget), final, bwt, fwt, forget,
                          after, gaps)
