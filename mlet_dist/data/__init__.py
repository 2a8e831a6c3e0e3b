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

__all__ = [
    "CAT_FEATURE_COUNT",
    "DEFAULT_CAT_NAMES",
    "DEFAULT_INT_NAMES",
    "FIELD_COUNT",
    "INT_FEATURE_COUNT",
    "CriteoArrays",
    "CriteoFormatError",
    "make_batches",
    "num_batches",
    "read_criteo_tsv",
    "split_arrays",
]
