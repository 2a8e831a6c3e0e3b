"""The pure (unsharded) MLET module: a factorized EmbeddingBagCollection.

Each factorized table is W = W1 @ W2 with W1 (vocab × k) an ordinary TorchRec
``EmbeddingBagCollection`` table of dimension k, and W2 (k × d) a small dense projection held in a
separate module (:class:`MLETProjection`) so that TorchRec shards W1 while W2 is replicated (data
parallel). Pooling is linear, so ``pool(W1[ids]) @ W2 == pool((W1 @ W2)[ids])``: after training the
two factors collapse exactly into one vocab × d table (see :mod:`mlet_dist.modules.collapse`).

A table whose ``inner_dim`` is None is an ordinary single-layer table of dimension d that goes
through the same module with no projection: the baseline is this code path with ``inner_dim=None``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from mlet_dist.errors import MletError

PROJECTION_INITS = ("normal", "xavier", "orthogonal")


class MLETConfigError(MletError, ValueError):
    """An MLET table configuration is invalid; the message names the table and the fix."""


@dataclass
class MLETEmbeddingBagConfig(EmbeddingBagConfig):
    """A TorchRec ``EmbeddingBagConfig`` plus the MLET inner dimension.

    ``embedding_dim`` is d, the dimension served after collapse. ``inner_dim`` is k, the width of
    the trained factor W1; None makes the table an ordinary single-layer table.

    Example::

        MLETEmbeddingBagConfig(
            name="t_ad", num_embeddings=1000, embedding_dim=16, inner_dim=64,
            feature_names=["ad_id"],
        )
    """

    inner_dim: int | None = None


def _plain_config(cfg: EmbeddingBagConfig, **changes) -> EmbeddingBagConfig:
    """A vanilla ``EmbeddingBagConfig`` (not the MLET subclass) with some fields replaced.

    The planner, the sharders and the inference helpers only need to see vanilla configs.
    """
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(EmbeddingBagConfig)}
    values.update(changes)
    return EmbeddingBagConfig(**values)


def served_tables(tables: Iterable[EmbeddingBagConfig]) -> list[EmbeddingBagConfig]:
    """The plain d-dim configs a collapsed (served) EBC of these tables is built from: fp32
    whatever the trained tables' ``data_type`` (an fp16 W1 collapses into fp32 rows; serving in
    fp16/int8 is the export's quantize option)."""
    return [_plain_config(t, data_type=DataType.FP32) for t in tables]


def inner_dim_of(cfg: EmbeddingBagConfig) -> int | None:
    """The k of a table config (None for an ordinary table or a plain EmbeddingBagConfig)."""
    return getattr(cfg, "inner_dim", None)


def validate_tables(tables: Iterable[EmbeddingBagConfig]) -> None:
    """Checks MLET table configs; raises :class:`MLETConfigError` naming the table."""
    names: set[str] = set()
    features: set[str] = set()
    for t in tables:
        if not t.name:
            raise MLETConfigError(
                f"every table needs a name; got one with features {t.feature_names}"
            )
        if t.name in names:
            raise MLETConfigError(
                f"table name '{t.name}' is used twice; table names must be unique"
            )
        names.add(t.name)
        for f in t.feature_names:
            if f in features:
                raise MLETConfigError(
                    f"feature '{f}' is mapped to more than one table (again in '{t.name}'); "
                    f"a feature reads exactly one table"
                )
            features.add(f)
        k = inner_dim_of(t)
        if k is not None and k < t.embedding_dim:
            raise MLETConfigError(
                f"table '{t.name}': inner_dim k={k} is smaller than embedding_dim d={t.embedding_dim}; "
                f"MLET needs k >= d (a wider inner factor). Use inner_dim >= {t.embedding_dim}, "
                f"or inner_dim=None for an ordinary single-layer table."
            )
        if k is not None and k <= 0:
            raise MLETConfigError(f"table '{t.name}': inner_dim must be positive, got {k}")


class MLETProjection(nn.Module):
    """The per-table W2 (k × d, no bias) of the factorized tables, kept apart from W1 so it can be
    replicated by data parallelism while TorchRec shards W1.

    Args:
        shapes: table name -> (k, d) for each factorized table.
        init: 'normal', 'xavier' or 'orthogonal'.
        init_std: std of the 'normal' init; None or 0 means 1/sqrt(k), which gives the entries
            of W1 @ W2 the same variance as those of W1, so the collapsed table starts at the scale
            of an ordinary d-dim table.
        device: where to allocate W2.
    """

    def __init__(
        self,
        shapes: dict[str, tuple[int, int]],
        init: str = "normal",
        init_std: float | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if init not in PROJECTION_INITS:
            raise MLETConfigError(
                f"projection init '{init}' is unknown; use one of {', '.join(PROJECTION_INITS)}"
            )
        self.init = init
        self.init_std = init_std
        self.weights = nn.ParameterDict(
            {
                name: nn.Parameter(torch.empty(k, d, device=device))
                for name, (k, d) in shapes.items()
            }
        )
        if not any(p.is_meta for p in self.weights.values()):
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for w in self.weights.values():
            k = w.shape[0]
            if self.init == "normal":
                nn.init.normal_(w, std=self.init_std or 1.0 / math.sqrt(k))
            elif self.init == "xavier":
                nn.init.xavier_uniform_(w)
            else:
                nn.init.orthogonal_(w)

    def forward(self, name: str) -> torch.Tensor:
        return self.weights[name]


class MLETEmbeddingBagCollection(nn.Module):
    """A factorized (multi-layer) EmbeddingBagCollection.

    ``forward(KeyedJaggedTensor) -> KeyedTensor`` of d-dim pooled embeddings keyed by feature
    name, in the declared order of the tables' features. It looks W1's output up by key, never by
    position (a sharded EBC reorders its output keys).

    Args:
        tables: table configs; ``MLETEmbeddingBagConfig`` with ``inner_dim`` set are factorized,
            others (or inner_dim=None) are ordinary d-dim tables.
        is_weighted: the input KJT carries per-id weights (weighted pooling).
        device: device of W1; ``torch.device("meta")`` defers allocation to sharding.
        projection_device: device of W2 (default: ``device`` unless that is meta, then CPU).
        projection_init, projection_init_std: see :class:`MLETProjection`.

    Example::

        tables = [MLETEmbeddingBagConfig(name="t0", num_embeddings=100, embedding_dim=8,
                                         inner_dim=32, feature_names=["f0", "f1"])]
        mlet = MLETEmbeddingBagCollection(tables)
        kt = mlet(KeyedJaggedTensor.from_lengths_sync(
            keys=["f0", "f1"], values=torch.tensor([1, 2, 3]), lengths=torch.tensor([2, 0, 1, 0])))
        kt["f0"].shape  # (2, 8)
    """

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        is_weighted: bool = False,
        device: torch.device | None = None,
        projection_device: torch.device | None = None,
        projection_init: str = "normal",
        projection_init_std: float | None = None,
    ) -> None:
        super().__init__()
        if not tables:
            raise MLETConfigError("MLETEmbeddingBagCollection needs at least one table")
        validate_tables(tables)
        mean = [t.name for t in tables if t.pooling == PoolingType.MEAN]
        if is_weighted and mean:
            raise MLETConfigError(
                f"weighted features with MEAN pooling (tables {mean}) are not supported by "
                f"PyTorch's EmbeddingBag (per-id weights need SUM pooling); use SUM pooling, or "
                f"divide the weights by the bag length yourself"
            )
        self._tables = list(tables)
        self._is_weighted = is_weighted
        # The served view: what a plain EBC of the collapsed model is configured with.
        self._served_configs = served_tables(tables)
        w1_configs = [
            _plain_config(t, embedding_dim=inner_dim_of(t) or t.embedding_dim) for t in tables
        ]
        self.w1 = EmbeddingBagCollection(tables=w1_configs, is_weighted=is_weighted, device=device)
        if projection_device is None:
            projection_device = device if device is not None and device.type != "meta" else None
        self.projection = MLETProjection(
            {t.name: (inner_dim_of(t), t.embedding_dim) for t in tables if inner_dim_of(t)},
            init=projection_init,
            init_std=projection_init_std,
            device=projection_device,
        )
        self._feature_names = [f for t in tables for f in t.feature_names]
        self._feature_dims = [t.embedding_dim for t in tables for _ in t.feature_names]
        # Factorized features grouped by (k, d) so each group is one batched matmul.
        groups: dict[tuple[int, int], list[tuple[str, str]]] = {}
        for t in tables:
            k = inner_dim_of(t)
            if k:
                for f in t.feature_names:
                    groups.setdefault((k, t.embedding_dim), []).append((f, t.name))
        self._groups = list(groups.values())
        self._feature_tables = [t.name for t in tables for _ in t.feature_names]
        # (factorized?, W1 width) when every table has the same layout: see forward_pooled.
        layouts = {
            (bool(inner_dim_of(t)), inner_dim_of(t) or t.embedding_dim, t.embedding_dim)
            for t in tables
        }
        self._uniform = next(iter(layouts))[:2] if len(layouts) == 1 else None
        self._order_cache: dict[tuple[tuple[str, ...], torch.device], _FeaturePermutation] = {}

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        """The served (collapsed) configs: same names, features, pooling, dimension d."""
        return self._served_configs

    def mlet_configs(self) -> list[EmbeddingBagConfig]:
        """The configs as given, including ``inner_dim``."""
        return self._tables

    def is_weighted(self) -> bool:
        return self._is_weighted

    @property
    def feature_names(self) -> list[str]:
        return self._feature_names

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)initializes W1 (uniform ±sqrt(1/vocab), as the DLRM reference) and W2.

        Done here rather than by ``EmbeddingBagCollection.reset_parameters``, which is a no-op
        for an EBC constructed on the meta device even after ``to_empty``.
        """
        for cfg in self.w1.embedding_bag_configs():
            weight = self.w1.embedding_bags[cfg.name].weight
            if cfg.init_fn is not None:
                cfg.init_fn(weight)
            else:
                weight.uniform_(cfg.get_weight_init_min(), cfg.get_weight_init_max())
        self.projection.reset_parameters()

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """d-dim pooled embeddings of every feature, keyed by feature name (declared order)."""
        if self._uniform is not None:
            pooled = self.forward_pooled(features)  # (B, F, d)
            return KeyedTensor(
                keys=self._feature_names,
                length_per_key=self._feature_dims,
                values=pooled.reshape(pooled.shape[0], -1),
            )
        pooled = self.w1(features).to_dict()  # by key: robust to the sharded output order
        out: dict[str, torch.Tensor] = {}
        for group in self._groups:
            # (F, B, k) @ (F, k, d) -> (F, B, d): one bmm for all features of equal (k, d).
            x = torch.stack([pooled[f] for f, _ in group])
            w2 = torch.stack([self.projection.weights[t] for _, t in group])
            y = torch.bmm(x, w2)
            for i, (f, _) in enumerate(group):
                out[f] = y[i]
        values = torch.cat([out.get(f, pooled[f]) for f in self._feature_names], dim=1)
        return KeyedTensor(
            keys=self._feature_names, length_per_key=self._feature_dims, values=values
        )

    def forward_pooled(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """The pooled embeddings as one (B, F, d) tensor, features in declared order.

        Fast path for the common layout (every table factorized with the same (k, d), or every
        table single-layer with the same d), which DLRM's interaction consumes directly: W1's
        output is viewed as (B, F, k) without splitting it per key, and the projection is one
        batched matmul. This avoids the per-key split + stack + cat copies of the general path
        (they dominated the CPU profile of the training step).

        When the sharded EBC returns its features in another order than declared, the
        projection runs in W1's order (W2 stacked to match) and the k/d times smaller result is
        put in declared order, a gather of contiguous (B, d) blocks whose backward is the inverse
        gather. (Gathering W1's (B, F, k) output instead, with ``index_select``'s backward that
        zero-fills a (B, F, k) gradient and scatter-adds into it, took 5-10% of the CPU step at
        world size 2.)
        """
        if self._uniform is None:
            kt = self.forward(features)
            return kt.values().view(kt.values().shape[0], len(self._feature_names), -1)
        return _pooled_after_w1(self, self.w1(features))

    def _permutation(self, keys: list[str], device: torch.device) -> _FeaturePermutation | None:
        """How W1's output features (in ``keys`` order) map to declared order; None if equal."""
        if keys == self._feature_names:
            return None
        cache_key = (tuple(keys), device)
        cached = self._order_cache.get(cache_key)
        if cached is None:
            where = {k: i for i, k in enumerate(keys)}
            order = torch.tensor([where[f] for f in self._feature_names], dtype=torch.long)
            table_of = dict(zip(self._feature_names, self._feature_tables))
            cached = _FeaturePermutation(
                order=order.to(device),
                inverse=torch.argsort(order).to(device),
                tables=[table_of[k] for k in keys],
            )
            self._order_cache[cache_key] = cached
        return cached


@dataclass
class _FeaturePermutation:
    """W1's output order -> declared order: ``declared[i] = w1_order[order[i]]``."""

    order: torch.Tensor
    inverse: torch.Tensor
    tables: list[str]
    """The table of each feature in W1's output order."""


class _Permute(torch.autograd.Function):
    """``x.index_select(dim, order)`` for a permutation, with the inverse gather as backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, order: torch.Tensor, inverse: torch.Tensor):
        ctx.dim = dim
        ctx.save_for_backward(inverse)
        return x.index_select(dim, order)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(ctx.dim, inverse), None, None, None


class _Project(torch.autograd.Function):
    """``bmm(x.transpose(0, 1), w2)``: (B, F, k) x (F, k, d) -> (F, B, d), one matmul per feature.

    The same batched matmuls as autograd's, except that the gradient of ``x`` is written straight
    into x's own (B, F, k) layout (a strided output of the bmm), which W1's backward needs
    contiguous; autograd would compute it as (F, B, k) and copy it, one more B*F*k temporary per
    step. On CPU that temporary is what made glibc trim and re-fault the heap every step: the
    MLET step first-touched 24-38 MiB per step with it, 5-10 MiB without (B=4096, F=26, k=64,
    d=16; benchmarks/README.md). The other layouts measured (einsum, a contiguous copy of x,
    loops of mm) were no faster.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w2)
        return torch.bmm(x.transpose(0, 1), w2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, w2 = ctx.saved_tensors
        dtype = grad.dtype  # differs from x's and w2's only under autocast (.to is then a cast)
        grad_x = grad_w2 = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty(x.shape, dtype=dtype, device=grad.device)
            torch.bmm(grad, w2.to(dtype).transpose(1, 2), out=grad_x.transpose(0, 1))
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w2 = torch.bmm(x.to(dtype).permute(1, 2, 0), grad).to(w2.dtype)
        return grad_x, grad_w2


# An opaque call for torch.fx: TorchRec's train pipeline traces the model to find the sharded W1
# and its input, and this function's Python control flow (on W1's output keys) cannot be traced.
@torch.fx.wrap
def _pooled_after_w1(module: MLETEmbeddingBagCollection, kt: KeyedTensor) -> torch.Tensor:
    """W1's pooled output (``kt``) -> the (B, F, d) projection of ``forward_pooled``'s fast path."""
    factorized, width = module._uniform
    values = kt.values()
    x = values.view(values.shape[0], len(module._feature_names), width)  # (B, F, k), W1 order
    perm = module._permutation(kt.keys(), x.device)
    if not factorized:
        return x if perm is None else _Permute.apply(x, 1, perm.order, perm.inverse)
    tables = module._feature_tables if perm is None else perm.tables
    w2 = torch.stack([module.projection.weights[t] for t in tables])  # (F, k, d)
    y = _Project.apply(x, w2)  # (F, B, d)
    if perm is not None:
        y = _Permute.apply(y, 0, perm.order, perm.inverse)
    return y.transpose(0, 1)  # (B, F, d)
