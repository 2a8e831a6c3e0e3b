"""Rank 0's steps of a collapse, after every rank's rows are written: the serving predictors, the
report, the manifest, and the atomic swap of the staging directory into place."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torchrec.modules.embedding_configs import DATA_TYPE_NUM_BITS, EmbeddingBagConfig

from mlet_dist.checkpoint import read_train_state
from mlet_dist.config import Config, ModelConfig
from mlet_dist.data.vocab import vocab_file
from mlet_dist.distributed.collapse import TableLayout, collapse_bytes
from mlet_dist.export.load import served_config
from mlet_dist.export.options import CollapseOptions
from mlet_dist.export.sinks import SERVING_TABLE_KEY, load_served_rows
from mlet_dist.models import SERVED_TABLE_KEY, W1_DATA_TYPES
from mlet_dist.modules.mlet import inner_dim_of, served_tables
from mlet_dist.schema import FeatureSchema
from mlet_dist.serving.artifacts import ARTIFACTS, DEFAULT_KIND, write_artifacts
from mlet_dist.serving.manifest import write_manifest
from mlet_dist.serving.predictor import serving_model
from mlet_dist.utils.files import replace_dir

logger = logging.getLogger(__name__)

SERVING_FORMATS = {
    "fp32": "float32 (rows, d): the rows of model/",
    "fp16": "float16 (rows, d), round to nearest",
    "int8": "uint8 (rows, d + 4): d values q, then fp16 scale and fp16 bias; x = q * scale + bias "
    "(fbgemm FusedNBitRowwiseQuantizedSBHalf, 8 bits: TorchRec's INT8 table format)",
}


@dataclass
class StagedCollapse:
    """A collapse whose rows every rank has written into ``staging``: what rank 0 finishes.

    Attributes:
        run_dir: the source run.
        checkpoint: its checkpoint that was collapsed.
        staging: the directory being filled (swapped into ``out`` at the end).
        out: the serving directory.
        tables: the run's table configs (:func:`mlet_dist.models.schema_tables`).
        factorized: names of the tables that had a W1/W2 factorization.
        layouts: table -> its row blocks and owners.
        dense_state: the dense network's state (``model.*`` entries), on CPU.
        rank_stats: every rank's memory and timings, by rank.
        vocab_files: the vocabularies of the ``ids = 'vocab'`` tables the run trained on
            (:func:`mlet_dist.data.vocab.run_vocabularies`), copied to ``vocab/<table>.parquet``.
    """

    run_dir: str | Path
    checkpoint: Path
    staging: Path
    out: Path
    tables: list[EmbeddingBagConfig]
    factorized: list[str]
    layouts: dict[str, TableLayout]
    dense_state: dict[str, torch.Tensor]
    rank_stats: list[dict[str, Any]]
    vocab_files: dict[str, Path] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return len(self.rank_stats)


def build_predictor(
    staged: StagedCollapse, model_cfg: ModelConfig, schema: FeatureSchema, options: CollapseOptions
) -> dict[str, Any]:
    """Writes the serving predictors of the served DLRM (TorchRec's quantized EBC) into the staging
    directory: the portable one, those written by default unless ``options.skip``, and the
    optional ``options.artifacts``
    (:func:`mlet_dist.serving.artifacts.write_artifacts`).

    Args:
        staged: the collapse; its serving tables are read back from the staging directory.
        model_cfg: the served model config (``served_config(cfg).model``).
        schema: the run's features.
        options: the serving dtype and the optional artifacts.

    Returns:
        {"artifacts": {kind: manifest entry}, "signature": input_signature(...)}.

    Raises:
        AOTIError: 'aoti' was asked for and AOTInductor could not compile the program.
    """
    tables = served_tables(staged.tables)
    model = serving_model(
        model_cfg,
        schema,
        tables,
        load_served_rows(staged.staging, tables, options.quantize),
        staged.dense_state,
        options.quantize,
    )
    return write_artifacts(model, staged.staging, options.artifacts, options.skip)


def _table_report(tables: list[EmbeddingBagConfig]) -> list[dict[str, Any]]:
    return [
        {
            "name": t.name,
            "features": list(t.feature_names),
            "rows": t.num_embeddings,
            "inner_dim": inner_dim_of(t),
            "dim": t.embedding_dim,
            "pooling": t.pooling.name,
        }
        for t in tables
    ]


def finish_collapse(
    staged: StagedCollapse, cfg: Config, schema: FeatureSchema, options: CollapseOptions
) -> dict[str, Any]:
    """Rank 0, after every rank's rows are written: config, vocabularies, predictors, report,
    manifest, then the staging directory swapped into ``staged.out``.

    Args:
        staged: the collapse so far.
        cfg: the run's config (recorded in the manifest; the served one in ``config.json``).
        schema: the run's features.
        options: what was asked for.

    Returns:
        The report (also ``collapse_report.json``).
    """
    staging = staged.staging
    served = served_config(cfg)
    (staging / "config.json").write_text(json.dumps(served.to_dict(), indent=1))
    vocabularies = {}
    for name, src in staged.vocab_files.items():
        vocabularies[name] = vocab_file(name)
        (staging / vocabularies[name]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, staging / vocabularies[name])
    t0 = time.perf_counter()
    built = {"artifacts": {}, "signature": None}
    if options.predictor:
        built = build_predictor(staged, served.model, schema, options)
    report = _report(staged, cfg, options, predictor_seconds=time.perf_counter() - t0)
    (staging / "collapse_report.json").write_text(json.dumps(report, indent=1))
    write_manifest(staging, _manifest(staged, cfg, schema, options, built, vocabularies))
    replace_dir(staging, staged.out)
    logger.info(
        "collapsed %d factorized tables of %s into %s (world size %d, serving dtype %s)",
        len(staged.factorized), staged.run_dir, staged.out, staged.world_size, options.quantize,
    )  # fmt: skip
    return report


def _report(
    staged: StagedCollapse, cfg: Config, options: CollapseOptions, predictor_seconds: float
) -> dict[str, Any]:
    """``collapse_report.json``: source, parameter counts, per-rank memory and timings, layouts."""
    table_info = _table_report(staged.tables)
    w1_size = DATA_TYPE_NUM_BITS[W1_DATA_TYPES[cfg.model.w1_dtype]] // 8
    total_bytes = sum(collapse_bytes(layout, w1_size) for layout in staged.layouts.values())
    slowest = max(s["seconds"]["collapse"] for s in staged.rank_stats)
    return {
        "source_run": str(Path(staged.run_dir).resolve()),
        "source_checkpoint": staged.checkpoint.name,
        "factorized_tables": staged.factorized,
        "tables": table_info,
        "training_embedding_params": sum(
            t["rows"] * (t["inner_dim"] or t["dim"]) + (t["inner_dim"] or 0) * t["dim"]
            for t in table_info
        ),
        "served_embedding_params": sum(t["rows"] * t["dim"] for t in table_info),
        "world_size": staged.world_size,
        "chunk_rows": options.chunk_rows,
        "serving_dtype": options.quantize,
        "collapse_gb_per_s": total_bytes / slowest / 1e9 if slowest > 0 else None,
        "predictor_seconds": predictor_seconds,
        "ranks": staged.rank_stats,
        "layouts": {
            n: [[b.start, b.stop, b.owner, list(b.ranks)] for b in layout.blocks]
            for n, layout in staged.layouts.items()
        },
    }


def _manifest(
    staged: StagedCollapse,
    cfg: Config,
    schema: FeatureSchema,
    options: CollapseOptions,
    built: dict[str, Any],
    vocabularies: dict[str, str],
) -> dict[str, Any]:
    """The manifest's content (``write_manifest`` adds the file list, checksums and versions)."""
    quantize = options.quantize
    plain = served_tables(staged.tables)
    return {
        "source": {
            "run": str(Path(staged.run_dir).resolve()),
            "checkpoint": staged.checkpoint.name,
            "step": read_train_state(staged.checkpoint).get("step"),
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
                    for b in staged.layouts[t["name"]].blocks
                ),
            }
            for t in _table_report(staged.tables)
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
            "predictor": ARTIFACTS[DEFAULT_KIND].path if options.predictor else None,
            "artifacts": built["artifacts"],
            # "inputs", "output", "dynamic_dims": read from the exported program
            **(built["signature"] or {"inputs": None, "output": None, "dynamic_dims": None}),
            "layout": {
                "dense": "the 13 integer features as log(max(x, 0) + 1), missing = 0"
                if schema.criteo
                else "the declared dense features in schema order, transformed (schema."
                "dense); one constant 1.0 when none is declared",
                "values": "categorical ids (modulo the table rows, or rows of the table's "
                "vocabulary, 0 = not in it), feature-major: all ids of feature_order[0] for "
                "the batch, then feature_order[1], ...",
                "lengths": "ids per (feature, sample), feature-major",
                "output": "click probability (sigmoid of the logit)",
            },
            "feature_order": [f for t in plain for f in t.feature_names],
            "feature_tables": {f: t.name for t in plain for f in t.feature_names},
            "dense_features": schema.dense_in_features,
            # the declared features (mlet_dist.schema): what `mlet-dist predict` reads
            "schema": schema.to_dict(),
            # ids = 'vocab' tables: value -> row (mlet_dist.data.vocab), checksummed in files
            "vocabularies": vocabularies,
        },
        "parquet": {
            "columns": {"id": "int64", "embedding": "fixed_size_list<float32>[d]"},
            "row_group_rows": options.row_group_rows,
        },
    }
