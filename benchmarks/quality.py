"""Model quality study: MLET vs single-layer embeddings across served dimensions and id buckets.

    python -m benchmarks.quality [--quick] [--data synthetic|criteo|avazu|all] [--seeds N]
        [--out benchmarks/results] [--work runs/quality] [--threads 1] [--tag T] [--keep-runs]
        [--section.key=value ...]
    python -m benchmarks.quality --sweep [--quick] [--seeds N]     # MLET hyper-parameter sweep

``--section.key=value`` overrides every dataset's config (``--study.seeds=5``,
``--optim.projection_lr=0.05``); ``--tag T`` suffixes the result files and the run directories.
Each run directory (``--work``) keeps the run's ``record.json``: a rerun with the same config
reuses it, so an interrupted study resumes where it stopped. Checkpoints and collapsed models
are deleted after each run unless ``--keep-runs``.

For each dataset (``configs/quality/<dataset>.toml``: an ordinary mlet_dist config plus a
``[study]`` section and ``[quick.*]`` tables) it trains, one after the other in this process
(world size 1), every variant of the grid for every seed:

- ``EBC(d)``: single-layer tables of dimension d (``model.inner_dim = 0``), d in
  ``study.baseline_dims``;
- ``MLET(k,d)``: W1 (vocab × k) · W2 (k × d), k in ``study.mlet_inner_dims``, d in
  ``study.mlet_dims``.

Variants differ only in ``model.inner_dim``, ``model.embedding_dim`` and the last size of the
bottom MLP (which must equal d); the seed is ``train.seed`` (model init and data order; the data
and its splits are fixed). Each run is then collapsed (:func:`mlet_dist.export.collapse_run`) and
the collapsed model is compared with the trained one on the test split
(:func:`mlet_dist.workflow.check_collapsed`, ``passed`` per run).

Reported per dataset: mean ± std (over seeds) of the test AUC, log loss and NE per variant,
overall and per id-frequency bucket (a row's bucket is that of its rarest id, counted in the
training split: ≤10, 11–100, 101–1000, >1000; :mod:`mlet_dist.quality`); the served bytes per row
(26 tables × d × 4 bytes, float32); and the served-dimension reduction at equal AUC
(:func:`equal_auc_dim`):

- **match the best baseline** (per k): d* is the smallest baseline dimension with the best mean
  test AUC A*; the MLET dimension d_m at which MLET(k, ·) reaches A* is interpolated on the MLET
  curve; reduction = d* / d_m, or 'not reached' when no MLET(k, d) reaches A*;
- **baseline-equivalent dimension** (per MLET variant): the d_eq at which the baseline curve
  reaches the variant's mean AUC, interpolated on the baseline curve; reduction = d_eq / d
  ('above every baseline' when the variant beats all of them).

Curves are interpolated linearly in log2(d), on their running maximum (a curve that dips at a
larger d still counts as having reached the level at the smaller d).

Writes ``quality[-quick]_<hardware>_<date>.{json,md,png}`` into ``--out``: the JSON holds every
run (config, metrics, collapse check, seconds), the aggregates and the reductions; the PNG plots
test AUC against served bytes per row with ±1 std error bars, one panel per dataset.

``--sweep`` instead trains the ``[sweep]`` grid of ``configs/quality/synthetic.toml`` (one
hyper-parameter at a time around the config's values: W2 init std, W1 and W2 learning rates,
and the single-layer baseline's learning rate) and writes ``quality-sweep[-quick]_...``.

Runs use ``--threads`` intra-op threads (default 1): on a shared 2-core machine two OpenMP
threads per process fight other processes and a training step becomes 10–80× slower; one thread
is fast and keeps the runs reproducible.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import logging
import math
import shlex
import shutil
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tomllib

from benchmarks.common import (
    REPO,
    hardware_tag,
    library_versions,
    machine_info,
    result_stem,
)
from mlet_dist.sweep import equal_auc_dim  # one implementation, shared with `mlet-dist sweep`

logger = logging.getLogger("benchmarks.quality")

CONFIG_DIR = REPO / "configs" / "quality"
DEFAULT_OUT = REPO / "benchmarks" / "results"
DEFAULT_WORK = REPO / "runs" / "quality"
DATASETS = ("synthetic", "criteo", "avazu")
NUM_TABLES = 26  # the Criteo layout: every dataset is mapped onto 26 categorical tables
BYTES_PER_VALUE = 4  # float32 served tables


class StudyConfigError(ValueError):
    """A study config or override is invalid; the message names the key and the fix."""


@dataclass
class StudyConfig:
    """The ``[study]`` section: which variants are trained, how often."""

    baseline_dims: list[int] = field(default_factory=lambda: [4, 8, 16, 32, 64])
    """Served dimensions d of the single-layer baseline EBC(d)."""
    mlet_inner_dims: list[int] = field(default_factory=lambda: [64, 128])
    """Inner dimensions k of MLET(k, d)."""
    mlet_dims: list[int] = field(default_factory=lambda: [4, 8, 16])
    """Served dimensions d of MLET(k, d)."""
    seeds: int = 3
    """Seeds per variant (train.seed = the config's seed + 0, 1, …)."""


@dataclass
class SweepConfig:
    """The ``[sweep]`` section: one-at-a-time hyper-parameter sweep (``--sweep``)."""

    mlet: list[int] = field(default_factory=lambda: [64, 8])
    """The MLET variant [k, d] whose hyper-parameters are swept."""
    baseline_dim: int = 8
    """d of the baseline whose embedding learning rate is swept too (0 = none)."""
    projection_init_std: list[float] = field(default_factory=list)
    """Values of model.projection_init_std (0 = 1/sqrt(k))."""
    embedding_lr: list[float] = field(default_factory=list)
    """Values of optim.embedding_lr (MLET's W1, and the baseline's tables)."""
    projection_lr: list[float] = field(default_factory=list)
    """Values of optim.projection_lr (W2; 0 = dense_lr)."""
    seeds: int = 2
    """Seeds per point."""


@dataclass
class Variant:
    """One point of the grid: k = 0 is the single-layer baseline."""

    k: int
    d: int

    @property
    def name(self) -> str:
        return f"MLET({self.k},{self.d})" if self.k else f"EBC({self.d})"

    @property
    def kind(self) -> str:
        return "mlet" if self.k else "baseline"


def served_bytes_per_row(d: int) -> int:
    """Bytes one sample's embeddings take when served: 26 tables × d float32 values."""
    return NUM_TABLES * d * BYTES_PER_VALUE


# -- equal-AUC interpolation -------------------------------------------------------------------


def reductions(
    baseline: list[tuple[float, float]], mlet: dict[int, list[tuple[float, float]]]
) -> dict[str, Any]:
    """Served-dimension reductions at equal AUC (see the module docstring).

    Args:
        baseline: ``(d, mean AUC)`` of the single-layer baseline.
        mlet: per k, ``(d, mean AUC)`` of MLET(k, d).

    Returns:
        ``{"best_baseline": {"d", "auc"}, "match_best": {k: {...}}, "equivalent": {name: {...}}}``;
        reductions are None when not reached.
    """
    if not baseline:
        return {"best_baseline": None, "match_best": {}, "equivalent": {}}
    best_auc = max(a for _, a in baseline)
    best_d = min(d for d, a in baseline if a == best_auc)
    match_best = {}
    for k, curve in sorted(mlet.items()):
        d_m = equal_auc_dim(curve, best_auc)
        first = min(curve)[0] if curve else None
        match_best[str(k)] = {
            "mlet_d": d_m,
            "reduction": best_d / d_m if d_m else None,
            # at or above the target at the smallest MLET d: the reduction is a lower bound
            "lower_bound": d_m is not None and d_m == first,
        }
    equivalent = {}
    d_min, d_max = min(d for d, _ in baseline), max(d for d, _ in baseline)
    for k, curve in sorted(mlet.items()):
        for d, auc in sorted(curve):
            d_eq = equal_auc_dim(baseline, auc)
            equivalent[Variant(k, int(d)).name] = {
                "auc": auc,
                "baseline_d": d_eq,
                "reduction": d_eq / d if d_eq is not None else None,
                # below the baseline's first point: d_eq is at most d_min (an upper bound)
                "upper_bound": d_eq is not None
                and d_eq == d_min
                and auc < baseline_at(baseline, d_min),
                "above_all_baselines": d_eq is None,
                "max_baseline_d": d_max,
            }
    return {
        "best_baseline": {"d": best_d, "auc": best_auc},
        "match_best": match_best,
        "equivalent": equivalent,
    }


def baseline_at(curve: list[tuple[float, float]], d: float) -> float:
    return next(a for x, a in curve if x == d)


# -- configs -----------------------------------------------------------------------------------


def _set_fields(obj: Any, table: dict[str, Any], origin: str, section: str) -> None:
    hints = typing.get_type_hints(type(obj))
    for key, value in table.items():
        if key not in hints:
            raise StudyConfigError(
                f"{origin}: unknown key '{section}.{key}'; valid keys of [{section}]: "
                f"{', '.join(hints)}"
            )
        tp = hints[key]
        ok = (
            isinstance(value, list)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            if typing.get_origin(tp) is list
            else isinstance(value, int) and not isinstance(value, bool)
        )
        if not ok:
            raise StudyConfigError(f"{origin}: {section}.{key} = {value!r} is not a {tp}")
        if typing.get_origin(tp) is list and typing.get_args(tp)[0] is int:
            if any(not isinstance(v, int) for v in value):
                raise StudyConfigError(f"{origin}: {section}.{key} must be integers, got {value}")
        setattr(obj, key, value)


def load_study_config(
    path: str | Path, overrides: list[str] | None = None, quick: bool = False
) -> tuple[Any, StudyConfig, SweepConfig]:
    """Loads ``configs/quality/<dataset>.toml``: mlet_dist sections, ``[study]``, ``[sweep]`` and
    ``[quick.*]`` (merged over the others in quick mode); ``--section.key=value`` overrides last
    (``--study.seeds=1`` too).

    Returns:
        ``(Config, StudyConfig, SweepConfig)``.
    """
    from mlet_dist.config import apply_overrides, config_from_dict, parse_overrides

    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as e:
        raise StudyConfigError(f"study config {path} does not exist") from e
    quick_tables = raw.pop("quick", {})
    if quick:
        for section, table in quick_tables.items():
            raw.setdefault(section, {}).update(table)
    study, sweep = StudyConfig(), SweepConfig()
    _set_fields(study, raw.pop("study", {}), str(path), "study")
    _set_fields(sweep, raw.pop("sweep", {}), str(path), "sweep")
    cfg = config_from_dict(raw, origin=str(path))
    rest = []
    for (section, key, value), text in zip(parse_overrides(overrides or []), overrides or []):
        if section in ("study", "sweep"):
            _set_fields(
                study if section == "study" else sweep, {key: value}, "command line", section
            )
        else:
            rest.append(text)
    apply_overrides(cfg, rest)
    # Relative data paths are the repository's (as in configs/), whatever the working directory.
    d = cfg.data
    d.dir = _repo_path(d.dir)
    d.train_files = [_repo_path(f) for f in d.train_files]
    d.eval_files = [_repo_path(f) for f in d.eval_files]
    for k in study.mlet_inner_dims:
        bad = [d for d in study.mlet_dims if d > k]
        if bad:
            raise StudyConfigError(
                f"{path}: study.mlet_dims {bad} exceed the inner dimension k = {k}: MLET needs k >= d"
            )
    if study.seeds < 1 or sweep.seeds < 1:
        raise StudyConfigError("study.seeds and sweep.seeds must be at least 1")
    return cfg, study, sweep


def _repo_path(path: str) -> str:
    return path if not path or Path(path).is_absolute() else str(REPO / path)


def variant_config(base: Any, variant: Variant, seed: int, run_dir: Path) -> Any:
    """The config of one run: the variant's k and d (bottom MLP ends with d), seed, run dir."""
    from mlet_dist.config import validate

    cfg = copy.deepcopy(base)
    m = cfg.model
    m.inner_dim, m.embedding_dim, m.inner_dim_per_table = variant.k, variant.d, {}
    m.dense_arch_layer_sizes = [*m.dense_arch_layer_sizes[:-1], variant.d]
    cfg.train.seed = base.train.seed + seed
    cfg.train.run_dir = str(run_dir)
    cfg.train.progress = False
    validate(cfg)
    return cfg


def grid(study: StudyConfig) -> list[Variant]:
    return [Variant(0, d) for d in study.baseline_dims] + [
        Variant(k, d) for k in study.mlet_inner_dims for d in study.mlet_dims
    ]


# -- running -----------------------------------------------------------------------------------


def ensure_synthetic(cfg: Any) -> None:
    """Generates the synthetic day files into ``data.dir`` unless they are there for this config
    (nothing for the other sources)."""
    from mlet_dist.data import ensure_source_data

    ensure_source_data(cfg.data, cfg.synthetic, progress=False)


def run_one(cfg: Any, held_out: Any, keep: bool = False) -> dict[str, Any]:
    """Trains, evaluates, collapses and checks one run; returns its record.

    A run directory holding a record of the same config is reused (an interrupted study resumes).
    """
    from mlet_dist.export import CollapseOptions, collapse_run
    from mlet_dist.train import train
    from mlet_dist.workflow import check_collapsed

    run_dir = Path(cfg.train.run_dir)
    record_path = run_dir / "record.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("config") == cfg.to_dict():
            return record
    if run_dir.exists():
        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    metrics = train(cfg, resume=False)
    t_train = time.perf_counter() - t0
    served = run_dir / "served"
    t0 = time.perf_counter()
    collapse_run(run_dir, served, CollapseOptions(allow_plain=True, predictor=False))
    check = check_collapsed(run_dir, served, held_out)
    t_check = time.perf_counter() - t0
    split = "test" if "test" in metrics else "eval"
    check["auc_equals_training_eval"] = bool(
        abs(check["collapsed_auc"] - metrics[split]["auc"]) <= 1e-6
    )
    record = {
        "config": cfg.to_dict(),
        "split": split,
        "metrics": {s: metrics[s] for s in ("eval", "test") if s in metrics},
        "train": {k: v for k, v in metrics["train"].items() if k != "loss_curve"},
        "collapse_check": check,
        "passed": bool(check["passed"] and check["auc_equals_training_eval"]),
        "seconds": {"train_and_eval": t_train, "collapse_and_check": t_check},
    }
    if not keep:
        for sub in ("checkpoints", "served"):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
    record_path.write_text(json.dumps(record, indent=1))
    return record


def _stats(values: list[float]) -> dict[str, float]:
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if not len(v):
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
        "n": len(v),
    }


def aggregate(variant: Variant, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over seeds of one variant's test metrics, overall and per bucket."""
    split = records[0]["split"]
    ms = [r["metrics"][split] for r in records]
    out: dict[str, Any] = {
        "variant": variant.name,
        "kind": variant.kind,
        "k": variant.k,
        "d": variant.d,
        "served_bytes_per_row": served_bytes_per_row(variant.d),
        "seeds": len(records),
        "split": split,
        "rows": ms[0]["rows"],
        "passed": all(r["passed"] for r in records),
        "seconds_per_run": _stats([sum(r["seconds"].values()) for r in records])["mean"],
    }
    for key in ("auc", "log_loss", "ne"):
        out[key] = _stats([m[key] for m in ms])
    out["buckets"] = {
        name: {
            "rows": ms[0]["buckets"][name]["rows"],
            **{
                key: _stats([m["buckets"][name].get(key) for m in ms])
                for key in ("auc", "log_loss")
            },
        }
        for name in ms[0].get("buckets", {})
    }
    return out


def run_dataset(
    name: str,
    cfg: Any,
    variants: list[Variant],
    seeds: int,
    work: Path,
    keep: bool = False,
    point: SweepPoint | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every (variant, seed) run of one dataset; returns the records and a data summary.

    ``point`` (the sweep) changes one more hyper-parameter of every run and names the runs.
    """
    from mlet_dist.data import load_splits

    ensure_synthetic(cfg)
    splits = load_splits(cfg.data)
    held_out = splits.test if len(splits.test) else splits.eval
    data = {
        "source": cfg.data.source,
        "files": [str(p) for p in cfg.data.train_files] or [cfg.data.dir],
        "rows": {s: len(getattr(splits, s)) for s in ("train", "eval", "test")},
        "positive_rate": {
            s: float(getattr(splits, s).labels.mean()) if len(getattr(splits, s)) else None
            for s in ("train", "eval", "test")
        },
        "batch_size": cfg.data.batch_size,
        "epochs": cfg.train.epochs,
    }
    records = []
    total = len(variants) * seeds
    for i, (variant, seed) in enumerate((v, s) for v in variants for s in range(seeds)):
        tag = point.tag(variant) if point else variant.name
        run_dir = (
            work / name / f"{tag}_seed{seed}".replace(",", "_").replace("(", "_").replace(")", "")
        )
        t0 = time.perf_counter()
        run_cfg = variant_config(cfg, variant, seed, run_dir)
        if point is not None:
            run_cfg = point.apply(run_cfg)
        record = run_one(run_cfg, held_out, keep=keep)
        record.update(dataset=name, variant=variant.name, tag=tag, seed=seed)
        records.append(record)
        m = record["metrics"][record["split"]]
        logger.info(
            "[%s %d/%d] %s seed %d: test AUC %.4f  log loss %.4f  collapse check %s  (%.1f s)",
            name, i + 1, total, tag, seed, m["auc"], m["log_loss"],
            "passed" if record["passed"] else "FAILED", time.perf_counter() - t0,
        )  # fmt: skip
    return records, data


def study_dataset(
    name: str, cfg: Any, study: StudyConfig, work: Path, keep: bool = False
) -> dict[str, Any]:
    t0 = time.perf_counter()
    variants = grid(study)
    records, data = run_dataset(name, cfg, variants, study.seeds, work, keep)
    rows = [aggregate(v, [r for r in records if r["variant"] == v.name]) for v in variants]
    baseline = [(r["d"], r["auc"]["mean"]) for r in rows if r["kind"] == "baseline"]
    mlet: dict[int, list[tuple[float, float]]] = {}
    for r in rows:
        if r["kind"] == "mlet":
            mlet.setdefault(r["k"], []).append((r["d"], r["auc"]["mean"]))
    by_name = {r["variant"]: r for r in rows}
    for r in rows:  # MLET(k, d) beside EBC(4d), the paper's headline ratio
        ref = by_name.get(f"EBC({4 * r['d']})")
        if r["kind"] == "mlet" and ref is not None:
            r["auc_minus_baseline_4d"] = r["auc"]["mean"] - ref["auc"]["mean"]
    return {
        "dataset": name,
        "data": data,
        "config": cfg.to_dict(),
        "study": dataclasses.asdict(study),
        "variants": rows,
        "reduction": reductions(baseline, mlet),
        "all_passed": all(r["passed"] for r in records),
        "runs": [
            {
                k: r[k]
                for k in (
                    "variant",
                    "seed",
                    "split",
                    "metrics",
                    "collapse_check",
                    "passed",
                    "seconds",
                    "train",
                )
            }
            for r in records
        ],
        "seconds": time.perf_counter() - t0,
    }


# -- the sweep ---------------------------------------------------------------------------------


@dataclass
class SweepPoint:
    """One hyper-parameter value of the sweep, set on top of a variant's config."""

    section: str
    key: str
    value: float

    def tag(self, variant: Variant) -> str:
        return f"{variant.name}_{self.key}={self.value:g}"

    def apply(self, cfg: Any) -> Any:
        setattr(getattr(cfg, self.section), self.key, self.value)
        return cfg


def sweep(cfg: Any, sw: SweepConfig, work: Path, keep: bool = False) -> dict[str, Any]:
    """One-at-a-time sweep around the config's values (see the module docstring)."""
    t0 = time.perf_counter()
    mlet = Variant(*sw.mlet)
    plan: list[tuple[Variant, SweepPoint]] = []
    for value in sw.projection_init_std:
        plan.append((mlet, SweepPoint("model", "projection_init_std", value)))
    for value in sw.projection_lr:
        plan.append((mlet, SweepPoint("optim", "projection_lr", value)))
    for value in sw.embedding_lr:
        plan.append((mlet, SweepPoint("optim", "embedding_lr", value)))
        if sw.baseline_dim:
            plan.append((Variant(0, sw.baseline_dim), SweepPoint("optim", "embedding_lr", value)))
    points = []
    data = None
    for variant, point in plan:
        records, data = run_dataset("sweep", cfg, [variant], sw.seeds, work, keep, point=point)
        split = records[0]["split"]
        ms = [r["metrics"][split] for r in records]
        points.append(
            {
                "variant": variant.name,
                "param": f"{point.section}.{point.key}",
                "value": point.value,
                "auc": _stats([m["auc"] for m in ms]),
                "log_loss": _stats([m["log_loss"] for m in ms]),
                "auc_rarest_bucket": _stats([m["buckets"]["<=10"].get("auc") for m in ms]),
                "passed": all(r["passed"] for r in records),
            }
        )
    return {
        "dataset": "synthetic",
        "data": data,
        "config": cfg.to_dict(),
        "sweep": dataclasses.asdict(sw),
        "points": points,
        "seconds": time.perf_counter() - t0,
    }


# -- reporting ---------------------------------------------------------------------------------


def _pm(s: dict[str, float], digits: int = 4) -> str:
    if not s or s.get("n", 0) == 0 or math.isnan(s["mean"]):
        return "–"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def _dim(x: float | None) -> str:
    return "–" if x is None else (f"{x:.0f}" if abs(x - round(x)) < 1e-9 else f"{x:.1f}")


def markdown(record: dict[str, Any]) -> str:
    lines = [
        "# Model quality: MLET vs single-layer embeddings",
        "",
        f"{record['timestamp']} · `{record['command']}` · {record['hardware_tag']} "
        f"({record['machine']['cpu_model']}, {record['machine']['cores']} cores), "
        f"{record['threads']} thread(s), world size 1 · torch {record['versions']['torch']}, "
        f"torchrec {record['versions']['torchrec']}, fbgemm {record['versions']['fbgemm_gpu']}",
        "",
        "Test split, mean ± std over seeds. Served bytes per row = 26 tables × d × 4 (float32). "
        "Buckets: a row's bucket is its rarest id's count in the training split. "
        "Collapse check: the collapsed d-dim model's test AUC equals the trained model's "
        "(every run).",
    ]
    for ds in record["datasets"]:
        d = ds["data"]
        lines += [
            "",
            f"## {ds['dataset']}",
            "",
            f"{d['source']} · rows train/eval/test {d['rows']['train']}/{d['rows']['eval']}/"
            f"{d['rows']['test']} · positive rate (test) {d['positive_rate']['test']:.3f} · "
            f"batch {d['batch_size']}, {d['epochs']} epoch(s) · {ds['study']['seeds']} seeds · "
            f"{ds['seconds']:.0f} s",
            "",
        ]
        buckets = list(ds["variants"][0]["buckets"])
        rows_of = {b: ds["variants"][0]["buckets"][b]["rows"] for b in buckets}
        head = ["variant", "served B/row", "test AUC", "test log loss", "ΔAUC vs EBC(4d)"]
        head += [f"AUC {b} ({rows_of[b]} rows)" for b in buckets]
        head += ["collapse check"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for v in ds["variants"]:
            delta = v.get("auc_minus_baseline_4d")
            cells = [
                v["variant"],
                str(v["served_bytes_per_row"]),
                _pm(v["auc"]),
                _pm(v["log_loss"]),
                "–" if delta is None else f"{delta:+.4f}",
            ]
            cells += [_pm(v["buckets"][b]["auc"]) for b in buckets]
            cells += [f"passed ({v['seeds']}/{v['seeds']})" if v["passed"] else "FAILED"]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Log loss per bucket:", ""]
        head = ["variant", *[f"log loss {b}" for b in buckets]]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for v in ds["variants"]:
            cells = [v["variant"], *[_pm(v["buckets"][b]["log_loss"]) for b in buckets]]
            lines.append("| " + " | ".join(cells) + " |")
        red = ds["reduction"]
        best = red["best_baseline"]
        if best is None:
            continue
        lines += [
            "",
            f"**Served-dimension reduction at equal AUC.** Best baseline: EBC({best['d']}), "
            f"mean test AUC {best['auc']:.4f}.",
            "",
            "| k | MLET d reaching the best baseline (interpolated) | reduction d*/d |",
            "|---|---|---|",
        ]
        for k, m in red["match_best"].items():
            if m["mlet_d"] is None:
                lines.append(f"| {k} | not reached | not reached |")
            else:
                bound = "≥ " if m["lower_bound"] else ""
                lines.append(
                    f"| {k} | {'≤ ' if m['lower_bound'] else ''}{_dim(m['mlet_d'])} | "
                    f"{bound}{m['reduction']:.2f}× |"
                )
        lines += [
            "",
            "| MLET variant | mean AUC | baseline d of equal AUC (interpolated) | reduction d_eq/d |",
            "|---|---|---|---|",
        ]
        for name, e in red["equivalent"].items():
            if e["above_all_baselines"]:
                eq, r = f"> {e['max_baseline_d']} (above every baseline)", "–"
            else:
                eq = ("≤ " if e["upper_bound"] else "") + _dim(e["baseline_d"])
                r = ("≤ " if e["upper_bound"] else "") + f"{e['reduction']:.2f}×"
            lines.append(f"| {name} | {e['auc']:.4f} | {eq} | {r} |")
    lines.append("")
    return "\n".join(lines)


def sweep_markdown(record: dict[str, Any]) -> str:
    sw = record["sweep"]
    lines = [
        "# MLET hyper-parameter sweep (synthetic data)",
        "",
        f"{record['timestamp']} · `{record['command']}` · {record['hardware_tag']}, "
        f"{record['threads']} thread(s) · {sw['seeds']} seeds per point · one parameter at a time, "
        f"the others at the config's values · {record['seconds']:.0f} s",
        "",
        f"The config's point (every other row changes one value from it): "
        f"model.projection_init_std = {_init_std(record['config'])}, optim.projection_lr = "
        f"{_projection_lr(record['config'])}, optim.embedding_lr = "
        f"{record['config']['optim']['embedding_lr']:g}.",
        "",
        "| variant | parameter | value | test AUC | test log loss | AUC rarest bucket (≤10) |",
        "|---|---|---|---|---|---|",
    ]
    for p in record["points"]:
        lines.append(
            f"| {p['variant']} | {p['param']} | {p['value']:g} | {_pm(p['auc'])} | "
            f"{_pm(p['log_loss'])} | {_pm(p['auc_rarest_bucket'])} |"
        )
    lines.append("")
    return "\n".join(lines)


def _init_std(cfg: dict[str, Any]) -> str:
    std = cfg["model"]["projection_init_std"]
    return f"{std:g}" if std else "0 (1/sqrt(k))"


def _projection_lr(cfg: dict[str, Any]) -> str:
    lr = cfg["optim"]["projection_lr"]
    return f"{lr:g}" if lr else f"0 (= dense_lr = {cfg['optim']['dense_lr']:g})"


def plot(record: dict[str, Any], path: Path) -> Path:
    """Test AUC vs served bytes per row, ±1 std, one panel per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = record["datasets"]
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.2 * len(datasets), 4.2), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        curves: dict[str, list[dict[str, Any]]] = {}
        for v in ds["variants"]:
            label = "baseline EBC(d)" if v["kind"] == "baseline" else f"MLET k={v['k']}"
            curves.setdefault(label, []).append(v)
        for i, (label, vs) in enumerate(curves.items()):
            vs = sorted(vs, key=lambda v: v["d"])
            # MLET markers are shifted by a few percent so that the error bars do not overlap
            x = [v["served_bytes_per_row"] * 1.04**i for v in vs]
            y = [v["auc"]["mean"] for v in vs]
            e = [v["auc"]["std"] for v in vs]
            ax.errorbar(
                x, y, yerr=e, marker="o" if i == 0 else "s", capsize=3, label=label,
                linestyle="-" if i == 0 else "--",
            )  # fmt: skip
            if i == 0:
                for v, xi, yi in zip(vs, x, y):
                    ax.annotate(
                        f"d={v['d']}", (xi, yi), textcoords="offset points", xytext=(4, -10),
                        fontsize=7,
                    )  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("served bytes per row (26 × d × 4; d = 4 … 64)")
        ax.set_ylabel("test AUC (mean ± std over seeds)")
        ax.set_title(f"{ds['dataset']} ({ds['data']['rows']['train']} train rows)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.quality", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny data, 1 seed, 2 variants (format check)"
    )
    p.add_argument("--data", choices=[*DATASETS, "all"], default="all", help="dataset(s) to study")
    p.add_argument(
        "--seeds", type=int, help="seeds per variant (default: the config's study.seeds)"
    )
    p.add_argument("--sweep", action="store_true", help="the MLET hyper-parameter sweep instead")
    p.add_argument("--config-dir", default=str(CONFIG_DIR), help="where <dataset>.toml are")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="where the JSON / Markdown / PNG go")
    p.add_argument("--work", default=str(DEFAULT_WORK), help="run directories (reused on rerun)")
    p.add_argument("--keep-runs", action="store_true", help="keep checkpoints and served models")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--tag", default="", help="suffix of the result files (e.g. 'lr0.1')")
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--") or "=" not in o]
    if bad:
        p.error(
            f"unrecognized arguments: {' '.join(bad)} (config overrides are --section.key=value)"
        )
    if args.seeds is not None:
        overrides = [*overrides, f"--{'sweep' if args.sweep else 'study'}.seeds={args.seeds}"]

    import torch

    torch.set_num_threads(args.threads)
    # The libraries log pages per model build at INFO: only this study's lines are shown.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    logging.getLogger("torchrec").setLevel(logging.ERROR)  # planner warnings on every build
    warnings_off()

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    now = datetime.datetime.now(datetime.timezone.utc)
    record: dict[str, Any] = {
        "suite": "quality-sweep" if args.sweep else "quality",
        "hardware_tag": hardware_tag(machine),
        "date": now.date().isoformat(),
        "timestamp": now.isoformat(timespec="seconds"),
        "quick": args.quick,
        "command": " ".join(
            ["python -m benchmarks.quality", shlex.join(sys.argv[1:] if argv is None else argv)]
        ).strip(),
        "threads": args.threads,
        "world_size": 1,
        "versions": library_versions(),
        "machine": machine,
    }
    t0 = time.perf_counter()
    stem = out / result_stem(record["suite"], record["hardware_tag"], args.quick, now.date())
    runs = work / ("quick" if args.quick else "full")
    if args.tag:  # tagged results and their own run directories
        stem = stem.with_name(f"{stem.name}_{args.tag}")
        runs = runs.with_name(f"{runs.name}_{args.tag}")
    if args.sweep:
        cfg, _, sw = load_study_config(
            Path(args.config_dir) / "synthetic.toml", overrides, args.quick
        )
        record.update(sweep(cfg, sw, runs, args.keep_runs))
        text = sweep_markdown(record)
    else:
        names = DATASETS if args.data == "all" else (args.data,)
        # every config is loaded (and checked) before the first run
        loaded = {
            name: load_study_config(Path(args.config_dir) / f"{name}.toml", overrides, args.quick)
            for name in names
        }
        record["datasets"] = []
        for name, (cfg, study, _) in loaded.items():
            logger.info("%s: %d variants × %d seeds", name, len(grid(study)), study.seeds)
            record["datasets"].append(study_dataset(name, cfg, study, runs, args.keep_runs))
        record["all_passed"] = all(ds["all_passed"] for ds in record["datasets"])
        record["files"] = {"png": str(plot(record, Path(f"{stem}.png")))}
        text = markdown(record)
    record["total_seconds"] = time.perf_counter() - t0
    record.setdefault("files", {}).update(
        json=str(Path(f"{stem}.json")), md=str(Path(f"{stem}.md"))
    )
    Path(f"{stem}.json").write_text(json.dumps(record, indent=1))
    Path(f"{stem}.md").write_text(text)
    logger.info(
        "results: %s.{json,md%s} (%.0f s)",
        stem,
        "" if args.sweep else ",png",
        record["total_seconds"],
    )
    return record


def warnings_off() -> None:
    """TorchRec's planner and DDP warn on every model build; a study builds a hundred."""
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


if __name__ == "__main__":
    main()
