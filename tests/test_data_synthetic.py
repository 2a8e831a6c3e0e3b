"""Oracle tests of the synthetic Criteo-format generator.

The written text is checked against a pure-Python formatting of the sampled rows, the parsed files
against the sampled values, the id skew against the closed-form Zipf law, and the teacher logit
against a per-row double loop over feature pairs.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

import mlet_dist.data.synthetic as synthetic_module
from mlet_dist.config import SyntheticConfig
from mlet_dist.data import build_teacher, read_criteo_tsv, teacher_logits
from mlet_dist.data.synthetic import (
    META_FILE_NAME,
    format_rows,
    generate_synthetic,
    sample_day,
)

RAW = [2**32] * 26  # hash sizes that keep the 32-bit hex values unchanged
CFG = SyntheticConfig(days=2, rows_per_day=3000, seed=7)


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("synthetic")
    return out, generate_synthetic(out, CFG, progress=False)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUC (scores are continuous, so ties do not matter)."""
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores)] = np.arange(1, len(scores) + 1)
    pos = labels == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def python_format(rows) -> bytes:
    """Row-by-row formatting with str() and f-strings, independent of the vectorized writer."""
    lines = []
    for i in range(len(rows)):
        fields = [str(int(rows.labels[i]))]
        for k in range(13):
            fields.append("" if rows.dense_missing[i, k] else str(int(rows.dense[i, k])))
        for j in range(26):
            h = int(rows.hashes[i, j])
            fields.append("" if h < 0 else f"{h:08x}")
        lines.append("\t".join(fields) + "\n")
    return "".join(lines).encode()


def test_files_meta_and_row_counts(generated):
    out, paths = generated
    assert [p.name for p in paths] == ["day_0.gz", "day_1.gz"]
    assert sorted(p.name for p in out.iterdir()) == ["day_0.gz", "day_1.gz", META_FILE_NAME]
    meta = json.loads((out / META_FILE_NAME).read_text())
    assert meta["config"] == dataclasses.asdict(CFG)
    for path, entry in zip(paths, meta["files"]):
        arrays = read_criteo_tsv(path, CFG.cardinalities)
        assert len(arrays) == CFG.rows_per_day == entry["rows"]
        assert int(arrays.labels.sum()) == entry["positives"]
        assert arrays.sparse.max() < max(CFG.cardinalities)
    assert 0.2 <= meta["positive_rate"] <= 0.3


def test_text_matches_python_formatting_and_reads_back(generated):
    _, paths = generated
    rows = sample_day(CFG, 1)
    text = gzip.decompress(paths[1].read_bytes())
    assert text == python_format(rows) == format_rows(rows)
    # Criteo's look: categorical fields are 8 lowercase hex digits or empty.
    first = text.split(b"\n", 1)[0].decode().split("\t")
    assert all(re.fullmatch(r"([0-9a-f]{8})?", f) for f in first[14:])

    arrays = read_criteo_tsv(paths[1], RAW)
    np.testing.assert_array_equal(arrays.labels, rows.labels)
    np.testing.assert_array_equal(arrays.sparse, np.where(rows.hashes < 0, 0, rows.hashes))
    clamped = np.where(rows.dense_missing, 0, np.maximum(rows.dense, 0))
    np.testing.assert_allclose(arrays.dense, np.log(clamped + 1.0), rtol=1e-6)
    # Some I2 values are -1, as in real Criteo; the rest are non-negative counts.
    assert (rows.dense[:, 1] == -1).any() and (np.delete(rows.dense, 1, axis=1) >= 0).all()


def test_missing_rates(generated):
    rows = sample_day(CFG, 0)
    assert abs(rows.dense_missing.mean() - CFG.dense_missing_rate) < 0.01
    assert abs((rows.ids < 0).mean() - CFG.sparse_missing_rate) < 0.005
    assert ((rows.ids < 0) == (rows.hashes < 0)).all()


def test_deterministic_and_days_independent(tmp_path, generated):
    _, paths = generated
    again = generate_synthetic(tmp_path / "again", CFG, progress=False)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]
    # Day 1 alone (a run with more days) and the teacher do not depend on the other days.
    more = dataclasses.replace(CFG, days=3)
    three = generate_synthetic(tmp_path / "three", more, progress=False)
    assert three[1].read_bytes() == paths[1].read_bytes()
    t_small = build_teacher(dataclasses.replace(CFG, rows_per_day=10, days=1))
    t_big = build_teacher(CFG)
    assert t_small.intercept == t_big.intercept
    assert all(np.array_equal(a, b) for a, b in zip(t_small.vectors, t_big.vectors))
    other = generate_synthetic(
        tmp_path / "other", dataclasses.replace(CFG, seed=8, days=1), progress=False
    )
    assert other[0].read_bytes() != paths[0].read_bytes()


def test_plain_output_equals_gzip_content(tmp_path, generated):
    _, paths = generated
    plain = generate_synthetic(tmp_path, dataclasses.replace(CFG, gzip=False), progress=False)
    assert [p.name for p in plain] == ["day_0", "day_1"]
    assert plain[0].read_bytes() == gzip.decompress(paths[0].read_bytes())


def test_ids_follow_zipf(generated):
    _, paths = generated
    arrays = read_criteo_tsv(paths[0], RAW)
    j = 0  # cat_0: 2000 distinct ids
    card, s = CFG.cardinalities[j], CFG.zipf_exponent
    values = arrays.sparse[:, j]
    counts = np.sort(np.unique(values[values != 0], return_counts=True)[1])[::-1]
    assert counts[0] >= 20 * np.median(counts)  # a few frequent ids, many rare ones
    # The share of the most frequent id matches the truncated power law, p(1) = 1 / H(card, s).
    harmonic = sum(k**-s for k in range(1, card + 1))
    expected = (1 - CFG.sparse_missing_rate) / harmonic
    assert abs(counts[0] / len(values) - expected) < 0.15 * expected
    assert (counts == 1).sum() > 100  # ids seen once in the day: the long tail


def test_teacher_logits_predict_labels(generated):
    _, paths = generated
    teacher = build_teacher(CFG)
    for path in paths:
        arrays = read_criteo_tsv(path, RAW)
        logits = teacher_logits(CFG, arrays.sparse, arrays.dense, teacher=teacher)
        assert auc(logits, arrays.labels) > 0.7
        # The click probability is calibrated: mean sigmoid(logit) ~ positive rate.
        prob = 1 / (1 + np.exp(-logits))
        assert abs(prob.mean() - arrays.labels.mean()) < 0.03


def test_teacher_logit_formula(generated):
    """Per-row double loop over feature pairs versus the vectorized (sum u)^2 - sum u^2 form."""
    _, paths = generated
    teacher = build_teacher(CFG)
    arrays = read_criteo_tsv(paths[0], RAW)
    rows = slice(0, 25)
    got = teacher_logits(CFG, arrays.sparse[rows], arrays.dense[rows], teacher=teacher)
    # Brute-force hash -> id tables (independent of the closed-form inverse).
    inverse = []
    for j, card in enumerate(CFG.cardinalities):
        ids = np.full((card, 26), -1, dtype=np.int64)
        ids[:, j] = np.arange(card)
        inverse.append({int(h): i for i, h in enumerate(teacher.hash_ids(ids)[:, j])})
    norm = math.sqrt(325 / CFG.teacher_rank)
    for r, want_row in zip(range(25), got):
        ids = [inverse[j].get(int(arrays.sparse[r, j])) for j in range(26)]
        pairs = 0.0
        for a in range(26):
            for b in range(a + 1, 26):
                if ids[a] is not None and ids[b] is not None:
                    pairs += float(teacher.vectors[a][ids[a]] @ teacher.vectors[b][ids[b]])
        biases = sum(float(teacher.biases[j][i]) for j, i in enumerate(ids) if i is not None)
        dense = float(arrays.dense[r].astype(np.float64) @ teacher.dense_weights)
        want = CFG.teacher_scale * pairs / norm + biases + dense + teacher.intercept
        assert want_row == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_interrupted_run_leaves_no_partial_file(tmp_path, monkeypatch):
    cfg = dataclasses.replace(CFG, days=1, rows_per_day=900)
    (path,) = generate_synthetic(tmp_path, cfg, progress=False)
    before = path.read_bytes()
    monkeypatch.setattr(synthetic_module, "_BLOCK_ROWS", 300)
    calls = 0
    real_format = synthetic_module.format_rows

    def failing_format(rows):
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt  # interrupted after one block was written
        return real_format(rows)

    monkeypatch.setattr(synthetic_module, "format_rows", failing_format)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic(tmp_path, dataclasses.replace(cfg, seed=99), progress=False)
    assert path.read_bytes() == before  # the old complete file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["day_0.gz", META_FILE_NAME]


def test_invalid_config(tmp_path):
    with pytest.raises(ValueError, match="26"):
        generate_synthetic(tmp_path, SyntheticConfig(cardinalities=[10] * 25), progress=False)
    with pytest.raises(ValueError, match="sparse_missing_rate"):
        build_teacher(SyntheticConfig(sparse_missing_rate=1.5))


def test_teacher_spectrum_decay():

    from mlet_dist.data.synthetic_teacher import build_teacher, teacher_spectrum

    np.testing.assert_allclose(teacher_spectrum(4, 0.0), np.ones(4))
    v = teacher_spectrum(4, 1.0) ** 2
    np.testing.assert_allclose(v / v[0], [1, 1 / 2, 1 / 3, 1 / 4])
    assert v.mean() == pytest.approx(1.0)
    # the drawn teacher vectors have that spectrum: component r's variance ~ (r+1)^-1 / rank
    cfg = dataclasses.replace(
        SyntheticConfig(), cardinalities=[20000] * 26, teacher_rank=8, teacher_spectrum_decay=1.0
    )
    u = np.concatenate(build_teacher(cfg).vectors)  # (26 * 20000, 8)
    want = teacher_spectrum(8, 1.0) ** 2 / 8
    np.testing.assert_allclose(u.var(axis=0), want, rtol=0.02)
    with pytest.raises(ValueError, match="teacher_spectrum_decay"):
        build_teacher(dataclasses.replace(cfg, teacher_spectrum_decay=-1.0))
