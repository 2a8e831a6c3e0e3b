"""Rank 0's steps of a collapse, after every rank's rows are written: the serving predictors, the
report, the manifest, and the atomic swap of the staging directory into place."""

from __future__ import annotations

import io
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torchrec.modules.embedding_configs import DATA_TYPE_NUM_BITS, EmbeddingBagConfig

from mlet_dist.checkpoint import read_train_state
from mlet_dist.config import Config
from mlet_dist.data.vocab import vocab_file
from mlet_dist.distributed.collapse import TableLayout, collapse_bytes
from mlet_dist.export.load import served_config
from mlet_dist.export.sinks import SERVING_TABLE_KEY, load_served_rows
from mlet_dist.models import SERVED_TABLE_KEY, W1_DATA_TYPES, schema_tables
from mlet_dist.modules.mlet import inner_dim_of, served_tables
from mlet_dist.schema import schema_of
from mlet_dist.serving.manifest import ARTIFACT_FILES, write_manifest
from mlet_dist.serving.predictor import (
    aoti_package,
    export_predictor,
    input_signature,
    script,
    serving_model,
)
from mlet_dist.utils.files import replace_dir

logger = logging.getLogger(__name__)

SERVING_FORMATS = {
    "fp32": "float32 (rows, d): the rows of model/",
    "fp16": "float16 (rows, d), round to nearest",
    "int8": "uint8 (rows, d + 4): d values q, then fp16 scale and fp16 bias; x = q * scale + bias "
    "(fbgemm FusedNBitRowwiseQuantizedSBHalf, 8 bits: TorchRec's INT8 table format)",
}


def build_predictor(
    out: Path,
    cfg: Config,
    tables: list[EmbeddingBagConfig],
    dense_state: dict[str, torch.Tensor],
    dtype: str,
    torchscript: bool = False,
    aoti: bool = False,
) -> dict[str, Any]:
    """Writes the serving predictors of the served DLRM (TorchRec's quantized EBC) into ``out``.

    Always ``serving/predictor.pt2`` (``torch.export``); with ``aoti`` also the AOTInductor
    package ``serving/predictor_aoti.pt2``, with ``torchscript`` also ``serving/predictor.pt``.

    Returns:
        {"artifacts": {kind: manifest entry}, "signature": input_signature(...)}.

    Raises:
        AOTIError: ``aoti`` was asked for and AOTInductor could not compile the program.
    """
    model = serving_model(
        served_config(cfg).model,
        schema_of(cfg.data),
        tables,
        load_served_rows(out, tables, dtype),
        dense_state,
        dtype,
    )
    (out / "serving").mkdir(parents=True, exist_ok=True)
    artifacts: dict[str, Any] = {}
    ep = export_predictor(model)
    _write_serialized(out / ARTIFACT_FILES["export"], lambda f: torch.export.save(ep, f))
    artifacts["export"] = {
        "path": ARTIFACT_FILES["export"],
        "format": "torch.export ExportedProgram (torch.export.save)",
        "load": "import torch, fbgemm_gpu; model = torch.export.load(path).module()",
        "device": "cpu",
    }
    if aoti:
        aoti_package(ep, out / ARTIFACT_FILES["aoti"])
        artifacts["aoti"] = {
            "path": ARTIFACT_FILES["aoti"],
            "format": "AOTInductor package (torch._inductor.aoti_compile_and_package)",
            "load": "import torch, fbgemm_gpu; model = torch._inductor.aoti_load_package(path)",
            "device": "cpu",
        }
    if torchscript:
        scripted = script(model)
        _write_serialized(
            out / ARTIFACT_FILES["torchscript"], lambda f: torch.jit.save(scripted, f)
        )
        artifacts["torchscript"] = {
            "path": ARTIFACT_FILES["torchscript"],
            "format": "TorchScript (torchrec.fx.symbolic_trace + torch.jit.script; deprecated)",
            "load": "import torch, fbgemm_gpu; model = torch.jit.load(path)",
            "device": "cpu",
        }
    return {"artifacts": artifacts, "signature": input_signature(ep)}


def _write_serialized(path: Path, save: Any) -> None:
    """``save(buffer)`` in memory, then the bytes written by Python: torch's zip writer aborts the
    process when the disk fills up (a C++ exception in a destructor); a Python write raises
    ENOSPC, which the collapse reports."""
    buffer = io.BytesIO()
    save(buffer)
    path.write_bytes(buffer.getvalue())


def _table_report(cfg: Config) -> list[dict[str, Any]]:
    return [
        {
            "name": t.name,
            "features": list(t.feature_names),
            "rows": t.num_embeddings,
            "inner_dim": inner_dim_of(t),
            "dim": t.embedding_dim,
            "pooling": t.pooling.name,
        }
        for t in schema_tables(cfg.model, schema_of(cfg.data))
    ]


def finish_collapse(
    staging: Path,
    out: Path,
    run_dir: str | Path,
    cfg: Config,
    ckpt: Path,
    tables: list[EmbeddingBagConfig],
    factorized: list[str],
    layouts: dict[str, TableLayout],
    dense_state: dict[str, torch.Tensor],
    quantize: str,
    chunk_rows: int,
    row_group_rows: int,
    predictor: bool,
    world_size: int,
    all_stats: list[dict[str, Any]],
    torchscript: bool = False,
    aoti: bool = False,
    vocab_files: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """Rank 0, after every rank's rows are written: config, predictor, report, manifest, swap.

    ``vocab_files``: the vocabularies of the ``ids = 'vocab'`` tables the run trained on
    (:func:`mlet_dist.data.vocab.run_vocabularies`), copied to ``vocab/<table>.parquet``.
    """
    served = served_config(cfg)
    (staging / "config.json").write_text(json.dumps(served.to_dict(), indent=1))
    vocabularies = {}
    for name, src in (vocab_files or {}).items():
        vocabularies[name] = vocab_file(name)
        (staging / vocabularies[name]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, staging / vocabularies[name])
    t0 = time.perf_counter()
    plain = served_tables(tables)
    built = {"artifacts": {}, "signature": None}
    if predictor:
        built = build_predictor(
            staging, cfg, plain, dense_state, quantize, torchscript=torchscript, aoti=aoti
        )
    t_predictor = time.perf_counter() - t0
    table_info = _table_report(cfg)
    w1_size = DATA_TYPE_NUM_BITS[W1_DATA_TYPES[cfg.model.w1_dtype]] // 8
    total_bytes = sum(collapse_bytes(layout, w1_size) for layout in layouts.values())
    slowest = max(s["seconds"]["collapse"] for s in all_stats)
    report = {
        "source_run": str(Path(run_dir).resolve()),
        "source_checkpoint": ckpt.name,
        "factorized_tables": factorized,
        "tables": table_info,
        "training_embedding_params": sum(
            t["rows"] * (t["inner_dim"] or t["dim"]) + (t["inner_dim"] or 0) * t["dim"]
            for t in table_info
        ),
        "served_embedding_params": sum(t["rows"] * t["dim"] for t in table_info),
        "world_size": world_size,
        "chunk_rows": chunk_rows,
        "serving_dtype": quantize,
        "collapse_gb_per_s": total_bytes / slowest / 1e9 if slowest > 0 else None,
        "predictor_seconds": t_predictor,
        "ranks": all_stats,
        "layouts": {
            n: [[b.start, b.stop, b.owner, list(b.ranks)] for b in layout.blocks]
            for n, layout in layouts.items()
        },
    }
    (staging / "collapse_report.json").write_text(json.dumps(report, indent=1))
    step = read_train_state(ckpt).get("step")
    features = [f for t in plain for f in t.feature_names]
    write_manifest(
        staging,
        {
            "source": {
                "run": str(Path(run_dir).resolve()),
                "checkpoint": ckpt.name,
                "step": step,
                "config": cfg.to_dict(),
            },
            "tables": [
                {
                    "name": t["name"],
                    "features": t["features"],
                    "rows": t["rows"],
                    "d": t["dim"],
                    "pooling": t["pooling"],
                    "dtype": quantize,
                    "collapsed_from_inner_dim": t["inner_dim"],
                    "parquet": sorted(
                        f"parquet/{t['name']}/rows-{b.start:012d}-{b.stop:012d}.parquet"
                        for b in layouts[t["name"]].blocks
                    ),
                }
                for t in table_info
            ],
            "model": {
                "checkpoint": "model",
                "config": "config.json",
                "state_dict_key": "model",
                "table_key": SERVED_TABLE_KEY,
                "dtype": "fp32",
            },
            "serving": {
                "dtype": quantize,
                "tables": None if quantize == "fp32" else "serving/tables",
                "table_key": None if quantize == "fp32" else SERVING_TABLE_KEY,
                "table_format": SERVING_FORMATS[quantize],
                # the default predictor; every one written is in "artifacts"
                "predictor": ARTIFACT_FILES["export"] if predictor else None,
                "artifacts": built["artifacts"],
                # "inputs", "output", "dynamic_dims": read from the exported program
                **(built["signature"] or {"inputs": None, "output": None, "dynamic_dims": None}),
                "layout": {
                    "dense": "the 13 integer features as log(max(x, 0) + 1), missing = 0"
                    if schema_of(cfg.data).criteo
                    else "the declared dense features in schema order, transformed (schema."
                    "dense); one constant 1.0 when none is declared",
                    "values": "categorical ids (modulo the table rows, or rows of the table's "
                    "vocabulary, 0 = not in it), feature-major: all ids of feature_order[0] for "
                    "the batch, then feature_order[1], ...",
                    "lengths": "ids per (feature, sample), feature-major",
                    "output": "click probability (sigmoid of the logit)",
                },
                "feature_order": features,
                "feature_tables": {f: t.name for t in plain for f in t.feature_names},
                "dense_features": schema_of(cfg.data).dense_in_features,
                # the declared features (mlet_dist.schema): what `mlet-dist predict` reads
                "schema": schema_of(cfg.data).to_dict(),
                # ids = 'vocab' tables: value -> row (mlet_dist.data.vocab), checksummed in files
                "vocabularies": vocabularies,
            },
            "parquet": {
                "columns": {"id": "int64", "embedding": "fixed_size_list<float32>[d]"},
                "row_group_rows": row_group_rows,
            },
        },
    )
    replace_dir(staging, out)
    logger.info(
        "collapsed %d factorized tables of %s into %s (world size %d, serving dtype %s)",
        len(factorized), run_dir, out, world_size, quantize,
    )  # fmt: skip
    return report
