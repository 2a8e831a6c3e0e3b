"""MovieLens-1M ratings in the Criteo layout (a stop-gap until features are declared in the config).

``data.source = "movielens"`` with ``data.train_files = ["<dir>/ratings.dat.gz"]``: the ratings file
(``UserID::MovieID::Rating::Timestamp``, plain or gzip) is joined with ``users.dat``
(``UserID::Gender::Age::Occupation::Zip-code``) and ``movies.dat`` (``MovieID::Title::Genres``,
Latin-1) read from the same directory. Every rating is one sample in the Criteo layout used
everywhere else (13 dense + 26 single-id categorical features), so the same model, loader, split,
evaluation and collapse apply:

- label = 1 if rating >= 4 else 0;
- no dense features (all 13 are 0);
- categorical features (the id, then the exact table size of :data:`DEFAULT_MOVIELENS_TABLE_SIZES`):

  ======  =====================================================================  ==========
  slot    value                                                                  table rows
  ======  =====================================================================  ==========
  cat_0   user id (1..6040)                                                      6041
  cat_1   movie id (1..3952)                                                     3953
  cat_2   gender: F = 0, M = 1                                                   2
  cat_3   age group: 1, 18, 25, 35, 45, 50, 56 -> 0..6                          7
  cat_4   occupation (0..20)                                                     21
  cat_5   zip prefix: the digits among the first 3 characters of the zip code,   1000
          read as a decimal number ("12345" -> 123, "98107-4032" -> 981,
          "T8N 3R1" -> 8, "ABC" -> 0)
  cat_6   first genre listed: 1..18 in the order of :data:`GENRES` (0 = none)    19
  cat_7   genre set: bit g-1 set for every genre g listed (sorted, duplicates    2**18
          ignored; 0 = none)
  cat_8   hour of day of the timestamp, UTC (0..23)                              24
  cat_9   weekday of the timestamp, UTC: Monday = 0 … Sunday = 6                 7
  cat_10  release year - 1900 from the title's trailing "(YYYY)", for            128
          1901 <= YYYY <= 2027 (0 = no year or outside that range)
  cat_11  … cat_25 unused (id 0; give them table size 1)                         1
  ======  =====================================================================  ==========

All ids are taken modulo the configured table sizes, as for Criteo and Avazu.

**Row order: time.** The rows of a ratings file are returned sorted by timestamp (stable: equal
timestamps keep their file order). ``split_arrays`` cuts the rows contiguously into train, eval,
test in that order, so with ``eval_fraction = test_fraction = 0.1`` training gets the oldest 80%
of the ratings, eval the next 10% and test the newest 10% (train on the past, evaluate on the
future). ``max_rows`` keeps the first ``max_rows`` lines of the file (file order, i.e. the first
users), which are then sorted by time. ``in_file_order=True`` keeps the file order (scoring,
where the output must follow the input).

Bad input is an error naming the file and the 1-based line: a ratings line that is not four
``::``-separated integers, a rating outside 1..5, a user or movie missing from the side files, an
unknown gender, age group, occupation or genre. A missing ``users.dat``/``movies.dat`` is an error
naming the file.

Written here rather than with pandas/pyarrow's CSV readers: the ``::`` separator is not a
single-byte delimiter (pyarrow rejects it; pandas needs its slow Python engine), and a plain loop
over the decompressed lines reads the 487,650 ratings of the partial ML-1M in about a second.
"""

from __future__ import annotations

import gzip
import re
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa

from mlet_dist.data.arrays import (
    CAT_FEATURE_COUNT,
    INT_FEATURE_COUNT,
    CriteoArrays,
    CriteoFormatError,
)

GENRES = (
    "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
)  # fmt: skip
"""The 18 ML-1M genres (README of the data set); genre g (1-based) is ``GENRES[g - 1]``."""
AGE_GROUPS = (1, 18, 25, 35, 45, 50, 56)
"""The ML-1M age groups (lower bound of each range); the age code is the index."""
GENDERS = ("F", "M")
OCCUPATIONS = 21
MOVIELENS_CAT_COUNT = 11
"""Categorical slots used (cat_0 … cat_10); cat_11 … cat_25 are 0."""
MIN_YEAR, YEAR_CODES = 1900, 128

DEFAULT_MOVIELENS_TABLE_SIZES = [
    6041, 3953, len(GENDERS), len(AGE_GROUPS), OCCUPATIONS, 1000, len(GENRES) + 1,
    1 << len(GENRES), 24, 7, YEAR_CODES, *[1] * (CAT_FEATURE_COUNT - MOVIELENS_CAT_COUNT),
]  # fmt: skip
"""Exact table sizes for the value ranges of ML-1M (user and movie ids up to 6040 / 3952)."""

USERS_FILE = "users.dat"
MOVIES_FILE = "movies.dat"
_YEAR_RE = re.compile(r"\((\d{4})\)\s*$")
_GENRE_INDEX = {g: i + 1 for i, g in enumerate(GENRES)}


def _read_bytes(path: Path) -> bytes:
    """The whole file, decompressed when it is gzip (detected by magic bytes)."""
    with path.open("rb") as raw:
        gz = raw.read(2) == b"\x1f\x8b"
    try:
        if gz:
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise CriteoFormatError(
            f"{path} is a truncated or corrupt gzip file ({e}): re-download or re-compress it",
            path=path,
        ) from e


def _lines(data: bytes) -> list[bytes]:
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # the final newline
    return lines


def _text_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, text) of the non-empty lines of a Latin-1 side file."""
    text = _read_bytes(path).decode("latin-1")
    lines = (line.rstrip("\r") for line in text.split("\n"))
    return [(i, line) for i, line in enumerate(lines, start=1) if line]


def _bad_line(path: Path, line_no: int, what: str, layout: str) -> CriteoFormatError:
    return CriteoFormatError(f"{path}:{line_no}: {what}; {layout}", path=path, line=line_no)


def _side_file(ratings: Path, name: str) -> Path:
    path = ratings.parent / name
    if not path.is_file():
        raise CriteoFormatError(
            f"{path} does not exist: MovieLens ratings ({ratings.name}) need {USERS_FILE} and "
            f"{MOVIES_FILE} in the same directory",
            path=path,
        )
    return path


def zip_prefix(zip_code: str) -> int:
    """The digits among the first 3 characters of a zip code as a number (no digit: 0)."""
    digits = "".join(c for c in zip_code[:3] if "0" <= c <= "9")
    return int(digits) if digits else 0


def release_year_code(title: str) -> int:
    """Release year - 1900 from a title ending in "(YYYY)", for 1901..2027; else 0."""
    m = _YEAR_RE.search(title)
    year = int(m.group(1)) if m else 0
    return year - MIN_YEAR if MIN_YEAR < year < MIN_YEAR + YEAR_CODES else 0


def read_users(path: Path) -> dict[int, tuple[int, int, int, int]]:
    """users.dat -> {user id: (gender, age code, occupation, zip prefix)}."""
    users: dict[int, tuple[int, int, int, int]] = {}
    layout = "a users.dat line is UserID::Gender::Age::Occupation::Zip-code"
    for line_no, line in _text_lines(path):
        f = line.split("::")

        def bad(what: str, line_no: int = line_no) -> CriteoFormatError:
            return _bad_line(path, line_no, what, layout)

        if len(f) != 5:
            raise bad(f"{len(f)} fields")
        uid, gender, age, occupation, zip_code = f
        if not uid.isdigit():
            raise bad(f"UserID = {uid!r} is not a number")
        if gender not in GENDERS:
            raise bad(f"Gender = {gender!r} is not F or M")
        if not age.isdigit() or int(age) not in AGE_GROUPS:
            raise bad(f"Age = {age!r} is not one of {', '.join(map(str, AGE_GROUPS))}")
        if not occupation.isdigit() or int(occupation) >= OCCUPATIONS:
            raise bad(f"Occupation = {occupation!r} is not 0..{OCCUPATIONS - 1}")
        if int(uid) in users:
            raise bad(f"UserID {uid} appears twice")
        users[int(uid)] = (
            GENDERS.index(gender),
            AGE_GROUPS.index(int(age)),
            int(occupation),
            zip_prefix(zip_code),
        )
    return users


def read_movies(path: Path) -> dict[int, tuple[int, int, int]]:
    """movies.dat (Latin-1) -> {movie id: (first genre, genre-set bitmask, year code)}."""
    movies: dict[int, tuple[int, int, int]] = {}
    layout = "a movies.dat line is MovieID::Title::Genres (genres |-separated)"
    for line_no, line in _text_lines(path):

        def bad(what: str, line_no: int = line_no) -> CriteoFormatError:
            return _bad_line(path, line_no, what, layout)

        mid, sep, rest = line.partition("::")
        title, sep2, genre_text = rest.rpartition("::")
        if not (sep and sep2):
            raise bad("fewer than 3 fields")
        if not mid.isdigit():
            raise bad(f"MovieID = {mid!r} is not a number")
        genres = []
        for g in genre_text.split("|") if genre_text else []:
            if g not in _GENRE_INDEX:
                raise bad(f"unknown genre {g!r} (known: {', '.join(GENRES)})")
            genres.append(_GENRE_INDEX[g])
        if int(mid) in movies:
            raise bad(f"MovieID {mid} appears twice")
        mask = sum(1 << (g - 1) for g in set(genres))
        movies[int(mid)] = (genres[0] if genres else 0, mask, release_year_code(title))
    return movies


def _lookup(table: dict[int, tuple[int, ...]], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Dense (max id + 1, width) int64 array of a side table and a mask of the ids present."""
    size = max(table, default=-1) + 1
    values = np.zeros((size, width), dtype=np.int64)
    known = np.zeros(size, dtype=bool)
    for k, v in table.items():
        values[k] = v
        known[k] = True
    return values, known


def read_movielens(
    path: str | Path,
    num_embeddings_per_feature: list[int],
    max_rows: int = 0,
    in_file_order: bool = False,
) -> CriteoArrays:
    """Reads MovieLens ratings (plain or gzip) with the users/movies of their directory.

    Args:
        path: ``ratings.dat`` or ``ratings.dat.gz``; ``users.dat`` and ``movies.dat`` are read from
            the same directory.
        num_embeddings_per_feature: the 26 table sizes; ids are taken modulo them.
        max_rows: read at most this many ratings lines (the first ones of the file; 0 = all).
        in_file_order: keep the file's row order instead of sorting by timestamp.

    Returns:
        Criteo-layout arrays (see the module docstring), sorted by timestamp (stable) unless
        ``in_file_order``.

    Raises:
        CriteoFormatError: a missing file, a truncated gzip or a malformed line (file and line).
    """
    path = Path(path)
    if len(num_embeddings_per_feature) != CAT_FEATURE_COUNT:
        raise CriteoFormatError(
            f"MovieLens data needs {CAT_FEATURE_COUNT} table sizes in the Criteo layout "
            f"({MOVIELENS_CAT_COUNT} used, {CAT_FEATURE_COUNT - MOVIELENS_CAT_COUNT} unused), "
            f"got {len(num_embeddings_per_feature)}"
        )
    raw, users, movies = _read_ratings(path, max_rows, in_file_order)
    n = len(raw)
    user_f, movie_f, ts = users[raw[:, 0]], movies[raw[:, 1]], raw[:, 3]
    sparse = np.zeros((n, CAT_FEATURE_COUNT), dtype=np.int64)
    sparse[:, 0] = raw[:, 0]
    sparse[:, 1] = raw[:, 1]
    sparse[:, 2:6] = user_f  # gender, age code, occupation, zip prefix
    sparse[:, 6:8] = movie_f[:, :2]  # first genre, genre set
    sparse[:, 8] = (ts // 3600) % 24  # hour of day, UTC
    sparse[:, 9] = (ts // 86400 + 3) % 7  # 1970-01-01 was a Thursday (Monday = 0)
    sparse[:, 10] = movie_f[:, 2]  # release year code
    sparse %= np.asarray(num_embeddings_per_feature, dtype=np.int64)
    return CriteoArrays(
        labels=(raw[:, 2] >= 4).astype(np.float32),
        dense=np.zeros((n, INT_FEATURE_COUNT), dtype=np.float32),
        sparse=sparse,
    )


def read_movielens_table(
    path: str | Path, max_rows: int = 0, in_file_order: bool = False
) -> pa.Table:
    """MovieLens ratings as a table of named columns, for a declared schema (the preset
    ``configs/movielens_features.toml``; :func:`mlet_dist.data.columns.encode_table`).

    Columns (ints, one per rating; rows sorted by time unless ``in_file_order``, so the contiguous
    train / eval / test split is a time split): ``label`` (rating >= 4), ``user``, ``movie``,
    ``gender`` (F = 0, M = 1), ``age`` (age-group code 0..6), ``occupation``, ``zip_prefix``,
    ``genres`` (list of the movie's genre codes 1..18 in the order of :data:`GENRES`, ascending:
    the multi-hot feature), ``hour`` and ``weekday`` (UTC, Monday = 0) of the timestamp,
    ``year`` (release year code, as ``cat_10`` of the Criteo mapping).
    """
    raw, users, movies = _read_ratings(Path(path), max_rows, in_file_order)
    user_f, movie_f, ts = users[raw[:, 0]], movies[raw[:, 1]], raw[:, 3]
    codes = np.arange(1, len(GENRES) + 1)
    bits = (movie_f[:, 1:2] >> (codes - 1)) & 1  # (n, 18): genre g listed
    genres = pa.ListArray.from_arrays(
        pa.array(np.concatenate([[0], np.cumsum(bits.sum(axis=1))]).astype(np.int32)),
        pa.array(np.broadcast_to(codes, bits.shape)[bits.astype(bool)].astype(np.int64)),
    )
    columns = {
        "label": pa.array((raw[:, 2] >= 4).astype(np.int8)),
        "user": raw[:, 0],
        "movie": raw[:, 1],
        "gender": user_f[:, 0],
        "age": user_f[:, 1],
        "occupation": user_f[:, 2],
        "zip_prefix": user_f[:, 3],
        "genres": genres,
        "hour": (ts // 3600) % 24,
        "weekday": (ts // 86400 + 3) % 7,
        "year": movie_f[:, 2],
    }
    return pa.table(columns)


def _read_ratings(
    path: Path, max_rows: int, in_file_order: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ratings (n, 4): user, movie, rating, timestamp; users lookup; movies lookup)."""
    if not path.is_file():
        raise CriteoFormatError(f"{path} does not exist", path=path)
    users, user_known = _lookup(read_users(_side_file(path, USERS_FILE)), 4)
    movies, movie_known = _lookup(read_movies(_side_file(path, MOVIES_FILE)), 3)
    lines = _lines(_read_bytes(path))
    if max_rows:
        lines = lines[:max_rows]
    rows = []
    for line_no, line in enumerate(lines, start=1):
        try:
            u, m, r, t = map(int, line.split(b"::"))
            if not 1 <= r <= 5:
                raise ValueError
        except ValueError:
            shown = line[:80].decode("latin-1")
            raise CriteoFormatError(
                f"{path}:{line_no}: {shown!r} is not UserID::MovieID::Rating::Timestamp "
                f"(integers, rating 1..5)",
                path=path,
                line=line_no,
            ) from None
        rows.append((u, m, r, t))
    raw = np.asarray(rows, dtype=np.int64).reshape(-1, 4)
    for col, name, known, side in (
        (0, "user", user_known, USERS_FILE),
        (1, "movie", movie_known, MOVIES_FILE),
    ):
        ids = raw[:, col]
        ok = (ids >= 0) & (ids < len(known))
        ok[ok] = known[ids[ok]]
        if not ok.all():
            line_no = int(np.argmin(ok)) + 1
            raise CriteoFormatError(
                f"{path}:{line_no}: {name} {ids[line_no - 1]} is not in "
                f"{path.parent / side}; use the {side} of the same MovieLens release",
                path=path,
                line=line_no,
            )
    if not in_file_order:
        raw = raw[np.argsort(raw[:, 3], kind="stable")]
    return raw, users, movies
