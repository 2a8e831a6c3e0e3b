"""The benchmark runner's quick mode writes its results in the documented format.

No timing is asserted (these machines are shared); the checks are the files, their keys, and the
memory figures that follow exactly from the config (parameter and optimizer bytes, served bytes).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

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
    assert record["machine"]["cpu_model"] and "cpu_id" in record["machine"]
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
        assert (r["batches"], r["batch_pool"]) == ("uniform", cfg["bench"]["distinct_batches"])
        assert r["batch_pool_bytes_max_rank"] > 0 and r["axis"] is None
    assert {q["ratio"] for q in res["ratios"]} == {"MLET(64,16) / EBC(64)", "MLET(64,16) / EBC(16)"}
    assert len(res["planner"]) == len(res["rows"])
    for p in res["planner"]:
        assert p["estimate_training_bytes_max_rank"] > 0 and p["measured_state_bytes_max_rank"] > 0

    md = (quick_run / record["files"]["markdown"]).read_text()
    for heading in (
        "## Throughput",
        "## Memory",
        "## Planner estimates",
        "## Ratios",
        "## Batches",
    ):
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
    # the default serving path: what --predictor auto loads among those built (quick: fp32 has
    # no AOTInductor package, so the portable program), and its speeds are the table's ratios
    default = {dp["dtype"]: dp for dp in res["default_path"]}
    assert default["fp32"]["predictor"] == "export"
    assert default["int8"]["predictor"] == (
        "aoti" if by["int8", "aoti"]["status"] == "ok" else "export"
    )
    for dp in default.values():
        r, ts = by[dp["dtype"], dp["predictor"]], by[dp["dtype"], "torchscript"]
        assert dp["speedup_latency_b1"] == ts["latency_ms"]["median"] / r["latency_ms"]["median"]
        assert dp["meets_targets"] == (
            dp["speedup_latency_b1"] >= 1 / 1.2 and dp["speedup_throughput_4096"] >= 1.0
        )
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


# -- realistic traffic, axes and the machine record (issue 13) ----------------------------------


def _small_cfg(cards: int = 60, rows: int = 40, batch: int = 64, *extra: str):
    """A bench config with tiny tables: ``cards`` Zipf ids per feature hashed onto ``rows``."""
    cfg, _ = load_bench_config(
        quick=True,
        overrides=[
            f"--data.batch_size={batch}",
            f"--data.num_embeddings_per_feature={[rows] * 26}",
            f"--synthetic.cardinalities={[cards] * 26}",
            *extra,
        ],
    )
    return cfg


def _zipf_row_probabilities(cfg, j: int, missing_rate: float) -> np.ndarray:
    """The oracle: P(table row) of feature j, from the Zipf law and the generator's hash
    (``Teacher.hash_ids`` on every id), plus the reader's missing -> row 0."""
    from mlet_dist.data import build_teacher

    teacher = build_teacher(cfg.synthetic)
    card, rows = cfg.synthetic.cardinalities[j], cfg.data.num_embeddings_per_feature[j]
    pmf = np.arange(1, card + 1, dtype=np.float64) ** -cfg.synthetic.zipf_exponent
    pmf /= pmf.sum()
    ids = np.full((card, 26), -1, dtype=np.int64)
    ids[:, j] = np.arange(card)
    row = teacher.hash_ids(ids)[:, j] % rows
    p = np.bincount(row, weights=pmf, minlength=rows) * (1 - missing_rate)
    p[0] += missing_rate
    return p


def test_zipf_batches_are_fresh_and_follow_the_generator() -> None:
    """Every drawn batch is new, the first id of a bag is distributed as the synthetic day files
    give it (an independent draw with ``sample_day``, and the analytic Zipf law through the
    hash), and the multi-hot extra ids follow the feature's Zipf law (never missing)."""
    from benchmarks.traffic import draw_global_batches
    from mlet_dist.data import sample_day

    cfg = _small_cfg(batch=512)  # 20k rows: sampling noise of the distances ~0.01
    n, bags = 40, [3] + [1] * 25
    drawn = draw_global_batches(cfg, n, bags, seed=5)
    first = drawn["ids_0"][..., 0].reshape(n, -1)
    keys = {
        tuple(np.concatenate([drawn[f"ids_{j}"][i].ravel() for j in range(26)])) for i in range(n)
    }
    assert len(keys) == n  # no batch repeats another
    assert drawn["labels"].shape == (n, 512) and 0 < drawn["labels"].mean() < 1
    assert drawn["ids_0"].shape == (n, 512, 3) and drawn["ids_1"].shape == (n, 512, 1)

    miss = cfg.synthetic.sparse_missing_rate
    oracle = _zipf_row_probabilities(cfg, 0, miss)
    total = first.size
    freq = np.bincount(first.ravel(), minlength=40) / total
    syn = dataclasses.replace(cfg.synthetic, rows_per_day=total)
    day = sample_day(syn, 3)  # the generator's own rows, another seed stream
    independent = np.bincount(
        np.where(day.hashes[:, 0] < 0, 0, day.hashes[:, 0]) % 40, minlength=40
    )
    independent = independent / total
    tv = 0.5 * np.abs(freq - oracle).sum()
    assert tv < 0.03, (tv, freq[:5], oracle[:5])
    assert 0.5 * np.abs(freq - independent).sum() < 0.04
    extra = drawn["ids_0"][..., 1:].ravel()
    extra_freq = np.bincount(extra, minlength=40) / extra.size
    assert 0.5 * np.abs(extra_freq - _zipf_row_probabilities(cfg, 0, 0.0)).sum() < 0.03
    # a wrong law is far away: uniform rows, or the unhashed Zipf ranks
    assert 0.5 * np.abs(freq - 1 / 40).sum() > 3 * tv


def test_rank_pools_split_global_batches_into_multi_hot_kjts(tmp_path) -> None:
    """Each rank's pool holds its slice of every global batch; the KJT has the bag sizes as
    lengths and the ids key-major (checked by hand against the drawn arrays)."""
    from benchmarks.traffic import (
        DLRMV2_IDS_PER_BAG,
        batch_bytes,
        draw_global_batches,
        load_pool,
        write_rank_pools,
    )

    cfg = _small_cfg(batch=8)
    paths = write_rank_pools(cfg, 2, 3, DLRMV2_IDS_PER_BAG, seed=1, out_dir=tmp_path)
    drawn = draw_global_batches(cfg, 3, DLRMV2_IDS_PER_BAG, seed=1)
    for rank, path in enumerate(paths):
        pool = load_pool(path)
        assert len(pool) == 3
        for i, b in enumerate(pool):
            kjt = b.sparse_features
            assert kjt.stride() == 4
            per_key = kjt.to_dict()
            for j, n_ids in enumerate(DLRMV2_IDS_PER_BAG):
                jt = per_key[f"cat_{j}"]
                assert jt.lengths().tolist() == [n_ids] * 4
                want = drawn[f"ids_{j}"][i, rank * 4 : rank * 4 + 4].ravel()
                assert jt.values().tolist() == want.tolist()
            assert b.labels.tolist() == drawn["labels"][i, rank * 4 : rank * 4 + 4].tolist()
        ids = sum(DLRMV2_IDS_PER_BAG) * 4
        assert batch_bytes(pool) == 3 * (ids * 8 + 26 * 4 * 4 + 4 * 13 * 4 + 4 * 4)


def test_batches_needed_covers_every_step_and_the_pipeline() -> None:
    from benchmarks.traffic import PIPELINE_LOOKAHEAD, batches_needed

    _, bench = load_bench_config(overrides=["--bench.warmup_steps=3", "--bench.windows=2"])
    steps = 3 + 2 * bench.steps_per_window
    assert batches_needed(bench, False) == steps
    assert batches_needed(bench, True) == steps + PIPELINE_LOOKAHEAD


AXIS = '--bench.axes={"optim.embedding_optimizer" = ["rowwise_adagrad", "sgd"], "data.batch_size" = ["512", "256"]}'


def test_axis_points_and_their_configs() -> None:
    from benchmarks.common import axis_points, point_config

    cfg, bench = load_bench_config(quick=True, overrides=[AXIS])
    points = axis_points(bench)
    assert points == [None, ("optim.embedding_optimizer", "sgd"), ("data.batch_size", "256")]
    ref, sgd, half = (point_config(cfg, "plain_k", bench, p) for p in points)
    assert (ref.optim.embedding_optimizer, ref.data.batch_size) == ("rowwise_adagrad", 512)
    assert (sgd.optim.embedding_optimizer, sgd.data.batch_size) == ("sgd", 512)
    assert (half.optim.embedding_optimizer, half.data.batch_size) == ("rowwise_adagrad", 256)
    assert half.model == variant_config(cfg, "plain_k").model  # the variant is kept


def test_axes_refuse_unknown_keys_and_bad_values() -> None:
    with pytest.raises(BenchConfigError, match="'train.no_such' is not a key"):
        load_bench_config(overrides=['--bench.axes={"train.no_such" = ["a", "b"]}'])
    with pytest.raises(BenchConfigError, match="value 'nope'"):
        load_bench_config(
            overrides=['--bench.axes={"optim.embedding_optimizer" = ["sgd", "nope"]}']
        )
    with pytest.raises(BenchConfigError, match="two or more distinct"):
        load_bench_config(overrides=['--bench.axes={"optim.embedding_optimizer" = ["sgd"]}'])
    with pytest.raises(BenchConfigError, match="ids_per_bag"):
        load_bench_config(overrides=["--bench.ids_per_bag=[2, 3]", "--bench.batches=zipf"])


def test_realistic_config_loads_once_its_axis_keys_exist() -> None:
    """configs/bench_train_realistic.toml compares train.pipeline and model.w1_dtype: it loads
    where the config has both keys, else it refuses naming the missing one."""
    from mlet_dist.config import ModelConfig, TrainConfig

    path = REPO / "configs" / "bench_train_realistic.toml"
    missing = [
        key
        for key, section in (("train.pipeline", TrainConfig), ("model.w1_dtype", ModelConfig))
        if key.split(".")[1] not in {f.name for f in dataclasses.fields(section)}
    ]
    if missing:
        with pytest.raises(BenchConfigError, match=f"'{missing[0]}' is not a key"):
            load_bench_config(path)
        return
    cfg, bench = load_bench_config(path)
    assert bench.batches == "zipf" and cfg.model.pooling == "sum"
    assert bench.axes == {
        "train.pipeline": ["base", "sparse_dist"],
        "model.w1_dtype": ["fp32", "fp16"],
    }


def _fake_rank_result(spec: dict, rank: int, ws: int) -> dict:
    """What a rank reports, with window times that depend on the point's config: sgd steps
    take 2/3 of row-wise Adagrad's, and W1's bytes follow the variant's width."""
    cfg = spec["config"]
    slow = cfg["optim"]["embedding_optimizer"] == "rowwise_adagrad"
    width = cfg["model"]["inner_dim"] or cfg["model"]["embedding_dim"]
    w1 = sum(cfg["data"]["num_embeddings_per_feature"]) * width * 4 // ws
    return {
        "rank": rank, "world_size": ws, "device": "cpu", "threads": 1, "local_batch": 1,
        "steps_per_window": spec["bench"]["steps_per_window"],
        "window_s": [0.3 if slow else 0.2] * spec["bench"]["windows"],
        "minor_faults_per_step": 0, "sys_s_per_step": 0, "user_s_per_step": 0,
        "final_loss": 0.5, "param_bytes": {"w1": w1, "projection": 0, "dense": 10},
        "optimizer_bytes": {"fused": 1, "projection": 0, "dense": 1},
        "rss_start_bytes": 1, "rss_before_model_bytes": 2, "rss_model_bytes": 3,
        "rss_end_bytes": 4, "peak_rss_bytes": 1000 + w1, "sharding": {"table_wise": 26},
        "pipeline": "base", "batches": spec["bench"]["batches"], "batch_pool": 7,
        "batch_pool_bytes": 5, "rss_batches_bytes": 6, "mean_ids_per_bag": 1.0,
    }  # fmt: skip


def test_suite_sends_each_point_to_its_workers_and_forms_ratios(monkeypatch) -> None:
    """The orchestration without rank processes: every (variant, point) reaches a worker spec
    whose config (rebuilt as the worker does) holds the point's value and nothing else changed;
    the axis ratios are value / reference of the fake ranks' numbers."""
    from benchmarks import train_bench
    from mlet_dist.config import config_from_dict

    seen = []

    def fake_spawn(args_of_rank, world_size, threads, timeout_s, log_prefix, what, extra_env):
        for r in range(world_size):
            args = args_of_rank(r)
            spec = json.loads(Path(args[args.index("--worker") + 1]).read_text())
            cfg = config_from_dict(spec["config"])
            seen.append((spec["variant"], cfg.optim.embedding_optimizer, bool(spec["pool"])))
            Path(args[args.index("--result") + 1]).write_text(
                json.dumps(_fake_rank_result(spec, r, world_size))
            )

    monkeypatch.setattr(train_bench, "spawn_ranks", fake_spawn)
    cfg, bench = load_bench_config(
        quick=True,
        overrides=[
            '--bench.axes={"optim.embedding_optimizer" = ["rowwise_adagrad", "sgd"]}',
            "--bench.world_sizes=[1]",
            '--bench.variants=["mlet", "plain_d"]',
            "--bench.batches=zipf",
            f"--synthetic.cardinalities={[50] * 26}",
        ],
    )
    res = train_bench.run_train_suite(cfg, bench, cores=2, progress=lambda line: None)
    assert sorted(seen) == sorted(
        (v, o, True) for v in ("mlet", "plain_d") for o in ("rowwise_adagrad", "sgd")
    )
    assert [r["variant"] for r in res["rows"]] == ["mlet", "plain_d"]
    assert [(r["variant"], r["axis_value"]) for r in res["axis_rows"]] == [
        ("mlet", "sgd"), ("plain_d", "sgd"),
    ]  # fmt: skip
    for q in res["axis_ratios"]:
        assert q["ratio"] == "optim.embedding_optimizer: sgd / rowwise_adagrad"
        assert q["samples_per_s"] == pytest.approx(0.3 / 0.2)
        assert q["w1_bytes"] == 1.0
    assert res["reference"] == {"optim.embedding_optimizer": "rowwise_adagrad"}
    assert list(res["batch_pools"]) == ["world 1 reference"]  # one pool shared by both points
    assert res["rows"][0]["w1_bytes_per_rank"] == [sum([5000] * 26) * 64 * 4]


def test_machine_record_names_the_cpu() -> None:
    """The CPU model is /proc/cpuinfo's first 'model name' (hand parse), and every result's
    markdown header carries it with the core count and the library versions."""
    from benchmarks.common import library_versions, machine_info
    from benchmarks.report import header_lines

    m = machine_info()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                 if ln.startswith("model name")]  # fmt: skip
        if names:
            assert m["cpu_model"] == names[0]
    assert m["cpu_model"] and m["cores"] >= 1
    record = {
        "machine": m, "versions": library_versions(), "hardware_tag": "cpu2", "date": "2026-11-30",
        "quick": False, "command": "python -m benchmarks.run",
    }  # fmt: skip
    header = "\n".join(header_lines(record, "t"))
    assert m["cpu_model"] in header and f"{m['cores']} cores" in header
    for lib in ("torch", "torchrec", "fbgemm_gpu"):
        assert f"{lib} {record['versions'][lib]}" in header


def _losses_base_vs_pipeline(tmp: str) -> dict:
    """One rank: the bench's step ('base' and 'sparse_dist') on the same fresh Zipf batches,
    each from a freshly built Trainer (same seed)."""
    from benchmarks.traffic import load_pool, write_rank_pools
    from benchmarks.train_bench import make_step
    from mlet_dist.distributed.parallelize import init_distributed
    from mlet_dist.train import Trainer

    cfg = _small_cfg(batch=32)
    env = init_distributed(cfg.dist)
    (path,) = write_rank_pools(cfg, 1, 6, [2], seed=3, out_dir=Path(tmp))
    out = {}
    for kind in ("base", "sparse_dist"):
        trainer = Trainer(cfg, env)
        step = make_step(trainer, kind, iter(load_pool(path)))
        losses = [float(step().detach()) for _ in range(4)]
        out[kind] = {
            "losses": losses,
            "lr": trainer.scheduler.get_last_lr(),
            "dense": {
                n: p.detach().clone()
                for n, p in trainer.model.named_parameters()
                if ".w1." not in n
            },
        }
    return out


@pytest.mark.slow
def test_pipelined_bench_step_trains_like_the_plain_step(tmp_path) -> None:
    """The pipeline axis's timed step (TrainPipelineSparseDist.progress + schedule + fused LR
    sync) trains exactly as the plain step (the oracle): same losses, LR and dense weights."""
    from dist_utils import run_ranks

    (res,) = run_ranks(_losses_base_vs_pipeline, 1, str(tmp_path), timeout=240)
    base, piped = res["base"], res["sparse_dist"]
    assert len(set(base["losses"])) == 4  # fresh batches: every loss differs
    assert piped["losses"] == pytest.approx(base["losses"], rel=1e-6)
    assert piped["lr"] == base["lr"]
    for name, w in base["dense"].items():
        assert torch.allclose(piped["dense"][name], w, atol=1e-6), name


def _monitored_vs_plain(tmp: str) -> dict:
    """One rank: the bench's pipelined step without and with the training monitor (RecMetrics
    every 3 steps, TensorBoard, loss logged every 2 steps) on the same fresh batches."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from benchmarks.traffic import load_pool, write_rank_pools
    from benchmarks.train_bench import make_step
    from mlet_dist.distributed.parallelize import init_distributed
    from mlet_dist.train import Trainer
    from mlet_dist.train.metrics import TrainingMonitor

    extra = ["--train.metrics_every=3", "--train.tensorboard=true", "--train.log_every=2"]
    cfg = _small_cfg(60, 40, 32, *extra)
    env = init_distributed(cfg.dist)
    (path,) = write_rank_pools(cfg, 1, 8, [2], seed=3, out_dir=Path(tmp))
    out: dict = {}
    for monitored in (False, True):
        trainer = Trainer(cfg, env)
        monitor = None
        if monitored:
            monitor = TrainingMonitor(cfg.train, cfg.data.batch_size, env, Path(tmp) / "run")
        step = make_step(trainer, "sparse_dist", iter(load_pool(path)), monitor)
        out[monitored] = [float(step()) for _ in range(6)]
        if monitor is not None:
            monitor.close()
    acc = EventAccumulator(str(Path(tmp) / "run" / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    out["tb"] = {
        tag: {e.step: e.value for e in acc.Scalars(tag)}
        for tag in ("train/loss", "recmetrics/auc-ctr/window_auc")
    }
    return out


@pytest.mark.slow
def test_monitored_bench_step_trains_alike_and_feeds_the_monitor(tmp_path) -> None:
    """The TensorBoard axis's timed step drives the monitor as Trainer.fit does (losses at the
    logged steps, RecMetrics at their cadence) and trains exactly as the plain step."""
    from dist_utils import run_ranks

    from benchmarks.train_bench import monitoring

    (res,) = run_ranks(_monitored_vs_plain, 1, str(tmp_path), timeout=240)
    assert res[True] == res[False]
    assert res["tb"]["train/loss"] == pytest.approx(
        {2: res[True][1], 4: res[True][3], 6: res[True][5]}
    )
    assert sorted(res["tb"]["recmetrics/auc-ctr/window_auc"]) == [3, 6]
    assert monitoring(_small_cfg(60, 40, 32, "--train.tensorboard=true"))  # RecMetrics: auto
    assert not monitoring(_small_cfg())


def test_serving_bench_alone_writes_the_runners_record(tmp_path, monkeypatch) -> None:
    """``python -m benchmarks.serving_bench [options]`` is ``benchmarks.run --suite serving``
    (without the measurement: the suite's functions are replaced)."""
    from benchmarks import serving_bench

    def fake_suite(cfg, bench, cores, progress, quick):
        return {"rows": [], "batch_size": cfg.data.batch_size, "quick": quick}

    monkeypatch.setattr(serving_bench, "run_serving_suite", fake_suite)
    monkeypatch.setattr(serving_bench, "serving_plots", lambda record, stem: [])
    monkeypatch.setattr(serving_bench, "serving_markdown", lambda record: "# serving\n")
    args = ["--quick", "--data.batch_size=128", "--tag", "x"]
    records = {}
    for name, main in [("alone", serving_bench.main), ("runner", bench_run.main)]:
        out = tmp_path / name
        main(
            ["--suite", "serving", *args, "--out", str(out)]
            if name == "runner"
            else [*args, "--out", str(out)]
        )
        (path,) = out.glob(f"serving-quick_{hardware_tag()}_*_x.json")
        records[name] = json.loads(path.read_text())
        assert (out / records[name]["files"]["markdown"]).read_text() == "# serving\n"
    alone, runner = records["alone"], records["runner"]
    assert alone["results"] == runner["results"] == {"rows": [], "batch_size": 128, "quick": True}
    assert alone["config"] == runner["config"]
    assert alone["command"].startswith("python -m benchmarks.run --suite serving --quick")


def test_recmetrics_bench_feeds_per_step_and_per_n_steps_alike() -> None:
    """The two ways of feeding TorchRec's RecMetrics give the same window AUC (the rows of the
    last N steps); each reports its cost per step."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.recmetrics_bench", "--steps", "20", "--every", "10",
         "--repeats", "1", "--batch", "64"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(done.stdout.strip().splitlines()[-1])
    assert res["per_step_window_auc"] == pytest.approx(res["per_n_steps_window_auc"], abs=1e-6)
    assert 0.5 < res["per_step_window_auc"] < 1.0  # labels drawn from the logits
    assert res["per_step_ms_per_step"] > 0 and res["per_n_steps_ms_per_step"] > 0
