"""Drift detection on the agent's outcome streams.

:class:`DriftMonitor` feeds River detectors, one per signal:

* ``quality``: the per-task quality (query accuracy, or negative MSE), by default
  ``drift.ADWIN()``: no false alarms on stationary streams in the planning measurements, about
  70-90 tasks of delay on a 0.15 drop;
* ``failure``: the 0/1 failure indicator, by default ``drift.binary.HDDMA()``;
* ``input``: one task feature, known *before* any label (:meth:`DriftMonitor.update_input`; the
  agent feeds the log normalised initial support loss at the meta-initialisation), by default
  ``drift.ADWIN()``: a covariate shift (a new task family) shows there at once, while the outcome
  signals need labels and move only when the answers get worse, which a shift to a family the
  agent handles as well does not do. On the agent's mixed sine/linear/quadratic stream this
  signal found about half of the family changes at a median delay of ~30 tasks, the quality
  signal about a sixth (``bench/online_bench.py``).

Detectors are picked by name (:data:`DETECTORS`) with keyword overrides. Two River traps are
handled here: ``ADWIN.n_detections`` is wiped by its self-reset after a detection, so the monitor
keeps its own counts (:attr:`DriftMonitor.n_detections`); and ``binary.FHDDM`` flags a *drop* in
the rate of ones (1 = correct, despite its docstring), so the monitor feeds it success
indicators (``not failed``). Detectors reset themselves on the update after a detection, so
events are reported from the update that raised them.

Examples
--------
>>> import random
>>> rng = random.Random(0)
>>> mon = DriftMonitor()
>>> events = []
>>> for t in range(2000):
...     q = rng.gauss(0.8 if t < 1000 else 0.6, 0.05)
...     events += mon.update(quality=q, failed=q < 0.7)
>>> sorted({e.signal for e in events})
['failure', 'quality']
>>> all(1000 <= e.index < 1150 for e in events)
True
>>> mon.n_detections["quality"] >= 1
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from river import drift

__all__ = ["DriftEvent", "DriftMonitor", "DETECTORS", "make_detector"]


def _fhddm(**kw):
    return drift.binary.FHDDM(**kw)


#: name -> (factory, binary?, feed success instead of failure?)
DETECTORS: dict[str, tuple[Callable[..., Any], bool, bool]] = {
    "adwin": (drift.ADWIN, False, False),
    "page_hinkley": (drift.PageHinkley, False, False),
    "kswin": (drift.KSWIN, False, False),
    "hddm_a": (drift.binary.HDDMA, True, False),
    "hddm_w": (drift.binary.HDDMW, True, False),
    "ddm": (drift.binary.DDM, True, False),
    "eddm": (drift.binary.EDDM, True, False),
    "fhddm": (_fhddm, True, True),  # River's FHDDM detects a drop in the rate of ones: feed successes
    "none": (drift.NoDrift, False, False),
}


def make_detector(name: str, **params):
    """A fresh River detector by name (see :data:`DETECTORS`).

    Examples
    --------
    >>> type(make_detector("adwin", delta=0.01)).__name__
    'ADWIN'
    """
    try:
        factory = DETECTORS[name][0]
    except KeyError:
        raise ValueError(f"unknown drift detector {name!r}; known: {', '.join(DETECTORS)}") from None
    return factory(**params)


@dataclass(frozen=True)
class DriftEvent:
    """A detection: which signal and detector, and the update index (0-based) that raised it."""

    signal: str
    detector: str
    index: int


class DriftMonitor:
    """ADWIN on quality and HDDM_A on failures (configurable), with reliable detection counts.

    Parameters
    ----------
    quality_detector, failure_detector, input_detector
        Detector names from :data:`DETECTORS` (``"none"`` disables a signal); the input detector
        must take real values (not a binary one).
    quality_params, failure_params, input_params
        Keyword arguments for the detectors.

    Attributes
    ----------
    n_updates, n_input_updates
        Outcome and input updates so far (the index of the next one of each).
    n_detections
        Detections per signal, counted here (River's ADWIN resets its own counter).
    events
        The most recent events (bounded by ``max_events``).
    """

    def __init__(self, quality_detector: str = "adwin", failure_detector: str = "hddm_a", input_detector: str = "none", *,
                 quality_params: dict | None = None, failure_params: dict | None = None, input_params: dict | None = None,
                 max_events: int = 1000):
        if DETECTORS.get(input_detector, (None, False))[1]:
            raise ValueError(f"input_detector must take real values, {input_detector!r} is binary")
        self.quality_name = quality_detector
        self.failure_name = failure_detector
        self.quality_params = dict(quality_params or {})
        self.failure_params = dict(failure_params or {})
        self.quality = make_detector(quality_detector, **self.quality_params)
        self.failure = make_detector(failure_detector, **self.failure_params)
        self._feed_success = DETECTORS[failure_detector][2]
        self.input_name = input_detector
        self.input = make_detector(input_detector, **dict(input_params or {}))
        self.n_updates = 0
        self.n_input_updates = 0
        self.n_detections = {"quality": 0, "failure": 0, "input": 0}
        self.n_warnings = {"quality": 0, "failure": 0}
        self.max_events = int(max_events)
        self.events: list[DriftEvent] = []

    def __repr__(self) -> str:
        return (f"DriftMonitor(quality={self.quality_name!r}, failure={self.failure_name!r}, "
                f"input={getattr(self, 'input_name', 'none')!r}, "
                f"n_updates={self.n_updates}, n_detections={self.n_detections})")

    def update(self, quality: float | None = None, failed: bool | None = None) -> list[DriftEvent]:
        """Feed one task's outcome; either signal may be ``None`` (not observed). Returns new events."""
        idx = self.n_updates
        self.n_updates += 1
        out: list[DriftEvent] = []
        if quality is not None and quality == quality:  # skip NaN: it would poison ADWIN's sums
            self.quality.update(float(quality))
            if self.quality.drift_detected:
                out.append(DriftEvent("quality", self.quality_name, idx))
        if failed is not None:
            bit = (not failed) if self._feed_success else bool(failed)
            self.failure.update(int(bit))
            if getattr(self.failure, "warning_detected", False):
                self.n_warnings["failure"] += 1
            if self.failure.drift_detected:
                out.append(DriftEvent("failure", self.failure_name, idx))
        return self._record(out)

    def update_input(self, value: float) -> list[DriftEvent]:
        """Feed one task's input feature (before its label; non-finite values are skipped). Returns new events."""
        if getattr(self, "input", None) is None:  # a monitor pickled before the input signal existed
            return []
        idx = self.n_input_updates
        self.n_input_updates += 1
        out: list[DriftEvent] = []
        if value is not None and math.isfinite(value):
            self.input.update(float(value))
            if self.input.drift_detected:
                out.append(DriftEvent("input", self.input_name, idx))
        return self._record(out)

    def _record(self, out: list[DriftEvent]) -> list[DriftEvent]:
        for e in out:
            self.n_detections[e.signal] = self.n_detections.get(e.signal, 0) + 1
        if out:
            self.events.extend(out)
            del self.events[:-self.max_events]
        return out

    def gauges(self) -> dict[str, float]:
        """Current detector statistics worth exporting (ADWIN's width and estimate when present)."""
        g: dict[str, float] = {}
        for sig, det in (("quality", self.quality), ("failure", self.failure), ("input", getattr(self, "input", None))):
            for attr in ("width", "estimation"):
                v = getattr(det, attr, None)
                if isinstance(v, (int, float)):
                    g[f"{sig}_{attr}"] = float(v)
        return g
