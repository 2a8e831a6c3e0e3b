"""Sample weights (``data.weight``) on 2 gloo ranks: training, evaluation and RecMetrics.

Oracles: a 2-rank run (row-wise sharded, TorchRec's train pipeline, SGD everywhere) on Parquet
rows with a weight column gives, step by step, each rank's loss equal to the weighted loss of its
half of the global batch computed by an unsharded single-process copy of the initial model trained
here with plain SGD on the whole global batches (``mean(w * bce)``); its weighted evaluation
metrics equal :func:`binary_metrics` of that copy's logits with the weights; TorchRec's RecMetrics
AUC / NE / calibration updated with weights on both ranks equal the project's weighted metrics of
the gathered predictions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
from dist_utils import run_ranks
from test_checkpoint_dist import full_tensors
from test_schema import write_config, write_rows

from mlet_dist.config import load_config
from mlet_dist.metrics import binary_metrics

pytestmark = pytest.mark.slow

STEPS, BATCH, LR = 6, 32, 0.1


def overrides(data: Path, run_dir: Path) -> list[str]:
    return [
        f"--data.train_files=['{data}']",
        "--data.weight='w'",
        "--data.eval_fraction=0.25",
        f"--data.batch_size={BATCH}",
        "--data.eval_batch_size=64",
        "--data.shuffle=false",
        "--model.embedding_dim=8",
        "--model.inner_dim=32",
        "--model.inner_dim_per_table={words = 16}",
        "--model.dense_arch_layer_sizes=[16, 8]",
        "--model.over_arch_layer_sizes=[16, 1]",
        "--optim.embedding_optimizer='sgd'",
        "--optim.dense_optimizer='sgd'",
        f"--optim.embedding_lr={LR}",
        f"--optim.dense_lr={LR}",
        f"--optim.projection_lr={LR}",
        "--optim.w1_lr_scaling='none'",
        "--dist.device='cpu'",
        "--dist.sharding_types=['row_wise']",
        f"--train.max_steps={STEPS}",
        "--train.log_every=1",
        "--train.metrics_every=3",
        "--train.progress=false",
        f"--train.run_dir={run_dir}",
    ]


def _job(config: str, args: list[str], served: str) -> dict[str, Any]:
    from mlet_dist.distributed.parallelize import init_distributed
    from mlet_dist.export import CollapseOptions, collapse_run
    from mlet_dist.train import Trainer, train
    from mlet_dist.train.metrics import build_rec_metrics, scalars, update_rec_metrics

    cfg = load_config(config, args)
    env = init_distributed(cfg.dist)
    # the initial weights (a Trainer's initialization is seeded: the run below starts from them)
    initial = full_tensors(Trainer(cfg, env).model.state_dict())
    metrics = train(cfg)
    collapse_run(cfg.train.run_dir, served, CollapseOptions(quantize="fp32"))
    stats = metrics["train"]
    out: dict[str, Any] = {
        "initial": initial,
        "curve": dict(map(tuple, stats["loss_curve"])),
        "eval": metrics["eval"],
        "pipelined": stats["pipelined_modules"],
    }
    # RecMetrics with weights over 2 ranks vs the weighted metrics of all predictions
    module = build_rec_metrics(batch_size=32, window_steps=5, env=env)
    g = torch.Generator().manual_seed(100 + env.rank)
    local = []
    for _ in range(5):
        z = 2 * torch.randn(16, generator=g)
        y = (torch.rand(16, generator=g) < torch.sigmoid(z)).float()
        w = torch.rand(16, generator=g) * 3
        update_rec_metrics(module, z, y, w)
        local.append((z, y, w))
    out["recmetrics"] = scalars(module.compute())
    gathered: list[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, local)
    z, y, w = (torch.cat([t[i] for part in gathered for t in part]) for i in range(3))
    ref = binary_metrics(z, y, w)
    ref["calibration"] = float((w.double() * torch.sigmoid(z.double())).sum() / (w * y).sum())
    out["reference"] = ref
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("weights_dist")
    config = write_config(tmp)
    data = write_rows(tmp / "rows.parquet", n_copies=60, seed=5)  # 360 rows
    weights = np.random.default_rng(9).choice([0.0, 0.5, 1.0, 2.0, 4.0], size=360)
    pq.write_table(pq.read_table(data).append_column("w", pa.array(weights)), data)
    args = overrides(data, tmp / "run")
    served = tmp / "served"
    ranks = run_ranks(_job, 2, str(config), args, str(served), timeout=600)
    return {"cfg": load_config(config, args), "ranks": ranks, "served": served, "data": data}


def _oracle(cfg, initial: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The unsharded model from the same initial weights, plain SGD on the global batches."""
    from mlet_dist.data import load_splits
    from mlet_dist.models import build_dlrm
    from mlet_dist.schema import schema_of

    model = build_dlrm(cfg.model, schema_of(cfg.data), embedding_device=torch.device("cpu"))
    model.load_state_dict(initial)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    splits = load_splits(cfg.data)
    half = BATCH // 2
    losses = []
    for step in range(STEPS):  # no shuffling: global batch s is rows s*B .. (s+1)*B
        batch = splits.train.slice(step * BATCH, (step + 1) * BATCH).to_batch()
        loss, (_, logits, labels, w) = model(batch)
        per_row = torch.nn.functional.binary_cross_entropy_with_logits(
            logits.double(), labels.double(), reduction="none"
        )
        losses.append([float((w * per_row)[r * half : (r + 1) * half].mean()) for r in (0, 1)])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        model.eval()
        held = splits.eval
        logits = model(held.to_batch())[1][1]
    y, w = torch.from_numpy(held.labels), torch.from_numpy(held.weights).double()
    # the weight of the heaviest (positive, negative) pair, as a fraction of all pairs' weight
    one_pair = float(w.max() ** 2 / ((w * y).sum() * (w * (1 - y)).sum()))
    return {
        "losses": losses,
        "eval": binary_metrics(logits, y, w),
        "one_pair": one_pair,
        "model": model,
    }


def test_two_rank_weighted_training_equals_the_unsharded_model(runs):
    ranks = runs["ranks"]
    assert ranks[0]["pipelined"] > 0  # the weighted batches went through TorchRec's pipeline
    for key, value in ranks[0]["initial"].items():
        assert torch.equal(value, ranks[1]["initial"][key]), key
    want = _oracle(runs["cfg"], ranks[0]["initial"])
    for rank, r in enumerate(ranks):
        got = [r["curve"][s + 1] for s in range(STEPS)]
        np.testing.assert_allclose(
            got, [w[rank] for w in want["losses"]], rtol=1e-5, err_msg=f"rank {rank}"
        )
    metrics = ranks[0]["eval"]
    assert metrics["rows"] == 90 and "weight_sum" in metrics
    assert sum(b["rows"] for b in metrics["buckets"].values()) == 90
    assert sum(b["weight_sum"] for b in metrics["buckets"].values()) == pytest.approx(
        metrics["weight_sum"]
    )
    for key in ("log_loss", "ne", "positive_rate", "mean_prediction", "weight_sum"):
        assert metrics[key] == pytest.approx(want["eval"][key], rel=1e-5), key
    # AUC: two rows whose logits differ by float32 rounding only (the sharded and unsharded sums
    # run in another order) may swap, which moves the AUC by at most one pair's weight
    assert metrics["auc"] == pytest.approx(want["eval"]["auc"], abs=want["one_pair"] + 1e-9)


def test_recmetrics_are_weighted_over_two_ranks(runs):
    r = runs["ranks"][0]
    got, ref = r["recmetrics"], r["reference"]
    assert got["auc-ctr|window_auc"] == pytest.approx(ref["auc"], abs=1e-6)
    assert got["ne-ctr|lifetime_ne"] == pytest.approx(ref["ne"], rel=1e-5)
    assert got["calibration-ctr|lifetime_calibration"] == pytest.approx(
        ref["calibration"], rel=1e-5
    )


def test_collapse_and_predict_ignore_the_weight_column(runs, tmp_path):
    from mlet_dist.checkpoint import latest_checkpoint
    from mlet_dist.data import load_splits
    from mlet_dist.export import load_unsharded
    from mlet_dist.predict_job import predict_file
    from mlet_dist.serving.manifest import read_manifest
    from mlet_dist.workflow import check_collapsed

    cfg, served = runs["cfg"], runs["served"]
    assert read_manifest(served)["serving"]["schema"]["weight"] == "w"
    held = load_splits(cfg.data).eval
    check = check_collapsed(cfg.train.run_dir, served, held)
    assert check["passed"], check
    # the collapsed model's weighted AUC is the run's weighted eval AUC
    assert check["collapsed_auc"] == pytest.approx(runs["ranks"][0]["eval"]["auc"], abs=1e-3)
    # predict reads inputs without the weight column (it is no model input)
    inputs = tmp_path / "no_weight.parquet"
    pq.write_table(pq.read_table(runs["data"]).drop_columns(["w"]), inputs)
    out = tmp_path / "p.txt"
    predict_file(served, [inputs], out)
    model = load_unsharded(cfg, latest_checkpoint(cfg.train.run_dir)).eval()
    all_rows = load_splits(cfg.data)
    with torch.no_grad():
        logits = torch.cat([model(s.to_batch())[1][1] for s in (all_rows.train, all_rows.eval)])
    np.testing.assert_allclose(
        np.loadtxt(out, dtype=np.float32), torch.sigmoid(logits).numpy(), atol=1e-5
    )
