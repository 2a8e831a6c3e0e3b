"""Training throughput and memory: MLET(k, d) vs plain EBC(k) vs plain EBC(d).

Each measurement is a fresh set of processes (one per rank, gloo on CPU, nccl on GPU), so that
peak RSS is that variant's alone. The repeats are interleaved (repeat r runs every variant before
repeat r+1 starts, in a rotated order), so slow drifts of a shared machine hit all variants alike.
In each process: build the model exactly as training does (``mlet_dist.train.Trainer``: meta
build, TorchRec planner, DMP, fused W1 optimizer), run warm-up steps on random batches, then
``windows`` timed windows of ``steps_per_window`` training steps (``Trainer.fit``'s step).

Per (variant, world size) it reports the median throughput (global samples/s) over all windows of
all repeats, the spread, and the ratios MLET / EBC(k) and MLET / EBC(d); peak RSS (CPU) or max
allocated memory (GPU) per rank; the parameter and optimizer bytes held per rank; the bytes served
after collapse; and the dry-run estimates of :mod:`mlet_dist.distributed.planning` (ours and
TorchRec's planner's) next to the measured numbers.

Worker entry (one rank, started by :func:`run_train_suite`)::

    python -m benchmarks.train_bench --worker SPEC.json --result OUT.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import re
import resource
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import (
    BenchConfig,
    BenchConfigError,
    BenchmarkError,
    axis_points,
    current_rss_bytes,
    local_tensor_bytes,
    peak_rss_bytes,
    point_config,
    point_label,
    random_batches,
    spawn_ranks,
    train_step,
    variant_config,
    variant_label,
)
from benchmarks.traffic import (
    batch_bytes,
    batches_needed,
    load_pool,
    pool_key,
    write_rank_pools,
)

logger = logging.getLogger(__name__)


def resolve_device(cfg) -> str:
    """'cuda' or 'cpu' for ``dist.device`` ('auto': cuda when visible)."""
    import torch  # the orchestrating process imports torch only where it must (start-up time)

    if cfg.dist.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.dist.device


def world_sizes(bench: BenchConfig, device: str) -> list[int]:
    """CPU: ``bench.world_sizes``; GPU: 1 and all visible GPUs."""
    if device == "cuda":
        import torch  # only on GPU (start-up time of the orchestrating process)

        return sorted({1, torch.cuda.device_count()})
    return sorted(set(bench.world_sizes))


def threads_per_rank(bench: BenchConfig, world_size: int, cores: int) -> int:
    return bench.threads or max(1, cores // world_size)


# -- one measurement: N rank processes ---------------------------------------------------------


def launch(
    cfg,
    variant: str,
    world_size: int,
    bench: BenchConfig,
    threads: int,
    workdir: Path,
    point: tuple[str, str] | None = None,
    pool: list[Path] | None = None,
) -> list[dict[str, Any]]:
    """Runs one measurement of ``variant`` (at axis ``point``) on ``world_size`` fresh ranks.

    Args:
        pool: per rank, the ``.npz`` of its fresh batches (``bench.batches = 'zipf'``).

    Returns:
        The result dict of every rank (see :func:`worker`), by rank.

    Raises:
        BenchmarkError: a rank failed or timed out (its log tail is in the message).
    """
    name = f"{variant}_{world_size}_{_slug(point_label(point))}"
    spec = workdir / f"spec_{name}.json"
    spec.write_text(
        json.dumps(
            {
                "config": point_config(cfg, variant, bench, point).to_dict(),
                "variant": variant,
                "bench": dataclasses.asdict(bench),
                "pool": [str(p) for p in pool] if pool else None,
            }
        )
    )
    outs = [workdir / f"result_{name}_{r}.json" for r in range(world_size)]
    for o in outs:
        o.unlink(missing_ok=True)
    spawn_ranks(
        lambda r: ["-m", "benchmarks.train_bench", "--worker", str(spec), "--result", str(outs[r])],
        world_size,
        threads,
        bench.timeout_s,
        workdir / f"log_{name}",
        what=f"measuring {variant} {point_label(point)} on {world_size} rank(s)".replace("  ", " "),
        extra_env=bench.env,
    )
    missing = [r for r, o in enumerate(outs) if not o.is_file()]
    if missing:
        raise BenchmarkError(f"measuring {variant}: ranks {missing} wrote no result")
    return [json.loads(o.read_text()) for o in outs]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text) or "ref"


def pipeline_kind(cfg) -> str:
    """The step the worker times: ``train.pipeline`` where the config has it, else 'base'."""
    return getattr(cfg.train, "pipeline", "base")


def make_step(trainer, kind: str, batches: Iterator[Any], monitor: Any = None) -> Callable[[], Any]:
    """One training step as ``Trainer.fit`` runs it with ``train.pipeline = kind``; the returned
    function trains the next batch of ``batches`` and returns its loss (detached).

    'base': forward, backward, optimizer step (:func:`benchmarks.common.train_step`).
    'sparse_dist': TorchRec's ``TrainPipelineSparseDist.progress`` (it zeroes the gradients, runs
    batch i + 1's input distribution and reads batch i + 2 around batch i's forward, backward and
    optimizer step); then the LR schedule and the fused optimizer's LR sync, as the trainer does.

    ``monitor``: a :class:`mlet_dist.train.metrics.TrainingMonitor` (RecMetrics, TensorBoard),
    driven as ``Trainer.fit`` drives it: every step's output, the scalars every
    ``train.log_every`` steps, the RecMetrics at their cadence (steps counted from the first).
    """
    step = _output_step(trainer, kind, batches)
    if monitor is None:
        return lambda: step()[0]
    from mlet_dist.train.metrics import learning_rates

    log_every = trainer.cfg.train.log_every
    done = 0

    def monitored() -> Any:
        nonlocal done
        start = time.perf_counter()
        output = step()
        done += 1
        monitor.step(output, 0.0, time.perf_counter() - start)
        if done % log_every == 0:
            lrs = learning_rates(trainer.optimizer)
            monitor.log(done, float(output[0]), lrs, trainer.env.device)
        monitor.rec_metrics(done)
        return output[0]

    return monitored


def _output_step(trainer, kind: str, batches: Iterator[Any]) -> Callable[[], Any]:
    """:func:`make_step`'s step, returning the model's output ``(loss, logits, labels[, ...])``."""
    if kind == "base":
        return lambda: train_step(trainer, next(batches))
    if kind != "sparse_dist":
        raise BenchConfigError(
            f"train.pipeline = {kind!r}: the benchmark knows 'base', 'sparse_dist'"
        )
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    pipeline = TrainPipelineSparseDist(
        trainer.model, trainer.optimizer, trainer.env.device, execute_all_batches=True
    )

    def step() -> Any:
        output = pipeline.progress(batches)
        trainer.scheduler.step()
        trainer.model.fused_optimizer.step()  # Trainer._sync_fused_lr
        return output  # DLRMTrain's output: (loss detached, logits, labels)

    return step


def monitoring(cfg) -> bool:
    """Whether ``Trainer.fit`` runs a monitor that costs anything: TensorBoard or RecMetrics."""
    from mlet_dist.train.metrics import effective_metrics_every

    return bool(cfg.train.tensorboard or effective_metrics_every(cfg.train))


def worker(spec_path: str, result_path: str) -> None:
    """One rank of a measurement: build, warm up, time windows, count memory, write JSON."""
    rss_start = current_rss_bytes()
    import torch  # after rss_start (and in the rank processes only): the RSS baseline excludes it

    from mlet_dist.config import config_from_dict
    from mlet_dist.distributed.parallelize import init_distributed
    from mlet_dist.train import Trainer
    from mlet_dist.train.metrics import TrainingMonitor, effective_metrics_every

    spec = json.loads(Path(spec_path).read_text())
    cfg = config_from_dict(spec["config"])
    bench = BenchConfig(**spec["bench"])
    env = init_distributed(cfg.dist)
    cuda = env.device.type == "cuda"
    local_batch = cfg.data.batch_size // env.world_size
    # The batches first, so that the memory they take is counted apart from the model's
    # (rss_batches, batch_bytes). Fresh batches stay on the host (pinned on GPU) and the step
    # copies each to the device, as training does; the cycled uniform ones are put on the
    # device once, as this suite always did.
    rss_before_batches = current_rss_bytes()
    kind = pipeline_kind(cfg)
    if spec.get("pool"):
        pool = load_pool(spec["pool"][env.rank])
        if cuda:
            pool = [b.pin_memory() for b in pool]
        needed = batches_needed(bench, kind != "base")
        if len(pool) < needed:
            raise BenchmarkError(f"the batch pool holds {len(pool)} batches, {needed} needed")
        batch_iter: Iterator[Any] = iter(pool)
    else:
        seed = bench.seed * 1000 + env.rank
        pool = [
            b.to(env.device) for b in random_batches(cfg, bench.distinct_batches, local_batch, seed)
        ]
        batch_iter = itertools.cycle(pool)
    pool_bytes = batch_bytes(pool)
    rss_before_model = current_rss_bytes()
    trainer = Trainer(cfg, env)
    rss_model = current_rss_bytes()
    monitor, tb_dir = None, None
    if monitoring(cfg):  # the TensorBoard / RecMetrics axis (a throw-away run directory)
        tb_dir = tempfile.mkdtemp(prefix="mlet_bench_tb_")
        monitor = TrainingMonitor(cfg.train, cfg.data.batch_size, env, tb_dir)
    step_fn = make_step(trainer, kind, batch_iter, monitor)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(env.device)

    for _ in range(bench.warmup_steps):
        step_fn()
    sync()
    torch.distributed.barrier()
    window_s = []
    usage = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(bench.windows):
        start = time.perf_counter()
        for _ in range(bench.steps_per_window):
            loss = step_fn()
        sync()
        window_s.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    timed_steps = bench.windows * bench.steps_per_window
    if monitor is not None:
        monitor.close()
        shutil.rmtree(tb_dir, ignore_errors=True)
    final_loss = float(loss.detach())
    params = {"w1": 0, "projection": 0, "dense": 0}
    for name, p in trainer.model.named_parameters():
        key = "w1" if ".w1." in name else "projection" if ".projection." in name else "dense"
        params[key] += local_tensor_bytes(p)
    optimizer = {"fused": 0, "projection": 0, "dense": 0}
    for name, state in trainer.optimizer.state_dict()["state"].items():
        part = name.split(".", 1)[0]
        optimizer[part if part in optimizer else "dense"] += _nested_bytes(state)
    result = {
        "rank": env.rank,
        "world_size": env.world_size,
        "pipeline": kind,
        "metrics_every": effective_metrics_every(cfg.train) if monitor is not None else 0,
        "tensorboard": bool(cfg.train.tensorboard),
        "batches": bench.batches,
        "batch_pool": len(pool),
        "batch_pool_bytes": pool_bytes,
        "rss_batches_bytes": rss_before_model - rss_before_batches,
        "mean_ids_per_bag": float(pool[0].sparse_features.lengths().float().mean()),
        "device": str(env.device),
        "threads": torch.get_num_threads(),
        "local_batch": local_batch,
        "steps_per_window": bench.steps_per_window,
        "window_s": window_s,
        # First touches of freshly mapped memory: glibc returns large freed blocks to the OS, and
        # tensors allocated again next step fault their pages in again (system time).
        "minor_faults_per_step": (after.ru_minflt - usage.ru_minflt) / timed_steps,
        "sys_s_per_step": (after.ru_stime - usage.ru_stime) / timed_steps,
        "user_s_per_step": (after.ru_utime - usage.ru_utime) / timed_steps,
        "final_loss": final_loss,
        "param_bytes": params,
        "optimizer_bytes": optimizer,
        "rss_start_bytes": rss_start,
        "rss_before_model_bytes": rss_before_model,
        "rss_model_bytes": rss_model,
        "rss_end_bytes": current_rss_bytes(),
        "peak_rss_bytes": peak_rss_bytes(),
        "sharding": _sharding_summary(trainer),
    }
    if cuda:
        result["max_allocated_bytes"] = torch.cuda.max_memory_allocated(env.device)
        result["max_reserved_bytes"] = torch.cuda.max_memory_reserved(env.device)
    Path(result_path).write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


def _nested_bytes(obj: Any) -> int:
    if isinstance(obj, dict):
        return sum(_nested_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nested_bytes(v) for v in obj)
    return local_tensor_bytes(obj)


def _sharding_summary(trainer) -> dict[str, int]:
    """Sharding type -> number of tables, from the plan."""
    counts: dict[str, int] = {}
    for module_plan in trainer.model.plan.plan.values():
        for ps in module_plan.values():  # type: ignore[union-attr]
            counts[ps.sharding_type] = counts.get(ps.sharding_type, 0) + 1
    return counts


# -- the suite ---------------------------------------------------------------------------------


def run_train_suite(
    cfg,
    bench: BenchConfig,
    cores: int,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measures every (world size, variant, axis point), ``bench.repeats`` times interleaved.

    Args:
        cfg: the base config (MLET k -> d); see :func:`benchmarks.common.variant_config`.
        bench: what to measure and how often.
        cores: CPU cores of the machine (threads per rank = cores // ranks by default).
        progress: called with one line per measurement.

    Returns:
        ``{"device", "rows": [one per (variant, world size) at the reference point], "ratios",
        "planner", "axis_rows": [one per (variant, world size, other axis value)],
        "axis_ratios": [each axis row / its reference row]}`` (keys: :func:`_summarize`).
    """
    device = resolve_device(cfg)
    sizes = world_sizes(bench, device)
    points = axis_points(bench)
    runs: dict[tuple[str, int, str], list[list[dict[str, Any]]]] = {}
    pool_info: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mlet_bench_") as tmp:
        pools = _draw_pools(cfg, bench, sizes, points, Path(tmp), progress, pool_info)
        for ws in sizes:
            threads = threads_per_rank(bench, ws, cores)
            cases = [(v, p) for p in points for v in bench.variants]
            for r in range(bench.repeats):
                order = cases[r % len(cases) :] + cases[: r % len(cases)]
                for v, p in order:
                    start = time.perf_counter()
                    pool = pools.get((ws, point_label(p)))
                    ranks = launch(cfg, v, ws, bench, threads, Path(tmp), p, pool)
                    runs.setdefault((v, ws, point_label(p)), []).append(ranks)
                    sps = _run_samples_per_s(ranks, cfg.data.batch_size)
                    where = f" [{point_label(p)}]" if p else ""
                    progress(
                        f"train {variant_label(cfg, v):>12s}{where} world {ws} repeat {r + 1}/"
                        f"{bench.repeats}: {statistics.median(sps):,.0f} samples/s "
                        f"({time.perf_counter() - start:.0f} s)"
                    )
    rows = [_summarize(cfg, v, ws, runs[(v, ws, "")]) for ws in sizes for v in bench.variants]
    axis_rows = []
    for p in points[1:]:
        for ws in sizes:
            for v in bench.variants:
                row = _summarize(cfg, v, ws, runs[(v, ws, point_label(p))])
                row.update(axis=p[0], axis_value=p[1], point=point_label(p))
                row["label"] += f" [{point_label(p)}]"
                axis_rows.append(row)
    for row in rows:
        row.update(axis=None, axis_value=None, point="")
    planner = _planner_rows(cfg, bench, rows, device)
    for row, plan in zip(rows, planner):
        if "served_table_bytes_max_rank" in plan:  # the served tables sharded like W1
            row["served_bytes_max_rank"] = (
                plan["served_table_bytes_max_rank"] + row["served_mlp_bytes"]
            )
    return {
        "device": device,
        "world_sizes": sizes,
        "reference": {k: values[0] for k, values in bench.axes.items()},
        "batch_pools": pool_info,
        "rows": rows,
        "ratios": _ratios(cfg, rows),
        "planner": planner,
        "axis_rows": axis_rows,
        "axis_ratios": axis_ratios(bench, rows, axis_rows),
    }


def _draw_pools(
    cfg, bench: BenchConfig, sizes: list[int], points, tmp: Path, progress, info: dict[str, Any]
) -> dict[tuple[int, str], list[Path]]:
    """``bench.batches = 'zipf'``: the fresh batches of every (world size, point), drawn before
    any measurement; points whose data and batch count agree share one pool."""
    if bench.batches != "zipf":
        return {}
    out: dict[tuple[int, str], list[Path]] = {}
    drawn: dict[str, list[Path]] = {}
    for ws in sizes:
        for p in points:
            pcfg = point_config(cfg, bench.variants[0], bench, p)
            # With the pipeline's lookahead whatever the point's pipeline: one pool serves all.
            n = batches_needed(bench, pipelined=True)
            key = pool_key(pcfg, ws, n, bench.ids_per_bag, bench.seed)
            if key not in drawn:
                start = time.perf_counter()
                folder = tmp / f"pool{len(drawn)}"
                folder.mkdir()
                drawn[key] = write_rank_pools(pcfg, ws, n, bench.ids_per_bag, bench.seed, folder)
                seconds = time.perf_counter() - start
                info[f"world {ws} {point_label(p) or 'reference'}"] = {
                    "batches": n,
                    "global_batch": pcfg.data.batch_size,
                    "draw_seconds": seconds,
                    "file_bytes": sum(f.stat().st_size for f in drawn[key]),
                }
                progress(
                    f"batches: drew {n} fresh global batches of {pcfg.data.batch_size} for "
                    f"world {ws} ({seconds:.0f} s, untimed)"
                )
            out[(ws, point_label(p))] = drawn[key]
    return out


def axis_ratios(
    bench: BenchConfig, rows: list[dict[str, Any]], axis_rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Each axis value against the reference (the axis's first value), same variant and world
    size: throughput, W1 bytes, training state and peak memory of the busiest rank."""
    ref = {(r["variant"], r["world_size"]): r for r in rows}
    out = []
    for a in axis_rows:
        r = ref[(a["variant"], a["world_size"])]
        out.append(
            {
                "variant": a["variant"],
                "label": r["label"],
                "world_size": a["world_size"],
                "axis": a["axis"],
                "ratio": f"{a['axis']}: {a['axis_value']} / {bench.axes[a['axis']][0]}",
                "samples_per_s": a["samples_per_s"] / r["samples_per_s"],
                "samples_per_s_best": a["samples_per_s_max"] / r["samples_per_s_max"],
                "cpu_time_per_step": _ratio(
                    a["cpu_ms_per_step_max_rank"], r["cpu_ms_per_step_max_rank"]
                ),
                "w1_bytes": _ratio(a["param_bytes"]["w1"], r["param_bytes"]["w1"]),
                "training_state_bytes": _ratio(
                    a["training_state_bytes_max_rank"], r["training_state_bytes_max_rank"]
                ),
                "peak_memory": _ratio(_peak(a), _peak(r)),
                "peak_above_pre_model": _ratio(
                    a["peak_rss_above_pre_model_bytes_max_rank"],
                    r["peak_rss_above_pre_model_bytes_max_rank"],
                ),
            }
        )
    return out


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _run_samples_per_s(ranks: list[dict[str, Any]], global_batch: int) -> list[float]:
    """Global samples/s of each window of one measurement (a window lasts as long as its slowest
    rank)."""
    steps = ranks[0]["steps_per_window"]
    return [
        global_batch * steps / max(r["window_s"][w] for r in ranks)
        for w in range(len(ranks[0]["window_s"]))
    ]


def _summarize(cfg, variant: str, ws: int, runs: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """One row of results: throughput medians and the memory of the busiest rank."""
    per_run = [_run_samples_per_s(ranks, cfg.data.batch_size) for ranks in runs]
    windows = [s for run in per_run for s in run]
    run_medians = [statistics.median(run) for run in per_run]

    def max_rank(key: str) -> int:
        return max(int(statistics.median(ranks[r][key] for ranks in runs)) for r in range(ws))

    def sum_bytes(ranks: list[dict[str, Any]], key: str) -> list[int]:
        return [sum(r[key].values()) for r in ranks]

    first = runs[0]
    vcfg = variant_config(cfg, variant)
    served = sum(n * vcfg.model.embedding_dim * 4 for n in vcfg.data.num_embeddings_per_feature)
    row = {
        "variant": variant,
        "label": variant_label(cfg, variant),
        "world_size": ws,
        "threads_per_rank": first[0]["threads"],
        "samples_per_s": statistics.median(windows),
        "samples_per_s_runs": run_medians,
        "samples_per_s_min": min(windows),
        "samples_per_s_max": max(windows),
        "ms_per_step": 1e3 * cfg.data.batch_size / statistics.median(windows),
        "final_loss": first[0]["final_loss"],
        "page_fault_mib_per_step_max_rank": max(
            statistics.median(rk[r]["minor_faults_per_step"] for rk in runs) for r in range(ws)
        )
        * resource.getpagesize()
        / 2**20,
        "sys_ms_per_step_max_rank": 1e3
        * max(statistics.median(rk[r]["sys_s_per_step"] for rk in runs) for r in range(ws)),
        # Process CPU time (all threads, user + system): other jobs on a shared machine disturb
        # it much less than wall time (with one thread per rank: no spinning thread pool).
        "cpu_ms_per_step_max_rank": 1e3
        * max(statistics.median(_cpu_s(rk[r]) for rk in runs) for r in range(ws)),
        "cpu_ms_per_step_runs": [1e3 * max(_cpu_s(r) for r in rk) for rk in runs],
        "sharding": first[0]["sharding"],
        "peak_rss_bytes_max_rank": max_rank("peak_rss_bytes"),
        "rss_model_bytes_max_rank": max_rank("rss_model_bytes"),
        "rss_before_model_bytes_max_rank": max_rank("rss_before_model_bytes"),
        "param_bytes_per_rank": sum_bytes(first, "param_bytes"),
        "w1_bytes_per_rank": [r["param_bytes"]["w1"] for r in first],
        "peak_rss_bytes_per_rank": [
            int(statistics.median(rk[r]["peak_rss_bytes"] for rk in runs)) for r in range(ws)
        ],
        "pipeline": first[0].get("pipeline", "base"),
        "batches": first[0].get("batches", "uniform"),
        "batch_pool": first[0].get("batch_pool"),
        "batch_pool_bytes_max_rank": max(r.get("batch_pool_bytes", 0) for r in first),
        "rss_batches_bytes_max_rank": max_rank("rss_batches_bytes"),
        "mean_ids_per_bag": first[0].get("mean_ids_per_bag"),
        "optimizer_bytes_per_rank": sum_bytes(first, "optimizer_bytes"),
        "param_bytes": {
            k: sum(r["param_bytes"][k] for r in first) for k in first[0]["param_bytes"]
        },
        "optimizer_bytes": {
            k: sum(r["optimizer_bytes"][k] for r in first) for k in first[0]["optimizer_bytes"]
        },
        "served_table_bytes": served,
    }
    # The model's training state, replicated parts (W2, MLPs) counted once: what the model needs
    # in all; the busiest rank's share is what one device must hold.
    rank0 = first[0]
    row["training_state_bytes_model"] = (
        row["param_bytes"]["w1"]
        + row["optimizer_bytes"]["fused"]
        + sum(
            rank0["param_bytes"][k] + rank0["optimizer_bytes"][k] for k in ("projection", "dense")
        )
    )
    row["served_mlp_bytes"] = rank0["param_bytes"]["dense"]
    row["served_model_bytes"] = served + row["served_mlp_bytes"]
    row["training_state_bytes_max_rank"] = max(
        p + o for p, o in zip(row["param_bytes_per_rank"], row["optimizer_bytes_per_rank"])
    )
    row["peak_rss_above_pre_model_bytes_max_rank"] = max(
        int(
            statistics.median(
                rk[r]["peak_rss_bytes"] - rk[r]["rss_before_model_bytes"] for rk in runs
            )
        )
        for r in range(ws)
    )
    if "max_allocated_bytes" in first[0]:
        row["max_allocated_bytes_max_rank"] = max_rank("max_allocated_bytes")
        row["max_reserved_bytes_max_rank"] = max_rank("max_reserved_bytes")
    return row


def _cpu_s(rank: dict[str, Any]) -> float:
    """A rank's process CPU seconds (user + system) per timed step."""
    return rank["user_s_per_step"] + rank["sys_s_per_step"]


def _ratios(cfg, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Throughput and memory ratios of MLET vs each plain variant, per world size."""
    by = {(r["variant"], r["world_size"]): r for r in rows}
    out = []
    for ws in sorted({r["world_size"] for r in rows}):
        mlet = by.get(("mlet", ws))
        if mlet is None:
            continue
        for other in ("plain_k", "plain_d"):
            o = by.get((other, ws))
            if o is None:
                continue
            out.append(
                {
                    "world_size": ws,
                    "ratio": f"{mlet['label']} / {o['label']}",
                    "samples_per_s": mlet["samples_per_s"] / o["samples_per_s"],
                    # Best windows: on a shared machine the least disturbed ones.
                    "samples_per_s_best": mlet["samples_per_s_max"] / o["samples_per_s_max"],
                    "training_state_bytes": mlet["training_state_bytes_max_rank"]
                    / o["training_state_bytes_max_rank"],
                    "peak_memory": _peak(mlet) / _peak(o),
                }
            )
    return out


def _peak(row: dict[str, Any]) -> int:
    return row.get("max_allocated_bytes_max_rank", row["peak_rss_bytes_max_rank"])


def _planner_rows(
    cfg, bench: BenchConfig, rows: list[dict[str, Any]], device: str
) -> list[dict[str, Any]]:
    """The dry-run memory estimates (ours and TorchRec's planner's) next to the measured memory
    (of the reference point's rows)."""
    from mlet_dist.distributed.planning import dry_run  # torchrec: only when reporting

    out = []
    for row in rows:
        vcfg = point_config(cfg, row["variant"], bench, None)
        try:
            report = dry_run(vcfg, row["world_size"], device)
        except Exception as e:  # a planner failure is a result to report, not a crash
            out.append({"label": row["label"], "world_size": row["world_size"], "error": str(e)})
            continue
        ranks = report["ranks"]
        kind = "planner_hbm_bytes" if device == "cuda" else "planner_ddr_bytes"
        est = max(r["training_bytes"] for r in ranks)
        planner = max(r.get(kind, 0) for r in ranks)
        measured_state = row["training_state_bytes_max_rank"]
        measured_peak = (
            row["max_allocated_bytes_max_rank"]
            if device == "cuda"
            else row["peak_rss_above_pre_model_bytes_max_rank"]
        )
        out.append(
            {
                "label": row["label"],
                "variant": row["variant"],
                "world_size": row["world_size"],
                "estimate_training_bytes_max_rank": est,
                "planner_storage_bytes_max_rank": planner,
                "measured_state_bytes_max_rank": measured_state,
                "measured_peak_bytes_max_rank": measured_peak,
                "measured_peak_kind": "max allocated"
                if device == "cuda"
                else "peak RSS - RSS before model",
                "estimate_over_measured_state": est / measured_state if measured_state else None,
                "planner_over_measured_peak": planner / measured_peak if measured_peak else None,
                "served_bytes_total": report["totals"]["served_bytes"],
                "served_table_bytes_max_rank": report["totals"]["max_rank_served_bytes"],
                "sharding_types": sorted({t["sharding_type"] for t in report["tables"]}),
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_bench")
    parser.add_argument("--worker", required=True, help="spec JSON written by the launcher")
    parser.add_argument("--result", required=True, help="where this rank writes its result")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")  # TorchRec's deprecation and dry-run notices, every rank
    worker(args.worker, args.result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
