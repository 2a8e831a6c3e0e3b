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

from mlet_dist.config import ConfigError, config_from_dict
from mlet_dist.data import CriteoFormatError, require_rows
from mlet_dist.data.columns import encode_table
from mlet_dist.data.criteo import parse_lines
from mlet_dist.data.movielens import MOVIES_FILE, USERS_FILE
from mlet_dist.data.sources import concat_rows, source_of
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
        data_cfg, source=data_source(manifest), num_embeddings_per_feature=table_sizes(manifest)
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
) -> dict[str, Any]:
    """Scores raw rows with a serving directory's predictor and writes the probabilities.

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
    check_output(
        out,
        what="the predictions",
        # MovieLens ratings are read with the users/movies files beside them: inputs too.
        inputs=[serving_dir, *files, *(Path(f).with_name(n) for f in files for n in COMPANIONS)],
        previous=previous_predictions,
        hint="choose another --out file",
    )
    predictor, manifest = load_predictor(serving_dir, verify, kind)
    source, _, vocabs = _raw_rows(serving_dir, manifest, verified=verify == "all")
    parts = [require_rows(source.read(f, in_file_order=True, vocabs=vocabs), f) for f in files]
    arrays = concat_rows(parts)
    probs = predict_arrays(predictor, arrays, batch_size).numpy()
    bad = np.flatnonzero(~np.isfinite(probs))
    if bad.size:
        row = int(bad[0])
        ends = np.cumsum([len(p) for p in parts])
        k = int(np.searchsorted(ends, row, side="right"))
        row_in_file = row - (int(ends[k - 1]) if k else 0) + 1
        raise ServingError(
            f"refusing to write {out}: the predictor of {serving_dir} returned {probs[row]} for "
            f"{bad.size} of {len(probs)} rows (first: {files[k]}, data row {row_in_file}); its "
            f"tables or dense weights are not finite. Collapse a checkpoint of a run whose loss "
            f"was finite"
        )
    with atomic_path(out) as tmp:  # a failed write leaves no partial file (and names a full disk)
        if out.suffix == ".parquet":
            table = pa.table({"probability": pa.array(probs, pa.float32())})
            pq.write_table(table.replace_schema_metadata({PREDICTIONS_KEY: b"1"}), tmp)
        else:
            with open(tmp, "w") as f:
                np.savetxt(f, probs, fmt="%.9g")
    logger.info("wrote %d probabilities to %s", len(probs), out)
    return {
        "rows": len(probs),
        "out": str(out),
        "serving_dtype": manifest["serving"]["dtype"],
        "predictor": manifest["predictor_used"],
    }
