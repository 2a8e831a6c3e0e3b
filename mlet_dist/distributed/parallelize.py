"""Sharded placement of MLET models: the process group, then build, plan and shard (DMP).

Everything distributed happens here and in :mod:`mlet_dist.distributed.sharding` (the sharder,
constraints, topology and planner): the model files stay plain PyTorch. The wide W1 tables are
placed by TorchRec's ``EmbeddingShardingPlanner`` and sharded by ``DistributedModelParallel``
with fbgemm's fused (in-backward) optimizers; W2 and the MLPs are replicated with DDP by DMP (on
more than one rank: one rank has nothing to all-reduce, see :class:`NoDataParallel`). The dense
optimizer and the LR schedule are built by training (:mod:`mlet_dist.optim`).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DataParallelWrapper, DistributedModelParallel
from torchrec.distributed.types import ShardingEnv, ShardingPlan

from mlet_dist.config import Config, ConfigError, DistConfig, OptimConfig
from mlet_dist.distributed.sharding import (
    annotate_fused_optimizer,
    check_plan,
    embedding_tables,
    make_planner,
    make_sharder,
    make_topology,
)
from mlet_dist.models import build_dlrm
from mlet_dist.modules.mlet import inner_dim_of
from mlet_dist.optim import w1_learning_rate
from mlet_dist.schema import FeatureSchema, schema_of

logger = logging.getLogger(__name__)


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
                    f"torchrun or torchx (see docs/operations.md#run-on-a-cluster)"
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


class NoDataParallel(DataParallelWrapper):
    """DMP's data-parallel step that leaves the dense part unwrapped (used at world size 1).

    DMP wraps W2 and the MLPs in DDP even on one rank, where the all-reduce of every step's
    gradients (bucket copies, a gloo/nccl call, the division by 1) changes nothing and costs
    2-3 ms a step on a 2-core CPU. TorchRec's ``data_parallel_wrapper`` argument is the hook
    for this; the gradients, the state-dict keys (DMP strips DDP's prefix) and the parameter
    names are the same with and without DDP (tests/test_sharding.py compares them).
    """

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        # Nothing to do: the dense part was built on the device (build_sharded_model).
        return None


def parallelize(
    model: nn.Module,
    env: DistEnv,
    dist_cfg: DistConfig,
    optim_cfg: OptimConfig,
    batch_size_per_rank: int,
    plan: ShardingPlan | None = None,
    data_parallel: bool | None = None,
    table_lrs: Mapping[str, float] | None = None,
) -> DistributedModelParallel:
    """Plans and shards a meta-built model: W1 by the planner, W2 + MLPs replicated (DDP).

    Args:
        model: the model with W1 on the meta device.
        env: from :func:`init_distributed`.
        dist_cfg, optim_cfg: config sections.
        batch_size_per_rank: the planner's batch size (cost model).
        plan: use this plan instead of planning (e.g. a saved one).
        data_parallel: wrap W2 + MLPs in DDP; None = only when ``env.world_size > 1``.
        table_lrs: W1's fused learning rate per table name
            (:func:`~mlet_dist.distributed.sharding.annotate_fused_optimizer`); tables not named
            (None: all) train at ``optim_cfg.embedding_lr``.
    """
    tables = embedding_tables(model)
    sharder = make_sharder(optim_cfg, env.device)
    annotate_fused_optimizer(model, optim_cfg, table_lrs)
    if plan is None:
        topology = make_topology(dist_cfg, env.world_size, env.local_world_size, env.device.type)
        planner = make_planner(dist_cfg, topology, batch_size_per_rank, tables)
        pg = dist.GroupMember.WORLD
        plan = planner.collective_plan(model, [sharder], pg)  # rank 0 plans, all agree
    check_plan(plan, tables)
    if data_parallel is None:
        data_parallel = env.world_size > 1
    dmp = DistributedModelParallel(
        module=model,
        env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
        device=env.device,
        plan=plan,
        sharders=[sharder],
        data_parallel_wrapper=None if data_parallel else NoDataParallel(),
    )
    return dmp


def check_batch_divisible(
    batch_size: int, world_size: int, key: str = "data.batch_size", alternative: str = ""
) -> None:
    """Every rank takes an equal slice of each global batch.

    Args:
        alternative: another fix, appended to the message (e.g. "or give --batch-size").

    Raises:
        ConfigError: ``batch_size`` is not a multiple of ``world_size``.
    """
    if batch_size % world_size:
        raise ConfigError(
            f"{key} = {batch_size} is not divisible by the world size {world_size}; use a "
            f"multiple of {world_size}" + (f" {alternative}" if alternative else "")
        )


def build_sharded_model(
    cfg: Config,
    env: DistEnv,
    plan: ShardingPlan | None = None,
    schema: FeatureSchema | None = None,
) -> DistributedModelParallel:
    """The one road from a config to a sharded model: build on meta, plan (or take ``plan``), shard.

    Used by training, evaluation, collapse and the benchmarks. W1 lives in fbgemm's TBEs with its
    fused optimizer (each table at its own rate: :func:`mlet_dist.optim.w1_learning_rate`); the
    dense optimizer and the LR schedule are built separately, only by training
    (:func:`mlet_dist.optim.build_optimizer`). Seeds torch with ``train.seed`` first, so every
    rank initializes the replicated parameters identically.

    Args:
        cfg: the run's config.
        env: from :func:`init_distributed`.
        plan: shard with this TorchRec plan (a resumed run's saved one) instead of planning.
        schema: the run's feature schema (a job's ``RunContext.schema``); None derives it from
            ``cfg.data`` (for callers outside a job, e.g. tests and benchmarks).

    Raises:
        ConfigError: ``data.batch_size`` is not divisible by the world size, or no plan fits.
    """
    check_batch_divisible(cfg.data.batch_size, env.world_size)
    torch.manual_seed(cfg.train.seed)
    model = build_dlrm(
        cfg.model,
        schema if schema is not None else schema_of(cfg.data),
        embedding_device=torch.device("meta"),
        dense_device=env.device,
    )
    # Each table's W1 trains at its own base LR (optim.w1_lr_scaling: embedding_lr * sqrt(d / k),
    # embedding_lr for a single-layer table), its TBE's param group in the LR schedule.
    table_lrs = {
        t.name: w1_learning_rate(cfg.optim, t.embedding_dim, inner_dim_of(t))
        for t in embedding_tables(model)
    }
    return parallelize(
        model,
        env,
        cfg.dist,
        cfg.optim,
        cfg.data.batch_size // env.world_size,
        plan=plan,
        table_lrs=table_lrs,
    )
