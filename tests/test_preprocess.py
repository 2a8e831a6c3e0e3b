"""Oracle tests of the Parquet preprocessing (``mlet-dist preprocess``).

The Parquet rows are compared with a line-by-line pure-Python parse written here (its own
validation, transforms, split arithmetic and frequency counting with ``collections.Counter``), on
the real Criteo samples of ../shared/data mixed with injected malformed lines.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import mlet_dist.data.criteo as criteo_module
import mlet_dist.data.preprocess.parts as preprocess_parts
from mlet_dist.cli import main as cli_main
from mlet_dist.config import ConfigError, SyntheticConfig
from mlet_dist.data import (
    CriteoFormatError,
    generate_synthetic,
    read_criteo_tsv,
    read_shard_metadata,
)
from mlet_dist.data.preprocess import (
    PreprocessSettings,
    is_mlperf_days,
    plan_parts,
    preprocess,
)

SHARED = Path(__file__).resolve().parents[2] / "shared/data"
SAMPLES = [
    SHARED / "criteo_kaggle_sample/criteo_kaggle_train_first10k.tsv.gz",
    SHARED / "criteo_kaggle_sample/criteo_1tb_day0_first1000.tsv.gz",
]
INT_NAMES = [f"int_{k}" for k in range(13)]
CAT_NAMES = [f"cat_{j}" for j in range(26)]
# Mixed small and large tables (collisions in the small ones, int32 ids in all).
SIZES = [1000, 97, 40_000_000, 5, 100_000, 2**31] + [7919] * 20
SMALL_SIZES = [1000, 97, 4_000_000, 5, 100_000, 3] + [7919] * 20


def sample_lines() -> list[bytes]:
    """Every line of both real samples (Kaggle first, then the 1TB day 0 head)."""
    for path in SAMPLES:
        if not path.exists():
            pytest.skip(f"../shared/data absent (fresh clone): {path} does not exist")
    lines = []
    for path in SAMPLES:
        lines += gzip.decompress(path.read_bytes()).split(b"\n")[:-1]
    return lines


# ---------------------------------------------------------------- the independent reference

_INT = re.compile(rb"-?[0-9]+")
_HEX = re.compile(rb"[0-9a-fA-F]{1,16}")


def reference_row(line: bytes, sizes: list[int]) -> tuple | None:
    """(label, 13 dense, 26 ids) of a valid line, None for a malformed one (DLRM transforms)."""
    fields = line.split(b"\t")
    if len(fields) != 40 or fields[0] not in (b"0", b"1"):
        return None
    if any(f and not _INT.fullmatch(f) for f in fields[1:14]):
        return None
    if any(f and not _HEX.fullmatch(f) for f in fields[14:]):
        return None
    dense = [math.log(max(int(f), 0) + 1) if f else 0.0 for f in fields[1:14]]
    ids = [int(f, 16) % sizes[j] if f else 0 for j, f in enumerate(fields[14:])]
    return int(fields[0]), dense, ids


def reference_split(n: int, eval_fraction: float, test_fraction: float) -> dict[str, range]:
    n_eval, n_test = round(n * eval_fraction), round(n * test_fraction)
    n_train = n - n_eval - n_test
    return {
        "train": range(0, n_train),
        "eval": range(n_train, n_train + n_eval),
        "test": range(n_train + n_eval, n),
    }


def read_split(out: Path, split: str, files: list[str]) -> dict[str, np.ndarray]:
    """Columns of a split's shards concatenated in the order the summary lists them."""
    tables = [pq.read_table(out / f) for f in files]
    return {
        "label": np.concatenate([t.column("label").to_numpy() for t in tables]),
        "dense": np.stack(
            [np.concatenate([t.column(c).to_numpy() for t in tables]) for c in INT_NAMES], 1
        ),
        "sparse": np.stack(
            [np.concatenate([t.column(c).to_numpy() for t in tables]) for c in CAT_NAMES], 1
        ),
    }


def assert_rows_equal(got: dict[str, np.ndarray], rows: list[tuple]) -> None:
    assert got["label"].shape == (len(rows),)
    np.testing.assert_array_equal(got["label"], [r[0] for r in rows])
    np.testing.assert_array_equal(got["sparse"], np.array([r[2] for r in rows]).reshape(-1, 26))
    np.testing.assert_allclose(
        got["dense"], np.array([r[1] for r in rows]).reshape(-1, 13), rtol=1e-6, atol=1e-7
    )


BAD = [
    b"1\t2\t3",  # too few fields
    b"",  # empty line
    b"2" + b"\t" * 39,  # label 2
    b"0\t1.5" + b"\t" * 38,  # float integer feature
    b"1" + b"\t" * 13 + b"\tzz12ab34" + b"\t" * 25,  # non-hex categorical
]


def write_mixed(path: Path, lines: list[bytes], gz: bool) -> tuple[list[bytes], dict[int, bytes]]:
    """All lines with BAD injected at spread positions; returns (lines, {line number: bad line})."""
    mixed = list(lines)
    bad_at = {}
    for k, bad in enumerate(BAD):
        pos = (k + 1) * len(mixed) // (len(BAD) + 1)
        mixed.insert(pos, bad)
    for i, line in enumerate(mixed):
        if line in BAD:
            bad_at[i + 1] = line
    data = b"\n".join(mixed) + b"\n"
    path.write_bytes(gzip.compress(data) if gz else data)
    return mixed, bad_at


# ---------------------------------------------------------------- row-for-row agreement


def test_mixed_file_row_for_row_with_skip_policy(tmp_path):
    lines = sample_lines()
    half = len(lines) // 2
    first, bad1 = write_mixed(tmp_path / "a.tsv.gz", lines[:half], gz=True)
    second, bad2 = write_mixed(tmp_path / "b.tsv", lines[half:], gz=False)
    settings = PreprocessSettings(
        SIZES, on_bad_row="skip", eval_fraction=0.1, test_fraction=0.15, row_group_rows=1000
    )
    out = tmp_path / "out"
    summary = preprocess(
        [tmp_path / "a.tsv.gz", tmp_path / "b.tsv"], out, settings, workers=1, progress=False
    )

    every = first + second  # the line sequence the split is defined on
    ranges = reference_split(len(every), 0.1, 0.15)
    for split, lines_of_split in ranges.items():
        want = [reference_row(every[i], SIZES) for i in lines_of_split]
        want = [r for r in want if r is not None]
        got = read_split(out, split, summary["splits"][split]["files"])
        assert_rows_equal(got, want)
        assert summary["splits"][split]["rows"] == len(want)
        assert summary["splits"][split]["positives"] == sum(r[0] for r in want)
        bad_here = sum(reference_row(every[i], SIZES) is None for i in lines_of_split)
        assert summary["splits"][split]["bad_rows"] == bad_here

    # Quarantine: exactly the injected lines, with file, 1-based line number and a reason.
    assert summary["bad_rows"] == 2 * len(BAD)
    records = [
        json.loads(line)
        for q in summary["quarantine"]
        for line in (out / q).read_text().splitlines()
    ]
    got_bad = {(Path(r["file"]).name, r["line"]): r["text"].encode() for r in records}
    want_bad = {("a.tsv.gz", n): t for n, t in bad1.items()} | {
        ("b.tsv", n): t for n, t in bad2.items()
    }
    assert got_bad == want_bad
    assert all(r["reason"] for r in records)
    assert any("label" in r["reason"] for r in records) and any(
        "C1" in r["reason"] for r in records
    )

    # Schema and summary facts.
    schema = pq.read_schema(out / summary["splits"]["train"]["files"][0])
    assert str(schema.field("label").type) == "int8"
    assert all(str(schema.field(c).type) == "float" for c in INT_NAMES)
    assert all(str(schema.field(c).type) == "int32" for c in CAT_NAMES)
    assert read_shard_metadata(schema)["num_embeddings_per_feature"] == SIZES
    valid = [r for r in map(lambda x: reference_row(x, SIZES), every) if r is not None]
    assert summary["rows"] == len(valid) == len(lines)
    assert summary["positives"] == sum(r[0] for r in valid)
    distinct = summary["distinct_ids_per_feature"]["all"]
    assert [distinct[c] for c in CAT_NAMES] == [
        len({r[2][j] for r in valid}) if SIZES[j] <= 2**28 else None for j in range(26)
    ]
    # Row groups of the configured size (the last one of a file may be smaller).
    meta = pq.read_metadata(out / "train/a.parquet")
    sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    assert sizes[:-1] == [1000] * (len(sizes) - 1) and 0 < sizes[-1] <= 1000


def test_error_policy_names_file_and_line_and_leaves_nothing(tmp_path):
    lines = sample_lines()[:300]
    _, bad_at = write_mixed(tmp_path / "x.tsv", lines, gz=False)
    out = tmp_path / "out"
    with pytest.raises(CriteoFormatError) as err:
        preprocess([tmp_path / "x.tsv"], out, PreprocessSettings(SIZES), workers=1, progress=False)
    first_bad = min(bad_at)
    assert err.value.line == first_bad and f"line {first_bad}:" in str(err.value)
    assert str(tmp_path / "x.tsv") in str(err.value)
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("*.parquet"))


def test_truncated_gzip_is_reported_and_empty_files_are_not_errors(tmp_path):
    lines = sample_lines()
    data = gzip.compress(b"\n".join(lines) + b"\n")
    cut = tmp_path / "cut.tsv.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CriteoFormatError, match="truncated/corrupt gzip") as err:
        preprocess(
            [cut], tmp_path / "o1", PreprocessSettings(SIZES, on_bad_row="skip"), progress=False
        )
    assert str(cut) in str(err.value)

    (tmp_path / "empty.tsv").write_bytes(b"")
    (tmp_path / "empty2.gz").write_bytes(gzip.compress(b""))
    summary = preprocess(
        [tmp_path / "empty.tsv", tmp_path / "empty2.gz"],
        tmp_path / "o2",
        PreprocessSettings(SIZES),
        workers=1,
        progress=False,
    )
    assert summary["rows"] == 0 and summary["bad_rows"] == 0
    for f in summary["splits"]["train"]["files"]:
        assert pq.read_metadata(tmp_path / "o2" / f).num_rows == 0


# ---------------------------------------------------------------- frequency threshold


@pytest.mark.parametrize("threshold", [3, 300])  # uint8 and uint16 counters
def test_frequency_threshold_matches_counter(tmp_path, threshold):
    lines = sample_lines()
    sizes = [50, 3, 1000, 20_000] + [977] * 22
    path = tmp_path / "kaggle.tsv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    settings = PreprocessSettings(sizes, frequency_threshold=threshold, eval_fraction=0.2)
    out = tmp_path / "out"
    summary = preprocess([path], out, settings, workers=1, progress=False)

    rows = [reference_row(line, sizes) for line in lines]
    ranges = reference_split(len(rows), 0.2, 0.0)
    counters = [Counter(rows[i][2][j] for i in ranges["train"]) for j in range(26)]

    def mapped(row):
        ids = [v if counters[j][v] >= threshold else 0 for j, v in enumerate(row[2])]
        return row[0], row[1], ids

    for split in ("train", "eval"):
        got = read_split(out, split, summary["splits"][split]["files"])
        assert_rows_equal(got, [mapped(rows[i]) for i in ranges[split]])
    frequent = summary["frequent_ids_per_feature"]
    assert [frequent[c] for c in CAT_NAMES] == [
        sum(1 for c in counter.values() if c >= threshold) for counter in counters
    ]
    assert summary["settings"]["frequency_threshold"] == threshold


# ---------------------------------------------------------------- resumption


def test_resume_after_interruption_skips_finished_parts(tmp_path, monkeypatch):
    lines = sample_lines()
    inputs = []
    for k in range(3):
        path = tmp_path / f"part{k}.tsv"
        path.write_bytes(b"\n".join(lines[k * 3000 : (k + 1) * 3000]) + b"\n")
        inputs.append(path)
    settings = PreprocessSettings(SMALL_SIZES, frequency_threshold=2, row_group_rows=700)
    clean = preprocess(inputs, tmp_path / "clean", settings, workers=1, progress=False)

    # Interrupt the write pass in the middle of the second file (small chunks: several per file;
    # the counting pass parses each file once before).
    monkeypatch.setattr(criteo_module, "_CHUNK_BYTES", 100_000)
    chunks_per_file = len(list(criteo_module.iter_line_blocks(inputs[1])))
    assert chunks_per_file >= 5
    real_parse = preprocess_parts.parse_lines
    calls = []

    def failing_parse(path, *args, **kwargs):
        if Path(path).name == "part1.tsv":
            calls.append(path)
            if len(calls) == chunks_per_file + 3:  # the 3rd chunk of the write pass
                raise KeyboardInterrupt("simulated kill")
        return real_parse(path, *args, **kwargs)

    out = tmp_path / "resumed"
    monkeypatch.setattr(preprocess_parts, "parse_lines", failing_parse)
    with pytest.raises(KeyboardInterrupt):
        preprocess(inputs, out, settings, workers=1, progress=False)
    assert (out / "train/part0.parquet").is_file()
    assert not (out / "train/part1.parquet").exists() and not (out / "train/part2.parquet").exists()
    assert not list(out.rglob("*.tmp"))  # the interrupted part cleaned up after itself
    finished_at = (out / "train/part0.parquet").stat().st_mtime_ns
    # A temporary file of a killed process (which could not clean up) is removed on resume.
    (out / "train/.part1.parquet.abc.tmp").write_bytes(b"partial")
    assert not (out / "_state/parts/train/part1.json").exists()

    monkeypatch.setattr(preprocess_parts, "parse_lines", real_parse)
    resumed = preprocess(inputs, out, settings, workers=1, progress=False)
    assert resumed["run"]["parts_skipped"] == 1 and resumed["run"]["parts_written"] == 2
    assert (out / "train/part0.parquet").stat().st_mtime_ns == finished_at
    assert not list(out.rglob("*.tmp"))
    for name in ("part0", "part1", "part2"):
        a = pq.read_table(tmp_path / "clean/train" / f"{name}.parquet")
        b = pq.read_table(out / "train" / f"{name}.parquet")
        assert a.equals(b)
    for key in ("rows", "positives", "bad_rows", "splits", "distinct_ids_per_feature"):
        assert resumed[key] == clean[key]

    # Other settings into the same directory are refused, naming what differs.
    with pytest.raises(ConfigError, match="frequency_threshold"):
        preprocess(
            inputs,
            out,
            PreprocessSettings(SMALL_SIZES, frequency_threshold=3, row_group_rows=700),
            workers=1,
            progress=False,
        )


# ---------------------------------------------------------------- splits


def test_mlperf_day_split():
    days = [f"/data/day_{d}.gz" for d in range(24)]
    shuffled = days[::-1]  # given in any order, planned by day number
    for n in (1001, 1000, 1):
        asked = []

        def counts(paths, n=n, asked=asked):
            asked.extend(paths)
            return [n] * len(paths)

        mode, parts = plan_parts(shuffled, eval_fraction=0.3, test_fraction=0.3, line_counts=counts)
        assert mode == "mlperf_days" and asked == ["/data/day_23.gz"]  # only day 23 is counted
        train = [p for p in parts if p.split == "train"]
        assert [p.source for p in train] == days[:23]
        assert all((p.start, p.stop) == (0, 0) for p in train)
        half = math.ceil(n / 2)  # TorchRec: val = first ceil(n/2) rows of day 23
        by_split = {p.split: (p.source, p.start, p.stop) for p in parts if p.split != "train"}
        assert by_split["eval"] == ("/data/day_23.gz", 0, half)
        if n - half:
            assert by_split["test"] == ("/data/day_23.gz", half, n)
        else:
            assert "test" not in by_split
    assert is_mlperf_days([f"day_{d}" for d in range(24)])
    assert not is_mlperf_days(days[:23]) and not is_mlperf_days([*days[:23], "/x/day_24.gz"])

    # Any other set of files: row fractions over the concatenation, as split_arrays.
    files = ["a.gz", "b", "c.tsv"]
    counts = [7, 0, 13]
    mode, parts = plan_parts(
        files, eval_fraction=0.25, test_fraction=0.1, line_counts=lambda p: counts
    )
    assert mode == "fraction"
    offsets = np.cumsum([0, *counts])
    want = reference_split(sum(counts), 0.25, 0.1)
    for split, lines in want.items():
        covered = [
            offsets[files.index(p.source)] + i
            for p in parts
            if p.split == split
            for i in range(p.start, p.stop)
        ]
        assert covered == list(lines)
    # eval files: the whole files are eval; the inputs give train and test.
    mode, parts = plan_parts(
        ["a"],
        eval_fraction=0.5,
        test_fraction=0.5 - 0.1,
        eval_files=["e"],
        line_counts=lambda p: [10],
    )
    assert mode == "eval_files"
    assert {(p.split, p.source, p.start, p.stop) for p in parts} == {
        ("train", "a", 0, 6),
        ("test", "a", 6, 10),
        ("eval", "e", 0, 0),
    }
    with pytest.raises(ConfigError, match="named"):
        plan_parts(["x/day_0", "y/day_0.gz"], eval_fraction=0, test_fraction=0)


def test_synthetic_mlperf_days_end_to_end(tmp_path):
    """24 synthetic plain day files (the generator writes 1TB-like days at any scale)."""
    cfg = SyntheticConfig(days=24, rows_per_day=41, gzip=False, seed=3)
    paths = generate_synthetic(tmp_path / "raw", cfg, progress=False)
    assert [p.name for p in paths] == [f"day_{d}" for d in range(24)]
    sizes = [10_000] * 26
    summary = preprocess(
        paths, tmp_path / "out", PreprocessSettings(sizes), workers=1, progress=False
    )
    assert summary["split_mode"] == "mlperf_days"
    assert [summary["splits"][s]["rows"] for s in ("train", "eval", "test")] == [23 * 41, 21, 20]
    day23 = read_criteo_tsv(paths[23], sizes)
    for split, rows in (("eval", slice(0, 21)), ("test", slice(21, 41))):
        got = read_split(tmp_path / "out", split, summary["splits"][split]["files"])
        np.testing.assert_array_equal(got["sparse"], day23.sparse[rows])
        np.testing.assert_array_equal(got["label"], day23.labels[rows])


def test_cli_preprocess_with_process_pool(tmp_path, capsys):
    lines = sample_lines()
    for k in range(2):
        (tmp_path / f"f{k}.tsv").write_bytes(b"\n".join(lines[k::2]) + b"\n")
    (tmp_path / "f1.tsv").write_bytes((tmp_path / "f1.tsv").read_bytes() + b"garbage line\n")
    argv = [
        "preprocess",
        "--input",
        str(tmp_path / "f0.tsv"),
        str(tmp_path / "f1.tsv"),
        "--out",
        str(tmp_path / "out"),
        "--workers",
        "2",
        "--on-bad-row",
        "skip",
        "--data.eval_fraction=0.0",
        "--train.progress=false",
    ]
    assert cli_main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["rows"] == len(lines) and printed["bad_rows"] == 1
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["run"]["workers"] == 2 and summary["quarantine"] == ["quarantine/train/f1.jsonl"]
    # Without --on-bad-row skip the default policy stops with the file and line.
    argv[argv.index("skip") - 1 : argv.index("skip") + 1] = []
    argv[argv.index("--out") + 1] = str(tmp_path / "out2")
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "f1.tsv, line" in err and "tab-separated fields" in err
