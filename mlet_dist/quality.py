"""Quality by id frequency: how well a model does on rows with rare ids.

MLET's gains concentrate on rare ids, so evaluation reports metrics overall and per frequency
bucket. A sample's frequency is that of its *rarest* id: for each categorical feature the number
of training rows holding the same (hashed) id, minimized over the sample's features. Buckets are
``≤10``, ``11–100``, ``101–1000`` and ``>1000`` by default.

Counting uses one ``np.bincount`` per feature over the hashed id space, so memory is bounded by
the table sizes (4 bytes per table row), not by the number of rows.
"""

from __future__ import annotations

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
