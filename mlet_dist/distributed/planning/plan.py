"""Planning a config's model for a cluster with TorchRec's planner, and the message when no plan
fits (naming the tables, the memory needed vs available and a fix checked with the planner)."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torchrec.distributed.planner import Topology
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
from torchrec.distributed.types import ModuleSharder, ShardingPlan
from torchrec.modules.embedding_configs import DATA_TYPE_NUM_BITS, EmbeddingBagConfig

from mlet_dist.config import Config, ConfigError, DistConfig
from mlet_dist.distributed.parallelize import check_batch_divisible
from mlet_dist.distributed.planning.memory import GIB
from mlet_dist.distributed.planning.text import gib
from mlet_dist.distributed.sharding import (
    SPLITTING_TYPES,
    annotate_fused_optimizer,
    check_plan,
    embedding_tables,
    make_planner,
    make_sharder,
    make_topology,
)
from mlet_dist.errors import MletError
from mlet_dist.models.dlrm import build_dlrm
from mlet_dist.modules.mlet import inner_dim_of
from mlet_dist.optim import fused_state_bytes
from mlet_dist.schema import schema_of

# TorchRec's default (EmbeddingShardingPlanner's heuristical_storage_reservation_percentage):
# the share of each device the planner keeps free as a margin, on top of dense and KJT storage.
RESERVED_FRACTION = 0.15
# GPUs per node when not given (the usual 8-GPU host).
DEFAULT_GPUS_PER_NODE = 8
# Plans tried per kind of fix (more ranks, larger cap) when no plan fits.
SUGGESTION_TRIES = 4


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
        check_batch_divisible(
            cfg.data.batch_size, world_size, alternative="or give --batch-size (per rank)"
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
def quiet_planner() -> Iterator[None]:
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


def meta_model(cfg: Config) -> nn.Module:
    meta = torch.device("meta")
    return build_dlrm(cfg.model, schema_of(cfg.data), embedding_device=meta, dense_device=meta)


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
    model = meta_model(cfg)
    tables = embedding_tables(model)
    try:
        plan = _run_planner(cfg, target, model, tables, stats)
    except PlannerError as e:
        raise _no_plan_error(cfg, target, model, tables, stats, e) from e
    check_plan(plan, tables)
    return plan


@contextmanager
def planner_errors(cfg: Config, env: Any) -> Iterator[None]:
    """Within: TorchRec's PlannerError (the tables cannot be placed on ``env``'s ranks) becomes
    :func:`make_plan`'s PlanningError, the message of `mlet-dist plan` (the tables, memory needed
    vs available, and a fix checked with the planner)."""
    try:
        yield
    except PlannerError:
        make_plan(cfg, env.world_size, env.device.type, local_world_size=env.local_world_size)
        raise  # the dry run found a plan after all: the planner's own error


def _run_planner(
    cfg: Config,
    target: PlanTarget,
    model: nn.Module,
    tables: list[EmbeddingBagConfig],
    stats: PlannerStats,
) -> ShardingPlan:
    """One ``EmbeddingShardingPlanner.plan`` call set up as training's
    :func:`~mlet_dist.distributed.parallelize.parallelize` sets it up."""
    sharder = make_sharder(cfg.optim, torch.device(target.device))
    annotate_fused_optimizer(model, cfg.optim)
    with quiet_planner():
        topology = planner_topology(cfg.dist, target)
        stats.cap_per_rank = getattr(topology.devices[0].storage, target.memory_kind)
        # The planner's default reservation, built here so that its public
        # `last_reserved_topology` tells the capacity left for the tables (also after a failure).
        reservation = HeuristicalStorageReservation(percentage=RESERVED_FRACTION)
        planner = make_planner(
            cfg.dist,
            topology,
            target.batch_size_per_rank,
            tables,
            storage_reservation=reservation,
            stats=stats,
        )
        try:
            return planner.plan(model, [sharder])
        finally:
            reserved = reservation.last_reserved_topology
            stats.usable_per_rank = (
                getattr(reserved.devices[0].storage, target.memory_kind) if reserved else None
            )


def planner_topology(dist_cfg: DistConfig, target: PlanTarget) -> Topology:
    """The planner's Topology for the target, built by training's own :func:`make_topology`."""
    with quiet_planner():
        return make_topology(dist_cfg, target.world_size, target.local_world_size, target.device)


def device_cap(dist_cfg: DistConfig, target: PlanTarget) -> int:
    """Bytes per rank of the target's memory tier (HBM on cuda, DDR on cpu) as planned."""
    return getattr(planner_topology(dist_cfg, target).devices[0].storage, target.memory_kind)


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
            t.num_embeddings * k * elem + fused_state_bytes(optimizer, t.num_embeddings, k),
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
        f"rank(s) with {gib(cap)} of {kind.upper()} each.",
        f"The tables need {gib(total)} (W1 + {optimizer} state); largest: "
        + ", ".join(f"{n} ({rows:,} x {k}: {gib(b)})" for n, (b, rows, k) in largest)
        + ".",
    ]
    if usable is None or usable <= 0:
        lines.append(
            f"TorchRec's reservation ({RESERVED_FRACTION:.0%} of each rank plus the dense "
            f"parameters and input buffers at batch {target.batch_size_per_rank}/rank) already "
            f"takes all of the {gib(cap)} per rank."
        )
        fixed = cap * (1 - RESERVED_FRACTION)
        ranks_may_help = False
    else:
        lines.append(
            f"Available for tables: {gib(usable * ws)} = {ws} x {gib(usable)} per rank "
            f"({gib(cap)} minus TorchRec's reservation: {RESERVED_FRACTION:.0%}, dense "
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
