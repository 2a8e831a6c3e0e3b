"""The Parquet format of preprocessed rows: schema, metadata, arrays <-> tables, and streaming.

Schema (one row per sample): ``label`` int8 (0/1), ``int_0`` .. ``int_12`` float32 (transformed),
``cat_0`` .. ``cat_25`` int32 when every table size is at most 2**31 (the MLPerf 40M sizes are),
else int64. The schema metadata (key ``mlet_dist``) records the table sizes and the threshold, so
that a loader can refuse shards hashed for other tables. ``mlet-dist preprocess``
(:mod:`mlet_dist.data.preprocess`) writes such shards; :class:`ParquetBatchSource` streams them.

Streaming (:class:`ParquetBatchSource`, a :class:`~mlet_dist.data.batching.BatchSource`): each
epoch, the row groups of the split are put in a seeded random order and the resulting sequence of
N rows is cut into ``world_size`` contiguous ranges of ``N // world_size`` rows; rank r reads only
the row groups of its range (a row group on a boundary is read by both neighbours, each keeping
its rows). Within a rank, rows are shuffled in consecutive windows of ``shuffle_buffer_rows``
(seeded by seed, epoch, rank and window), which bounds memory and makes any position reachable
by reading from the start of its window only. A background thread reads, shuffles, batches and
(for cuda) pins memory ``prefetch_batches`` batches ahead.

Uneven tail: the last ``N % world_size`` rows of the epoch's row order (fewer than the world
size; different rows each epoch when shuffling) are left out so that every rank has the same
number of rows; each rank then yields ``n // (B / world_size)`` full batches and, without
``drop_last``, one smaller final batch of the same size on every rank. With one rank every row is
used. The batch counts and sizes equal those of :func:`~mlet_dist.data.batching.make_batches` for
the same N.

Example::

    source = ParquetBatchSource("data/criteo_parquet/train", 4096, rank=rank, world_size=world)
    for i, batch in enumerate(source.batches(epoch, start_batch), start=start_batch):
        loss, _ = model(batch.to(device, non_blocking=True))
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from torchrec.datasets.utils import Batch

from mlet_dist.config import ConfigError
from mlet_dist.data.arrays import DEFAULT_CAT_NAMES, DEFAULT_INT_NAMES, CriteoArrays
from mlet_dist.data.batching import check_batch_split, check_position, prefetch, to_batch

__all__ = [
    "COLUMNS",
    "FORMAT_VERSION",
    "METADATA_KEY",
    "RARE_ID",
    "ParquetBatchSource",
    "arrays_to_table",
    "parquet_schema",
    "read_shard_metadata",
    "table_to_arrays",
]

METADATA_KEY = b"mlet_dist"
"""Key of the Parquet schema metadata (JSON: table sizes, threshold, format version)."""
RARE_ID = 0
"""The id that hashed ids below the frequency threshold are replaced by."""
FORMAT_VERSION = 1
COLUMNS = ["label", *DEFAULT_INT_NAMES, *DEFAULT_CAT_NAMES]
"""The columns of a shard, in schema order."""


def parquet_schema(
    num_embeddings_per_feature: Sequence[int], frequency_threshold: int = 0
) -> pa.Schema:
    """The Parquet schema of preprocessed rows (see the module docstring).

    Args:
        num_embeddings_per_feature: the 26 table sizes; they decide the id type and are recorded
            in the schema metadata.
        frequency_threshold: recorded in the metadata.

    Returns:
        A ``pyarrow.Schema``: label int8, int_0..int_12 float32, cat_0..cat_25 int32 or int64.
    """
    sizes = [int(s) for s in num_embeddings_per_feature]
    id_type = pa.int32() if max(sizes) <= 2**31 else pa.int64()
    fields = [pa.field("label", pa.int8(), nullable=False)]
    fields += [pa.field(n, pa.float32(), nullable=False) for n in DEFAULT_INT_NAMES]
    fields += [pa.field(n, id_type, nullable=False) for n in DEFAULT_CAT_NAMES]
    meta = {
        "format_version": FORMAT_VERSION,
        "num_embeddings_per_feature": sizes,
        "frequency_threshold": int(frequency_threshold),
        "rare_id": RARE_ID,
        "dense": "log(1 + max(x, 0)), missing = 0",
        "sparse": "int(hex, 16) % num_embeddings, missing = 0",
    }
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(meta).encode()})


def read_shard_metadata(schema: pa.Schema) -> dict[str, Any]:
    """The ``mlet_dist`` metadata of a shard's schema (empty if the file was not written here)."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def arrays_to_table(arrays: CriteoArrays, schema: pa.Schema) -> pa.Table:
    """Rows as a table of ``schema`` (:func:`parquet_schema`; ids cast to its id type)."""
    id_dtype = np.int32 if schema.field("cat_0").type == pa.int32() else np.int64
    dense = np.ascontiguousarray(arrays.dense.T)
    sparse = np.ascontiguousarray(arrays.sparse.T, dtype=id_dtype)
    columns = [pa.array(arrays.labels.astype(np.int8))]
    columns += [pa.array(dense[k]) for k in range(dense.shape[0])]
    columns += [pa.array(sparse[j]) for j in range(sparse.shape[0])]
    return pa.Table.from_arrays(columns, schema=schema)


def table_to_arrays(table: pa.Table) -> CriteoArrays:
    """The rows of a shard's table (labels float32, dense float32, ids int64)."""
    labels = table.column("label").to_numpy().astype(np.float32)
    dense = np.stack([table.column(c).to_numpy() for c in DEFAULT_INT_NAMES], axis=1)
    # Key-major (26, n): to_batch's transposition of `.T` is then a no-op view.
    sparse = np.stack([table.column(c).to_numpy().astype(np.int64) for c in DEFAULT_CAT_NAMES])
    return CriteoArrays(labels, dense, sparse.T)


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
        codec: shards of a declared feature schema
            (:class:`mlet_dist.data.schema_shards.SchemaCodec`: ``columns``, ``decode(table)``,
            ``check(path, arrow schema)``); None: Criteo shards.

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
        codec: Any = None,
    ) -> None:
        check_batch_split(batch_size, rank, world_size)
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
        self.codec = codec
        self.columns = COLUMNS if codec is None else codec.columns
        groups = []  # (file index, row group index, rows)
        for i, f in enumerate(files):
            try:
                meta = pq.read_metadata(f)
            except (OSError, ValueError) as e:
                raise ConfigError(f"{f}: not a readable Parquet file ({e})") from e
            if codec is not None:
                codec.check(f, meta.schema.to_arrow_schema())
            names = meta.schema.to_arrow_schema().names  # top-level (list columns too)
            missing = [c for c in self.columns if c not in names]
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
                table = handles[f].read_row_group(g, columns=self.columns)
                rows = table_to_arrays(table) if self.codec is None else self.codec.decode(table)
                yield rows.slice(a + skip, b)
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
                whole = type(pieces[0]).concat(pieces)
                take = min(window, len(whole))
                perm = np.random.default_rng([self.seed, epoch, self.rank, k]).permutation(take)
                rows = perm[skip:]
                if self.codec is not None:  # FeatureRows of a declared schema
                    yield whole.take(rows)
                else:
                    yield CriteoArrays(
                        whole.labels[rows], whole.dense[rows], whole.sparse.T[:, rows].T
                    )
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
                whole = type(pieces[0]).concat(pieces) if len(pieces) > 1 else pieces[0]
                size = min(local, held)
                batch = to_batch(whole.slice(0, size))
                yield batch.pin_memory() if self.pin_memory else batch
                pieces = [whole.slice(size, len(whole))]
                held -= size
                position += size
            if position >= stop:
                return

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        check_position(epoch, start_batch, self.num_batches())
        return prefetch(self._make_batches(epoch, start_batch), self.prefetch_batches)

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
