"""``meta-agent run``: the agent as a long-running process on a task stream.

:func:`run_daemon` wires the pieces: a config (the shipped ``agent/configs/demo.yaml`` by
default), an :class:`~agent.agent.Agent` (resumed from the newest good checkpoint in
``--state-dir`` when there is one, with the stream positions saved in it), a source (a JSON
Lines file read once or followed, stdin, a spool directory, or a built-in synthetic stream), an
optional second source of feedback records, a JSON Lines sink, the Prometheus endpoint on the
agent's own registry, and signal handlers.

SIGTERM and SIGINT set a stop flag: the agent stops taking input, finishes the micro-batch in
hand, writes a checkpoint and the process exits 0. After a crash (``kill -9``) the next start
resumes from the last checkpoint: records after its source position are read again, and the
file sink skips ids it already holds, so every task is answered at least once and none twice.

Examples
--------
>>> parse_addr("127.0.0.1:9108"), parse_addr("0"), parse_addr(":9200")
(('127.0.0.1', 9108), None, ('127.0.0.1', 9200))
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any, Sequence, TextIO

__all__ = ["DEFAULT_CONFIG", "DEFAULT_STREAM", "DEFAULT_METRICS_ADDR", "add_arguments", "run_daemon", "parse_addr",
           "default_config_path", "build_source", "progress_line"]

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "demo.yaml"
DEFAULT_STREAM = "sinusoid-demo"
DEFAULT_METRICS_ADDR = "127.0.0.1:9108"


def default_config_path() -> Path:
    """The shipped demo config (package data)."""
    return Path(str(resources.files("agent") / "configs" / DEFAULT_CONFIG))


def parse_addr(text: str) -> tuple[str, int] | None:
    """``host:port`` (host defaults to 127.0.0.1) or ``0``/empty for disabled."""
    text = str(text).strip()
    if text in ("", "0", "off", "none"):
        return None
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"metrics address must be host:port or 0, got {text!r}") from None
    if not 0 <= number < 65536:
        raise ValueError(f"metrics port out of range: {number}")
    return (host or "127.0.0.1"), number


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``run`` subcommand's options."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input", "-i", metavar="FILE", help="JSON Lines tasks ('-' for stdin)")
    src.add_argument("--spool", metavar="DIR", help="spool directory (producers rename *.tmp to *.jsonl)")
    src.add_argument("--stream", metavar="NAME", help=f"built-in synthetic stream (default: {DEFAULT_STREAM})")
    p.add_argument("--follow", action="store_true", help="keep reading --input/--feedback as they grow")
    p.add_argument("--feedback", metavar="FILE", help="a second JSON Lines source of feedback records")
    p.add_argument("--output", "-o", metavar="FILE", help="answers as JSON Lines (default: stdout)")
    p.add_argument("--config", "-c", metavar="PATH", help="YAML config (default: the shipped demo config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set online.lr=0.003 (repeatable)")
    p.add_argument("--state-dir", metavar="DIR", help="checkpoints; resume from the newest good one")
    p.add_argument("--run-dir", metavar="DIR",
                   help="keep a run directory (outcomes, scores) for `meta-agent report`; appended to on resume")
    p.add_argument("--metrics-addr", metavar="HOST:PORT",
                   help=f"Prometheus endpoint (default: config metrics.addr, {DEFAULT_METRICS_ADDR}; 0 disables)")
    p.add_argument("--max-tasks", type=int, metavar="N", help="stop after N tasks (and errors)")
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="progress line on stderr (default: when stderr is a TTY)")


def build_source(args: argparse.Namespace, position: dict | None, max_record_bytes: int):
    """The task source the arguments name, positioned at ``position`` (from a checkpoint)."""
    from agent.streams import JsonlFileSource, SpoolDirSource, StdinSource

    if args.input == "-":
        return StdinSource(max_record_bytes=max_record_bytes)
    if args.input:
        return JsonlFileSource(args.input, follow=args.follow, position=position, max_record_bytes=max_record_bytes)
    if args.spool:
        return SpoolDirSource(args.spool, follow=True, position=position, max_record_bytes=max_record_bytes)
    from agent.streams.synthetic import make_stream

    kwargs: dict[str, Any] = {}
    if position:
        kwargs["position"] = position
    return make_stream(args.stream or DEFAULT_STREAM, **kwargs)


def progress_line(agent, stats) -> str:
    """One status line: tasks/s, recent quality, failures, errors, memory size."""
    s = agent.summary()
    quality = s["recent_quality"]
    kind = s["quality_name"]
    q = "-" if quality is None else f"{quality:.3f}"
    return (f"{stats.tasks} tasks  {stats.tasks_per_s:.1f}/s  {kind} {q}  failures {s['failures']}  "
            f"errors {stats.errors}  memory {s['memory']}  pending {s['pending']}  updates {s['online_updates']}")


def _prober(agent, source, run_dir):
    """The periodic prober (``probes`` config) when enabled and a run directory is kept."""
    pc = agent.config.probes
    if not pc.enabled:
        return None
    if agent.run_log is None:
        log.warning("probes.enabled is set but there is no --run-dir to write probes to: no probes")
        return None
    from agent.probes import build_prober
    from agent.runlog import load_run

    seen, step = (), 0
    if agent.counters["tasks"]:  # a restart: continue the numbering and the families seen
        run = load_run(run_dir)
        seen, step = run.families, len(run.probes)
    return build_prober(pc, agent.run_log, source, run_dir, seen=seen, step=step)


def _probing(source, agent, prober):
    from agent.probes import ProbingSource

    prober.start(agent)
    return ProbingSource(source, agent, prober)


def run_daemon(args: argparse.Namespace, *, stderr: TextIO | None = None) -> int:
    """Run the agent until the source ends, ``--max-tasks``, or SIGTERM/SIGINT; returns 0."""
    import torch

    from agent import checkpoint as ckpt
    from agent.agent import Agent
    from agent.config import load, with_overrides
    from agent.streams import JsonlFileSource, JsonlSink

    stderr = stderr or sys.stderr
    config = load(args.config or default_config_path())
    if args.overrides:
        config = with_overrides(config, args.overrides)
    torch.set_num_threads(config.agent.threads)  # small models: one thread is fastest and leaves cores free

    agent = None
    if args.state_dir and ckpt.latest_good(args.state_dir) is not None:
        agent = Agent.load(args.state_dir)
        log.info("resumed from %s (%d tasks so far)", ckpt.latest_good(args.state_dir).path, agent.counters["tasks"])
    if agent is None:
        agent = Agent.from_config(config)
    stream = agent.stream_state
    if args.run_dir:
        from agent.runlog import RunLogWriter

        source_desc = {"input": args.input, "spool": args.spool, "stream": args.stream or (
            None if (args.input or args.spool) else DEFAULT_STREAM)}
        agent.run_log = RunLogWriter(args.run_dir, config=agent.config.to_dict(), stream=source_desc,
                                     seed=agent.config.agent.seed)
    max_bytes = agent.config.limits.max_record_bytes
    source = build_source(args, stream.get("source"), max_bytes)
    prober = _prober(agent, source, args.run_dir)
    if prober is not None:
        source = _probing(source, agent, prober)
    feedback = None
    if args.feedback:
        feedback = JsonlFileSource(args.feedback, follow=args.follow, position=stream.get("feedback"),
                                   max_record_bytes=max_bytes)
    if args.output:
        # With a state dir, ids already in the file after the checkpoint's offset (or anywhere,
        # before the first checkpoint) are not written again.
        offset = stream.get("sink_offset")
        if offset is None and args.state_dir:
            offset = 0
        sink = JsonlSink(args.output, resume_offset=offset)
    else:
        sink = JsonlSink(stream=sys.stdout)

    server = None
    addr = parse_addr(args.metrics_addr if args.metrics_addr is not None else agent.config.metrics.addr)
    if addr is not None:
        from prometheus_client import start_http_server

        server = start_http_server(addr[1], addr=addr[0], registry=agent.registry)
        log.info("metrics on http://%s:%d/metrics", *addr)

    stop = threading.Event()
    previous = {}

    def on_signal(signum, frame):
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)

    show = {"on": True, "off": False}.get(args.progress, None)
    if show is None:
        show = stderr.isatty()

    def on_progress(a, stats):
        stderr.write("\r\x1b[2K" + progress_line(a, stats))
        stderr.flush()

    try:
        stats = agent.run(source, sink, stop=stop, feedback_source=feedback, checkpoint_dir=args.state_dir,
                          max_tasks=args.max_tasks, on_progress=on_progress if show else None)
        if prober is not None:
            prober.final(agent)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        source.close()
        if feedback is not None:
            feedback.close()
        sink.close()
        if agent.run_log is not None:
            agent.run_log.close()
        if server is not None and isinstance(server, tuple):
            server[0].shutdown()
    if show:
        stderr.write("\n")
    log.info("%s: %d tasks, %d errors, %.1f tasks/s", stats.reason, stats.tasks, stats.errors, stats.tasks_per_s)
    return 0
