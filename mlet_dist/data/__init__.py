"""Data: raw-file readers, Criteo-layout arrays, TorchRec batching and batch sources, the Parquet
format and the synthetic Criteo-format generator.

Modules: ``sources`` (the one place that reads ``data.source``), ``arrays`` (the in-memory rows),
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
    FILE_KINDS,
    Splits,
    build_batch_source,
    check_preprocessable,
    data_files,
    data_inputs,
    ensure_source_data,
    generate_source_data,
    is_streamed,
    load_splits,
    preprocess_inputs,
    read_data_file,
    read_source_file,
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
    "FILE_KINDS",
    "INT_FEATURE_COUNT",
    "META_FILE_NAME",
    "ON_BAD_ROW",
    "ArrayBatchSource",
    "BadRow",
    "BatchSource",
    "CriteoArrays",
    "CriteoFormatError",
    "FeatureRows",
    "ParquetBatchSource",
    "Splits",
    "SyntheticRows",
    "Teacher",
    "build_batch_source",
    "build_teacher",
    "check_batch_split",
    "check_preprocessable",
    "check_table_sizes",
    "data_files",
    "data_inputs",
    "day_file_name",
    "divisible_batch_size",
    "ensure_source_data",
    "ensure_synthetic",
    "format_rows",
    "generate_source_data",
    "generate_synthetic",
    "is_streamed",
    "iter_line_blocks",
    "load_splits",
    "make_batches",
    "num_batches",
    "parquet_schema",
    "parse_lines",
    "preprocess_inputs",
    "read_criteo_tsv",
    "read_data_file",
    "read_shard_metadata",
    "read_source_file",
    "require_rows",
    "sample_day",
    "split_arrays",
    "teacher_logits",
    "to_batch",
]
