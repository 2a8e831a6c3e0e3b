"""The serving handoff on one process: predictor, formats, manifest, predict, atomic collapse.

Oracles: the trained (unsharded) MLET model's own predictions; TorchRec's own quantization path
(``QuantEmbeddingBagCollection.from_float``) for the table formats; checksums recomputed here.
The predictor is loaded in a fresh interpreter that imports neither mlet_dist nor torchrec.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mlet_dist import cli
from mlet_dist.checkpoint import latest_checkpoint
from mlet_dist.config import DistConfig, load_config
from mlet_dist.data import CriteoArrays, make_batches, read_criteo_tsv
from mlet_dist.distributed.parallelize import init_distributed
from mlet_dist.export import CollapseError, collapse_run, load_served, load_unsharded
from mlet_dist.metrics import binary_metrics
from mlet_dist.serving import ServingError, verify_manifest
from mlet_dist.serving.predict import load_predictor, predict_arrays, predict_file, serving_inputs
from mlet_dist.serving.predictor import quant_embedding_bag_collection
from mlet_dist.serving.quantize import dequantize_rows, quantize_rows

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
    collapse_run(cfg.train.run_dir, served, chunk_rows=16, quantize="fp32")
    return {"cfg": cfg, "tmp": tmp, "held_out": held_out, "served": served}


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
    assert code == 1 and victim.name in capsys.readouterr().err
    (copy / "serving/predictor.pt").unlink()
    with pytest.raises(ServingError, match="predictor.pt is listed .* but missing"):
        predict_file(copy, run["held_out"], tmp_path / "p.txt", verify="predictor")


def test_collapsing_twice_never_corrupts_the_first_result(run, monkeypatch) -> None:
    cfg, out = run["cfg"], run["tmp"] / "twice"
    collapse_run(cfg.train.run_dir, out, chunk_rows=16, quantize="fp32")
    first = verify_manifest(out)

    def fail(*args, **kwargs):
        raise RuntimeError("injected failure while building the predictor")

    monkeypatch.setattr("mlet_dist.export.build_predictor", fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        collapse_run(cfg.train.run_dir, out, chunk_rows=16, quantize="int8")
    assert verify_manifest(out) == first  # untouched, and still matches its checksums
    monkeypatch.undo()
    collapse_run(cfg.train.run_dir, out, chunk_rows=16, quantize="int8")
    second = verify_manifest(out)
    assert second["serving"]["dtype"] == "int8" and (out / "serving/tables/.metadata").is_file()
    assert sorted(p.name for p in out.parent.iterdir() if "twice" in p.name) == ["twice"]


def test_plain_run_is_refused_clearly_and_exported_when_allowed(tmp_path, capsys) -> None:
    cfg = tiny_run(tmp_path, "--model.inner_dim=0", "--train.max_steps=2")
    out = tmp_path / "served"
    with pytest.raises(CollapseError, match=r"no factorized tables.*--allow-plain"):
        collapse_run(cfg.train.run_dir, out)
    code = cli.main(["collapse", "--run", cfg.train.run_dir, "--out", str(out)])
    assert code == 1 and "no factorized tables" in capsys.readouterr().err
    assert not out.exists()
    report = collapse_run(cfg.train.run_dir, out, allow_plain=True)
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
    from mlet_dist.train import load_splits, train

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
    auc = {}
    for dtype in ("fp32", "int8"):
        out = tmp_path / f"served_{dtype}"
        collapse_run(cfg.train.run_dir, out, quantize=dtype)
        predictor, _ = load_predictor(out)
        p = predict_arrays(predictor, held_out).double()
        auc[dtype] = binary_metrics(torch.logit(p.clamp(1e-12, 1 - 1e-12)), labels)["auc"]
    assert auc["fp32"] == pytest.approx(metrics["test"]["auc"], abs=1e-5)
    assert abs(auc["int8"] - auc["fp32"]) <= 0.001, auc
    sizes = json.loads((tmp_path / "served_int8/manifest.json").read_text())["tables"]
    assert [t["rows"] for t in sizes] == cfg.data.num_embeddings_per_feature
