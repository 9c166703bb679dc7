"""The Grafana dashboard and the Prometheus rules, checked without a server.

Structure of ``dashboards/meta-agent.json`` (ids, grid, datasources, variables), that it is what
``dashboards/build_dashboard.py`` generates, that every PromQL expression parses (``promtool
check rules`` on a file of recording rules wrapping them), that every metric they name is one
``agent.metrics.build_metrics`` exports, the exposition lint (``promtool check metrics``) and the
alert unit tests (``promtool test rules``). ``tests/test_prometheus_e2e.py`` runs the same
expressions against a real Prometheus scraping the real daemon; the helpers here are shared.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from conftest import require_system

ROOT = Path(__file__).resolve().parents[1]
DASH_DIR = ROOT / "dashboards"
DASHBOARD = DASH_DIR / "meta-agent.json"
RULES = DASH_DIR / "alerts.yml"
RULES_TEST = DASH_DIR / "alerts_test.yml"
DS_UID = "${DS_PROMETHEUS}"
GRID_COLUMNS = 24

# Grafana's built-in variables and what the checks substitute for them.
BUILTINS = {"__rate_interval": "1m", "__interval": "1m", "__range": "1m", "__range_s": "60", "__interval_ms": "60000"}
_VAR = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(.*?)\s*,\s*(\w+)\s*\)\s*$", re.S)
_METRIC = re.compile(r"(?<![\w:])metaagent_[A-Za-z0-9_]+")
_RECORDED = re.compile(r"(?<![\w:])[a-zA-Z_]\w*:[\w:]+")
_COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)(\s*bool\b)?")


# -- shared helpers (also used by test_prometheus_e2e.py) ------------------------------------
def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def load_rules() -> dict:
    return yaml.safe_load(RULES.read_text())


def panels(dashboard: dict) -> list[dict]:
    """All panels, those nested in collapsed rows included."""
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def variable_query(v: dict) -> str:
    q = v.get("query", "")
    return q.get("query", "") if isinstance(q, dict) else q


def dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """``(where, PromQL)`` for every panel target, annotation and query variable (``label_values``
    becomes ``count by (label) (selector)``, the same series Grafana would ask for)."""
    out = []
    for p in panels(dashboard):
        for t in p.get("targets", []):
            out.append((f"panel {p['id']} {p['title']!r} {t['refId']}", t["expr"]))
    for a in dashboard.get("annotations", {}).get("list", []):
        if a.get("expr"):
            out.append((f"annotation {a.get('name')!r}", a["expr"]))
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            m = _LABEL_VALUES.match(variable_query(v))
            assert m, f"variable {v['name']}: expected label_values(selector, label), got {variable_query(v)!r}"
            out.append((f"variable ${v['name']}", f"count by ({m.group(2)}) ({m.group(1)})"))
    return out


def rule_exprs(rules: dict) -> list[tuple[str, str, str]]:
    """``(kind, name, PromQL)`` for every recording and alerting rule."""
    out = []
    for g in rules["groups"]:
        for r in g["rules"]:
            kind = "record" if "record" in r else "alert"
            out.append((kind, r[kind], r["expr"].strip()))
    return out


def substitute(expr: str, values: dict[str, str] | None = None) -> str:
    """Grafana variables replaced: built-ins by ``1m``, template variables by ``.*`` (their "All")."""
    values = {**BUILTINS, **(values or {})}

    def repl(m):
        name = m.group(1) or m.group(2)
        return values.get(name, ".*")

    return _VAR.sub(repl, expr)


def with_bool(expr: str) -> str:
    """``expr`` with every comparison outside label matchers and strings turned into its ``bool``
    form, so an alert condition returns its inputs (0 or 1) instead of nothing while healthy."""
    out, depth, quote, i = [], 0, None, 0
    while i < len(expr):
        c = expr[i]
        if quote:
            out.append(c)
            if c == "\\":
                out.append(expr[i + 1])
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'`":
            quote = c
            out.append(c)
        elif c == "{":
            depth += 1
            out.append(c)
        elif c == "}":
            depth -= 1
            out.append(c)
        elif depth == 0 and (m := _COMPARISON.match(expr, i)):
            out.append(m.group(0) if m.group(2) else m.group(1) + " bool")
            i = m.end()
            continue
        else:
            out.append(c)
        i += 1
    return "".join(out)


def referenced_metrics(expr: str) -> set[str]:
    return set(_METRIC.findall(expr))


def exported_names(registry: CollectorRegistry) -> set[str]:
    """Every series name ``registry`` exposes, by family type (families with no child yet
    included: a labelled histogram observed for no algorithm still counts as exported)."""
    names = set()
    for family in registry.collect():
        n = family.name
        names.update(s.name for s in family.samples)
        if family.type == "counter":
            names.add(n + "_total")
        elif family.type in ("histogram", "gaugehistogram"):
            names.update({n + "_bucket", n + "_sum", n + "_count"})
        elif family.type == "summary":
            names.update({n, n + "_sum", n + "_count"})
        elif family.type == "info":
            names.add(n + "_info")
        else:
            names.add(n)
    return names


def scripted_registry() -> CollectorRegistry:
    """A fresh agent's registry after a few tasks from the demo stream, delayed feedback and
    two bad records."""
    from agent.agent import Agent
    from agent.streams import make_stream

    reg = CollectorRegistry()
    agent = Agent.from_config({"model": {"arch": "mlp", "hidden": [8]}, "agent": {"in_shape": [1], "out_dim": 1},
                               "compute": {"levels": [[1, 1], [2, 1]]}}, registry=reg)
    stream = make_stream("sinusoid-demo", n_tasks=12, seed=3)
    lines = [r.data for r in stream.poll(0)] + [b"not json", b'{"type": "task", "id": "x"}']
    for line in lines:
        agent.handle_line(line if isinstance(line, bytes) else str(line).encode())
    return reg


def promtool_check_exprs(exprs: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    rules = {"groups": [{"name": "parse", "rules": [{"record": f"check:expr_{i}", "expr": e}
                                                    for i, e in enumerate(exprs)]}]}
    path = tmp_path / "wrapped_rules.yml"
    path.write_text(json.dumps(rules))
    return subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)


def _require_promtool() -> None:
    require_system("prometheus (promtool)", shutil.which("promtool") is not None)


# -- dashboard structure ---------------------------------------------------------------------
def test_top_level():
    d = load_dashboard()
    assert d["uid"] == "meta-agent" and d["title"]
    assert d["schemaVersion"] == 41
    assert d.get("id") is None
    assert d["time"]["from"].startswith("now-") and d["refresh"]
    inputs = {i["name"]: i for i in d["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource" and inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    ds_vars = [v for v in d["templating"]["list"] if v["type"] == "datasource"]
    assert [(v["name"], v["query"]) for v in ds_vars] == [("DS_PROMETHEUS", "prometheus")]


def test_panel_ids_unique_and_grid_fits():
    d = load_dashboard()
    ps = panels(d)
    ids = [p["id"] for p in ps]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    cells = {}
    for p in ps:
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["y"] >= 0, p["title"]
        assert g["x"] + g["w"] <= GRID_COLUMNS, f"{p['title']!r} overflows the 24-column grid"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def test_rows_cover_the_issue():
    titles = [p["title"] for p in load_dashboard()["panels"] if p["type"] == "row"]
    assert titles == ["Throughput and errors", "Latency", "Quality over time", "Failure prediction",
                      "Algorithm selection", "Algorithm mix", "Compute spent", "Memory", "Online meta-learning", "Drift",
                      "A/B experiments", "Checkpoints and health"]


def _row_exprs(title: str) -> str:
    """Every target expression of the panels under the row ``title``, joined."""
    out, inside = [], False
    for p in load_dashboard()["panels"]:
        if p["type"] == "row":
            inside = p["title"] == title
        elif inside:
            out += [t["expr"] for t in p["targets"]]
    return "\n".join(out)


def test_online_intelligence_panels():
    fp = _row_exprs("Failure prediction")
    for name in ("metaagent_failure_predictions_total", "metaagent_failure_predictor_rocauc",
                 "metaagent_failure_predictor_logloss", "metaagent_failure_predictor_brier", "metaagent_decisions_total"):
        assert name in fp, name
    assert 'predicted="true", actual="false"' in fp and "by (action)" in fp
    sel = _row_exprs("Algorithm selection")
    assert "by (arm)" in sel and "metaagent_selector_mean_reward" in sel
    assert "metaagent_drift_events_total" in _row_exprs("Drift")
    exp = _row_exprs("A/B experiments")
    for name in ("samples", "p_value", "effect", "winner"):
        assert f"metaagent_experiment_{name}" in exp, name
    assert 'experiment=~"$experiment"' in exp


def test_drift_annotation():
    (a,) = load_dashboard()["annotations"]["list"]
    assert a["enable"] and a["name"] == "Drift events"
    assert re.fullmatch(r"sum by \(instance, signal, detector\) \(increase\(metaagent_drift_events_total\{[^}]*\}"
                        r"\[\$__rate_interval\]\)\) > 0", a["expr"]), a["expr"]
    assert {"signal", "detector"} <= set(a["tagKeys"].split(","))


def test_every_datasource_is_the_variable():
    d = load_dashboard()
    for p in panels(d):
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": DS_UID}, p["title"]
        assert p["targets"], f"{p['title']!r} has no query"
        for t in p["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": DS_UID}, (p["title"], t["refId"])
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            assert v["datasource"]["uid"] == DS_UID, v["name"]
    for a in d["annotations"]["list"]:
        assert a["datasource"]["uid"] == DS_UID, a.get("name")
    # nothing hard-codes another datasource uid anywhere
    uids = set(re.findall(r'"uid":\s*"([^"]*)"', json.dumps(d)))
    assert uids == {"meta-agent", DS_UID}


def test_every_variable_is_defined():
    d = load_dashboard()
    defined = {v["name"] for v in d["templating"]["list"]} | set(BUILTINS)
    assert {"DS_PROMETHEUS", "job", "instance"} <= defined
    texts = [e for _, e in dashboard_exprs(d)] + [variable_query(v) for v in d["templating"]["list"]]
    texts += [p.get("title", "") for p in panels(d)]
    for text in texts:
        for m in _VAR.finditer(text):
            assert (m.group(1) or m.group(2)) in defined, f"undefined variable {m.group(0)} in {text!r}"
    instance = next(v for v in d["templating"]["list"] if v["name"] == "instance")
    assert variable_query(instance).startswith("label_values(metaagent_build_info")


def test_query_conventions():
    for where, expr in dashboard_exprs(load_dashboard()):
        if where.startswith("variable"):
            continue
        for m in re.finditer(r"\brate\((\w+)\{[^}]*\}\[([^\]]+)\]", expr):
            assert m.group(2) == "$__rate_interval", f"{where}: rate over [{m.group(2)}]"
        for m in re.finditer(r"histogram_quantile\([\d.]+,\s*sum by \(([^)]*)\)", expr):
            assert "le" in [s.strip() for s in m.group(1).split(",")], f"{where}: le dropped"
        assert 'job=~"$job"' in expr and 'instance=~"$instance"' in expr, f"{where}: not filtered by $job/$instance"


def test_committed_json_is_generated():
    spec = importlib.util.spec_from_file_location("build_dashboard", DASH_DIR / "build_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert DASHBOARD.read_text() == module.render(), "run: python dashboards/build_dashboard.py"
    assert module.main(["--check"]) == 0


def test_provisioning_examples():
    ds = yaml.safe_load((DASH_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert ds["apiVersion"] == 1 and ds["datasources"][0]["type"] == "prometheus"
    prov = yaml.safe_load((DASH_DIR / "provisioning" / "dashboards" / "meta-agent.yml").read_text())
    assert prov["apiVersion"] == 1
    provider = prov["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"]


# -- metric names ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exposition():
    reg = scripted_registry()
    return reg, generate_latest(reg)


def test_every_referenced_metric_is_exported(exposition):
    reg, _ = exposition
    exported = exported_names(reg)
    assert "metaagent_tasks_total" in exported and "metaagent_query_accuracy_ratio_bucket" in exported
    recorded = {name for kind, name, _ in rule_exprs(load_rules()) if kind == "record"}
    missing = []
    for where, expr in dashboard_exprs(load_dashboard()):
        missing += [(where, n) for n in referenced_metrics(expr) if n not in exported]
        assert not _RECORDED.findall(expr), f"{where}: the dashboard must not depend on recording rules"
    for kind, name, expr in rule_exprs(load_rules()):
        missing += [(name, n) for n in referenced_metrics(expr) if n not in exported]
        missing += [(name, n) for n in _RECORDED.findall(expr) if n not in recorded]
    assert not missing, f"not exported by build_metrics: {missing}"


def test_exposition_passes_promtool(exposition):
    _require_promtool()
    _, text = exposition
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert r.returncode == 0, (r.stdout + r.stderr).decode()


# -- PromQL and rules ------------------------------------------------------------------------
def test_every_expression_parses(tmp_path):
    _require_promtool()
    exprs = [substitute(e) for _, e in dashboard_exprs(load_dashboard())]
    exprs += [e for _, _, e in rule_exprs(load_rules())]
    exprs += [with_bool(e) for kind, _, e in rule_exprs(load_rules()) if kind == "alert"]
    r = promtool_check_exprs(exprs, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in r.stdout


def test_a_broken_expression_is_caught(tmp_path):
    _require_promtool()
    r = promtool_check_exprs(['sum by (le algorithm) (rate(metaagent_tasks_total[1m]))'], tmp_path)
    assert r.returncode != 0 and "parse error" in (r.stdout + r.stderr)


def test_with_bool():
    assert with_bool('x{a="b>c", d!="e"} > 0.5 and y == 1') == 'x{a="b>c", d!="e"} > bool 0.5 and y == bool 1'
    assert with_bool("a >= bool 1") == "a >= bool 1"
    assert substitute('rate(x{job=~"$job", i=~"${instance}"}[$__rate_interval])') == 'rate(x{job=~".*", i=~".*"}[1m])'


def test_rules_check():
    _require_promtool()
    r = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    names = [n for kind, n, _ in rule_exprs(load_rules()) if kind == "alert"]
    for wanted in ("MetaAgentDown", "MetaAgentNoTasksProcessed", "MetaAgentInputErrorRateHigh", "MetaAgentAccuracyDrop",
                   "MetaAgentMSERise", "MetaAgentFailureRateHigh", "MetaAgentCheckpointStale",
                   "MetaAgentFailurePredictorDegraded"):
        assert wanted in names
    for g in load_rules()["groups"]:
        for rule in g["rules"]:
            if "alert" in rule:
                assert rule["labels"]["severity"] in ("critical", "warning", "info")
                assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_rules_unit_tests():
    _require_promtool()
    r = subprocess.run(["promtool", "test", "rules", str(RULES_TEST)], capture_output=True, text=True, timeout=120,
                       cwd=DASH_DIR)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout
    tested = set(re.findall(r"alertname:\s*(\w+)", RULES_TEST.read_text()))
    alerts = {n for kind, n, _ in rule_exprs(load_rules()) if kind == "alert"}
    assert alerts <= tested, f"alerts without a unit test: {sorted(alerts - tested)}"
