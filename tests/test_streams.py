"""Sources and sinks: positions, acknowledgement, oversized lines, spool directories, dedup."""

import io
import json
import os
import threading
import time

from agent.streams import JsonlFileSource, JsonlSink, SpoolDirSource, StdinSource, iter_records


def test_file_source_resumes_after_last_acknowledged_record(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(5)))
    source = JsonlFileSource(path)
    records = list(iter_records(source))
    assert [json.loads(r.data)["n"] for r in records] == [0, 1, 2, 3, 4]
    source.ack(records[2].position)  # answered three, then "crashed"
    saved = source.position()
    source.close()
    again = JsonlFileSource(path, position=saved)
    assert [json.loads(r.data)["n"] for r in iter_records(again)] == [3, 4]


def test_file_source_follow_waits_for_complete_lines(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"n": 0}\n{"n": ')
    source = JsonlFileSource(path, follow=True, poll_interval=0.01)
    assert [r.data for r in source.poll(0.05)] == [b'{"n": 0}']
    assert source.poll(0.05) == []  # half a line is not a record yet

    def finish():
        time.sleep(0.05)
        with open(path, "a") as f:
            f.write('1}\n')

    threading.Thread(target=finish).start()
    assert [r.data for r in source.poll(2.0)] == [b'{"n": 1}']
    assert not source.exhausted


def test_oversized_line_is_reported_without_holding_it(tmp_path):
    path = tmp_path / "in.jsonl"
    big = "x" * 200_000
    path.write_text('{"n": 0}\n' + big + "\n" + '{"n": 2}\n')
    records = list(iter_records(JsonlFileSource(path, max_record_bytes=1000)))
    assert [r.oversized for r in records] == [False, True, False]
    assert records[1].size == 200_000 and records[1].data == b""
    assert records[2].data == b'{"n": 2}'


def test_blank_lines_are_skipped_and_crlf_stripped(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"n": 0}\r\n\n  \n{"n": 1}\n')
    assert [r.data for r in iter_records(JsonlFileSource(path))] == [b'{"n": 0}', b'{"n": 1}']


def test_stdin_source_reads_a_pipe_without_waiting_for_more():
    r, w = os.pipe()
    os.write(w, b'{"n": 0}\n')
    source = StdinSource(os.fdopen(r, "rb"))
    assert [x.data for x in source.poll(0.1)] == [b'{"n": 0}']  # returns although the pipe is open
    os.close(w)
    assert source.poll(0.1) == [] and source.exhausted


def test_spool_dir_takes_renamed_files_and_moves_them_to_done(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "a.tmp").write_text('{"n": 0}\n')  # still being written: ignored
    (spool / "b.jsonl").write_text('{"n": 1}\n{"n": 2}\n')
    source = SpoolDirSource(spool, follow=False, poll_interval=0.01)
    got = []
    for record in iter_records(source, timeout=0.05):
        got.append(json.loads(record.data)["n"])
        source.ack(record.position)
    assert got == [1, 2]
    assert (spool / "done" / "b.jsonl").exists() and not (spool / "b.jsonl").exists()
    assert (spool / "a.tmp").exists()


def test_spool_dir_resumes_inside_a_file(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "b.jsonl").write_text('{"n": 1}\n{"n": 2}\n')
    source = SpoolDirSource(spool, follow=False)
    first = source.poll(0.05)[0]
    source.ack(first.position)
    saved = source.position()
    source.close()
    again = SpoolDirSource(spool, follow=False, position=saved)
    assert [json.loads(r.data)["n"] for r in iter_records(again, timeout=0.05)] == [2]


def test_sink_never_writes_an_answered_id_twice_across_a_restart(tmp_path):
    out = tmp_path / "out.jsonl"
    sink = JsonlSink(out)
    sink.write({"id": "a", "predictions": [1]})
    checkpoint_offset = sink.offset()
    sink.write({"id": "b", "predictions": [2]})  # answered after the checkpoint, then a crash
    sink.close()
    resumed = JsonlSink(out, resume_offset=checkpoint_offset)
    resumed.written.add("a")  # the checkpoint's own list of answered ids
    assert resumed.write({"id": "b", "predictions": [2]}) is False
    assert resumed.write({"id": "c", "predictions": [3]}) is True
    resumed.close()
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert ids == ["a", "b", "c"]


def test_error_lines_are_always_written():
    buf = io.StringIO()
    sink = JsonlSink(stream=buf)
    for _ in range(2):
        sink.write({"id": "x", "error": {"code": "bad_json", "message": "..."}})
    assert len(buf.getvalue().splitlines()) == 2


def test_spool_dir_reads_on_while_a_finished_file_awaits_acknowledgement(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "a.jsonl").write_text('{"n": 1}\n')
    (spool / "b.jsonl").write_text('{"n": 2}\n')
    source = SpoolDirSource(spool, follow=False)
    records = list(iter_records(source, timeout=0.05))
    assert [json.loads(r.data)["n"] for r in records] == [1, 2]
    assert not (spool / "done" / "a.jsonl").exists()  # read, not yet answered
    source.ack(records[1].position)  # answering b implies a was answered before it
    assert sorted(p.name for p in (spool / "done").iterdir()) == ["a.jsonl", "b.jsonl"]


def test_sink_cuts_a_torn_last_line_left_by_a_crash(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a", "predictions": [1]}\n{"id": "b", "predic')
    sink = JsonlSink(out, resume_offset=0)
    sink.write({"id": "c", "predictions": [3]})
    sink.close()
    lines = out.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["a", "c"]
