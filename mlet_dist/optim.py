"""The optimizers of an MLET model, one home for them: W1's fused kinds, the dense factory, the
LR schedule and W1's learning rate.

W1 trains with a fused (in-backward) optimizer inside fbgemm's TBEs: the sharder gets it as
``fused_params`` (:func:`fused_params`, read by :mod:`mlet_dist.distributed.sharding`) and the
planner counts its state (:attr:`W1Optimizer.planner_class`, :func:`fused_state_bytes`). W2 and
the MLPs train with a dense ``torch.optim`` optimizer (:data:`DENSE_OPTIMIZERS`); W2 has its own
rate (``optim.projection_lr``). :func:`build_optimizer` combines the fused and the dense ones into
one optimizer object with one LR schedule (:func:`lr_lambda`) over all of it.

A new optimizer is one entry in :data:`W1_OPTIMIZERS` or :data:`DENSE_OPTIMIZERS` (and its name
in the config's choices of ``optim.embedding_optimizer`` / ``optim.dense_optimizer``), e.g.::

    DENSE_OPTIMIZERS["rmsprop"] = DenseOptimizer(
        build=lambda params, lr, cfg: torch.optim.RMSprop(params, lr=lr, eps=cfg.eps),
        state_per_param=1,
    )

This module reads only the config (and torch, TorchRec, fbgemm), so that distribution and
training can both import it (pyproject.toml ``[tool.importlinter]``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from mlet_dist.config import ConfigError, OptimConfig

STATE_BYTES = 4
"""Bytes of one optimizer state value: fbgemm and torch.optim keep it in fp32, also for an fp16
W1 (``model.w1_dtype``; checked against the sharded model in tests/test_fp16_w1.py)."""


@dataclass(frozen=True)
class W1Optimizer:
    """A fused (fbgemm, in-backward) optimizer of W1: ``optim.embedding_optimizer``.

    Attributes:
        fbgemm_type: the TBE's optimizer.
        planner_class: the optimizer class TorchRec's planner sees on W1's parameters; it counts
            the state from it and the sharder derives the fbgemm type from it, so it must map to
            ``fbgemm_type`` (``torchrec.distributed.utils.optimizer_type_to_emb_opt_type``).
        state_per_row, state_per_value: fp32 state values per row of a shard and per weight
            (row-wise Adagrad: one per row of each shard; Adagrad: one per weight).
        uses_eps: the kind takes ``optim.eps``.
        cuda_only: fbgemm has no CPU kernel for it.
        extra: further fused params given to fbgemm as they are, over the ones from the config.
            Check each on the device it is meant for: fbgemm's CPU row-wise Adagrad, for one,
            drops ``weight_decay`` on every table read by a single feature (fbgemm-gpu 1.8: its
            fast path, embedding_backward_split_cpu_template.cpp, passes weight_decay = 0).
    """

    fbgemm_type: EmbOptimType
    planner_class: type[torch.optim.Optimizer]
    state_per_row: int = 0
    state_per_value: int = 0
    uses_eps: bool = True
    cuda_only: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DenseOptimizer:
    """A dense optimizer of W2 and the MLPs: ``optim.dense_optimizer``.

    Attributes:
        build: ``(params, lr, cfg) -> torch.optim.Optimizer``, cfg the [optim] section.
        state_per_param: fp32 state values per parameter value (the dry-run memory report).
    """

    build: Callable[[list[torch.Tensor], float, OptimConfig], torch.optim.Optimizer]
    state_per_param: int


W1_OPTIMIZERS: dict[str, W1Optimizer] = {
    "rowwise_adagrad": W1Optimizer(
        EmbOptimType.EXACT_ROWWISE_ADAGRAD, RowWiseAdagrad, state_per_row=1
    ),
    "adagrad": W1Optimizer(EmbOptimType.EXACT_ADAGRAD, torch.optim.Adagrad, state_per_value=1),
    "sgd": W1Optimizer(EmbOptimType.EXACT_SGD, torch.optim.SGD, uses_eps=False),
    "adam": W1Optimizer(EmbOptimType.ADAM, torch.optim.Adam, state_per_value=2, cuda_only=True),
}
"""W1's fused optimizers by ``optim.embedding_optimizer``."""

DENSE_OPTIMIZERS: dict[str, DenseOptimizer] = {
    "adagrad": DenseOptimizer(
        lambda params, lr, cfg: torch.optim.Adagrad(params, lr=lr, eps=cfg.eps), 1
    ),
    "adam": DenseOptimizer(lambda params, lr, cfg: torch.optim.Adam(params, lr=lr, eps=cfg.eps), 2),
    "sgd": DenseOptimizer(lambda params, lr, cfg: torch.optim.SGD(params, lr=lr), 0),
}
"""The dense optimizers of W2 and the MLPs by ``optim.dense_optimizer``."""


def w1_optimizer(cfg: OptimConfig) -> W1Optimizer:
    """The registered fused optimizer ``optim.embedding_optimizer`` names."""
    return _lookup(W1_OPTIMIZERS, cfg.embedding_optimizer, "optim.embedding_optimizer")


def dense_optimizer(cfg: OptimConfig) -> DenseOptimizer:
    """The registered dense optimizer ``optim.dense_optimizer`` names."""
    return _lookup(DENSE_OPTIMIZERS, cfg.dense_optimizer, "optim.dense_optimizer")


def _lookup(registry: Mapping[str, Any], kind: str, key: str) -> Any:
    if kind not in registry:
        raise ConfigError(f"{key} = {kind!r} is not an optimizer; use one of {', '.join(registry)}")
    return registry[kind]


def w1_learning_rate(optim: OptimConfig, d: int, k: int | None) -> float:
    """The learning rate of one table's fused optimizer, for a table of served width ``d`` and
    inner width ``k`` (0 or None: a single-layer table): ``optim.embedding_lr``, times
    sqrt(d / k) for a factorized table under ``optim.w1_lr_scaling`` = 'sqrt_d_over_k' or 'auto'
    (see that key). A single-layer table trains at embedding_lr itself.

    Each table gets its own rate (:func:`mlet_dist.distributed.parallelize.build_sharded_model`
    puts it on the table's weight for TorchRec's sharder), so tables of different k train
    matched in one model.

    Example: embedding_lr 0.1, d = 8, k = 32, 'auto' -> 0.1 * sqrt(8 / 32) = 0.05; k = 0 -> 0.1.
    """
    if optim.w1_lr_scaling in ("sqrt_d_over_k", "auto") and k:
        return optim.embedding_lr * (d / k) ** 0.5
    return optim.embedding_lr


def fused_params(cfg: OptimConfig, device: torch.device) -> dict[str, Any]:
    """fbgemm's fused-optimizer parameters of W1 (the sharder's ``fused_params``).

    The learning rate is ``cfg.embedding_lr`` as given: the rate of every table that has no rate
    of its own. A run gives each table its own (:func:`w1_learning_rate`) on the table's weight
    (:func:`mlet_dist.distributed.sharding.annotate_fused_optimizer`), which TorchRec's sharder
    puts over this one.

    Raises:
        ConfigError: the kind has no CPU kernel and ``device`` is not CUDA.
    """
    spec = w1_optimizer(cfg)
    if spec.cuda_only and device.type != "cuda":
        cpu = ", ".join(f"'{k}'" for k, s in W1_OPTIMIZERS.items() if not s.cuda_only)
        raise ConfigError(
            f"optim.embedding_optimizer = {cfg.embedding_optimizer!r} is not supported by "
            f"fbgemm's CPU kernels ('Optimizer {cfg.embedding_optimizer} is not supported in CPU "
            f"mode'); use one of {cpu} on CPU (default 'rowwise_adagrad'), or run on GPU"
        )
    params: dict[str, Any] = {"optimizer": spec.fbgemm_type, "learning_rate": cfg.embedding_lr}
    if spec.uses_eps:
        params["eps"] = cfg.eps
    params.update(spec.extra)
    return params


def fused_state_bytes(kind: str, rows: int, cols: int) -> int:
    """Fused (fbgemm) optimizer state of one W1 shard of rows × cols, for ``kind``
    (``optim.embedding_optimizer``)."""
    spec = _lookup(W1_OPTIMIZERS, kind, "optim.embedding_optimizer")
    return (spec.state_per_row * rows + spec.state_per_value * rows * cols) * STATE_BYTES


def dense_state_values(kind: str) -> int:
    """fp32 state values per parameter value of the dense optimizer ``kind``."""
    return _lookup(DENSE_OPTIMIZERS, kind, "optim.dense_optimizer").state_per_param


def build_optimizer(
    dmp: DistributedModelParallel, cfg: OptimConfig
) -> tuple[CombinedOptimizer, torch.optim.lr_scheduler.LambdaLR]:
    """One optimizer object (fused W1 + dense W2 + dense MLPs) and one LR schedule over it.

    W1's part is the DMP's fused optimizer (it steps inside backward; its ``step()`` only sets the
    TBEs' LR). W2 (parameters under ``.projection.``) trains at ``projection_lr`` (0: dense_lr),
    the MLPs at ``dense_lr``, both with ``optim.dense_optimizer``.
    """
    dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    projection = {n: p for n, p in dense.items() if ".projection." in n}
    others = {n: p for n, p in dense.items() if n not in projection}
    spec = dense_optimizer(cfg)

    def factory(lr: float) -> Callable[[Iterable[torch.Tensor]], torch.optim.Optimizer]:
        return lambda params: spec.build(list(params), lr, cfg)

    parts: list[tuple[str, Any]] = [("fused", dmp.fused_optimizer)]
    if projection:
        lr = cfg.projection_lr or cfg.dense_lr
        parts.append(("projection", KeyedOptimizerWrapper(projection, factory(lr))))
    parts.append(("dense", KeyedOptimizerWrapper(others, factory(cfg.dense_lr))))
    optimizer = CombinedOptimizer(parts)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    return optimizer, scheduler


def lr_lambda(cfg: OptimConfig) -> Callable[[int], float]:
    """Linear warm-up, then constant, then squared polynomial decay to 0 (MLPerf DLRM policy):
    the factor of every base LR at a step (``warmup_steps``, ``decay_start_step``,
    ``decay_steps``)."""

    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.decay_steps and step >= cfg.decay_start_step:
            done = min(step - cfg.decay_start_step, cfg.decay_steps)
            return (1.0 - done / cfg.decay_steps) ** 2
        return 1.0

    return f
