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
import importlib.metadata
import json
import logging
import os
import platform
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlet_dist
from mlet_dist.config import ConfigError, load_config
from mlet_dist.errors import MletError
from mlet_dist.serving.artifacts import optional_artifacts, predictor_choices
from mlet_dist.utils.files import check_output, is_no_space

# The commands' own modules are imported inside _dispatch, each where it is used: they pull in
# torch, TorchRec and pyarrow (several seconds), which `--help`, `--version` and a refused config
# must not wait for. Everything else is imported here.

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


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: ``mlet-dist: error: ...`` and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"mlet-dist: error: {message} (see `{self.prog} --help`)\n")


def _number(kind: type, minimum: float, strict: bool, what: str) -> Callable[[str], Any]:
    """An argparse ``type``: ``kind(text)`` that is above (``strict``) or at least ``minimum``."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (value > minimum if strict else value >= minimum):  # also refuses nan
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    return parse


positive_int = _number(int, 0, True, "a positive integer")
non_negative_int = _number(int, 0, False, "an integer >= 0")
positive_float = _number(float, 0.0, True, "a positive number")


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


def _parser() -> argparse.ArgumentParser:
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

    def add(name: str, help: str, config: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        # also after the command; SUPPRESS keeps a --debug given before it
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
        if config:
            sp.add_argument("--config", help="TOML config file (see configs/)")
        return sp

    g = add(
        "generate",
        "write synthetic data into data.dir: Criteo-format day files, or with a declared schema "
        "([[data.sparse]]) Parquet files part-NNNNN.parquet in its columns",
    )
    g.epilog = (
        "synthetic.days files of synthetic.rows_per_day rows, labelled by a hidden low-rank "
        "teacher, reproducible from synthetic.seed; train on them with data.source = 'synthetic' "
        "and the same config (`mlet-dist run` generates them itself when missing)"
    )
    t = add("train", "train a model; resumes the latest checkpoint of train.run_dir")
    t.epilog = (
        "during training: --train.metrics_every=N (TorchRec RecMetrics), --train.eval_every=N "
        "(validation), --train.tensorboard=true (scalars in RUN/tb/; view them with "
        "`tensorboard --logdir runs/`)"
    )
    t.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    t.add_argument(
        "--no-fallback",
        action="store_true",
        help="refuse to resume when the newest checkpoint is damaged (default: resume the newest "
        "intact one, with a warning)",
    )
    e = add("evaluate", "evaluate a run's latest checkpoint", config=False)
    e.add_argument(
        "--run", "--run-dir", dest="run", required=True, help="run directory of a training run"
    )
    e.add_argument("--split", default="eval", choices=["eval", "test", "train"])
    e.add_argument("--data", nargs="+", help="files (as data.source) to evaluate, not a split")
    c = add("collapse", "collapse a run's MLET tables into a plain d-dim model", config=False)
    # --run-dir: the same, for torchrun, which takes --run as an abbreviation of its --run-path
    c.add_argument(
        "--run", "--run-dir", dest="run", required=True, help="run directory of a training run"
    )
    c.add_argument("--out", required=True, help="output directory of the collapsed model")
    c.add_argument(
        "--chunk-rows",
        type=positive_int,
        help="rows per collapse matmul and reduction (default 16384)",
    )
    c.add_argument(
        "--quantize",
        default="fp32",
        choices=["fp32", "fp16", "int8"],
        help="serving table format of the predictors (int8: TorchRec's row-wise int8)",
    )
    c.add_argument(
        "--allow-plain",
        action="store_true",
        help="export a run without factorized tables (model.inner_dim = 0) as it is",
    )
    c.add_argument(
        "--no-predictor", action="store_true", help="write no predictor (no serving/predictor*)"
    )
    for artifact in optional_artifacts():  # --aoti, --torchscript (mlet_dist.serving.artifacts)
        c.add_argument(
            artifact.flag,
            action="append_const",
            const=artifact.kind,
            dest="artifacts",
            help=artifact.help,
        )
    pr = add("predict", "score raw rows with a serving directory", config=False)
    pr.add_argument("--serving", required=True, help="output directory of `mlet-dist collapse`")
    pr.add_argument("--data", required=True, nargs="+", help="files as the run's data.source")
    pr.add_argument("--out", required=True, help="probabilities: text (one per line) or .parquet")
    pr.add_argument("--batch-size", type=positive_int, default=4096, help="rows per predictor call")
    pr.add_argument(
        "--verify",
        default="all",
        choices=["all", "predictor"],
        help="files whose manifest checksums are checked first (default all)",
    )
    pr.add_argument(
        "--predictor",
        default="auto",
        choices=predictor_choices(),
        help="auto (default): the torch.export program serving/predictor.pt2, or TorchScript "
        "where that is all the directory has",
    )
    r = add("run", "end to end: generate (if needed), train, evaluate, collapse, check")
    r.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    pl = add("plan", "dry run: sharding plan and per-rank memory for a cluster (no allocation)")
    pl.add_argument(
        "--world-size", type=positive_int, required=True, help="ranks (GPUs) to plan for"
    )
    pl.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    pl.add_argument("--local-world-size", type=positive_int, help="ranks per node (8 on cuda)")
    pl.add_argument(
        "--batch-size", type=positive_int, help="batch per rank (data.batch_size/world)"
    )
    pl.add_argument("--hbm-gb", type=positive_float, help="GPU memory per rank (dist.hbm_cap_gb)")
    pl.add_argument("--ddr-gb", type=positive_float, help="host memory per rank (dist.ddr_cap_gb)")
    pl.add_argument("--out", help="JSON report (default <train.run_dir>/plan.json)")
    pp = add("preprocess", "raw Criteo TSV files -> Parquet shards (train/eval/test); resumable")
    pp.add_argument("--input", nargs="+", help="raw files (default: the config's data files)")
    pp.add_argument("--out", help="output directory (default data.parquet_dir)")
    pp.add_argument(
        "--workers", type=non_negative_int, default=0, help="processes (default: CPU count)"
    )
    pp.add_argument("--on-bad-row", choices=["error", "skip"], help="data.on_bad_row")
    pp.add_argument("--frequency-threshold", type=non_negative_int, help="data.frequency_threshold")
    pp.add_argument("--row-group-rows", type=positive_int, help="data.row_group_rows")
    from mlet_dist.sweep import add_arguments as add_sweep_arguments

    add_sweep_arguments(add("sweep", "MLET vs the tuned baseline over served d; resumable"))
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mlet-dist`` and ``python -m mlet_dist``; returns the exit code."""
    args, rest = _parser().parse_known_args(argv)
    _setup_logging(args.log_level)
    bad = [a for a in rest if not (a.startswith("--") and "." in a.split("=", 1)[0] and "=" in a)]
    if bad:
        print(
            f"mlet-dist: error: unrecognized arguments {bad}; overrides look like "
            f"--section.key=value",
            file=sys.stderr,
        )
        return 2
    try:
        return _dispatch(args, rest)
    except Exception as e:
        message = user_error(e)
        if message is None or args.debug:
            raise
        print(f"mlet-dist: error: {message}", file=sys.stderr)
        return 2


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


def _dispatch(args: argparse.Namespace, overrides: list[str]) -> int:
    if args.command == "generate":
        from mlet_dist.data.sources import generate_source_data

        cfg = load_config(args.config, overrides)
        files = generate_source_data(cfg.data, cfg.synthetic, progress=cfg.train.progress)
        logger.info("wrote %d files to %s", len(files), cfg.data.dir)
        return 0
    if args.command == "train":
        from mlet_dist.train import train

        cfg = load_config(args.config, overrides)
        train(cfg, resume=not args.no_resume, fallback=not args.no_fallback)
        return 0
    if args.command == "evaluate":
        from mlet_dist.workflow import evaluate_run

        metrics = evaluate_run(args.run, split=args.split, files=args.data, overrides=overrides)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(metrics, indent=1))
        return 0
    if args.command == "collapse":
        from mlet_dist.export import CollapseOptions, collapse_run

        if overrides:
            raise ConfigError(f"collapse takes no config overrides (got {overrides})")
        options = CollapseOptions(
            **({"chunk_rows": args.chunk_rows} if args.chunk_rows else {}),
            quantize=args.quantize,
            allow_plain=args.allow_plain,
            predictor=not args.no_predictor,
            artifacts=args.artifacts or (),
        )
        collapse_run(args.run, args.out, options)
        return 0
    if args.command == "predict":
        from mlet_dist.predict_job import predict_file

        if overrides:
            raise ConfigError(f"predict takes no config overrides (got {overrides})")
        result = predict_file(
            args.serving,
            args.data,
            args.out,
            batch_size=args.batch_size,
            verify=args.verify,
            kind=args.predictor,
        )
        print(json.dumps(result))
        return 0
    if args.command == "run":
        from mlet_dist.workflow import run_end_to_end

        summary = run_end_to_end(load_config(args.config, overrides), resume=not args.no_resume)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(summary, indent=1))
        checks = (summary["collapse_check"], summary.get("serving_check", {"passed": True}))
        return 0 if all(c["passed"] for c in checks) else 1
    if args.command == "plan":
        from mlet_dist.distributed import planning

        cfg = load_config(args.config, overrides)
        cfg.dist.hbm_cap_gb = args.hbm_gb if args.hbm_gb is not None else cfg.dist.hbm_cap_gb
        cfg.dist.ddr_cap_gb = args.ddr_gb if args.ddr_gb is not None else cfg.dist.ddr_cap_gb
        default_out = os.path.join(cfg.train.run_dir, "plan.json")
        out = args.out or default_out
        check_output(
            out,
            what="the plan report",
            previous=_previous_plan,
            allowed=[default_out],  # its slot in the run directory
            hint="choose another --out file",
        )
        try:
            report = planning.dry_run(
                cfg,
                args.world_size,
                args.device,
                local_world_size=args.local_world_size,
                batch_size_per_rank=args.batch_size,
            )
        except planning.PlanningError as e:
            print(f"mlet-dist plan: {e}", file=sys.stderr)
            return 1
        out = planning.write_report(report, out)
        print(planning.format_report(report) + f"\nwrote {out}")
        return 0 if report["totals"]["fits"] else 1
    if args.command == "preprocess":
        from mlet_dist.data.preprocess import preprocess_from_config

        flags = {
            "on_bad_row": args.on_bad_row,
            "frequency_threshold": args.frequency_threshold,
            "row_group_rows": args.row_group_rows,
        }
        overrides = [*overrides, *(f"--data.{k}={v}" for k, v in flags.items() if v is not None)]
        cfg = load_config(args.config, overrides)
        summary = preprocess_from_config(
            cfg.data,
            inputs=args.input,
            out_dir=args.out,
            workers=args.workers,
            progress=cfg.train.progress,
        )
        print(
            json.dumps(
                {k: summary[k] for k in ("rows", "positives", "bad_rows", "splits")}, indent=1
            )
        )
        return 0
    if args.command == "sweep":
        from mlet_dist.sweep import main_from_args

        return main_from_args(args, overrides)
    raise AssertionError(args.command)  # argparse restricts the choices


def _previous_plan(path: Path) -> str | None:
    """None when ``path`` is a previous plan report (JSON with "totals"), else why not."""
    try:
        previous = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        previous = None
    if isinstance(previous, dict) and "totals" in previous:
        return None
    return f"{path} exists and is not a plan report of `mlet-dist plan`"


if __name__ == "__main__":
    sys.exit(main())
