"""The CPU-side preparation of the GPU check: carrying the stack in parts, the scripts, the config.

- ``benchmarks/gpu_bundle.py``: a small ``.tar.xz`` cut into parts, carried over two folders (as
  over two device calls), joined and unpacked gives back every file byte for byte; the
  ``SHA256SUMS`` it writes is checked by coreutils' ``sha256sum -c`` (an independent
  implementation); a missing or damaged part is named and no site directory is left behind.
- ``benchmarks/gpu_check.sh`` (install step only, on a fake bundle) and ``gpu_prepare.sh``: parse
  with ``bash -n``; the install step fills the site directory and writes its summary.
- ``configs/bench_train_gpu.toml``: the Criteo 1TB shape of ``configs/criteo_1tb.toml`` with the
  tables capped at 10M rows, batch >= 16k, and TorchRec's planner fits every variant on one 80 GB
  GPU.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `benchmarks` is a folder of the checkout, not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks import gpu_bundle  # noqa: E402
from benchmarks.common import load_bench_config, variant_config  # noqa: E402

GPU_CONFIG = REPO / "configs" / "bench_train_gpu.toml"


def make_archive(path: Path, seed: int) -> dict[str, bytes]:
    """A ``.tar.xz`` like gpu_prepare.sh's (members under ``site/``); returns its files."""
    rng = __import__("random").Random(seed)
    files = {
        "site/pkg/__init__.py": f"VALUE = {seed}\n".encode(),
        "site/pkg/lib.so": bytes(rng.getrandbits(8) for _ in range(40_000)),  # incompressible
        "site/pkg-1.0.dist-info/METADATA": b"Name: pkg\nVersion: 1.0\n",
    }
    with tarfile.open(path, "w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return files


def assert_site_holds(site: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (site / name.removeprefix("site/")).read_bytes() == data, name


def test_split_then_install_restores_every_file(tmp_path) -> None:
    archive = tmp_path / "stack.tar.xz"
    files = make_archive(archive, seed=1)
    original = archive.read_bytes()
    parts = gpu_bundle.split(archive, tmp_path / "a", 15_000)
    assert len(parts) == -(-len(original) // 15_000) >= 3
    assert all(p.stat().st_size <= 15_000 for p in parts)
    assert b"".join(p.read_bytes() for p in parts) == original
    assert archive.read_bytes() == original  # the archive is only read
    # coreutils agrees with every line of SHA256SUMS (the parts and the archive)
    shutil.copy(archive, tmp_path / "a" / archive.name)
    check = subprocess.run(
        ["sha256sum", "-c", gpu_bundle.SUMS], cwd=tmp_path / "a", capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count(": OK") == len(parts) + 1
    (tmp_path / "a" / archive.name).unlink()
    # half of the parts carried in another folder, as over two device calls
    (tmp_path / "b").mkdir()
    for p in parts[::2]:
        p.rename(tmp_path / "b" / p.name)
    site = gpu_bundle.install([tmp_path / "a", tmp_path / "b"], tmp_path / "site", tmp_path / "w")
    assert_site_holds(site, files)
    stamp = (site / gpu_bundle.STAMP).read_text().strip()
    assert stamp == gpu_bundle.sha256_file(archive)


def test_a_missing_or_damaged_part_is_named_and_no_site_is_made(tmp_path) -> None:
    archive = tmp_path / "stack.tar.xz"
    make_archive(archive, seed=2)
    parts = gpu_bundle.split(archive, tmp_path / "p", 15_000)
    site = tmp_path / "site"
    held = parts[1].read_bytes()
    parts[1].unlink()
    with pytest.raises(gpu_bundle.BundleError, match=rf"parts missing: {parts[1].name}\b"):
        gpu_bundle.install([tmp_path / "p"], site, tmp_path / "w")
    parts[1].write_bytes(held)
    damaged = bytearray(parts[0].read_bytes())
    damaged[100] ^= 0xFF
    parts[0].write_bytes(bytes(damaged))
    with pytest.raises(gpu_bundle.BundleError, match=rf"part .*{parts[0].name} has sha256"):
        gpu_bundle.install([tmp_path / "p"], site, tmp_path / "w")
    assert not site.exists()
    assert not (tmp_path / "w" / archive.name).exists()


def test_install_skips_an_installed_bundle_and_replaces_an_older_one(tmp_path) -> None:
    archive = tmp_path / "stack.tar.xz"
    make_archive(archive, seed=3)
    gpu_bundle.split(archive, tmp_path / "p", 15_000)
    site = gpu_bundle.install([tmp_path / "p"], tmp_path / "site", tmp_path / "w")
    (site / "marker").write_text("kept while the bundle is the same")
    gpu_bundle.install([tmp_path / "p"], site, tmp_path / "w")
    assert (site / "marker").is_file()
    files = make_archive(archive, seed=4)  # a new bundle under the same name
    gpu_bundle.split(archive, tmp_path / "p", 15_000)
    gpu_bundle.install([tmp_path / "p"], site, tmp_path / "w")
    assert not (site / "marker").exists()
    assert_site_holds(site, files)


def test_cli_fails_with_one_line_naming_the_fix(tmp_path, capsys) -> None:
    rc = gpu_bundle.main(["install", "--parts-dir", str(tmp_path), "--site", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert "no SHA256SUMS" in err and "gpu_prepare.sh" in err


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_prepare.sh"])
def test_gpu_scripts_parse(script) -> None:
    done = subprocess.run(["bash", "-n", str(REPO / "benchmarks" / script)], capture_output=True)
    assert done.returncode == 0, done.stderr


def test_gpu_check_install_step_on_a_fake_bundle(tmp_path) -> None:
    """gpu_check.sh's install step (MLET_GPU_STEPS=install) with parts in MLET_GPU_PARTS."""
    archive = tmp_path / "stack.tar.xz"
    files = make_archive(archive, seed=5)
    gpu_bundle.split(archive, tmp_path / "parts", 15_000)
    env = dict(
        os.environ,
        OUT=str(tmp_path / "out"),
        MLET_PYTHON=sys.executable,
        MLET_GPU_PARTS=str(tmp_path / "parts"),
        MLET_GPU_SITE=str(tmp_path / "site"),
        MLET_GPU_STEPS="install",
        MLET_GPU_REHEARSAL="1",
    )
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert_site_holds(tmp_path / "site", files)
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "step install: exit code 0" in summary and "every step passed" in summary


# -- the GPU benchmark config ------------------------------------------------------------------


def test_gpu_bench_config_is_the_criteo_1tb_shape_scaled() -> None:
    import tomllib

    cfg, bench = load_bench_config(GPU_CONFIG)
    ref = tomllib.loads((REPO / "configs" / "criteo_1tb.toml").read_text())
    assert cfg.data.num_embeddings_per_feature == [
        min(n, 10_000_000) for n in ref["data"]["num_embeddings_per_feature"]
    ]
    for key in ("embedding_dim", "inner_dim", "interaction", "dense_arch_layer_sizes"):
        assert getattr(cfg.model, key) == ref["model"][key], key
    assert cfg.model.over_arch_layer_sizes == ref["model"]["over_arch_layer_sizes"]
    assert cfg.data.batch_size >= 16384 and cfg.dist.device == "cuda"
    assert bench.variants == ["mlet", "plain_k", "plain_d"]
    for quick in (False, True):
        cfg, _ = load_bench_config(GPU_CONFIG, quick=quick)
        assert cfg.data.batch_size >= 16384
        for v in bench.variants:
            variant_config(cfg, v)  # validates


@pytest.mark.parametrize("variant", ["mlet", "plain_k", "plain_d"])
def test_gpu_bench_config_fits_one_80gb_gpu(variant) -> None:
    """TorchRec's planner (dry run, no tables allocated) places every table on the one GPU
    within the config's HBM cap, with FUSED kernels."""
    from mlet_dist.distributed.planning import dry_run

    cfg, _ = load_bench_config(GPU_CONFIG)
    vcfg = variant_config(cfg, variant)
    report = dry_run(vcfg, 1, "cuda")
    (rank,) = report["ranks"]
    cap = vcfg.dist.hbm_cap_gb * 1024**3
    assert 0 < rank["training_bytes"] < cap
    assert 0 < rank["planner_hbm_bytes"] <= cap
    w1_cols = vcfg.model.inner_dim or vcfg.model.embedding_dim
    assert rank["training_bytes"] >= sum(vcfg.data.num_embeddings_per_feature) * w1_cols * 4
