"""Streaming preprocessing of raw Criteo TSV files into Parquet shards (``mlet-dist preprocess``).

Raw day files (plain or gzip; the Criteo 1TB ``day_N`` files, the Kaggle ``train.txt``, or the
synthetic generator's output) become Parquet files of already transformed rows, which
:class:`mlet_dist.data.parquet.ParquetBatchSource` streams to the ranks. Parsing and transforms are
the reader's (:func:`mlet_dist.data.criteo.parse_lines`): integer features ``log(1 + max(x, 0))``
(missing = 0), categorical hex hashes modulo the feature's table size (missing = 0).

Output directory::

    OUT/train/<name>.parquet       one file per (input file, split) part; row groups of
    OUT/eval/<name>.parquet        `row_group_rows` rows (the last one of a file may be smaller)
    OUT/test/<name>.parquet
    OUT/quarantine/<split>/<name>.jsonl   malformed lines of a part (on_bad_row = 'skip'), one JSON
                                   object per line: file, line (1-based), reason, text
    OUT/summary.json               rows, positives, bad rows, per-feature distinct ids, throughput
    OUT/_state/                    what resumption needs: manifest.json (the settings), line counts,
                                   per-part statistics, frequency counts

Schema: :mod:`mlet_dist.data.parquet` (label int8, 13 float32 dense columns, 26 int32/int64 id
columns; the schema metadata records the table sizes and the threshold). Compression: snappy.

Splits:
    - the 24 Criteo 1TB days ``day_0`` .. ``day_23`` (exactly that set): days 0-22 are train, the
      first ``ceil(n/2)`` lines of day 23 eval and the rest test, as MLPerf DLRM (TorchRec's
      ``InMemoryBinaryCriteoIterDataPipe`` "val"/"test" stages);
    - any other files (the Kaggle ``train.txt``, synthetic days, a subset of days): the files are
      concatenated in the given order and split by *line* fractions exactly as
      :func:`~mlet_dist.data.arrays.split_arrays` splits rows: the last ``round(n *
      test_fraction)`` lines are test, the ``round(n * eval_fraction)`` before them eval;
    - with ``eval_files``: the inputs are split into train/test by ``test_fraction`` and the
      eval files are the eval split.
    Splits are by line, so a malformed line skipped under 'skip' does not shift the boundaries.

Frequency threshold T (optional): a first pass over the *training* lines counts, per feature, how
often each hashed id occurs; ids seen fewer than T times are replaced by the shared id 0 (which is
also where missing values and hashes that are 0 modulo the table size land). Memory is bounded by
the hashed id space, not by the data: one saturating counter per table row (uint8 for T <= 255,
uint16 up to 65535), i.e. ``sum(num_embeddings_per_feature)`` bytes per counting process (204 MB
for the MLPerf 40M sizes), plus ``4 x`` the largest table while merging the per-file counts.
Ids are counted per chunk with ``np.bincount`` (small tables) or ``np.unique`` (large ones), so no
temporary is larger than the chunk or the table.

Memory of a writing process: one ~8 MB chunk of text and its parse temporaries (~100 MB), up to
two row groups of rows, and one bit per table row for the distinct-id count (25 MB for MLPerf).

Resumption: each part is written under a temporary name and renamed when complete (its
statistics are saved before the rename), so after an interruption a re-run skips the finished
parts and redoes the others from their start. A re-run with other settings is refused (the
manifest records them). One preprocessing per output directory at a time: a second one is
refused while the first holds the output lock (:class:`mlet_dist.utils.locks.OutputLock`).

Example::

    summary = preprocess(["day_0.gz", ..., "day_23.gz"], "data/criteo_parquet",
                         PreprocessSettings(MLPERF_40M_TABLE_SIZES, frequency_threshold=3),
                         workers=8)
    summary["splits"]["train"]["rows"]

Modules: ``run`` (the job: :func:`preprocess`, :func:`preprocess_from_config`), ``parts``
(settings, the split into parts, reading a part), ``counts`` (frequency threshold), ``write``
(writing a part), ``pool`` (worker processes and progress).
"""

from mlet_dist.data.preprocess.parts import (
    SPLITS,
    Part,
    PreprocessSettings,
    count_lines,
    is_mlperf_days,
    plan_parts,
)
from mlet_dist.data.preprocess.run import SUMMARY_FILE, preprocess, preprocess_from_config

__all__ = [
    "SPLITS",
    "SUMMARY_FILE",
    "Part",
    "PreprocessSettings",
    "count_lines",
    "is_mlperf_days",
    "plan_parts",
    "preprocess",
    "preprocess_from_config",
]
