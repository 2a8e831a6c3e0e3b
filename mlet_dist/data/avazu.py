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

What a row must look like (anything else is a :class:`CriteoFormatError` naming the file and the
line): 24 comma-separated fields (CSV quoting allowed); ``click`` is ``0`` or ``1``; ``hour`` is 8
ASCII digits (YYMMDDHH); a hex column is 1 to 16 ASCII hex digits (64 bits); an integer code is
``-?[0-9]+`` (ASCII) with a value in [-2**32, 2**64); ``id`` is not used and not checked. The
bytes are read as Latin-1, so any byte sequence decodes and a non-ASCII character is reported as
a bad value of its column.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
import zlib
from pathlib import Path

import numpy as np

from mlet_dist.data.arrays import (
    CAT_FEATURE_COUNT,
    INT_FEATURE_COUNT,
    CriteoArrays,
    CriteoFormatError,
    check_table_sizes,
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


# ASCII only: Python's int() also takes "+1", " 1", "1_0", "0x1f" and non-ASCII digits ("١٢").
_HEX_RE = re.compile(r"[0-9a-fA-F]{1,16}")
_INT_RE = re.compile(r"-?[0-9]+")
_HOUR_RE = re.compile(r"[0-9]{8}")
_INT_MIN, _INT_END = -(1 << 32), 1 << 64


def _value(column: str, text: str, path: Path, line: int) -> int:
    """The id of one categorical field (before the modulo); a bad value raises naming it."""
    if column in HEX_COLUMNS:
        if _HEX_RE.fullmatch(text):
            return int(text, 16)
        kind = "a hex hash of 1 to 16 hex digits (e.g. 'e151e245')"
    else:
        # At most 20 significant digits before int(): Python refuses to convert > 4300 digits.
        if _INT_RE.fullmatch(text) and len(digits := text.lstrip("-").lstrip("0")) <= 20:
            v = -int(digits or "0") if text.startswith("-") else int(digits or "0")
            if _INT_MIN <= v < _INT_END:
                return v if v >= 0 else (1 << 32) + v
        kind = "an integer code in [-2**32, 2**64)"
    shown = text if len(text) <= 40 else text[:40] + "..."
    raise CriteoFormatError(
        f"{path}:{line}: column {column} = {shown!r} is not {kind}; is this an Avazu train CSV?",
        path=path,
        line=line,
    )


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
    sizes = [int(v) for v in check_table_sizes(num_embeddings_per_feature)]
    with path.open("rb") as raw:
        gz = raw.read(2) == b"\x1f\x8b"
    opener = gzip.open if gz else open
    labels, cats = [], []
    line = 0  # the last line read (csv's line_num: a quoted field may span lines)
    try:
        with opener(path, "rb") as fb:
            # Latin-1 decodes any byte: a non-ASCII byte fails its column's check, with its line.
            reader = csv.reader(io.TextIOWrapper(fb, encoding="latin-1", newline=""))
            for k, row in enumerate(reader):
                line = reader.line_num
                if k == 0 and row and row[0] == "id":
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
                        f"{path}:{line}: click = {row[1][:40]!r} is not 0 or 1",
                        path=path,
                        line=line,
                    )
                values = [
                    _value(c, t, path, line) % sizes[j]
                    for j, (c, t) in enumerate(zip(AVAZU_COLUMNS[3:], row[3:]))
                ]
                hour = row[2]
                if not _HOUR_RE.fullmatch(hour):
                    raise CriteoFormatError(
                        f"{path}:{line}: hour = {hour[:40]!r} is not YYMMDDHH", path=path, line=line
                    )
                values.append(int(hour[-2:]) % sizes[AVAZU_CAT_COUNT - 1])
                labels.append(int(row[1]))
                cats.append(values)
    except csv.Error as e:
        raise CriteoFormatError(
            f"{path}:{line + 1}: not readable as CSV ({e}); is this an Avazu train CSV?",
            path=path,
            line=line + 1,
        ) from e
    except (EOFError, OSError, zlib.error) as e:
        what = "a truncated or corrupt gzip file" if gz else "unreadable"
        raise CriteoFormatError(
            f"{path} is {what} (after line {line}: {e}): re-download or re-compress it",
            path=path,
            line=line + 1,
        ) from e
    n = len(labels)
    sparse = np.zeros((n, CAT_FEATURE_COUNT), dtype=np.int64)
    if n:
        sparse[:, :AVAZU_CAT_COUNT] = np.asarray(cats, dtype=np.int64)
    # cat_22..cat_25 are unused: id 0 (0 % size) for every row.
    return CriteoArrays(
        labels=np.asarray(labels, dtype=np.float32),
        dense=np.zeros((n, INT_FEATURE_COUNT), dtype=np.float32),
        sparse=sparse,
    )
