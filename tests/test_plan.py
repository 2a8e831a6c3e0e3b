"""Oracle tests of the dry-run planner (`mlet-dist plan`).

Expected numbers are computed here from the config and from the ShardingPlan's shard metadata,
independently of the report's own accounting.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import pytest

from mlet_dist.cli import main
from mlet_dist.config import ConfigError, load_config
from mlet_dist.distributed.planning import (
    PlannerStats,
    PlanningError,
    dry_run,
    format_report,
    make_plan,
    plan_report,
)

REPO = Path(__file__).resolve().parents[1]
SMALL = REPO / "configs/synthetic_small.toml"
CRITEO = REPO / "configs/criteo_1tb.toml"


def shards_of(plan) -> dict[str, list[tuple[int, list[int], list[int]]]]:
    """table -> [(rank, offsets, sizes)] straight from the ShardingPlan."""
    out = {}
    for module_plan in plan.plan.values():
        for name, ps in module_plan.items():
            out[name] = [
                (s.placement.rank(), list(s.shard_offsets), list(s.shard_sizes))
                for s in ps.sharding_spec.shards
            ]
    return out


def assert_exact_cover(shards, rows: int, cols: int) -> None:
    """The shard rectangles tile [0, rows) x [0, cols): equal total area and no overlap."""
    boxes = [(o, s) for _, o, s in shards if s[0] * s[1] > 0]
    for o, s in boxes:
        assert 0 <= o[0] and o[0] + s[0] <= rows and 0 <= o[1] and o[1] + s[1] <= cols
    assert sum(s[0] * s[1] for _, s in boxes) == rows * cols
    for (oa, sa), (ob, sb) in itertools.combinations(boxes, 2):
        disjoint = (
            oa[0] + sa[0] <= ob[0]
            or ob[0] + sb[0] <= oa[0]
            or oa[1] + sa[1] <= ob[1]
            or ob[1] + sb[1] <= oa[1]
        )
        assert disjoint, (oa, sa, ob, sb)


def test_memory_oracles_small_cuda_plan():
    cfg = load_config(SMALL)
    sizes = cfg.data.num_embeddings_per_feature
    k, d = cfg.model.inner_dim, cfg.model.embedding_dim
    stats = PlannerStats()
    plan = make_plan(cfg, 4, "cuda", stats=stats)
    report = plan_report(cfg, plan, 4, "cuda", stats=stats)
    shards = shards_of(plan)
    assert len(report["tables"]) == len(sizes) == len(shards)

    # Per rank: W1 = sum of the rank's shard areas x 4 B; row-wise Adagrad = 4 B per shard row.
    for r in report["ranks"]:
        mine = [s for ss in shards.values() for rank, _, s in ss if rank == r["rank"]]
        assert r["w1_bytes"] == sum(rows * cols * 4 for rows, cols in mine)
        assert r["w1_optimizer_bytes"] == sum(rows * 4 for rows, _ in mine)
        # W2 (26 tables of k x d) + its gradient + Adagrad state, replicated on every rank.
        assert r["w2_bytes"] == r["w2_grad_bytes"] == r["w2_optimizer_bytes"] == 26 * k * d * 4
        assert r["training_bytes"] == r["w1_bytes"] + r["w1_optimizer_bytes"] + sum(
            r[f"{p}{s}"]
            for p in ("w2", "mlp")
            for s in ("_bytes", "_grad_bytes", "_optimizer_bytes")
        )
        # The planner's own estimate (W1 + IO buffers, no fused optimizer state) is not smaller.
        assert r["planner_hbm_bytes"] >= r["w1_bytes"]

    tot = report["totals"]
    assert tot["w1_bytes"] == sum(v * k * 4 for v in sizes)
    # One accumulator per row of every shard (column pieces each keep their own).
    assert tot["w1_optimizer_bytes"] == sum(s[0] * 4 for ss in shards.values() for _, _, s in ss)
    assert tot["served_bytes"] == sum(v * d * 4 for v in sizes)
    assert tot["max_rank_training_bytes"] == max(r["training_bytes"] for r in report["ranks"])
    assert tot["device_cap_bytes"] == 32 * 1024**3  # TorchRec's default HBM cap
    assert tot["fits"] is True
    assert tot["tables_training_over_serving"] == pytest.approx(
        (sum(v * k * 4 for v in sizes) + tot["w1_optimizer_bytes"]) / sum(v * d * 4 for v in sizes)
    )
    text = format_report(report)
    assert "t_cat_0" in text and "fits" in text


@pytest.mark.parametrize(
    "sharding_type",
    ["table_wise", "row_wise", "column_wise", "table_row_wise", "table_column_wise", "grid_shard"],
)
def test_shards_cover_each_table_exactly_once(sharding_type):
    cfg = load_config(
        SMALL, [f"--dist.sharding_types=['{sharding_type}']", "--dist.min_partition=16"]
    )
    ws = 4
    plan = make_plan(cfg, ws, "cuda", local_world_size=2)
    report = plan_report(cfg, plan, ws, "cuda", local_world_size=2)
    shards = shards_of(plan)
    k, d = cfg.model.inner_dim, cfg.model.embedding_dim
    split = False
    for t in report["tables"]:
        assert t["sharding_type"] == sharding_type
        assert all(0 <= rank < ws for rank, _, _ in shards[t["name"]])
        assert_exact_cover(shards[t["name"]], t["num_embeddings"], k)
        # The served table, sharded like W1 (columns scaled by d/k), also adds up exactly.
        assert t["served_bytes"] == t["num_embeddings"] * d * 4
        split |= len(shards[t["name"]]) > 1
    if sharding_type in ("row_wise", "table_row_wise", "grid_shard"):
        assert all(len(shards[t["name"]]) > 1 for t in report["tables"])
    if sharding_type in ("row_wise", "table_row_wise"):
        for t in report["tables"]:  # one full-width row block per rank
            ranks = [rank for rank, _, _ in shards[t["name"]]]
            assert len(set(ranks)) == len(ranks)
            assert all(s[1] == k for _, _, s in shards[t["name"]])
    if sharding_type == "column_wise":
        assert split  # min_partition = 16 < k = 64 lets column_wise split


@pytest.mark.parametrize(
    ("optimizer", "expected"),
    [
        ("adagrad", lambda rows, cols: rows * cols * 4),
        ("sgd", lambda rows, cols: 0),
        ("adam", lambda rows, cols: 2 * rows * cols * 4),
    ],
)
def test_fused_optimizer_state(optimizer, expected):
    cfg = load_config(SMALL, [f"--optim.embedding_optimizer={optimizer}"])
    plan = make_plan(cfg, 2, "cuda")
    report = plan_report(cfg, plan, 2, "cuda")
    shards = shards_of(plan)
    for r in report["ranks"]:
        mine = [s for ss in shards.values() for rank, _, s in ss if rank == r["rank"]]
        assert r["w1_optimizer_bytes"] == sum(expected(rows, cols) for rows, cols in mine)


def test_adam_is_refused_on_cpu_like_training():
    cfg = load_config(SMALL, ["--optim.embedding_optimizer=adam"])
    with pytest.raises(ConfigError, match="adam"):
        make_plan(cfg, 2, "cpu")


def test_baseline_single_layer_and_cpu():
    cfg = load_config(
        SMALL,
        [
            "--model.inner_dim=0",
            "--model.embedding_dim=32",
            "--model.dense_arch_layer_sizes=[64, 32]",
        ],
    )
    sizes = cfg.data.num_embeddings_per_feature
    report = dry_run(cfg, 2, "cpu")
    assert report["target"]["memory_kind"] == "ddr"
    tot = report["totals"]
    assert tot["w1_bytes"] == tot["served_bytes"] == sum(v * 32 * 4 for v in sizes)
    assert all(r["w2_bytes"] == 0 for r in report["ranks"])  # no projection without MLET
    assert all(t["inner_dim"] is None for t in report["tables"])


def test_too_small_cap_gives_clear_error():
    # 4 tables of 1M x 64 (256 MB of W1 each) on 2 GPUs of 0.25 GB.
    cfg = load_config(
        SMALL,
        [
            "--data.num_embeddings_per_feature=[1000000, 1000000, 1000000, 1000000]",
            "--dist.hbm_cap_gb=0.25",
        ],
    )
    with pytest.raises(PlanningError) as e:
        make_plan(cfg, 2, "cuda", batch_size_per_rank=64)
    msg = str(e.value)
    need_gib = 4 * (1_000_000 * 64 * 4 + 1_000_000 * 4) / 1024**3
    assert "t_cat_0" in msg and "t_cat_3" in msg
    assert f"{need_gib:.2f} GiB" in msg  # what the tables need
    assert "0.25 GiB of HBM" in msg and "Available for tables" in msg
    assert "--world-size" in msg and "--hbm-gb" in msg  # the fixes, checked with the planner
    # The suggested number of ranks really plans.
    n = int(msg.split("ranks (--world-size ")[1].split(")")[0])
    make_plan(cfg, n, "cuda", local_world_size=2, batch_size_per_rank=64)


def test_invalid_targets():
    cfg = load_config(SMALL)
    with pytest.raises(ConfigError, match="local-world-size"):
        make_plan(cfg, 6, "cuda", local_world_size=4)
    with pytest.raises(ConfigError, match="not divisible"):
        make_plan(cfg, 3, "cuda")


def test_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = main(
        [
            "plan",
            "--config",
            str(SMALL),
            "--world-size",
            "4",
            "--device",
            "cuda",
            "--hbm-gb",
            "2",
            "--out",
            str(out),
            "--model.inner_dim=32",
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    sizes = load_config(SMALL).data.num_embeddings_per_feature
    assert report["target"] == {
        "world_size": 4,
        "device": "cuda",
        "local_world_size": 4,
        "batch_size_per_rank": 64,
        "memory_kind": "hbm",
    }
    assert report["totals"]["device_cap_bytes"] == 2 * 1024**3
    assert sum(r["w1_bytes"] for r in report["ranks"]) == sum(v * 32 * 4 for v in sizes)
    assert "Max training memory per rank" in capsys.readouterr().out

    default_out = tmp_path / "run" / "plan.json"
    rc = main(
        [
            "plan",
            "--config",
            str(SMALL),
            "--world-size",
            "1",
            "--device",
            "cpu",
            f"--train.run_dir={tmp_path / 'run'}",
        ]
    )
    assert rc == 0 and json.loads(default_out.read_text())["target"]["device"] == "cpu"


def test_cli_error_exit_code(tmp_path, capsys):
    rc = main(
        [
            "plan",
            "--config",
            str(SMALL),
            "--world-size",
            "2",
            "--device",
            "cuda",
            "--hbm-gb",
            "0.25",
            "--batch-size",
            "64",
            "--out",
            str(tmp_path / "p.json"),
            "--data.num_embeddings_per_feature=[1000000, 1000000, 1000000, 1000000]",
        ]
    )
    assert rc == 1
    assert "no sharding plan fits" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_criteo_1tb_16_gpus_in_seconds():
    cfg = load_config(CRITEO, ["--dist.hbm_cap_gb=80"])
    start = time.perf_counter()
    report = dry_run(cfg, 16, "cuda")
    elapsed = time.perf_counter() - start
    sizes = cfg.data.num_embeddings_per_feature
    tot = report["totals"]
    assert tot["w1_bytes"] == sum(v * 128 * 4 for v in sizes)
    assert tot["served_bytes"] == sum(v * 16 * 4 for v in sizes)
    assert tot["fits"] and tot["max_rank_training_bytes"] < 80 * 1024**3
    assert report["target"]["local_world_size"] == 8
    assert elapsed < 20, elapsed
