"""MLET with k per table: each table's W1 trains at its own rate, and k by vocabulary size.

Oracles: (a) the float64 hand computation of row-wise Adagrad (as tests/test_w1_lr_scaling.py
does for one k): under optim.w1_lr_scaling every table's collapsed rows move exactly as a plain
d-wide table's at embedding_lr, whatever its k; (b, d) the rate fbgemm's TBE of each table holds,
against embedding_lr * sqrt(d / k) times the schedule's factor; (c) the trained model's own
predictions for the collapsed model.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mlet_dist.checkpoint import latest_checkpoint
from mlet_dist.config import ConfigError, load_config, table_inner_dim
from mlet_dist.data import CriteoArrays, Splits
from mlet_dist.distributed.parallelize import init_distributed
from mlet_dist.export import CollapseOptions, collapse_run
from mlet_dist.models import build_tables
from mlet_dist.modules.mlet import inner_dim_of
from mlet_dist.optim import lr_lambda, w1_learning_rate
from mlet_dist.train import Trainer, train
from mlet_dist.workflow import check_collapsed

D, LR = 8, 0.1
# t_cat_0: single-layer (per-table k = 0), t_cat_1: k = 16 (per table), the others: k = 32
MIXED = ["--model.inner_dim=32", "--model.inner_dim_per_table={t_cat_0 = 0, t_cat_1 = 16}"]
SIZES = [50, 40, 30] + [20] * 23  # the Criteo layout's 26 tables
NAMES = [f"t_cat_{i}" for i in range(len(SIZES))]


def _rates(ks: dict[str, int]) -> dict[str, float]:
    """The expected base rate per table of k (0: single-layer): embedding_lr * sqrt(d / k)."""
    return {name: LR * math.sqrt(D / k) if k else LR for name, k in ks.items()}


WANT = _rates({**dict.fromkeys(NAMES, 32), "t_cat_0": 0, "t_cat_1": 16})


def _rowwise_adagrad_step(w, state, grad, lr, eps=0.0):
    """fbgemm EXACT_ROWWISE_ADAGRAD on the rows a batch touched (nonzero gradient):
    state_r += mean_j g_rj^2; w_r -= lr * g_r / (sqrt(state_r) + eps)."""
    rows = grad.abs().sum(dim=1) > 0
    state[rows] += (grad[rows] ** 2).mean(dim=1)
    w[rows] -= lr * grad[rows] / (state[rows].sqrt() + eps).unsqueeze(1)


def test_each_table_at_its_rate_moves_like_a_plain_table_in_float64():
    """Tables of k = 0, 16, 32 in one model, each W1 at w1_learning_rate(d, k): every collapsed
    table follows its plain d-wide twin at embedding_lr, step for step."""
    torch.manual_seed(0)
    cfg = load_config(None, ["--optim.w1_lr_scaling=sqrt_d_over_k", f"--optim.embedding_lr={LR}"])
    n, steps = 40, 15
    tables = {}
    for k in (0, 16, 32):
        w2 = torch.eye(D, dtype=torch.float64)  # a single-layer table: the table is its W1
        if k:
            w2 = torch.nn.init.orthogonal_(torch.empty(k, D, dtype=torch.float64))
        w1 = (torch.rand(n, k or D, dtype=torch.float64) * 2 - 1) / math.sqrt(n)
        tables[k] = {
            "w1": w1, "w2": w2, "s1": torch.zeros(n, dtype=torch.float64),
            "plain": w1 @ w2, "s0": torch.zeros(n, dtype=torch.float64),
            "target": torch.randn(n, D, dtype=torch.float64),
            "lr": w1_learning_rate(cfg.optim, D, k),
        }  # fmt: skip
    assert [t["lr"] for t in tables.values()] == pytest.approx(
        [WANT["t_cat_0"], WANT["t_cat_1"], WANT["t_cat_2"]]
    )
    for step in range(steps):
        for k, t in tables.items():
            rows = torch.rand(n, generator=torch.Generator().manual_seed(step * 7 + k)) < 0.5
            g = torch.zeros(n, D, dtype=torch.float64)  # d loss / d (collapsed row)
            g[rows] = (t["w1"] @ t["w2"] - t["target"])[rows]
            _rowwise_adagrad_step(t["w1"], t["s1"], g @ t["w2"].T, t["lr"])  # through W2
            g0 = torch.zeros(n, D, dtype=torch.float64)
            g0[rows] = (t["plain"] - t["target"])[rows]
            _rowwise_adagrad_step(t["plain"], t["s0"], g0, LR)
            torch.testing.assert_close(t["w1"] @ t["w2"], t["plain"], rtol=1e-9, atol=1e-12)
    # one rate for all (the previous single fused LR) would not: k = 16 at k = 32's rate lags
    t = tables[16]
    w1, before = t["w1"].clone(), t["w1"] @ t["w2"]
    g = torch.randn(n, D, dtype=torch.float64)
    _rowwise_adagrad_step(w1, torch.zeros(n, dtype=torch.float64), g @ t["w2"].T, WANT["t_cat_2"])
    step_norm = ((w1 @ t["w2"] - before).norm(dim=1) / (LR * math.sqrt(D))).mean()
    assert step_norm.item() == pytest.approx(math.sqrt(16 / 32), rel=1e-6)


def _cfg(run_dir: Path, *extra: str):
    return load_config(
        None,
        [
            f"--data.num_embeddings_per_feature={SIZES}",
            "--data.batch_size=32",
            f"--model.embedding_dim={D}",
            *MIXED,
            "--model.dense_arch_layer_sizes=[16, 8]",
            "--model.over_arch_layer_sizes=[16, 1]",
            f"--optim.embedding_lr={LR}",
            "--optim.w1_lr_scaling=auto",
            "--optim.warmup_steps=8",
            "--dist.device='cpu'",
            "--train.progress=false",
            f"--train.run_dir={run_dir}",
            *extra,
        ],
    )


def _tbe_rates(trainer: Trainer) -> dict[str, tuple[float, float]]:
    """table -> (its fused param group's lr, the lr its fbgemm TBE holds)."""
    out: dict[str, tuple[float, float]] = {}

    def walk(opt) -> None:
        for _, sub in getattr(opt, "optimizers", []):
            walk(sub)
        if hasattr(opt, "_emb_module"):  # torchrec's EmbeddingFusedOptimizer: one TBE
            (group,) = opt.param_groups
            for key in opt.params:
                name = key.split("embedding_bags.")[1].removesuffix(".weight")
                out[name] = (group["lr"], float(opt._emb_module.get_learning_rate()))

    walk(trainer.model.fused_optimizer)
    return out


def _check_rates(trainer: Trainer, factor: float, scaling: dict[str, float] = WANT) -> None:
    rates = _tbe_rates(trainer)
    assert sorted(rates) == sorted(scaling)
    for name, (group_lr, tbe_lr) in rates.items():
        assert group_lr == pytest.approx(scaling[name] * factor, rel=1e-6), name
        assert tbe_lr == pytest.approx(scaling[name] * factor, rel=1e-6), name


def test_sharded_model_gives_each_table_its_rate_through_the_schedule(tmp_path):
    """Each table's TBE gets embedding_lr * sqrt(d / k) (k = 0: embedding_lr), and the warm-up
    scales each from its own base; 'none' gives every table embedding_lr."""
    cfg = _cfg(tmp_path / "run")
    trainer = Trainer(cfg, init_distributed(cfg.dist))
    f = lr_lambda(cfg.optim)
    _check_rates(trainer, f(0))
    for step in range(1, 6):
        trainer.scheduler.step()
        trainer._sync_fused_lr()  # as every training step does
        _check_rates(trainer, f(step))
    assert f(5) != f(0)  # (the warm-up did move the rates)

    plain = _cfg(tmp_path / "plain", "--optim.w1_lr_scaling=none")
    same = Trainer(plain, init_distributed(plain.dist))
    _check_rates(same, f(0), dict.fromkeys(WANT, LR))


def test_per_table_rates_do_not_change_the_plan(tmp_path):
    scaled = Trainer(c := _cfg(tmp_path / "a"), init_distributed(c.dist)).model.plan
    plain = Trainer(
        c := _cfg(tmp_path / "b", "--optim.w1_lr_scaling=none"), init_distributed(c.dist)
    ).model.plan
    assert str(scaled) == str(plain)


def _arrays(n: int, seed: int) -> CriteoArrays:
    rng = np.random.default_rng(seed)
    return CriteoArrays(
        labels=rng.integers(0, 2, n).astype(np.float32),
        dense=rng.random((n, 13)).astype(np.float32),
        sparse=np.stack([rng.integers(0, s, n) for s in SIZES], axis=1).astype(np.int64),
    )


def _splits(rows: CriteoArrays) -> Splits:
    return Splits(rows.slice(0, 224), rows.slice(224, 256), rows.slice(256, 256))


def test_resume_restores_each_tables_rate(tmp_path, monkeypatch):
    """A mixed-k run resumed mid-warm-up: every TBE is back at its own base times the schedule,
    and the resumed run continues the uninterrupted one exactly."""
    rows = _arrays(256, seed=1)
    monkeypatch.setattr("mlet_dist.train.run.load_splits", lambda *_: _splits(rows))
    full = train(_cfg(tmp_path / "a", "--train.max_steps=6", "--train.log_every=1"))
    train(_cfg(tmp_path / "b", "--train.max_steps=3", "--train.log_every=1"))
    cfg = _cfg(tmp_path / "b", "--train.max_steps=6", "--train.log_every=1")
    trainer = Trainer(cfg, init_distributed(cfg.dist))
    trainer.load(latest_checkpoint(cfg.train.run_dir))
    assert trainer.step == 3
    _check_rates(trainer, lr_lambda(cfg.optim)(3))
    resumed = train(cfg)
    curve = dict(map(tuple, full["train"]["loss_curve"]))
    for step, loss in resumed["train"]["loss_curve"]:
        assert loss == curve[step], step  # bit-identical continuation


def test_inner_dim_min_rows_picks_k_by_vocabulary_size():
    model = load_config(
        None,
        [
            "--model.inner_dim=32",
            "--model.inner_dim_min_rows=40",
            "--model.inner_dim_per_table={t_cat_3 = 16, t_cat_1 = 0}",
        ],
    ).model
    # below 40 rows single-layer, else inner_dim; the per-table k wins either way
    assert table_inner_dim(model, "t_cat_0", 39) == 0
    assert table_inner_dim(model, "t_cat_0", 40) == 32
    assert table_inner_dim(model, "t_cat_3", 10) == 16
    assert table_inner_dim(model, "t_cat_1", 1000) == 0
    tables = build_tables(model, [39, 1000, 40, 10])
    assert [inner_dim_of(t) for t in tables] == [None, None, 32, 16]
    for bad in ("-1", "1.5", "true"):
        with pytest.raises(ConfigError, match="inner_dim_min_rows"):
            load_config(None, [f"--model.inner_dim_min_rows={bad}"])


def test_inner_dim_min_rows_trains_and_collapses_to_the_same_predictions(tmp_path, monkeypatch):
    """Small tables single-layer, large ones MLET, one overridden: a short run trains, collapses
    only the factorized tables, and the collapsed model predicts as the trained one."""
    rows = _arrays(256, seed=2)
    monkeypatch.setattr("mlet_dist.train.run.load_splits", lambda *_: _splits(rows))
    cfg = _cfg(
        tmp_path / "run",
        "--model.inner_dim_per_table={t_cat_2 = 16}",  # 30 rows: small, but given a k
        "--model.inner_dim_min_rows=45",  # t_cat_0 (50 rows): 32; t_cat_1 (40 rows): single
        "--train.max_steps=4",
    )
    trainer = Trainer(cfg, init_distributed(cfg.dist))
    ks = {t.name: inner_dim_of(t) for t in trainer.model.module.model.sparse_arch.
          embedding_bag_collection.mlet_configs()}  # fmt: skip
    want = {**dict.fromkeys(NAMES, 0), "t_cat_0": 32, "t_cat_2": 16}  # 20-row tables: single
    assert ks == {name: k or None for name, k in want.items()}
    _check_rates(trainer, lr_lambda(cfg.optim)(0), _rates(want))
    train(cfg)
    served = tmp_path / "served"
    report = collapse_run(cfg.train.run_dir, served, CollapseOptions(predictor=False))
    assert sorted(report["factorized_tables"]) == ["t_cat_0", "t_cat_2"]
    check = check_collapsed(cfg.train.run_dir, served, rows)
    assert check["passed"] and check["rows"] == 256, check
    assert check["max_abs_logit_diff"] < 1e-5, check
