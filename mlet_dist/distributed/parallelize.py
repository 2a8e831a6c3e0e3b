"""Sharded placement of MLET models: process group, planner, sharder, DMP and optimizers.

Everything distributed happens here, in one place: the model files stay plain PyTorch. The wide
W1 tables are placed by TorchRec's ``EmbeddingShardingPlanner`` and sharded by
``DistributedModelParallel`` with fbgemm's fused (in-backward) optimizers; W2 and the MLPs are
replicated with DDP by DMP.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingEnv, ShardingPlan, ShardingType
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from mlet_dist.config import Config, ConfigError, DistConfig, OptimConfig, w1_learning_rate
from mlet_dist.models import build_dlrm

logger = logging.getLogger(__name__)

ALL_SHARDING_TYPES = (
    ShardingType.TABLE_WISE.value,
    ShardingType.ROW_WISE.value,
    ShardingType.COLUMN_WISE.value,
    ShardingType.TABLE_ROW_WISE.value,
    ShardingType.TABLE_COLUMN_WISE.value,
    ShardingType.GRID_SHARD.value,
    ShardingType.DATA_PARALLEL.value,
)
ROW_BASED = (
    ShardingType.ROW_WISE.value,
    ShardingType.TABLE_ROW_WISE.value,
    ShardingType.GRID_SHARD.value,
)


@dataclass
class DistEnv:
    """Where this process runs: rank, world, device and backend."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def init_distributed(cfg: DistConfig) -> DistEnv:
    """Joins (or creates) the default process group.

    Under ``torchrun``/TorchX (RANK and WORLD_SIZE set) it joins the launched job; otherwise it
    creates a one-process group, so the same training code runs unlaunched.
    """
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("dist.device = 'cuda' but no CUDA device is visible; use 'cpu' or 'auto'")
    backend = cfg.backend or ("nccl" if want_cuda else "gloo")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if want_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=30)
        if "MASTER_ADDR" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            os.environ.setdefault("LOCAL_WORLD_SIZE", "1")  # read by TorchRec's comm helpers
            if world_size != 1:
                raise ConfigError(
                    f"WORLD_SIZE={world_size} but no MASTER_ADDR: launch multi-rank jobs with "
                    f"torchrun or torchx (see README 'Run on a cluster')"
                )
            dist.init_process_group(
                backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )
    return DistEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        local_world_size=local_world_size,
        device=device,
        backend=backend,
    )


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


def fused_params(optim_cfg: OptimConfig, device: torch.device) -> dict:
    """fbgemm TBE fused-optimizer parameters for W1."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    kinds = {
        "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        "adagrad": EmbOptimType.EXACT_ADAGRAD,
        "sgd": EmbOptimType.EXACT_SGD,
        "adam": EmbOptimType.ADAM,
    }
    if optim_cfg.embedding_optimizer == "adam" and device.type != "cuda":
        raise ConfigError(
            "optim.embedding_optimizer = 'adam' is not supported by fbgemm's CPU kernels "
            "('Optimizer adam is not supported in CPU mode'); use 'rowwise_adagrad' (default), "
            "'adagrad' or 'sgd' on CPU, or run on GPU"
        )
    params = {
        "optimizer": kinds[optim_cfg.embedding_optimizer],
        "learning_rate": optim_cfg.embedding_lr,
    }
    if optim_cfg.embedding_optimizer != "sgd":
        params["eps"] = optim_cfg.eps
    return params


def annotate_fused_optimizer(model: nn.Module, optim_cfg: OptimConfig) -> None:
    """Tells TorchRec's planner which optimizer W1 trains with, so it counts its state.

    The optimizer itself is given to fbgemm as ``fused_params``; the planner's storage estimate
    only sees optimizers recorded in a parameter's ``_optimizer_classes`` (as set by
    ``apply_optimizer_in_backward``). The classes chosen map to the same fbgemm type as
    :func:`fused_params`, so the sharder derives an identical fused optimizer from them.
    """
    from torchrec.optim import RowWiseAdagrad

    cls = {
        "rowwise_adagrad": RowWiseAdagrad,
        "adagrad": torch.optim.Adagrad,
        "sgd": torch.optim.SGD,
        "adam": torch.optim.Adam,
    }[optim_cfg.embedding_optimizer]
    from mlet_dist.modules.mlet import MLETEmbeddingBagCollection

    for m in model.modules():
        if isinstance(m, MLETEmbeddingBagCollection):
            for p in m.w1.parameters():
                p._optimizer_classes = [cls]  # type: ignore[attr-defined]


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


def make_topology(cfg: DistConfig, env: DistEnv, world_size: int | None = None) -> Topology:
    gb = 1024**3
    return Topology(
        world_size=world_size or env.world_size,
        local_world_size=env.local_world_size if world_size is None else None,
        compute_device=env.device.type,
        hbm_cap=int(cfg.hbm_cap_gb * gb) if cfg.hbm_cap_gb else None,
        ddr_cap=int(cfg.ddr_cap_gb * gb) if cfg.ddr_cap_gb else None,
    )


def embedding_tables(model: nn.Module) -> list[EmbeddingBagConfig]:
    """The served table configs of the (single) MLET/EBC module in a model."""
    from mlet_dist.modules.mlet import MLETEmbeddingBagCollection

    for m in model.modules():
        if isinstance(m, MLETEmbeddingBagCollection):
            return m.mlet_configs()
    raise ValueError("model has no MLETEmbeddingBagCollection")


def parallelize(
    model: nn.Module,
    env: DistEnv,
    dist_cfg: DistConfig,
    optim_cfg: OptimConfig,
    batch_size_per_rank: int,
    plan: ShardingPlan | None = None,
) -> DistributedModelParallel:
    """Plans and shards a meta-built model: W1 by the planner, W2 + MLPs replicated (DDP).

    Args:
        model: the model with W1 on the meta device.
        env: from :func:`init_distributed`.
        dist_cfg, optim_cfg: config sections.
        batch_size_per_rank: the planner's batch size (cost model).
        plan: use this plan instead of planning (e.g. a saved one).
    """
    tables = embedding_tables(model)
    sharder = MLETEmbeddingBagCollectionSharder(fused_params=fused_params(optim_cfg, env.device))
    annotate_fused_optimizer(model, optim_cfg)
    if plan is None:
        planner = EmbeddingShardingPlanner(
            topology=make_topology(dist_cfg, env),
            batch_size=batch_size_per_rank,
            constraints=build_constraints(tables, dist_cfg),
        )
        pg = dist.GroupMember.WORLD
        plan = planner.collective_plan(model, [sharder], pg)  # rank 0 plans, all agree
    check_plan(plan, tables)
    dmp = DistributedModelParallel(
        module=model,
        env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
        device=env.device,
        plan=plan,
        sharders=[sharder],
    )
    return dmp


def check_batch_divisible(batch_size: int, world_size: int, key: str = "data.batch_size") -> None:
    """Every rank takes an equal slice of each global batch.

    Raises:
        ConfigError: ``batch_size`` is not a multiple of ``world_size``.
    """
    if batch_size % world_size:
        raise ConfigError(
            f"{key} = {batch_size} is not divisible by the world size {world_size}; use a "
            f"multiple of {world_size}"
        )


def build_sharded_model(
    cfg: Config, env: DistEnv, plan: ShardingPlan | None = None
) -> DistributedModelParallel:
    """The one road from a config to a sharded model: build on meta, plan (or take ``plan``), shard.

    Used by training, evaluation, collapse and the benchmarks. W1 lives in fbgemm's TBEs with its
    fused optimizer (rate: :func:`mlet_dist.config.w1_learning_rate`); the dense optimizer and the
    LR schedule are built separately, only by training (:func:`build_optimizer`). Seeds torch with
    ``train.seed`` first, so every rank initializes the replicated parameters identically.

    Args:
        cfg: the run's config.
        env: from :func:`init_distributed`.
        plan: shard with this TorchRec plan (a resumed run's saved one) instead of planning.

    Raises:
        ConfigError: ``data.batch_size`` is not divisible by the world size, or no plan fits.
    """
    check_batch_divisible(cfg.data.batch_size, env.world_size)
    torch.manual_seed(cfg.train.seed)
    model = build_dlrm(
        cfg.model,
        cfg.data.num_embeddings_per_feature,
        embedding_device=torch.device("meta"),
        dense_device=env.device,
    )
    # W1's effective rate (optim.w1_lr_scaling) is given to fbgemm as the fused base LR.
    optim_cfg = dataclasses.replace(cfg.optim, embedding_lr=w1_learning_rate(cfg))
    return parallelize(
        model, env, cfg.dist, optim_cfg, cfg.data.batch_size // env.world_size, plan=plan
    )


def build_optimizer(
    dmp: DistributedModelParallel, optim_cfg: OptimConfig
) -> tuple[CombinedOptimizer, torch.optim.lr_scheduler.LambdaLR]:
    """One optimizer object (fused W1 + dense W2 + dense MLPs) and one LR schedule over it."""
    dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    projection = {n: p for n, p in dense.items() if ".projection." in n}
    others = {n: p for n, p in dense.items() if n not in projection}

    def factory(lr: float):
        def make(params):
            if optim_cfg.dense_optimizer == "adagrad":
                return torch.optim.Adagrad(params, lr=lr, eps=optim_cfg.eps)
            if optim_cfg.dense_optimizer == "adam":
                return torch.optim.Adam(params, lr=lr, eps=optim_cfg.eps)
            return torch.optim.SGD(params, lr=lr)

        return make

    parts: list[tuple[str, torch.optim.Optimizer]] = [("fused", dmp.fused_optimizer)]
    if projection:
        lr = optim_cfg.projection_lr or optim_cfg.dense_lr
        parts.append(("projection", KeyedOptimizerWrapper(projection, factory(lr))))
    parts.append(("dense", KeyedOptimizerWrapper(others, factory(optim_cfg.dense_lr))))
    optimizer = CombinedOptimizer(parts)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim_cfg))
    return optimizer, scheduler


def lr_lambda(cfg: OptimConfig):
    """Linear warm-up, then constant, then squared polynomial decay to 0 (MLPerf DLRM policy)."""

    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.decay_steps and step >= cfg.decay_start_step:
            done = min(step - cfg.decay_start_step, cfg.decay_steps)
            return (1.0 - done / cfg.decay_steps) ** 2
        return 1.0

    return f
