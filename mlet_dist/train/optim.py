"""Training's optimizer and LR schedule over a sharded model (only training builds them).

W1's optimizer is fused into fbgemm's TBEs by the sharder (:mod:`mlet_dist.distributed.sharding`);
here it is combined with the dense optimizers of W2 and the MLPs into one optimizer object, with
one LR schedule over all of it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from mlet_dist.config import OptimConfig


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


def lr_lambda(cfg: OptimConfig) -> Callable[[int], float]:
    """Linear warm-up, then constant, then squared polynomial decay to 0 (MLPerf DLRM policy)."""

    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.decay_steps and step >= cfg.decay_start_step:
            done = min(step - cfg.decay_start_step, cfg.decay_steps)
            return (1.0 - done / cfg.decay_steps) ** 2
        return 1.0

    return f
