"""One table across several sweeps (docs/results.md#when-does-mlet-pay-off): per data set, does d
matter to the tuned baseline, and MLET's served-size reduction at equal test AUC at d = 4, 8, 16
with its bootstrap interval, read from each sweep's ``sweep.json`` (``mlet-dist sweep``).

    python -m benchmarks.study_table "synthetic teacher (2M)=runs/study/synth/sweep.json" ...

Prints Markdown; nothing is recomputed here (the numbers are the sweeps' own)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any


def _num(x: float | None, fmt: str = ".2f") -> str:
    if x is None or (isinstance(x, float) and math.isinf(x)):
        return "∞"
    return format(x, fmt)


def cell(report: dict[str, Any], d: int) -> str:
    """MLET's reduction at served d (whichever k the sweep trained there), its 16–84% interval,
    the AUC difference to EBC(d) and k; '–' when the sweep has no MLET variant at d."""
    points = [(int(k), p) for k, ps in report["reductions"].items() for p in ps if p["d"] == d]
    if not points:
        return "–"
    k, p = max(points, key=lambda kp: kp[1]["auc"])
    iv = p["interval"]
    if p["above_all"]:
        red = "above every EBC"
    elif p["reduction"] is None:
        red = "below every EBC"
    else:
        red = f"{_num(p['reduction'])}×"
    delta = "" if p["delta_vs_same_d"] is None else f", {p['delta_vs_same_d']:+.4f} vs EBC({d})"
    return f"{red} ({_num(iv['p16'])}–{_num(iv['p84'])}×{delta}; k = {k})"


def slope(report: dict[str, Any]) -> str:
    s = report.get("baseline_slope")
    if not s:
        return "–"
    word = "no (flat within 2 SE)" if s["flat"] else "yes"
    return f"{word}: {s['gain']:+.4f} (SE {s['se']:.4f})"


def seeds(report: dict[str, Any]) -> str:
    n = sorted({v["seeds"] for v in report["variants"]})
    return str(n[0]) if len(n) == 1 else f"{n[0]}–{n[-1]}"


def compute(report: dict[str, Any]) -> str:
    """Runs and their summed wall time (each run: one process, one thread)."""
    secs = [t["seconds"] for t in report["tuning"]]
    secs += [v["seconds"]["mean"] * v["seeds"] for v in report["variants"]]
    n = len(report["tuning"]) + sum(v["seeds"] for v in report["variants"])
    return f"{n} runs, {sum(secs) / 3600:.1f} h"


def table(sets: list[tuple[str, dict[str, Any]]], dims: tuple[int, ...] = (4, 8, 16)) -> str:
    head = ["data set", "does d matter? (best EBC − EBC(smallest d))", "seeds"]
    head += [f"reduction at d = {d} (16–84%)" for d in dims]
    head += ["compute"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rep in sets:
        row = [name, slope(rep), seeds(rep), *(cell(rep, d) for d in dims), compute(rep)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sets", nargs="+", help="NAME=path/to/sweep.json")
    p.add_argument("--dims", default="4,8,16", help="served d columns (default 4,8,16)")
    args = p.parse_args(argv)
    sets = []
    for item in args.sets:
        name, sep, path = item.rpartition("=")
        if not sep or not name:
            p.error(f"{item!r}: give NAME=path/to/sweep.json")
        sets.append((name, json.loads(Path(path).read_text())))
    print(table(sets, tuple(int(d) for d in args.dims.split(","))), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
