"""SIGKILL at random points, restart, repeat (issue 7): every task answered, none twice, and the
final state equals that of a run that was never killed.

Kills are seeded and land at three kinds of moments: after a random number of answers, while a
checkpoint is being written (a ``.tmp-ckpt-*`` directory exists) and right after a new
checkpoint appears. Each restart of a chain is also the next trial's victim, so 20+ kills cost
about as many process starts.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import checkpoint as ckpt
from agent.agent import Agent
from helpers import write_sine_inputs

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"model": {"arch": "mlp", "hidden": [8]}, "agent": {"in_shape": [1], "out_dim": 1},
          "compute": {"levels": [[1, 1]]}, "memory": {"capacity": 5000},
          "online": {"every": 8, "replay": 2, "replay_capacity": 50},
          "checkpoint": {"every_s": 1000.0, "every_tasks": 10, "keep": 3}}
N_TASKS = 300
MIN_KILLS = 20


def start(workdir: Path, config: Path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(config), "--input", "../in.jsonl",
                             "--output", "out.jsonl", "--state-dir", "state", "--metrics-addr", "0",
                             "--progress", "off"], cwd=workdir, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def _entries(state: Path) -> set[str]:
    try:
        return set(os.listdir(state))
    except FileNotFoundError:
        return set()


def kill_at(proc, workdir: Path, mode: str, rng: random.Random, timeout: float = 30.0) -> bool:
    """Wait for the moment ``mode`` names and SIGKILL; False when the process ended first."""
    out, state = workdir / "out.jsonl", workdir / "state"
    base = _lines(out)
    target = base + rng.randint(1, 150)
    known = {e for e in _entries(state) if e.startswith("ckpt-")}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if mode == "answers":
            hit = _lines(out) >= target
            time.sleep(0.002) if not hit else None
        elif mode == "during_checkpoint":  # tight loop: a checkpoint write lasts milliseconds
            hit = any(e.startswith(".tmp-ckpt-") for e in _entries(state))
        else:  # "after_checkpoint"
            hit = any(e.startswith("ckpt-") and e not in known for e in _entries(state))
        if hit:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
    proc.kill()
    proc.wait()
    raise AssertionError(f"no {mode} moment within {timeout}s")


def final_state(workdir: Path) -> dict:
    found = ckpt.latest_good(workdir / "state")
    assert found is not None and ckpt.verify(found.path) == []
    agent = Agent.load(found.path)
    return {"memory": len(agent.memory), "tasks": agent.counters["tasks"], "labelled": agent.counters["labelled"],
            "pending": len(agent.pending), "seen": sorted(agent.seen), "offset": found.load("state.json")["stream"]["source"]["offset"]}


def answered(workdir: Path) -> list[str]:
    rows = [json.loads(line) for line in (workdir / "out.jsonl").read_text().splitlines()]
    return [r["id"] for r in rows if "error" not in r]


@pytest.mark.skip(reason="unfinished (issue 7): on the shared 2-core box the first 'during_checkpoint' trial waited "
                         "30 s without seeing a .tmp-ckpt dir while the daemon did not finish 300 tasks; runtime "
                         "not yet under the 120 s goal. Needs profiling of checkpoint cost before enabling.")
def test_sigkill_at_random_points_then_restart(tmp_path):
    ids = write_sine_inputs(tmp_path / "in.jsonl", N_TASKS, shots=5)
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(CONFIG))
    t0 = time.monotonic()

    ref = tmp_path / "ref"
    ref.mkdir()
    proc = start(ref, config)
    assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()[-2000:]
    reference = final_state(ref)
    assert sorted(answered(ref)) == sorted(ids)

    rng = random.Random(1234)
    modes = ["answers", "during_checkpoint", "after_checkpoint"]
    kills, trials, chain = 0, [], 0
    while kills < MIN_KILLS:
        chain += 1
        assert chain <= 8, f"only {kills} kills landed in {chain - 1} chains"
        work = tmp_path / f"chain{chain}"
        work.mkdir()
        while kills < MIN_KILLS:
            mode = modes[len(trials) % 3] if rng.random() < 0.7 else rng.choice(modes)
            proc = start(work, config)
            landed = kill_at(proc, work, mode, rng)
            trials.append((chain, mode, landed))
            print(f"trial {len(trials)} chain {chain} {mode} landed={landed} t={time.monotonic() - t0:.1f}s", flush=True)
            if not landed:
                assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
                break
            kills += 1
        else:  # kill budget reached mid-chain: finish the chain with an uninterrupted restart
            proc = start(work, config)
            assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()[-2000:]
        got = answered(work)
        assert sorted(set(got)) == sorted(ids), f"chain {chain}: {len(set(ids) - set(got))} tasks never answered"
        dupes = sorted({i for i in got if got.count(i) > 1})
        assert not dupes, f"chain {chain}: answered twice: {dupes[:10]}"
        state = final_state(work)
        # Same answered ids, same memory bank, same counters as the run that was never killed.
        assert state == reference, (chain, {k: (state[k], reference[k]) for k in state if state[k] != reference[k] and k != "seen"})
    by_mode = {m: sum(1 for _, mm, landed in trials if mm == m and landed) for m in modes}
    print(f"\n{kills} kills in {chain} chains {by_mode}, {time.monotonic() - t0:.0f}s")
    assert all(by_mode[m] >= 3 for m in modes), by_mode
