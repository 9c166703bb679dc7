"""The task contract: one test per error code, round trips, npz references, outputs."""

from __future__ import annotations

import copy
import doctest
import json
import os
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch

import agent.task as task_module
from agent.algorithms.base import TaskTensors
from agent.task import (
    CLASSIFICATION, ERROR_CODES, REGRESSION, Feedback, IdRegistry, Limits, Outcome, Task, TaskError,
    error_record, json_depth, parse_record, task_from_dict, to_wire,
)


def classification_record(**changes) -> dict:
    record = {
        "type": "task", "id": "t-1", "kind": "classification",
        "support": {"x": [[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]], "y": [0, 1, 1]},
        "query": {"x": [[0.2, 0.8], [0.9, 0.1]], "y": [0, 1]},
        "meta": {"source": "test", "family": "toy"},
    }
    record.update(changes)
    return record


def regression_record(**changes) -> dict:
    record = {
        "type": "task", "id": "r-1", "kind": "regression",
        "support": {"x": [[0.0], [1.0], [2.0]], "y": [[0.0], [1.0], [4.0]]},
        "query": {"x": [[3.0]], "y": [[9.0]]},
    }
    record.update(changes)
    return record


def parse(record, **kwargs):
    return parse_record(record if isinstance(record, (str, bytes)) else json.dumps(record), **kwargs)


def expect_error(record, code, field, **kwargs) -> TaskError:
    with pytest.raises(TaskError) as caught:
        parse(record, **kwargs)
    error = caught.value
    assert error.code == code, error.message
    assert error.field == field
    assert error.message.startswith(f"{field}: ") if field else error.message
    return error


def with_path(record: dict, path: str, value) -> dict:
    """A copy of ``record`` with the dotted ``path`` set to ``value`` (deleted when value is DROP)."""
    record = copy.deepcopy(record)
    *parents, last = path.split(".")
    node = record
    for key in parents:
        node = node[key]
    if value is DROP:
        del node[last]
    else:
        node[last] = value
    return record


DROP = object()


def save_npz(path, **arrays):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


# -- one test per error code ------------------------------------------------------------------

def test_bad_json():
    error = expect_error('{"type": "task", "id": ', "bad_json", "")
    assert "not valid JSON" in error.message
    expect_error(b"\xff\xfe{}", "bad_json", "")
    expect_error("[1, 2]", "bad_json", "")
    expect_error("   \n", "bad_json", "")


def test_missing_field():
    expect_error(with_path(classification_record(), "support.y", DROP), "missing_field", "support.y")
    expect_error(with_path(classification_record(), "kind", DROP), "missing_field", "kind")
    expect_error(with_path(classification_record(), "type", DROP), "missing_field", "type")
    expect_error(with_path(classification_record(), "query", DROP), "missing_field", "query")


def test_bad_type():
    expect_error(classification_record(type="banana"), "bad_type", "type")
    expect_error(classification_record(id=17), "bad_type", "id")
    expect_error(classification_record(id=""), "bad_type", "id")
    expect_error(classification_record(meta=[1]), "bad_type", "meta")
    expect_error(classification_record(support="nope"), "bad_type", "support")
    expect_error(with_path(classification_record(), "support.x", "nope"), "bad_type", "support.x")
    error = expect_error(with_path(classification_record(), "support.x", [[0, 1], [1, "a"], [0, 0]]), "bad_type", "support.x[1][1]")
    assert "number" in error.message


def test_bad_kind():
    error = expect_error(classification_record(kind="clustering"), "bad_kind", "kind")
    assert "clustering" in error.message


def test_ragged_array():
    error = expect_error(with_path(classification_record(), "support.x", [[0.0, 1.0], [1.0], [0.5, 0.5]]),
                         "ragged_array", "support.x[1]")
    assert "support.x[0] has 2" in error.message
    expect_error(with_path(classification_record(), "query.x", [[0.0, [1.0]], [1.0, 2.0]]), "ragged_array", "query.x[0][1]")
    expect_error(with_path(classification_record(), "query.x", [[0.0, 1.0], 3.0]), "ragged_array", "query.x[1]")


def test_shape_mismatch():
    error = expect_error(with_path(classification_record(), "support.y", [0, 1]), "shape_mismatch", "support.y")
    assert "2 entries for 3 examples" in error.message
    expect_error(with_path(regression_record(), "query.y", [[1.0], [2.0]]), "shape_mismatch", "query.y")
    expect_error(with_path(classification_record(), "support.x", [1.0, 2.0, 3.0]), "shape_mismatch", "support.x")


def test_dim_mismatch():
    error = expect_error(with_path(classification_record(), "query.x", [[0.0, 1.0, 2.0]]), "dim_mismatch", "query.x")
    assert "(3,)" in error.message and "(2,)" in error.message


def test_non_finite():
    line = json.dumps(classification_record()).replace("[1.0, 0.0]", "[NaN, 0.0]", 1)
    expect_error(line, "non_finite", "support.x[1][0]")
    expect_error(with_path(regression_record(), "support.y", [[0.0], [1e39], [1.0]]), "non_finite", "support.y[1][0]")
    expect_error(json.dumps(regression_record()).replace("[9.0]", "[-Infinity]"), "non_finite", "query.y[0][0]")


def test_empty_support():
    record = with_path(with_path(classification_record(), "support.x", []), "support.y", [])
    error = expect_error(record, "empty_support", "support.x")
    assert "no examples" in error.message


def test_empty_query():
    record = with_path(with_path(classification_record(), "query.x", []), "query.y", [])
    expect_error(record, "empty_query", "query.x")


def test_bad_label():
    error = expect_error(with_path(classification_record(), "support.y", [0, 1.5, 1]), "bad_label", "support.y[1]")
    assert "integers" in error.message
    expect_error(with_path(classification_record(), "support.y", [0, -1, 1]), "bad_label", "support.y[1]")
    expect_error(with_path(classification_record(), "support.y", [0, True, 1]), "bad_label", "support.y[1]")
    error = expect_error(with_path(classification_record(), "query.y", [1, 2]), "bad_label", "query.y[1]")
    assert "0..1" in error.message
    expect_error(with_path(classification_record(), "support.y", [[0], [1], [1]]), "bad_label", "support.y")


def test_missing_class():
    error = expect_error(with_path(classification_record(), "support.y", [0, 2, 2]), "missing_class", "support.y")
    assert "class 1" in error.message
    # A huge label is a missing class, found without allocating per-class counts.
    error = expect_error(with_path(classification_record(), "support.y", [0, 1, 2**62]), "missing_class", "support.y")
    assert "class 2" in error.message


def test_bad_target_shape():
    record = with_path(regression_record(), "query.y", [[9.0, 1.0]])
    error = expect_error(record, "bad_target_shape", "query.y")
    assert "(2,)" in error.message and "(1,)" in error.message
    expect_error(with_path(regression_record(), "support.y", [[], [], []]), "bad_target_shape", "support.y")


@pytest.mark.parametrize("limits, field", [
    (Limits(max_elements=5), "support.x"),
    (Limits(max_dim=1), "support.x"),
    (Limits(max_query=1), "query.x"),
    (Limits(max_ways=1), "support.y"),
    (Limits(max_shots=1), "support.y"),
])
def test_too_large(limits, field):
    error = expect_error(classification_record(), "too_large", field, limits=limits)
    assert "max_" in error.message


def test_too_large_regression_shots():
    expect_error(regression_record(), "too_large", "support.x", limits=Limits(max_shots=2))


def test_too_deep():
    deep = classification_record(meta={"nested": json.loads("[" * 40 + "]" * 40)})
    error = expect_error(deep, "too_deep", "")
    assert "nesting" in error.message
    # Far deeper than the interpreter's recursion limit: still a clean error.
    expect_error("[" * 200_000, "too_deep", "")
    expect_error('{"a":' * 200_000, "too_deep", "")


def test_path_escape(tmp_path):
    ref = {"npz": "../outside.npz", "key": "support_x"}
    error = expect_error(with_path(classification_record(), "support.x", ref), "path_escape", "support.x.npz", data_root=tmp_path)
    assert "'..'" in error.message


def test_npz_error(tmp_path):
    save_npz(tmp_path / "a.npz", support_x=np.zeros((3, 2), np.float32))
    ref = {"npz": "a.npz", "key": "nope"}
    error = expect_error(with_path(classification_record(), "support.x", ref), "npz_error", "support.x.key", data_root=tmp_path)
    assert "'nope'" in error.message


def test_duplicate_id():
    seen = IdRegistry()
    parse(classification_record(), seen=seen)
    error = expect_error(classification_record(), "duplicate_id", "id", seen=seen)
    assert error.record_id == "t-1"


def test_record_too_large():
    line = json.dumps(classification_record())
    error = expect_error(line, "record_too_large", "", limits=Limits(max_record_bytes=len(line) - 1))
    assert str(len(line) - 1) in error.message
    # Counted in bytes, not characters.
    wide = json.dumps(classification_record(meta={"note": "é" * 40}), ensure_ascii=False)
    expect_error(wide, "record_too_large", "", limits=Limits(max_record_bytes=len(wide) + 10))


def test_every_error_code_has_a_test():
    tested = {name[len("test_"):] for name in globals() if name.startswith("test_")}
    assert set(ERROR_CODES) <= tested
    assert len(set(ERROR_CODES)) == len(ERROR_CODES)
    assert all(getattr(task_module, code.upper()) == code for code in ERROR_CODES)


def test_unknown_code_is_a_programming_error():
    with pytest.raises(ValueError):
        TaskError("no_such_code", "x", "y")


# -- valid records and round trips ------------------------------------------------------------

def test_classification_round_trip():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 1, 4, 4)).astype(np.float32)
    record = classification_record(
        support={"x": x[:4].tolist(), "y": [0, 1, 2, 1]},
        query={"x": x[4:].tolist(), "y": [2, 0]},
    )
    task = parse(record)
    assert task.kind == CLASSIFICATION and task.n_way == 3
    assert task.support_x.dtype == np.float32 and task.support_y.dtype == np.int64
    np.testing.assert_array_equal(task.support_x, x[:4])
    np.testing.assert_array_equal(task.query_y, [2, 0])
    assert task.meta == {"source": "test", "family": "toy"}
    assert to_wire(task) == record
    again = parse(json.dumps(task.to_dict()))
    for name in ("support_x", "support_y", "query_x", "query_y"):
        np.testing.assert_array_equal(getattr(again, name), getattr(task, name))


@pytest.mark.parametrize("target_shape", [(), (2,), (2, 3)])
def test_regression_round_trip(target_shape):
    rng = np.random.default_rng(1)
    x = rng.uniform(-5, 5, size=(7, 1)).astype(np.float32)
    y = rng.normal(size=(7, *target_shape)).astype(np.float32)
    record = regression_record(support={"x": x[:5].tolist(), "y": y[:5].tolist()},
                               query={"x": x[5:].tolist(), "y": y[5:].tolist()})
    task = parse(record)
    assert task.n_way is None and task.support_y.shape == (5, *target_shape)
    assert task.support_y.dtype == np.float32
    np.testing.assert_array_equal(task.query_y, y[5:])
    assert json.loads(json.dumps(to_wire(task))) == {**record, "meta": {}}


def test_query_labels_are_optional():
    task = parse(with_path(classification_record(), "query.y", DROP))
    assert task.query_y is None and task.to_tensors().query_y is None
    assert "y" not in to_wire(task)["query"]
    assert parse(with_path(classification_record(), "query.y", None)).query_y is None


def test_integer_features_and_unknown_keys_are_accepted():
    record = with_path(classification_record(extra="ignored"), "support.x", [[0, 1], [1, 0], [2, 2]])
    assert parse(record).support_x.dtype == np.float32


def test_to_tensors():
    tensors = parse(classification_record()).to_tensors()
    assert isinstance(tensors, TaskTensors)
    assert tensors.support_x.dtype == torch.float32 and tensors.support_y.dtype == torch.int64
    assert tensors.kind == CLASSIFICATION and tensors.n_way == 2
    tensors.support_x.add_(1)  # a copy: the task's read-only arrays are not shared
    regression = parse(regression_record()).to_tensors()
    assert regression.kind == REGRESSION and regression.n_way is None
    assert regression.query_y.dtype == torch.float32


def test_task_arrays_are_read_only_and_callers_arrays_are_not_touched():
    x = np.zeros((2, 3), np.float32)
    task = Task("a", CLASSIFICATION, x, np.array([0, 1]), x[:1])
    with pytest.raises(ValueError):
        task.support_x[0, 0] = 1.0
    x[0, 0] = 1.0  # still writable
    with pytest.raises(Exception):
        task.id = "b"


def test_task_constructor_validates():
    with pytest.raises(TaskError) as caught:
        Task("a", CLASSIFICATION, np.zeros((2, 3)), np.array([0, 2]), np.zeros((1, 3)))
    assert caught.value.code == "missing_class"
    with pytest.raises(TaskError) as caught:
        Task("a", REGRESSION, [[1.0], [2.0, 3.0]], [1.0, 2.0], [[1.0]])
    assert caught.value.code == "ragged_array"
    with pytest.raises(TaskError) as caught:
        Task("a", REGRESSION, np.zeros((2, 1)), np.array(["a", "b"]), np.zeros((1, 1)))
    assert caught.value.code == "bad_type"


def test_feedback_joins_a_task():
    task = parse(with_path(classification_record(), "query.y", DROP))
    feedback = parse('{"type": "feedback", "id": "t-1", "y": [1, 0]}')
    assert isinstance(feedback, Feedback) and feedback.y.dtype == np.int64
    labelled = task.with_feedback(feedback)
    np.testing.assert_array_equal(labelled.query_y, [1, 0])
    assert task.query_y is None
    assert feedback.to_dict() == {"type": "feedback", "id": "t-1", "y": [1, 0]}
    for y, code in (([1], "shape_mismatch"), ([1, 5], "bad_label"), ([1.0, 0.5], "bad_label")):
        with pytest.raises(TaskError) as caught:
            task.with_feedback(Feedback("t-1", np.array(y)))
        assert caught.value.code == code and "query.y" in caught.value.message
    with pytest.raises(ValueError):
        task.with_feedback(Feedback("other", np.array([1, 0])))


def test_feedback_errors():
    for line, code, field in (('{"type": "feedback", "id": "t-1"}', "missing_field", "y"),
                              ('{"type": "feedback", "id": "t-1", "y": [NaN]}', "non_finite", "y[0]"),
                              ('{"type": "feedback", "id": 3, "y": [1]}', "bad_type", "id")):
        error = expect_error(line, code, field)
        assert error.record_id == (None if code == "bad_type" else "t-1")
    assert parse('{"type": "feedback", "id": "r", "y": [0.5, 1]}').y.dtype == np.float32


# -- npz references ---------------------------------------------------------------------------

def test_npz_inside_root(tmp_path):
    rng = np.random.default_rng(2)
    arrays = {"support_x": rng.normal(size=(4, 1, 3, 3)), "support_y": np.array([0, 1, 0, 1], np.int32),
              "query_x": rng.normal(size=(2, 1, 3, 3)).astype(np.float32)}
    save_npz(tmp_path / "episodes" / "e1.npz", **arrays)
    os.symlink(tmp_path / "episodes" / "e1.npz", tmp_path / "alias.npz")  # a symlink within the root is fine
    record = classification_record(
        support={"x": {"npz": "episodes/e1.npz", "key": "support_x"}, "y": {"npz": "alias.npz", "key": "support_y"}},
        query={"x": {"npz": "episodes/e1.npz", "key": "query_x"}},
    )
    task = parse(record, data_root=tmp_path)
    assert task.support_x.dtype == np.float32 and task.support_y.dtype == np.int64
    np.testing.assert_array_equal(task.support_x, arrays["support_x"].astype(np.float32))
    np.testing.assert_array_equal(task.query_x, arrays["query_x"])
    assert task.n_way == 2


def test_npz_rejects_paths_outside_the_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    save_npz(outside / "secret.npz", support_x=np.zeros((3, 2)))
    root.mkdir()
    os.symlink(outside / "secret.npz", root / "link.npz")
    os.symlink(outside, root / "linkdir")
    cases = {
        "../outside/secret.npz": "'..'",
        "sub/../../outside/secret.npz": "'..'",
        str(outside / "secret.npz"): "absolute",
        "link.npz": "outside the data root",
        "linkdir/secret.npz": "outside the data root",
        "a\x00b": "NUL",
    }
    for path, reason in cases.items():
        ref = {"npz": path, "key": "support_x"}
        error = expect_error(with_path(classification_record(), "support.x", ref), "path_escape", "support.x.npz", data_root=root)
        assert reason in error.message


def test_npz_other_failures(tmp_path):
    (tmp_path / "not_a_zip.npz").write_bytes(b"hello")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(tmp_path / "pickled.npz", "w") as archive:
        archive.write(tmp_path / "objects.npy", "support_x.npy")
    os.mkfifo(tmp_path / "fifo.npz")
    cases = [
        ({"npz": "missing.npz", "key": "support_x"}, "npz_error", "support.x.npz"),
        ({"npz": "not_a_zip.npz", "key": "support_x"}, "npz_error", "support.x.npz"),
        ({"npz": "fifo.npz", "key": "support_x"}, "npz_error", "support.x.npz"),
        ({"npz": "pickled.npz", "key": "support_x"}, "bad_type", "support.x"),
        ({"npz": "a.npz", "key": "support_x", "extra": 1}, "bad_type", "support.x"),
        ({"npz": 3, "key": "support_x"}, "bad_type", "support.x.npz"),
    ]
    for ref, code, field in cases:
        expect_error(with_path(classification_record(), "support.x", ref), code, field, data_root=tmp_path)
    expect_error(with_path(classification_record(), "support.x", cases[0][0]), "npz_error", "support.x.npz", data_root=None)
    save_npz(tmp_path / "scalar.npz", y=np.array(3))
    expect_error('{"type": "feedback", "id": "f", "y": {"npz": "scalar.npz", "key": "y"}}', "bad_target_shape", "y",
                 data_root=tmp_path)


def bomb_member(shape, payload: bytes) -> bytes:
    """A .npy member whose header declares ``shape`` float64 but carries only ``payload``."""
    header = {"descr": "<f8", "fortran_order": False, "shape": shape}
    text = repr(header).encode("latin1")
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + payload


def test_zip_bomb_is_rejected_before_allocation(tmp_path, monkeypatch):
    # Declares 8 TB; the file is a few hundred bytes. Loading it would allocate first.
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("support_x.npy", bomb_member((10**12,), b"\x00" * 4096))
    assert (tmp_path / "bomb.npz").stat().st_size < 2000

    def no_load(*args, **kwargs):
        raise AssertionError("np.load must not run on an oversized member")

    monkeypatch.setattr(np, "load", no_load)
    ref = {"npz": "bomb.npz", "key": "support_x"}
    error = expect_error(with_path(classification_record(), "support.x", ref), "too_large", "support.x", data_root=tmp_path)
    assert "declares shape" in error.message


def test_compressed_zeros_bomb_uses_little_memory(tmp_path):
    # 64 MiB of zeros deflates to ~64 KiB; the declared shape alone must stop it.
    zeros = bytes(64 * 2**20)
    with zipfile.ZipFile(tmp_path / "zeros.npz", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("support_x.npy", bomb_member((2**23,), zeros))
    del zeros
    ref = {"npz": "zeros.npz", "key": "support_x"}
    tracemalloc.start()
    try:
        expect_error(with_path(classification_record(), "support.x", ref), "too_large", "support.x", data_root=tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20


def test_npz_header_that_lies_about_its_data(tmp_path):
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as archive:
        archive.writestr("support_x.npy", bomb_member((3, 2), b"\x00" * 8))
    ref = {"npz": "short.npz", "key": "support_x"}
    expect_error(with_path(classification_record(), "support.x", ref), "npz_error", "support.x.npz", data_root=tmp_path)


# -- helpers the daemon uses ------------------------------------------------------------------

def test_duplicate_check_registers_only_valid_tasks():
    seen = IdRegistry()
    expect_error(classification_record(kind="nope"), "bad_kind", "kind", seen=seen)
    assert "t-1" not in seen
    parse(classification_record(), seen=seen)
    assert "t-1" in seen


def test_id_registry_is_bounded_and_restorable():
    seen = IdRegistry(max_size=3)
    for i in range(10):
        assert seen.add(f"t{i}")
    assert len(seen) == 3 and list(seen) == ["t7", "t8", "t9"]
    assert not seen.add("t7")  # refreshes t7
    seen.add("t10")
    assert list(seen) == ["t9", "t7", "t10"]
    seen.discard("t9")
    assert list(IdRegistry(3, seen)) == ["t7", "t10"]
    with pytest.raises(ValueError):
        IdRegistry(0)


def test_error_record_carries_the_id():
    with pytest.raises(TaskError) as caught:
        parse(classification_record(kind="nope"))
    record = caught.value.to_record()
    assert record == {"id": "t-1", "error": {"code": "bad_kind", "message": caught.value.message}}
    assert error_record(None, "bad_json", "m") == {"id": None, "error": {"code": "bad_json", "message": "m"}}
    json.dumps(record, allow_nan=False)


def test_outcome_to_json():
    outcome = Outcome(id="t-1", predictions=np.array([1, 0]), confidence=np.array([0.9, np.nan], np.float32),
                      algorithm="protonet", budget="small", inner_steps=np.int64(3), p_fail=np.float32(0.25),
                      flags=("backtracked",), latency_ms=float("inf"))
    line = outcome.to_json()
    assert "\n" not in line
    assert json.loads(line) == {"id": "t-1", "predictions": [1, 0], "confidence": [pytest.approx(0.9), None],
                                "algorithm": "protonet", "budget": "small", "inner_steps": 3, "p_fail": 0.25,
                                "flags": ["backtracked"], "latency_ms": None}
    tensors = Outcome("t", torch.tensor([[0.5]]), None, "maml", 2, 1, 0.1).to_dict()
    assert tensors["predictions"] == [[0.5]] and tensors["flags"] == [] and tensors["confidence"] is None


def test_limits_must_be_positive():
    with pytest.raises(ValueError):
        Limits(max_ways=0)
    with pytest.raises(ValueError):
        Limits(max_dim=True)


def test_json_depth_ignores_brackets_in_strings():
    assert json_depth(b"") == 0 and json_depth(b"1") == 0
    assert json_depth(b'["[[[", "\\"[[", "\\\\", [[]]]') == 3
    assert json_depth(b'{"a": "\\\\\\"[", "b": [1]}') == 2
    # Same answers across chunk boundaries, whatever falls on them.
    text = json.dumps({"k": ["\\\"[", [["]]\\"]], {"x": "\\\\"}]}).encode()
    assert {json_depth(text, chunk_size=n) for n in range(1, len(text) + 1)} == {json_depth(text)} == {4}


def test_parse_tolerates_newline_and_bytes():
    line = (json.dumps(classification_record()) + "\n").encode()
    assert parse_record(line).id == "t-1"
    assert task_from_dict(classification_record()).n_way == 2


def test_module_doctests():
    assert doctest.testmod(task_module).failed == 0


def test_json_depth_fast_path_equals_the_chunked_scan():
    # Without backslashes json_depth takes a fast path; the chunked scan (chunk_size 3 forces it)
    # must give the same depth, for valid and invalid texts alike (unbalanced, brackets in strings).
    rng = np.random.default_rng(0)
    alphabet = np.frombuffer(b'[]{}"a1 ,:', np.uint8)
    for _ in range(500):
        text = rng.choice(alphabet, size=int(rng.integers(0, 40))).tobytes()
        assert json_depth(text) == json_depth(text, chunk_size=3), text
    assert json_depth(b'[[["]]]"]') == 3 and json_depth(b']]]') == 0 and json_depth(b'"[[[[') == 0
