"""The commands of ``mlet-dist``: one :class:`Command` each (its options and its run), in
:data:`COMMANDS`. :mod:`mlet_dist.cli` builds the parser from them and dispatches to ``run``.

A new command is one ``Command`` entry here. Each command's own module (the trainer, the
collapse, the planner, ...) is imported inside its ``run``: they pull in torch, TorchRec and
pyarrow (several seconds), which ``--help``, ``--version`` and a refused config must not wait for.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlet_dist.config import ConfigError, load_config
from mlet_dist.serving.artifacts import optional_artifacts, predictor_choices
from mlet_dist.utils.files import check_output, finite_json

logger = logging.getLogger(__name__)

__all__ = ["COMMANDS", "Command", "non_negative_int", "positive_float", "positive_int"]


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


positive_int = _number(int, 0, True, "a positive integer")
non_negative_int = _number(int, 0, False, "an integer >= 0")
positive_float = _number(float, 0.0, True, "a positive number")


@dataclass(frozen=True)
class Command:
    """One ``mlet-dist`` command.

    Attributes:
        name: the command word.
        help: one line for ``mlet-dist --help`` and the command's own description.
        add_arguments: adds the command's options to its sub-parser.
        run: runs it with the parsed options and the ``--section.key=value`` overrides; returns
            the exit code.
        config: whether the command takes ``--config FILE``.
        epilog: more text for ``mlet-dist <command> --help``.
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, list[str]], int]
    config: bool = True
    epilog: str = ""


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _no_overrides(command: str, overrides: list[str]) -> None:
    if overrides:
        raise ConfigError(f"{command} takes no config overrides (got {overrides})")


def _run_arg(p: argparse.ArgumentParser) -> None:
    # --run-dir: the same, for torchrun, which takes --run as an abbreviation of its --run-path
    p.add_argument(
        "--run", "--run-dir", dest="run", required=True, help="run directory of a training run"
    )


def _no_resume_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")


# -- generate ------------------------------------------------------------------------------------
def _generate(args: argparse.Namespace, overrides: list[str]) -> int:
    from mlet_dist.data.sources import generate_source_data

    cfg = load_config(args.config, overrides)
    files = generate_source_data(cfg.data, cfg.synthetic, progress=cfg.train.progress)
    logger.info("wrote %d files to %s", len(files), cfg.data.dir)
    return 0


# -- train ---------------------------------------------------------------------------------------
def _train_args(p: argparse.ArgumentParser) -> None:
    _no_resume_arg(p)
    p.add_argument(
        "--no-fallback",
        action="store_true",
        help="refuse to resume when the newest checkpoint is damaged (default: resume the newest "
        "intact one, with a warning)",
    )


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    from mlet_dist.train import train

    cfg = load_config(args.config, overrides)
    train(cfg, resume=not args.no_resume, fallback=not args.no_fallback)
    return 0


# -- evaluate ------------------------------------------------------------------------------------
def _evaluate_args(p: argparse.ArgumentParser) -> None:
    _run_arg(p)
    p.add_argument("--split", default="eval", choices=["eval", "test", "train"])
    p.add_argument("--data", nargs="+", help="files (as data.source) to evaluate, not a split")


def _evaluate(args: argparse.Namespace, overrides: list[str]) -> int:
    from mlet_dist.workflow import evaluate_run

    metrics = evaluate_run(args.run, split=args.split, files=args.data, overrides=overrides)
    if _is_rank0():
        print(json.dumps(finite_json(metrics), indent=1, allow_nan=False))
    return 0


# -- collapse ------------------------------------------------------------------------------------
def _collapse_args(p: argparse.ArgumentParser) -> None:
    _run_arg(p)
    p.add_argument("--out", required=True, help="output directory of the collapsed model")
    p.add_argument(
        "--chunk-rows",
        type=positive_int,
        help="rows per collapse matmul and reduction (default 16384)",
    )
    p.add_argument(
        "--quantize",
        default="fp32",
        choices=["fp32", "fp16", "int8"],
        help="serving table format of the predictors (int8: TorchRec's row-wise int8)",
    )
    p.add_argument(
        "--allow-plain",
        action="store_true",
        help="export a run without factorized tables (model.inner_dim = 0) as it is",
    )
    p.add_argument(
        "--no-predictor", action="store_true", help="write no predictor (no serving/predictor*)"
    )
    for artifact in optional_artifacts():  # --aoti, --torchscript (mlet_dist.serving.artifacts)
        p.add_argument(
            artifact.flag,
            action="append_const",
            const=artifact.kind,
            dest="artifacts",
            help=artifact.help,
        )
        if artifact.skip_flag:  # --no-aoti
            p.add_argument(
                artifact.skip_flag,
                action="append_const",
                const=artifact.kind,
                dest="skip",
                help=f"do not write {artifact.path} (written by default where it can be built)",
            )


def _collapse(args: argparse.Namespace, overrides: list[str]) -> int:
    from mlet_dist.export import CollapseOptions, collapse_run

    _no_overrides("collapse", overrides)
    options = CollapseOptions(
        **({"chunk_rows": args.chunk_rows} if args.chunk_rows else {}),
        quantize=args.quantize,
        allow_plain=args.allow_plain,
        predictor=not args.no_predictor,
        artifacts=args.artifacts or (),
        **({"skip": args.skip} if args.skip else {}),
    )
    collapse_run(args.run, args.out, options)
    return 0


# -- predict -------------------------------------------------------------------------------------
def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--serving", required=True, help="output directory of `mlet-dist collapse`")
    p.add_argument("--data", required=True, nargs="+", help="files as the run's data.source")
    p.add_argument("--out", required=True, help="probabilities: text (one per line) or .parquet")
    p.add_argument("--batch-size", type=positive_int, default=4096, help="rows per predictor call")
    p.add_argument(
        "--verify",
        default="all",
        choices=["all", "predictor"],
        help="files whose manifest checksums are checked first (default all)",
    )
    p.add_argument(
        "--predictor",
        default="auto",
        choices=predictor_choices(),
        help="auto (default): the AOTInductor package where the directory has one (and it "
        "loads), else the torch.export program serving/predictor.pt2, else TorchScript",
    )


def _predict(args: argparse.Namespace, overrides: list[str]) -> int:
    from mlet_dist.predict_job import predict_file

    _no_overrides("predict", overrides)
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


# -- serve ---------------------------------------------------------------------------------------
def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--serving", required=True, help="output directory of `mlet-dist collapse`")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=non_negative_int, default=8080, help="0: any free port")
    p.add_argument(
        "--max-batch", type=positive_int, default=4096, help="rows per predictor call at most"
    )
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=2.0,
        help="how long a batch waits for more requests after its first (default 2 ms)",
    )
    p.add_argument(
        "--predictor",
        default="auto",
        choices=predictor_choices(),
        help="auto (default): the AOTInductor package where the directory has one, else the "
        "torch.export program",
    )
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0: all)")


def _serve(args: argparse.Namespace, overrides: list[str]) -> int:
    from mlet_dist.predict_job import request_decoder
    from mlet_dist.serving.server import ServeOptions, serve

    _no_overrides("serve", overrides)
    if not args.max_wait_ms >= 0:
        raise ConfigError(f"--max-wait-ms must be >= 0, got {args.max_wait_ms}")
    options = ServeOptions(
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        predictor=args.predictor,
        threads=args.threads,
    )
    serve(args.serving, request_decoder, options)
    return 0


# -- run -----------------------------------------------------------------------------------------
def _run(args: argparse.Namespace, overrides: list[str]) -> int:
    from mlet_dist.workflow import run_end_to_end

    summary = run_end_to_end(load_config(args.config, overrides), resume=not args.no_resume)
    if _is_rank0():
        print(json.dumps(summary, indent=1))
    checks = (summary["collapse_check"], summary.get("serving_check", {"passed": True}))
    return 0 if all(c["passed"] for c in checks) else 1


# -- plan ----------------------------------------------------------------------------------------
def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--world-size", type=positive_int, required=True, help="ranks (GPUs) to plan for"
    )
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--local-world-size", type=positive_int, help="ranks per node (8 on cuda)")
    p.add_argument("--batch-size", type=positive_int, help="batch per rank (data.batch_size/world)")
    p.add_argument("--hbm-gb", type=positive_float, help="GPU memory per rank (dist.hbm_cap_gb)")
    p.add_argument("--ddr-gb", type=positive_float, help="host memory per rank (dist.ddr_cap_gb)")
    p.add_argument("--out", help="JSON report (default <train.run_dir>/plan.json)")


def _plan(args: argparse.Namespace, overrides: list[str]) -> int:
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


def _previous_plan(path: Path) -> str | None:
    """None when ``path`` is a previous plan report (JSON with "totals"), else why not."""
    try:
        previous = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        previous = None
    if isinstance(previous, dict) and "totals" in previous:
        return None
    return f"{path} exists and is not a plan report of `mlet-dist plan`"


# -- preprocess ----------------------------------------------------------------------------------
def _preprocess_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", help="raw files (default: the config's data files)")
    p.add_argument("--out", help="output directory (default data.parquet_dir)")
    p.add_argument(
        "--workers", type=non_negative_int, default=0, help="processes (default: CPU count)"
    )
    p.add_argument("--on-bad-row", choices=["error", "skip"], help="data.on_bad_row")
    p.add_argument("--frequency-threshold", type=non_negative_int, help="data.frequency_threshold")
    p.add_argument("--row-group-rows", type=positive_int, help="data.row_group_rows")


def _preprocess(args: argparse.Namespace, overrides: list[str]) -> int:
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
        json.dumps({k: summary[k] for k in ("rows", "positives", "bad_rows", "splits")}, indent=1)
    )
    return 0


# -- sweep ---------------------------------------------------------------------------------------
def _sweep_args(p: argparse.ArgumentParser) -> None:
    from mlet_dist.sweep import add_arguments

    add_arguments(p)


def _sweep(args: argparse.Namespace, overrides: list[str]) -> int:
    from mlet_dist.sweep import main_from_args

    return main_from_args(args, overrides)


COMMANDS: tuple[Command, ...] = (
    Command(
        "generate",
        "write synthetic data into data.dir: Criteo-format day files, or with a declared schema "
        "([[data.sparse]]) Parquet files part-NNNNN.parquet in its columns",
        lambda p: None,
        _generate,
        epilog="synthetic.days files of synthetic.rows_per_day rows, labelled by a hidden "
        "low-rank teacher, reproducible from synthetic.seed; train on them with data.source = "
        "'synthetic' and the same config (`mlet-dist run` generates them itself when missing)",
    ),
    Command(
        "train",
        "train a model; resumes the latest checkpoint of train.run_dir",
        _train_args,
        _train,
        epilog="during training: --train.tensorboard=true (scalars in RUN/tb/, with the "
        "RecMetrics training AUC every 500 steps and the final eval AUC; view them with "
        "`tensorboard --logdir runs/`), --train.metrics_every=N (TorchRec RecMetrics every N "
        "steps), --train.eval_every=N (validation every N steps)",
    ),
    Command(
        "evaluate", "evaluate a run's latest checkpoint", _evaluate_args, _evaluate, config=False
    ),
    Command(
        "collapse",
        "collapse a run's MLET tables into a plain d-dim model",
        _collapse_args,
        _collapse,
        config=False,
    ),
    Command(
        "predict",
        "score raw rows with a serving directory",
        _predict_args,
        _predict,
        config=False,
    ),
    Command(
        "serve",
        "serve a serving directory over HTTP (POST /predict, /healthz, /metadata)",
        _serve_args,
        _serve,
        config=False,
        epilog="JSON or Parquet rows in the manifest's feature schema; dynamic batching; "
        "checksums verified at start; SIGTERM answers the requests in flight, then exits",
    ),
    Command(
        "run",
        "end to end: generate (if needed), train, evaluate, collapse, check",
        _no_resume_arg,
        _run,
    ),
    Command(
        "plan",
        "dry run: sharding plan and per-rank memory for a cluster (no allocation)",
        _plan_args,
        _plan,
    ),
    Command(
        "preprocess",
        "raw Criteo TSV files -> Parquet shards (train/eval/test); resumable",
        _preprocess_args,
        _preprocess,
    ),
    Command("sweep", "MLET vs the tuned baseline over served d; resumable", _sweep_args, _sweep),
)
