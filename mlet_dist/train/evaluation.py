"""Evaluation of a (sharded) model: one streamed loop over a batch source, one gather.

Rows in memory go through the array batch source, a preprocessed Parquet split through the
Parquet source; either way every rank runs the model on its share of each global batch and the
shares are gathered once, each row carrying its position in the source's batch sequence (global
batch b is the ranks' slices in rank order) and, for the per-bucket metrics, the training count of
its rarest id (:mod:`mlet_dist.quality`). For rows in memory the position is the row index, so the
gathered predictions are put back in row order. Batches with sample weights (``data.weight``)
carry them to the gather, and every metric, per bucket too, is weighted
(:func:`mlet_dist.metrics.binary_metrics`).

Rows in memory are all evaluated once: the batch source leaves out the last ``len(arrays) %
world_size`` rows (fewer than world_size) of the final, partial batch; those are evaluated in one
extra batch padded with copies of the last row to one row per rank, and the padded predictions are
dropped. A streamed Parquet split may leave out fewer than world_size rows (see the loader).

With ``pipelined`` (training under ``train.pipeline = 'sparse_dist'``) the batches go through
TorchRec's ``EvalPipelineSparseDist``: batch i+1's input all-to-all and device copy overlap batch
i's forward, the same forwards as the plain loop (tests/test_pipeline.py compares them).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torchrec.datasets.utils import Batch
from torchrec.distributed.train_pipeline import EvalPipelineSparseDist
from tqdm import tqdm

from mlet_dist.config import Config
from mlet_dist.data import (
    ArrayBatchSource,
    CriteoArrays,
    build_batch_source,
    divisible_batch_size,
)
from mlet_dist.distributed.parallelize import DistEnv
from mlet_dist.metrics import binary_metrics
from mlet_dist.quality import bucket_metrics, rarest_bag_id_count, rarest_id_count
from mlet_dist.schema import FeatureSchema


@dataclass
class Predictions:
    """Every rank's predictions, gathered, ordered by position (row order for rows in memory)."""

    logits: torch.Tensor
    """(N,) float32."""
    labels: torch.Tensor
    """(N,) float32."""
    rarest: np.ndarray | None
    """(N,) training count of each row's rarest id (None without id counts)."""
    weights: torch.Tensor | None = None
    """(N,) float32 sample weights (None: unweighted)."""


def evaluate(
    model: torch.nn.Module,
    cfg: Config,
    env: DistEnv,
    arrays: CriteoArrays | None,
    split: str = "eval",
    id_counts: list[np.ndarray] | None = None,
    pipelined: bool = False,
    schema: FeatureSchema | None = None,
) -> dict[str, Any]:
    """Metrics of a (sharded) model on rows in memory, or on the streamed Parquet ``split`` when
    ``arrays`` is None. Collective. ``pipelined``: through TorchRec's eval pipeline; ``schema``:
    the run's (None: derived from ``cfg.data`` where the shards are read).

    With ``id_counts`` (training-split id occurrences, :func:`mlet_dist.quality.id_counts`)
    the metrics are also reported per id-frequency bucket (``"buckets"``, see
    :mod:`mlet_dist.quality`).
    """
    if arrays is None:
        source = build_batch_source(
            cfg.data, split, rank=env.rank, world_size=env.world_size,
            seed=cfg.train.seed, training=False, device=env.device, schema=schema,
        )  # fmt: skip
        preds = predictions(model, source.batches(0), env, id_counts, pipelined=pipelined)
    else:
        preds = predict_arrays(
            model, arrays, cfg.data.eval_batch_size, env, id_counts, pipelined=pipelined
        )
    metrics: dict[str, Any] = binary_metrics(preds.logits, preds.labels, preds.weights)
    if preds.rarest is not None:
        metrics["buckets"] = bucket_metrics(
            preds.logits, preds.labels, preds.rarest, weights=preds.weights
        )
    return metrics


def predict(
    model: torch.nn.Module, arrays: CriteoArrays, batch_size: int, env: DistEnv
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs a (sharded) DLRMTrain over every row; returns all logits and labels, in row order.

    Collective: every rank passes the same rows and gets the same result (each global batch is
    split across the ranks and the pieces are gathered back; see the module docstring).
    """
    preds = predict_arrays(model, arrays, batch_size, env)
    return preds.logits, preds.labels


def predict_arrays(
    model: torch.nn.Module,
    arrays: CriteoArrays,
    batch_size: int,
    env: DistEnv,
    id_counts: list[np.ndarray] | None = None,
    pipelined: bool = False,
) -> Predictions:
    """:func:`predictions` of every row in memory, in row order (``batch_size``: global, rounded
    down to a multiple of the world size)."""
    batch_size = divisible_batch_size(batch_size, env.world_size)
    batches = array_batches(arrays, batch_size, env)
    return predictions(model, batches, env, id_counts, rows=len(arrays), pipelined=pipelined)


def array_batches(arrays: CriteoArrays, batch_size: int, env: DistEnv) -> Iterator[Batch]:
    """This rank's evaluation batches of every row in memory: the array batch source's batches,
    then (when ``len(arrays) % world_size`` rows are left over) one batch of the leftover rows
    padded with copies of the last row to one row per rank."""
    pin = env.device.type == "cuda"
    common = dict(rank=env.rank, world_size=env.world_size, shuffle=False, drop_last=False)
    source = ArrayBatchSource(arrays, batch_size, pin_memory=pin, **common)
    n, left = len(arrays), len(arrays) % env.world_size
    if not left:
        return source.batches(0)
    pad = np.concatenate([np.arange(n - left, n), np.full(env.world_size - left, n - 1)])
    rest = arrays.take(pad)
    extra = ArrayBatchSource(rest, env.world_size, pin_memory=pin, **common)
    return itertools.chain(source.batches(0), extra.batches(0))


def predictions(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    env: DistEnv,
    id_counts: list[np.ndarray] | None = None,
    rows: int | None = None,
    pipelined: bool = False,
) -> Predictions:
    """The evaluation loop: this rank's batches through the model, then one gather. Collective.

    Args:
        batches: this rank's batches; every rank yields the same number of the same size.
        id_counts: per feature, the training count of every id (for :attr:`Predictions.rarest`).
        rows: keep the positions below it (drops the padding of :func:`array_batches`).
        pipelined: run the forwards through TorchRec's ``EvalPipelineSparseDist``.
    """
    local = local_predictions(model, batches, env, id_counts, pipelined, rows)
    if env.world_size == 1:
        merged = local
    else:
        gathered: list[Any] = [None] * env.world_size
        dist.all_gather_object(gathered, local)
        merged = {k: torch.cat([g[k] for g in gathered]) for k in local}
    order = torch.argsort(merged["position"], stable=True)
    if rows is not None:
        order = order[merged["position"][order] < rows]
    rarest, weights = merged.get("rarest"), merged.get("weights")
    return Predictions(
        logits=merged["logits"][order],
        labels=merged["labels"][order],
        rarest=None if rarest is None else rarest[order].numpy(),
        weights=None if weights is None else weights[order],
    )


@torch.no_grad()
def local_predictions(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    env: DistEnv,
    id_counts: list[np.ndarray] | None = None,
    pipelined: bool = False,
    rows: int | None = None,
) -> dict[str, torch.Tensor]:
    """This rank's logits, labels and row positions (and rarest-id counts, and the batches'
    sample weights when they have them), on the CPU. Rank 0 shows a progress bar of all ranks'
    rows on a terminal (of ``rows`` rows, with its ETA, when known).

    Position of row i of this rank's batch b (of s rows): ``offset_b + rank * s + i``, where
    ``offset_b`` counts the rows of all ranks' earlier batches.
    """
    was_training = model.training
    model.eval()
    out: dict[str, list[torch.Tensor]] = {
        "logits": [torch.zeros(0)],
        "labels": [torch.zeros(0)],
        "position": [torch.zeros(0, dtype=torch.int64)],
    }
    if id_counts is not None:
        out["rarest"] = [torch.zeros(0, dtype=torch.int64)]
    offset = 0
    bar = tqdm(
        desc="evaluate", total=rows, unit=" rows", leave=False, mininterval=1.0,
        disable=True if env.rank else None,  # None: on a terminal only
    )  # fmt: skip
    try:
        for batch, output in _forwards(model, batches, env.device, pipelined):
            size = batch.labels.numel()
            bar.update(min(size * env.world_size, rows - bar.n) if rows else size * env.world_size)
            out["position"].append(offset + env.rank * size + torch.arange(size))
            offset += size * env.world_size
            if id_counts is not None:
                rarest = rarest_of_batch(batch.sparse_features, size, id_counts)
                out["rarest"].append(torch.from_numpy(rarest).long())
            logits, labels = output[1], output[2]
            out["logits"].append(logits.float().cpu())
            out["labels"].append(labels.float().cpu())
            weights = getattr(batch, "weights", None)
            if weights is not None:
                out.setdefault("weights", [torch.zeros(0)]).append(weights.float().cpu())
    finally:
        bar.close()
        model.train(was_training)
    return {k: torch.cat(v) for k, v in out.items()}


def _forwards(
    model: torch.nn.Module, batches: Iterable[Batch], device: torch.device, pipelined: bool
) -> Iterator[tuple[Batch, Any]]:
    """Each batch (as read, on the CPU) with the model's output ``(loss, logits, labels)``, in
    order: plain forwards, or TorchRec's ``EvalPipelineSparseDist`` (it reads batches ahead in a
    thread; the batches it took are queued here and paired with its outputs in order)."""
    if not pipelined:
        for batch in batches:
            yield batch, model(batch.to(device, non_blocking=True))[1]
        return
    read: deque[Batch] = deque()

    def feed() -> Iterator[Batch]:
        for batch in batches:
            read.append(batch)
            yield batch

    # (no optimizer: the eval pipeline runs forwards only)
    pipe = EvalPipelineSparseDist(model, None, device)  # type: ignore[arg-type]
    stream = feed()
    try:
        while True:
            try:
                output = pipe.progress(stream)
            except StopIteration:
                return
            yield read.popleft(), output
    finally:
        pipe.detach()  # the model's own forwards again
        pipe.reset()  # stops its reading thread


def rarest_of_batch(kjt: Any, size: int, id_counts: list[np.ndarray]) -> np.ndarray:
    """(size,) training count of each row's rarest id in a batch's KJT (feature-major): every id
    of every bag (:func:`mlet_dist.quality.rarest_bag_id_count`); with one id per row and feature
    (Criteo) the KJT's values are the (F, size) id matrix."""
    values, lengths = kjt.values().cpu(), kjt.lengths().cpu()
    if values.numel() == lengths.numel():
        return rarest_id_count(values.reshape(-1, size).T.numpy(), id_counts)
    per_feature = lengths.reshape(-1, size)
    chunks = torch.split(values, per_feature.sum(dim=1).tolist())
    return rarest_bag_id_count(
        [c.numpy() for c in chunks], [n.numpy() for n in per_feature], id_counts
    )
