"""Benchmark runner: training throughput and memory, collapse bandwidth, loader speed.

    python -m benchmarks.run --suite train|collapse|loader|serving|all [--quick]
        [--out benchmarks/results] [--config configs/bench_train.toml] [--section.key=value ...]

Suites:

- ``train`` (:mod:`benchmarks.train_bench`): samples/s and peak memory of MLET(k, d) vs plain
  EBC(k) vs plain EBC(d) on 1 and 2 CPU ranks (gloo), or 1 and all GPUs; parameter + optimizer
  bytes, bytes served after collapse, the dry-run planner estimates next to the measured memory.
  Config: ``configs/bench_train.toml`` (``--quick`` applies its ``[quick.*]`` tables; overrides
  such as ``--bench.repeats=5`` or ``--data.batch_size=8192`` come last).
- ``collapse`` (:mod:`benchmarks.collapse_bench`): collapse GB/s vs memory-copy GB/s.
- ``loader`` (:mod:`benchmarks.preprocess_bench`): loader samples/s, set beside the trainer's
  samples/s (of this run's train suite, else of the newest train result in ``--out``).
- ``serving`` (:mod:`benchmarks.serving_bench`): batch-1 latency and batch 512 / 4096 throughput
  of the collapsed model's predictors (TorchScript, torch.export, AOTInductor, eager), fp32 and
  int8 tables, and the served-table memory per format. The served model is the train config's
  ``plain_d`` variant (what its MLET collapses to); its ``[bench]`` settings apply.

Every suite writes ``<suite>[-quick]_<hardware>_<date>.json`` (results, config, library versions,
machine) and ``.md`` (tables), and PNG plots with the same stem, into ``--out``. The hardware
tag is ``cpu<cores>`` or ``<gpu><count>`` (e.g. ``h100x1``). A delegated suite whose module is not
there (yet) is reported as 'not available'.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import config_record, hardware_tag, load_bench_config, machine_info
from benchmarks.records import (
    base_record,
    prepare_run,
    progress,
    record_stem,
    suite_arguments,
    write_record,
)

SUITES = ("train", "collapse", "loader", "serving")
# Suites measured by modules other engineers own; imported only when the suite runs.
DELEGATED = {"collapse": "benchmarks.collapse_bench", "loader": "benchmarks.preprocess_bench"}


def run_train(args, overrides: list[str], argv: list[str], machine: dict, out: Path) -> dict:
    from benchmarks.report import train_markdown, train_plots
    from benchmarks.train_bench import run_train_suite

    cfg, bench = load_bench_config(args.config, overrides, quick=args.quick)
    record = base_record("train", args, argv, machine)
    record["config"] = config_record(cfg, bench)
    start = time.perf_counter()
    record["results"] = run_train_suite(cfg, bench, machine["cores"], progress=progress)
    record["seconds"] = time.perf_counter() - start
    record["status"] = "ok"
    plots = train_plots(record, record_stem(record, out))
    record["files"] = {"plots": [p.name for p in plots]}
    write_record(record, out, train_markdown(record))
    return record


def run_serving(args, overrides: list[str], argv: list[str], machine: dict, out: Path) -> dict:
    from benchmarks.serving_bench import record_serving_suite

    return record_serving_suite(args, overrides, argv, machine, out)


def _delegate(suite: str):
    """The suite's module, or None when it does not exist (yet)."""
    name = DELEGATED[suite]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        return None


def run_delegated(suite: str, args, argv: list[str], machine: dict, out: Path, trainer=None):
    """Runs a suite another module measures; records its result and adds the comparison plot."""
    record = base_record(suite, args, argv, machine)
    module = _delegate(suite)
    if module is None:
        record["status"] = "not available"
        record["reason"] = f"{DELEGATED[suite].replace('.', '/')}.py does not exist"
        write_record(record, out, None)
        return record
    start = time.perf_counter()
    sub_argv = ["--out-dir", str(out), *(["--quick"] if args.quick else [])]
    result = module.main(sub_argv)
    record["seconds"] = time.perf_counter() - start
    record["status"] = "ok"
    record["delegate"] = {"module": DELEGATED[suite], "argv": sub_argv}
    record["results"] = result
    if suite == "collapse":
        record["summary"] = _collapse_summary(result)
    else:
        record["summary"] = _loader_summary(result, trainer)
    plots = _delegated_plot(suite, record, record_stem(record, out))
    record["files"] = {"plots": [p.name for p in plots]}
    write_record(record, out, _delegated_markdown(suite, record))
    return record


def _collapse_summary(result: dict[str, Any]) -> dict[str, Any]:
    r = result["results"]
    return {
        "copy_gb_per_s": r["copy"]["gb_per_s"],
        "collapse_fp32_gb_per_s": r["best_fp32"]["gb_per_s"],
        "collapse_int8_fused_gb_per_s": r["best_int8_fused"]["gb_per_s"],
        "collapse_cold_gb_per_s": r["cold"]["gb_per_s"],
        "collapse_over_copy": r["best_fp32"]["fraction_of_copy"],
    }


def _loader_summary(result: dict[str, Any], trainer: dict[str, Any] | None) -> dict[str, Any]:
    """Loader samples/s per rank beside what the MLET trainer consumes per rank.

    ``trainer`` (from :func:`trainer_throughput`) holds the MLET trainer's global samples/s per
    world size; a loader case of world size N is compared with the trainer's samples/s per rank
    at N ranks (the rate one rank's loader must sustain).
    """
    cases = []
    for r in result["loader"]:
        case = {
            "world_size": r["world_size"],
            "rank": r["rank"],
            "global_batch_size": r["global_batch_size"],
            "loader_samples_per_s": r["samples_per_s"],
        }
        trainer_sps = (trainer or {}).get("per_world_size", {}).get(str(r["world_size"]))
        if trainer_sps and r["samples_per_s"]:
            per_rank = trainer_sps / r["world_size"]
            case["trainer_samples_per_s_per_rank"] = per_rank
            case["loader_over_trainer"] = r["samples_per_s"] / per_rank
        cases.append(case)
    out: dict[str, Any] = {"cases": cases}
    if trainer is not None:
        out["trainer"] = trainer
    if "training" in result:
        out["preprocess_bench_training_samples_per_s"] = result["training"]["samples_per_s"]
    return out


def trainer_throughput(train: dict[str, Any] | None, out: Path, tag: str) -> dict | None:
    """The MLET trainer's global samples/s per world size, from this run's train record, else
    from the newest train result of this hardware in ``out``."""
    source = "this run"
    if train is None or train.get("status") != "ok":
        files = sorted(out.glob(f"train*_{tag}_*.json"), key=lambda p: p.stat().st_mtime)
        for path in reversed(files):
            candidate = json.loads(path.read_text())
            if candidate.get("status") == "ok":
                train, source = candidate, path.name
                break
        else:
            return None
    rows = [r for r in train["results"]["rows"] if r["variant"] == "mlet"]
    if not rows:
        return None
    return {
        "label": rows[0]["label"],
        "global_batch_size": train["config"]["data"]["batch_size"],
        "per_world_size": {str(r["world_size"]): r["samples_per_s"] for r in rows},
        "source": source,
    }


def _delegated_plot(suite: str, record: dict[str, Any], stem: Path) -> list[Path]:
    from benchmarks.report import bar_plot

    s = record["summary"]
    log = False
    if suite == "collapse":
        bars = [
            ("memory copy", s["copy_gb_per_s"]),
            ("collapse fp32", s["collapse_fp32_gb_per_s"]),
            ("collapse + int8", s["collapse_int8_fused_gb_per_s"]),
            ("collapse cold (allocating)", s["collapse_cold_gb_per_s"]),
        ]
        title, ylabel = "Collapse vs memory copy", "GB/s (read + written)"
    else:
        bars = [
            (
                f"loader, rank {c['rank']} of {c['world_size']}, batch {c['global_batch_size']}",
                c["loader_samples_per_s"] or 0.0,
            )
            for c in s["cases"]
        ]
        trainer = s.get("trainer")
        if trainer:
            bars += [
                (f"trainer {trainer['label']} per rank, {ws} rank(s)", sps / int(ws))
                for ws, sps in trainer["per_world_size"].items()
            ]
        title, ylabel, log = "Loader vs trainer", "samples/s per rank (log scale)", True
    path = stem.with_name(stem.name + ".png")
    name = f"{title} — {record['hardware_tag']} {record['date']}"
    return [bar_plot(path, name, ylabel, bars, log=log)]


def _delegated_markdown(suite: str, record: dict[str, Any]) -> str:
    from benchmarks.report import header_lines

    s = record["summary"]
    title = "Collapse bandwidth" if suite == "collapse" else "Loader vs trainer throughput"
    lines = header_lines(record, title)
    lines += [
        f"Measured by `{record['delegate']['module']}` (its own result files, with the details, "
        "are in the same folder).",
        "",
    ]
    if suite == "collapse":
        lines += [
            "| what | GB/s (read + written) |",
            "| --- | ---: |",
            f"| memory copy | {s['copy_gb_per_s']:.1f} |",
            f"| collapse, fp32 (best chunk size) | {s['collapse_fp32_gb_per_s']:.1f} |",
            f"| collapse fused with int8 quantization | {s['collapse_int8_fused_gb_per_s']:.1f} |",
            f"| collapse, cold (allocating its output) | {s['collapse_cold_gb_per_s']:.1f} |",
            "",
            f"Collapse / copy: **{s['collapse_over_copy']:.0%}**.",
            "",
        ]
        return "\n".join(lines)
    trainer = s.get("trainer")
    lines += [
        "| loader case | loader samples/s | trainer samples/s per rank | loader / trainer |",
        "| --- | ---: | ---: | ---: |",
    ]
    for c in s["cases"]:
        lines.append(
            f"| rank {c['rank']} of {c['world_size']}, global batch {c['global_batch_size']} | "
            f"{c['loader_samples_per_s'] or 0:,.0f} | "
            + (
                f"{c['trainer_samples_per_s_per_rank']:,.0f} | {c['loader_over_trainer']:.1f}x |"
                if "loader_over_trainer" in c
                else "- | - |"
            )
        )
    lines.append("")
    if trainer:
        lines.append(
            f"Trainer: {trainer['label']} at global batch {trainer['global_batch_size']} "
            f"(train suite, {trainer['source']}); a loader must deliver the trainer's samples/s "
            "per rank to keep it busy."
        )
    else:
        lines.append("Trainer: no train result for this hardware (run --suite train first).")
    if "preprocess_bench_training_samples_per_s" in s:
        lines.append(
            f"The end-to-end training loop measured by preprocess_bench: "
            f"{s['preprocess_bench_training_samples_per_s']:,.0f} samples/s."
        )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides = suite_arguments(
        argv, "python -m benchmarks.run", list(SUITES), __doc__.split("\n")[0]
    )
    out = prepare_run(args)
    machine = machine_info()
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    records: dict[str, dict[str, Any]] = {}
    for suite in suites:
        progress(f"== {suite}")
        if suite == "train":
            records[suite] = run_train(args, overrides, argv, machine, out)
        elif suite == "serving":
            records[suite] = run_serving(args, overrides, argv, machine, out)
        elif suite == "loader":
            trainer = trainer_throughput(records.get("train"), out, hardware_tag(machine))
            records[suite] = run_delegated(suite, args, argv, machine, out, trainer)
        else:
            records[suite] = run_delegated(suite, args, argv, machine, out)
    for suite, rec in records.items():
        files = rec.get("files", {})
        listed = [files.get("json"), files.get("markdown"), *files.get("plots", [])]
        extra = f" ({rec['reason']})" if rec.get("reason") else ""
        progress(f"{suite}: {rec['status']}{extra}; wrote {', '.join(f for f in listed if f)}")
    return records


if __name__ == "__main__":
    main()
