"""MovieLens-1M reader vs hand-computed rows and an independent line-by-line parse of the real data.

The real data (../shared/data/movielens_1m_partial) is for internal testing only: it is read from
there, never copied into the repository; the tests that need it skip when it is absent.
"""

from __future__ import annotations

import gzip
import json
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import torch

from mlet_dist.config import ConfigError, DistConfig, load_config
from mlet_dist.data import CriteoArrays, CriteoFormatError
from mlet_dist.data.movielens import DEFAULT_MOVIELENS_TABLE_SIZES, read_movielens, zip_prefix

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared/data/movielens_1m_partial"
RATINGS, USERS, MOVIES = DATA / "ratings.dat.gz", DATA / "users.dat", DATA / "movies.dat"
needs_data = pytest.mark.skipif(
    not RATINGS.exists(), reason=f"{DATA} absent (fresh clone without ../shared)"
)
SIZES = DEFAULT_MOVIELENS_TABLE_SIZES
# Small table sizes that make the modulo matter for every used slot but gender.
SMALL_SIZES = [97, 89, 2, 5, 13, 11, 7, 64, 10, 3, 50, *[1] * 15]

# ---- hand-made files with hand-computed rows (no ../shared needed) ---------------------------

USERS_TEXT = "1::F::1::10::12345\n2::M::56::20::98107-4032\n3::M::25::0::T8N 3R1\n"
MOVIES_TEXT = (
    "1::A Made-Up Film (1995)::Animation|Children's|Comedy\n"
    "2::Le Café Imaginé (1987)::Drama|Musical\n"
    "3::Nameless::Western|Action\n"
)
RATINGS_TEXT = "1::1::5::1234567890\n2::2::3::0\n3::3::4::363600\n1::2::4::0\n"
# (made up, not rows of the real files) 1234567890 = 2009-02-13 23:31:30 UTC, a Friday; 0 = 1970-01-01 00:00, a Thursday;
# 363600 = 1970-01-05 05:00, a Monday. Genres: Action 1, Animation 3, Children's 4, Comedy 5,
# Drama 8, Musical 12, Western 18.
# (label, [user, movie, gender, age, occupation, zip, first genre, genre set, hour, weekday, year])
EXPECTED = {  # by ratings line
    1: (1.0, [1, 1, 0, 0, 10, 123, 3, 4 + 8 + 16, 23, 4, 95]),
    2: (0.0, [2, 2, 1, 6, 20, 981, 8, 128 + 2048, 0, 3, 87]),
    3: (1.0, [3, 3, 1, 2, 0, 8, 18, 2**17 + 1, 5, 0, 0]),
    4: (1.0, [1, 2, 0, 0, 10, 123, 8, 128 + 2048, 0, 3, 87]),
}
TIME_ORDER = [2, 4, 3, 1]  # by timestamp; lines 2 and 4 tie and keep their file order


def write_dataset(root: Path, ratings: str = RATINGS_TEXT, gz: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "users.dat").write_text(USERS_TEXT, encoding="latin-1")
    (root / "movies.dat").write_text(MOVIES_TEXT, encoding="latin-1")
    if gz:
        path = root / "ratings.dat.gz"
        path.write_bytes(gzip.compress(ratings.encode()))
    else:
        path = root / "ratings.dat"
        path.write_text(ratings)
    return path


def expected(lines: list[int]) -> tuple[np.ndarray, np.ndarray]:
    labels = np.array([EXPECTED[i][0] for i in lines], dtype=np.float32)
    sparse = np.array([EXPECTED[i][1] + [0] * 15 for i in lines], dtype=np.int64)
    return labels, sparse


@pytest.mark.parametrize("gz", [False, True])
def test_hand_made_rows_sorted_by_time(tmp_path, gz):
    arrays = read_movielens(write_dataset(tmp_path, gz=gz), SIZES)
    labels, sparse = expected(TIME_ORDER)
    np.testing.assert_array_equal(arrays.labels, labels)
    np.testing.assert_array_equal(arrays.sparse, sparse)
    assert arrays.dense.shape == (4, 13) and not arrays.dense.any()
    assert arrays.labels.dtype == np.float32 and arrays.sparse.dtype == np.int64


def test_file_order_max_rows_and_modulo(tmp_path):
    path = write_dataset(tmp_path)
    arrays = read_movielens(path, SIZES, in_file_order=True)
    np.testing.assert_array_equal(arrays.sparse, expected([1, 2, 3, 4])[1])
    arrays = read_movielens(path, SIZES, max_rows=2)  # lines 1-2, then sorted by time
    np.testing.assert_array_equal(arrays.sparse, expected([2, 1])[1])
    arrays = read_movielens(path, SMALL_SIZES)
    np.testing.assert_array_equal(arrays.sparse, expected(TIME_ORDER)[1] % SMALL_SIZES)


@pytest.mark.parametrize(
    "zip_code,prefix",
    [("12345", 123), ("98107-4032", 981), ("T8N 3R1", 8), ("0956456", 95), ("ABC", 0), ("", 0)],
)
def test_zip_prefix_rule(zip_code, prefix):
    assert zip_prefix(zip_code) == prefix


@pytest.mark.parametrize(
    "line,match",
    [
        ("1::2::x::5", r"ratings\.dat:3: '1::2::x::5' is not UserID::MovieID::Rating::Timestamp"),
        ("1::2::6::5", r"ratings\.dat:3: .*rating 1\.\.5"),
        ("1::2::4", r"ratings\.dat:3: '1::2::4' is not"),
        ("", r"ratings\.dat:3: '' is not"),
        ("4::2::4::5", r"ratings\.dat:3: user 4 is not in .*users\.dat"),
        ("1::9::4::5", r"ratings\.dat:3: movie 9 is not in .*movies\.dat"),
    ],
)
def test_bad_ratings_line_names_file_and_line(tmp_path, line, match):
    lines = RATINGS_TEXT.splitlines()
    lines[2] = line
    path = write_dataset(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(CriteoFormatError, match=match) as e:
        read_movielens(path, SIZES)
    assert "\n" not in str(e.value) and e.value.line == 3


@pytest.mark.parametrize(
    "name,text,match",
    [
        ("users.dat", "1::X::1::10::12345\n", r"users\.dat:1: Gender = 'X' is not F or M"),
        ("users.dat", "1::F::2::10::12345\n", r"users\.dat:1: Age = '2' is not one of 1, 18"),
        ("users.dat", "1::F::1::21::12345\n", r"users\.dat:1: Occupation = '21' is not 0\.\.20"),
        ("users.dat", "1::F::1::10\n", r"users\.dat:1: 4 fields"),
        ("movies.dat", "1::A Film (1995)::Animation|Cartoon\n", r"movies\.dat:1: unknown genre 'Cartoon'"),
        ("movies.dat", "1::A Film (1995)\n", r"movies\.dat:1: fewer than 3 fields"),
    ],
)  # fmt: skip
def test_bad_side_file_line_names_file_and_line(tmp_path, name, text, match):
    path = write_dataset(tmp_path)
    (tmp_path / name).write_text(text)
    with pytest.raises(CriteoFormatError, match=match) as e:
        read_movielens(path, SIZES)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("missing", ["users.dat", "movies.dat"])
def test_missing_side_file_is_named(tmp_path, missing):
    path = write_dataset(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(CriteoFormatError, match=rf"{missing} does not exist: MovieLens ratings"):
        read_movielens(path, SIZES)


def test_truncated_gzip_and_wrong_table_count(tmp_path):
    path = write_dataset(tmp_path, gz=True)
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(CriteoFormatError, match="truncated or corrupt gzip"):
        read_movielens(path, SIZES)
    with pytest.raises(CriteoFormatError, match="needs 26 table sizes"):
        read_movielens(path, SIZES[:11])


def test_source_needs_train_files_and_preprocess_refuses(tmp_path):
    from mlet_dist.data import load_splits
    from mlet_dist.data.preprocess import preprocess_from_config

    cfg = load_config(None, ["--data.source=movielens"])
    with pytest.raises(ConfigError, match="needs data.train_files .MovieLens ratings"):
        load_splits(cfg.data)
    cfg.data.train_files = [str(write_dataset(tmp_path))]
    with pytest.raises(ConfigError, match="reads Criteo TSV only, not data.source = 'movielens'"):
        preprocess_from_config(cfg.data, out_dir=tmp_path / "pq")
    assert not (tmp_path / "pq").exists()


# ---- the real data vs an independent parse ---------------------------------------------------

GENRE_NAMES = (
    "Action|Adventure|Animation|Children's|Comedy|Crime|Documentary|Drama|Fantasy|Film-Noir|"
    "Horror|Musical|Mystery|Romance|Sci-Fi|Thriller|War|Western"
).split("|")  # the README of ML-1M


def reference_side_tables():
    users = {}
    for line in USERS.read_text(encoding="latin-1").splitlines():
        uid, gender, age, occupation, zip_code = line.split("::")
        digits = re.sub(r"[^0-9]", "", zip_code[:3])
        age_code = [1, 18, 25, 35, 45, 50, 56].index(int(age))
        users[int(uid)] = [int(gender == "M"), age_code, int(occupation), int(digits or 0)]
    movies = {}
    for line in MOVIES.read_text(encoding="latin-1").splitlines():
        mid, title, genres = line.split("::")
        index = [GENRE_NAMES.index(g) + 1 for g in genres.split("|")]
        mask = sum(2 ** (g - 1) for g in sorted(set(index)))
        t = title.rstrip()
        year = int(t[-5:-1]) if t[-6:-5] == "(" and t[-1:] == ")" and t[-5:-1].isdigit() else 0
        movies[int(mid)] = [index[0], mask, year - 1900 if 1900 < year < 2028 else 0]
    return users, movies


def reference_ratings(max_rows: int = 0) -> list[tuple[int, int, int, int, int]]:
    """(timestamp, file position, user, movie, rating) sorted by time, then file position."""
    out = []
    with gzip.open(RATINGS, "rt", encoding="latin-1") as f:
        for pos, line in enumerate(f):
            if max_rows and pos >= max_rows:
                break
            user, movie, rating, ts = (int(x) for x in line.split("::"))
            out.append((ts, pos, user, movie, rating))
    return sorted(out)


def reference_row(users, movies, rating, sizes):
    ts, _, user, movie, stars = rating
    when = datetime.fromtimestamp(ts, tz=timezone.utc)
    ids = [
        user,
        movie,
        *users[user],
        *movies[movie][:2],
        when.hour,
        when.weekday(),
        movies[movie][2],
    ]
    return float(stars >= 4), [x % s for x, s in zip(ids + [0] * 15, sizes, strict=True)]


@needs_data
@pytest.mark.parametrize("sizes", [SIZES, SMALL_SIZES])
def test_first_5000_ratings_match_reference(sizes):
    users, movies = reference_side_tables()
    arrays = read_movielens(RATINGS, sizes, max_rows=5000)
    ref = [reference_row(users, movies, r, sizes) for r in reference_ratings(5000)]
    assert len(arrays) == len(ref) == 5000
    np.testing.assert_array_equal(arrays.labels, [label for label, _ in ref])
    np.testing.assert_array_equal(arrays.sparse, [ids for _, ids in ref])
    assert not arrays.dense.any()


@needs_data
def test_whole_file_counts_and_spot_rows():
    arrays = read_movielens(RATINGS, SIZES)
    assert len(arrays) == 487_650 and int(arrays.labels.sum()) == 279_124  # PROVENANCE.md
    users, movies = reference_side_tables()
    ratings = reference_ratings()
    assert len(ratings) == len(arrays)
    for i in [*range(0, len(ratings), 997), len(ratings) - 1]:
        label, ids = reference_row(users, movies, ratings[i], SIZES)
        assert arrays.labels[i] == label and arrays.sparse[i].tolist() == ids, i
    # every used slot is within its exact table (no id folded by the modulo)
    raw_max = [2999, 3952, 1, 6, 20, 999, 18, 2**18 - 1, 23, 6, 127]
    assert (arrays.sparse[:, :11].max(axis=0) <= raw_max).all()


@needs_data
def test_configs_split_by_time():
    from mlet_dist.data import load_splits

    for name in ("movielens_mlet", "movielens_baseline"):
        cfg = load_config(REPO / "configs" / f"{name}.toml")
        assert cfg.data.source == "movielens"
        assert cfg.data.num_embeddings_per_feature == SIZES
        cfg.data.train_files = [str(REPO / f) for f in cfg.data.train_files]  # repo-relative
        cfg.data.max_rows = 20000
        whole = read_movielens(RATINGS, SIZES, max_rows=20000)
        splits = load_splits(cfg.data)
        assert (len(splits.train), len(splits.eval), len(splits.test)) == (16000, 2000, 2000)
        got = CriteoArrays.concat([splits.train, splits.eval, splits.test])
        np.testing.assert_array_equal(got.sparse, whole.sparse)
        np.testing.assert_array_equal(got.labels, whole.labels)
    ratings = reference_ratings(20000)  # the test split holds the newest 2000 ratings
    assert ratings[15999][0] <= ratings[16000][0] and ratings[17999][0] <= ratings[18000][0]
    users, movies = reference_side_tables()
    np.testing.assert_array_equal(
        splits.test.sparse, [reference_row(users, movies, r, SIZES)[1] for r in ratings[18000:]]
    )


@needs_data
def test_train_collapse_predict_end_to_end(tmp_path):
    """A short MLET run on 20,000 ratings: the collapsed model predicts what the trained one does,
    and `predict` reads MovieLens ratings (in file order) with the served predictor."""
    from mlet_dist.checkpoint import latest_checkpoint
    from mlet_dist.data import load_splits, make_batches
    from mlet_dist.distributed.parallelize import init_distributed
    from mlet_dist.export import CollapseOptions, collapse_run, load_unsharded
    from mlet_dist.metrics import binary_metrics
    from mlet_dist.predict_job import predict_file
    from mlet_dist.train import train
    from mlet_dist.workflow import check_collapsed, evaluate_run

    sizes = [*SIZES[:7], 4096, *SIZES[8:]]  # a smaller genre-set table keeps the test fast
    cfg = load_config(
        REPO / "configs/movielens_mlet.toml",
        [
            f"--data.train_files=['{RATINGS}']",
            "--data.max_rows=20000",
            f"--data.num_embeddings_per_feature={sizes}",
            "--model.embedding_dim=8",
            "--model.inner_dim=32",
            "--model.dense_arch_layer_sizes=[16, 8]",
            "--model.over_arch_layer_sizes=[16, 1]",
            "--train.progress=false",
            f"--train.run_dir={tmp_path / 'run'}",
        ],
    )
    init_distributed(DistConfig(device="cpu"))
    metrics = train(cfg)
    test = load_splits(cfg.data).test
    served = tmp_path / "served"
    collapse_run(cfg.train.run_dir, served, CollapseOptions(quantize="fp32"))
    check = check_collapsed(cfg.train.run_dir, served, test)
    assert check["passed"] and check["rows"] == 2000, check
    assert abs(check["trained_auc"] - metrics["test"]["auc"]) <= 1e-5
    assert 0.6 < metrics["test"]["auc"] < 1.0  # learned something from 16,000 ratings

    # predict: the first 300 ratings (users 1-3, not in time order) from a copy of the data
    new = tmp_path / "new"
    new.mkdir()
    for side in (USERS, MOVIES):
        (new / side.name).write_bytes(side.read_bytes())
    with gzip.open(RATINGS, "rb") as f:
        (new / "ratings.dat").write_bytes(b"".join(f.readline() for _ in range(300)))
    result = predict_file(served, [new / "ratings.dat"], tmp_path / "p.txt")
    got = np.loadtxt(tmp_path / "p.txt", dtype=np.float32)
    arrays = read_movielens(new / "ratings.dat", sizes, in_file_order=True)
    by_time = read_movielens(new / "ratings.dat", sizes)
    assert not np.array_equal(arrays.sparse, by_time.sparse)  # so the order is checked too
    model = load_unsharded(cfg, latest_checkpoint(cfg.train.run_dir)).eval()
    with torch.no_grad():
        logits = [model(b)[1][1] for b in make_batches(arrays, 128, shuffle=False, seed=0)]
    want = torch.sigmoid(torch.cat(logits)).numpy()
    assert result["rows"] == 300 and got.shape == (300,)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # `mlet-dist evaluate --data` reads MovieLens files too; a split reproduces training's metrics
    ev = evaluate_run(cfg.train.run_dir, files=[str(new / "ratings.dat")])
    expect = binary_metrics(torch.cat(logits), torch.from_numpy(arrays.labels))
    assert ev["rows"] == 300 and ev["auc"] == pytest.approx(expect["auc"], abs=1e-6)
    again = evaluate_run(cfg.train.run_dir, split="test")
    assert again["auc"] == pytest.approx(metrics["test"]["auc"], abs=1e-9)
    assert (
        json.loads((served / "manifest.json").read_text())["source"]["config"]["data"]["source"]
        == "movielens"
    )
