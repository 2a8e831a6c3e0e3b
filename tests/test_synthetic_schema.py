"""Oracle tests of `mlet-dist generate` for a declared schema (mlet_dist/data/synthetic_schema.py).

Oracles: the files are read back with plain pyarrow and checked against the schema (column types,
list lengths, int ids within their tables, string tokens of the documented form, null shares);
the config reader's rows are checked against a hand encoding of those columns (hashlib blake2b);
reproducibility is byte equality of files; the labels' signal is the held-out AUC of a logistic
regression on one-hot features fitted here in numpy (against the same fit on shuffled labels);
the skew is the top id's count against the median's; the meta file against hand counts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlet_dist.cli import main
from mlet_dist.config import ConfigError, load_config
from mlet_dist.data.columns import ColumnError
from mlet_dist.data.sources import (
    data_files,
    ensure_source_data,
    generate_source_data,
    load_splits,
)
from mlet_dist.data.synthetic import META_FILE_NAME
from mlet_dist.data.synthetic_schema import generated_files
from mlet_dist.schema import schema_of
from mlet_dist.utils.files import OutputPathError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "configs" / "schema_synthetic.toml"

# 2 dense (log1p, none); string ids (own table), int ids (own table), a string multi-hot list and
# a string scalar sharing one table, an int multi-hot list.
SCHEMA_TOML = """
[data]
source = "synthetic"
label = "clicked"

[[data.dense]]
name = "price"
transform = "log1p"

[[data.dense]]
name = "score"
column = "score_col"

[[data.sparse]]
name = "user"
column = "user_id"
num_embeddings = 2000

[[data.sparse]]
name = "item"
num_embeddings = 1000
ids = "int"

[[data.sparse]]
name = "tags"
table = "words"
max_length = 4

[[data.sparse]]
name = "query"
table = "words"

[[data.sparse]]
name = "genres"
num_embeddings = 20
ids = "int"
max_length = 3

[[data.tables]]
name = "words"
num_embeddings = 500
pooling = "mean"

[synthetic]
days = 2
rows_per_day = 4000
seed = 7
"""
COLUMNS = ["clicked", "price", "score_col", "user_id", "item", "tags", "query", "genres"]


def config(tmp_path: Path, *overrides: str):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "schema.toml"
    path.write_text(SCHEMA_TOML)
    return load_config(path, [f"--data.dir={tmp_path / 'data'}", *overrides])


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("schema_synthetic")
    cfg = config(tmp)
    return cfg, generate_source_data(cfg.data, cfg.synthetic, progress=False)


def token_ids(values: list, prefix: str) -> np.ndarray:
    """The <id> of tokens "<prefix>_<id>"; fails on any other form."""
    pattern = re.compile(rf"{prefix}_(0|[1-9][0-9]*)")
    ids = []
    for v in values:
        m = pattern.fullmatch(v)
        assert m, f"{v!r} is not a token {prefix}_<id>"
        ids.append(int(m.group(1)))
    return np.array(ids)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUC with average ranks for ties."""
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.bincount(inverse, ranks) / counts)[inverse]
    pos = labels == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_files_have_the_schema_columns(generated):
    _, paths = generated
    assert [p.name for p in paths] == ["part-00000.parquet", "part-00001.parquet"]
    table = pa.concat_tables(pq.read_table(p) for p in paths)
    n = 2 * 4000
    assert table.column_names == COLUMNS and table.num_rows == n
    types = {f.name: f.type for f in table.schema}
    assert types["clicked"] == pa.int8() and types["price"] == pa.int64()
    assert types["score_col"] == pa.float64() and types["item"] == pa.int64()
    assert types["user_id"] == pa.string() and types["query"] == pa.string()
    assert types["tags"] == pa.list_(pa.string()) and types["genres"] == pa.list_(pa.int64())
    col = {c: table.column(c).to_pylist() for c in COLUMNS}

    assert col["clicked"].count(None) == 0 and set(col["clicked"]) == {0, 1}
    prices = [v for v in col["price"] if v is not None]
    assert min(prices) >= 0 and max(prices) > 20 * np.median(prices)  # heavy-tailed counts
    scores = np.array([v for v in col["score_col"] if v is not None])
    assert (scores < 0).any() and (scores > 0).any()  # normal values
    for c in ("price", "score_col"):  # synthetic.dense_missing_rate = 0.1
        assert 0.07 < col[c].count(None) / n < 0.13

    users = token_ids([v for v in col["user_id"] if v is not None], "user")
    assert users.min() >= 0 and users.max() < 2000
    items = np.array([v for v in col["item"] if v is not None])
    assert items.min() >= 0 and items.max() < 1000
    words_query = token_ids([v for v in col["query"] if v is not None], "words")
    lists = [v for v in col["tags"] if v]
    assert all(1 <= len(v) <= 4 for v in lists)
    assert {len(v) for v in lists} == {1, 2, 3, 4}
    words_tags = token_ids([w for v in lists for w in v], "words")
    for ids in (words_query, words_tags):
        assert ids.min() >= 0 and ids.max() < 500
    # one vocabulary (the shared table): the same most frequent word in both features
    assert np.bincount(words_query).argmax() == np.bincount(words_tags).argmax()
    genres = [v for v in col["genres"] if v]
    assert all(1 <= len(v) <= 3 and all(0 <= g < 20 for g in v) for v in genres)

    # synthetic.sparse_missing_rate = 0.02: null scalars; null or empty lists
    for c in ("user_id", "item", "query"):
        assert 0.01 < col[c].count(None) / n < 0.03
    for c in ("tags", "genres"):
        nulls, empty = col[c].count(None), col[c].count([])
        assert nulls > 0 and empty > 0 and 0.01 < (nulls + empty) / n < 0.03


def test_rows_read_back_through_the_config(generated, tmp_path):
    cfg, paths = generated
    schema = schema_of(cfg.data)
    assert data_files(cfg.data) == paths
    splits = load_splits(cfg.data)
    rows = type(splits.train).concat([splits.train, splits.eval, splits.test])
    assert len(rows) == 8000
    # hand encoding of the first file's user (blake2b, modulo rows) and item columns
    table = pq.read_table(paths[0])
    index = {name: i for i, name in enumerate(schema.feature_names)}
    users = table.column("user_id").to_pylist()
    want = [
        int.from_bytes(hashlib.blake2b(u.encode(), digest_size=8).digest(), "little") % 2000
        for u in users
        if u is not None
    ]
    got_len = rows.lengths[index["user"]][:4000]
    assert got_len.tolist() == [int(u is not None) for u in users]
    assert rows.ids[index["user"]][:4000, 0][got_len == 1].tolist() == want
    items = table.column("item").to_pylist()
    item_len = rows.lengths[index["item"]][:4000]
    assert rows.ids[index["item"]][:4000, 0][item_len == 1].tolist() == [
        i for i in items if i is not None
    ]
    assert rows.labels[:4000].tolist() == table.column("clicked").to_pylist()
    # the same files as the user's own data: data.source = 'files' reads the same rows
    files_cfg = config(
        tmp_path, "--data.source=files", f"--data.train_files={json.dumps(list(map(str, paths)))}"
    )
    again = load_splits(files_cfg.data)
    assert np.array_equal(again.train.labels, splits.train.labels)
    for a, b in zip(again.train.ids, splits.train.ids):
        assert np.array_equal(a, b)


def test_same_seed_same_bytes_other_seed_differs(generated, tmp_path):
    _, paths = generated
    one = config(tmp_path / "a", "--synthetic.days=1")  # file 0 does not depend on days
    again = generate_source_data(one.data, one.synthetic, progress=False)
    assert again[0].read_bytes() == paths[0].read_bytes()
    other = config(tmp_path / "b", "--synthetic.seed=8")
    changed = generate_source_data(other.data, other.synthetic, progress=False)
    for a, b in zip(changed, paths):
        ta, tb = pq.read_table(a), pq.read_table(b)
        assert not ta.column("user_id").equals(tb.column("user_id"))
        assert not ta.column("clicked").equals(tb.column("clicked"))
    # the two files of one run are drawn from different streams
    t0, t1 = pq.read_table(paths[0]), pq.read_table(paths[1])
    assert not t0.column("item").equals(t1.column("item"))


def one_hot_logistic_auc(table: pa.Table, labels: np.ndarray, steps: int = 300) -> float:
    """Held-out AUC of a logistic regression on one-hot (column, value) features and the log1p /
    raw dense values, fitted with full-batch Adagrad on the first 80% of rows."""
    vocab: dict = {}
    index, row = [], []
    for c in ("user_id", "item", "tags", "query", "genres"):
        for i, v in enumerate(table.column(c).to_pylist()):
            for x in v if isinstance(v, list) else ([] if v is None else [v]):
                index.append(vocab.setdefault((c, x), len(vocab)))
                row.append(i)
    index, row = np.array(index), np.array(row)
    price = np.array([v or 0 for v in table.column("price").to_pylist()], dtype=np.float64)
    score = np.array([v or 0.0 for v in table.column("score_col").to_pylist()])
    dense = np.stack([np.log1p(price), score], axis=1)
    n = len(labels)
    train = np.arange(n) < int(0.8 * n)
    w, wd, b = np.zeros(len(vocab)), np.zeros(2), np.zeros(1)
    acc = [np.full(len(vocab), 1e-8), np.full(2, 1e-8), np.full(1, 1e-8)]

    def logit() -> np.ndarray:
        return np.bincount(row, w[index], minlength=n) + dense @ wd + b[0]

    for _ in range(steps):
        g = (1.0 / (1.0 + np.exp(-logit())) - labels) * train / train.sum()
        grads = [
            np.bincount(index, g[row], minlength=len(vocab)),
            dense.T @ g,
            g.sum(keepdims=True),
        ]
        for p, a, gr in zip((w, wd, b), acc, grads):
            a += gr**2
            p -= 0.5 * gr / np.sqrt(a)
    return auc(logit()[~train], labels[~train])


def test_labels_carry_the_teachers_signal(tmp_path):
    cfg = config(tmp_path, "--synthetic.days=1", "--synthetic.rows_per_day=20000")
    (path,) = generate_source_data(cfg.data, cfg.synthetic, progress=False)
    table = pq.read_table(path)
    labels = table.column("clicked").to_numpy().astype(np.float64)
    assert 0.22 < labels.mean() < 0.28  # the teacher's calibrated positive rate (0.25)
    assert one_hot_logistic_auc(table, labels) > 0.6
    shuffled = np.random.default_rng(0).permutation(labels)
    assert abs(one_hot_logistic_auc(table, shuffled) - 0.5) < 0.04


def test_ids_are_zipf_skewed(generated):
    _, paths = generated
    table = pa.concat_tables(pq.read_table(p) for p in paths)
    for column, prefix in (("user_id", "user"), ("item", None)):
        values = [v for v in table.column(column).to_pylist() if v is not None]
        ids = token_ids(values, prefix) if prefix else np.array(values)
        counts = np.bincount(ids)
        counts = counts[counts > 0]
        assert counts.max() >= 50 * np.median(counts)
        # rank 1 of a Zipf(1.05) law over the table's rows: p1 = 1 / sum_k k^-1.05
        rows = 2000 if prefix else 1000
        p1 = 1.0 / (np.arange(1, rows + 1) ** -1.05).sum()
        assert abs(counts.max() / len(ids) - p1) < 0.02
        # frequent ids are spread over the table (the seeded bijection), not 0, 1, 2, ...
        top = np.argsort(np.bincount(ids))[::-1][:5]
        assert sorted(top.tolist()) != list(range(5))


def test_meta_records_the_config(generated):
    cfg, paths = generated
    meta = json.loads((paths[0].parent / META_FILE_NAME).read_text())
    assert meta["config"] == dataclasses.asdict(cfg.synthetic)
    assert meta["schema"] == schema_of(cfg.data).to_dict()
    assert [f["file"] for f in meta["files"]] == [p.name for p in paths]
    for f, p in zip(meta["files"], paths):
        labels = pq.read_table(p).column("clicked").to_numpy()
        assert f["rows"] == len(labels) and f["positives"] == int(labels.sum())
    assert meta["rows"] == 8000 and meta["positives"] == sum(f["positives"] for f in meta["files"])


def test_refuses_a_directory_it_did_not_write(tmp_path):
    cfg = config(tmp_path)
    out = tmp_path / "data"
    out.mkdir()
    mine = out / "part-00000.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), mine)
    before = mine.read_bytes()
    with pytest.raises(OutputPathError, match="no synthetic_meta.json"):
        generate_source_data(cfg.data, cfg.synthetic, progress=False)
    with pytest.raises(OutputPathError):  # `run` does not generate over it either
        ensure_source_data(cfg.data, cfg.synthetic, progress=False)
    assert mine.read_bytes() == before and not (out / META_FILE_NAME).exists()
    with pytest.raises(ConfigError, match="mlet-dist generate"):
        data_files(cfg.data)  # nothing generated there: a one-line error, not a read


def test_ensure_generates_once_and_never_over_user_files(tmp_path):
    cfg = config(tmp_path, "--synthetic.rows_per_day=500")
    assert ensure_source_data(cfg.data, cfg.synthetic, progress=False)
    stamp = [p.stat().st_mtime_ns for p in generated_files(cfg.data.dir)]
    assert not ensure_source_data(cfg.data, cfg.synthetic, progress=False)
    assert [p.stat().st_mtime_ns for p in generated_files(cfg.data.dir)] == stamp
    changed = config(tmp_path, "--synthetic.rows_per_day=500", "--synthetic.seed=9")
    assert ensure_source_data(changed.data, changed.synthetic, progress=False)
    # the Criteo generator's data in the same directory is another format: generated anew
    criteo = load_config(
        None, [f"--data.dir={cfg.data.dir}", "--synthetic.rows_per_day=500", "--synthetic.seed=9"]
    )
    assert ensure_source_data(criteo.data, criteo.synthetic, progress=False)
    assert [p.name for p in data_files(criteo.data)] == ["day_0.gz", "day_1.gz"]
    # the user's own files ('files'): a missing one is an error, never generated
    missing = tmp_path / "mine" / "events.parquet"
    own = config(tmp_path, "--data.source=files", f'--data.train_files=["{missing}"]')
    assert not ensure_source_data(own.data, own.synthetic, progress=False)
    assert not missing.parent.exists()
    with pytest.raises(ColumnError, match="does not exist"):
        load_splits(own.data)


@pytest.mark.slow
def test_shipped_config_end_to_end(tmp_path, capsys):
    """`mlet-dist run` on configs/schema_synthetic.toml (small): generates, trains, collapses and
    checks; `predict` scores a generated file; `preprocess` and `generate` take the same config."""
    small = [
        f"--data.dir={tmp_path / 'data'}",
        f"--train.run_dir={tmp_path / 'run'}",
        "--synthetic.rows_per_day=2500",
        "--train.max_steps=30",
        "--train.progress=false",
    ]
    assert main(["run", "--config", str(SHIPPED), *small]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["collapse_check"]["passed"] and summary["serving_check"]["passed"]
    assert (tmp_path / "data" / "part-00001.parquet").is_file()
    # the served predictor scores a generated file (read as the run's data.source)
    scores = tmp_path / "p.txt"
    part = tmp_path / "data" / "part-00001.parquet"
    argv = ["predict", "--serving", str(tmp_path / "run" / "served"), "--data", str(part)]
    assert main([*argv, "--out", str(scores)]) == 0
    assert len(scores.read_text().split()) == 2500
    capsys.readouterr()
    pq_dir = tmp_path / "shards"
    assert main(["preprocess", "--config", str(SHIPPED), *small, "--out", str(pq_dir)]) == 0
    shards = json.loads(capsys.readouterr().out)
    assert shards["rows"] == 5000
    # a directory of someone else's files: one line, exit 2, nothing written
    other = tmp_path / "other"
    other.mkdir()
    (other / "part-00000.parquet").write_bytes(b"mine")
    argv = [sys.executable, "-m", "mlet_dist", "generate", "--config", str(SHIPPED)]
    done = subprocess.run([*argv, f"--data.dir={other}"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "refusing to write synthetic data" in done.stderr
    assert (other / "part-00000.parquet").read_bytes() == b"mine"


def test_one_column_per_feature(tmp_path):
    cfg = config(tmp_path, "--synthetic.rows_per_day=10")
    cfg.data.sparse[1].column = "user_id"  # item would be written over user's column
    with pytest.raises(ConfigError, match=r"column 'user_id'.*data.sparse \(user\) reads too"):
        generate_source_data(cfg.data, cfg.synthetic, progress=False)
    assert not Path(cfg.data.dir).exists()


def test_vocab_features_get_tokens_that_preprocess_fits_in_the_table(tmp_path):
    """ids = 'vocab': the generator writes string tokens of num_embeddings - 1 ids, so the
    vocabulary preprocess builds (every token seen, rows 1..V, 0 = unknown) fits the table."""
    from mlet_dist.data.preprocess import preprocess_from_config

    text = SCHEMA_TOML.replace(
        'name = "genres"\nnum_embeddings = 20\nids = "int"',
        'name = "genres"\nnum_embeddings = 6\nids = "vocab"',
    )
    assert text != SCHEMA_TOML
    path = tmp_path / "vocab.toml"
    path.write_text(text)
    cfg = load_config(path, [f"--data.dir={tmp_path / 'data'}", "--synthetic.days=1"])
    (file,) = generate_source_data(cfg.data, cfg.synthetic, progress=False)
    genres = pq.read_table(file, columns=["genres"]).column(0).to_pylist()
    tokens = {v for bag in genres if bag for v in bag}
    assert len(tokens) == 5 and all(re.fullmatch(r"genres_[0-4]", v) for v in tokens)
    out = tmp_path / "shards"
    summary = preprocess_from_config(cfg.data, inputs=[file], out_dir=out)
    vocab = pq.read_table(out / "vocab" / "t_genres.parquet").to_pydict()
    assert sorted(vocab["value"]) == sorted(tokens) and sorted(vocab["row"]) == [1, 2, 3, 4, 5]
    assert summary["splits"]["train"]["rows"] > 0


def test_weight_column_is_generated(tmp_path):
    """data.weight: the generator writes the column (0.5, 1 or 2, each about a third of the
    rows) and the other columns are byte-identical to the unweighted schema's."""
    from mlet_dist.data.sources import read_data_file

    plain = config(tmp_path / "plain", "--synthetic.days=1")
    weighted = config(tmp_path / "weighted", "--synthetic.days=1", "--data.weight=w")
    (a,) = generate_source_data(plain.data, plain.synthetic, progress=False)
    (b,) = generate_source_data(weighted.data, weighted.synthetic, progress=False)
    ta, tb = pq.read_table(a), pq.read_table(b)
    assert tb.drop_columns(["w"]).equals(ta)
    w = tb.column("w").to_numpy()
    values, counts = np.unique(w, return_counts=True)
    assert values.tolist() == [0.5, 1.0, 2.0] and (abs(counts / len(w) - 1 / 3) < 0.03).all()
    assert read_data_file(weighted.data, b).weights.tolist() == w.tolist()
