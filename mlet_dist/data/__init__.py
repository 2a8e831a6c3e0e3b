"""Data: the Criteo TSV reader, TorchRec batching and the synthetic Criteo-format generator."""

from mlet_dist.data.criteo import (
    CAT_FEATURE_COUNT,
    DEFAULT_CAT_NAMES,
    DEFAULT_INT_NAMES,
    FIELD_COUNT,
    INT_FEATURE_COUNT,
    CriteoArrays,
    CriteoFormatError,
    make_batches,
    num_batches,
    read_criteo_tsv,
    split_arrays,
)
from mlet_dist.data.synthetic import (
    META_FILE_NAME,
    SyntheticRows,
    Teacher,
    build_teacher,
    day_file_name,
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
    "CriteoArrays",
    "CriteoFormatError",
    "SyntheticRows",
    "Teacher",
    "build_teacher",
    "day_file_name",
    "format_rows",
    "generate_synthetic",
    "make_batches",
    "num_batches",
    "read_criteo_tsv",
    "sample_day",
    "split_arrays",
    "teacher_logits",
]
