"""The items of a declared feature schema in the config: ``[[data.dense]]``, ``[[data.sparse]]``,
``[[data.tables]]`` (typed like every config section; :mod:`mlet_dist.schema` validates them
together). A floor module: it imports nothing of the package.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DenseFeatureConfig:
    """One dense feature of a declared schema (`[[data.dense]]`)."""

    name: str = ""
    """Feature name (unique among the dense features)."""
    column: str = ""
    """Input column it is read from (empty = `name`); numbers, missing = 0."""
    transform: str = "none"
    """'none' (the value as float32) or 'log1p' (log(1 + max(x, 0)), as DLRM does for Criteo)."""


@dataclass
class SparseFeatureConfig:
    """One categorical feature of a declared schema (`[[data.sparse]]`): a KJT key of the model."""

    name: str = ""
    """Feature name: the KeyedJaggedTensor key (unique among the sparse features)."""
    column: str = ""
    """Input column it is read from (empty = `name`): ints or strings; a list column when multi-hot."""
    table: str = ""
    """Table the feature looks up: a `[[data.tables]]` name (shared tables), or empty for its own table `t_<name>` of `num_embeddings` rows."""
    num_embeddings: int = 0
    """Rows of the feature's own table (`table` empty); 0 when `table` names a shared table."""
    ids: str = "hash"
    """How a value becomes a row: 'hash' (strings: the first 8 bytes of blake2b(utf-8) as a little-endian uint64; ints as they are; then modulo the table rows) or 'int' (non-negative ints used as they are; a value past the table is an error) or 'vocab' (`mlet-dist preprocess` builds the table's vocabulary from the training split: the values seen at least max(1, `data.frequency_threshold`) times, by descending count, become rows 1..V; row 0 = out of vocabulary; train on the shards)."""
    max_length: int = 1
    """Ids per sample: 1 = one id (a scalar column), > 1 = multi-hot (a list column, longer lists cut to this length)."""
    pooling: str = ""
    """Pooling of the feature's own table: 'sum', 'mean' or empty for `model.pooling`."""
    chars: list[int] = field(default_factory=list)
    """A feature derived from part of a value: `[start, stop]` = characters start..stop-1 of the value's text (an int column's decimal digits), e.g. `[6, 8]` = the hour of day of Avazu's YYMMDDHH `hour`, `[0, 3]` a zip code's prefix; empty = the whole value. Single-id features only; an empty part is a missing value."""


@dataclass
class TableConfig:
    """An embedding table shared by several sparse features (`[[data.tables]]`)."""

    name: str = ""
    """Table name (also the key of `model.inner_dim_per_table`)."""
    num_embeddings: int = 0
    """Rows of the table."""
    pooling: str = ""
    """'sum', 'mean' or empty for `model.pooling`."""
