"""End to end through the real launcher: ``torchrun --nproc-per-node 2 -m mlet_dist train``.

A tiny synthetic Criteo-format day file and a TOML config are written into tmp_path; two gloo
ranks train with row-wise sharded tables (every table split across both ranks), evaluate and
checkpoint. Checked: exit code 0, rank 0's metrics.json with the eval AUC over every held-out
row, a complete 2-rank checkpoint, INFO logs from rank 0 only; then ``mlet-dist collapse`` in
one process turns that 2-rank checkpoint into a served model that predicts what the trained one
does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlet_dist.checkpoint import latest_checkpoint, read_train_state
from mlet_dist.config import load_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SIZES = [40] * 26

CONFIG = """\
[data]
source = "synthetic"
dir = "{data}"
num_embeddings_per_feature = {sizes}
eval_fraction = 0.1
batch_size = 32
eval_batch_size = 16

[synthetic]
days = 1
rows_per_day = 410
cardinalities = {sizes}
gzip = false

[model]
embedding_dim = 8
inner_dim = 16
dense_arch_layer_sizes = [16, 8]
over_arch_layer_sizes = [16, 1]

[train]
epochs = 2
log_every = 4
run_dir = "{run}"
progress = false

[dist]
device = "cpu"
sharding_types = ["row_wise"]
"""


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.pop("MLET_LOG_ALL_RANKS", None)
    return env


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


def test_torchrun_two_ranks_train_then_collapse(tmp_path):
    from mlet_dist.data import generate_synthetic, load_splits
    from mlet_dist.workflow import check_collapsed

    run_dir, data_dir = tmp_path / "run", tmp_path / "data"
    config_file = tmp_path / "tiny.toml"
    config_file.write_text(CONFIG.format(data=data_dir, run=run_dir, sizes=SIZES))
    cfg = load_config(config_file, [])
    generate_synthetic(data_dir, cfg.synthetic, progress=False)
    splits = load_splits(cfg.data)
    assert len(splits.eval) % 2 == 1  # one row is left over by the 2-rank split: still evaluated

    proc = _run(
        [
            "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "mlet_dist", "train", "--config", str(config_file),
        ],
        timeout=240,
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, out[-6000:]
    assert "[rank0] INFO" in out, out[-6000:]
    assert "[rank1] INFO" not in out, out[-6000:]

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["train"]["steps"] == 2 * (len(splits.train) // 32)
    assert metrics["eval"]["rows"] == len(splits.eval)
    assert 0.0 <= metrics["eval"]["auc"] <= 1.0

    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None and (ckpt / ".metadata").is_file()
    assert {p.name for p in ckpt.glob("*.distcp")} >= {"__0_0.distcp", "__1_0.distcp"}
    state = read_train_state(ckpt)
    assert state["world_size"] == 2 and state["step"] == metrics["train"]["steps"]
    for table in state["sharding"].values():
        assert table["sharding_type"] == "row_wise"
        assert {shard[-1] for shard in table["shards"]} == {0, 1}
    assert not list((run_dir / "checkpoints").glob("*.tmp*"))

    served = tmp_path / "served"
    proc = _run(["-m", "mlet_dist", "collapse", "--run", str(run_dir), "--out", str(served)], 120)
    assert proc.returncode == 0, proc.stdout[-6000:]
    report = json.loads((served / "collapse_report.json").read_text())
    assert len(report["factorized_tables"]) == 26
    assert report["source_checkpoint"] == ckpt.name
    check = check_collapsed(run_dir, served, splits.eval)
    assert check["passed"], check
