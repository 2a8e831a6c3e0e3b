"""The serving handoff on one process: predictors, formats, manifest, predict, atomic collapse.

Oracles: the trained (unsharded) MLET model's own predictions; TorchRec's own quantization path
(``QuantEmbeddingBagCollection.from_float``) for the table formats; checksums recomputed here.
Every predictor (torch.export program, TorchScript, AOTInductor package) is loaded in a fresh
interpreter that imports neither mlet_dist nor torchrec, and fed batches of 1, 7 and 4096 rows.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mlet_dist import cli
from mlet_dist.checkpoint import latest_checkpoint
from mlet_dist.config import ConfigError, DistConfig, load_config
from mlet_dist.data import CriteoArrays, make_batches, read_criteo_tsv
from mlet_dist.distributed.parallelize import init_distributed
from mlet_dist.export import (
    CollapseError,
    CollapseOptions,
    collapse_run,
    load_served,
    load_unsharded,
)
from mlet_dist.metrics import binary_metrics
from mlet_dist.modules.quantize import dequantize_rows, quantize_rows
from mlet_dist.predict_job import predict_file
from mlet_dist.serving import ServingError, artifacts, verify_manifest
from mlet_dist.serving.manifest import MANIFEST, file_entries
from mlet_dist.serving.predict import load_predictor, predict_arrays, serving_inputs
from mlet_dist.serving.predictor import AOTIError, quant_embedding_bag_collection

REPO = Path(__file__).resolve().parents[1]
CRITEO_SAMPLE = REPO.parent / "shared/data/criteo_kaggle_sample/criteo_kaggle_train_first10k.tsv.gz"
SIZES = [50] * 26


def write_criteo_tsv(path: Path, n: int, seed: int) -> Path:
    """Raw Criteo lines: label, 13 integers (some missing), 26 hex hashes (some missing)."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        ints = ["" if rng.random() < 0.1 else str(int(rng.integers(0, 1000))) for _ in range(13)]
        cats = [
            "" if rng.random() < 0.05 else f"{int(rng.integers(0, 2**32)):08x}" for _ in range(26)
        ]
        lines.append("\t".join([str(int(rng.integers(0, 2))), *ints, *cats]))
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_run(tmp: Path, *extra: str):
    """A 4-step MLET (or, with --model.inner_dim=0, plain) run on rows of a written TSV file."""
    from mlet_dist.train import train

    data = write_criteo_tsv(tmp / "train.tsv", 384, seed=0)
    cfg = load_config(
        None,
        [
            "--data.source=criteo",
            f"--data.train_files=['{data}']",
            "--data.eval_fraction=0.0",
            f"--data.num_embeddings_per_feature={SIZES}",
            "--data.batch_size=32",
            "--model.embedding_dim=8",
            "--model.inner_dim=32",
            "--model.dense_arch_layer_sizes=[16, 8]",
            "--model.over_arch_layer_sizes=[16, 1]",
            "--train.max_steps=4",
            "--train.progress=false",
            f"--train.run_dir={tmp / 'run'}",
            *extra,
        ],
    )
    init_distributed(DistConfig(device="cpu"))
    train(cfg)
    return cfg


@torch.no_grad()
def trained_probabilities(cfg, arrays: CriteoArrays) -> torch.Tensor:
    model = load_unsharded(cfg, latest_checkpoint(cfg.train.run_dir)).eval()
    logits = [model(b)[1][1] for b in make_batches(arrays, 64, shuffle=False, seed=0)]
    return torch.sigmoid(torch.cat(logits))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    cfg = tiny_run(tmp)
    held_out = write_criteo_tsv(tmp / "held_out.tsv", 150, seed=1)
    served = tmp / "served_fp32"
    # the default torch.export program and, with --torchscript, the TorchScript one
    collapse_run(
        cfg.train.run_dir,
        served,
        CollapseOptions(chunk_rows=16, quantize="fp32", artifacts=("torchscript",)),
    )
    return {"cfg": cfg, "tmp": tmp, "held_out": held_out, "served": served}


BATCHES = (1, 7, 4096)


@pytest.fixture(scope="module")
def batches(run):
    """Held-out rows cut into batches of 1, 7 and 4096, and the trained model's probabilities."""
    arrays = read_criteo_tsv(
        write_criteo_tsv(run["tmp"] / "batches.tsv", sum(BATCHES), seed=2), SIZES
    )
    bounds = np.cumsum((0, *BATCHES))
    inputs = [serving_inputs(arrays.slice(int(a), int(b))) for a, b in itertools.pairwise(bounds)]
    return {"inputs": inputs, "expected": trained_probabilities(run["cfg"], arrays)}


_PLAIN_PROCESS = """
import sys, torch
import fbgemm_gpu  # the fbgemm operators the predictor calls
dense, values, lengths = torch.load(sys.argv[2])
model = torch.jit.load(sys.argv[1])
torch.save(model(dense, values, lengths), sys.argv[3])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("mlet_dist", "torchrec"))
assert not loaded, loaded
"""


def test_fp32_predictor_matches_trained_model_in_a_plain_process(run, tmp_path) -> None:
    arrays = read_criteo_tsv(run["held_out"], SIZES)
    expected = trained_probabilities(run["cfg"], arrays)
    torch.save(serving_inputs(arrays), tmp_path / "inputs.pt")
    subprocess.run(
        [
            sys.executable,
            "-c",
            _PLAIN_PROCESS,
            str(run["served"] / "serving/predictor.pt"),
            str(tmp_path / "inputs.pt"),
            str(tmp_path / "out.pt"),
        ],
        check=True,
        cwd=tmp_path,  # not the checkout: mlet_dist must not be importable by accident
        timeout=120,
    )
    got = torch.load(tmp_path / "out.pt")
    assert got.shape == (len(arrays),) and got.dtype == torch.float32
    assert (got - expected).abs().max().item() <= 1e-5


_PLAIN_PREDICTORS = """
import sys, torch
import fbgemm_gpu  # the fbgemm operators the predictors call
inputs, out, *predictors = sys.argv[1:]
batches, outs = torch.load(inputs), {}
for kind, path in zip(predictors[::2], predictors[1::2]):
    if kind == "export":
        model = torch.export.load(path).module()
    elif kind == "aoti":
        model = torch._inductor.aoti_load_package(path)
    else:
        model = torch.jit.load(path)
    with torch.no_grad():
        outs[kind] = [model(*batch) for batch in batches]
torch.save(outs, out)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("mlet_dist", "torchrec"))
assert not loaded, loaded
"""


def run_in_plain_process(
    predictors: dict[str, Path], batches: list, tmp: Path
) -> dict[str, list[torch.Tensor]]:
    """Each predictor's outputs for each batch, computed by a fresh interpreter that imports only
    torch and fbgemm_gpu (it asserts that mlet_dist and torchrec were never imported)."""
    torch.save(batches, tmp / "batches.pt")
    pairs = [str(x) for kind, path in predictors.items() for x in (kind, path)]
    done = subprocess.run(
        [sys.executable, "-c", _PLAIN_PREDICTORS, str(tmp / "batches.pt"), str(tmp / "out.pt"), *pairs],
        cwd=tmp,  # not the checkout: mlet_dist must not be importable by accident
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(tmp / "out.pt")


def test_predictors_match_trained_model_at_batch_1_7_4096_in_a_plain_process(
    run, batches, tmp_path
) -> None:
    """Each artifact, three batch sizes (the exported program's batch is dynamic, 1 included)."""
    served = run["served"]
    predictors = {"export": served / "serving/predictor.pt2", "torchscript": served / "serving/predictor.pt"}  # fmt: skip
    outs = run_in_plain_process(predictors, batches["inputs"], tmp_path)
    assert set(outs) == set(predictors)
    for kind, got in outs.items():
        assert [o.shape for o in got] == [(b,) for b in BATCHES], kind
        assert all(o.dtype == torch.float32 for o in got), kind
        assert (torch.cat(got) - batches["expected"]).abs().max().item() <= 1e-5, kind


@pytest.mark.slow
def test_aoti_package_matches_trained_model_or_is_refused_in_one_line(
    run, batches, tmp_path
) -> None:
    """AOTInductor is optional: it compiles here (g++) and must then match like the others; where
    it cannot lower the program the collapse is refused with a one-line reason."""
    out = tmp_path / "served_aoti"
    try:
        collapse_run(
            run["cfg"].train.run_dir,
            out,
            CollapseOptions(chunk_rows=16, quantize="fp32", artifacts=("aoti",)),
        )
    except AOTIError as e:
        assert "\n" not in str(e) and str(e).startswith("AOTInductor"), str(e)
        assert not out.exists()
        pytest.skip(f"AOTInductor refused, cleanly: {e}")
    manifest = verify_manifest(out)
    assert set(manifest["serving"]["artifacts"]) == {"export", "aoti"}
    path = out / manifest["serving"]["artifacts"]["aoti"]["path"]
    outs = run_in_plain_process({"aoti": path}, batches["inputs"], tmp_path)["aoti"]
    assert [o.shape for o in outs] == [(b,) for b in BATCHES]
    assert (torch.cat(outs) - batches["expected"]).abs().max().item() <= 1e-5
    got = predict_file(out, run["held_out"], tmp_path / "p.txt", kind="aoti")
    assert got["predictor"] == "aoti"
    expected = trained_probabilities(run["cfg"], read_criteo_tsv(run["held_out"], SIZES))
    np.testing.assert_allclose(
        np.loadtxt(tmp_path / "p.txt"), expected.double().numpy(), atol=1e-5, rtol=0
    )


def test_aoti_lowering_failure_is_refused_in_one_line_and_publishes_nothing(
    run, tmp_path, monkeypatch, capsys
) -> None:
    out = tmp_path / "served"
    shutil.copytree(run["served"], out)
    before = (out / MANIFEST).read_bytes()

    def fail(*args, **kwargs):
        raise RuntimeError("could not lower fbgemm::int_nbit_split_embedding_codegen\n  trace line")

    monkeypatch.setattr("torch._inductor.aoti_compile_and_package", fail)
    code = cli.main(
        ["collapse", "--run", str(run["cfg"].train.run_dir), "--out", str(out), "--aoti"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "AOTInductor could not compile the predictor: RuntimeError: could not lower" in err
    assert "--aoti" in err
    assert (out / MANIFEST).read_bytes() == before and verify_manifest(out)  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["served"]  # no staging, no lock


@pytest.fixture
def extra_kind():
    """A serving format registered by this test only: a second copy of the torch.export program
    in its own file, with its own collapse flag, written and loaded by the registry alone."""

    def build(b: artifacts.ServingBuild, path: Path) -> None:
        artifacts.write_serialized(path, lambda f: torch.export.save(b.exported(), f))

    kind = artifacts.register(
        artifacts.Artifact(
            kind="export_copy",
            path="serving/predictor_copy.pt2",
            format="torch.export ExportedProgram, a copy (test)",
            load_hint="torch.export.load(path).module()",
            build=build,
            load=lambda path: torch.export.load(path).module(),
            flag="--export-copy",
            help="also write a copy of the exported program (test)",
        )
    )
    yield kind
    del artifacts.ARTIFACTS[kind.kind]


def test_a_new_serving_format_is_one_registration(run, extra_kind, tmp_path, capsys) -> None:
    """collapse writes the registered kind when its flag is given, the manifest lists it with its
    checksum, predict --predictor loads it, and its answers are the trained model's."""
    out, held = tmp_path / "served", run["held_out"]
    run_dir = str(run["cfg"].train.run_dir)
    assert cli.main(["collapse", "--run", run_dir, "--out", str(out), "--export-copy"]) == 0
    manifest = verify_manifest(out)
    listed = manifest["serving"]["artifacts"]
    assert list(listed) == ["export", "export_copy"]
    data = (out / "serving/predictor_copy.pt2").read_bytes()
    assert listed["export_copy"] == {
        "path": "serving/predictor_copy.pt2",
        "format": "torch.export ExportedProgram, a copy (test)",
        "load": "torch.export.load(path).module()",
        "device": "cpu",
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    capsys.readouterr()
    argv = ["predict", "--serving", str(out), "--data", str(held), "--out", str(tmp_path / "p.txt")]
    assert cli.main([*argv, "--predictor", "export_copy"]) == 0
    assert json.loads(capsys.readouterr().out)["predictor"] == "export_copy"
    expected = trained_probabilities(run["cfg"], read_criteo_tsv(held, SIZES))
    np.testing.assert_allclose(
        np.loadtxt(tmp_path / "p.txt"), expected.double().numpy(), atol=1e-5, rtol=0
    )
    from mlet_dist.workflow import check_serving

    check = check_serving(run_dir, out, read_criteo_tsv(held, SIZES), kind="export_copy")
    assert check["predictor"] == "export_copy" and check["passed"], check
    # the registry's flags are checked like the built-in ones
    bad = ["collapse", "--run", run_dir, "--out", str(tmp_path / "x"), "--no-predictor"]
    assert cli.main([*bad, "--export-copy"]) == 2
    assert "drop it, or drop --aoti / --torchscript / --export-copy" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_the_command_line_reads_the_registry_without_importing_torch() -> None:
    """The collapse flags and --predictor choices come from the registry, which the parser reads
    before any command imports torch (--help must not wait for it)."""
    code = (
        "import sys\nfrom mlet_dist import cli\ntry:\n    cli.main(['predict', '--help'])\n"
        "except SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'torch imported'"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "{auto,export,aoti,torchscript}" in done.stdout


def test_collapse_options_are_checked_in_one_place(run, tmp_path, capsys) -> None:
    run_dir = str(run["cfg"].train.run_dir)
    bad = ["collapse", "--run", run_dir, "--out", str(tmp_path / "x"), "--no-predictor"]
    assert cli.main([*bad, "--aoti"]) == 2
    err = capsys.readouterr().err
    assert (
        "--no-predictor (predictor=False) writes no predictor, so there is nothing to compile or "
        "script: drop it, or drop --aoti / --torchscript" in err
    ), err
    with pytest.raises(ConfigError, match=r"unknown optional serving artifact 'export'"):
        CollapseOptions(artifacts=("export",)).check()
    with pytest.raises(ConfigError, match="chunk_rows must be positive, got 0"):
        collapse_run(run_dir, tmp_path / "x", CollapseOptions(chunk_rows=0))
    with pytest.raises(ValueError, match="unknown serving dtype 'int4'"):
        CollapseOptions(quantize="int4").check()
    assert not list(tmp_path.iterdir())  # no x, no staging .x.tmp-*, no lock .x.lock


def test_manifest_records_the_programs_signature_schema_and_checksums(run) -> None:
    manifest = verify_manifest(run["served"])
    serving = manifest["serving"]
    assert manifest["format"] == "mlet_dist.serving/2"
    assert serving["predictor"] == "serving/predictor.pt2"
    assert set(serving["artifacts"]) == {"export", "torchscript"}
    for artifact in serving["artifacts"].values():
        data = (run["served"] / artifact["path"]).read_bytes()
        assert (artifact["bytes"], artifact["sha256"]) == (
            len(data),
            hashlib.sha256(data).hexdigest(),
        )
    assert serving["inputs"] == [
        {"name": "dense", "dtype": "float32", "shape": ["batch", 13]},
        {"name": "values", "dtype": "int64", "shape": ["num_ids"]},
        {"name": "lengths", "dtype": "int32", "shape": ["26*batch"]},
    ]
    assert serving["output"] == {"dtype": "float32", "shape": ["batch"]}
    assert serving["dynamic_dims"] == {
        "batch": {"min": 1, "max": None},
        "num_ids": {"min": 0, "max": None},
    }
    features = [f"cat_{i}" for i in range(26)]
    assert serving["feature_order"] == features
    tables = {t["name"]: t for t in manifest["tables"]}
    assert [f in tables[serving["feature_tables"][f]]["features"] for f in features] == [True] * 26
    # the program enforces what the manifest says: dtypes, 13 dense columns, 26 lengths per row
    model = torch.export.load(run["served"] / "serving/predictor.pt2").module()
    dense, values, lengths = serving_inputs(read_criteo_tsv(run["held_out"], SIZES).slice(0, 5))
    assert model(dense, values, lengths).shape == (5,)
    for bad in [
        (dense, values, lengths.long()),  # int64 lengths
        (dense[:, :12], values, lengths),  # 12 dense features
        (dense, values, lengths[:-1]),  # not 26 * batch lengths
        (dense.double(), values, lengths),
    ]:
        with pytest.raises(Exception):  # noqa: B017  (the program's input checks, several types)
            model(*bad)


def test_tampered_predictor_is_refused(run, tmp_path, capsys) -> None:
    copy = tmp_path / "served"
    shutil.copytree(run["served"], copy)
    victim = copy / "serving/predictor.pt2"
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0x01
    victim.write_bytes(bytes(data))
    for verify in ("all", "predictor"):
        with pytest.raises(ServingError, match=r"predictor\.pt2 does not match its checksum"):
            load_predictor(copy, verify=verify)
    code = cli.main(["predict", "--serving", str(copy), "--data", str(run["held_out"]), "--out", str(tmp_path / "p.txt")])  # fmt: skip
    assert code == 2 and "predictor.pt2 does not match its checksum" in capsys.readouterr().err
    assert not (tmp_path / "p.txt").exists()
    # the TorchScript file is intact and can still be asked for
    assert predict_file(copy, run["held_out"], tmp_path / "p.txt", verify="predictor", kind="torchscript")["predictor"] == "torchscript"  # fmt: skip
    # a manifest whose artifact entry was edited to match the tampered file is refused too
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["serving"]["artifacts"]["export"]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ServingError, match="export predictor's size/sha256 differ"):
        load_predictor(copy, verify="predictor")


def test_predict_uses_the_exported_program_and_falls_back_to_torchscript(run, tmp_path) -> None:
    expected = trained_probabilities(run["cfg"], read_criteo_tsv(run["held_out"], SIZES))
    got = predict_file(run["served"], run["held_out"], tmp_path / "a.txt")
    assert got["predictor"] == "export"
    # a directory written before torch.export became the default: format 1, TorchScript only
    old = tmp_path / "old"
    shutil.copytree(run["served"], old)
    (old / "serving/predictor.pt2").unlink()
    manifest = json.loads((old / MANIFEST).read_text())
    manifest["format"] = "mlet_dist.serving/1"
    manifest["serving"]["predictor"] = "serving/predictor.pt"
    del manifest["serving"]["artifacts"]
    manifest["files"] = file_entries(old)
    (old / MANIFEST).write_text(json.dumps(manifest))
    got = predict_file(old, run["held_out"], tmp_path / "b.txt")
    assert got["predictor"] == "torchscript"
    for name in ("a.txt", "b.txt"):
        np.testing.assert_allclose(
            np.loadtxt(tmp_path / name), expected.double().numpy(), atol=1e-5, rtol=0
        )
    with pytest.raises(ServingError, match=r"no export predictor \(it has: torchscript\)"):
        predict_file(old, run["held_out"], tmp_path / "c.txt", kind="export")
    with pytest.raises(ServingError, match=r"no aoti predictor .* collapse again with --aoti"):
        predict_file(run["served"], run["held_out"], tmp_path / "c.txt", kind="aoti")
    assert not (tmp_path / "c.txt").exists()


def test_default_path_emits_no_torch_jit_deprecation_warning(run, tmp_path) -> None:
    """collapse, load and predict without TorchScript: torch.jit's DeprecationWarning is an error."""
    out = tmp_path / "served"
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=DeprecationWarning, module="torch.jit")
        with pytest.raises(DeprecationWarning, match="torch.jit.script"):  # the filter catches it
            torch.jit.script(torch.nn.Linear(2, 2))
        collapse_run(run["cfg"].train.run_dir, out, CollapseOptions(chunk_rows=16, quantize="int8"))
        predictor, manifest = load_predictor(out)
        predict_arrays(predictor, read_criteo_tsv(run["held_out"], SIZES))
        assert predict_file(out, run["held_out"], tmp_path / "p.txt")["predictor"] == "export"
        # and the TorchScript path would have been caught
        with pytest.raises(DeprecationWarning, match="torch.jit"):
            collapse_run(
                run["cfg"].train.run_dir,
                tmp_path / "ts",
                CollapseOptions(chunk_rows=16, artifacts=("torchscript",)),
            )
    assert manifest["predictor_used"] == "export"
    assert sorted(p.name for p in (out / "serving").iterdir()) == ["predictor.pt2", "tables"]


def test_workflow_serving_check_uses_the_exported_program(run) -> None:
    from mlet_dist.workflow import check_serving

    arrays = read_criteo_tsv(run["held_out"], SIZES)
    check = check_serving(run["cfg"].train.run_dir, run["served"], arrays)
    assert check["predictor"] == "export" and check["passed"], check
    assert check["max_abs_probability_diff"] <= 1e-5 and check["rows"] == len(arrays)


def test_predict_command_writes_one_probability_per_line(run, tmp_path) -> None:
    out = tmp_path / "p.txt"
    assert cli.main(["predict", "--serving", str(run["served"]), "--data", str(run["held_out"]), "--out", str(out)]) == 0  # fmt: skip
    got = np.loadtxt(out, dtype=np.float64)
    expected = trained_probabilities(run["cfg"], read_criteo_tsv(run["held_out"], SIZES))
    assert got.shape == (150,)
    np.testing.assert_allclose(got, expected.double().numpy(), atol=1e-5, rtol=0)
    import pyarrow.parquet as pq

    predict_file(run["served"], [run["held_out"]], tmp_path / "p.parquet")
    table = pq.read_table(tmp_path / "p.parquet")
    assert table.column_names == ["probability"]
    np.testing.assert_allclose(table["probability"].to_numpy(), got, atol=1e-8)


def test_manifest_lists_tables_files_and_provenance(run) -> None:
    manifest = verify_manifest(run["served"])
    assert len(manifest["tables"]) == 26
    t = manifest["tables"][0]
    assert {k: t[k] for k in ("name", "features", "rows", "d", "pooling", "dtype")} == {
        "name": "t_cat_0", "features": ["cat_0"], "rows": 50, "d": 8, "pooling": "SUM",
        "dtype": "fp32",
    }  # fmt: skip
    assert manifest["source"]["config"]["model"]["inner_dim"] == 32
    assert manifest["source"]["checkpoint"] == latest_checkpoint(run["cfg"].train.run_dir).name
    assert {"torch", "torchrec", "pyarrow", "mlet_dist"} <= set(manifest["versions"])
    import hashlib

    for entry in manifest["files"]:
        data = (run["served"] / entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]


def test_checksum_mismatch_is_refused_naming_the_file(run, tmp_path, capsys) -> None:
    import shutil

    copy = tmp_path / "served"
    shutil.copytree(run["served"], copy)
    victim = next((copy / "parquet" / "t_cat_3").glob("*.parquet"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ServingError, match=rf"{victim.name} does not match its checksum"):
        predict_file(copy, run["held_out"], tmp_path / "p.txt")
    assert not (tmp_path / "p.txt").exists()
    code = cli.main(["predict", "--serving", str(copy), "--data", str(run["held_out"]), "--out", str(tmp_path / "p.txt")])  # fmt: skip
    assert code == 2 and victim.name in capsys.readouterr().err
    (copy / "serving/predictor.pt2").unlink()
    with pytest.raises(ServingError, match=r"predictor\.pt2 is listed .* but missing"):
        predict_file(copy, run["held_out"], tmp_path / "p.txt", verify="predictor")


def test_collapsing_twice_never_corrupts_the_first_result(run, monkeypatch) -> None:
    cfg, out = run["cfg"], run["tmp"] / "twice"
    collapse_run(cfg.train.run_dir, out, CollapseOptions(chunk_rows=16, quantize="fp32"))
    first = verify_manifest(out)

    def fail(*args, **kwargs):
        raise RuntimeError("injected failure while building the predictor")

    monkeypatch.setattr("mlet_dist.export.finish.build_predictor", fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        collapse_run(cfg.train.run_dir, out, CollapseOptions(chunk_rows=16, quantize="int8"))
    assert verify_manifest(out) == first  # untouched, and still matches its checksums
    monkeypatch.undo()
    collapse_run(cfg.train.run_dir, out, CollapseOptions(chunk_rows=16, quantize="int8"))
    second = verify_manifest(out)
    assert second["serving"]["dtype"] == "int8" and (out / "serving/tables/.metadata").is_file()
    assert sorted(p.name for p in out.parent.iterdir() if "twice" in p.name) == ["twice"]


def test_plain_run_is_refused_clearly_and_exported_when_allowed(tmp_path, capsys) -> None:
    cfg = tiny_run(tmp_path, "--model.inner_dim=0", "--train.max_steps=2")
    out = tmp_path / "served"
    with pytest.raises(CollapseError, match=r"no factorized tables.*--allow-plain"):
        collapse_run(cfg.train.run_dir, out)
    code = cli.main(["collapse", "--run", cfg.train.run_dir, "--out", str(out)])
    assert code == 2 and "no factorized tables" in capsys.readouterr().err
    assert not out.exists()
    report = collapse_run(cfg.train.run_dir, out, CollapseOptions(allow_plain=True))
    assert report["factorized_tables"] == []
    trained = load_unsharded(cfg, latest_checkpoint(cfg.train.run_dir))
    served, _ = load_served(out)
    w1 = trained.model.sparse_arch.embedding_bag_collection.w1.embedding_bags
    for name, bag in served.model.sparse_arch.embedding_bag_collection.embedding_bags.items():
        assert torch.equal(bag.weight, w1[name].weight), name


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_serving_tables_are_torchrecs_quantized_format(dtype) -> None:
    """Our rows in the quantized EBC give exactly what TorchRec's own from_float gives."""
    from torch.ao.quantization import PlaceholderObserver
    from torchrec.modules.embedding_configs import QuantConfig
    from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC

    torch.manual_seed(0)
    tables = [
        EmbeddingBagConfig(name="a", num_embeddings=70, embedding_dim=8, feature_names=["fa"]),
        EmbeddingBagConfig(
            name="b", num_embeddings=33, embedding_dim=16, feature_names=["fb"],
            pooling=PoolingType.MEAN,
        ),
    ]  # fmt: skip
    ebc = EmbeddingBagCollection(tables=tables)
    ebc.qconfig = QuantConfig(
        activation=PlaceholderObserver.with_args(dtype=torch.float),
        weight=PlaceholderObserver.with_args(dtype=torch.qint8 if dtype == "int8" else torch.half),
    )
    reference = QuantEBC.from_float(ebc)
    rows = {}
    for t in tables:
        w = ebc.embedding_bags[t.name].weight.detach()
        # quantized in uneven chunks: row-wise formats do not depend on the chunking
        rows[t.name] = torch.cat([quantize_rows(c, dtype) for c in w.split(9)])
        step = rows[t.name][:, -4:].contiguous().view(torch.float16)[:, :1].float()
        err = (dequantize_rows(rows[t.name], dtype) - w).abs()
        bound = step / 2 if dtype == "int8" else 0.0
        assert bool((err <= bound + 1e-3 * w.abs().amax(1, keepdim=True)).all())
    ours = quant_embedding_bag_collection(tables, rows, dtype)
    lengths = torch.randint(0, 4, (2 * 5,))
    ids = torch.cat([torch.randint(0, t.num_embeddings, (int(n),)) for t, n in zip(tables, lengths.view(2, 5).sum(1))])  # fmt: skip
    kjt = KeyedJaggedTensor(keys=["fa", "fb"], values=ids, lengths=lengths)
    a, b = ours(kjt), reference(kjt)
    for f in ("fa", "fb"):
        assert torch.equal(a[f], b[f]), f


def test_int8_rows_split_over_threads_equal_whole_table_quantization() -> None:
    rows = torch.randn(5000, 16) * torch.logspace(-3, 3, 5000)[:, None]
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # 3 parts of >= 1024 rows
    try:
        got = quantize_rows(rows, "int8")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got, torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(rows, 8))


@pytest.mark.skipif(
    not CRITEO_SAMPLE.exists(), reason=f"{CRITEO_SAMPLE} absent (fresh clone without ../shared)"
)
def test_int8_serving_auc_within_0_001_of_fp32_on_criteo_sample(tmp_path) -> None:
    from mlet_dist.data import load_splits
    from mlet_dist.train import train

    cfg = load_config(
        REPO / "configs/criteo_sample_mlet.toml",
        [
            f"--data.train_files=['{CRITEO_SAMPLE}']",
            f"--train.run_dir={tmp_path / 'run'}",
            "--train.progress=false",
        ],
    )
    init_distributed(cfg.dist)
    metrics = train(cfg)
    held_out = load_splits(cfg.data).test
    labels = torch.from_numpy(held_out.labels)
    auc, probs = {}, {}
    for dtype in ("fp32", "int8"):
        out = tmp_path / f"served_{dtype}"
        collapse_run(
            cfg.train.run_dir, out, CollapseOptions(quantize=dtype, artifacts=("torchscript",))
        )
        for kind in ("export", "torchscript"):
            predictor, manifest = load_predictor(out, kind=kind)
            assert manifest["predictor_used"] == kind
            p = probs[dtype, kind] = predict_arrays(predictor, held_out).double()
            auc[dtype, kind] = binary_metrics(torch.logit(p.clamp(1e-12, 1 - 1e-12)), labels)["auc"]
    for kind in ("export", "torchscript"):
        assert auc["fp32", kind] == pytest.approx(metrics["test"]["auc"], abs=1e-5)
        assert abs(auc["int8", kind] - auc["fp32", kind]) <= 0.001, auc
    for dtype in ("fp32", "int8"):  # the same kernels: the two artifacts agree
        assert (probs[dtype, "export"] - probs[dtype, "torchscript"]).abs().max().item() <= 1e-6
    sizes = json.loads((tmp_path / "served_int8/manifest.json").read_text())["tables"]
    assert [t["rows"] for t in sizes] == cfg.data.num_embeddings_per_feature
