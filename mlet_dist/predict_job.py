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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mlet_dist.config import ConfigError, config_from_dict
from mlet_dist.data import require_rows
from mlet_dist.data.movielens import MOVIES_FILE, USERS_FILE
from mlet_dist.data.sources import concat_rows, source_of
from mlet_dist.data.vocab import read_vocabularies
from mlet_dist.schema import schema_of
from mlet_dist.serving.manifest import MANIFEST, ServingError, verify_manifest
from mlet_dist.serving.predict import (
    data_config,
    data_source,
    load_predictor,
    predict_arrays,
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
    target = check_output(  # resolved: a symlink --out is written through (the link stays)
        out,
        what="the predictions",
        # MovieLens ratings are read with the users/movies files beside them: inputs too.
        inputs=[serving_dir, *files, *(Path(f).with_name(n) for f in files for n in COMPANIONS)],
        previous=previous_predictions,
        hint="choose another --out file",
    )
    predictor, manifest = load_predictor(serving_dir, verify, kind)
    data_cfg = config_from_dict({"data": data_config(manifest)}, "the manifest's config").data
    # the features the model was trained on; the weight column (data.weight) is no model input:
    # the inputs need not have it
    schema = dataclasses.replace(schema_of(data_cfg), weight="")
    vocabs = serving_vocabularies(serving_dir, manifest, schema, verified=verify == "all")
    # the raw format of the run's source; Criteo-layout ids reduced modulo the served tables' rows
    raw = dataclasses.replace(
        data_cfg, source=data_source(manifest), num_embeddings_per_feature=table_sizes(manifest)
    )
    source = source_of(raw, schema)
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
        if target.suffix == ".parquet":
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
