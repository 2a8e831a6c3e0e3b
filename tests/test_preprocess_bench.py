"""The benchmarks run (quick mode) and write results in the documented format."""

from __future__ import annotations

import json
import re
from pathlib import Path

from benchmarks import preprocess_bench


def test_preprocess_bench_quick_output_format(tmp_path):
    argv = ["--quick", "--out-dir", str(tmp_path), "--workers", "1", "--rows-per-day", "6000"]
    returned = preprocess_bench.main(argv)
    assert not Path(returned["scratch_dir"]).exists()  # the generated data is deleted

    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2
    stem = files[0].rsplit(".", 1)[0]
    assert files == [f"{stem}.json", f"{stem}.md"]
    # <suite>[-quick]_<hardware tag>_<date>, as the other suites (benchmarks.common.result_stem)
    assert re.fullmatch(r"preprocess-quick_[a-z0-9]+_\d{4}-\d{2}-\d{2}", stem), stem

    result = json.loads((tmp_path / f"{stem}.json").read_text())
    assert result == json.loads(json.dumps(returned))
    assert result["suite"] == "preprocess" and result["quick"] is True
    assert result["machine"]["cores"] >= 1 and result["hardware_tag"] in stem
    for key in ("python", "numpy", "pyarrow", "torch", "torchrec", "git_commit"):
        assert isinstance(result["versions"][key], str) and result["versions"][key], key
    assert result["generate"]["rows"] == 2 * 6000 and result["generate"]["bytes"] > 0
    pre = result["preprocess"]
    assert pre["rows"] == 2 * 6000 and pre["settings"]["frequency_threshold"] == 3
    for key in ("count_pass", "write_pass"):
        for field in ("mb_per_s", "mb_per_s_per_process", "peak_rss_mb_per_process"):
            assert pre[key][field] > 0, (key, field)
    assert {(r["world_size"], r["rank"], r["global_batch_size"]) for r in result["loader"]} == {
        (1, 0, 256),
        (2, 0, 256),
        (2, 1, 256),
        (1, 0, 8192),
    }
    assert all(r["samples_per_s"] > 0 and r["samples"] > 0 for r in result["loader"])
    assert result["training"]["samples_per_s"] > 0 and result["training"]["steps"] == 10
    assert result["loader_over_training"] > 0
    assert len(result["load_before"]) == len(result["load_after"]) == 3

    md = (tmp_path / f"{stem}.md").read_text()
    assert md.startswith("# Data pipeline: Criteo TSV -> Parquet") and "(quick mode)" in md
    assert "| measure | value |" in md and "loader samples/s, rank 1 of 2" in md
    assert "training samples/s" in md and "other jobs" in md


def test_schema_preprocess_bench_quick_output_format(tmp_path):
    """The schema preprocessing benchmark (quick): both inputs, both modes, every row written,
    result files named as the other suites'; its scratch data deleted."""
    import tempfile

    from benchmarks import schema_preprocess_bench

    before = set(Path(tempfile.gettempdir()).glob("schema_preprocess_bench_*"))
    record = schema_preprocess_bench.main(["--quick", "--out", str(tmp_path)])
    assert set(Path(tempfile.gettempdir()).glob("schema_preprocess_bench_*")) == before
    stem = sorted(tmp_path.iterdir())[0].name.rsplit(".", 1)[0]
    assert re.fullmatch(r"schema-preprocess-quick_[a-z0-9]+_\d{4}-\d{2}-\d{2}", stem), stem
    assert json.loads((tmp_path / f"{stem}.json").read_text()) == json.loads(json.dumps(record))
    runs = {(r["input"], r["mode"]) for r in record["results"]}
    assert runs == {(i, m) for i in ("parquet", "csv") for m in ("streamed", "one chunk")}
    assert all(r["rows"] == 20_000 and r["peak_rss_mb"] > 0 for r in record["results"])
    assert "| csv | streamed |" in (tmp_path / f"{stem}.md").read_text()
