"""Single-process loaders: a run's checkpoint into an unsharded model, a collapsed model, and the
reference collapse of a whole model (:func:`collapse_model`); the served config."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torchrec.models.dlrm import DLRMTrain
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from mlet_dist.checkpoint import dcp_load, verify_checkpoint
from mlet_dist.config import Config, ModelConfig
from mlet_dist.context import load_run_config
from mlet_dist.models import SPARSE_PREFIX, build_dlrm, schema_tables
from mlet_dist.modules.collapse import DEFAULT_CHUNK_ROWS, collapse
from mlet_dist.modules.mlet import MLETEmbeddingBagCollection, served_tables
from mlet_dist.schema import schema_of


def served_model_config(model_cfg: ModelConfig) -> ModelConfig:
    """The model config of the collapsed model: the same, with single-layer d-dim fp32 tables."""
    out = copy.deepcopy(model_cfg)
    out.inner_dim = 0
    out.inner_dim_per_table = {}
    out.inner_dim_min_rows = 0
    out.w1_dtype = "fp32"  # the collapsed rows are fp32 whatever W1's storage was
    return out


def served_config(cfg: Config) -> Config:
    """The config of the collapsed model: same everything, single-layer d-dim fp32 tables."""
    out = copy.deepcopy(cfg)
    out.model = served_model_config(cfg.model)
    return out


def load_unsharded(cfg: Config, checkpoint: Path) -> DLRMTrain:
    """Builds the model on CPU with materialized tables and loads a (sharded) checkpoint into it."""
    model = build_dlrm(cfg.model, schema_of(cfg.data), embedding_device=torch.device("cpu"))
    state = {"model": model.state_dict()}
    verify_checkpoint(checkpoint, collective=False)
    dcp_load(state, checkpoint, no_dist=True)  # this process alone; one-line CheckpointError
    model.load_state_dict(state["model"])
    return model


def mlet_module(model: DLRMTrain) -> MLETEmbeddingBagCollection:
    return model.model.sparse_arch.embedding_bag_collection


@torch.no_grad()
def collapse_model(
    model: DLRMTrain, cfg: Config, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> DLRMTrain:
    """Single-process reference: the MLET tables of a whole (unsharded) model collapsed, the dense
    network copied. The served path is :func:`mlet_dist.export.collapse_run`."""
    ebc = collapse(mlet_module(model), chunk_rows=chunk_rows)
    served = build_dlrm(served_config(cfg).model, schema_of(cfg.data), embedding_module=ebc)
    dense = {k: v for k, v in model.state_dict().items() if not k.startswith(SPARSE_PREFIX)}
    missing, unexpected = served.load_state_dict(dense, strict=False)
    if unexpected or any(not k.startswith(SPARSE_PREFIX) for k in missing):
        raise RuntimeError(f"dense state mismatch: missing {missing}, unexpected {unexpected}")
    return served


def load_served(out_dir: str | Path) -> tuple[DLRMTrain, Config]:
    """Loads a collapsed model written by :func:`mlet_dist.export.collapse_run` (plain EBC, CPU,
    one process)."""
    cfg = load_run_config(out_dir)
    schema = schema_of(cfg.data)
    tables = schema_tables(cfg.model, schema)
    ebc = EmbeddingBagCollection(tables=served_tables(tables), device=torch.device("cpu"))
    model = build_dlrm(cfg.model, schema, embedding_module=ebc)
    state = {"model": model.state_dict()}
    dcp_load(state, Path(out_dir) / "model", no_dist=True)  # refuses a crafted .metadata
    model.load_state_dict(state["model"])
    return model, cfg
