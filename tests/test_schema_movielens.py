"""The presets of a declared schema against hand-computed rows and independent parses of real
rows: MovieLens (configs/movielens_features.toml: named columns with multi-hot genres) and Avazu
(configs/avazu_features.toml: plain CSV, string ids hashed).

The real data (../shared/data/movielens_1m_partial) is for internal testing only: read from there,
never copied; the tests that need it skip when it is absent.
"""

from __future__ import annotations

import gzip
from datetime import datetime, timezone

import numpy as np
import pytest
from test_data_movielens import EXPECTED, MOVIES, RATINGS, REPO, USERS, needs_data, write_dataset

from mlet_dist.config import load_config
from mlet_dist.data.movielens import read_movielens_table
from mlet_dist.data.sources import source_of
from mlet_dist.schema import schema_of

PRESET = REPO / "configs/movielens_features.toml"
GENRE_NAMES = (
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)  # fmt: skip  (the ML-1M README's list, typed here independently of the reader)
HAND_GENRES = {1: [3, 4, 5], 2: [8, 12], 3: [1, 18], 4: [8, 12]}  # by ratings line


def test_hand_made_rows_as_named_columns(tmp_path):
    path = write_dataset(tmp_path / "ml")
    table = read_movielens_table(path, in_file_order=True)
    names = ["user", "movie", "gender", "age", "occupation", "zip_prefix"]
    for i in range(4):
        label, ids = EXPECTED[i + 1]
        row = {c: table.column(c)[i].as_py() for c in table.column_names}
        assert row["label"] == label
        assert [row[c] for c in names] == ids[:6]
        assert [row["hour"], row["weekday"], row["year"]] == ids[8:11]
        assert row["genres"] == HAND_GENRES[i + 1]
    # through the preset's schema: genres a multi-hot bag, the other features one id each
    data = load_config(PRESET).data
    schema = schema_of(data)
    rows = source_of(data, schema).read(path, in_file_order=True)
    g = schema.feature_names.index("genres")
    assert rows.lengths[g].tolist() == [3, 2, 2, 2]
    assert rows.ids[g][0, :3].tolist() == [3, 4, 5]
    np.testing.assert_array_equal(rows.dense, np.ones((4, 1)))  # no dense feature: a constant


def _hand_parse(n: int) -> list[dict]:
    users = {}
    for line in USERS.read_text(encoding="latin-1").splitlines():
        uid, gender, age, occupation, zip_code = line.split("::")
        digits = "".join(c for c in zip_code[:3] if c.isdigit())
        users[int(uid)] = {
            "gender": "FM".index(gender),
            "age": [1, 18, 25, 35, 45, 50, 56].index(int(age)),
            "occupation": int(occupation),
            "zip_prefix": int(digits) if digits else 0,
        }
    genres = {}
    for line in MOVIES.read_text(encoding="latin-1").splitlines():
        fields = line.split("::")
        genres[int(fields[0])] = sorted(GENRE_NAMES.index(x) + 1 for x in fields[-1].split("|"))
    out = []
    with gzip.open(RATINGS, "rt") as f:
        for _ in range(n):
            u, m, r, t = map(int, f.readline().split("::"))
            when = datetime.fromtimestamp(t, tz=timezone.utc)
            out.append(
                {
                    "label": int(r >= 4), "user": u, "movie": m, **users[u],
                    "genres": genres[m], "hour": when.hour, "weekday": when.weekday(),
                }
            )  # fmt: skip
    return out


@needs_data
def test_real_rows_match_an_independent_parse():
    want = _hand_parse(400)
    table = read_movielens_table(RATINGS, max_rows=400, in_file_order=True)
    got = table.select(list(want[0])).to_pylist()
    assert got == want
    assert max(len(r["genres"]) for r in want) > 1  # multi-hot rows are among them


@needs_data
def test_preset_trains_collapses_and_predicts(tmp_path):
    """The shipped preset, shrunk: one `run` job; the collapsed model predicts what the trained one
    does (the job's collapse and serving checks) and it learned something."""
    from mlet_dist.config import DistConfig
    from mlet_dist.distributed.parallelize import init_distributed
    from mlet_dist.workflow import run_end_to_end

    cfg = load_config(
        PRESET,
        [
            f"--data.train_files=['{RATINGS}']",
            "--data.max_rows=20000",
            "--model.embedding_dim=8",
            "--model.inner_dim=32",
            "--model.dense_arch_layer_sizes=[16, 8]",
            "--model.over_arch_layer_sizes=[16, 1]",
            "--train.progress=false",
            f"--train.run_dir={tmp_path / 'run'}",
        ],
    )
    init_distributed(DistConfig(device="cpu"))
    summary = run_end_to_end(cfg, resume=False)
    assert summary["collapse_check"]["passed"], summary["collapse_check"]
    assert summary["collapse_check"]["max_abs_logit_diff"] <= 1e-4
    assert summary["serving_check"]["passed"], summary["serving_check"]
    assert 0.6 < summary["test_auc"] < 1.0


# -- the Avazu preset (configs/avazu_features.toml): plain CSV through the declared schema --------

AVAZU = REPO.parent / "shared/data/avazu_sample"


@pytest.mark.skipif(not AVAZU.exists(), reason=f"{AVAZU} absent (fresh clone without ../shared)")
def test_avazu_preset_matches_a_hand_parse_of_the_csv():
    import csv
    import hashlib

    cfg = load_config(REPO / "configs/avazu_features.toml")
    schema = schema_of(cfg.data)
    files = [REPO / f for f in cfg.data.train_files]
    lines = []
    for k, path in enumerate(files):
        with gzip.open(path, "rt", newline="") as f:
            rows = list(csv.reader(f))
        lines += rows[1:] if k == 0 else rows  # part 1 has the header line, part 2 none
    header = cfg.data.csv_columns
    from mlet_dist.data import load_splits

    splits = load_splits(cfg.data)
    got = [splits.train, splits.eval, splits.test]
    assert sum(len(s) for s in got) == len(lines) == 9999
    picks = [0, 1, 2, 4000, 7998]  # train rows; and the first/last rows of part 2
    assert "hour_of_day" in schema.feature_names

    def want_ids(fields):
        out = []
        for f in schema.sparse:
            value = fields[header.index(f.column or f.name)]
            if f.chars:  # hour_of_day: HH of YYMMDDHH
                assert f.name == "hour_of_day" and f.ids == "int"
                out.append(int(value[f.chars[0] : f.chars[1]]))
                continue
            h = int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "little")
            out.append(h % schema.table_of(f.name).num_embeddings)
        return out

    for i in picks:
        fields = lines[i]
        assert splits.train.labels[i] == int(fields[1])
        assert [a[i, 0] for a in splits.train.ids] == want_ids(fields)
    for i, fields in ((0, lines[8999]), (999, lines[9998])):  # part 2 (headless): the test split
        assert splits.test.labels[i] == int(fields[1])
        assert [a[i, 0] for a in splits.test.ids] == want_ids(fields)
