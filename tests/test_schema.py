"""Declared feature schemas: validation, the column encoder against a hand computation, batching.

Oracles: a hand-written Parquet file of a made-up schema (2 dense, 3 sparse: one multi-hot, two
sharing a table, string ids) is encoded and compared with ids and values computed here from the
documented rules (blake2b via hashlib, log1p, list truncation); the same rows as CSV give the same
encoding; the KJT of a batch is compared with per-sample id lists; the Criteo preset builds the
same model as the table-size list always did.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mlet_dist.config import (
    ConfigError,
    DataConfig,
    DenseFeatureConfig,
    SparseFeatureConfig,
    TableConfig,
    load_config,
)
from mlet_dist.data.columns import ColumnError, encode_table
from mlet_dist.data.sources import source_of
from mlet_dist.models import build_dlrm
from mlet_dist.schema import SchemaError, criteo_schema, schema_from_dict, schema_of

# The made-up schema of the acceptance test (tests/test_schema_dist.py uses it too).
SCHEMA_TOML = """
[data]
source = "files"
label = "clicked"

[[data.dense]]
name = "price"
transform = "log1p"

[[data.dense]]
name = "score"

[[data.sparse]]
name = "user"
num_embeddings = 50

[[data.sparse]]
name = "tags"
table = "words"
max_length = 3

[[data.sparse]]
name = "query"
table = "words"

[[data.tables]]
name = "words"
num_embeddings = 40
pooling = "mean"
"""

ROWS = {
    "clicked": [1, 0, 1, 0, 1, 1],
    "price": [3.0, -1.0, 0.0, 10.0, None, 2.5],
    "score": [0.5, 1.5, -2.0, 0.0, 7.0, None],
    "user": ["alice", "bob", "carol", "alice", "dave", None],
    "tags": [["red", "big"], [], ["red", "small", "big", "old"], None, ["old"], ["big"]],
    "query": ["red shoes", "big", "red", "x", "small", "old"],
    "unused": [9, 9, 9, 9, 9, 9],
}


def read_file(source: str, path, *, schema, csv_columns=(), **kw):
    """One raw file of ``source`` read through ``schema`` (the registry's source class)."""
    data = DataConfig(source=source, csv_columns=list(csv_columns))
    return source_of(data, schema).read(path, **kw)


def write_config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "schema.toml"
    path.write_text(SCHEMA_TOML + extra)
    return path


def write_rows(path: Path, n_copies: int = 1, seed: int | None = None) -> Path:
    """The ROWS as Parquet, repeated n_copies times."""
    table = pa.table({k: v * n_copies for k, v in ROWS.items()})
    if seed is not None:  # random labels, and distinct scores: no two rows tie (AUC is exact)
        rng = np.random.default_rng(seed)
        table = table.set_column(0, "clicked", pa.array(rng.integers(0, 2, len(table))))
        table = table.set_column(2, "score", pa.array(rng.normal(size=len(table))))
        # some ids seen once (rare under a frequency threshold): users, and queries of 'words'
        users = [f"new{i}" if i % 5 == 0 else u for i, u in enumerate(table["user"].to_pylist())]
        queries = [f"q{i}" if i % 11 == 0 else q for i, q in enumerate(table["query"].to_pylist())]
        table = table.set_column(3, "user", pa.array(users))
        table = table.set_column(5, "query", pa.array(queries))
    pq.write_table(table, path)
    return path


def h(s: str, rows: int) -> int:
    """The documented string hash, computed here from hashlib."""
    return (
        int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(), "little") % rows
    )


def test_made_up_schema_is_encoded_as_documented(tmp_path):
    cfg = load_config(write_config(tmp_path))
    schema = schema_of(cfg.data)
    # model order: table by table (own table of user, then the shared 'words')
    assert schema.feature_names == ("user", "tags", "query")
    assert [t.name for t in schema.tables] == ["t_user", "words"]
    assert schema.table_of("query").features == ("tags", "query")
    assert schema.feature_sizes == [50, 40, 40]
    path = write_rows(tmp_path / "rows.parquet")
    rows = read_file("files", path, schema=schema)
    np.testing.assert_array_equal(rows.labels, [1, 0, 1, 0, 1, 1])
    want_dense = [
        [math.log1p(max(p or 0.0, 0.0)), s or 0.0] for p, s in zip(ROWS["price"], ROWS["score"])
    ]
    np.testing.assert_allclose(rows.dense, want_dense, rtol=1e-6)
    user_ids, user_len = rows.ids[0], rows.lengths[0]
    for i, u in enumerate(ROWS["user"]):
        assert user_len[i] == (u is not None)
        if u is not None:
            assert user_ids[i, 0] == h(u, 50)
    tags_ids, tags_len = rows.ids[1], rows.lengths[1]
    for i, tags in enumerate(ROWS["tags"]):
        kept = (tags or [])[:3]
        assert tags_len[i] == len(kept)
        assert list(tags_ids[i, : len(kept)]) == [h(t, 40) for t in kept]
    assert list(rows.ids[2][:, 0]) == [h(q, 40) for q in ROWS["query"]]

    # the batch's KJT: per feature, per sample the kept ids
    batch = rows.take(np.array([2, 0])).to_batch()
    kjt = batch.sparse_features
    assert kjt.keys() == ["user", "tags", "query"]
    per_key = kjt.to_dict()
    assert [x.tolist() for x in per_key["tags"].to_dense()] == [
        [h(t, 40) for t in ["red", "small", "big"]],
        [h(t, 40) for t in ["red", "big"]],
    ]
    assert [x.tolist() for x in per_key["user"].to_dense()] == [[h("carol", 50)], [h("alice", 50)]]
    assert batch.dense_features.shape == (2, 2)


def test_csv_and_tsv_give_the_parquet_encoding(tmp_path):
    cfg = load_config(write_config(tmp_path))
    schema = schema_of(cfg.data)
    want = read_file("files", write_rows(tmp_path / "rows.parquet"), schema=schema)

    def field(v):
        if v is None:
            return ""
        return "|".join(v) if isinstance(v, list) else str(v)

    names = list(ROWS)
    lines = [[field(ROWS[c][i]) for c in names] for i in range(6)]
    (tmp_path / "rows.csv").write_text(
        ",".join(names) + "\n" + "\n".join(",".join(r) for r in lines) + "\n"
    )
    (tmp_path / "rows.tsv").write_text("\n".join("\t".join(r) for r in lines) + "\n")
    got_csv = read_file("files", tmp_path / "rows.csv", schema=schema)
    got_tsv = read_file("files", tmp_path / "rows.tsv", schema=schema, csv_columns=names)
    for got in (got_csv, got_tsv):
        np.testing.assert_array_equal(got.labels, want.labels)
        np.testing.assert_allclose(got.dense, want.dense)
        for a, b, la, lb in zip(got.ids, want.ids, got.lengths, want.lengths):
            np.testing.assert_array_equal(la, lb)
            np.testing.assert_array_equal(a, b)


def test_no_dense_feature_feeds_one_constant(tmp_path):
    data = DataConfig(
        source="files", sparse=[SparseFeatureConfig(name="user", num_embeddings=7, ids="int")]
    )
    schema = schema_of(data)
    assert schema.dense_in_features == 1
    table = pa.table({"label": [0, 1, 1], "user": [6, 0, 3]})
    rows = encode_table(table, schema, "t.parquet")
    np.testing.assert_array_equal(rows.dense, [[1.0]] * 3)
    np.testing.assert_array_equal(rows.ids[0][:, 0], [6, 0, 3])  # ids = 'int': as they are
    cfg = load_config(None)
    cfg.data = data
    model = build_dlrm(cfg.model, schema, embedding_device=torch.device("cpu"))
    _, (_, logits, _) = model(rows.to_batch())
    assert logits.shape == (3,)


def test_criteo_preset_builds_the_same_model():
    cfg = load_config(None)
    assert schema_of(cfg.data) == criteo_schema(cfg.data.num_embeddings_per_feature)
    a = build_dlrm(cfg.model, cfg.data.num_embeddings_per_feature)
    b = build_dlrm(cfg.model, schema_of(cfg.data))
    assert {k: v.shape for k, v in a.state_dict().items()} == {
        k: v.shape for k, v in b.state_dict().items()
    }
    assert [
        t.feature_names for t in a.model.sparse_arch.embedding_bag_collection.mlet_configs()
    ] == [t.feature_names for t in b.model.sparse_arch.embedding_bag_collection.mlet_configs()]


def test_schema_round_trips_through_json(tmp_path):
    schema = schema_of(load_config(write_config(tmp_path)).data)
    assert schema_from_dict(schema.to_dict()) == schema


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ('[[data.sparse]]\nname = "user"\nnum_embeddings = 3\n', r"data\.sparse\[3\]\.name = 'user' is used twice"),
        ('[[data.sparse]]\nname = "z"\ntable = "nope"\n', r"data\.sparse\[3\]\.table \(z\) = 'nope' is not a \[\[data\.tables\]\]"),
        ('[[data.sparse]]\nname = "z"\n', r"data\.sparse\[3\]\.num_embeddings \(z\) = 0"),
        ('[[data.sparse]]\nname = "z"\ntable = "words"\nnum_embeddings = 4\n', r"data\.sparse\[3\] \(z\) looks up the shared table 'words'"),
        ('[[data.tables]]\nname = "lonely"\nnum_embeddings = 4\n', r"'lonely' is looked up by no"),
        ('[[data.dense]]\nname = "q"\ntransform = "sqrt"\n', r"data\.dense\[2\]\.transform \(q\) = 'sqrt'"),
        ('[[data.sparse]]\nname = "z"\nnum_embeddings = 4\nids = "md5"\n', r"data\.sparse\[3\]\.ids \(z\) = 'md5'"),
        ('[[data.sparse]]\nname = "z"\nnum_embeddings = 4\nmax_length = 0\n', r"data\.sparse\[3\]\.max_length \(z\) = 0"),
        ('[[data.sparse]]\nname = "z"\nnum_embeddings = 4\nchars = [3, 1]\n', r"data\.sparse\[3\]\.chars \(z\) = \[3, 1\]: give \[start, stop\]"),
        ('[[data.sparse]]\nname = "z"\nnum_embeddings = 4\nchars = [0, 2]\nmax_length = 2\n', r"data\.sparse\[3\]\.chars \(z\) .*single-id feature"),
    ],
)  # fmt: skip
def test_bad_schema_names_the_key(tmp_path, extra, match):
    cfg = load_config(write_config(tmp_path, extra))
    with pytest.raises(SchemaError, match=match) as e:
        schema_of(cfg.data)
    assert "\n" not in str(e.value)


def test_unknown_key_of_a_feature_is_named(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[data]\nsource = "files"\n[[data.sparse]]\nname = "z"\nrows = 4\n')
    with pytest.raises(ConfigError, match=r"data\.sparse\[0\]: unknown key 'rows'"):
        load_config(path)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda t: t.drop_columns(["query"]), r"no column 'query' \(declared in the data schema\).*column = "),
        (lambda t: t.set_column(2, "score", pa.array(["a"] * 6)), r"column 'score' \(dense feature score\): holds string values, expected numbers"),
        (lambda t: t.set_column(5, "query", pa.array([["a"]] * 6)), r"column 'query' \(query\): holds lists .* set max_length"),
        (lambda t: t.set_column(4, "tags", pa.array([1.5] * 6)), r"column 'tags' \(tags\): holds double values; categorical ids must be ints or strings"),
    ],
)  # fmt: skip
def test_bad_columns_name_the_column_and_the_fix(tmp_path, change, match):
    schema = schema_of(load_config(write_config(tmp_path)).data)
    path = tmp_path / "bad.parquet"
    pq.write_table(change(pa.table(ROWS)), path)
    with pytest.raises(ColumnError, match=match) as e:
        read_file("files", path, schema=schema)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_ids_past_the_table_without_hashing_are_refused():
    data = DataConfig(
        source="files",
        sparse=[SparseFeatureConfig(name="item", num_embeddings=10, ids="int")],
        dense=[DenseFeatureConfig(name="x")],
        tables=[],
    )
    table = pa.table({"label": [0, 1], "item": [3, 12], "x": [1.0, 2.0]})
    with pytest.raises(ColumnError, match=r"column 'item' \(item\): id 12 is outside its table of 10 rows .*set ids = 'hash', or num_embeddings > 12"):  # fmt: skip
        encode_table(table, schema_of(data), "f.parquet")
    strings = pa.table({"label": [0], "item": ["a"], "x": [1.0]})
    with pytest.raises(ColumnError, match="holds strings but ids = 'int'.*set ids = 'hash'"):
        encode_table(strings, schema_of(data), "f.parquet")


def test_table_config_is_typed():
    assert TableConfig(name="w", num_embeddings=3).pooling == ""


def test_docs_worked_example_is_a_valid_schema(tmp_path):
    text = (Path(__file__).resolve().parents[1] / "docs" / "own-data.md").read_text()
    section = text[text.index("## Worked example") :]
    block = section[section.index("```toml\n") + 8 :]
    path = tmp_path / "events.toml"
    path.write_text(block[: block.index("```")])
    schema = schema_of(load_config(path).data)
    assert schema.feature_names == ("user", "tags", "query")
    assert schema.table_of("query").features == ("tags", "query")
    assert schema.dense_in_features == 2


def test_chars_derive_a_feature_from_part_of_a_value(tmp_path):
    """`chars = [start, stop]`: the hour of day of a YYMMDDHH int column (ids = 'int') and a
    string prefix (hashed), from Parquet and from CSV, against a hand computation; a part that is
    not an int under ids = 'int' is a one-line error naming the column."""
    data = DataConfig(
        source="files",
        sparse=[
            SparseFeatureConfig(name="hod", column="hour", num_embeddings=24, ids="int", chars=[6, 8]),
            SparseFeatureConfig(name="zip3", column="zip", num_embeddings=97, chars=[0, 3]),
            SparseFeatureConfig(name="zip", num_embeddings=1000),
        ],
        tables=[],
    )  # fmt: skip
    schema = schema_of(data)
    hours, zips = [14102100, 14102123, 14102207, None], ["02139", "9", "", "94110-1234"]
    table = pa.table({"label": [0, 1, 1, 0], "hour": hours, "zip": zips})

    def h(text: str) -> int:
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")

    want_hod = [(0, 1), (23, 1), (7, 1), (0, 0)]  # (id, length); None -> an empty bag
    want_zip3 = [(h("021") % 97, 1), (h("9") % 97, 1), (0, 0), (h("941") % 97, 1)]  # "" missing
    pq.write_table(table, tmp_path / "f.parquet")
    lines = ["label,hour,zip", "0,14102100,02139", "1,14102123,9", "1,14102207,", "0,,94110-1234"]
    (tmp_path / "f.csv").write_text("\n".join(lines) + "\n")
    for name in ("f.parquet", "f.csv"):
        rows = read_file("files", tmp_path / name, schema=schema)
        j, k = schema.feature_names.index("hod"), schema.feature_names.index("zip3")
        assert list(zip(rows.ids[j][:, 0].tolist(), rows.lengths[j].tolist())) == want_hod, name
        assert list(zip(rows.ids[k][:, 0].tolist(), rows.lengths[k].tolist())) == want_zip3, name
    bad = pa.table({"label": [0], "hour": ["14102x1z"], "zip": ["1"]})
    with pytest.raises(ColumnError, match=r"column 'hour' \(hod\): characters 6\.\.7 of a value are not an int.*ids = 'hash'") as e:  # fmt: skip
        encode_table(bad, schema, "g.parquet")
    assert "\n" not in str(e.value)
