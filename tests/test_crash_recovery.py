"""SIGKILL at random points, restart, repeat (issue 7): every task answered, none twice, and the
final memory bank, online model and counters equal those of a run that was never killed.

Kills are seeded and land at three kinds of moments: after a random number of answers, while a
checkpoint is being written (a ``.tmp-ckpt-*`` directory exists) and right after a new
checkpoint appears. Each restart of a chain is also the next trial's victim, so 20+ kills cost
about as many daemon starts.

A cold ``python -m agent run`` spends ~4 s of CPU importing torch, torch._dynamo (which
``torch.optim`` pulls in) and River before it reads a record; 20+ of those would dominate the
test. So the victims are forked from a *zygote*: a process that imported the agent's modules
once and then forks one child per start; the child runs ``agent.cli.main(["run", ...])``, the
same entry point as ``python -m agent run``, as a separate process that is SIGKILLed for real.
Nothing of the agent's state is created before the fork. The run that is never killed and the
last (uninterrupted) restart of every chain are plain ``python -m agent run`` processes, so the
comparison also covers cold starts.
"""

import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from agent import checkpoint as ckpt
from agent.agent import Agent
from helpers import write_sine_inputs

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"model": {"arch": "mlp", "hidden": [8]}, "agent": {"in_shape": [1], "out_dim": 1},
          "compute": {"levels": [[1, 1]]}, "memory": {"capacity": 5000},
          "online": {"every": 8, "replay": 2, "replay_capacity": 50},
          "checkpoint": {"every_s": 1000.0, "every_tasks": 10, "keep": 3}}
N_TASKS = 150
MIN_KILLS = 21
MODES = ("answers", "during_checkpoint", "after_checkpoint")

ZYGOTE = r"""
import json, os, sys, traceback
import agent.cli, agent.daemon, agent.agent, agent.streams, agent.online.wiring, torch._dynamo  # paid once
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        rc = 1
        try:
            os.chdir(req["cwd"])
            fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            rc = agent.cli.main(req["argv"])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
    print("pid", pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print("exit", os.waitstatus_to_exitcode(status), flush=True)
"""


def run_args(config: Path) -> list[str]:
    return ["run", "--config", str(config), "--input", "../in.jsonl", "--output", "out.jsonl", "--state-dir", "state",
            "--metrics-addr", "0", "--progress", "off"]


def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def cold_start(workdir: Path, config: Path) -> subprocess.Popen:
    """``python -m agent run``: a fresh interpreter."""
    return subprocess.Popen([sys.executable, "-m", "agent", *run_args(config)], cwd=workdir, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


class Zygote:
    """Forks daemon processes from one interpreter that already imported the agent."""

    def __init__(self, log: Path):
        self.log, self.live = log, None
        with open(log, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], env=env(), stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, bufsize=0)

    def read(self, expect: str) -> int:
        """One line, read byte by byte from the pipe: nothing is buffered past it, so ``select``
        on the pipe tells whether the next line (a child's exit) has come."""
        line = b""
        while not line.endswith(b"\n"):
            byte = os.read(self.proc.stdout.fileno(), 1)
            if not byte:
                break
            line += byte
        words = line.decode().split()
        assert len(words) == 2 and words[0] == expect, f"zygote said {words}: {self.log.read_text()[-2000:]}"
        return int(words[1])

    def start(self, workdir: Path, config: Path) -> "Forked":
        log = workdir / "daemon.log"
        request = {"cwd": str(workdir), "log": str(log), "argv": run_args(config)}
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.live = self.read("pid")
        return Forked(self, self.live, log)

    def close(self):
        if self.live is not None:  # a test failure left a daemon running: stop it, or the zygote waits forever
            try:
                os.kill(self.live, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Forked:
    """The part of :class:`subprocess.Popen` that :func:`kill_at` uses, for a zygote's child."""

    def __init__(self, zygote: Zygote, pid: int, log: Path):
        self.zygote, self.pid, self.log, self.returncode = zygote, pid, log, None

    def poll(self):
        if self.returncode is None and select.select([self.zygote.proc.stdout], [], [], 0)[0]:
            self.returncode = self.zygote.read("exit")
            self.zygote.live = None
        return self.returncode

    def wait(self, timeout: float = 120.0):
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"daemon {self.pid} still running after {timeout}s")
            select.select([self.zygote.proc.stdout], [], [], 0.05)
        return self.returncode

    def send_signal(self, sig):
        os.kill(self.pid, sig)  # the zygote reaps it only after it died: the pid cannot be reused before

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def errors(self) -> str:
        return self.log.read_text()[-2000:] if self.log.exists() else ""


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def _entries(state: Path) -> list[str]:
    try:
        return os.listdir(state)
    except FileNotFoundError:
        return []


def kill_at(proc, workdir: Path, mode: str, rng: random.Random, timeout: float = 60.0) -> bool:
    """Wait for the moment ``mode`` names and SIGKILL; False when the process ended first."""
    out, state = workdir / "out.jsonl", workdir / "state"
    target = _lines(out) + rng.randint(1, 40)
    known = {e for e in _entries(state) if e.startswith("ckpt-")}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if mode == "answers":
            hit = _lines(out) >= target
        elif mode == "during_checkpoint":  # a write lasts tens of milliseconds: poll every ~0.5 ms
            hit = any(e.startswith(".tmp-ckpt-") for e in _entries(state))
        else:  # "after_checkpoint"
            hit = any(e.startswith("ckpt-") and e not in known for e in _entries(state))
        if hit:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert proc.returncode == -signal.SIGKILL, proc.returncode
            return True
        time.sleep(0.0005 if mode == "during_checkpoint" else 0.002)
    proc.kill()
    proc.wait()
    raise AssertionError(f"no {mode} moment within {timeout}s")


def final_state(workdir: Path) -> dict:
    found = ckpt.latest_good(workdir / "state")
    assert found is not None and ckpt.verify(found.path) == []
    agent = Agent.load(found.path)
    entries = agent.memory.state_dict()
    return {"counters": {k: v for k, v in agent.counters.items() if k != "checkpoints"},
            "memory_meta": [{k: m[k] for k in ("task_id", "algorithm", "budget", "quality", "failed", "seq")}
                            for m in entries["meta"]["entries"]],
            "memory_arrays": entries["arrays"], "meta": {k: v.detach().clone() for k, v in agent.meta.items()},
            "pending": sorted(agent.pending), "seen": sorted(agent.seen), "replay_seen": agent.replay_seen,
            "offset": found.load("state.json")["stream"]["source"]["offset"]}


def assert_same_state(got: dict, want: dict, label: str) -> None:
    for key in ("counters", "memory_meta", "pending", "seen", "replay_seen", "offset"):
        assert got[key] == want[key], (label, key, got[key] if key != "seen" else len(got[key]))
    assert got["memory_arrays"].keys() == want["memory_arrays"].keys(), label
    for k, v in want["memory_arrays"].items():
        np.testing.assert_array_equal(got["memory_arrays"][k], v, err_msg=f"{label}: memory {k}")
    assert got["meta"].keys() == want["meta"].keys()
    for k, v in want["meta"].items():
        torch.testing.assert_close(got["meta"][k], v, rtol=0, atol=0, msg=f"{label}: online model {k}")


def answered(workdir: Path) -> list[str]:
    rows = [json.loads(line) for line in (workdir / "out.jsonl").read_text().splitlines()]
    return [r["id"] for r in rows if "error" not in r]


def test_sigkill_at_random_points_then_restart(tmp_path):
    ids = write_sine_inputs(tmp_path / "in.jsonl", N_TASKS, shots=5)
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(CONFIG))
    t0 = time.monotonic()
    zygote = Zygote(tmp_path / "zygote.log")  # imports while the reference run below works
    try:
        ref = tmp_path / "ref"
        ref.mkdir()
        proc = cold_start(ref, config)
        assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
        reference = final_state(ref)
        assert sorted(answered(ref)) == sorted(ids)
        assert reference["counters"]["online_updates"] > 0 and len(reference["memory_meta"]) > 50

        rng = random.Random(1234)
        kills, trials, chain = 0, [], 0
        while kills < MIN_KILLS:
            chain += 1
            assert chain <= 8, f"only {kills} kills landed in {chain - 1} chains"
            work = tmp_path / f"chain{chain}"
            work.mkdir()
            while kills < MIN_KILLS:
                mode = MODES[len(trials) % 3] if rng.random() < 0.7 else rng.choice(MODES)
                proc = zygote.start(work, config)
                landed = kill_at(proc, work, mode, rng)
                trials.append((chain, mode, landed))
                print(f"trial {len(trials)} chain {chain} {mode} landed={landed} t={time.monotonic() - t0:.1f}s",
                      flush=True)
                if not landed:  # the stream ended first: the chain is complete
                    assert proc.returncode == 0, proc.errors()
                    break
                kills += 1
            else:  # kill budget reached mid-chain: finish it with a cold, uninterrupted restart
                proc = cold_start(work, config)
                assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
            got = answered(work)
            assert sorted(set(got)) == sorted(ids), f"chain {chain}: {len(set(ids) - set(got))} tasks never answered"
            dupes = sorted({i for i in got if got.count(i) > 1})
            assert not dupes, f"chain {chain}: answered twice: {dupes[:10]}"
            assert not [e for e in _entries(work / "state") if e.startswith(".")], "temporary checkpoint dirs left"
            # Same answered ids, memory bank, online model and counters as the run never killed.
            assert_same_state(final_state(work), reference, f"chain {chain}")
    finally:
        zygote.close()
    by_mode = {m: sum(1 for _, mm, landed in trials if mm == m and landed) for m in MODES}
    print(f"\n{kills} kills in {chain} chains {by_mode}, {time.monotonic() - t0:.0f}s")
    assert kills >= 20 and all(by_mode[m] >= 4 for m in MODES), by_mode
