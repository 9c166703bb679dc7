"""The meta-agent command: train and eval end to end as real subprocesses, errors as one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent import __version__
from agent.cli import main

ROOT = Path(__file__).resolve().parents[1]

TINY = """\
model: {arch: mlp, hidden: [16, 16]}
algorithm: {name: maml, inner_lr: 0.01, inner_steps: 1}
data: {family: sinusoid, k_shot: 5, k_query: 5}
train: {meta_batch: 4, steps: 12, outer_lr: 0.01, val_every: 6, val_tasks: 8, checkpoint_every: 6}
eval: {episodes: 20, steps: [1, 3]}
"""


def run(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "agent", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_train_then_eval_end_to_end(tmp_path, capsys):
    (tmp_path / "tiny.yaml").write_text(TINY)
    out = tmp_path / "run"
    p = run("train", "--config", "tiny.yaml", "--out", str(out), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("done: step 12/12 val_loss ")
    assert sorted(x.name for x in (out / "checkpoints").iterdir()) == ["ckpt-000006", "ckpt-000012"]
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [0, 6, 12]
    assert "\r" not in p.stderr  # no progress bar without a terminal

    # train further, in process: resumes from step 12 (--steps overrides train.steps)
    assert main(["train", "--config", str(tmp_path / "tiny.yaml"), "--out", str(out), "--steps", "14"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("done: step 14/14") and "resuming" in captured.err

    p = run("eval", "--config", "tiny.yaml", "--checkpoint", str(out), "--episodes", "15", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "15 episodes, checkpoint step 14" in p.stdout and "steps=3: mse" in p.stdout
    rows = [json.loads(l) for l in (out / "eval-test-000014" / "episodes.jsonl").read_text().splitlines()]
    assert len(rows) == 15 and {"mse@0", "mse@1", "mse@3"} <= set(rows[0])
    summary = json.loads((out / "eval-test-000014" / "summary.json").read_text())
    assert summary["step"] == 14 and summary["summary"]["mse@3"]["n"] == 15


def test_bad_config_is_one_line_and_nonzero(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text(TINY.replace("meta_batch: 4", "meta_batch: 0"))
    assert main(["train", "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == "meta-agent: error: train.meta_batch: must be >= 1, got 0"
    assert not (tmp_path / "x").exists()


def test_in_process_errors_and_version(tmp_path, capsys):
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == f"meta-agent {__version__}"
    assert main(["eval", "--checkpoint", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("meta-agent: error: ") and "no such file" in err[0]
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read config" in capsys.readouterr().err
    assert main(["nonsense"]) == 2
    assert main([]) == 2
    (tmp_path / "c.yaml").write_text(TINY)
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--set", "train.nope=1"]) == 2
    assert capsys.readouterr().err.strip().endswith("train.nope: unknown key (known: meta_batch, steps, outer_lr, "
                                                    "optimizer, grad_clip, val_every, val_tasks, checkpoint_every, "
                                                    "keep_checkpoints, max_bad_steps, log_every, seed, threads, "
                                                    "time_limit_s, dtype, use_vmap)")


def test_eval_uses_the_checkpoint_config_when_none_given(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(TINY)
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "r"), "--steps", "2",
                 "--progress", "off"]) == 0
    assert main(["eval", "--checkpoint", str(tmp_path / "r" / "checkpoints"), "--episodes", "4", "--steps", "2",
                 "--out", str(tmp_path / "ev"), "--progress", "off"]) == 0
    assert "steps=2: mse" in capsys.readouterr().out
    assert len((tmp_path / "ev" / "episodes.csv").read_text().splitlines()) == 5
