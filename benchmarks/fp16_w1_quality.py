"""Quality of fp16 vs fp32 W1 (``model.w1_dtype``): test AUC of the same runs, paired by seed.

    python -m benchmarks.fp16_w1_quality [--data synthetic,movielens,criteo] [--seeds 3]
        [--threads 1] [--quick] [--out benchmarks/results] [--work runs/fp16_w1_quality]
        [--section.key=value ...]

For each dataset and seed (``train.seed`` = the config's + 0, 1, …: model init and data order;
data and splits are fixed) the same MLET config is trained twice on one process, with
``model.w1_dtype = 'fp32'`` and ``'fp16'``, then collapsed and checked
(:func:`benchmarks.quality.run_one`: the collapsed fp32 model's test AUC must equal the trained
model's). Reported per dataset: test AUC and log loss of each dtype (mean ± std over seeds), the
paired difference fp16 − fp32 (mean ± std over seeds, and each seed's), and the W1 bytes of each
dtype from the planner report (``mlet-dist plan``'s accounting, tested against the sharded
model's own tensors in tests/test_fp16_w1.py).

Datasets (configs, unchanged apart from the dtype, seed and run directory):

- ``synthetic``: ``configs/quality/synthetic.toml`` (the quality study's teacher data, generated
  into its ``data.dir`` if absent; ``--quick``: its ``[quick.*]`` tables);
- ``movielens``: ``configs/movielens_mlet.toml`` (MovieLens-1M partial in ../shared; skipped when
  absent);
- ``criteo``: ``configs/criteo_sample_mlet.toml`` (10k Criteo rows in ../shared; skipped when
  absent).

Writes ``fp16-w1-quality[-quick]_<hardware>_<date>.{json,md}`` into ``--out``; run directories
(with each run's ``record.json``: a rerun reuses finished runs) under ``--work``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, hardware_tag, library_versions, machine_info, result_stem
from benchmarks.quality import (
    _repo_path,
    _stats,
    ensure_synthetic,
    load_study_config,
    run_one,
    warnings_off,
)

logger = logging.getLogger("benchmarks.fp16_w1_quality")

DTYPES = ("fp32", "fp16")
CONFIGS = {
    "synthetic": REPO / "configs/quality/synthetic.toml",
    "movielens": REPO / "configs/movielens_mlet.toml",
    "criteo": REPO / "configs/criteo_sample_mlet.toml",
}
DEFAULT_OUT = REPO / "benchmarks" / "results"
DEFAULT_WORK = REPO / "runs" / "fp16_w1_quality"


def load_dataset_config(name: str, overrides: list[str], quick: bool) -> Any:
    """The dataset's config with ``overrides``; relative data paths are the repository's."""
    from mlet_dist.config import load_config

    if name == "synthetic":
        return load_study_config(CONFIGS[name], overrides, quick)[0]
    cfg = load_config(CONFIGS[name], overrides)
    cfg.data.train_files = [_repo_path(f) for f in cfg.data.train_files]
    cfg.data.eval_files = [_repo_path(f) for f in cfg.data.eval_files]
    return cfg


def data_missing(cfg: Any) -> str | None:
    """Why a dataset cannot run here (its files are absent), or None."""
    missing = [f for f in cfg.data.train_files if not Path(f).is_file()]
    return f"absent: {', '.join(missing)}" if missing else None


def run_config(base: Any, dtype: str, seed: int, run_dir: Path) -> Any:
    from mlet_dist.config import validate

    cfg = copy.deepcopy(base)
    cfg.model.w1_dtype = dtype
    cfg.train.seed = base.train.seed + seed
    cfg.train.run_dir = str(run_dir)
    cfg.train.progress = False
    validate(cfg)
    return cfg


def w1_plan_bytes(cfg: Any) -> int:
    """W1 bytes of the planner report for this config on one CPU rank."""
    from mlet_dist.distributed.planning import make_plan, plan_report

    plan = make_plan(cfg, 1, "cpu")
    return plan_report(cfg, plan, 1, "cpu")["totals"]["w1_bytes"]


def study(name: str, base: Any, seeds: int, work: Path) -> dict[str, Any]:
    """Every (seed, dtype) run of one dataset and the paired differences."""
    from mlet_dist.data import load_splits

    ensure_synthetic(base)
    splits = load_splits(base.data)
    held_out = splits.test if splits.test.labels.shape[0] else splits.eval
    runs: dict[str, list[dict[str, Any]]] = {d: [] for d in DTYPES}
    for seed in range(seeds):
        for dtype in DTYPES:
            cfg = run_config(base, dtype, seed, work / name / f"{dtype}_seed{seed}")
            t0 = time.perf_counter()
            record = run_one(cfg, held_out)
            split = record["split"]
            m = record["metrics"][split]
            runs[dtype].append(
                {
                    "seed": cfg.train.seed,
                    "split": split,
                    "auc": m["auc"],
                    "log_loss": m["log_loss"],
                    "collapse_passed": record["passed"],
                    "seconds": record["seconds"],
                }
            )
            logger.info(
                "%s %s seed %d: %s AUC %.5f (%.0f s)",
                name,
                dtype,
                cfg.train.seed,
                split,
                m["auc"],
                time.perf_counter() - t0,
            )
    diffs = [b["auc"] - a["auc"] for a, b in zip(runs["fp32"], runs["fp16"])]
    ll_diffs = [b["log_loss"] - a["log_loss"] for a, b in zip(runs["fp32"], runs["fp16"])]
    w1 = {d: w1_plan_bytes(run_config(base, d, 0, work / name / "plan")) for d in DTYPES}
    return {
        "name": name,
        "config_file": str(CONFIGS[name].relative_to(REPO)),
        "config": base.to_dict(),
        "rows": {
            "train": int(splits.train.labels.shape[0]),
            "held_out": int(held_out.labels.shape[0]),
        },
        "runs": runs,
        "auc": {d: _stats([r["auc"] for r in runs[d]]) for d in DTYPES},
        "log_loss": {d: _stats([r["log_loss"] for r in runs[d]]) for d in DTYPES},
        "auc_diff_fp16_minus_fp32": {**_stats(diffs), "per_seed": diffs},
        "log_loss_diff_fp16_minus_fp32": {**_stats(ll_diffs), "per_seed": ll_diffs},
        "w1_bytes": w1,
        "w1_bytes_ratio_fp16_over_fp32": w1["fp16"] / w1["fp32"],
        "all_collapse_passed": all(r["collapse_passed"] for d in DTYPES for r in runs[d]),
    }


def _pm(s: dict[str, Any], digits: int = 5) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def markdown(record: dict[str, Any]) -> str:
    m = record["machine"]
    v = record["versions"]
    lines = [
        "# fp16 vs fp32 W1 (`model.w1_dtype`): model quality",
        "",
        f"Command: `{record['command']}`  ",
        f"Date: {record['timestamp']}; {record['threads']} intra-op thread(s), world size 1  ",
        f"Hardware: {m.get('cpu_model', '?')} ({m.get('cores', '?')} cores)  ",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        "",
        "Same config, seed by seed, trained with W1 in fp32 and in fp16 (TorchRec `data_type`; "
        "fused row-wise Adagrad state fp32 in both); differences are fp16 − fp32 of the same "
        "seed, mean ± std over seeds (sample std). Every run was collapsed and its fp32 served "
        "model's AUC checked equal to the trained model's.",
        "",
        "| dataset | split (rows) | seeds | AUC fp32 | AUC fp16 | ΔAUC fp16 − fp32 | Δlog loss | "
        "W1 MiB fp32 → fp16 | collapse check |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for ds in record["datasets"]:
        if "skipped" in ds:
            lines.append(f"| {ds['name']} | skipped: {ds['skipped']} | | | | | | | |")
            continue
        split = ds["runs"]["fp32"][0]["split"]
        w1 = ds["w1_bytes"]
        lines.append(
            f"| {ds['name']} | {split} ({ds['rows']['held_out']:,}) | {ds['auc']['fp32']['n']} | "
            f"{_pm(ds['auc']['fp32'])} | {_pm(ds['auc']['fp16'])} | "
            f"{ds['auc_diff_fp16_minus_fp32']['mean']:+.5f} ± "
            f"{ds['auc_diff_fp16_minus_fp32']['std']:.5f} | "
            f"{ds['log_loss_diff_fp16_minus_fp32']['mean']:+.5f} ± "
            f"{ds['log_loss_diff_fp16_minus_fp32']['std']:.5f} | "
            f"{w1['fp32'] / 2**20:.1f} → {w1['fp16'] / 2**20:.1f} "
            f"({ds['w1_bytes_ratio_fp16_over_fp32']:.2f}×) | "
            f"{'passed' if ds['all_collapse_passed'] else 'FAILED'} |"
        )
    lines += ["", "Per seed (test AUC fp32 / fp16 / difference):", ""]
    for ds in record["datasets"]:
        if "skipped" in ds:
            continue
        cells = [
            f"seed {a['seed']}: {a['auc']:.5f} / {b['auc']:.5f} / {b['auc'] - a['auc']:+.5f}"
            for a, b in zip(ds["runs"]["fp32"], ds["runs"]["fp16"])
        ]
        lines.append(f"- {ds['name']} (`{ds['config_file']}`): " + "; ".join(cells))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.fp16_w1_quality", description=__doc__.split("\n")[0]
    )
    p.add_argument("--data", default="synthetic,movielens,criteo", help="comma-separated")
    p.add_argument("--seeds", type=int, default=3, help="seeds per dtype (default 3)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--quick", action="store_true", help="synthetic [quick.*] data (format check)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--work", default=str(DEFAULT_WORK))
    args, overrides = p.parse_known_args(argv)
    names = [n for n in args.data.split(",") if n]
    bad = [n for n in names if n not in CONFIGS]
    if bad or args.seeds < 1:
        p.error(f"--data takes {', '.join(CONFIGS)} (got {bad}); --seeds must be >= 1")
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    warnings_off()
    loaded = {n: load_dataset_config(n, overrides, args.quick) for n in names}  # all checked first
    machine = machine_info()
    now = datetime.datetime.now(datetime.timezone.utc)
    record: dict[str, Any] = {
        "suite": "fp16-w1-quality",
        "hardware_tag": hardware_tag(machine),
        "timestamp": now.isoformat(timespec="seconds"),
        "command": " ".join([p.prog, shlex.join(sys.argv[1:] if argv is None else argv)]).strip(),
        "threads": args.threads,
        "world_size": 1,
        "seeds": args.seeds,
        "versions": library_versions(),
        "machine": machine,
        "datasets": [],
    }
    t0 = time.perf_counter()
    work = Path(args.work) / ("quick" if args.quick else "full")
    for name, cfg in loaded.items():
        why = data_missing(cfg)
        if why:
            logger.info("%s skipped (%s)", name, why)
            record["datasets"].append({"name": name, "skipped": why})
            continue
        record["datasets"].append(study(name, cfg, args.seeds, work))
    record["total_seconds"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / result_stem(record["suite"], record["hardware_tag"], args.quick, now.date())
    Path(f"{stem}.json").write_text(json.dumps(record, indent=1))
    Path(f"{stem}.md").write_text(markdown(record))
    logger.info("results: %s.{json,md} (%.0f s)", stem, record["total_seconds"])
    return record


if __name__ == "__main__":
    main()
