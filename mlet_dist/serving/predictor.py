"""The serving predictor: the collapsed DLRM on TorchRec's inference path, as TorchScript.

The tables become a TorchRec quantized ``EmbeddingBagCollection`` (fbgemm's inference TBE, tables in
fp32, fp16 or row-wise int8) built directly from the rows the collapse wrote; the dense network is
the trained one in float32. The model is traced with ``torchrec.fx.symbolic_trace`` and compiled
with ``torch.jit.script``, so it loads with ``torch.jit.load`` in any process that has loaded
fbgemm's operators (``import fbgemm_gpu``), without torchrec or mlet_dist.

Inputs (plain tensors, the simplest signature that scripts cleanly and is callable from C++)::

    dense:   float32 (B, 13)   the transformed integer features (log(x + 1), missing = 0)
    values:  int64   (N,)      the categorical ids, feature-major: all ids of feature 0 for the
                               B samples, then feature 1, ... (the KeyedJaggedTensor layout)
    lengths: int32 or int64 (F * B,)  ids per (feature, sample), feature-major
    returns: float32 (B,)      click probabilities (sigmoid of the logit)

The feature order is the manifest's ``serving.feature_order``.
"""

# No `from __future__ import annotations`: fx codegen needs real type objects in forward().

import copy
import warnings
from collections.abc import Mapping

import torch
from torch import nn
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mlet_dist.serving.quantize import check_dtype, tbe_weights

DATA_TYPES = {"fp32": DataType.FP32, "fp16": DataType.FP16, "int8": DataType.INT8}


class ServingModel(nn.Module):
    """Click probability of a DLRM (``torchrec.models.dlrm.DLRM`` / ``DLRM_DCN``) from plain tensors.

    Args:
        dlrm: the model, ``forward(dense, KeyedJaggedTensor) -> logits (B, 1)``.
        feature_names: the categorical features in the order ``values``/``lengths`` use.

    Example::

        model = ServingModel(dlrm, ["cat_0", "cat_1"])
        p = model(torch.rand(2, 13), torch.tensor([3, 1, 4]), torch.tensor([1, 1, 1, 0]))
    """

    def __init__(self, dlrm: nn.Module, feature_names: list[str]) -> None:
        super().__init__()
        self.dlrm = dlrm
        self.feature_names = list(feature_names)

    def forward(
        self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        features = KeyedJaggedTensor(keys=self.feature_names, values=values, lengths=lengths)
        return torch.sigmoid(self.dlrm(dense, features)).squeeze(-1)


def quant_embedding_bag_collection(
    tables: list[EmbeddingBagConfig],
    rows: Mapping[str, torch.Tensor],
    dtype: str,
    is_weighted: bool = False,
) -> QuantEmbeddingBagCollection:
    """TorchRec's quantized EBC (inference TBE on CPU) over already quantized rows.

    Args:
        tables: the served (d-dim) table configs.
        rows: table -> its rows in the serving format (:mod:`mlet_dist.serving.quantize`).
        dtype: 'fp32', 'fp16' or 'int8'.
        is_weighted: the features carry per-id weights.
    """
    check_dtype(dtype)
    configs = []
    for t in tables:
        c = copy.deepcopy(t)
        c.data_type = DATA_TYPES[dtype]
        configs.append(c)
    return QuantEmbeddingBagCollection(
        configs,
        is_weighted=is_weighted,
        device=torch.device("cpu"),
        table_name_to_quantized_weights={t.name: tbe_weights(rows[t.name], dtype) for t in tables},
        register_tbes=True,  # TBEs as submodules: fx keeps them as call_module
    )


def script(model: nn.Module) -> torch.jit.ScriptModule:
    """``torchrec.fx.symbolic_trace`` then ``torch.jit.script`` (scripting the quantized EBC
    directly fails; tracing first resolves its Python-only parts)."""
    import torchrec.fx

    model.eval().requires_grad_(False)  # inference: outputs carry no autograd graph
    with warnings.catch_warnings():
        # TorchScript's notes on TorchRec's annotations (harmless, printed for every table group)
        warnings.simplefilter("ignore", UserWarning)
        return torch.jit.script(torchrec.fx.symbolic_trace(model))
