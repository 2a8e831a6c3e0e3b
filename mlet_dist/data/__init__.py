"""Data: the Criteo TSV reader, TorchRec batching and the synthetic Criteo-format generator.

The Parquet preprocessing (``mlet_dist.data.preprocess``) and the streaming batch sources
(``mlet_dist.data.loader``) are imported from their modules (they need pyarrow).
"""

from mlet_dist.data.criteo import (
    CAT_FEATURE_COUNT,
    DEFAULT_CAT_NAMES,
    DEFAULT_INT_NAMES,
    FIELD_COUNT,
    INT_FEATURE_COUNT,
    ON_BAD_ROW,
    BadRow,
    CriteoArrays,
    CriteoFormatError,
    iter_line_blocks,
    make_batches,
    num_batches,
    parse_lines,
    read_criteo_tsv,
    split_arrays,
    to_batch,
)
from mlet_dist.data.synthetic import (
    META_FILE_NAME,
    SyntheticRows,
    Teacher,
    build_teacher,
    day_file_name,
    ensure_synthetic,
    format_rows,
    generate_synthetic,
    sample_day,
    teacher_logits,
)

__all__ = [
    "CAT_FEATURE_COUNT",
    "DEFAULT_CAT_NAMES",
    "DEFAULT_INT_NAMES",
    "FIELD_COUNT",
    "INT_FEATURE_COUNT",
    "META_FILE_NAME",
    "ON_BAD_ROW",
    "BadRow",
    "CriteoArrays",
    "CriteoFormatError",
    "SyntheticRows",
    "Teacher",
    "build_teacher",
    "day_file_name",
    "ensure_synthetic",
    "format_rows",
    "generate_synthetic",
    "iter_line_blocks",
    "make_batches",
    "num_batches",
    "parse_lines",
    "read_criteo_tsv",
    "sample_day",
    "split_arrays",
    "teacher_logits",
    "to_batch",
]
