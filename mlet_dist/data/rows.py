"""The in-memory rows of a declared schema: dense features and per-feature (multi-hot) ids.

:class:`FeatureRows` is what the readers of a declared schema produce
(:mod:`mlet_dist.data.columns`); :class:`~mlet_dist.data.arrays.CriteoArrays` stays the Criteo
fast path. Both have the same row interface (``len``, ``slice``, ``take``, ``concat``), so the
splits, batching and the batch sources handle either.

Layout: a feature's ids are a padded (N, max_length) int64 matrix plus an (N,) int32 length per
row (ids past the length are 0 and ignored). The schema declares the maximum length, so padding
costs at most that much, and row selection (shuffling, splitting) is one numpy gather per array.

Sample weights (``data.weight``): an optional float32 (N,) array that follows the rows through
every selection; its batches are :class:`WeightedBatch` (a TorchRec ``Batch`` with ``weights``).

Example::

    rows.take(np.array([3, 1])).to_batch()  # a TorchRec Batch of rows 3 and 1
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

__all__ = ["FeatureRows", "WeightedBatch"]


@dataclass
class WeightedBatch(Batch):
    """A TorchRec ``Batch`` with per-sample ``weights`` (B,) float32 (``data.weight``).

    ``Pipelineable`` as ``Batch`` is: TorchRec's train and eval pipelines copy batches with
    ``to``, keep them alive on side streams with ``record_stream`` and pin them with
    ``pin_memory``; each moves the weights with the other tensors.
    """

    weights: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> WeightedBatch:
        b = super().to(device, non_blocking=non_blocking)
        weights = self.weights.to(device=device, non_blocking=non_blocking)
        return WeightedBatch(b.dense_features, b.sparse_features, b.labels, weights)

    def record_stream(self, stream: torch.Stream) -> None:
        super().record_stream(stream)
        self.weights.record_stream(stream)

    def pin_memory(self) -> WeightedBatch:
        b = super().pin_memory()
        weights = self.weights.pin_memory()
        return WeightedBatch(b.dense_features, b.sparse_features, b.labels, weights)


@dataclass
class FeatureRows:
    """Rows of a declared schema (row i of every array is one sample).

    Attributes:
        labels: float32 (N,).
        dense: float32 (N, W): the transformed dense features, or one constant 1.0 column when
            the schema has none (:attr:`mlet_dist.schema.FeatureSchema.dense_in_features`).
        ids: per categorical feature (model order), int64 (N, max_length), already table rows.
        lengths: per categorical feature, int32 (N,): ids used in each row (0 = empty bag).
        names: the categorical feature names (the KJT keys), in the order of ``ids``.
        weights: float32 (N,) sample weights (``data.weight``), or None (unweighted).
    """

    labels: np.ndarray
    dense: np.ndarray
    ids: list[np.ndarray]
    lengths: list[np.ndarray]
    names: tuple[str, ...]
    weights: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def slice(self, start: int, stop: int) -> FeatureRows:
        """Rows ``start:stop`` (views)."""
        return FeatureRows(
            self.labels[start:stop],
            self.dense[start:stop],
            [a[start:stop] for a in self.ids],
            [a[start:stop] for a in self.lengths],
            self.names,
            None if self.weights is None else self.weights[start:stop],
        )

    def take(self, rows: np.ndarray) -> FeatureRows:
        """The rows at the indices ``rows`` (copies)."""
        return FeatureRows(
            self.labels[rows],
            self.dense[rows],
            [a[rows] for a in self.ids],
            [a[rows] for a in self.lengths],
            self.names,
            None if self.weights is None else self.weights[rows],
        )

    @classmethod
    def concat(cls, parts: Sequence[FeatureRows]) -> FeatureRows:
        """Row-wise concatenation of rows of one schema (at least one part)."""
        if len(parts) == 1:
            return parts[0]
        width = [max(p.ids[j].shape[1] for p in parts) for j in range(len(parts[0].ids))]

        def pad(a: np.ndarray, w: int) -> np.ndarray:
            return a if a.shape[1] == w else np.pad(a, ((0, 0), (0, w - a.shape[1])))

        weighted = {p.weights is not None for p in parts}
        if len(weighted) > 1:
            raise ValueError("concat: some parts have sample weights and others not")

        return cls(
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.dense for p in parts]),
            [np.concatenate([pad(p.ids[j], w) for p in parts]) for j, w in enumerate(width)],
            [np.concatenate([p.lengths[j] for p in parts]) for j in range(len(width))],
            parts[0].names,
            np.concatenate([p.weights for p in parts]) if weighted == {True} else None,
        )

    @property
    def sparse(self) -> np.ndarray:
        """(N, F) int64: each feature's first id (0 for an empty bag): the Criteo-layout view
        (the per-id-frequency buckets count every id of a bag, :mod:`mlet_dist.quality`)."""
        if not self.ids:
            return np.zeros((len(self), 0), np.int64)
        first = [np.where(n > 0, a[:, 0], 0) for a, n in zip(self.ids, self.lengths)]
        return np.stack(first, axis=1)

    def jagged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values int64, lengths int32) in the KeyedJaggedTensor layout: feature-major, a
        feature's ids sample by sample."""
        values, lengths = [], []
        for a, n in zip(self.ids, self.lengths):
            mask = np.arange(a.shape[1])[None, :] < n[:, None]
            values.append(a[mask])  # row-major: sample 0's ids, then sample 1's, ...
            lengths.append(n.astype(np.int32, copy=False))
        v = np.concatenate(values) if values else np.zeros(0, np.int64)
        n = np.concatenate(lengths) if lengths else np.zeros(0, np.int32)
        return torch.from_numpy(v.astype(np.int64, copy=False)), torch.from_numpy(n)

    def to_batch(self) -> Batch:
        """A TorchRec ``Batch`` of all rows (dense (B, W), a KJT of the features, labels); a
        :class:`WeightedBatch` when the rows have weights."""
        values, lengths = self.jagged()
        kjt = KeyedJaggedTensor(
            keys=list(self.names), values=values, lengths=lengths, stride=len(self)
        )
        batch = Batch(
            dense_features=torch.from_numpy(np.ascontiguousarray(self.dense, dtype=np.float32)),
            sparse_features=kjt,
            labels=torch.from_numpy(np.ascontiguousarray(self.labels, dtype=np.float32)),
        )
        if self.weights is None:
            return batch
        weights = torch.from_numpy(np.ascontiguousarray(self.weights, dtype=np.float32))
        return WeightedBatch(batch.dense_features, kjt, batch.labels, weights)

    def serving_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dense, values, lengths): the served predictor's inputs for these rows."""
        values, lengths = self.jagged()
        dense = torch.from_numpy(np.ascontiguousarray(self.dense, dtype=np.float32))
        return dense, values, lengths
