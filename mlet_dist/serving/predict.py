"""Scoring rows with a serving directory's predictor: choose it, load it (the manifest's checksums
first), score arrays of rows.

Rows are given as arrays (any object with ``dense`` (B, 13) and ``sparse`` (B, F) arrays, e.g.
:class:`mlet_dist.data.CriteoArrays`); reading input files is the job of ``mlet-dist predict``
(:func:`mlet_dist.predict_job.predict_file`), which knows the data sources.

The predictor ('auto') is the AOTInductor package ``serving/predictor_aoti.pt2`` where the
directory has it (written by default where a C++ compiler is present), else (or when it does not
load here, with a one-line note) the portable ``torch.export`` program ``serving/predictor.pt2``;
or, when asked for, another kind the directory has (:mod:`mlet_dist.serving.artifacts` loads
each). A directory written before torch.export became the default has only TorchScript, which is
then used.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import fbgemm_gpu  # noqa: F401  (registers the fbgemm operators the predictors call)
import numpy as np
import torch

from mlet_dist.config import ConfigError
from mlet_dist.serving.artifacts import ARTIFACTS, AUTO, auto_order, predictor_choices
from mlet_dist.serving.manifest import ServingError, artifacts, read_manifest, verify_manifest

logger = logging.getLogger(__name__)


class ServingRows(Protocol):
    """Rows to score: ``dense`` (B, 13) transformed integer features, ``sparse`` (B, F) ids (one
    per categorical feature, already modulo the table rows), e.g. a ``CriteoArrays``."""

    dense: np.ndarray
    sparse: np.ndarray


def serving_tensors(
    dense: np.ndarray, sparse: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dense, values, lengths) of rows with one id per categorical feature in the predictor's
    input layout: every length is 1 and ``values`` is the (B, F) id matrix read feature-major."""
    dense_t = torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32))
    values = torch.from_numpy(np.ascontiguousarray(sparse.T, dtype=np.int64).reshape(-1))
    lengths = torch.ones(values.numel(), dtype=torch.int32)  # the exported programs' dtype
    return dense_t, values, lengths


def serving_inputs(rows: ServingRows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dense, values, lengths) of Criteo-layout rows (:func:`serving_tensors`)."""
    return serving_tensors(rows.dense, rows.sparse)


@torch.no_grad()
def predict_arrays(predictor: Any, rows: ServingRows, batch_size: int = 4096) -> torch.Tensor:
    """Probabilities (float32, one per row) of ``rows`` from a loaded predictor."""
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be a positive number of rows, got {batch_size}")
    outs = []
    for start in range(0, len(rows.dense), batch_size):
        stop = start + batch_size
        if hasattr(rows, "serving_tensors"):  # rows of a declared schema (multi-hot ids)
            outs.append(predictor(*rows.slice(start, stop).serving_tensors()))
            continue
        outs.append(predictor(*serving_tensors(rows.dense[start:stop], rows.sparse[start:stop])))
    return torch.cat(outs) if outs else torch.zeros(0)


def table_sizes(manifest: dict[str, Any]) -> list[int]:
    """Rows of each categorical feature's table, in the predictor's feature order."""
    rows = {f: t["rows"] for t in manifest["tables"] for f in t["features"]}
    return [rows[f] for f in manifest["serving"]["feature_order"]]


def data_config(manifest: dict[str, Any]) -> dict[str, Any]:
    """The ``[data]`` section of the run the served model came from ({} when not recorded)."""
    return manifest.get("source", {}).get("config", {}).get("data", {}) or {}


def data_source(manifest: dict[str, Any]) -> str:
    """The ``data.source`` the served model was trained on ('criteo' when not recorded)."""
    source = manifest.get("source", {}).get("config", {}).get("data", {}).get("source")
    return source or "criteo"


def choose_predictor(manifest: dict[str, Any], kind: str = AUTO) -> tuple[str, str]:
    """(kind, path) of the predictor to use: ``kind``, or for 'auto' the first of
    :func:`mlet_dist.serving.artifacts.auto_order` the directory has (the AOTInductor package, the
    torch.export program, TorchScript).

    Raises:
        ValueError: ``kind`` is not 'auto' or a registered kind (:mod:`mlet_dist.serving.artifacts`).
        ServingError: no predictor was written, or not the one asked for (the message lists those
            there are and how to get the other).
    """
    if kind not in predictor_choices():
        raise ValueError(f"predictor kind must be one of {predictor_choices()}, got {kind!r}")
    there = artifacts(manifest)
    if not there:
        raise ServingError(
            "this serving directory has no predictor (collapsed with --no-predictor); collapse "
            "again without it"
        )
    if kind == AUTO:
        known = auto_order(there)  # the fast default first, then the portable program
        if not known:
            raise ServingError(
                f"this version cannot load the predictors of this serving directory "
                f"({', '.join(there)}); collapse again with this version"
            )
        kind = known[0]
    if kind not in there:
        flag = ARTIFACTS[kind].flag
        raise ServingError(
            f"this serving directory has no {kind} predictor (it has: {', '.join(there)}); "
            f"use one of those, or collapse again{' with ' + flag if flag else ''}"
        )
    return kind, there[kind]


def load_predictor(
    serving_dir: str | Path, verify: str = "all", kind: str = AUTO
) -> tuple[Any, dict[str, Any]]:
    """Checks the manifest checksums, then loads a predictor as a serving process would.

    Args:
        serving_dir: a directory written by ``mlet-dist collapse``.
        verify: 'all' (every file of the manifest) or 'predictor' (only the predictor file).
        kind: 'auto' (see :func:`choose_predictor`) or a kind of
            :data:`mlet_dist.serving.artifacts.ARTIFACTS`, loaded by its ``load``: 'export'
            (``torch.export.load``), 'aoti' (``torch._inductor.aoti_load_package``),
            'torchscript' (``torch.jit.load``).

    Returns:
        (callable ``(dense, values, lengths) -> probabilities``, manifest); the kind used is
        ``manifest["predictor_used"]``.

    Raises:
        ServingError: a checksum mismatch or missing file (named), or no such predictor.
    """
    if verify not in ("all", "predictor"):
        raise ValueError(f"verify must be 'all' or 'predictor', got {verify!r}")
    try:
        manifest = read_manifest(serving_dir)
        kind_asked, (kind, _) = kind, choose_predictor(manifest, kind)
    except ServingError as e:
        raise ServingError(f"{serving_dir}: {e}") from None
    there = artifacts(manifest)
    # 'auto': the others it has, in order, if the fast one does not load here (another platform)
    tries = auto_order(there)[auto_order(there).index(kind) :] if kind_asked == AUTO else [kind]
    if verify == "all":
        manifest = verify_manifest(serving_dir)
    for i, kind in enumerate(tries):
        if verify != "all":  # a file that differs is refused, never replaced by another kind
            manifest = verify_manifest(serving_dir, only={there[kind]})
        path = str(Path(serving_dir) / there[kind])
        try:
            predictor = ARTIFACTS[kind].load(path)
            break
        except ServingError:  # refused as unsafe or malformed: never replaced by another kind
            raise
        except Exception as e:  # each loader raises its own types (version, platform, operators)
            lines = str(e).strip().splitlines() or [""]
            written = manifest.get("versions", {})
            fbgemm = written.get("fbgemm-gpu-cpu") or written.get("fbgemm-gpu")
            error = ServingError(
                f"cannot load {path} ({kind}): {type(e).__name__}: {lines[0][:300]}; it was "
                f"written with torch {written.get('torch')}, fbgemm {fbgemm}, this is torch "
                f"{torch.__version__}"
            )
            if i + 1 == len(tries):
                raise error from e
            logger.warning("%s; using %s instead", error, there[tries[i + 1]])
    manifest["predictor_used"] = kind
    return predictor, manifest
