"""How MLET's W1 tables are sharded: the sharding types, the sharder, the planner and its inputs.

The one home of these facts, shared by training (:func:`mlet_dist.distributed.parallelize.
parallelize`) and the dry-run planner (:mod:`mlet_dist.distributed.planning`), so that a dry run
plans exactly as training does: the same sharder with the same fused optimizer, the same
per-table constraints and topology, one :func:`make_planner`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints, Stats, StorageReservation
from torchrec.distributed.types import ShardingPlan, ShardingType
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

from mlet_dist.config import ConfigError, DistConfig, OptimConfig
from mlet_dist.modules.mlet import MLETEmbeddingBagCollection
from mlet_dist.optim import fused_params, w1_optimizer

ALL_SHARDING_TYPES = (
    ShardingType.TABLE_WISE.value,
    ShardingType.ROW_WISE.value,
    ShardingType.COLUMN_WISE.value,
    ShardingType.TABLE_ROW_WISE.value,
    ShardingType.TABLE_COLUMN_WISE.value,
    ShardingType.GRID_SHARD.value,
    ShardingType.DATA_PARALLEL.value,
)
"""Every sharding type ``dist.sharding_types`` may name."""
ROW_BASED = (
    ShardingType.ROW_WISE.value,
    ShardingType.TABLE_ROW_WISE.value,
    ShardingType.GRID_SHARD.value,
)
"""Types that split a table's rows (TorchRec offers them for CUDA only; we also on CPU)."""
COLUMN_BASED = (
    ShardingType.COLUMN_WISE.value,
    ShardingType.TABLE_COLUMN_WISE.value,
    ShardingType.GRID_SHARD.value,
)
"""Types that split a table's columns. fbgemm's row-wise optimizer state of such a table has one
value per row *of each column shard* (its size is rows x shards), which TorchRec cannot map onto
another column split: resuming under another world size or plan fails in DCP with "Size mismatch
... momentum1" (or would be wrong), so it is refused up front."""
SPLITTING_TYPES = tuple(dict.fromkeys(ROW_BASED + COLUMN_BASED))
"""Types that split one table over several ranks (rows, columns or both)."""


class MLETEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """The stock EBC sharder, also offering row-based sharding types on CPU.

    Why: TorchRec only lists row_wise / table_row_wise / grid_shard for CUDA, but the fbgemm CPU
    kernels train, checkpoint and collapse them correctly (checked by the oracle tests in
    tests/test_sharding.py). grid_shard is never offered for MEAN-pooled tables: TorchRec 1.8/1.9
    silently returns SUM-pooled output for that combination.
    """

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = list(super().sharding_types(compute_device_type))
        for t in ROW_BASED:
            if t not in types:
                types.append(t)
        return types


def make_sharder(optim_cfg: OptimConfig, device: torch.device) -> MLETEmbeddingBagCollectionSharder:
    """The sharder of W1, with its fused optimizer (:func:`mlet_dist.optim.fused_params`)."""
    return MLETEmbeddingBagCollectionSharder(fused_params=fused_params(optim_cfg, device))


def annotate_fused_optimizer(
    model: nn.Module, optim_cfg: OptimConfig, table_lrs: Mapping[str, float] | None = None
) -> None:
    """Tells TorchRec's planner which optimizer W1 trains with, so it counts its state, and the
    sharder each table's own learning rate.

    The optimizer itself is given to fbgemm as ``fused_params``; the planner's storage estimate
    only sees optimizers recorded in a parameter's ``_optimizer_classes`` (as set by
    ``apply_optimizer_in_backward``). The class is the registered kind's ``planner_class``
    (:data:`mlet_dist.optim.W1_OPTIMIZERS`), which maps to the same fbgemm type as
    ``fused_params``, so the sharder derives an identical fused optimizer from it.

    ``table_lrs`` (table name -> rate, :func:`mlet_dist.optim.w1_learning_rate`) go on each
    table's weight as ``_optimizer_kwargs = [{"lr": rate}]``: TorchRec's EBC sharder reads them
    per table and puts them over the sharder's ``fused_params`` (``merge_fused_params``, "lr"
    becoming fbgemm's "learning_rate"); tables of different rates go to different TBEs, each its
    own param group of the fused optimizer, so the LR schedule scales each from its own base.
    This is TorchRec's own per-table mechanism, without ``apply_optimizer_in_backward``: that
    would also set ``_optimizer_classes`` (done here) and ``_in_backward_optimizers``, a second,
    torch.optim optimizer on the meta weight that the fused kernel never runs. Tables not named
    (None: all) train at ``optim_cfg.embedding_lr``, the sharder's. The planner does not read the
    rates: the plan is the same with and without them.
    """
    cls = w1_optimizer(optim_cfg).planner_class
    lrs = dict(table_lrs or {})
    for m in model.modules():
        if isinstance(m, MLETEmbeddingBagCollection):
            for name, bag in m.w1.embedding_bags.items():
                bag.weight._optimizer_classes = [cls]  # type: ignore[attr-defined]
                if name in lrs:
                    bag.weight._optimizer_kwargs = [{"lr": lrs.pop(name)}]  # type: ignore[attr-defined]
    if lrs:
        raise ValueError(f"learning rates given for tables the model lacks: {sorted(lrs)}")


def embedding_tables(model: nn.Module) -> list[EmbeddingBagConfig]:
    """The served table configs of the (single) MLET/EBC module in a model."""
    for m in model.modules():
        if isinstance(m, MLETEmbeddingBagCollection):
            return m.mlet_configs()
    raise ValueError("model has no MLETEmbeddingBagCollection")


def build_constraints(
    tables: list[EmbeddingBagConfig], cfg: DistConfig
) -> dict[str, ParameterConstraints]:
    """Per-table planner constraints from the config, with the grid_shard + MEAN guard."""
    allowed = list(cfg.sharding_types) or [
        t for t in ALL_SHARDING_TYPES if t != ShardingType.DATA_PARALLEL.value
    ]
    bad = sorted(set(allowed) - set(ALL_SHARDING_TYPES))
    if bad:
        raise ConfigError(
            f"dist.sharding_types has unknown types {bad}; valid: {', '.join(ALL_SHARDING_TYPES)}"
        )
    constraints = {}
    for t in tables:
        types = list(allowed)
        if t.pooling == PoolingType.MEAN and ShardingType.GRID_SHARD.value in types:
            types.remove(ShardingType.GRID_SHARD.value)
            if not types:
                raise ConfigError(
                    f"table '{t.name}' uses MEAN pooling and dist.sharding_types allows only "
                    f"grid_shard, which returns SUM-pooled output for MEAN tables in TorchRec "
                    f"1.8/1.9; allow another sharding type"
                )
        constraints[t.name] = ParameterConstraints(
            sharding_types=types,
            compute_kernels=[EmbeddingComputeKernel.FUSED.value],
            min_partition=cfg.min_partition or None,
        )
    return constraints


def check_plan(plan: ShardingPlan, tables: list[EmbeddingBagConfig]) -> None:
    """Refuses plans TorchRec would run wrongly (grid_shard on a MEAN-pooled table)."""
    pooling = {t.name: t.pooling for t in tables}
    for module_plan in plan.plan.values():
        for name, ps in module_plan.items():  # type: ignore[union-attr]
            if (
                ps.sharding_type == ShardingType.GRID_SHARD.value
                and pooling.get(name) == PoolingType.MEAN
            ):
                raise ConfigError(
                    f"the sharding plan puts MEAN-pooled table '{name}' in grid_shard, which "
                    f"TorchRec 1.8/1.9 computes as SUM; constrain it to another sharding type"
                )


def make_topology(
    cfg: DistConfig, world_size: int, local_world_size: int | None, device_type: str
) -> Topology:
    """The planner's cluster: ranks, ranks per node, device kind and the per-rank caps
    (``dist.hbm_cap_gb``, ``dist.ddr_cap_gb``; TorchRec's defaults when unset)."""
    gb = 1024**3
    return Topology(
        world_size=world_size,
        local_world_size=local_world_size,
        compute_device=device_type,
        hbm_cap=int(cfg.hbm_cap_gb * gb) if cfg.hbm_cap_gb else None,
        ddr_cap=int(cfg.ddr_cap_gb * gb) if cfg.ddr_cap_gb else None,
    )


def make_planner(
    cfg: DistConfig,
    topology: Topology,
    batch_size_per_rank: int,
    tables: list[EmbeddingBagConfig],
    *,
    storage_reservation: StorageReservation | None = None,
    stats: Stats | None = None,
) -> EmbeddingShardingPlanner:
    """TorchRec's planner as training and the dry run use it.

    Args:
        cfg: the [dist] section (``sharding_types``, ``min_partition``: :func:`build_constraints`).
        topology: from :func:`make_topology`.
        batch_size_per_rank: the planner's batch size (its cost model and KJT reservation).
        tables: the model's tables (:func:`embedding_tables`).
        storage_reservation: instead of TorchRec's default (15 % heuristical reservation).
        stats: collects the planner's own estimates (instead of its log table).
    """
    return EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size_per_rank,
        constraints=build_constraints(tables, cfg),
        storage_reservation=storage_reservation,
        stats=[stats] if stats is not None else None,
    )
