"""Hostile input through the real daemon (issue 7): a seeded 10k-record mix of malformed and
adversarial records (see ``bench/fuzz.py`` for the generator) interleaved with valid sine tasks.

Checked: exit 0; one answer line per record, in order; every bad record gets exactly one error
line with a stable code (never ``internal``); every valid task is answered with one finite
prediction per query row; the daemon's peak RSS stays bounded; the run is quick. Plus a
hypothesis version over ``Agent.handle_line`` in-process, and regression tests for bugs found.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import fuzz  # noqa: E402  (bench/fuzz.py: the shared generator)

from agent.agent import Agent  # noqa: E402
from agent.metrics import INTERNAL_ERROR  # noqa: E402
from agent.task import ERROR_CODES  # noqa: E402

N_RECORDS = 10_000
MAX_RSS_MIB = 1536


def test_fuzz_10k_records_through_the_daemon(tmp_path):
    data_root = fuzz.prepare_data_root(tmp_path)
    records = fuzz.generate(N_RECORDS, seed=7, oversized=3)
    cases = {e.case for _, e in records}
    assert {"oversized", "c_npz", "c_deep", "c_garbage", "c_duplicate", "blank", "valid"} <= cases
    fuzz.write_input(tmp_path / "fuzz.jsonl", records)
    config = fuzz.write_config(tmp_path / "cfg.json", data_root)
    rc, stderr, wall, hwm_kib = fuzz.run_daemon(tmp_path, config, tmp_path / "fuzz.jsonl", tmp_path / "out.jsonl",
                                                timeout=300)
    assert rc == 0, stderr[-3000:]
    problems, codes, answered = fuzz.check(records, tmp_path / "out.jsonl")
    n_valid = sum(e.what == "ok" for _, e in records)
    n_bad = sum(e.what == "error" for _, e in records)
    print(f"\n{len(records)} lines, {n_valid} valid tasks answered {answered}, {n_bad} bad records, "
          f"codes {dict(codes)}, peak RSS {hwm_kib / 1024:.0f} MiB, {wall:.1f}s")
    assert not problems, "\n".join(problems[:20])
    assert answered == n_valid and sum(codes.values()) == n_bad
    assert INTERNAL_ERROR not in codes
    assert hwm_kib is not None and hwm_kib / 1024 < MAX_RSS_MIB, f"peak RSS {hwm_kib / 1024:.0f} MiB"
    # The metrics count the same errors (the final checkpoint holds the agent's counters).
    from agent import checkpoint as ckpt

    state = ckpt.latest_good(tmp_path / "state").load("state.json")
    assert state["counters"]["errors"] == n_bad


# -- in-process, hypothesis -----------------------------------------------------------------
_AGENT = None


def _agent(tmp_root: Path) -> Agent:
    global _AGENT
    if _AGENT is None:
        cfg = json.loads(json.dumps(fuzz.CONFIG))
        cfg["agent"]["data_root"] = str(fuzz.prepare_data_root(tmp_root))
        _AGENT = Agent.from_config(cfg)
    return _AGENT


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=30)

numbers = st.one_of(st.floats(-10, 10, allow_nan=False), st.integers(-3, 3), st.just(float("nan")),
                    st.just(float("inf")), st.just("1"), st.none(), st.just([1.0]))


@st.composite
def near_valid(draw):
    """Task records that are valid or broken in one or two places."""
    n_s, n_q = draw(st.integers(0, 6)), draw(st.integers(0, 4))
    width = draw(st.sampled_from([1, 1, 1, 2, 0]))
    row = lambda: draw(st.lists(numbers, min_size=width, max_size=width))  # noqa: E731
    rec = {"type": draw(st.sampled_from(["task", "task", "task", "feedback", "x"])),
           "id": draw(st.one_of(st.text(min_size=1, max_size=12), st.integers(), st.just(""))),
           "kind": draw(st.sampled_from(["regression", "regression", "classification", "other"])),
           "support": {"x": [row() for _ in range(n_s)], "y": draw(st.lists(
               st.one_of(st.lists(numbers, min_size=1, max_size=2), st.integers(-1, 3)), min_size=n_s, max_size=n_s + 1))},
           "query": {"x": [row() for _ in range(n_q)]}}
    if draw(st.booleans()):
        rec["query"]["y"] = draw(st.lists(st.lists(numbers, min_size=1, max_size=1), min_size=n_q, max_size=n_q))
    for key in draw(st.lists(st.sampled_from(["type", "id", "kind", "support", "query"]), max_size=1)):
        rec[key] = draw(json_values)
    return rec


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(st.one_of(near_valid().map(lambda r: json.dumps(r)), json_values.map(json.dumps),
                 st.binary(max_size=300), st.text(max_size=200)))
def test_handle_line_never_raises_and_answers_once(tmp_path_factory, line):
    agent = _agent(tmp_path_factory.mktemp("fz", numbered=False) if _AGENT is None else Path("."))
    out = agent.handle_line(line)
    assert isinstance(out, list) and len(out) <= 1
    for record in out:
        json.dumps(record, allow_nan=False)  # the sink writes strict JSON
        if "error" in record:
            assert record["error"]["code"] in ERROR_CODES, record
        else:
            preds = np.asarray(record["predictions"], dtype=float)
            assert np.isfinite(preds).all()
            assert len(record["predictions"]) == len(json.loads(line)["query"]["x"])


# -- bugs found -----------------------------------------------------------------------------
def _task_line(task_id: str, labelled: bool = False) -> str:
    x = [[0.1 * i] for i in range(5)]
    query = {"x": [[0.5], [1.5]]}
    if labelled:
        query["y"] = [[0.0], [0.1]]
    return json.dumps({"type": "task", "id": task_id, "kind": "regression", "support": {"x": x, "y": x},
                       "query": query})


def test_bad_feedback_does_not_forget_the_task_id():
    agent = Agent.from_config(fuzz.CONFIG)
    assert "predictions" in agent.handle_line(_task_line("t-1"))[0]
    bad = agent.handle_line(json.dumps({"type": "feedback", "id": "t-1", "y": [[0.0, 1.0]] * 3}))
    assert bad[0]["error"]["code"] in ERROR_CODES
    again = agent.handle_line(_task_line("t-1"))
    assert again and again[0].get("error", {}).get("code") == "duplicate_id", again


def test_bad_feedback_in_a_micro_batch_does_not_forget_the_task_id():
    # The same through handle_records (the daemon's path): task, bad feedback, duplicate task.
    agent = Agent.from_config(fuzz.CONFIG)
    bad = json.dumps({"type": "feedback", "id": "t-2", "y": [[0.0, 1.0]] * 3})
    outs = agent.handle_records([_task_line("t-2"), bad, _task_line("t-2")])
    assert "predictions" in outs[0][0]
    assert outs[1][0]["error"]["code"] in ERROR_CODES
    assert outs[2][0]["error"]["code"] == "duplicate_id"
    assert "t-2" in agent.seen


def test_a_task_the_model_refuses_frees_its_id():
    # The other side of the rule: the task that registered an id and was refused forgets it.
    agent = Agent.from_config(fuzz.CONFIG)
    wide = json.loads(_task_line("t-3"))
    wide["support"]["x"] = [[0.1, 0.2]] * 5
    wide["query"]["x"] = [[0.5, 0.5]]
    assert agent.handle_line(json.dumps(wide))[0]["error"]["code"] == "dim_mismatch"
    assert "predictions" in agent.handle_line(_task_line("t-3"))[0]
