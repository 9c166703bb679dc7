"""Checkpoint faults (issue 7): corrupt, truncated or tampered checkpoints are detected through
the manifest and the agent falls back to the previous good one, loudly; an unwritable checkpoint
directory does not stop the stream, is counted in ``metaagent_checkpoint_failures_total`` and
logged, and is retried with back-off."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent import checkpoint as ckpt
from agent.agent import Agent
from agent.streams import JsonlSink
from agent.streams.sources import Record
from helpers import task_line

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"model": {"arch": "mlp", "hidden": [8]}, "agent": {"in_shape": [1], "out_dim": 1},
          "compute": {"levels": [[1, 1]]}, "memory": {"capacity": 100}, "online": {"every": 4, "replay": 1},
          "checkpoint": {"every_s": 1000.0, "keep": 5}}


def two_checkpoints(root: Path) -> tuple[Path, Path]:
    agent = Agent.from_config(CONFIG)
    for i in range(5):
        agent.handle_line(task_line(i))
    first = agent.save(root)
    for i in range(5, 12):
        agent.handle_line(task_line(i))
    return first, agent.save(root)


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped_meta": lambda c: flip_byte(c / "meta.pt"),
    "truncated_state": lambda c: (c / "state.json").write_bytes((c / "state.json").read_bytes()[:40]),
    "appended_memory": lambda c: (c / "memory.npz").write_bytes((c / "memory.npz").read_bytes() + b"x"),
    "missing_file": lambda c: (c / "online.pt").unlink(),
    "no_manifest": lambda c: (c / "manifest.json").unlink(),
    "garbage_manifest": lambda c: (c / "manifest.json").write_bytes(b"\x00{not json"),
    "manifest_not_object": lambda c: (c / "manifest.json").write_text("[1, 2]"),
    "wrong_format": lambda c: (c / "manifest.json").write_text(
        json.dumps({**json.loads((c / "manifest.json").read_text()), "format": 99})),
    "tampered_state": lambda c: (c / "state.json").write_text(
        json.dumps((lambda d: (d["counters"].update(tasks=d["counters"]["tasks"] + 1), d)[1])(
            json.loads((c / "state.json").read_text())))),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_loudly(tmp_path, caplog, damage):
    first, second = two_checkpoints(tmp_path)
    DAMAGE[damage](second)
    assert ckpt.verify(second), "the damage must be detected"
    with caplog.at_level(logging.WARNING, logger="agent.checkpoint"):
        agent = Agent.load(tmp_path)
    assert agent.counters["tasks"] == 5  # the first checkpoint's state
    assert any("unusable" in r.getMessage() and second.name in r.getMessage() for r in caplog.records)
    assert second.exists(), "a damaged checkpoint is kept for inspection"


def test_manifest_cannot_name_files_outside_the_checkpoint(tmp_path):
    first, second = two_checkpoints(tmp_path)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"secret")
    manifest = json.loads((second / "manifest.json").read_text())
    import hashlib

    manifest["files"]["../outside.bin"] = {"sha256": hashlib.sha256(b"secret").hexdigest(), "size": 6}
    (second / "manifest.json").write_text(json.dumps(manifest))
    assert any("invalid file name" in p for p in ckpt.verify(second))
    assert ckpt.latest_good(tmp_path).path == first


def test_daemon_falls_back_to_previous_checkpoint_and_says_so(tmp_path):
    lines = [task_line(i) for i in range(40)]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines[:20]) + b"\n")
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(CONFIG))
    args = [sys.executable, "-m", "agent", "run", "--config", str(cfg), "--input", "in.jsonl", "--output", "out.jsonl",
            "--state-dir", "s", "--metrics-addr", "0", "--progress", "off"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    first = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr[-2000:]
    with open(tmp_path / "in.jsonl", "ab") as f:
        f.write(b"\n".join(lines[20:]) + b"\n")
    second = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr[-2000:]
    newest = ckpt.list_checkpoints(tmp_path / "s")[-1]
    flip_byte(newest / "meta.pt")
    third = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "unusable" in third.stderr and newest.name in third.stderr and "WARNING" in third.stderr
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    ids = [r["id"] for r in rows]
    assert sorted(ids) == sorted(f"t-{i}" for i in range(40))  # replayed from the older one, none twice


def test_checkpoint_with_consistent_manifest_but_missing_file_falls_back(tmp_path):
    first, second = two_checkpoints(tmp_path)
    manifest = json.loads((second / "manifest.json").read_text())
    del manifest["files"]["meta.pt"]
    (second / "meta.pt").unlink()
    (second / "manifest.json").write_text(json.dumps(manifest))
    agent = Agent.load(tmp_path)
    assert agent.counters["tasks"] == 5


# -- unwritable checkpoint directory --------------------------------------------------------
class OneByOne:
    """A source handing out one record per poll (so a checkpoint can be due after each task)."""

    def __init__(self, lines):
        self.lines, self.i, self.exhausted = list(lines), 0, False

    def poll(self, timeout):
        if self.i >= len(self.lines):
            self.exhausted = True
            return []
        self.i += 1
        return [Record(self.lines[self.i - 1], self.i)]

    def ack(self, position):
        pass

    def position(self):
        return {"offset": self.i}

    def close(self):
        pass


def run_unwritable(tmp_path, n=60):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state dir's parent should be")  # ENOTDIR even for root
    agent = Agent.from_config(CONFIG)
    sink = JsonlSink(tmp_path / "out.jsonl")
    stats = agent.run(OneByOne([task_line(i) for i in range(n)]), sink, checkpoint_dir=blocker / "state",
                      checkpoint_every_tasks=1)
    sink.close()
    failures = agent.registry.get_sample_value("metaagent_checkpoint_failures_total")
    return agent, stats, failures


def test_unwritable_checkpoint_dir_keeps_serving_and_reports(tmp_path, caplog):
    with caplog.at_level(logging.ERROR, logger="agent.agent"):
        agent, stats, failures = run_unwritable(tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert stats.tasks == 60 and len(rows) == 60 and all("predictions" in r for r in rows)
    assert failures >= 1
    assert any("checkpoint failed" in r.getMessage() for r in caplog.records)


def test_failed_checkpoints_are_retried_with_back_off(tmp_path):
    _agent, _stats, failures = run_unwritable(tmp_path)
    assert failures <= 10, f"{failures:.0f} checkpoint attempts for 60 tasks on a dead disk"


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Ticking(OneByOne):
    """One record per poll, and the agent's fake clock one second further at each poll."""

    def __init__(self, lines, clock):
        super().__init__(lines)
        self.clock = clock

    def poll(self, timeout):
        self.clock.now += 1.0
        return super().poll(timeout)


def test_checkpoint_back_off_doubles_caps_and_resets_on_the_agent_clock(tmp_path, monkeypatch, caplog):
    clock = FakeClock()
    agent = Agent.from_config(CONFIG, clock=clock)
    agent.CHECKPOINT_BACKOFF_MAX_S = 8.0
    attempts = []
    real_save = ckpt.save

    def flaky_save(directory, step, files, **kw):  # the disk is dead before t=35 and from t=50
        attempts.append(clock.now)
        if clock.now < 35 or clock.now >= 50:
            raise OSError(5, "Input/output error")
        return real_save(directory, step, files, **kw)

    monkeypatch.setattr(ckpt, "save", flaky_save)
    sink = JsonlSink(tmp_path / "out.jsonl")
    with caplog.at_level(logging.WARNING, logger="agent.agent"):
        stats = agent.run(Ticking([task_line(i) for i in range(60)], clock), sink, checkpoint_dir=tmp_path / "s",
                          checkpoint_every_s=float("inf"), checkpoint_every_tasks=1)
    sink.close()
    assert stats.tasks == 60
    # Task i is answered at t=i and a checkpoint is due after each. Time-based checkpoints are
    # off, so the delay starts at 1 s: 1, 2, 4, then 8 (the cap) until the disk comes back at
    # t=40; every task checkpoints again (reset), until it dies at t=50: 1, 2, 4, 8 again, and
    # the final checkpoint at t=61 (the empty poll) is attempted regardless.
    assert attempts == [1, 2, 4, 8, 16, 24, 32, 40, *range(41, 50), 50, 51, 53, 57, 61]
    failures = agent.registry.get_sample_value("metaagent_checkpoint_failures_total")
    assert failures == 12 and agent.counters["checkpoints"] == 10
    assert sum("checkpoint failed" in r.getMessage() for r in caplog.records) == 12
    assert any("next attempt in 8 s" in r.getMessage() for r in caplog.records)


def test_checkpoint_back_off_starts_from_every_s(tmp_path, monkeypatch):
    clock = FakeClock()
    agent = Agent.from_config(CONFIG, clock=clock)
    attempts = []

    def dead(directory, step, files, **kw):
        attempts.append(clock.now)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save", dead)
    lines = [task_line(i) for i in range(40)]

    class Slow(Ticking):  # 10 s per poll
        def poll(self, timeout):
            self.clock.now += 9.0
            return super().poll(timeout)

    agent.run(Slow(lines, clock), JsonlSink(tmp_path / "o.jsonl"), checkpoint_dir=tmp_path / "s",
              checkpoint_every_s=15.0)
    # due at t=20 (15 s after the start); then every 15, 30, 60, 120, 240 s; final at t=410
    assert attempts == [20, 40, 70, 130, 250, 410]


def test_daemon_with_unwritable_state_dir_exits_zero_and_logs(tmp_path):
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(task_line(i) for i in range(10)) + b"\n")
    (tmp_path / "blocker").write_text("file")
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(CONFIG))
    proc = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(cfg), "--input", "in.jsonl",
                           "--output", "out.jsonl", "--state-dir", "blocker/state", "--metrics-addr", "0",
                           "--progress", "off"], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "checkpoint failed" in proc.stderr
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 10


# -- checkpoint cadence -----------------------------------------------------------------------
class AllAtOnce(OneByOne):
    """Every record in the first poll: the agent, not the source, must cut the batch."""

    def poll(self, timeout):
        if self.i >= len(self.lines):
            self.exhausted = True
            return []
        self.i = len(self.lines)
        return [Record(line, i + 1) for i, line in enumerate(self.lines)]

    acked = 0

    def ack(self, position):
        self.acked = position

    def position(self):
        return {"offset": self.acked}


def test_every_tasks_holds_per_task_within_one_poll(tmp_path, monkeypatch):
    """60 records arrive in one poll (more than a micro-batch, with a bad record and feedback in
    between): a checkpoint follows every 7th answered task exactly, not once per poll, and
    records the acknowledged position of that moment."""
    lines = [task_line(i) for i in range(50)]
    lines.insert(10, b'{"type": "task", "id": "bad"')  # an error: not a task answered
    lines.insert(20, json.dumps({"type": "feedback", "id": "nobody", "y": [[0.0]]}).encode())
    saved = []
    real_save = ckpt.save

    def spy(directory, step, files, **kw):
        saved.append((kw["meta"]["tasks"], files["state.json"]["stream"]["source"]))
        return real_save(directory, step, files, **kw)

    monkeypatch.setattr(ckpt, "save", spy)
    agent = Agent.from_config({**CONFIG, "agent": {**CONFIG["agent"], "micro_batch": 8}})
    source = AllAtOnce(lines)
    sink = JsonlSink(tmp_path / "out.jsonl")
    stats = agent.run(source, sink, checkpoint_dir=tmp_path / "s", checkpoint_every_tasks=7)
    sink.close()
    assert stats.tasks == 50 and stats.errors == 1
    assert [t for t, _ in saved] == [7, 14, 21, 28, 35, 42, 49, 50]  # the last: the final checkpoint
    tasks_before = [sum(1 for line in lines[:j] if line.startswith(b'{"type": "task", "id": "t-')) for j in range(62)]
    for tasks, position in saved[:-1]:  # the position acknowledged covers exactly those tasks
        assert tasks_before[position["offset"]] == tasks
