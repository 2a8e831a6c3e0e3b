"""Batching: Criteo-layout rows into TorchRec ``Batch`` objects, and the batch-source interface.

A batch holds dense (B, 13) float32, a ``KeyedJaggedTensor`` with keys ``cat_0..cat_25`` and one
id per sample and key, and labels (B,) float32 (:func:`to_batch`). :func:`make_batches` cuts an
epoch of in-memory rows into this rank's batches.

A batch source is one rank's view of one split. ``source.batches(epoch, start_batch)`` yields that
rank's batches, starting at batch ``start_batch`` of the epoch, and ``source.num_batches()`` says
how many there are per epoch. Every rank gets the same number of batches of the same size (the
forward of a sharded model is collective). A batch sequence is a pure function of (data, seed,
epoch, rank, world size, batch size): resuming at ``(epoch, batches_consumed)`` continues with
exactly the batches an uninterrupted run would have trained on next. Implementations:
:class:`ArrayBatchSource` (rows in memory, batched by :func:`make_batches`; global batch b is
split across the ranks) and :class:`mlet_dist.data.parquet.ParquetBatchSource` (preprocessed
shards, streamed). :func:`mlet_dist.data.sources.build_batch_source` picks the one a config asks
for.

Example::

    for batch in make_batches(train, 256, shuffle=True, seed=0, rank=0, world_size=2):
        ...  # batch.dense_features: (128, 13), batch.sparse_features: KJT with 26 keys
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mlet_dist.data.arrays import CAT_FEATURE_COUNT, DEFAULT_CAT_NAMES, CriteoArrays

__all__ = [
    "ArrayBatchSource",
    "BatchSource",
    "check_batch_split",
    "divisible_batch_size",
    "make_batches",
    "num_batches",
    "prefetch",
    "to_batch",
]


def divisible_batch_size(batch_size: int, world_size: int) -> int:
    """``batch_size`` rounded down to a multiple of ``world_size`` (at least one row per rank):
    the global batch of evaluation and of a model rebuilt at another world size."""
    return max(world_size, batch_size - batch_size % world_size)


def check_batch_split(batch_size: int, rank: int, world_size: int) -> None:
    """Every rank takes an equal slice of each global batch: the data package's one check of it.

    (:func:`mlet_dist.distributed.parallelize.check_batch_divisible` checks the config for the
    trainer; the data package does not import ``distributed``.)

    Raises:
        ValueError: a non-positive size, ``rank`` outside ``[0, world_size)``, or ``batch_size``
            not a multiple of ``world_size``.
    """
    if batch_size <= 0 or world_size <= 0:
        raise ValueError(
            f"batch_size ({batch_size}) and world_size ({world_size}) must be positive"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    if batch_size % world_size:
        raise ValueError(
            f"global batch size {batch_size} is not divisible by world_size {world_size}: use a "
            f"multiple of {world_size} (data.batch_size), e.g. {batch_size // world_size * world_size or world_size}"
        )


def check_position(epoch: int, start_batch: int, count: int) -> None:
    """Raises ValueError unless ``(epoch, start_batch)`` is a position of an epoch of ``count``
    batches."""
    if epoch < 0 or not 0 <= start_batch <= count:
        raise ValueError(
            f"position (epoch {epoch}, batch {start_batch}) is outside the epoch's {count} batches"
        )


def to_batch(arrays: CriteoArrays) -> Batch:
    """One TorchRec ``Batch`` of all rows of ``arrays``, in the layout of :func:`make_batches`.

    Args:
        arrays: the rows (labels float32, dense float32 (B, 13), sparse int64 (B, 26)).

    Returns:
        ``Batch(dense_features (B, 13) float32, sparse_features KJT, labels (B,) float32)``; the
        KJT has keys ``cat_0..cat_25`` and one id per sample and key (all lengths 1).
    """
    if not isinstance(arrays, CriteoArrays):  # FeatureRows of a declared schema
        return arrays.to_batch()
    batch_size = len(arrays)
    # KJT layout is key-major: all of cat_0's ids for the batch, then cat_1's, ...
    values = torch.from_numpy(np.ascontiguousarray(arrays.sparse.T, dtype=np.int64).reshape(-1))
    lengths = torch.ones(CAT_FEATURE_COUNT * batch_size, dtype=torch.int32)
    kjt = KeyedJaggedTensor(
        keys=list(DEFAULT_CAT_NAMES), values=values, lengths=lengths, stride=batch_size
    )
    return Batch(
        dense_features=torch.from_numpy(np.ascontiguousarray(arrays.dense, dtype=np.float32)),
        sparse_features=kjt,
        labels=torch.from_numpy(np.ascontiguousarray(arrays.labels, dtype=np.float32)),
    )


def _batch_of_rows(arrays: CriteoArrays, rows: np.ndarray) -> Batch:
    if not isinstance(arrays, CriteoArrays):  # FeatureRows of a declared schema
        return arrays.take(rows).to_batch()
    return to_batch(CriteoArrays(arrays.labels[rows], arrays.dense[rows], arrays.sparse[rows]))


def num_batches(n_rows: int, batch_size: int, *, drop_last: bool, world_size: int = 1) -> int:
    """Number of batches each rank gets from :func:`make_batches` (same arguments)."""
    full, tail = divmod(n_rows, batch_size)
    return full + int(not drop_last and tail // world_size > 0)


def make_batches(
    arrays: CriteoArrays,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    start_batch: int = 0,
) -> Iterator[Batch]:
    """Yields this rank's TorchRec batches over one epoch of ``arrays``.

    ``batch_size`` is the global batch size: global batch b covers rows ``b*batch_size`` ..
    of the (optionally shuffled) row order, and rank r gets its contiguous r-th
    ``batch_size // world_size`` slice of it. Every rank yields the same number of batches.
    The last, incomplete global batch (``drop_last=False``) is split evenly too: each rank gets
    ``tail // world_size`` rows and the ``tail % world_size`` leftover rows (fewer than
    ``world_size``) are skipped this epoch; with a single rank nothing is skipped.

    Args:
        arrays: the rows.
        batch_size: global batch size; must be divisible by ``world_size``.
        shuffle: visit the rows in a seeded random order (the same permutation on every rank).
        seed: seed of the permutation; pass a different one per epoch for a new order.
        drop_last: drop the last incomplete global batch.
        rank: this process' rank, in [0, world_size).
        world_size: number of data-parallel ranks.
        start_batch: skip the first ``start_batch`` batches without building them (resume
            mid-epoch with the same seed: the remaining batches are exactly those of a full run).

    Returns:
        An iterator of ``Batch(dense_features (B, 13) float32, sparse_features KJT, labels (B,) float32)``; the
        KJT has keys ``cat_0..cat_25`` and one id per sample and key (all lengths 1).

    Raises:
        ValueError: non-positive sizes, rank out of range, or batch_size not divisible by
            world_size.

    Example::

        for batch in make_batches(train, 1024, shuffle=True, seed=epoch, rank=rank, world_size=4):
            batch.sparse_features["cat_3"].values()  # 256 ids of feature C4 on this rank
    """
    check_batch_split(batch_size, rank, world_size)
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    n = len(arrays)
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    count = num_batches(n, batch_size, drop_last=drop_last, world_size=world_size)
    # A nested generator, so that bad arguments raise at the call rather than at the first next().
    return _iter_batches(arrays, order, batch_size, start_batch, count, rank, world_size)


def _iter_batches(
    arrays: CriteoArrays,
    order: np.ndarray,
    batch_size: int,
    start_batch: int,
    count: int,
    rank: int,
    world_size: int,
) -> Iterator[Batch]:
    n = order.shape[0]
    local = batch_size // world_size
    for b in range(start_batch, count):
        start = b * batch_size
        # Full batches: `local` rows per rank; the tail: an equal share per rank.
        share = min(local, (n - start) // world_size)
        begin = start + rank * share
        yield _batch_of_rows(arrays, order[begin : begin + share])


@runtime_checkable
class BatchSource(Protocol):
    """One rank's batches of one split (see the module docstring)."""

    def num_batches(self) -> int:
        """Batches per epoch on this rank; the same on every rank."""
        ...

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """This rank's batches ``start_batch, start_batch + 1, ...`` of epoch ``epoch``."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the batch sequence depends on (to store with a checkpoint and compare on resume)."""
        ...


class ArrayBatchSource:
    """Batches of rows held in memory, through :func:`make_batches`.

    Epoch e uses the permutation seed ``seed * 100003 + e`` (the trainer's formula).

    Args:
        arrays: the split's rows.
        batch_size: global batch size (a multiple of ``world_size``).
        rank: this process' rank.
        world_size: number of data-parallel ranks.
        seed: base seed of the per-epoch permutations.
        shuffle: visit rows in a new seeded order each epoch.
        drop_last: drop the final incomplete global batch.
        pin_memory: return batches in pinned memory (for asynchronous copies to cuda).
    """

    def __init__(
        self,
        arrays: CriteoArrays,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        pin_memory: bool = False,
    ) -> None:
        check_batch_split(batch_size, rank, world_size)
        self.arrays = arrays
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.pin_memory = pin_memory

    def num_batches(self) -> int:
        return num_batches(
            len(self.arrays), self.batch_size, drop_last=self.drop_last, world_size=self.world_size
        )

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        check_position(epoch, start_batch, self.num_batches())
        it = make_batches(
            self.arrays,
            self.batch_size,
            shuffle=self.shuffle,
            seed=self.seed * 100003 + epoch,
            drop_last=self.drop_last,
            rank=self.rank,
            world_size=self.world_size,
            start_batch=start_batch,
        )
        return (b.pin_memory() for b in it) if self.pin_memory else it

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "arrays",
            "rows": len(self.arrays),
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()


def prefetch(batches: Iterator[Batch], depth: int) -> Iterator[Batch]:
    """Runs ``batches`` in a background thread, ``depth`` items ahead; errors are re-raised here.

    Closing the returned generator (e.g. leaving a for loop early) stops the thread.
    """
    if depth <= 0:
        yield from batches
        return
    items: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work() -> None:
        try:
            for batch in batches:
                if not put(batch):
                    return
            put(_END)
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(_Failure(e))

    thread = threading.Thread(target=work, name="mlet-batch-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()
        batches.close()  # type: ignore[attr-defined]
