"""Shard metadata of 2-D tables, read and written in one place.

TorchRec describes where the pieces of a sharded table live with torch's ``ShardMetadata``
(``shard_offsets``, ``shard_sizes``, ``placement``): in a ``ShardingPlan`` (the
``EnumerableShardingSpec`` of each ``ParameterSharding``) and in a ``ShardedTensor`` of a state
dict. Here they become :class:`ShardSpec` (rows ``row0:row0+rows``, columns ``col0:col0+cols``,
on ``rank``), the plan's JSON form (:func:`metadata_to_json`, :func:`metadata_from_json`), and
back a row-block ``ShardedTensor`` (:func:`row_block_tensor`).

Used by the trainer (each table's sharding in ``train_state.json``), the checkpoint (the plan as
JSON), the sharded collapse (the W1 shards of a state dict) and the export (the collapsed rows
saved as row blocks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import (
    ShardedTensorMetadata,
    TensorProperties,
)


@dataclass(frozen=True)
class ShardSpec:
    """One shard of a W1 table: rows ``row0:row0+rows``, columns ``col0:col0+cols``, on ``rank``."""

    row0: int
    col0: int
    rows: int
    cols: int
    rank: int

    @classmethod
    def of(cls, m: ShardMetadata, rank: int | None = None) -> ShardSpec:
        """The shard a 2-D ``ShardMetadata`` describes; ``rank`` defaults to its placement's."""
        (row0, col0), (rows, cols) = m.shard_offsets, m.shard_sizes
        return cls(
            int(row0),
            int(col0),
            int(rows),
            int(cols),
            m.placement.rank() if rank is None else int(rank),
        )

    def as_list(self) -> list[int]:
        """``[row0, col0, rows, cols, rank]`` (the form ``train_state.json`` records)."""
        return [self.row0, self.col0, self.rows, self.cols, self.rank]


def plan_shards(sharding_spec: Any) -> list[ShardSpec]:
    """The shards of a ``ParameterSharding.sharding_spec`` (None, e.g. data_parallel: none)."""
    return [] if sharding_spec is None else [ShardSpec.of(m) for m in sharding_spec.shards]


def plan_layout(plan: Any) -> dict[str, dict[str, Any]]:
    """Each table of a ``ShardingPlan``: ``{"sharding_type", "shards": [[row0, col0, rows, cols,
    rank], ...]}`` (the form ``train_state.json`` records and
    :func:`mlet_dist.checkpoint.check_optimizer_resharding` compares)."""
    layout: dict[str, dict[str, Any]] = {}
    for module_plan in plan.plan.values():
        for name, ps in module_plan.items():
            shards = [s.as_list() for s in plan_shards(ps.sharding_spec)]
            layout[name] = {"sharding_type": ps.sharding_type, "shards": shards}
    return layout


def sharded_tensor_shards(
    value: ShardedTensor, rank: int
) -> tuple[list[ShardSpec], list[tuple[ShardSpec, torch.Tensor]]]:
    """(every shard of a 2-D ``ShardedTensor``, this rank's local shards with their tensors)."""
    shards = [ShardSpec.of(m) for m in value.metadata().shards_metadata]
    local = [(ShardSpec.of(s.metadata, rank), s.tensor) for s in value.local_shards()]
    return shards, local


def metadata_to_json(m: ShardMetadata) -> dict[str, Any]:
    """``{"offsets", "sizes", "placement"}`` of a ``ShardMetadata`` (any number of dims)."""
    return {
        "offsets": [int(v) for v in m.shard_offsets],
        "sizes": [int(v) for v in m.shard_sizes],
        "placement": None if m.placement is None else str(m.placement),
    }


def metadata_from_json(s: dict[str, Any]) -> ShardMetadata:
    """The ``ShardMetadata`` of :func:`metadata_to_json` output."""
    return ShardMetadata(
        shard_offsets=[int(v) for v in s["offsets"]],
        shard_sizes=[int(v) for v in s["sizes"]],
        placement=s["placement"],
    )


def row_block_tensor(
    blocks: Sequence[tuple[int, int, int]],
    local: Sequence[tuple[tuple[int, int, int], torch.Tensor]],
    rows: int,
    cols: int,
    dtype: torch.dtype,
) -> ShardedTensor:
    """A ``ShardedTensor`` (rows, cols) tiled into row blocks, its shards on CPU.

    Built from the layout every rank knows (no collective).

    Args:
        blocks: every block as (first row, rows, owner rank), in row order, on every rank.
        local: this rank's blocks as ((first row, rows, owner rank), tensor (rows, cols)).
        rows: the tensor's rows.
        cols: its columns.
        dtype: its dtype.
    """

    def meta(start: int, n: int, owner: int) -> ShardMetadata:
        return ShardMetadata([start, 0], [n, cols], f"rank:{owner}/cpu")

    shards = [Shard(t.cpu().contiguous(), meta(*b)) for b, t in local]
    metadata = ShardedTensorMetadata(
        shards_metadata=[meta(*b) for b in blocks],
        size=torch.Size([rows, cols]),
        tensor_properties=TensorProperties(dtype=dtype, requires_grad=False),
    )
    return ShardedTensor._init_from_local_shards_and_global_metadata(shards, metadata)
