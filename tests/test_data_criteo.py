"""Oracle tests of the Criteo TSV reader and of TorchRec batching.

The reader is compared with a line-by-line pure-Python parse written here (no numpy tricks), on
the real Criteo samples in ../shared/data and on small hand-made files.
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import mlet_dist.data.criteo as criteo_module
from mlet_dist.config import DEFAULT_SYNTHETIC_CARDINALITIES, MLPERF_40M_TABLE_SIZES
from mlet_dist.data import (
    DEFAULT_CAT_NAMES,
    CriteoArrays,
    CriteoFormatError,
    make_batches,
    num_batches,
    read_criteo_tsv,
    split_arrays,
)

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "shared/data/criteo_kaggle_sample"
KAGGLE = SAMPLE_DIR / "criteo_kaggle_train_first10k.tsv.gz"
TERABYTE = SAMPLE_DIR / "criteo_1tb_day0_first1000.tsv.gz"
RAW = [2**32] * 26  # hash sizes that keep the 32-bit hex values unchanged


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path.name}: ../shared/data absent (fresh clone): {path} does not exist")
    return path


def reference_parse(path: Path, sizes: list[int], max_rows: int = 0) -> CriteoArrays:
    """The obvious per-line parse of the Criteo format, as in facebookresearch/dlrm."""
    with open(path, "rb") as f:
        is_gzip = f.read(2) == b"\x1f\x8b"
    opener = gzip.open if is_gzip else open
    labels, dense, sparse = [], [], []
    with opener(path, "rt", newline="") as f:
        for line in f:
            if max_rows and len(labels) == max_rows:
                break
            fields = line.rstrip("\n").rstrip("\r").split("\t")
            assert len(fields) == 40
            labels.append(float(int(fields[0])))
            dense.append([math.log(max(int(x), 0) + 1) if x else 0.0 for x in fields[1:14]])
            sparse.append([int(x, 16) % sizes[j] if x else 0 for j, x in enumerate(fields[14:])])
    return CriteoArrays(
        np.array(labels, dtype=np.float32).reshape(-1),
        np.array(dense, dtype=np.float64).reshape(-1, 13),
        np.array(sparse, dtype=np.int64).reshape(-1, 26),
    )


def assert_same(got: CriteoArrays, want: CriteoArrays) -> None:
    assert got.labels.dtype == np.float32 and got.dense.dtype == np.float32
    assert got.sparse.dtype == np.int64
    assert got.labels.shape == want.labels.shape
    assert got.dense.shape == want.dense.shape and got.sparse.shape == want.sparse.shape
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_array_equal(got.sparse, want.sparse)
    np.testing.assert_allclose(got.dense, want.dense, rtol=1e-6, atol=1e-7)


# A valid row: label, I1..I13 (with a missing I12 and a negative I2), C1..C26 (C3 missing).
GOOD_FIELDS = (
    ["1", "3", "-1", "5", "0", "1382", "4", "15", "2", "181", "1", "2", "", "2"]
    + ["68fd1e64", "80e26c9b", ""]
    + [f"{(0x9E3779B1 * (j + 1)) & 0xFFFFFFFF:08x}" for j in range(23)]
)


def good_line(label: str = "1") -> str:
    return "\t".join([label, *GOOD_FIELDS[1:]])


def write_lines(path: Path, lines: list[str], newline: str = "\n", final_newline: bool = True):
    text = newline.join(lines) + (newline if final_newline else "")
    path.write_bytes(text.encode())
    return path


# ---------------------------------------------------------------- real Criteo samples


@pytest.mark.parametrize(
    "sizes",
    [RAW, list(MLPERF_40M_TABLE_SIZES), list(DEFAULT_SYNTHETIC_CARDINALITIES)],
    ids=["raw", "mlperf", "synthetic"],
)
def test_kaggle_sample_matches_reference(sizes):
    path = require(KAGGLE)
    assert_same(read_criteo_tsv(path, sizes), reference_parse(path, sizes))


def test_kaggle_sample_known_facts():
    """Facts recorded in PROVENANCE.md, independent of any parser."""
    arrays = read_criteo_tsv(require(KAGGLE), RAW)
    assert len(arrays) == 10_000
    assert int(arrays.labels.sum()) == 2182
    # Row 1 is the well-known "0 1 1 5 0 1382 4 15 2 181 1 2 _ 2 68fd1e64 80e26c9b ...".
    assert arrays.labels[0] == 0.0
    ints = [1, 1, 5, 0, 1382, 4, 15, 2, 181, 1, 2, 0, 2]
    np.testing.assert_allclose(arrays.dense[0], np.log(np.array(ints, np.float64) + 1), rtol=1e-6)
    assert arrays.sparse[0, 0] == 0x68FD1E64 and arrays.sparse[0, 1] == 0x80E26C9B
    # Missing categorical values are read as 0; PROVENANCE lists the missing count of C1..C26.
    missing = [0, 0, 357, 357, 0, 1332, 0, 0, 0, 0, 0, 357, 0, 0, 0, 357, 0, 0, 4496, 4496, 357]
    missing += [8182, 0, 357, 4496, 4496]
    assert (arrays.sparse == 0).sum(axis=0).tolist() == missing


def test_terabyte_sample_matches_reference():
    path = require(TERABYTE)
    got = read_criteo_tsv(path, list(MLPERF_40M_TABLE_SIZES))
    assert len(got) == 1000 and int(got.labels.sum()) == 21
    assert_same(got, reference_parse(path, list(MLPERF_40M_TABLE_SIZES)))


def test_max_rows_and_small_chunks(monkeypatch):
    """Chunk boundaries fall mid-line; the carried partial lines must be reassembled."""
    path = require(KAGGLE)
    monkeypatch.setattr(criteo_module, "_CHUNK_BYTES", 4099)
    assert_same(read_criteo_tsv(path, RAW, max_rows=777), reference_parse(path, RAW, 777))
    assert len(read_criteo_tsv(path, RAW, max_rows=1)) == 1


# ---------------------------------------------------------------- small files, formats


def test_plain_gzip_crlf_and_no_final_newline_agree(tmp_path):
    lines = [good_line("1"), good_line("0"), good_line("1")]
    plain = write_lines(tmp_path / "a.tsv", lines)
    want = reference_parse(plain, RAW)
    crlf = write_lines(tmp_path / "crlf.tsv", lines, newline="\r\n")
    no_final = write_lines(tmp_path / "nofinal.tsv", lines, final_newline=False)
    gz_no_suffix = tmp_path / "compressed_without_suffix.tsv"  # detected by magic bytes
    gz_no_suffix.write_bytes(gzip.compress(plain.read_bytes()))
    plain_with_gz_suffix = tmp_path / "plain.gz"
    plain_with_gz_suffix.write_bytes(plain.read_bytes())
    for path in (plain, crlf, no_final, gz_no_suffix, plain_with_gz_suffix):
        assert_same(read_criteo_tsv(path, RAW), want)
    got = read_criteo_tsv(plain, RAW)
    assert got.labels.tolist() == [1.0, 0.0, 1.0]
    assert got.dense[0, 1] == 0.0  # I2 = -1 is clamped to 0 before log(x + 1)
    assert got.dense[0, 11] == 0.0  # missing I12
    assert got.sparse[0, 2] == 0  # missing C3
    assert got.sparse[0, 0] == 0x68FD1E64


@pytest.mark.parametrize("compress", [False, True])
def test_empty_file_gives_zero_rows(tmp_path, compress):
    path = tmp_path / "empty.tsv"
    path.write_bytes(gzip.compress(b"") if compress else b"")
    arrays = read_criteo_tsv(path, RAW)
    assert len(arrays) == 0
    assert arrays.dense.shape == (0, 13) and arrays.sparse.shape == (0, 26)


def with_field(index: int, value: str) -> str:
    fields = good_line().split("\t")
    fields[index] = value
    return "\t".join(fields)


BAD_LINES = {
    "too_few_fields": ("\t".join(good_line().split("\t")[:39]), ["39", "expected 40"]),
    "too_many_fields": (good_line() + "\t", ["41", "expected 40"]),
    "space_separated": (good_line().replace("\t", " "), ["1 tab-separated", "expected 40"]),
    "empty_line": ("", ["empty line"]),
    "label_2": (with_field(0, "2"), ["label", "'2'"]),
    "label_missing": (with_field(0, ""), ["label", "0 or 1"]),
    "dense_float": (with_field(5, "1.5"), ["I5", "int_4", "'1.5'", "integer"]),
    "dense_text": (with_field(13, "abc"), ["I13", "int_12"]),
    "dense_lone_minus": (with_field(1, "-"), ["I1", "int_0"]),
    "dense_space": (with_field(2, " 3"), ["I2", "int_1"]),
    "cat_not_hex": (with_field(14 + 6, "zz12ab34"), ["C7", "cat_6", "'zz12ab34'", "hex"]),
    "cat_0x_prefix": (with_field(14, "0x12"), ["C1", "cat_0"]),
    "cat_too_long": (with_field(14 + 25, "1" * 17), ["C26", "cat_25", "17 hex digits"]),
    "non_ascii": (with_field(14 + 3, "é1234567"), ["C4", "cat_3"]),
    "stray_cr": (with_field(14 + 2, "\r"), ["C3", "cat_2"]),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_names_file_line_and_column(tmp_path, case):
    bad, needles = BAD_LINES[case]
    path = write_lines(tmp_path / f"{case}.tsv", [good_line(), good_line(), bad, good_line()])
    with pytest.raises(CriteoFormatError) as err:
        read_criteo_tsv(path, RAW)
    message = str(err.value)
    assert str(path) in message and "line 3:" in message, message
    assert err.value.line == 3 and err.value.path == str(path)
    for needle in needles:
        assert needle in message, (needle, message)


def test_first_bad_line_is_reported(tmp_path):
    lines = [good_line(), with_field(14 + 6, "xyz"), good_line(), "too\tfew", good_line()]
    path = write_lines(tmp_path / "two_errors.tsv", lines)
    with pytest.raises(CriteoFormatError, match=r"line 2: categorical feature C7"):
        read_criteo_tsv(path, RAW)


def test_bad_line_number_across_chunks_and_max_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(criteo_module, "_CHUNK_BYTES", 1000)  # ~4 lines per chunk
    lines = [good_line()] * 57 + [with_field(0, "7")] + [good_line()] * 10
    path = tmp_path / "late_error.tsv.gz"
    path.write_bytes(gzip.compress(("\r\n".join(lines) + "\r\n").encode()))
    with pytest.raises(CriteoFormatError) as err:
        read_criteo_tsv(path, RAW)
    assert err.value.line == 58 and "line 58:" in str(err.value)
    # Rows after max_rows are neither read nor validated.
    assert len(read_criteo_tsv(path, RAW, max_rows=57)) == 57


def make_gzip(path: Path, n_lines: int = 3000) -> bytes:
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n_lines):  # random hashes, so the gzip is not tiny and a cut lands mid-stream
        cats = [f"{v:08x}" for v in rng.integers(0, 2**32, 26)]
        lines.append("\t".join([str(i % 2), *[str(i)] * 13, *cats]))
    data = gzip.compress(("\n".join(lines) + "\n").encode())
    path.write_bytes(data)
    return data


def test_truncated_gzip(tmp_path):
    path = tmp_path / "cut.tsv.gz"
    data = make_gzip(path)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CriteoFormatError) as err:
        read_criteo_tsv(path, RAW)
    message = str(err.value)
    assert str(path) in message and "line 1:" in message  # one chunk: nothing before it was read
    assert "truncated/corrupt gzip" in message and "re-download or re-compress" in message


def test_truncated_gzip_names_line_after_last_good_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(criteo_module, "_CHUNK_BYTES", 64 * 1024)
    whole = tmp_path / "whole.tsv.gz"
    data = make_gzip(whole)
    path = tmp_path / "cut.tsv.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CriteoFormatError) as err:
        read_criteo_tsv(path, RAW)
    # Every line before the reported one was read completely and is valid.
    good = err.value.line - 1
    assert good > 0 and "truncated/corrupt gzip" in str(err.value)
    assert_same(read_criteo_tsv(path, RAW, max_rows=good), reference_parse(whole, RAW, good))


def test_corrupt_gzip_crc(tmp_path):
    path = tmp_path / "crc.gz"
    data = bytearray(make_gzip(path, 50))
    data[-8] ^= 0xFF  # the CRC32 of the trailer
    path.write_bytes(bytes(data))
    with pytest.raises(CriteoFormatError, match="truncated/corrupt gzip") as err:
        read_criteo_tsv(path, RAW)
    assert str(path) in str(err.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope" / "day_0.gz"
    with pytest.raises(CriteoFormatError, match="does not exist") as err:
        read_criteo_tsv(path, RAW)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("sizes", [[10] * 25, [10] * 27, [10] * 25 + [0]])
def test_bad_table_sizes(tmp_path, sizes):
    path = write_lines(tmp_path / "a.tsv", [good_line()])
    with pytest.raises(ValueError, match="num_embeddings_per_feature"):
        read_criteo_tsv(path, sizes)


# ---------------------------------------------------------------- arrays, split, batches


def numbered_arrays(n: int) -> CriteoArrays:
    """Rows whose content identifies them: sparse[i, j] = 100 * i + j, dense[i, k] = i + k / 100."""
    rows = np.arange(n)
    return CriteoArrays(
        labels=(rows % 3 == 0).astype(np.float32),
        dense=(rows[:, None] + np.arange(13) / 100).astype(np.float32),
        sparse=(100 * rows[:, None] + np.arange(26)).astype(np.int64),
    )


def batch_rows(batch) -> np.ndarray:
    return batch.sparse_features["cat_0"].values().numpy() // 100


def test_arrays_slice_concat_split():
    arrays = numbered_arrays(1000)
    parts = [arrays.slice(0, 10), arrays.slice(10, 10), arrays.slice(10, 1000)]
    whole = CriteoArrays.concat(parts)
    assert len(whole) == 1000 and len(parts[1]) == 0
    np.testing.assert_array_equal(whole.sparse, arrays.sparse)
    assert len(CriteoArrays.concat([])) == 0

    train, val, test = split_arrays(arrays, eval_fraction=0.1, test_fraction=0.05)
    assert (len(train), len(val), len(test)) == (850, 100, 50)
    np.testing.assert_array_equal(train.sparse[:, 0] // 100, np.arange(0, 850))
    np.testing.assert_array_equal(val.sparse[:, 0] // 100, np.arange(850, 950))
    np.testing.assert_array_equal(test.sparse[:, 0] // 100, np.arange(950, 1000))
    assert [len(s) for s in split_arrays(arrays, 0.0, 0.0)] == [1000, 0, 0]
    for bad in [(1.0, 0.0), (-0.1, 0.0), (0.6, 0.4)]:
        with pytest.raises(ValueError, match="fraction"):
            split_arrays(arrays, *bad)


def test_batch_content_matches_arrays():
    arrays = numbered_arrays(23)
    batches = list(make_batches(arrays, 10, shuffle=True, seed=3))
    assert [b.labels.shape[0] for b in batches] == [10, 10, 3]
    for batch in batches:
        rows = batch_rows(batch)
        kjt = batch.sparse_features
        assert kjt.keys() == list(DEFAULT_CAT_NAMES)
        assert kjt.values().dtype == torch.int64 and batch.labels.dtype == torch.float32
        assert torch.equal(kjt.lengths(), torch.ones(26 * len(rows), dtype=kjt.lengths().dtype))
        for j, key in enumerate(DEFAULT_CAT_NAMES):
            np.testing.assert_array_equal(kjt[key].values().numpy(), arrays.sparse[rows, j])
        # Key-major flat layout, as KeyedJaggedTensor requires.
        np.testing.assert_array_equal(kjt.values().numpy(), arrays.sparse[rows].T.reshape(-1))
        np.testing.assert_array_equal(batch.dense_features.numpy(), arrays.dense[rows])
        np.testing.assert_array_equal(batch.labels.numpy(), arrays.labels[rows])
    seen = np.concatenate([batch_rows(b) for b in batches])
    assert sorted(seen.tolist()) == list(range(23))
    assert seen.tolist() != list(range(23))  # shuffled
    unshuffled = np.concatenate(
        [batch_rows(b) for b in make_batches(arrays, 10, shuffle=False, seed=3)]
    )
    assert unshuffled.tolist() == list(range(23))


@pytest.mark.parametrize("shuffle", [False, True])
def test_ranks_partition_global_batches(shuffle):
    n, global_batch, world = 100, 16, 4
    arrays = numbered_arrays(n)
    single = [batch_rows(b) for b in make_batches(arrays, global_batch, shuffle=shuffle, seed=7)]
    per_rank = [
        [
            batch_rows(b)
            for b in make_batches(
                arrays, global_batch, shuffle=shuffle, seed=7, rank=r, world_size=world
            )
        ]
        for r in range(world)
    ]
    assert {len(batches) for batches in per_rank} == {len(single)} == {7}
    for b, global_rows in enumerate(single):
        # Rank r holds the r-th contiguous quarter of global batch b.
        concatenated = np.concatenate([per_rank[r][b] for r in range(world)])
        np.testing.assert_array_equal(concatenated, global_rows)
    union = np.concatenate([rows for batches in per_rank for rows in batches])
    assert sorted(union.tolist()) == list(range(n))  # every row exactly once


@pytest.mark.parametrize(
    ("n", "drop_last", "expected_sizes"),
    [
        (103, False, [4] * 6 + [1]),  # tail of 7: one row per rank, 3 rows skipped
        (98, False, [4] * 6),  # tail of 2 < world_size: no tail batch on any rank
        (103, True, [4] * 6),
        (96, False, [4] * 6),
    ],
)
def test_ranks_get_equal_batch_counts(n, drop_last, expected_sizes):
    arrays = numbered_arrays(n)
    for rank in range(4):
        batches = list(
            make_batches(
                arrays, 16, shuffle=True, seed=1, drop_last=drop_last, rank=rank, world_size=4
            )
        )
        assert [b.labels.shape[0] for b in batches] == expected_sizes
    assert num_batches(n, 16, drop_last=drop_last, world_size=4) == len(expected_sizes)
    single = list(make_batches(arrays, 16, shuffle=False, seed=0, drop_last=drop_last))
    assert sum(b.labels.shape[0] for b in single) == (n if not drop_last else n // 16 * 16)


def test_make_batches_bad_arguments():
    arrays = numbered_arrays(10)
    with pytest.raises(ValueError, match="not divisible by world_size 4"):
        make_batches(arrays, 10, shuffle=False, seed=0, world_size=4)
    with pytest.raises(ValueError, match="rank 4"):
        make_batches(arrays, 8, shuffle=False, seed=0, rank=4, world_size=4)
    with pytest.raises(ValueError, match="positive"):
        make_batches(arrays, 0, shuffle=False, seed=0)
