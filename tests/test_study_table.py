"""benchmarks/study_table: the cross-sweep table reads each sweep's own numbers (a made-up
report here, every expected cell written by hand)."""

from __future__ import annotations

import json

from benchmarks import study_table


def _report() -> dict:
    point = {"d": 4, "auc": 0.78, "baseline_d": 12.0, "reduction": 3.0, "above_all": False,
             "upper_bound": False, "delta_vs_same_d": 0.015,
             "interval": {"p16": 2.25, "p84": 3.5, "share_above_all_baselines": 0.0}}  # fmt: skip
    above = {**point, "d": 8, "auc": 0.79, "baseline_d": None, "reduction": None,
             "above_all": True, "delta_vs_same_d": 0.02,
             "interval": {"p16": 1.5, "p84": float("inf"), "share_above_all_baselines": 0.6}}  # fmt: skip
    weaker = {**point, "d": 8, "auc": 0.70}  # k = 32 at d = 8: lower AUC, not the one shown
    return {
        "baseline_slope": {"gain": 0.0267, "se": 0.0014, "flat": False},
        "reductions": {"64": [point, above], "32": [weaker]},
        "tuning": [{"seconds": 1800.0}, {"seconds": 1800.0}],
        "variants": [
            {"seeds": 3, "seconds": {"mean": 600.0}},
            {"seeds": 6, "seconds": {"mean": 600.0}},
        ],
    }


def test_cells_by_hand():
    r = _report()
    assert study_table.cell(r, 4) == "3.00× (2.25–3.50×, +0.0150 vs EBC(4); k = 64)"
    assert study_table.cell(r, 8) == "above every EBC (1.50–∞×, +0.0200 vs EBC(8); k = 64)"
    assert study_table.cell(r, 16) == "–"
    assert study_table.slope(r) == "yes: +0.0267 (SE 0.0014)"
    assert study_table.seeds(r) == "3–6"
    assert study_table.compute(r) == "11 runs, 2.5 h"  # 2 tune + 9 frontier; 3600 + 5400 s


def test_flat_baseline_and_cli(tmp_path, capsys):
    r = _report()
    r["baseline_slope"] = {"gain": 0.001, "se": 0.001, "flat": True}
    p = tmp_path / "sweep.json"
    p.write_text(json.dumps(r).replace("Infinity", "null"))
    assert study_table.main([f"toy (1k)={p}", "--dims", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| data set |") and len(out) == 3
    assert out[2].startswith(
        "| toy (1k) | no (flat within 2 SE): +0.0010 (SE 0.0010) | 3–6 | 3.00×"
    )
