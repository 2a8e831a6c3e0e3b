"""Training, checkpoints and the end-to-end path on one process (a one-rank group)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mlet_dist.checkpoint import CheckpointError, latest_checkpoint
from mlet_dist.config import load_config
from mlet_dist.data import CriteoArrays
from mlet_dist.distributed.parallelize import init_distributed
from mlet_dist.export import collapse_run, load_unsharded
from mlet_dist.metrics import binary_metrics
from mlet_dist.train import Trainer, train
from mlet_dist.workflow import check_collapsed, evaluate_run

REPO = Path(__file__).resolve().parents[1]
CRITEO_SAMPLE = REPO.parent / "shared/data/criteo_kaggle_sample/criteo_kaggle_train_first10k.tsv.gz"
SIZES = [50] * 26


def random_arrays(n: int, seed: int) -> CriteoArrays:
    rng = np.random.default_rng(seed)
    return CriteoArrays(
        labels=rng.integers(0, 2, n).astype(np.float32),
        dense=rng.random((n, 13)).astype(np.float32),
        sparse=rng.integers(0, 50, (n, 26)).astype(np.int64),
    )


def tiny_config(tmp_path: Path, *extra: str):
    return load_config(
        None,
        [
            f"--data.num_embeddings_per_feature={SIZES}",
            "--model.embedding_dim=8",
            "--model.inner_dim=32",
            "--model.dense_arch_layer_sizes=[16, 8]",
            "--model.over_arch_layer_sizes=[16, 1]",
            "--train.progress=false",
            f"--train.run_dir={tmp_path / 'run'}",
            *extra,
        ],
    )


@pytest.mark.parametrize(
    "interaction,max_loss,min_auc", [("dot", 0.05, 0.9999), ("dcn", 0.2, 0.97)]
)
def test_tiny_model_overfits_tiny_batch(tmp_path, interaction, max_loss, min_auc):
    """Random labels on 64 rows: memorizing them proves gradients reach W1, W2 and the MLPs."""
    cfg = tiny_config(
        tmp_path,
        "--data.batch_size=64",
        "--data.shuffle=false",
        "--train.epochs=200",
        f"--model.interaction={interaction}",
        "--optim.embedding_lr=0.1",
        "--optim.dense_lr=0.1",
    )
    trainer = Trainer(cfg, init_distributed(cfg.dist))
    rows = random_arrays(64, seed=0)
    before = trainer.evaluate(rows)
    trainer.fit(rows)
    after = trainer.evaluate(rows)
    assert before["log_loss"] > 0.6
    assert after["log_loss"] < max_loss
    assert after["auc"] >= min_auc


def final_state(cfg) -> dict[str, torch.Tensor]:
    model = load_unsharded(cfg, latest_checkpoint(cfg.train.run_dir))
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_continues_exactly(tmp_path, monkeypatch):
    rows = random_arrays(512, seed=1)
    monkeypatch.setattr("mlet_dist.train.run.load_splits", lambda *_: _splits(rows))
    common = [
        "--data.batch_size=32",
        "--train.log_every=1",
        "--optim.warmup_steps=5",
        "--train.epochs=3",
    ]
    full = tiny_config(tmp_path / "a", *common, "--train.max_steps=24")
    m_full = train(full)
    part = tiny_config(tmp_path / "b", *common, "--train.max_steps=10")
    train(part)
    resumed = tiny_config(tmp_path / "b", *common, "--train.max_steps=24")
    m_resumed = train(resumed)
    assert m_resumed["train"]["steps_this_run"] == 14
    full_curve = dict(map(tuple, m_full["train"]["loss_curve"]))
    for step, loss in m_resumed["train"]["loss_curve"]:
        assert loss == full_curve[step], step  # bit-identical continuation
    a, b = final_state(full), final_state(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _splits(rows):
    from mlet_dist.data import Splits

    return Splits(rows.slice(0, 448), rows.slice(448, 512), rows.slice(512, 512))


def test_changed_model_config_is_refused_naming_keys(tmp_path, monkeypatch):
    rows = random_arrays(512, seed=2)
    monkeypatch.setattr("mlet_dist.train.run.load_splits", lambda *_: _splits(rows))
    train(tiny_config(tmp_path, "--train.max_steps=3", "--data.batch_size=32"))
    changed = tiny_config(
        tmp_path, "--train.max_steps=6", "--data.batch_size=32", "--model.inner_dim=64"
    )
    with pytest.raises(CheckpointError, match=r"model.inner_dim: checkpoint 32 != config 64"):
        train(changed)


def test_partial_checkpoints_are_never_latest(tmp_path, monkeypatch):
    rows = random_arrays(512, seed=3)
    monkeypatch.setattr("mlet_dist.train.run.load_splits", lambda *_: _splits(rows))
    cfg = tiny_config(tmp_path, "--train.max_steps=4", "--data.batch_size=32")
    train(cfg)
    good = latest_checkpoint(cfg.train.run_dir)
    root = good.parent
    (root / "step_99999999.tmp").mkdir()  # a crash mid-write
    (root / "step_99999998").mkdir()  # renamed but without metadata (damaged)
    (root / "step_99999998" / "__0_0.distcp").write_bytes(b"partial")
    assert latest_checkpoint(cfg.train.run_dir) == good


@pytest.mark.skipif(
    not CRITEO_SAMPLE.exists(), reason=f"{CRITEO_SAMPLE} absent (fresh clone without ../shared)"
)
def test_end_to_end_on_real_criteo_sample(tmp_path):
    """Train MLET on 8k real rows, evaluate held-out rows, collapse, check the served model."""
    cfg = load_config(
        REPO / "configs/criteo_sample_mlet.toml",
        [
            f"--data.train_files=['{CRITEO_SAMPLE}']",
            f"--train.run_dir={tmp_path / 'run'}",
            "--train.progress=false",
        ],
    )
    metrics = train(cfg)
    assert metrics["eval"]["rows"] == 1000 and metrics["test"]["rows"] == 1000
    assert metrics["eval"]["auc"] > 0.65, metrics["eval"]
    assert metrics["test"]["auc"] > 0.65, metrics["test"]
    buckets = metrics["test"]["buckets"]
    assert list(buckets) == ["<=10", "11-100", "101-1000", ">1000"]
    assert sum(b["rows"] for b in buckets.values()) == 1000
    again = evaluate_run(cfg.train.run_dir, split="test")
    assert again["auc"] == pytest.approx(metrics["test"]["auc"], abs=1e-9)
    # `mlet-dist evaluate` reports the same buckets (ids counted in the training split)
    assert list(again["buckets"]) == list(buckets)
    for name, b in buckets.items():
        assert again["buckets"][name]["rows"] == b["rows"]
        if b["rows"]:
            assert again["buckets"][name]["log_loss"] == pytest.approx(b["log_loss"], abs=1e-9)
    assert json.loads((Path(cfg.train.run_dir) / "eval_test.json").read_text())["rows"] == 1000

    served = tmp_path / "served"
    report = collapse_run(cfg.train.run_dir, served)
    assert len(report["factorized_tables"]) == 26
    assert (
        report["served_embedding_params"] * 4 == report["training_embedding_params"] - 26 * 64 * 16
    )
    from mlet_dist.data import load_splits

    check = check_collapsed(cfg.train.run_dir, served, load_splits(cfg.data).test)
    assert check["passed"], check
    assert check["collapsed_auc"] == pytest.approx(metrics["test"]["auc"], abs=1e-5)
    # collapsing again into the same directory replaces it cleanly
    collapse_run(cfg.train.run_dir, served)
    assert check_collapsed(cfg.train.run_dir, served, load_splits(cfg.data).test)["passed"]


def test_metrics_match_for_sharded_and_unsharded_model(tmp_path, monkeypatch):
    """The DMP evaluation equals a plain forward of the unsharded model loaded from its checkpoint."""
    rows = random_arrays(512, seed=4)
    monkeypatch.setattr("mlet_dist.train.run.load_splits", lambda *_: _splits(rows))
    cfg = tiny_config(tmp_path, "--train.max_steps=5", "--data.batch_size=32")
    metrics = train(cfg)
    model = load_unsharded(cfg, latest_checkpoint(cfg.train.run_dir)).eval()
    from mlet_dist.data import make_batches

    held = _splits(rows).eval
    with torch.no_grad():
        logits = torch.cat(
            [model(b)[1][1] for b in make_batches(held, 1000, shuffle=False, seed=0)]
        )
    expected = binary_metrics(logits, torch.from_numpy(held.labels))
    assert metrics["eval"]["auc"] == pytest.approx(expected["auc"], abs=1e-6)
    assert metrics["eval"]["log_loss"] == pytest.approx(expected["log_loss"], rel=1e-5)
