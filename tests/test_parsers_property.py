"""Property tests of the Criteo TSV and Avazu CSV readers (hypothesis).

Random rows (mostly valid, with every kind of bad field mixed in: too many digits, non-ASCII
digits, signs, spaces, stray CR, wrong field counts) and random bytes are fed to the readers; an
independent reference parser written here says what each line must give. The reader must return
exactly the reference's rows, or raise CriteoFormatError naming the reference's first bad line —
never another exception, a hang, or a different / non-finite value.
"""

from __future__ import annotations

import gzip
import math
import re
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlet_dist.data import CriteoFormatError, iter_line_blocks, parse_lines, read_criteo_tsv
from mlet_dist.data.avazu import AVAZU_COLUMNS, HEX_COLUMNS, read_avazu_csv

# Example counts keep the file at ~10 s of test time on a quiet 2-core machine.


def SETTINGS(n: int):
    return settings(
        max_examples=n,
        database=None,  # no .hypothesis/ directory in the checkout
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


SIZES = [1, 2, 3, 7, 50, 97, 1000, 2**20, 2**31 - 1, 2**40, 2**63 - 1, 10] + [13] * 14


# ---------------------------------------------------------------- reference parsers


def ref_criteo_line(line: bytes, sizes: list[int]):
    """(label, dense, sparse) of one Criteo line, or None when it is malformed."""
    fields = line.split(b"\t")
    if len(fields) != 40 or fields[0] not in (b"0", b"1"):
        return None
    dense = []
    for v in fields[1:14]:
        if v == b"":
            dense.append(0.0)
            continue
        if not re.fullmatch(rb"-?[0-9]+", v) or len(v.lstrip(b"-").lstrip(b"0")) > 38:
            return None
        dense.append(math.log1p(max(int(v), 0)))
    sparse = []
    for j, v in enumerate(fields[14:]):
        if v == b"":
            sparse.append(0)
            continue
        if not re.fullmatch(rb"[0-9a-fA-F]{1,16}", v):
            return None
        sparse.append(int(v, 16) % sizes[j])
    return float(fields[0] == b"1"), dense, sparse


def ref_criteo(data: bytes, sizes: list[int]):
    """(rows, bad line numbers) of a whole plain file, as the documented format says."""
    if data and not data.endswith(b"\n"):
        data += b"\n"
    data = data.replace(b"\r\n", b"\n")
    rows, bad = [], []
    for k, line in enumerate(data.split(b"\n")[:-1], start=1):
        row = ref_criteo_line(line, sizes)
        if row is None:
            bad.append(k)
        else:
            rows.append(row)
    return rows, bad


def ref_avazu(data: bytes, sizes: list[int]):
    """(rows, first bad line or None) of an Avazu CSV without quote characters."""
    text = data.decode("latin-1")
    lines = re.split(r"\r\n|\r|\n", text)
    if lines and lines[-1] == "":
        lines.pop()
    rows = []
    for k, line in enumerate(lines, start=1):
        f = line.split(",")
        if k == 1 and f[0] == "id":
            continue
        if len(f) != 24 or f[1] not in ("0", "1") or not re.fullmatch(r"[0-9]{8}", f[2]):
            return rows, k
        ids = []
        for j, (column, v) in enumerate(zip(AVAZU_COLUMNS[3:], f[3:])):
            if column in HEX_COLUMNS:
                if not re.fullmatch(r"[0-9a-fA-F]{1,16}", v):
                    return rows, k
                x = int(v, 16)
            else:
                if not re.fullmatch(r"-?[0-9]+", v) or len(v.lstrip("-").lstrip("0")) > 20:
                    return rows, k
                x = int(v)
                if not -(2**32) <= x < 2**64:
                    return rows, k
                x = x if x >= 0 else 2**32 + x
            ids.append(x % sizes[j])
        ids.append(int(f[2][6:]) % sizes[21])
        rows.append((float(f[1]), ids + [0] * 4))
    return rows, None


def assert_rows(arrays, rows, sizes):
    assert len(arrays) == len(rows)
    assert np.isfinite(arrays.dense).all() and np.isfinite(arrays.labels).all()
    assert (arrays.sparse >= 0).all() and (arrays.sparse < np.asarray(sizes)).all()
    if not rows:
        return
    np.testing.assert_array_equal(arrays.labels, [r[0] for r in rows])
    np.testing.assert_allclose(arrays.dense, np.float32([r[1] for r in rows]), rtol=1e-6)
    np.testing.assert_array_equal(arrays.sparse, [r[2] for r in rows])


# ---------------------------------------------------------------- strategies

_JUNK = ["-", "+1", " 3", "1.5", "1e3", "0x1f", "1_0", "١٢", "\r", "é", "\x00", "g", "--1", "abc"]
# Valid fields; a line gets one or two bad ones (below) at a rate drawn per file (0, 10% or 40%
# of the lines), so that both whole valid files and first-bad-line errors are common.
_valid_int = st.one_of(
    st.just(""),
    st.integers(-(10**6), 10**12).map(str),
    st.text("0123456789", min_size=1, max_size=38),  # up to 38 significant digits: accepted
    st.builds(lambda z, d: "0" * z + d, st.integers(0, 60), st.text("0123456789", max_size=38)),
    st.text("0123456789", min_size=1, max_size=38).map(lambda d: "-" + d),  # clamped to 0
)
_bad_int = st.one_of(
    st.integers(39, 420).map(lambda n: "9" * n),  # >= 1e38: inf in float64 from 309 digits
    st.builds(lambda z, n: "0" * z + "1" * n, st.integers(0, 5), st.integers(39, 60)),
    st.sampled_from(_JUNK),
)
_valid_hex = st.one_of(st.just(""), st.text("0123456789abcdefABCDEF", min_size=1, max_size=16))
_bad_hex = st.one_of(st.text("0123456789abcdef", min_size=17, max_size=20), st.sampled_from(_JUNK))
_bad_label = st.sampled_from(["", "2", "01", "1 ", *_JUNK])


@st.composite
def criteo_lines(draw) -> bytes:
    lines = []
    rate = draw(st.sampled_from([0, 1, 4]))
    for _ in range(draw(st.integers(0, 10))):
        fields = [draw(st.sampled_from(["0", "1"])), *[draw(_valid_int) for _ in range(13)]]
        fields += [draw(_valid_hex) for _ in range(26)]
        if draw(st.integers(0, 9)) < rate:
            for _ in range(draw(st.integers(1, 2))):
                k = draw(st.integers(0, 41))
                if k >= 40:  # a wrong field count, or an empty line
                    fields = [*fields, "7"] if k == 40 else fields[: draw(st.integers(0, 39))]
                    break
                fields[k] = draw(_bad_label if k == 0 else _bad_int if k < 14 else _bad_hex)
        lines.append("\t".join(fields))
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    text = newline.join(lines) + (newline if lines and draw(st.booleans()) else "")
    return text.encode("utf-8")


_noise = st.lists(
    st.sampled_from([b"\t", b"\n", b"\r", b"0", b"1", b"-", b"a", b"F", b"9", b"\xff", b"\x00"]),
    max_size=300,
).map(b"".join)


def _write(tmp: str, name: str, data: bytes, compress: bool) -> Path:
    path = Path(tmp) / name
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


# ---------------------------------------------------------------- Criteo TSV


@SETTINGS(80)
@given(data=st.one_of(criteo_lines(), _noise), compress=st.booleans())
def test_criteo_reader_matches_reference(data, compress):
    rows, bad = ref_criteo(data, SIZES)
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(tmp, "x.tsv.gz" if compress else "x.tsv", data, compress)
        try:
            arrays = read_criteo_tsv(path, SIZES)
        except CriteoFormatError as e:
            assert bad, f"refused a valid file: {e}"
            assert e.line == bad[0] and f"line {bad[0]}:" in str(e) and str(path) in str(e)
            return
    assert not bad, f"accepted line {bad[0]}"
    assert_rows(arrays, rows, SIZES)


@SETTINGS(60)
@given(data=st.one_of(criteo_lines(), _noise), chunk=st.integers(1, 400))
def test_criteo_blocks_skip_policy_matches_reference(data, chunk):
    """The preprocessing path: small blocks, 'skip' returns exactly the reference's bad lines."""
    rows, bad = ref_criteo(data, SIZES)
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(tmp, "x.tsv", data, False)
        parts, skipped = [], []
        for first, block in iter_line_blocks(path, chunk_bytes=chunk):
            arrays, bad_rows = parse_lines(path, block, first, SIZES, on_bad_row="skip")
            parts.append(arrays)
            skipped += [b.line for b in bad_rows]
    assert skipped == bad
    from mlet_dist.data import CriteoArrays

    assert_rows(CriteoArrays.concat(parts), rows, SIZES)


@SETTINGS(25)
@given(data=criteo_lines(), cut=st.floats(0.0, 0.95))
def test_truncated_gzip_is_the_documented_error(data, cut):
    whole = gzip.compress(data)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cut.gz"
        path.write_bytes(whole[: max(2, int(len(whole) * cut))])
        try:
            read_criteo_tsv(path, SIZES)
        except CriteoFormatError as e:
            assert str(path) in str(e)
            return
    raise AssertionError("a truncated gzip file was read without an error")


# ---------------------------------------------------------------- Avazu CSV

_valid_code = st.one_of(
    st.integers(-(2**32), 2**64 - 1).map(str),
    st.integers(-1, 3000).map(str),
    st.builds(lambda z, d: "0" * z + d, st.integers(0, 30), st.text("0123456789", min_size=1, max_size=19)),
)  # fmt: skip
_bad_code = st.one_of(
    st.integers(2**64, 2**70).map(str),
    st.integers(-(2**40), -(2**32) - 1).map(str),
    st.sampled_from(["", *_JUNK]),
)
_valid_hash = st.text("0123456789abcdefABCDEF", min_size=1, max_size=16)
_bad_hash = st.one_of(
    st.text("0123456789abcdef", min_size=17, max_size=20), st.sampled_from(["", *_JUNK])
)
_bad_hour = st.sampled_from(["", "1410210", "141021001", "١٤١٠٢١٠٠", "x", "+1410210"])


@st.composite
def avazu_lines(draw) -> bytes:
    lines = ["id,click,hour," + ",".join(AVAZU_COLUMNS[3:])] if draw(st.booleans()) else []
    rate = draw(st.sampled_from([0, 1, 4]))
    for _ in range(draw(st.integers(0, 10))):
        fields = [
            draw(st.text("0123456789x", max_size=22)),  # id: not used, not checked
            draw(st.sampled_from(["0", "1"])),
            str(draw(st.integers(14102100, 14103123))),
        ]
        for column in AVAZU_COLUMNS[3:]:
            fields.append(draw(_valid_hash if column in HEX_COLUMNS else _valid_code))
        if draw(st.integers(0, 9)) < rate:
            k = draw(st.integers(1, 25))
            if k >= 24:  # a wrong field count, or an empty line
                fields = [*fields, "1"] if k == 24 else fields[: draw(st.integers(0, 23))]
            else:
                column = AVAZU_COLUMNS[k]
                bad = _bad_label if k == 1 else _bad_hour if k == 2 else None
                if bad is None:
                    bad = _bad_hash if column in HEX_COLUMNS else _bad_code
                fields[k] = draw(bad)
        lines.append(",".join(fields))
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    text = newline.join(lines) + (newline if lines and draw(st.booleans()) else "")
    return text.encode("utf-8")


_csv_noise = st.lists(
    st.sampled_from([b",", b"\n", b"\r", b"0", b"1", b"-", b"a", b"\xff", b"\x00", b'"', b"id"]),
    max_size=300,
).map(b"".join)
AVAZU_SIZES = [16, 8, 131072, 131072, 64, 7, 4096, 64, 2**40, 3, 8192, 8, 8]
AVAZU_SIZES += [8192, 16, 16, 4096, 8, 128, 4096, 512, 24, 1, 1, 1, 1]


@SETTINGS(100)
@given(data=st.one_of(avazu_lines(), _csv_noise), compress=st.booleans())
def test_avazu_reader_matches_reference(data, compress):
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(tmp, "x.csv", data, compress)
        try:
            arrays = read_avazu_csv(path, AVAZU_SIZES)
            error = None
        except CriteoFormatError as e:
            arrays, error = None, e
    if error is not None:
        assert str(path) in str(error)
    if b'"' in data:  # CSV quoting: the split-on-comma reference does not apply
        if arrays is not None:  # but whatever is read is in range
            assert (arrays.sparse < np.asarray(AVAZU_SIZES)).all() and (arrays.sparse >= 0).all()
        return
    rows, bad = ref_avazu(data, AVAZU_SIZES)
    if bad is not None:
        assert error is not None, f"accepted bad line {bad}"
        assert error.line == bad and f":{bad}:" in str(error), (bad, str(error))
        return
    assert error is None, f"refused a valid file: {error}"
    assert len(arrays) == len(rows)
    if rows:
        np.testing.assert_array_equal(arrays.labels, [r[0] for r in rows])
        np.testing.assert_array_equal(arrays.sparse, [r[1] for r in rows])
    assert not arrays.dense.any()
