"""Dry-run planning: where a config's tables would go on a cluster, and how much memory each rank needs.

``mlet-dist plan`` runs TorchRec's ``EmbeddingShardingPlanner.plan`` (the single-process call, not
``collective_plan``: no process group is needed) on the model built entirely on the meta device,
with the same sharder, constraints, topology and storage reservation as training
(:mod:`mlet_dist.distributed.sharding`, as :func:`mlet_dist.distributed.parallelize.parallelize`
uses them), for a cluster that need not exist here:
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

from mlet_dist.distributed.planning.plan import (
    PlannerStats,
    PlanningError,
    PlanTarget,
    make_plan,
    plan_target,
    planner_errors,
)
from mlet_dist.distributed.planning.report import dry_run, plan_report, write_report
from mlet_dist.distributed.planning.text import format_report

__all__ = [
    "PlanTarget",
    "PlannerStats",
    "PlanningError",
    "dry_run",
    "format_report",
    "make_plan",
    "plan_report",
    "plan_target",
    "planner_errors",
    "write_report",
]
