"""The benchmark runner's quick mode writes its results in the documented format.

No timing is asserted (these machines are shared); the checks are the files, their keys, and the
memory figures that follow exactly from the config (parameter and optimizer bytes, served bytes).
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `benchmarks` is a folder of the checkout, not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks import run as bench_run  # noqa: E402
from benchmarks.common import (  # noqa: E402
    BenchConfigError,
    hardware_tag,
    load_bench_config,
    result_stem,
    variant_config,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--suite", "all", "--quick", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return out


def _record(out: Path, suite: str) -> dict:
    (path,) = out.glob(f"{suite}-quick_{hardware_tag()}_*.json")  # (a delegate adds its own)
    record = json.loads(path.read_text())
    assert path.stem == result_stem(suite, record["hardware_tag"], True, _date(record))
    return record


def _date(record: dict) -> datetime.date:
    return datetime.date.fromisoformat(record["date"])


@pytest.mark.slow
def test_train_suite_files_and_keys(quick_run: Path) -> None:
    record = _record(quick_run, "train")
    assert record["suite"] == "train" and record["quick"] is True and record["status"] == "ok"
    assert {"python", "torch", "torchrec", "fbgemm_gpu"} <= set(record["versions"])
    assert record["machine"]["cores"] >= 1 and isinstance(record["machine"]["gpus"], list)
    assert record["command"].startswith("python -m benchmarks.run")
    cfg = record["config"]
    assert {"data", "model", "optim", "dist", "bench"} <= set(cfg)
    res = record["results"]
    sizes = res["world_sizes"]
    assert sizes == ([1, 2] if res["device"] == "cpu" else sorted(set(sizes)))
    variants = cfg["bench"]["variants"]
    assert [(r["variant"], r["world_size"]) for r in res["rows"]] == [
        (v, ws) for ws in sizes for v in variants
    ]

    # memory that follows exactly from the config (fp32 tables, one row-wise Adagrad value per row)
    rows, k, d = cfg["data"]["num_embeddings_per_feature"], cfg["model"]["inner_dim"], 16
    assert cfg["model"]["embedding_dim"] == d
    width = {"mlet": k, "plain_k": k, "plain_d": d}
    served_width = {"mlet": d, "plain_k": k, "plain_d": d}
    for r in res["rows"]:
        assert r["samples_per_s"] > 0 and len(r["samples_per_s_runs"]) == cfg["bench"]["repeats"]
        assert r["param_bytes"]["w1"] == sum(rows) * width[r["variant"]] * 4
        assert r["optimizer_bytes"]["fused"] == sum(rows) * 4
        w2 = len(rows) * k * d * 4 if r["variant"] == "mlet" else 0
        assert r["param_bytes"]["projection"] == w2 * r["world_size"]  # replicated
        assert (
            r["served_model_bytes"] - r["served_mlp_bytes"]
            == sum(rows) * served_width[r["variant"]] * 4
        )
        assert len(r["param_bytes_per_rank"]) == r["world_size"]
        assert r["peak_rss_bytes_max_rank"] > r["training_state_bytes_max_rank"] > 0
        assert sum(r["sharding"].values()) == len(rows)
    assert {q["ratio"] for q in res["ratios"]} == {"MLET(64,16) / EBC(64)", "MLET(64,16) / EBC(16)"}
    assert len(res["planner"]) == len(res["rows"])
    for p in res["planner"]:
        assert p["estimate_training_bytes_max_rank"] > 0 and p["measured_state_bytes_max_rank"] > 0

    md = (quick_run / record["files"]["markdown"]).read_text()
    for heading in ("## Throughput", "## Memory", "## Planner estimates", "## Ratios"):
        assert heading in md
    for label in ("MLET(64,16)", "EBC(64)", "EBC(16)"):
        assert f"| {label} | 1 |" in md
    assert len(record["files"]["plots"]) == 2
    for name in record["files"]["plots"]:
        assert name.endswith(".png")
        assert (quick_run / name).read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_delegated_suites_are_recorded(quick_run: Path) -> None:
    for suite in ("collapse", "loader"):
        record = _record(quick_run, suite)
        assert record["status"] in ("ok", "not available")
        if record["status"] == "not available":
            assert "does not exist" in record["reason"]
            continue
        assert record["summary"]
        assert (quick_run / record["files"]["markdown"]).is_file()
        for name in record["files"]["plots"]:
            assert (quick_run / name).read_bytes()[:8] == PNG_MAGIC
    collapse = _record(quick_run, "collapse")
    if collapse["status"] == "ok":
        s = collapse["summary"]
        assert s["copy_gb_per_s"] > 0 and s["collapse_fp32_gb_per_s"] > 0


@pytest.mark.slow
def test_serving_suite_files_and_keys(quick_run: Path) -> None:
    record = _record(quick_run, "serving")
    assert record["suite"] == "serving" and record["quick"] is True and record["status"] == "ok"
    assert {"python", "torch", "torchrec", "fbgemm_gpu"} <= set(record["versions"])
    cfg, res = record["config"], record["results"]
    bench = cfg["bench"]
    rows_per_table = cfg["data"]["num_embeddings_per_feature"]
    d = cfg["model"]["embedding_dim"]
    assert res["model"]["rows_per_table"] == rows_per_table and res["model"]["embedding_dim"] == d
    assert (res["model"]["label"], res["model"]["collapsed_from"]) == ("EBC(16)", "MLET(64,16)")
    expected = [("fp32", p) for p in ("eager_ebc", "eager", "torchscript", "export", "aoti")] + [
        ("int8", p) for p in ("eager", "torchscript", "export", "aoti")
    ]
    assert [(r["dtype"], r["predictor"]) for r in res["rows"]] == expected
    by = {(r["dtype"], r["predictor"]): r for r in res["rows"]}
    # quick mode: AOTInductor compiled for int8 only (it may also be refused, with the reason)
    assert by["fp32", "aoti"]["status"] == "skipped"
    assert by["int8", "aoti"]["status"] in ("ok", "refused")
    calls = bench["repeats"] * bench["windows"] * bench["steps_per_window"] * 10
    for r in res["rows"]:
        if r["status"] != "ok":
            assert r["reason"]
            continue
        lat = r["latency_ms"]
        assert 0 < lat["median"] <= lat["p90"] <= lat["p99"] and lat["calls"] == calls
        for b in (512, 4096):
            t = r[f"throughput_{b}"]
            assert 0 < t["min"] <= t["samples_per_s"] <= t["max"]
            assert t["windows"] == bench["repeats"] * bench["windows"]
        # every predictor computes what the eager serving model computes
        assert r["max_abs_diff_vs_eager"] <= 1e-5, r
    for q in res["ratios"]:
        a, b = (next(r for r in res["rows"] if r["label"] == x and r["dtype"] == q["dtype"]) for x in q["ratio"].split(" / "))  # fmt: skip
        assert q["speedup_latency_b1"] == b["latency_ms"]["median"] / a["latency_ms"]["median"]
        for bs in (512, 4096):
            got = q[f"speedup_throughput_{bs}"]
            assert (
                got
                == a[f"throughput_{bs}"]["samples_per_s"] / b[f"throughput_{bs}"]["samples_per_s"]
            )
    assert {q["ratio"] for q in res["ratios"] if q["dtype"] == "int8"} >= {
        "torch.export / TorchScript"
    }
    # memory that follows from the config: bytes per row of each format; fbgemm's TBE pads rows
    # to 16 bytes (int8: d + 4 = 20 -> 32)
    row_bytes = {"fp32": 4 * d, "fp16": 2 * d, "int8": d + 4}
    memory = {m["dtype"]: m for m in res["memory"]}
    assert list(memory) == ["fp32", "fp16", "int8"]
    for dtype, m in memory.items():
        assert m["table_bytes"] == sum(rows_per_table) * row_bytes[dtype]
        assert m["tbe_bytes"] == sum(rows_per_table) * (-(-row_bytes[dtype] // 16) * 16)
        # the exported program holds the tables once (not TorchRec's state-dict views as well)
        assert m["tbe_bytes"] < m["artifact_bytes"]["export"] < 1.5 * m["tbe_bytes"]
    md = (quick_run / record["files"]["markdown"]).read_text()
    for heading in ("## Latency", "## Ratios", "## Served-table memory per format"):
        assert heading in md
    for label in ("TorchScript", "torch.export", "AOTInductor", "eager, quantized EBC"):
        assert f"| fp32 | {label} |" in md and f"| int8 | {label} |" in md
    (png,) = record["files"]["plots"]
    assert (quick_run / png).read_bytes()[:8] == PNG_MAGIC


def test_missing_delegate_is_reported_not_available(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(bench_run.DELEGATED, "loader", "benchmarks.no_such_bench")
    records = bench_run.main(["--suite", "loader", "--quick", "--out", str(tmp_path)])
    assert records["loader"]["status"] == "not available"
    (path,) = tmp_path.glob(f"loader-quick_{hardware_tag()}_*.json")
    assert json.loads(path.read_text())["reason"] == "benchmarks/no_such_bench.py does not exist"


def test_bench_config_quick_tables_and_overrides() -> None:
    cfg, bench = load_bench_config(overrides=["--bench.repeats=4", "--data.batch_size=256"])
    assert (cfg.data.batch_size, bench.repeats) == (256, 4)
    assert cfg.data.num_embeddings_per_feature == [100_000] * 26
    assert (cfg.model.inner_dim, cfg.model.embedding_dim) == (64, 16)
    quick, qbench = load_bench_config(quick=True)
    assert quick.data.batch_size < 4096 and qbench.repeats == 1
    with pytest.raises(BenchConfigError, match="bench.repeat"):
        load_bench_config(overrides=["--bench.repeat=2"])
    with pytest.raises(BenchConfigError, match="variants"):
        load_bench_config(overrides=["--bench.variants=['mlet', 'dlrm']"])


def test_variants_differ_only_in_widths() -> None:
    cfg, _ = load_bench_config()
    plain_k, plain_d, mlet = (variant_config(cfg, v) for v in ("plain_k", "plain_d", "mlet"))
    assert (plain_k.model.inner_dim, plain_k.model.embedding_dim) == (0, 64)
    assert plain_k.model.dense_arch_layer_sizes[-1] == 64
    assert (plain_d.model.inner_dim, plain_d.model.embedding_dim) == (0, 16)
    assert mlet.model == cfg.model
    for other in (plain_k, plain_d):
        assert other.data == cfg.data and other.optim == cfg.optim and other.dist == cfg.dist
        assert other.model.over_arch_layer_sizes == cfg.model.over_arch_layer_sizes
