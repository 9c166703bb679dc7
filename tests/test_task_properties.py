"""Property tests: whatever arrives, parsing yields a valid Task/Feedback or a TaskError with a
known code, never another exception."""

from __future__ import annotations

import copy
import io
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from agent.task import (
    CLASSIFICATION, ERROR_CODES, KINDS, REGRESSION, Feedback, IdRegistry, Limits, Task, TaskError,
    json_depth, parse_record, to_wire,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SMALL_LIMITS = Limits(max_record_bytes=20_000, max_elements=30, max_ways=3, max_shots=2, max_dim=4,
                      max_query=3, max_json_depth=9)

json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8))
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=16,
)


@st.composite
def valid_records(draw) -> dict:
    """A small valid task record; float values are float32 so that they round-trip exactly."""
    kind = draw(st.sampled_from(KINDS))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    feature_shape = draw(st.sampled_from([(1,), (3,), (2, 2), (1, 2, 3)]))
    n_query = draw(st.integers(1, 4))
    if kind == CLASSIFICATION:
        n_way, shots = draw(st.integers(1, 4)), draw(st.integers(1, 3))
        support_y = rng.permutation(np.repeat(np.arange(n_way), shots)).tolist()
        query_y = rng.integers(0, n_way, size=n_query).tolist()
    else:
        n_support, target_shape = draw(st.integers(1, 6)), draw(st.sampled_from([(), (1,), (2,)]))
        support_y = rng.normal(size=(n_support, *target_shape)).astype(np.float32).tolist()
        query_y = rng.normal(size=(n_query, *target_shape)).astype(np.float32).tolist()
    features = lambda n: rng.normal(size=(n, *feature_shape)).astype(np.float32).tolist()  # noqa: E731
    query = {"x": features(n_query)}
    if draw(st.booleans()):
        query["y"] = query_y
    return {"type": "task", "id": f"t-{draw(st.integers(0, 10**6))}", "kind": kind,
            "support": {"x": features(len(support_y)), "y": support_y}, "query": query,
            "meta": {"family": draw(st.sampled_from(["sinusoid", "glyphs"]))}}


def paths(value, prefix=()):
    """Every (path, value) inside a JSON value, the root included."""
    yield prefix, value
    if isinstance(value, dict):
        for key, child in value.items():
            yield from paths(child, prefix + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from paths(child, prefix + (index,))


MUTATIONS = ("drop", "replace", "nan", "inf", "wrap", "grow", "shrink", "stringify", "negate", "bump", "empty")


@st.composite
def mutated_records(draw) -> dict:
    record = draw(valid_records())
    for _ in range(draw(st.integers(1, 3))):
        candidates = [p for p, _ in paths(record) if p]
        # Half the time aim at structure (fields, arrays, rows, labels) rather than any leaf.
        structural = [p for p in candidates if len(p) <= 3 or p[-2] == "y"]
        path = draw(st.sampled_from(structural) | st.sampled_from(candidates))
        parent = record
        for key in path[:-1]:
            parent = parent[key]
        key, value = path[-1], parent[path[-1]]
        mutation = draw(st.sampled_from(MUTATIONS))
        if mutation == "drop":
            del parent[key]
        elif mutation == "replace":
            parent[key] = draw(json_values)
        elif mutation in ("nan", "inf"):
            parent[key] = math.nan if mutation == "nan" else -math.inf
        elif mutation == "wrap":
            parent[key] = [value]
        elif mutation == "grow" and isinstance(value, list):
            value.append(copy.deepcopy(value[-1]) if value else draw(json_scalars))
        elif mutation == "shrink" and isinstance(value, list) and value:
            value.pop(draw(st.integers(0, len(value) - 1)))
        elif mutation == "stringify":
            parent[key] = json.dumps(value)
        elif mutation == "negate" and isinstance(value, (int, float)) and not isinstance(value, bool):
            parent[key] = -value - 1
        elif mutation == "bump" and isinstance(value, (int, float)) and not isinstance(value, bool):
            parent[key] = value + draw(st.integers(1, 3))
        elif mutation == "empty":
            parent[key] = [] if isinstance(value, list) else {}
    return record


@st.composite
def mutated_lines(draw) -> bytes:
    line = json.dumps(draw(valid_records())).encode()
    mutation = draw(st.sampled_from(["truncate", "flip", "nest", "insert"]))
    at = draw(st.integers(0, len(line)))
    if mutation == "truncate":
        return line[:at]
    if mutation == "flip":
        return line[:at] + bytes([draw(st.integers(0, 255))]) + line[at + 1:]
    if mutation == "nest":
        depth = draw(st.integers(1, 5000))
        return line[:at] + b"[" * depth + line[at:]
    return line[:at] + draw(st.sampled_from([b'"', b"\\", b",", b"]", b"}", b"NaN", b"1e999", b"\xc3"])) + line[at:]


def assert_task_invariants(task: Task) -> None:
    assert isinstance(task, Task) and isinstance(task.id, str) and task.id
    assert task.kind in KINDS and isinstance(task.meta, dict)
    for x in (task.support_x, task.query_x):
        assert x.dtype == np.float32 and x.ndim >= 2 and np.isfinite(x).all() and not x.flags.writeable
    assert task.support_x.shape[0] >= 1 and task.query_x.shape[0] >= 1
    assert task.support_x.shape[1:] == task.query_x.shape[1:]
    assert task.support_y.shape[0] == task.support_x.shape[0]
    if task.query_y is not None:
        assert task.query_y.shape[0] == task.query_x.shape[0]
    if task.kind == CLASSIFICATION:
        assert task.support_y.dtype == np.int64 and task.support_y.ndim == 1
        assert task.n_way == task.support_y.max() + 1
        assert set(task.support_y.tolist()) == set(range(task.n_way))
        if task.query_y is not None:
            assert task.query_y.dtype == np.int64 and task.query_y.ndim == 1
            assert ((task.query_y >= 0) & (task.query_y < task.n_way)).all()
    else:
        assert task.n_way is None and task.support_y.dtype == np.float32 and np.isfinite(task.support_y).all()
        if task.query_y is not None:
            assert task.query_y.dtype == np.float32 and task.query_y.shape[1:] == task.support_y.shape[1:]
    tensors = task.to_tensors()
    assert tensors.support_x.shape == task.support_x.shape and tensors.n_way == task.n_way


def parse_or_error(line, **kwargs):
    """The parse result, or None after checking that the error is a known, well-formed TaskError."""
    try:
        result = parse_record(line, **kwargs)
    except TaskError as error:
        event(error.code)
        assert error.code in ERROR_CODES
        assert error.message and (error.field == "" or error.message.startswith(error.field))
        json.dumps(error.to_record(), allow_nan=False)
        return None
    event(type(result).__name__)
    if isinstance(result, Task):
        assert_task_invariants(result)
    else:
        assert isinstance(result, Feedback) and result.y.ndim >= 1
    return result


@FAST
@given(valid_records())
def test_valid_records_round_trip(record):
    task = parse_or_error(json.dumps(record))
    assert task is not None
    assert json.loads(json.dumps(to_wire(task))) == record


@FAST
@given(mutated_records(), st.booleans())
def test_mutated_records_parse_or_fail_cleanly(record, small_limits):
    parse_or_error(json.dumps(record), limits=SMALL_LIMITS if small_limits else Limits())


@FAST
@given(mutated_lines())
def test_mutated_lines_parse_or_fail_cleanly(line):
    parse_or_error(line, limits=SMALL_LIMITS)


@FAST
@given(json_values)
def test_random_json_fails_cleanly(value):
    parse_or_error(json.dumps(value))
    parse_or_error(json.dumps({"type": "task", "id": "x", "kind": "classification", "support": value, "query": value}))
    parse_or_error(json.dumps({"type": "feedback", "id": "x", "y": value}))


@FAST
@given(st.binary(max_size=200))
def test_random_bytes_fail_cleanly(data):
    parse_or_error(data)


@FAST
@given(valid_records(), st.integers(0, 3))
def test_duplicates_are_rejected_and_registry_stays_bounded(record, extra):
    seen = IdRegistry(max_size=2)
    line = json.dumps(record)
    assert parse_or_error(line, seen=seen) is not None
    with pytest.raises(TaskError) as caught:
        parse_record(line, seen=seen)
    assert caught.value.code == "duplicate_id"
    for i in range(extra):
        seen.add(f"other-{i}")
    assert len(seen) <= 2


@FAST
@given(st.lists(st.integers(-2, 6), min_size=1, max_size=8), st.lists(st.integers(-2, 6), min_size=1, max_size=4))
def test_any_labels_give_a_consistent_task_or_a_label_error(support_y, query_y):
    record = {"type": "task", "id": "c", "kind": CLASSIFICATION,
              "support": {"x": [[float(i)] for i in range(len(support_y))], "y": support_y},
              "query": {"x": [[0.0]] * len(query_y), "y": query_y}}
    task = parse_or_error(json.dumps(record))
    labels_ok = min(support_y) >= 0 and set(support_y) == set(range(max(support_y) + 1))
    query_ok = labels_ok and all(0 <= label <= max(support_y) for label in query_y)
    assert (task is not None) == query_ok
    if task is None:
        with pytest.raises(TaskError) as caught:
            parse_record(json.dumps(record))
        assert caught.value.code in ("bad_label", "missing_class")


shapes = st.lists(st.integers(0, 3), max_size=3).map(tuple)


@FAST
@given(st.integers(1, 3), shapes, st.integers(1, 3), shapes)
def test_any_target_shapes_give_a_consistent_task_or_a_shape_error(n_support, support_shape, n_query, query_shape):
    support_y, query_y = np.zeros((n_support, *support_shape)), np.ones((n_query, *query_shape))
    record = {"type": "task", "id": "r", "kind": REGRESSION,
              "support": {"x": [[1.0]] * n_support, "y": support_y.tolist()},
              "query": {"x": [[2.0]] * n_query, "y": query_y.tolist()}}
    task = parse_or_error(json.dumps(record))
    fits = support_shape == query_shape and 0 not in support_shape
    assert (task is not None) == fits
    if task is None:
        with pytest.raises(TaskError) as caught:
            parse_record(json.dumps(record))
        assert caught.value.code == "bad_target_shape"
    else:
        assert task.support_y.shape == (n_support, *support_shape)


def true_depth(value) -> int:
    if isinstance(value, (list, dict)):
        children = value.values() if isinstance(value, dict) else value
        return 1 + max((true_depth(child) for child in children), default=0)
    return 0


tricky_text = st.text(alphabet=st.sampled_from('[]{}"\\ab,é\n'), max_size=8)
tricky_json = st.recursive(
    st.none() | st.integers() | tricky_text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(tricky_text, children, max_size=3),
    max_leaves=20,
)


@FAST
@given(tricky_json, st.integers(1, 17), st.booleans())
def test_json_depth_is_exact_for_valid_json(value, chunk_size, ascii_only):
    text = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert json_depth(text, chunk_size=chunk_size) == true_depth(value)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("npz_root")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, support_x=np.arange(6, dtype=np.float32).reshape(3, 2))
    (root / "good.npz").write_bytes(buffer.getvalue())
    return root


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_corrupted_npz_fails_cleanly(data_root, data):
    good = (data_root / "good.npz").read_bytes()
    at = data.draw(st.integers(0, len(good) - 1))
    corrupted = good[:at] + bytes([data.draw(st.integers(0, 255))]) + good[at + 1:]
    if data.draw(st.booleans()):
        corrupted = corrupted[:data.draw(st.integers(0, len(corrupted)))]
    (data_root / "bad.npz").write_bytes(corrupted)
    record = {"type": "task", "id": "n", "kind": REGRESSION,
              "support": {"x": {"npz": "bad.npz", "key": "support_x"}, "y": [1.0, 2.0, 3.0]},
              "query": {"x": [[0.0, 0.0]]}}
    parse_or_error(json.dumps(record), data_root=data_root)
