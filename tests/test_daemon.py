"""``meta-agent run`` as a real process: SIGTERM, kill -9 and restart, the metrics endpoint."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from agent import checkpoint as ckpt
from agent.daemon import parse_addr
from helpers import write_sine_inputs as write_inputs

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"model": {"arch": "mlp", "hidden": [16, 16]}, "agent": {"in_shape": [1], "out_dim": 1},
          "compute": {"levels": [[1, 1], [3, 1]]}, "checkpoint": {"every_s": 0.3}}


def start(args, tmp_path, **kw):
    cfg = tmp_path / "cfg.json"  # JSON is YAML
    cfg.write_text(json.dumps(CONFIG))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg), *args], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def wait_for_lines(path: Path, n: int, proc, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited early: {proc.returncode} {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no {n} output lines within {timeout}s")


def answers(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sigterm_finishes_checkpoints_and_exits_zero(tmp_path):
    write_inputs(tmp_path / "in.jsonl", 3000)
    args = ["--input", "in.jsonl", "--output", "out.jsonl", "--state-dir", "s", "--metrics-addr", "0"]
    proc = start(args, tmp_path)
    wait_for_lines(tmp_path / "out.jsonl", 60, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-2000:]
    found = ckpt.latest_good(tmp_path / "s")
    assert found is not None
    state = found.load("state.json")
    offset = state["stream"]["source"]["offset"]
    assert 0 < offset < (tmp_path / "in.jsonl").stat().st_size  # stopped mid-stream
    assert state["stream"]["sink_offset"] == (tmp_path / "out.jsonl").stat().st_size
    done = answers(tmp_path / "out.jsonl")
    assert all("predictions" in d or d["error"]["code"] == "bad_json" for d in done)
    assert out == b""  # answers went to the file; nothing on stdout


def test_kill9_restart_answers_every_task_once(tmp_path):
    ids = write_inputs(tmp_path / "in.jsonl", 1500)
    args = ["--input", "in.jsonl", "--output", "out.jsonl", "--state-dir", "s", "--metrics-addr", "0"]
    proc = start(args, tmp_path)
    wait_for_lines(tmp_path / "out.jsonl", 300, proc)
    time.sleep(0.4)  # past a checkpoint, and mid-way to the next
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = len(answers(tmp_path / "out.jsonl"))
    assert before < len(ids)
    assert ckpt.latest_good(tmp_path / "s") is not None
    proc = start(args, tmp_path)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err.decode()[-2000:]
    got = [d["id"] for d in answers(tmp_path / "out.jsonl") if "error" not in d]
    assert len(got) == len(set(got)), "an id was answered twice"
    assert set(got) == set(ids)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_endpoint_served_on_loopback(tmp_path):
    write_inputs(tmp_path / "in.jsonl", 40)
    port = free_port()
    proc = start(["--input", "in.jsonl", "--follow", "--output", "out.jsonl", "--metrics-addr", f"127.0.0.1:{port}"],
                 tmp_path)
    try:
        wait_for_lines(tmp_path / "out.jsonl", 40, proc)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert 'metaagent_tasks_total{algorithm="maml",outcome="answered"}' in body
        assert 'metaagent_agent_state{metaagent_agent_state="running"} 1.0' in body
        assert "metaagent_build_info" in body
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0


def test_default_demo_stream_with_max_tasks(tmp_path):
    pytest.importorskip("agent.streams.synthetic")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "agent", "run", "--max-tasks", "40", "--metrics-addr", "0"],
                          cwd=tmp_path, env=env, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    lines = [json.loads(x) for x in proc.stdout.decode().splitlines()]
    assert len(lines) == 40 and all("predictions" in d for d in lines)
    assert proc.stderr.decode().count("\r") == 0  # not a TTY: no progress line


def test_parse_addr():
    assert parse_addr("0") is None and parse_addr("127.0.0.1:9108") == ("127.0.0.1", 9108)
    with pytest.raises(ValueError):
        parse_addr("host:port")


def test_backpressure_fast_producer_is_held_back_by_the_pipe(tmp_path):
    """A producer writing to the daemon's stdin as fast as it can (8 MB of tasks) is held back:
    the daemon reads a bounded amount ahead of what it answered, so the producer blocks on the
    full pipe instead of the daemon buffering the stream in memory."""
    import threading

    import numpy as np

    rng = np.random.default_rng(0)
    lines = []
    for i in range(20000):
        x = rng.uniform(-5, 5, (10, 1))
        lines.append(json.dumps({"type": "task", "id": f"bp-{i}", "kind": "regression",
                                 "support": {"x": x[:5].round(4).tolist(), "y": np.sin(x[:5]).round(4).tolist()},
                                 "query": {"x": x[5:].round(4).tolist()}}).encode() + b"\n")
    n_answer = 150
    proc = start(["--input", "-", "--output", "out.jsonl", "--max-tasks", str(n_answer), "--metrics-addr", "0"],
                 tmp_path, stdin=subprocess.PIPE)
    written = [0]

    def produce():
        try:
            for line in lines:
                proc.stdin.write(line)
                written[0] += len(line)
            proc.stdin.close()
        except (BrokenPipeError, ValueError, OSError):
            pass

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    assert proc.wait(timeout=180) == 0, proc.stderr.read().decode()[-2000:]
    producer.join(timeout=30)
    answered = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(answered) == n_answer and all("predictions" in a for a in answered)
    consumed = sum(len(line) for line in lines[:n_answer])
    ahead = written[0] - consumed
    # Read-ahead: the pipe (64 KiB on Linux), the reader's chunk (64 KiB) and the Python buffer.
    assert ahead <= 512 * 1024, f"the producer got {ahead / 2**20:.1f} MiB ahead of the answers"
    assert written[0] < sum(len(line) for line in lines) / 4
