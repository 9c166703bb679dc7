"""Built-in synthetic task streams (OSAKA-style) for demos, tests and benchmarks.

A :class:`SyntheticStream` is a :class:`~agent.streams.sources.Source` that writes wire-format
JSON Lines records (see ``DESIGN.md``) from the task families of :mod:`agent.data`. It follows
the OSAKA protocol (Caccia et al. 2020): the stream is a sequence of *segments*; at every task,
with probability ``1 - p_stay``, the current task switches to a new one whose *mode* (family)
is drawn from ``modes``. Within a segment the task itself stays (the same sine parameters, the
same classes with the same labels) and each record brings fresh support and query examples.
A switch into a mode seen before may, with probability ``recur``, bring back that mode's most
recent task instead of a new one ("fast remembering").

Boundaries are hidden: a record's ``meta`` holds only ``family`` (the mode's name) and
``segment`` (its number), both for evaluation, and :attr:`SyntheticStream.boundaries` gives the
true switch points.

Labels come ``"inline"`` (``query.y`` in the task), ``"delayed"`` (a share ``delayed_share`` of
tasks arrive without ``query.y`` and their ``{"type": "feedback"}`` record follows exactly
``delay`` records later; outstanding feedback is flushed at the end of a finite stream) or
``"none"``.

Everything is a pure function of ``seed`` and the task index: the switch process is drawn in
blocks of tasks from its own generator and each task from ``default_rng([seed, ..., index])``,
so restoring from a position is O(1) rather than a replay. The position is the number of
acknowledged records (plus the few pending feedback slots).

Presets (:func:`make_stream`, :func:`describe`): ``sinusoid-demo``, ``sinusoid-osaka``,
``glyphs-osaka``.

Examples
--------
>>> from agent.task import parse_record
>>> stream = make_stream("sinusoid-demo", n_tasks=30, seed=1)
>>> records = stream.poll(0)
>>> task = parse_record(records[0].data)
>>> task.kind, task.support_x.shape, sorted(task.meta)
('regression', (10, 1), ['family', 'segment'])
>>> stream.ack(records[4].position)
>>> stream.position()["records"]
5
>>> again = make_stream("sinusoid-demo", n_tasks=30, seed=1, position=stream.position())
>>> again.poll(0)[0].data == records[5].data
True
>>> stream.boundaries_upto(30)  # hidden from the agent; for scoring
[5, 6, 14, 15, 21]
>>> stream.info(5)["family"], parse_record(records[5].data).meta
('linear', {'family': 'linear', 'segment': 1})
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from agent.streams.sources import Record

__all__ = ["SyntheticStream", "PRESETS", "make_stream", "preset_names", "describe"]

LABELS = ("inline", "delayed", "none")
_BLOCK = 1024  # tasks per block of the switch process (drawn together, cached)
_MAX_CACHED_BLOCKS = 64
# Salts of the seed sequences: each random ingredient has its own stream, so changing one
# option (say delayed_share) never changes what another draws.
_SWITCHES, _TASK_IDENTITY, _EXAMPLES, _DELAYED = 1, 2, 3, 4


class SyntheticStream:
    """An endless or finite stream of few-shot tasks with hidden, Markov-switching tasks.

    Parameters
    ----------
    modes
        Mode name -> probability of being drawn at a switch (normalised), or a list of names
        (uniform). A mode name is a family name of :func:`agent.data.make_family` unless
        ``families`` says otherwise.
    n_tasks
        Tasks before the stream ends; ``None`` for an endless stream.
    seed
        Non-negative integer; the stream is a pure function of it and the options.
    p_stay
        Probability that the next task stays in the current segment (OSAKA's α: 0.9, 0.98).
    recur
        Probability that a switch into a mode other than the current one brings back that
        mode's most recent task (same parameters or classes and labelling) instead of a fresh one.
    labels, delay, delayed_share
        ``"inline"``, ``"delayed"`` or ``"none"``; with ``"delayed"``, each task is delayed with
        probability ``delayed_share`` and its feedback record comes ``delay`` records later.
    n_way, k_shot, k_query, split
        Episode shape and split passed to every family (function families ignore ``n_way`` and
        ``split``; ``None`` keeps the family's default).
    families
        Per-mode keyword arguments for :func:`~agent.data.make_family`; the key ``"family"``
        names the underlying family, so ``{"glyphs-new": {"family": "glyphs", "split": "test"}}``
        makes a mode of new glyph classes.
    flatten
        Emit images as flat vectors instead of ``(C, H, W)``.
    digits
        Significant digits of every emitted number (``None``: full float32 precision); fewer
        digits keep lines small.
    id_prefix
        Task ids are ``f"{id_prefix}{index:06d}"``.
    rate, clock, sleep
        Optional pacing in tasks per second (feedback records are not paced); ``clock`` and
        ``sleep`` are injectable for tests.
    batch
        Most records one :meth:`poll` returns.
    position
        A dict from :meth:`position` to resume after (O(1)); a bare ``{"records": n}`` also
        works and replays only the record schedule, not the tasks.

    Attributes
    ----------
    exhausted
        ``True`` once a finite stream has handed out its last record.
    boundaries
        The true switch points among the tasks handed out so far (evaluation only).

    Notes
    -----
    A switch may draw the current mode again: the task still changes (fresh parameters or
    classes), so boundaries are a superset of family changes. Image data sets load on the first
    task of their mode. Records carry ``position`` = records handed out so far, for :meth:`ack`.
    """

    def __init__(self, modes: Mapping[str, float] | Sequence[str] | str, *, n_tasks: int | None = None,
                 seed: int = 0, p_stay: float = 0.9, recur: float = 0.0, labels: str = "inline",
                 delay: int = 1, delayed_share: float = 1.0, n_way: int = 5, k_shot: int | None = None,
                 k_query: int | None = None, split: str = "train",
                 families: Mapping[str, Mapping[str, Any]] | None = None, flatten: bool = False,
                 digits: int | None = 5, id_prefix: str = "t-", rate: float | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 batch: int = 16, position: Mapping[str, Any] | None = None, name: str | None = None):
        from agent.data import family_names

        if isinstance(modes, str):
            modes = [modes]
        if not isinstance(modes, Mapping):
            modes = {m: 1.0 for m in modes}
        if not modes:
            raise ValueError("modes must name at least one mode")
        probs = np.array([float(p) for p in modes.values()])
        if not np.all(np.isfinite(probs)) or (probs < 0).any() or probs.sum() <= 0:
            raise ValueError(f"mode probabilities must be non-negative with a positive sum, got {dict(modes)}")
        self.modes: dict[str, float] = dict(zip(modes, (probs / probs.sum()).tolist()))
        self._mode_names = list(self.modes)
        self._probs = probs / probs.sum()
        self.families = {m: dict((families or {}).get(m, {})) for m in self._mode_names}
        unknown = sorted(set(families or {}) - set(self._mode_names))
        if unknown:
            raise ValueError(f"families configures modes that are not in modes: {unknown}")
        known = family_names()
        for m, kw in self.families.items():
            if kw.get("family", m) not in known:
                raise ValueError(f"mode {m!r}: unknown family {kw.get('family', m)!r}; known: {known}")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if not 0.0 <= p_stay <= 1.0 or not 0.0 <= recur <= 1.0 or not 0.0 <= delayed_share <= 1.0:
            raise ValueError("p_stay, recur and delayed_share must lie in [0, 1]")
        if labels not in LABELS:
            raise ValueError(f"labels must be one of {LABELS}, got {labels!r}")
        if int(delay) < 1:
            raise ValueError(f"delay must be at least 1 record, got {delay!r}")
        if n_tasks is not None and int(n_tasks) < 0:
            raise ValueError(f"n_tasks must be >= 0 or None, got {n_tasks!r}")
        if rate is not None and not rate > 0:
            raise ValueError(f"rate must be positive (tasks per second) or None, got {rate!r}")
        if digits is not None and int(digits) < 1:
            raise ValueError(f"digits must be >= 1 or None, got {digits!r}")
        if int(batch) < 1:
            raise ValueError(f"batch must be >= 1, got {batch!r}")
        self.name = name
        self.n_tasks = None if n_tasks is None else int(n_tasks)
        self.seed, self.p_stay, self.recur = int(seed), float(p_stay), float(recur)
        self.labels, self.delay, self.delayed_share = labels, int(delay), float(delayed_share)
        self.n_way, self.k_shot, self.k_query, self.split = int(n_way), k_shot, k_query, split
        self.flatten, self.digits, self.id_prefix = bool(flatten), None if digits is None else int(digits), id_prefix
        self.rate, self._clock, self._sleep, self.batch = rate, clock, sleep, int(batch)

        self._families: dict[str, Any] = {}  # built on first use: image data sets load lazily
        self._blocks: dict[tuple[int, int], np.ndarray] = {}
        self._cum_switches = [0]  # switches in blocks < b
        self._keys: dict[int, int] = {}  # segment start -> index of the task it repeats (memo)
        self._withheld: dict[int, list] = {}  # delayed task index -> its query labels
        self._delayed_block: tuple[int, np.ndarray | None] = (-1, None)

        # The schedule: records handed out, next task, feedback slots (record index -> task).
        self._records, self._next_task, self._pending = 0, 0, {}
        if position:
            self._restore(position)
        self._acked_state = self._state()
        self._t0, self._paced = self._clock(), 0
        self.last_position = self._records
        self.exhausted = self._finished()

    def __repr__(self) -> str:
        return (f"SyntheticStream({self.name or self.modes!r}, n_tasks={self.n_tasks}, seed={self.seed}, "
                f"p_stay={self.p_stay}, labels={self.labels!r})")

    # -- the switch process ------------------------------------------------------------------

    def _block(self, b: int, what: int) -> np.ndarray:
        """Block ``b`` of switch flags (0), drawn modes (1) or recurrence flags (2)."""
        key = (b, what)
        if key not in self._blocks:
            rng = np.random.default_rng([self.seed, _SWITCHES, b])
            switch = rng.random(_BLOCK) < 1.0 - self.p_stay
            if b == 0:
                switch[0] = True  # task 0 starts segment 0
            drawn = rng.choice(len(self._probs), size=_BLOCK, p=self._probs)
            recurs = rng.random(_BLOCK) < self.recur
            if len(self._blocks) >= 3 * _MAX_CACHED_BLOCKS:
                for old in list(self._blocks)[:3]:
                    del self._blocks[old]
            self._blocks.update({(b, 0): switch, (b, 1): drawn, (b, 2): recurs})
        return self._blocks[key]

    def _segment_start(self, i: int) -> int:
        b, k = divmod(i, _BLOCK)
        while True:
            hits = np.flatnonzero(self._block(b, 0)[: k + 1])
            if hits.size:
                return b * _BLOCK + int(hits[-1])
            b, k = b - 1, _BLOCK - 1  # block 0 always has a switch at 0, so this ends

    def _segment_number(self, i: int) -> int:
        b, k = divmod(i, _BLOCK)
        while len(self._cum_switches) <= b:
            j = len(self._cum_switches) - 1
            self._cum_switches.append(self._cum_switches[-1] + int(self._block(j, 0).sum()))
        return self._cum_switches[b] + int(self._block(b, 0)[: k + 1].sum()) - 1

    def _mode_at(self, start: int) -> int:
        return int(self._block(start // _BLOCK, 1)[start % _BLOCK])

    def _identity(self, start: int) -> int:
        """The task index whose draw defines the task of the segment starting at ``start``."""
        chain, key = [], None
        while key is None:
            if start in self._keys:
                key = self._keys[start]
                break
            chain.append(start)
            mode = self._mode_at(start)
            key = start
            # Recur only into a mode other than the current one: the task visibly changes.
            if start > 0 and self._block(start // _BLOCK, 2)[start % _BLOCK]:
                previous = self._segment_start(start - 1)
                if self._mode_at(previous) != mode:
                    s = previous
                    while s > 0:
                        s = self._segment_start(s - 1)
                        if self._mode_at(s) == mode:
                            key, start = None, s
                            break
        if len(self._keys) > 100_000:
            self._keys.clear()
        for s in chain:
            self._keys[s] = key
        return key

    def info(self, index: int) -> dict:
        """Ground truth of task ``index`` (for evaluation): ``family``, ``segment``, ``start``
        (first task of its segment) and ``identity`` (the task index that defined its task;
        equal identities across segments mean a recurring task)."""
        start = self._segment_start(int(index))
        return {"family": self._mode_names[self._mode_at(start)], "segment": self._segment_number(int(index)),
                "start": start, "identity": self._identity(start)}

    def boundaries_upto(self, n: int) -> list[int]:
        """Indices ``i`` in ``1..n-1`` of tasks that start a new segment (the hidden switches)."""
        out: list[int] = []
        for b in range(0, (int(n) + _BLOCK - 1) // _BLOCK):
            hits = np.flatnonzero(self._block(b, 0)) + b * _BLOCK
            out.extend(int(h) for h in hits if 0 < h < n)
        return out

    @property
    def boundaries(self) -> list[int]:
        """True boundaries among the tasks handed out so far (task indices)."""
        return self.boundaries_upto(self._next_task)

    # -- tasks -------------------------------------------------------------------------------

    def family(self, mode: str):
        """The task family behind ``mode`` (built, and its data loaded, on first use)."""
        if mode not in self._families:
            from agent.data import make_family

            kw = dict(self.families[mode])
            name = kw.pop("family", mode)
            kw.setdefault("split", self.split)
            kw.setdefault("n_way", self.n_way)
            for key in ("k_shot", "k_query"):
                if getattr(self, key) is not None:
                    kw.setdefault(key, getattr(self, key))
            self._families[mode] = make_family(name, **kw)
        return self._families[mode]

    def arrays(self, index: int) -> tuple[dict, tuple[np.ndarray, ...]]:
        """``(ground truth, (support_x, support_y, query_x, query_y))`` of task ``index``."""
        truth = self.info(index)
        fam = self.family(truth["family"])
        identity = np.random.default_rng([self.seed, _TASK_IDENTITY, truth["identity"]])
        rng = np.random.default_rng([self.seed, _EXAMPLES, int(index)])
        if fam.kind == "regression":
            t = fam.task(fam.sample_params(identity), rng)
            arrays = tuple(a.numpy() for a in (t.support_x, t.support_y, t.query_x, t.query_y))
        else:
            arrays = self._episode(fam, identity.choice(fam.classes, size=fam.n_way, replace=False), rng)
        return truth, arrays

    def _episode(self, fam, classes: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        # The segment's classes in a fixed order (= fixed labelling); fresh images each task.
        from agent.data.episodes import draw_examples, to_float_images

        s_idx, s_y, q_idx, q_y = draw_examples(fam.dataset.indices(), classes, fam.k_shot, fam.k_query, rng)
        sx, qx = (to_float_images(fam.dataset.x[i]).numpy() for i in (s_idx, q_idx))
        if self.flatten:
            sx, qx = sx.reshape(len(sx), -1), qx.reshape(len(qx), -1)
        return sx, s_y, qx, q_y

    def _round(self, a: np.ndarray, compact: bool = False) -> list:
        """``a`` as nested lists of numbers with ``digits`` significant digits; ``compact``
        writes integral values as integers (``0`` rather than ``0.0``: images are mostly zeros,
        and inputs are read back as float32 whatever their JSON type)."""
        if a.dtype.kind in "iu":
            return a.tolist()
        a = np.asarray(a, dtype=np.float64)
        if self.digits is None:
            return self._compact(a.astype(np.float32).astype(np.float64)) if compact else a.astype(np.float32).tolist()
        out = np.zeros_like(a)
        nz = a != 0
        v = a[nz]
        # Scale by an exact power of ten so the rounded value prints with <= digits digits.
        e = self.digits - 1 - np.floor(np.log10(np.abs(v)))
        up = e >= 0
        scale = 10.0 ** np.abs(e)
        v = np.where(up, np.round(v * scale) / scale, np.round(v / scale) * scale)
        out[nz] = v
        return self._compact(out) if compact else out.tolist()

    @staticmethod
    def _compact(a: np.ndarray) -> list:
        whole = a == np.floor(a)
        if not whole.any():
            return a.tolist()
        mixed = a.astype(object)
        mixed[whole] = a[whole].astype(np.int64)
        return mixed.tolist()

    def _task_record(self, index: int, withhold: bool) -> tuple[dict, list]:
        truth, (sx, sy, qx, qy) = self.arrays(index)
        qy = self._round(qy)
        query = {"x": self._round(qx, compact=True)}
        if self.labels != "none" and not withhold:
            query["y"] = qy
        record = {"type": "task", "id": self.task_id(index), "kind": self.family(truth["family"]).kind,
                  "support": {"x": self._round(sx, compact=True), "y": self._round(sy)}, "query": query,
                  "meta": {"family": truth["family"], "segment": truth["segment"]}}
        return record, qy

    def task_id(self, index: int) -> str:
        """The wire id of task ``index``."""
        return f"{self.id_prefix}{int(index):06d}"

    def _delayed(self, index: int) -> bool:
        if self.labels != "delayed":
            return False
        b, k = divmod(index, _BLOCK)
        if self._delayed_block[0] != b:
            flags = np.random.default_rng([self.seed, _DELAYED, b]).random(_BLOCK) < self.delayed_share
            self._delayed_block = (b, flags)
        return bool(self._delayed_block[1][k])

    # -- the record schedule -----------------------------------------------------------------

    def _state(self) -> tuple:
        return self._records, self._next_task, tuple(sorted(self._pending.items()))

    def _set_state(self, state: tuple) -> None:
        self._records, self._next_task, pending = state
        self._pending = dict(pending)

    def _finished(self) -> bool:
        return self.n_tasks is not None and self._next_task >= self.n_tasks and not self._pending

    def _next_kind(self) -> str | None:
        if self._records in self._pending:
            return "feedback"
        if self.n_tasks is None or self._next_task < self.n_tasks:
            return "task"
        return "flush" if self._pending else None

    def _advance(self, build: bool) -> bytes | None:
        """Move the schedule one record on; the record's bytes when ``build``."""
        kind, data = self._next_kind(), None
        if kind == "task":
            index = self._next_task
            withhold = self._delayed(index)
            if withhold:
                self._pending[self._records + self.delay] = index
            if build:
                record, qy = self._task_record(index, withhold)
                if withhold:
                    self._withheld[index] = qy
                data = _dumps(record)
            self._next_task += 1
        else:  # feedback due now, or the tail of a finite stream
            slot = self._records if kind == "feedback" else min(self._pending)
            index = self._pending.pop(slot)
            if build:
                qy = self._withheld.pop(index, None)
                if qy is None:  # after a restore: regenerate the task
                    qy = self._task_record(index, True)[1]
                data = _dumps({"type": "feedback", "id": self.task_id(index), "y": qy})
        self._records += 1
        return data

    def _restore(self, position: Mapping[str, Any]) -> None:
        records = int(position.get("records", 0))
        if "tasks" in position:
            self._records, self._next_task = records, int(position["tasks"])
            self._pending = {int(s): int(t) for s, t in position.get("pending", [])}
        else:  # a bare record count: replay the schedule (cheap, no tasks are generated)
            while self._records < records and self._next_kind() is not None:
                self._advance(build=False)
        if self._records != records:
            raise ValueError(f"position {dict(position)} is beyond the end of this stream")

    # -- the Source protocol -----------------------------------------------------------------

    def poll(self, timeout: float = 0.0) -> list[Record]:
        """Up to ``batch`` records; with ``rate``, only those due, waiting up to ``timeout``
        seconds for the first one."""
        out: list[Record] = []
        deadline = self._clock() + max(0.0, timeout)
        while len(out) < self.batch and not self._finished():
            if self.rate and self._next_kind() == "task":
                due, now = self._t0 + self._paced / self.rate, self._clock()
                if due > now:
                    if out:
                        break
                    if due > deadline:
                        self._sleep(max(0.0, deadline - now))
                        break
                    self._sleep(due - now)
                self._paced += 1
            data = self._advance(build=True)
            out.append(Record(data, self._records, False, len(data)))
        if out:
            self.last_position = self._records
        self.exhausted = self._finished()
        return out

    def ack(self, position: int) -> None:
        """Records up to and including the one at ``position`` have been answered."""
        position = int(position)
        if position <= self._acked_state[0]:
            return
        if position > self._records:
            raise ValueError(f"position {position} was not handed out by this stream")
        # Replay the schedule from the last acknowledged state (no tasks are built): nothing
        # per record is kept, so a consumer that rarely acknowledges costs no memory.
        current = self._state()
        self._set_state(self._acked_state)
        while self._records < position:
            self._advance(build=False)
        self._acked_state = self._state()
        self._set_state(current)

    def position(self) -> dict:
        """``{"records": acknowledged records, "tasks": tasks among them, "pending": feedback
        slots}``; pass it as ``position=`` to resume after the last acknowledged record."""
        records, tasks, pending = self._acked_state
        return {"records": records, "tasks": tasks, "pending": [list(p) for p in pending]}

    def close(self) -> None:
        self._withheld.clear()


def _dumps(record: dict) -> bytes:
    return json.dumps(record, separators=(",", ":"), allow_nan=False).encode()


# -- presets ---------------------------------------------------------------------------------

PRESETS: dict[str, tuple[str, dict]] = {
    "sinusoid-demo": (
        "endless sine regression switching (p_stay 0.9) between sinusoid and shifted variants; "
        "30% of tasks get delayed feedback 3 records later",
        dict(modes={"sinusoid": 0.5, "sinusoid-frequency": 0.2, "sinusoid-amplitude": 0.15, "linear": 0.15},
             p_stay=0.9, recur=0.3, labels="delayed", delay=3, delayed_share=0.3, k_shot=10, k_query=10)),
    "sinusoid-osaka": (
        "OSAKA-style regression, 10,000 tasks: sinusoid (p 0.5, the pre-training distribution), "
        "sinusoid-frequency (0.25), linear (0.25); p_stay 0.9 (try 0.98), inline labels",
        dict(modes={"sinusoid": 0.5, "sinusoid-frequency": 0.25, "linear": 0.25}, n_tasks=10_000,
             p_stay=0.9, recur=0.5, k_shot=10, k_query=10)),
    "glyphs-osaka": (
        "OSAKA-style 5-way 5-shot images, 10,000 tasks: glyphs train classes (p 0.5), Fashion-MNIST "
        "(0.25) and digits (0.25) test images; p_stay 0.9 (try 0.98); 3-digit pixels, (1, 28, 28)",
        dict(modes={"glyphs": 0.5, "fashion": 0.25, "digits": 0.25}, n_tasks=10_000, p_stay=0.9, recur=0.5,
             n_way=5, k_shot=5, k_query=5, digits=3,
             families={"fashion": {"split": "test"}, "digits": {"split": "test"}})),
}


def preset_names() -> list[str]:
    """Names :func:`make_stream` accepts."""
    return list(PRESETS)


def make_stream(name: str, **overrides) -> SyntheticStream:
    """The preset stream ``name`` with options overridden by ``overrides``.

    >>> make_stream("sinusoid-osaka", p_stay=0.98).p_stay
    0.98
    """
    if name not in PRESETS:
        raise ValueError(f"unknown synthetic stream {name!r}; known: {preset_names()}")
    options = {**PRESETS[name][1], **overrides}
    if "modes" in overrides and "families" not in overrides:  # the preset's settings of dropped modes
        options["families"] = {m: kw for m, kw in options.get("families", {}).items() if m in options["modes"]}
    options.setdefault("name", name)
    return SyntheticStream(**options)


def describe() -> str:
    """One line per preset, for help texts."""
    width = max(map(len, PRESETS))
    return "\n".join(f"{name:<{width}}  {text}" for name, (text, _) in PRESETS.items())
