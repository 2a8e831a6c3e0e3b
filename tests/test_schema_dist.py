"""A made-up schema end to end on 2 gloo ranks: hand-written Parquet (2 dense, 3 sparse: one
multi-hot, two sharing a mean-pooled table, string ids) -> train -> collapse -> predict, from the
rows in memory (row-wise sharded) and from preprocessed shards streamed to the ranks.

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
    assert metrics["eval"]["log_loss"] == pytest.approx(want["log_loss"], abs=1e-6)
    # AUC: two rows whose logits differ by float32 rounding only (the sharded and unsharded sums
    # run in another order) may swap, which moves the AUC by 1 / (positives * negatives)
    pos = int(rows.labels.sum())
    one_pair = 1.0 / (pos * (len(rows) - pos))
    assert metrics["eval"]["auc"] == pytest.approx(want["auc"], abs=one_pair + 1e-9)
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


# -- preprocess -> streamed training on 2 ranks -> collapse -> predict ----------------------------


def _stream_job(config: str, args: list[str], served: str) -> dict[str, Any]:
    from mlet_dist.config import DistConfig
    from mlet_dist.distributed.parallelize import init_distributed
    from mlet_dist.export import CollapseOptions, collapse_run
    from mlet_dist.train import train

    init_distributed(DistConfig(device="cpu"))
    cfg = load_config(config, args)
    metrics = train(cfg)
    collapse_run(cfg.train.run_dir, served, CollapseOptions(quantize="fp32"))
    return metrics


def test_preprocess_stream_two_ranks_collapse_predict(tmp_path):
    from mlet_dist.data.preprocess import preprocess_from_config
    from mlet_dist.data.schema_shards import SchemaCodec
    from mlet_dist.data.sources import build_batch_source, read_data_file
    from mlet_dist.predict_job import predict_file
    from mlet_dist.schema import schema_of
    from mlet_dist.workflow import check_collapsed

    config = write_config(tmp_path)
    data = write_rows(tmp_path / "rows.parquet", n_copies=60, seed=7)
    shards = tmp_path / "shards"
    args = [
        *overrides(data, tmp_path / "run", "table_wise")[:-4],
        "--data.frequency_threshold=2",
        "--data.row_group_rows=40",
        "--data.shuffle_buffer_rows=64",
        "--train.max_steps=12",
        "--train.progress=false",
        f"--train.run_dir={tmp_path / 'run'}",
    ]
    summary = preprocess_from_config(load_config(config, args).data, out_dir=shards)
    assert summary["splits"]["train"]["rows"] == 270 and summary["splits"]["eval"]["rows"] == 90
    streamed = [*args, "--data.source=parquet", f"--data.parquet_dir={shards}"]
    cfg = load_config(config, streamed)

    # the shards hold the encoded rows, ids seen < 2 times in the training rows replaced by 0
    raw = read_data_file(load_config(config, args).data, data)
    source = build_batch_source(cfg.data, "eval", rank=0, world_size=1, seed=0)
    batches = list(source.batches(0))  # file order, every row
    schema = schema_of(cfg.data)
    index = {f: j for j, f in enumerate(schema.feature_names)}
    replaced: dict[str, int] = {}
    for t in schema.tables:
        seen: dict[int, int] = {}
        for f in t.features:
            for i in range(270):
                for v in raw.ids[index[f]][i, : raw.lengths[index[f]][i]]:
                    seen[int(v)] = seen.get(int(v), 0) + 1
        for f in t.features:
            got_values = [v for b in batches for v in b.sparse_features[f].values().tolist()]
            got_lengths = [n for b in batches for n in b.sparse_features[f].lengths().tolist()]
            want = [
                int(v) if seen.get(int(v), 0) >= 2 else 0
                for i in range(270, 360)
                for v in raw.ids[index[f]][i, : raw.lengths[index[f]][i]]
            ]
            assert got_values == want
            replaced[f] = sum(v == 0 for v in want)
            assert got_lengths == raw.lengths[index[f]][270:].tolist()
    assert replaced["user"] >= 10 and replaced["query"] >= 5  # rare ids exist (write_rows)
    assert SchemaCodec(schema).columns[:3] == ["label", "price", "score"]

    served = tmp_path / "served"
    metrics = run_ranks(_stream_job, 2, str(config), streamed, str(served), timeout=420)
    assert metrics[0]["eval"]["rows"] == 90
    eval_table = shards / "eval" / "part-00000.parquet"
    import pyarrow.parquet as pq

    from mlet_dist.data.schema_shards import table_to_rows

    held_out = table_to_rows(pq.read_table(eval_table), schema)
    check = check_collapsed(cfg.train.run_dir, served, held_out)
    assert check["passed"] and check["rows"] == 90, check
    # predict reads the raw Parquet the shards came from, as training read it
    out = tmp_path / "p.txt"
    predict_file(served, [data], out)
    want = torch.sigmoid(_unsharded_logits(cfg, raw)).numpy()
    np.testing.assert_allclose(np.loadtxt(out, dtype=np.float32), want, atol=1e-5)


# -- evaluate --data and TorchX with a declared schema -----------------------------------------


def test_evaluate_files_of_a_schema_run(trained):
    """`mlet-dist evaluate --data FILE` reads the file through the run's schema: its metrics are
    the unsharded model's on the same rows, and every row lands in one bucket."""
    import json

    from mlet_dist.data.sources import read_data_file
    from mlet_dist.metrics import binary_metrics
    from mlet_dist.workflow import evaluate_run

    cfg = trained["cfg"]
    got = evaluate_run(cfg.train.run_dir, files=[str(trained["data"])])
    rows = read_data_file(cfg.data, trained["data"])
    logits = _unsharded_logits(cfg, rows)
    want = binary_metrics(logits, torch.from_numpy(rows.labels))
    assert got["rows"] == len(rows) == 360
    assert got["log_loss"] == pytest.approx(want["log_loss"], abs=1e-6)
    # AUC is a count of ordered (positive, negative) pairs: a pair whose two logits are within
    # float32 error of each other (rows with the same ids: exact ties unsharded) may order
    # either way in the sharded model, so each such pair may move the AUC by one pair's share.
    labels = torch.from_numpy(rows.labels).bool()
    pos_l, neg_l = logits[labels].double(), logits[~labels].double()
    near = int(((pos_l[:, None] - neg_l[None, :]).abs() <= 1e-5).sum())
    pairs = len(pos_l) * len(neg_l)
    assert got["auc"] == pytest.approx(want["auc"], abs=(near + 1) / pairs + 1e-9)
    assert sum(b["rows"] for b in got["buckets"].values()) == 360
    written = json.loads((Path(cfg.train.run_dir) / "eval_files.json").read_text())
    assert written["log_loss"] == got["log_loss"]


def test_torchx_component_trains_a_schema_config(trained, tmp_path):
    """`torchx run -s local_cwd launch/components.py:train -j 1x2` with the made-up schema's
    config trains the same model as the 2-rank job of the fixture (same config and data): every
    weight of the final checkpoints agrees (to float32 reduction order: the launchers may run
    other thread counts)."""
    import sys

    from test_launch import clean_env, run

    from mlet_dist.checkpoint import latest_checkpoint, read_train_state
    from mlet_dist.export import load_unsharded

    cfg = trained["cfg"]
    run_dir = tmp_path / "torchx_run"
    args = overrides(trained["data"], run_dir, "row_wise")
    proc = run(
        [
            sys.executable, "-m", "torchx.cli.main", "run", "-s", "local_cwd",
            "-cfg", f"log_dir={tmp_path / 'torchx'}",
            "launch/components.py:train", "--config", str(trained["tmp"] / "schema.toml"),
            "-j", "1x2", "--", *args,
        ],
        clean_env(),
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:]
    ckpt = latest_checkpoint(run_dir)
    assert read_train_state(ckpt)["world_size"] == 2
    ours = load_unsharded(load_config(str(trained["tmp"] / "schema.toml"), args), ckpt)
    ref = load_unsharded(cfg, latest_checkpoint(cfg.train.run_dir))
    got, want = ours.state_dict(), ref.state_dict()
    assert got.keys() == want.keys() and any("w1" in k for k in got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4, msg=k)
