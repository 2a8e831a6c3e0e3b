"""The quality study (benchmarks/quality.py): equal-AUC interpolation against hand-computed values,
and its quick mode end to end (output format and internal consistency); the Avazu source."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.quality import (
    DATASETS,
    NUM_TABLES,
    equal_auc_dim,
    grid,
    load_study_config,
    reductions,
)
from mlet_dist.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
AVAZU = REPO.parent / "shared/data/avazu_sample"

CURVE = [(4, 0.70), (8, 0.72), (16, 0.73), (32, 0.735), (64, 0.734)]


@pytest.mark.parametrize(
    "target,expected",
    [
        (0.725, 2**3.5),  # halfway from 0.72 (d=8) to 0.73 (d=16) in log2(d)
        (0.72, 8.0),  # exactly a point
        (0.7345, 2**4.9),  # 90% of the way from 0.73 (d=16) to 0.735 (d=32)
        (0.735, 32.0),  # the best point, not the later dip at d=64
        (0.69, 4.0),  # already reached at the first point
        (0.70, 4.0),
        (0.74, None),  # above every point: not reached
    ],
)
def test_equal_auc_dim_by_hand(target, expected):
    got = equal_auc_dim(CURVE, target)
    assert got == (None if expected is None else pytest.approx(expected, rel=1e-12))
    assert equal_auc_dim(list(reversed(CURVE)), target) == got  # order of the points is irrelevant


def test_equal_auc_dim_uses_the_running_maximum():
    # d=16 dips below d=8: the level 0.72 counts as reached from d=8 on, so 0.725 lies on the
    # segment (16, 0.72) -> (32, 0.73), halfway: 2**4.5.
    curve = [(4, 0.70), (8, 0.72), (16, 0.71), (32, 0.73)]
    assert equal_auc_dim(curve, 0.725) == pytest.approx(2**4.5)
    assert equal_auc_dim(curve, 0.715) == pytest.approx(2**2.75)  # between d=4 and d=8
    assert equal_auc_dim([], 0.5) is None


def test_reductions_by_hand():
    baseline = [(4, 0.70), (8, 0.72), (16, 0.73), (32, 0.74), (64, 0.74)]
    mlet = {
        64: [(4, 0.725), (8, 0.745), (16, 0.75)],
        128: [(4, 0.70), (8, 0.71), (16, 0.72)],
    }
    r = reductions(baseline, mlet)
    # the best baseline is the smallest d with the best AUC
    assert r["best_baseline"] == {"d": 32, "auc": 0.74}
    # k=64 reaches 0.74 at 2**(2 + (0.74 - 0.725) / (0.745 - 0.725)) = 2**2.75 -> 32 / 2**2.75
    m64 = r["match_best"]["64"]
    assert m64["mlet_d"] == pytest.approx(2**2.75)
    assert m64["reduction"] == pytest.approx(32 / 2**2.75)  # 4.757x
    assert not m64["lower_bound"]
    assert r["match_best"]["128"] == {"mlet_d": None, "reduction": None, "lower_bound": False}
    eq = r["equivalent"]
    # MLET(64,4) = 0.725: halfway between EBC(8) and EBC(16) -> d_eq = 2**3.5, 2**3.5 / 4
    assert eq["MLET(64,4)"]["baseline_d"] == pytest.approx(2**3.5)
    assert eq["MLET(64,4)"]["reduction"] == pytest.approx(2**3.5 / 4)
    assert eq["MLET(64,8)"]["above_all_baselines"] and eq["MLET(64,8)"]["reduction"] is None
    # MLET(128,4) = EBC(4): reduction exactly 1, not a bound; MLET(128,8) = 0.71: 2**2.5 / 8
    assert eq["MLET(128,4)"]["reduction"] == 1.0 and not eq["MLET(128,4)"]["upper_bound"]
    assert eq["MLET(128,8)"]["baseline_d"] == pytest.approx(2**2.5)
    # a variant below the baseline's first point: only a bound (d_eq <= 4)
    low = reductions(baseline, {64: [(4, 0.69)]})["equivalent"]["MLET(64,4)"]
    assert low["upper_bound"] and low["reduction"] == 1.0
    # MLET already at the best baseline's AUC at its smallest d: a lower bound on the reduction
    high = reductions(baseline, {64: [(4, 0.75)]})["match_best"]["64"]
    assert high == {"mlet_d": 4.0, "reduction": 8.0, "lower_bound": True}


def test_study_configs_load_and_grid_is_the_issue_grid():
    for name in DATASETS:
        path = REPO / "configs/quality" / f"{name}.toml"
        cfg, study, _ = load_study_config(path)
        names = [v.name for v in grid(study)]
        assert names == [
            *(f"EBC({d})" for d in (4, 8, 16, 32, 64)),
            *(f"MLET({k},{d})" for k in (64, 128) for d in (4, 8, 16)),
        ]
        assert study.seeds >= 3
        assert cfg.data.test_fraction > 0
        _, quick, _ = load_study_config(path, quick=True)
        assert len(grid(quick)) == 2 and quick.seeds == 1
    _, study, _ = load_study_config(
        REPO / "configs/quality/synthetic.toml", ["--study.seeds=5", "--train.epochs=2"]
    )
    assert study.seeds == 5
    with pytest.raises(ValueError, match="study.nope"):
        load_study_config(REPO / "configs/quality/synthetic.toml", ["--study.nope=1"])


def test_quick_study_output_is_consistent(tmp_path):
    """Quick mode on tiny synthetic data (1 seed, EBC(8) and MLET(32,4)): files, format, and the
    aggregates and reductions recomputed from the runs it reports."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.quality", "--quick", "--data", "synthetic",
         "--out", str(tmp_path), "--work", str(tmp_path / "work"),
         f"--data.dir={tmp_path / 'synthetic'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (js,) = tmp_path.glob("*.json")
    record = json.loads(js.read_text())
    assert js.stem == f"quality-quick_{record['hardware_tag']}_{record['date']}"
    for ext in (".md", ".png"):
        assert js.with_suffix(ext).is_file()
    assert js.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert record["quick"] and record["threads"] == 1 and record["world_size"] == 1
    assert {"torch", "torchrec", "fbgemm_gpu"} <= set(record["versions"])

    (ds,) = record["datasets"]
    assert ds["dataset"] == "synthetic" and ds["data"]["rows"] == {
        "train": 2400,
        "eval": 300,
        "test": 300,
    }
    assert [v["variant"] for v in ds["variants"]] == ["EBC(8)", "MLET(32,4)"]
    assert len(ds["runs"]) == 2 and record["all_passed"]
    for v, run in zip(ds["variants"], ds["runs"]):
        assert v["served_bytes_per_row"] == NUM_TABLES * v["d"] * 4
        assert v["seeds"] == 1 and v["passed"]
        test = run["metrics"]["test"]
        # one seed: mean = the run's value, std 0
        assert v["auc"] == {"mean": test["auc"], "std": 0.0, "n": 1}
        assert v["log_loss"]["mean"] == test["log_loss"]
        # the collapsed model's AUC is the trained model's
        check = run["collapse_check"]
        assert check["passed"] and check["rows"] == 300
        assert abs(check["collapsed_auc"] - test["auc"]) <= 1e-6
        # every test row is in exactly one bucket
        assert list(v["buckets"]) == ["<=10", "11-100", "101-1000", ">1000"]
        assert sum(b["rows"] for b in v["buckets"].values()) == 300
        for name, b in v["buckets"].items():
            assert b["rows"] == test["buckets"][name]["rows"]
            if b["rows"] and not math.isnan(test["buckets"][name].get("auc", math.nan)):
                assert b["auc"]["mean"] == test["buckets"][name]["auc"]

    base, mlet = (v["auc"]["mean"] for v in ds["variants"])
    red = ds["reduction"]
    assert red["best_baseline"] == {"d": 8, "auc": base}
    # one baseline point (d=8) and one MLET point (d=4), by hand:
    match = red["match_best"]["32"]
    if mlet >= base:  # reached at MLET's only d: at least 8/4 = 2x
        assert match == {"mlet_d": 4.0, "reduction": 2.0, "lower_bound": True}
    else:
        assert match["mlet_d"] is None and match["reduction"] is None
    eq = red["equivalent"]["MLET(32,4)"]
    if mlet > base:
        assert eq["above_all_baselines"] and eq["reduction"] is None
    else:  # at most EBC(8): d_eq = 8 (a bound unless equal)
        assert eq["baseline_d"] == 8.0 and eq["reduction"] == 2.0
        assert eq["upper_bound"] == (mlet < base)

    md = js.with_suffix(".md").read_text()
    assert "| EBC(8) | 832 | " in md and "| MLET(32,4) | 416 | " in md
    assert f"{base:.4f} ± 0.0000" in md and f"{mlet:.4f} ± 0.0000" in md
    assert "Served-dimension reduction at equal AUC" in md


def test_quick_sweep_writes_one_row_per_point(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.quality", "--sweep", "--quick",
         "--out", str(tmp_path), "--work", str(tmp_path / "work"),
         f"--data.dir={tmp_path / 'synthetic'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (js,) = tmp_path.glob("*.json")
    record = json.loads(js.read_text())
    assert js.stem == f"quality-sweep-quick_{record['hardware_tag']}_{record['date']}"
    # [quick.sweep]: W2 init std 0.05 (MLET), W1 lr 0.05 (MLET and the EBC(8) baseline)
    points = [(p["variant"], p["param"], p["value"]) for p in record["points"]]
    assert points == [
        ("MLET(64,8)", "model.projection_init_std", 0.05),
        ("MLET(64,8)", "optim.embedding_lr", 0.05),
        ("EBC(8)", "optim.embedding_lr", 0.05),
    ]
    assert all(p["passed"] and p["auc"]["n"] == 1 for p in record["points"])
    md = js.with_suffix(".md").read_text()
    assert md.count("| MLET(64,8) |") == 2 and md.count("| EBC(8) |") == 1


@pytest.mark.skipif(not AVAZU.exists(), reason=f"{AVAZU} absent (fresh clone without ../shared)")
def test_avazu_source_reads_both_parts_in_order():
    from mlet_dist.data import CriteoArrays, load_splits
    from mlet_dist.data.avazu import read_avazu_csv

    for name in ("avazu_sample_mlet", "avazu_sample_baseline"):
        cfg = load_config(REPO / "configs" / f"{name}.toml")
        assert cfg.data.source == "avazu"
        cfg.data.train_files = [str(REPO / f) for f in cfg.data.train_files]  # repo-relative
        sizes = cfg.data.num_embeddings_per_feature
        parts = [read_avazu_csv(f, sizes) for f in cfg.data.train_files]
        assert [len(p) for p in parts] == [8999, 1000]
        whole = CriteoArrays.concat(parts)
        splits = load_splits(cfg.data)
        assert (len(splits.train), len(splits.eval), len(splits.test)) == (7999, 1000, 1000)
        got = CriteoArrays.concat([splits.train, splits.eval, splits.test])
        np.testing.assert_array_equal(got.sparse, whole.sparse)
        np.testing.assert_array_equal(got.labels, whole.labels)
        np.testing.assert_array_equal(
            splits.test.sparse, parts[1].sparse
        )  # part2 is the test split


def test_avazu_source_needs_train_files():
    from mlet_dist.data import load_splits

    cfg = load_config(None, ["--data.source=avazu"])
    with pytest.raises(ConfigError, match="Avazu CSV"):
        load_splits(cfg.data)
