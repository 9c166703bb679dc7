"""Run directories: what the daemon (and ``eval``) write while they work, and how to read it back.

A run directory holds::

    config.yaml      the configuration the run started with (JSON if PyYAML is missing)
    run.json         start time, version, stream description, seed, and one entry per restart
    outcomes.jsonl   one line per answered task, plus delayed ``score`` lines (below)
    probes.jsonl     periodic probes: performance on each family, memory size (agent.probes)
    probe_tasks.jsonl  the probe tasks kept from the stream itself (probes.source: reservoir)

**outcomes.jsonl** holds two record types, joined by task id at read time (labels may arrive
long after the answer, or never):

* ``{"type": "outcome", "id", "seq", "family", "segment", "kind", "algorithm", "budget",
  "budget_units", "inner_steps", "members", "p_fail", "flags", "latency_ms", "time"}`` and,
  when the labels were known at answer time, ``"quality"`` and ``"failed"``; ``"boundary"``
  when the agent runs a boundary (drift) detector. ``seq`` is the task's index in the stream;
  ``family`` and ``segment`` are the evaluation-only annotations of the record's ``meta``
  (``null`` when the stream has none). ``quality`` is accuracy for classification and mean
  squared error for regression (:func:`quality_name`).
* ``{"type": "score", "id", "quality", "failed", "time"}`` for labels that came later.

**probes.jsonl**: ``{"type": "probe", "step", "seq", "scores": {family: performance},
"metric", "memory", "stage", "time"}``. ``seq`` is the number of tasks answered when the
probe ran (a probe with ``seq == 0`` is the untrained baseline used for forward transfer);
``stage`` optionally names the family trained just before the probe (informational: the
report places probes by ``seq``). The daemon writes probes when ``probes.enabled`` is set
(:mod:`agent.probes`); the report turns them into ACC, BWT, FWT and forgetting.

Writing is append-only and line-atomic from the reader's point of view: every record is one
line, flushed as it is written, and a line torn by a crash is skipped (and counted) on reading.
Reopening a directory appends; :func:`load_run` keeps the **last** outcome for a task id seen
twice (a task answered again after a restart from an older checkpoint) and counts it in
``Run.n_duplicates``; a score overrides an inline quality of the same task.

Examples
--------
>>> import tempfile
>>> d = tempfile.mkdtemp()
>>> with RunLogWriter(d, stream={"preset": "sinusoid-demo"}, seed=1) as log:
...     _ = log.write_outcome({"id": "t-0", "algorithm": "maml", "budget": {"steps": 5, "members": 1},
...                            "inner_steps": 5, "p_fail": 0.1, "flags": [], "latency_ms": 3.0},
...                           seq=0, meta={"family": "sine", "segment": 0}, kind="regression")
...     _ = log.write_score("t-0", quality=0.25, failed=False)
...     _ = log.write_probe(1, {"sine": -0.3}, seq=1, memory=1)
>>> run = load_run(d)
>>> run.ids, run.quality.tolist(), run.failed.tolist(), run.families
(['t-0'], [0.25], [0.0], ['sine'])
>>> run.info["seed"], run.metric_names
(1, ['mse'])
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from agent.atomic import atomic_write

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "RunLogWriter",
    "Run",
    "load_run",
    "quality_name",
    "higher_is_better",
    "is_run_dir",
    "is_eval_dir",
    "load_episodes",
    "iter_eval_dirs",
]

FORMAT = "meta-agent-run"
FORMAT_VERSION = 1
OUTCOMES, SCORES, PROBES = "outcome", "score", "probe"
_FILES = {"run": "run.json", "outcomes": "outcomes.jsonl", "probes": "probes.jsonl"}


def quality_name(kind: str | None) -> str:
    """The quality metric of a task kind: ``"accuracy"`` (classification) or ``"mse"``.

    Examples
    --------
    >>> quality_name("classification"), quality_name("regression")
    ('accuracy', 'mse')
    """
    return "accuracy" if kind == "classification" else "mse"


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is better (accuracy) or worse (MSE, loss).

    Examples
    --------
    >>> higher_is_better("accuracy"), higher_is_better("mse")
    (True, False)
    """
    return not (metric.startswith("mse") or metric.startswith("loss"))


def is_run_dir(path: str | Path) -> bool:
    """True if ``path`` is a run directory (has ``outcomes.jsonl`` or ``run.json``)."""
    p = Path(path)
    return (p / _FILES["outcomes"]).is_file() or (p / _FILES["run"]).is_file()


def is_eval_dir(path: str | Path) -> bool:
    """True if ``path`` holds offline evaluation results (``episodes.jsonl``)."""
    return (Path(path) / "episodes.jsonl").is_file()


# --------------------------------------------------------------------------------------------
# JSON helpers
# --------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Plain JSON values; NaN/inf become ``None``, numpy scalars and arrays become Python."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "to_dict"):
        return _jsonable(value.to_dict())
    return str(value)


def _quality(q) -> Any:
    """A quality value for JSON: a diverged task's infinite MSE is kept as the string "inf"."""
    if q is None:
        return None
    q = float(q)
    return q if math.isfinite(q) else str(q)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _dump(record: Mapping) -> str:
    return json.dumps(_jsonable(record), separators=(",", ":"), allow_nan=False) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


class _Appender:
    """An append-mode JSON Lines file that first repairs a torn last line (crash mid-write)."""

    def __init__(self, path: Path):
        self.path = path
        torn = False
        if path.exists() and path.stat().st_size > 0:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
        self.file = open(path, "a", encoding="utf-8")
        if torn:  # the torn line stays (the reader skips it); the next record starts clean
            self.file.write("\n")
            self.file.flush()

    def write(self, line: str) -> None:
        self.file.write(line)
        self.file.flush()

    def sync(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()


class RunLogWriter:
    """Append records to a run directory; safe to reopen after a restart or a crash.

    Parameters
    ----------
    run_dir : str or Path
        Created if missing. If it already holds a run, records are appended and the restart
        is noted in ``run.json`` (``restarts``).
    config : Config or mapping, optional
        Written to ``config.yaml`` when the directory has no config yet. On a restart with a
        different config, the new one goes to ``config-<n>.yaml`` and the restart entry says so.
    stream : mapping, optional
        Description of the task stream (preset, options), stored in ``run.json``.
    seed : int, optional
        The stream / agent seed, stored in ``run.json``.
    info : mapping, optional
        Anything else to keep in ``run.json`` (merged in; later restarts do not overwrite).

    Notes
    -----
    Every record is flushed to the OS as it is written, so another process can read the run
    while it grows; :meth:`flush` also ``fsync``\\ s. All methods are thread-safe.

    Examples
    --------
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> RunLogWriter(d, seed=0).close()
    >>> with RunLogWriter(d, seed=0) as log:  # a restart appends
    ...     _ = log.write_outcome({"id": "a", "algorithm": "protonet", "budget": 0, "inner_steps": 0,
    ...                            "p_fail": 0.5}, seq=0, kind="classification", quality=1.0, failed=False)
    >>> len(load_run(d).info["restarts"])
    1
    """

    def __init__(self, run_dir: str | Path, *, config: Any = None, stream: Mapping | None = None,
                 seed: int | None = None, info: Mapping | None = None):
        from agent import __version__

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        run_path = self.run_dir / _FILES["run"]
        now = _now()
        cfg = None if config is None else _jsonable(config)
        if run_path.is_file():
            meta = json.loads(run_path.read_text())
            restart: dict[str, Any] = {"time": now, "version": __version__}
            if cfg is not None:
                previous = _read_config(self.run_dir)
                if previous is None:
                    self._write_config(cfg, "config")
                elif previous != cfg:
                    name = f"config-{len(meta.get('restarts', [])) + 1}"
                    self._write_config(cfg, name)
                    restart["config"] = name
            if stream is not None and _jsonable(stream) != meta.get("stream"):
                restart["stream"] = _jsonable(stream)
            if seed is not None and seed != meta.get("seed"):
                restart["seed"] = int(seed)
            meta.setdefault("restarts", []).append(restart)
        else:
            meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "started": now, "version": __version__,
                    "stream": _jsonable(stream), "seed": None if seed is None else int(seed), "restarts": []}
            for k, v in (info or {}).items():
                meta.setdefault(str(k), _jsonable(v))
            if cfg is not None:
                self._write_config(cfg, "config")
        self.info = meta
        _write_atomic(run_path, json.dumps(meta, indent=1) + "\n")
        self._outcomes = _Appender(self.run_dir / _FILES["outcomes"])
        self._probes = _Appender(self.run_dir / _FILES["probes"])

    def _write_config(self, cfg: Any, name: str) -> None:
        try:
            import yaml

            text, suffix = yaml.safe_dump(cfg, sort_keys=False), ".yaml"
        except ImportError:  # pragma: no cover - PyYAML is a dependency
            text, suffix = json.dumps(cfg, indent=1) + "\n", ".json"
        _write_atomic(self.run_dir / (name + suffix), text)

    # -- records -------------------------------------------------------------------------------
    def write_outcome(self, outcome: Any, *, seq: int, meta: Mapping | None = None, kind: str | None = None,
                      quality: float | None = None, failed: bool | None = None, boundary: bool | None = None,
                      members: int | None = None, budget_units: float | None = None) -> dict:
        """Append the record of one answered task.

        Parameters
        ----------
        outcome : agent.task.Outcome or mapping
            The agent's answer: ``id``, ``algorithm``, ``budget``, ``inner_steps``, ``p_fail``,
            ``flags``, ``latency_ms`` are read from it (predictions are not stored).
        seq : int
            The task's index in the stream.
        meta : mapping, optional
            The task's ``meta``; only ``family`` and ``segment`` are kept (evaluation only).
        kind : {"classification", "regression"}, optional
            Task kind; decides whether ``quality`` is accuracy or MSE.
        quality, failed : optional
            The score when labels were known at answer time (otherwise use :meth:`write_score`).
        boundary : bool, optional
            Whether the agent's boundary (drift) detector fired on this task. ``None`` with a
            ``"drift"`` or ``"boundary"`` flag counts as ``True``; pass ``False`` explicitly on
            the other tasks when a detector runs, so that "no detection" is told apart from
            "no detector".
        members : int, optional
            Ensemble members actually used (default: ``budget["members"]``, else 1).
        budget_units : float, optional
            Compute spent, in the budget's units (default: ``inner_steps``).

        Returns
        -------
        dict
            The record written.
        """
        get = outcome.get if isinstance(outcome, Mapping) else (lambda k, d=None: getattr(outcome, k, d))
        budget = get("budget")
        flags = [str(f) for f in (get("flags") or ())]
        if members is None:
            members = budget.get("members", 1) if isinstance(budget, Mapping) else 1
        inner = get("inner_steps")
        if budget_units is None:
            budget_units = inner
        if boundary is None and ("drift" in flags or "boundary" in flags):
            boundary = True
        meta = meta or {}
        rec: dict[str, Any] = {
            "type": OUTCOMES, "id": str(get("id")), "seq": int(seq),
            "family": meta.get("family"), "segment": meta.get("segment"), "kind": kind,
            "algorithm": get("algorithm"), "budget": budget, "budget_units": budget_units,
            "inner_steps": inner, "members": members, "p_fail": get("p_fail"), "flags": flags,
            "latency_ms": get("latency_ms"), "time": _now(),
        }
        if quality is not None or failed is not None:
            rec["quality"] = _quality(quality)
            rec["failed"] = None if failed is None else bool(failed)
        if boundary is not None:
            rec["boundary"] = bool(boundary)
        with self._lock:
            self._outcomes.write(_dump(rec))
        return rec

    def write_score(self, task_id: str, quality: float | None, failed: bool | None) -> dict:
        """Append the score of a task whose labels arrived after its answer (joined by id)."""
        rec = {"type": SCORES, "id": str(task_id), "quality": _quality(quality),
               "failed": None if failed is None else bool(failed), "time": _now()}
        with self._lock:
            self._outcomes.write(_dump(rec))
        return rec

    def write_probe(self, step: int, scores: Mapping[str, float], *, seq: int | None = None,
                    memory: int | None = None, metric: str | None = None, stage: str | None = None) -> dict:
        """Append a periodic probe.

        Parameters
        ----------
        step : int
            Probe number (0, 1, ...).
        scores : mapping
            Family name -> performance on fresh tasks of that family at this point. Probe every
            family of the stream (including ones not seen yet) so that ACC/BWT/FWT and
            forgetting can be computed.
        seq : int, optional
            Tasks answered so far (``0`` = before any learning: the FWT baseline).
        memory : int, optional
            Entries in the agent's memory.
        metric : str, optional
            What ``scores`` measures (``"accuracy"``, ``"mse"``); default: the run's metric.
        stage : str, optional
            The family trained just before the probe (default: inferred from ``seq``).
        """
        rec = {"type": PROBES, "step": int(step), "seq": None if seq is None else int(seq),
               "scores": {str(k): v for k, v in scores.items()}, "metric": metric,
               "memory": None if memory is None else int(memory), "stage": stage, "time": _now()}
        with self._lock:
            self._probes.write(_dump(rec))
        return rec

    # -- lifecycle -----------------------------------------------------------------------------
    def flush(self) -> None:
        """Flush and ``fsync`` both logs (call at checkpoints)."""
        with self._lock:
            self._outcomes.sync()
            self._probes.sync()

    def close(self) -> None:
        """Flush, ``fsync`` and close; idempotent."""
        with self._lock:
            for f in (self._outcomes, self._probes):
                if not f.file.closed:
                    f.sync()
                    f.close()

    def __enter__(self) -> "RunLogWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------


def _read_config(run_dir: Path) -> dict | None:
    for name in ("config.yaml", "config.yml", "config.json"):
        p = run_dir / name
        if p.is_file():
            text = p.read_text()
            if name.endswith(".json"):
                return json.loads(text)
            import yaml

            return yaml.safe_load(text)
    return None


def _read_jsonl(path: Path) -> tuple[list[dict], int]:
    """Records of a JSON Lines file and the number of unreadable (torn) lines."""
    if not path.is_file():
        return [], 0
    records, bad = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(rec, dict):
                records.append(rec)
            else:
                bad += 1
    return records, bad


def _f(v) -> float:
    try:
        return math.nan if v is None else float(v)
    except (TypeError, ValueError):
        return math.nan


@dataclass
class Run:
    """A run directory read back: one entry per answered task, in stream order (``seq``).

    Numeric columns are numpy arrays with NaN where a value is unknown; ``failed`` and
    ``boundary`` are float arrays of 0/1/NaN. Text columns are lists (``None`` when unknown).
    """

    path: Path
    info: dict
    config: dict | None
    ids: list[str]
    seq: np.ndarray
    family: list
    segment: np.ndarray
    kind: list
    algorithm: list
    budget: list
    budget_units: np.ndarray
    inner_steps: np.ndarray
    members: np.ndarray
    p_fail: np.ndarray
    flags: list
    latency_ms: np.ndarray
    quality: np.ndarray
    failed: np.ndarray
    boundary: np.ndarray
    probes: list[dict] = field(default_factory=list)
    n_duplicates: int = 0
    n_corrupt: int = 0
    n_orphan_scores: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def metric(self) -> list[str]:
        """Quality metric of each task (``"accuracy"`` or ``"mse"``)."""
        return [quality_name(k) for k in self.kind]

    @property
    def metric_names(self) -> list[str]:
        """The quality metrics present, in order of first appearance."""
        return list(dict.fromkeys(self.metric))

    @property
    def labelled(self) -> np.ndarray:
        """Mask of tasks whose quality is known and finite."""
        return np.isfinite(self.quality)

    @property
    def n_nonfinite_quality(self) -> int:
        """Tasks scored with a non-finite quality (a diverged regression: infinite MSE)."""
        return int(np.count_nonzero(np.isinf(self.quality)))

    @property
    def families(self) -> list[str]:
        """Families in order of first appearance (``None`` excluded)."""
        return list(dict.fromkeys(f for f in self.family if f is not None))

    @property
    def has_detector(self) -> bool:
        """Whether any task carries an agent-detected boundary flag."""
        return bool(np.any(np.isfinite(self.boundary)))

    def family_switches(self) -> np.ndarray:
        """Positions ``i >= 1`` where ``family[i] != family[i-1]`` (both known)."""
        f = self.family
        return np.array([i for i in range(1, len(f)) if f[i] is not None and f[i - 1] is not None
                         and f[i] != f[i - 1]], dtype=np.int64)

    def segment_boundaries(self) -> np.ndarray:
        """Positions ``i >= 1`` where the segment changes: the true (hidden) task boundaries."""
        s = self.segment
        ok = np.isfinite(s[1:]) & np.isfinite(s[:-1])
        return (np.flatnonzero(ok & (s[1:] != s[:-1])) + 1).astype(np.int64)

    def detected_boundaries(self) -> np.ndarray:
        """Positions where the agent's detector fired."""
        return np.flatnonzero(self.boundary == 1).astype(np.int64)

    def select(self, mask) -> "Run":
        """A copy restricted to the tasks where ``mask`` is true (probes kept)."""
        m = np.asarray(mask, dtype=bool)
        idx = np.flatnonzero(m)
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return Run(self.path, self.info, self.config, pick(self.ids), self.seq[m], pick(self.family), self.segment[m],
                   pick(self.kind), pick(self.algorithm), pick(self.budget), self.budget_units[m], self.inner_steps[m],
                   self.members[m], self.p_fail[m], pick(self.flags), self.latency_ms[m], self.quality[m],
                   self.failed[m], self.boundary[m], self.probes, self.n_duplicates, self.n_corrupt,
                   self.n_orphan_scores)


def load_run(run_dir: str | Path) -> Run:
    """Read a run directory, joining delayed scores to their outcomes by task id.

    Parameters
    ----------
    run_dir : str or Path

    Returns
    -------
    Run
        Tasks sorted by ``seq`` (ties by order written). A task id answered twice keeps its
        last outcome (``n_duplicates`` counts the others); the last score for an id wins over
        earlier scores and over an inline quality; scores for unknown ids are counted in
        ``n_orphan_scores``; torn lines in ``n_corrupt``.

    Raises
    ------
    FileNotFoundError
        If ``run_dir`` is not a run directory.
    """
    p = Path(run_dir)
    if not is_run_dir(p):
        raise FileNotFoundError(f"{p} is not a run directory (no {_FILES['outcomes']} or {_FILES['run']})")
    info = json.loads((p / _FILES["run"]).read_text()) if (p / _FILES["run"]).is_file() else {}
    records, bad = _read_jsonl(p / _FILES["outcomes"])
    outcomes: dict[str, dict] = {}
    scores: dict[str, dict] = {}
    dup = 0
    for order, rec in enumerate(records):
        t, rid = rec.get("type", OUTCOMES), rec.get("id")
        if rid is None:
            bad += 1
        elif t == SCORES:
            scores[str(rid)] = rec
        elif t == OUTCOMES:
            if str(rid) in outcomes:
                dup += 1
                del outcomes[str(rid)]  # re-answered after a restart: the last answer counts
            outcomes[str(rid)] = dict(rec, _order=order)
        else:
            bad += 1
    orphans = sum(1 for k in scores if k not in outcomes)
    for k, s in scores.items():
        if k in outcomes:
            outcomes[k]["quality"] = s.get("quality")
            outcomes[k]["failed"] = s.get("failed")
    rows = sorted(outcomes.values(), key=lambda r: (_f(r.get("seq")), r["_order"]))
    probes, bad_p = _read_jsonl(p / _FILES["probes"])
    probes = sorted((r for r in probes if r.get("type", PROBES) == PROBES),
                    key=lambda r: (_f(r.get("seq")) if r.get("seq") is not None else math.inf, r.get("step", 0)))

    def col(key):
        return [r.get(key) for r in rows]

    def num(key, dtype=float):
        return np.array([_f(v) for v in col(key)], dtype=float)

    def flag(key):
        return np.array([math.nan if v is None else float(bool(v)) for v in col(key)], dtype=float)

    return Run(
        path=p, info=info, config=_read_config(p), ids=[str(v) for v in col("id")], seq=num("seq"),
        family=col("family"), segment=num("segment"), kind=col("kind"), algorithm=col("algorithm"),
        budget=col("budget"), budget_units=num("budget_units"), inner_steps=num("inner_steps"),
        members=num("members"), p_fail=num("p_fail"), flags=[list(v or ()) for v in col("flags")],
        latency_ms=num("latency_ms"), quality=num("quality"), failed=flag("failed"), boundary=flag("boundary"),
        probes=probes, n_duplicates=dup, n_corrupt=bad + bad_p, n_orphan_scores=orphans,
    )


def load_episodes(eval_dir: str | Path) -> tuple[list[dict], dict]:
    """Rows of an offline evaluation directory (``episodes.jsonl``) and its ``summary.json``."""
    p = Path(eval_dir)
    rows, _ = _read_jsonl(p / "episodes.jsonl")
    summary = json.loads((p / "summary.json").read_text()) if (p / "summary.json").is_file() else {}
    return rows, summary


def iter_eval_dirs(path: str | Path) -> Iterable[Path]:
    """``path`` itself if it is an evaluation directory, then its direct subdirectories that are."""
    p = Path(path)
    if is_eval_dir(p):
        yield p
    if p.is_dir():
        for sub in sorted(q for q in p.iterdir() if q.is_dir()):
            if is_eval_dir(sub):
                yield sub
