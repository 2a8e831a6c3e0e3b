"""The serving predictors: the collapsed DLRM on TorchRec's inference path, as a ``torch.export``
program (the default), an AOTInductor package (optional) or TorchScript (optional, deprecated).

The tables become a TorchRec quantized ``EmbeddingBagCollection`` (fbgemm's inference TBE, tables in
fp32, fp16 or row-wise int8) built directly from the rows the collapse wrote; the dense network is
the trained one in float32. :class:`ServingModel` wraps it with plain tensor inputs. From it:

- :func:`export_predictor`: ``torch.export.export(..., strict=False)`` with a dynamic batch;
  ``torch.export.save`` writes ``serving/predictor.pt2``, which loads with
  ``torch.export.load(path).module()`` in any process that has loaded fbgemm's operators
  (``import fbgemm_gpu``), without torchrec or mlet_dist.
- :func:`aoti_package`: the same program compiled by AOTInductor
  (``torch._inductor.aoti_compile_and_package``) into ``serving/predictor_aoti.pt2``; loads with
  ``torch._inductor.aoti_load_package`` (Python) or AOTInductor's C++ runtime. Optional: lowering a
  TorchRec model can fail (pytorch/pytorch#139911), and then it is refused with the reason.
- :func:`script`: ``torchrec.fx.symbolic_trace`` then ``torch.jit.script`` (``serving/predictor.pt``),
  for torchrec.inference's C++ server; TorchScript is deprecated as of torch 2.13.

Inputs (plain tensors: a KeyedJaggedTensor argument would make the exported program depend on
torchrec's pytree registration to load; the KJT is built inside the model)::

    dense:   float32 (B, 13)   the transformed integer features (log(x + 1), missing = 0)
    values:  int64   (N,)      the categorical ids, feature-major: all ids of feature 0 for the
                               B samples, then feature 1, ... (the KeyedJaggedTensor layout)
    lengths: int32   (F * B,)  ids per (feature, sample), feature-major (TorchScript also takes int64)
    returns: float32 (B,)      click probabilities (sigmoid of the logit)

The feature order is the manifest's ``serving.feature_order``; B is dynamic (1 and up), N too.
"""

# No `from __future__ import annotations`: fx codegen needs real type objects in forward().

import contextlib
import copy
import io
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import sympy
import torch
import torchrec.fx
from torch import nn
from torch._library.fake_class_registry import has_fake_class
from torch.utils._sympy.numbers import int_oo
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig
from torchrec.pt2.utils import register_fake_classes
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mlet_dist.models import SPARSE_PREFIX, build_dlrm
from mlet_dist.modules.quantize import check_dtype, tbe_weights
from mlet_dist.serving.manifest import ServingError

try:  # Inductor's C++ compiler lookup (check_aoti_available); a private module of torch
    from torch._inductor.cpp_builder import get_cpp_compiler
except ImportError:  # another torch: the compile itself reports what is missing
    get_cpp_compiler = None

DATA_TYPES = {"fp32": DataType.FP32, "fp16": DataType.FP16, "int8": DataType.INT8}
DENSE_FEATURES = 13
LENGTHS_DTYPE = torch.int32
# Names of the dynamic dimensions in the manifest's input signature.
BATCH_DIM, IDS_DIM = "batch", "num_ids"


class ServingModel(nn.Module):
    """Click probability of a DLRM (``torchrec.models.dlrm.DLRM`` / ``DLRM_DCN``) from plain tensors.

    Args:
        dlrm: the model, ``forward(dense, KeyedJaggedTensor) -> logits (B, 1)``.
        feature_names: the categorical features in the order ``values``/``lengths`` use.

    Example::

        model = ServingModel(dlrm, ["cat_0", "cat_1"])
        p = model(torch.rand(2, 13), torch.tensor([3, 1, 4]), torch.tensor([1, 1, 1, 0]))
    """

    def __init__(
        self, dlrm: nn.Module, feature_names: list[str], dense_width: int = DENSE_FEATURES
    ) -> None:
        super().__init__()
        self.dlrm = dlrm
        self.feature_names = list(feature_names)
        self.dense_width = dense_width  # columns of `dense` (the schema's dense_in_features)

    def forward(
        self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        features = KeyedJaggedTensor(keys=self.feature_names, values=values, lengths=lengths)
        return torch.sigmoid(self.dlrm(dense, features)).squeeze(-1)


class AOTIError(ServingError):
    """AOTInductor could not compile the predictor; the message (one line) says why."""


def quant_embedding_bag_collection(
    tables: list[EmbeddingBagConfig],
    rows: Mapping[str, torch.Tensor],
    dtype: str,
    is_weighted: bool = False,
) -> QuantEmbeddingBagCollection:
    """TorchRec's quantized EBC (inference TBE on CPU) over already quantized rows.

    Args:
        tables: the served (d-dim) table configs.
        rows: table -> its rows in the serving format (:mod:`mlet_dist.modules.quantize`).
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
        # TBEs as submodules: fx keeps them as call_module, and export sees their state as
        # the module's (AOTInductor cannot functionalize the bounds check's in-place update of a
        # tensor that is only a lifted constant, which is what unregistered TBEs give)
        register_tbes=True,
    )


def serving_model(
    model_cfg: Any,
    num_embeddings_per_feature: Any,
    tables: list[EmbeddingBagConfig],
    rows: Mapping[str, torch.Tensor],
    dense_state: Mapping[str, torch.Tensor],
    dtype: str,
) -> ServingModel:
    """The served DLRM: quantized EBC over ``rows``, the dense network from ``dense_state``.

    Args:
        model_cfg: the served model config (``model.inner_dim = 0``).
        num_embeddings_per_feature: table rows per feature, or the feature schema
            (:mod:`mlet_dist.schema`; its dense width shapes the bottom MLP).
        tables: the served (d-dim) table configs.
        rows: table -> rows in the serving format.
        dense_state: ``DLRMTrain`` state-dict entries of the dense network (``model.*``).
        dtype: 'fp32', 'fp16' or 'int8'.
    """
    qebc = quant_embedding_bag_collection(tables, rows, dtype)
    model = build_dlrm(model_cfg, num_embeddings_per_feature, embedding_module=qebc)
    missing, unexpected = model.load_state_dict(dict(dense_state), strict=False)
    if unexpected or any(not k.startswith(SPARSE_PREFIX) for k in missing):
        raise RuntimeError(f"dense state mismatch: missing {missing}, unexpected {unexpected}")
    features = [f for t in tables for f in t.feature_names]
    dense_width = getattr(num_embeddings_per_feature, "dense_in_features", DENSE_FEATURES)
    served = ServingModel(model.model, features, dense_width)
    return served.eval().requires_grad_(False)


def example_inputs(
    num_features: int, batch: int = 3, dense_width: int = DENSE_FEATURES
) -> tuple[torch.Tensor, ...]:
    """(dense, values, lengths) of ``batch`` samples with one id (0) per feature."""
    return (
        torch.zeros(batch, dense_width),
        torch.zeros(num_features * batch, dtype=torch.int64),
        torch.ones(num_features * batch, dtype=LENGTHS_DTYPE),
    )


def _register_fbgemm_fake_classes() -> None:
    """Fake versions of fbgemm's TorchScript classes that the TBE holds (export traces them).

    TorchRec's own (``torchrec.pt2.utils.register_fake_classes``), registered once per process.
    """
    if not has_fake_class("__torch__.torch.classes.fbgemm.AtomicCounter"):
        register_fake_classes()


@contextlib.contextmanager
def _without_state_dict_views(model: nn.Module) -> Iterator[None]:
    """Hides the ``embedding_bags.<table>.weight`` buffers of the quantized EBCs meanwhile.

    TorchRec registers views of the TBE's weights under these names for ``state_dict()`` only;
    ``forward`` reads the TBE's own weights. An exported program would store both, i.e. every
    table twice.
    """
    hidden = [
        (m, m.embedding_bags) for m in model.modules() if isinstance(m, QuantEmbeddingBagCollection)
    ]
    try:
        for m, _ in hidden:
            m.embedding_bags = nn.ModuleDict()
        yield
    finally:
        for m, bags in hidden:
            m.embedding_bags = bags


def export_predictor(model: ServingModel) -> torch.export.ExportedProgram:
    """``torch.export`` of the serving model: flat inputs, dynamic batch (1 and up) and id count.

    Non-strict export (TorchRec's KJT and quantized EBC are traced as Python, as TorchRec's own
    export tests do); ``lengths`` is declared as ``num_features * batch``. Sizes are traced
    size-oblivious (``backed_size_oblivious``): otherwise the trace specializes the KJT's
    (features, batch) view on batch != 1 and the program refuses a single sample.
    """
    model.eval().requires_grad_(False)
    _register_fbgemm_fake_classes()
    batch = torch.export.Dim(BATCH_DIM, min=1)
    num_ids = torch.export.Dim(IDS_DIM, min=0)
    dynamic = {
        "dense": {0: batch},
        "values": {0: num_ids},
        "lengths": {0: len(model.feature_names) * batch},
    }
    with (
        _without_state_dict_views(model),
        torch.fx.experimental._config.patch(backed_size_oblivious=True),
    ):
        return torch.export.export(
            model,
            example_inputs(len(model.feature_names), dense_width=model.dense_width),
            dynamic_shapes=dynamic,
            strict=False,
        )


def input_signature(ep: torch.export.ExportedProgram) -> dict[str, Any]:
    """The exported program's inputs and output as the manifest records them.

    Read from the program itself: each user input's dtype and shape, the dynamic sizes named
    (``batch``: dense's first dimension, ``num_ids``: values'), and their allowed ranges.

    Returns:
        {"inputs": [{"name", "dtype", "shape"}], "output": {"dtype", "shape"},
        "dynamic_dims": {name: {"min", "max"}}} (max None = unbounded); shapes hold ints and
        expressions of the dynamic sizes, e.g. ``["26*batch"]``.
    """
    user = {
        n.name: n.meta["val"]
        for n in ep.graph.nodes
        if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs
    }
    names = {
        user["dense"].shape[0].node.expr: BATCH_DIM,
        user["values"].shape[0].node.expr: IDS_DIM,
    }
    rename = {sym: sympy.Symbol(name) for sym, name in names.items()}

    def shape(val: torch.Tensor) -> list[int | str]:
        return [s if isinstance(s, int) else str(s.node.expr.xreplace(rename)) for s in val.shape]

    def dtype(val: torch.Tensor) -> str:
        return str(val.dtype).removeprefix("torch.")

    (output,) = next(n for n in ep.graph.nodes if n.op == "output").args[0]
    dims = {}
    for sym, name in names.items():
        r = ep.range_constraints[sym]
        unbounded = r.upper in (int_oo, sympy.oo)
        dims[name] = {"min": int(r.lower), "max": None if unbounded else int(r.upper)}
    return {
        "inputs": [
            {"name": name, "dtype": dtype(user[name]), "shape": shape(user[name])}
            for name in ep.graph_signature.user_inputs
        ],
        "output": {"dtype": dtype(output.meta["val"]), "shape": shape(output.meta["val"])},
        "dynamic_dims": dims,
    }


def check_aoti_available() -> None:
    """Refuses AOTInductor early (before a long collapse) where it has no C++ compiler.

    Raises:
        AOTIError: Inductor finds no C++ compiler (its ``cpp.cxx`` setting / ``$CXX``).
    """
    if get_cpp_compiler is None:  # another torch: the compile itself reports what is missing
        return
    try:
        get_cpp_compiler()
    except Exception as e:  # torch._inductor.exc.InvalidCxxCompiler, OSError
        raise AOTIError(
            f"AOTInductor needs a C++ compiler and found none ({_first_line(e)}); install g++ "
            f"(or set CXX), or collapse without --aoti"
        ) from e


def aoti_package(ep: torch.export.ExportedProgram, path: str | Path | io.BytesIO) -> None:
    """Compiles an exported predictor with AOTInductor into a package (``*.pt2``) at ``path``,
    or into a buffer (what a collapse does: :func:`mlet_dist.serving.artifacts.write_serialized`
    then writes its bytes atomically).

    Raises:
        AOTIError: lowering or compiling failed (e.g. an operator AOTInductor cannot lower, no
            C++ compiler); the message is one line with the first line of the cause.
    """
    target = path if isinstance(path, io.BytesIO) else str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # pytree deprecation notes inside
            torch._inductor.aoti_compile_and_package(ep, package_path=target)
    except Exception as e:  # Inductor raises many types (lowering, codegen, C++ compiler)
        raise AOTIError(
            f"AOTInductor could not compile the predictor: {type(e).__name__}: "
            f"{_first_line(e)}; the torch.export program (serving/predictor.pt2) does not need "
            f"it: collapse without --aoti"
        ) from e


def _first_line(e: BaseException, limit: int = 300) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0] if lines else "no message"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def script(model: nn.Module) -> torch.jit.ScriptModule:
    """``torchrec.fx.symbolic_trace`` then ``torch.jit.script`` (scripting the quantized EBC
    directly fails; tracing first resolves its Python-only parts). TorchScript is deprecated in
    torch 2.13: this is the ``--torchscript`` path only."""
    model.eval().requires_grad_(False)  # inference: outputs carry no autograd graph
    with warnings.catch_warnings():
        # TorchScript's notes on TorchRec's annotations (harmless, printed for every table group)
        warnings.simplefilter("ignore", UserWarning)
        return torch.jit.script(torchrec.fx.symbolic_trace(model))
