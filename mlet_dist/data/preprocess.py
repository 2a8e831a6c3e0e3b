"""Streaming preprocessing of raw Criteo TSV files into Parquet shards (``mlet-dist preprocess``).

Raw day files (plain or gzip; the Criteo 1TB ``day_N`` files, the Kaggle ``train.txt``, or the
synthetic generator's output) become Parquet files of already transformed rows, which
:class:`mlet_dist.data.loader.ParquetBatchSource` streams to the ranks. Parsing and transforms are
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

Schema (one row per sample): ``label`` int8 (0/1), ``int_0`` .. ``int_12`` float32 (transformed),
``cat_0`` .. ``cat_25`` int32 when every table size is at most 2**31 (the MLPerf 40M sizes are),
else int64. The schema metadata (key ``mlet_dist``) records the table sizes and the threshold, so
that a loader can refuse shards hashed for other tables. Compression: snappy.

Splits:
    - the 24 Criteo 1TB days ``day_0`` .. ``day_23`` (exactly that set): days 0-22 are train, the
      first ``ceil(n/2)`` lines of day 23 eval and the rest test, as MLPerf DLRM (TorchRec's
      ``InMemoryBinaryCriteoIterDataPipe`` "val"/"test" stages);
    - any other files (the Kaggle ``train.txt``, synthetic days, a subset of days): the files are
      concatenated in the given order and split by *line* fractions exactly as
      :func:`~mlet_dist.data.criteo.split_arrays` splits rows: the last ``round(n *
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
manifest records them). Run one preprocessing per output directory at a time.

Example::

    summary = preprocess(["day_0.gz", ..., "day_23.gz"], "data/criteo_parquet",
                         PreprocessSettings(MLPERF_40M_TABLE_SIZES, frequency_threshold=3),
                         workers=8)
    summary["splits"]["train"]["rows"]
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import queue
import resource
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from mlet_dist.config import ConfigError, DataConfig, check_feature_count
from mlet_dist.data.criteo import (
    CAT_FEATURE_COUNT,
    DEFAULT_CAT_NAMES,
    DEFAULT_INT_NAMES,
    ON_BAD_ROW,
    CriteoArrays,
    iter_line_blocks,
    parse_lines,
)
from mlet_dist.utils.files import (
    atomic_path,
    atomic_write_json,
    check_output,
    publish_file,
    temp_path,
)

logger = logging.getLogger(__name__)

__all__ = [
    "METADATA_KEY",
    "RARE_ID",
    "SPLITS",
    "SUMMARY_FILE",
    "Part",
    "PreprocessSettings",
    "count_lines",
    "is_mlperf_days",
    "parquet_schema",
    "plan_parts",
    "preprocess",
    "preprocess_from_config",
    "read_shard_metadata",
]

SPLITS = ("train", "eval", "test")
"""Split directories of a preprocessed dataset."""
SUMMARY_FILE = "summary.json"
METADATA_KEY = b"mlet_dist"
"""Key of the Parquet schema metadata (JSON: table sizes, threshold, format version)."""
RARE_ID = 0
"""The id that hashed ids below the frequency threshold are replaced by."""
FORMAT_VERSION = 1
MLPERF_DAYS = 24

_STATE = "_state"
_QUARANTINE = "quarantine"
# Counting with np.bincount allocates the whole table; beyond this many rows per table row
# np.unique on the chunk is cheaper.
_BINCOUNT_MAX_TABLE_PER_ROW = 4
# Distinct ids are counted with one bit per table row, for tables up to this size (32 MB of bits);
# larger ones (e.g. unhashed 64-bit ids) report no distinct count.
_SEEN_MAX_TABLE = 1 << 28


@dataclass(frozen=True)
class PreprocessSettings:
    """What a preprocessing run produces; a re-run into the same directory must use the same.

    Attributes:
        num_embeddings_per_feature: hash size of each of the 26 categorical features.
        frequency_threshold: ids seen fewer times than this in the training lines become
            :data:`RARE_ID` (0 = keep all).
        on_bad_row: 'error' (stop at the first malformed line) or 'skip' (quarantine it).
        row_group_rows: rows per Parquet row group.
        eval_fraction: fraction of lines in the eval split (not for the 24 MLPerf days).
        test_fraction: fraction of lines in the test split (not for the 24 MLPerf days).
        max_rows: read at most this many lines per input file (0 = all).
        compression: Parquet compression codec.
    """

    num_embeddings_per_feature: tuple[int, ...]
    frequency_threshold: int = 0
    on_bad_row: str = "error"
    row_group_rows: int = 131072
    eval_fraction: float = 0.0
    test_fraction: float = 0.0
    max_rows: int = 0
    compression: str = "snappy"

    def __post_init__(self) -> None:
        sizes = tuple(int(s) for s in self.num_embeddings_per_feature)
        object.__setattr__(self, "num_embeddings_per_feature", sizes)
        if len(sizes) != CAT_FEATURE_COUNT or min(sizes) <= 0:
            raise ConfigError(
                f"num_embeddings_per_feature needs {CAT_FEATURE_COUNT} positive hash sizes, got "
                f"{len(sizes)} values (data.num_embeddings_per_feature)"
            )
        if self.on_bad_row not in ON_BAD_ROW:
            raise ConfigError(f"on_bad_row must be one of {ON_BAD_ROW}, got {self.on_bad_row!r}")
        if not 0 <= self.frequency_threshold <= 65535:
            raise ConfigError(
                f"frequency_threshold must be in [0, 65535], got {self.frequency_threshold}"
            )
        if self.row_group_rows <= 0 or self.max_rows < 0:
            raise ConfigError("row_group_rows must be positive and max_rows >= 0")
        for name in ("eval_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.eval_fraction + self.test_fraction >= 1.0:
            raise ConfigError("eval_fraction + test_fraction must be < 1 (no training lines left)")

    @classmethod
    def from_config(cls, data_cfg: DataConfig) -> PreprocessSettings:
        """The settings of the [data] section of a config."""
        return cls(
            num_embeddings_per_feature=tuple(data_cfg.num_embeddings_per_feature),
            frequency_threshold=data_cfg.frequency_threshold,
            on_bad_row=data_cfg.on_bad_row,
            row_group_rows=data_cfg.row_group_rows,
            eval_fraction=data_cfg.eval_fraction,
            test_fraction=data_cfg.test_fraction,
            max_rows=data_cfg.max_rows,
        )


@dataclass(frozen=True)
class Part:
    """One output file: lines ``[start, stop)`` (0-based) of one input file, in one split.

    ``stop = 0`` means to the end of the file.
    """

    split: str
    source: str
    name: str
    start: int = 0
    stop: int = 0

    @property
    def key(self) -> str:
        return f"{self.split}/{self.name}"


# ------------------------------------------------------------------------------------ schema


def parquet_schema(num_embeddings_per_feature: Sequence[int], frequency_threshold: int = 0):
    """The Parquet schema of preprocessed rows (see the module docstring).

    Args:
        num_embeddings_per_feature: the 26 table sizes; they decide the id type and are recorded
            in the schema metadata.
        frequency_threshold: recorded in the metadata.

    Returns:
        A ``pyarrow.Schema``: label int8, int_0..int_12 float32, cat_0..cat_25 int32 or int64.
    """
    sizes = [int(s) for s in num_embeddings_per_feature]
    id_type = pa.int32() if max(sizes) <= 2**31 else pa.int64()
    fields = [pa.field("label", pa.int8(), nullable=False)]
    fields += [pa.field(n, pa.float32(), nullable=False) for n in DEFAULT_INT_NAMES]
    fields += [pa.field(n, id_type, nullable=False) for n in DEFAULT_CAT_NAMES]
    meta = {
        "format_version": FORMAT_VERSION,
        "num_embeddings_per_feature": sizes,
        "frequency_threshold": int(frequency_threshold),
        "rare_id": RARE_ID,
        "dense": "log(1 + max(x, 0)), missing = 0",
        "sparse": "int(hex, 16) % num_embeddings, missing = 0",
    }
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(meta).encode()})


def read_shard_metadata(schema) -> dict[str, Any]:
    """The ``mlet_dist`` metadata of a shard's schema (empty if the file was not written here)."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def _to_table(arrays: CriteoArrays, schema) -> pa.Table:
    id_dtype = np.int32 if schema.field("cat_0").type == pa.int32() else np.int64
    dense = np.ascontiguousarray(arrays.dense.T)
    sparse = np.ascontiguousarray(arrays.sparse.T, dtype=id_dtype)
    columns = [pa.array(arrays.labels.astype(np.int8))]
    columns += [pa.array(dense[k]) for k in range(dense.shape[0])]
    columns += [pa.array(sparse[j]) for j in range(sparse.shape[0])]
    return pa.Table.from_arrays(columns, schema=schema)


# ------------------------------------------------------------------------------------ splits


def _stem(path: str | Path) -> str:
    """The output name of an input: its file name without .gz, then without .tsv/.txt."""
    name = Path(path).name
    for suffix in (".gz", ".tsv", ".txt"):
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
    return name


def is_mlperf_days(files: Sequence[str | Path]) -> bool:
    """Whether ``files`` are exactly the 24 Criteo 1TB days ``day_0`` .. ``day_23`` (.gz or not)."""
    names = sorted(_stem(f) for f in files)
    return len(files) == MLPERF_DAYS and names == sorted(f"day_{d}" for d in range(MLPERF_DAYS))


def count_lines(path: str | Path, stop: int = 0) -> int:
    """Lines of a Criteo file (plain or gzip), as the reader numbers them; at most ``stop``.

    Raises:
        CriteoFormatError: missing or truncated file.
    """
    return sum(data.count(b"\n") for _, data in iter_line_blocks(path, stop=stop))


def _fraction_parts(
    files: Sequence[str],
    eval_fraction: float,
    test_fraction: float,
    max_rows: int,
    line_counts: Callable[[list[str]], list[int]],
) -> list[Part]:
    if eval_fraction == 0.0 and test_fraction == 0.0:
        return [Part("train", f, _stem(f), 0, max_rows) for f in files]
    counts = line_counts(list(files))
    n = sum(counts)
    n_eval, n_test = round(n * eval_fraction), round(n * test_fraction)
    n_train = n - n_eval - n_test
    bounds = {
        "train": (0, n_train),
        "eval": (n_train, n_train + n_eval),
        "test": (n_train + n_eval, n),
    }
    parts = []
    offset = 0
    for f, count in zip(files, counts):
        for split, (lo, hi) in bounds.items():
            a, b = max(lo, offset), min(hi, offset + count)
            if a < b:
                parts.append(Part(split, f, _stem(f), a - offset, b - offset))
        offset += count
    return parts


def plan_parts(
    files: Sequence[str | Path],
    *,
    eval_fraction: float,
    test_fraction: float,
    eval_files: Sequence[str | Path] = (),
    max_rows: int = 0,
    line_counts: Callable[[list[str]], list[int]] | None = None,
) -> tuple[str, list[Part]]:
    """Assigns line ranges of the input files to the train/eval/test splits.

    Args:
        files: input files, in chronological order.
        eval_fraction: fraction of lines for eval (fraction mode).
        test_fraction: fraction of lines for test (fraction and eval-files modes).
        eval_files: files that form the eval split as a whole (optional).
        max_rows: lines read per file at most (0 = all).
        line_counts: returns the line count of each given file (capped at ``max_rows``); only
            called for the files whose count the split needs. Default: :func:`count_lines`.

    Returns:
        ``(mode, parts)`` with mode 'mlperf_days', 'fraction' or 'eval_files'.

    Raises:
        ConfigError: no files, or two inputs with the same name (outputs are named after them).

    Example::

        mode, parts = plan_parts([f"day_{d}.gz" for d in range(24)], eval_fraction=0.0,
                                 test_fraction=0.0)
        # mode == 'mlperf_days'; parts[-2:] are day_23's eval and test halves
    """
    files = [str(f) for f in files]
    eval_files = [str(f) for f in eval_files]
    if not files:
        raise ConfigError("no input files to preprocess (give --input FILE... or data.train_files)")
    names = [_stem(f) for f in files + eval_files]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise ConfigError(
            f"several inputs are named {dups} (outputs are named after the input file): rename "
            f"them or preprocess them into different directories"
        )

    def counted(paths: list[str]) -> list[int]:
        if line_counts is not None:
            return line_counts(paths)
        return [count_lines(p, max_rows) for p in paths]

    if eval_files:
        parts = _fraction_parts(files, 0.0, test_fraction, max_rows, counted)
        return "eval_files", parts + [Part("eval", f, _stem(f), 0, max_rows) for f in eval_files]
    if is_mlperf_days(files):
        by_day = sorted(files, key=lambda f: int(_stem(f)[4:]))
        parts = [Part("train", f, _stem(f), 0, max_rows) for f in by_day[:-1]]
        (n,) = counted([by_day[-1]])
        half = (n + 1) // 2  # eval gets the extra line of an odd count, as in TorchRec
        if half:
            parts.append(Part("eval", by_day[-1], "day_23", 0, half))
        if n - half:
            parts.append(Part("test", by_day[-1], "day_23", half, n))
        return "mlperf_days", parts
    return "fraction", _fraction_parts(files, eval_fraction, test_fraction, max_rows, counted)


# ------------------------------------------------------------------------------------ files


# Atomic outputs (temporary name, fsync, rename): mlet_dist.utils.files.
_temp_path = temp_path
_publish = publish_file
_atomic = atomic_path
_write_json = atomic_write_json


def _output(out: Path, part: Part) -> Path:
    return out / part.split / f"{part.name}.parquet"


def _part_state(out: Path, part: Part) -> Path:
    return out / _STATE / "parts" / part.split / f"{part.name}.json"


def _part_seen(out: Path, part: Part) -> Path:
    return out / _STATE / "parts" / part.split / f"{part.name}.seen.npz"


def _quarantine(out: Path, part: Part) -> Path:
    return out / _QUARANTINE / part.split / f"{part.name}.jsonl"


def _counts_file(out: Path, part: Part) -> Path:
    return out / _STATE / "counts" / f"{part.name}.npz"


def _frequent_file(out: Path) -> Path:
    return out / _STATE / "frequent.npz"


def _done(out: Path, part: Part) -> bool:
    return _output(out, part).is_file() and _part_state(out, part).is_file()


# ------------------------------------------------------------------------------------ workers

# Set in each worker process (or in the main process when running inline): where progress
# (rows) is reported, and the event that tells workers to stop after a failure elsewhere.
_PROGRESS: Any = None
_ABORT: Any = None


class _Aborted(Exception):
    """Raised in a worker when another part failed (its error is the one reported)."""


def _init_worker(progress_queue: Any, abort_event: Any) -> None:
    global _PROGRESS, _ABORT
    _PROGRESS, _ABORT = progress_queue, abort_event


def _report(rows: int) -> None:
    if _ABORT is not None and _ABORT.is_set():
        raise _Aborted
    if _PROGRESS is not None and rows:
        _PROGRESS.put(rows)


def _peak_rss_mb() -> float:
    """Peak resident memory of this process so far (for a forked worker: since the fork server,
    whose imports, torch included, it shares)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _rss_mb() -> float | None:
    """Current resident memory of this process (Linux; None elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _add_counts(counts: np.ndarray, ids: np.ndarray, cap: int) -> None:
    """counts[id] += occurrences of id in ``ids``, saturating at ``cap`` (bounded temporaries)."""
    if counts.shape[0] <= _BINCOUNT_MAX_TABLE_PER_ROW * max(ids.shape[0], 1):
        added = np.bincount(ids, minlength=counts.shape[0])
        counts[:] = np.minimum(counts + added, cap)
    else:
        unique, occurrences = np.unique(ids, return_counts=True)
        counts[unique] = np.minimum(counts[unique].astype(np.int64) + occurrences, cap)


def _count_part(part: Part, out: str, settings: PreprocessSettings) -> dict[str, Any]:
    """Pass 1 (threshold only): saturating per-id counts of a training part, saved to _state."""
    out_dir = Path(out)
    final = _counts_file(out_dir, part)
    if final.is_file():
        return {"part": part.key, "skipped": True}
    t0 = time.perf_counter()
    rss_before = _rss_mb()
    sizes = settings.num_embeddings_per_feature
    cap = settings.frequency_threshold
    dtype = np.uint8 if cap <= 255 else np.uint16
    counts = [np.zeros(s, dtype=dtype) for s in sizes]
    rows = input_bytes = 0
    for first_line, data in iter_line_blocks(part.source, start=part.start, stop=part.stop):
        input_bytes += len(data)
        arrays, bad = parse_lines(
            part.source, data, first_line, sizes, on_bad_row=settings.on_bad_row
        )
        for j in range(CAT_FEATURE_COUNT):
            _add_counts(counts[j], arrays.sparse[:, j], cap)
        rows += len(arrays)
        _report(len(arrays) + len(bad))
    with _atomic(final) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **{name: c for name, c in zip(DEFAULT_CAT_NAMES, counts)})
    seconds = time.perf_counter() - t0
    return {
        "part": part.key,
        "rows": rows,
        "input_bytes": input_bytes,
        "seconds": seconds,
        "mb_per_s": input_bytes / 1e6 / seconds if seconds > 0 else 0.0,
        "rss_before_mb": rss_before,
        "peak_rss_mb": _peak_rss_mb(),
    }


def _load_frequent(out: Path) -> list[np.ndarray]:
    with np.load(_frequent_file(out)) as z:
        return [z[name] for name in DEFAULT_CAT_NAMES]


def _apply_threshold(sparse: np.ndarray, frequent: list[np.ndarray]) -> None:
    """Replaces, in place, ids whose bit in the packed ``frequent`` bitmaps is 0 by RARE_ID."""
    for j, bits in enumerate(frequent):
        ids = sparse[:, j]
        keep = (bits[ids >> 3] >> (7 - (ids & 7))) & 1
        ids[keep == 0] = RARE_ID


def _mark_seen(seen: list[np.ndarray], sparse: np.ndarray) -> None:
    for j, bits in enumerate(seen):
        if bits.size:
            ids = sparse[:, j]
            np.bitwise_or.at(bits, ids >> 3, (128 >> (ids & 7)).astype(np.uint8))


def _write_part(part: Part, out: str, settings: PreprocessSettings) -> dict[str, Any]:
    """Pass 2: parses, transforms and writes one part; returns its statistics.

    The Parquet file, the quarantine file and the statistics appear only once the part is
    complete; the Parquet file is renamed last, so it marks completion.
    """
    out_dir = Path(out)
    final = _output(out_dir, part)
    t0 = time.perf_counter()
    rss_before = _rss_mb()
    sizes = settings.num_embeddings_per_feature
    frequent = _load_frequent(out_dir) if settings.frequency_threshold else None
    seen = [np.zeros((s + 7) // 8 if s <= _SEEN_MAX_TABLE else 0, np.uint8) for s in sizes]
    schema = parquet_schema(sizes, settings.frequency_threshold)
    rg = settings.row_group_rows
    stats = {"rows": 0, "positives": 0, "bad_rows": 0, "input_bytes": 0, "row_groups": 0}
    tmp = _temp_path(final)
    quarantine_final = _quarantine(out_dir, part)
    quarantine_tmp: Path | None = None
    quarantine = None
    try:
        with pq.ParquetWriter(tmp, schema, compression=settings.compression) as writer:
            pending: list[pa.Table] = []
            buffered = 0

            def flush(final_flush: bool) -> None:
                # concat_tables does not copy; each write_table call below is one row group.
                nonlocal pending, buffered
                if not pending:
                    return
                table = pa.concat_tables(pending)
                while table.num_rows >= rg or (final_flush and table.num_rows):
                    writer.write_table(table.slice(0, rg), row_group_size=rg)
                    stats["row_groups"] += 1
                    table = table.slice(rg)
                pending, buffered = [table], table.num_rows

            for first_line, data in iter_line_blocks(part.source, start=part.start, stop=part.stop):
                arrays, bad = parse_lines(
                    part.source, data, first_line, sizes, on_bad_row=settings.on_bad_row
                )
                stats["input_bytes"] += len(data)
                if bad:
                    if quarantine is None:
                        quarantine_tmp = _temp_path(quarantine_final)
                        quarantine = open(quarantine_tmp, "w", encoding="utf-8")
                    for row in bad:
                        record = {
                            "file": row.path,
                            "line": row.line,
                            "reason": row.reason,
                            "text": row.text.decode("utf-8", errors="backslashreplace"),
                        }
                        quarantine.write(json.dumps(record) + "\n")
                    stats["bad_rows"] += len(bad)
                if frequent is not None:
                    _apply_threshold(arrays.sparse, frequent)
                _mark_seen(seen, arrays.sparse)
                stats["rows"] += len(arrays)
                stats["positives"] += int(arrays.labels.sum())
                pending.append(_to_table(arrays, schema))
                buffered += len(arrays)
                if buffered >= rg:
                    flush(final_flush=False)
                _report(len(arrays) + len(bad))
            flush(final_flush=True)
        if quarantine is not None:
            quarantine.close()
            _publish(quarantine_tmp, quarantine_final)
        else:
            quarantine_final.unlink(missing_ok=True)  # a stale one from other settings
        seconds = time.perf_counter() - t0
        stats.update(
            part=part.key,
            source=part.source,
            lines=[part.start, part.stop],
            file=str(final.relative_to(out_dir)),
            quarantine=str(quarantine_final.relative_to(out_dir)) if quarantine else None,
            seconds=seconds,
            mb_per_s=stats["input_bytes"] / 1e6 / seconds if seconds > 0 else 0.0,
            rss_before_mb=rss_before,
            peak_rss_mb=_peak_rss_mb(),
        )
        with _atomic(_part_seen(out_dir, part)) as seen_tmp, open(seen_tmp, "wb") as f:
            np.savez_compressed(f, **{name: b for name, b in zip(DEFAULT_CAT_NAMES, seen)})
        _write_json(_part_state(out_dir, part), stats)
        _publish(tmp, final)
    except BaseException:
        if quarantine is not None:
            quarantine.close()
        for path in (tmp, quarantine_tmp):
            if path is not None:
                path.unlink(missing_ok=True)
        raise
    return stats


# ------------------------------------------------------------------------------------ driver


class _InlineProgress:
    def __init__(self, bar: tqdm) -> None:
        self.bar = bar

    def put(self, rows: int) -> None:
        self.bar.update(rows)


class _Workers:
    """Runs jobs in this process (workers <= 1) or in one process pool reused by every phase.

    The pool uses the 'forkserver' start method with this module preloaded: workers start clean
    (no threads or locks inherited from torch or arrow in the caller) and the import of
    mlet_dist.data (a few seconds, it loads torch) is paid once, by the fork server.
    """

    def __init__(self, workers: int, progress: bool) -> None:
        self.workers = workers
        self.progress = progress
        self._pool: ProcessPoolExecutor | None = None
        self._queue: Any = None
        self._abort: Any = None

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _start(self) -> ProcessPoolExecutor:
        if self._pool is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload([__name__])
            self._queue, self._abort = ctx.Queue(), ctx.Event()
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=ctx,
                initializer=_init_worker,
                initargs=(self._queue, self._abort),
            )
        return self._pool

    def run(self, fn: Callable[..., Any], jobs: list[tuple], desc: str) -> list[Any]:
        """``[fn(*job) for job in jobs]``, in parallel; rows reported by the jobs on a bar."""
        global _PROGRESS, _ABORT
        bar = tqdm(
            desc=desc,
            unit="rows",
            unit_scale=True,
            disable=not self.progress or not jobs,
            mininterval=1.0,
            smoothing=0.1,
        )
        with bar:
            if self.workers <= 1 or len(jobs) <= 1:
                saved = (_PROGRESS, _ABORT)
                _PROGRESS, _ABORT = _InlineProgress(bar), None
                try:
                    return [fn(*job) for job in jobs]
                finally:
                    _PROGRESS, _ABORT = saved
            pool = self._start()

            def drain() -> None:
                with contextlib.suppress(queue.Empty):
                    while True:
                        bar.update(self._queue.get_nowait())

            futures = [pool.submit(fn, *job) for job in jobs]
            try:
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, timeout=0.5, return_when=FIRST_EXCEPTION)
                    drain()
                    for future in done:
                        if future.exception() is not None:
                            raise future.exception()  # type: ignore[misc]
            except BaseException:
                # Running parts stop at their next chunk; queued ones are cancelled.
                self._abort.set()
                for future in futures:
                    future.cancel()
                wait(futures)
                raise
            drain()
            return [f.result() for f in futures]


def _file_identity(path: str) -> dict[str, Any]:
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _previous_output(out: Path) -> str | None:
    """None when ``out`` may be written to: an empty directory or a previous preprocessing output."""
    if not out.is_dir():
        return f"{out} exists and is not a directory"
    if (out / _STATE / "manifest.json").is_file() or not any(out.iterdir()):
        return None
    return (
        f"{out} exists and is not a previous `mlet-dist preprocess` output (no "
        f"{_STATE}/manifest.json)"
    )


def _check_manifest(out: Path, manifest: dict[str, Any]) -> None:
    path = out / _STATE / "manifest.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diffs = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
        if diffs:
            raise ConfigError(
                f"{out} holds preprocessing output of other settings or inputs (differing: "
                f"{', '.join(diffs)}); use another output directory or delete {out}"
            )
    else:
        _write_json(path, manifest)


def _line_counts(out: Path, pool: _Workers, max_rows: int):
    """Line counting with a cache in _state/line_counts.json (keyed by file identity)."""
    cache_path = out / _STATE / "line_counts.json"

    def counts(paths: list[str]) -> list[int]:
        cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
        keys = [json.dumps([_file_identity(p), max_rows]) for p in paths]
        todo = [p for p, k in zip(paths, keys) if k not in cache]
        if todo:
            results = pool.run(count_lines, [(p, max_rows) for p in todo], "count lines")
            logger.info("counted the lines of %d file(s) for the split", len(todo))
            for p, n in zip(todo, results):
                cache[json.dumps([_file_identity(p), max_rows])] = n
            _write_json(cache_path, cache)
        return [cache[k] for k in keys]

    return counts


def _merge_counts(out: Path, train_parts: list[Part], settings: PreprocessSettings) -> list[int]:
    """Sums the per-part counts (saturating) into the packed 'frequent' bitmaps; returns how many
    ids of each feature are frequent. Memory: 4 bytes per row of one table + one part's array."""
    final = _frequent_file(out)
    cap = settings.frequency_threshold
    if final.is_file():
        return [int(np.bitwise_count(b).sum()) for b in _load_frequent(out)]  # resumed run
    frequent, kept = {}, []
    for j, name in enumerate(DEFAULT_CAT_NAMES):
        total = np.zeros(settings.num_embeddings_per_feature[j], dtype=np.uint32)
        for part in train_parts:
            with np.load(_counts_file(out, part)) as z:
                np.add(total, z[name], out=total)
            np.minimum(total, cap, out=total)
        bits = total >= cap
        kept.append(int(bits.sum()))
        frequent[name] = np.packbits(bits)
    with _atomic(final) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **frequent)
    return kept


def _distinct(out: Path, parts: list[Part]) -> dict[str, dict[str, int | None]]:
    """Distinct ids per feature in each split and overall, from the parts' bitmaps (None for
    tables too large to keep a bitmap of)."""
    result: dict[str, list[int | None]] = {s: [] for s in (*SPLITS, "all")}
    for name in DEFAULT_CAT_NAMES:
        union: dict[str, np.ndarray] = {}
        for part in parts:
            with np.load(_part_seen(out, part)) as z:
                bits = z[name]
            for key in (part.split, "all"):
                union[key] = bits if key not in union else union[key] | bits
        for key in result:
            bits = union.get(key)
            count = (
                None
                if bits is not None and bits.size == 0
                else int(np.bitwise_count(bits).sum())
                if bits is not None
                else 0
            )
            result[key].append(count)
    return {
        k: dict(zip(DEFAULT_CAT_NAMES, v))
        for k, v in result.items()
        if k == "all" or any(p.split == k for p in parts)
    }


def _throughput(stats: list[dict[str, Any]], seconds: float) -> dict[str, Any] | None:
    """Throughput of the parts a pass processed in this run (None if it processed none).

    ``mb_per_s``: decompressed input MB per second of the pass (all processes together);
    ``mb_per_s_per_process``: the same per busy process (input MB over the parts' own seconds);
    memory: the worker processes' peak resident set, and their resident set when they started
    the part (the shared imports, torch included) for comparison.
    """
    if not stats:
        return None
    mb = sum(st["input_bytes"] for st in stats) / 1e6
    busy = sum(st["seconds"] for st in stats)
    before = [st["rss_before_mb"] for st in stats if st.get("rss_before_mb") is not None]
    return {
        "parts": len(stats),
        "rows": sum(st["rows"] for st in stats),
        "input_mb": mb,
        "seconds": seconds,
        "mb_per_s": mb / seconds if seconds > 0 else None,
        "mb_per_s_per_process": mb / busy if busy > 0 else None,
        "peak_rss_mb_per_process": max(st["peak_rss_mb"] for st in stats),
        "rss_at_part_start_mb": min(before) if before else None,
    }


def _remove_stale_temporaries(out: Path) -> None:
    stale = [p for p in out.rglob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink()
    if stale:
        logger.info("removed %d temporary file(s) of an interrupted run in %s", len(stale), out)


def preprocess(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    settings: PreprocessSettings,
    *,
    eval_files: Sequence[str | Path] = (),
    workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Preprocesses raw Criteo TSV files into Parquet shards; resumes an interrupted run.

    Args:
        inputs: raw files (plain or gzip), in chronological order.
        out_dir: output directory (layout in the module docstring).
        settings: what to produce.
        eval_files: files forming the eval split as a whole (optional).
        workers: processes (0 = as many as CPUs, at most one per part; 1 = in this process).
        progress: show progress bars with rows/s.

    Returns:
        The summary, also written to ``OUT/summary.json``: rows, positives and bad rows per split,
        distinct ids per feature, the per-part statistics and throughput.

    Raises:
        CriteoFormatError: a missing or truncated input, or a malformed line under 'error'
            (file and line are named).
        ConfigError: bad settings, duplicate input names, or an output directory that holds a
            run of other settings.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    inputs = [str(p) for p in inputs]
    eval_files = [str(p) for p in eval_files]
    for path in inputs + eval_files:
        if not Path(path).is_file():
            raise ConfigError(f"input {path} does not exist or is not a file")
    check_output(
        out,
        what="the preprocessed data",
        inputs=[*inputs, *eval_files],
        previous=_previous_output,
        hint="choose another output directory (--out, data.parquet_dir)",
    )
    workers = workers or os.cpu_count() or 1
    manifest = {
        "format_version": FORMAT_VERSION,
        "inputs": [_file_identity(p) for p in inputs],
        "eval_files": [_file_identity(p) for p in eval_files],
        **dataclasses.asdict(settings),
        "num_embeddings_per_feature": list(settings.num_embeddings_per_feature),
    }
    _check_manifest(out, manifest)  # the first write, after every check above
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)

    with _Workers(workers, progress) as pool:
        mode, parts = plan_parts(
            inputs,
            eval_fraction=settings.eval_fraction,
            test_fraction=settings.test_fraction,
            eval_files=eval_files,
            max_rows=settings.max_rows,
            line_counts=_line_counts(out, pool, settings.max_rows),
        )
        logger.info(
            "preprocessing %d file(s) into %d part(s) (%s split) in %s",
            len(inputs) + len(eval_files),
            len(parts),
            mode,
            out,
        )
        frequent_per_feature = None
        count_stats: list[dict[str, Any]] = []
        count_seconds = 0.0
        if settings.frequency_threshold:
            counter_bytes = sum(settings.num_embeddings_per_feature) * (
                1 if settings.frequency_threshold <= 255 else 2
            )
            logger.info(
                "frequency threshold %d: counting ids of the training lines (%.2f GB of counters "
                "per process)",
                settings.frequency_threshold,
                counter_bytes / 1e9,
            )
            train_parts = [p for p in parts if p.split == "train"]
            jobs = [
                (p, str(out), settings) for p in train_parts if not _counts_file(out, p).is_file()
            ]
            t_count = time.perf_counter()
            count_stats = pool.run(_count_part, jobs, "count ids")
            count_seconds = time.perf_counter() - t_count
            frequent_per_feature = _merge_counts(out, train_parts, settings)

        todo = [(p, str(out), settings) for p in parts if not _done(out, p)]
        if len(todo) < len(parts):
            logger.info(
                "%d of %d part(s) are already done; skipping them",
                len(parts) - len(todo),
                len(parts),
            )
        t_write = time.perf_counter()
        pool.run(_write_part, todo, "preprocess")
        write_seconds = time.perf_counter() - t_write

    part_stats = [json.loads(_part_state(out, p).read_text()) for p in parts]
    splits: dict[str, dict[str, Any]] = {}
    for part, st in zip(parts, part_stats):
        s = splits.setdefault(part.split, {"rows": 0, "positives": 0, "bad_rows": 0, "files": []})
        s["rows"] += st["rows"]
        s["positives"] += st["positives"]
        s["bad_rows"] += st["bad_rows"]
        s["files"].append(st["file"])
    done_now = {t[0].key for t in todo}
    fresh = [st for p, st in zip(parts, part_stats) if p.key in done_now]
    summary = {
        "format": "mlet_dist criteo parquet",
        "format_version": FORMAT_VERSION,
        "split_mode": mode,
        "settings": {
            **dataclasses.asdict(settings),
            "num_embeddings_per_feature": list(settings.num_embeddings_per_feature),
        },
        "inputs": inputs,
        "eval_files": eval_files,
        "schema": {
            "label": "int8",
            "dense": f"float32 x{len(DEFAULT_INT_NAMES)} ({DEFAULT_INT_NAMES[0]}..{DEFAULT_INT_NAMES[-1]}), log(1 + max(x, 0))",
            "sparse": f"{parquet_schema(settings.num_embeddings_per_feature).field('cat_0').type} x{CAT_FEATURE_COUNT} ({DEFAULT_CAT_NAMES[0]}..{DEFAULT_CAT_NAMES[-1]})",
        },
        "rows": sum(s["rows"] for s in splits.values()),
        "positives": sum(s["positives"] for s in splits.values()),
        "bad_rows": sum(s["bad_rows"] for s in splits.values()),
        "splits": splits,
        "quarantine": [st["quarantine"] for st in part_stats if st["quarantine"]],
        "distinct_ids_per_feature": _distinct(out, parts),
        "frequent_ids_per_feature": (
            dict(zip(DEFAULT_CAT_NAMES, frequent_per_feature)) if frequent_per_feature else None
        ),
        "run": {
            "workers": min(workers, max(len(todo), 1)),
            "parts_written": len(todo),
            "parts_skipped": len(parts) - len(todo),
            "seconds": time.perf_counter() - t0,
            "count": _throughput(count_stats, count_seconds),
            "write": _throughput(fresh, write_seconds),
        },
        "parts": part_stats,
    }
    _write_json(out / SUMMARY_FILE, summary)
    logger.info(
        "preprocessed %d rows (%d bad) into %s: %s",
        summary["rows"],
        summary["bad_rows"],
        out,
        ", ".join(f"{k} {v['rows']}" for k, v in splits.items()),
    )
    return summary


def preprocess_from_config(
    data_cfg: DataConfig,
    *,
    inputs: Sequence[str | Path] | None = None,
    out_dir: str | Path | None = None,
    workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs :func:`preprocess` with the settings of a [data] section.

    Inputs default to the configured raw data: the synthetic day files in ``data.dir`` (source =
    'synthetic') or ``data.train_files``; ``data.eval_files`` become the eval split. The output
    defaults to ``data.parquet_dir``.

    Raises:
        ConfigError: no inputs or no output directory; a source other than Criteo TSV;
            not 26 table sizes.
    """
    if data_cfg.source in ("avazu", "movielens"):
        raise ConfigError(
            f"mlet-dist preprocess reads Criteo TSV only, not data.source = {data_cfg.source!r}: "
            f"train, run and evaluate read that source into memory (no preprocessing needed); "
            f"for Criteo TSV inputs set --data.source=criteo"
        )
    check_feature_count(data_cfg)
    if inputs is None:
        if data_cfg.source == "synthetic":
            from mlet_dist.data.sources import data_files  # the synthetic day-file discovery

            inputs = data_files(data_cfg)
        else:
            inputs = data_cfg.train_files
    out_dir = out_dir or data_cfg.parquet_dir
    if not out_dir:
        raise ConfigError("no output directory: pass --out DIR or set data.parquet_dir")
    return preprocess(
        inputs,
        out_dir,
        PreprocessSettings.from_config(data_cfg),
        eval_files=data_cfg.eval_files,
        workers=workers,
        progress=progress,
    )
