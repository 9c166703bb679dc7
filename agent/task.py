"""Tasks, feedback and outcomes: the agent's wire contract and its validation.

A record is one line of JSON (see ``DESIGN.md``). :func:`parse_record` turns a line into a
:class:`Task` or a :class:`Feedback`, or raises :class:`TaskError` with a stable ``code`` (one of
:data:`ERROR_CODES`) and a message that names the offending field. Nothing else escapes it, so a
malformed record costs one error line and never the agent.

Checks run cheapest first and before anything large is allocated: the raw length, the JSON
nesting depth (scanned before ``json.loads``, so deep nesting cannot exhaust the stack), array
sizes while walking the nested lists, and the shape an ``.npz`` member declares in its header
before it is decompressed.

:class:`Task` validates itself on construction, so a task built in Python (a synthetic data
family, a test) obeys the same invariants as one read from the wire.

Examples
--------
>>> line = ('{"type": "task", "id": "t-1", "kind": "classification",'
...         ' "support": {"x": [[0.0, 1.0], [1.0, 0.0], [0.9, 0.1]], "y": [0, 1, 1]},'
...         ' "query": {"x": [[0.1, 0.9]]}}')
>>> task = parse_record(line)
>>> task.n_way, task.support_x.shape, task.support_y.dtype, task.query_y is None
(2, (3, 2), dtype('int64'), True)
>>> task.to_tensors().support_x.dtype
torch.float32

>>> try:
...     parse_record('{"type": "task", "id": "t-2", "kind": "classification",'
...                  ' "support": {"x": [[0.0], [1.0, 2.0]], "y": [0, 1]}, "query": {"x": [[0.0]]}}')
... except TaskError as error:
...     print(error.code, "|", error.message)
ragged_array | support.x[1]: has 2 elements where support.x[0] has 1

>>> feedback = parse_record('{"type": "feedback", "id": "t-1", "y": [0]}')
>>> task.with_feedback(feedback).query_y
array([0])

"""

from __future__ import annotations

import json
import math
import os
import stat
import threading
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from itertools import chain
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import numpy as np

if TYPE_CHECKING:  # torch loads only when tensors are asked for: parsing stays cheap
    from agent.algorithms.base import TaskTensors

__all__ = [
    "CLASSIFICATION", "REGRESSION", "KINDS", "ERROR_CODES", "Limits", "TaskError", "Task", "Feedback",
    "Outcome", "IdRegistry", "parse_record", "record_from_dict", "task_from_dict", "feedback_from_dict",
    "to_wire", "error_record", "json_depth",
]

CLASSIFICATION = "classification"
REGRESSION = "regression"
KINDS = (CLASSIFICATION, REGRESSION)

# Stable error codes: metrics label errors by them, so never rename one.
BAD_JSON = "bad_json"
MISSING_FIELD = "missing_field"
BAD_TYPE = "bad_type"
BAD_KIND = "bad_kind"
RAGGED_ARRAY = "ragged_array"
SHAPE_MISMATCH = "shape_mismatch"
DIM_MISMATCH = "dim_mismatch"
NON_FINITE = "non_finite"
EMPTY_SUPPORT = "empty_support"
EMPTY_QUERY = "empty_query"
BAD_LABEL = "bad_label"
MISSING_CLASS = "missing_class"
BAD_TARGET_SHAPE = "bad_target_shape"
TOO_LARGE = "too_large"
TOO_DEEP = "too_deep"
PATH_ESCAPE = "path_escape"
NPZ_ERROR = "npz_error"
DUPLICATE_ID = "duplicate_id"
RECORD_TOO_LARGE = "record_too_large"

ERROR_CODES = (
    BAD_JSON, MISSING_FIELD, BAD_TYPE, BAD_KIND, RAGGED_ARRAY, SHAPE_MISMATCH, DIM_MISMATCH,
    NON_FINITE, EMPTY_SUPPORT, EMPTY_QUERY, BAD_LABEL, MISSING_CLASS, BAD_TARGET_SHAPE, TOO_LARGE,
    TOO_DEEP, PATH_ESCAPE, NPZ_ERROR, DUPLICATE_ID, RECORD_TOO_LARGE,
)

MAX_ID_LENGTH = 256
MAX_NDIM = 32  # numpy allows 64; no sane feature tensor comes near this
_NUMERIC_KINDS = "biuf"


# -- errors and limits ----------------------------------------------------------------------

class TaskError(ValueError):
    """A record that breaks the contract.

    Parameters
    ----------
    code
        One of :data:`ERROR_CODES`.
    field
        Where the problem is, as a path into the record (``support.x[3]``, ``query.y``); empty
        for the record as a whole.
    message
        What is wrong there. :attr:`message` prefixes it with the field path.

    Attributes
    ----------
    record_id
        The record's ``id`` when it was read before the error, else ``None``.
    """

    def __init__(self, code: str, field: str, message: str):
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}")
        self.code = code
        self.field = field
        self.detail = message
        self.message = f"{field}: {message}" if field else message
        self.record_id: str | None = None
        super().__init__(self.message)

    def to_record(self, id: str | None = None) -> dict:
        """The error line: ``{"id", "error": {"code", "message"}}``."""
        return error_record(self.record_id if id is None else id, self.code, self.message)


def error_record(id: str | None, code: str, message: str) -> dict:
    """The output record for a task that could not be handled."""
    return {"id": id, "error": {"code": code, "message": message}}


@dataclass(frozen=True)
class Limits:
    """Size limits on incoming records; anything bigger is rejected before it is allocated.

    Parameters
    ----------
    max_record_bytes
        Length of one raw line, in bytes (``record_too_large``).
    max_elements
        Elements in any one array, inline or ``.npz`` (``too_large``).
    max_ways
        Classes in a classification task.
    max_shots
        Support examples per class (classification) or in all (regression).
    max_dim
        Feature elements per example (``prod(x.shape[1:])``), and target elements per example.
    max_query
        Query examples.
    max_json_depth
        Nesting of JSON arrays and objects; the record object itself is depth 1 (``too_deep``).
    """

    max_record_bytes: int = 32 * 2**20
    max_elements: int = 4 * 2**20
    max_ways: int = 100
    max_shots: int = 1000
    max_dim: int = 65536
    max_query: int = 10000
    max_json_depth: int = 32

    def __post_init__(self):
        for name, value in vars(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive integer, got {value!r}")


DEFAULT_LIMITS = Limits()


# -- the records ----------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Task:
    """One few-shot task, validated on construction.

    Arrays are converted to float32 (``x``, regression targets) or int64 (class labels) and made
    read-only. ``n_way`` is derived for classification (largest support label + 1; every class
    below it must have a support example) and ``None`` for regression.

    Parameters
    ----------
    id
        Non-empty string, unique within a stream.
    kind
        ``"classification"`` or ``"regression"``.
    support_x, support_y
        Support examples ``(n, ...)`` and their labels ``(n,)`` or targets ``(n, ...)``.
    query_x, query_y
        Query examples; their labels may be ``None`` (they arrive later as :class:`Feedback`).
    meta
        Free-form metadata. ``meta["family"]`` is for evaluation only: nothing may decide on it.

    Raises
    ------
    TaskError
        When any invariant fails.
    """

    id: str
    kind: str
    support_x: np.ndarray
    support_y: np.ndarray
    query_x: np.ndarray
    query_y: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    n_way: int | None = field(init=False)

    def __post_init__(self):
        _check_id(self.id)
        if self.kind not in KINDS:
            raise TaskError(BAD_KIND, "kind", f"must be one of {list(KINDS)}, got {self.kind!r}")
        if not isinstance(self.meta, dict):
            raise TaskError(BAD_TYPE, "meta", f"must be an object, got {_type_name(self.meta)}")
        arrays, n_way = _validated_arrays(self.kind, self.support_x, self.support_y, self.query_x, self.query_y)
        for name, array in zip(("support_x", "support_y", "query_x", "query_y"), arrays):
            object.__setattr__(self, name, array)
        object.__setattr__(self, "n_way", n_way)
        object.__setattr__(self, "meta", dict(self.meta))

    @property
    def n_support(self) -> int:
        return int(self.support_x.shape[0])

    @property
    def n_query(self) -> int:
        return int(self.query_x.shape[0])

    def with_feedback(self, feedback: "Feedback") -> "Task":
        """This task with its query labels from ``feedback``; they must fit the task.

        Raises :class:`TaskError` (``bad_label``, ``shape_mismatch``, ``bad_target_shape``, ...)
        naming ``query.y`` when they do not.
        """
        if feedback.id != self.id:  # a join bug in the caller, not bad input
            raise ValueError(f"feedback for {feedback.id!r} does not belong to task {self.id!r}")
        return replace(self, query_y=feedback.y)

    def to_tensors(self) -> "TaskTensors":
        """The task as :class:`~agent.algorithms.base.TaskTensors` (copies: the arrays stay read-only)."""
        import torch

        from agent.algorithms.base import TaskTensors

        query_y = None if self.query_y is None else torch.tensor(self.query_y)
        return TaskTensors(torch.tensor(self.support_x), torch.tensor(self.support_y), torch.tensor(self.query_x),
                           query_y, self.kind, self.n_way)

    def to_dict(self) -> dict:
        """The wire form with inline lists (see :func:`to_wire`)."""
        return to_wire(self)


@dataclass(frozen=True, eq=False)
class Feedback:
    """Late labels for the query set of the task with the same ``id``.

    ``y`` is int64 when every value is an integer, float32 otherwise; :meth:`Task.with_feedback`
    checks that it fits the task.
    """

    id: str
    y: np.ndarray

    def __post_init__(self):
        _check_id(self.id)
        y = _as_array(self.y, "y")
        if y.dtype.kind not in _NUMERIC_KINDS or y.dtype.kind == "b":
            raise TaskError(BAD_TYPE, "y", f"must hold numbers, got dtype {y.dtype}")
        if y.ndim < 1:
            raise TaskError(BAD_TARGET_SHAPE, "y", "must be a list with one entry per query example")
        y = y.astype(np.int64 if y.dtype.kind in "iu" else np.float32, copy=False)
        _check_finite(y, "y")
        object.__setattr__(self, "y", _read_only(y))

    def to_dict(self) -> dict:
        return {"type": "feedback", "id": self.id, "y": self.y.tolist()}


@dataclass(frozen=True, eq=False)
class Outcome:
    """What the agent emits for one task (one output line).

    Parameters
    ----------
    id
        The task id.
    predictions
        Class indices ``(n_query,)`` or regression outputs ``(n_query, ...)``; array-like.
    confidence
        Per-example confidence (array-like), or one number, or ``None``.
    algorithm
        Name of the algorithm that adapted.
    budget
        The compute budget the selector chose (a name or a number).
    inner_steps
        Inner steps actually taken.
    p_fail
        Predicted probability that this task fails.
    flags
        Notes from the compute guards and detectors (``"diverged"``, ``"drift"``, ...).
    latency_ms
        Wall time from receipt to output.
    """

    id: str
    predictions: Any
    confidence: Any
    algorithm: str
    budget: Any
    inner_steps: int
    p_fail: float
    flags: tuple[str, ...] = ()
    latency_ms: float = 0.0

    def to_dict(self) -> dict:
        """Plain JSON values; NaN and infinities become ``None`` (JSON has no such numbers)."""
        return {
            "id": self.id,
            "predictions": _jsonable(self.predictions),
            "confidence": _jsonable(self.confidence),
            "algorithm": self.algorithm,
            "budget": _jsonable(self.budget),
            "inner_steps": int(self.inner_steps),
            "p_fail": _jsonable(self.p_fail),
            "flags": [str(flag) for flag in self.flags],
            "latency_ms": _jsonable(self.latency_ms),
        }

    def to_json(self) -> str:
        """One line of strict JSON."""
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False)


def to_wire(task: Task) -> dict:
    """The wire record of ``task`` with inline lists: ``parse_record(json.dumps(to_wire(t)))``
    gives back the same arrays (float32 values survive the trip through JSON exactly)."""
    query = {"x": task.query_x.tolist()}
    if task.query_y is not None:
        query["y"] = task.query_y.tolist()
    return {"type": "task", "id": task.id, "kind": task.kind,
            "support": {"x": task.support_x.tolist(), "y": task.support_y.tolist()},
            "query": query, "meta": dict(task.meta)}


class IdRegistry:
    """The most recent task ids, for rejecting duplicates with bounded memory.

    Keeps at most ``max_size`` ids; the least recently seen are forgotten first, so a duplicate
    older than that many tasks passes. Safe to share between threads.

    Examples
    --------
    >>> seen = IdRegistry(max_size=2)
    >>> seen.add("a"), seen.add("a"), "a" in seen
    (True, False, True)
    >>> seen.add("b"), seen.add("c"), "a" in seen
    (True, True, False)
    """

    def __init__(self, max_size: int = 100_000, ids: Iterable[str] = ()):
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        self.max_size = int(max_size)
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        for id_ in ids:
            self.add(id_)

    def add(self, id: str) -> bool:
        """Remember ``id``; ``False`` when it was already known (it becomes the most recent)."""
        with self._lock:
            if id in self._ids:
                self._ids.move_to_end(id)
                return False
            self._ids[id] = None
            if len(self._ids) > self.max_size:
                self._ids.popitem(last=False)
            return True

    def discard(self, id: str) -> None:
        """Forget ``id`` (for a task that was accepted but then abandoned)."""
        with self._lock:
            self._ids.pop(id, None)

    def __contains__(self, id: object) -> bool:
        return id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self):
        """Oldest first: ``IdRegistry(n, list(registry))`` restores it (for checkpoints)."""
        with self._lock:
            return iter(list(self._ids))


# -- parsing --------------------------------------------------------------------------------

def parse_record(line: str | bytes, *, limits: Limits = DEFAULT_LIMITS, data_root: Path | str | None = None,
                 seen: IdRegistry | None = None) -> Task | Feedback:
    """Parse and validate one JSON Lines record.

    Parameters
    ----------
    line
        One record, as text or UTF-8 bytes (a trailing newline is fine).
    limits
        Size limits.
    data_root
        Directory that ``{"npz": ..., "key": ...}`` references resolve in; ``None`` disables them.
    seen
        Task ids seen so far; a task whose id is in it is rejected (``duplicate_id``), and a valid
        task's id is added to it.

    Returns
    -------
    Task or Feedback

    Raises
    ------
    TaskError
        The only exception it raises; ``.record_id`` holds the id when it was read.
    """
    if len(line) > limits.max_record_bytes:  # a character is at least one byte
        raise TaskError(RECORD_TOO_LARGE, "", f"record is longer than {limits.max_record_bytes} bytes")
    try:
        data = line.encode("utf-8") if isinstance(line, str) else bytes(line)
        text = line if isinstance(line, str) else data.decode("utf-8")
    except (UnicodeError, TypeError) as exc:
        raise TaskError(BAD_JSON, "", f"record is not valid UTF-8 text: {exc}") from None
    if len(data) > limits.max_record_bytes:
        raise TaskError(RECORD_TOO_LARGE, "", f"record is {len(data)} bytes, more than {limits.max_record_bytes}")
    depth = json_depth(data, stop_above=limits.max_json_depth)
    if depth > limits.max_json_depth:
        raise TaskError(TOO_DEEP, "", f"JSON nesting is deeper than {limits.max_json_depth}")
    if not text.strip():
        raise TaskError(BAD_JSON, "", "record is empty")
    try:
        record = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: belt and braces behind the depth scan
        raise TaskError(BAD_JSON, "", f"record is not valid JSON: {exc}") from None
    return record_from_dict(record, limits=limits, data_root=data_root, seen=seen)


def record_from_dict(record: Any, *, limits: Limits = DEFAULT_LIMITS, data_root: Path | str | None = None,
                     seen: IdRegistry | None = None) -> Task | Feedback:
    """Validate a decoded record (a dict of JSON values) by its ``type``."""
    if not isinstance(record, dict):
        raise TaskError(BAD_JSON, "", f"record must be a JSON object, got {_type_name(record)}")
    record_type = _required(record, "type", "")
    if record_type == "task":
        return task_from_dict(record, limits=limits, data_root=data_root, seen=seen)
    if record_type == "feedback":
        return feedback_from_dict(record, limits=limits, data_root=data_root)
    raise TaskError(BAD_TYPE, "type", f"must be 'task' or 'feedback', got {_short_repr(record_type)}")


def task_from_dict(record: Mapping, *, limits: Limits = DEFAULT_LIMITS, data_root: Path | str | None = None,
                   seen: IdRegistry | None = None) -> Task:
    """Validate a decoded ``task`` record and build the :class:`Task` (see :func:`parse_record`).

    Unknown keys are ignored, so that producers can add fields before the agent reads them.
    """
    if not isinstance(record, Mapping):
        raise TaskError(BAD_JSON, "", f"record must be a JSON object, got {_type_name(record)}")
    record_type = record.get("type", "task")
    if record_type != "task":
        raise TaskError(BAD_TYPE, "type", f"must be 'task', got {_short_repr(record_type)}")
    task_id = _check_id(_required(record, "id", ""))
    try:
        if seen is not None and task_id in seen:  # cheap early exit; registered only once valid
            raise TaskError(DUPLICATE_ID, "id", f"task {task_id!r} was already seen")
        kind = _required(record, "kind", "")
        if kind not in KINDS:
            raise TaskError(BAD_KIND, "kind", f"must be one of {list(KINDS)}, got {_short_repr(kind)}")
        support = _object(_required(record, "support", ""), "support")
        query = _object(_required(record, "query", ""), "query")
        meta = record.get("meta", {})
        if not isinstance(meta, dict):
            raise TaskError(BAD_TYPE, "meta", f"must be an object, got {_type_name(meta)}")
        y_role = "labels" if kind == CLASSIFICATION else "targets"
        read = lambda value, name, role: _read_array(value, name, role, limits, data_root)  # noqa: E731
        support_x = read(_required(support, "x", "support"), "support.x", "features")
        support_y = read(_required(support, "y", "support"), "support.y", y_role)
        query_x = read(_required(query, "x", "query"), "query.x", "features")
        query_y = query.get("y")
        query_y = None if query_y is None else read(query_y, "query.y", y_role)
        task = Task(task_id, kind, support_x, support_y, query_x, query_y, meta)
        _check_limits(task, limits)
        if seen is not None and not seen.add(task_id):
            raise TaskError(DUPLICATE_ID, "id", f"task {task_id!r} was already seen")
    except TaskError as error:
        error.record_id = task_id
        raise
    return task


def feedback_from_dict(record: Mapping, *, limits: Limits = DEFAULT_LIMITS,
                       data_root: Path | str | None = None) -> Feedback:
    """Validate a decoded ``feedback`` record (see :func:`parse_record`)."""
    if not isinstance(record, Mapping):
        raise TaskError(BAD_JSON, "", f"record must be a JSON object, got {_type_name(record)}")
    if record.get("type", "feedback") != "feedback":
        raise TaskError(BAD_TYPE, "type", f"must be 'feedback', got {_short_repr(record.get('type'))}")
    feedback_id = _check_id(_required(record, "id", ""))
    try:
        y = _read_array(_required(record, "y", ""), "y", "any", limits, data_root)
        if y.ndim and y.shape[0] > limits.max_query:
            raise TaskError(TOO_LARGE, "y", f"has {y.shape[0]} entries, more than max_query={limits.max_query}")
        return Feedback(feedback_id, y)
    except TaskError as error:
        error.record_id = feedback_id
        raise


# -- JSON depth -----------------------------------------------------------------------------

_BRACKET_DELTA = np.zeros(256, np.int8)
_BRACKET_DELTA[[ord("["), ord("{")]] = 1
_BRACKET_DELTA[[ord("]"), ord("}")]] = -1
_IS_BRACKET = _BRACKET_DELTA != 0
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_SCAN_CHUNK = 1 << 22
_NOT_BRACKETS = bytes(i for i in range(256) if i not in b"[]{}")


def json_depth(data: bytes, stop_above: int | None = None, chunk_size: int = _SCAN_CHUNK) -> int:
    """Deepest nesting of arrays and objects in JSON text, without parsing it (or recursing).

    Brackets inside strings do not count. Exact for valid JSON; on invalid JSON it is exact up
    to the first error, which is as far as a parser gets, so it bounds the parser's recursion.
    Vectorised over chunks; with ``stop_above`` it returns as soon as that depth is exceeded.

    >>> json_depth(b'{"a": [[1], "]]]"], "b": {}}')
    3
    """
    if len(data) <= chunk_size and b"\\" not in data:
        # Fast path (one chunk, no escapes): every quote opens or closes a string, so the text
        # outside strings is every other piece between quotes; the same running depth.
        brackets = b"".join(data.split(b'"')[::2]).translate(None, _NOT_BRACKETS)
        if not brackets:
            return 0
        return max(0, int(np.cumsum(_BRACKET_DELTA[np.frombuffer(brackets, np.uint8)], dtype=np.int64).max()))
    deepest = depth = 0
    in_string = 0  # 1 when the previous chunk ended inside a string
    backslash_run = 0  # backslashes at the end of the previous chunk
    for start in range(0, len(data), chunk_size):
        chunk = np.frombuffer(data, np.uint8, count=min(chunk_size, len(data) - start), offset=start)
        quotes = np.flatnonzero(chunk == _QUOTE)
        is_backslash = chunk == _BACKSLASH
        has_backslash = bool(is_backslash.any())
        if len(quotes) and (backslash_run or has_backslash):
            # A quote is escaped when an odd run of backslashes precedes it.
            last_other = np.maximum.accumulate(np.where(is_backslash, -1, np.arange(len(chunk))))
            before = last_other[np.maximum(quotes - 1, 0)]
            run = np.where(quotes == 0, 0, quotes - 1 - before)
            run = run + np.where((quotes == 0) | (before == -1), backslash_run, 0)
            quotes = quotes[run % 2 == 0]
        if has_backslash:
            others = np.flatnonzero(~is_backslash)
            backslash_run = backslash_run + len(chunk) if len(others) == 0 else len(chunk) - 1 - int(others[-1])
        else:
            backslash_run = 0
        brackets = np.flatnonzero(_IS_BRACKET[chunk])
        if len(brackets):
            # A bracket is inside a string when an odd number of real quotes precede it.
            outside = (np.searchsorted(quotes, brackets) + in_string) % 2 == 0
            levels = depth + np.cumsum(_BRACKET_DELTA[chunk[brackets[outside]]], dtype=np.int64)
            if len(levels):
                deepest = max(deepest, int(levels.max()))
                depth = int(levels[-1])
        in_string ^= len(quotes) % 2
        if stop_above is not None and deepest > stop_above:
            break
    return deepest


# -- arrays ---------------------------------------------------------------------------------

def _read_array(value: Any, field: str, role: str, limits: Limits, data_root: Path | str | None) -> np.ndarray:
    """An inline nested list or an npz reference as a numpy array of the ``role``'s dtype.

    ``role`` is ``features`` (float32), ``labels`` (int64), ``targets`` (float32) or ``any``
    (int64 when all values are integers, else float32).
    """
    if isinstance(value, dict):
        return _cast(_load_npz_member(value, field, limits, data_root), field, role)
    shape, leaves = _shape_and_leaves(value, field, limits.max_elements)
    allowed = (int,) if role == "labels" else (int, float)
    kinds = set(map(type, leaves))
    if not kinds.issubset(allowed):
        index = next(i for i, leaf in enumerate(leaves) if type(leaf) not in allowed)
        leaf, where = leaves[index], _index_path(field, index, shape)
        if isinstance(leaf, list):
            raise TaskError(RAGGED_ARRAY, where, "is a list where its siblings are numbers")
        if role == "labels":
            raise TaskError(BAD_LABEL, where, f"class labels must be integers, got {_short_repr(leaf)}")
        raise TaskError(BAD_TYPE, where, f"must be a number, got {_type_name(leaf)}")
    integers = role == "labels" or (role == "any" and float not in kinds)
    try:
        array = np.array(leaves, dtype=np.int64 if integers else np.float64).reshape(shape)
    except OverflowError:
        code = BAD_LABEL if role == "labels" else NON_FINITE
        raise TaskError(code, field, "holds a number too large to represent") from None
    return _cast(array, field, role)


def _cast(array: np.ndarray, field: str, role: str) -> np.ndarray:
    kind = array.dtype.kind
    if kind not in _NUMERIC_KINDS or array.dtype.fields is not None:
        raise TaskError(BAD_TYPE, field, f"must hold numbers, got dtype {array.dtype}")
    if role == "labels":
        if kind not in "iu":
            raise TaskError(BAD_LABEL, field, f"class labels must be integers, got dtype {array.dtype}")
        if kind == "u" and array.size and array.max() > np.iinfo(np.int64).max:
            raise TaskError(BAD_LABEL, field, "holds a label too large to represent")
        return array.astype(np.int64, copy=False)
    if role == "any" and kind in "iu":
        return array.astype(np.int64, copy=False)
    return _to_float32(array, field)


def _to_float32(array: np.ndarray, field: str) -> np.ndarray:
    if type(array) is not np.ndarray or array.dtype != np.float32:  # else asarray would return it as is
        with np.errstate(over="ignore", invalid="ignore"):  # overflow becomes inf, reported below
            array = np.asarray(array, dtype=np.float32)
    _check_finite(array, field)
    return array


def _check_finite(array: np.ndarray, field: str) -> None:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        index = np.argwhere(~np.isfinite(array))[0]
        where = field + "".join(f"[{i}]" for i in index)
        raise TaskError(NON_FINITE, where, f"is {array[tuple(index)]} (NaN, infinite, or beyond float32 range)")


def _shape_and_leaves(value: Any, field: str, max_elements: int) -> tuple[tuple[int, ...], list]:
    """Shape and flat values of a nested list, level by level (no recursion; C-speed loops).

    Rejects non-lists, ragged rows (naming the first one) and arrays over ``max_elements``.
    """
    if not isinstance(value, list):
        raise TaskError(BAD_TYPE, field, f"must be a list of numbers or an npz reference, got {_type_name(value)}")
    shape: list[int] = []
    level = [value]  # every item at the current depth; all are lists
    while True:
        width = len(level[0])
        if len(level) > 1:
            lengths = list(map(len, level))
            if lengths.count(width) != len(lengths):
                index = next(i for i, n in enumerate(lengths) if n != width)
                raise TaskError(RAGGED_ARRAY, _index_path(field, index, shape),
                                f"has {lengths[index]} elements where {_index_path(field, 0, shape)} has {width}")
        shape.append(width)
        if math.prod(shape) > max_elements:
            raise TaskError(TOO_LARGE, field, f"has more than max_elements={max_elements} elements")
        children = list(chain.from_iterable(level))
        if not children or not isinstance(children[0], list):
            return tuple(shape), children
        if set(map(type, children)) != {list}:
            index = next(i for i, child in enumerate(children) if type(child) is not list)
            raise TaskError(RAGGED_ARRAY, _index_path(field, index, shape),
                            f"is not a list (got {_type_name(children[index])}) where its siblings are lists")
        if len(shape) >= MAX_NDIM:
            raise TaskError(TOO_LARGE, field, f"has more than {MAX_NDIM} dimensions")
        level = children


def _index_path(field: str, flat_index: int, shape: list[int] | tuple[int, ...]) -> str:
    if not shape:
        return field
    return field + "".join(f"[{i}]" for i in np.unravel_index(flat_index, tuple(shape)))


# -- npz references -------------------------------------------------------------------------

def _load_npz_member(ref: dict, field: str, limits: Limits, data_root: Path | str | None) -> np.ndarray:
    """Load ``ref["key"]`` from ``ref["npz"]`` inside ``data_root``, checking its declared size first."""
    if set(ref) != {"npz", "key"}:
        raise TaskError(BAD_TYPE, field, f'an npz reference has exactly the keys "npz" and "key", got {sorted(map(str, ref))}')
    key = ref["key"]
    if not isinstance(key, str) or not key:
        raise TaskError(BAD_TYPE, f"{field}.key", f"must be a non-empty string, got {_type_name(key)}")
    path = _resolve_inside(data_root, ref["npz"], f"{field}.npz")
    where = f"{field}.npz"
    try:
        handle = _open_regular_file(path)
    except OSError as exc:
        raise TaskError(NPZ_ERROR, where, f"cannot open {ref['npz']!r}: {exc.strerror or exc}") from None
    try:
        with handle:
            with zipfile.ZipFile(handle) as archive:
                member = f"{key}.npy"
                if member not in archive.namelist():
                    raise TaskError(NPZ_ERROR, f"{field}.key", f"{ref['npz']!r} has no array {key!r}")
                with archive.open(member) as stream:  # reads only the small header
                    shape, dtype = _npy_header(stream)
            if dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
                raise TaskError(BAD_TYPE, field, f"must hold numbers, got dtype {dtype}")
            if len(shape) > MAX_NDIM:
                raise TaskError(TOO_LARGE, field, f"has more than {MAX_NDIM} dimensions")
            if math.prod(shape) > limits.max_elements:
                raise TaskError(TOO_LARGE, field, f"declares shape {shape}: more than max_elements={limits.max_elements}")
            handle.seek(0)
            with np.load(handle, allow_pickle=False) as archive:
                array = archive[key]
    except TaskError:
        raise
    except Exception as exc:  # untrusted file: any failure of zipfile/numpy on it is the file's fault
        raise TaskError(NPZ_ERROR, where, f"cannot read {key!r} from {ref['npz']!r}: {type(exc).__name__}: {exc}") from None
    if array.shape != shape:
        raise TaskError(NPZ_ERROR, where, f"{key!r} has shape {array.shape}, its header said {shape}")
    return array


def _npy_header(stream) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    return tuple(int(n) for n in shape), dtype


def _resolve_inside(data_root: Path | str | None, relative: Any, field: str) -> Path:
    if data_root is None:
        raise TaskError(NPZ_ERROR, field, "npz references are disabled: no data root is configured")
    if not isinstance(relative, str) or not relative:
        raise TaskError(BAD_TYPE, field, f"must be a non-empty relative path, got {_type_name(relative)}")
    if "\x00" in relative:
        raise TaskError(PATH_ESCAPE, field, "path contains a NUL byte")
    pure = PurePosixPath(relative)
    if pure.is_absolute():
        raise TaskError(PATH_ESCAPE, field, f"path {relative!r} is absolute; it must be relative to the data root")
    if ".." in pure.parts:
        raise TaskError(PATH_ESCAPE, field, f"path {relative!r} contains '..'")
    root = Path(data_root).resolve()
    try:
        target = (root / pure).resolve(strict=True)
    except FileNotFoundError:
        raise TaskError(NPZ_ERROR, field, f"{relative!r} does not exist in the data root") from None
    except (OSError, RuntimeError) as exc:  # symlink loops, names too long, permissions
        raise TaskError(NPZ_ERROR, field, f"cannot resolve {relative!r}: {exc}") from None
    if not target.is_relative_to(root):  # a symlink pointing out of the root
        raise TaskError(PATH_ESCAPE, field, f"path {relative!r} resolves outside the data root")
    return target


def _open_regular_file(path: Path):
    # O_NOFOLLOW: the last component cannot have become a symlink since resolving;
    # O_NONBLOCK: a FIFO planted in the data root cannot hang the agent.
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path.name} is not a regular file")
    return os.fdopen(fd, "rb")


# -- invariants -----------------------------------------------------------------------------

def _validated_arrays(kind, support_x, support_y, query_x, query_y):
    """The four arrays with the task's dtypes, read-only, and ``n_way``; raises on any breach."""
    y_role = "labels" if kind == CLASSIFICATION else "targets"
    support_x = _cast(_as_array(support_x, "support.x"), "support.x", "features")
    query_x = _cast(_as_array(query_x, "query.x"), "query.x", "features")
    support_y = _cast(_as_array(support_y, "support.y"), "support.y", y_role)
    query_y = None if query_y is None else _cast(_as_array(query_y, "query.y"), "query.y", y_role)

    if support_x.ndim == 0 or support_x.shape[0] == 0:
        raise TaskError(EMPTY_SUPPORT, "support.x", "the support set has no examples")
    if query_x.ndim == 0 or query_x.shape[0] == 0:
        raise TaskError(EMPTY_QUERY, "query.x", "the query set has no examples")
    for name, x in (("support.x", support_x), ("query.x", query_x)):
        if x.ndim < 2 or math.prod(x.shape[1:]) == 0:
            raise TaskError(SHAPE_MISMATCH, name, f"must have shape (examples, features...), got {x.shape}")
    if query_x.shape[1:] != support_x.shape[1:]:
        raise TaskError(DIM_MISMATCH, "query.x", f"examples have shape {query_x.shape[1:]}, "
                                                 f"support.x examples have {support_x.shape[1:]}")
    for name, x, y in (("support", support_x, support_y), ("query", query_x, query_y)):
        if y is not None and (y.ndim == 0 or y.shape[0] != x.shape[0]):
            raise TaskError(SHAPE_MISMATCH, f"{name}.y", f"has {_rows(y)} entries for {x.shape[0]} examples in {name}.x")

    if kind == REGRESSION:
        if math.prod(support_y.shape[1:]) == 0:
            raise TaskError(BAD_TARGET_SHAPE, "support.y", f"targets must have at least one element, got shape {support_y.shape}")
        if query_y is not None and query_y.shape[1:] != support_y.shape[1:]:
            raise TaskError(BAD_TARGET_SHAPE, "query.y", f"targets have shape {query_y.shape[1:]}, "
                                                         f"support.y targets have {support_y.shape[1:]}")
        n_way = None
    else:
        n_way = _check_labels(support_y, query_y)
    return tuple(_read_only(a) for a in (support_x, support_y, query_x, query_y)), n_way


def _check_labels(support_y: np.ndarray, query_y: np.ndarray | None) -> int:
    for name, y in (("support.y", support_y), ("query.y", query_y)):
        if y is not None and y.ndim != 1:
            raise TaskError(BAD_LABEL, name, f"class labels must be a flat list, got shape {y.shape}")
    if support_y.min() < 0:
        index = int(np.argmax(support_y < 0))
        raise TaskError(BAD_LABEL, f"support.y[{index}]", f"is {support_y[index]}; class labels start at 0")
    n_way = int(support_y.max()) + 1
    # The smallest absent class is at most len(support_y): look only there, so that a huge label
    # cannot make us allocate.
    present = np.zeros(len(support_y) + 1, bool)
    present[support_y[support_y <= len(support_y)]] = True
    missing = int(np.argmin(present))
    if missing < n_way:
        raise TaskError(MISSING_CLASS, "support.y", f"has no example of class {missing} "
                                                   f"(labels must cover 0..{n_way - 1}, n_way = largest label + 1)")
    if query_y is not None:
        bad = (query_y < 0) | (query_y >= n_way)
        if bad.any():
            index = int(np.argmax(bad))
            raise TaskError(BAD_LABEL, f"query.y[{index}]", f"is {query_y[index]}, not a class of the support set (0..{n_way - 1})")
    return n_way


def _check_limits(task: Task, limits: Limits) -> None:
    features = math.prod(task.support_x.shape[1:])
    if features > limits.max_dim:
        raise TaskError(TOO_LARGE, "support.x", f"examples have {features} elements, more than max_dim={limits.max_dim}")
    if task.n_query > limits.max_query:
        raise TaskError(TOO_LARGE, "query.x", f"has {task.n_query} examples, more than max_query={limits.max_query}")
    if task.kind == CLASSIFICATION:
        if task.n_way > limits.max_ways:
            raise TaskError(TOO_LARGE, "support.y", f"has {task.n_way} classes, more than max_ways={limits.max_ways}")
        shots = int(np.bincount(task.support_y).max())
        if shots > limits.max_shots:
            raise TaskError(TOO_LARGE, "support.y", f"has {shots} examples of one class, more than max_shots={limits.max_shots}")
    else:
        if task.n_support > limits.max_shots:
            raise TaskError(TOO_LARGE, "support.x", f"has {task.n_support} examples, more than max_shots={limits.max_shots}")
        targets = math.prod(task.support_y.shape[1:])
        if targets > limits.max_dim:
            raise TaskError(TOO_LARGE, "support.y", f"targets have {targets} elements, more than max_dim={limits.max_dim}")


# -- small helpers --------------------------------------------------------------------------

def _check_id(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LENGTH:
        raise TaskError(BAD_TYPE, "id", f"must be a non-empty string of at most {MAX_ID_LENGTH} characters, "
                                        f"got {_short_repr(value)}")
    return value


def _required(record: Mapping, key: str, parent: str) -> Any:
    if key not in record or record[key] is None:
        where = f"{parent}.{key}" if parent else key
        raise TaskError(MISSING_FIELD, where, "is required")
    return record[key]


def _object(value: Any, field: str) -> Mapping:
    if not isinstance(value, dict):
        raise TaskError(BAD_TYPE, field, f"must be an object with x and y, got {_type_name(value)}")
    return value


def _as_array(value: Any, field: str) -> np.ndarray:
    # Only Python callers get here with raw lists; the parser has already built arrays.
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise TaskError(RAGGED_ARRAY, field, f"is not a rectangular array of numbers: {exc}") from None


def _rows(array: np.ndarray) -> int | str:
    return array.shape[0] if array.ndim else "no"


def _read_only(array: np.ndarray | None) -> np.ndarray | None:
    if array is None:
        return None
    view = array.view()  # flags on a view leave the caller's array writable
    view.flags.writeable = False
    return view


def _type_name(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null",
            int: "integer", float: "number"}.get(type(value), type(value).__name__)


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _jsonable(value: Any) -> Any:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            value = value.astype(object)
            value[~np.isfinite(value.astype(float))] = None
        return value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value
