"""Benchmark of the Criteo data pipeline: raw TSV -> Parquet preprocessing and the streaming loader.

Generates >= 2 GB of plain Criteo-format TSV with the synthetic generator (in a temporary directory
under /tmp, deleted afterwards), preprocesses it with the MLPerf 40M table sizes, then measures

- preprocessing throughput: MB/s of raw input, in total and per worker process, for the id
  counting pass (frequency threshold) and the writing pass;
- peak resident memory of the worker processes (and their resident set when they start a part,
  i.e. the shared imports) and of the main process;
- the Parquet loader's samples/s per rank (ranks simulated one after the other in this process);
- the training-step samples/s of ``configs/synthetic_small.toml`` (one CPU process), measured in
  the same run, to compare with what the loader delivers.

Results go to ``benchmarks/results/preprocess[-quick]_<hardware>_<date>.{json,md}`` (the naming of
``benchmarks.common.result_stem``) with the machine, library versions, git commit, settings and
the load average (other jobs on the machine skew the figures). ``benchmarks.run --suite loader``
runs this module too (``main`` returns the result).

Usage::

    python -m benchmarks.preprocess_bench            # full: ~2.2 GB of raw TSV
    python -m benchmarks.preprocess_bench --quick    # small input, seconds (format check)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    git_output,
    hardware_tag,
    library_versions,
    machine_info,
    peak_rss_bytes,
    result_stem,
)
from benchmarks.report import header_lines

logger = logging.getLogger("benchmarks.preprocess_bench")

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"  # the default of benchmarks.run too
TRAIN_CONFIG = REPO / "configs" / "synthetic_small.toml"


def _versions() -> dict[str, Any]:
    import pyarrow

    return {
        **library_versions(),
        "pyarrow": pyarrow.__version__,
        "git_commit": git_output("rev-parse", "HEAD"),
        "git_dirty": bool(git_output("status", "--porcelain", "--untracked-files=no")),
    }


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_generate(raw: Path, days: int, rows_per_day: int) -> dict[str, Any]:
    from mlet_dist.config import SyntheticConfig
    from mlet_dist.data import generate_synthetic

    cfg = SyntheticConfig(days=days, rows_per_day=rows_per_day, gzip=False, seed=1234)
    t0 = time.perf_counter()
    files = generate_synthetic(raw, cfg, progress=False)
    seconds = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in files)
    return {
        "files": len(files),
        "rows": days * rows_per_day,
        "bytes": size,
        "gb": size / 1e9,
        "seconds": seconds,
        "mb_per_s": size / 1e6 / seconds,
        "_files": [str(f) for f in files],
    }


def bench_preprocess(files: list[str], out: Path, workers: int, threshold: int) -> dict[str, Any]:
    from mlet_dist.config import MLPERF_40M_TABLE_SIZES
    from mlet_dist.data.preprocess import PreprocessSettings, preprocess

    settings = PreprocessSettings(
        MLPERF_40M_TABLE_SIZES,
        frequency_threshold=threshold,
        eval_fraction=0.05,
        test_fraction=0.05,
    )
    t0 = time.perf_counter()
    summary = preprocess(files, out, settings, workers=workers, progress=False)
    seconds = time.perf_counter() - t0
    return {
        "settings": dataclasses.asdict(settings) | {"num_embeddings_per_feature": "MLPerf 40M"},
        "workers": workers,
        "seconds": seconds,
        "rows": summary["rows"],
        "splits": {k: v["rows"] for k, v in summary["splits"].items()},
        "parquet_bytes": _dir_bytes(out / "train")
        + _dir_bytes(out / "eval")
        + _dir_bytes(out / "test"),
        "count_pass": summary["run"]["count"],
        "write_pass": summary["run"]["write"],
        "main_process_peak_rss_mb": peak_rss_bytes() / 2**20,
    }


def bench_loader(train_dir: Path, cases: list[tuple[int, int]], max_batches: int) -> list[dict]:
    from mlet_dist.data import ParquetBatchSource

    results = []
    for world_size, batch_size in cases:
        for rank in range(world_size):
            src = ParquetBatchSource(
                train_dir, batch_size, rank=rank, world_size=world_size, seed=0
            )
            n = min(src.num_batches(), max_batches)
            rows = 0
            t0 = time.perf_counter()
            it = src.batches(0)
            for _, batch in zip(range(n), it):
                rows += batch.labels.shape[0]
            seconds = time.perf_counter() - t0
            it.close()
            results.append(
                {
                    "world_size": world_size,
                    "rank": rank,
                    "global_batch_size": batch_size,
                    "batches": n,
                    "samples": rows,
                    "seconds": seconds,
                    "samples_per_s": rows / seconds if seconds > 0 else None,
                    "shuffle_buffer_rows": src.shuffle_buffer_rows,
                    "prefetch_batches": src.prefetch_batches,
                }
            )
    return results


def bench_training(tmp: Path, max_steps: int, rows_per_day: int | None) -> dict[str, Any]:
    import torch.distributed as dist

    from mlet_dist.config import load_config
    from mlet_dist.data import generate_synthetic
    from mlet_dist.train import train

    overrides = [
        f"--data.dir={tmp / 'synthetic_small'}",
        f"--train.run_dir={tmp / 'run'}",
        f"--train.max_steps={max_steps}",
        "--train.progress=false",
        "--dist.device=cpu",
    ]
    if rows_per_day:
        overrides.append(f"--synthetic.rows_per_day={rows_per_day}")
    cfg = load_config(TRAIN_CONFIG, overrides)
    generate_synthetic(cfg.data.dir, cfg.synthetic, progress=False)
    try:
        metrics = train(cfg, resume=False)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    stats = metrics["train"]
    return {
        "config": str(TRAIN_CONFIG.relative_to(REPO)),
        "overrides": overrides[2:],
        "batch_size": cfg.data.batch_size,
        "world_size": metrics["world_size"],
        "steps": stats["steps_this_run"],
        "seconds": stats["seconds"],
        "samples_per_s": stats["samples_per_s"],
    }


def markdown(result: dict[str, Any]) -> str:
    gen, pre, v = result["generate"], result["preprocess"], result["versions"]
    lines = header_lines(result, "Data pipeline: Criteo TSV -> Parquet preprocessing and loader")
    lines += [
        f"Also pyarrow {v['pyarrow']}, numpy {v['numpy']}; commit {v['git_commit'][:12]}"
        f"{' (with uncommitted changes)' if v['git_dirty'] else ''}.",
        "",
        f"Load average before / after: {result['load_before']} / {result['load_after']} "
        "(other jobs on the machine may have been running; the figures are lower bounds).",
        "",
        f"Input: {gen['files']} plain synthetic day files, {gen['rows']:,} rows, "
        f"{gen['gb']:.2f} GB (generated at {gen['mb_per_s']:.0f} MB/s). Preprocessing: MLPerf 40M "
        f"hash sizes, frequency threshold {pre['settings']['frequency_threshold']}, "
        f"eval/test fractions 0.05/0.05, {pre['workers']} worker process(es), row groups of "
        f"{pre['settings']['row_group_rows']} rows; Parquet output {pre['parquet_bytes'] / 1e9:.2f} GB.",
        "",
        "| measure | value |",
        "|---|---|",
    ]
    for name, key in (("count pass (threshold)", "count_pass"), ("write pass", "write_pass")):
        p = pre[key]
        if p is None:
            continue
        lines += [
            f"| {name}: raw input MB/s, all workers | {p['mb_per_s']:.1f} |",
            f"| {name}: raw input MB/s per process | {p['mb_per_s_per_process']:.1f} |",
            f"| {name}: peak RSS per worker (MB) | {p['peak_rss_mb_per_process']:.0f} |",
            f"| {name}: worker RSS at part start (MB, imports) | "
            f"{p['rss_at_part_start_mb'] or 0:.0f} |",
        ]
    lines += [
        f"| preprocessing wall time (s) | {pre['seconds']:.1f} |",
        f"| main process peak RSS (MB) | {pre['main_process_peak_rss_mb']:.0f} |",
    ]
    for r in result["loader"]:
        lines.append(
            f"| loader samples/s, rank {r['rank']} of {r['world_size']}, global batch "
            f"{r['global_batch_size']} | {r['samples_per_s']:,.0f} |"
        )
    t = result["training"]
    lines += [
        f"| training samples/s ({t['config']}, batch {t['batch_size']}, {t['world_size']} CPU "
        f"process, {t['steps']} steps) | {t['samples_per_s']:,.0f} |",
        f"| loader (1 rank, batch {t['batch_size']}) / training samples/s | "
        f"{result['loader_over_training']:.1f}x |",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark, writes its JSON and Markdown, and returns the result."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.preprocess_bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small input (a format check, seconds)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="preprocess workers")
    p.add_argument("--days", type=int, help="day files (default 4; quick 2)")
    p.add_argument("--rows-per-day", type=int, help="rows per day (default 2.1M; quick 20k)")
    p.add_argument("--frequency-threshold", type=int, default=3)
    p.add_argument("--out-dir", default=str(RESULTS_DIR), help="results directory")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for name in ("torchrec", "torch", "fbgemm_gpu", ""):
        logging.getLogger(name or None).setLevel(logging.WARNING)
    logger.setLevel(logging.INFO)

    days = args.days or (2 if args.quick else 4)
    rows_per_day = args.rows_per_day or (20_000 if args.quick else 2_100_000)
    machine = machine_info()
    result: dict[str, Any] = {
        "suite": "preprocess",
        "quick": args.quick,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": shlex.join(
            [
                "python",
                "-m",
                "benchmarks.preprocess_bench",
                *(sys.argv[1:] if argv is None else argv),
            ]
        ),
        "hardware_tag": hardware_tag(machine),
        "machine": machine,
        "versions": _versions(),
        "args": vars(args) | {"days": days, "rows_per_day": rows_per_day},
        "load_before": _load(),
    }
    tmp = Path(tempfile.mkdtemp(prefix="mlet_preprocess_bench_", dir="/tmp"))
    result["scratch_dir"] = str(tmp)  # deleted at the end
    try:
        logger.info("generating %d x %d rows of plain TSV in %s", days, rows_per_day, tmp)
        gen = bench_generate(tmp / "raw", days, rows_per_day)
        files = gen.pop("_files")
        logger.info("generated %.2f GB; preprocessing with %d worker(s)", gen["gb"], args.workers)
        result["generate"] = gen
        result["preprocess"] = bench_preprocess(
            files, tmp / "parquet", args.workers, args.frequency_threshold
        )
        shutil.rmtree(tmp / "raw")  # free the disk before the next phases
        logger.info("preprocessed in %.1f s; measuring the loader", result["preprocess"]["seconds"])
        cases = [(1, 256), (2, 256), (1, 8192)]
        result["loader"] = bench_loader(
            tmp / "parquet" / "train", cases, 40 if args.quick else 4000
        )
        logger.info("measuring training steps of %s", TRAIN_CONFIG.name)
        result["training"] = bench_training(
            tmp, 10 if args.quick else 300, 3000 if args.quick else None
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["load_after"] = _load()
    loader_1rank = next(
        r for r in result["loader"] if r["world_size"] == 1 and r["global_batch_size"] == 256
    )
    result["loader_over_training"] = (
        loader_1rank["samples_per_s"] / result["training"]["samples_per_s"]
    )

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / result_stem("preprocess", result["hardware_tag"], args.quick)
    text = markdown(result)
    stem.with_name(stem.name + ".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_name(stem.name + ".md").write_text(text)
    print(text)
    print(f"wrote {stem}.json and .md")
    return result


if __name__ == "__main__":
    main()
