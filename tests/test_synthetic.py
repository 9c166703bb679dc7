"""Synthetic OSAKA-style streams: determinism, positions, hidden boundaries, labels, presets."""

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import require_system

from agent.streams import iter_records
from agent.streams.synthetic import SyntheticStream, describe, make_stream, preset_names
from agent.task import Feedback, Task, parse_record

REGRESSION = dict(modes={"sinusoid": 0.5, "sinusoid-frequency": 0.25, "linear": 0.25}, k_shot=5, k_query=5)


def read_all(stream):
    return list(iter_records(stream, timeout=0))


def parsed(records):
    return [parse_record(r.data) for r in records]


def test_same_seed_same_stream_other_seed_other_stream():
    a = read_all(make_stream("sinusoid-demo", n_tasks=40, seed=3))
    b = read_all(make_stream("sinusoid-demo", n_tasks=40, seed=3))
    c = read_all(make_stream("sinusoid-demo", n_tasks=40, seed=4))
    assert [r.data for r in a] == [r.data for r in b]
    assert [r.data for r in a] != [r.data for r in c]
    assert [r.position for r in a] == list(range(1, len(a) + 1))


@pytest.mark.parametrize("bare", [False, True])
def test_restore_continues_identically_after_each_acknowledged_record(bare):
    options = dict(n_tasks=25, seed=7, labels="delayed", delay=3, delayed_share=0.6, batch=4)
    full = [r.data for r in read_all(make_stream("sinusoid-demo", **options))]
    for stop in range(0, len(full) + 1, 3):
        stream = make_stream("sinusoid-demo", **options)
        seen = []
        while len(seen) < stop:  # read past the acknowledged record, as a busy agent would
            seen += stream.poll(0)
        if stop:
            stream.ack(seen[stop - 1].position)
        position = stream.position()
        if bare:
            position = {"records": position["records"]}  # replays the schedule, still no tasks
        position = json.loads(json.dumps(position))  # checkpoints hold JSON
        again = make_stream("sinusoid-demo", position=position, **options)
        assert [r.data for r in read_all(again)] == full[stop:], stop
        assert again.exhausted


def test_restore_is_o1_far_into_an_endless_stream():
    stream = SyntheticStream(REGRESSION["modes"], seed=1, position={"records": 2_000_000, "tasks": 2_000_000,
                                                                      "pending": []})
    record = parse_record(stream.poll(0)[0].data)
    assert record.id == "t-2000000"
    assert record.meta["segment"] == stream.info(2_000_000)["segment"] > 100_000


def test_boundaries_are_where_segments_and_families_change():
    stream = SyntheticStream(REGRESSION["modes"], n_tasks=400, seed=2, p_stay=0.9)
    tasks = [t for t in parsed(read_all(stream)) if isinstance(t, Task)]
    segments = [t.meta["segment"] for t in tasks]
    families = [t.meta["family"] for t in tasks]
    starts = [i for i in range(1, len(tasks)) if segments[i] != segments[i - 1]]
    assert stream.boundaries == starts == stream.boundaries_upto(400)
    assert len(starts) > 10 and segments[0] == 0 and segments[-1] == len(starts)
    assert {i for i in range(1, len(tasks)) if families[i] != families[i - 1]} <= set(starts)
    assert all(stream.info(i)["family"] == families[i] for i in range(0, 400, 7))


def test_boundaries_only_cover_tasks_handed_out():
    stream = SyntheticStream(REGRESSION["modes"], seed=2, batch=10)
    stream.poll(0)
    assert stream.boundaries == stream.boundaries_upto(10)


@pytest.mark.parametrize("p_stay, n", [(0.9, 50_000), (0.98, 200_000)])
def test_segment_lengths_and_mode_shares_follow_the_markov_chain(p_stay, n):
    stream = make_stream("sinusoid-osaka", p_stay=p_stay, n_tasks=n, seed=11)
    starts = [0] + stream.boundaries_upto(n)
    lengths = np.diff(starts + [n])
    assert abs(lengths.mean() - 1 / (1 - p_stay)) < 0.1 / (1 - p_stay)
    modes = [stream.info(s)["family"] for s in starts[:3000]]
    for mode, p in stream.modes.items():
        assert abs(modes.count(mode) / len(modes) - p) < 0.05, mode


def test_p_stay_extremes():
    assert SyntheticStream("sinusoid", seed=0, p_stay=1.0).boundaries_upto(5000) == []
    assert SyntheticStream("sinusoid", seed=0, p_stay=0.0).boundaries_upto(50) == list(range(1, 50))


def test_every_line_is_a_valid_record_with_only_family_and_segment_in_meta():
    stream = make_stream("sinusoid-demo", n_tasks=60, seed=5)
    records = read_all(stream)
    items = parsed(records)
    assert all(isinstance(x, (Task, Feedback)) for x in items)
    tasks = [x for x in items if isinstance(x, Task)]
    assert len(tasks) == 60 and len({t.id for t in tasks}) == 60
    assert all(set(t.meta) == {"family", "segment"} for t in tasks)
    assert all(t.kind == "regression" and t.support_x.shape == (10, 1) for t in tasks)
    assert all(r.size == len(r.data) and b"\n" not in r.data for r in records)
    line = json.loads(records[0].data)
    assert set(line) == {"type", "id", "kind", "support", "query", "meta"}


def test_numbers_are_rounded_to_significant_digits():
    line = read_all(SyntheticStream("sinusoid", n_tasks=1, seed=0, digits=3))[0].data.decode()
    numbers = [float(v) for v in json.loads(line)["support"]["x"][0]] + json.loads(line)["support"]["y"][0]
    assert all(len(f"{abs(v):.10g}".replace(".", "").lstrip("0")) <= 3 for v in numbers)
    full = read_all(SyntheticStream("sinusoid", n_tasks=1, seed=0, digits=None))[0]
    assert len(full.data) > len(line)


def test_delayed_feedback_comes_exactly_delay_records_later_with_the_withheld_labels():
    options = dict(n_tasks=80, seed=9, **REGRESSION)
    inline = {t.id: t for t in parsed(read_all(SyntheticStream(labels="inline", **options)))}
    delayed = parsed(read_all(SyntheticStream(labels="delayed", delay=4, delayed_share=0.5, **options)))
    at = {(type(x).__name__, x.id): i for i, x in enumerate(delayed)}
    withheld = [x for x in delayed if isinstance(x, Task) and x.query_y is None]
    feedback = [x for x in delayed if isinstance(x, Feedback)]
    assert 20 < len(withheld) == len(feedback) < 60
    assert all(x.query_y is not None for x in delayed if isinstance(x, Task) and x not in withheld)
    last_task = max(i for i, x in enumerate(delayed) if isinstance(x, Task))
    tail = last_task + 1 - 4  # once the tasks run out, outstanding feedback is flushed at once
    for task in withheld:
        i = at[("Task", task.id)]
        j = at[("Feedback", task.id)]
        assert j == i + 4 if i <= tail else i < j <= last_task + 4
        complete = task.with_feedback(delayed[j])
        np.testing.assert_array_equal(complete.query_y, inline[task.id].query_y)
        np.testing.assert_array_equal(complete.query_x, inline[task.id].query_x)


def test_no_labels_means_no_query_y_and_no_feedback():
    items = parsed(read_all(SyntheticStream("linear", n_tasks=10, seed=0, labels="none")))
    assert len(items) == 10 and all(isinstance(x, Task) and x.query_y is None for x in items)


def line_fit(task):
    x, y = task.support_x[:, 0].astype(float), task.support_y[:, 0].astype(float)
    return np.polyfit(x, y, 1)


def test_recurring_tasks_bring_back_the_same_function():
    stream = SyntheticStream({"linear": 0.5, "sinusoid": 0.5}, n_tasks=300, seed=4, p_stay=0.8, recur=1.0)
    tasks = {t.meta["segment"]: t for t in parsed(read_all(stream)) if t.meta["family"] == "linear"}
    starts = [0] + stream.boundaries_upto(300)
    identity = {stream.info(s)["segment"]: stream.info(s)["identity"] for s in starts}
    recurring = [s for s in tasks if identity[s] != starts[s]]
    assert len(recurring) > 5
    for s in recurring:
        original = stream.info(identity[s])["segment"]
        np.testing.assert_allclose(line_fit(tasks[s]), line_fit(tasks[original]), atol=1e-2)
    fresh = sorted(s for s in tasks if identity[s] == starts[s])
    assert not np.allclose(line_fit(tasks[fresh[0]]), line_fit(tasks[fresh[1]]), atol=1e-2)


def test_class_segments_keep_their_classes_and_labelling():
    stream = SyntheticStream("digits", n_tasks=12, seed=0, p_stay=0.5, recur=0.0, n_way=3, k_shot=2, k_query=2,
                             flatten=True, digits=3)
    tasks = parsed(read_all(stream))
    assert all(t.kind == "classification" and t.n_way == 3 and t.support_x.shape == (6, 784) for t in tasks)
    assert 0.0 <= min(t.support_x.min() for t in tasks) and max(t.support_x.max() for t in tasks) <= 1.0
    digits = stream.family("digits").dataset
    flat = digits.x.reshape(len(digits.x), -1) / 255.0
    labelling = []  # (task label, digit class) pairs, found by matching each image to the data set
    for t in tasks:
        nearest = [int(digits.y[np.abs(flat - x).sum(1).argmin()]) for x in t.support_x]
        labelling.append(sorted(set(zip(t.support_y.tolist(), nearest))))
    assert all(len(pairs) == 3 for pairs in labelling)
    changed = []
    for i in range(1, len(tasks)):
        if tasks[i].meta["segment"] == tasks[i - 1].meta["segment"]:
            assert labelling[i] == labelling[i - 1]
        else:
            changed.append(labelling[i] != labelling[i - 1])
    assert changed and any(changed)


def test_glyphs_osaka_preset_with_a_small_glyph_set():
    from agent.data.glyphs import discover_fonts

    require_system("fonts-noto-core / fonts-freefont-ttf", bool(discover_fonts()))
    glyphs = {"samples": 4, "max_chars": 5, "max_scripts": 6}
    stream = make_stream("glyphs-osaka", n_tasks=30, seed=1, k_shot=1, k_query=1, p_stay=0.7,
                         families={"glyphs": glyphs, "digits": {"split": "test"}},
                         modes={"glyphs": 0.5, "digits": 0.5})
    records = read_all(stream)
    tasks = parsed(records)
    assert {t.meta["family"] for t in tasks} == {"glyphs", "digits"}
    assert all(t.n_way == 5 and t.support_x.shape == (5, 1, 28, 28) for t in tasks)
    assert max(r.size for r in records) < 60_000


def test_pacing_uses_the_injected_clock():
    now = [100.0]
    naps = []

    def sleep(seconds):
        naps.append(seconds)
        now[0] += seconds

    stream = SyntheticStream("sinusoid", n_tasks=5, seed=0, rate=2.0, clock=lambda: now[0], sleep=sleep)
    assert len(stream.poll(0)) == 1  # the first task is due at once, the next in 0.5 s
    assert stream.poll(0.2) == [] and naps == pytest.approx([0.2])
    assert len(stream.poll(1.0)) == 1 and naps == pytest.approx([0.2, 0.3])
    now[0] += 10
    assert len(stream.poll(0)) == 3 and stream.exhausted


def test_source_protocol_details():
    stream = SyntheticStream("sinusoid", n_tasks=3, seed=0, batch=2)
    assert stream.position() == {"records": 0, "tasks": 0, "pending": []}
    first = stream.poll(0)
    assert len(first) == 2 and not stream.exhausted
    with pytest.raises(ValueError):
        stream.ack(7)
    stream.ack(first[0].position)
    stream.ack(first[0].position)  # acknowledging again is harmless
    assert stream.position()["records"] == 1
    assert len(stream.poll(0)) == 1 and stream.exhausted and stream.poll(0) == []
    stream.close()
    with pytest.raises(ValueError, match="beyond the end"):
        SyntheticStream("sinusoid", n_tasks=3, seed=0, position={"records": 9})
    assert SyntheticStream("sinusoid", n_tasks=0).exhausted


@pytest.mark.parametrize("bad", [
    dict(modes={}), dict(modes={"nope": 1.0}), dict(modes={"sinusoid": -1}), dict(seed=-1),
    dict(p_stay=1.5), dict(labels="later"), dict(delay=0), dict(rate=0), dict(digits=0),
    dict(families={"linear": {}}),
])
def test_bad_options_are_rejected(bad):
    with pytest.raises(ValueError):
        SyntheticStream(**{"modes": "sinusoid", **bad})


def test_presets_and_description():
    assert {"sinusoid-demo", "sinusoid-osaka", "glyphs-osaka"} <= set(preset_names())
    text = describe()
    assert all(name in text for name in preset_names())
    demo = make_stream("sinusoid-demo")
    assert demo.n_tasks is None and demo.p_stay == 0.9 and demo.labels == "delayed" and demo.name == "sinusoid-demo"
    assert make_stream("glyphs-osaka").families["fashion"]["split"] == "test"  # nothing loaded yet
    with pytest.raises(ValueError, match="unknown synthetic stream"):
        make_stream("nope")


def test_no_global_random_state_is_touched():
    np_state, py_state, torch_state = np.random.get_state()[1].copy(), random.getstate(), torch.get_rng_state()
    read_all(make_stream("sinusoid-demo", n_tasks=20, seed=0))
    read_all(SyntheticStream("digits", n_tasks=3, seed=0, k_shot=1, k_query=1))
    assert (np.random.get_state()[1] == np_state).all() and random.getstate() == py_state
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_import_prints_nothing():
    out = subprocess.run([sys.executable, "-c", "import agent.streams.synthetic"], capture_output=True, text=True,
                         check=True)
    assert out.stdout == "" and out.stderr == ""
