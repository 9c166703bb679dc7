"""Hostile-input fuzz run of the real daemon (issue 7): malformed and adversarial records,
interleaved with valid sinusoid tasks, through ``python -m agent run`` as a subprocess.

Every non-blank input line is one record; the daemon answers each with exactly one output line
(valid feedback: none), in input order, so every answer is checked against what its record
deserved: a valid task gets finite predictions, one per query row; a bad record gets one error
line with a stable code from :data:`agent.task.ERROR_CODES`.

The generator (:func:`generate`, :func:`prepare_data_root`) is shared with
``tests/test_fuzz_daemon.py``, which runs a 10k-record mix; this script is the longer run::

    python bench/fuzz.py --records 100000
    python bench/fuzz.py --quick        # 2,000 records, a smoke test

It prints the count per error code, the valid tasks answered, the daemon's peak RSS (VmHWM) and
records/s, and exits 1 when any check fails.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import parser, print_header, write_json  # noqa: E402

# Small limits so that "over the limit" cases stay cheap; the daemon's source uses
# max_record_bytes as its line bound too (longer lines are never held whole).
MAX_RECORD_BYTES = 1 << 20
MAX_ELEMENTS = 4096

CONFIG = {
    "model": {"arch": "mlp", "hidden": [8]},
    "agent": {"in_shape": [1], "out_dim": 1, "micro_batch": 8},
    "compute": {"levels": [[1, 1]]},
    "memory": {"capacity": 50},
    "online": {"every": 64, "replay": 1, "replay_capacity": 20},
    "limits": {"max_record_bytes": MAX_RECORD_BYTES, "max_elements": MAX_ELEMENTS, "pending_max": 200,
               "seen_ids": 20000},
    "checkpoint": {"every_s": 1000.0, "keep": 2},
}


@dataclass(frozen=True)
class Expect:
    """What one input line deserves: ``ok`` (a task answer with ``n_query`` rows), ``error``
    (one error line; ``codes`` narrows the code when the case pins it), ``none`` (valid
    feedback: no line) or ``skip`` (a blank line: not a record)."""

    what: str
    case: str
    id: str | None = None
    n_query: int = 0
    codes: frozenset | None = None


# -- data root with hostile npz files ------------------------------------------------------
def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def _npy_header(shape, dtype="<f4") -> bytes:
    header = repr({"descr": dtype, "fortran_order": False, "shape": tuple(shape)}).encode()
    pad = 64 - (10 + len(header) + 1) % 64
    header += b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


def prepare_data_root(base: Path) -> Path:
    """``base/data`` (the data root) with good and hostile npz files, ``base/outside`` beside it."""
    root, outside = base / "data", base / "outside"
    root.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    x = np.linspace(-5, 5, 8, dtype=np.float32).reshape(8, 1)
    (root / "good.npz").write_bytes(_npz_bytes(sx=x, sy=np.sin(x), qx=x[:3]))
    (outside / "secret.npz").write_bytes(_npz_bytes(sx=x, sy=np.sin(x), qx=x[:3]))
    for name, target in (("escape.npz", outside / "secret.npz"), ("escape_dir", outside)):
        link = root / name
        if not link.is_symlink():
            link.symlink_to(target)
    # Zip bomb: a member whose header declares 10^12 elements (and real highly compressible data).
    with zipfile.ZipFile(root / "bomb.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("sx.npy", _npy_header((10**6, 10**6)) + b"\x00" * (1 << 20))
    # A real bomb: 64 MB of zeros compress to ~64 KB; declared shape is honest but over the limit.
    with zipfile.ZipFile(root / "bomb2.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("sx.npy", _npy_header((16 * 2**20,)) + b"\x00" * (64 * 2**20))
    # Header says 8x1, data is cut short.
    with zipfile.ZipFile(root / "liar.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("sx.npy", _npy_header((8, 1)) + b"\x00" * 7)
    (root / "notzip.npz").write_bytes(b"PK\x03\x04 this is not a zip file" * 10)
    (root / "empty.npz").write_bytes(b"")
    buf = io.BytesIO()
    np.savez(buf, sx=np.array([[1], ["a"]], dtype=object))  # pickled object array
    (root / "objects.npz").write_bytes(buf.getvalue())
    (root / "strings.npz").write_bytes(_npz_bytes(sx=np.array([["a"], ["b"]])))
    fifo = root / "fifo.npz"
    if not fifo.exists():
        os.mkfifo(fifo)
    (root / "adir.npz").mkdir(exist_ok=True)
    return root


# -- records --------------------------------------------------------------------------------
def _sine(rng: random.Random, n: int) -> tuple[list, list]:
    a, ph = rng.uniform(0.1, 5.0), rng.uniform(0.0, math.pi)
    xs = [round(rng.uniform(-5, 5), 4) for _ in range(n)]
    return [[x] for x in xs], [[round(a * math.sin(x - ph), 4)] for x in xs]


def valid_task(rng: random.Random, task_id: str) -> tuple[dict, int]:
    """A valid sine regression task (labels inline half the time) and its query size."""
    n_s, n_q = rng.randint(2, 10), rng.randint(1, 10)
    sx, sy = _sine(rng, n_s)
    qx, qy = _sine(rng, n_q)
    query = {"x": qx}
    if rng.random() < 0.5:
        query["y"] = qy
    return {"type": "task", "id": task_id, "kind": "regression", "support": {"x": sx, "y": sy}, "query": query}, n_q


def _dump(record) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode()


E = frozenset


def _bad(rng: random.Random, i: int, valid_ids: list[str], pending: list[tuple[str, int]]):
    """One bad (or borderline-valid) record as (bytes, Expect)."""
    bid = f"bad-{i}"
    base, n_q = valid_task(rng, bid)
    case = rng.choice(BAD_CASES)
    line, codes = case(rng, base, bid, valid_ids, pending)
    if codes == "ok":  # a borderline case that is valid after all
        return line, Expect("ok", case.__name__, base["id"], n_q)
    if codes == "none":
        return line, Expect("none", case.__name__)
    return line, Expect("error", case.__name__, None, 0, None if codes is None else E(codes))


def c_truncated(rng, rec, bid, *_):
    data = _dump(rec)
    return data[: rng.randint(1, len(data) - 1)], {"bad_json"}


def c_wrong_type(rng, rec, bid, *_):
    which = rng.randrange(9)
    if which == 0:
        rec["id"] = rng.choice([123, 1.5, None, [], {}, True])
        return _dump(rec), {"bad_type", "missing_field"}
    if which == 1:
        rec["kind"] = rng.choice([5, "regress", None, ["regression"]])
        return _dump(rec), {"bad_kind", "missing_field"}
    if which == 2:
        rec["support"] = rng.choice(["x", 3, [1, 2]])
        return _dump(rec), {"bad_type"}
    if which == 3:
        rec["support"]["x"] = rng.choice(["abc", 7, True])
        return _dump(rec), {"bad_type"}
    if which == 4:
        rec["support"]["x"][0][0] = rng.choice(["1.0", True, None, {"v": 1}])
        return _dump(rec), {"bad_type"}
    if which == 5:
        rec["type"] = rng.choice(["tsk", 1, []])
        return _dump(rec), {"bad_type"}
    if which == 6:
        rec["meta"] = rng.choice([[], "m", 3])
        return _dump(rec), {"bad_type"}
    if which == 7:
        del rec[rng.choice(["id", "kind", "support", "query", "type"])]
        return _dump(rec), {"missing_field"}
    return _dump(rng.choice([[rec], "task", 1, None, True])), {"bad_json"}


def c_sizes(rng, rec, bid, *_):
    which = rng.randrange(7)
    if which == 0:  # more labels than examples
        rec["support"]["y"] = rec["support"]["y"] + [[0.0]] * rng.randint(1, 5)
        return _dump(rec), {"shape_mismatch"}
    if which == 1:  # over max_elements
        rec["support"]["x"] = [[0.5]] * (MAX_ELEMENTS + 1)
        return _dump(rec), {"too_large"}
    if which == 2:  # classification with a negative or huge label
        rec["kind"] = "classification"
        rec["support"]["y"] = [rng.choice([-1, -10**6, 10**30, 2**63])] + [0] * (len(rec["support"]["x"]) - 1)
        rec["query"].pop("y", None)
        return _dump(rec), {"bad_label", "missing_class"}
    if which == 3:  # huge integers in features
        rec["support"]["x"][0][0] = rng.choice([10**400, -(10**400), 2**64])
        # 2**64 fits float32: a legal (if extreme) feature value, and the task must be answered
        return _dump(rec), "ok" if rec["support"]["x"][0][0] == 2**64 else {"non_finite"}
    if which == 4:  # too many ways for the model (out_dim 1)
        n = len(rec["support"]["x"])
        rec["kind"] = "classification"
        rec["support"]["y"] = list(range(n))
        rec["query"].pop("y", None)
        return _dump(rec), {"too_large"}
    if which == 5:  # an empty support or query
        rec[rng.choice(["support", "query"])]["x"] = []
        return _dump(rec), {"empty_support", "empty_query", "shape_mismatch"}
    rec["support"]["x"] = [[]] * len(rec["support"]["x"])  # zero features
    return _dump(rec), {"shape_mismatch"}


def c_nonfinite(rng, rec, bid, *_):
    lit = rng.choice(["NaN", "Infinity", "-Infinity", "1e999", "-1e400"])
    where = rng.choice(["support_x", "support_y", "query_x"])
    text = _dump(rec).decode()
    key = {"support_x": '"support":{"x":[[', "support_y": '"y":[[', "query_x": '"query":{"x":[['}[where]
    at = text.index(key) + len(key)
    end = text.index("]", at)
    return (text[:at] + lit + text[end:]).encode(), {"non_finite"}


def c_deep(rng, rec, bid, *_):
    which = rng.randrange(3)
    if which == 0:
        n = rng.choice([33, 100, 10_000, 200_000]) if rng.random() < 0.1 else rng.choice([33, 100])
        return b"[" * n + b"]" * n, {"too_deep"}
    if which == 1:
        deep: dict = {}
        for _ in range(rng.randint(40, 500)):
            deep = {"a": deep}
        rec["meta"] = deep
        return _dump(rec), {"too_deep"}
    return b'{"a":' * rng.choice([40, 5000]), {"too_deep"}  # deep and truncated


def c_giant_string(rng, rec, bid, *_):
    big = rng.random() < 0.03  # a few hundred KB strings, most just over a limit
    which = rng.randrange(3)
    if which == 0:
        rec["id"] = "x" * (200_000 if big else rng.choice([257, 1000]))
        return _dump(rec), {"bad_type"}
    if which == 1:
        rec["kind"] = "k" * (300_000 if big else 1000)
        return _dump(rec), {"bad_kind"}
    rec["meta"] = {"note": "\u00e9" * (100_000 if big else 2000)}  # a big but legal payload: a valid task
    return _dump(rec), "ok"


def c_mismatch(rng, rec, bid, *_):
    which = rng.randrange(4)
    if which == 0:  # query examples wider than support ones
        rec["query"]["x"] = [[v[0], 0.0] for v in rec["query"]["x"]]
        return _dump(rec), {"dim_mismatch"}
    if which == 1:  # both wider than the model's input
        rec["support"]["x"] = [[v[0], 0.0] for v in rec["support"]["x"]]
        rec["query"]["x"] = [[v[0], 0.0] for v in rec["query"]["x"]]
        return _dump(rec), {"dim_mismatch"}
    if which == 2:  # two targets for a one-output model
        rec["support"]["y"] = [[v[0], v[0]] for v in rec["support"]["y"]]
        rec["query"].pop("y", None)
        return _dump(rec), {"bad_target_shape"}
    rec["support"]["x"] = [[0.1]] + [[[0.2]]] * (len(rec["support"]["x"]) - 1) if len(rec["support"]["x"]) > 1 \
        else [[0.1], [[0.2]]]
    return _dump(rec), {"ragged_array", "shape_mismatch"}


def c_npz(rng, rec, bid, *_):
    name, codes = rng.choice([
        ("../outside/secret.npz", {"path_escape"}), ("/etc/passwd", {"path_escape"}),
        ("a/../../outside/secret.npz", {"path_escape"}), ("escape.npz", {"path_escape"}),
        ("escape_dir/secret.npz", {"path_escape"}), ("missing.npz", {"npz_error"}),
        ("fifo.npz", {"npz_error"}), ("adir.npz", {"npz_error"}), ("bomb.npz", {"too_large"}),
        ("bomb2.npz", {"too_large"}), ("liar.npz", {"npz_error"}), ("notzip.npz", {"npz_error"}),
        ("empty.npz", {"npz_error"}), ("objects.npz", {"bad_type", "npz_error"}),
        ("strings.npz", {"bad_type"}), ("good\x00.npz", {"path_escape"}), ("", {"bad_type"}),
    ])
    rec["support"]["x"] = {"npz": name, "key": "sx"}
    return _dump(rec), codes


def c_npz_ref(rng, rec, bid, *_):
    which = rng.randrange(3)
    if which == 0:
        rec["support"]["x"] = {"npz": "good.npz", "key": "nokey"}
        return _dump(rec), {"npz_error"}
    if which == 1:
        rec["support"]["x"] = {"npz": "good.npz", "key": "sx", "extra": 1}
        return _dump(rec), {"bad_type"}
    rec["support"]["x"] = {"npz": "good.npz", "key": rng.choice([1, "", None])}
    return _dump(rec), {"bad_type"}


def c_npz_good(rng, rec, bid, *_):  # a valid task read from the data root
    rec["support"] = {"x": {"npz": "good.npz", "key": "sx"}, "y": {"npz": "good.npz", "key": "sy"}}
    return _dump(rec), "ok"


def c_duplicate(rng, rec, bid, valid_ids, pending):
    # Not an id that got a bad feedback record: the agent forgets such ids (a known bug, see
    # tests/test_fuzz_daemon.py::test_bad_feedback_does_not_forget_the_task_id).
    tainted = set(getattr(pending, "tainted", ()))
    choices = [i for i in valid_ids[-500:] if i not in tainted]
    if not choices:
        return b"{}", {"missing_field"}
    rec["id"] = rng.choice(choices)
    return _dump(rec), {"duplicate_id"}


def c_garbage(rng, rec, bid, *_):
    data = bytes(rng.randrange(256) for _ in range(rng.randint(1, 400))).replace(b"\n", b"?")
    if not data.strip():
        data += b"?"
    return data, None


def c_feedback(rng, rec, bid, valid_ids, pending):
    which = rng.randrange(5)
    if which == 0 and pending:  # labels that do not fit a pending task
        tid, n_q = pending[rng.randrange(len(pending))]
        pending.tainted.add(tid)
        return _dump({"type": "feedback", "id": tid, "y": [[0.0, 1.0]] * (n_q + 1)}), None
    if which == 1:
        return _dump({"type": "feedback", "id": bid, "y": "labels"}), {"bad_type"}
    if which == 2:
        return _dump({"type": "feedback", "id": bid, "y": [float("nan")]}), {"non_finite"}
    if which == 3:
        return _dump({"type": "feedback", "y": [1]}), {"missing_field"}
    return _dump({"type": "feedback", "id": "never-seen-" + bid, "y": [1.0]}), "none"  # unmatched: counted only


def c_unicode_id(rng, rec, bid, *_):  # odd but legal ids: valid tasks
    rec["id"] = bid + rng.choice(["\u202e", "\ud800", "\x00", "\\\"", "\U0001f600", " "])
    return _dump(rec), "ok"


def c_degenerate(rng, rec, bid, *_):  # duplicate points, zero-variance targets: valid
    n = len(rec["support"]["x"])
    rec["support"]["x"] = [[1.0]] * n
    rec["support"]["y"] = [[0.0]] * n
    return _dump(rec), "ok"


BAD_CASES = [c_truncated, c_wrong_type, c_sizes, c_nonfinite, c_deep, c_giant_string, c_mismatch, c_npz,
             c_npz_ref, c_npz_good, c_duplicate, c_garbage, c_feedback, c_unicode_id, c_degenerate]


class _Pending(list):
    """Tasks awaiting feedback, and the ids that got a bad feedback record."""

    def __init__(self):
        super().__init__()
        self.tainted: set[str] = set()


def generate(n: int, seed: int = 0, *, valid_fraction: float = 0.3, oversized: int = 3) -> list[tuple[bytes, Expect]]:
    """``n`` lines: valid tasks (a ``valid_fraction``), bad records, blank lines, valid feedback
    for pending tasks, and ``oversized`` lines over the record limit. Seeded."""
    rng = random.Random(seed)
    out: list[tuple[bytes, Expect]] = []
    valid_ids: list[str] = []
    pending = _Pending()
    big_at = set(rng.sample(range(n), min(oversized, n)))
    for i in range(n):
        r = rng.random()
        if i in big_at:
            size = MAX_RECORD_BYTES + rng.randint(1, 3 * MAX_RECORD_BYTES)
            out.append((b'{"type":"task","id":"big","meta":"' + b"z" * size + b'"}',
                        Expect("error", "oversized", None, 0, E({"record_too_large"}))))
        elif r < valid_fraction:
            tid = f"ok-{i}"
            rec, n_q = valid_task(rng, tid)
            out.append((_dump(rec), Expect("ok", "valid", tid, n_q)))
            valid_ids.append(tid)
            if "y" not in rec["query"]:
                pending.append((tid, n_q))
                if len(pending) > 100:
                    del pending[0]
        elif r < valid_fraction + 0.02:
            out.append((rng.choice([b"", b"   ", b"\t", b"\r"]), Expect("skip", "blank")))
        elif r < valid_fraction + 0.04 and pending:
            tid, n_q = pending.pop(rng.randrange(len(pending)))
            out.append((_dump({"type": "feedback", "id": tid, "y": [[0.5]] * n_q}), Expect("none", "feedback")))
        else:
            out.append(_bad(rng, i, valid_ids, pending))
    return out


def write_input(path: Path, records: list[tuple[bytes, Expect]]) -> None:
    with open(path, "wb") as f:
        for line, _ in records:
            f.write(line + b"\n")


def write_config(path: Path, data_root: Path, **override) -> Path:
    cfg = json.loads(json.dumps(CONFIG))
    cfg["agent"]["data_root"] = str(data_root)
    for section, values in override.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(json.dumps(cfg))
    return path


# Runs the daemon in-process and reports its peak RSS (VmHWM) on the last stderr line.
WRAPPER = r"""
import atexit, sys
def _hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            sys.stderr.write("\nFUZZ_VMHWM_KB %s\n" % line.split()[1]); sys.stderr.flush()
atexit.register(_hwm)
from agent.cli import main
sys.argv = ["meta-agent"] + sys.argv[1:]
raise SystemExit(main())
"""


def run_daemon(workdir: Path, config: Path, input_path: Path, output: Path, timeout: float = 600,
               extra: tuple[str, ...] = ()) -> tuple[int, str, float, int | None]:
    """Run the daemon; returns (exit code, stderr, wall seconds, peak RSS in KiB)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, "run", "--config", str(config), "--input", str(input_path),
                           "--output", str(output), "--metrics-addr", "0", "--state-dir", str(workdir / "state"),
                           "--progress", "off", *extra],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    hwm = None
    for line in proc.stderr.splitlines():
        if line.startswith("FUZZ_VMHWM_KB"):
            hwm = int(line.split()[1])
    return proc.returncode, proc.stderr, wall, hwm


def check(records: list[tuple[bytes, Expect]], output: Path) -> tuple[list[str], Counter, int]:
    """Match the answers to the records; returns (problems, error codes seen, valid tasks answered)."""
    from agent.metrics import INTERNAL_ERROR
    from agent.task import ERROR_CODES

    answers = [json.loads(line) for line in output.read_bytes().splitlines()]
    expected = [e for _, e in records if e.what in ("ok", "error")]
    problems: list[str] = []
    if len(answers) != len(expected):
        problems.append(f"{len(answers)} output lines for {len(expected)} records that deserve one")
    codes: Counter = Counter()
    answered = 0
    for k, (ans, exp) in enumerate(zip(answers, expected)):
        where = f"line {k + 1} ({exp.case})"
        if exp.what == "ok":
            if "error" in ans:
                problems.append(f"{where}: valid task {exp.id!r} got an error: {ans['error']}")
                continue
            preds = ans.get("predictions")
            if ans.get("id") != exp.id:
                problems.append(f"{where}: answer for {ans.get('id')!r}, expected {exp.id!r}")
            elif not isinstance(preds, list) or len(preds) != exp.n_query:
                problems.append(f"{where}: {exp.id!r} has {len(preds) if isinstance(preds, list) else preds} "
                                f"predictions for {exp.n_query} query rows")
            elif not all(v is not None and math.isfinite(v) for v in np.asarray(preds, dtype=object).ravel()):
                problems.append(f"{where}: {exp.id!r} has non-finite predictions")
            else:
                answered += 1
        else:
            err = ans.get("error")
            if not isinstance(err, dict):
                problems.append(f"{where}: a bad record was answered: {str(ans)[:200]}")
                continue
            code = err.get("code")
            codes[code] += 1
            if code == INTERNAL_ERROR:
                problems.append(f"{where}: internal error (a bug, not the input's fault): {err.get('message')}")
            elif code not in ERROR_CODES:
                problems.append(f"{where}: unknown error code {code!r}")
            elif exp.codes is not None and code not in exp.codes:
                problems.append(f"{where}: code {code!r}, expected one of {sorted(exp.codes)}: {err.get('message')}")
    return problems, codes, answered


def main(argv=None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=100_000, help="records (--quick: 2000)")
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    args = p.parse_args(argv)
    import tempfile

    info = print_header("fuzz: hostile records through the daemon", args)
    n = 2000 if args.quick else args.records

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fuzz-"))
    workdir.mkdir(parents=True, exist_ok=True)
    data_root = prepare_data_root(workdir)
    t0 = time.perf_counter()
    records = generate(n, args.seed, oversized=max(3, n // 3000))
    write_input(workdir / "fuzz.jsonl", records)
    size = (workdir / "fuzz.jsonl").stat().st_size
    print(f"generated {len(records)} lines ({size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f}s -> {workdir}")
    config = write_config(workdir / "cfg.json", data_root)
    out = workdir / "out.jsonl"
    if out.exists():
        out.unlink()
    shutil.rmtree(workdir / "state", ignore_errors=True)
    cpu0 = os.times()
    rc, stderr, wall, hwm = run_daemon(workdir, config, workdir / "fuzz.jsonl", out, timeout=3600,
                                       extra=("--set", f"agent.threads={args.threads}"))
    cpu1 = os.times()
    daemon_cpu = (cpu1.children_user + cpu1.children_system) - (cpu0.children_user + cpu0.children_system)
    problems, codes, answered = check(records, out)
    n_valid = sum(e.what == "ok" for _, e in records)
    n_records = sum(e.what != "skip" for _, e in records)
    print(f"\nexit code {rc}; {n_records} records in {wall:.1f}s = {n_records / wall:.0f} records/s "
          f"(including ~3 s start-up); peak RSS {hwm / 1024:.0f} MiB" if hwm else f"exit code {rc}; no RSS")
    print(f"daemon cpu {daemon_cpu:.1f}s = {daemon_cpu / wall:.2f} cpu per wall second; "
          f"load avg after {[round(x, 2) for x in os.getloadavg()]}")
    print(f"valid tasks answered: {answered} / {n_valid}")
    print("\n| error code | lines |\n|---|---:|")
    for code, n in sorted(codes.items(), key=lambda kv: -kv[1]):
        print(f"| {code} | {n} |")
    cases = Counter(e.case for _, e in records)
    print("\ncases: " + ", ".join(f"{k} {v}" for k, v in sorted(cases.items())))
    if rc != 0:
        problems.insert(0, f"daemon exit code {rc}: {stderr[-2000:]}")
    for line in problems[:30]:
        print("PROBLEM:", line)
    print(f"\n{'PASS' if not problems else 'FAIL'}: {len(problems)} problems")
    write_json(args.out, {"machine": info, "records": n_records, "valid": n_valid, "answered": answered,
                          "wall_s": wall, "daemon_cpu_s": daemon_cpu, "peak_rss_mib": hwm / 1024 if hwm else None,
                          "exit_code": rc, "error_codes": dict(codes), "cases": dict(cases),
                          "problems": problems[:100]})
    return 0 if not problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
