"""Stage 3 of ``mlet-dist sweep``: aggregation of the runs' results (pure functions of the results,
testable without training), the equal-AUC reduction with its bootstrap interval, Markdown and plot."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from mlet_dist.sweep.spec import SweepSpec, _point_name, best_recipes

BYTES_PER_VALUE = 4  # served tables in float32


# -- the report --------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "n": len(a)}  # fmt: skip


def equal_auc_dim(curve: list[tuple[float, float]], target: float) -> float | None:
    """The smallest d at which a (d, AUC) curve reaches ``target``: the curve's running maximum
    over increasing d, interpolated linearly in log2(d); the first d if it already reaches the
    target; None if no point does.

    Example::

        equal_auc_dim([(4, 0.70), (8, 0.72), (16, 0.73)], 0.725)  # 2 ** 3.5 = 11.31
    """
    points = sorted(curve)
    best, env = -math.inf, []
    for d, auc in points:
        best = max(best, auc)
        env.append((d, best))
    if not env:
        return None
    if env[0][1] >= target:
        return float(env[0][0])
    for (d0, a0), (d1, a1) in itertools.pairwise(env):
        if a1 >= target > a0:
            t = (target - a0) / (a1 - a0)
            return float(2 ** (math.log2(d0) + t * (math.log2(d1) - math.log2(d0))))
    return None


def reduction_at(
    baseline: list[tuple[float, float]], mlet: list[tuple[float, float]]
) -> list[dict[str, Any]]:
    """Per MLET point (d, AUC): the baseline d reaching the same AUC and the ratio d_eq / d.

    ``reduction`` is None when MLET beats every baseline (``above_all``: the ratio is at least
    max baseline d / d); below the baseline's smallest d the ratio is an upper bound.
    """
    out = []
    dmin = min(d for d, _ in baseline)
    amin = next(a for d, a in sorted(baseline))
    for d, auc in sorted(mlet):
        d_eq = equal_auc_dim(baseline, auc)
        out.append({
            "d": d, "auc": auc, "baseline_d": d_eq,
            "reduction": d_eq / d if d_eq is not None else None,
            "above_all": d_eq is None,
            "upper_bound": d_eq is not None and d_eq == dmin and auc < amin,
        })  # fmt: skip
    return out


def bootstrap_reduction(
    base: dict[int, list[float]], mlet: dict[int, list[float]], samples: int = 2000, seed: int = 0
) -> dict[int, dict[str, float | None]]:
    """Uncertainty of the reduction d_eq / d per MLET d: seeds are resampled with replacement
    within every variant, the curves' means recomputed, the reduction re-interpolated; reported
    as the 16th/50th/84th percentiles (±1σ for a normal) and the share of resamples in which
    MLET reached the baseline's range at all."""
    rng = np.random.default_rng(seed)
    out: dict[int, dict[str, float | None]] = {}
    for d, values in sorted(mlet.items()):
        ratios = []
        for _ in range(samples):
            bcurve = [(bd, float(np.mean(rng.choice(v, len(v))))) for bd, v in base.items()]
            auc = float(np.mean(rng.choice(values, len(values))))
            d_eq = equal_auc_dim(bcurve, auc)
            ratios.append(d_eq / d if d_eq is not None else math.inf)
        r = np.sort(np.asarray(ratios))  # inf (above every baseline) sorts last
        p16, p50, p84 = (float(r[round(q * (len(r) - 1))]) for q in (0.16, 0.5, 0.84))
        out[d] = {
            "p16": p16,  # nearest-rank percentiles
            "p50": p50,
            "p84": p84,
            "share_above_all_baselines": float(np.isinf(r).mean()),
        }
    return out


def baseline_slope(base: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Does the baseline's AUC rise with d beyond seed noise? The best mean minus the mean at the
    smallest d, against the standard error of that difference; ``flat`` when it is below 2 SE: the
    data set then cannot show a served-size reduction (every d serves as well as the smallest)."""
    ds = sorted(base)
    lo = base[ds[0]]["test_auc"]
    hi = max((base[d]["test_auc"] for d in ds), key=lambda s: s["mean"])
    se = math.sqrt(lo["std"] ** 2 / lo["n"] + hi["std"] ** 2 / hi["n"])
    gain = hi["mean"] - lo["mean"]
    return {"gain": gain, "se": se, "flat": bool(gain < 2 * se)}


def summarize(
    spec: SweepSpec, tune: list[dict[str, Any]], frontier: list[dict[str, Any]]
) -> dict[str, Any]:
    """Aggregates the runs' results into the report (pure: testable from results alone)."""
    variants: dict[str, dict[str, Any]] = {}
    for r in frontier:
        v = variants.setdefault(r["variant"], {
            "variant": r["variant"], "k": r["k"], "d": r["d"], "recipe": r["recipe"],
            "point": r["point"], "runs": [],
        })  # fmt: skip
        v["runs"].append(r)
    for v in variants.values():
        runs = v.pop("runs")
        v["seeds"] = len(runs)
        v["eval_auc"] = _stats([r["chosen"]["eval"]["auc"] for r in runs])
        v["test_auc"] = _stats([r["chosen"]["test"]["auc"] for r in runs])
        v["test_log_loss"] = _stats([r["chosen"]["test"]["log_loss"] for r in runs])
        v["epoch"] = _stats([r["chosen"]["epoch"] for r in runs])
        v["test_aucs"] = [r["chosen"]["test"]["auc"] for r in runs]
        buckets: dict[str, list[float]] = {}
        rows: dict[str, int] = {}  # test rows per bucket (the same split and counts every seed)
        for r in runs:
            for b, m in r["chosen"]["test"].get("buckets", {}).items():
                rows[b] = max(rows.get(b, 0), int(m.get("rows", 0)))
                if m.get("auc") is not None and math.isfinite(m["auc"]):  # one-class bucket: nan
                    buckets.setdefault(b, []).append(m["auc"])
        v["test_auc_buckets"] = {b: _stats(a) for b, a in buckets.items()}
        v["test_rows_buckets"] = rows
        v["seconds"] = _stats([r["seconds"] for r in runs])
    base = {v["d"]: v for v in variants.values() if v["k"] == 0}
    ks = sorted({v["k"] for v in variants.values() if v["k"]})
    reductions: dict[str, Any] = {}
    for k in ks:
        mv = {v["d"]: v for v in variants.values() if v["k"] == k}
        if not base or not mv:
            continue
        points = reduction_at(
            [(d, v["test_auc"]["mean"]) for d, v in base.items()],
            [(d, v["test_auc"]["mean"]) for d, v in mv.items()],
        )
        boot = bootstrap_reduction(
            {d: v["test_aucs"] for d, v in base.items()},
            {d: v["test_aucs"] for d, v in mv.items()},
        )
        for p in points:
            p["interval"] = boot[p["d"]]
            same = base.get(p["d"])
            p["delta_vs_same_d"] = p["auc"] - same["test_auc"]["mean"] if same is not None else None
        reductions[str(k)] = points
    # The recommendation is chosen on eval only; its test AUC is reported.
    best_eval = max(v["eval_auc"]["mean"] for v in variants.values()) if variants else None
    recommendation = None
    if variants:
        ok = [v for v in variants.values() if v["eval_auc"]["mean"] >= best_eval - spec.epsilon]
        pick = min(ok, key=lambda v: (v["d"], -v["eval_auc"]["mean"]))
        recommendation = {
            "variant": pick["variant"], "k": pick["k"], "d": pick["d"], "recipe": pick["recipe"],
            "point": pick["point"], "eval_auc": pick["eval_auc"], "test_auc": pick["test_auc"],
            "best_eval_auc": best_eval, "epsilon": spec.epsilon,
        }  # fmt: skip
    tuned = best_recipes(spec, tune)
    return {
        "baseline_slope": baseline_slope(base) if base else None,
        "spec": asdict(spec),
        "tuning": [
            {
                "k": r["k"],
                "d": r["d"],
                "recipe": r["recipe"],
                "point": r["point"],
                "seed": r["seed"],
                "eval_auc": r["chosen"]["eval"]["auc"],
                "epoch": r["chosen"]["epoch"],
                "seconds": r["seconds"],
            }
            for r in sorted(
                tune, key=lambda r: (r["k"], r["d"], r["recipe"], json.dumps(r["point"]))
            )
        ],
        # "k@d": the winner of side k (0 = baseline) tuned at d
        "chosen_recipes": {
            f"{k}@{d}": {"recipe": n, "point": p, "eval_auc": a}
            for (k, d), (n, p, a) in tuned.items()
        },
        "variants": sorted(variants.values(), key=lambda v: (v["k"], v["d"])),
        "reductions": reductions,
        "recommendation": recommendation,
    }


def _pm(s: dict[str, float], digits: int = 4) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def markdown(report: dict[str, Any], title: str, num_tables: int) -> str:
    """The report as Markdown (tables of tuning, frontier, reductions and the recommendation)."""
    lines = [f"# {title}", ""]
    meta = report.get("meta", {})
    if meta:
        lines += [" · ".join(f"{k}: {v}" for k, v in meta.items()), ""]
    spec = report["spec"]
    regime = (
        "one pass" if spec["epochs"] == 1 else f"best of up to {spec['epochs']} epochs by eval AUC"
    )
    tuned_at = ", ".join(map(str, spec.get("tune_dims") or [spec["tune_dim"]]))
    seeds = f"{spec['seeds']} seeds"
    if spec.get("max_seeds"):
        seeds += f" ({spec['max_seeds']} where their eval AUC spread > {spec['seed_spread']})"
    lines += [
        f"Regime: {regime}"
        f" · recipes tuned at d = {tuned_at} on the eval split ({spec['tune_seeds']} "
        f"seed(s); the frontier at d uses the winner tuned at the nearest d) · frontier: {seeds}"
        f"{' (MLET: the best tuned k at each d)' if spec.get('frontier_k') == 'best' else ''}"
        " · test split reported.",
        "",
        "## Tuning (eval AUC)",
        "",
        "| side | d | recipe | grid point | seed | eval AUC | epoch |",
        "|---|---|---|---|---|---|---|",
    ]
    chosen = report["chosen_recipes"]
    for t in report["tuning"]:
        side = f"MLET k={t['k']}" if t["k"] else "baseline"
        win = chosen.get(f"{t['k']}@{t['d']}", {})
        mark = (
            " **(chosen)**"
            if win.get("recipe") == t["recipe"] and win.get("point") == t["point"]
            else ""
        )
        lines.append(
            f"| {side} | {t['d']} | {t['recipe']}{mark} | {_point_name(t['point'])} | {t['seed']} | "
            f"{t['eval_auc']:.4f} | {t['epoch']} |"
        )
    buckets = sorted({b for v in report["variants"] for b in v["test_auc_buckets"]},
                     key=_bucket_order)  # fmt: skip
    bucket_rows = {  # how many test rows each bucket's AUC is over (a small bucket is noisy)
        b: max(v.get("test_rows_buckets", {}).get(b, 0) for v in report["variants"])
        for b in buckets
    }
    lines += [
        "",
        "## Frontier (test split, mean ± std over seeds)",
        "",
        "| variant | recipe | served B/row | seeds | eval AUC | test AUC | test log loss | epoch | "
        + " | ".join(f"AUC {b} ({bucket_rows[b]} rows)" for b in buckets) + " |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(buckets),
    ]  # fmt: skip
    for v in report["variants"]:
        cells = [
            _pm(v["test_auc_buckets"][b]) if b in v["test_auc_buckets"] else "–" for b in buckets
        ]
        lines.append(
            f"| {v['variant']} | {v['recipe']} {_point_name(v['point'])} | "
            f"{num_tables * v['d'] * BYTES_PER_VALUE} | {v['seeds']} | {_pm(v['eval_auc'])} | "
            f"{_pm(v['test_auc'])}"
            f" | {_pm(v['test_log_loss'])} | {v['epoch']['mean']:.1f} | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        "## Served-size reduction at equal test AUC (against the tuned baseline)",
        "",
        "d_eq: the baseline d reaching MLET(k, d)'s mean test AUC (interpolated in log2 d); "
        "reduction = d_eq / d; interval: 16th–84th percentile of a bootstrap over seeds.",
        "",
        _slope_line(report.get("baseline_slope")),
        "",
        "| MLET | test AUC | Δ vs EBC(same d) | baseline d of equal AUC | reduction | interval |",
        "|---|---|---|---|---|---|",
    ]
    for k, points in report["reductions"].items():
        for p in points:
            red = (
                f"> {max(v['d'] for v in report['variants'] if v['k'] == 0) / p['d']:.2f}× (above every baseline)"
                if p["above_all"]
                else f"{p['reduction']:.2f}×" + (" (upper bound)" if p["upper_bound"] else "")
            )
            iv = p["interval"]
            ivs = (
                f"{_fmt(iv['p16'])}–{_fmt(iv['p84'])}"
                + (f" ({iv['share_above_all_baselines']:.0%} above all)" if iv["share_above_all_baselines"] else "")
            )  # fmt: skip
            delta = "–" if p["delta_vs_same_d"] is None else f"{p['delta_vs_same_d']:+.4f}"
            base_d = "–" if p["baseline_d"] is None else f"{p['baseline_d']:.1f}"
            lines.append(
                f"| MLET({k},{p['d']}) | {p['auc']:.4f} | {delta} | {base_d} | {red} | {ivs} |"
            )
    rec = report["recommendation"]
    if rec:
        lines += [
            "",
            f"**Recommendation** (eval split, ε = {rec['epsilon']}): {rec['variant']} with recipe "
            f"{rec['recipe']} {_point_name(rec['point'])} — the smallest served d whose mean eval "
            f"AUC ({rec['eval_auc']['mean']:.4f}) is within ε of the best ({rec['best_eval_auc']:.4f});"
            f" its test AUC {_pm(rec['test_auc'])}.",
        ]
    return "\n".join(lines) + "\n"


def _fmt(x: float | None) -> str:
    return "∞" if x is None or math.isinf(x) else f"{x:.2f}×"


def _slope_line(slope: dict[str, Any] | None) -> str:
    if not slope:
        return "No baseline variants: no reduction to read."
    text = (
        f"The tuned baseline gains {slope['gain']:+.4f} test AUC from its smallest d to its best "
        f"d (standard error {slope['se']:.4f})"
    )
    if slope["flat"]:
        return (
            f"**{text}: flat within seed noise. This data set cannot show a served-size "
            f"reduction; the ratios below only reflect noise.**"
        )
    return text + ": d matters here."


def _bucket_order(name: str) -> float:
    digits = "".join(c if c.isdigit() else " " for c in name).split()
    return float(digits[0]) if digits else math.inf


def plot(report: dict[str, Any], path: Path, title: str, num_tables: int) -> Path:
    """Test AUC vs served bytes per row, ±1 std, one line per side (and per k)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for k in sorted({v["k"] for v in report["variants"]}):
        vs = sorted((v for v in report["variants"] if v["k"] == k), key=lambda v: v["d"])
        x = [num_tables * v["d"] * BYTES_PER_VALUE for v in vs]
        y = [v["test_auc"]["mean"] for v in vs]
        e = [v["test_auc"]["std"] for v in vs]
        label = f"MLET k={k} ({vs[0]['recipe']})" if k else f"baseline ({vs[0]['recipe']})"
        ax.errorbar(x, y, yerr=e, marker="o" if k else "s", capsize=3, label=label)
        for xi, yi, v in zip(x, y, vs):
            ax.annotate(f"d={v['d']}", (xi, yi), textcoords="offset points", xytext=(4, -10),
                        fontsize=7)  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("served bytes per row (float32)")
    ax.set_ylabel("test AUC (mean ± std over seeds)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
