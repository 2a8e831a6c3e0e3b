"""``[data]``: where the data is, how it is batched, and a declared feature schema."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mlet_dist.config.error import ConfigError, check_number
from mlet_dist.config.features import DenseFeatureConfig, SparseFeatureConfig, TableConfig

# MLPerf DLRMv2 per-feature hash sizes for Criteo 1TB (40M cap on the largest features).
MLPERF_40M_TABLE_SIZES: list[int] = [
    40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10,
    2209, 11938, 155, 4, 976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36,
]  # fmt: skip

# Cardinalities used by the synthetic generator by default: a scaled-down, Criteo-like spread of
# tiny, medium and large features (26 categorical features).
DEFAULT_SYNTHETIC_CARDINALITIES: list[int] = [
    2000, 500, 1500, 300, 800, 3, 400, 150, 20, 2000, 1500, 1000, 10, 200, 600, 50, 4, 100, 14,
    2000, 2000, 2000, 800, 400, 40, 12,
]  # fmt: skip


@dataclass
class DataConfig:
    """Where the data is and how it is batched."""

    source: Literal["synthetic", "criteo", "avazu", "movielens", "parquet", "files"] = "synthetic"
    """'synthetic' (generated into `dir` by `mlet-dist generate`: Criteo-format day files, or with a declared schema Parquet files in its columns), 'criteo' (Criteo TSV files in `train_files`), 'avazu' (Avazu CSV files in `train_files`, mapped onto the Criteo layout by `mlet_dist.data.avazu`), 'movielens' (MovieLens-1M `ratings.dat(.gz)` in `train_files` with `users.dat` and `movies.dat` beside it, mapped onto the Criteo layout by `mlet_dist.data.movielens`, rows sorted by time; with a declared schema: its named columns, genres multi-hot), 'parquet' (shards of `mlet-dist preprocess` in `parquet_dir`, streamed) or 'files' (Parquet, CSV or TSV files with named columns in `train_files`, read through the declared schema `dense`/`sparse`/`tables`)."""
    dir: str = "data/synthetic"
    """Directory of the synthetic data (source = 'synthetic'), written by `mlet-dist generate` (and by `run` when missing)."""
    train_files: list[str] = field(default_factory=list)
    """Criteo TSV (source = 'criteo'), Avazu CSV (source = 'avazu'), MovieLens ratings (source = 'movielens') or Parquet/CSV/TSV files with named columns (source = 'files'), plain or .gz, used for training, read in this order."""
    eval_files: list[str] = field(default_factory=list)
    """Held-out files. Empty: the last `eval_fraction` of the training rows is held out."""
    eval_fraction: float = 0.1
    """Fraction of rows held out for evaluation when `eval_files` is empty."""
    test_fraction: float = 0.0
    """Fraction of rows after the evaluation rows kept as a test split (0 = none)."""
    num_embeddings_per_feature: list[int] = field(
        default_factory=lambda: list(DEFAULT_SYNTHETIC_CARDINALITIES)
    )
    """Hash size (table rows) of each of the 26 categorical features; ids are taken modulo it."""
    max_rows: int = 0
    """Read at most this many rows per file (0 = all)."""
    batch_size: int = 256
    """Global training batch size (split evenly across ranks)."""
    eval_batch_size: int = 4096
    """Evaluation batch size."""
    shuffle: bool = True
    """Shuffle training rows each epoch (seeded by train.seed)."""
    parquet_dir: str = ""
    """Directory of preprocessed Parquet shards (train/, eval/, test/): output of `mlet-dist preprocess`, input of source = 'parquet'."""
    on_bad_row: Literal["error", "skip"] = "error"
    """Malformed rows in preprocessing: 'error' (stop, naming file and line) or 'skip' (count them and write them to a quarantine file)."""
    frequency_threshold: int = 0
    """Preprocessing: hashed ids seen fewer than this many times in the training split map to id 0 (0 = keep all ids); for an `ids = 'vocab'` table, the least count of a vocabulary value (others map to row 0)."""
    row_group_rows: int = 131072
    """Rows per Parquet row group written by preprocessing (the unit of reading and of the rank split)."""
    shuffle_buffer_rows: int = 262144
    """Parquet loader: rows shuffled together in one window (bounds its memory; 0 = row groups shuffled, rows in file order)."""
    prefetch_batches: int = 4
    """Parquet loader: batches prepared ahead by its background thread (0 = no thread)."""
    dense: list[DenseFeatureConfig] = field(default_factory=list)
    """Declared schema: the dense features, in model input order (docs/own-data.md). With no `sparse` declared, the schema is Criteo's (13 dense + 26 single ids, `num_embeddings_per_feature`)."""
    sparse: list[SparseFeatureConfig] = field(default_factory=list)
    """Declared schema: the categorical features (KJT keys), in model order. Non-empty = a declared schema (`num_embeddings_per_feature` is then unused)."""
    tables: list[TableConfig] = field(default_factory=list)
    """Declared schema: tables shared by several sparse features."""
    label: str = "label"
    """Declared schema: the label column (0/1, or bool)."""
    weight: str = ""
    """Declared schema: a column of non-negative sample weights (numbers, no missing value) that weight each row's loss (mean over the batch of weight x log loss) and the evaluation metrics (docs/own-data.md); not a model input. Empty = unweighted."""
    csv_columns: list[str] = field(default_factory=list)
    """source = 'files': the column names of CSV/TSV files without a header line (empty = the first line is the header)."""

    def check(self) -> None:
        """Checks of this section alone (the feature count: :func:`check_feature_count`)."""
        n = len(self.num_embeddings_per_feature)
        if any(v <= 0 for v in self.num_embeddings_per_feature):
            raise ConfigError("data.num_embeddings_per_feature must all be positive")
        if n == 0:
            raise ConfigError(
                "data.num_embeddings_per_feature is empty: give one hash size per feature"
            )
        if not 0.0 <= self.eval_fraction < 1.0 or not 0.0 <= self.test_fraction < 1.0:
            raise ConfigError("data.eval_fraction and data.test_fraction must be in [0, 1)")
        if self.batch_size <= 0:
            raise ConfigError(f"data.batch_size must be positive, got {self.batch_size}")
        check_number("data.eval_batch_size", self.eval_batch_size, 1)
        check_number("data.max_rows", self.max_rows, 0, why="0 = all rows")
        if not 0 <= self.frequency_threshold <= 65535:
            raise ConfigError(
                f"data.frequency_threshold must be in [0, 65535] (0 = off), got "
                f"{self.frequency_threshold}"
            )
        if self.row_group_rows <= 0:
            raise ConfigError(f"data.row_group_rows must be positive, got {self.row_group_rows}")
        if self.shuffle_buffer_rows < 0 or self.prefetch_batches < 0:
            raise ConfigError("data.shuffle_buffer_rows and data.prefetch_batches must be >= 0")
        check_weight(self)
        # What a source needs (e.g. 'parquet' needs parquet_dir) its class checks:
        # mlet_dist.data.sources (RunContext runs the check at a job's entry).


CATEGORICAL_FEATURES = 26
"""Categorical features of every data source (Criteo C1..C26; Avazu, MovieLens mapped onto them)."""


def check_feature_count(data: DataConfig) -> None:
    """Refuses a table-size list that does not match the data's 26 categorical features.

    Called before any data is read or anything is written by the commands that read data
    (train, run, evaluate, preprocess). Not part of :func:`validate`: `plan`, a dry run
    without data, accepts any number of tables.
    """
    if data.sparse:  # a declared schema: checked by mlet_dist.schema.schema_of
        return
    n = len(data.num_embeddings_per_feature)
    if n != CATEGORICAL_FEATURES:
        raise ConfigError(
            f"data.num_embeddings_per_feature has {n} values, expected {CATEGORICAL_FEATURES} "
            f"(one hash size per categorical feature of the Criteo layout every data source is "
            f"read into: Criteo's C1..C26; Avazu and MovieLens leave their last ones unused, "
            f"size 1)"
        )


def check_weight(data: DataConfig) -> None:
    """Refuses ``data.weight`` without a declared schema (the Criteo preset has no weights)."""
    if data.weight and not data.sparse:
        raise ConfigError(
            f"data.weight = {data.weight!r} needs a declared schema ([[data.sparse]], docs/own-data.md"
            f"): the Criteo preset has no weight column; remove data.weight"
        )
