"""Training from preprocessed Parquet equals training from the raw TSV rows (same order)."""

from __future__ import annotations

import pytest

from mlet_dist.config import load_config
from mlet_dist.data import generate_synthetic
from mlet_dist.data.preprocess import preprocess_from_config
from mlet_dist.train import train


def test_parquet_and_tsv_training_agree(tmp_path):
    raw = tmp_path / "raw"
    common = [
        f"--data.dir={raw}",
        "--synthetic.days=2",
        "--synthetic.rows_per_day=700",
        "--data.eval_fraction=0.1",
        "--data.test_fraction=0.1",
        "--data.batch_size=64",
        "--data.shuffle=false",
        "--train.max_steps=15",
        "--train.log_every=1",
        "--train.progress=false",
        "--model.inner_dim=32",
        "--model.embedding_dim=8",
        "--model.dense_arch_layer_sizes=[16, 8]",
    ]
    tsv = load_config(None, [*common, f"--train.run_dir={tmp_path / 'tsv'}"])
    generate_synthetic(raw, tsv.synthetic, progress=False)
    parquet_dir = tmp_path / "parquet"
    pq = load_config(
        None,
        [*common, "--data.source=parquet", f"--data.parquet_dir={parquet_dir}",
         "--data.row_group_rows=100", f"--train.run_dir={tmp_path / 'pq'}"],
    )  # fmt: skip
    preprocess_from_config(tsv.data, out_dir=parquet_dir, workers=1, progress=False)
    a, b = train(tsv), train(pq)
    assert a["train"]["loss_curve"] == b["train"]["loss_curve"]
    assert len(a["train"]["loss_curve"]) == 15
    for split in ("eval", "test"):
        assert b[split]["rows"] == a[split]["rows"] == 140
        assert b[split]["auc"] == pytest.approx(a[split]["auc"], abs=1e-6)
        assert b[split]["log_loss"] == pytest.approx(a[split]["log_loss"], rel=1e-6)
