"""Avazu CTR data (Kaggle "Avazu Click-Through Rate Prediction") in the Criteo layout.

Avazu rows are CSV: ``id,click,hour,C1,banner_pos,site_id,…,C21`` (24 columns, optional header).
They are mapped onto the Criteo layout used everywhere else (13 dense + 26 categorical), so the
same model, loader and collapse apply:

- label = ``click``;
- categorical features cat_0…cat_20 = the 21 columns after ``hour`` (C1, banner_pos, site_*,
  app_*, device_*, C14…C21), cat_21 = hour of day (``hour`` is YYMMDDHH), cat_22…cat_25 unused
  (id 0; give them table size 1);
- no dense features (all 13 are 0).

Hex hash columns (site_id, …) are parsed as hex, integer codes as integers (C20's -1 becomes
2**32 - 1), then taken modulo the feature's table size, as for Criteo.
"""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path

import numpy as np

from mlet_dist.data.criteo import (
    CAT_FEATURE_COUNT,
    INT_FEATURE_COUNT,
    CriteoArrays,
    CriteoFormatError,
)

AVAZU_COLUMNS = (
    "id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,"
    "app_category,device_id,device_ip,device_model,device_type,device_conn_type,C14,C15,C16,C17,"
    "C18,C19,C20,C21"
).split(",")
HEX_COLUMNS = {
    "site_id", "site_domain", "site_category", "app_id", "app_domain", "app_category",
    "device_id", "device_ip", "device_model",
}  # fmt: skip
AVAZU_CAT_COUNT = 22  # 21 columns + hour of day

# Table sizes for the Avazu mapping: small code columns keep their range, hashes get 2**17 rows.
DEFAULT_AVAZU_TABLE_SIZES = [
    16, 8, 131072, 131072, 64, 131072, 4096, 64, 131072, 131072, 8192, 8, 8,
    8192, 16, 16, 4096, 8, 128, 4096, 512, 24, 1, 1, 1, 1,
]  # fmt: skip


def _value(column: str, text: str, path: Path, line: int) -> int:
    try:
        if column in HEX_COLUMNS:
            return int(text, 16)
        v = int(text)
        return v if v >= 0 else (1 << 32) + v
    except ValueError:
        kind = "an 8-digit hex hash" if column in HEX_COLUMNS else "an integer code"
        raise CriteoFormatError(
            f"{path}:{line}: column {column} = {text!r} is not {kind}; is this an Avazu train CSV?",
            path=path,
            line=line,
        ) from None


def read_avazu_csv(
    path: str | Path, num_embeddings_per_feature: list[int], max_rows: int = 0
) -> CriteoArrays:
    """Reads an Avazu CSV (plain or gzip, with or without header) into Criteo-layout arrays."""
    path = Path(path)
    if len(num_embeddings_per_feature) != CAT_FEATURE_COUNT:
        raise CriteoFormatError(
            f"Avazu data needs {CAT_FEATURE_COUNT} table sizes in the Criteo layout (22 used, "
            f"4 unused), got {len(num_embeddings_per_feature)}"
        )
    if not path.is_file():
        raise CriteoFormatError(f"{path} does not exist", path=path)
    sizes = np.asarray(num_embeddings_per_feature, dtype=np.int64)
    with path.open("rb") as raw:
        gz = raw.read(2) == b"\x1f\x8b"
    opener = gzip.open if gz else open
    labels, cats = [], []
    try:
        with opener(path, "rb") as fb:
            reader = csv.reader(io.TextIOWrapper(fb, encoding="utf-8", newline=""))
            for line, row in enumerate(reader, start=1):
                if line == 1 and row and row[0] == "id":
                    continue  # header
                if max_rows and len(labels) >= max_rows:
                    break
                if len(row) != len(AVAZU_COLUMNS):
                    raise CriteoFormatError(
                        f"{path}:{line}: {len(row)} fields, an Avazu row has {len(AVAZU_COLUMNS)} "
                        f"({','.join(AVAZU_COLUMNS[:4])},…)",
                        path=path,
                        line=line,
                    )
                if row[1] not in ("0", "1"):
                    raise CriteoFormatError(
                        f"{path}:{line}: click = {row[1]!r} is not 0 or 1", path=path, line=line
                    )
                labels.append(int(row[1]))
                values = [_value(c, t, path, line) for c, t in zip(AVAZU_COLUMNS[3:], row[3:])]
                hour = row[2]
                if len(hour) != 8 or not hour.isdigit():
                    raise CriteoFormatError(
                        f"{path}:{line}: hour = {hour!r} is not YYMMDDHH", path=path, line=line
                    )
                values.append(int(hour[-2:]))
                cats.append(values)
    except (EOFError, gzip.BadGzipFile, OSError) as e:
        if isinstance(e, CriteoFormatError):
            raise
        raise CriteoFormatError(
            f"{path} is a truncated or corrupt gzip file ({e}): re-download or re-compress it",
            path=path,
        ) from e
    n = len(labels)
    sparse = np.zeros((n, CAT_FEATURE_COUNT), dtype=np.int64)
    if n:
        sparse[:, :AVAZU_CAT_COUNT] = np.asarray(cats, dtype=np.int64)
    sparse %= sizes
    return CriteoArrays(
        labels=np.asarray(labels, dtype=np.float32),
        dense=np.zeros((n, INT_FEATURE_COUNT), dtype=np.float32),
        sparse=sparse,
    )
