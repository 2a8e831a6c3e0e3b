"""Vocabularies of the ``ids = 'vocab'`` tables of a declared schema (docs/own-data.md).

``mlet-dist preprocess`` builds one vocabulary per such table from the *training* split: the raw
values (strings or ints) of all the table's features, every id of a multi-hot bag (after the cut
to ``max_length``, as encoded), counted; the values seen at least ``max(1,
data.frequency_threshold)`` times, ordered by descending count and then by value (so the order is
deterministic), become rows ``1..V``; row 0 is out of vocabulary (rare in, or absent from, the
training split). ``V + 1`` rows must fit the table (``num_embeddings``).

Files (in the preprocess output, copied into a serving directory by ``mlet-dist collapse``)::

    vocab/<table>.parquet   columns value (string or int64), row (int64, 1..V), count (int64)

``summary.json`` (``"vocabularies"``) and every shard's metadata record each file's sha256, so a
loader refuses shards of another vocabulary. Training on such shards records where they came from
in ``RUN/vocab.json`` (:func:`record_run_vocabularies`: the preprocess output and each file's
sha256), so ``mlet-dist collapse`` copies exactly the vocabularies the run trained on into the
serving directory (:func:`run_vocabularies`), where ``mlet-dist predict`` maps raw values with them.

Example::

    vocabs = build_vocabularies([table], n_train, schema, threshold=2)
    vocabs["words"].lookup(pa.array(["red", "unseen"]))   # array([1, 0])
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mlet_dist.config import ConfigError
from mlet_dist.data.arrays import CriteoFormatError
from mlet_dist.schema import FeatureSchema
from mlet_dist.utils.files import atomic_path, atomic_write_json, sha256_file

__all__ = [
    "RUN_VOCAB_FILE",
    "VOCAB_DIR",
    "Vocabulary",
    "VocabularyCounter",
    "VocabularyError",
    "build_vocabularies",
    "check_shard_vocabularies",
    "load_run_vocabularies",
    "read_vocabularies",
    "record_run_vocabularies",
    "run_vocabularies",
    "vocab_file",
    "write_vocabularies",
]

VOCAB_DIR = "vocab"
RUN_VOCAB_FILE = "vocab.json"
"""What a run trained on vocabularies records: {"parquet_dir", "vocabularies"}."""


class VocabularyError(CriteoFormatError):
    """A vocabulary file is missing, damaged or does not match its inputs (named, with the fix)."""


def vocab_file(table: str) -> str:
    """Path of a table's vocabulary, relative to a preprocess output or serving directory."""
    return f"{VOCAB_DIR}/{table}.parquet"


def _flat(col: pa.ChunkedArray | pa.Array, max_length: int) -> pa.Array:
    """The ids of a column as the encoder keeps them: lists cut to ``max_length`` and flattened,
    nulls dropped, dictionaries decoded, ints as int64, strings as string."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        col = pc.list_slice(col, 0, max_length).flatten()
    col = col.drop_null()
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if pa.types.is_integer(col.type) or pa.types.is_boolean(col.type):
        # uint64 ids >= 2**63 as their two's complement (the same bits), not an overflow error
        return col.cast(pa.int64(), safe=not pa.types.is_unsigned_integer(col.type))
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return col.cast(pa.string())
    return col  # refused by the encoder (not ints or strings)


@dataclass(frozen=True)
class Vocabulary:
    """One table's vocabulary: ``values[i]`` is row ``i + 1``, seen ``counts[i]`` times.

    Attributes:
        table: the table name.
        values: the values (``string`` or ``int64``) in row order.
        counts: their training counts.
    """

    table: str
    values: pa.Array
    counts: np.ndarray

    def __len__(self) -> int:
        return len(self.values)

    def lookup(self, values: pa.Array, where: str = "", path: str | Path = "") -> np.ndarray:
        """The rows (int64) of ``values``: ``1 + index`` in the vocabulary, 0 when absent.

        Raises:
            VocabularyError: strings looked up in a vocabulary of ints, or the reverse.
        """
        values = _flat(values, 1)
        if len(self.values) and values.type != self.values.type and len(values):
            raise VocabularyError(
                f"{where or path}: holds {values.type} values, but the vocabulary of table "
                f"{self.table!r} holds {self.values.type}: use the input format the vocabulary "
                f"was built from (a CSV reads every id as text)",
                path=Path(path) if path else None,
            )
        if not len(self.values):
            return np.zeros(len(values), dtype=np.int64)
        index = pc.index_in(values, value_set=self.values)
        return pc.fill_null(pc.add(index, 1), 0).to_numpy(zero_copy_only=False).astype(np.int64)

    def to_table(self) -> pa.Table:
        return pa.table(
            {
                "value": self.values,
                "row": pa.array(np.arange(1, len(self) + 1, dtype=np.int64)),
                "count": pa.array(self.counts.astype(np.int64)),
            }
        )


class VocabularyCounter:
    """Counts the raw values of every ``ids = 'vocab'`` table over training rows given in chunks
    (:meth:`add`), so a training split larger than memory can be counted; :meth:`finish` makes
    the vocabularies. Memory: the distinct values seen (merged every chunk), not the rows."""

    def __init__(self, schema: FeatureSchema, threshold: int) -> None:
        self.schema = schema
        self.minimum = max(1, threshold)
        self.counted: dict[str, pa.Table] = {}  # table -> {values, counts} (distinct values)
        self.kinds: dict[str, set[str]] = {t.name: set() for t in schema.vocab_tables}

    def add(self, table: pa.Table) -> None:
        """Counts the values of a chunk of training rows (raw named columns)."""
        for t in self.schema.vocab_tables:
            parts = []
            for f in t.features:
                feature = next(s for s in self.schema.sparse if s.name == f)
                part = _flat(table.column(feature.column or f), feature.max_length)
                if len(part):
                    self.kinds[t.name].add(str(part.type))
                    parts.append(part)
            if len(self.kinds[t.name]) > 1:
                raise VocabularyError(
                    f"the features of table {t.name!r} hold "
                    f"{' and '.join(sorted(self.kinds[t.name]))} values: one vocabulary holds "
                    f"one kind; convert the columns to one type"
                )
            if not parts:
                continue
            counted = pc.value_counts(pa.concat_arrays(parts))
            chunk = pa.table({"values": counted.field("values"), "counts": counted.field("counts")})
            if t.name in self.counted:  # merge with the counts so far
                chunk = (
                    pa.concat_tables([self.counted[t.name], chunk])
                    .group_by("values")
                    .aggregate([("counts", "sum")])
                    .rename_columns(["values", "counts"])
                )
            self.counted[t.name] = chunk

    def finish(self) -> dict[str, Vocabulary]:
        """The vocabularies (module docstring).

        Raises:
            ConfigError: a vocabulary (plus row 0) does not fit its table.
        """
        out: dict[str, Vocabulary] = {}
        for t in self.schema.vocab_tables:
            counted = self.counted.get(t.name)
            if counted is None:
                counted = pa.table(
                    {"values": pa.array([], pa.string()), "counts": pa.array([], pa.int64())}
                )
            counts = counted.column("counts").to_numpy().astype(np.int64)
            keep = np.flatnonzero(counts >= self.minimum)
            order = pa.table(
                {"count": counts[keep], "value": counted.column("values").take(pa.array(keep))}
            ).sort_by([("count", "descending"), ("value", "ascending")])
            vocab = Vocabulary(
                t.name, order.column("value").combine_chunks(), order.column("count").to_numpy()
            )
            if len(vocab) + 1 > t.num_embeddings:
                raise ConfigError(
                    f"table {t.name!r}: its vocabulary needs {len(vocab) + 1} rows ({len(vocab)} "
                    f"values seen >= {self.minimum} times in the training split, plus row 0), "
                    f"but num_embeddings = {t.num_embeddings}: raise num_embeddings to at least "
                    f"{len(vocab) + 1} or raise data.frequency_threshold"
                )
            out[t.name] = vocab
        return out


def build_vocabularies(
    tables: Sequence[pa.Table], n_train: int, schema: FeatureSchema, threshold: int
) -> dict[str, Vocabulary]:
    """The vocabulary of every ``ids = 'vocab'`` table, counted over the first ``n_train`` rows
    of ``tables`` (the raw inputs in order: the training split; module docstring).

    Raises:
        ConfigError: a vocabulary (plus row 0) does not fit its table.
        VocabularyError: a table's features hold strings in one column and ints in another.
    """
    counter = VocabularyCounter(schema, threshold)
    left = n_train
    for table in tables:
        if left <= 0:
            break
        head = table.slice(0, left)
        left -= head.num_rows
        counter.add(head)
    return counter.finish()


def write_vocabularies(root: Path, vocabs: Mapping[str, Vocabulary]) -> dict[str, dict[str, Any]]:
    """Writes ``root/vocab/<table>.parquet`` for each vocabulary; returns the summary entries
    {table: {"path", "values", "sha256"}}."""
    entries = {}
    for name, vocab in vocabs.items():
        path = root / vocab_file(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(vocab.to_table(), path)
        entries[name] = {
            "path": vocab_file(name),
            "values": len(vocab),
            "sha256": sha256_file(path),
        }
    return entries


def read_vocabularies(
    root: str | Path, entries: Mapping[str, Mapping[str, Any]], origin: str
) -> dict[str, Vocabulary]:
    """The vocabularies ``entries`` (:func:`write_vocabularies`) list under ``root``, each checked
    against its sha256.

    Raises:
        VocabularyError: a file is missing, or its sha256 differs (``origin`` says what recorded it).
    """
    out = {}
    for name, entry in entries.items():
        path = Path(root) / entry["path"]
        if not path.is_file():
            raise VocabularyError(
                f"{path}: the vocabulary of table {name!r} ({origin}) is missing; restore it or "
                f"preprocess again",
                path=path,
            )
        if sha256_file(path) != entry["sha256"]:
            raise VocabularyError(
                f"{path}: the vocabulary of table {name!r} does not match its sha256 in {origin} "
                f"(modified, or preprocessed again); restore it, or preprocess and train again",
                path=path,
            )
        table = pq.read_table(path)
        out[name] = Vocabulary(
            name, table.column("value").combine_chunks(), table.column("count").to_numpy()
        )
    return out


def record_run_vocabularies(
    run_dir: Path, parquet_dir: str | Path, entries: Mapping[str, Mapping[str, Any]]
) -> None:
    """Copies the vocabularies a run trains on into ``RUN/vocab/<table>.parquet`` and writes
    ``RUN/vocab.json`` (the preprocess output it streams, and each copy's path, relative to the
    run, and sha256; ``entries``: :func:`mlet_dist.data.schema_shards.summary_vocabularies`).

    The run keeps its own copy: preprocessing into the same ``data.parquet_dir`` again replaces
    the files there, never the vocabularies the run's rows mean.

    Raises:
        VocabularyError: a vocabulary of ``parquet_dir`` differs from its sha256 in ``entries``.
    """
    copies = read_vocabularies(parquet_dir, entries, f"{Path(parquet_dir) / 'summary.json'}")
    own = {}
    for name, entry in entries.items():
        rel = vocab_file(name)
        target = Path(run_dir) / rel
        if not (target.is_file() and sha256_file(target) == entry["sha256"]):
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as tmp:
                shutil.copyfile(Path(parquet_dir) / entry["path"], tmp)
        own[name] = {"path": rel, "values": len(copies[name]), "sha256": entry["sha256"]}
    record = {"parquet_dir": str(Path(parquet_dir).resolve()), "copy": True, "vocabularies": own}
    atomic_write_json(Path(run_dir) / RUN_VOCAB_FILE, record)


def _read_record(path: Path) -> dict[str, Any]:
    """``RUN/vocab.json``, its shape checked; a damaged or truncated one is a one-line error."""
    try:
        record = json.loads(path.read_text())
        entries = record["vocabularies"]
        ok = isinstance(record.get("parquet_dir"), str) and all(
            isinstance(e, dict)
            and isinstance(e.get("path"), str)
            and isinstance(e.get("sha256"), str)
            for e in entries.values()
        )
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        ok, error = False, f" ({type(e).__name__}: {e})"
    else:
        error = ""
    if not ok:
        raise VocabularyError(
            f"{path} is damaged or truncated{error}: it records the vocabularies the run trained "
            f"on; restore it from a copy, or train a new run",
            path=path,
        )
    return record


def check_shard_vocabularies(
    run_dir: str | Path, entries: Mapping[str, Mapping[str, Any]], use: str
) -> None:
    """Refuses shards mapped with other vocabularies than the run trained on (their rows would
    mean other values): ``entries`` are the shards' (``summary_vocabularies``), compared by
    sha256 with the run's record; ``use`` says what would read them ('resume', 'evaluate').

    Raises:
        VocabularyError: the run recorded other vocabularies, or its record is damaged.
    """
    path = Path(run_dir) / RUN_VOCAB_FILE
    if not entries or not path.is_file():
        return
    had = _read_record(path)["vocabularies"]
    if {t: e["sha256"] for t, e in had.items()} != {t: e["sha256"] for t, e in entries.items()}:
        raise VocabularyError(
            f"{path}: run {run_dir} trained on other vocabularies than the shards of "
            f"data.parquet_dir hold now (preprocessed again?); refusing to {use} with them: their "
            f"ids mean other values. Point data.parquet_dir at the shards it trained on (the "
            f"run's own copy of its vocabularies is in {Path(run_dir) / VOCAB_DIR}), or train a "
            f"new run",
            path=path,
        )


def _run_record(run_dir: str | Path, schema: FeatureSchema) -> tuple[Path, dict, str]:
    """(where the vocabulary files are, their entries, origin) of a run's ``RUN/vocab.json``:
    the run's own copies (or, recorded by an older version, the preprocess output)."""
    path = Path(run_dir) / RUN_VOCAB_FILE
    if not path.is_file():
        raise VocabularyError(
            f"{path} is missing: run {run_dir} has ids = 'vocab' tables but no record of the "
            f"vocabularies it trained on; train it on the shards of `mlet-dist preprocess`",
            path=path,
        )
    record = _read_record(path)
    entries = record["vocabularies"]
    missing = [t.name for t in schema.vocab_tables if t.name not in entries]
    if missing:
        raise VocabularyError(
            f"{path} records no vocabulary of table {missing[0]!r}; train the run again on the "
            f"shards of `mlet-dist preprocess`",
            path=path,
        )
    root = Path(run_dir) if record.get("copy") else Path(record["parquet_dir"])
    for entry in entries.values():  # a record names files of its root only
        rel = Path(entry["path"])
        if rel.is_absolute() or ".." in rel.parts:
            raise VocabularyError(
                f"{path}: vocabulary path {entry['path']!r} leaves {root}", path=path
            )
    return root, entries, f"{path}, recorded when run {run_dir} trained"


def load_run_vocabularies(run_dir: str | Path, schema: FeatureSchema) -> dict[str, Vocabulary]:
    """The vocabularies a run trained on, read and checked against the sha256 the run recorded
    (to encode raw files as its shards were, e.g. ``mlet-dist evaluate --data``); {} when the
    schema has no ``ids = 'vocab'`` table.

    Raises:
        VocabularyError: the run has no record, or a file is missing or changed since training.
    """
    if not schema.vocab_tables:
        return {}
    return read_vocabularies(*_run_record(run_dir, schema))


def run_vocabularies(run_dir: str | Path, schema: FeatureSchema) -> dict[str, Path]:
    """The vocabulary files a run trained on ({table: path}), each checked against the sha256
    the run recorded; {} when the schema has no ``ids = 'vocab'`` table.

    Raises:
        VocabularyError: the run has no record, or a file is missing or changed since training.
    """
    if not schema.vocab_tables:
        return {}
    root, entries, origin = _run_record(run_dir, schema)
    read_vocabularies(root, entries, origin)  # checks each sha256
    return {t: root / e["path"] for t, e in entries.items()}
