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
import json
import logging
import resource
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import (
    BenchConfig,
    BenchmarkError,
    current_rss_bytes,
    local_tensor_bytes,
    peak_rss_bytes,
    random_batches,
    spawn_ranks,
    train_step,
    variant_config,
    variant_label,
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
    cfg, variant: str, world_size: int, bench: BenchConfig, threads: int, workdir: Path
) -> list[dict[str, Any]]:
    """Runs one measurement of ``variant`` on ``world_size`` fresh rank processes.

    Returns:
        The result dict of every rank (see :func:`worker`), by rank.

    Raises:
        BenchmarkError: a rank failed or timed out (its log tail is in the message).
    """
    spec = workdir / f"spec_{variant}_{world_size}.json"
    spec.write_text(
        json.dumps(
            {
                "config": variant_config(cfg, variant).to_dict(),
                "variant": variant,
                "bench": dataclasses.asdict(bench),
            }
        )
    )
    outs = [workdir / f"result_{variant}_{world_size}_{r}.json" for r in range(world_size)]
    for o in outs:
        o.unlink(missing_ok=True)
    spawn_ranks(
        lambda r: ["-m", "benchmarks.train_bench", "--worker", str(spec), "--result", str(outs[r])],
        world_size,
        threads,
        bench.timeout_s,
        workdir / f"log_{variant}_{world_size}",
        what=f"measuring {variant} on {world_size} rank(s)",
        extra_env=bench.env,
    )
    missing = [r for r, o in enumerate(outs) if not o.is_file()]
    if missing:
        raise BenchmarkError(f"measuring {variant}: ranks {missing} wrote no result")
    return [json.loads(o.read_text()) for o in outs]


def worker(spec_path: str, result_path: str) -> None:
    """One rank of a measurement: build, warm up, time windows, count memory, write JSON."""
    rss_start = current_rss_bytes()
    import torch  # after rss_start (and in the rank processes only): the RSS baseline excludes it

    from mlet_dist.config import config_from_dict
    from mlet_dist.distributed.parallelize import init_distributed
    from mlet_dist.train import Trainer

    spec = json.loads(Path(spec_path).read_text())
    cfg = config_from_dict(spec["config"])
    bench = BenchConfig(**spec["bench"])
    env = init_distributed(cfg.dist)
    cuda = env.device.type == "cuda"
    rss_before_model = current_rss_bytes()
    trainer = Trainer(cfg, env)
    rss_model = current_rss_bytes()
    local_batch = cfg.data.batch_size // env.world_size
    batches = [
        b.to(env.device)
        for b in random_batches(
            cfg, bench.distinct_batches, local_batch, bench.seed * 1000 + env.rank
        )
    ]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(env.device)

    step = 0
    for _ in range(bench.warmup_steps):
        train_step(trainer, batches[step % len(batches)])
        step += 1
    sync()
    torch.distributed.barrier()
    window_s = []
    usage = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(bench.windows):
        start = time.perf_counter()
        for _ in range(bench.steps_per_window):
            loss = train_step(trainer, batches[step % len(batches)])
            step += 1
        sync()
        window_s.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    timed_steps = bench.windows * bench.steps_per_window
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
    """Measures every (world size, variant), ``bench.repeats`` times interleaved.

    Args:
        cfg: the base config (MLET k -> d); see :func:`benchmarks.common.variant_config`.
        bench: what to measure and how often.
        cores: CPU cores of the machine (threads per rank = cores // ranks by default).
        progress: called with one line per measurement.

    Returns:
        ``{"device", "rows": [one per (variant, world size)], "ratios": [...], "planner": [...]}``
        (see the keys in :func:`_summarize`).
    """
    device = resolve_device(cfg)
    sizes = world_sizes(bench, device)
    runs: dict[tuple[str, int], list[list[dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory(prefix="mlet_bench_") as tmp:
        for ws in sizes:
            threads = threads_per_rank(bench, ws, cores)
            for r in range(bench.repeats):
                order = (
                    bench.variants[r % len(bench.variants) :]
                    + bench.variants[: r % len(bench.variants)]
                )
                for v in order:
                    start = time.perf_counter()
                    ranks = launch(cfg, v, ws, bench, threads, Path(tmp))
                    runs.setdefault((v, ws), []).append(ranks)
                    sps = _run_samples_per_s(ranks, cfg.data.batch_size)
                    progress(
                        f"train {variant_label(cfg, v):>12s} world {ws} repeat {r + 1}/"
                        f"{bench.repeats}: {statistics.median(sps):,.0f} samples/s "
                        f"({time.perf_counter() - start:.0f} s)"
                    )
    rows = [_summarize(cfg, v, ws, runs[(v, ws)]) for ws in sizes for v in bench.variants]
    planner = _planner_rows(cfg, rows, device)
    for row, plan in zip(rows, planner):
        if "served_table_bytes_max_rank" in plan:  # the served tables sharded like W1
            row["served_bytes_max_rank"] = (
                plan["served_table_bytes_max_rank"] + row["served_mlp_bytes"]
            )
    return {
        "device": device,
        "world_sizes": sizes,
        "rows": rows,
        "ratios": _ratios(cfg, rows),
        "planner": planner,
    }


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
        "sharding": first[0]["sharding"],
        "peak_rss_bytes_max_rank": max_rank("peak_rss_bytes"),
        "rss_model_bytes_max_rank": max_rank("rss_model_bytes"),
        "rss_before_model_bytes_max_rank": max_rank("rss_before_model_bytes"),
        "param_bytes_per_rank": sum_bytes(first, "param_bytes"),
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


def _planner_rows(cfg, rows: list[dict[str, Any]], device: str) -> list[dict[str, Any]]:
    """The dry-run memory estimates (ours and TorchRec's planner's) next to the measured memory."""
    from mlet_dist.distributed.planning import dry_run  # torchrec: only when reporting

    out = []
    for row in rows:
        vcfg = variant_config(cfg, row["variant"])
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
