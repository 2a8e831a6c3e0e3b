"""Profile of the training step: top operators by self CPU time, per variant.

Builds each variant (MLET(k, d), plain EBC(k), plain EBC(d); see :mod:`benchmarks.common`) on one
rank exactly as training does (``Trainer``), runs warm-up steps, then records ``--steps`` steps
with ``torch.profiler`` and prints TorchRec/PyTorch's operator table sorted by self CPU time
(plus self CUDA time on GPU). The tables are also written as text to
``OUT/profile_<hw>_<date>.txt`` so that before/after profiles can be compared.

    python -m benchmarks.profile_step [--quick] [--variants mlet plain_k plain_d] [--steps 10]
        [--rows 25] [--threads N] [--world-size N] [--tag before] [--config configs/bench_train.toml]
        [--point train.pipeline=sparse_dist] [--out benchmarks/results] [--section.key=value ...]

Each variant runs in fresh processes (one per rank; with ``--world-size N``, N gloo ranks on CPU,
rank 0's table is reported), so that one variant's heap does not change the next one's page faults.
``--threads`` defaults to cores / ranks, as in the train suite. Set allocator variables in the
environment of the command (they are recorded), e.g. ``MALLOC_MMAP_THRESHOLD_=33554432
MALLOC_TRIM_THRESHOLD_=17179869184 python -m benchmarks.profile_step --tag malloc-tuned``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import resource
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from benchmarks.common import (
    DEFAULT_OUT,
    DEFAULT_TRAIN_CONFIG,
    VARIANTS,
    BenchConfig,
    BenchConfigError,
    hardware_tag,
    library_versions,
    load_bench_config,
    machine_info,
    point_config,
    random_batches,
    result_stem,
    spawn_ranks,
    variant_label,
)
from benchmarks.traffic import PIPELINE_LOOKAHEAD, load_pool, write_rank_pools


def profile_variant(
    cfg, variant: str, steps: int, warmup: int, rows: int, bench=None, point=None
) -> dict[str, Any]:
    """Profiles ``steps`` training steps of one variant on this process (one rank).

    The step is the train suite's (:func:`benchmarks.train_bench.make_step`: ``train.pipeline``
    where the config has it) on its batches: with ``bench.batches = 'zipf'`` a fresh batch every
    step (drawn before the first step), else 4 random batches cycled. ``point`` (``(key,
    value)``) picks one of ``bench.axes``' values; the other axes stay at their first value.

    Returns:
        ``{"variant", "label", "wall_ms_per_step", "cpu_ms_per_step", "ms_per_step", "table",
        "top": [{name, self_cpu_ms, pct}], ...}``: wall and process CPU time of unprofiled
        steps, then the wall time of the profiled steps (profiler overhead included).
    """
    # In the rank processes only: the parent that spawns them never imports torch (start-up).
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.train_bench import make_step, pipeline_kind
    from mlet_dist.distributed.parallelize import init_distributed
    from mlet_dist.train import Trainer

    bench = bench or BenchConfig()
    vcfg = point_config(cfg, variant, bench, point)
    env = init_distributed(vcfg.dist)
    local_batch = vcfg.data.batch_size // env.world_size
    if bench.batches == "zipf":
        needed = warmup + 2 * steps + PIPELINE_LOOKAHEAD
        with tempfile.TemporaryDirectory(prefix="mlet_profile_pool_") as tmp:
            paths = write_rank_pools(
                vcfg, env.world_size, needed, bench.ids_per_bag, bench.seed, Path(tmp)
            )
            batches = iter(load_pool(paths[env.rank]))
    else:
        batches = itertools.cycle(random_batches(vcfg, 4, local_batch, seed=env.rank))
    trainer = Trainer(vcfg, env)
    step = make_step(trainer, pipeline_kind(vcfg), batches)
    cuda = env.device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    # Unprofiled steps first: wall time, and process CPU time (user + system, all threads), which
    # other jobs on a shared machine disturb much less than wall time.
    sync()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
    after = resource.getrusage(resource.RUSAGE_SELF)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    ms = (time.perf_counter() - start) * 1e3 / steps
    averages = prof.key_averages()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = averages.table(sort_by=sort, row_limit=rows)
    total = sum(e.self_cpu_time_total for e in averages) or 1.0
    top = sorted(averages, key=lambda e: -e.self_cpu_time_total)[:rows]
    return {
        "variant": variant,
        "label": variant_label(cfg, variant) + (f" [{point[0]}={point[1]}]" if point else ""),
        "pipeline": pipeline_kind(vcfg),
        "batches": bench.batches,
        "ms_per_step": ms,
        "wall_ms_per_step": wall_ms,
        "cpu_ms_per_step": (after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime)
        * 1e3
        / steps,
        # Page faults of first-touched memory (large tensors freshly mapped every step) show up
        # as system time, spread over the ops that touch the new memory.
        "minor_faults_per_step": (after.ru_minflt - usage.ru_minflt) / steps,
        "sys_ms_per_step": (after.ru_stime - usage.ru_stime) * 1e3 / steps,
        "table": table,
        "top": [
            {
                "name": e.key,
                "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                "self_cpu_pct": 100.0 * e.self_cpu_time_total / total,
                "calls_per_step": e.count / steps,
            }
            for e in top
        ],
    }


def format_profiles(results: list[dict[str, Any]], header: str) -> str:
    out = [header, ""]
    for r in results:
        out += [
            f"=== {r['label']} ({r['variant']}): {r['wall_ms_per_step']:.1f} ms/step wall, "
            f"{r['cpu_ms_per_step']:.1f} ms/step process CPU (unprofiled); "
            f"{r['ms_per_step']:.1f} ms/step under the profiler; "
            f"{r['minor_faults_per_step']:.0f} minor page faults/step "
            f"({r['minor_faults_per_step'] * 4 / 1024:.1f} MiB first-touched), "
            f"{r['sys_ms_per_step']:.1f} ms/step system time",
            "",
            "top ops by self CPU time (ms/step, % of self CPU):",
            *(
                f"  {t['self_cpu_pct']:5.1f}%  {t['self_cpu_ms_per_step']:8.2f} ms  "
                f"{t['calls_per_step']:6.1f} calls  {t['name']}"
                for t in r["top"][:12]
            ),
            "",
            r["table"],
            "",
        ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__)
    parser.add_argument("--config", default=str(DEFAULT_TRAIN_CONFIG))
    parser.add_argument("--quick", action="store_true", help="small sizes ([quick.*] tables)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=10, help="profiled steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before profiling")
    parser.add_argument("--rows", type=int, default=25, help="operators listed per table")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="directory of the text file")
    parser.add_argument("--tag", default="", help="added to the file name (e.g. 'before')")
    parser.add_argument(
        "--threads", type=int, default=0, help="intra-op threads per rank (0 = cores / ranks)"
    )
    parser.add_argument(
        "--world-size", type=int, default=1, help="ranks (CPU: gloo processes); rank 0 is shown"
    )
    parser.add_argument(
        "--point",
        default="",
        help="profile this value of one of the config's bench.axes, e.g. train.pipeline=sparse_dist"
        " (default: every axis at its first value)",
    )
    parser.add_argument("--child-result", help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    cfg, bench = load_bench_config(args.config, overrides, quick=args.quick)
    point = None
    if args.point:
        key, _, value = args.point.partition("=")
        if value not in bench.axes.get(key, []):
            raise BenchConfigError(
                f"--point {args.point}: not a value of bench.axes {bench.axes}; use key=value"
            )
        point = (key, value)
    if args.child_result:  # one rank of one variant: profile, rank 0 saves the result
        import torch

        (variant,) = args.variants
        result = profile_variant(
            cfg, variant, args.steps, args.warmup, args.rows, bench=bench, point=point
        )
        result["threads"] = torch.get_num_threads()
        if torch.distributed.get_rank() == 0:
            Path(args.child_result).write_text(json.dumps(result))
        torch.distributed.destroy_process_group()
        return 0

    # Each variant in fresh processes: the heap left by one variant would change the page
    # faults (and so the time) of the next; the train suite measures the same way.
    machine = machine_info()
    threads = args.threads or max(1, machine["cores"] // args.world_size)
    rest = [a for a in argv if a not in args.variants and a != "--variants"]
    results = []
    with tempfile.TemporaryDirectory(prefix="mlet_profile_") as tmp:
        for v in args.variants:
            out = Path(tmp) / f"{v}.json"
            child = [*rest, "--variants", v, "--child-result", str(out)]
            spawn_ranks(
                lambda r, child=child: ["-m", "benchmarks.profile_step", *child],
                args.world_size,
                threads,
                1800.0,
                Path(tmp) / f"log_{v}",
                what=f"profiling {v} on {args.world_size} rank(s)",
            )
            results.append(json.loads(out.read_text()))
    versions = library_versions()
    tuned = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"}
    header = (
        f"Training-step profile, rank 0 of {args.world_size}, {hardware_tag(machine)} "
        f"({machine['cores']} cores, {machine['cpu_model']}"
        f"{', ' + machine['gpus'][0]['name'] if machine['gpus'] else ''}), "
        f"{results[0]['threads']} threads per rank, one fresh process set per variant; torch "
        f"{versions['torch']}, torchrec {versions['torchrec']}, fbgemm_gpu "
        f"{versions['fbgemm_gpu']}, python {versions['python']}\n"
        f"global batch {cfg.data.batch_size}, {len(cfg.data.num_embeddings_per_feature)} tables x "
        f"{max(cfg.data.num_embeddings_per_feature):,} rows, k={cfg.model.inner_dim}, "
        f"d={cfg.model.embedding_dim}, W1 optimizer {cfg.optim.embedding_optimizer}, sharding "
        f"{cfg.dist.sharding_types or 'planner'}, {args.steps} profiled steps after "
        f"{args.warmup} warm-up; point: {args.point or 'reference'} (bench.axes {bench.axes})"
        f"; step: train.pipeline {results[0]['pipeline']}, batches "
        f"{results[0]['batches']}{' (fresh every step)' if bench.batches == 'zipf' else ''}\n"
        "allocator environment: "
        + (" ".join(f"{k}={v}" for k, v in sorted(tuned.items())) if tuned else "stock")
        + f"\ncommand: python -m benchmarks.profile_step {shlex.join(argv)}"
    )
    text = format_profiles(results, header)
    stem = result_stem("profile", hardware_tag(machine), args.quick)
    stem += (f"_ws{args.world_size}" if args.world_size > 1 else "") + (
        f"_{args.tag}" if args.tag else ""
    )
    path = Path(args.out) / f"{stem}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    print(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
