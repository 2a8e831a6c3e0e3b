"""Collapse a trained run into the served model (single process).

The collapsed model is a DLRM over a plain ``torchrec.EmbeddingBagCollection`` of dimension d:
architecturally the baseline model (``model.inner_dim = 0``) of the same config, so it loads with
the same builder, shards with a new plan, and costs what a d-dim model costs to serve.

Output directory::

    OUT/config.json          the run's config with model.inner_dim = 0 (the served architecture)
    OUT/model/               DCP checkpoint of the collapsed DLRMTrain state dict
    OUT/collapse_report.json tables, shapes, and the check of collapsed vs MLET predictions
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torchrec.models.dlrm import DLRMTrain
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from mlet_dist.checkpoint import CheckpointError, latest_checkpoint
from mlet_dist.config import Config
from mlet_dist.models import build_dlrm, build_tables
from mlet_dist.modules.collapse import DEFAULT_CHUNK_ROWS, collapse
from mlet_dist.modules.mlet import MLETEmbeddingBagCollection, inner_dim_of, served_tables

logger = logging.getLogger(__name__)
# The collapse runs in one process, also inside a launched job (rank 0): DCP's notice about
# single-process mode is expected there.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def served_config(cfg: Config) -> Config:
    """The config of the collapsed model: same everything, single-layer d-dim tables."""
    out = copy.deepcopy(cfg)
    out.model.inner_dim = 0
    out.model.inner_dim_per_table = {}
    return out


def load_unsharded(cfg: Config, checkpoint: Path) -> DLRMTrain:
    """Builds the model on CPU with materialized tables and loads a (sharded) checkpoint into it."""
    model = build_dlrm(
        cfg.model, cfg.data.num_embeddings_per_feature, embedding_device=torch.device("cpu")
    )
    state = {"model": model.state_dict()}
    try:
        dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)  # this process alone
    except Exception as e:  # DCP raises several types for a mismatched or damaged checkpoint
        raise CheckpointError(
            f"cannot load {checkpoint} into the model of its run config ({e}); is the checkpoint "
            f"complete and from this run?"
        ) from e
    model.load_state_dict(state["model"])
    return model


def mlet_module(model: DLRMTrain) -> MLETEmbeddingBagCollection:
    return model.model.sparse_arch.embedding_bag_collection


@torch.no_grad()
def collapse_model(
    model: DLRMTrain, cfg: Config, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> DLRMTrain:
    """The served model: the MLET tables collapsed, the dense network copied."""
    ebc = collapse(mlet_module(model), chunk_rows=chunk_rows)
    served = build_dlrm(
        served_config(cfg).model, cfg.data.num_embeddings_per_feature, embedding_module=ebc
    )
    dense = {k: v for k, v in model.state_dict().items() if not k.startswith("model.sparse_arch.")}
    missing, unexpected = served.load_state_dict(dense, strict=False)
    if unexpected or any(not k.startswith("model.sparse_arch.") for k in missing):
        raise RuntimeError(f"dense state mismatch: missing {missing}, unexpected {unexpected}")
    return served


def collapse_run(
    run_dir: str | Path, out_dir: str | Path, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> dict[str, Any]:
    """Collapses the latest checkpoint of a run into ``out_dir`` (written atomically).

    Returns the report (also written to OUT/collapse_report.json).
    """
    from mlet_dist.train import load_run_config

    cfg = load_run_config(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(
            f"run {run_dir} has no complete checkpoint under checkpoints/; train it first"
        )
    model = load_unsharded(cfg, ckpt)
    mlet = mlet_module(model)
    factorized = [t.name for t in mlet.mlet_configs() if inner_dim_of(t)]
    if not factorized:
        logger.warning(
            "run %s has no factorized tables (model.inner_dim = 0): its tables are copied as they are",
            run_dir,
        )
    served = collapse_model(model, cfg, chunk_rows)

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    dcp.save({"model": served.state_dict()}, checkpoint_id=str(tmp / "model"), no_dist=True)
    (tmp / "config.json").write_text(json.dumps(served_config(cfg).to_dict(), indent=1))
    report = {
        "source_run": str(Path(run_dir).resolve()),
        "source_checkpoint": ckpt.name,
        "factorized_tables": factorized,
        "tables": [
            {
                "name": t.name,
                "features": t.feature_names,
                "rows": t.num_embeddings,
                "inner_dim": inner_dim_of(t),
                "dim": t.embedding_dim,
                "pooling": t.pooling.name,
            }
            for t in mlet.mlet_configs()
        ],
        "training_embedding_params": sum(
            t.num_embeddings * (inner_dim_of(t) or t.embedding_dim)
            + (inner_dim_of(t) or 0) * t.embedding_dim
            for t in mlet.mlet_configs()
        ),
        "served_embedding_params": sum(
            t.num_embeddings * t.embedding_dim for t in mlet.mlet_configs()
        ),
    }
    (tmp / "collapse_report.json").write_text(json.dumps(report, indent=1))
    # Swap in atomically: a previous result stays intact until the new one is complete.
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_dir)
    logger.info("collapsed %d factorized tables of %s into %s", len(factorized), run_dir, out_dir)
    return report


def load_served(out_dir: str | Path) -> tuple[DLRMTrain, Config]:
    """Loads a collapsed model written by :func:`collapse_run` (plain EBC, CPU)."""
    from mlet_dist.train import load_run_config

    cfg = load_run_config(out_dir)
    tables = build_tables(cfg.model, cfg.data.num_embeddings_per_feature)
    ebc = EmbeddingBagCollection(tables=served_tables(tables), device=torch.device("cpu"))
    model = build_dlrm(cfg.model, cfg.data.num_embeddings_per_feature, embedding_module=ebc)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(Path(out_dir) / "model"), no_dist=True)
    model.load_state_dict(state["model"])
    return model, cfg
