"""Preprocessed Parquet shards of a declared schema: ``mlet-dist preprocess`` writes them, the
streaming loader (:class:`~mlet_dist.data.parquet.ParquetBatchSource`, ``data.source =
'parquet'``) reads them with the same per-rank, exactly-once plan as Criteo shards.

Shard columns: ``label`` int8; one float32 column per dense feature (transformed); one
``list<int64>`` column per categorical feature holding its table rows (already hashed, cut to
``max_length``, rare ids replaced, values of ``ids = 'vocab'`` tables mapped through their
vocabularies); with ``data.weight``, a float32 ``weight`` column of the sample weights. The
schema metadata (key ``mlet_dist``) records the feature schema, the frequency threshold and the
sha256 of each vocabulary (``vocab/<table>.parquet`` beside the splits,
:mod:`mlet_dist.data.vocab`), so a loader refuses shards of another schema, threshold or
vocabulary than its config and ``summary.json`` say.

Preprocessing (:func:`mlet_dist.data.preprocess.schema.preprocess_schema`) reads the inputs through the schema
(:meth:`mlet_dist.data.sources.DataSource.iter_table`), splits them as training does
(:func:`~mlet_dist.data.arrays.split_arrays`, or ``eval_files`` as the eval split) and, with a
frequency threshold T, counts every table's ids over the *training* rows (all features of a shared
table, every id of a multi-hot bag) and replaces the ids seen fewer than T times by row 0 in every
split: the vocabulary of a table is its ids seen at least T times. An ``ids = 'vocab'`` table
maps raw values instead, through the vocabulary built from the same training rows
(:class:`mlet_dist.data.vocab.VocabularyCounter`), so it has no collisions. Like the Criteo
preprocessing it is out of core (the inputs are streamed in chunks, in up to four passes), but it
runs in one process (the Criteo one runs parallel workers and resumes).

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

__all__ = ["FORMAT", "SchemaCodec", "rows_to_table", "summary_vocabularies", "table_to_rows"]

logger = logging.getLogger(__name__)
FORMAT = "mlet_dist feature-schema shards v1"


def _columns(schema: FeatureSchema) -> list[str]:
    weight = ["weight"] if schema.weight else []
    return ["label", *weight, *schema.dense_names, *schema.feature_names]


def rows_to_table(
    rows: FeatureRows,
    schema: FeatureSchema,
    threshold: int = 0,
    vocabularies: dict[str, str] | None = None,
) -> pa.Table:
    """Rows as a shard table (see the module docstring); ``vocabularies``: {table: sha256}."""
    columns: dict[str, pa.Array] = {"label": pa.array(rows.labels.astype(np.int8))}
    if schema.weight:
        columns["weight"] = pa.array(np.ascontiguousarray(rows.weights, dtype=np.float32))
    for j, name in enumerate(schema.dense_names):
        columns[name] = pa.array(np.ascontiguousarray(rows.dense[:, j], dtype=np.float32))
    for name, ids, lengths in zip(schema.feature_names, rows.ids, rows.lengths):
        mask = np.arange(ids.shape[1])[None, :] < lengths[:, None]
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32)
        columns[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids[mask]))
    meta = {
        "format": FORMAT,
        "schema": schema.to_dict(),
        "frequency_threshold": threshold,
        "vocabularies": vocabularies or {},
    }
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


def summary_vocabularies(out_dir: str | Path, schema: FeatureSchema) -> dict[str, dict]:
    """The vocabularies a preprocess output's ``summary.json`` lists ({table: {"path", "values",
    "sha256"}}); {} when the schema has no ``ids = 'vocab'`` table.

    Raises:
        ConfigError: the schema has such tables and the summary lists none for one of them.
    """
    if not schema.vocab_tables:
        return {}
    path = Path(out_dir) / "summary.json"
    try:
        entries = json.loads(path.read_text()).get("vocabularies", {}) if path.is_file() else {}
    except (ValueError, AttributeError) as e:
        raise ConfigError(
            f"{path} is damaged or truncated ({e}); preprocess data.parquet_dir again"
        ) from None
    missing = [t.name for t in schema.vocab_tables if t.name not in entries]
    if missing:
        raise ConfigError(
            f"{path} lists no vocabulary of table {missing[0]!r} (ids = 'vocab'): "
            f"data.parquet_dir is not the output of `mlet-dist preprocess` with this config; "
            f"preprocess again"
        )
    return {t.name: entries[t.name] for t in schema.vocab_tables}


class SchemaCodec:
    """How :class:`~mlet_dist.data.parquet.ParquetBatchSource` reads shards of ``schema``.

    Args:
        schema: the config's feature schema.
        frequency_threshold: the config's ``data.frequency_threshold`` (None: not checked).
        vocabularies: {table: sha256} of the vocabularies the shards must have been mapped with
            (None: not checked).
    """

    def __init__(
        self,
        schema: FeatureSchema,
        frequency_threshold: int | None = None,
        vocabularies: dict[str, str] | None = None,
    ) -> None:
        self.schema = schema
        self.columns = _columns(schema)
        self.frequency_threshold = frequency_threshold
        self.vocabularies = vocabularies

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
        had = meta.get("frequency_threshold")
        if self.frequency_threshold is not None and had != self.frequency_threshold:
            raise ConfigError(
                f"{path} was preprocessed with data.frequency_threshold = {had}, the config says "
                f"{self.frequency_threshold}: preprocess again with this config, or set "
                f"data.frequency_threshold = {had}"
            )
        if self.vocabularies is not None and meta.get("vocabularies", {}) != self.vocabularies:
            raise ConfigError(
                f"{path} was mapped with other vocabularies than those summary.json beside it "
                f"lists (a shard of another preprocessing run): preprocess again into an empty "
                f"directory"
            )
