"""Avazu CSV reader vs a hand-written parse of the real sample."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from mlet_dist.data import CriteoFormatError
from mlet_dist.data.avazu import DEFAULT_AVAZU_TABLE_SIZES, read_avazu_csv

SAMPLE = Path(__file__).resolve().parents[2] / "shared/data/avazu_sample"
PART1 = SAMPLE / "avazu_train_part1_8999rows_header.csv.gz"
PART2 = SAMPLE / "avazu_train_part2_1000rows_noheader.csv.gz"
pytestmark = pytest.mark.skipif(
    not PART1.exists(), reason=f"{SAMPLE} absent (fresh clone without ../shared)"
)


def reference(path: Path, sizes: list[int]):
    rows = []
    for line in gzip.open(path, "rt").read().splitlines():
        f = line.split(",")
        if f[0] == "id":
            continue
        ids = []
        for j, v in enumerate(f[3:]):
            x = int(v, 16) if 5 <= j + 3 <= 13 else int(v)
            ids.append((x % 2**32) % sizes[j])
        ids.append(int(f[2][6:8]) % sizes[21])
        rows.append((float(f[1]), [*ids, 0, 0, 0, 0]))
    return rows


@pytest.mark.parametrize("path,n,positives", [(PART1, 8999, 1563), (PART2, 1000, 143)])
def test_reader_matches_reference(path, n, positives):
    sizes = DEFAULT_AVAZU_TABLE_SIZES
    arrays = read_avazu_csv(path, sizes)
    ref = reference(path, sizes)
    assert len(arrays) == n == len(ref)
    assert int(arrays.labels.sum()) == positives
    for i, (label, ids) in enumerate(ref):
        assert arrays.labels[i] == label
        assert arrays.sparse[i].tolist() == ids
    assert not arrays.dense.any()


def test_bad_row_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.csv"
    lines = gzip.open(PART2, "rt").read().splitlines()[:3]
    lines[2] = lines[2].replace(",1005,", ",x1005,", 1)
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(CriteoFormatError, match=r"bad.csv:3: column C1"):
        read_avazu_csv(bad, DEFAULT_AVAZU_TABLE_SIZES)
