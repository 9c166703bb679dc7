"""Drift monitor: planted shift detected with bounded delay, silence on stationary streams, traps."""

import random

import pytest
from river import drift

from agent.online.drift import DETECTORS, DriftMonitor, make_detector


def _quality(seed, n, shift_at=None, before=0.8, after=0.65, sd=0.08):
    rng = random.Random(seed)
    return [rng.gauss(after if shift_at is not None and t >= shift_at else before, sd) for t in range(n)]


def test_planted_mean_shift_detected_with_bounded_delay():
    mon = DriftMonitor(failure_detector="none")
    events = []
    for q in _quality(0, 2000, shift_at=1000):
        events += mon.update(quality=q)
    assert events and events[0].signal == "quality" and events[0].detector == "adwin"
    delay = events[0].index - 1000
    assert 0 <= delay <= 150, delay
    assert all(e.index >= 1000 for e in events)


def test_no_alarm_on_stationary_streams():
    mon = DriftMonitor()
    rng = random.Random(1)
    for q in _quality(1, 3000):
        assert mon.update(quality=q, failed=rng.random() < 0.1) == []
    assert mon.n_detections == {"quality": 0, "failure": 0, "input": 0}


def test_failure_rate_shift_detected_by_hddm_a():
    mon = DriftMonitor(quality_detector="none")
    rng = random.Random(2)
    events = []
    for t in range(2000):
        events += mon.update(failed=rng.random() < (0.1 if t < 1000 else 0.35))
    assert events and events[0].signal == "failure" and 1000 <= events[0].index <= 1150


def test_trap_adwin_resets_its_own_detection_count():
    det = drift.ADWIN()
    mon = DriftMonitor(failure_detector="none")
    seen = 0
    for q in _quality(3, 900, shift_at=300, before=0.8, after=0.5) + _quality(4, 900, before=0.9, after=0.9):
        det.update(q)
        seen += det.drift_detected
        mon.update(quality=q)
    assert seen >= 2 and det.n_detections < seen  # River's counter was wiped by the self-reset
    assert mon.n_detections["quality"] == seen


def test_trap_fhddm_fed_success_indicators():
    rng = random.Random(5)
    stream = [rng.random() < (0.1 if t < 1000 else 0.4) for t in range(2000)]
    raw = drift.binary.FHDDM()
    raw_hits = 0
    for f in stream:
        raw.update(int(f))  # what its docstring suggests: 1 = error
        raw_hits += raw.drift_detected
    assert raw_hits == 0  # the rising failure rate is never seen
    mon = DriftMonitor(quality_detector="none", failure_detector="fhddm")
    hits = [e for f in stream for e in mon.update(failed=f)]
    assert hits and 1000 <= hits[0].index <= 1200


def test_detector_registry_and_gauges():
    for name in DETECTORS:
        make_detector(name)
    with pytest.raises(ValueError):
        make_detector("HDDM")
    mon = DriftMonitor(quality_params={"delta": 0.01})
    mon.update(quality=0.5, failed=False)
    mon.update(quality=float("nan"))  # ignored, not fed to ADWIN
    assert mon.n_updates == 2 and mon.gauges()["quality_width"] == 1.0


def test_input_signal_detects_a_covariate_shift_before_any_label():
    mon = DriftMonitor(input_detector="adwin")
    rng = random.Random(3)
    events = []
    for t in range(2000):
        events += mon.update_input(rng.gauss(0.0 if t < 1000 else 1.0, 0.5))
        if t == 1500:
            mon.update_input(float("nan"))  # skipped, not fed to ADWIN
    assert [e.signal for e in events] == ["input"] * len(events) and len(events) >= 1
    assert all(1000 <= e.index < 1100 for e in events) and mon.n_detections["input"] == len(events)
    assert mon.n_updates == 0 and mon.n_input_updates == 2001  # outcome updates untouched
    quiet = DriftMonitor(input_detector="adwin")
    assert all(quiet.update_input(rng.gauss(0.0, 0.5)) == [] for _ in range(3000))
    with pytest.raises(ValueError, match="binary"):
        DriftMonitor(input_detector="hddm_a")
    assert DriftMonitor().update_input(5.0) == []  # default: no input detector ("none")
