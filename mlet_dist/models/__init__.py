from mlet_dist.models.dlrm import (
    SERVED_TABLE_KEY,
    SPARSE_PREFIX,
    W1_DATA_TYPES,
    W1_PREFIX,
    W2_PREFIX,
    WeightedDLRMTrain,
    build_dlrm,
    build_tables,
    schema_tables,
)

__all__ = [
    "SERVED_TABLE_KEY",
    "SPARSE_PREFIX",
    "W1_DATA_TYPES",
    "W1_PREFIX",
    "W2_PREFIX",
    "WeightedDLRMTrain",
    "build_dlrm",
    "build_tables",
    "schema_tables",
]
