"""Running the sweep: one process per training run (``python -m mlet_dist.sweep RUN/sweep_run.json``),
``--jobs`` at a time, resumable from each run's ``result.json``; the ``mlet-dist sweep`` entry point."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mlet_dist.config import Config, ConfigError, DataConfig, config_from_dict, load_config
from mlet_dist.errors import MletError
from mlet_dist.schema import schema_of
from mlet_dist.sweep.report import markdown, plot, summarize
from mlet_dist.sweep.spec import (
    RESULT_FILE,
    RUN_SPEC_FILE,
    STAGES,
    RunSpec,
    SweepSpec,
    _point_name,
    best_recipes,
    check_variants,
    config_key,
    frontier_count,
    frontier_runs,
    load_sweep,
    more_seeds,
    tune_runs,
)
from mlet_dist.utils.files import atomic_write_json, finite_json
from mlet_dist.utils.locks import OutputLock

logger = logging.getLogger("mlet_dist.sweep")


class SweepRunError(MletError, RuntimeError):
    """One run of the sweep failed; the message names it, its last error line and its log."""


def read_result(run: RunSpec) -> dict[str, Any] | None:
    """The run's result when it exists and was computed for the same config and epochs."""
    path = run.run_dir / RESULT_FILE
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    try:  # the config it was computed for, read as this version of the code reads it
        spec = json.loads((run.run_dir / RUN_SPEC_FILE).read_text())
        same = config_key(spec["config"], spec["epochs"]) == run.key
    except (OSError, json.JSONDecodeError, KeyError, ConfigError):
        return None
    return result if same else None


def execute(run: RunSpec, keep: bool = False) -> dict[str, Any]:
    """Trains one run in this process: epoch by epoch, evaluating eval and test after each.

    Returns (and writes ``result.json``) the per-epoch metrics and the epoch chosen by eval AUC.
    """
    from mlet_dist.train import train  # lazy: the orchestrating process never trains (torch, 4 s)

    run_dir = run.run_dir
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a stale or partial run of this sweep (never user data: see main)
    run_dir.mkdir(parents=True)
    (run_dir / RUN_SPEC_FILE).write_text(json.dumps(asdict(run), indent=1))
    cfg = config_from_dict(run.config, origin=str(run_dir / RUN_SPEC_FILE))
    t0 = time.perf_counter()
    epochs: list[dict[str, Any]] = []
    best = -math.inf
    for e in range(1, run.epochs + 1):
        cfg.train.epochs = e
        metrics = train(cfg, resume=True)
        missing = [s for s in ("eval", "test") if s not in metrics]
        if missing:
            raise ConfigError(
                f"the sweep needs eval and test splits (it tunes on eval, reports test), this "
                f"run has no {missing[0]} split: set data.eval_fraction > 0 (or data.eval_files) "
                f"and data.test_fraction > 0, or preprocess them"
            )
        epochs.append({"epoch": e, **{s: metrics[s] for s in ("eval", "test") if s in metrics}})
        auc = metrics["eval"]["auc"]
        if auc < best:
            break  # eval AUC fell: later epochs overfit further
        best = max(best, auc)
    chosen = max(epochs, key=lambda m: m["eval"]["auc"])
    if not keep:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    result = {
        "key": run.key,
        "stage": run.stage,
        "side": run.side,
        "variant": run.variant,
        "k": run.k,
        "d": run.d,
        "recipe": run.recipe,
        "point": run.point,
        "seed": run.seed,
        "epochs": epochs,
        "chosen": chosen,
        "seconds": time.perf_counter() - t0,
        "optim": run.config["optim"],
    }
    tmp = run_dir / (RESULT_FILE + ".tmp")
    tmp.write_text(json.dumps(finite_json(result), indent=1, allow_nan=False))
    os.replace(tmp, run_dir / RESULT_FILE)
    return result


def shard_runs(runs: list[RunSpec], shard: tuple[int, int]) -> list[RunSpec]:
    """The runs of shard ``(i, n)``: every n-th run from the i-th (the shards partition ``runs``)."""
    index, count = shard
    return [r for i, r in enumerate(runs) if i % count == index]


def run_all(
    runs: list[RunSpec], jobs: int, threads: int, keep: bool, shard: tuple[int, int] = (0, 1)
) -> list[dict[str, Any]]:
    """Runs (or reuses) this shard's runs, ``jobs`` processes at a time; returns every finished
    result of ``runs`` (all shards') that exists when done."""
    mine = shard_runs(runs, shard)
    todo = [r for r in mine if read_result(r) is None]
    logger.info(
        "%d runs (%d in this shard, %d already done); %d at a time",
        len(runs), len(mine), len(mine) - len(todo), jobs,
    )  # fmt: skip
    done = [0]
    t0 = time.perf_counter()

    def one(run: RunSpec) -> None:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / RESULT_FILE).unlink(missing_ok=True)  # stale: never paired with this spec
        spec_path = run.run_dir / RUN_SPEC_FILE
        spec_path.write_text(json.dumps(asdict(run), indent=1))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(var, None)  # each run is its own one-process job
        cmd = [sys.executable, "-m", "mlet_dist.sweep", str(spec_path)]
        if keep:
            cmd.append("--keep-runs")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        log = run.run_dir.parent / f"{run.run_dir.name}.log"
        log.write_text(proc.stdout + proc.stderr)
        done[0] += 1
        if proc.returncode != 0 or read_result(run) is None:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [
                f"exit code {proc.returncode}, no {RESULT_FILE}"
            ]
            raise SweepRunError(
                f"sweep run {run.run_dir} failed: {tail[0][:300]} (its log: {log}); fix the "
                f"cause and run the same command again (finished runs are kept)"
            )
        r = read_result(run)
        elapsed = time.perf_counter() - t0
        eta = elapsed / done[0] * (len(todo) - done[0])  # the runs so far, `jobs` at a time
        logger.info(
            "[%d/%d] %s %s %s seed %d: eval AUC %.4f (epoch %d), %.0f s (%.0f s elapsed, "
            "ETA of this stage %s)",
            done[0], len(todo), run.stage, run.variant, run.recipe + " " + _point_name(run.point),
            run.seed, r["chosen"]["eval"]["auc"], r["chosen"]["epoch"], r["seconds"], elapsed,
            _duration(eta),
        )  # fmt: skip

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for f in [pool.submit(one, r) for r in todo]:
            f.result()
    return [res for r in runs if (res := read_result(r)) is not None]


# -- entry points ------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    """``"42 s"``, ``"12 min"`` or ``"3.5 h"``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _num_tables(data: DataConfig) -> int:
    return len(schema_of(data).tables)


def _check_work_dir(work: Path, cfg: Config) -> None:
    """The sweep deletes stale run directories under ``work``: refuse a work directory that is
    (or holds) anything but a sweep's own output, and one that contains the data it reads."""
    work = work.resolve()
    data = [Path(p).resolve() for p in [cfg.data.dir, *cfg.data.train_files, *cfg.data.eval_files,
                                        cfg.data.parquet_dir] if p]  # fmt: skip
    for p in data:
        if p == work or work in p.parents:
            raise ConfigError(f"--work {work} contains the input data {p}: choose another --work")
    if work.exists() and any(work.iterdir()) and not (work / "sweep_work.json").is_file():
        raise ConfigError(
            f"--work {work} exists and is not a sweep's work directory (no sweep_work.json): "
            f"choose an empty or new directory"
        )


def ensure_data(cfg: Config) -> None:
    """Generates synthetic day files once, before runs start in parallel (each would otherwise)."""
    from mlet_dist.data import ensure_source_data  # lazy: as execute's import of train

    ensure_source_data(cfg.data, cfg.synthetic, progress=cfg.train.progress)


def sweep(
    cfg: Config,
    spec: SweepSpec,
    work: Path,
    *,
    jobs: int = 1,
    threads: int = 1,
    keep: bool = False,
    stage: str = "all",
    shard: tuple[int, int] = (0, 1),
    title: str | None = None,
) -> dict[str, Any] | None:
    """Runs the sweep (or one stage / shard of it) and writes the report when it is complete.

    Returns the report, or None when this call ran only part of it (a stage or a shard).
    """
    work = Path(work)
    _check_work_dir(work, cfg)
    # (imported here: the command line reads this module's options, and `--help` must not wait
    # for torch, which the data sources import)
    from mlet_dist.data.sources import source_of

    if not source_of(cfg.data).streamed:  # streamed shards have the splits preprocess wrote
        if (
            not (cfg.data.eval_files or cfg.data.eval_fraction > 0)
            or not cfg.data.test_fraction > 0
        ):
            raise ConfigError(
                "the sweep needs eval and test splits (it tunes on eval, reports test): set "
                "data.eval_fraction > 0 (or data.eval_files) and data.test_fraction > 0"
            )
    check_variants(cfg, spec)
    # the same shard twice at once is refused; other shards (other jobs) run beside it
    with OutputLock(work, "sweep", "the sweep", part=f"shard-{shard[0]}-of-{shard[1]}"):
        return _sweep_into(work, cfg, spec, jobs, threads, keep, stage, shard, title)


def _sweep_into(
    work: Path,
    cfg: Config,
    spec: SweepSpec,
    jobs: int,
    threads: int,
    keep: bool,
    stage: str,
    shard: tuple[int, int],
    title: str | None,
) -> dict[str, Any] | None:
    """:func:`sweep` once its work directory is checked and this shard locked."""
    work.mkdir(parents=True, exist_ok=True)
    # atomic: the shards of one sweep write it side by side
    atomic_write_json(work / "sweep_work.json", {"config": cfg.to_dict(), "spec": asdict(spec)})
    ensure_data(cfg)
    tune = tune_runs(cfg, spec, work)
    n_frontier = frontier_count(spec)
    logger.info(
        "sweep: %d tune runs, then %d frontier runs: %d in all (stage %s, shard %d/%d); each "
        "run's time and the ETA of its stage are logged as the runs finish",
        len(tune), n_frontier, len(tune) + n_frontier, stage, *shard,
    )  # fmt: skip
    if stage in ("all", "tune"):
        run_all(tune, jobs, threads, keep, shard)
        if stage == "tune":
            return None
    tuned = [r for t in tune if (r := read_result(t)) is not None]
    if len(tuned) < len(tune):
        raise ConfigError(
            f"the tune stage is not complete ({len(tuned)}/{len(tune)} runs in {work}/tune): run "
            f"`--stage tune` on every shard first"
        )
    best = best_recipes(spec, tuned)
    frontier = frontier_runs(cfg, spec, work, best)
    if stage in ("all", "frontier"):
        run_all(frontier, jobs, threads, keep, shard)
    first = [r for f in frontier if (r := read_result(f)) is not None]
    # Extra seeds (max_seeds) are decided from the first seeds' eval AUCs once all of them exist
    # (a shard that finishes early leaves that to the next call).
    extra = more_seeds(spec, first) if len(first) == len(frontier) else {}
    if extra:
        frontier = frontier_runs(cfg, spec, work, best, seeds=extra)
        if stage in ("all", "frontier"):
            logger.info(
                "%d variant(s) spread over %.4f eval AUC across their %d seeds: %d seeds each (%s)",
                len(extra), spec.seed_spread, spec.seeds, spec.max_seeds,
                ", ".join(f"k={k} d={d}" for k, d in sorted(extra)),
            )  # fmt: skip
            run_all(frontier, jobs, threads, keep, shard)
    if stage == "frontier" or (stage == "all" and shard != (0, 1)):
        return None
    done = [r for f in frontier if (r := read_result(f)) is not None]
    partial = len(done) < len(frontier)
    if (partial and stage != "report") or not done:
        raise ConfigError(
            f"the frontier stage is not complete ({len(done)}/{len(frontier)} runs in "
            f"{work}/frontier): run `--stage frontier` on every shard first (`--stage report` "
            f"summarizes the finished runs of an unfinished sweep)"
        )
    report = summarize(spec, tuned, done)
    report["meta"] = _meta(cfg)
    if partial:  # a look at a sweep still running: said in the report and on the console
        report["meta"]["partial"] = f"{len(done)} of {len(frontier)} frontier runs finished"
        logger.warning("partial report: %s", report["meta"]["partial"])
    n = _num_tables(cfg.data)
    title = title or f"mlet-dist sweep: {cfg.data.source} ({work.name})"
    (work / "sweep.json").write_text(json.dumps(finite_json(report), indent=1, allow_nan=False))
    (work / "sweep.md").write_text(markdown(report, title, n))
    plot(report, work / "sweep.png", title, n)
    return report


def _meta(cfg: Config) -> dict[str, Any]:
    import platform

    import torch

    return {
        "date": time.strftime("%Y-%m-%d"),
        "data": cfg.data.source,
        "batch": cfg.data.batch_size,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sweep", required=True, help="sweep file (TOML, see configs/sweep/)")
    p.add_argument("--work", required=True, help="directory of the runs and the report")
    p.add_argument("--jobs", type=_positive, default=1, help="runs at a time (default 1)")
    p.add_argument("--threads", type=_positive, default=1, help="threads per run (default 1)")
    p.add_argument("--stage", default="all", choices=["all", *STAGES])
    p.add_argument("--shard", default="0/1", type=_shard, help="I/N: this job's share of runs")
    p.add_argument("--seeds", type=_positive, help="override the sweep file's seeds")
    p.add_argument("--epochs", type=_positive, help="override the sweep file's epochs")
    p.add_argument("--keep-runs", action="store_true", help="keep each run's checkpoints")


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r} must look like I/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: need 0 <= I < N")
    return i, n


def main_from_args(args: argparse.Namespace, overrides: list[str]) -> int:
    cfg = load_config(args.config, overrides)
    extra = {k: v for k, v in (("seeds", args.seeds), ("epochs", args.epochs)) if v is not None}
    spec = load_sweep(args.sweep, extra)
    report = sweep(
        cfg, spec, Path(args.work), jobs=args.jobs, threads=args.threads, keep=args.keep_runs,
        stage=args.stage, shard=args.shard,
    )  # fmt: skip
    if report is not None:
        print((Path(args.work) / "sweep.md").read_text())
        print(f"wrote {args.work}/sweep.json, sweep.md, sweep.png")
    return 0


def _worker(argv: list[str]) -> int:
    """``python -m mlet_dist.sweep RUN/sweep_run.json``: one run, in its own process."""
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    raw = json.loads(Path(argv[0]).read_text())
    execute(RunSpec(**raw), keep="--keep-runs" in argv)
    return 0
