"""Data: raw-file readers, Criteo-layout arrays, TorchRec batching and batch sources, the Parquet
format and the synthetic Criteo-format generator.

Modules: ``sources`` (the one place that reads ``data.source``: a registry of source classes), ``arrays`` (the in-memory rows),
``batching`` (``Batch``/KJT building, :class:`BatchSource`), ``parquet`` (shard schema and
streaming), ``criteo`` / ``avazu`` / ``movielens`` (raw-file parsers), ``synthetic`` (generator) and
``synthetic_teacher`` (its labelling model), ``synthetic_schema`` (synthetic Parquet files in a
declared schema's columns),
``preprocess`` (``mlet-dist preprocess``: raw TSV into Parquet shards, imported from its package).
"""

from mlet_dist.data.arrays import (
    CAT_FEATURE_COUNT,
    DEFAULT_CAT_NAMES,
    DEFAULT_INT_NAMES,
    INT_FEATURE_COUNT,
    CriteoArrays,
    CriteoFormatError,
    check_table_sizes,
    require_rows,
    split_arrays,
)
from mlet_dist.data.batching import (
    ArrayBatchSource,
    BatchSource,
    check_batch_split,
    divisible_batch_size,
    make_batches,
    num_batches,
    to_batch,
)
from mlet_dist.data.criteo import (
    FIELD_COUNT,
    ON_BAD_ROW,
    BadRow,
    iter_line_blocks,
    parse_lines,
    read_criteo_tsv,
)
from mlet_dist.data.parquet import ParquetBatchSource, parquet_schema, read_shard_metadata
from mlet_dist.data.rows import FeatureRows
from mlet_dist.data.sources import (
    SOURCES,
    DataSource,
    RowSource,
    Splits,
    build_batch_source,
    data_files,
    ensure_source_data,
    generate_source_data,
    load_splits,
    read_data_file,
    register_source,
    source_of,
)
from mlet_dist.data.synthetic import (
    META_FILE_NAME,
    day_file_name,
    ensure_synthetic,
    format_rows,
    generate_synthetic,
    sample_day,
)
from mlet_dist.data.synthetic_teacher import SyntheticRows, Teacher, build_teacher, teacher_logits

__all__ = [
    "CAT_FEATURE_COUNT",
    "DEFAULT_CAT_NAMES",
    "DEFAULT_INT_NAMES",
    "FIELD_COUNT",
    "INT_FEATURE_COUNT",
    "META_FILE_NAME",
    "ON_BAD_ROW",
    "SOURCES",
    "ArrayBatchSource",
    "BadRow",
    "BatchSource",
    "CriteoArrays",
    "CriteoFormatError",
    "DataSource",
    "FeatureRows",
    "ParquetBatchSource",
    "RowSource",
    "Splits",
    "SyntheticRows",
    "Teacher",
    "build_batch_source",
    "build_teacher",
    "check_batch_split",
    "check_table_sizes",
    "data_files",
    "day_file_name",
    "divisible_batch_size",
    "ensure_source_data",
    "ensure_synthetic",
    "format_rows",
    "generate_source_data",
    "generate_synthetic",
    "iter_line_blocks",
    "load_splits",
    "make_batches",
    "num_batches",
    "parquet_schema",
    "parse_lines",
    "read_criteo_tsv",
    "read_data_file",
    "read_shard_metadata",
    "register_source",
    "require_rows",
    "sample_day",
    "source_of",
    "split_arrays",
    "teacher_logits",
    "to_batch",
]
