"""Reader of the Criteo click-log TSV format into :class:`~mlet_dist.data.arrays.CriteoArrays`.

One row per line, 40 tab-separated fields: label (0/1), 13 integer features I1..I13, 26 categorical
features C1..C26 (hex hashes). An empty field is a missing value. Files may be plain text or gzip
(detected by magic bytes), with LF or CRLF line endings. This is the raw format of both the Criteo
Kaggle ``train.txt`` and the Criteo 1TB ``day_N`` files, and of the synthetic generator's output.

The transforms follow the facebookresearch/dlrm reference: integer features are clamped at 0 and
mapped through ``log(x + 1)`` (missing = 0); categorical hashes are parsed as unsigned integers
(missing = 0) and taken modulo the table size of their feature. Values that cannot be represented
are malformed, not clamped: an integer feature of more than 38 significant digits (>= 10**38,
near float32's limit of 3.4e38; a 309-digit one would be ``inf`` in float64) and a categorical
value of more than 16 hex digits (64 bits).

Example::

    arrays = read_criteo_tsv("day_0.gz", num_embeddings_per_feature=[100_000] * 26)
    arrays.sparse[0, 6]  # int(C7 of line 1, 16) % 100_000
"""

from __future__ import annotations

import gzip
import logging
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from mlet_dist.data.arrays import (
    CAT_FEATURE_COUNT,
    DEFAULT_CAT_NAMES,
    DEFAULT_INT_NAMES,
    INT_FEATURE_COUNT,
    CriteoArrays,
    CriteoFormatError,
    check_table_sizes,
)

logger = logging.getLogger(__name__)

__all__ = [
    "FIELD_COUNT",
    "ON_BAD_ROW",
    "BadRow",
    "iter_line_blocks",
    "parse_lines",
    "read_criteo_tsv",
]

FIELD_COUNT = 1 + INT_FEATURE_COUNT + CAT_FEATURE_COUNT
"""Fields per line: label, 13 integer features, 26 categorical features (40)."""

_GZIP_MAGIC = b"\x1f\x8b"
# Decompressed bytes handed to the vectorized parser at a time: large enough that the per-chunk
# numpy overhead is negligible, small enough that the temporary index arrays stay ~100 MB.
_CHUNK_BYTES = 8 << 20
# Longest categorical value accepted: 16 hex digits fit an unsigned 64-bit integer exactly, so
# ``value % table_size`` is the true modulo (Criteo hashes have 8).
_MAX_HEX_DIGITS = 16
# Longest integer feature accepted, in significant digits (leading zeros do not count): every
# such value is < 10**38, below float32's largest finite value (3.4e38), so the parsed count and
# its log(x + 1) are finite in float32 (a 309-digit value would be inf even in float64, and
# would train to a NaN loss). Criteo's counts have at most 10 digits.
_MAX_INT_DIGITS = 38
_MAX_SHOWN_CHARS = 40

_HEX_LUT = np.full(256, -1, dtype=np.int16)
for _c in b"0123456789":
    _HEX_LUT[_c] = _c - ord("0")
for _c in b"abcdef":
    _HEX_LUT[_c] = _c - ord("a") + 10
    _HEX_LUT[_c - 32] = _c - ord("a") + 10  # upper case A-F
_DEC_LUT = np.full(256, -1, dtype=np.int16)
for _c in b"0123456789":
    _DEC_LUT[_c] = _c - ord("0")
del _c

_INT_RE = re.compile(rb"-?[0-9]+")
_HEX_RE = re.compile(rb"[0-9a-fA-F]+")


def _show(value: bytes) -> str:
    """A field value for an error message: decoded leniently and shortened."""
    text = value.decode("utf-8", errors="backslashreplace")
    if len(text) > _MAX_SHOWN_CHARS:
        text = text[:_MAX_SHOWN_CHARS] + "..."
    return repr(text)


def _line_error(line: bytes) -> str | None:
    """Validates one line (without its newline) field by field; returns what is wrong, or None.

    This is the slow, exact path: it only runs on a chunk where the vectorized parser found a
    problem, to name the first bad line and field precisely. It must accept exactly what the
    vectorized parser accepts.
    """
    if line == b"":
        return (
            f"empty line (expected {FIELD_COUNT} tab-separated fields); remove blank lines "
            f"from the file"
        )
    fields = line.split(b"\t")
    if len(fields) != FIELD_COUNT:
        return (
            f"{len(fields)} tab-separated fields, expected {FIELD_COUNT} (label, I1..I13, "
            f"C1..C26; a missing value is an empty field, so a row always has 39 tabs); "
            f"check the delimiter and that the line is not cut or merged with another"
        )
    if fields[0] not in (b"0", b"1"):
        return f"label (field 1) must be 0 or 1, got {_show(fields[0])}; fix or drop the row"
    for i in range(INT_FEATURE_COUNT):
        value = fields[1 + i]
        if value and _INT_RE.fullmatch(value) is None:
            return (
                f"integer feature I{i + 1} ({DEFAULT_INT_NAMES[i]}, field {i + 2}) is not an "
                f"integer: {_show(value)}; integer features must be decimal integers (optionally "
                f"negative) or empty for missing"
            )
        digits = len(value.lstrip(b"-").lstrip(b"0"))
        if digits > _MAX_INT_DIGITS:
            return (
                f"integer feature I{i + 1} ({DEFAULT_INT_NAMES[i]}, field {i + 2}) has {digits} "
                f"significant digits, at most {_MAX_INT_DIGITS} are accepted (values must stay "
                f"below 10**38, within float32's range): {_show(value)}; fix or drop the row"
            )
    for j in range(CAT_FEATURE_COUNT):
        value = fields[1 + INT_FEATURE_COUNT + j]
        if value and _HEX_RE.fullmatch(value) is None:
            return (
                f"categorical feature C{j + 1} ({DEFAULT_CAT_NAMES[j]}, field "
                f"{j + 2 + INT_FEATURE_COUNT}) is not a hex string: {_show(value)}; categorical "
                f"features must be hex hashes like '68fd1e64' or empty for missing"
            )
        if len(value) > _MAX_HEX_DIGITS:
            return (
                f"categorical feature C{j + 1} ({DEFAULT_CAT_NAMES[j]}, field "
                f"{j + 2 + INT_FEATURE_COUNT}) has {len(value)} hex digits, more than "
                f"{_MAX_HEX_DIGITS} (64 bits): {_show(value)}; re-hash it to at most 64 bits"
            )
    return None


def _raise_first_bad_line(path: Path, data: bytes, first_line: int) -> None:
    """Finds the first invalid line of ``data`` and raises a CriteoFormatError naming it."""
    for k, line in enumerate(data.split(b"\n")[:-1]):  # data ends with a newline
        problem = _line_error(line)
        if problem is not None:
            raise CriteoFormatError(
                f"{path}, line {first_line + k}: {problem}", path=path, line=first_line + k
            )
    # Unreachable when the two parsers agree; still a clean error rather than a silent skip.
    last_line = first_line + data.count(b"\n") - 1
    raise CriteoFormatError(
        f"{path}, lines {first_line}-{last_line}: malformed Criteo data "
        f"(the exact line could not be identified)",
        path=path,
        line=first_line,
    )


def _gather(buf: np.ndarray, starts: np.ndarray, p: int) -> np.ndarray:
    # Fields end with a separator byte, so start + p <= end is always inside buf; the clip only
    # guards positions past a field's end, whose bytes are masked out by the caller.
    return buf[np.minimum(starts + p, buf.shape[0] - 1)]


def _parse_hex(buf: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, bool]:
    """Vectorized hex parse of fields; returns (uint64 values, any_bad). Empty fields give 0."""
    values = np.zeros(starts.shape[0], dtype=np.uint64)
    bad = bool((lens > _MAX_HEX_DIGITS).any())
    width = min(int(lens.max(initial=0)), _MAX_HEX_DIGITS)
    for p in range(width):
        active = lens > p
        nib = _HEX_LUT[_gather(buf, starts, p)]
        if (active & (nib < 0)).any():
            bad = True
        values = np.where(active, (values << np.uint64(4)) | nib.astype(np.uint64), values)
    return values, bad


def _parse_int(buf: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, bool]:
    """Vectorized parse of ``-?[0-9]+`` fields; returns (float64 values clamped at 0, any_bad).

    A value of more than ``_MAX_INT_DIGITS`` significant digits is bad (either sign)."""
    neg = (lens > 0) & (_gather(buf, starts, 0) == ord("-"))
    digit_starts = starts + neg
    ndigits = lens - neg
    bad = bool((neg & (ndigits == 0)).any())
    # float64 accumulation is exact below 2**53, far above Criteo's counts; with at most 38
    # significant digits it stays below 1e38 (finite in float32 too).
    values = np.zeros(starts.shape[0], dtype=np.float64)
    significant = np.zeros(starts.shape[0], dtype=np.int64)
    for p in range(int(ndigits.max(initial=0))):
        active = ndigits > p
        digit = _DEC_LUT[_gather(buf, digit_starts, p)]
        if (active & (digit < 0)).any():
            bad = True
        with np.errstate(over="ignore"):  # a too-long value may reach inf: it is bad anyway
            values = np.where(active, values * 10.0 + digit, values)
        # Once a non-zero digit was seen the value stays > 0: every later digit is significant.
        significant += active & (values > 0)
    if (significant > _MAX_INT_DIGITS).any():
        bad = True
    values[neg] = 0.0  # negative counts (e.g. I2 = -1) are clamped to 0, as in DLRM
    return values, bad


def _parse_chunk(path: Path, data: bytes, first_line: int, table_sizes: np.ndarray) -> CriteoArrays:
    """Parses complete lines (``data`` ends with b'\\n', no CR) into arrays, vectorized."""
    buf = np.frombuffer(data, dtype=np.uint8)
    is_sep = (buf == 9) | (buf == 10)
    seps = np.flatnonzero(is_sep)
    newline_at = np.flatnonzero(buf[seps] == 10)  # index into seps of each line's newline
    n = newline_at.shape[0]
    fields_per_line = np.diff(newline_at, prepend=-1)
    if (fields_per_line != FIELD_COUNT).any():
        _raise_first_bad_line(path, data, first_line)
    starts = np.empty_like(seps)
    starts[0] = 0
    starts[1:] = seps[:-1] + 1
    starts = starts.reshape(n, FIELD_COUNT)
    lens = seps.reshape(n, FIELD_COUNT) - starts

    label_ok = (lens[:, 0] == 1) & (
        (buf[starts[:, 0]] == ord("0")) | (buf[starts[:, 0]] == ord("1"))
    )
    dense_cols = slice(1, 1 + INT_FEATURE_COUNT)
    dense, dense_bad = _parse_int(buf, starts[:, dense_cols].ravel(), lens[:, dense_cols].ravel())
    cat_cols = slice(1 + INT_FEATURE_COUNT, FIELD_COUNT)
    hashes, cat_bad = _parse_hex(buf, starts[:, cat_cols].ravel(), lens[:, cat_cols].ravel())
    if dense_bad or cat_bad or not label_ok.all():
        _raise_first_bad_line(path, data, first_line)

    labels = (buf[starts[:, 0]] == ord("1")).astype(np.float32)
    dense_out = np.log1p(dense).astype(np.float32).reshape(n, INT_FEATURE_COUNT)
    sparse = (hashes.reshape(n, CAT_FEATURE_COUNT) % table_sizes).astype(np.int64)
    return CriteoArrays(labels, dense_out, sparse)


def _open_binary(path: Path) -> tuple[BinaryIO, bool]:
    """Opens a plain or gzip file (by magic bytes); returns (stream, is_gzip)."""
    try:
        raw = open(path, "rb")  # closed by the caller (it owns the stream)
    except FileNotFoundError as e:
        raise CriteoFormatError(
            f"{path}: file does not exist; check the path (data.train_files / data.eval_files, or "
            f"generate synthetic data first)",
            path=path,
        ) from e
    except OSError as e:
        raise CriteoFormatError(f"{path}: cannot open file: {e}", path=path) from e
    magic = raw.read(2)
    raw.seek(0)
    if magic == _GZIP_MAGIC:
        return gzip.GzipFile(fileobj=raw, mode="rb"), True  # type: ignore[return-value]
    if path.suffix == ".gz":
        logger.warning(
            "%s ends with .gz but is not gzip-compressed; reading it as plain text", path
        )
    return raw, False


def iter_line_blocks(
    path: str | Path, *, start: int = 0, stop: int = 0, chunk_bytes: int = 0
) -> Iterator[tuple[int, bytes]]:
    """Streams a Criteo TSV file (plain or gzip) as blocks of complete lines, in bounded memory.

    Lines are numbered from 1 as in an editor; only lines ``start + 1 .. stop`` (0-based indices
    ``[start, stop)``) are yielded, the others are read past without being parsed. CRLF endings
    are turned into LF, and a last line without a final newline gets one.

    Args:
        path: the file; gzip is detected by its magic bytes.
        start: 0-based index of the first line to yield.
        stop: 0-based index one past the last line to yield (0 = to the end of the file).
        chunk_bytes: decompressed bytes read at a time (0 = the module default, ~8 MB).

    Yields:
        ``(first_line, data)``: the 1-based number of the block's first line and the block's bytes,
        which end with b"\n" and contain no CRLF.

    Raises:
        CriteoFormatError: missing/unreadable file, or a truncated/corrupt gzip stream (the
            message names the first line that could not be read completely).

    Example::

        for first_line, data in iter_line_blocks("day_0.gz", stop=1000):
            arrays, bad = parse_lines(path, data, first_line, [2**20] * 26)
    """
    path = Path(path)
    if start < 0 or stop < 0 or (stop and stop < start):
        raise ValueError(f"line range [{start}, {stop}) is invalid (0 = to the end)")
    chunk_bytes = chunk_bytes or _CHUNK_BYTES
    lines_done = 0  # lines read completely so far (yielded or read past)
    carry = b""
    stream, is_gzip = _open_binary(path)
    with stream:
        while not (stop and lines_done >= stop):
            try:
                block = stream.read(chunk_bytes)
            except (EOFError, OSError, zlib.error) as e:
                if not is_gzip:
                    raise CriteoFormatError(f"{path}: cannot read file: {e}", path=path) from e
                # The line being decompressed when the stream broke (earlier ones were fine).
                line = lines_done + 1
                raise CriteoFormatError(
                    f"{path}, line {line}: {path.name} is truncated/corrupt gzip (the stream "
                    f"breaks at or after this line; {type(e).__name__}: {e}): re-download or "
                    f"re-compress it",
                    path=path,
                    line=line,
                ) from e
            if block:
                data = carry + block
                cut = data.rfind(b"\n") + 1
                data, carry = data[:cut], data[cut:]
            else:
                # End of file: a last line without a final newline still counts.
                data, carry = (carry + b"\n" if carry else b""), b""
            if data:
                n_lines = data.count(b"\n")
                first = lines_done
                lines_done += n_lines
                lo = max(start - first, 0)
                hi = n_lines if not stop else min(stop - first, n_lines)
                if lo < hi:
                    if lo > 0 or hi < n_lines:
                        ends = np.flatnonzero(np.frombuffer(data, np.uint8) == 10) + 1
                        data = data[(int(ends[lo - 1]) if lo else 0) : int(ends[hi - 1])]
                    # The vectorized parser knows only LF; a CR before the LF is a Windows ending.
                    if b"\r" in data:
                        data = data.replace(b"\r\n", b"\n")
                    yield first + lo + 1, data
            if not block:
                break


@dataclass
class BadRow:
    """A line rejected by :func:`parse_lines` under ``on_bad_row='skip'``.

    Attributes:
        path: the file.
        line: 1-based line number.
        reason: what is wrong, as the error of the 'error' policy would say it.
        text: the raw line, without its newline.
    """

    path: str
    line: int
    reason: str
    text: bytes


ON_BAD_ROW = ("error", "skip")
"""Bad-row policies: raise a CriteoFormatError naming the line, or skip and report the line."""


def parse_lines(
    path: str | Path,
    data: bytes,
    first_line: int,
    num_embeddings_per_feature: Sequence[int],
    *,
    on_bad_row: str = "error",
) -> tuple[CriteoArrays, list[BadRow]]:
    """Parses a block of complete lines (as :func:`iter_line_blocks` yields them) into arrays.

    The transforms are the reader's: label 0/1, ``log(max(x, 0) + 1)`` of the integer features
    (missing = 0), hex categorical values modulo their feature's hash size (missing = 0).

    Args:
        path: the file the block comes from (for messages).
        data: complete lines, ending with b"\n", without CRLF.
        first_line: 1-based number of the block's first line.
        num_embeddings_per_feature: hash size of each of the 26 categorical features.
        on_bad_row: 'error' raises on the first malformed line; 'skip' leaves malformed lines
            out of the arrays and returns them.

    Returns:
        ``(arrays, bad_rows)``: the parsed valid rows, in file order, and the skipped lines
        (always empty under 'error').

    Raises:
        CriteoFormatError: a malformed line under 'error' (the message names file and line).
        ValueError: bad hash sizes or an unknown policy.
    """
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")
    path = Path(path)
    table_sizes = check_table_sizes(num_embeddings_per_feature)
    try:
        return _parse_chunk(path, data, first_line, table_sizes), []
    except CriteoFormatError:
        if on_bad_row == "error":
            raise
    # Slow path, only for blocks with a bad line: classify every line exactly, parse the rest.
    good: list[bytes] = []
    bad: list[BadRow] = []
    for k, line in enumerate(data.split(b"\n")[:-1]):
        problem = _line_error(line)
        if problem is None:
            good.append(line)
        else:
            bad.append(BadRow(str(path), first_line + k, problem, line))
    if not good:
        return CriteoArrays.empty(), bad
    # Cannot raise: the vectorized and the exact parser accept the same lines.
    return _parse_chunk(path, b"\n".join(good) + b"\n", first_line, table_sizes), bad


def read_criteo_tsv(
    path: str | Path, num_embeddings_per_feature: Sequence[int], max_rows: int = 0
) -> CriteoArrays:
    """Reads a Criteo TSV file (plain or gzip) into transformed numpy arrays.

    Args:
        path: file in the Criteo raw format (40 tab-separated fields per line); gzip is detected by
            its magic bytes, whatever the file name.
        num_embeddings_per_feature: hash size of each of the 26 categorical features; the parsed
            hex value of feature j is taken modulo ``num_embeddings_per_feature[j]``.
        max_rows: read at most this many rows (0 = all). Lines after them are not read or checked.

    Returns:
        CriteoArrays with labels (N,), dense ``log(max(x, 0) + 1)`` (N, 13) and sparse ids (N, 26).
        An empty file gives zero rows.

    Raises:
        CriteoFormatError: missing file, truncated/corrupt gzip, or a malformed line (wrong field
            count, label not 0/1, non-integer I value, non-hex C value); the message names the file
            and the 1-based line.
        ValueError: ``num_embeddings_per_feature`` does not have 26 positive values, or
            ``max_rows`` is negative.

    Example::

        arrays = read_criteo_tsv("train.txt.gz", [2**20] * 26, max_rows=10_000)
        arrays.sparse[0, 6]  # int(C7 of line 1, 16) % 2**20
    """
    path = Path(path)
    table_sizes = check_table_sizes(num_embeddings_per_feature)
    if max_rows < 0:
        raise ValueError(f"max_rows must be >= 0 (0 = all rows), got {max_rows}")
    arrays = CriteoArrays.concat(list(iter_criteo_tsv(path, table_sizes, max_rows=max_rows)))
    logger.debug("read %d rows from %s", len(arrays), path)
    return arrays


def iter_criteo_tsv(
    path: str | Path,
    num_embeddings_per_feature: Sequence[int],
    max_rows: int = 0,
    chunk_bytes: int = 0,
) -> Iterator[CriteoArrays]:
    """:func:`read_criteo_tsv` in chunks (blocks of about ``chunk_bytes`` decompressed bytes;
    0 = ~8 MB), in bounded memory; no chunk for an empty file. Same errors."""
    path = Path(path)
    table_sizes = check_table_sizes(num_embeddings_per_feature)
    for first_line, data in iter_line_blocks(path, stop=max_rows, chunk_bytes=chunk_bytes):
        yield _parse_chunk(path, data, first_line, table_sizes)
