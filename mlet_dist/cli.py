"""Command line: ``mlet-dist <command> [--config FILE] [--section.key=value ...]``.

Commands:
    generate   write synthetic data: Criteo-format day files (the built-in default data), or
               Parquet files in a declared schema's columns
    train      train a model (one process, or every rank under torchrun / torchx)
    evaluate   AUC / log loss / NE of a run's latest checkpoint on a split or files
    collapse   collapse a run's MLET tables into a plain d-dim model and its serving artifacts
    predict    score Criteo TSV rows with a serving directory's predictor (torch.export program)
    run        the whole job end to end: generate (if needed), train, evaluate, collapse, check
    plan       dry run of the sharding plan and per-rank memory for a cluster (nothing allocated)
    preprocess raw Criteo TSV files -> Parquet shards (train/eval/test) for streaming
    sweep      MLET vs the tuned single-layer baseline over d: which served d to pick
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import mlet_dist
from mlet_dist.commands import COMMANDS
from mlet_dist.errors import MletError
from mlet_dist.utils.files import is_no_space

# The commands' own modules are imported inside each command's run (mlet_dist.commands): they
# pull in torch, TorchRec and pyarrow (several seconds), which `--help`, `--version` and a refused
# config must not wait for. Everything else is imported here.

logger = logging.getLogger("mlet_dist")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _setup_logging(level: str) -> None:
    """Logs of mlet_dist at ``level`` on rank 0 and WARNING elsewhere; libraries at WARNING.

    TorchRec's planner and fbgemm log many INFO lines (partly through the root logger), so the
    root logger stays at WARNING. Set MLET_LOG_ALL_RANKS=1 to see every rank's logs.
    """
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0 and os.environ.get("MLET_LOG_ALL_RANKS") != "1":
        level = "WARNING"
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("mlet_dist").setLevel(getattr(logging, level.upper()))
    if level.upper() != "DEBUG":
        # Known, harmless library noise on every run (planner topology/dry-run notes, deprecations).
        logging.getLogger("torchrec").setLevel(logging.ERROR)
        logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)


def _intra_op_threads() -> None:
    """One intra-op thread per process unless ``OMP_NUM_THREADS`` says otherwise.

    torchrun sets ``OMP_NUM_THREADS=1`` for its workers; a plain process got torch's default
    (a thread per core), which made small-batch training 8-16x slower on a busy 2-core machine
    (OpenMP threads spinning against each other and other processes). The variable is set before
    torch is imported (the commands import it), so OpenMP and torch start with it.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:  # already imported (main() called from Python)
        sys.modules["torch"].set_num_threads(1)
    logger.info(
        "1 intra-op thread per process (as torchrun sets it); set OMP_NUM_THREADS=N to use N"
    )


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: ``mlet-dist: error: ...`` and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"mlet-dist: error: {message} (see `{self.prog} --help`)\n")


def version_text() -> str:
    """``mlet-dist --version``: this package and the libraries it runs on (no heavy imports)."""
    parts = [f"python {platform.python_version()}"]
    for dist in ("torch", "torchrec", "fbgemm-gpu-cpu", "fbgemm-gpu", "pyarrow", "numpy"):
        try:
            parts.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return f"mlet-dist {mlet_dist.__version__} ({', '.join(parts)})"


class _Version(argparse.Action):
    """``--version``: prints :func:`version_text` and exits (computed only when asked)."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        print(version_text())
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    """The whole ``mlet-dist`` parser: global options, then one sub-parser per command."""
    p = _Parser(
        prog="mlet-dist",
        description="Distributed multi-layer embedding training (MLET) with TorchRec.",
        epilog="Any --section.key=value after the options overrides the config file "
        "(e.g. --model.inner_dim=128 --train.max_steps=100).",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=LOG_LEVELS,
        help="logging level on rank 0 (default INFO)",
    )
    debug_help = "show the traceback of an error (default: one line)"
    p.add_argument("--debug", action="store_true", help=debug_help)
    p.add_argument("--version", action=_Version, help="print the versions and exit")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        sp = sub.add_parser(command.name, help=command.help, description=command.help)
        sp.epilog = command.epilog or None
        # also after the command; SUPPRESS keeps a --debug given before it
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
        if command.config:
            sp.add_argument("--config", help="TOML config file (see configs/)")
        command.add_arguments(sp)
        sp.set_defaults(command_run=command.run)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mlet-dist`` and ``python -m mlet_dist``; returns the exit code."""
    args, rest = build_parser().parse_known_args(argv)
    _setup_logging(args.log_level)
    _intra_op_threads()
    bad = [a for a in rest if not (a.startswith("--") and "." in a.split("=", 1)[0] and "=" in a)]
    if bad:
        print(
            f"mlet-dist: error: unrecognized arguments {bad}; overrides look like "
            f"--section.key=value",
            file=sys.stderr,
        )
        return 2
    try:
        return args.command_run(args, rest)
    except Exception as e:
        message = user_error(e)
        if message is None or args.debug:
            raise
        return _report_user_error(f"mlet-dist: error: {message}")


# How long a rank other than 0 waits, after a user error, for the launcher to stop it (rank 0
# failed too and said why) before it reports the error itself (the error was its own).
PEER_GRACE_S = 3.0


def _report_user_error(line: str, code: int = 2) -> int:
    """Reports a user error once per job; returns the exit code (non-zero on every rank).

    In one process: prints ``line``. Under torchrun/TorchX every rank usually meets the same error
    (a bad config, a refused run directory): rank 0 prints it; the other ranks stay quiet and
    wait up to :data:`PEER_GRACE_S` for the launcher, which stops them once rank 0 exited; only a
    rank that is still running then (its error was its own) prints it, naming its rank. Every
    rank that fails writes ``line`` to torchrun's error file (``TORCHELASTIC_ERROR_FILE``), so that
    torchrun's failure report (ChildFailedError) shows it instead of a link to its docs.
    """
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        print(line, file=sys.stderr)
        _error_file(line)
        return code

    def stopped(signum: int, frame: Any) -> None:  # rank 0 failed: exit quietly, same code
        _error_file(line)
        sys.stderr.flush()
        os._exit(code)

    previous = signal.signal(signal.SIGTERM, stopped)
    try:
        time.sleep(PEER_GRACE_S)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"{line} (rank {rank})", file=sys.stderr)
    _error_file(f"{line} (rank {rank})")
    return code


def _error_file(line: str) -> None:
    """``line`` as the message of torchrun's error file of this worker, when it has one."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with contextlib.suppress(OSError):
            # the format torchrun's own @record writes (its report shows "py_callstack")
            info = {"py_callstack": line, "timestamp": str(int(time.time()))}
            Path(path).write_text(json.dumps({"message": {"message": line, "extraInfo": info}}))


# OSErrors about a path the user gave (they name it); any other exception is a bug: traceback.
_PATH_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


def user_error(e: BaseException) -> str | None:
    """The one-line message of a user error (:class:`MletError`, a full disk, a path that cannot
    be read or written), or None for anything else (a bug: shown with its traceback)."""
    if isinstance(e, MletError):
        message = str(e)
    elif is_no_space(e):
        where = getattr(e, "filename", None)
        message = f"no space left on device{f' writing {where}' if where else ''} ({e})"
    elif isinstance(e, _PATH_ERRORS) and e.filename is not None:
        message = f"{e.strerror}: {e.filename}"
    else:
        return None
    return re.sub(r"\s*\n\s*", " ", message).strip()  # one line


if __name__ == "__main__":
    sys.exit(main())
