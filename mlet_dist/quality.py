"""Quality by id frequency: how well a model does on rows with rare ids.

MLET's gains concentrate on rare ids, so evaluation reports metrics overall and per frequency
bucket. A sample's frequency is that of its *rarest* id: for each categorical feature the number
of times the same (hashed) id occurs in that feature in the training rows, minimized over the
sample's features. A multi-hot feature (a bag of ids, declared schemas) counts every id of every
bag and takes part with every id of the sample's bag; an empty bag (a missing value) takes no
part, and a sample with no id at all counts 0. Buckets are ``≤10``, ``11–100``, ``101–1000`` and
``>1000`` by default.

Counting uses one ``np.bincount`` per feature over the hashed id space, so memory is bounded by
the table sizes (4 bytes per table row), not by the number of rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mlet_dist.metrics import binary_metrics

DEFAULT_BUCKET_EDGES = (10, 100, 1000)


def id_counts(sparse: np.ndarray, table_sizes: list[int]) -> list[np.ndarray]:
    """Occurrences of every hashed id in the training rows, per feature (int32 arrays)."""
    return [
        np.bincount(sparse[:, j], minlength=size).astype(np.int32)
        for j, size in enumerate(table_sizes)
    ]


def rarest_id_count(sparse: np.ndarray, counts: list[np.ndarray]) -> np.ndarray:
    """For each row, the training count of its rarest id (min over features)."""
    per_feature = np.stack([counts[j][sparse[:, j]] for j in range(sparse.shape[1])], axis=1)
    return per_feature.min(axis=1)


def bag_id_counts(
    ids: Sequence[np.ndarray], lengths: Sequence[np.ndarray], table_sizes: Sequence[int]
) -> list[np.ndarray]:
    """:func:`id_counts` of bags: per feature a padded (rows, max_length) id matrix and the
    bags' lengths (as :class:`mlet_dist.data.rows.FeatureRows` holds them); every id counts."""
    out = []
    for a, n, size in zip(ids, lengths, table_sizes):
        valid = np.arange(a.shape[1])[None, :] < n[:, None]
        out.append(np.bincount(a[valid], minlength=size).astype(np.int32))
    return out


def training_id_counts(rows, table_sizes: Sequence[int]) -> list[np.ndarray]:
    """Id counts of the training rows: bags (rows with ``lengths``, a declared schema) or the
    Criteo (N, F) id matrix."""
    if getattr(rows, "lengths", None) is not None:
        return bag_id_counts(rows.ids, rows.lengths, table_sizes)
    return id_counts(rows.sparse, list(table_sizes))


def rarest_bag_id_count(
    values: Sequence[np.ndarray], lengths: Sequence[np.ndarray], counts: list[np.ndarray]
) -> np.ndarray:
    """For each row, the training count of its rarest id over every id of every feature's bag
    (per feature: the flat ids of the rows' bags in row order and each bag's length); rows
    without any id count 0."""
    rows = len(lengths[0]) if lengths else 0
    none = np.iinfo(np.int64).max
    out = np.full(rows, none, dtype=np.int64)
    for v, n, c in zip(values, lengths, counts):
        if v.size:
            np.minimum.at(out, np.repeat(np.arange(rows), n), c[v].astype(np.int64))
    out[out == none] = 0
    return out


def bucket_names(edges: tuple[int, ...] = DEFAULT_BUCKET_EDGES) -> list[str]:
    lows = [0, *[e + 1 for e in edges]]
    names = [f"<={edges[0]}"]
    names += [f"{lo}-{hi}" for lo, hi in zip(lows[1:], edges[1:])]
    names.append(f">{edges[-1]}")
    return names


def bucket_of(rarest: np.ndarray, edges: tuple[int, ...] = DEFAULT_BUCKET_EDGES) -> np.ndarray:
    """Bucket index of each row: 0 for count ≤ edges[0], …, len(edges) for > edges[-1]."""
    return np.searchsorted(np.asarray(edges), rarest, side="left")


def bucket_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    rarest: np.ndarray,
    edges: tuple[int, ...] = DEFAULT_BUCKET_EDGES,
    weights: torch.Tensor | None = None,
) -> dict[str, dict[str, float]]:
    """AUC / log loss / NE of the rows in each frequency bucket (rows = 0 buckets included),
    weighted by ``weights`` when given (:func:`mlet_dist.metrics.binary_metrics`)."""
    buckets = torch.from_numpy(bucket_of(rarest, edges))
    out = {}
    for i, name in enumerate(bucket_names(edges)):
        mask = buckets == i
        out[name] = binary_metrics(
            logits[mask], labels[mask], None if weights is None else weights[mask]
        )
    return out
