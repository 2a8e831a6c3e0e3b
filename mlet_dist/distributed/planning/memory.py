"""Byte accounting of a sharding plan: W1 shards, their fused optimizer state, the replicated
W2 and MLPs, and the collapsed (served) table."""

from __future__ import annotations

from typing import Any

from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from mlet_dist.config import Config

GIB = 1024**3
# Optimizer state in fp32 values per parameter (fbgemm and torch.optim keep it in fp32, also for
# an fp16 W1 (model.w1_dtype): checked against the sharded model in tests/test_fp16_w1.py).
# Row-wise Adagrad is not a multiple: one float per row of each shard (see fused_state_bytes).
FUSED_STATE_MULTIPLIER = {"adagrad": 1, "sgd": 0, "adam": 2}
DENSE_STATE_MULTIPLIER = {"adagrad": 1, "sgd": 0, "adam": 2}
STATE_BYTES = 4
SERVED_BYTES = 4  # the collapsed table served in fp32 (int8/fp16 serving is 4x/2x smaller)


def fused_state_bytes(optimizer: str, rows: int, cols: int) -> int:
    """Fused (fbgemm) optimizer state of one W1 shard of rows × cols."""
    if optimizer == "rowwise_adagrad":
        return rows * STATE_BYTES  # one fp32 accumulator per row of each shard
    return FUSED_STATE_MULTIPLIER[optimizer] * rows * cols * STATE_BYTES


def served_cols(col_offset: int, cols: int, k: int, d: int) -> int:
    """Columns of the d-wide served table matching W1 columns [c0, c0+cols) of k.

    A column split of W1 into pieces maps to the same split of the served table scaled by d/k;
    floors of the boundaries make the pieces of a table add up to exactly d.
    """
    return (col_offset + cols) * d // k - col_offset * d // k


def table_shards(ps: Any, table: EmbeddingBagConfig, k: int) -> list[dict[str, Any]]:
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


def replicated_bytes(cfg: Config, model: nn.Module) -> dict[str, int]:
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
