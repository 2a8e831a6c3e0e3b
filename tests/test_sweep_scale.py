"""The sweep's study options (issue 24): tuning at several d (``tune_dims``, the frontier at d
taking the winner tuned at the nearest d), ``frontier_k = 'best'`` and extra seeds where the
first seeds disagree (``max_seeds``, ``seed_spread``). The rules are checked by hand on made-up
results, then end to end on a tiny synthetic sweep against the runs' own files (config.json,
metrics.json), recomputed here with plain numpy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mlet_dist.config import ConfigError, load_config
from mlet_dist.sweep import load_sweep, sweep
from mlet_dist.sweep.spec import (
    best_recipes,
    frontier_choice,
    frontier_count,
    frontier_runs,
    more_seeds,
    tune_runs,
)

REPO = Path(__file__).resolve().parents[1]

SPEC = """
dims = [4, 8, 16, 64]
inner_dims = [32, 128]
tune_dims = [4, 32]
seeds = 2
max_seeds = 4
seed_spread = 0.01
frontier_k = "{frontier_k}"

[[baseline]]
name = "rw"
grid = {{ "optim.embedding_lr" = [0.05, 0.1] }}

[[mlet]]
name = "matched"
grid = {{ "optim.embedding_lr" = [0.05, 0.1] }}
"""


def _spec(tmp_path: Path, k_rule: str = "all", **extra):
    p = tmp_path / "s.toml"
    p.write_text(SPEC.format(frontier_k=k_rule))
    return load_sweep(p, extra)


def _result(k: int, d: int, lr: float, auc: float, seed: int = 0) -> dict:
    return {"k": k, "d": d, "recipe": "rw" if k == 0 else "matched",
            "point": {"optim.embedding_lr": lr}, "seed": seed,
            "chosen": {"eval": {"auc": auc}}}  # fmt: skip


def test_tune_runs_cover_every_tune_d_and_the_ks_above_it(tmp_path):
    spec = _spec(tmp_path)
    cfg = load_config(REPO / "configs/synthetic_small.toml", [])
    runs = tune_runs(cfg, spec, tmp_path)
    got = sorted({(r.k, r.d) for r in runs})
    # baseline at d = 4 and 32; MLET(32, .) only where k > d (d = 4), MLET(128, .) at both
    assert got == [(0, 4), (0, 32), (32, 4), (128, 4), (128, 32)]
    assert len(runs) == 5 * 2  # two grid points each, one tune seed
    for r in runs:
        assert r.config["model"]["embedding_dim"] == r.d
        assert r.config["model"]["inner_dim"] == r.k


def test_frontier_takes_the_winner_tuned_at_the_nearest_d(tmp_path):
    spec = _spec(tmp_path)
    # baseline: 0.05 wins at d = 4, 0.1 at d = 32; MLET(128): 0.1 at 4, 0.05 at 32
    results = [
        _result(0, 4, 0.05, 0.70), _result(0, 4, 0.1, 0.69),
        _result(0, 32, 0.05, 0.71), _result(0, 32, 0.1, 0.72),
        _result(32, 4, 0.05, 0.70), _result(32, 4, 0.1, 0.74),
        _result(128, 4, 0.05, 0.72), _result(128, 4, 0.1, 0.73),
        _result(128, 32, 0.05, 0.75), _result(128, 32, 0.1, 0.74),
    ]  # fmt: skip
    best = best_recipes(spec, results)
    assert best[(0, 4)][1] == {"optim.embedding_lr": 0.05}
    assert best[(0, 32)][1] == {"optim.embedding_lr": 0.1}
    # nearest in log2 d: 8 -> 4 (1 octave vs 2), 16 -> 32 (1 vs 2), 64 -> 32
    lr = {(k, d): p["optim.embedding_lr"] for d in spec.dims
          for _, k, _, p in frontier_choice(spec, best, d)}  # fmt: skip
    assert lr == {
        (0, 4): 0.05, (0, 8): 0.05, (0, 16): 0.1, (0, 64): 0.1,
        (32, 4): 0.1, (32, 8): 0.1, (32, 16): 0.1,  # only tuned at d = 4
        (128, 4): 0.1, (128, 8): 0.1, (128, 16): 0.05, (128, 64): 0.05,
    }  # fmt: skip
    cfg = load_config(REPO / "configs/synthetic_small.toml", [])
    runs = frontier_runs(cfg, spec, tmp_path, best)
    assert len(runs) == frontier_count(spec) == 11 * 2
    for r in runs:
        assert r.config["optim"]["embedding_lr"] == lr[(r.k, r.d)]


def test_frontier_k_best_keeps_the_k_with_the_best_tuned_auc(tmp_path):
    spec = _spec(tmp_path, k_rule="best")
    results = [
        _result(0, 4, 0.1, 0.70), _result(0, 32, 0.1, 0.70),
        _result(32, 4, 0.1, 0.74), _result(128, 4, 0.1, 0.73),
        _result(128, 32, 0.1, 0.75),
    ]  # fmt: skip
    best = best_recipes(spec, results)
    ks = {d: sorted(k for _, k, _, _ in frontier_choice(spec, best, d)) for d in spec.dims}
    # d = 4, 8: k = 32 (0.74 at d = 4) beats k = 128 (0.73); d = 16: the nearest tune d of
    # k = 128 is 32 (0.75), of k = 32 it is 4 (0.74); d = 64: only k = 128 is above d
    assert ks == {4: [0, 32], 8: [0, 32], 16: [0, 128], 64: [0, 128]}
    cfg = load_config(REPO / "configs/synthetic_small.toml", [])
    assert len(frontier_runs(cfg, spec, tmp_path, best)) == frontier_count(spec) == 4 * 2 * 2


def test_more_seeds_only_where_the_eval_spread_is_large(tmp_path):
    spec = _spec(tmp_path)  # seeds 2, max_seeds 4, seed_spread 0.01
    results = [
        _result(0, 4, 0.1, 0.700, 0), _result(0, 4, 0.1, 0.705, 1),  # std 0.0035
        _result(0, 8, 0.1, 0.700, 0), _result(0, 8, 0.1, 0.730, 1),  # std 0.0212
        _result(0, 8, 0.1, 0.500, 2),  # an extra seed already run: not part of the decision
    ]  # fmt: skip
    assert more_seeds(spec, results) == {(0, 8): 4}
    assert more_seeds(_spec(tmp_path, max_seeds=0), results) == {}


@pytest.mark.parametrize(
    "extra,match",
    [
        ({"tune_dims": [6]}, "multiples of 4"),
        ({"frontier_k": "some"}, "frontier_k"),
        ({"frontier_k": 1}, "must be a string"),
        ({"max_seeds": 2}, "above seeds"),
        ({"seed_spread": -0.1}, "seed_spread"),
        ({"tune_dims": [4.0]}, "list of integers"),
    ],
)
def test_bad_study_options(tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        _spec(tmp_path, **extra)


TINY = """
dims = [4, 8]
inner_dims = [16, 32]
tune_dims = [4, 8]
seeds = 2
max_seeds = 3
seed_spread = 0.0
frontier_k = "best"

[[baseline]]
name = "rw"
set = { "optim.embedding_optimizer" = "rowwise_adagrad" }

[[mlet]]
name = "matched"
set = { "model.projection_init" = "orthogonal", "optim.w1_lr_scaling" = "sqrt_d_over_k" }
"""


def _runs(stage_dir: Path) -> list[dict]:
    out = []
    for d in sorted(p for p in stage_dir.iterdir() if p.is_dir()):
        cfg = json.loads((d / "config.json").read_text())
        m = json.loads((d / "metrics.json").read_text())
        out.append({"k": cfg["model"]["inner_dim"], "d": cfg["model"]["embedding_dim"],
                    "seed": cfg["train"]["seed"], "eval": m["eval"]["auc"],
                    "test": m["test"]["auc"]})  # fmt: skip
    return out


def test_study_sweep_end_to_end(tmp_path):
    spec_path = tmp_path / "s.toml"
    spec_path.write_text(TINY)
    cfg = load_config(
        REPO / "configs/synthetic_small.toml",
        [f"--data.dir={tmp_path / 'data'}", "--synthetic.days=1", "--synthetic.rows_per_day=2000",
         "--data.eval_fraction=0.2", "--data.test_fraction=0.2", "--data.batch_size=128",
         "--train.log_every=1000"],
    )  # fmt: skip
    work = tmp_path / "work"
    report = sweep(cfg, load_sweep(spec_path), work, jobs=2)
    tune = _runs(work / "tune")
    assert sorted((r["k"], r["d"]) for r in tune) == [(0, 4), (0, 8), (16, 4), (16, 8),
                                                      (32, 4), (32, 8)]  # fmt: skip
    tuned = {(r["k"], r["d"]): r["eval"] for r in tune}
    front = _runs(work / "frontier")
    for d in (4, 8):  # the MLET k of the frontier at d: the better tuned eval AUC at d
        k_best = max((16, 32), key=lambda k: tuned[(k, d)])
        assert {r["k"] for r in front if r["d"] == d} == {0, k_best}
    # seed_spread 0: every variant whose two seeds differ at all gets a third
    groups: dict[tuple[int, int], list[dict]] = {}
    for r in front:
        groups.setdefault((r["k"], r["d"]), []).append(r)
    variants = {(v["k"], v["d"]): v for v in report["variants"]}
    assert set(variants) == set(groups)
    for key, rs in groups.items():
        first = sorted(rs, key=lambda r: r["seed"])[:2]
        spread = first[0]["eval"] != first[1]["eval"]
        assert len(rs) == (3 if spread else 2)
        assert variants[key]["seeds"] == len(rs)
        assert variants[key]["test_auc"]["mean"] == pytest.approx(
            np.mean([r["test"] for r in rs]), abs=1e-12
        )
    md = (work / "sweep.md").read_text()
    assert "tuned at d = 4, 8" in md and "the best tuned k at each d" in md


def test_a_recipe_limited_to_some_k(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text(
        SPEC.format(frontier_k="all")
        + '\n[[mlet]]\nname = "big"\ninner_dims = [128]\nset = { "model.inner_dim_min_rows" = 100 }\n'
    )
    spec = load_sweep(p)
    cfg = load_config(REPO / "configs/synthetic_small.toml", [])
    runs = tune_runs(cfg, spec, tmp_path)
    assert sorted({(r.k, r.d) for r in runs if r.recipe == "big"}) == [(128, 4), (128, 32)]
    assert all(r.config["model"]["inner_dim_min_rows"] == 100 for r in runs if r.recipe == "big")
    assert all(r.config["model"]["inner_dim_min_rows"] == 0 for r in runs if r.recipe != "big")
    p.write_text(p.read_text().replace("inner_dims = [128]", "inner_dims = [96]"))
    with pytest.raises(ConfigError, match="among the sweep's inner_dims"):
        load_sweep(p)
