"""The outputs written by the owners of the collapsed rows (Parquet row groups, row-block
ShardedTensors for the checkpoints), and the whole serving tables read back for the predictor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from mlet_dist.checkpoint import dcp_load
from mlet_dist.distributed.collapse import CollapsedBlock, RowBlock, TableLayout
from mlet_dist.distributed.shards import row_block_tensor
from mlet_dist.models import SERVED_TABLE_KEY
from mlet_dist.modules.quantize import serving_layout

SERVING_TABLE_KEY = "embedding_bags.{}.weight"  # a table in OUT/serving/tables (fp16/int8)
DEFAULT_ROW_GROUP_ROWS = 65536


class ParquetSink:
    """Writes each owned row block of a table to ``root/<table>/rows-<first>-<end>.parquet``.

    Columns ``id`` (int64) and ``embedding`` (fixed-size list of d float32). Finished chunks are
    buffered up to ``row_group_rows`` rows and written as one row group (the last group of a
    block may be smaller), so the row groups do not depend on the chunk size.
    """

    def __init__(self, root: Path, row_group_rows: int = DEFAULT_ROW_GROUP_ROWS) -> None:
        if row_group_rows <= 0:
            raise ValueError(f"row_group_rows must be positive, got {row_group_rows}")
        self.root = root
        self.row_group_rows = row_group_rows
        self._open: dict[tuple[str, int], tuple[Any, list[np.ndarray], int]] = {}
        self.files: list[Path] = []

    def __call__(self, table: str, block: RowBlock, start: int, rows: torch.Tensor) -> None:
        key = (table, block.start)
        if key not in self._open:
            path = self.root / table / f"rows-{block.start:012d}-{block.stop:012d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            d = rows.shape[1]
            schema = pa.schema(
                [("id", pa.int64()), ("embedding", pa.list_(pa.float32(), d))],
                metadata={"table": table, "dim": str(d)},
            )
            self._open[key] = (pq.ParquetWriter(path, schema), [], start)
            self.files.append(path)
        writer, pending, first = self._open[key]
        pending.append(rows.detach().cpu().numpy())  # owner rows: not overwritten later
        buffered = start + rows.shape[0] - first
        done = start + rows.shape[0] == block.stop
        if buffered >= self.row_group_rows or done:
            self._write(writer, np.concatenate(pending), first)
            pending.clear()
            self._open[key] = (writer, pending, start + rows.shape[0])
        if done:
            self._open.pop(key)[0].close()

    @staticmethod
    def _write(writer: Any, values: np.ndarray, first: int) -> None:
        n, d = values.shape
        flat = pa.array(values.reshape(-1), pa.float32())
        ids = pa.array(np.arange(first, first + n, dtype=np.int64))
        embedding = pa.FixedSizeListArray.from_arrays(flat, d)
        writer.write_table(
            pa.table({"id": ids, "embedding": embedding}, schema=writer.schema),
            row_group_size=n,
        )

    def close(self) -> None:
        for writer, _, _ in self._open.values():
            writer.close()
        self._open.clear()


def sharded_rows(
    layout: TableLayout,
    blocks: list[CollapsedBlock],
    tensor_of: Any,
    dtype: torch.dtype,
    cols: int,
) -> ShardedTensor:
    """A row-block ShardedTensor of a collapsed table: every rank contributes the blocks it owns.

    Built from the layout every rank knows (no collective); shards live on CPU.
    """

    def key(b: RowBlock) -> tuple[int, int, int]:
        return b.start, b.rows, b.owner

    return row_block_tensor(
        [key(b) for b in layout.blocks],
        [(key(cb.block), tensor_of(cb)) for cb in blocks],
        layout.rows,
        cols,
        dtype,
    )


def load_served_rows(
    out: Path, tables: list[EmbeddingBagConfig], dtype: str
) -> dict[str, torch.Tensor]:
    """Whole serving tables read back from the checkpoints just written (this process alone).

    This is the one step that holds whole tables: the predictor is a single-process model.
    """
    if dtype == "fp32":
        key = SERVED_TABLE_KEY
        state = {key.format(t.name): torch.empty(t.num_embeddings, t.embedding_dim) for t in tables}
        dcp_load({"model": state}, out / "model", no_dist=True)
    else:
        key = SERVING_TABLE_KEY
        state = {}
        for t in tables:
            dt, cols = serving_layout(dtype, t.embedding_dim)
            state[key.format(t.name)] = torch.empty(t.num_embeddings, cols, dtype=dt)
        dcp_load(state, out / "serving" / "tables", no_dist=True)
    return {t.name: state[key.format(t.name)] for t in tables}
