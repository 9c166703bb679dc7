"""End to end: the real daemon scraped by a real Prometheus running the real rules.

Two daemons run as subprocesses, as operators run them:

* ``regression``: ``python -m agent run --stream sinusoid-demo`` (regression, delayed labels), with
  an A/A experiment configured through ``--set experiments=...`` (two variants without overrides),
  so the ``metaagent_experiment_*`` gauges, which only exist for configured experiments, and the
  ``$experiment`` variable have data;
* ``classification``: ``python -m agent run --input FILE --follow`` on a JSON Lines file that a
  thread keeps appending 2-way classification tasks to, with malformed records mixed in, so
  accuracy and the input-error counters have data too.

Prometheus (Debian's ``prometheus`` binary; temporary config and storage, scrape and evaluation
interval 1s, ``rule_files: [dashboards/alerts.yml]``) scrapes both on loopback. After the first
scrape (about 6 s after start: the discovery manager pushes targets every 5 s) and a second one
(``rate()`` needs two samples), EVERY dashboard expression (panels, variables; ``$__rate_interval``
and friends become ``1m``, ``$job``/``$instance``/``$algorithm``/``$experiment`` become ``.*``;
annotations, which are conditions such as ``increase(drift events) > 0``, in their ``bool`` form)
and EVERY rule expression (recording rules as they are, alert conditions in their ``bool`` form so
a healthy system still returns the series they compare) goes through ``/api/v1/query`` and must succeed
with data. A query about a metric the agent does not export fails here. The rules file must be
loaded with every rule healthy. All processes are stopped by PID in ``finally``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

from conftest import require_system
from test_dashboards import ROOT, RULES, dashboard_exprs, load_dashboard, load_rules, rule_exprs, substitute, with_bool

JOB = "metaagent"
# An A/A test (identical variants) on the regression daemon: experiment gauges exist only per
# configured experiment and variant.
AA_EXPERIMENT = "experiments=[{name: aa, variants: {control: {}, treatment: {}}}]"
BUDGET_S = 55.0  # the whole test, process starts included


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0, b""


def _query(base: str, expr: str) -> dict:
    status, body = _get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    try:
        return json.loads(body)
    except ValueError:
        return {"status": "error", "error": f"HTTP {status}: {body[:200]!r}"}


def _classification_lines(rng: np.random.Generator, start: int, n: int) -> list[str]:
    """``n`` 2-way Gaussian-blob tasks with inline labels; every fifth is followed by a malformed
    record (bad JSON, or a task without its support set)."""
    lines = []
    for i in range(start, start + n):
        centres = rng.normal(size=(2, 2)) * 2

        def draw(k):
            y = np.arange(k) % 2
            return (centres[y] + rng.normal(size=(k, 2)) * 0.5).round(4).tolist(), y.tolist()

        sx, sy = draw(10)
        qx, qy = draw(6)
        lines.append(json.dumps({"type": "task", "id": f"c-{i}", "kind": "classification",
                                 "support": {"x": sx, "y": sy}, "query": {"x": qx, "y": qy}}))
        if i % 5 == 0:
            lines.append("{not json" if i % 10 == 0 else json.dumps({"type": "task", "id": f"bad-{i}",
                                                                      "kind": "classification"}))
    return lines


def _feeder(path: Path, stop: threading.Event) -> None:
    rng = np.random.default_rng(7)
    n = 0
    while not stop.is_set():
        with open(path, "a") as f:
            f.write("\n".join(_classification_lines(rng, n, 10)) + "\n")
        n += 10
        stop.wait(0.5)


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def test_every_dashboard_and_rule_expression_returns_data(tmp_path):
    prometheus = shutil.which("prometheus")
    require_system("prometheus", prometheus is not None and shutil.which("promtool") is not None)
    t0 = time.monotonic()
    deadline = t0 + BUDGET_S

    ports = {"regression": _free_port(), "classification": _free_port(), "prometheus": _free_port()}
    feed = tmp_path / "classification.jsonl"
    feed.write_text("\n".join(_classification_lines(np.random.default_rng(1), 10_000, 20)) + "\n")
    common = [sys.executable, "-m", "agent", "run", "--progress", "off", "--set", "checkpoint.every_s=2"]
    commands = {
        "regression": common + ["--stream", "sinusoid-demo", "--set", AA_EXPERIMENT, "--metrics-addr", f"127.0.0.1:{ports['regression']}",
                                "--output", str(tmp_path / "regression.out.jsonl"),
                                "--state-dir", str(tmp_path / "regression.state")],
        "classification": common + ["--input", str(feed), "--follow", "--set", "agent.in_shape=[2]",
                                    "--set", "agent.out_dim=2",
                                    "--metrics-addr", f"127.0.0.1:{ports['classification']}",
                                    "--output", str(tmp_path / "classification.out.jsonl"),
                                    "--state-dir", str(tmp_path / "classification.state")],
    }
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": JOB, "static_configs": [
            {"targets": [f"127.0.0.1:{ports['regression']}", f"127.0.0.1:{ports['classification']}"]}]}],
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(json.dumps(config))
    check = subprocess.run(["promtool", "check", "config", str(config_path)], capture_output=True, text=True,
                           timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr

    base = f"http://127.0.0.1:{ports['prometheus']}"
    procs: dict[str, subprocess.Popen] = {}
    logs: dict[str, Path] = {}
    stop_feeding = threading.Event()
    feeder = threading.Thread(target=_feeder, args=(feed, stop_feeding), daemon=True)

    def diagnostics() -> str:
        return "\n".join(f"--- {name} (rc {procs[name].poll()}) ---\n{_tail(path)}" for name, path in logs.items())

    def wait_for(what: str, ok) -> None:
        while time.monotonic() < deadline:
            if ok():
                return
            for name, p in procs.items():
                assert p.poll() is None, f"{name} exited while waiting for {what}\n{diagnostics()}"
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what} after {time.monotonic() - t0:.1f}s\n{diagnostics()}")

    def vector(expr: str) -> list:
        r = _query(base, expr)
        return r["data"]["result"] if r.get("status") == "success" else []

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        for name, cmd in commands.items():
            logs[name] = tmp_path / f"{name}.log"
            procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                           stdout=subprocess.DEVNULL, stderr=open(logs[name], "wb"))
        feeder.start()
        logs["prometheus"] = tmp_path / "prometheus.log"
        procs["prometheus"] = subprocess.Popen(
            [prometheus, f"--config.file={config_path}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{ports['prometheus']}", "--log.level=warn"],
            cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(logs["prometheus"], "wb"))

        wait_for("/-/ready", lambda: _get(f"{base}/-/ready", 1)[0] == 200)
        wait_for("both targets up", lambda: len(vector(f'up{{job="{JOB}"}} == 1')) == 2)
        wait_for("a second scrape of both", lambda: len(vector(f'count_over_time(up{{job="{JOB}"}}[1m]) >= 2')) == 2)
        t_scraped = time.monotonic() - t0

        # Every expression, retried until it has data (recording rules need an evaluation after
        # the second scrape; the classification daemon needs a few tasks scored).
        todo = {f"dashboard {where}": with_bool(substitute(expr)) if where.startswith("annotation") else substitute(expr)
                for where, expr in dashboard_exprs(load_dashboard())}
        for kind, name, expr in rule_exprs(load_rules()):
            todo[f"{kind} {name}"] = expr if kind == "record" else with_bool(expr)
            if kind == "record":
                todo[f"recorded series {name}"] = name
        n_exprs = len(todo)
        last: dict[str, dict] = {}
        while todo and time.monotonic() < deadline:
            for key, expr in list(todo.items()):
                r = last[key] = _query(base, expr)
                assert r.get("status") == "success", f"{key}: {expr}\n{r}"
                if r["data"]["result"]:
                    del todo[key]
            if todo:
                time.sleep(0.5)
        assert not todo, ("no data after %.1fs for:\n" % (time.monotonic() - t0)
                          + "\n".join(f"{k}: {e}\n  -> {last.get(k)}" for k, e in todo.items()))
        t_queries = time.monotonic() - t0

        # Both instances answer the per-instance views (the $instance variable works).
        for port in (ports["regression"], ports["classification"]):
            inst = f"127.0.0.1:{port}"
            assert vector(substitute('sum(rate(metaagent_tasks_total{job=~"$job", instance=~"$instance"}'
                                     '[$__rate_interval])) > 0', {"instance": inst})), f"{inst} answers no tasks"
        assert vector(substitute('sum(rate(metaagent_input_errors_total{instance=~"$instance"}[$__rate_interval])) > 0',
                                 {"instance": f"127.0.0.1:{ports['classification']}"})), "bad records not counted"

        # The rules file loaded, with every rule evaluated without error.
        wanted = {name for _, name, _ in rule_exprs(load_rules())}

        def rules_healthy() -> bool:
            status, body = _get(f"{base}/api/v1/rules")
            if status != 200:
                return False
            got = {r["name"]: r for g in json.loads(body)["data"]["groups"] for r in g["rules"]}
            return set(got) == wanted and all(r["health"] == "ok" for r in got.values())

        wait_for("every rule loaded and healthy", rules_healthy)
        for name, p in procs.items():
            assert p.poll() is None, f"{name} died during the test\n{diagnostics()}"
        elapsed = time.monotonic() - t0
        print(f"\n{n_exprs} expressions with data; scraped twice at {t_scraped:.1f}s, all data at {t_queries:.1f}s, "
              f"done at {elapsed:.1f}s")
    finally:
        stop_feeding.set()
        _stop(procs.get("prometheus"))
        for name in ("regression", "classification"):
            _stop(procs.get(name))
        if feeder.is_alive():
            feeder.join(5)
    for name in ("regression", "classification"):
        assert procs[name].returncode == 0, f"{name} exited {procs[name].returncode} on SIGTERM\n{diagnostics()}"
