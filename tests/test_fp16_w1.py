"""fp16 W1 (``model.w1_dtype = 'fp16'``) on one process: storage, planner bytes, collapse, checkpoints.

Oracles: the tables' storage read back from the built and the sharded model; the planner report's
bytes against hand arithmetic and against the sharded model's own local tensors (W1 shards and
the fused optimizer's state); the collapse against float64(W1_fp16) @ float64(W2) computed here;
a resumed run against an uninterrupted one, bit for bit. The world-size-2 collapse of fp16 shards
is in tests/test_collapse_dist.py.
"""

from __future__ import annotations

import pytest
import torch
from test_train import _splits, random_arrays, tiny_config
from torchrec.modules.embedding_configs import DataType

from mlet_dist.checkpoint import CheckpointError, latest_checkpoint, model_config_diff
from mlet_dist.config import Config, ConfigError, load_config
from mlet_dist.distributed.parallelize import init_distributed
from mlet_dist.distributed.planning import PlannerStats, format_report, make_plan, plan_report
from mlet_dist.export import (
    SERVED_TABLE_KEY,
    CollapseOptions,
    collapse_run,
    load_served,
    load_unsharded,
)
from mlet_dist.export.load import served_config
from mlet_dist.models import W1_PREFIX, W2_PREFIX, build_dlrm, build_tables
from mlet_dist.modules import collapse
from mlet_dist.train import Trainer, train

MIXED_K = ["--model.inner_dim=32", "--model.inner_dim_per_table={t_cat_1 = 0}"]  # one plain table


def test_default_is_fp32_and_bad_values_name_the_key():
    assert Config().model.w1_dtype == "fp32"
    with pytest.raises(ConfigError, match=r"model\.w1_dtype = 'bf16' is not one of 'fp32', 'fp16'"):
        load_config(None, ["--model.w1_dtype=bf16"])


def test_only_w1_is_fp16(tmp_path):
    cfg = tiny_config(tmp_path, "--model.w1_dtype=fp16", *MIXED_K)
    sizes = cfg.data.num_embeddings_per_feature
    tables = build_tables(cfg.model, sizes)
    # Every trained table, the single-layer one (k = 0) included, is fp16.
    assert {t.data_type for t in tables} == {DataType.FP16}
    assert tables[1].inner_dim is None
    model = build_dlrm(cfg.model, sizes, embedding_device=torch.device("cpu"))
    state = model.state_dict()
    mlet = model.model.sparse_arch.embedding_bag_collection
    for t in tables:
        assert state[W1_PREFIX + t.name + ".weight"].dtype == torch.float16
    assert all(v.dtype == torch.float32 for k, v in state.items() if not k.startswith(W1_PREFIX))
    assert any(k.startswith(W2_PREFIX) for k in state)
    # The served (collapsed) configs stay fp32, and so does the served model's config.
    assert {t.data_type for t in mlet.embedding_bag_configs()} == {DataType.FP32}
    assert served_config(cfg).model.w1_dtype == "fp32"
    assert cfg.model.w1_dtype == "fp16"  # served_config copies, never edits


def test_single_process_collapse_equals_float64_product(tmp_path):
    cfg = tiny_config(tmp_path, "--model.w1_dtype=fp16", *MIXED_K)
    torch.manual_seed(0)
    model = build_dlrm(cfg.model, cfg.data.num_embeddings_per_feature, torch.device("cpu"))
    mlet = model.model.sparse_arch.embedding_bag_collection
    mlet.reset_parameters()
    ebc = collapse(mlet, chunk_rows=7)
    for t in mlet.mlet_configs():
        w1 = mlet.w1.embedding_bags[t.name].weight
        got = ebc.embedding_bags[t.name].weight
        assert w1.dtype == torch.float16 and got.dtype == torch.float32
        if t.inner_dim:
            ref = w1.double() @ mlet.projection.weights[t.name].detach().double()
            assert (got.double() - ref).abs().max().item() <= 2e-6 * max(1.0, ref.abs().max())
        else:
            assert torch.equal(got, w1.float())  # fp16 -> fp32 is exact


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adagrad", "sgd"])
def test_plan_bytes_are_half_and_match_the_sharded_model(tmp_path, optimizer):
    """fp16 halves the W1 bytes, not the (fp32) fused optimizer state; the report's numbers for
    one CPU rank equal the bytes of the sharded model's own W1 shards and optimizer state."""
    opts = [f"--optim.embedding_optimizer={optimizer}", *MIXED_K]
    reports = {}
    for dtype in ("fp32", "fp16"):
        cfg = tiny_config(tmp_path / dtype, f"--model.w1_dtype={dtype}", *opts)
        stats = PlannerStats()
        plan = make_plan(cfg, 1, "cpu", stats=stats)
        reports[dtype] = plan_report(cfg, plan, 1, "cpu", stats=stats)
    sizes = tiny_config(tmp_path).data.num_embeddings_per_feature
    widths = [0 if i == 1 else 32 for i in range(26)]
    elements = sum(v * (w or 8) for v, w in zip(sizes, widths))
    half, full = reports["fp16"]["totals"], reports["fp32"]["totals"]
    assert full["w1_bytes"] == 4 * elements and half["w1_bytes"] == 2 * elements
    assert half["w1_optimizer_bytes"] == full["w1_optimizer_bytes"]
    state_per = {"rowwise_adagrad": None, "adagrad": 4, "sgd": 0}[optimizer]
    expected_opt = sum(sizes) * 4 if state_per is None else state_per * elements
    assert half["w1_optimizer_bytes"] == expected_opt
    assert reports["fp16"]["model"]["w1_dtype"] == "fp16"
    assert "W1 fp16" in format_report(reports["fp16"])
    # TorchRec's own estimate (its formula, with IO buffers) reads the tables' data_type too.
    assert half["planner_max_rank_bytes"] < full["planner_max_rank_bytes"]

    # The sharded model (one CPU rank, the same config) holds exactly these bytes.
    cfg = tiny_config(tmp_path / "fp16", "--model.w1_dtype=fp16", *opts)
    trainer = Trainer(cfg, init_distributed(cfg.dist))
    w1 = sum(
        s.tensor.numel() * s.tensor.element_size()
        for k, v in trainer.model.state_dict().items()
        if k.startswith(W1_PREFIX)
        for s in v.local_shards()
    )
    fused = trainer.model.fused_optimizer.state_dict()["state"]
    opt = sum(
        s.tensor.numel() * s.tensor.element_size()
        for per_param in fused.values()
        for v in per_param.values()
        if hasattr(v, "local_shards")
        for s in v.local_shards()
    )
    dtypes = {
        s.tensor.dtype
        for per_param in fused.values()
        for v in per_param.values()
        if hasattr(v, "local_shards")
        for s in v.local_shards()
    }
    assert w1 == half["w1_bytes"]
    assert opt == half["w1_optimizer_bytes"]
    assert dtypes <= {torch.float32}  # fbgemm keeps the optimizer state in fp32


def test_fp16_run_resumes_bit_identically_and_collapses_exactly(tmp_path, monkeypatch):
    rows = random_arrays(512, seed=11)
    monkeypatch.setattr("mlet_dist.train.run.load_splits", lambda *_: _splits(rows))
    common = ["--model.w1_dtype=fp16", "--data.batch_size=32", "--train.log_every=1", *MIXED_K]
    full = tiny_config(tmp_path / "a", *common, "--train.max_steps=12")
    m_full = train(full)
    part = tiny_config(tmp_path / "b", *common, "--train.max_steps=5")
    train(part)
    resumed = tiny_config(tmp_path / "b", *common, "--train.max_steps=12")
    m_resumed = train(resumed)
    assert m_resumed["train"]["steps_this_run"] == 7
    full_curve = dict(map(tuple, m_full["train"]["loss_curve"]))
    for step, loss in m_resumed["train"]["loss_curve"]:
        assert loss == full_curve[step], step
    a = load_unsharded(full, latest_checkpoint(full.train.run_dir)).state_dict()
    b = load_unsharded(resumed, latest_checkpoint(resumed.train.run_dir)).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert a[W1_PREFIX + "t_cat_0.weight"].dtype == torch.float16

    # An fp32 W1 cannot resume from the fp16 checkpoint: refused, naming the key.
    as_fp32 = tiny_config(tmp_path / "b", *common[1:], "--train.max_steps=14")
    with pytest.raises(CheckpointError, match=r"model\.w1_dtype: checkpoint 'fp16' != config"):
        train(as_fp32)

    # The served table is float64(W1_fp16) @ float64(W2) in fp32; the plain table W1 exactly.
    served_dir = tmp_path / "served"
    collapse_run(full.train.run_dir, served_dir, CollapseOptions(chunk_rows=16))
    served, served_cfg = load_served(served_dir)
    assert served_cfg.model.w1_dtype == "fp32"
    got = served.state_dict()
    for i in range(26):
        name = f"t_cat_{i}"
        table = got[SERVED_TABLE_KEY.format(name)]
        assert table.dtype == torch.float32
        w1 = a[W1_PREFIX + name + ".weight"].double()
        if i == 1:
            assert torch.equal(table, w1.float())
        else:
            ref = w1 @ a[W2_PREFIX + name].double()
            assert (table.double() - ref).abs().max().item() <= 2e-6 * max(1.0, ref.abs().max())


def test_checkpoints_from_before_the_key_count_as_fp32():
    saved = Config().to_dict()
    del saved["model"]["w1_dtype"]
    current = Config().to_dict()
    assert model_config_diff(saved, current) == []
    current["model"]["w1_dtype"] = "fp16"
    assert model_config_diff(saved, current) == [
        "model.w1_dtype: checkpoint 'fp32' != config 'fp16'"
    ]


def test_quick_quality_study_pairs_runs_by_seed(tmp_path):
    """`python -m benchmarks.fp16_w1_quality --quick`: both dtypes per seed, the differences
    recomputed from the runs it reports, W1 bytes halved, every collapse checked."""
    from benchmarks.fp16_w1_quality import main

    record = main(
        ["--quick", "--data", "synthetic", "--seeds", "2", "--out", str(tmp_path),
         "--work", str(tmp_path / "work"), f"--data.dir={tmp_path / 'synthetic'}"]
    )  # fmt: skip
    (ds,) = record["datasets"]
    assert [r["seed"] for r in ds["runs"]["fp32"]] == [r["seed"] for r in ds["runs"]["fp16"]]
    diffs = [b["auc"] - a["auc"] for a, b in zip(ds["runs"]["fp32"], ds["runs"]["fp16"])]
    assert ds["auc_diff_fp16_minus_fp32"]["per_seed"] == diffs
    assert ds["auc_diff_fp16_minus_fp32"]["mean"] == pytest.approx(sum(diffs) / 2)
    assert ds["w1_bytes"]["fp16"] * 2 == ds["w1_bytes"]["fp32"]
    assert ds["all_collapse_passed"]
    assert all(r["split"] == "test" for d in ("fp32", "fp16") for r in ds["runs"][d])
    # the two dtypes really trained differently (fp16 rounding changes the AUC at some digit)
    assert any(d != 0 for d in diffs)
    (md,) = tmp_path.glob("fp16-w1-quality-quick_*.md")
    assert "| synthetic | test (300) | 2 |" in md.read_text()
