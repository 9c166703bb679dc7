"""The ``meta-agent`` command (also ``python -m agent``).

Subcommands register themselves with :func:`command`: a function that adds its arguments to an
``argparse`` parser, and a function that runs it and returns the exit status. Expected failures
(bad config, missing checkpoint, ...) print one line, ``meta-agent: error: ...``, to stderr and
return a non-zero status; no traceback.

Exit statuses: 0 success, 1 runtime failure, 2 usage or configuration error, 130 interrupted.

Examples
--------
>>> main(["version"])  # doctest: +ELLIPSIS
meta-agent ...
0
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["main", "command", "build_parser"]

PROG = "meta-agent"
EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# name -> (help, add_arguments, run)
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None):
    """Register ``run(args) -> int`` as subcommand ``name`` (decorator)."""

    def register(run: Callable[[argparse.Namespace], int]):
        _COMMANDS[name] = (help, add_arguments or (lambda p: None), run)
        return run

    return register


class _Failure(Exception):
    """An expected error: reported as one line, with an exit status."""

    def __init__(self, message: str, status: int = EXIT_FAIL):
        super().__init__(message)
        self.status = status


# -- shared helpers ---------------------------------------------------------------------------
def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", "-c", required=required, metavar="PATH", help="YAML configuration")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.meta_batch=8 (repeatable)")


def _load_config(path: str | None, overrides: Sequence[str], fallback: dict | None = None):
    from agent.config import Config, load, with_overrides

    if path is not None:
        cfg = load(path)
    elif fallback is not None:
        cfg = Config.from_dict(fallback)
    else:
        raise _Failure("--config is required", EXIT_USAGE)
    return with_overrides(cfg, overrides) if overrides else cfg


class _Logging:
    """Log ``agent.*`` records to stderr for the duration of one command (then put things back)."""

    def __init__(self, verbose: int):
        self.verbose = verbose

    def __enter__(self):
        self.logger = logging.getLogger("agent")
        self.level = self.logger.level
        self.handler = logging.StreamHandler(sys.stderr)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        self.logger.addHandler(self.handler)
        self.logger.setLevel(logging.DEBUG if self.verbose else logging.INFO)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.level)
        return False


def _progress_flag(args) -> bool | None:
    return {"auto": None, "on": True, "off": False}[args.progress]


# -- train ------------------------------------------------------------------------------------
def _train_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--out", "-o", metavar="DIR", help="run directory (default: runs/<config name>)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from the run directory's last good checkpoint (default: yes)")
    p.add_argument("--steps", type=int, metavar="N", help="total outer steps (overrides train.steps)")
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto", help="progress bar (default: on a TTY)")
    p.add_argument("--log-every", type=int, metavar="N", help="plain log lines every N steps (overrides train.log_every)")


@command("train", "meta-train from a config; resumable", _train_args)
def cmd_train(args: argparse.Namespace) -> int:
    from agent.training import meta_train

    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    cfg = _load_config(args.config, overrides)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    result = meta_train(cfg, out, resume=args.resume, progress=_progress_flag(args), log_every=args.log_every)
    final = result.final
    val = f"val_loss {final['val_loss']:.4f}" if "val_loss" in final else ""
    if "val_accuracy" in final:
        val += f" val_accuracy {final['val_accuracy']:.4f}"
    print(f"{result.reason}: step {result.step}/{cfg.train.steps} {val} ({result.steps_per_s:.1f} steps/s, "
          f"{result.skipped} skipped) checkpoint {result.checkpoint}")
    return EXIT_INTERRUPTED if result.reason == "signal" else EXIT_OK


# -- eval -------------------------------------------------------------------------------------
def _eval_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p, required=False)
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a checkpoint, a checkpoints directory or a run directory (its newest good checkpoint)")
    p.add_argument("--episodes", type=int, metavar="N", help="episodes (overrides eval.episodes)")
    p.add_argument("--steps", type=int, nargs="+", metavar="S", help="inner steps to score after (overrides eval.steps)")
    p.add_argument("--seed", type=int, help="episode seed (overrides eval.seed)")
    p.add_argument("--split", choices=("train", "val", "test"), help="family split (overrides eval.split)")
    p.add_argument("--out", "-o", metavar="DIR", help="where to write results (default: <run>/eval-<split>-<step>)")
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto")


@command("eval", "evaluate a checkpoint on few-shot episodes", _eval_args)
def cmd_eval(args: argparse.Namespace) -> int:
    from agent import checkpoint as ckpt
    from agent.evaluation import evaluate_checkpoint

    found = ckpt.resolve(args.checkpoint)
    stored = found.load("state.json").get("config") if "state.json" in found else None
    overrides = list(args.overrides)
    for flag, key in (("episodes", "eval.episodes"), ("seed", "eval.seed"), ("split", "eval.split")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    if args.steps is not None:
        overrides.append(f"eval.steps={list(args.steps)}")
    cfg = _load_config(args.config, overrides, fallback=stored)
    result, paths = evaluate_checkpoint(found, cfg, out_dir=args.out, progress=_progress_flag(args))
    print(f"{cfg.algorithm.name} on {cfg.data.family}/{cfg.eval.split}, {len(result.rows)} episodes, "
          f"checkpoint step {found.step}:")
    print(result.headline())
    print(f"results: {paths['jsonl']} {paths['csv']} {paths['summary']}")
    return EXIT_OK


# -- run --------------------------------------------------------------------------------------
def _run_args(p: argparse.ArgumentParser) -> None:
    from agent.daemon import add_arguments

    add_arguments(p)


@command("run", "run the agent on a task stream (default: the built-in demo stream, metrics on 127.0.0.1:9108)",
         _run_args)
def cmd_run(args: argparse.Namespace) -> int:
    from agent.daemon import run_daemon

    return run_daemon(args)


# -- report / compare ---------------------------------------------------------------------------
# The bodies live in agent.report, imported only when one of these runs: its statistics pull
# in scipy, which building the parser for every other command would otherwise pay for.
def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory (or offline evaluation directory)")
    p.add_argument("--out", "-o", metavar="FILE.html", help="HTML file (default: RUN_DIR/report.html)")
    p.add_argument("--tolerance", type=float, default=10.0, metavar="TASKS",
                   help="largest delay for a detected boundary to count (default: 10 tasks)")
    p.add_argument("--window", type=int, metavar="TASKS", help="rolling-mean window of the quality plot")


@command("report", "write an HTML report (plots and tables with intervals) of a run directory", _report_args)
def cmd_report(args: argparse.Namespace) -> int:
    from agent.report import cmd_report as run

    return run(args)


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_a", metavar="RUN_A", help="baseline run directory (or evaluation directory)")
    p.add_argument("run_b", metavar="RUN_B", help="run compared with A")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of the verdict (default 0.05)")


@command("compare", "paired comparison of two runs on their shared tasks, with a plain-language verdict",
         _compare_args)
def cmd_compare(args: argparse.Namespace) -> int:
    from agent.report import cmd_compare as run

    return run(args)


# -- version ----------------------------------------------------------------------------------
@command("version", "print the version")
def cmd_version(args: argparse.Namespace) -> int:
    from agent import __version__

    print(f"{PROG} {__version__}")
    return EXIT_OK


# -- entry point ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Streaming online meta-learning agent.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (help_text, add_arguments, run) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``) and return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed usage and the error
        return int(e.code or 0)
    try:
        with _Logging(args.verbose):
            return args._run(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - classify below, re-raise the unexpected
        status = _expected_status(e)
        if status is None:
            raise
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return status


def _expected_status(e: Exception) -> int | None:
    from agent.checkpoint import CheckpointError
    from agent.config import ConfigError

    if isinstance(e, _Failure):
        return e.status
    if isinstance(e, ConfigError):
        return EXIT_USAGE
    if isinstance(e, (CheckpointError, FileNotFoundError, PermissionError)):
        return EXIT_FAIL
    try:
        from agent.training import TrainingError
    except ImportError:
        return None
    return EXIT_FAIL if isinstance(e, TrainingError) else None
