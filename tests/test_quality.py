"""Frequency buckets against a hand-counted reference."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from mlet_dist.metrics import binary_metrics
from mlet_dist.quality import bucket_metrics, bucket_names, id_counts, rarest_id_count


def test_rarest_id_count_matches_counter():
    rng = np.random.default_rng(0)
    train = rng.zipf(1.5, size=(500, 3)) % 50
    evals = rng.integers(0, 50, size=(40, 3))
    counts = id_counts(train, [50, 50, 50])
    ref = [Counter(train[:, j].tolist()) for j in range(3)]
    expected = [min(ref[j][row[j]] for j in range(3)) for row in evals.tolist()]
    assert rarest_id_count(evals, counts).tolist() == expected


def test_bucket_metrics_split_rows_by_rarest_count():
    assert bucket_names() == ["<=10", "11-100", "101-1000", ">1000"]
    rarest = np.array([0, 10, 11, 100, 101, 1000, 1001, 5, 50, 5000])
    logits = torch.linspace(-2, 2, 10)
    labels = torch.tensor([0, 1, 0, 1, 1, 0, 1, 0, 1, 1.0])
    got = bucket_metrics(logits, labels, rarest)
    groups = {"<=10": [0, 1, 7], "11-100": [2, 3, 8], "101-1000": [4, 5], ">1000": [6, 9]}
    for name, rows in groups.items():
        idx = torch.tensor(rows)
        assert got[name]["rows"] == len(rows)
        assert got[name]["log_loss"] == binary_metrics(logits[idx], labels[idx])["log_loss"]


def test_bag_buckets_count_every_id_of_a_bag():
    """Multi-hot bags: counts over every id of every training bag; a row's rarest id over every
    id of its bags, empty bags ignored, a row without ids 0 — against a Counter, both from rows in
    memory and from the KJT of a batch (the evaluation loop's path)."""
    from mlet_dist.data.rows import FeatureRows
    from mlet_dist.quality import bag_id_counts, rarest_bag_id_count, training_id_counts
    from mlet_dist.train.evaluation import rarest_of_batch

    rng = np.random.default_rng(3)

    def rows(n: int) -> FeatureRows:
        ids = [rng.zipf(1.4, size=(n, 4)) % 30, rng.integers(0, 12, size=(n, 1))]
        lengths = [rng.integers(0, 5, n).astype(np.int32), rng.integers(0, 2, n).astype(np.int32)]
        for a, m in zip(ids, lengths):
            a[np.arange(a.shape[1])[None, :] >= m[:, None]] = 0  # padding, as the readers write
        return FeatureRows(
            rng.integers(0, 2, n).astype(np.float32), np.ones((n, 1), np.float32), ids, lengths,
            ("tags", "site"),
        )  # fmt: skip

    train, held_out = rows(400), rows(60)
    bags = [
        [a[i, : m[i]].tolist() for i in range(len(m))] for a, m in zip(train.ids, train.lengths)
    ]
    ref = [Counter(v for bag in feature for v in bag) for feature in bags]
    counts = training_id_counts(train, [30, 12])
    assert [c.tolist() for c in counts] == [[r[v] for v in range(s)] for r, s in zip(ref, (30, 12))]
    assert [c.tolist() for c in counts] == [
        c.tolist() for c in bag_id_counts(train.ids, train.lengths, [30, 12])
    ]

    want = []
    for i in range(len(held_out)):
        seen = [
            ref[j][v]
            for j, (a, m) in enumerate(zip(held_out.ids, held_out.lengths))
            for v in a[i, : m[i]].tolist()
        ]
        want.append(min(seen) if seen else 0)
    assert 0 in [int(m.sum()) for m in np.stack(held_out.lengths, 1)]  # a row without ids exists
    flat = [
        a[np.arange(a.shape[1])[None, :] < m[:, None]]
        for a, m in zip(held_out.ids, held_out.lengths)
    ]
    assert rarest_bag_id_count(flat, held_out.lengths, counts).tolist() == want
    batch = held_out.to_batch()
    assert rarest_of_batch(batch.sparse_features, len(held_out), counts).tolist() == want
