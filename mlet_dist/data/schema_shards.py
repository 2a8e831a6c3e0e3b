"""Preprocessed Parquet shards of a declared schema: ``mlet-dist preprocess`` writes them, the
streaming loader (:class:`~mlet_dist.data.parquet.ParquetBatchSource`, ``data.source =
'parquet'``) reads them with the same per-rank, exactly-once plan as Criteo shards.

Shard columns: ``label`` int8; one float32 column per dense feature (transformed); one
``list<int64>`` column per categorical feature holding its table rows (already hashed, cut to
``max_length``, rare ids replaced); with ``data.weight``, a float32 ``weight`` column of the
sample weights. The schema metadata (key ``mlet_dist``) records the feature
schema and the frequency threshold, so a loader refuses shards of another schema.

Preprocessing (:func:`mlet_dist.data.preprocess.schema.preprocess_schema`) reads the inputs through the schema
(:func:`mlet_dist.data.sources.read_source_file`), splits them as training does
(:func:`~mlet_dist.data.arrays.split_arrays`, or ``eval_files`` as the eval split) and, with a
frequency threshold T, counts every table's ids over the *training* rows (all features of a shared
table, every id of a multi-hot bag) and replaces the ids seen fewer than T times by row 0 in every
split: the vocabulary of a table is its ids seen at least T times. Unlike the Criteo preprocessing
(out of core, parallel) it holds the rows in memory.

Example::

    source = ParquetBatchSource("out/train", 256, codec=SchemaCodec(schema_of(cfg.data)))
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa

from mlet_dist.config import ConfigError
from mlet_dist.data.parquet import METADATA_KEY, read_shard_metadata
from mlet_dist.data.rows import FeatureRows
from mlet_dist.schema import FeatureSchema, schema_from_dict

__all__ = ["FORMAT", "SchemaCodec", "rows_to_table", "table_to_rows"]

logger = logging.getLogger(__name__)
FORMAT = "mlet_dist feature-schema shards v1"


def _columns(schema: FeatureSchema) -> list[str]:
    weight = ["weight"] if schema.weight else []
    return ["label", *weight, *schema.dense_names, *schema.feature_names]


def rows_to_table(rows: FeatureRows, schema: FeatureSchema, threshold: int = 0) -> pa.Table:
    """Rows as a shard table (see the module docstring)."""
    columns: dict[str, pa.Array] = {"label": pa.array(rows.labels.astype(np.int8))}
    if schema.weight:
        columns["weight"] = pa.array(np.ascontiguousarray(rows.weights, dtype=np.float32))
    for j, name in enumerate(schema.dense_names):
        columns[name] = pa.array(np.ascontiguousarray(rows.dense[:, j], dtype=np.float32))
    for name, ids, lengths in zip(schema.feature_names, rows.ids, rows.lengths):
        mask = np.arange(ids.shape[1])[None, :] < lengths[:, None]
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32)
        columns[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids[mask]))
    meta = {"format": FORMAT, "schema": schema.to_dict(), "frequency_threshold": threshold}
    return pa.table(columns).replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})


def table_to_rows(table: pa.Table, schema: FeatureSchema) -> FeatureRows:
    """The rows of a shard table."""
    n = table.num_rows
    labels = table.column("label").to_numpy().astype(np.float32)
    if schema.dense:
        dense = np.stack([table.column(c).to_numpy() for c in schema.dense_names], axis=1)
    else:
        dense = np.ones((n, 1), dtype=np.float32)
    ids, lengths = [], []
    for f in schema.sparse:
        col = table.column(f.name).combine_chunks()
        offsets = col.offsets.to_numpy().astype(np.int64)
        values = col.values.to_numpy().astype(np.int64)
        n_ids = np.diff(offsets)
        a = np.zeros((n, f.max_length), dtype=np.int64)
        for j in range(f.max_length):
            has = n_ids > j
            a[has, j] = values[offsets[:-1][has] + j]
        ids.append(a)
        lengths.append(n_ids.astype(np.int32))
    weights = table.column("weight").to_numpy().astype(np.float32) if schema.weight else None
    return FeatureRows(labels, dense, ids, lengths, schema.feature_names, weights)


class SchemaCodec:
    """How :class:`~mlet_dist.data.parquet.ParquetBatchSource` reads shards of ``schema``."""

    def __init__(self, schema: FeatureSchema) -> None:
        self.schema = schema
        self.columns = _columns(schema)

    def decode(self, table: pa.Table) -> FeatureRows:
        return table_to_rows(table, self.schema)

    def check(self, path: Path, arrow_schema: pa.Schema) -> None:
        """Raises ConfigError unless the shard was written for this schema."""
        meta = read_shard_metadata(arrow_schema)
        if meta.get("format") != FORMAT:
            raise ConfigError(
                f"{path} is not a shard of a declared feature schema (it has no such metadata): "
                f"preprocess the inputs with this config (`mlet-dist preprocess`)"
            )
        if schema_from_dict(meta["schema"]) != self.schema:
            raise ConfigError(
                f"{path} was preprocessed for another feature schema than the config's "
                f"(data.dense / data.sparse / data.tables / data.weight): preprocess again with "
                f"this config"
            )
