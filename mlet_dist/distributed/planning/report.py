"""The dry-run report: tables' placement and per-rank training and serving memory of a plan."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_configs import DATA_TYPE_NUM_BITS

from mlet_dist.config import Config
from mlet_dist.distributed.planning.memory import (
    SERVED_BYTES,
    replicated_bytes,
    served_cols,
    table_shards,
)
from mlet_dist.distributed.planning.plan import (
    PlannerStats,
    device_cap,
    make_plan,
    meta_model,
    plan_target,
)
from mlet_dist.distributed.sharding import embedding_tables
from mlet_dist.modules.mlet import inner_dim_of
from mlet_dist.optim import fused_state_bytes
from mlet_dist.utils.files import atomic_write_json


def plan_report(
    cfg: Config,
    plan: ShardingPlan,
    world_size: int,
    device: str = "auto",
    *,
    local_world_size: int | None = None,
    batch_size_per_rank: int | None = None,
    stats: PlannerStats | None = None,
) -> dict[str, Any]:
    """Tables' placement and per-rank training and serving memory of a plan (JSON-ready).

    Training memory per rank = W1 shards (the tables' data_type: model.w1_dtype, 4 or 2 bytes per
    element) + their fused optimizer state, fp32 whatever W1's dtype (rowwise_adagrad: 4 bytes
    per shard row; adagrad: 4 bytes per element; sgd: 0; adam: 8 bytes per element) +
    the replicated W2 and MLPs (parameters + gradients + dense optimizer state). Not counted:
    activations, all-to-all buffers, allocator and CUDA context overhead. Serving memory is the
    collapsed vocab × d fp32 table, per rank as if it were sharded like W1.

    Args:
        cfg: the config the plan was made for.
        plan: from :func:`make_plan`.
        world_size, device, local_world_size, batch_size_per_rank: as given to make_plan.
        stats: the planner's own estimates from make_plan, if collected.

    Returns:
        {"target", "model", "dist", "tables": [...], "ranks": [...], "totals": {...}}; bytes are
        ints, ``totals["fits"]`` compares the busiest rank's training bytes with the device cap.
    """
    target = plan_target(cfg, world_size, device, local_world_size, batch_size_per_rank)
    model = meta_model(cfg)
    tables = {t.name: t for t in embedding_tables(model)}
    replicated = replicated_bytes(cfg.optim, model)
    replicated_total = sum(replicated.values())
    optimizer = cfg.optim.embedding_optimizer
    ranks = [
        {"rank": r, "w1_bytes": 0, "w1_optimizer_bytes": 0, "served_bytes": 0, "num_shards": 0}
        for r in range(target.world_size)
    ]
    table_rows = []
    for module_path, module_plan in plan.plan.items():
        for name, ps in module_plan.items():  # type: ignore[union-attr]
            t = tables[name]
            d = t.embedding_dim
            k = inner_dim_of(t) or d
            elem = DATA_TYPE_NUM_BITS[t.data_type] // 8
            shards = table_shards(ps, t, k)
            w1 = opt = served = 0
            for s in shards:
                rows, cols = s["sizes"]
                s_w1 = rows * cols * elem
                s_opt = fused_state_bytes(optimizer, rows, cols)
                s_served = rows * served_cols(s["offsets"][1], cols, k, d) * SERVED_BYTES
                s.update(w1_bytes=s_w1, optimizer_bytes=s_opt, served_bytes=s_served)
                rank = ranks[s["rank"]]
                rank["w1_bytes"] += s_w1
                rank["w1_optimizer_bytes"] += s_opt
                rank["served_bytes"] += s_served
                rank["num_shards"] += 1
                w1, opt, served = w1 + s_w1, opt + s_opt, served + s_served
            table_rows.append(
                {
                    "module": module_path,
                    "name": name,
                    "num_embeddings": t.num_embeddings,
                    "inner_dim": inner_dim_of(t),
                    "embedding_dim": d,
                    "sharding_type": ps.sharding_type,
                    "compute_kernel": ps.compute_kernel,
                    "ranks": sorted(set(ps.ranks or [s["rank"] for s in shards])),
                    "shards": shards,
                    "w1_bytes": w1,
                    "w1_optimizer_bytes": opt,
                    "served_bytes": served,
                }
            )
    for rank in ranks:
        rank.update(replicated)
        rank["training_bytes"] = rank["w1_bytes"] + rank["w1_optimizer_bytes"] + replicated_total
        if stats is not None and stats.hbm_per_rank:
            rank["planner_hbm_bytes"] = stats.hbm_per_rank[rank["rank"]]
            rank["planner_ddr_bytes"] = stats.ddr_per_rank[rank["rank"]]
    busiest = max(ranks, key=lambda r: r["training_bytes"])
    cap = device_cap(cfg.dist, target)
    w1_total = sum(r["w1_bytes"] for r in ranks)
    opt_total = sum(r["w1_optimizer_bytes"] for r in ranks)
    served_total = sum(r["served_bytes"] for r in ranks)
    max_served = max(r["served_bytes"] for r in ranks)
    totals: dict[str, Any] = {
        "w1_bytes": w1_total,
        "w1_optimizer_bytes": opt_total,
        "replicated_bytes_per_rank": replicated_total,
        "served_bytes": served_total,
        "tables_training_over_serving": (w1_total + opt_total) / served_total,
        "max_rank_training_bytes": busiest["training_bytes"],
        "max_rank": busiest["rank"],
        "max_rank_served_bytes": max_served,
        "max_rank_training_over_serving": busiest["training_bytes"] / max_served
        if max_served
        else None,
        "device_cap_bytes": cap,
        "fits": busiest["training_bytes"] <= cap,
        "headroom_bytes": cap - busiest["training_bytes"],
    }
    if stats is not None:
        totals.update(
            planner_usable_bytes_per_rank=stats.usable_per_rank,
            planner_max_rank_bytes=max(getattr(stats, f"{target.memory_kind}_per_rank") or [0]),
            planner_num_proposals=stats.num_proposals,
            planner_num_plans=stats.num_plans,
            planner_run_time_s=stats.run_time_s,
        )
    return {
        "target": {**dataclasses.asdict(target), "memory_kind": target.memory_kind},
        "model": {
            "embedding_dim": cfg.model.embedding_dim,
            "inner_dim": cfg.model.inner_dim,
            "inner_dim_per_table": dict(cfg.model.inner_dim_per_table),
            "inner_dim_min_rows": cfg.model.inner_dim_min_rows,
            "w1_dtype": cfg.model.w1_dtype,
            "num_tables": len(tables),
            "embedding_optimizer": optimizer,
            "dense_optimizer": cfg.optim.dense_optimizer,
        },
        "dist": dataclasses.asdict(cfg.dist),
        "tables": table_rows,
        "ranks": ranks,
        "totals": totals,
    }


def dry_run(
    cfg: Config,
    world_size: int,
    device: str = "auto",
    *,
    local_world_size: int | None = None,
    batch_size_per_rank: int | None = None,
) -> dict[str, Any]:
    """:func:`make_plan` then :func:`plan_report`, with the wall time of the whole dry run."""
    start = time.perf_counter()
    stats = PlannerStats()
    kwargs = dict(local_world_size=local_world_size, batch_size_per_rank=batch_size_per_rank)
    plan = make_plan(cfg, world_size, device, stats=stats, **kwargs)
    report = plan_report(cfg, plan, world_size, device, stats=stats, **kwargs)
    report["totals"]["dry_run_s"] = time.perf_counter() - start
    return report


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    atomic_write_json(path, report)
    return path
