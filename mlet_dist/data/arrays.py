"""The in-memory rows every reader produces: Criteo-layout numpy arrays, and their checks.

Criteo TSV (:mod:`mlet_dist.data.criteo`), Avazu CSV (:mod:`mlet_dist.data.avazu`) and MovieLens
(:mod:`mlet_dist.data.movielens`) all give :class:`CriteoArrays`: labels (N,), 13 dense features
(N, 13) and 26 categorical ids (N, 26) already reduced modulo their table sizes. A reader's
malformed input raises :class:`CriteoFormatError`.

Example::

    arrays = read_criteo_tsv("day_0.gz", num_embeddings_per_feature=[100_000] * 26)
    train, val, _ = split_arrays(arrays, eval_fraction=0.1, test_fraction=0.0)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torchrec.datasets.criteo import (
    CAT_FEATURE_COUNT,
    DEFAULT_CAT_NAMES,
    DEFAULT_INT_NAMES,
    INT_FEATURE_COUNT,
)

from mlet_dist.errors import MletError

__all__ = [
    "CAT_FEATURE_COUNT",
    "DEFAULT_CAT_NAMES",
    "DEFAULT_INT_NAMES",
    "INT_FEATURE_COUNT",
    "CriteoArrays",
    "CriteoFormatError",
    "check_table_sizes",
    "require_rows",
    "split_arrays",
    "split_sizes",
]


class CriteoFormatError(MletError, ValueError):
    """A Criteo TSV file is missing, unreadable or malformed.

    The message names the file, the 1-based line number (when there is one), what is wrong and how
    to fix it. ``path`` and ``line`` hold the same information for programs.
    """

    def __init__(self, message: str, *, path: str | Path | None = None, line: int | None = None):
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.line = line


@dataclass
class CriteoArrays:
    """Parsed, transformed Criteo rows held as numpy arrays (row i of each array is one sample).

    Attributes:
        labels: float32, shape (N,), 0.0 or 1.0.
        dense: float32, shape (N, 13), ``log(max(x, 0) + 1)`` of the integer features (missing = 0).
        sparse: int64, shape (N, 26), categorical ids already reduced modulo the table sizes.
    """

    labels: np.ndarray
    dense: np.ndarray
    sparse: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def slice(self, start: int, stop: int) -> CriteoArrays:
        """Returns rows ``start:stop`` (numpy views, no copy)."""
        return CriteoArrays(
            self.labels[start:stop], self.dense[start:stop], self.sparse[start:stop]
        )

    def take(self, rows: np.ndarray) -> CriteoArrays:
        """The rows at the indices ``rows`` (copies)."""
        return CriteoArrays(self.labels[rows], self.dense[rows], self.sparse[rows])

    @classmethod
    def concat(cls, parts: Sequence[CriteoArrays]) -> CriteoArrays:
        """Concatenates row-wise; an empty sequence gives zero rows."""
        if not parts:
            return cls.empty()
        return cls(
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.dense for p in parts]),
            np.concatenate([p.sparse for p in parts]),
        )

    @classmethod
    def empty(cls) -> CriteoArrays:
        """Zero rows with the right dtypes and trailing shapes."""
        return cls(
            np.zeros(0, np.float32),
            np.zeros((0, INT_FEATURE_COUNT), np.float32),
            np.zeros((0, CAT_FEATURE_COUNT), np.int64),
        )


def check_table_sizes(num_embeddings_per_feature: Sequence[int]) -> np.ndarray:
    """The 26 hash sizes as uint64, for the modulo of the parsed ids.

    Raises:
        ValueError: not 26 values, or a value that is not a positive integer below 2**63.
    """
    sizes = list(num_embeddings_per_feature)
    if len(sizes) != CAT_FEATURE_COUNT:
        raise ValueError(
            f"num_embeddings_per_feature has {len(sizes)} values but Criteo has "
            f"{CAT_FEATURE_COUNT} categorical features (C1..C26): give one hash size per feature "
            f"(data.num_embeddings_per_feature)"
        )
    bad = [(j, s) for j, s in enumerate(sizes) if isinstance(s, bool) or int(s) != s or s <= 0]
    if bad:
        j, s = bad[0]
        raise ValueError(
            f"num_embeddings_per_feature[{j}] (cat_{j}) = {s!r}: hash sizes must be positive integers"
        )
    if max(sizes) > 2**63 - 1:
        raise ValueError("num_embeddings_per_feature values must be < 2**63 (int64 ids)")
    return np.asarray(sizes, dtype=np.uint64)


def require_rows(arrays: CriteoArrays, path: str | Path) -> CriteoArrays:
    """Returns ``arrays``, or raises a CriteoFormatError naming ``path`` when it has no rows.

    The readers accept an empty file (zero rows, e.g. for preprocessing); training, evaluation
    and prediction refuse one, since it is almost always a wrong or truncated path.
    """
    if len(arrays) == 0:
        raise CriteoFormatError(
            f"{path}: the file is empty (no data rows); check the path, or remove it from the "
            f"list of files",
            path=path,
        )
    return arrays


def split_sizes(n: int, eval_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, eval, test) row counts of :func:`split_arrays` for ``n`` rows."""
    n_eval = round(n * eval_fraction)
    n_test = round(n * test_fraction)
    return n - n_eval - n_test, n_eval, n_test


def check_fractions(eval_fraction: float, test_fraction: float) -> None:
    """Raises ValueError unless both fractions are in [0, 1) and leave training rows."""
    for name, frac in (("eval_fraction", eval_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {frac}")
    if eval_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"eval_fraction + test_fraction = {eval_fraction + test_fraction} leaves no training "
            f"rows; make their sum < 1"
        )


def split_arrays(
    arrays: CriteoArrays, eval_fraction: float, test_fraction: float
) -> tuple[CriteoArrays, CriteoArrays, CriteoArrays]:
    """Splits rows contiguously into (train, eval, test), in that order.

    Criteo data is chronological, so the held-out rows are the latest ones, as in the usual
    Criteo protocol (train on the past, evaluate on the future).

    Args:
        arrays: all rows.
        eval_fraction: fraction of rows (rounded) in the eval split, in [0, 1).
        test_fraction: fraction of rows (rounded) in the test split, after eval, in [0, 1).

    Returns:
        (train, eval, test) views; sizes add up to ``len(arrays)``.

    Raises:
        ValueError: a fraction outside [0, 1) or fractions summing to 1 or more.
    """
    check_fractions(eval_fraction, test_fraction)
    n_train, n_eval, _ = split_sizes(len(arrays), eval_fraction, test_fraction)
    n = len(arrays)
    return (
        arrays.slice(0, n_train),
        arrays.slice(n_train, n_train + n_eval),
        arrays.slice(n_train + n_eval, n),
    )
