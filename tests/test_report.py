"""Reports and run comparison on synthetic run directories with planted switches and a known better run."""

import base64
import doctest
import json
import math
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from agent import report, runlog
from agent.report import SECTION_TITLES, build_report, compare_runs
from agent.runlog import RunLogWriter, load_run

FAMILIES = ("sine", "square", "saw")
SCHEDULE = (0, 1, 0, 2, 1, 0, 2, 1)  # family per segment: recurring families
SEG_LEN = 50


def fake_run(path, *, shift=0.0, seed=0, n_tasks=400, delayed_share=0.3, detector=True, probes=True,
             kind="classification", agent_seed=None):
    """A run whose quality drops at every switch and recovers; ``shift`` is added to every task's
    quality (so a run with ``shift > 0`` is better by exactly that on every shared task, up to
    independent noise of sd 0.02)."""
    task_rng = np.random.default_rng(seed)  # the stream: same for every run with this seed
    run_rng = np.random.default_rng([seed, int(shift * 1000) + 7 if agent_seed is None else agent_seed])  # the agent's own noise
    pending = []
    with RunLogWriter(path, config={"agent": {"arms": 2}, "seed": seed}, stream={"preset": "fake", "n_tasks": n_tasks},
                      seed=seed) as log:
        if probes:
            log.write_probe(0, {f: 0.2 for f in FAMILIES}, seq=0, memory=0)
        for i in range(n_tasks):
            seg = i // SEG_LEN
            fam = FAMILIES[SCHEDULE[seg % len(SCHEDULE)]]
            t = i - seg * SEG_LEN
            revisit = FAMILIES.index(fam) in [SCHEDULE[s % len(SCHEDULE)] for s in range(seg)]
            drop = 0.25 if revisit else 0.45
            base = 0.85 - drop * math.exp(-t / (3.0 if revisit else 8.0))
            q = float(np.clip(base + task_rng.normal(0, 0.05) + shift + run_rng.normal(0, 0.02), 0, 1))
            if kind == "regression":
                q = float(0.05 + (1 - q) ** 2)
            failed = (q < 0.6) if kind == "classification" else (q > 0.16)
            p_fail = float(np.clip(1 / (1 + math.exp(-(0.6 - base) * 12)) + run_rng.normal(0, 0.08), 0, 1))
            early = t < 10
            alg = "maml" if (early and i > 100) else "protonet"
            steps = int(10 if early else 2) + int(run_rng.integers(0, 2))
            members = 3 if (early and i > 100) else 1
            boundary = None
            if detector:
                boundary = bool((t == 2 and run_rng.random() < 0.8) or run_rng.random() < 0.01)
            outcome = {"id": f"task-{i}", "algorithm": alg, "budget": {"steps": steps, "members": members},
                       "inner_steps": steps * members, "p_fail": p_fail, "flags": ["ensemble"] if members > 1 else [],
                       "latency_ms": float(run_rng.lognormal(math.log(4 + 2 * steps), 0.3))}
            delayed = task_rng.random() < delayed_share
            log.write_outcome(outcome, seq=i, meta={"family": fam, "segment": seg}, kind=kind, boundary=boundary,
                              **({} if delayed else {"quality": q, "failed": failed}))
            if delayed:
                pending.append((f"task-{i}", q, failed))
            if len(pending) > 5 or (pending and i == n_tasks - 1):
                while pending:
                    log.write_score(*pending.pop(0))
            if probes and (i + 1) % 25 == 0:
                scores = {}
                for f in FAMILIES:
                    seen = f in {FAMILIES[SCHEDULE[s % len(SCHEDULE)]] for s in range(seg + 1)}
                    scores[f] = round(0.8 - (0.1 if f != fam else 0.0) if seen else 0.25 + 0.05 * shift, 3)
                log.write_probe((i + 1) // 25, scores, seq=i + 1, memory=min(i + 1, 300))
    return Path(path)


def png_ok(data: bytes) -> tuple[int, int]:
    """Check a PNG's signature and the CRC of every chunk; return (width, height)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, width, height, seen_end = 8, 0, 0, False
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        ctype = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(ctype + body) & 0xFFFFFFFF == crc, ctype
        if ctype == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        seen_end = ctype == b"IEND"
        pos += 12 + length
    assert seen_end and width > 100 and height > 100
    return width, height


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    a = fake_run(base / "a", shift=0.0)
    b = fake_run(base / "b", shift=0.03)
    return a, b


def test_report_has_every_section_and_valid_embedded_pngs(runs, tmp_path):
    a, _ = runs
    out = build_report(a, tmp_path / "rep" / "report.html")
    text = out.read_text()
    for title in SECTION_TITLES:
        assert f">{title}</h2>" in text, title
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    files = sorted((tmp_path / "rep" / "report_files").glob("*.png"))
    names = {p.stem for p in files}
    assert {"quality", "compute_quality", "reliability", "roc", "algorithm_mix", "memory", "latency",
            "probe_matrix"} <= names
    assert len(uris) == len(files)
    for uri in uris:
        png_ok(base64.b64decode(uri))
    for p in files:
        png_ok(p.read_bytes())
    # tables with intervals, no section left saying data is missing
    assert "No labels yet" not in text and "No probes recorded" not in text
    assert "AUC [95% BCa bootstrap CI]" in text and "precision [Wilson 95%]" in text
    assert "ACC (final average)" in text and "p95" in text and "p99 (ms)" in text


def test_report_numbers_match_stats(runs):
    from agent import stats

    run = load_run(runs[0])
    sections = {s.title: s for s in report.build_sections(run, figures=False)}
    lab = run.labelled
    r = stats.mean_ci(run.quality[lab])
    row = sections["Prequential quality"].tables[0].rows[0]
    assert row[2] == str(int(lab.sum())) == str(len(run))  # every delayed score joined
    assert row[3].startswith(f"{100 * r.mean:.1f}% [{100 * r.low:.1f}, {100 * r.high:.1f}]")
    # planted structure: 7 true switches, revisits recover faster than first visits
    assert run.segment_boundaries().tolist() == [50, 100, 150, 200, 250, 300, 350]
    rec = sections["Recovery on revisited families"].tables[0].rows
    assert "better on revisits" in rec[0][4]
    # boundary detection: most switches found with delay ~2
    brow = sections["Boundary detection"].tables[0].rows[0]
    assert brow[0] == "7" and float(brow[8].split()[0]) == pytest.approx(2.0, abs=0.5)


def test_report_degrades_without_labels_probes_or_detector(tmp_path):
    d = tmp_path / "bare"
    with RunLogWriter(d) as log:
        for i in range(30):
            log.write_outcome({"id": f"t{i}", "algorithm": "protonet", "budget": 1, "inner_steps": 1, "p_fail": 0.2,
                               "latency_ms": 1.0 + i}, seq=i, kind="classification")
    out = build_report(d)
    text = out.read_text()
    for title in SECTION_TITLES:
        assert f">{title}</h2>" in text
    assert "No labels yet" in text
    assert "No probes recorded" in text
    assert "No agent-detected boundaries" in text
    assert "No offline evaluation directories" in text
    # an empty run directory still gives a report
    empty = tmp_path / "empty"
    RunLogWriter(empty).close()
    assert "No tasks answered yet." in build_report(empty).read_text()


def test_report_regression_run_says_lower_is_better(tmp_path):
    d = fake_run(tmp_path / "reg", kind="regression", detector=False, probes=False, n_tasks=150)
    text = build_report(d).read_text()
    assert "MSE (lower is better)" in text and "No agent-detected boundaries" in text


def test_report_offline_eval_dir(tmp_path):
    d = tmp_path / "eval-test-100"
    d.mkdir()
    rng = np.random.default_rng(0)
    acc = rng.uniform(0.4, 0.9, 50)
    with open(d / "episodes.jsonl", "w") as f:
        for i, a in enumerate(acc):
            f.write(json.dumps({"episode": i, "loss@0": 1.0, "accuracy@0": 0.2, "loss@5": 0.5,
                                "accuracy@5": float(a)}) + "\n")
    (d / "summary.json").write_text(json.dumps({"kind": "classification", "episodes": 50}))
    text = build_report(d, tmp_path / "eval.html").read_text()
    from agent import stats

    r = stats.mean_ci(acc)
    assert f"{100 * r.mean:.1f}% [{100 * r.low:.1f}, {100 * r.high:.1f}]" in text
    assert "Not a streaming run directory" in text


def test_compare_detects_planted_difference(runs):
    a, b = runs
    c = compare_runs(a, b)
    (overall,) = c.overall
    assert overall.n == 400 and overall.metric == "accuracy"
    assert overall.difference == pytest.approx(0.03, abs=0.01)
    assert overall.low > 0 and overall.t_pvalue < 1e-6 and overall.wilcoxon_pvalue < 1e-6
    v = c.verdict()
    assert v.startswith("B better by 3.") and "points" in v and "p<0.001" in v
    # reversed: A is the better one
    assert compare_runs(b, a).verdict().startswith("A better by 3.")
    # per family, Holm-adjusted
    assert {r.scope for r in c.per_family} == set(FAMILIES)
    assert all(r.holm_pvalue >= r.t_pvalue for r in c.per_family)
    assert "Holm" in c.to_text()


def test_compare_identical_runs_and_noise(runs, tmp_path):
    a, _ = runs
    assert compare_runs(a, a).verdict().startswith("No significant difference")
    noisy = fake_run(tmp_path / "same", agent_seed=99)  # same stream and agent, only the agent's noise differs
    v = compare_runs(a, noisy).verdict()
    assert v.startswith("No significant difference: B − A = "), v
    assert "paired t-test p=" in v and "Wilcoxon p=" in v


def test_compare_mse_lower_is_better(tmp_path):
    a = fake_run(tmp_path / "ra", kind="regression", n_tasks=200)
    b = fake_run(tmp_path / "rb", kind="regression", n_tasks=200, shift=0.05)  # higher "accuracy" -> lower MSE
    c = compare_runs(a, b)
    assert c.overall[0].difference < 0
    v = c.verdict()
    assert v.startswith("B better by") and "MSE: lower is better" in v


def test_compare_without_overlap_is_a_clear_error(runs, tmp_path):
    other = tmp_path / "other"
    with RunLogWriter(other) as log:
        log.write_outcome({"id": "x", "algorithm": "a", "budget": 1, "inner_steps": 1, "p_fail": 0.1}, seq=0,
                          kind="classification", quality=1.0, failed=False)
    with pytest.raises(ValueError, match="no shared labelled task ids"):
        compare_runs(runs[0], other)


def test_cli_report_and_compare(runs, tmp_path, capsys):
    from agent.cli import main

    a, b = runs
    out = tmp_path / "cli.html"
    assert main(["report", str(a), "--out", str(out)]) == 0
    assert out.is_file()
    assert main(["compare", str(a), str(b)]) == 0
    assert "B better by" in capsys.readouterr().out
    empty = tmp_path / "none"
    RunLogWriter(empty).close()
    assert main(["compare", str(a), str(empty)]) == 1
    assert "no shared labelled task ids" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 1


def test_pure_helpers():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = np.round(y * 0.5 + rng.normal(0, 0.5, 300), 1)  # ties included
    assert report.roc_auc(s, y) == pytest.approx(roc_auc_score(y, s))
    fpr, tpr, _ = report.roc_curve(s, y)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(y, s))
    ci = report.auc_interval(s, y, n_resamples=500)
    assert ci.low < report.roc_auc(s, y) < ci.high
    assert report.auc_interval([0.1, 0.9, 0.5], [0, 0, 1]) is None
    assert report.rolling_mean([2, 4, 6], 10).tolist() == [2.0, 3.0, 4.0]


def test_doctests():
    for mod in (report, runlog):
        result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0


def test_report_continual_metrics_match_probes(runs):
    """The continual section's numbers are continual_from_probes on the run's probes (recurring families)."""
    from agent.probes import continual_from_probes

    run = load_run(runs[0])
    pm = report.probe_matrix(run)
    assert pm.families == list(FAMILIES) and pm.R.shape == (16, 3) and pm.seq[0] == 25 and pm.seq[-1] == 400
    index = {f: j for j, f in enumerate(FAMILIES)}
    cm = continual_from_probes(pm.R, pm.seq, run.seq, [index[f] for f in run.family], pm.baseline)
    assert pm.continual().bwt == cm.bwt and math.isfinite(cm.bwt) and math.isfinite(cm.fwt)
    sec = {s.title: s for s in report.build_sections(run, figures=False)}["Continual metrics (ACC, BWT, FWT, forgetting)"]
    rows = {r[0]: r for r in sec.tables[0].rows}
    assert rows["ACC (final average)"][1] == f"{100 * cm.acc:.1f}%"
    assert rows["BWT (backward transfer)"][1] == f"{100 * cm.bwt:.1f} pp"
    per_family = sec.tables[1].rows
    assert [r[0] for r in per_family] == list(FAMILIES) and [int(r[2]) for r in per_family] == cm.gaps.tolist()
