"""Metric values after scripted steps, and the exposition checked by promtool."""

import json
import shutil
import subprocess

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest

from agent.agent import Agent
from agent.metrics import build_metrics
from agent.task import Task, to_wire
from conftest import require_system

CFG = {"model": {"arch": "mlp", "hidden": [8]}, "agent": {"in_shape": [1], "out_dim": 1},
       "compute": {"levels": [[1, 1], [2, 1]]}}


def _task(rng, i, labels=True):
    x, xq = rng.uniform(-5, 5, (5, 1)), rng.uniform(-5, 5, (5, 1))
    return Task(f"m{i}", "regression", x, np.sin(x), xq, np.sin(xq) if labels else None)


def _scripted_agent(tmp_path=None):
    agent = Agent.from_config(CFG)
    rng = np.random.default_rng(0)
    for i in range(4):
        agent.step(_task(rng, i))
    agent.step(_task(rng, 4, labels=False))
    agent.handle_line(b"not json")
    agent.handle_line(json.dumps(to_wire(_task(rng, 0))).encode())  # duplicate id
    if tmp_path is not None:
        agent.save(tmp_path)
    return agent


def test_values_after_scripted_steps(tmp_path):
    agent = _scripted_agent(tmp_path)
    get = agent.registry.get_sample_value
    assert get("metaagent_tasks_total", {"algorithm": "maml", "outcome": "answered"}) == 5
    assert get("metaagent_input_errors_total", {"code": "bad_json"}) == 1
    assert get("metaagent_input_errors_total", {"code": "duplicate_id"}) == 1
    assert get("metaagent_input_errors_total", {"code": "ragged_array"}) == 0
    assert get("metaagent_adapt_duration_seconds_count", {"algorithm": "maml"}) == 5
    assert get("metaagent_task_duration_seconds_count", {"algorithm": "maml"}) == 5
    assert get("metaagent_inner_steps_count", {"algorithm": "maml"}) == 5
    assert get("metaagent_ensemble_members_count") == 5
    assert get("metaagent_labelled_tasks_total", {"algorithm": "maml"}) == 4
    assert get("metaagent_query_mse_count", {"algorithm": "maml"}) == 4
    assert get("metaagent_predicted_failure_probability_count") == 5
    assert get("metaagent_memory_entries") == 4 and get("metaagent_memory_bytes") > 0
    assert get("metaagent_memory_capacity_entries") == 2000  # memory.capacity's default
    assert get("metaagent_online_updates_total") == 4
    assert get("metaagent_online_rollbacks_total", {"reason": "grad_norm"}) == 0
    assert get("metaagent_feedback_pending") == 1
    assert get("metaagent_checkpoint_duration_seconds_count") == 1
    assert get("metaagent_checkpoint_last_success_timestamp_seconds") > 1e9
    assert get("metaagent_checkpoint_failures_total") == 0
    assert get("metaagent_budget_tokens") is not None
    assert get("metaagent_build_info", {"version": __import__("agent").__version__}) == 1
    assert get("metaagent_agent_state", {"metaagent_agent_state": "starting"}) == 1


def test_each_agent_has_its_own_registry():
    a, b = Agent.from_config(CFG), Agent.from_config(CFG)
    a.handle_line(b"{")
    assert a.registry.get_sample_value("metaagent_input_errors_total", {"code": "bad_json"}) == 1
    assert b.registry.get_sample_value("metaagent_input_errors_total", {"code": "bad_json"}) == 0


def test_names_follow_conventions():
    reg = CollectorRegistry()
    build_metrics(reg, algorithms=["maml"])
    for family in reg.collect():
        assert family.name.startswith("metaagent_")
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
        for s in family.samples:
            assert "id" not in s.labels and "task_id" not in s.labels


def test_promtool_check_metrics(tmp_path):
    promtool = shutil.which("promtool")
    require_system("promtool (Debian package prometheus)", promtool is not None)
    agent = _scripted_agent(tmp_path)
    text = generate_latest(agent.registry)
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_memory_capacity_zero_when_disabled():
    agent = Agent.from_config({**CFG, "memory": {"enabled": False}})
    assert agent.registry.get_sample_value("metaagent_memory_capacity_entries") == 0


def test_wsgi_app_serves_the_registry_for_embedding():
    """A host's WSGI server can mount ``make_wsgi_app(agent.registry)`` to expose the metrics."""
    import threading
    import urllib.request
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client import make_wsgi_app

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):
            pass

    agent = Agent.from_config(CFG)
    agent.step(_task(np.random.default_rng(0), 0))
    server = make_server("127.0.0.1", 0, make_wsgi_app(agent.registry), handler_class=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200
            body = resp.read().decode()
        assert 'metaagent_tasks_total{algorithm="maml",outcome="answered"} 1.0' in body
        assert "metaagent_memory_capacity_entries" in body
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
