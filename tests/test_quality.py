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
