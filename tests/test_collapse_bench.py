"""The collapse benchmark's quick mode runs and writes its results in the documented format."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quick_benchmark_writes_json_and_markdown(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.collapse_bench", "--quick", "--rows", "50000",
         "--repeats", "1", "--out-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (js,) = tmp_path.glob("*.json")
    (md,) = tmp_path.glob("*.md")
    result = json.loads(js.read_text())
    assert js.stem == md.stem == f"collapse-quick_{result['hardware']}_{result['date']}"
    assert result["suite"] == "collapse-quick"
    cfg = result["config"]
    assert (cfg["rows"], cfg["k"], cfg["d"], cfg["quick"]) == (50000, 64, 16, True)
    assert cfg["threads"] >= 1 and cfg["cores"] >= 1
    assert {"torch", "torchrec", "python"} <= set(result["versions"])
    r = result["results"]
    assert r["copy"]["gb_per_s"] > 0
    kernels = {(k["serving_dtype"], k["chunk_rows"]) for k in r["kernel"]}
    assert kernels == {(d, c) for d in ("fp32", "int8") for c in cfg["chunk_rows"]}
    assert all(k["seconds"] > 0 and k["gb_per_s"] > 0 for k in r["kernel"])
    assert (
        0 < r["best_fp32"]["fraction_of_copy"] == r["best_fp32"]["gb_per_s"] / r["copy"]["gb_per_s"]
    )
    assert r["bytes"] == {
        "w1_read": 50000 * 64 * 4,
        "w_written": 50000 * 16 * 4,
        "int8_written": 50000 * 20,
    }
    cold = r["cold"]
    assert cold["output_bytes"] == 50000 * 16 * 4 + 50000 * 20
    assert cold["peak_extra_bytes"] >= 0 and cold["max_abs_err_vs_float64"] < 1e-4
    text = md.read_text()
    assert "| memory copy" in text and "Best fp32 kernel" in text and "Versions:" in text
