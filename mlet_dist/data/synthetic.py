"""Synthetic click data in the raw Criteo 1TB day-file format, labelled by a hidden low-rank teacher.

Each categorical feature j has ``cardinalities[j]`` distinct ids drawn from a truncated Zipf law
(rank 1 most frequent), so most ids are rare, as in real click logs. Every id is written as the
8-hex-digit image of a per-feature bijection of 32-bit integers (like Criteo's hashes), so the
file looks and parses exactly like a Criteo day file. The 13 integer features are heavy-tailed
counts (lognormal, rounded down; feature I2 is occasionally -1 as in real Criteo).

Labels come from a hidden "teacher": each (feature, id) has a vector ``u`` in R^rank drawn
N(0, 1/rank) and a scalar bias, independently of its frequency (rare ids carry as much signal as
frequent ones, which is what MLET is meant to exploit). For one row::

    logit = teacher_scale * sum_{i<j} <u_i, u_j> / sqrt(325 / rank)
            + sum_j bias_j + w . log(1 + max(dense, 0)) + intercept
    label ~ Bernoulli(sigmoid(logit))

The pairwise sum is what a DLRM dot interaction computes, so a DLRM with embedding_dim >= rank can
represent the teacher exactly. The intercept is calibrated for a ~25% positive rate. The teacher
depends only on the seed, the cardinalities, the rank and the scale (not on days or rows_per_day),
and day k is drawn from its own seeded generator, so any day is reproducible on its own.

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
import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm import tqdm

from mlet_dist.config import SyntheticConfig
from mlet_dist.data.arrays import CAT_FEATURE_COUNT, INT_FEATURE_COUNT
from mlet_dist.utils.files import atomic_write, check_output

logger = logging.getLogger(__name__)

__all__ = [
    "META_FILE_NAME",
    "SyntheticRows",
    "Teacher",
    "build_teacher",
    "day_file_name",
    "ensure_synthetic",
    "format_rows",
    "generate_synthetic",
    "sample_day",
    "teacher_logits",
]

META_FILE_NAME = "synthetic_meta.json"
"""Name of the JSON file describing a generated directory (config, rows and positives per day)."""

TARGET_POSITIVE_RATE = 0.25
"""Positive rate the teacher's intercept is calibrated for."""

_PAIRS = CAT_FEATURE_COUNT * (CAT_FEATURE_COUNT - 1) // 2  # 325 feature pairs
# Rows are drawn in blocks of this fixed size so that a day's content does not depend on anything
# but (seed, day, rows_per_day); changing it changes every generated file.
_BLOCK_ROWS = 1 << 16
_CALIBRATION_ROWS = 20_000
_I2_NEGATIVE_RATE = 0.05  # real Criteo I2 is -1 in a few percent of rows
_DENSE_WEIGHT_STD = 0.1
# Seed-sequence tags: each random stream gets its own (seed, tag, ...) key, so adding a stream
# never shifts another one.
_TAG_FEATURE, _TAG_HASH, _TAG_DENSE, _TAG_CALIBRATION, _TAG_DAY = 1, 2, 3, 4, 5
_MASK32 = (1 << 32) - 1
# _HEX_QUADS[v] holds, as raw bytes, the four lowercase hex digits of the 16-bit value v: one
# gather per half of a 32-bit hash formats it (much faster than per-digit arithmetic).
_HEX_QUADS = np.frombuffer(b"".join(b"%04x" % v for v in range(1 << 16)), dtype=np.uint32)
_POW10 = 10 ** np.arange(19, dtype=np.int64)


@dataclass
class Teacher:
    """The hidden model that labels synthetic rows (see the module docstring).

    Attributes:
        vectors: per feature, (cardinality, rank) float64 teacher vectors.
        biases: per feature, (cardinality,) float64 per-id biases.
        zipf_cdfs: per feature, the cumulative Zipf distribution over ids (rank order).
        hash_mult: (26,) odd 32-bit multipliers of the id -> hash bijection.
        hash_offset: (26,) 32-bit offsets of the bijection.
        hash_inverse: (26,) inverses of ``hash_mult`` modulo 2**32.
        dense_mu: (13,) lognormal location of each integer feature.
        dense_sigma: (13,) lognormal scale of each integer feature.
        dense_weights: (13,) weights of ``log(1 + max(x, 0))`` in the logit.
        scale: teacher_scale of the config.
        intercept: logit offset giving ~TARGET_POSITIVE_RATE positives.
    """

    vectors: list[np.ndarray]
    biases: list[np.ndarray]
    zipf_cdfs: list[np.ndarray]
    hash_mult: np.ndarray
    hash_offset: np.ndarray
    hash_inverse: np.ndarray
    dense_mu: np.ndarray
    dense_sigma: np.ndarray
    dense_weights: np.ndarray
    scale: float
    intercept: float = 0.0

    @property
    def rank(self) -> int:
        return int(self.vectors[0].shape[1])

    def hash_ids(self, ids: np.ndarray) -> np.ndarray:
        """Maps ids (N, 26) to their 32-bit hashes (int64); -1 (missing) stays -1."""
        h = (ids.astype(np.uint64) * self.hash_mult + self.hash_offset) & np.uint64(_MASK32)
        return np.where(ids < 0, -1, h.astype(np.int64))

    def unhash(self, hashes: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`hash_ids`; values that are no id of the feature (e.g. 0 = missing, as
        the reader reports it) give -1."""
        h = hashes.astype(np.int64) & _MASK32
        ids = ((h.astype(np.uint64) - self.hash_offset) * self.hash_inverse) & np.uint64(_MASK32)
        cards = np.array([v.shape[0] for v in self.vectors], dtype=np.uint64)
        return np.where((ids < cards) & (hashes >= 0), ids.astype(np.int64), -1)


@dataclass
class SyntheticRows:
    """Rows of synthetic data before formatting (what a day file contains).

    Attributes:
        labels: (N,) int8, 0 or 1.
        dense: (N, 13) int64 raw integer features (meaningless where ``dense_missing``).
        dense_missing: (N, 13) bool, True where the field is written empty.
        ids: (N, 26) int64 ids in Zipf rank order (0 = most frequent), -1 where missing.
        hashes: (N, 26) int64 32-bit hashes written as hex, -1 where missing.
        logits: (N,) float64 teacher logits the labels were drawn from.
    """

    labels: np.ndarray
    dense: np.ndarray
    dense_missing: np.ndarray
    ids: np.ndarray
    hashes: np.ndarray
    logits: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _validate(cfg: SyntheticConfig) -> None:
    if len(cfg.cardinalities) != CAT_FEATURE_COUNT:
        raise ValueError(
            f"synthetic.cardinalities has {len(cfg.cardinalities)} values; give one per "
            f"categorical feature ({CAT_FEATURE_COUNT})"
        )
    if any(c < 1 or c > 1 << 32 for c in cfg.cardinalities):
        raise ValueError("synthetic.cardinalities must be in [1, 2**32] (ids are 32-bit hashes)")
    if cfg.days < 0 or cfg.rows_per_day < 0:
        raise ValueError("synthetic.days and synthetic.rows_per_day must be >= 0")
    if cfg.teacher_rank < 1:
        raise ValueError(f"synthetic.teacher_rank must be >= 1, got {cfg.teacher_rank}")
    if cfg.teacher_spectrum_decay < 0:
        raise ValueError(
            f"synthetic.teacher_spectrum_decay must be >= 0, got {cfg.teacher_spectrum_decay}"
        )
    if cfg.zipf_exponent < 0:
        raise ValueError(f"synthetic.zipf_exponent must be >= 0, got {cfg.zipf_exponent}")
    for name in ("dense_missing_rate", "sparse_missing_rate"):
        rate = getattr(cfg, name)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"synthetic.{name} must be in [0, 1), got {rate}")
    if cfg.seed < 0:
        raise ValueError(f"synthetic.seed must be >= 0, got {cfg.seed}")


def _dense_log(dense: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """The reader's dense transform, log(1 + max(x, 0)) with missing = 0, as float32."""
    x = np.where(missing, 0, np.maximum(dense, 0)).astype(np.float64)
    return np.log1p(x).astype(np.float32)


def _raw_logits(teacher: Teacher, ids: np.ndarray, dense_log: np.ndarray) -> np.ndarray:
    """Teacher logit without the intercept; ids (N, 26) with -1 for missing."""
    n = ids.shape[0]
    total = np.zeros((n, teacher.rank))
    sq_norms = np.zeros(n)
    biases = np.zeros(n)
    for j, (vecs, bias) in enumerate(zip(teacher.vectors, teacher.biases)):
        present = ids[:, j] >= 0
        idx = np.where(present, ids[:, j], 0)
        u = vecs[idx] * present[:, None]  # a missing feature contributes a zero vector
        total += u
        sq_norms += np.einsum("nr,nr->n", u, u)
        biases += bias[idx] * present
    # sum_{i<j} <u_i, u_j> = (|sum u|^2 - sum |u|^2) / 2; each term has variance 1/rank.
    pairs = 0.5 * (np.einsum("nr,nr->n", total, total) - sq_norms)
    pairs /= math.sqrt(_PAIRS / teacher.rank)
    return teacher.scale * pairs + biases + dense_log.astype(np.float64) @ teacher.dense_weights


def _sample_features(
    teacher: Teacher, cfg: SyntheticConfig, rng: np.random.Generator, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draws (ids (n, 26) with -1 missing, dense (n, 13) int64, dense_missing (n, 13) bool)."""
    ids = np.empty((n, CAT_FEATURE_COUNT), dtype=np.int64)
    for j, cdf in enumerate(teacher.zipf_cdfs):
        ranks = np.searchsorted(cdf, rng.random(n), side="right")
        ids[:, j] = np.minimum(ranks, cdf.shape[0] - 1)  # guards float round-off at the top
    ids[rng.random((n, CAT_FEATURE_COUNT)) < cfg.sparse_missing_rate] = -1
    dense = np.floor(rng.lognormal(teacher.dense_mu, teacher.dense_sigma, (n, INT_FEATURE_COUNT)))
    dense = dense.astype(np.int64)
    dense[rng.random(n) < _I2_NEGATIVE_RATE, 1] = -1
    dense_missing = rng.random((n, INT_FEATURE_COUNT)) < cfg.dense_missing_rate
    return ids, dense, dense_missing


def _calibrate_intercept(logits: np.ndarray, target: float) -> float:
    """Intercept c with mean(sigmoid(logits + c)) = target, by bisection (monotone in c)."""
    lo, hi = -50.0, 50.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if np.mean(1.0 / (1.0 + np.exp(-(logits + mid)))) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def teacher_spectrum(rank: int, decay: float) -> np.ndarray:
    """Per-component scale of the teacher vectors: component r has variance proportional to
    ``(r + 1) ** -decay``, normalized so the variances average 1 (the expected squared norm of a
    teacher vector, hence the variance of each pair term, does not depend on ``decay``).

    Example::

        teacher_spectrum(4, 0.0)  # [1, 1, 1, 1]
        teacher_spectrum(4, 1.0) ** 2  # proportional to [1, 1/2, 1/3, 1/4], mean 1
    """
    var = np.arange(1, rank + 1, dtype=np.float64) ** -float(decay)
    return np.sqrt(var / var.mean())


def build_teacher(cfg: SyntheticConfig) -> Teacher:
    """Builds the hidden teacher of a config (deterministic in seed, cardinalities, rank, scale).

    Args:
        cfg: the synthetic data config; ``days`` and ``rows_per_day`` do not matter.

    Returns:
        The Teacher, with its intercept calibrated on a fixed-size sample.

    Raises:
        ValueError: an invalid config (wrong number of cardinalities, bad rates, ...).
    """
    _validate(cfg)
    rank = cfg.teacher_rank
    spectrum = teacher_spectrum(rank, cfg.teacher_spectrum_decay)
    vectors, biases, cdfs = [], [], []
    for j, card in enumerate(cfg.cardinalities):
        rng = np.random.default_rng([cfg.seed, _TAG_FEATURE, j])
        vectors.append(rng.normal(0.0, 1.0 / math.sqrt(rank), (card, rank)) * spectrum)
        biases.append(rng.normal(0.0, 1.0 / math.sqrt(CAT_FEATURE_COUNT), card))
        weights = np.arange(1, card + 1, dtype=np.float64) ** -cfg.zipf_exponent
        cdf = np.cumsum(weights)
        cdfs.append(cdf / cdf[-1])

    rng = np.random.default_rng([cfg.seed, _TAG_HASH])
    mult, offset, inverse = [], [], []
    for card in cfg.cardinalities:
        a = int(rng.integers(0, 1 << 31)) * 2 + 1  # odd, hence invertible modulo 2**32
        a_inv = pow(a, -1, 1 << 32)
        while True:
            b = int(rng.integers(0, 1 << 32))
            # The reader reports a missing categorical as 0, so no real id may hash to 0.
            if ((-b) * a_inv) & _MASK32 >= card:
                break
        mult.append(a)
        offset.append(b)
        inverse.append(a_inv)

    rng = np.random.default_rng([cfg.seed, _TAG_DENSE])
    teacher = Teacher(
        vectors=vectors,
        biases=biases,
        zipf_cdfs=cdfs,
        hash_mult=np.array(mult, dtype=np.uint64),
        hash_offset=np.array(offset, dtype=np.uint64),
        hash_inverse=np.array(inverse, dtype=np.uint64),
        dense_mu=rng.uniform(0.5, 3.5, INT_FEATURE_COUNT),
        dense_sigma=rng.uniform(0.5, 1.5, INT_FEATURE_COUNT),
        dense_weights=rng.normal(0.0, _DENSE_WEIGHT_STD, INT_FEATURE_COUNT),
        scale=float(cfg.teacher_scale),
    )
    rng = np.random.default_rng([cfg.seed, _TAG_CALIBRATION])
    ids, dense, missing = _sample_features(teacher, cfg, rng, _CALIBRATION_ROWS)
    raw = _raw_logits(teacher, ids, _dense_log(dense, missing))
    teacher.intercept = _calibrate_intercept(raw, TARGET_POSITIVE_RATE)
    return teacher


def teacher_logits(
    cfg: SyntheticConfig,
    sparse_hashes: np.ndarray,
    dense: np.ndarray,
    *,
    teacher: Teacher | None = None,
) -> np.ndarray:
    """Recomputes the teacher logits of rows read back from a synthetic file.

    Args:
        cfg: the config the file was generated with.
        sparse_hashes: (N, 26) unreduced categorical values, i.e. ``read_criteo_tsv(path,
            [2**32] * 26).sparse`` (0 = missing, as the reader reports it).
        dense: (N, 13) transformed integer features as the reader returns them
            (``log(1 + max(x, 0))``, missing = 0).
        teacher: the teacher of ``cfg`` if already built (saves rebuilding it).

    Returns:
        (N,) float64 logits; ``sigmoid`` of them is each row's click probability.

    Example::

        arrays = read_criteo_tsv(path, [2**32] * 26)
        auc_of(teacher_logits(cfg, arrays.sparse, arrays.dense), arrays.labels)  # well above 0.5
    """
    teacher = build_teacher(cfg) if teacher is None else teacher
    ids = teacher.unhash(np.asarray(sparse_hashes, dtype=np.int64))
    return _raw_logits(teacher, ids, np.asarray(dense, dtype=np.float32)) + teacher.intercept


def _sample_rows(
    teacher: Teacher, cfg: SyntheticConfig, rng: np.random.Generator, n: int
) -> SyntheticRows:
    ids, dense, dense_missing = _sample_features(teacher, cfg, rng, n)
    logits = _raw_logits(teacher, ids, _dense_log(dense, dense_missing)) + teacher.intercept
    labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logits))).astype(np.int8)
    return SyntheticRows(labels, dense, dense_missing, ids, teacher.hash_ids(ids), logits)


def _day_blocks(cfg: SyntheticConfig, day: int, teacher: Teacher):
    """Yields the SyntheticRows of one day, block by block (fixed block size)."""
    rng = np.random.default_rng([cfg.seed, _TAG_DAY, day])
    for start in range(0, cfg.rows_per_day, _BLOCK_ROWS):
        yield _sample_rows(teacher, cfg, rng, min(_BLOCK_ROWS, cfg.rows_per_day - start))


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
        return _sample_rows(teacher, cfg, np.random.default_rng(0), 0)
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


def _previous_output(out: Path, names: list[str]) -> str | None:
    """None when generating into ``out`` replaces nothing but a previous generator's output."""
    if not out.is_dir():
        return f"{out} exists and is not a directory"
    if (out / META_FILE_NAME).is_file():
        return None
    clash = [n for n in names if (out / n).exists()]
    if not clash:
        return None
    return (
        f"{out} holds {', '.join(clash)} but no {META_FILE_NAME}: not written by `mlet-dist "
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
        ValueError: an invalid config.

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
        previous=lambda p: _previous_output(p, names),
        hint="set data.dir to a new directory",
    )
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
    saved = json.loads(meta.read_text()).get("config") if meta.is_file() else None
    if saved == dataclasses.asdict(cfg):
        logger.info("using the synthetic data already in %s", data_dir)
        return False
    logger.info(
        "generating synthetic data into %s (%s)",
        data_dir, "config changed" if saved else "none there yet",
    )  # fmt: skip
    generate_synthetic(data_dir, cfg, progress=progress)
    return True
