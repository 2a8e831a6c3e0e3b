"""The CUDA path, on one GPU (world size 1, nccl): run by ``benchmarks/gpu_check.sh``.

Every test here is marked ``cuda`` and skips without a CUDA device, so CI (CPU only) reports them
as skipped. The oracles are those of the CPU tests, reused:

- sharded training on CUDA vs the unsharded CPU model, step by step (logits, loss, dense
  gradients, W1 / W2 / MLP weights after each optimizer step), for table_wise, row_wise,
  column_wise (min_partition below k), SGD and the uniform-k fast path
  (:func:`test_sharding.check_against_oracle`);
- the collapse of CUDA shards equals W1 @ W2 computed in float64 from the unsharded factors, and
  its int8 rows equal fbgemm's (CUDA) quantization of the whole table
  (:func:`test_collapse_dist.check_collapsed_tables`);
- a run trained on CUDA, collapsed on CUDA: the CPU TorchScript predictor (in a process that
  imports neither mlet_dist nor torchrec) gives the probabilities of the trained checkpoint loaded
  unsharded on CPU, which equal those of the sharded CUDA model.

Multi-rank NCCL needs one GPU per rank; the multi-rank cases stay on gloo (the CPU tests). The
cases run in one spawned rank process (``dist_utils.run_ranks``, world size 1) that creates its
own nccl group, so the gloo group other test modules create in this process does not matter;
one process runs all three parts, paying the start-up (torch, TorchRec, CUDA, NCCL) once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import pytest
import test_collapse_dist as collapse_tests
import test_serving as serving_tests
import test_sharding as sharding_tests
import torch
from dist_utils import run_ranks

from mlet_dist.config import DistConfig
from mlet_dist.data import read_criteo_tsv
from mlet_dist.distributed.parallelize import init_distributed
from mlet_dist.serving import verify_manifest
from mlet_dist.serving.predict import serving_inputs

# MLET_CUDA_TESTS_DEVICE=cpu runs the same tests at world size 1 on CPU (gloo): a rehearsal of
# their logic on a machine without a GPU. Unset, they need CUDA.
DEVICE = os.environ.get("MLET_CUDA_TESTS_DEVICE", "cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
    ),
]

# One GPU: world size 1. The cases whose plan exists on one rank (column_wise still splits the
# columns into several shards on that rank when min_partition is below k).
SHARDING_CASES = [
    c
    for c in sharding_tests.CASES
    if c.name in ("table_wise", "row_wise", "column_wise", "row_wise_sgd", "table_wise_uniform")
]
COLLAPSE_CASES = [
    c for c in collapse_tests.CASES if c.name in ("table_wise", "row_wise", "column_wise")
]


# -- the spawned rank (world size 1, nccl): everything in one process, to pay start-up once ------


def _guarded(fn, *args) -> Any:
    """``fn(*args)``, or ``{"error": traceback}``: one failing part must not hide the others."""
    try:
        return fn(*args)
    except Exception:
        return {"error": traceback.format_exc()}


def _collapse_cases() -> dict[str, Any]:
    env = init_distributed(DistConfig(device=DEVICE))
    return {c.name: _guarded(collapse_tests._kernel_case, c, env) for c in COLLAPSE_CASES}


def _train_collapse(tmp: str) -> dict[str, Any]:
    """Trains the tiny serving run on CUDA, collapses it on CUDA (fp32 and int8), and scores the
    held-out rows with the sharded CUDA model (weights of the run's checkpoint)."""
    from mlet_dist.checkpoint import latest_checkpoint, read_train_state
    from mlet_dist.export import CollapseOptions, collapse_run
    from mlet_dist.train import Trainer

    env = init_distributed(DistConfig(device=DEVICE))  # the group the run then joins
    tmp_path = Path(tmp)
    cfg = serving_tests.tiny_run(tmp_path, f"--dist.device={DEVICE}")
    ckpt = latest_checkpoint(cfg.train.run_dir)
    reports = {
        q: collapse_run(
            cfg.train.run_dir, tmp_path / f"served_{q}", CollapseOptions(chunk_rows=16, quantize=q)
        )
        for q in ("fp32", "int8")
    }
    held_out = serving_tests.write_criteo_tsv(tmp_path / "held_out.tsv", 150, seed=1)
    trainer = Trainer(cfg, env)
    trainer.load(ckpt, optimizer=False)
    logits, _ = trainer.predict(read_criteo_tsv(held_out, serving_tests.SIZES))
    return {
        "cfg": cfg,
        "checkpoint_device": read_train_state(ckpt)["device"],
        "reports": reports,
        "held_out": str(held_out),
        "cuda_probabilities": torch.sigmoid(logits.float().cpu()),
    }


def _rank_main(tmp: str) -> dict[str, Any]:
    return {
        "sharding": _guarded(sharding_tests._run_cases, SHARDING_CASES, DEVICE),
        "collapse": _guarded(_collapse_cases),
        "train": _guarded(_train_collapse, tmp),
    }


@pytest.fixture(scope="module")
def on_rank(tmp_path_factory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("cuda_run")
    (result,) = run_ranks(_rank_main, 1, str(tmp), timeout=300)
    result["tmp"] = tmp
    return result


def _part(on_rank: dict[str, Any], name: str) -> Any:
    part = on_rank[name]
    if "error" in part:
        pytest.fail(f"the {name} part failed on the rank:\n{part['error']}")
    return part


# -- the tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", SHARDING_CASES, ids=[c.name for c in SHARDING_CASES])
def test_cuda_sharded_training_matches_unsharded(case, on_rank) -> None:
    sharding_tests.check_against_oracle(case, [_part(on_rank, "sharding")[case.name]])


@pytest.mark.parametrize("case", COLLAPSE_CASES, ids=[c.name for c in COLLAPSE_CASES])
def test_cuda_collapse_equals_float64_product(case, on_rank) -> None:
    got = _part(on_rank, "collapse")[case.name]
    collapse_tests.check_collapsed_tables(case, [got], quant_device=DEVICE)


def test_cuda_train_collapse_predict(on_rank, tmp_path) -> None:
    run = _part(on_rank, "train")
    cfg = run["cfg"]
    assert run["checkpoint_device"] == DEVICE
    for q, report in run["reports"].items():
        assert report["serving_dtype"] == q and len(report["factorized_tables"]) == 26
    arrays = read_criteo_tsv(run["held_out"], serving_tests.SIZES)
    # the checkpoint written on CUDA, loaded unsharded on CPU: what the sharded CUDA model gave
    expected = serving_tests.trained_probabilities(cfg, arrays)
    cuda = run["cuda_probabilities"]
    assert cuda.shape == expected.shape == (150,)
    assert (cuda - expected).abs().max().item() <= 1e-5
    # the fp32 predictor collapsed on CUDA, in a process without mlet_dist and torchrec
    served = on_rank["tmp"] / "served_fp32"
    torch.save(serving_inputs(arrays), tmp_path / "inputs.pt")
    subprocess.run(
        [
            sys.executable, "-c", serving_tests._PLAIN_PROCESS,
            str(served / "serving/predictor.pt"), str(tmp_path / "inputs.pt"),
            str(tmp_path / "out.pt"),
        ],
        check=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    got = torch.load(tmp_path / "out.pt")
    assert (got - expected).abs().max().item() <= 1e-5
    # the int8 serving directory written on CUDA: complete, every checksum right
    manifest = verify_manifest(on_rank["tmp"] / "served_int8")
    assert {t["dtype"] for t in manifest["tables"]} == {"int8"}
