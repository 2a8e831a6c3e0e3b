"""Scoring rows with a serving directory's predictor (``mlet-dist predict``).

Input files are read in the raw format of the run's ``data.source`` (recorded in the manifest):
Criteo TSV, or Avazu CSV / MovieLens ratings mapped onto the Criteo layout
(:func:`mlet_dist.data.sources.read_source_file`), always in file order.

The predictor is the manifest's default, the ``torch.export`` program ``serving/predictor.pt2``
(``torch.export.load``), or, when asked for, the AOTInductor package or the TorchScript file. A
directory written before torch.export became the default has only TorchScript, which is then used.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlet_dist.config import ConfigError
from mlet_dist.data import CriteoArrays, require_rows
from mlet_dist.data.movielens import MOVIES_FILE, USERS_FILE
from mlet_dist.data.sources import read_source_file
from mlet_dist.serving.manifest import ServingError, artifacts, read_manifest, verify_manifest
from mlet_dist.utils.files import atomic_path, check_output

logger = logging.getLogger(__name__)


def serving_inputs(arrays: CriteoArrays) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dense, values, lengths) of Criteo rows in the predictor's input layout.

    Criteo rows have one id per categorical feature, so every length is 1 and ``values`` is the
    (B, 26) id matrix read feature-major.
    """
    dense = torch.from_numpy(np.ascontiguousarray(arrays.dense, dtype=np.float32))
    values = torch.from_numpy(np.ascontiguousarray(arrays.sparse.T, dtype=np.int64).reshape(-1))
    lengths = torch.ones(values.numel(), dtype=torch.int32)  # the exported programs' dtype
    return dense, values, lengths


@torch.no_grad()
def predict_arrays(predictor: Any, arrays: CriteoArrays, batch_size: int = 4096) -> torch.Tensor:
    """Probabilities (float32, one per row) of ``arrays`` from a loaded predictor."""
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be a positive number of rows, got {batch_size}")
    outs = []
    for start in range(0, len(arrays), batch_size):
        outs.append(predictor(*serving_inputs(arrays.slice(start, start + batch_size))))
    return torch.cat(outs) if outs else torch.zeros(0)


def table_sizes(manifest: dict[str, Any]) -> list[int]:
    """Rows of each categorical feature's table, in the predictor's feature order."""
    rows = {f: t["rows"] for t in manifest["tables"] for f in t["features"]}
    return [rows[f] for f in manifest["serving"]["feature_order"]]


def data_source(manifest: dict[str, Any]) -> str:
    """The ``data.source`` the served model was trained on ('criteo' when not recorded)."""
    source = manifest.get("source", {}).get("config", {}).get("data", {}).get("source")
    return source or "criteo"


PREDICTOR_KINDS = ("auto", "export", "aoti", "torchscript")


def choose_predictor(manifest: dict[str, Any], kind: str = "auto") -> tuple[str, str]:
    """(kind, path) of the predictor to use: ``kind``, or for 'auto' the torch.export program,
    else (a directory written before it was the default) the TorchScript file.

    Raises:
        ServingError: no predictor was written, or not the one asked for (the message lists those
            there are and how to get the other).
    """
    if kind not in PREDICTOR_KINDS:
        raise ValueError(f"predictor kind must be one of {PREDICTOR_KINDS}, got {kind!r}")
    there = artifacts(manifest)
    if not there:
        raise ServingError(
            "this serving directory has no predictor (collapsed with --no-predictor); collapse "
            "again without it"
        )
    if kind == "auto":
        kind = "export" if "export" in there else next(iter(there))
    if kind not in there:
        flag = {"aoti": "--aoti", "torchscript": "--torchscript", "export": ""}[kind]
        raise ServingError(
            f"this serving directory has no {kind} predictor (it has: {', '.join(there)}); "
            f"use one of those, or collapse again{' with ' + flag if flag else ''}"
        )
    return kind, there[kind]


def load_predictor(
    serving_dir: str | Path, verify: str = "all", kind: str = "auto"
) -> tuple[Any, dict[str, Any]]:
    """Checks the manifest checksums, then loads a predictor as a serving process would.

    Args:
        serving_dir: a directory written by ``mlet-dist collapse``.
        verify: 'all' (every file of the manifest) or 'predictor' (only the predictor file).
        kind: 'auto' (see :func:`choose_predictor`), 'export' (``torch.export.load``), 'aoti'
            (``torch._inductor.aoti_load_package``) or 'torchscript' (``torch.jit.load``).

    Returns:
        (callable ``(dense, values, lengths) -> probabilities``, manifest); the kind used is
        ``manifest["predictor_used"]``.

    Raises:
        ServingError: a checksum mismatch or missing file (named), or no such predictor.
    """
    if verify not in ("all", "predictor"):
        raise ValueError(f"verify must be 'all' or 'predictor', got {verify!r}")
    try:
        kind, rel = choose_predictor(read_manifest(serving_dir), kind)
    except ServingError as e:
        raise ServingError(f"{serving_dir}: {e}") from None
    manifest = verify_manifest(serving_dir, only=None if verify == "all" else {rel})
    import fbgemm_gpu  # noqa: F401  (registers the fbgemm operators the predictor calls)

    path = str(Path(serving_dir) / rel)
    try:
        if kind == "export":
            predictor = torch.export.load(path).module()
        elif kind == "aoti":
            predictor = torch._inductor.aoti_load_package(path)
        else:
            predictor = torch.jit.load(path, map_location="cpu")
    except Exception as e:  # each loader raises its own types (version, platform, operators)
        lines = str(e).strip().splitlines() or [""]
        written = manifest.get("versions", {})
        raise ServingError(
            f"cannot load {path} ({kind}): {type(e).__name__}: {lines[0][:300]}; it was written "
            f"with torch {written.get('torch')}, fbgemm {written.get('fbgemm-gpu-cpu') or written.get('fbgemm-gpu')}, "
            f"this is torch {torch.__version__}"
        ) from e
    manifest["predictor_used"] = kind
    return predictor, manifest


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
        import pyarrow.parquet as pq

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
            the trained run's ``data.source`` (:func:`data_source`): Criteo TSV, Avazu CSV or
            MovieLens ratings (with ``users.dat`` and ``movies.dat`` beside them).
        out: ``*.parquet``: a Parquet file with one float32 column ``probability``; anything else:
            text, one probability per line (``%.9g``), in input row order.
        batch_size: rows per predictor call.
        verify: see :func:`load_predictor`.
        kind: the predictor, see :func:`load_predictor`.

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
    sizes = table_sizes(manifest)
    source = data_source(manifest)
    parts = [require_rows(read_source_file(source, f, sizes, in_file_order=True), f) for f in files]
    arrays = CriteoArrays.concat(parts)
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
            import pyarrow as pa
            import pyarrow.parquet as pq

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
