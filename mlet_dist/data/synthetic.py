"""Synthetic click data in the raw Criteo 1TB day-file format, labelled by a hidden low-rank teacher.

Each categorical feature j has ``cardinalities[j]`` distinct ids drawn from a truncated Zipf law
(rank 1 most frequent), so most ids are rare, as in real click logs. Every id is written as the
8-hex-digit image of a per-feature bijection of 32-bit integers (like Criteo's hashes), so the
file looks and parses exactly like a Criteo day file. The 13 integer features are heavy-tailed
counts (lognormal, rounded down; feature I2 is occasionally -1 as in real Criteo). Labels come
from a hidden teacher (:mod:`mlet_dist.data.synthetic_teacher`). Day k is drawn from its own
seeded generator, so any day is reproducible on its own.

Example::

    paths = generate_synthetic("data/synthetic", SyntheticConfig(days=2, rows_per_day=20_000))
    arrays = read_criteo_tsv(paths[0], DEFAULT_SYNTHETIC_CARDINALITIES)
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm import tqdm

from mlet_dist.config import SyntheticConfig
from mlet_dist.data.arrays import CAT_FEATURE_COUNT, INT_FEATURE_COUNT
from mlet_dist.data.synthetic_teacher import (
    TAG_DAY,
    TARGET_POSITIVE_RATE,
    SyntheticRows,
    Teacher,
    build_teacher,
    sample_rows,
)
from mlet_dist.utils.files import atomic_write, check_output
from mlet_dist.utils.locks import OutputLock

logger = logging.getLogger(__name__)

__all__ = [
    "META_FILE_NAME",
    "day_file_name",
    "ensure_synthetic",
    "format_rows",
    "generate_synthetic",
    "previous_output",
    "sample_day",
]

META_FILE_NAME = "synthetic_meta.json"
"""Name of the JSON file describing a generated directory (config, rows and positives per day)."""

# Rows are drawn in blocks of this fixed size so that a day's content does not depend on anything
# but (seed, day, rows_per_day); changing it changes every generated file.
_BLOCK_ROWS = 1 << 16
# _HEX_QUADS[v] holds, as raw bytes, the four lowercase hex digits of the 16-bit value v: one
# gather per half of a 32-bit hash formats it (much faster than per-digit arithmetic).
_HEX_QUADS = np.frombuffer(b"".join(b"%04x" % v for v in range(1 << 16)), dtype=np.uint32)
_POW10 = 10 ** np.arange(19, dtype=np.int64)


def _day_blocks(cfg: SyntheticConfig, day: int, teacher: Teacher):
    """Yields the SyntheticRows of one day, block by block (fixed block size)."""
    rng = np.random.default_rng([cfg.seed, TAG_DAY, day])
    for start in range(0, cfg.rows_per_day, _BLOCK_ROWS):
        yield sample_rows(teacher, cfg, rng, min(_BLOCK_ROWS, cfg.rows_per_day - start))


def sample_day(cfg: SyntheticConfig, day: int, *, teacher: Teacher | None = None) -> SyntheticRows:
    """Draws the rows of day ``day`` (exactly what ``generate_synthetic`` writes for it).

    Args:
        cfg: the synthetic config (``rows_per_day`` rows are drawn).
        day: day index, >= 0; each day has its own seeded generator.
        teacher: the teacher of ``cfg`` if already built.

    Returns:
        The day's rows.
    """
    teacher = build_teacher(cfg) if teacher is None else teacher
    blocks = list(_day_blocks(cfg, day, teacher))
    if not blocks:
        return sample_rows(teacher, cfg, np.random.default_rng(0), 0)
    return SyntheticRows(
        *(
            np.concatenate([getattr(b, f.name) for b in blocks])
            for f in dataclasses.fields(blocks[0])
        )
    )


def format_rows(rows: SyntheticRows) -> bytes:
    """Formats rows as Criteo TSV text (40 tab-separated fields, LF endings), vectorized.

    Every row is first laid out in fixed-width slots (one per field, wide enough for the longest
    value of the block, followed by its separator) with a mask of the bytes that belong to the
    text; masking out the padding gives the variable-length lines in one pass.

    Args:
        rows: the rows; missing fields are written empty, hashes as 8 lowercase hex digits.

    Returns:
        The ASCII text, ending with a newline (empty for zero rows).
    """
    n = len(rows)
    if n == 0:
        return b""
    neg = rows.dense < 0
    absolute = np.abs(rows.dense)
    ndigits = np.maximum(np.searchsorted(_POW10, absolute, side="right"), 1)
    dense_len = np.where(rows.dense_missing, 0, ndigits + neg)  # text length incl. the sign
    dw = int(dense_len.max(initial=0))
    dense_end = 2 + INT_FEATURE_COUNT * (dw + 1)
    width = dense_end + CAT_FEATURE_COUNT * 9
    full = np.empty((n, width), dtype=np.uint8)
    keep = np.empty((n, width), dtype=bool)

    full[:, 0] = ord("0") + rows.labels.astype(np.uint8)
    full[:, 1] = ord("\t")
    keep[:, :2] = True

    # Dense slots: the value right-aligned in dw bytes, then a tab. (Splitting the contiguous last
    # axis of a column slice is always a view, so writing into `text`/`mask` fills `full`/`keep`.)
    text = full[:, 2:dense_end].reshape(n, INT_FEATURE_COUNT, dw + 1)
    mask = keep[:, 2:dense_end].reshape(n, INT_FEATURE_COUNT, dw + 1)
    for k in range(dw):  # k-th digit from the right
        text[:, :, dw - 1 - k] = ord("0") + (absolute // _POW10[k]) % 10
        mask[:, :, dw - 1 - k] = dense_len > k
    r, c = np.nonzero(neg & ~rows.dense_missing)
    text[r, c, dw - 1 - ndigits[r, c]] = ord("-")
    text[:, :, dw] = ord("\t")
    mask[:, :, dw] = True

    # Categorical slots: 8 hex digits (four per 16-bit half of the hash), then a tab.
    text = full[:, dense_end:].reshape(n, CAT_FEATURE_COUNT, 9)
    mask = keep[:, dense_end:].reshape(n, CAT_FEATURE_COUNT, 9)
    halves = np.stack([(rows.hashes >> 16) & 0xFFFF, rows.hashes & 0xFFFF], axis=-1)
    text[:, :, :8] = _HEX_QUADS[halves].view(np.uint8).reshape(n, CAT_FEATURE_COUNT, 8)
    mask[:, :, :8] = (rows.hashes >= 0)[:, :, None]
    text[:, :, 8] = ord("\t")
    text[:, -1, 8] = ord("\n")
    mask[:, :, 8] = True
    return full[keep].tobytes()


def day_file_name(day: int, gzip_output: bool) -> str:
    """``day_{day}.gz`` or ``day_{day}``, as in the Criteo 1TB release."""
    return f"day_{day}.gz" if gzip_output else f"day_{day}"


# Written via a temporary file in the same directory and renamed over the final name, so an
# interrupted run never leaves a partial file under the final name.
_write_atomically = atomic_write


def previous_output(out: Path, names: list[str]) -> str | None:
    """None when generating into ``out`` replaces nothing but a previous generator's output."""
    if not out.is_dir():
        return f"{out} exists and is not a directory"
    if (out / META_FILE_NAME).is_file():
        return None
    clash = [n for n in names if (out / n).exists()]
    if not clash:
        return None
    return (
        f"{out} holds {', '.join(clash[:3])} but no {META_FILE_NAME}: not written by `mlet-dist "
        f"generate`, and would be overwritten"
    )


def generate_synthetic(
    out_dir: str | Path, cfg: SyntheticConfig, *, progress: bool = True
) -> list[Path]:
    """Writes ``cfg.days`` synthetic day files in the Criteo raw TSV format, plus a meta file.

    Files are ``day_0.gz`` ... (``day_0`` ... when ``cfg.gzip`` is False) with
    ``cfg.rows_per_day`` rows each, and ``synthetic_meta.json`` (the config, rows and positives
    per day, the teacher intercept). Existing files of the same names are replaced; each appears
    atomically. Output is byte-for-byte deterministic in the config.

    Args:
        out_dir: output directory (created if needed).
        cfg: what to generate.
        progress: show a tqdm progress bar over rows.

    Returns:
        The day file paths, in day order.

    Raises:
        ConfigError: an invalid config.

    Example::

        paths = generate_synthetic("data/synthetic", SyntheticConfig(days=1, rows_per_day=1000))
        read_criteo_tsv(paths[0], SyntheticConfig().cardinalities)  # 1000 rows
    """
    out = Path(out_dir)
    teacher = build_teacher(cfg)
    names = [day_file_name(day, cfg.gzip) for day in range(cfg.days)] + [META_FILE_NAME]
    check_output(
        out,
        what="synthetic day files",
        previous=lambda p: previous_output(p, names),
        hint="set data.dir to a new directory",
    )
    with OutputLock(out, "generate", what="synthetic day files"):
        return _write_days(out, cfg, teacher, progress)


def _write_days(out: Path, cfg: SyntheticConfig, teacher: Teacher, progress: bool) -> list[Path]:
    """:func:`generate_synthetic` once its output is checked and locked."""
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    files_meta = []
    bar = tqdm(
        total=cfg.days * cfg.rows_per_day, unit="rows", unit_scale=True, disable=not progress
    )
    with bar:
        for day in range(cfg.days):
            path = out / day_file_name(day, cfg.gzip)
            positives = 0

            def write(f: BinaryIO, day: int = day, path: Path = path) -> None:
                nonlocal positives
                # mtime=0 and a fixed name keep the gzip header, hence the bytes, deterministic.
                stream = (
                    gzip.GzipFile(
                        filename=path.name, mode="wb", compresslevel=1, fileobj=f, mtime=0
                    )
                    if cfg.gzip
                    else contextlib.nullcontext(f)
                )
                # Compression (zlib releases the GIL) runs in a helper thread while the next
                # block is drawn and formatted; blocks are still written strictly in order.
                with stream as s, ThreadPoolExecutor(1) as writer:
                    pending: Future[int] | None = None
                    for rows in _day_blocks(cfg, day, teacher):
                        text = format_rows(rows)
                        if pending is not None:
                            pending.result()
                        pending = writer.submit(s.write, text)
                        positives += int(rows.labels.sum())
                        bar.update(len(rows))
                    if pending is not None:
                        pending.result()

            _write_atomically(path, write)
            paths.append(path)
            files_meta.append({"file": path.name, "rows": cfg.rows_per_day, "positives": positives})
            logger.debug("wrote %s (%d rows, %d positives)", path, cfg.rows_per_day, positives)

    total_rows = cfg.days * cfg.rows_per_day
    total_pos = sum(f["positives"] for f in files_meta)
    meta = {
        "format": "criteo-tsv",
        "generator": "mlet_dist.data.synthetic",
        "config": dataclasses.asdict(cfg),
        "files": files_meta,
        "rows": total_rows,
        "positives": total_pos,
        "positive_rate": total_pos / total_rows if total_rows else 0.0,
        "target_positive_rate": TARGET_POSITIVE_RATE,
        "teacher_intercept": teacher.intercept,
    }
    text = json.dumps(meta, indent=2).encode() + b"\n"
    _write_atomically(out / META_FILE_NAME, lambda f: f.write(text))

    written = {p.name for p in paths}
    stale = sorted(
        p.name for p in out.glob("day_*") if p.name not in written and not p.name.startswith(".")
    )
    if stale:
        logger.warning(
            "%s also holds day files this run did not write (%s); remove them so that readers of "
            "the directory do not mix runs",
            out,
            ", ".join(stale),
        )
    logger.info(
        "generated %d day files x %d rows in %s (positive rate %.3f)",
        cfg.days,
        cfg.rows_per_day,
        out,
        meta["positive_rate"],
    )
    return paths


def ensure_synthetic(data_dir: str | Path, cfg: SyntheticConfig, progress: bool = True) -> bool:
    """Generates the day files into ``data_dir`` unless it already holds them for this config
    (its meta file records the config they were made with). Returns True when it generated."""
    meta = Path(data_dir) / META_FILE_NAME
    saved = json.loads(meta.read_text()) if meta.is_file() else {}
    # (a declared schema's generator writes the same meta file name with its own format)
    criteo = saved.get("format", "criteo-tsv") == "criteo-tsv"
    saved = saved.get("config") if criteo else None
    if saved == dataclasses.asdict(cfg):
        logger.info("using the synthetic data already in %s", data_dir)
        return False
    logger.info(
        "generating synthetic data into %s (%s)",
        data_dir, "config changed" if saved else "none there yet",
    )  # fmt: skip
    generate_synthetic(data_dir, cfg, progress=progress)
    return True
