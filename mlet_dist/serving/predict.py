"""Scoring Criteo rows with a serving directory's TorchScript predictor (``mlet-dist predict``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlet_dist.data import CriteoArrays, read_criteo_tsv
from mlet_dist.data.criteo import require_rows
from mlet_dist.serving.manifest import ServingError, read_manifest, verify_manifest

logger = logging.getLogger(__name__)


def serving_inputs(arrays: CriteoArrays) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dense, values, lengths) of Criteo rows in the predictor's input layout.

    Criteo rows have one id per categorical feature, so every length is 1 and ``values`` is the
    (B, 26) id matrix read feature-major.
    """
    dense = torch.from_numpy(np.ascontiguousarray(arrays.dense, dtype=np.float32))
    values = torch.from_numpy(np.ascontiguousarray(arrays.sparse.T, dtype=np.int64).reshape(-1))
    lengths = torch.ones(values.numel(), dtype=torch.int32)
    return dense, values, lengths


@torch.no_grad()
def predict_arrays(predictor: Any, arrays: CriteoArrays, batch_size: int = 4096) -> torch.Tensor:
    """Probabilities (float32, one per row) of ``arrays`` from a (scripted) predictor."""
    outs = []
    for start in range(0, len(arrays), batch_size):
        outs.append(predictor(*serving_inputs(arrays.slice(start, start + batch_size))))
    return torch.cat(outs) if outs else torch.zeros(0)


def table_sizes(manifest: dict[str, Any]) -> list[int]:
    """Rows of each categorical feature's table, in the predictor's feature order."""
    rows = {f: t["rows"] for t in manifest["tables"] for f in t["features"]}
    return [rows[f] for f in manifest["serving"]["feature_order"]]


def load_predictor(serving_dir: str | Path, verify: str = "all") -> tuple[Any, dict[str, Any]]:
    """Checks the manifest checksums, then ``torch.jit.load``s the predictor.

    Args:
        serving_dir: a directory written by ``mlet-dist collapse``.
        verify: 'all' (every file of the manifest) or 'predictor' (only the predictor file).

    Raises:
        ServingError: a checksum mismatch or missing file (named), or no predictor was written.
    """
    if verify not in ("all", "predictor"):
        raise ValueError(f"verify must be 'all' or 'predictor', got {verify!r}")
    predictor = read_manifest(serving_dir).get("serving", {}).get("predictor")
    if not predictor:
        raise ServingError(
            f"{serving_dir} has no predictor (collapsed with --no-predictor); collapse again "
            f"without it"
        )
    manifest = verify_manifest(serving_dir, only=None if verify == "all" else {predictor})
    import fbgemm_gpu  # noqa: F401  (registers the fbgemm operators the predictor calls)

    return torch.jit.load(str(Path(serving_dir) / predictor), map_location="cpu"), manifest


def predict_file(
    serving_dir: str | Path,
    data: str | Path | Sequence[str | Path],
    out: str | Path,
    batch_size: int = 4096,
    verify: str = "all",
) -> dict[str, Any]:
    """Scores Criteo TSV rows with a serving directory's predictor and writes the probabilities.

    Args:
        serving_dir: output of ``mlet-dist collapse``; its manifest is checked first.
        data: one or more Criteo TSV files (plain or gzip; the label column is read, not used).
        out: ``*.parquet``: a Parquet file with one float32 column ``probability``; anything else:
            text, one probability per line (``%.9g``), in input row order.
        batch_size: rows per predictor call.
        verify: see :func:`load_predictor`.

    Returns:
        {"rows", "out", "serving_dtype"}.

    Raises:
        CriteoFormatError: a data file is malformed or empty (named).
        ServingError: the serving directory does not match its manifest, or the predictor gave a
            non-finite probability (nothing is written then; the first such row is named).
    """
    predictor, manifest = load_predictor(serving_dir, verify)
    files = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    sizes = table_sizes(manifest)
    parts = [require_rows(read_criteo_tsv(f, sizes), f) for f in files]
    arrays = CriteoArrays.concat(parts)
    probs = predict_arrays(predictor, arrays, batch_size).numpy()
    bad = np.flatnonzero(~np.isfinite(probs))
    if bad.size:
        row = int(bad[0])
        ends = np.cumsum([len(p) for p in parts])
        k = int(np.searchsorted(ends, row, side="right"))
        line = row - (int(ends[k - 1]) if k else 0) + 1
        raise ServingError(
            f"refusing to write {out}: the predictor of {serving_dir} returned {probs[row]} for "
            f"{bad.size} of {len(probs)} rows (first: {files[k]}, line {line}); its tables or "
            f"dense weights are not finite. Collapse a checkpoint of a run whose loss was finite"
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"probability": pa.array(probs, pa.float32())}), tmp)
    else:
        with open(tmp, "w") as f:
            np.savetxt(f, probs, fmt="%.9g")
    tmp.replace(out)
    logger.info("wrote %d probabilities to %s", len(probs), out)
    return {"rows": len(probs), "out": str(out), "serving_dtype": manifest["serving"]["dtype"]}
