"""Reports and run comparison: ``meta-agent report RUN_DIR`` and ``meta-agent compare RUN_A RUN_B``.

The functional core turns a :class:`~agent.runlog.Run` into numbers and tables (pure functions,
every interval from :mod:`agent.stats`); the plotting functions turn those numbers into
matplotlib figures (headless: :class:`matplotlib.figure.Figure` with the Agg canvas, no pyplot
state); :func:`build_report` assembles a self-contained HTML file with the PNGs inlined as
``data:`` URIs and also saved beside it. Every section says so in words when its data is
missing ("no labels yet", "no probes recorded", ...) instead of failing.

Quality is accuracy (higher is better, shown in percent) for classification tasks and mean
squared error (lower is better) for regression tasks; a run with both kinds is reported per
metric.

Examples
--------
>>> import tempfile
>>> from agent.runlog import RunLogWriter
>>> d = tempfile.mkdtemp()
>>> with RunLogWriter(d) as log:
...     for i in range(40):
...         _ = log.write_outcome({"id": f"t{i}", "algorithm": "protonet", "budget": 1, "inner_steps": 1,
...                                "p_fail": 0.3, "latency_ms": 2.0}, seq=i, kind="classification",
...                               meta={"family": "a" if i < 20 else "b", "segment": i // 20},
...                               quality=0.6 + 0.01 * (i % 20), failed=(i % 20) < 3)
>>> path = build_report(d)
>>> path.name, "Quality over the stream" in path.read_text()
('report.html', True)
>>> c = compare_runs(d, d)
>>> c.verdict()
'No significant difference: B − A = 0.0 points on 40 shared tasks (identical on every task).'
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from agent import stats
from agent.probes import ProbeContinual, continual_from_probes
from agent.runlog import (
    Run,
    higher_is_better,
    is_eval_dir,
    is_run_dir,
    iter_eval_dirs,
    load_episodes,
    load_run,
)

__all__ = [
    "SECTION_TITLES",
    "Table",
    "Section",
    "rolling_mean",
    "window_shares",
    "roc_curve",
    "roc_auc",
    "auc_interval",
    "probe_matrix",
    "switch_windows",
    "build_sections",
    "build_report",
    "PairedResult",
    "Comparison",
    "compare_runs",
]

SECTION_TITLES = (
    "Run",
    "Quality over the stream",
    "Prequential quality",
    "Quality per family",
    "Quality after a switch",
    "Recovery on revisited families",
    "Compute vs quality",
    "Compute per task",
    "Failure prediction: reliability",
    "Failure prediction: ROC",
    "Algorithm mix over time",
    "Continual metrics (ACC, BWT, FWT, forgetting)",
    "Memory growth",
    "Boundary detection",
    "Latency",
    "Offline evaluation",
)
NO_LABELS = "No labels yet: quality needs query labels (inline or delayed feedback)."
SWITCH_KS = (1, 5, 10, 20)
_FAMILY_COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
                   "#9c755f", "#bab0ac")


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------


def _scale(metric: str) -> tuple[float, str]:
    """Display scale and unit of a metric: accuracy in percent, others as they are."""
    return (100.0, "%") if metric.startswith("accuracy") else (1.0, "")


def _num(v: float, metric: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    s, _ = _scale(metric)
    v = v * s
    if metric.startswith("accuracy"):
        return f"{v:.1f}"
    a = abs(v)
    if a == 0:
        return "0"
    if float(v).is_integer() and a < 1e6:
        return str(int(v))
    if a >= 100:
        return f"{v:.0f}"
    if a >= 0.01:
        return f"{v:.3g}" if a < 10 else f"{v:.1f}"
    return f"{v:.2e}"


def _ci(r: stats.MeanCI, metric: str = "") -> str:
    """``mean [low, high]`` in display units; ``n=1`` has no interval."""
    unit = _scale(metric)[1]
    if r.n < 2 or not math.isfinite(r.half_width):
        return f"{_num(r.mean, metric)}{unit} (n=1, no interval)"
    return f"{_num(r.mean, metric)}{unit} [{_num(r.low, metric)}, {_num(r.high, metric)}]"


def _p(p: float) -> str:
    if p is None or not math.isfinite(p):
        return "n/a"
    return "p<0.001" if p < 0.001 else f"p={p:.2g}"


def _pct(lo_hi: tuple[float, float]) -> str:
    return f"[{100 * lo_hi[0]:.1f}, {100 * lo_hi[1]:.1f}]"


def _diff_unit(metric: str) -> str:
    """Unit of a difference: percentage points for accuracy."""
    return " pp" if metric.startswith("accuracy") else ""


def _metric_label(metric: str) -> str:
    return "accuracy (%)" if metric == "accuracy" else "MSE (lower is better)" if metric == "mse" else metric


# --------------------------------------------------------------------------------------------
# Functional core
# --------------------------------------------------------------------------------------------


@dataclass
class Table:
    """A table for the report: column names, rows of cell strings, and an optional note."""

    columns: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass
class Section:
    """One report section: a title, paragraphs, tables and figures (name -> Figure)."""

    title: str
    text: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)


def rolling_mean(values, window: int) -> np.ndarray:
    """Trailing rolling mean; the first ``window - 1`` entries average what is there so far.

    Examples
    --------
    >>> rolling_mean([1, 2, 3, 4], 2).tolist()
    [1.0, 1.5, 2.5, 3.5]
    """
    v = np.asarray(values, dtype=float)
    w = max(1, int(window))
    c = np.concatenate([[0.0], np.cumsum(v)])
    idx = np.arange(1, v.size + 1)
    lo = np.maximum(0, idx - w)
    return (c[idx] - c[lo]) / (idx - lo)


def window_shares(labels: Sequence, window: int) -> tuple[np.ndarray, list, np.ndarray]:
    """Share of each label in consecutive non-overlapping windows.

    Returns ``(starts, names, shares)`` with ``shares[w, j]`` the fraction of window ``w`` that is
    ``names[j]`` (rows sum to 1; the last window may be shorter).

    Examples
    --------
    >>> starts, names, shares = window_shares(["a", "a", "b", "b", "b", "a"], 3)
    >>> starts.tolist(), names, shares.round(3).tolist()
    ([0, 3], ['a', 'b'], [[0.667, 0.333], [0.333, 0.667]])
    """
    labels = [str(x) for x in labels]
    names = list(dict.fromkeys(labels))
    w = max(1, int(window))
    starts = np.arange(0, len(labels), w)
    code = np.array([names.index(x) for x in labels], dtype=int)
    shares = np.zeros((starts.size, len(names)))
    for i, s in enumerate(starts):
        chunk = code[s:s + w]
        shares[i] = np.bincount(chunk, minlength=len(names)) / chunk.size
    return starts, names, shares


def _check_binary(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels, dtype=float)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError("`scores` and `labels` must be 1-D arrays of the same length")
    if not (np.all(np.isfinite(s)) and np.all((y == 0) | (y == 1))):
        raise ValueError("`scores` must be finite and `labels` 0/1")
    return s, y


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve of ``scores`` (higher = more likely positive) against 0/1 ``labels``.

    Returns ``(fpr, tpr, thresholds)``, starting at (0, 0) with threshold ``inf``; one point per
    distinct score (ties move diagonally).

    Examples
    --------
    >>> fpr, tpr, thr = roc_curve([0.9, 0.8, 0.3, 0.1], [1, 0, 1, 0])
    >>> fpr.tolist(), tpr.tolist()
    ([0.0, 0.0, 0.5, 0.5, 1.0], [0.0, 0.5, 0.5, 1.0, 1.0])
    """
    s, y = _check_binary(scores, labels)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    P, N = y.sum(), y.size - y.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.r_[0.0, tp / P]
        fpr = np.r_[0.0, fp / N]
    return fpr, tpr, np.r_[np.inf, s[last]]


def _auc_rows(s: np.ndarray, y: np.ndarray) -> np.ndarray:
    """AUC of each row (Mann–Whitney U / (P N), ties count one half); NaN with one class."""
    from scipy.stats import rankdata

    ranks = rankdata(s, axis=-1)
    P = y.sum(axis=-1)
    N = y.shape[-1] - P
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((ranks * y).sum(axis=-1) - P * (P + 1) / 2.0) / (P * N)


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve (probability a random positive outscores a random negative).

    NaN when only one class is present.

    Examples
    --------
    >>> roc_auc([0.9, 0.8, 0.3, 0.1], [1, 0, 1, 0])
    0.75
    """
    s, y = _check_binary(scores, labels)
    return float(_auc_rows(s[None, :], y[None, :])[0])


def auc_interval(scores, labels, confidence: float = 0.95, n_resamples: int = 2000, rng=0):
    """AUC with a BCa bootstrap interval over tasks (:func:`agent.stats.bootstrap_ci`).

    Returns the :class:`~agent.stats.BootstrapCI`, or ``None`` when an interval cannot be had
    (fewer than 2 tasks of a class, or resamples without one of the classes).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 2, 200)
    >>> r = auc_interval(y + rng.normal(0, 1, 200), y, n_resamples=500)
    >>> r.low < r.estimate < r.high
    True
    """
    s, y = _check_binary(scores, labels)
    if min(y.sum(), y.size - y.sum()) < 2:
        return None

    def stat(idx, axis=-1):
        i = np.asarray(idx).astype(np.int64)
        return _auc_rows(s[i], y[i])

    try:
        return stats.bootstrap_ci(np.arange(s.size, dtype=float), stat, confidence=confidence,
                                  n_resamples=n_resamples, rng=rng)
    except ValueError:
        return None


@dataclass
class ProbeMatrix:
    """Probes of a run as a matrix ``R[p, j]``: quality on family ``j`` at probe ``p``.

    ``R`` is signed so that higher is better (``-MSE`` for regression: ``sign = -1``); NaN where
    a family was not probed. ``seq`` holds each probe's position (tasks answered), ``first`` and
    ``last`` each family's first and last task before the final probe (NaN: not visited), and
    ``baseline`` the probe before any task (``seq == 0``), if there is one.
    """

    R: np.ndarray
    seq: np.ndarray
    families: list[str]
    first: np.ndarray
    last: np.ndarray
    baseline: np.ndarray | None
    metric: str
    sign: float
    task_seq: np.ndarray
    task_family: np.ndarray

    def continual(self) -> ProbeContinual:
        """ACC, BWT, FWT and forgetting (:func:`agent.probes.continual_from_probes`)."""
        return continual_from_probes(self.R, self.seq, self.task_seq, self.task_family, self.baseline)


def probe_matrix(run: Run) -> ProbeMatrix | str:
    """The probes of ``run`` as a :class:`ProbeMatrix` (rows: probes after the first task).

    Families are ordered by first visit in the stream; families that were probed but never
    visited come last. A probe repeated at the same position (a restart) counts once (the last).

    Returns
    -------
    ProbeMatrix or str
        The matrix, or a sentence saying why it cannot be built.
    """
    probes = [p for p in run.probes if isinstance(p.get("scores"), Mapping) and p["scores"] and p.get("seq") is not None]
    if not probes:
        return "No probes recorded: ACC, BWT, FWT and forgetting need periodic probes of every family."
    metric = probes[-1].get("metric") or (run.metric_names[0] if run.metric_names else "accuracy")
    sign = 1.0 if higher_is_better(metric) else -1.0
    by_seq: dict[int, dict] = {}
    for p in probes:
        by_seq[int(p["seq"])] = p
    rows = [by_seq[k] for k in sorted(by_seq) if k > 0]
    if not rows:
        return "Only a baseline probe (before any task): continual metrics need probes after training."
    probed = list(dict.fromkeys(f for p in probes for f in p["scores"]))
    fams = [f for f in run.families if f in probed] + [f for f in probed if f not in set(run.families)]
    end = float(rows[-1]["seq"])
    seq = np.asarray(run.seq, dtype=float)
    first, last = np.full(len(fams), np.nan), np.full(len(fams), np.nan)
    for j, f in enumerate(fams):
        at = seq[[i for i, g in enumerate(run.family) if g == f]]
        at = at[at < end]
        if at.size:
            first[j], last[j] = at.min(), at.max()
    if not np.isfinite(first).any():
        return "No probed family was visited before the last probe: continual metrics need training on a probed family."

    def score(p, f):
        v = p["scores"].get(f)
        return math.nan if v is None else sign * float(v)

    R = np.array([[score(p, f) for f in fams] for p in rows], dtype=float)
    base = by_seq.get(0)
    baseline = np.array([score(base, f) for f in fams]) if base is not None else None
    index = {f: j for j, f in enumerate(fams)}
    known = np.isfinite(seq)
    task_family = np.array([index.get(f, -1) for f, k in zip(run.family, known) if k], dtype=np.int64)
    return ProbeMatrix(R, np.array([float(p["seq"]) for p in rows]), fams, first, last, baseline, metric, sign,
                       seq[known], task_family)


def switch_windows(run: Run, k: int, include_start: bool = False) -> tuple[stats.SwitchWindows, np.ndarray, np.ndarray]:
    """Quality over the first ``k`` labelled tasks after each true switch (segment change).

    Unlabelled tasks are skipped: a window covers the next ``k`` *labelled* tasks and still
    stops at the next switch (:func:`agent.stats.accuracy_after_switch`).

    Returns
    -------
    (SwitchWindows, positions, revisit)
        Window means and lengths, the switch positions in the run, and whether each switch
        enters a family seen in an earlier segment.
    """
    lab = np.flatnonzero(run.labelled)
    switches = run.segment_boundaries()
    if include_start and len(run):
        switches = np.r_[0, switches].astype(np.int64)
    # first labelled task at or after each switch; several switches may collapse into one
    at = np.searchsorted(lab, switches)
    keep = at < lab.size
    at, switches = at[keep], switches[keep]
    at, first = np.unique(at, return_index=True)
    switches = switches[first]
    fams = run.family
    revisit = np.array([fams[int(s)] is not None and fams[int(s)] in set(fams[: int(s)]) for s in switches], dtype=bool)
    res = stats.accuracy_after_switch(run.quality[lab], at, k)
    return res, switches, revisit


def _metric_runs(run: Run) -> list[tuple[str, Run]]:
    names = run.metric
    out = []
    for m in run.metric_names:
        mask = np.array([x == m for x in names], dtype=bool)
        out.append((m, run.select(mask) if not mask.all() else run))
    return out


def _summary_section(run: Run) -> Section:
    info = run.info
    n_lab = int(run.labelled.sum())
    restarts = info.get("restarts") or []
    rows = [
        ["run directory", str(run.path)],
        ["started", str(info.get("started", "unknown"))],
        ["meta-agent version", str(info.get("version", "unknown"))],
        ["stream", html.unescape(str(info.get("stream")))],
        ["seed", str(info.get("seed"))],
        ["tasks answered", str(len(run))],
        ["tasks with labels", f"{n_lab} ({100 * n_lab / max(len(run), 1):.1f}%)"],
        ["families (first-visit order)", ", ".join(map(str, run.families)) or "none annotated"],
        ["true task switches (segment changes)", str(run.segment_boundaries().size)],
        ["family switches", str(run.family_switches().size)],
        ["restarts", str(len(restarts))],
        ["re-answered task ids (last answer kept)", str(run.n_duplicates)],
        ["unreadable lines skipped", str(run.n_corrupt)],
        ["scores for unknown task ids", str(run.n_orphan_scores)],
    ]
    return Section("Run", tables=[Table(["", ""], rows)])


def _quality_tables(run: Run) -> list[Section]:
    pre = Section("Prequential quality")
    fam = Section("Quality per family")
    after = Section("Quality after a switch")
    rec = Section("Recovery on revisited families")
    if not run.labelled.any():
        for s in (pre, fam, after, rec):
            s.text.append(NO_LABELS)
        return [pre, fam, after, rec]
    pre_rows, fam_rows, after_rows, rec_rows = [], [], [], []
    if run.n_nonfinite_quality:
        pre.text.append(f"{run.n_nonfinite_quality} task(s) scored a non-finite quality (diverged: infinite MSE); "
                        "they are left out of every mean and interval below but counted in the failure rate.")
    for metric, r in _metric_runs(run):
        lab = r.labelled
        if not lab.any():
            pre_rows.append([metric, str(len(r)), "0", NO_LABELS, "", ""])
            continue
        q = r.quality[lab]
        failed = r.failed[lab]
        fk = failed[np.isfinite(failed)]
        fail = (f"{100 * fk.mean():.1f}% {_pct(stats.wilson_interval(int(fk.sum()), fk.size))}"
                if fk.size else "n/a")
        curve = stats.prequential(q)
        pre_rows.append([_metric_label(metric), str(len(r)), str(q.size), _ci(stats.mean_ci(q), metric),
                         _num(curve[-1], metric), fail])
        # per family, with first visit vs revisits (a revisit = a later segment of a family seen before)
        seg_first: dict = {}
        for i, (f, s) in enumerate(zip(r.family, r.segment)):
            seg_first.setdefault(f, s)
        for f in r.families:
            m = np.array([x == f for x in r.family]) & lab
            first_m = m & (r.segment == seg_first[f]) if np.isfinite(seg_first[f]) else m
            later = m & ~first_m
            cells = [str(f), _metric_label(metric), str(int(m.sum())), _ci(stats.mean_ci(r.quality[m]), metric)
                     if m.any() else "no labels"]
            cells.append(_ci(stats.mean_ci(r.quality[first_m]), metric) if first_m.any() else "n/a")
            cells.append(_ci(stats.mean_ci(r.quality[later]), metric) if later.any() else "not revisited")
            fam_rows.append(cells)
        if not r.families:
            fam.text.append(f"{_metric_label(metric)}: the stream has no family annotations (meta.family).")
        # windows after switches
        if r.segment_boundaries().size == 0:
            after.text.append(f"{_metric_label(metric)}: no true switches (segment annotations) in this run.")
        else:
            for k in SWITCH_KS:
                res, _, _ = switch_windows(r, k)
                if res.mean.size == 0:
                    continue
                trunc = int(np.count_nonzero(res.count < k))
                after_rows.append([_metric_label(metric), str(k), str(res.mean.size),
                                   _ci(stats.mean_ci(res.mean), metric), str(trunc)])
        # recovery: first visits vs revisits, including the stream's start as a first visit
        if r.families:
            for k in (5, 10):
                res, _, rev = switch_windows(r, k, include_start=True)
                if res.mean.size == 0:
                    continue
                first_v, re_v = res.mean[~rev], res.mean[rev]
                diff = "n/a"
                if first_v.size and re_v.size:
                    d = re_v.mean() - first_v.mean()
                    better = d > 0 if higher_is_better(metric) else d < 0
                    diff = f"{_num(d, metric)}{_diff_unit(metric)} ({'better' if better else 'worse'} on revisits)"
                rec_rows.append([_metric_label(metric), str(k),
                                 f"{_ci(stats.mean_ci(first_v), metric)} (n={first_v.size})" if first_v.size else "none",
                                 f"{_ci(stats.mean_ci(re_v), metric)} (n={re_v.size})" if re_v.size else "no revisits",
                                 diff])
    pre.tables.append(Table(["metric", "tasks", "labelled", "mean [95% CI]", "final prequential", "failure rate [Wilson 95%]"],
                            pre_rows, "Prequential = each task scored before the agent learns from it; the interval is a "
                                      "t-interval over tasks (tasks in a stream are dependent: treat it as optimistic; "
                                      "for publication use intervals over stream seeds)."))
    if fam_rows:
        fam.tables.append(Table(["family", "metric", "labelled", "mean [95% CI]", "first visit", "revisits"], fam_rows,
                                "First visit = the family's first segment; revisits = its later segments."))
    if after_rows:
        after.tables.append(Table(["metric", "k", "switches", "mean of the first k tasks [95% CI over switches]",
                                   "truncated windows"], after_rows,
                                  "A window stops at the next switch; truncated windows are shorter than k."))
    elif not after.text:
        after.text.append("No switch followed by labelled tasks.")
    if rec_rows:
        rec.tables.append(Table(["metric", "k", "first visits", "revisits", "revisits − first visits"], rec_rows,
                                "Mean quality over the first k labelled tasks after entering a family (the stream's "
                                "start counts as a first visit)."))
    elif not rec.text:
        rec.text.append("No family annotations: recovery on revisits cannot be measured.")
    return [pre, fam, after, rec]


def _compute_section(run: Run) -> Section:
    sec = Section("Compute per task")
    rows = []
    for name, v in (("budget units", run.budget_units), ("inner steps", run.inner_steps),
                    ("ensemble members", run.members)):
        v = v[np.isfinite(v)]
        if v.size:
            rows.append([name, str(v.size), _ci(stats.mean_ci(v)), _num(float(np.percentile(v, 50))),
                         _num(float(np.percentile(v, 95))), _num(float(v.max()))])
    if not rows:
        sec.text.append("No compute recorded.")
        return sec
    sec.tables.append(Table(["quantity", "tasks", "mean [95% CI]", "p50", "p95", "max"], rows))
    alg_rows = []
    algs = list(dict.fromkeys(str(a) for a in run.algorithm))
    for a in algs:
        m = np.array([str(x) == a for x in run.algorithm])
        u = run.budget_units[m & np.isfinite(run.budget_units)]
        lab = m & run.labelled
        qual = "no labels"
        if lab.any():
            metrics = {run.metric[i] for i in np.flatnonzero(lab)}
            qual = "; ".join(_ci(stats.mean_ci(run.quality[lab & np.array([x == mt for x in run.metric])]), mt)
                             + (f" ({mt})" if len(metrics) > 1 else "") for mt in sorted(metrics))
        alg_rows.append([a, str(int(m.sum())), f"{100 * m.mean():.1f}%",
                         _ci(stats.mean_ci(u)) if u.size else "n/a",
                         _num(float(np.percentile(u, 95))) if u.size else "n/a", qual])
    sec.tables.append(Table(["algorithm", "tasks", "share", "budget units: mean [95% CI]", "p95", "quality [95% CI]"],
                            alg_rows))
    return sec


def _failure_sections(run: Run, rng) -> tuple[Section, Section, dict]:
    rel = Section("Failure prediction: reliability")
    roc = Section("Failure prediction: ROC")
    m = np.isfinite(run.p_fail) & np.isfinite(run.failed)
    data: dict = {}
    if not np.isfinite(run.failed).any():
        for s in (rel, roc):
            s.text.append("No labels yet: failures are known only once labels arrive.")
        return rel, roc, data
    if not m.any():
        for s in (rel, roc):
            s.text.append("No failure predictions (p_fail) recorded.")
        return rel, roc, data
    p = np.clip(run.p_fail[m], 0.0, 1.0)
    y = run.failed[m]
    table = stats.reliability_table(p, y, n_bins=10)
    ece = stats.expected_calibration_error(p, y, n_bins=10)
    mce = stats.maximum_calibration_error(p, y, n_bins=10)
    brier = float(np.mean((p - y) ** 2))
    data["reliability"] = (table, ece, brier)
    rows = [[f"({lo:.1f}, {hi:.1f}]", str(int(c)), _num(mc) if c else "—",
             f"{100 * a:.1f}% {_pct(stats.wilson_interval(int(round(a * c)), int(c)))}" if c else "—"]
            for lo, hi, c, mc, a in zip(table.lower, table.upper, table.count, table.mean_confidence, table.accuracy)]
    rel.tables.append(Table(["p_fail bin", "tasks", "mean p_fail", "observed failure rate [Wilson 95%]"], rows))
    rel.text.append(f"{y.size} labelled tasks, failure rate {100 * y.mean():.1f}%. ECE (10 equal-width bins) "
                    f"{ece:.3f}, maximum calibration error {mce:.3f}, Brier score {brier:.4f} "
                    f"(always predicting the base rate gives {y.mean() * (1 - y.mean()):.4f}).")
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    if n_pos == 0 or n_neg == 0:
        roc.text.append(f"ROC needs both failures and successes; this run has {n_pos} failures and {n_neg} successes.")
        return rel, roc, data
    auc = roc_auc(p, y)
    ci = auc_interval(p, y, rng=rng)
    data["roc"] = (roc_curve(p, y), auc, ci)
    auc_txt = f"{auc:.3f} [{ci.low:.3f}, {ci.high:.3f}]" if ci else f"{auc:.3f} (too few failures for an interval)"
    roc.tables.append(Table(["failures", "successes", "AUC [95% BCa bootstrap CI]"], [[str(n_pos), str(n_neg), auc_txt]],
                            "AUC 0.5 = no better than chance; the interval resamples tasks (2000 resamples)."))
    return rel, roc, data


def _continual_section(run: Run) -> tuple[Section, ProbeMatrix | None]:
    sec = Section("Continual metrics (ACC, BWT, FWT, forgetting)")
    pm = probe_matrix(run)
    if isinstance(pm, str):
        sec.text.append(pm)
        return sec, None
    cm = pm.continual()
    m = pm.metric if pm.sign > 0 else ""
    per = {"ACC (final average)": cm.final, "BWT (backward transfer)": cm.bwt_per_family,
           "FWT (forward transfer)": cm.fwt_per_family, "forgetting": cm.forgetting_per_family}
    point = {"ACC (final average)": cm.acc, "BWT (backward transfer)": cm.bwt, "FWT (forward transfer)": cm.fwt,
             "forgetting": cm.forgetting}
    why = {"ACC (final average)": "no family visited before the final probe",
           "BWT (backward transfer)": "no family absence with a probe at both ends (probes.at_family: every)",
           "FWT (forward transfer)": "needs a baseline probe before any task and a probe before a family's first visit"
           if pm.baseline is not None else "needs a baseline probe at seq 0 (before any task)",
           "forgetting": "no family absence with a probe at both ends (probes.at_family: every)"}
    rows = []
    for name, v in per.items():
        v = v[np.isfinite(v)]
        if not v.size or not math.isfinite(point[name]):
            rows.append([name, "n/a", why[name]])
            continue
        acc = name.startswith("ACC")
        flip = -1.0 if (acc and pm.sign < 0) else 1.0  # ACC of a regression run is shown as the final MSE
        shown_metric = pm.metric if acc else m
        unit = _scale(shown_metric)[1] if acc else _diff_unit(m)
        ci = "one family: no interval"
        if v.size >= 2:
            iv = stats.mean_ci(v)
            lo, hi = sorted((flip * iv.low, flip * iv.high))
            ci = f"[{_num(lo, shown_metric)}, {_num(hi, shown_metric)}]{unit} over {v.size} families"
        rows.append([name, f"{_num(flip * point[name], shown_metric)}{unit}", ci])
    note = (f"{len(pm.seq)} probes (seq {int(pm.seq[0])} to {int(pm.seq[-1])}) of {len(pm.families)} families "
            f"({', '.join(pm.families)}). BWT_j = mean over family j's absences of (last probe before it returns, or "
            "the final probe) − (first probe after it left); forgetting_j = best earlier probe − final probe; "
            "FWT_j = last probe before j's first task − the baseline probe before any task. The stretch after a "
            "family's last visit counts only when a probe lies between it and the final probe (as GEM leaves out "
            "the task trained last). Intervals are t-intervals across families "
            "(wide with few families), not across seeds; pp = percentage points.")
    if pm.sign < 0:
        note += (f" ACC is the final {pm.metric.upper()} (lower is better); BWT, FWT and forgetting are computed on "
                 f"−{pm.metric.upper()}, so positive BWT/FWT mean improvement and positive forgetting means loss.")
    sec.tables.append(Table(["metric", "value", "95% CI"], rows, note))
    fam_rows = []
    for j, f in enumerate(pm.families):
        raw = lambda x: "-" if not math.isfinite(x) else _num(pm.sign * x if pm.sign < 0 else x, pm.metric)  # noqa: E731
        diff = lambda x: "-" if not math.isfinite(x) else _num(x, m)  # noqa: E731
        visits = "not visited" if not math.isfinite(pm.first[j]) else f"{int(pm.first[j])}–{int(pm.last[j])}"
        fam_rows.append([f, visits, str(int(cm.gaps[j])), raw(cm.final[j]), raw(cm.after_last_visit[j]), diff(cm.bwt_per_family[j]),
                         diff(cm.forgetting_per_family[j]), diff(cm.fwt_per_family[j])])
    sec.tables.append(Table(["family", "tasks (first–last seq)", "absences probed", f"final {_metric_label(pm.metric)}",
                             "after last visit", "BWT", "forgetting", "FWT"], fam_rows,
                            "Per family; '-' where undefined."))
    return sec, pm


def _boundary_section(run: Run, tolerance: float) -> Section:
    sec = Section("Boundary detection")
    true = run.segment_boundaries()
    if not run.has_detector:
        sec.text.append("No agent-detected boundaries recorded (the agent ran without a boundary detector, or the "
                        "run log has no `boundary` field).")
        return sec
    if not np.isfinite(run.segment).any():
        sec.text.append("The stream has no segment annotations: true boundaries are unknown.")
        return sec
    t_seq = run.seq[true]
    d_seq = run.seq[run.detected_boundaries()]
    b = stats.boundary_scores(t_seq, d_seq, tolerance)
    prec = f"{_num(b.precision, 'accuracy')}% {_pct(stats.wilson_interval(b.tp, b.tp + b.fp))}" if b.tp + b.fp else "n/a (no detections)"
    rec = f"{_num(b.recall, 'accuracy')}% {_pct(stats.wilson_interval(b.tp, b.tp + b.fn))}" if b.tp + b.fn else "n/a (no true switches)"
    delays = b.delays[np.isfinite(b.delays)]
    delay = _ci(stats.mean_ci(delays)) + " tasks" if delays.size else "n/a (nothing detected in time)"
    sec.tables.append(Table(
        ["true switches", "detections", "TP", "FP", "FN", "precision [Wilson 95%]", "recall [Wilson 95%]", "F1",
         "mean delay [95% CI]"],
        [[str(t_seq.size), str(d_seq.size), str(b.tp), str(b.fp), str(b.fn), prec, rec,
          _num(b.f1), delay]],
        f"A switch counts as detected by the first alarm at most {tolerance:g} tasks after it (and before the next "
        "switch); true switches are segment changes (new task, same family included)."))
    return sec


def _latency_section(run: Run) -> Section:
    sec = Section("Latency")
    v = run.latency_ms[np.isfinite(run.latency_ms)]
    if not v.size:
        sec.text.append("No latencies recorded.")
        return sec
    p50, p95, p99 = np.percentile(v, [50, 95, 99])
    sec.tables.append(Table(["tasks", "mean [95% CI] (ms)", "p50 (ms)", "p95 (ms)", "p99 (ms)", "max (ms)"],
                            [[str(v.size), _ci(stats.mean_ci(v)), _num(p50), _num(p95), _num(p99), _num(v.max())]],
                            "Latency = wall time from receipt of the task to its answer."))
    return sec


def _eval_section(paths: Sequence[Path]) -> Section:
    sec = Section("Offline evaluation")
    if not paths:
        sec.text.append("No offline evaluation directories (episodes.jsonl) in this run.")
        return sec
    for p in paths:
        rows_in, summary = load_episodes(p)
        if not rows_in:
            sec.text.append(f"{p}: no episodes.")
            continue
        keys = [k for k in rows_in[0] if k != "episode"]
        rows = []
        for k in keys:
            v = np.array([float(r[k]) if r.get(k) is not None else math.nan for r in rows_in])
            if not np.isfinite(v).any():
                continue
            r = stats.mean_ci(v, nan_policy="omit")
            extra = f" ({r.n_omitted} non-finite omitted)" if r.n_omitted else ""
            rows.append([k, str(r.n), _ci(r, k) + extra, f"± {_num(r.half_width, k)}{_scale(k)[1]}"])
        head = ", ".join(f"{k}={summary[k]}" for k in ("kind", "episodes") if k in summary)
        sec.tables.append(Table(["metric@inner steps", "episodes", "mean [95% CI]", "half-width"], rows,
                                f"{p}" + (f" ({head})" if head else "") + "; t-interval over episodes."))
    return sec


# --------------------------------------------------------------------------------------------
# Plotting (matplotlib Figure objects with the Agg canvas; nothing global is touched)
# --------------------------------------------------------------------------------------------


def _figure(width: float = 9.0, height: float = 3.8, nrows: int = 1, ncols: int = 1, **kw):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _family_spans(ax, run: Run, colours: Mapping[str, str], *, label: bool = True) -> list:
    """Shade each family's stretch of the stream and draw switch markers; returns legend handles."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = []
    if not run.families:
        return handles
    x = run.seq
    fam = run.family
    start = 0
    for i in range(1, len(fam) + 1):
        if i == len(fam) or fam[i] != fam[start]:
            if fam[start] is not None:
                right = x[i] if i < len(fam) else x[-1] + 1
                ax.axvspan(x[start], right, color=colours[fam[start]], alpha=0.13, lw=0)
            start = i
    for i in run.family_switches():
        ax.axvline(x[i], color="0.25", lw=1.0, zorder=1)
    fs = set(run.family_switches().tolist())
    same = [i for i in run.segment_boundaries() if i not in fs]
    for i in same:
        ax.axvline(x[i], color="0.5", lw=0.8, ls=":", zorder=1)
    if label:
        handles += [Patch(color=colours[f], alpha=0.35, label=f"family: {f}") for f in run.families]
        if fs:
            handles.append(Line2D([], [], color="0.25", lw=1.0, label="family switch"))
        if same:
            handles.append(Line2D([], [], color="0.5", lw=0.8, ls=":", label="task switch, same family"))
    return handles


def _colours(run: Run) -> dict:
    return {f: _FAMILY_COLOURS[i % len(_FAMILY_COLOURS)] for i, f in enumerate(run.families)}


def plot_quality(run: Run, window: int | None = None):
    """Rolling and prequential quality over the stream, family switches marked."""
    from matplotlib.lines import Line2D

    groups = [(m, r) for m, r in _metric_runs(run) if r.labelled.any()]
    fig, axes = _figure(10.0, 3.6 * len(groups), nrows=len(groups), sharex=True)
    colours = _colours(run)
    for ax, (metric, r) in zip(axes[:, 0], groups):
        lab = r.labelled
        x, q = r.seq[lab], r.quality[lab]
        s, unit = _scale(metric)
        w = window or max(5, min(50, q.size // 40))
        handles = _family_spans(ax, r, colours)
        ax.plot(x, q * s, ".", ms=2.5, color="0.55", alpha=0.5, zorder=2)
        ax.plot(x, rolling_mean(q, w) * s, color="#1f3b73", lw=1.6, zorder=3)
        ax.plot(x, stats.prequential(q) * s, color="#c0392b", lw=1.2, ls="--", zorder=3)
        handles = [Line2D([], [], color="0.55", marker=".", ls="", label="per task"),
                   Line2D([], [], color="#1f3b73", lw=1.6, label=f"rolling mean ({w} tasks)"),
                   Line2D([], [], color="#c0392b", lw=1.2, ls="--", label="prequential (cumulative)")] + handles
        det = r.detected_boundaries()
        if det.size:
            ax.plot(r.seq[det], np.full(det.size, 1.0), "v", color="#d62728", ms=6, clip_on=False,
                    transform=ax.get_xaxis_transform(), zorder=4)
            handles.append(Line2D([], [], color="#d62728", marker="v", ls="", label="agent-detected boundary"))
        if metric == "mse" and np.all(q > 0) and q.max() / max(q.min(), 1e-12) > 50:
            ax.set_yscale("log")
        ax.set_ylabel(("accuracy (%)" if unit else "MSE (lower is better)"))
        ax.set_title(f"{'Accuracy' if unit else 'MSE'} over the stream", pad=12)
        ax.set_xlim(r.seq[0] - 0.5, r.seq[-1] + 1)
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
        ax.grid(alpha=0.25)
    axes[-1, 0].set_xlabel("task index in the stream (seq)")
    return fig


def plot_compute_quality(run: Run):
    """Quality against compute: each task (jittered) and the mean ± 95% CI per budget level."""
    groups = [(m, r) for m, r in _metric_runs(run) if (r.labelled & np.isfinite(r.budget_units)).any()]
    fig, axes = _figure(7.5 * len(groups), 4.0, ncols=len(groups))
    gen = np.random.default_rng(0)
    for ax, (metric, r) in zip(axes[0], groups):
        m = r.labelled & np.isfinite(r.budget_units)
        u, q = r.budget_units[m], r.quality[m]
        s, unit = _scale(metric)
        algs = [str(a) for a, keep in zip(r.algorithm, m) if keep]
        names = list(dict.fromkeys(algs))
        levels = np.unique(u)
        span = np.ptp(levels) if levels.size > 1 else 1.0
        jitter = gen.uniform(-0.012, 0.012, u.size) * span
        for j, a in enumerate(names):
            k = np.array([x == a for x in algs])
            ax.scatter(u[k] + jitter[k], q[k] * s, s=7, alpha=0.3, color=_FAMILY_COLOURS[(j + 3) % 10], label=f"{a}: tasks")
        if levels.size > 12:  # bin by quantiles of compute
            edges = np.unique(np.quantile(u, np.linspace(0, 1, 9)))
            bin_of = np.clip(np.searchsorted(edges, u, side="right") - 1, 0, edges.size - 2)
        else:
            bin_of = np.searchsorted(levels, u)
        for j, a in enumerate(names):
            k = np.array([x == a for x in algs])
            xs, ms, hws = [], [], []
            for b in np.unique(bin_of[k]):
                v = q[k & (bin_of == b)]
                c = stats.mean_ci(v)
                xs.append(float(np.mean(u[k & (bin_of == b)])))
                ms.append(c.mean * s)
                hws.append(c.half_width * s if math.isfinite(c.half_width) else 0.0)
            ax.errorbar(xs, ms, yerr=hws, fmt="o", color=_FAMILY_COLOURS[(j + 3) % 10], mec="k", ms=7, capsize=4,
                        ecolor="k", lw=1.3, label=f"{a}: mean ± 95% CI")
        ax.set_xlabel("compute per task (budget units)")
        ax.set_ylabel("accuracy (%)" if unit else "MSE (lower is better)")
        if metric == "mse" and np.all(q > 0) and q.max() / max(q.min(), 1e-12) > 50:
            ax.set_yscale("log")
        ax.set_title(f"Compute vs {'accuracy' if unit else 'MSE'}")
        ax.legend(fontsize=8, loc="best")
        ax.grid(alpha=0.25)
    return fig


def plot_reliability(table: stats.ReliabilityTable, ece: float, brier: float):
    """Reliability diagram of the failure predictor: predicted p_fail vs observed failure rate."""
    fig, axes = _figure(5.6, 5.4, nrows=2, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax, hx = axes[0, 0], axes[1, 0]
    ok = table.count > 0
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1, label="perfect calibration")
    lo, hi = zip(*(stats.wilson_interval(int(round(a * c)), int(c)) for a, c in
                   zip(table.accuracy[ok], table.count[ok]))) if ok.any() else ((), ())
    acc = table.accuracy[ok]
    ax.errorbar(table.mean_confidence[ok], acc, yerr=[acc - np.array(lo), np.array(hi) - acc], fmt="o-",
                color="#1f3b73", capsize=3, ms=5, label="observed (Wilson 95%)")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("observed failure rate")
    ax.set_title(f"Failure predictor reliability (ECE {ece:.3f}, Brier {brier:.3f})")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.25)
    widths = table.upper - table.lower
    hx.bar(table.lower, table.count, width=widths, align="edge", color="0.6", edgecolor="white")
    hx.set_xlabel("predicted probability of failure (p_fail)")
    hx.set_ylabel("tasks")
    return fig


def plot_roc(curve, auc: float, ci) -> Any:
    """ROC curve of the failure predictor with AUC and its interval."""
    fpr, tpr, _ = curve
    fig, axes = _figure(5.0, 4.8)
    ax = axes[0, 0]
    label = f"p_fail (AUC {auc:.3f}" + (f", 95% CI [{ci.low:.3f}, {ci.high:.3f}])" if ci else ")")
    ax.plot(fpr, tpr, color="#1f3b73", lw=1.8, drawstyle="default", label=label)
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1, label="chance (AUC 0.5)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (successes flagged)")
    ax.set_ylabel("true positive rate (failures caught)")
    ax.set_title("Failure predictor ROC")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.25)
    return fig


def plot_algorithm_mix(run: Run, window: int | None = None):
    """Share of each algorithm in consecutive windows of the stream (stacked)."""
    w = window or max(5, len(run) // 30)
    starts, names, shares = window_shares(run.algorithm, w)
    fig, axes = _figure(10.0, 3.4)
    ax = axes[0, 0]
    left = run.seq[starts]
    right = np.r_[run.seq[starts[1:]], run.seq[-1] + 1]
    bottom = np.zeros(starts.size)
    for j, name in enumerate(names):
        ax.bar(left, 100 * shares[:, j], width=right - left, bottom=bottom, align="edge", label=name,
               color=_FAMILY_COLOURS[(j + 3) % 10], edgecolor="white", linewidth=0.3)
        bottom += 100 * shares[:, j]
    for i in run.family_switches():
        ax.axvline(run.seq[i], color="0.15", lw=0.9, ls="--")
    ax.set_ylim(0, 100)
    ax.set_xlim(run.seq[0], run.seq[-1] + 1)
    ax.set_xlabel("task index in the stream (seq)")
    ax.set_ylabel(f"share of tasks (%)\nper window of {w} tasks")
    ax.set_title("Algorithm mix over time" + (" (dashed: family switches)" if run.family_switches().size else ""))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, title="algorithm")
    return fig


def plot_memory(run: Run):
    """Memory entries at each probe."""
    pts = [(p.get("seq") if p.get("seq") is not None else p.get("step"), p["memory"]) for p in run.probes
           if p.get("memory") is not None]
    fig, axes = _figure(7.5, 3.4)
    ax = axes[0, 0]
    x, y = np.array(pts, dtype=float).T
    ax.step(x, y, where="post", color="#1f3b73", lw=1.6)
    ax.plot(x, y, "o", color="#1f3b73", ms=3)
    for i in run.family_switches():
        ax.axvline(run.seq[i], color="0.6", lw=0.8, ls="--")
    by_seq = all(p.get("seq") is not None for p in run.probes if p.get("memory") is not None)
    ax.set_xlabel("task index in the stream (seq)" if by_seq else "probe step")
    ax.set_ylabel("memory entries")
    ax.set_title("Memory growth" + (" (dashed: family switches)" if run.family_switches().size else ""))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.25)
    return fig


def plot_latency(run: Run):
    """Latency histogram with p50, p95 and p99 marked."""
    v = run.latency_ms[np.isfinite(run.latency_ms)]
    fig, axes = _figure(7.5, 3.6)
    ax = axes[0, 0]
    pos = v[v > 0]
    log = pos.size == v.size and v.size > 1 and v.max() / max(v.min(), 1e-9) > 30
    bins = np.geomspace(pos.min(), pos.max(), 40) if log else 40
    ax.hist(v, bins=bins, color="0.6", edgecolor="white")
    if log:
        ax.set_xscale("log")
    for q, c, ls in ((50, "#1f3b73", "-"), (95, "#e67e22", "--"), (99, "#c0392b", ":")):
        val = float(np.percentile(v, q))
        ax.axvline(val, color=c, ls=ls, lw=1.6, label=f"p{q} = {_num(val)} ms")
    ax.set_xlabel("latency per task (ms)" + (", log scale" if log else ""))
    ax.set_ylabel("tasks")
    ax.set_title("Latency distribution")
    ax.legend(fontsize=8)
    return fig


def plot_probe_matrix(pm: ProbeMatrix, run: Run | None = None):
    """The probe matrix over the stream: one line per family (rows of ``R``), baseline at 0."""
    fig, axes = _figure(9.0, 3.8)
    ax = axes[0, 0]
    s, _unit = _scale(pm.metric)
    colours = _colours(run) if run is not None else {}
    handles = _family_spans(ax, run, colours, label=False) if run is not None else []
    for j, f in enumerate(pm.families):
        c = colours.get(f, _FAMILY_COLOURS[j % len(_FAMILY_COLOURS)])
        x, y = pm.seq, pm.sign * pm.R[:, j] * s
        if pm.baseline is not None and math.isfinite(pm.baseline[j]):
            x, y = np.r_[0.0, x], np.r_[pm.sign * pm.baseline[j] * s, y]
        ok = np.isfinite(y)
        handles += ax.plot(x[ok], y[ok], "o-", color=c, lw=1.5, ms=3.5, label=f"probe: {f}")
    ax.set_xlabel("task index in the stream (seq)")
    ax.set_ylabel(_metric_label(pm.metric))
    ax.set_title("Probes of each family over the stream (rows of R; shading: family in play)")
    ax.grid(alpha=0.25)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return fig


# --------------------------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------------------------


def build_sections(run: Run | None, *, eval_dirs: Sequence[Path] = (), tolerance: float = 10.0,
                   window: int | None = None, rng=0, figures: bool = True) -> list[Section]:
    """Every report section for ``run`` (``None`` for an offline-evaluation-only report).

    Parameters
    ----------
    run : Run or None
    eval_dirs : sequence of Path
        Offline evaluation directories to summarise.
    tolerance : float
        Largest delay (in tasks) for a detected boundary to count.
    window : int, optional
        Rolling-mean window (default: about 1/40 of the labelled tasks, 5 to 50).
    rng : seed for the AUC bootstrap (the report is reproducible).
    figures : bool
        Build the matplotlib figures (False: tables only).
    """
    by_title: dict[str, Section] = {t: Section(t) for t in SECTION_TITLES}
    if run is None:
        for t in SECTION_TITLES[:-1]:
            by_title[t].text.append("Not a streaming run directory: only offline evaluation results are reported.")
        by_title["Offline evaluation"] = _eval_section(eval_dirs)
        return list(by_title.values())
    if len(run) == 0:
        by_title["Run"] = _summary_section(run)
        for t in SECTION_TITLES[1:-1]:
            by_title[t].text.append("No tasks answered yet.")
        by_title["Offline evaluation"] = _eval_section(eval_dirs)
        return list(by_title.values())
    by_title["Run"] = _summary_section(run)
    qual = by_title["Quality over the stream"]
    if run.labelled.any():
        if figures:
            qual.figures["quality"] = plot_quality(run, window)
        qual.text.append("Shaded: the family in play (evaluation-only annotation); solid lines: family switches; "
                         "dotted: task switches within a family; red triangles: boundaries the agent detected.")
    else:
        qual.text.append(NO_LABELS)
    for s in _quality_tables(run):
        by_title[s.title] = s
    cq = by_title["Compute vs quality"]
    if (run.labelled & np.isfinite(run.budget_units)).any():
        if figures:
            cq.figures["compute_quality"] = plot_compute_quality(run)
    else:
        cq.text.append(NO_LABELS if not run.labelled.any() else "No compute (budget units) recorded.")
    by_title["Compute per task"] = _compute_section(run)
    rel, roc, fdata = _failure_sections(run, rng)
    if figures and "reliability" in fdata:
        rel.figures["reliability"] = plot_reliability(*fdata["reliability"])
    if figures and "roc" in fdata:
        roc.figures["roc"] = plot_roc(*fdata["roc"])
    by_title[rel.title], by_title[roc.title] = rel, roc
    mix = by_title["Algorithm mix over time"]
    algs = set(map(str, run.algorithm))
    if figures:
        mix.figures["algorithm_mix"] = plot_algorithm_mix(run)
    if len(algs) == 1:
        mix.text.append(f"One algorithm throughout: {next(iter(algs))}.")
    cont, pm = _continual_section(run)
    if figures and pm is not None:
        cont.figures["probe_matrix"] = plot_probe_matrix(pm, run)
    by_title[cont.title] = cont
    mem = by_title["Memory growth"]
    if any(p.get("memory") is not None for p in run.probes):
        if figures:
            mem.figures["memory"] = plot_memory(run)
        last = [p["memory"] for p in run.probes if p.get("memory") is not None][-1]
        mem.text.append(f"Memory entries at the last probe: {last}.")
    else:
        mem.text.append("No probes with a memory size recorded.")
    by_title["Boundary detection"] = _boundary_section(run, tolerance)
    lat = _latency_section(run)
    if figures and not lat.text:
        lat.figures["latency"] = plot_latency(run)
    by_title["Latency"] = lat
    by_title["Offline evaluation"] = _eval_section(eval_dirs)
    return list(by_title.values())


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1150px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;border-bottom:2px solid #1f3b73;padding-bottom:.3em}
h2{font-size:1.2em;margin-top:2em;color:#1f3b73}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#eef2f8}
tr:nth-child(even) td{background:#fafafa}
p.note{font-size:.85em;color:#555;margin-top:0}
img{max-width:100%;display:block;margin:.5em 0;border:1px solid #eee}
nav a{margin-right:.8em;font-size:.85em}
"""


def _slug(title: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")


def _render(sections: Sequence[Section], title: str, images: Mapping[str, str], generated: str) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>", f"<p class='note'>{html.escape(generated)}</p>", "<nav>"]
    out += [f'<a href="#{_slug(s.title)}">{html.escape(s.title)}</a>' for s in sections]
    out.append("</nav>")
    for s in sections:
        out.append(f'<h2 id="{_slug(s.title)}">{html.escape(s.title)}</h2>')
        for name in s.figures:
            out.append(f'<img alt="{html.escape(s.title)}" src="data:image/png;base64,{images[name]}">')
        for t in s.text:
            out.append(f"<p>{html.escape(t)}</p>")
        for t in s.tables:
            out.append("<table>")
            if any(t.columns):
                out.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in t.columns) + "</tr>")
            for row in t.rows:
                out.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>")
            out.append("</table>")
            if t.note:
                out.append(f"<p class='note'>{html.escape(t.note)}</p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def build_report(run_dir: str | Path, out: str | Path | None = None, *, tolerance: float = 10.0,
                 window: int | None = None) -> Path:
    """Write the HTML report of a run directory (or an offline evaluation directory).

    Parameters
    ----------
    run_dir : str or Path
        A run directory (``outcomes.jsonl``, ``probes.jsonl``, ``run.json``); evaluation
        directories (``episodes.jsonl``) inside it, or ``run_dir`` itself being one, are
        reported in "Offline evaluation".
    out : str or Path, optional
        The HTML file (default ``RUN_DIR/report.html``). The PNGs are also written to
        ``<out stem>_files/`` beside it.
    tolerance : float
        Boundary-detection tolerance in tasks.
    window : int, optional
        Rolling-mean window for the quality plot.

    Returns
    -------
    Path
        The HTML file.

    Raises
    ------
    FileNotFoundError
        If ``run_dir`` is neither a run directory nor an evaluation directory.
    """
    import datetime as dt

    from agent import __version__

    src = Path(run_dir)
    evals = list(iter_eval_dirs(src))
    if not is_run_dir(src) and not evals:
        raise FileNotFoundError(f"{src} is neither a run directory (outcomes.jsonl, run.json) nor an evaluation "
                                "directory (episodes.jsonl)")
    run = load_run(src) if is_run_dir(src) else None
    sections = build_sections(run, eval_dirs=evals, tolerance=tolerance, window=window)
    out_path = Path(out) if out is not None else src / "report.html"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    files = out_path.with_name(out_path.stem + "_files")
    images: dict[str, str] = {}
    for s in sections:
        for name, fig in s.figures.items():
            buf = io.BytesIO()
            fig.savefig(buf, format="png")
            data = buf.getvalue()
            files.mkdir(exist_ok=True)
            (files / f"{name}.png").write_bytes(data)
            images[name] = base64.b64encode(data).decode("ascii")
    generated = (f"Generated {dt.datetime.now().astimezone().isoformat(timespec='seconds')} by meta-agent "
                 f"{__version__} from {src.resolve()}")
    out_path.write_text(_render(sections, f"meta-agent report: {src.resolve().name}", images, generated),
                        encoding="utf-8")
    return out_path


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------


@dataclass
class PairedResult:
    """Paired comparison of B against A on one scope (all shared tasks, or one family)."""

    scope: str
    metric: str
    n: int
    mean_a: float
    mean_b: float
    difference: float  # mean(B - A), in the metric's units
    low: float
    high: float
    t_pvalue: float
    wilcoxon_pvalue: float
    cohens_dz: float
    rank_biserial: float
    holm_pvalue: float = math.nan
    identical: bool = False

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2.0

    @property
    def b_better(self) -> bool:
        """Whether the point estimate favours B (higher accuracy, lower MSE)."""
        return self.difference > 0 if higher_is_better(self.metric) else self.difference < 0


def _paired(scope: str, metric: str, a: np.ndarray, b: np.ndarray, confidence: float) -> PairedResult:
    d = b - a
    identical = bool(np.all(d == 0))
    if a.size < 2:
        return PairedResult(scope, metric, a.size, float(a.mean()), float(b.mean()), float(d.mean()),
                            -math.inf, math.inf, math.nan, math.nan, math.nan, math.nan, identical=identical)
    t = stats.paired_t_test(b, a, confidence=confidence)
    w = stats.wilcoxon_signed_rank(b, a)
    return PairedResult(scope, metric, int(a.size), float(a.mean()), float(b.mean()), t.mean_difference, t.low, t.high,
                        t.pvalue, w.pvalue, t.cohens_dz, w.rank_biserial, identical=identical)


@dataclass
class Comparison:
    """Result of :func:`compare_runs`: B compared with A on their shared tasks."""

    name_a: str
    name_b: str
    n_a: int
    n_b: int
    overall: list[PairedResult]
    per_family: list[PairedResult]
    alpha: float = 0.05
    confidence: float = 0.95

    @property
    def n_shared(self) -> int:
        return sum(r.n for r in self.overall)

    def _sentence(self, r: PairedResult) -> str:
        s, unit = _scale(r.metric)
        units = "points" if unit else r.metric.upper()
        lower = "" if higher_is_better(r.metric) else f" ({r.metric.upper()}: lower is better)"
        if r.identical:
            return (f"No significant difference: B − A = 0.0 {units} on {r.n} shared tasks "
                    f"(identical on every task){lower}.")
        if r.n < 2:
            return f"Too few shared labelled tasks ({r.n}) to test{lower}."
        size, hw = _magnitude(abs(r.difference) * s), _magnitude(r.half_width * s)
        ci = f"{int(round(self.confidence * 100))}% CI of B − A [{_num(r.low, r.metric)}, {_num(r.high, r.metric)}]"
        tests = f"paired t-test {_p(r.t_pvalue)}, Wilcoxon {_p(r.wilcoxon_pvalue)}, n={r.n} shared tasks"
        sig = math.isfinite(r.t_pvalue) and r.t_pvalue < self.alpha
        if not sig:
            return (f"No significant difference: B − A = {'−' if r.difference < 0 else ''}{size} ± {hw} {units} "
                    f"({tests}; {ci}){lower}.")
        who = "B" if r.b_better else "A"
        note = ""
        if not (math.isfinite(r.wilcoxon_pvalue) and r.wilcoxon_pvalue < self.alpha):
            note = "; the Wilcoxon test does not confirm it"
        return f"{who} better by {size} ± {hw} {units}, {_p(r.t_pvalue)} ({tests}; {ci}{note}){lower}."

    def verdict(self) -> str:
        """Plain-language verdict, one sentence per quality metric, from the paired t-test at ``alpha``."""
        return " ".join(self._sentence(r) for r in self.overall)

    def to_text(self) -> str:
        """The verdict, then a table of every scope (overall and per family, Holm-adjusted)."""
        lines = [f"A: {self.name_a} ({self.n_a} labelled tasks)", f"B: {self.name_b} ({self.n_b} labelled tasks)",
                 "", self.verdict(), ""]
        head = f"{'scope':<18} {'metric':<9} {'n':>5} {'mean A':>9} {'mean B':>9} {'B − A':>9} {'95% CI':>20} " \
               f"{'t p':>8} {'Wilcoxon p':>10} {'Holm p':>8} {'d_z':>6}"
        lines.append(head)
        for r in self.overall + self.per_family:
            ci = f"[{_num(r.low, r.metric)}, {_num(r.high, r.metric)}]"
            lines.append(f"{r.scope[:18]:<18} {r.metric:<9} {r.n:>5} {_num(r.mean_a, r.metric):>9} "
                         f"{_num(r.mean_b, r.metric):>9} {_num(r.difference, r.metric):>9} {ci:>20} "
                         f"{_fmtp(r.t_pvalue):>8} {_fmtp(r.wilcoxon_pvalue):>10} {_fmtp(r.holm_pvalue):>8} "
                         f"{_num(r.cohens_dz):>6}")
        if self.per_family:
            lines.append("Holm p: per-family t-test p-values adjusted with Holm's method across families "
                         "(a family with no difference at all counts as p = 1).")
        lines.append("Accuracy in percent (differences in percentage points); MSE: lower is better.")
        return "\n".join(lines)


def _magnitude(v: float) -> str:
    """A non-negative effect size for a sentence: one decimal, or two significant digits below 0.1."""
    if not math.isfinite(v):
        return "∞"
    return f"{v:.1f}" if v >= 0.1 or v == 0 else f"{v:.2g}"


def _fmtp(p: float) -> str:
    if p is None or not math.isfinite(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _paired_source(path: Path) -> tuple[dict[str, tuple[float, str, Any]], str]:
    """Task id -> (quality, metric, family) of a run's labelled tasks or an eval dir's episodes."""
    if is_run_dir(path):
        run = load_run(path)
        lab = run.labelled
        return ({run.ids[i]: (float(run.quality[i]), run.metric[i], run.family[i]) for i in np.flatnonzero(lab)},
                "run")
    if is_eval_dir(path):
        rows, _ = load_episodes(path)
        if not rows:
            return {}, "eval"
        keys = [k for k in rows[0] if "@" in k and not k.startswith("loss")]
        main = max(keys, key=lambda k: int(k.split("@")[1])) if keys else None
        if main is None:
            return {}, "eval"
        metric = main.split("@")[0]
        out = {f"episode-{r['episode']}": (float(r[main]), metric, None) for r in rows
               if r.get(main) is not None and math.isfinite(float(r[main]))}
        return out, "eval"
    raise FileNotFoundError(f"{path} is neither a run directory nor an evaluation directory")


def compare_runs(a: str | Path, b: str | Path, *, confidence: float = 0.95, alpha: float = 0.05) -> Comparison:
    """Paired comparison of run B against run A on the task ids both scored.

    Pairs are the tasks (same id) labelled in both runs; runs of the same stream preset and
    seed share ids. Offline evaluation directories pair by episode index (same eval seed),
    using the main metric after the most inner steps. For each quality metric: paired t-test
    (interval for ``mean(B − A)``) and Wilcoxon signed-rank test (:mod:`agent.stats`), and the
    same per family with Holm-adjusted p-values when the tasks carry families.

    Parameters
    ----------
    a, b : str or Path
        Run directories (or evaluation directories).
    confidence : float
        Level of the interval for the difference.
    alpha : float
        Significance level of the verdict (paired t-test).

    Returns
    -------
    Comparison
        With :meth:`Comparison.verdict` and :meth:`Comparison.to_text`.

    Raises
    ------
    ValueError
        If the runs share no labelled task id.
    """
    qa, _ = _paired_source(Path(a))
    qb, _ = _paired_source(Path(b))
    shared = [k for k in qa if k in qb and qa[k][1] == qb[k][1]]
    if not shared:
        raise ValueError(
            f"no shared labelled task ids between A ({len(qa)} labelled tasks) and B ({len(qb)}): a paired "
            "comparison needs the same tasks in both runs (same stream preset and seed, or the same eval seed)")
    overall, per_family = [], []
    metrics = list(dict.fromkeys(qa[k][1] for k in shared))
    for m in metrics:
        ids = [k for k in shared if qa[k][1] == m]
        va = np.array([qa[k][0] for k in ids])
        vb = np.array([qb[k][0] for k in ids])
        overall.append(_paired("all shared tasks", m, va, vb, confidence))
        fams = list(dict.fromkeys(qa[k][2] for k in ids if qa[k][2] is not None))
        rows = []
        for f in fams:
            sel = np.array([qa[k][2] == f for k in ids])
            if sel.sum() >= 2:
                rows.append(_paired(str(f), m, va[sel], vb[sel], confidence))
        if len(rows) >= 2:
            p = np.array([r.t_pvalue if math.isfinite(r.t_pvalue) else 1.0 for r in rows])
            for r, adj in zip(rows, stats.holm(p)):
                r.holm_pvalue = float(adj)
        per_family += rows
    return Comparison(str(a), str(b), len(qa), len(qb), overall, per_family, alpha, confidence)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _fail(message: str) -> int:
    from agent.cli import EXIT_FAIL, PROG

    print(f"{PROG}: error: {message}", file=sys.stderr)
    return EXIT_FAIL


def cmd_report(args: argparse.Namespace) -> int:
    """``meta-agent report RUN_DIR [--out FILE.html]``."""
    try:
        path = build_report(args.run_dir, args.out, tolerance=args.tolerance, window=args.window)
    except (FileNotFoundError, ValueError) as e:
        return _fail(str(e))
    print(f"report: {path} (plots in {path.with_name(path.stem + '_files')})")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """``meta-agent compare RUN_A RUN_B``."""
    try:
        c = compare_runs(args.run_a, args.run_b, alpha=args.alpha)
    except (FileNotFoundError, ValueError) as e:
        return _fail(str(e))
    print(c.to_text())
    return 0
