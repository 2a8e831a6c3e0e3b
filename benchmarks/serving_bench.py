"""Serving benchmark: the collapsed model's predictors, latency and throughput, and table memory.

    python -m benchmarks.run --suite serving [--quick] [--out benchmarks/results]
        [--config configs/bench_train.toml] [--section.key=value ...]
    python -m benchmarks.serving_bench [same options]          # the same run

The served model is the one the train suite's MLET(k, d) collapses to: the ``plain_d`` variant of
the benchmark config (26 tables x 100k rows, d = 16; ``--quick``: 5k rows), DLRM with the config's
MLPs, random weights (latency does not depend on the values). Its tables are quantized to each
format with :func:`mlet_dist.modules.quantize.quantize_rows` and served by TorchRec's quantized EBC
(fbgemm's inference TBE), exactly as ``mlet-dist collapse`` builds its predictors
(:func:`mlet_dist.serving.predictor.serving_model`). Compared, for fp32 and int8 tables:

- ``eager``: that serving model run by Python (the module the artifacts are made from);
- ``eager_ebc`` (fp32 only): the collapsed model as ``load_served`` gives it, a DLRM over
  TorchRec's plain ``EmbeddingBagCollection`` (``nn.EmbeddingBag`` per table);
- ``torchscript``: ``serving/predictor.pt`` (``torch.jit.load``);
- ``export``: ``serving/predictor.pt2`` (``torch.export.load(...).module()``);
- ``aoti``: ``serving/predictor_aoti.pt2`` (``torch._inductor.aoti_load_package``).

The artifacts load with the registry's loaders (:data:`mlet_dist.serving.artifacts.ARTIFACTS`), as
``mlet-dist predict`` / ``serve`` load them. The default serving path is the kind
``--predictor auto`` picks among those built (:func:`mlet_dist.serving.artifacts.auto_order`:
AOTInductor where it compiled, else torch.export); the report checks it against the targets
(batch-1 latency <= 1.2x TorchScript's, batch-4096 throughput >= 1.0x).

Each (format, repeat) is one fresh worker process that loads every predictor of that format (RSS
increase and seconds per load, in the order above, after importing torch, fbgemm_gpu, torchrec and
mlet_dist), checks its outputs against ``eager``, then
times them interleaved (each round visits every predictor, in a rotated order): batch 1 latency
(every call timed; median, p90, p99) and batch 512 / 4096 throughput (windows of calls; samples/s
per window, median over all windows of all repeats). Inputs: Criteo-like rows, one id per
feature, uniform over each table, ``distinct_batches`` different ones cycled. The ``[bench]``
settings of the config apply: ``repeats`` (processes per format), ``warmup_steps`` (calls before
timing, per predictor and batch size), ``windows`` (rounds), ``steps_per_window`` (calls per
throughput window; batch 1 gets 10x as many calls per round), ``threads`` (0 = all cores),
``env``, ``timeout_s``.

Memory per format (fp32, fp16, int8): the table bytes of the format (rows x bytes per row), the
bytes fbgemm's TBE holds for them (rows padded to its 16-byte row alignment), and the size of
each artifact file.

``--quick`` (the config's ``[quick.*]`` tables: 5k rows per table, one short repeat) compiles the
AOTInductor package for int8 only: the compile is most of a quick run; its fp32 row says
'skipped'.

Worker entry (started by :func:`run_serving_suite`)::

    python -m benchmarks.serving_bench --worker SPEC.json --result OUT.json
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    BenchConfig,
    BenchmarkError,
    config_record,
    current_rss_bytes,
    load_bench_config,
    machine_info,
    spawn_ranks,
    variant_config,
    variant_label,
)
from benchmarks.records import (
    base_record,
    prepare_run,
    progress,
    record_stem,
    suite_arguments,
    write_record,
)

DTYPES = ("fp32", "int8")
"""Formats timed; fp16 is in the memory table only."""
MEMORY_DTYPES = ("fp32", "fp16", "int8")
PREDICTORS = ("eager_ebc", "eager", "torchscript", "export", "aoti")
ARTIFACT_PREDICTORS = ("torchscript", "export", "aoti")
LABELS = {
    "eager_ebc": "eager, TorchRec EBC",
    "eager": "eager, quantized EBC",
    "torchscript": "TorchScript",
    "export": "torch.export",
    "aoti": "AOTInductor",
}
BATCH_SIZES = (1, 512, 4096)
LATENCY_CALLS_FACTOR = 10  # batch-1 calls per round = 10 x steps_per_window


def predictors_of(dtype: str) -> list[str]:
    return [p for p in PREDICTORS if p != "eager_ebc" or dtype == "fp32"]


# -- building the served model and its artifacts (parent process) -------------------------------


def _served_model_inputs(cfg, seed: int) -> tuple[Any, list, dict, dict]:
    """(served config, table configs, float rows per table, dense state) with random weights."""
    import torch

    from mlet_dist.models import build_dlrm, build_tables
    from mlet_dist.modules.mlet import served_tables

    served = variant_config(cfg, "plain_d")
    sizes = served.data.num_embeddings_per_feature
    tables = served_tables(build_tables(served.model, sizes))
    gen = torch.Generator().manual_seed(seed)
    d = served.model.embedding_dim
    rows = {t.name: torch.randn(t.num_embeddings, d, generator=gen) / d**0.5 for t in tables}
    torch.manual_seed(seed)
    dense = {
        k: v
        for k, v in build_dlrm(served.model, sizes).state_dict().items()
        if not k.startswith("model.sparse_arch.")
    }
    return served, tables, rows, dense


def build_artifacts(
    cfg, bench: BenchConfig, workdir: Path, progress: Callable[[str], None], quick: bool = False
):
    """Writes the weights and every artifact of each format into ``workdir``.

    ``quick``: AOTInductor (a C++ compile, most of the quick run's time) for int8 only.

    Returns:
        (served config, {dtype: {"build_seconds", "artifacts", "memory", "refused", "skipped"}}).
    """
    import torch

    from mlet_dist.modules.quantize import quantize_rows
    from mlet_dist.serving.predictor import (
        AOTIError,
        aoti_package,
        export_predictor,
        script,
        serving_model,
    )

    served, tables, rows, dense = _served_model_inputs(cfg, bench.seed)
    sizes = served.data.num_embeddings_per_feature
    torch.save({"rows": rows, "dense": dense}, workdir / "weights.pt")
    built: dict[str, Any] = {}
    for dtype in MEMORY_DTYPES:
        q = {name: quantize_rows(r, dtype) for name, r in rows.items()}
        model = serving_model(served.model, sizes, tables, q, dense, dtype)
        tbe_bytes = sum(
            int(tbe.weights_host.numel() * tbe.weights_host.element_size())
            for tbe in model.dlrm.sparse_arch.embedding_bag_collection.tbes
        )
        entry: dict[str, Any] = {
            "memory": {
                "dtype": dtype,
                "table_bytes": sum(int(t.numel() * t.element_size()) for t in q.values()),
                "tbe_bytes": tbe_bytes,
                "artifact_bytes": {},
            },
            "build_seconds": {},
            "artifacts": {},
            "refused": {},
            "skipped": {},
        }
        out = workdir / dtype
        out.mkdir()
        torch.save(q, out / "rows.pt")
        progress(f"  {dtype}: torch.export")
        start = time.perf_counter()
        ep = export_predictor(model)
        torch.export.save(ep, str(out / "predictor.pt2"))
        entry["build_seconds"]["export"] = time.perf_counter() - start
        entry["artifacts"]["export"] = str(out / "predictor.pt2")
        if dtype in DTYPES:
            progress(f"  {dtype}: TorchScript")
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # measured on purpose
                script(model).save(str(out / "predictor.pt"))
            entry["build_seconds"]["torchscript"] = time.perf_counter() - start
            entry["artifacts"]["torchscript"] = str(out / "predictor.pt")
        if dtype in DTYPES and quick and dtype != "int8":
            entry["skipped"]["aoti"] = "quick mode compiles AOTInductor for int8 only"
        elif dtype in DTYPES:
            progress(f"  {dtype}: AOTInductor (compiles C++: a minute or more)")
            start = time.perf_counter()
            try:
                aoti_package(ep, out / "predictor_aoti.pt2")
                entry["build_seconds"]["aoti"] = time.perf_counter() - start
                entry["artifacts"]["aoti"] = str(out / "predictor_aoti.pt2")
            except AOTIError as e:
                entry["refused"]["aoti"] = str(e)
                progress(f"  {dtype}: {e}")
        for kind, path in entry["artifacts"].items():
            entry["memory"]["artifact_bytes"][kind] = Path(path).stat().st_size
        built[dtype] = entry
    return served, built


# -- the worker: one format, every predictor -----------------------------------------------------


def _load(kind: str, spec: dict[str, Any]):
    """The predictor ``kind`` of the worker's format, built or loaded as a server would."""
    import torch

    from mlet_dist.serving.artifacts import ARTIFACTS

    if kind in ARTIFACT_PREDICTORS:  # the loader predict and serve use
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript, measured on purpose
            return ARTIFACTS[kind].load(spec["artifacts"][kind])
    from mlet_dist.config import config_from_dict
    from mlet_dist.models import build_dlrm, build_tables
    from mlet_dist.modules.mlet import served_tables
    from mlet_dist.serving.predictor import ServingModel, serving_model

    cfg = config_from_dict(spec["config"])
    sizes = cfg.data.num_embeddings_per_feature
    tables = served_tables(build_tables(cfg.model, sizes))
    weights = torch.load(spec["weights"])
    if kind == "eager":
        rows = torch.load(spec["rows"])
        return serving_model(cfg.model, sizes, tables, rows, weights["dense"], spec["dtype"])
    from torchrec import EmbeddingBagCollection

    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("cpu"))
    with torch.no_grad():
        for name, bag in ebc.embedding_bags.items():
            bag.weight.copy_(weights["rows"][name])
    model = build_dlrm(cfg.model, sizes, embedding_module=ebc)
    model.load_state_dict(weights["dense"], strict=False)
    features = [f for t in tables for f in t.feature_names]
    return ServingModel(model.model, features).eval().requires_grad_(False)


def _inputs(sizes: list[int], batch: int, rng: np.random.Generator):
    """(dense, values, lengths) of ``batch`` random rows, one id per feature, feature-major."""
    import torch

    dense = torch.from_numpy(rng.random((batch, 13), dtype=np.float32))
    ids = (rng.random((len(sizes), batch)) * np.asarray(sizes)[:, None]).astype(np.int64)
    values = torch.from_numpy(ids.reshape(-1))
    return dense, values, torch.ones(values.numel(), dtype=torch.int32)


def worker(spec_path: str, result_path: str) -> None:
    """Loads every predictor of one format, checks it against eager, times it, writes JSON."""
    import fbgemm_gpu  # noqa: F401  (the fbgemm operators of every predictor)
    import torch

    spec = json.loads(Path(spec_path).read_text())
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    sizes = spec["sizes"]
    rng = np.random.default_rng(spec["seed"])
    inputs = {
        b: [_inputs(sizes, b, rng) for _ in range(spec["distinct_batches"])]
        for b in spec["batch_sizes"]
    }
    loaded: dict[str, Any] = {}
    result: dict[str, Any] = {"threads": torch.get_num_threads(), "predictors": {}}
    # the libraries the eager models need, imported before any load is measured
    import torchrec  # noqa: F401

    import mlet_dist.models
    import mlet_dist.serving.predictor  # noqa: F401

    for kind in spec["predictors"]:
        gc.collect()
        rss, start = current_rss_bytes(), time.perf_counter()
        loaded[kind] = _load(kind, spec)
        result["predictors"][kind] = {
            "load_seconds": time.perf_counter() - start,
            "load_rss_bytes": current_rss_bytes() - rss,
        }
    with torch.inference_mode():
        for sets in inputs.values():
            reference = loaded["eager"](*sets[0])
            for kind, predictor in loaded.items():
                diff = (predictor(*sets[0]) - reference).abs().max().item()
                r = result["predictors"][kind]
                r["max_abs_diff_vs_eager"] = max(r.get("max_abs_diff_vs_eager", 0.0), diff)
        kinds = list(loaded)
        for batch_size, sets in inputs.items():
            for kind in kinds:  # warm-up (first calls, allocator, thread pool)
                for i in range(spec["warmup"]):
                    loaded[kind](*sets[i % len(sets)])
            calls = spec["calls_per_window"] * (LATENCY_CALLS_FACTOR if batch_size == 1 else 1)
            samples: dict[str, list[float]] = {k: [] for k in kinds}
            for round_ in range(spec["windows"]):
                order = kinds[round_ % len(kinds) :] + kinds[: round_ % len(kinds)]
                for kind in order:
                    predictor = loaded[kind]
                    if batch_size == 1:  # every call timed: latency
                        for i in range(calls):
                            start = time.perf_counter_ns()
                            predictor(*sets[i % len(sets)])
                            samples[kind].append((time.perf_counter_ns() - start) / 1e6)
                    else:  # one window: throughput
                        start = time.perf_counter()
                        for i in range(calls):
                            predictor(*sets[i % len(sets)])
                        samples[kind].append(batch_size * calls / (time.perf_counter() - start))
            for kind in kinds:
                key = "latency_ms" if batch_size == 1 else f"samples_per_s_{batch_size}"
                result["predictors"][kind][key] = samples[kind]
    Path(result_path).write_text(json.dumps(result))


# -- the suite -------------------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def run_serving_suite(
    cfg,
    bench: BenchConfig,
    cores: int,
    progress: Callable[[str], None] = print,
    quick: bool = False,
) -> dict[str, Any]:
    """Builds the artifacts, runs ``bench.repeats`` worker processes per format, summarizes.

    ``quick``: the fp32 AOTInductor package is not compiled (its row says so)."""
    import torch

    threads = bench.threads or cores
    with tempfile.TemporaryDirectory(prefix="mlet-serving-bench-") as tmp:
        workdir = Path(tmp)
        progress("serving: building the served model's predictors")
        served, built = build_artifacts(cfg, bench, workdir, progress, quick)
        runs: dict[str, list[dict[str, Any]]] = {dtype: [] for dtype in DTYPES}
        for repeat in range(bench.repeats):
            for dtype in DTYPES if repeat % 2 == 0 else DTYPES[::-1]:
                progress(f"serving: {dtype}, repeat {repeat + 1}/{bench.repeats}")
                absent = {**built[dtype]["refused"], **built[dtype]["skipped"]}
                kinds = [k for k in predictors_of(dtype) if k not in absent]
                spec = workdir / f"spec_{dtype}.json"
                spec.write_text(
                    json.dumps(
                        {
                            "dtype": dtype,
                            "config": served.to_dict(),
                            "sizes": served.data.num_embeddings_per_feature,
                            "weights": str(workdir / "weights.pt"),
                            "rows": str(workdir / dtype / "rows.pt"),
                            "artifacts": built[dtype]["artifacts"],
                            "predictors": kinds,
                            "batch_sizes": list(BATCH_SIZES),
                            "distinct_batches": bench.distinct_batches,
                            "warmup": bench.warmup_steps,
                            "windows": bench.windows,
                            "calls_per_window": bench.steps_per_window,
                            "threads": threads,
                            "seed": bench.seed + repeat,
                        }
                    )
                )
                out = workdir / f"result_{dtype}_{repeat}.json"
                args = [
                    "-m",
                    "benchmarks.serving_bench",
                    "--worker",
                    str(spec),
                    "--result",
                    str(out),
                ]
                spawn_ranks(
                    lambda _rank, args=args: args,
                    1,
                    threads,
                    bench.timeout_s,
                    workdir / f"log_{dtype}_{repeat}",
                    what=f"measuring the {dtype} predictors",
                    extra_env=bench.env,
                )
                if not out.is_file():
                    raise BenchmarkError(f"the {dtype} serving worker wrote no result")
                runs[dtype].append(json.loads(out.read_text()))
    rows = []
    for dtype in DTYPES:
        for kind in predictors_of(dtype):
            rows.append(_summarize(dtype, kind, runs[dtype], built[dtype]))
    return {
        "device": "cpu",
        "model": {
            "label": variant_label(cfg, "plain_d"),
            "collapsed_from": variant_label(cfg, "mlet"),
            "tables": len(served.data.num_embeddings_per_feature),
            "rows_per_table": served.data.num_embeddings_per_feature,
            "embedding_dim": served.model.embedding_dim,
            "interaction": served.model.interaction,
            "dense_arch_layer_sizes": served.model.dense_arch_layer_sizes,
            "over_arch_layer_sizes": served.model.over_arch_layer_sizes,
        },
        "threads": threads,
        "torch_threads_in_workers": runs[DTYPES[0]][0]["threads"],
        "batch_sizes": list(BATCH_SIZES),
        "dtypes": list(DTYPES),
        "predictors": list(PREDICTORS),
        "latency_calls_per_round": bench.steps_per_window * LATENCY_CALLS_FACTOR,
        "rows": rows,
        "memory": [built[dtype]["memory"] for dtype in MEMORY_DTYPES],
        "build_seconds": {dtype: built[dtype]["build_seconds"] for dtype in MEMORY_DTYPES},
        "refused": {dtype: built[dtype]["refused"] for dtype in DTYPES if built[dtype]["refused"]},
        "skipped": {dtype: built[dtype]["skipped"] for dtype in DTYPES if built[dtype]["skipped"]},
        "ratios": _ratios(rows),
        "default_path": _default_path(rows),
        "torch": torch.__version__,
    }


def _summarize(
    dtype: str, kind: str, runs: list[dict[str, Any]], built: dict[str, Any]
) -> dict[str, Any]:
    row: dict[str, Any] = {"dtype": dtype, "predictor": kind, "label": LABELS[kind]}
    for status in ("refused", "skipped"):
        if kind in built[status]:
            return {**row, "status": status, "reason": built[status][kind]}
    measured = [r["predictors"][kind] for r in runs]
    lat = [v for m in measured for v in m["latency_ms"]]
    row.update(
        status="ok",
        latency_ms={
            "median": statistics.median(lat),
            "p90": _percentile(lat, 90),
            "p99": _percentile(lat, 99),
            "mean": statistics.fmean(lat),
            "calls": len(lat),
        },
        max_abs_diff_vs_eager=max(m["max_abs_diff_vs_eager"] for m in measured),
        load_seconds=statistics.median(m["load_seconds"] for m in measured),
        load_rss_bytes=statistics.median(m["load_rss_bytes"] for m in measured),
        artifact_bytes=built["memory"]["artifact_bytes"].get(kind),
        build_seconds=built["build_seconds"].get(kind),
    )
    for b in BATCH_SIZES[1:]:
        windows = [v for m in measured for v in m[f"samples_per_s_{b}"]]
        row[f"throughput_{b}"] = {
            "samples_per_s": statistics.median(windows),
            "min": min(windows),
            "max": max(windows),
            "windows": len(windows),
        }
    return row


def _ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Speed of each predictor relative to TorchScript (and AOTInductor to torch.export), per
    format: > 1 is faster (latency: TorchScript's median / this one's; throughput: this / it)."""
    by = {(r["dtype"], r["predictor"]): r for r in rows if r["status"] == "ok"}
    pairs = [(k, "torchscript") for k in ("export", "aoti", "eager", "eager_ebc")]
    pairs.append(("aoti", "export"))
    out = []
    for dtype in DTYPES:
        for a, b in pairs:
            ra, rb = by.get((dtype, a)), by.get((dtype, b))
            if ra is None or rb is None:
                continue
            q = {
                "dtype": dtype,
                "ratio": f"{LABELS[a]} / {LABELS[b]}",
                "speedup_latency_b1": rb["latency_ms"]["median"] / ra["latency_ms"]["median"],
            }
            for bs in BATCH_SIZES[1:]:
                q[f"speedup_throughput_{bs}"] = (
                    ra[f"throughput_{bs}"]["samples_per_s"]
                    / rb[f"throughput_{bs}"]["samples_per_s"]
                )
            out.append(q)
    return out


TARGET_LATENCY_B1 = 1 / 1.2
"""The default path's batch-1 speed vs TorchScript must be at least this (latency <= 1.2x)."""
TARGET_THROUGHPUT_4096 = 1.0


def _default_path(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per format: the kind ``--predictor auto`` loads among those built, its speed vs
    TorchScript and whether it meets the targets."""
    from mlet_dist.serving.artifacts import auto_order

    by = {(r["dtype"], r["predictor"]): r for r in rows if r["status"] == "ok"}
    out = []
    for dtype in DTYPES:
        built = [k for k in ARTIFACT_PREDICTORS if (dtype, k) in by and k != "torchscript"]
        ts = by.get((dtype, "torchscript"))
        if not built or ts is None:
            continue
        kind = auto_order(built)[0]
        r = by[(dtype, kind)]
        lat = ts["latency_ms"]["median"] / r["latency_ms"]["median"]
        thr = r["throughput_4096"]["samples_per_s"] / ts["throughput_4096"]["samples_per_s"]
        out.append(
            {
                "dtype": dtype,
                "predictor": kind,
                "label": LABELS[kind],
                "latency_ms_b1": r["latency_ms"]["median"],
                "torchscript_latency_ms_b1": ts["latency_ms"]["median"],
                "speedup_latency_b1": lat,
                "speedup_throughput_4096": thr,
                "meets_targets": lat >= TARGET_LATENCY_B1 and thr >= TARGET_THROUGHPUT_4096,
            }
        )
    return out


# -- report ----------------------------------------------------------------------------------------


def serving_markdown(record: dict[str, Any]) -> str:
    from benchmarks.report import _mib, _table, _x, header_lines

    res = record["results"]
    model = res["model"]
    bench = record["config"]["bench"]
    lines = header_lines(record, "Serving: TorchScript vs torch.export vs AOTInductor vs eager")
    lines += [
        f"Served model: {model['label']} (what {model['collapsed_from']} collapses to), "
        f"{model['tables']} tables x {max(model['rows_per_table']):,} rows, d = "
        f"{model['embedding_dim']}, DLRM ({model['interaction']}), bottom MLP "
        f"{model['dense_arch_layer_sizes']}, top MLP {model['over_arch_layer_sizes']}; one id per "
        f"feature; tables in TorchRec's quantized EBC (fbgemm inference TBE) except `eager, "
        f"TorchRec EBC`. CPU, {res['threads']} intra-op threads. {bench['repeats']} fresh worker "
        f"process(es) per format, {bench['windows']} interleaved rounds each; batch 1: "
        f"{res['latency_calls_per_round']} timed calls per round and predictor; batch 512 / 4096: "
        f"one window of {bench['steps_per_window']} calls per round and predictor.",
        "",
        "## Latency (batch 1, ms) and throughput (samples/s)",
        "",
    ]
    ratio = {
        (q["dtype"], q["ratio"].split(" / ")[0]): q
        for q in res["ratios"]
        if q["ratio"].endswith("/ TorchScript")
    }
    table = []
    for r in res["rows"]:
        if r["status"] != "ok":
            table.append([r["dtype"], r["label"], f"{r['status']}: {r['reason'][:120]}"] + [""] * 7)
            continue
        q = ratio.get((r["dtype"], r["label"]))
        table.append(
            [
                r["dtype"],
                r["label"],
                f"{r['latency_ms']['median']:.3f}",
                f"{r['latency_ms']['p90']:.3f} / {r['latency_ms']['p99']:.3f}",
                f"{r['throughput_512']['samples_per_s']:,.0f}",
                f"{r['throughput_4096']['samples_per_s']:,.0f}",
                " / ".join(
                    _x(q[k]) if q else "-"
                    for k in (
                        "speedup_latency_b1",
                        "speedup_throughput_512",
                        "speedup_throughput_4096",
                    )
                ),
                f"{r['max_abs_diff_vs_eager']:.1e}",
                f"{r['load_seconds']:.2f} / {_mib(r['load_rss_bytes'])}",
                "-" if r["build_seconds"] is None else f"{r['build_seconds']:.1f}",
            ]
        )
    lines += _table(
        [
            "tables",
            "predictor",
            "latency b1 median",
            "p90 / p99",
            "samples/s b512",
            "samples/s b4096",
            "vs TorchScript (b1 / b512 / b4096)",
            "max abs diff vs eager",
            "load s / RSS MiB",
            "build s",
        ],
        table,
    )
    lines += [
        "",
        "vs TorchScript: speed relative to the TorchScript predictor of the same tables (> 1x is "
        "faster: TorchScript's median latency / this one's; this one's samples/s / TorchScript's). "
        "Load: seconds and RSS increase when the worker loads (or, eager, builds) the predictor, "
        "in the table's order. Build: seconds to export / script / compile it.",
        "",
        "## Ratios",
        "",
    ]
    lines += _table(
        ["tables", "ratio", "latency b1", "throughput b512", "throughput b4096"],
        [
            [
                q["dtype"],
                q["ratio"],
                _x(q["speedup_latency_b1"]),
                _x(q["speedup_throughput_512"]),
                _x(q["speedup_throughput_4096"]),
            ]
            for q in res["ratios"]
        ],
    )
    if res.get("default_path"):
        lines += [
            "",
            "## The default serving path (`--predictor auto`) vs the targets",
            "",
            "Targets: batch-1 latency <= 1.2x TorchScript's (speed >= 0.83x), batch-4096 "
            "throughput >= 1.0x TorchScript's.",
            "",
        ]
        lines += _table(
            [
                "tables",
                "auto loads",
                "latency b1 ms (TorchScript)",
                "speed b1",
                "speed b4096",
                "targets",
            ],
            [
                [
                    d["dtype"],
                    d["label"],
                    f"{d['latency_ms_b1']:.3f} ({d['torchscript_latency_ms_b1']:.3f})",
                    _x(d["speedup_latency_b1"]),
                    _x(d["speedup_throughput_4096"]),
                    "met" if d["meets_targets"] else "NOT met",
                ]
                for d in res["default_path"]
            ],
        )
    lines += ["", "## Served-table memory per format (MiB)", ""]
    lines += _table(
        ["format", "tables", "held by the TBE", "predictor.pt2", "predictor.pt", "AOTI package"],
        [
            [
                m["dtype"],
                _mib(m["table_bytes"]),
                _mib(m["tbe_bytes"]),
                _mib(m["artifact_bytes"].get("export")),
                _mib(m["artifact_bytes"].get("torchscript")),
                _mib(m["artifact_bytes"].get("aoti")),
            ]
            for m in res["memory"]
        ],
    )
    lines += [
        "",
        "Tables: rows x bytes per row of the format (fp32 4d, fp16 2d, int8 d + 4). Held by the "
        "TBE: fbgemm's inference TBE pads every row to 16 bytes. fp16 is not timed.",
        "",
    ]
    return "\n".join(lines)


def serving_plots(record: dict[str, Any], stem: Path) -> list[Path]:
    """``<stem>.png``: latency, the two throughputs and the memory per format."""
    from benchmarks.report import MIB, _pyplot

    plt = _pyplot()
    res = record["results"]
    rows = [r for r in res["rows"] if r["status"] == "ok"]
    fig, axes = plt.subplots(1, 4, figsize=(20, 5))
    panels = [
        ("batch 1 latency (ms, median; lower is better)", lambda r: r["latency_ms"]["median"]),
        ("batch 512 (samples/s)", lambda r: r["throughput_512"]["samples_per_s"]),
        ("batch 4096 (samples/s)", lambda r: r["throughput_4096"]["samples_per_s"]),
    ]
    width = 0.38
    for ax, (title, value) in zip(axes, panels):
        for j, dtype in enumerate(res["dtypes"]):
            by = {r["predictor"]: r for r in rows if r["dtype"] == dtype}
            xs = [i + (j - 0.5) * width for i in range(len(res["predictors"]))]
            ys = [value(by[p]) if p in by else 0.0 for p in res["predictors"]]
            ax.bar(xs, ys, width, label=f"{dtype} tables")
        ax.set_xticks(range(len(res["predictors"])))
        ax.set_xticklabels([LABELS[p] for p in res["predictors"]], rotation=30, ha="right")
        ax.set_title(title)
        ax.legend()
    ax = axes[3]
    mem = res["memory"]
    kinds = [("table_bytes", "tables"), ("tbe_bytes", "held by the TBE")]
    for j, (key, label) in enumerate(kinds):
        xs = [i + (j - 0.5) * width for i in range(len(mem))]
        ax.bar(xs, [m[key] / MIB for m in mem], width, label=label)
    ax.set_xticks(range(len(mem)))
    ax.set_xticklabels([m["dtype"] for m in mem])
    ax.set_title("served tables (MiB)")
    ax.legend()
    fig.suptitle(
        f"Serving {res['model']['label']} — {record['hardware_tag']} {record['date']}"
        + (" (quick)" if record["quick"] else "")
    )
    fig.tight_layout()
    path = stem.with_name(stem.name + ".png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def record_serving_suite(
    args, overrides: list[str], argv: list[str], machine: dict, out: Path
) -> dict[str, Any]:
    """Runs the serving suite and writes its record (``python -m benchmarks.run --suite serving``
    and ``python -m benchmarks.serving_bench``): ``args`` and ``overrides`` from
    :func:`benchmarks.records.suite_arguments`, ``argv`` the runner's arguments."""
    cfg, bench = load_bench_config(args.config, overrides, quick=args.quick)
    record = base_record("serving", args, argv, machine)
    record["config"] = config_record(cfg, bench)
    start = time.perf_counter()
    record["results"] = run_serving_suite(
        cfg, bench, machine["cores"], progress=progress, quick=args.quick
    )
    record["seconds"] = time.perf_counter() - start
    record["status"] = "ok"
    plots = serving_plots(record, record_stem(record, out))
    record["files"] = {"plots": [p.name for p in plots]}
    write_record(record, out, serving_markdown(record))
    return record


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--worker" in argv:
        parser = argparse.ArgumentParser(prog="python -m benchmarks.serving_bench")
        parser.add_argument("--worker", required=True, help="spec JSON written by the suite")
        parser.add_argument("--result", required=True, help="where the worker writes its result")
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.WARNING)
        logging.getLogger("torchrec").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore")  # library notices, once per worker
        worker(args.worker, args.result)
        return 0
    args, overrides = suite_arguments(argv, "python -m benchmarks.serving_bench")
    out = prepare_run(args)
    record = record_serving_suite(
        args, overrides, ["--suite", "serving", *argv], machine_info(), out
    )
    files = record["files"]
    listed = [files["json"], files["markdown"], *files["plots"]]
    progress(f"serving: {record['status']}; wrote {', '.join(listed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
