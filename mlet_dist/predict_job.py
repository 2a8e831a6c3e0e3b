"""``mlet-dist predict``: scores raw data files with a serving directory's predictor.

Input files are read in the raw format of the run's ``data.source`` (recorded in the manifest):
Criteo TSV, or Avazu CSV / MovieLens ratings mapped onto the Criteo layout
(:meth:`mlet_dist.data.sources.DataSource.read`), always in file order, with a declared schema's
``ids = 'vocab'`` values mapped through the vocabularies the serving directory holds (0 = not in
it, as in training; :mod:`mlet_dist.data.vocab`); the rows are scored by
:mod:`mlet_dist.serving.predict` and the probabilities written atomically.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from mlet_dist.config import ConfigError, config_from_dict
from mlet_dist.data import CriteoFormatError, require_rows
from mlet_dist.data.columns import encode_table
from mlet_dist.data.criteo import parse_lines
from mlet_dist.data.movielens import MOVIES_FILE, USERS_FILE
from mlet_dist.data.sources import source_of
from mlet_dist.data.vocab import read_vocabularies
from mlet_dist.schema import FeatureSchema, schema_of
from mlet_dist.serving.manifest import MANIFEST, ServingError, verify_manifest
from mlet_dist.serving.predict import (
    data_config,
    data_source,
    load_predictor,
    predict_arrays,
    serving_tensors,
    table_sizes,
)
from mlet_dist.utils.files import atomic_path, check_output

logger = logging.getLogger(__name__)

COMPANIONS = (USERS_FILE, MOVIES_FILE)
PREDICTIONS_KEY = b"mlet_dist.predictions"
"""Schema metadata key of a Parquet predictions file written by :func:`predict_file`."""
_SNIFF_BYTES = 1 << 20


def previous_predictions(out: Path) -> str | None:
    """None when ``out`` is a previous ``mlet-dist predict`` output (it may be replaced): a
    Parquet file whose schema metadata says so, or a text file of probabilities (its first MiB
    holds only numbers in [0, 1] or nan, one per line); else the reason it is not."""
    if not out.is_file():
        return f"{out} exists and is not a file"
    if out.stat().st_size == 0:
        return None
    if out.suffix == ".parquet":
        try:
            metadata = pq.read_schema(out).metadata or {}
        except Exception:  # not Parquet at all
            metadata = {}
        if PREDICTIONS_KEY in metadata:
            return None
        return f"{out} exists and is not a predictions file written by `mlet-dist predict`"
    with open(out, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    lines = head.split(b"\n")
    if len(head) == _SNIFF_BYTES:
        lines = lines[:-1]  # the last line may be cut
    try:
        values = [float(line) for line in lines if line.strip()]
    except ValueError:
        values = None
    if values is not None and all(v != v or 0.0 <= v <= 1.0 for v in values):
        return None
    return f"{out} exists and is not a predictions file (one probability per line)"


def serving_vocabularies(
    serving_dir: str | Path, manifest: dict[str, Any], schema, verified: bool
) -> dict[str, Any]:
    """The vocabularies of a serving directory's ``ids = 'vocab'`` tables, checked against the
    manifest's checksums (again unless ``verified``).

    Raises:
        ServingError: the manifest lists no vocabulary of such a table, or a file differs.
    """
    listed = (manifest.get("serving") or {}).get("vocabularies") or {}
    missing = [t.name for t in schema.vocab_tables if t.name not in listed]
    if missing:
        raise ServingError(
            f"{Path(serving_dir) / MANIFEST} lists no vocabulary of table {missing[0]!r} "
            f"(ids = 'vocab'); collapse the run again with this version"
        )
    if not listed:
        return {}
    if not verified:
        verify_manifest(serving_dir, only=set(listed.values()))
    sums = {e["path"]: e["sha256"] for e in manifest["files"]}
    entries = {t: {"path": p, "sha256": sums[p]} for t, p in listed.items()}
    return read_vocabularies(serving_dir, entries, f"{Path(serving_dir) / MANIFEST}")


class _ProbabilityWriter:
    """Writes probabilities chunk by chunk: Parquet (one float32 column ``probability``, marked
    as ours in the schema metadata) or text (``%.9g``, one per line)."""

    def __init__(self, path: Path, parquet: bool) -> None:
        self.path, self.parquet = path, parquet
        self._file: Any = None

    def __enter__(self) -> _ProbabilityWriter:
        if self.parquet:
            schema = pa.schema([("probability", pa.float32())], {PREDICTIONS_KEY: b"1"})
            self._file = pq.ParquetWriter(self.path, schema)
        else:
            self._file = open(self.path, "w")
        return self

    def write(self, probs: np.ndarray) -> None:
        if self.parquet:
            self._file.write_table(pa.table({"probability": pa.array(probs, pa.float32())}))
        else:
            np.savetxt(self._file, probs, fmt="%.9g")

    def __exit__(self, *exc: object) -> None:
        self._file.close()


def _raw_rows(serving_dir: str | Path, manifest: dict[str, Any], verified: bool):
    """(the run's data source, its schema, its vocabularies): how raw rows map to the predictor's
    inputs, as in training."""
    data_cfg = config_from_dict({"data": data_config(manifest)}, "the manifest's config").data
    # the features the model was trained on; the weight column (data.weight) is no model input:
    # the inputs need not have it
    schema = dataclasses.replace(schema_of(data_cfg), weight="")
    vocabs = serving_vocabularies(serving_dir, manifest, schema, verified=verified)
    # the raw format of the run's source; Criteo-layout ids reduced modulo the served tables' rows
    raw = dataclasses.replace(
        data_cfg,
        source=data_source(manifest),
        num_embeddings_per_feature=table_sizes(manifest),
        max_rows=0,  # every row of the inputs (data.max_rows was the run's training limit)
    )
    return source_of(raw, schema), schema, vocabs


def request_decoder(
    serving_dir: str | Path, manifest: dict[str, Any]
) -> Callable[[pa.Table], tuple[Any, Any, Any]]:
    """The ``mlet-dist serve`` request decoder: rows of named columns -> the predictor's inputs,
    mapped as ``predict`` maps the run's raw rows.

    Columns: a declared schema's (``[[data.sparse]]``, ``[[data.dense]]``: each feature's
    ``column`` or name; encoded by :func:`mlet_dist.data.columns.encode_table`, vocabularies
    included; no label needed); the Criteo preset's ``int_0..int_12`` (integers, null = missing)
    and ``cat_0..cat_25`` (hex hashes as in Criteo TSV, null = missing; parsed by the TSV reader).

    Raises (when called):
        CriteoFormatError: a missing column or a bad value; the message names the column.

    Raises:
        ServingError: the run's raw rows are of a source whose raw format is not columns of the
            schema (Avazu CSV mapped onto the Criteo layout).
    """
    _, schema, vocabs = _raw_rows(serving_dir, manifest, verified=True)
    name = data_source(manifest)
    if schema.criteo and name != "criteo":
        raise ServingError(
            f"mlet-dist serve reads Criteo-layout rows of runs trained on data.source = 'criteo' "
            f"or rows of a declared schema; {serving_dir} was trained on {name!r}: score its "
            f"files with `mlet-dist predict`"
        )
    if schema.criteo:
        return lambda table: _criteo_request(table, schema, table_sizes(manifest))
    return lambda table: _schema_request(table, schema, vocabs)


def _criteo_request(table: pa.Table, schema: FeatureSchema, sizes: list[int]):
    columns = [*schema.dense_names, *schema.feature_names]
    given = table.to_pydict()
    missing = [c for c in columns if c not in given]
    if missing:
        raise CriteoFormatError(
            f"request: no column {missing[0]!r} (the Criteo layout: int_0..int_12, cat_0..cat_25; "
            f"null for a missing value)"
        )
    fields = []
    for c in columns:
        values = given[c]
        bad = next((v for v in values if isinstance(v, (bool, float, list, dict))), None)
        if bad is not None:
            kind = "an integer" if c in schema.dense_names else "a hex string like '68fd1e64'"
            raise CriteoFormatError(f"request: column {c!r}: {bad!r} is not {kind} or null")
        texts = ["" if v is None else str(v) for v in values]
        if any(ch in t for t in texts for ch in "\t\r\n"):
            raise CriteoFormatError(f"request: column {c!r}: a value holds a tab or line break")
        fields.append(texts)
    lines = "".join("0\t" + "\t".join(row) + "\n" for row in zip(*fields, strict=True))
    arrays, _ = parse_lines("request", lines.encode(), 1, sizes)
    return serving_tensors(arrays.dense, arrays.sparse)


def _schema_request(table: pa.Table, schema: FeatureSchema, vocabs: dict[str, Any]):
    if schema.label not in table.column_names:  # no label in a request: the encoder wants one
        table = table.append_column(schema.label, pa.array(np.zeros(table.num_rows, np.float32)))
    return encode_table(table, schema, "request", vocabs).serving_tensors()


def predict_file(
    serving_dir: str | Path,
    data: str | Path | Sequence[str | Path],
    out: str | Path,
    batch_size: int = 4096,
    verify: str = "all",
    kind: str = "auto",
    chunk_rows: int = 1 << 16,
) -> dict[str, Any]:
    """Scores raw rows with a serving directory's predictor and writes the probabilities.

    The inputs are read, scored and written chunk by chunk (about ``chunk_rows`` rows;
    :meth:`~mlet_dist.data.sources.DataSource.iter_read`), with a progress bar on a terminal.

    Args:
        serving_dir: output of ``mlet-dist collapse``; its manifest is checked first.
        data: one or more files (plain or gzip; labels are read, not used) in the raw format of
            the trained run's ``data.source`` (:func:`mlet_dist.serving.predict.data_source`):
            Criteo TSV, Avazu CSV or MovieLens ratings (with ``users.dat`` and ``movies.dat``
            beside them).
        out: ``*.parquet``: a Parquet file with one float32 column ``probability``; anything else:
            text, one probability per line (``%.9g``), in input row order.
        batch_size: rows per predictor call.
        verify: see :func:`mlet_dist.serving.predict.load_predictor`.
        kind: the predictor, see :func:`mlet_dist.serving.predict.load_predictor`.
        chunk_rows: rows read and scored at a time (memory is bounded by it).

    Returns:
        {"rows", "out", "serving_dtype", "predictor"}.

    Raises:
        ConfigError: ``batch_size`` is not positive.
        OutputPathError: ``out`` is, contains or lies inside an input (the serving directory, a
            data file), a run, a checkpoint or a serving directory, or exists and is not a
            previous predictions file (:func:`previous_predictions`).
        CriteoFormatError: a data file is malformed or empty (named).
        ServingError: the serving directory does not match its manifest, or the predictor gave a
            non-finite probability (nothing is written then; the first such row is named).
    """
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be a positive number of rows, got {batch_size}")
    files = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    out = Path(out)
    target = check_output(  # resolved: a symlink --out is written through (the link stays)
        out,
        what="the predictions",
        # MovieLens ratings are read with the users/movies files beside them: inputs too.
        inputs=[serving_dir, *files, *(Path(f).with_name(n) for f in files for n in COMPANIONS)],
        previous=previous_predictions,
        hint="choose another --out file",
    )
    predictor, manifest = load_predictor(serving_dir, verify, kind)
    source, _, vocabs = _raw_rows(serving_dir, manifest, verified=verify == "all")
    scored = 0
    first_bad: tuple[float, Path | str, int] | None = None  # value, file, data row
    bad_rows = 0
    with (
        atomic_path(out) as tmp,  # a failed write leaves no partial file (and names a full disk)
        _ProbabilityWriter(tmp, parquet=target.suffix == ".parquet") as writer,
        tqdm(desc="predict", unit=" rows", disable=None, mininterval=1.0) as bar,
    ):
        for f in files:
            in_file = 0
            # chunk by chunk: memory bounded by chunk_rows, not by the size of the inputs
            for chunk in source.iter_read(
                f, chunk_rows=chunk_rows, in_file_order=True, vocabs=vocabs
            ):
                probs = predict_arrays(predictor, chunk, batch_size).numpy()
                bad = np.flatnonzero(~np.isfinite(probs))
                if bad.size and first_bad is None:
                    first_bad = (float(probs[bad[0]]), f, in_file + int(bad[0]) + 1)
                bad_rows += int(bad.size)
                if first_bad is None:
                    writer.write(probs)
                in_file += len(probs)
                bar.update(len(probs))
            if in_file == 0:
                require_rows(chunk, f)  # an empty file is refused, named
            scored += in_file
        if first_bad is not None:  # nothing is written (the temporary file is removed)
            value, f, row = first_bad
            raise ServingError(
                f"refusing to write {out}: the predictor of {serving_dir} returned {value} for "
                f"{bad_rows} of {scored} rows (first: {f}, data row {row}); its tables or dense "
                f"weights are not finite. Collapse a checkpoint of a run whose loss was finite"
            )
    logger.info("wrote %d probabilities to %s", scored, out)
    return {
        "rows": scored,
        "out": str(out),
        "serving_dtype": manifest["serving"]["dtype"],
        "predictor": manifest["predictor_used"],
    }
