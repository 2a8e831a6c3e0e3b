"""The preprocessing job: checks, manifest, the two passes over the parts, and the summary."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mlet_dist.config import ConfigError, DataConfig, check_feature_count
from mlet_dist.data.arrays import CAT_FEATURE_COUNT, DEFAULT_CAT_NAMES, DEFAULT_INT_NAMES
from mlet_dist.data.parquet import FORMAT_VERSION, parquet_schema
from mlet_dist.data.preprocess.counts import count_part, merge_counts
from mlet_dist.data.preprocess.parts import (
    SPLITS,
    STATE,
    Part,
    PreprocessSettings,
    count_lines,
    counts_path,
    is_done,
    part_seen_path,
    part_state_path,
    plan_parts,
)
from mlet_dist.data.preprocess.pool import Workers
from mlet_dist.data.preprocess.schema import preprocess_schema
from mlet_dist.data.preprocess.write import write_part
from mlet_dist.data.sources import source_of
from mlet_dist.schema import FeatureSchema
from mlet_dist.utils.files import atomic_write_json, check_output
from mlet_dist.utils.locks import OutputLock

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"


def _file_identity(path: str) -> dict[str, Any]:
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _previous_output(out: Path) -> str | None:
    """None when ``out`` may be written to: an empty directory or a previous preprocessing output."""
    if not out.is_dir():
        return f"{out} exists and is not a directory"
    if (out / STATE / "manifest.json").is_file() or not any(out.iterdir()):
        return None
    return (
        f"{out} exists and is not a previous `mlet-dist preprocess` output (no "
        f"{STATE}/manifest.json)"
    )


def _check_manifest(out: Path, manifest: dict[str, Any]) -> None:
    path = out / STATE / "manifest.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diffs = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
        if diffs:
            raise ConfigError(
                f"{out} holds preprocessing output of other settings or inputs (differing: "
                f"{', '.join(diffs)}); use another output directory or delete {out}"
            )
    else:
        atomic_write_json(path, manifest)


def _line_counts(out: Path, pool: Workers, max_rows: int):
    """Line counting with a cache in _state/line_counts.json (keyed by file identity)."""
    cache_path = out / STATE / "line_counts.json"

    def counts(paths: list[str]) -> list[int]:
        cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
        keys = [json.dumps([_file_identity(p), max_rows]) for p in paths]
        todo = [p for p, k in zip(paths, keys) if k not in cache]
        if todo:
            results = pool.run(count_lines, [(p, max_rows) for p in todo], "count lines")
            logger.info("counted the lines of %d file(s) for the split", len(todo))
            for p, n in zip(todo, results):
                cache[json.dumps([_file_identity(p), max_rows])] = n
            atomic_write_json(cache_path, cache)
        return [cache[k] for k in keys]

    return counts


def _distinct(out: Path, parts: list[Part]) -> dict[str, dict[str, int | None]]:
    """Distinct ids per feature in each split and overall, from the parts' bitmaps (None for
    tables too large to keep a bitmap of)."""
    result: dict[str, list[int | None]] = {s: [] for s in (*SPLITS, "all")}
    for name in DEFAULT_CAT_NAMES:
        union: dict[str, np.ndarray] = {}
        for part in parts:
            with np.load(part_seen_path(out, part)) as z:
                bits = z[name]
            for key in (part.split, "all"):
                union[key] = bits if key not in union else union[key] | bits
        for key in result:
            bits = union.get(key)
            count = (
                None
                if bits is not None and bits.size == 0
                else int(np.bitwise_count(bits).sum())
                if bits is not None
                else 0
            )
            result[key].append(count)
    return {
        k: dict(zip(DEFAULT_CAT_NAMES, v))
        for k, v in result.items()
        if k == "all" or any(p.split == k for p in parts)
    }


def _throughput(stats: list[dict[str, Any]], seconds: float) -> dict[str, Any] | None:
    """Throughput of the parts a pass processed in this run (None if it processed none).

    ``mb_per_s``: decompressed input MB per second of the pass (all processes together);
    ``mb_per_s_per_process``: the same per busy process (input MB over the parts' own seconds);
    memory: the worker processes' peak resident set, and their resident set when they started
    the part (the shared imports, torch included) for comparison.
    """
    if not stats:
        return None
    mb = sum(st["input_bytes"] for st in stats) / 1e6
    busy = sum(st["seconds"] for st in stats)
    before = [st["rss_before_mb"] for st in stats if st.get("rss_before_mb") is not None]
    return {
        "parts": len(stats),
        "rows": sum(st["rows"] for st in stats),
        "input_mb": mb,
        "seconds": seconds,
        "mb_per_s": mb / seconds if seconds > 0 else None,
        "mb_per_s_per_process": mb / busy if busy > 0 else None,
        "peak_rss_mb_per_process": max(st["peak_rss_mb"] for st in stats),
        "rss_at_part_start_mb": min(before) if before else None,
    }


def _remove_stale_temporaries(out: Path) -> None:
    stale = [p for p in out.rglob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink()
    if stale:
        logger.info("removed %d temporary file(s) of an interrupted run in %s", len(stale), out)


def preprocess(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    settings: PreprocessSettings,
    *,
    eval_files: Sequence[str | Path] = (),
    workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Preprocesses raw Criteo TSV files into Parquet shards; resumes an interrupted run.

    Args:
        inputs: raw files (plain or gzip), in chronological order.
        out_dir: output directory (layout in the module docstring).
        settings: what to produce.
        eval_files: files forming the eval split as a whole (optional).
        workers: processes (0 = as many as CPUs, at most one per part; 1 = in this process).
        progress: show progress bars with rows/s.

    Returns:
        The summary, also written to ``OUT/summary.json``: rows, positives and bad rows per split,
        distinct ids per feature, the per-part statistics and throughput.

    Raises:
        CriteoFormatError: a missing or truncated input, or a malformed line under 'error'
            (file and line are named).
        ConfigError: bad settings, duplicate input names, or an output directory that holds a
            run of other settings.
        OutputPathError: ``out_dir`` is, holds or lies inside an input, a run, a checkpoint or
            a serving directory, or holds something else.
        OutputLockedError: another process is writing ``out_dir``.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    inputs = [str(p) for p in inputs]
    eval_files = [str(p) for p in eval_files]
    for path in inputs + eval_files:
        if not Path(path).is_file():
            raise ConfigError(f"input {path} does not exist or is not a file")
    out = check_output(
        out,
        what="the preprocessed data",
        inputs=[*inputs, *eval_files],
        previous=_previous_output,
        hint="choose another output directory (--out, data.parquet_dir)",
    )  # resolved: a symlink --out is the directory it points to
    with OutputLock(out, "preprocess", what="the preprocessed data"):
        return _preprocess_into(out, inputs, eval_files, settings, workers, progress, t0)


def _preprocess_into(
    out: Path,
    inputs: list[str],
    eval_files: list[str],
    settings: PreprocessSettings,
    workers: int,
    progress: bool,
    t0: float,
) -> dict[str, Any]:
    """:func:`preprocess` once its output is checked and locked."""
    workers = workers or os.cpu_count() or 1
    manifest = {
        "format_version": FORMAT_VERSION,
        "inputs": [_file_identity(p) for p in inputs],
        "eval_files": [_file_identity(p) for p in eval_files],
        **dataclasses.asdict(settings),
        "num_embeddings_per_feature": list(settings.num_embeddings_per_feature),
    }
    _check_manifest(out, manifest)  # the first write, after every check above
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)

    with Workers(workers, progress) as pool:
        mode, parts = plan_parts(
            inputs,
            eval_fraction=settings.eval_fraction,
            test_fraction=settings.test_fraction,
            eval_files=eval_files,
            max_rows=settings.max_rows,
            line_counts=_line_counts(out, pool, settings.max_rows),
        )
        logger.info(
            "preprocessing %d file(s) into %d part(s) (%s split) in %s",
            len(inputs) + len(eval_files),
            len(parts),
            mode,
            out,
        )
        frequent_per_feature, count_stats, count_seconds = _count_ids(pool, out, parts, settings)

        todo = [(p, str(out), settings) for p in parts if not is_done(out, p)]
        if len(todo) < len(parts):
            logger.info(
                "%d of %d part(s) are already done; skipping them",
                len(parts) - len(todo),
                len(parts),
            )
        t_write = time.perf_counter()
        pool.run(write_part, todo, "preprocess", total=_rows([t[0] for t in todo]))
        write_seconds = time.perf_counter() - t_write

    part_stats = [json.loads(part_state_path(out, p).read_text()) for p in parts]
    done_now = {t[0].key for t in todo}
    summary = _summary(
        out, settings, inputs, eval_files, mode, parts, part_stats, frequent_per_feature
    )
    summary["run"] = {
        "workers": min(workers, max(len(todo), 1)),
        "parts_written": len(todo),
        "parts_skipped": len(parts) - len(todo),
        "seconds": time.perf_counter() - t0,
        "count": _throughput(count_stats, count_seconds),
        "write": _throughput(
            [st for p, st in zip(parts, part_stats) if p.key in done_now], write_seconds
        ),
    }
    summary["parts"] = part_stats
    atomic_write_json(out / SUMMARY_FILE, summary)
    logger.info(
        "preprocessed %d rows (%d bad) into %s: %s",
        summary["rows"],
        summary["bad_rows"],
        out,
        ", ".join(f"{k} {v['rows']}" for k, v in summary["splits"].items()),
    )
    return summary


def _rows(parts: list[Part]) -> int | None:
    """The lines of ``parts`` (the total of a progress bar), None where one runs to the end of
    its file (its length was not counted)."""
    if any(p.stop == 0 for p in parts):
        return None
    return sum(p.stop - p.start for p in parts)


def _count_ids(
    pool: Workers, out: Path, parts: list[Any], settings: PreprocessSettings
) -> tuple[list[Any] | None, list[dict[str, Any]], float]:
    """Under ``data.frequency_threshold``: counts the training parts' ids (resumable, per part)
    and merges the counts; returns (frequent ids per feature, per-part stats, seconds)."""
    if not settings.frequency_threshold:
        return None, [], 0.0
    counter_bytes = sum(settings.num_embeddings_per_feature) * (
        1 if settings.frequency_threshold <= 255 else 2
    )
    logger.info(
        "frequency threshold %d: counting ids of the training lines (%.2f GB of counters "
        "per process)",
        settings.frequency_threshold,
        counter_bytes / 1e9,
    )
    train_parts = [p for p in parts if p.split == "train"]
    jobs = [(p, str(out), settings) for p in train_parts if not counts_path(out, p).is_file()]
    t_count = time.perf_counter()
    count_stats = pool.run(count_part, jobs, "count ids", total=_rows([j[0] for j in jobs]))
    count_seconds = time.perf_counter() - t_count
    return merge_counts(out, train_parts, settings), count_stats, count_seconds


def _summary(
    out: Path,
    settings: PreprocessSettings,
    inputs: list[str],
    eval_files: list[str],
    mode: str,
    parts: list[Any],
    part_stats: list[dict[str, Any]],
    frequent_per_feature: list[Any] | None,
) -> dict[str, Any]:
    """``OUT/summary.json`` without its "run" and "parts" entries: rows, positives and bad rows
    per split, the schema, distinct and frequent ids per feature."""
    splits: dict[str, dict[str, Any]] = {}
    for part, st in zip(parts, part_stats):
        s = splits.setdefault(part.split, {"rows": 0, "positives": 0, "bad_rows": 0, "files": []})
        s["rows"] += st["rows"]
        s["positives"] += st["positives"]
        s["bad_rows"] += st["bad_rows"]
        s["files"].append(st["file"])
    sparse_type = parquet_schema(settings.num_embeddings_per_feature).field("cat_0").type
    return {
        "format": "mlet_dist criteo parquet",
        "format_version": FORMAT_VERSION,
        "split_mode": mode,
        "settings": {
            **dataclasses.asdict(settings),
            "num_embeddings_per_feature": list(settings.num_embeddings_per_feature),
        },
        "inputs": inputs,
        "eval_files": eval_files,
        "schema": {
            "label": "int8",
            "dense": f"float32 x{len(DEFAULT_INT_NAMES)} ({DEFAULT_INT_NAMES[0]}..{DEFAULT_INT_NAMES[-1]}), log(1 + max(x, 0))",
            "sparse": f"{sparse_type} x{CAT_FEATURE_COUNT} ({DEFAULT_CAT_NAMES[0]}..{DEFAULT_CAT_NAMES[-1]})",
        },
        "rows": sum(s["rows"] for s in splits.values()),
        "positives": sum(s["positives"] for s in splits.values()),
        "bad_rows": sum(s["bad_rows"] for s in splits.values()),
        "splits": splits,
        "quarantine": [st["quarantine"] for st in part_stats if st["quarantine"]],
        "distinct_ids_per_feature": _distinct(out, parts),
        "frequent_ids_per_feature": (
            dict(zip(DEFAULT_CAT_NAMES, frequent_per_feature)) if frequent_per_feature else None
        ),
    }


def preprocess_from_config(
    data_cfg: DataConfig,
    *,
    inputs: Sequence[str | Path] | None = None,
    out_dir: str | Path | None = None,
    workers: int = 0,
    progress: bool = True,
    schema: FeatureSchema | None = None,
) -> dict[str, Any]:
    """Runs :func:`preprocess` with the settings of a [data] section (through its declared
    ``schema`` when there is one; :func:`~mlet_dist.schema.schema_of` when not given).

    Inputs default to the configured raw data: the synthetic day files in ``data.dir`` (source =
    'synthetic') or ``data.train_files``; ``data.eval_files`` become the eval split. The output
    defaults to ``data.parquet_dir``.

    Raises:
        ConfigError: no inputs or no output directory; a source other than Criteo TSV;
            not 26 table sizes.
    """
    source = source_of(data_cfg, schema)
    if source.schema.criteo and not source.preprocessable:
        raise ConfigError(
            f"mlet-dist preprocess reads Criteo TSV only, not data.source = {source.name!r}: "
            f"train, run and evaluate read that source into memory (no preprocessing needed); "
            f"for Criteo TSV inputs set --data.source=criteo"
        )
    check_feature_count(data_cfg)
    if inputs is None:
        inputs = source.preprocess_inputs()
    out_dir = out_dir or data_cfg.parquet_dir
    if not out_dir:
        raise ConfigError("no output directory: pass --out DIR or set data.parquet_dir")
    if data_cfg.sparse:  # a declared feature schema: its own (streamed, one-process) pass
        return preprocess_schema(data_cfg, inputs, out_dir, progress, schema=source.schema)
    return preprocess(
        inputs,
        out_dir,
        PreprocessSettings.from_config(data_cfg),
        eval_files=data_cfg.eval_files,
        workers=workers,
        progress=progress,
    )
