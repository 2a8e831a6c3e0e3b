"""Fused sharded collapse: each rank multiplies its own W1 shards by W2, in one pass.

For a factorized table W = W1 @ W2 whose W1 (rows × k) TorchRec has sharded, every rank computes
``W1_shard @ W2[c0:c0+m]`` for its local shards (``c0``, ``m``: the shard's columns) in row chunks of
bounded size. Row-based shards (table_wise, row_wise, table_row_wise) give finished rows. Column
pieces (column_wise, table_column_wise, grid_shard) are partial sums: the rows of each row segment
are split among the ranks that hold a column piece of it, and each chunk is summed with a
``reduce`` onto its owner *within that sub-group* only. The rank that owns rows writes them (the
caller's sink sees every finished chunk once: Parquet, quantization). No rank allocates more than
the rows it owns (plus one chunk), so no rank holds a whole table unless it owns all of it
(table_wise).

Ordinary (not factorized) tables go through the same code with W2 = identity: their column pieces
are placed into the right columns and summed with zeros, which is exact.

Example (on every rank, after building and loading the sharded model)::

    state = dmp.state_dict()
    layouts, local = layouts_from_state_dict(state, w1_prefix, {"t_ad": 16})
    groups = make_groups(list(layouts.values()))  # collective
    tracker = MemoryTracker()
    for name, layout in layouts.items():
        blocks = collapse_table(layout, local[name], state[w2_prefix + name], groups,
                                chunk_rows=16384, serving_dtype="int8", tracker=tracker)
        # blocks: the rows this rank owns, float32 and int8
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor

from mlet_dist.distributed.shards import ShardSpec, sharded_tensor_shards
from mlet_dist.modules.collapse import DEFAULT_CHUNK_ROWS, compute_dtype
from mlet_dist.modules.quantize import quantize_rows_into, serving_layout


@dataclass(frozen=True)
class RowBlock:
    """Rows ``start:stop`` of the collapsed table: summed over ``ranks``, owned by ``owner``."""

    start: int
    stop: int
    owner: int
    ranks: tuple[int, ...]

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class TableLayout:
    """A W1 table's shards and who owns which rows of its collapsed table.

    Attributes:
        name: table name.
        rows: table rows.
        cols: columns of W1 (k for a factorized table, d for an ordinary one).
        dim: d, columns of the collapsed table.
        shards: every shard of W1, on every rank.
        blocks: the collapsed rows, tiled into owned blocks (in row order).
    """

    name: str
    rows: int
    cols: int
    dim: int
    shards: tuple[ShardSpec, ...]
    blocks: tuple[RowBlock, ...]

    def owned(self, rank: int) -> list[RowBlock]:
        return [b for b in self.blocks if b.owner == rank]

    def ranks(self) -> set[int]:
        return {s.rank for s in self.shards}


def table_layout(
    name: str, rows: int, cols: int, dim: int, shards: Sequence[ShardSpec]
) -> TableLayout:
    """Splits a table into row blocks and assigns each block an owner.

    The table's rows are cut at every shard's row boundary. Each segment is covered by shards whose
    columns must tile ``0:cols`` exactly. A segment held by one rank is owned by it; a segment
    whose column pieces lie on several ranks is split into equal contiguous parts, one per rank,
    so that the work of writing (and quantizing) it is spread over the ranks that hold it.

    Raises:
        ValueError: the shards do not tile the table (a hole or an overlap), naming the rows.
    """
    cuts = sorted({0, rows} | {s.row0 for s in shards} | {s.row0 + s.rows for s in shards})
    blocks: list[RowBlock] = []
    for a, b in itertools.pairwise(cuts):
        if a >= b:
            continue
        cover = sorted(
            (s for s in shards if s.row0 <= a and s.row0 + s.rows >= b), key=lambda s: s.col0
        )
        col = 0
        for s in cover:
            if s.col0 != col:
                raise ValueError(
                    f"table '{name}': the W1 shards do not tile rows {a}:{b} (columns "
                    f"{[(s.col0, s.col0 + s.cols) for s in cover]} of {cols})"
                )
            col += s.cols
        if col != cols:
            raise ValueError(
                f"table '{name}': the W1 shards cover columns 0:{col} of rows {a}:{b}, not 0:{cols}"
            )
        ranks = tuple(sorted({s.rank for s in cover}))
        n = len(ranks)
        for j, owner in enumerate(ranks):
            lo, hi = a + (b - a) * j // n, a + (b - a) * (j + 1) // n
            if hi > lo:
                blocks.append(RowBlock(lo, hi, owner, ranks))
    return TableLayout(name, rows, cols, dim, tuple(shards), tuple(blocks))


@dataclass
class MemoryTracker:
    """Bytes of the tensors the collapse allocates (outputs and chunk buffers).

    Attributes:
        largest_bytes: the largest single tensor created.
        live_bytes: bytes held now (outputs are held until the caller releases them).
        peak_bytes: the most held at once.
        output_bytes: bytes of the collapsed rows (float32) this rank owns.
    """

    largest_bytes: int = 0
    live_bytes: int = 0
    peak_bytes: int = 0
    output_bytes: int = 0
    largest: tuple[int, ...] = ()

    def empty(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=device)
        n = t.numel() * t.element_size()
        if n > self.largest_bytes:
            self.largest_bytes, self.largest = n, tuple(shape)
        self.live_bytes += n
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return t

    def release(self, t: torch.Tensor) -> None:
        self.live_bytes -= t.numel() * t.element_size()

    def as_dict(self) -> dict[str, Any]:
        return {
            "largest_tensor_bytes": self.largest_bytes,
            "largest_tensor_shape": list(self.largest),
            "peak_bytes": self.peak_bytes,
            "output_bytes": self.output_bytes,
        }


@dataclass
class CollapsedBlock:
    """Rows ``block.start:block.stop`` of a collapsed table, owned by this rank.

    ``values`` is float32 (rows, d); ``served`` the same rows in the fp16 or int8 serving format
    (see :mod:`mlet_dist.modules.quantize`), None for fp32 (``values`` serve as they are).
    """

    table: str
    block: RowBlock
    values: torch.Tensor
    served: torch.Tensor | None = None


ChunkSink = Callable[[str, RowBlock, int, torch.Tensor], None]
"""Called with (table, owned block, first row, float32 rows) for every finished chunk, on its owner."""


def make_groups(layouts: Sequence[TableLayout]) -> dict[tuple[int, ...], Any]:
    """Process groups of the ranks that reduce rows together (collective: call on every rank).

    Only multi-rank sets get a group; the whole world uses the default group.
    """
    world = dist.get_world_size()
    sets = sorted({b.ranks for layout in layouts for b in layout.blocks if len(b.ranks) > 1})
    groups: dict[tuple[int, ...], Any] = {}
    for ranks in sets:  # same order on every rank: new_group is collective
        groups[ranks] = None if len(ranks) == world else dist.new_group(list(ranks))
    return groups


def _partial_rows(
    dst: torch.Tensor,
    local: Sequence[tuple[ShardSpec, torch.Tensor]],
    w2: torch.Tensor | None,
    start: int,
    stop: int,
) -> None:
    """dst = sum over local shards of W1_shard[start:stop] @ W2[shard columns] (W2 None: identity)."""
    first = True
    for s, t in local:
        rows = t[start - s.row0 : stop - s.row0]
        if w2 is not None:
            w = w2[s.col0 : s.col0 + s.cols]
            rows = rows.to(w.dtype)  # an fp16 W1 chunk widened (exact); a no-op for fp32
            if first:
                torch.mm(rows, w, out=dst)
            else:
                dst.addmm_(rows, w)
        else:
            if first and s.cols != dst.shape[1]:
                dst.zero_()
            dst[:, s.col0 : s.col0 + s.cols].copy_(rows)
        first = False


def allocate_block(
    table: str,
    block: RowBlock,
    dim: int,
    serving_dtype: str,
    tracker: MemoryTracker,
    device: torch.device,
) -> CollapsedBlock:
    """The owner's output of one block: float32 rows and (fp16/int8) their serving copy."""
    values = tracker.empty((block.rows, dim), torch.float32, device)
    tracker.output_bytes += values.numel() * 4
    served = None
    if serving_dtype != "fp32":
        dt, cols = serving_layout(serving_dtype, dim)
        served = tracker.empty((block.rows, cols), dt, device)
    return CollapsedBlock(table, block, values, served)


@torch.no_grad()
def fill_block(
    table: str,
    block: RowBlock,
    mine: Sequence[tuple[ShardSpec, torch.Tensor]],
    w2: torch.Tensor | None,
    groups: dict[tuple[int, ...], Any],
    chunk_rows: int,
    serving_dtype: str,
    target: CollapsedBlock | None,
    scratch: torch.Tensor | None = None,
    sink: ChunkSink | None = None,
) -> None:
    """The chunk loop of one block: multiply, reduce onto the owner, quantize, hand to the sink.

    Args:
        table: table name (for the sink).
        block: the rows; this rank is one of ``block.ranks``.
        mine: this rank's shards covering the block's rows (their columns, summed, are its part).
        w2: (k, d) projection on the shards' device, in the compute dtype (fp32 for an fp16
            W1: see :func:`collapse_table`), or None (identity).
        groups: from :func:`make_groups`.
        chunk_rows: rows per step.
        serving_dtype: format of ``target.served``.
        target: the owner's output (from :func:`allocate_block`); None on the other ranks.
        scratch: a non-owner's (>= min(chunk_rows, block.rows), d) float32 buffer.
        sink: see :data:`ChunkSink`.
    """
    for start in range(block.start, block.stop, chunk_rows):
        stop = min(start + chunk_rows, block.stop)
        lo, hi = start - block.start, stop - block.start
        dst = target.values[lo:hi] if target is not None else scratch[: stop - start]
        _partial_rows(dst, mine, w2, start, stop)
        if len(block.ranks) > 1:
            dist.reduce(dst, dst=block.owner, group=groups[block.ranks])
        if target is not None:
            if target.served is not None:
                quantize_rows_into(dst, serving_dtype, target.served[lo:hi])
            if sink is not None:
                sink(table, block, start, dst)


@torch.no_grad()
def collapse_table(
    layout: TableLayout,
    local: Sequence[tuple[ShardSpec, torch.Tensor]],
    w2: torch.Tensor | None,
    groups: dict[tuple[int, ...], Any],
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    serving_dtype: str = "fp32",
    tracker: MemoryTracker | None = None,
    sink: ChunkSink | None = None,
    rank: int | None = None,
) -> list[CollapsedBlock]:
    """Collapses one table on this rank: its part of every reduction, and the rows it owns.

    Collective among the ranks holding shards of the table (every rank may call it; the others
    return at once). One pass over the local W1 rows: each chunk is multiplied, reduced onto its
    owner if its columns are spread over ranks, then (on the owner) quantized into the serving
    format and handed to ``sink``.

    Args:
        layout: from :func:`table_layout` (identical on every rank).
        local: this rank's W1 shards as (spec, tensor (rows, cols)).
        w2: the (k, d) projection, or None for an ordinary table (identity).
        groups: from :func:`make_groups`.
        chunk_rows: rows per matmul and per reduction: bounds the temporary memory.
        serving_dtype: 'fp32', 'fp16' or 'int8': the serving copy made in the same pass.
        tracker: records the sizes of the tensors created here.
        sink: called on the owner with every finished float32 chunk (e.g. a Parquet writer).
        rank: this rank (default: the process group's).

    Returns:
        The blocks this rank owns, with float32 values and the serving tensors.
    """
    if chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    rank = dist.get_rank() if rank is None else rank
    tracker = tracker or MemoryTracker()
    if rank not in layout.ranks():
        return []
    device = local[0][1].device
    if w2 is not None:
        dtype = compute_dtype(local[0][1].dtype, w2.dtype)  # fp16 W1: fp32, not W2 narrowed
        w2 = w2.detach().to(device=device, dtype=dtype).contiguous()
    helper = [b for b in layout.blocks if rank in b.ranks and b.owner != rank]
    scratch = None
    if helper:  # this rank adds partial sums to rows another rank owns
        rows = min(chunk_rows, max(b.rows for b in helper))
        scratch = tracker.empty((rows, layout.dim), torch.float32, device)
    out: list[CollapsedBlock] = []
    for block in layout.blocks:
        if rank not in block.ranks:
            continue
        mine = [(s, t) for s, t in local if s.row0 <= block.start and s.row0 + s.rows >= block.stop]
        target = None
        if block.owner == rank:
            target = allocate_block(layout.name, block, layout.dim, serving_dtype, tracker, device)
            out.append(target)
        fill_block(
            layout.name, block, mine, w2, groups, chunk_rows, serving_dtype, target, scratch, sink
        )
    if scratch is not None:
        tracker.release(scratch)
    return out


def layouts_from_state_dict(
    state: dict[str, Any], prefix: str, dims: dict[str, int]
) -> tuple[dict[str, TableLayout], dict[str, list[tuple[ShardSpec, torch.Tensor]]]]:
    """The layout and this rank's local shards of every W1 table in a (DMP) state dict.

    Args:
        state: ``dmp.state_dict()``; W1 tables are ``ShardedTensor`` (TorchRec's default) or, for
            data-parallel/unsharded tables, plain tensors (then rank 0 alone collapses them).
        prefix: key prefix of the W1 tables, e.g. ``model.sparse_arch.embedding_bag_collection.w1.embedding_bags.``
        dims: table name -> d (the collapsed dimension).

    Returns:
        (table -> layout, table -> [(spec, local tensor)]), tables in name order.
    """
    rank = dist.get_rank()
    layouts, local = {}, {}
    for key in sorted(k for k in state if k.startswith(prefix) and k.endswith(".weight")):
        name = key[len(prefix) : -len(".weight")]
        value = state[key]
        if isinstance(value, ShardedTensor):
            rows, cols = value.size()
            shards, mine = sharded_tensor_shards(value, rank)
        elif type(value) in (torch.Tensor, torch.nn.Parameter):
            rows, cols = value.shape
            shards = [ShardSpec(0, 0, rows, cols, 0)]
            mine = [(shards[0], value)] if rank == 0 else []
        else:
            raise TypeError(
                f"{key} is a {type(value).__name__}; the sharded collapse reads TorchRec's "
                f"ShardedTensor state dict (the default, not output_dtensor=True) or plain tensors"
            )
        layouts[name] = table_layout(name, rows, cols, dims[name], shards)
        local[name] = mine
    return layouts, local


def collapse_bytes(layout: TableLayout, w1_element_size: int = 4) -> int:
    """Bytes of W1 read (``w1_element_size`` per element: 2 for an fp16 W1) plus bytes of the
    float32 collapsed table written."""
    return layout.rows * (layout.cols * w1_element_size + layout.dim * 4)


__all__ = [
    "ChunkSink",
    "CollapsedBlock",
    "MemoryTracker",
    "RowBlock",
    "TableLayout",
    "allocate_block",
    "collapse_bytes",
    "collapse_table",
    "fill_block",
    "layouts_from_state_dict",
    "make_groups",
    "table_layout",
]
