"""``[optim]``: the fused W1 optimizer, the dense optimizer and the LR schedule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mlet_dist.config.error import check_number


@dataclass
class OptimConfig:
    """Optimizers: fused (fbgemm, in backward) for W1, a dense one for W2 and the MLPs."""

    embedding_optimizer: Literal["rowwise_adagrad", "adagrad", "sgd", "adam"] = "rowwise_adagrad"
    """W1 optimizer: 'rowwise_adagrad', 'adagrad', 'sgd' (fbgemm fused) or 'adam' (GPU only)."""
    embedding_lr: float = 0.1
    """Learning rate of single-layer tables, and of each factorized table's W1 (times sqrt(d / k) of that table's k under w1_lr_scaling). 0.1: the tuned optimum of row-wise Adagrad on the synthetic teacher and MovieLens (docs/results.md#the-recommended-recipe-the-default-and-why)."""
    dense_optimizer: Literal["adagrad", "adam", "sgd"] = "adagrad"
    """Optimizer of W2 and the MLPs: 'adagrad', 'adam' or 'sgd'."""
    dense_lr: float = 0.05
    """Learning rate of the MLPs."""
    projection_lr: float = 0.02
    """Learning rate of W2; 0 means the same as dense_lr."""
    w1_lr_scaling: Literal["none", "sqrt_d_over_k", "auto"] = "auto"
    """'sqrt_d_over_k': W1 of each MLET(k, d) table trains with embedding_lr * sqrt(d / k), k that table's own (model.inner_dim_per_table, model.inner_dim_min_rows); single-layer tables train at embedding_lr. With row-wise Adagrad and W2 of orthonormal columns (model.projection_init = 'orthogonal') a W1 step then moves the collapsed rows W1 @ W2 exactly as far as a plain d-dim table's step at embedding_lr (docs/results.md#the-recommended-recipe-the-default-and-why), so one tuned embedding_lr serves every table and MLET differs from the plain table only by what W2 learns. Tables of different k train together, each at its own rate (its own fbgemm TBE and param group of the fused optimizer). 'auto': the same as 'sqrt_d_over_k' (a model without factorized tables trains at embedding_lr either way). 'none': embedding_lr as it is for every table (W1's steps then move the collapsed table about sqrt(k / d) times further than a plain table's)."""
    eps: float = 1e-8
    """Epsilon of the Adagrad/Adam optimizers."""
    warmup_steps: int = 0
    """Linear warm-up steps of the learning rate."""
    decay_start_step: int = 0
    """Step at which polynomial decay starts (0 with decay_steps = 0: no decay)."""
    decay_steps: int = 0
    """Steps over which the learning rate decays to 0 (squared polynomial, as MLPerf DLRM)."""

    def check(self) -> None:
        """Checks of this section alone."""
        for key in ("embedding_lr", "dense_lr"):
            check_number(f"optim.{key}", getattr(self, key), 0, above=True,
                         why="a negative rate trains by gradient ascent")  # fmt: skip
        check_number("optim.projection_lr", self.projection_lr, 0, why="0 = dense_lr")
        check_number("optim.eps", self.eps, 0, above=True)
        for key in ("warmup_steps", "decay_start_step", "decay_steps"):
            check_number(f"optim.{key}", getattr(self, key), 0)
