"""``mlet-dist preprocess`` for a declared feature schema: inputs read through the schema, split,
rare ids replaced, vocabularies of the ``ids = 'vocab'`` tables built from the training split
(:mod:`mlet_dist.data.vocab`), written as the shards of :mod:`mlet_dist.data.schema_shards` (see
there) with ``vocab/<table>.parquet`` beside them.

Out of core: the inputs are streamed in chunks of ``CHUNK_ROWS`` rows
(:meth:`mlet_dist.data.sources.DataSource.iter_table`: Parquet record batches, pyarrow's streaming CSV
reader), never held whole, in up to four passes over them:

1. rows per input (a Parquet footer; a reading pass over CSV/TSV), which fixes the split: the
   first ``train`` rows in input order, then ``eval``, then ``test``, as
   :func:`~mlet_dist.data.arrays.split_arrays` cuts rows in memory (or ``data.eval_files`` as the
   eval split);
2. with vocab tables: their raw values counted over the training rows
   (:class:`~mlet_dist.data.vocab.VocabularyCounter`);
3. with ``data.frequency_threshold`` and hashed/int tables: their ids counted over the training
   rows (one bincount per table: 8 bytes a table row);
4. every chunk encoded, rare ids replaced, cut at the split boundaries and appended to the split's
   Parquet file in row groups of ``data.row_group_rows``.

Memory: a chunk, a row group per split, the id counts and the vocabularies. The output is the same
as encoding every row in memory and splitting (tests/test_schema_dist.py checks it row by row).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from mlet_dist.config import ConfigError, DataConfig
from mlet_dist.data.arrays import CriteoFormatError, check_fractions, split_sizes
from mlet_dist.data.columns import encode_table
from mlet_dist.data.parquet import RARE_ID
from mlet_dist.data.rows import FeatureRows
from mlet_dist.data.schema_shards import FORMAT, rows_to_table
from mlet_dist.data.sources import DataSource, source_of
from mlet_dist.data.vocab import Vocabulary, VocabularyCounter, write_vocabularies
from mlet_dist.schema import FeatureSchema
from mlet_dist.utils.files import (
    atomic_write_json,
    check_output,
    remove_path,
    replace_dir,
    staging_dir,
    writing,
)
from mlet_dist.utils.locks import OutputLock

__all__ = ["CHUNK_ROWS", "preprocess_schema"]

logger = logging.getLogger(__name__)

CHUNK_ROWS = 1 << 16
"""Rows read and encoded at a time."""

SPLITS = ("train", "eval", "test")


class _Inputs:
    """The raw input files of one role (the inputs, or ``data.eval_files``), streamed in order."""

    def __init__(self, source: DataSource, paths: Sequence, chunk_rows: int) -> None:
        self.source, self.paths, self.chunk_rows = source, list(paths), chunk_rows
        self.rows = [self._count(p) for p in self.paths]

    def _count(self, path) -> int:
        n = self.source.table_rows(path)
        if n == 0:
            raise CriteoFormatError(
                f"{path}: the file is empty (no data rows); check the path, or remove it from the "
                f"list of files",
                path=path,
            )
        return n

    def chunks(self, stop: int | None = None) -> Iterator[tuple[pa.Table, Any, int]]:
        """(raw chunk, its file, position of its first row among all rows) up to row ``stop``."""
        start = 0
        for path in self.paths:
            for table in self.source.iter_table(path, self.chunk_rows):
                if stop is not None and start >= stop:
                    return
                if stop is not None:
                    table = table.slice(0, stop - start)
                if table.num_rows:
                    yield table, path, start
                start += table.num_rows


class _SplitWriter:
    """One split's ``part-00000.parquet``, written in row groups of ``group_rows`` rows (chunks
    are buffered to full groups, so the file is the one writing every row at once gives)."""

    def __init__(self, path: Path, group_rows: int) -> None:
        self.path, self.group_rows = path, group_rows
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.writer: pq.ParquetWriter | None = None
        self.rows = self.positives = 0

    def add(self, table: pa.Table, positives: int) -> None:
        self.rows += table.num_rows
        self.positives += positives
        self.buffer.append(table)
        self.buffered += table.num_rows
        if self.buffered >= self.group_rows:
            self._flush(whole_groups=True)

    def _flush(self, whole_groups: bool) -> None:
        table = pa.concat_tables(self.buffer)
        n = (
            (table.num_rows // self.group_rows) * self.group_rows
            if whole_groups
            else table.num_rows
        )
        if n:
            if self.writer is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.writer = pq.ParquetWriter(self.path, table.schema)
            self.writer.write_table(table.slice(0, n), row_group_size=self.group_rows)
        rest = table.slice(n)
        self.buffer, self.buffered = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> None:
        if self.buffered:
            self._flush(whole_groups=False)
        if self.writer is not None:
            self.writer.close()


def _id_counts(
    inputs: _Inputs, n_train: int, vocabs: dict[str, Vocabulary], bar: tqdm
) -> dict[str, np.ndarray]:
    """Per hashed/int table, how often each row occurs in the training rows (every feature of a
    shared table, every id of a bag)."""
    schema = inputs.source.schema
    index = {f: j for j, f in enumerate(schema.feature_names)}
    tables = [t for t in schema.tables if t not in schema.vocab_tables]
    counts = {t.name: np.zeros(t.num_embeddings, dtype=np.int64) for t in tables}
    for raw, path, _ in inputs.chunks(stop=n_train):
        rows = encode_table(raw, schema, path, vocabs)
        for t in tables:
            for f in t.features:
                a, n = rows.ids[index[f]], rows.lengths[index[f]]
                valid = np.arange(a.shape[1])[None, :] < n[:, None]
                counts[t.name] += np.bincount(a[valid], minlength=t.num_embeddings)
        bar.update(raw.num_rows)
    return counts


def _replace_rare(rows: FeatureRows, schema: FeatureSchema, rare: dict[str, np.ndarray]) -> None:
    """Replaces the rare rows (``rare[table]``: a mask over the table) by :data:`RARE_ID`."""
    index = {f: j for j, f in enumerate(schema.feature_names)}
    for t in schema.tables:
        if t.name in rare:
            for f in t.features:
                a = rows.ids[index[f]]
                a[rare[t.name][a]] = RARE_ID


def preprocess_schema(
    data_cfg: DataConfig,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    progress: bool = True,
    chunk_rows: int = CHUNK_ROWS,
    schema: FeatureSchema | None = None,
) -> dict[str, Any]:
    """Streams ``inputs`` through the config's declared schema and writes shards to ``out_dir``
    (``train/``, ``eval/``, ``test/``, ``vocab/``, ``summary.json``; module docstring), replacing
    a previous output atomically (nothing is written before every input has been counted).

    ``schema``: the run's feature schema (:func:`~mlet_dist.schema.schema_of` when not given).

    Raises:
        ConfigError / ColumnError: a bad schema or input (named).
        OutputPathError: ``out_dir`` is, holds or lies inside an input, a run, a checkpoint or
            a serving directory, or holds something else (the checks of every command's output).
        OutputLockedError: another process is writing ``out_dir``.
    """
    source = source_of(data_cfg, schema)
    if not inputs:
        raise ConfigError("no inputs: set data.train_files or pass --input FILES")
    out = check_output(
        out_dir,
        what="the preprocessed data",
        inputs=[*inputs, *data_cfg.eval_files],
        previous=_previous_output,
        hint="choose another output directory (--out, data.parquet_dir)",
    )  # resolved: a symlink --out is the directory it points to
    with OutputLock(out, "preprocess", what="the preprocessed data"):
        return _preprocess_into(source, data_cfg, inputs, out, progress, chunk_rows)


def _previous_output(out: Path) -> str | None:
    """None when ``out`` may be replaced: an empty directory or a previous output of a
    feature-schema preprocessing (its ``summary.json``); else the reason it may not."""
    if not out.is_dir():
        return f"{out} exists and is not a directory"
    summary = out / "summary.json"
    if not any(out.iterdir()):
        return None
    try:
        previous = json.loads(summary.read_text()) if summary.is_file() else None
    except (OSError, ValueError):
        previous = None
    if isinstance(previous, dict) and previous.get("format") == FORMAT:
        return None
    return f"{out} exists and is not a previous output of a feature-schema preprocessing"


def _write_shards(
    staging: Path,
    main: _Inputs,
    evals: _Inputs,
    sizes: tuple[int, int],
    vocabs: dict[str, Vocabulary],
    rare: dict[str, np.ndarray],
    threshold: int,
    group_rows: int,
    bar: tqdm,
) -> dict[str, Any]:
    """Writes the splits (the first ``sizes = (train, eval)`` rows of ``main``, then the rest as
    test; ``evals`` appended to eval), the vocabularies and ``summary.json`` into ``staging``;
    returns the summary."""
    schema = main.source.schema
    n_train, n_eval = sizes
    vocab_entries = write_vocabularies(staging, vocabs)
    digests = {t: e["sha256"] for t, e in vocab_entries.items()}
    writers = {name: _SplitWriter(staging / name / "part-00000.parquet", group_rows) for name in SPLITS}  # fmt: skip

    def write(name: str, raw: pa.Table, path: Any) -> None:
        rows = encode_table(raw, schema, path, vocabs)
        _replace_rare(rows, schema, rare)
        writers[name].add(rows_to_table(rows, schema, threshold, digests), int(rows.labels.sum()))

    bounds = (
        ("train", 0, n_train),
        ("eval", n_train, n_train + n_eval),
        ("test", n_train + n_eval, None),
    )
    try:
        with bar as b:
            for raw, path, start in main.chunks():
                for name, lo, hi in bounds:  # the chunk's rows in each split
                    a = max(lo - start, 0)
                    z = raw.num_rows if hi is None else min(hi - start, raw.num_rows)
                    if z > a:
                        write(name, raw.slice(a, z - a), path)
                b.update(raw.num_rows)
            for raw, path, _ in evals.chunks():
                write("eval", raw, path)
                b.update(raw.num_rows)
    finally:
        for w in writers.values():
            w.close()
    summary: dict[str, Any] = {
        "format": FORMAT,
        "frequency_threshold": threshold,
        "vocabularies": vocab_entries,
        "splits": {},
    }
    for name, w in writers.items():
        (staging / name).mkdir(parents=True, exist_ok=True)
        summary["splits"][name] = {"rows": w.rows, "positives": w.positives}
    summary["rows"] = sum(s["rows"] for s in summary["splits"].values())
    summary["positives"] = sum(s["positives"] for s in summary["splits"].values())
    summary["bad_rows"] = 0
    atomic_write_json(staging / "summary.json", summary)
    return summary


def _preprocess_into(
    source: DataSource,
    data_cfg: DataConfig,
    inputs: Sequence[str | Path],
    out: Path,
    progress: bool,
    chunk_rows: int,
) -> dict[str, Any]:
    """:func:`preprocess_schema` once its output is checked and locked."""
    schema = source.schema
    threshold = data_cfg.frequency_threshold
    main = _Inputs(source, inputs, chunk_rows)
    evals = _Inputs(source, data_cfg.eval_files, chunk_rows)
    fractions = (0.0 if data_cfg.eval_files else data_cfg.eval_fraction, data_cfg.test_fraction)
    check_fractions(*fractions)
    n_train, n_eval, _ = split_sizes(sum(main.rows), *fractions)
    total = sum(main.rows) + sum(evals.rows)

    def bar(what: str, rows: int) -> tqdm:
        return tqdm(total=rows, unit="rows", desc=f"preprocess: {what}", disable=not progress)

    vocabs: dict[str, Vocabulary] = {}
    if schema.vocab_tables:  # counted over the raw values of the training rows
        counter = VocabularyCounter(schema, threshold)
        with bar("vocabularies", n_train) as b:
            for raw, _, _ in main.chunks(stop=n_train):
                counter.add(raw)
                b.update(raw.num_rows)
        vocabs = counter.finish()
    rare: dict[str, np.ndarray] = {}
    if threshold and len(schema.vocab_tables) < len(schema.tables):
        with bar("id counts", n_train) as b:
            rare = {t: c < threshold for t, c in _id_counts(main, n_train, vocabs, b).items()}

    staging = staging_dir(out)  # this attempt's own (stale ones of interrupted runs removed)
    try:  # a failed or interrupted attempt leaves no staging directory behind
        with writing(out):  # a full disk: one line naming the output
            summary = _write_shards(
                staging, main, evals, (n_train, n_eval), vocabs, rare, threshold,
                data_cfg.row_group_rows, bar("shards", total),
            )  # fmt: skip
        replace_dir(staging, out)
    except BaseException:
        remove_path(staging)
        raise
    if progress:
        logger.info("preprocess: wrote %s (%s)", out, summary["splits"])
    return summary
