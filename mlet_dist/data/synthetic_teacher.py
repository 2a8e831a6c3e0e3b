"""The hidden low-rank teacher that labels the synthetic rows of :mod:`mlet_dist.data.synthetic`.

Labels come from a hidden "teacher": each (feature, id) has a vector ``u`` in R^rank drawn
N(0, 1/rank) and a scalar bias, independently of its frequency (rare ids carry as much signal as
frequent ones, which is what MLET is meant to exploit). For one row::

    logit = teacher_scale * sum_{i<j} <u_i, u_j> / sqrt(325 / rank)
            + sum_j bias_j + w . log(1 + max(dense, 0)) + intercept
    label ~ Bernoulli(sigmoid(logit))

The pairwise sum is what a DLRM dot interaction computes, so a DLRM with embedding_dim >= rank can
represent the teacher exactly. The intercept is calibrated for a ~25% positive rate. The teacher
depends only on the seed, the cardinalities, the rank and the scale (not on days or rows_per_day).

Example::

    teacher = build_teacher(SyntheticConfig(seed=7))
    rows = sample_rows(teacher, cfg, np.random.default_rng(0), 1000)  # labelled, hashed rows
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mlet_dist.config import ConfigError, SyntheticConfig
from mlet_dist.data.arrays import CAT_FEATURE_COUNT, INT_FEATURE_COUNT

__all__ = [
    "TAG_DAY",
    "TARGET_POSITIVE_RATE",
    "SyntheticRows",
    "Teacher",
    "build_teacher",
    "calibrate_intercept",
    "check_sampling",
    "sample_rows",
    "teacher_logits",
    "teacher_spectrum",
]

TARGET_POSITIVE_RATE = 0.25
"""Positive rate the teacher's intercept is calibrated for."""

_PAIRS = CAT_FEATURE_COUNT * (CAT_FEATURE_COUNT - 1) // 2  # 325 feature pairs
_CALIBRATION_ROWS = 20_000
_I2_NEGATIVE_RATE = 0.05  # real Criteo I2 is -1 in a few percent of rows
_DENSE_WEIGHT_STD = 0.1
# Seed-sequence tags: each random stream gets its own (seed, tag, ...) key, so adding a stream
# never shifts another one.
_TAG_FEATURE, _TAG_HASH, _TAG_DENSE, _TAG_CALIBRATION, TAG_DAY = 1, 2, 3, 4, 5
_MASK32 = (1 << 32) - 1


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
        raise ConfigError(
            f"synthetic.cardinalities has {len(cfg.cardinalities)} values; give one per "
            f"categorical feature ({CAT_FEATURE_COUNT})"
        )
    if any(c < 1 or c > 1 << 32 for c in cfg.cardinalities):
        raise ConfigError("synthetic.cardinalities must be in [1, 2**32] (ids are 32-bit hashes)")
    check_sampling(cfg)


def check_sampling(cfg: SyntheticConfig) -> None:
    """Refuses invalid sampling keys of ``[synthetic]`` (all but the Criteo cardinalities).

    Raises:
        ConfigError: the message names the key and its valid range.
    """
    if cfg.days < 0 or cfg.rows_per_day < 0:
        raise ConfigError("synthetic.days and synthetic.rows_per_day must be >= 0")
    if cfg.teacher_rank < 1:
        raise ConfigError(f"synthetic.teacher_rank must be >= 1, got {cfg.teacher_rank}")
    if cfg.teacher_spectrum_decay < 0:
        raise ConfigError(
            f"synthetic.teacher_spectrum_decay must be >= 0, got {cfg.teacher_spectrum_decay}"
        )
    if cfg.zipf_exponent < 0:
        raise ConfigError(f"synthetic.zipf_exponent must be >= 0, got {cfg.zipf_exponent}")
    for name in ("dense_missing_rate", "sparse_missing_rate"):
        rate = getattr(cfg, name)
        if not 0.0 <= rate < 1.0:
            raise ConfigError(f"synthetic.{name} must be in [0, 1), got {rate}")
    if cfg.seed < 0:
        raise ConfigError(f"synthetic.seed must be >= 0, got {cfg.seed}")


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


def calibrate_intercept(logits: np.ndarray, target: float) -> float:
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
        ConfigError: an invalid config (wrong number of cardinalities, bad rates, ...).
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
    teacher.intercept = calibrate_intercept(raw, TARGET_POSITIVE_RATE)
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


def sample_rows(
    teacher: Teacher, cfg: SyntheticConfig, rng: np.random.Generator, n: int
) -> SyntheticRows:
    """Draws ``n`` rows from ``rng``: features, teacher logits, labels ~ Bernoulli(sigmoid), hashes."""
    ids, dense, dense_missing = _sample_features(teacher, cfg, rng, n)
    logits = _raw_logits(teacher, ids, _dense_log(dense, dense_missing)) + teacher.intercept
    labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logits))).astype(np.int8)
    return SyntheticRows(labels, dense, dense_missing, ids, teacher.hash_ids(ids), logits)
