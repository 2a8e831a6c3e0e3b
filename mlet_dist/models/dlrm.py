"""DLRM over (optionally factorized) embedding tables.

The model classes are TorchRec's own (``torchrec.models.dlrm.DLRM`` with the dot interaction and
``DLRM_DCN`` with the DCNv2 low-rank cross net, as in MLPerf DLRMv2) wrapped in ``DLRMTrain`` for
the loss; they take any module with ``embedding_bag_configs()`` and a KeyedTensor output, so the
MLET module and a plain EBC are interchangeable. With sample weights (``data.weight``) the wrapper
is :class:`WeightedDLRMTrain`; unweighted models are TorchRec's ``DLRMTrain`` itself.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.datasets.criteo import DEFAULT_CAT_NAMES, INT_FEATURE_COUNT
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain, SparseArch
from torchrec.modules.embedding_configs import DataType, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mlet_dist.config import ConfigError, ModelConfig, table_inner_dim
from mlet_dist.modules.mlet import MLETEmbeddingBagCollection, MLETEmbeddingBagConfig
from mlet_dist.schema import FeatureSchema

# State-dict keys of DLRMTrain: the sparse part; the W1 tables and W2 projections of the MLET
# module (training); a table of the plain d-dim EBC (the served model, ``.format(table)``).
SPARSE_PREFIX = "model.sparse_arch."
W1_PREFIX = "model.sparse_arch.embedding_bag_collection.w1.embedding_bags."
W2_PREFIX = "model.sparse_arch.embedding_bag_collection.projection.weights."
SERVED_TABLE_KEY = "model.sparse_arch.embedding_bag_collection.embedding_bags.{}.weight"


# model.w1_dtype -> TorchRec data_type of the trained tables.
W1_DATA_TYPES = {"fp32": DataType.FP32, "fp16": DataType.FP16}


def table_name(feature: str) -> str:
    return f"t_{feature}"


def build_tables(
    model_cfg: ModelConfig,
    num_embeddings_per_feature: list[int],
    feature_names: list[str] | None = None,
) -> list[MLETEmbeddingBagConfig]:
    """One table per categorical feature, factorized when its k is non-zero
    (:func:`mlet_dist.config.table_inner_dim`: per-table k, ``model.inner_dim_min_rows``, k).

    Args:
        model_cfg: model section (d, k, per-table k, minimum rows of MLET, pooling).
        num_embeddings_per_feature: table rows per feature.
        feature_names: defaults to Criteo's cat_0..cat_{n-1}.
    """
    names = feature_names or list(DEFAULT_CAT_NAMES[: len(num_embeddings_per_feature)])
    if len(names) != len(num_embeddings_per_feature):
        raise ConfigError(
            f"{len(num_embeddings_per_feature)} table sizes given for {len(names)} features; "
            f"data.num_embeddings_per_feature needs one size per categorical feature"
        )
    known = {table_name(f) for f in names}
    unknown = sorted(set(model_cfg.inner_dim_per_table) - known)
    if unknown:
        raise ConfigError(
            f"model.inner_dim_per_table names unknown tables {unknown}; tables are "
            f"{', '.join(sorted(known))}"
        )
    pooling = PoolingType.SUM if model_cfg.pooling == "sum" else PoolingType.MEAN
    # model.w1_dtype: the trained table's storage (TorchRec's data_type: the sharder's TBE and the
    # planner's estimates follow it); served configs are made fp32 by served_tables.
    data_type = W1_DATA_TYPES[model_cfg.w1_dtype]
    tables = []
    for feature, rows in zip(names, num_embeddings_per_feature):
        name = table_name(feature)
        k = table_inner_dim(model_cfg, name, rows)
        tables.append(
            MLETEmbeddingBagConfig(
                name=name,
                num_embeddings=rows,
                embedding_dim=model_cfg.embedding_dim,
                feature_names=[feature],
                pooling=pooling,
                inner_dim=k or None,
                data_type=data_type,
            )
        )
    return tables


def schema_tables(model_cfg: ModelConfig, schema: FeatureSchema) -> list[MLETEmbeddingBagConfig]:
    """The tables of a declared schema (a shared table lists several features), factorized when
    their k (:func:`mlet_dist.config.table_inner_dim`) is non-zero; pooling
    per table (empty: ``model.pooling``). The Criteo preset gives :func:`build_tables`' tables."""
    if schema.criteo:
        return build_tables(model_cfg, [t.num_embeddings for t in schema.tables])
    known = {t.name for t in schema.tables}
    unknown = sorted(set(model_cfg.inner_dim_per_table) - known)
    if unknown:
        raise ConfigError(
            f"model.inner_dim_per_table names unknown tables {unknown}; tables are "
            f"{', '.join(sorted(known))}"
        )
    # build_tables gives every other field of a table (one table per placeholder feature).
    base = build_tables(
        dataclasses.replace(model_cfg, inner_dim_per_table={}),
        [t.num_embeddings for t in schema.tables],
        feature_names=[f"table_{i}" for i in range(len(schema.tables))],
    )
    tables = []
    for t, cfg in zip(schema.tables, base):
        k = table_inner_dim(model_cfg, t.name, t.num_embeddings)
        pooling = t.pooling or model_cfg.pooling
        tables.append(
            dataclasses.replace(
                cfg,
                name=t.name,
                feature_names=list(t.features),
                pooling=PoolingType.SUM if pooling == "sum" else PoolingType.MEAN,
                inner_dim=k or None,
            )
        )
    return tables


def build_dlrm(
    model_cfg: ModelConfig,
    num_embeddings_per_feature: list[int] | FeatureSchema,
    embedding_device: torch.device | None = None,
    dense_device: torch.device | None = None,
    embedding_module: nn.Module | None = None,
) -> DLRMTrain:
    """Builds ``DLRMTrain(DLRM | DLRM_DCN)`` over an MLET module (or a given embedding module).

    Args:
        model_cfg: model section.
        num_embeddings_per_feature: table rows per categorical feature (the Criteo layout), or a
            feature schema (:func:`mlet_dist.schema.schema_of`).
        embedding_device: device of W1; ``meta`` to defer allocation to the sharder (default).
        dense_device: device of W2 and the MLPs (default CPU).
        embedding_module: use this module (e.g. a collapsed plain EBC) instead of building one.

    Returns:
        ``DLRMTrain``, or :class:`WeightedDLRMTrain` when the schema has a weight column.
    """
    dense_device = dense_device or torch.device("cpu")
    embedding_device = embedding_device or torch.device("meta")
    schema = num_embeddings_per_feature
    dense_in = schema.dense_in_features if isinstance(schema, FeatureSchema) else INT_FEATURE_COUNT
    with dense_device:
        if embedding_module is None:
            embedding_module = MLETEmbeddingBagCollection(
                schema_tables(model_cfg, schema)
                if isinstance(schema, FeatureSchema)
                else build_tables(model_cfg, schema),
                device=embedding_device,
                projection_device=dense_device,
                projection_init=model_cfg.projection_init,
                projection_init_std=model_cfg.projection_init_std or None,
            )
        common = dict(
            embedding_bag_collection=embedding_module,
            dense_in_features=dense_in,
            dense_arch_layer_sizes=model_cfg.dense_arch_layer_sizes,
            over_arch_layer_sizes=model_cfg.over_arch_layer_sizes,
            dense_device=dense_device,
        )
        if model_cfg.interaction == "dot":
            dlrm = DLRM(**common)
        else:
            dlrm = DLRM_DCN(
                **common,
                dcn_num_layers=model_cfg.dcn_num_layers,
                dcn_low_rank_dim=model_cfg.dcn_low_rank_dim,
            )
        if isinstance(embedding_module, MLETEmbeddingBagCollection):
            dlrm.sparse_arch = MLETSparseArch(embedding_module)
    weighted = isinstance(schema, FeatureSchema) and bool(schema.weight)
    return WeightedDLRMTrain(dlrm) if weighted else DLRMTrain(dlrm)


class WeightedDLRMTrain(DLRMTrain):
    """TorchRec's ``DLRMTrain`` with per-sample weights (``data.weight``).

    The loss of a batch with ``weights`` w (a ``WeightedBatch``) is the mean over its B rows of
    ``w_i * bce_i`` (``F.binary_cross_entropy_with_logits(..., weight=w)``, PyTorch's and Keras'
    sample-weight convention): every rank's slice of a global batch has the same size, so the
    ranks' averaged gradients are those of the global batch's mean. The output carries the
    weights as a 4th item ``(loss, logits, labels, weights)`` (the training metrics read them).
    A batch without weights gets ``DLRMTrain``'s loss and output. Same parameters and state-dict
    keys as ``DLRMTrain``.
    """

    def forward(self, batch):  # type: ignore[override]
        weights = getattr(batch, "weights", None)
        if weights is None:
            return super().forward(batch)
        logits = self.model(batch.dense_features, batch.sparse_features).squeeze(-1)
        labels = batch.labels.float()
        loss = F.binary_cross_entropy_with_logits(logits, labels, weight=weights.float())
        return loss, (loss.detach(), logits.detach(), batch.labels.detach(), weights.detach())


class MLETSparseArch(SparseArch):
    """TorchRec's SparseArch, taking the (B, F, d) tensor straight from the MLET module.

    TorchRec's version splits the KeyedTensor per key and concatenates it again; the MLET
    module can produce the (B, F, d) layout directly (see ``forward_pooled``). The submodule
    name (``embedding_bag_collection``) and so the state-dict keys are unchanged.
    """

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.embedding_bag_collection.forward_pooled(features)
