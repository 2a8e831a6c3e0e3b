"""Batch sources: one interface for in-memory TSV rows and streamed Parquet shards.

A batch source is one rank's view of one split. ``source.batches(epoch, start_batch)`` yields that
rank's TorchRec ``Batch`` objects (dense (B, 13) float32, a KJT with keys ``cat_0..cat_25`` and
one id per sample and key, labels (B,) float32: the layout of
:func:`mlet_dist.data.criteo.make_batches`), starting at batch ``start_batch`` of the epoch, and
``source.num_batches()`` says how many there are per epoch. Every rank gets the same number of
batches of the same size (the forward of a sharded model is collective). A batch sequence is a
pure function of (data, seed, epoch, rank, world size, batch size): resuming at
``(epoch, batches_consumed)`` continues with exactly the batches an uninterrupted run would
have trained on next.

Two implementations:

- :class:`ArrayBatchSource`: rows already in memory (TSV files read with ``read_criteo_tsv``),
  batched by ``make_batches`` (global batch b is split across the ranks).
- :class:`ParquetBatchSource`: the shards of ``mlet-dist preprocess``, streamed. Each epoch, the
  row groups of the split are put in a seeded random order and the resulting sequence of N rows is
  cut into ``world_size`` contiguous ranges of ``N // world_size`` rows; rank r reads only the row
  groups of its range (a row group on a boundary is read by both neighbours, each keeping its
  rows). Within a rank, rows are shuffled in consecutive windows of ``shuffle_buffer_rows``
  (seeded by seed, epoch, rank and window), which bounds memory and makes any position reachable
  by reading from the start of its window only. A background thread reads, shuffles, batches and
  (for cuda) pins memory ``prefetch_batches`` batches ahead.

Uneven tail (ParquetBatchSource): the last ``N % world_size`` rows of the epoch's row order (fewer
than the world size; different rows each epoch when shuffling) are left out so that every rank has
the same number of rows; each rank then yields ``n // (B / world_size)`` full batches and, without
``drop_last``, one smaller final batch of the same size on every rank. With one rank every row is
used. The batch counts and sizes equal those of ``make_batches`` for the same N.

Example::

    source = build_batch_source(cfg.data, "train", rank=rank, world_size=world, seed=cfg.train.seed,
                                arrays=splits.train, device=device)
    for i, batch in enumerate(source.batches(epoch, start_batch), start=start_batch):
        loss, _ = model(batch.to(device, non_blocking=True))
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pyarrow.parquet as pq
import torch
from torchrec.datasets.utils import Batch

from mlet_dist.config import ConfigError, DataConfig
from mlet_dist.data.criteo import (
    DEFAULT_CAT_NAMES,
    DEFAULT_INT_NAMES,
    CriteoArrays,
    make_batches,
    num_batches,
    to_batch,
)
from mlet_dist.data.preprocess import read_shard_metadata

logger = logging.getLogger(__name__)

__all__ = [
    "ArrayBatchSource",
    "BatchSource",
    "ParquetBatchSource",
    "build_batch_source",
]

_COLUMNS = ["label", *DEFAULT_INT_NAMES, *DEFAULT_CAT_NAMES]


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


def _check_rank(batch_size: int, rank: int, world_size: int) -> None:
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    if batch_size <= 0 or batch_size % world_size:
        raise ValueError(
            f"global batch size {batch_size} must be a positive multiple of world_size "
            f"{world_size} (data.batch_size)"
        )


def _check_position(epoch: int, start_batch: int, count: int) -> None:
    if epoch < 0 or not 0 <= start_batch <= count:
        raise ValueError(
            f"position (epoch {epoch}, batch {start_batch}) is outside the epoch's {count} batches"
        )


class ArrayBatchSource:
    """Batches of rows held in memory, through :func:`~mlet_dist.data.criteo.make_batches`.

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
        _check_rank(batch_size, rank, world_size)
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
        _check_position(epoch, start_batch, self.num_batches())
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


class ParquetBatchSource:
    """Streams the Parquet shards of one split to one rank (see the module docstring).

    Args:
        path: a split directory of ``mlet-dist preprocess`` output (e.g. ``OUT/train``; every
            ``*.parquet`` in it, in name order) or a list of Parquet files.
        batch_size: global batch size (a multiple of ``world_size``); the rank's batches have
            ``batch_size // world_size`` rows.
        rank: this process' rank.
        world_size: number of data-parallel ranks.
        seed: seed of the row-group order and of the window shuffles.
        shuffle: shuffle row groups and rows within windows each epoch (False: file order).
        drop_last: drop the final incomplete batch (True for training).
        shuffle_buffer_rows: rows per shuffle window (0 = shuffle row groups only).
        prefetch_batches: batches prepared ahead by a background thread (0 = none).
        pin_memory: return batches in pinned memory (for asynchronous copies to cuda).
        num_embeddings_per_feature: if given, the table sizes the shards must have been hashed
            for (ids would otherwise fall outside the tables).

    Raises:
        ConfigError: no shards, shards of other table sizes, or unreadable/incompatible files.
    """

    def __init__(
        self,
        path: str | Path | Sequence[str | Path],
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        shuffle_buffer_rows: int = 262144,
        prefetch_batches: int = 4,
        pin_memory: bool = False,
        num_embeddings_per_feature: Sequence[int] | None = None,
    ) -> None:
        _check_rank(batch_size, rank, world_size)
        if shuffle_buffer_rows < 0 or prefetch_batches < 0:
            raise ValueError("shuffle_buffer_rows and prefetch_batches must be >= 0")
        if isinstance(path, (str, Path)):
            root = Path(path)
            files = sorted(p for p in root.glob("*.parquet") if not p.name.startswith("."))
            if not files:
                raise ConfigError(
                    f"{root} holds no Parquet shards; run `mlet-dist preprocess` first (its output "
                    f"has train/, eval/ and test/ directories under data.parquet_dir)"
                )
        else:
            files = [Path(p) for p in path]
        self.files = files
        self.batch_size = batch_size
        self.local_batch = batch_size // world_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.shuffle_buffer_rows = shuffle_buffer_rows
        self.prefetch_batches = prefetch_batches
        self.pin_memory = pin_memory
        groups = []  # (file index, row group index, rows)
        for i, f in enumerate(files):
            try:
                meta = pq.read_metadata(f)
            except (OSError, ValueError) as e:
                raise ConfigError(f"{f}: not a readable Parquet file ({e})") from e
            missing = [c for c in _COLUMNS if c not in meta.schema.names]
            if missing:
                raise ConfigError(
                    f"{f} lacks the columns {missing[:5]}...; it was not written by "
                    f"`mlet-dist preprocess`"
                )
            sizes = read_shard_metadata(meta.schema.to_arrow_schema()).get(
                "num_embeddings_per_feature"
            )
            if num_embeddings_per_feature is not None and sizes is not None:
                if list(sizes) != [int(s) for s in num_embeddings_per_feature]:
                    raise ConfigError(
                        f"{f} was hashed for table sizes {sizes}, but the model has "
                        f"{list(num_embeddings_per_feature)} (data.num_embeddings_per_feature); "
                        f"preprocess again with the model's sizes"
                    )
            groups += [(i, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
        self._groups = np.array(groups, dtype=np.int64).reshape(-1, 3)
        self.num_rows = int(self._groups[:, 2].sum())
        self.rows_per_rank = self.num_rows // world_size

    # -- the epoch plan -------------------------------------------------------------------------
    def num_batches(self) -> int:
        full, tail = divmod(self.rows_per_rank, self.local_batch)
        return full + int(not self.drop_last and tail > 0)

    def _rows_this_epoch(self) -> int:
        n = self.num_batches() * self.local_batch
        return min(n, self.rows_per_rank)

    def _segments(self, epoch: int) -> list[tuple[int, int, int, int]]:
        """This rank's ``(file, row group, first row, stop row)`` pieces in stream order."""
        order = (
            np.random.default_rng([self.seed, epoch]).permutation(len(self._groups))
            if self.shuffle
            else np.arange(len(self._groups))
        )
        rows = self._groups[order, 2]
        ends = np.cumsum(rows)
        lo = self.rank * self.rows_per_rank
        hi = lo + self.rows_per_rank
        segments = []
        for k in range(int(np.searchsorted(ends, lo, side="right")), len(order)):
            begin = int(ends[k] - rows[k])
            if begin >= hi:
                break
            f, g, n = (int(v) for v in self._groups[order[k]])
            a, b = max(lo, begin) - begin, min(hi, begin + n) - begin
            if a < b:
                segments.append((f, g, a, b))
        return segments

    def _window_rows(self) -> int:
        return self.shuffle_buffer_rows if self.shuffle and self.shuffle_buffer_rows else 0

    # -- reading --------------------------------------------------------------------------------
    def _read_stream(self, epoch: int, offset: int) -> Iterator[CriteoArrays]:
        """The rank's rows in stored (pre-window-shuffle) order from row ``offset`` on; row groups
        before the offset are not read."""
        handles: dict[int, pq.ParquetFile] = {}
        try:
            position = 0
            for f, g, a, b in self._segments(epoch):
                if position + (b - a) <= offset:
                    position += b - a
                    continue
                skip = max(offset - position, 0)
                position += b - a
                if f not in handles:
                    handles[f] = pq.ParquetFile(self.files[f])
                table = handles[f].read_row_group(g, columns=_COLUMNS)
                labels = table.column("label").to_numpy().astype(np.float32)
                dense = np.stack([table.column(c).to_numpy() for c in DEFAULT_INT_NAMES], axis=1)
                # Key-major (26, n): to_batch's transposition of `.T` is then a no-op view.
                sparse = np.stack(
                    [table.column(c).to_numpy().astype(np.int64) for c in DEFAULT_CAT_NAMES]
                )
                lo, hi = a + skip, b
                yield CriteoArrays(labels[lo:hi], dense[lo:hi], sparse[:, lo:hi].T)
        finally:
            for h in handles.values():
                h.close()

    def _shuffled_rows(self, epoch: int, start: int) -> Iterator[CriteoArrays]:
        """The rank's rows in training order from row ``start`` on (window shuffle applied)."""
        window = self._window_rows()
        if not window:
            yield from self._read_stream(epoch, start)
            return
        k = start // window
        skip = start - k * window
        pieces: list[CriteoArrays] = []
        held = 0
        stream = self._read_stream(epoch, k * window)
        while True:
            piece = next(stream, None)
            if piece is not None:
                pieces.append(piece)
                held += len(piece)
            while held >= window or (piece is None and held):
                whole = CriteoArrays.concat(pieces)
                take = min(window, len(whole))
                perm = np.random.default_rng([self.seed, epoch, self.rank, k]).permutation(take)
                rows = perm[skip:]
                yield CriteoArrays(whole.labels[rows], whole.dense[rows], whole.sparse.T[:, rows].T)
                pieces = [whole.slice(take, len(whole))]
                held = len(whole) - take
                k, skip = k + 1, 0
            if piece is None:
                return

    def _make_batches(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        if start_batch >= self.num_batches():
            return
        local = self.local_batch
        stop = self._rows_this_epoch()
        position = start_batch * local
        pieces: list[CriteoArrays] = []
        held = 0
        for piece in self._shuffled_rows(epoch, position):
            piece = piece.slice(0, min(len(piece), stop - position - held))
            pieces.append(piece)
            held += len(piece)
            while held >= local or (position + held >= stop and held):
                whole = CriteoArrays.concat(pieces) if len(pieces) > 1 else pieces[0]
                size = min(local, held)
                batch = to_batch(whole.slice(0, size))
                yield batch.pin_memory() if self.pin_memory else batch
                pieces = [whole.slice(size, len(whole))]
                held -= size
                position += size
            if position >= stop:
                return

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        _check_position(epoch, start_batch, self.num_batches())
        return _prefetch(self._make_batches(epoch, start_batch), self.prefetch_batches)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "parquet",
            "files": [f.name for f in self.files],
            "rows": self.num_rows,
            "row_groups": len(self._groups),
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shuffle_buffer_rows": self.shuffle_buffer_rows,
            "drop_last": self.drop_last,
        }


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()


def _prefetch(batches: Iterator[Batch], depth: int) -> Iterator[Batch]:
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


def build_batch_source(
    data_cfg: DataConfig,
    split: str,
    *,
    rank: int,
    world_size: int,
    seed: int,
    arrays: CriteoArrays | None = None,
    training: bool | None = None,
    device: torch.device | str | None = None,
) -> BatchSource:
    """The batch source a config asks for: Parquet streaming or in-memory rows.

    Args:
        data_cfg: the [data] section; ``source = 'parquet'`` streams ``parquet_dir/<split>``,
            any other source batches ``arrays``.
        split: 'train', 'eval' or 'test'.
        rank: this process' rank.
        world_size: number of data-parallel ranks.
        seed: base seed of the data order (train.seed).
        arrays: the split's rows, for the in-memory sources (e.g. ``load_splits(cfg).train``).
        training: training order (shuffled per ``data.shuffle``, ``batch_size``, incomplete last
            batch dropped) or evaluation order (file order, ``eval_batch_size`` rounded down to a
            multiple of the world size, all batches). Default: ``split == 'train'``.
        device: the training device; batches are pinned when it is cuda.

    Returns:
        A :class:`BatchSource`.

    Raises:
        ConfigError: parquet without ``data.parquet_dir`` or without shards; an in-memory source
            without ``arrays``.
    """
    if split not in ("train", "eval", "test"):
        raise ValueError(f"split must be 'train', 'eval' or 'test', got {split!r}")
    training = split == "train" if training is None else training
    if training:
        batch_size = data_cfg.batch_size
    else:
        batch_size = max(
            world_size, data_cfg.eval_batch_size - data_cfg.eval_batch_size % world_size
        )
    pin = device is not None and torch.device(device).type == "cuda"
    common = {
        "rank": rank,
        "world_size": world_size,
        "seed": seed,
        "shuffle": training and data_cfg.shuffle,
        "drop_last": training,
        "pin_memory": pin,
    }
    if data_cfg.source == "parquet":
        if not data_cfg.parquet_dir:
            raise ConfigError(
                "data.source = 'parquet' needs data.parquet_dir (the output directory of "
                "`mlet-dist preprocess`)"
            )
        return ParquetBatchSource(
            Path(data_cfg.parquet_dir) / split,
            batch_size,
            shuffle_buffer_rows=data_cfg.shuffle_buffer_rows,
            prefetch_batches=data_cfg.prefetch_batches,
            num_embeddings_per_feature=data_cfg.num_embeddings_per_feature,
            **common,
        )
    if arrays is None:
        raise ConfigError(
            f"data.source = {data_cfg.source!r} reads its rows into memory: pass the {split} "
            f"split's arrays (or set data.source = 'parquet' to stream preprocessed shards)"
        )
    return ArrayBatchSource(arrays, batch_size, **common)
