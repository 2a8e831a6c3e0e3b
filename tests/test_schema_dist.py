"""A made-up schema end to end on 2 gloo ranks: hand-written Parquet (2 dense, 3 sparse: one
multi-hot, two sharing a mean-pooled table, string ids) -> train -> collapse -> predict.

Oracles: the metrics the 2 sharded ranks computed equal those of the same checkpoint loaded
unsharded on one process; the collapsed model's logits equal the trained model's
(:func:`mlet_dist.workflow.check_collapsed`, run by the job); ``mlet-dist predict`` on the Parquet
file gives the unsharded trained model's probabilities, row by row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from dist_utils import run_ranks
from test_schema import write_config, write_rows

from mlet_dist.config import load_config

pytestmark = pytest.mark.slow


def overrides(data: Path, run_dir: Path, sharding: str) -> list[str]:
    return [
        f"--data.train_files=['{data}']",
        "--data.eval_fraction=0.25",
        "--data.batch_size=32",
        "--data.eval_batch_size=64",
        "--model.embedding_dim=8",
        "--model.inner_dim=32",
        "--model.inner_dim_per_table={words = 16}",
        "--model.dense_arch_layer_sizes=[16, 8]",
        "--model.over_arch_layer_sizes=[16, 1]",
        "--optim.w1_lr_scaling=none",
        f"--dist.sharding_types=['{sharding}']",
        "--train.max_steps=12",
        "--train.progress=false",
        f"--train.run_dir={run_dir}",
    ]


def _job(config: str, args: list[str]) -> dict[str, Any]:
    from mlet_dist.workflow import run_end_to_end

    return run_end_to_end(load_config(config, args), resume=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("schema_dist")
    config = write_config(tmp)
    data = write_rows(tmp / "rows.parquet", n_copies=60, seed=5)  # 360 rows, random labels
    args = overrides(data, tmp / "run", "row_wise")
    summaries = run_ranks(_job, 2, str(config), args, timeout=420)
    return {"cfg": load_config(config, args), "summaries": summaries, "data": data, "tmp": tmp}


def _unsharded_logits(cfg, rows) -> torch.Tensor:
    from mlet_dist.checkpoint import latest_checkpoint
    from mlet_dist.data import make_batches
    from mlet_dist.export import load_unsharded

    model = load_unsharded(cfg, latest_checkpoint(cfg.train.run_dir)).eval()
    with torch.no_grad():
        return torch.cat([model(b)[1][1] for b in make_batches(rows, 50, shuffle=False, seed=0)])


def test_two_rank_metrics_equal_the_unsharded_model(trained):
    import json

    from mlet_dist.data import load_splits
    from mlet_dist.metrics import binary_metrics

    cfg = trained["cfg"]
    metrics = json.loads((Path(cfg.train.run_dir) / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    rows = load_splits(cfg.data).eval
    assert metrics["eval"]["rows"] == len(rows) == 90
    want = binary_metrics(_unsharded_logits(cfg, rows), torch.from_numpy(rows.labels))
    assert metrics["eval"]["auc"] == pytest.approx(want["auc"], abs=1e-6)
    assert metrics["eval"]["log_loss"] == pytest.approx(want["log_loss"], abs=1e-5)
    assert set(metrics["eval"]["buckets"]) and sum(
        b["rows"] for b in metrics["eval"]["buckets"].values()
    ) == len(rows)


def test_collapse_is_exact_and_predict_reads_the_training_inputs(trained, tmp_path):
    from mlet_dist.data.sources import read_data_file
    from mlet_dist.predict_job import predict_file
    from mlet_dist.serving.manifest import read_manifest

    summary = trained["summaries"][0]
    assert summary["collapse_check"]["passed"], summary["collapse_check"]
    assert summary["collapse_check"]["max_abs_logit_diff"] <= 1e-5
    assert summary["serving_check"]["passed"], summary["serving_check"]
    served = Path(summary["served_dir"])
    manifest = read_manifest(served)
    assert manifest["serving"]["schema"]["tables"][1]["features"] == ["tags", "query"]
    assert manifest["serving"]["feature_order"] == ["user", "tags", "query"]
    assert manifest["serving"]["dense_features"] == 2

    cfg = trained["cfg"]
    out = tmp_path / "p.txt"
    result = predict_file(served, [trained["data"]], out)
    got = np.loadtxt(out, dtype=np.float32)
    rows = read_data_file(cfg.data, trained["data"])
    want = torch.sigmoid(_unsharded_logits(cfg, rows)).numpy()
    assert result["rows"] == len(rows) == 360
    np.testing.assert_allclose(got, want, atol=1e-5)
