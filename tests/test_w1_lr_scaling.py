"""optim.w1_lr_scaling = 'sqrt_d_over_k': the fused W1 optimizer gets embedding_lr * sqrt(d / k),
and the reason for it, checked in float64: with W2 of orthonormal columns held fixed, row-wise
Adagrad on W1 at lr * sqrt(d / k) moves the collapsed table W1 @ W2 exactly as row-wise Adagrad
moves a plain d-wide table at lr (so MLET differs from the plain table only by what W2 learns);
exactly with eps = 0, up to eps's share of the denominator with fbgemm's eps = 1e-8."""

from __future__ import annotations

import math

import pytest
import torch

from mlet_dist.config import load_config
from mlet_dist.distributed.parallelize import init_distributed
from mlet_dist.optim import w1_learning_rate
from mlet_dist.train import Trainer


def _rowwise_adagrad_step(w, state, grad, lr, eps=0.0):
    """fbgemm EXACT_ROWWISE_ADAGRAD on the rows a batch touched (nonzero gradient):
    state_r += mean_j g_rj^2; w_r -= lr * g_r / (sqrt(state_r) + eps)."""
    rows = grad.abs().sum(dim=1) > 0
    state[rows] += (grad[rows] ** 2).mean(dim=1)
    w[rows] -= lr * grad[rows] / (state[rows].sqrt() + eps).unsqueeze(1)


def test_scaled_rowwise_adagrad_on_w1_equals_the_plain_table_in_float64():
    torch.manual_seed(0)
    n, k, d, lr, steps = 50, 32, 8, 0.1, 20
    w2 = torch.nn.init.orthogonal_(torch.empty(k, d, dtype=torch.float64))  # W2^T W2 = I_d
    w1 = (torch.rand(n, k, dtype=torch.float64) * 2 - 1) / math.sqrt(n)
    table = w1 @ w2  # the plain d-wide table starts at the collapsed MLET table
    s1, s0 = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    target = torch.randn(n, d, dtype=torch.float64)
    for step in range(steps):
        rows = torch.rand(n, generator=torch.Generator().manual_seed(step)) < 0.5
        g = torch.zeros(n, d, dtype=torch.float64)  # d loss / d (collapsed row), some rows only
        g[rows] = (w1 @ w2 - target)[rows]
        _rowwise_adagrad_step(w1, s1, g @ w2.T, lr * math.sqrt(d / k))  # chain rule through W2
        g0 = torch.zeros(n, d, dtype=torch.float64)
        g0[rows] = (table - target)[rows]
        _rowwise_adagrad_step(table, s0, g0, lr)
        torch.testing.assert_close(w1 @ w2, table, rtol=1e-9, atol=1e-12)
    # without the scaling the collapsed table moves sqrt(k / d) times further per step
    w1b = (torch.rand(n, k, dtype=torch.float64) * 2 - 1) / math.sqrt(n)
    before = w1b @ w2
    g = torch.randn(n, d, dtype=torch.float64)
    _rowwise_adagrad_step(w1b, torch.zeros(n, dtype=torch.float64), g @ w2.T, lr)
    step_norm = ((w1b @ w2 - before).norm(dim=1) / (lr * math.sqrt(d))).mean()
    assert step_norm.item() == pytest.approx(math.sqrt(k / d), rel=1e-6)


def _cfg(tmp_path, *extra):
    return load_config(
        None,
        [
            "--data.num_embeddings_per_feature=[50, 40]",
            "--model.embedding_dim=8",
            "--model.inner_dim=32",
            "--model.dense_arch_layer_sizes=[16, 8]",
            "--model.over_arch_layer_sizes=[16, 1]",
            "--optim.embedding_lr=0.1",
            f"--train.run_dir={tmp_path / 'run'}",
            *extra,
        ],
    )


@pytest.mark.parametrize("scaling,want", [("none", 0.1), ("sqrt_d_over_k", 0.1 * 0.5)])
def test_fused_optimizer_gets_the_scaled_rate(tmp_path, scaling, want):
    cfg = _cfg(tmp_path, f"--optim.w1_lr_scaling={scaling}")
    assert w1_learning_rate(cfg.optim, 8, 32) == pytest.approx(want)
    trainer = Trainer(cfg, init_distributed(cfg.dist))
    lrs = [g["lr"] for g in trainer.model.fused_optimizer.param_groups]
    assert lrs and all(lr == pytest.approx(want) for lr in lrs)
    # a single-layer table is not scaled
    assert w1_learning_rate(cfg.optim, 8, 0) == pytest.approx(0.1)
    assert w1_learning_rate(cfg.optim, 8, None) == pytest.approx(0.1)


def test_auto_scales_each_factorized_table(tmp_path):
    """'auto' and 'sqrt_d_over_k' take mixed k (each table its own rate, tests/test_per_table_k.py)."""
    for scaling in ("auto", "sqrt_d_over_k"):
        mixed = _cfg(
            tmp_path,
            f"--optim.w1_lr_scaling={scaling}",
            "--model.inner_dim_per_table={t_cat_0 = 0, t_cat_1 = 128}",
        )
        assert w1_learning_rate(mixed.optim, 8, 32) == pytest.approx(0.05)
        assert w1_learning_rate(mixed.optim, 8, 128) == pytest.approx(0.025)
        assert w1_learning_rate(mixed.optim, 8, 0) == pytest.approx(0.1)
