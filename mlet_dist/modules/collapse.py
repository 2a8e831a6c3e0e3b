"""Exact collapse of a trained MLET module into a plain TorchRec EmbeddingBagCollection.

Single-process form: W = W1 @ W2 per table, computed in row chunks of bounded size with
``torch.mm(out=...)`` so the only extra memory is the output table itself.
"""

from __future__ import annotations

import torch
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from mlet_dist.modules.mlet import MLETEmbeddingBagCollection, inner_dim_of

# Rows per chunked matmul, here and in the sharded collapse (mlet_dist.distributed.collapse) and so
# the default of `mlet-dist collapse --chunk-rows`: fastest on CPU in benchmarks/collapse_bench.py.
DEFAULT_CHUNK_ROWS = 16384


@torch.no_grad()
def collapse_rows(
    w1: torch.Tensor,
    w2: torch.Tensor,
    out: torch.Tensor | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:
    """Writes ``w1 @ w2`` into ``out`` chunk by chunk (rows of w1), returning ``out``.

    Args:
        w1: (rows, k) factor rows (a whole table or one shard).
        w2: (k, d) projection (or the k-slice of it matching a column shard of w1).
        out: (rows, d) destination; allocated when None.
        chunk_rows: rows per matmul, bounding the temporary working set.
    """
    if chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    # An fp16 W1 (model.w1_dtype) is widened chunk by chunk (exact), never W2 narrowed: the
    # product is computed in the wider dtype (fp32 normally).
    dtype = compute_dtype(w1.dtype, w2.dtype)
    if out is None:
        out = torch.empty(w1.shape[0], w2.shape[1], dtype=dtype, device=w1.device)
    w2 = w2.to(device=w1.device, dtype=dtype)
    for start in range(0, w1.shape[0], chunk_rows):
        stop = min(start + chunk_rows, w1.shape[0])
        torch.mm(w1[start:stop].to(dtype), w2, out=out[start:stop])
    return out


def compute_dtype(w1: torch.dtype, w2: torch.dtype) -> torch.dtype:
    """The dtype W1 @ W2 is computed in: the wider of the two, at least float32."""
    return torch.promote_types(torch.promote_types(w1, w2), torch.float32)


@torch.no_grad()
def collapse(
    mlet: MLETEmbeddingBagCollection,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    device: torch.device | None = None,
) -> EmbeddingBagCollection:
    """Collapses a (materialized, unsharded) MLET module into a plain EmbeddingBagCollection.

    The result has the same table names, feature names, pooling, weighting and dimension d; its
    weights are W1 @ W2 for factorized tables and copies of W1 for ordinary ones. Its output equals
    the MLET module's output for every input (up to float rounding).

    Args:
        mlet: the trained module (W1 on a real device).
        chunk_rows: rows per chunked matmul.
        device: device of the result (default: W1's device).

    Returns:
        A ``torchrec.EmbeddingBagCollection`` with the served configs.
    """
    w1_weights = {name: bag.weight for name, bag in mlet.w1.embedding_bags.items()}
    if any(w.is_meta for w in w1_weights.values()):
        raise ValueError(
            "collapse() needs materialized W1 weights; this module is on the meta device "
            "(load a checkpoint into an unsharded model first, or use the sharded collapse)"
        )
    if device is None:
        device = next(iter(w1_weights.values())).device
    ebc = EmbeddingBagCollection(
        tables=mlet.embedding_bag_configs(),
        is_weighted=mlet.is_weighted(),
        device=torch.device("meta"),
    )
    ebc = ebc.to_empty(device=device)
    for cfg in mlet.mlet_configs():
        w1 = w1_weights[cfg.name]
        dst = ebc.embedding_bags[cfg.name].weight
        if inner_dim_of(cfg):
            collapse_rows(
                w1, mlet.projection.weights[cfg.name].detach(), out=dst, chunk_rows=chunk_rows
            )
        else:
            dst.copy_(w1)
    return ebc
