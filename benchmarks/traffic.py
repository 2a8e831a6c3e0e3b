"""Batches that look like real traffic for the train benchmark (``bench.batches = "zipf"``).

Cycling a few pre-made batches flatters the caches (the same few thousand rows every step) and
lets the loss fall to ~0 within tens of steps, which hides what the optimizer costs on real data.
Here every timed step gets a batch never seen before, drawn from the synthetic generator of
:mod:`mlet_dist.data.synthetic_teacher` (the ``[synthetic]`` section: Zipf exponent,
cardinalities, seed, the teacher that labels the rows). The ids take the road of the synthetic
day files through the reader: Zipf rank -> the generator's 32-bit hash -> modulo the table's rows
(a missing id is 0, as the reader reports it), so the frequent rows are scattered over the table,
not packed at its start.

Multi-hot (``bench.ids_per_bag``, like the synthetic multi-hot Criteo of MLPerf DLRMv2): feature
j has ``ids_per_bag[j]`` ids per bag, pooled by the model's pooling (SUM in the bench configs).
The first id of a bag is the row's one-hot id (the one the teacher's label depends on); the others
are further independent draws from the feature's Zipf law. (TorchRec's DLRMv2 generator draws them
as offsets near the first id; the Zipf draw keeps the popularity skew of every id.)

The pool is drawn once per (world size, data shape) by the orchestrating process, before any
measurement, and saved as one ``.npz`` per rank; a rank loads its file before building the model,
so neither drawing nor loading is on the timed path, and the bytes the batches take are reported
apart from the model's. Global batch ``i`` is the same rows at every world size; rank ``r`` takes
rows ``[r * B / W, (r + 1) * B / W)`` of it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

# TorchRec's TrainPipelineSparseDist holds two batches beyond the one it trains (it reads batch
# i + 2 while training batch i), so a pipelined run reads this many batches more than it trains.
PIPELINE_LOOKAHEAD = 2
_MASK32 = (1 << 32) - 1
# DLRMv2 (MLPerf, synthetic multi-hot Criteo): ids per bag of the 26 features.
DLRMV2_IDS_PER_BAG = [
    3,
    2,
    1,
    2,
    6,
    1,
    1,
    1,
    1,
    7,
    3,
    8,
    1,
    6,
    9,
    5,
    1,
    1,
    1,
    12,
    100,
    27,
    10,
    3,
    1,
    1,
]


def bag_sizes(ids_per_bag: list[int], features: int) -> list[int]:
    """Ids per bag of every feature: [] -> all 1 (one-hot), [n] -> all n, else the list itself."""
    if not ids_per_bag:
        return [1] * features
    if len(ids_per_bag) == 1:
        return ids_per_bag * features
    return list(ids_per_bag)


def batches_needed(bench, pipelined: bool) -> int:
    """Batches one measurement reads: warm-up + timed steps (+ the pipeline's lookahead)."""
    steps = bench.warmup_steps + bench.windows * bench.steps_per_window
    return steps + (PIPELINE_LOOKAHEAD if pipelined else 0)


def pool_key(cfg, world_size: int, n_batches: int, ids_per_bag: list[int], seed: int) -> str:
    """What a pool depends on (measurements with equal keys share one pool)."""
    return json.dumps(
        [
            cfg.data.batch_size,
            cfg.data.num_embeddings_per_feature,
            dataclasses.asdict(cfg.synthetic),
            world_size,
            n_batches,
            ids_per_bag,
            seed,
        ],
        sort_keys=True,
        default=str,
    )


def draw_global_batches(
    cfg, n_batches: int, ids_per_bag: list[int], seed: int, teacher: Any = None
) -> dict[str, np.ndarray]:
    """``n_batches`` global batches of ``cfg.data.batch_size`` rows from the Zipf generator.

    Args:
        cfg: the mlet_dist config (``[synthetic]`` draws the rows, ``data`` gives the batch size
            and the table sizes).
        n_batches: global batches to draw.
        ids_per_bag: see :func:`bag_sizes`.
        seed: seed of the draw (the teacher is the one of ``synthetic.seed``).
        teacher: ``build_teacher(cfg.synthetic)`` if already built.

    Returns:
        ``labels`` (n, B) float32, ``dense`` (n, B, 13) float32 (the reader's
        ``log(1 + max(x, 0))``, missing = 0) and ``ids``: per feature j an (n, B, L_j) int64
        array of table rows, in the dict under ``ids_<j>``.
    """
    from mlet_dist.data.synthetic_teacher import build_teacher, sample_rows

    syn = cfg.synthetic
    teacher = build_teacher(syn) if teacher is None else teacher
    sizes = np.asarray(cfg.data.num_embeddings_per_feature, dtype=np.int64)
    lengths = bag_sizes(ids_per_bag, len(sizes))
    b = cfg.data.batch_size
    n = n_batches * b
    rng = np.random.default_rng([seed, 0xBE4C])
    rows = sample_rows(teacher, syn, rng, n)
    dense = np.where(rows.dense_missing, 0, np.maximum(rows.dense, 0)).astype(np.float64)
    out = {
        "labels": rows.labels.astype(np.float32).reshape(n_batches, b),
        "dense": np.log1p(dense).astype(np.float32).reshape(n_batches, b, -1),
    }
    first = np.where(rows.hashes < 0, 0, rows.hashes) % sizes  # the reader: missing -> 0
    for j, length in enumerate(lengths):
        ids = np.empty((n, length), dtype=np.int64)
        ids[:, 0] = first[:, j]
        if length > 1:
            cdf = teacher.zipf_cdfs[j]
            ranks = np.searchsorted(cdf, rng.random((n, length - 1)), side="right")
            ranks = np.minimum(ranks, cdf.shape[0] - 1).astype(np.uint64)
            # Teacher.hash_ids, for one feature (it takes all 26 columns at once).
            hashed = (ranks * teacher.hash_mult[j] + teacher.hash_offset[j]) & np.uint64(_MASK32)
            ids[:, 1:] = hashed.astype(np.int64) % sizes[j]
        out[f"ids_{j}"] = ids.reshape(n_batches, b, length)
    return out


def write_rank_pools(
    cfg, world_size: int, n_batches: int, ids_per_bag: list[int], seed: int, out_dir: Path
) -> list[Path]:
    """Draws the pool and writes each rank's share to ``out_dir/pool_<ws>_<rank>.npz``."""
    drawn = draw_global_batches(cfg, n_batches, ids_per_bag, seed)
    local = cfg.data.batch_size // world_size
    paths = []
    for rank in range(world_size):
        part = {k: v[:, rank * local : (rank + 1) * local] for k, v in drawn.items()}
        path = Path(out_dir) / f"pool_{world_size}_{rank}.npz"
        np.savez(path, **part)
        paths.append(path)
    return paths


def load_pool(path: str | Path) -> list[Any]:
    """The TorchRec ``Batch`` es of one rank's pool file (CPU tensors, KJT keys cat_0..cat_25,
    lengths = ids per bag)."""
    import torch
    from torchrec.datasets.utils import Batch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from mlet_dist.data.arrays import DEFAULT_CAT_NAMES

    with np.load(path) as f:
        labels, dense = f["labels"], f["dense"]
        ids = [f[f"ids_{j}"] for j in range(len(DEFAULT_CAT_NAMES))]
    n, b = labels.shape
    lengths = torch.from_numpy(np.repeat(np.array([a.shape[2] for a in ids], dtype=np.int32), b))
    out = []
    for i in range(n):
        # KJT layout is key-major: all of cat_0's bags (each bag's ids in order), then cat_1's.
        values = torch.from_numpy(np.concatenate([a[i].reshape(-1) for a in ids]))
        kjt = KeyedJaggedTensor(
            keys=list(DEFAULT_CAT_NAMES), values=values, lengths=lengths.clone(), stride=b
        )
        out.append(
            Batch(
                dense_features=torch.from_numpy(np.ascontiguousarray(dense[i])),
                sparse_features=kjt,
                labels=torch.from_numpy(np.ascontiguousarray(labels[i])),
            )
        )
    return out


def batch_bytes(batches: list[Any]) -> int:
    """Bytes the tensors of these batches hold (values, lengths, dense, labels)."""
    total = 0
    for b in batches:
        kjt = b.sparse_features
        for t in (kjt.values(), kjt.lengths(), b.dense_features, b.labels):
            total += t.numel() * t.element_size()
    return total
