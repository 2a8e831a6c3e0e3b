"""``[model]``: DLRM with (optionally) factorized MLET embedding tables."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mlet_dist.config.error import ConfigError, check_number


@dataclass
class ModelConfig:
    """DLRM with (optionally) factorized MLET embedding tables."""

    embedding_dim: int = 16
    """d: the served embedding dimension."""
    inner_dim: int = 64
    """k: the inner (training) dimension of W1 = vocab × k. 0 = ordinary single-layer tables."""
    inner_dim_per_table: dict[str, int] = field(default_factory=dict)
    """Per-table k overriding `inner_dim` (and `inner_dim_min_rows`), e.g. {t_cat_0 = 128}; 0 makes that table single-layer."""
    inner_dim_min_rows: int = 0
    """Tables with fewer rows than this are single-layer (k = 0): a small table needs no MLET. 0 = every table takes `inner_dim`; `inner_dim_per_table` still overrides per table."""
    pooling: Literal["sum", "mean"] = "sum"
    """Pooling of each bag: 'sum' or 'mean'."""
    projection_init: Literal["normal", "xavier", "orthogonal"] = "orthogonal"
    """Init of W2 (k × d): 'orthogonal' (orthonormal columns: with optim.w1_lr_scaling the collapsed table then trains exactly like a plain one, docs/results.md#the-recommended-recipe-the-default-and-why), 'normal' (std = projection_init_std) or 'xavier'."""
    projection_init_std: float = 0.0
    """Std of the 'normal' W2 init; 0 means 1/sqrt(k) (keeps the row norm of W1 @ W2 like W1's)."""
    interaction: Literal["dot", "dcn"] = "dot"
    """Feature interaction: 'dot' (DLRM) or 'dcn' (DCNv2 low-rank cross net, as in DLRMv2)."""
    dense_arch_layer_sizes: list[int] = field(default_factory=lambda: [64, 16])
    """Bottom MLP sizes; the last must equal embedding_dim."""
    over_arch_layer_sizes: list[int] = field(default_factory=lambda: [64, 32, 1])
    """Top MLP sizes; the last must be 1."""
    dcn_num_layers: int = 3
    """Cross layers of the DCN interaction."""
    dcn_low_rank_dim: int = 32
    """Low-rank dimension of the DCN cross layers."""
    w1_dtype: Literal["fp32", "fp16"] = "fp32"
    """Storage of the trained tables: W1 of every factorized table and the table itself when k = 0 (a single-layer table is the W1 of its model): 'fp32' or 'fp16' (TorchRec `data_type`, half the W1 bytes; the fused optimizer state stays fp32, W2, the MLPs and the collapsed (served) tables stay fp32; quality: docs/results.md#fp16-w1). A checkpoint resumes only under the w1_dtype it was written with."""

    def check(self) -> None:
        """Checks of this section alone."""
        m = self
        if m.embedding_dim <= 0:
            raise ConfigError(f"model.embedding_dim must be positive, got {m.embedding_dim}")
        per_table = (
            (f"model.inner_dim_per_table.{t}", k) for t, k in m.inner_dim_per_table.items()
        )
        for name, k in [("model.inner_dim", m.inner_dim), *per_table]:
            check_number(name, k, 0, why="0 = a single-layer table")
        check_number("model.inner_dim_min_rows", m.inner_dim_min_rows, 0, why="0 = no minimum")
        check_number("model.projection_init_std", m.projection_init_std, 0, why="0 = 1/sqrt(k)")
        check_number("model.dcn_num_layers", m.dcn_num_layers, 1)
        check_number("model.dcn_low_rank_dim", m.dcn_low_rank_dim, 1)
        for key in ("dense_arch_layer_sizes", "over_arch_layer_sizes"):
            for width in getattr(m, key):
                check_number(f"model.{key} (each size)", width, 1)
        if m.dense_arch_layer_sizes and m.dense_arch_layer_sizes[-1] != m.embedding_dim:
            raise ConfigError(
                f"model.dense_arch_layer_sizes must end with embedding_dim={m.embedding_dim} (the "
                f"bottom MLP output is interacted with the embeddings), got {m.dense_arch_layer_sizes}"
            )
        if not m.over_arch_layer_sizes or m.over_arch_layer_sizes[-1] != 1:
            raise ConfigError(
                f"model.over_arch_layer_sizes must end with 1 (one logit), got {m.over_arch_layer_sizes}"
            )
        # fbgemm's TBE kernels (training W1, serving the collapsed table) need widths divisible by 4.
        for name, width in [
            ("model.embedding_dim", m.embedding_dim),
            ("model.inner_dim", m.inner_dim),
            *((f"model.inner_dim_per_table.{t}", k) for t, k in m.inner_dim_per_table.items()),
        ]:
            if width % 4:
                raise ConfigError(
                    f"{name} = {width} is not a multiple of 4: fbgemm's embedding kernels (TorchRec "
                    f"training and serving) need table widths divisible by 4; use e.g. "
                    f"{max(4, width - width % 4)} or {width - width % 4 + 4}"
                )
        for name, k in [("model.inner_dim", m.inner_dim), *m.inner_dim_per_table.items()]:
            if k and k < m.embedding_dim:
                raise ConfigError(
                    f"{name} = {k} is smaller than model.embedding_dim = {m.embedding_dim}: MLET needs "
                    f"k >= d (use 0 for an ordinary single-layer table)"
                )


def table_inner_dim(model: ModelConfig, name: str, rows: int) -> int:
    """k of table ``name`` with ``rows`` rows (0: single-layer), the one place it is derived:
    ``model.inner_dim_per_table[name]`` when given, else 0 below ``model.inner_dim_min_rows``
    rows, else ``model.inner_dim``.

    Example: inner_dim 64, inner_dim_min_rows 1000: a table of 20 rows -> 0, of 5000 rows -> 64.
    """
    if name in model.inner_dim_per_table:
        return model.inner_dim_per_table[name]
    if rows < model.inner_dim_min_rows:
        return 0
    return model.inner_dim
