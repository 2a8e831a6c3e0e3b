"""Out-of-core preprocessing of a declared schema (mlet_dist/data/preprocess/schema.py).

Oracles: the shards written from inputs streamed in chunks of 7 rows equal, table for table and
row group for row group, those written from one chunk holding every row (which
tests/test_schema_dist.py and tests/test_vocab.py check row by row against hand computations);
a CSV file read in several blocks by pyarrow's streaming reader gives the ids and values of a
hand parse (csv module, hashlib blake2b).
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_schema import SCHEMA_TOML, write_rows

from mlet_dist.config import DataConfig, DenseFeatureConfig, SparseFeatureConfig, load_config
from mlet_dist.data.columns import encode_table, iter_columns_file
from mlet_dist.data.preprocess.schema import preprocess_schema
from mlet_dist.schema import schema_of

VOCAB_USER = SCHEMA_TOML.replace(
    'name = "user"\nnum_embeddings = 50', 'name = "user"\nnum_embeddings = 50\nids = "vocab"'
)


def _config(tmp_path: Path, text: str, *args: str):
    path = tmp_path / "schema.toml"
    path.write_text(text)
    return load_config(path, list(args))


def _shards(out: Path) -> dict:
    got = {"summary": json.loads((out / "summary.json").read_text())}
    for split in ("train", "eval", "test"):
        path = out / split / "part-00000.parquet"
        if path.is_file():
            meta = pq.ParquetFile(path).metadata
            groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
            got[split] = (pq.read_table(path), groups)
    return got


@pytest.mark.parametrize("text", [SCHEMA_TOML, VOCAB_USER], ids=["hash", "vocab"])
def test_chunked_preprocessing_equals_one_chunk(tmp_path, text):
    a = write_rows(tmp_path / "a.parquet", n_copies=20, seed=3)  # 120 rows
    b = write_rows(tmp_path / "b.parquet", n_copies=7, seed=4)  # 42 rows
    cfg = _config(
        tmp_path, text, "--data.eval_fraction=0.2", "--data.test_fraction=0.1",
        "--data.frequency_threshold=3", "--data.row_group_rows=10",
    )  # fmt: skip
    small = preprocess_schema(cfg.data, [a, b], tmp_path / "small", False, chunk_rows=7)
    whole = preprocess_schema(cfg.data, [a, b], tmp_path / "whole", False, chunk_rows=1 << 20)
    assert small == whole
    assert [small["splits"][s]["rows"] for s in ("train", "eval", "test")] == [114, 32, 16]
    got, want = _shards(tmp_path / "small"), _shards(tmp_path / "whole")
    assert got.keys() == want.keys() == {"summary", "train", "eval", "test"}
    for split in ("train", "eval", "test"):
        assert got[split][0].equals(want[split][0]), split
        assert got[split][0].schema.metadata == want[split][0].schema.metadata
        groups = got[split][1]
        assert groups == want[split][1] and all(g == 10 for g in groups[:-1]), groups
    if "vocab" in text:
        vocab = tmp_path / "small" / "vocab" / "t_user.parquet"
        assert vocab.read_bytes() == (tmp_path / "whole" / "vocab" / "t_user.parquet").read_bytes()


def test_eval_files_are_streamed_as_the_eval_split(tmp_path):
    a = write_rows(tmp_path / "a.parquet", n_copies=10, seed=3)
    e = write_rows(tmp_path / "e.parquet", n_copies=3, seed=9)
    cfg = _config(
        tmp_path, SCHEMA_TOML, f"--data.eval_files=['{e}']", "--data.test_fraction=0.25",
    )  # fmt: skip
    summary = preprocess_schema(cfg.data, [a], tmp_path / "out", False, chunk_rows=4)
    assert [summary["splits"][s]["rows"] for s in ("train", "eval", "test")] == [45, 18, 15]
    labels = pq.read_table(tmp_path / "out" / "eval" / "part-00000.parquet").column("label")
    assert labels.to_pylist() == pq.read_table(e).column("clicked").to_pylist()


def test_csv_read_in_blocks_matches_a_hand_parse(tmp_path):
    rng = np.random.default_rng(0)
    n = 40_000
    path = tmp_path / "big.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["y", "x", "u", "tags"])
        for i in range(n):
            tags = "|".join(f"t{int(v)}" for v in rng.integers(0, 30, rng.integers(0, 4)))
            u = f"user-{int(rng.zipf(1.3)) % 5000}" if i % 97 else ""
            w.writerow([int(rng.integers(0, 2)), f"{rng.normal():.6f}", u, tags])
    assert path.stat().st_size > 3 << 18  # several blocks of 256 KiB
    data = DataConfig(
        source="files",
        label="y",
        dense=[DenseFeatureConfig(name="x")],
        sparse=[
            SparseFeatureConfig(name="u", num_embeddings=1000),
            SparseFeatureConfig(name="tags", num_embeddings=64, max_length=3),
        ],
        tables=[],
    )
    schema = schema_of(data)
    chunks = list(iter_columns_file(path, schema, chunk_rows=2000))
    assert len(chunks) > 1 and sum(c.num_rows for c in chunks) == n
    rows = [encode_table(c, schema, path) for c in chunks]

    def h(s: str, m: int) -> int:
        return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") % m

    with path.open(newline="") as f:
        lines = list(csv.reader(f))[1:]
    labels = np.concatenate([r.labels for r in rows])
    dense = np.concatenate([r.dense[:, 0] for r in rows])
    u = np.concatenate([r.ids[0][:, 0] for r in rows])
    u_len = np.concatenate([r.lengths[0] for r in rows])
    tags = np.concatenate([r.ids[1] for r in rows])
    tags_len = np.concatenate([r.lengths[1] for r in rows])
    assert labels.tolist() == [float(line[0]) for line in lines]
    np.testing.assert_allclose(dense, [float(line[1]) for line in lines], rtol=1e-6)
    assert u_len.tolist() == [int(bool(line[2])) for line in lines]
    assert [int(v) for v, k in zip(u, u_len) if k] == [h(x[2], 1000) for x in lines if x[2]]
    for i in (0, 1, 12_345, n - 1):
        want = [h(t, 64) for t in lines[i][3].split("|") if t][:3]
        assert tags[i, : tags_len[i]].tolist() == want, i


def test_quoted_csv_header_names_the_columns(tmp_path):
    """A header with quoted names (as pyarrow's and Excel's CSV writers write it) names the
    columns, and a headless file with quoted fields is read through csv_columns."""
    data = DataConfig(
        source="files", label="y", sparse=[SparseFeatureConfig(name="u", num_embeddings=7)],
        tables=[],
    )  # fmt: skip
    schema = schema_of(data)
    (tmp_path / "q.csv").write_text('"y","u"\n1,"a,b"\n0,c\n')
    (rows,) = [encode_table(c, schema, "q") for c in iter_columns_file(tmp_path / "q.csv", schema)]
    h = [
        int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8).digest(), "little") % 7
        for v in ("a,b", "c")
    ]
    assert rows.labels.tolist() == [1.0, 0.0] and rows.ids[0][:, 0].tolist() == h
    (tmp_path / "r.csv").write_text('"y","u"\n1,"a,b"\n')  # the header equals csv_columns: skipped
    chunks = list(iter_columns_file(tmp_path / "r.csv", schema, csv_columns=["y", "u"]))
    assert sum(c.num_rows for c in chunks) == 1
