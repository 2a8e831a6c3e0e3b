"""Files with named columns (Parquet, CSV, TSV) read through a declared feature schema.

``data.source = 'files'``: every file of ``data.train_files`` / ``data.eval_files`` is read with
pyarrow (only the columns the schema names) and encoded into
:class:`~mlet_dist.data.rows.FeatureRows` by :func:`encode_table`, which the MovieLens preset
uses as well (:func:`mlet_dist.data.movielens.read_movielens_table`).

Formats, by file name: ``.parquet``/``.pq`` (ints, strings, booleans; ``list<int>`` or
``list<string>`` columns for multi-hot features); ``.csv``/``.tsv`` (optionally ``.gz``; comma or
tab separated; a header line unless ``data.csv_columns`` names the columns, and then a first line
equal to those names is skipped as a header, so headed and headless parts mix; a multi-hot value is
one field with ``|`` between the ids, e.g. ``Comedy|Drama``; text has no types, so with
``ids = 'hash'`` every CSV id is hashed as a string, ``"5"`` like ``"abc"``, whereas a Parquet int
column's 5 is the int 5: keep one input format per model).

Encoding (per declared feature):

- label: 0/1 numbers or booleans, no missing value;
- weight (``data.weight``, optional): non-negative finite numbers, no missing value; float32;
- dense: numbers, missing = 0, then ``transform`` ('log1p': ``log(1 + max(x, 0))`` as DLRM);
- sparse, ``ids = 'hash'``: strings become the little-endian uint64 of the first 8 bytes of
  ``blake2b(utf-8 bytes)`` (Python's ``hashlib``: stable across runs, machines and versions,
  unlike Python's ``hash``), ints their two's-complement uint64; then modulo the table rows;
- sparse, ``ids = 'int'``: non-negative ints used as they are; one past the table is an error;
- sparse, ``ids = 'vocab'``: the value's row in its table's vocabulary (:mod:`mlet_dist.data.vocab`,
  built by ``mlet-dist preprocess``), 0 when it is not in it; without the vocabulary an error;
- missing (null) value: an empty bag (length 0; the pooled embedding is 0). A multi-hot list is
  cut to ``max_length`` ids;
- ``chars = [start, stop]`` (a derived feature): characters ``start..stop-1`` of the value's text
  (an int's decimal digits) are the value, then hashed or, with ``ids = 'int'``, parsed as an int
  (Avazu's ``hour`` YYMMDDHH with ``[6, 8]`` is the hour of day); an empty part is missing.

Bad input (a missing column, strings where numbers are declared, a list where one id is declared,
an id past its table) raises :class:`ColumnError` naming the file, column and fix.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from mlet_dist.data.arrays import CriteoFormatError
from mlet_dist.data.rows import FeatureRows
from mlet_dist.data.vocab import Vocabulary
from mlet_dist.schema import FeatureSchema

__all__ = ["ColumnError", "encode_table", "read_columns_file", "stable_hash"]

MULTI_SEPARATOR = "|"


class ColumnError(CriteoFormatError):
    """A column of an input file does not match the declared schema (file, column and fix)."""


def stable_hash(strings: Sequence[str]) -> np.ndarray:
    """uint64 of each string: the first 8 bytes of blake2b(utf-8), little-endian.

    (hashlib rather than a numpy/pyarrow hash: neither exposes a documented, version-stable string
    hash; the encoder hashes each distinct string once, so the Python loop runs over the
    vocabulary, not the rows.)
    """
    out = np.empty(len(strings), dtype=np.uint64)
    for i, s in enumerate(strings):
        out[i] = int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")
    return out


def _format(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    for suffix, kind in ((".parquet", "parquet"), (".pq", "parquet"), (".csv", "csv")):
        if name.endswith(suffix):
            return kind
    if name.endswith((".tsv", ".txt")):
        return "tsv"
    raise ColumnError(
        f"{path}: unknown file type; data.source = 'files' reads .parquet, .csv or .tsv "
        f"(optionally .gz) files",
        path=path,
    )


def _first_line(path: Path, kind: str) -> list[str]:
    """The fields of a CSV/TSV file's first line, unquoted as pyarrow reads them (the header's
    column names, or a line to compare with csv_columns)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    # utf-8-sig: a byte-order mark is not part of the first column's name (pyarrow drops it too)
    with opener(path, "rt", encoding="utf-8-sig", errors="replace", newline="") as f:
        line = f.readline().rstrip("\r\n")
    return next(csv.reader([line], delimiter="," if kind == "csv" else "\t"), [])


def _needed(schema: FeatureSchema) -> list[str]:
    cols = [schema.label, *([schema.weight] if schema.weight else [])]
    cols += [f.column or f.name for f in schema.dense]
    cols += [f.column or f.name for f in schema.sparse]
    return list(dict.fromkeys(cols))


def _key(schema: FeatureSchema, column: str) -> str:
    """Where ``column`` is named, for messages."""
    return "data.weight" if column == schema.weight else "declared in the data schema"


def read_columns_file(
    path: str | Path, schema: FeatureSchema, csv_columns: Sequence[str] = (), max_rows: int = 0
) -> pa.Table:
    """The columns ``schema`` needs from one Parquet/CSV/TSV file, all at once (the chunks of
    :func:`iter_columns_file` joined).

    Raises:
        ColumnError: the file is missing or unreadable, or lacks a declared column.
    """
    return pa.concat_tables(iter_columns_file(path, schema, csv_columns, max_rows))


def iter_columns_file(
    path: str | Path,
    schema: FeatureSchema,
    csv_columns: Sequence[str] = (),
    max_rows: int = 0,
    chunk_rows: int = 1 << 16,
) -> Iterator[pa.Table]:
    """The columns ``schema`` needs from one Parquet/CSV/TSV file (module docstring), in chunks
    of at most ``chunk_rows`` rows (Parquet record batches; CSV blocks of pyarrow's streaming
    reader), so a file larger than memory can be processed; at least one (maybe empty) chunk.

    CSV/TSV columns are read with declared types (ids as text or ints as the schema says, label
    and dense columns as text, parsed as numbers by the encoder), so no block's type guess can
    contradict another's; the other columns are not parsed at all.

    Raises:
        ColumnError: the file is missing or unreadable, or lacks a declared column.
    """
    path = Path(path)
    if not path.is_file():
        raise ColumnError(f"{path} does not exist (data.train_files / data.eval_files)", path=path)
    kind = _format(path)
    needed = _needed(schema)
    try:
        if kind == "parquet":
            names = pq.read_schema(path).names
        else:
            first = _first_line(path, kind)
            names = list(csv_columns) or first
    except (pa.ArrowInvalid, OSError) as e:
        raise ColumnError(f"{path}: not a readable {kind} file ({e})", path=path) from e
    if not any(names):
        raise ColumnError(
            f"{path}: the file is empty (no header line, no rows); write the rows with a header "
            f"line of column names, or name the columns in data.csv_columns",
            path=path,
        )
    missing = [c for c in needed if c not in names]
    if missing:
        raise ColumnError(
            f"{path}: no column {missing[0]!r} ({_key(schema, missing[0])}); its columns are "
            f"{', '.join(names[:20])}: fix the column name in the config "
            f"({'data.weight' if missing[0] == schema.weight else 'column = ...'})",
            path=path,
        )
    left = max_rows or -1
    try:
        if kind == "parquet":
            chunks = (
                pa.Table.from_batches([b])
                for b in pq.ParquetFile(path).iter_batches(chunk_rows, columns=needed)
            )
        else:
            chunks = _csv_chunks(path, kind, schema, needed, csv_columns, first, chunk_rows)
        empty = True
        for chunk in chunks:
            if left == 0:
                break
            if left > 0:
                chunk = chunk.slice(0, left)
                left -= chunk.num_rows
            empty = False
            yield chunk.select(needed)
    except (pa.ArrowInvalid, OSError) as e:
        if "conversion error to int64" in str(e):  # an ids = 'int' column of a CSV
            raise ColumnError(
                f"{path}: {e}: ids = 'int' takes ids 0 <= id < num_embeddings (int64); set "
                f"ids = 'hash' for other values",
                path=path,
            ) from e
        raise ColumnError(f"{path}: not a readable {kind} file ({e})", path=path) from e
    if empty:  # no row: an empty table of the columns (the readers accept empty files)
        if kind == "parquet":
            yield pq.read_schema(path).empty_table().select(needed)
        else:
            types = _csv_types(schema, needed)  # as the rows would have been read: no wrong kind
            yield pa.table({c: pa.array([], types[c]) for c in needed})


def _csv_types(schema: FeatureSchema, needed: list[str]) -> dict[str, pa.DataType]:
    """The type of each needed CSV column as :func:`_csv_chunks` yields it."""
    types = {c: pa.string() for c in needed}
    for f in schema.sparse:
        c = f.column or f.name
        text = f.ids in ("hash", "vocab") or f.max_length > 1 or f.chars
        one = pa.string() if text and not (f.max_length > 1 and f.ids == "int") else pa.int64()
        types[c] = pa.list_(one) if f.max_length > 1 else one
    return types


def _csv_chunks(
    path: Path,
    kind: str,
    schema: FeatureSchema,
    needed: list[str],
    csv_columns: Sequence[str],
    first: list[str],
    chunk_rows: int,
) -> Iterator[pa.Table]:
    multi = {f.column or f.name for f in schema.sparse if f.max_length > 1}
    text = {  # read as text: hashed, looked up, multi-hot split at "|", or a part taken (chars)
        f.column or f.name
        for f in schema.sparse
        if f.ids in ("hash", "vocab") or f.max_length > 1 or f.chars
    }
    int_multi = {f.column or f.name for f in schema.sparse if f.max_length > 1 and f.ids == "int"}
    # text has no types: an id column is text (hashed as a string) unless ids = 'int' (a plain
    # int column), so a column never changes kind by file; numbers are parsed by the encoder
    types = {c: pa.string() for c in needed}
    for f in schema.sparse:
        c = f.column or f.name
        types[c] = pa.string() if c in text else pa.int64()
    skip = int(bool(csv_columns) and first == list(csv_columns))
    # blocks of about chunk_rows rows of ~64 bytes, at least 256 KiB (a line must fit a block)
    read = pcsv.ReadOptions(
        column_names=list(csv_columns) or None,
        skip_rows=skip,
        block_size=max(1 << 18, 64 * chunk_rows),
    )
    parse = pcsv.ParseOptions(delimiter="," if kind == "csv" else "\t")
    # Only an empty field is missing: pyarrow's default null strings ("NA", "null", "nan", "N/A"
    # ...) would make the id "NA" of a CSV file missing where the same Parquet value is an id.
    convert = pcsv.ConvertOptions(
        column_types=types, include_columns=needed, strings_can_be_null=True, null_values=[""]
    )
    try:
        reader = pcsv.open_csv(path, read, parse, convert)
    except pa.ArrowInvalid as e:
        if "Empty CSV file" in str(e):  # a header line without a newline, and no row
            return
        raise
    with reader:
        for batch in reader:
            table = pa.Table.from_batches([batch])
            for c in multi:  # "a|b|c" -> ["a", "b", "c"]
                i = table.column_names.index(c)
                split = pc.split_pattern(table.column(c), MULTI_SEPARATOR)
                if c in int_multi:
                    split = split.cast(pa.list_(pa.int64()))
                table = table.set_column(i, c, split)
            yield table


def _column(table: pa.Table, name: str) -> pa.Array:
    col = table.column(name).combine_chunks()
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    return col


def _numbers(col: pa.Array, where: str, path: Path, fix: str, booleans: bool = True) -> np.ndarray:
    t = col.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):  # CSV text: numbers (or booleans)
        for target in (pa.float64(), pa.bool_()) if booleans else (pa.float64(),):
            try:
                col = col.cast(target)
                break
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                continue
        t = col.type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
        raise ColumnError(f"{where}: holds {t} values, expected numbers: {fix}", path=path)
    return pc.fill_null(col.cast(pa.float64()), 0.0).to_numpy(zero_copy_only=False)


def _ids(
    values: pa.Array, rows: int, f, where: str, path: Path, vocab: Vocabulary | None
) -> np.ndarray:
    """uint64/int64 ids of a flat array of ints or strings (no nulls)."""
    t = values.type
    known = pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)
    if f.ids == "vocab" and (known or pa.types.is_boolean(t)):
        if vocab is None:
            raise ColumnError(
                f"{where}: ids = 'vocab' maps values through the vocabulary that `mlet-dist "
                f"preprocess` builds: preprocess the inputs and train on its shards "
                f"(data.source = 'parquet'), or set ids = 'hash'",
                path=path,
            )
        return vocab.lookup(values, where, path)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        if f.ids == "int":
            raise ColumnError(
                f"{where}: holds strings but ids = 'int' is declared: set ids = 'hash' (or map the "
                f"strings to ints first)",
                path=path,
            )
        codes = pc.dictionary_encode(values)
        hashed = stable_hash(codes.dictionary.to_pylist())
        return hashed[codes.indices.to_numpy(zero_copy_only=False)] % np.uint64(rows)
    if pa.types.is_integer(t) or pa.types.is_boolean(t):
        # two's-complement uint64 (uint64 ids >= 2**63 too: no int64 cast that could overflow)
        unsigned = pa.types.is_unsigned_integer(t)
        wide = values.cast(pa.uint64() if unsigned else pa.int64())
        ids = wide.to_numpy(zero_copy_only=False)
        if f.ids == "hash":
            return (ids if unsigned else ids.view(np.uint64)) % np.uint64(rows)
        bad = np.flatnonzero((ids >= rows) if unsigned else ((ids < 0) | (ids >= rows)))
        if bad.size:
            raise ColumnError(
                f"{where}: id {ids[bad[0]]} is outside its table of {rows} rows (ids = 'int'): "
                f"set ids = 'hash', or num_embeddings > {int(ids.max())}",
                path=path,
            )
        return ids.astype(np.int64)
    raise ColumnError(
        f"{where}: holds {t} values; categorical ids must be ints or strings (a list column for "
        f"a multi-hot feature)",
        path=path,
    )


def _part(col: pa.Array, f, where: str, path: Path) -> pa.Array:
    """Characters ``f.chars`` of each value's text (an int's decimal digits); '' -> missing;
    parsed as ints under ``ids = 'int'``."""
    t = col.type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)):
        raise ColumnError(
            f"{where}: holds {t} values; chars = {f.chars} takes part of a string or int value",
            path=path,
        )
    part = pc.utf8_slice_codeunits(col.cast(pa.string()), f.chars[0], f.chars[1])
    part = pc.if_else(pc.equal(part, ""), pa.scalar(None, pa.string()), part)
    if f.ids != "int":
        return part
    try:
        return part.cast(pa.int64())
    except pa.ArrowInvalid as e:
        raise ColumnError(
            f"{where}: characters {f.chars[0]}..{f.chars[1] - 1} of a value are not an int "
            f"({e}): set ids = 'hash' or fix chars",
            path=path,
        ) from e


def _sparse(col: pa.Array, f, rows: int, where: str, path: Path, vocab: Vocabulary | None):
    """(ids (n, L) int64, lengths (n,) int32) of one feature's column."""
    n = len(col)
    width = f.max_length
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        if width == 1:
            raise ColumnError(
                f"{where}: holds lists ({col.type}) but one id per row is declared: set "
                f"max_length to the longest list to keep (a multi-hot feature)",
                path=path,
            )
        flat = col.flatten()  # skips null lists; offsets below count them as empty
        if flat.null_count:
            raise ColumnError(f"{where}: a list holds a null id; drop it from the list", path=path)
        lengths_all = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False)
        starts = np.concatenate([[0], np.cumsum(lengths_all)[:-1]]).astype(np.int64)
        values = _ids(flat, rows, f, where, path, vocab).astype(np.int64)
    else:
        present = col.is_valid().to_numpy(zero_copy_only=False)
        lengths_all = present.astype(np.int64)
        starts = np.cumsum(lengths_all) - lengths_all
        values = _ids(col.drop_null(), rows, f, where, path, vocab).astype(np.int64)
    lengths = np.minimum(lengths_all, width)
    ids = np.zeros((n, width), dtype=np.int64)
    for j in range(width):
        has = lengths > j
        ids[has, j] = values[starts[has] + j]
    return ids, lengths.astype(np.int32)


def encode_table(
    table: pa.Table,
    schema: FeatureSchema,
    path: str | Path,
    vocabs: Mapping[str, Vocabulary] | None = None,
) -> FeatureRows:
    """The rows of a table of named columns, encoded as the schema declares (module docstring).

    ``vocabs``: the vocabularies of the ``ids = 'vocab'`` tables, by table name.

    Raises:
        ColumnError: a declared column is missing or of the wrong kind, or an id is past its table
            (``ids = 'int'``); the message names ``path``, the column and the fix.
    """
    path = Path(path)
    for c in _needed(schema):
        if c not in table.column_names:
            raise ColumnError(f"{path}: no column {c!r} ({_key(schema, c)})", path=path)
    label = _column(table, schema.label)
    where = f"{path}: column {schema.label!r} (data.label)"
    if label.null_count:
        raise ColumnError(f"{where}: {label.null_count} rows have no label; drop them", path=path)
    labels = _numbers(label, where, path, "the label must be 0/1 or a boolean")
    if labels.size and not np.isin(labels, (0.0, 1.0)).all():
        bad = labels[~np.isin(labels, (0.0, 1.0))][0]
        raise ColumnError(
            f"{where}: value {bad} is not 0 or 1; binarize the label first (e.g. rating >= 4)",
            path=path,
        )
    n = len(labels)
    dense = np.ones((n, 1), dtype=np.float32)
    if schema.dense:
        cols = []
        for f in schema.dense:
            c = f.column or f.name
            x = _numbers(
                _column(table, c),
                f"{path}: column {c!r} (dense feature {f.name})",
                path,
                "declare it as a [[data.sparse]] feature, or fix the data",
            )
            bad = np.flatnonzero(~np.isfinite(x))
            if bad.size:
                raise ColumnError(
                    f"{path}: column {c!r} (dense feature {f.name}): data row {bad[0] + 1} holds "
                    f"{x[bad[0]]}; dense values must be finite numbers (leave a missing value "
                    f"empty: it reads as 0): fix or drop those rows",
                    path=path,
                )
            if f.transform == "log1p":
                x = np.log1p(np.maximum(x, 0.0))
            cols.append(x.astype(np.float32))
        dense = np.stack(cols, axis=1)
    ids, lengths = [], []
    for f in schema.sparse:
        c = f.column or f.name
        t = schema.table_of(f.name)
        where = f"{path}: column {c!r} ({f.name})"
        col = _column(table, c)
        if f.chars:
            col = _part(col, f, where, path)
        vocab = (vocabs or {}).get(t.name)
        a, m = _sparse(col, f, t.num_embeddings, where, path, vocab)
        ids.append(a)
        lengths.append(m)
    weights = _weights(table, schema.weight, path) if schema.weight else None
    return FeatureRows(
        labels.astype(np.float32), dense, ids, lengths, schema.feature_names, weights
    )


def _weights(table: pa.Table, name: str, path: Path) -> np.ndarray:
    """float32 (N,) sample weights of the column ``name`` (data.weight): numbers >= 0, finite."""
    col = _column(table, name)
    where = f"{path}: column {name!r} (data.weight)"
    if col.null_count:
        raise ColumnError(
            f"{where}: {col.null_count} rows have no weight; fill them (e.g. 1.0) or drop them",
            path=path,
        )
    if pa.types.is_boolean(col.type):
        raise ColumnError(f"{where}: holds booleans, expected numbers (weights >= 0)", path=path)
    w = _numbers(col, where, path, "weights must be numbers >= 0", booleans=False)
    w32 = w.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(w32) | (w < 0))
    if bad.size:
        raise ColumnError(
            f"{where}: data row {bad[0] + 1} has weight {w[bad[0]]}; weights must be finite "
            f"float32 numbers >= 0: fix or drop those rows",
            path=path,
        )
    return w32
