"""Dry-run planning: where a config's tables would go on a cluster, and how much memory each rank needs.

``mlet-dist plan`` runs TorchRec's ``EmbeddingShardingPlanner.plan`` (the single-process call, not
``collective_plan``: no process group is needed) on the model built entirely on the meta device,
with the same sharder, constraints, topology and storage reservation as training
(:func:`mlet_dist.distributed.parallelize.parallelize`), for a cluster that need not exist here:
16 CUDA GPUs of 80 GB can be planned on a CPU laptop. Nothing is allocated.

The memory report is computed here from the plan's shard shapes (W1, fused optimizer state, the
replicated W2 and MLPs with their gradients and optimizer state), because the planner's own
per-shard storage (``ShardingOption`` / ``Shard.storage``) is only exposed through the ``Stats``
hook. The planner counts the fused optimizer state because W1's parameters are annotated with
the optimizer class (:func:`annotate_fused_optimizer`). Both figures are reported.

Example::

    cfg = load_config("configs/criteo_1tb.toml")
    report = dry_run(cfg, world_size=16, device="cuda")  # cfg.dist.hbm_cap_gb = 80 for 80 GB
    print(format_report(report))
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import (
    Enumerator,
    ParameterConstraints,
    PlanDebugStats,
    PlannerError,
    ShardingOption,
    Stats,
    StorageReservation,
)
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingType
from torchrec.modules.embedding_configs import DATA_TYPE_NUM_BITS, EmbeddingBagConfig

from mlet_dist.config import Config, ConfigError
from mlet_dist.distributed.parallelize import (
    DistEnv,
    MLETEmbeddingBagCollectionSharder,
    annotate_fused_optimizer,
    build_constraints,
    check_plan,
    embedding_tables,
    fused_params,
    make_topology,
)
from mlet_dist.errors import MletError
from mlet_dist.models.dlrm import build_dlrm
from mlet_dist.modules.mlet import inner_dim_of
from mlet_dist.utils.files import atomic_write_json

GIB = 1024**3
# TorchRec's default (EmbeddingShardingPlanner's heuristical_storage_reservation_percentage):
# the share of each device the planner keeps free as a margin, on top of dense and KJT storage.
RESERVED_FRACTION = 0.15
# GPUs per node when not given (the usual 8-GPU host).
DEFAULT_GPUS_PER_NODE = 8
# Optimizer state in units of the parameter size (fp32 state, as fbgemm and torch.optim keep it).
# Row-wise Adagrad is not a multiple: one float per row of each shard (see _fused_state_bytes).
FUSED_STATE_MULTIPLIER = {"adagrad": 1, "sgd": 0, "adam": 2}
DENSE_STATE_MULTIPLIER = {"adagrad": 1, "sgd": 0, "adam": 2}
STATE_BYTES = 4
# Plans tried per kind of fix (more ranks, larger cap) when no plan fits.
SUGGESTION_TRIES = 4
SERVED_BYTES = 4  # the collapsed table served in fp32 (int8/fp16 serving is 4x/2x smaller)
SPLITTING_TYPES = tuple(
    t.value
    for t in (
        ShardingType.ROW_WISE,
        ShardingType.COLUMN_WISE,
        ShardingType.TABLE_ROW_WISE,
        ShardingType.TABLE_COLUMN_WISE,
        ShardingType.GRID_SHARD,
    )
)


class PlanningError(MletError, ValueError):
    """No sharding plan fits; the message names the tables, the memory needed and the fix."""


@dataclass(frozen=True)
class PlanTarget:
    """The cluster a dry run plans for."""

    world_size: int
    """Ranks (one per GPU, or per CPU process)."""
    device: str
    """Compute device kind: 'cuda' or 'cpu'."""
    local_world_size: int
    """Ranks per node."""
    batch_size_per_rank: int
    """The planner's batch size (its cost model and KJT reservation)."""

    @property
    def memory_kind(self) -> str:
        """The planner's storage tier holding the tables: 'hbm' on GPU, 'ddr' on CPU."""
        return "hbm" if self.device == "cuda" else "ddr"


def plan_target(
    cfg: Config,
    world_size: int,
    device: str = "auto",
    local_world_size: int | None = None,
    batch_size_per_rank: int | None = None,
) -> PlanTarget:
    """Validates and completes the description of the cluster to plan for.

    Args:
        cfg: the run's config (``data.batch_size`` is the global batch; ``dist.device`` is used
            when ``device`` is 'auto').
        world_size: number of ranks.
        device: 'cuda', 'cpu' or 'auto' (``dist.device``, then cuda if visible here).
        local_world_size: ranks per node; default 8 on cuda (capped at world_size), world_size
            on cpu.
        batch_size_per_rank: default ``data.batch_size // world_size`` as in training.
    """
    if world_size < 1:
        raise ConfigError(f"--world-size must be at least 1, got {world_size}")
    if device == "auto":
        device = cfg.dist.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"device must be 'cuda' or 'cpu', got {device!r}")
    if local_world_size is None:
        local_world_size = (
            min(DEFAULT_GPUS_PER_NODE, world_size) if device == "cuda" else world_size
        )
    if local_world_size < 1 or world_size % local_world_size:
        raise ConfigError(
            f"--local-world-size {local_world_size} must divide --world-size {world_size} "
            f"(ranks per node, e.g. 8 for 8-GPU hosts)"
        )
    if batch_size_per_rank is None:
        if cfg.data.batch_size % world_size:
            raise ConfigError(
                f"data.batch_size = {cfg.data.batch_size} is not divisible by the world size "
                f"{world_size}; use a multiple of {world_size} or give --batch-size (per rank)"
            )
        batch_size_per_rank = cfg.data.batch_size // world_size
    if batch_size_per_rank < 1:
        raise ConfigError(f"--batch-size must be positive, got {batch_size_per_rank}")
    return PlanTarget(world_size, device, local_world_size, batch_size_per_rank)


@dataclass
class PlannerStats(Stats):
    """Collects what the planner itself estimated, through TorchRec's public ``Stats`` hook.

    Filled by :func:`make_plan`: per-rank storage of the chosen shards (W1 plus the planner's
    input/output buffer estimate on GPU and the fused optimizer state),
    the usable capacity per rank after the planner's reservation, proposals and time.
    """

    hbm_per_rank: list[int] = field(default_factory=list)
    ddr_per_rank: list[int] = field(default_factory=list)
    cap_per_rank: int = 0
    usable_per_rank: int | None = None
    num_proposals: int = 0
    num_plans: int = 0
    run_time_s: float = 0.0

    def log(
        self,
        sharding_plan: ShardingPlan,
        topology: Topology,
        batch_size: int,
        storage_reservation: StorageReservation,
        num_proposals: int,
        num_plans: int,
        run_time: float,
        best_plan: list[ShardingOption],
        constraints: dict[str, ParameterConstraints] | None = None,
        sharders: list[ModuleSharder[nn.Module]] | None = None,
        enumerator: Enumerator | None = None,
        debug: bool = False,
        debug_stats: PlanDebugStats | None = None,
    ) -> None:
        self.num_proposals, self.num_plans, self.run_time_s = num_proposals, num_plans, run_time
        if not sharding_plan.plan:  # the no-plan path logs a proposal with ranks = -1
            return
        self.hbm_per_rank = [0] * topology.world_size
        self.ddr_per_rank = [0] * topology.world_size
        for option in best_plan:
            for shard in option.shards:
                if shard.rank is not None and shard.storage is not None:
                    self.hbm_per_rank[shard.rank] += shard.storage.hbm
                    self.ddr_per_rank[shard.rank] += shard.storage.ddr


@contextmanager
def _quiet_planner() -> Iterator[None]:
    """Silences TorchRec warnings that say nothing about this plan.

    Why: every plan logs that the Topology was built directly and that the heuristical storage
    reservation may over-estimate dense tensors in dry runs; training plans exactly the same way
    (the dense parameters' sizes are exact on meta), so they are noise here.
    """
    planner_logger = logging.getLogger("torchrec.distributed.planner")
    level = planner_logger.level
    planner_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        planner_logger.setLevel(level)


def _meta_model(cfg: Config) -> nn.Module:
    meta = torch.device("meta")
    return build_dlrm(
        cfg.model, cfg.data.num_embeddings_per_feature, embedding_device=meta, dense_device=meta
    )


def make_plan(
    cfg: Config,
    world_size: int,
    device: str = "auto",
    *,
    local_world_size: int | None = None,
    batch_size_per_rank: int | None = None,
    stats: PlannerStats | None = None,
) -> ShardingPlan:
    """Plans the config's model for a cluster with TorchRec's planner, without allocating it.

    Uses the same sharder, fused optimizer, constraints and topology (``dist.hbm_cap_gb``,
    ``dist.ddr_cap_gb``, ``dist.sharding_types``, ``dist.min_partition``) as training, and
    :func:`check_plan`.

    Args:
        cfg: the run's config.
        world_size, device, local_world_size, batch_size_per_rank: see :func:`plan_target`.
        stats: filled with the planner's own estimates (see :class:`PlannerStats`).

    Returns:
        The ShardingPlan (keyed by module path, then table name).

    Raises:
        PlanningError: no plan fits; names the tables, memory needed vs available, and the fix.
        ConfigError: invalid target or config (e.g. 'adam' on cpu).

    Example::

        plan = make_plan(cfg, world_size=8, device="cuda")
        plan.plan["model.sparse_arch.embedding_bag_collection.w1"]["t_cat_0"].sharding_type
    """
    target = plan_target(cfg, world_size, device, local_world_size, batch_size_per_rank)
    stats = stats if stats is not None else PlannerStats()
    model = _meta_model(cfg)
    tables = embedding_tables(model)
    try:
        plan = _run_planner(cfg, target, model, tables, stats)
    except PlannerError as e:
        raise _no_plan_error(cfg, target, model, tables, stats, e) from e
    check_plan(plan, tables)
    return plan


def _run_planner(
    cfg: Config,
    target: PlanTarget,
    model: nn.Module,
    tables: list[EmbeddingBagConfig],
    stats: PlannerStats,
) -> ShardingPlan:
    """One ``EmbeddingShardingPlanner.plan`` call set up as :func:`parallelize` sets it up."""
    device = torch.device(target.device)
    sharder = MLETEmbeddingBagCollectionSharder(fused_params=fused_params(cfg.optim, device))
    annotate_fused_optimizer(model, cfg.optim)
    with _quiet_planner():
        topology = _topology(cfg, target)
        stats.cap_per_rank = getattr(topology.devices[0].storage, target.memory_kind)
        # The planner's default reservation, built here so that its public
        # `last_reserved_topology` tells the capacity left for the tables (also after a failure).
        reservation = HeuristicalStorageReservation(percentage=RESERVED_FRACTION)
        planner = EmbeddingShardingPlanner(
            topology=topology,
            batch_size=target.batch_size_per_rank,
            constraints=build_constraints(tables, cfg.dist),
            storage_reservation=reservation,
            stats=[stats],
        )
        try:
            return planner.plan(model, [sharder])
        finally:
            reserved = reservation.last_reserved_topology
            stats.usable_per_rank = (
                getattr(reserved.devices[0].storage, target.memory_kind) if reserved else None
            )


# -- memory accounting --------------------------------------------------------------------------


def _fused_state_bytes(optimizer: str, rows: int, cols: int) -> int:
    """Fused (fbgemm) optimizer state of one W1 shard of rows × cols."""
    if optimizer == "rowwise_adagrad":
        return rows * STATE_BYTES  # one fp32 accumulator per row of each shard
    return FUSED_STATE_MULTIPLIER[optimizer] * rows * cols * STATE_BYTES


def _served_cols(col_offset: int, cols: int, k: int, d: int) -> int:
    """Columns of the d-wide served table matching W1 columns [c0, c0+cols) of k.

    A column split of W1 into pieces maps to the same split of the served table scaled by d/k;
    floors of the boundaries make the pieces of a table add up to exactly d.
    """
    return (col_offset + cols) * d // k - col_offset * d // k


def _table_shards(ps: Any, table: EmbeddingBagConfig, k: int) -> list[dict[str, Any]]:
    """[{rank, offsets, sizes}] of one table's ParameterSharding (data_parallel: a full copy on
    each rank)."""
    if ps.sharding_spec is None:
        return [
            {"rank": r, "offsets": [0, 0], "sizes": [table.num_embeddings, k]} for r in ps.ranks
        ]
    return [
        {
            "rank": s.placement.rank(),
            "offsets": list(s.shard_offsets),
            "sizes": list(s.shard_sizes),
        }
        for s in ps.sharding_spec.shards
    ]


def _compress_ranks(ranks: list[int]) -> str:
    """[0, 1, 2, 3, 7] -> '0-3,7'."""
    parts: list[str] = []
    for r in sorted(set(ranks)):
        if parts and "-" in parts[-1] and int(parts[-1].split("-")[1]) == r - 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{r}"
        elif parts and "-" not in parts[-1] and int(parts[-1]) == r - 1:
            parts[-1] = f"{parts[-1]}-{r}"
        else:
            parts.append(str(r))
    return ",".join(parts)


def _replicated_bytes(cfg: Config, model: nn.Module) -> dict[str, int]:
    """Per-rank memory of the data-parallel parameters: W2 and the MLPs, each with its gradient
    and its dense optimizer state (fp32)."""
    w2 = mlp = 0
    for name, p in model.named_parameters():
        if ".w1." in name:
            continue
        if ".projection." in name:
            w2 += p.numel() * p.element_size()
        else:
            mlp += p.numel() * p.element_size()
    mult = DENSE_STATE_MULTIPLIER[cfg.optim.dense_optimizer]
    return {
        "w2_bytes": w2,
        "w2_grad_bytes": w2,
        "w2_optimizer_bytes": mult * w2,
        "mlp_bytes": mlp,
        "mlp_grad_bytes": mlp,
        "mlp_optimizer_bytes": mult * mlp,
    }


def _topology(cfg: Config, target: PlanTarget) -> Topology:
    """The planner's Topology for the target, built by training's own :func:`make_topology`."""
    env = DistEnv(
        rank=0,
        world_size=target.world_size,
        local_rank=0,
        local_world_size=target.local_world_size,
        device=torch.device(target.device),
        backend="",
    )
    with _quiet_planner():
        return make_topology(cfg.dist, env)


def _device_cap(cfg: Config, target: PlanTarget) -> int:
    """Bytes per rank of the target's memory tier (HBM on cuda, DDR on cpu) as planned."""
    return getattr(_topology(cfg, target).devices[0].storage, target.memory_kind)


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

    Training memory per rank = W1 shards (table dtype, fp32 by default) + their fused optimizer
    state (rowwise_adagrad: 4 bytes per shard row; adagrad: 1x the shard; sgd: 0; adam: 2x) +
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
    model = _meta_model(cfg)
    tables = {t.name: t for t in embedding_tables(model)}
    replicated = _replicated_bytes(cfg, model)
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
            shards = _table_shards(ps, t, k)
            w1 = opt = served = 0
            for s in shards:
                rows, cols = s["sizes"]
                s_w1 = rows * cols * elem
                s_opt = _fused_state_bytes(optimizer, rows, cols)
                s_served = rows * _served_cols(s["offsets"][1], cols, k, d) * SERVED_BYTES
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
    cap = _device_cap(cfg, target)
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


# -- errors and formatting ----------------------------------------------------------------------


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f} GiB"


def _plans_with(
    cfg: Config,
    target: PlanTarget,
    model: nn.Module,
    tables: list[EmbeddingBagConfig],
    world_size: int | None = None,
    cap_gb: float | None = None,
) -> bool:
    """Whether the planner finds a plan with another world size or per-rank cap."""
    cfg = copy.deepcopy(cfg)
    if cap_gb is not None:
        setattr(cfg.dist, f"{target.memory_kind}_cap_gb", cap_gb)
    if world_size is not None:
        single_host = target.local_world_size == target.world_size and target.device == "cpu"
        target = dataclasses.replace(
            target,
            world_size=world_size,
            local_world_size=world_size if single_host else target.local_world_size,
        )
    try:
        _run_planner(cfg, target, model, tables, PlannerStats())
    except PlannerError:
        return False
    return True


def _no_plan_error(
    cfg: Config,
    target: PlanTarget,
    model: nn.Module,
    tables: list[EmbeddingBagConfig],
    stats: PlannerStats,
    error: PlannerError,
) -> PlanningError:
    """Turns TorchRec's PlannerError into a message naming the tables, memory needed vs
    available, and a fix checked with the planner (a few more plans, about a second each)."""
    optimizer = cfg.optim.embedding_optimizer
    need = {}
    for t in tables:
        k = inner_dim_of(t) or t.embedding_dim
        elem = DATA_TYPE_NUM_BITS[t.data_type] // 8
        need[t.name] = (
            t.num_embeddings * k * elem + _fused_state_bytes(optimizer, t.num_embeddings, k),
            t.num_embeddings,
            k,
        )
    total = sum(b for b, _, _ in need.values())
    ws, kind, cap, usable = (
        target.world_size,
        target.memory_kind,
        stats.cap_per_rank,
        stats.usable_per_rank,
    )
    flag, key = (
        ("--hbm-gb", "dist.hbm_cap_gb") if kind == "hbm" else ("--ddr-gb", "dist.ddr_cap_gb")
    )
    largest = sorted(need.items(), key=lambda kv: -kv[1][0])[:5]
    lines = [
        f"no sharding plan fits the {len(tables)} embedding tables on {ws} {target.device} "
        f"rank(s) with {_gib(cap)} of {kind.upper()} each.",
        f"The tables need {_gib(total)} (W1 + {optimizer} state); largest: "
        + ", ".join(f"{n} ({rows:,} x {k}: {_gib(b)})" for n, (b, rows, k) in largest)
        + ".",
    ]
    if usable is None or usable <= 0:
        lines.append(
            f"TorchRec's reservation ({RESERVED_FRACTION:.0%} of each rank plus the dense "
            f"parameters and input buffers at batch {target.batch_size_per_rank}/rank) already "
            f"takes all of the {_gib(cap)} per rank."
        )
        fixed = cap * (1 - RESERVED_FRACTION)
        ranks_may_help = False
    else:
        lines.append(
            f"Available for tables: {_gib(usable * ws)} = {ws} x {_gib(usable)} per rank "
            f"({_gib(cap)} minus TorchRec's reservation: {RESERVED_FRACTION:.0%}, dense "
            f"parameters, input buffers); the planner also adds per-shard input/output buffers."
        )
        fixed = cap * (1 - RESERVED_FRACTION) - usable  # dense + KJT reservation per rank
        allowed = cfg.dist.sharding_types
        too_big = [n for n, (b, _, _) in need.items() if b > usable]
        ranks_may_help = not (too_big and allowed and not set(allowed) & set(SPLITTING_TYPES))
        if not ranks_may_help:
            lines.append(
                f"Tables {too_big} are larger than one rank's usable memory and "
                f"dist.sharding_types = {allowed} cannot split them: allow 'row_wise' or "
                f"'column_wise'."
            )
    # Lower bounds from the totals, then the first candidates the planner accepts. More ranks
    # cannot help when the per-rank reservation alone exceeds the cap or no table may be split.
    fixes = []
    if ranks_may_help:
        single_host = target.local_world_size == ws and target.device == "cpu"
        step = 1 if single_host else target.local_world_size
        first = max(ws + step, math.ceil(math.ceil(total / usable) / step) * step)
        for n in range(first, first + SUGGESTION_TRIES * step, step):
            if _plans_with(cfg, target, model, tables, world_size=n):
                fixes.append(f"{n} ranks (--world-size {n})")
                break
        else:
            fixes.append(f"more than {first + (SUGGESTION_TRIES - 1) * step} ranks")
    gb = max(
        math.floor(cap / GIB) + 1,
        math.ceil((total / ws + fixed) / (1 - RESERVED_FRACTION) / GIB),
    )
    for _ in range(SUGGESTION_TRIES):
        if _plans_with(cfg, target, model, tables, cap_gb=gb):
            fixes.append(f"{gb} GB per rank ({flag} {gb}, i.e. {key} = {gb})")
            break
        last, gb = gb, math.ceil(gb * 1.25)
    else:
        fixes.append(f"more than {last} GB per rank ({flag} / {key})")
    lines.append(
        f"Fix (checked with the planner at batch {target.batch_size_per_rank}/rank): "
        + " or ".join(fixes)
        + "; or a smaller model.inner_dim (k)."
    )
    lines.append(f"(TorchRec: {str(error).strip().splitlines()[0]})")
    return PlanningError("\n".join(lines))


def _shards_summary(shards: list[dict[str, Any]]) -> str:
    shapes = [tuple(s["sizes"]) for s in shards]
    if len(set(shapes)) == 1:
        rows, cols = shapes[0]
        return f"{len(shapes)} x [{rows:,}, {cols}]"
    return " ".join(f"[{r:,},{c}]" for r, c in shapes)


def _table_text(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def format_report(report: dict[str, Any]) -> str:
    """The report as readable text: tables, per-rank memory, totals."""
    tg, tot, m = report["target"], report["totals"], report["model"]
    kind = tg["memory_kind"].upper()
    out = [
        f"Sharding plan: {m['num_tables']} tables (d={m['embedding_dim']}, "
        f"k={m['inner_dim'] or 'none (single-layer)'}) on {tg['world_size']} x {tg['device']} "
        f"({tg['local_world_size']} per node), {kind} cap {_gib(tot['device_cap_bytes'])} per "
        f"rank, batch {tg['batch_size_per_rank']}/rank, W1 optimizer {m['embedding_optimizer']}",
        "",
    ]
    rows = [
        [
            t["name"],
            f"{t['num_embeddings']:,}",
            str(t["inner_dim"] or "-"),
            str(t["embedding_dim"]),
            t["sharding_type"],
            t["compute_kernel"],
            _compress_ranks(t["ranks"]),
            _shards_summary(t["shards"]),
            _gib(t["w1_bytes"] + t["w1_optimizer_bytes"]),
        ]
        for t in report["tables"]
    ]
    out += _table_text(
        ["table", "rows", "k", "d", "sharding", "kernel", "ranks", "shards", "W1+opt"],
        rows,
        right={1, 2, 3, 8},
    )
    out.append("")
    planner = "planner_hbm_bytes" if kind == "HBM" else "planner_ddr_bytes"
    rank_rows = []
    for r in report["ranks"]:
        repl = r["training_bytes"] - r["w1_bytes"] - r["w1_optimizer_bytes"]
        rank_rows.append(
            [
                str(r["rank"]),
                str(r["num_shards"]),
                _gib(r["w1_bytes"]),
                _gib(r["w1_optimizer_bytes"]),
                _gib(repl),
                _gib(r["training_bytes"]),
                _gib(r.get(planner)),
                _gib(r["served_bytes"]),
            ]
        )
    out += _table_text(
        ["rank", "shards", "W1", "W1 optim", "replicated", "training", "planner est", "serving"],
        rank_rows,
        right=set(range(8)),
    )
    verdict = "fits" if tot["fits"] else "DOES NOT FIT"
    out += [
        "",
        f"W1 total {_gib(tot['w1_bytes'])} + {m['embedding_optimizer']} state "
        f"{_gib(tot['w1_optimizer_bytes'])}; replicated W2 + MLPs (params, grads, "
        f"{m['dense_optimizer']} state) {_gib(tot['replicated_bytes_per_rank'])} per rank",
        f"Serving after collapse (vocab x d x 4 B): {_gib(tot['served_bytes'])} in all, "
        f"{_gib(tot['max_rank_served_bytes'])} on the busiest rank if sharded like W1; "
        f"training/serving: tables {tot['tables_training_over_serving']:.2f}x, busiest rank "
        f"{tot['max_rank_training_over_serving']:.2f}x",
        f"Max training memory per rank: {_gib(tot['max_rank_training_bytes'])} (rank "
        f"{tot['max_rank']}) vs cap {_gib(tot['device_cap_bytes'])}: {verdict}"
        + (
            f" (headroom {_gib(tot['headroom_bytes'])})"
            if tot.get("headroom_bytes") is not None
            else ""
        ),
        "  (not counted: activations, all-to-all buffers, allocator and CUDA context)",
    ]
    if not tot["fits"]:
        out.append(
            "  TorchRec's planner accepted this plan, but it leaves out the replicated dense "
            "state and its reservation may be too small: raise the cap or the number of ranks"
        )
    if "planner_num_proposals" in tot:
        out.append(
            f"Planner: {tot['planner_num_proposals']} proposals, {tot['planner_num_plans']} "
            f"plans, {tot['planner_run_time_s']:.2f} s; usable {kind} per rank after its "
            f"reservation {_gib(tot['planner_usable_bytes_per_rank'])}, its own busiest-rank "
            f"estimate {_gib(tot['planner_max_rank_bytes'])} (W1 + optimizer state + IO "
            f"buffers)"
        )
    if "dry_run_s" in tot:
        out.append(f"Dry run: {tot['dry_run_s']:.2f} s")
    return "\n".join(out)
