"""Byte accounting of a sharding plan: W1 shards, the replicated W2 and MLPs, and the collapsed
(served) table; the optimizers' state sizes are their registry's (:mod:`mlet_dist.optim`)."""

from __future__ import annotations

from typing import Any

from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from mlet_dist.config import OptimConfig
from mlet_dist.optim import dense_state_values

GIB = 1024**3
SERVED_BYTES = 4  # the collapsed table served in fp32 (int8/fp16 serving is 4x/2x smaller)


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


def replicated_bytes(optim: OptimConfig, model: nn.Module) -> dict[str, int]:
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
    mult = dense_state_values(optim.dense_optimizer)
    return {
        "w2_bytes": w2,
        "w2_grad_bytes": w2,
        "w2_optimizer_bytes": mult * w2,
        "mlp_bytes": mlp,
        "mlp_grad_bytes": mlp,
        "mlp_optimizer_bytes": mult * mlp,
    }
