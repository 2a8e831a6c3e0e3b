"""Sharded checkpoints and evaluation at world size 2 (gloo on CPU) vs 1 rank.

For table_wise and row_wise W1 tables:

- exact continuation: an uninterrupted 2-rank run of N steps vs N/2 steps + resume to N gives the
  same loss at every step after the restart and bit-identical final state (W1, W2, MLPs and the
  optimizer state, read back unsharded from the checkpoints);
- resharding 2 -> 1 and 1 -> 2: the resumed state, gathered to full tensors, equals the saved
  state (parameters and fused optimizer state, e.g. row-wise Adagrad ``momentum1``), and the next
  step's loss on the full global batch equals the mean of the saved world size's per-rank losses.

For column_wise (min_partition below k, so columns really split): same world size and plan
resume exactly; another world size or plan is refused with a CheckpointError naming the tables,
both world sizes and the fix (TorchRec cannot reshard that fused optimizer state). Also: a
changed model config is refused on 2 ranks, and 2-rank evaluation gathers every row (the leftover
rows of the final partial batch included) in row order, equal to a single-process forward.

All the 2-rank work runs in one spawn (a module-scoped fixture, ~10 s of start-up paid once); the
1-rank runs happen in this process before and after it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from dist_utils import run_ranks
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from mlet_dist.checkpoint import CheckpointError, latest_checkpoint, read_train_state
from mlet_dist.config import load_config
from mlet_dist.data import CriteoArrays, make_batches
from mlet_dist.distributed.parallelize import init_distributed
from mlet_dist.export import load_unsharded

pytestmark = pytest.mark.slow

SIZES = [50] * 26
TRAIN_ROWS, EVAL_ROWS = 224, 61  # 7 batches of 32 per epoch; 61 = 3 * 16 + 13 (odd tail)
BATCH, EVAL_BATCH = 32, 16
N, HALF = 10, 5  # the continuation crosses the epoch boundary at step 7
RESHARDABLE = ["table_wise", "row_wise"]
COLUMN = ["column_wise", "--dist.min_partition=8"]  # k = 32 -> 4 column shards of 8


def rows() -> CriteoArrays:
    rng = np.random.default_rng(7)
    n = TRAIN_ROWS + EVAL_ROWS
    return CriteoArrays(
        labels=rng.integers(0, 2, n).astype(np.float32),
        dense=rng.random((n, 13)).astype(np.float32),
        sparse=rng.integers(0, 50, (n, 26)).astype(np.int64),
    )


def splits(_data_cfg=None, _schema=None):
    from mlet_dist.data import Splits

    r = rows()
    n = TRAIN_ROWS + EVAL_ROWS
    return Splits(r.slice(0, TRAIN_ROWS), r.slice(TRAIN_ROWS, n), r.slice(n, n))


def config(run_dir: Path, sharding: str, *extra: str):
    return load_config(
        None,
        [
            f"--data.num_embeddings_per_feature={SIZES}",
            f"--data.batch_size={BATCH}",
            f"--data.eval_batch_size={EVAL_BATCH}",
            "--model.embedding_dim=8",
            "--model.inner_dim=32",
            "--model.dense_arch_layer_sizes=[16, 8]",
            "--model.over_arch_layer_sizes=[16, 1]",
            "--optim.warmup_steps=8",  # the LR still changes at the restart (step 5)
            "--train.epochs=3",
            "--train.log_every=1",
            "--train.progress=false",
            "--dist.device='cpu'",
            f"--dist.sharding_types=['{sharding}']",
            f"--train.run_dir={run_dir}",
            *extra,
        ],
    )


def full_tensors(state: Any) -> dict[str, torch.Tensor]:
    """A nested state dict flattened to ``a.b.c -> tensor``, sharded tensors assembled in full.

    Collective under a process group of several ranks (each rank may hold other keys: the fused
    optimizer state of a table exists only on the ranks that hold its shards); every rank gets
    the whole result.
    """
    local: dict[str, Any] = {}
    for key, value in _flatten(state).items():
        if isinstance(value, ShardedTensor):
            shards = [
                (s.metadata.shard_offsets, s.tensor.detach().clone()) for s in value.local_shards()
            ]
            local[key] = (tuple(value.size()), value.dtype, shards)
        elif isinstance(value, torch.Tensor):
            local[key] = value.detach().clone()
    parts = [local]
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
    out: dict[str, torch.Tensor] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, torch.Tensor):
                out.setdefault(key, value)
                continue
            size, dtype, shards = value
            full = out.setdefault(key, torch.full(size, float("nan"), dtype=dtype))
            for offsets, t in shards:
                full[tuple(slice(o, o + n) for o, n in zip(offsets, t.shape))] = t
    for key, value in out.items():
        assert not value.is_floating_point() or not value.isnan().any(), f"{key}: not covered"
    return out


def _flatten(state: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(state, dict):
        out: dict[str, Any] = {}
        for k, v in state.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: state}


def saved_tensors(checkpoint: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """Everything a DCP checkpoint holds, read back as full tensors (no model needed)."""
    out = tmp / f"{checkpoint.parent.parent.name}_{checkpoint.name}.pt"
    dcp_to_torch_save(str(checkpoint), str(out))
    return full_tensors(torch.load(out, weights_only=False))


def copy_checkpoint(checkpoint: Path, run_dir: Path) -> None:
    """Makes ``checkpoint`` the only (latest) checkpoint of a new run directory."""
    dest = run_dir / "checkpoints" / checkpoint.name
    dest.parent.mkdir(parents=True)
    shutil.copytree(checkpoint, dest)


def curve(metrics: dict[str, Any]) -> dict[int, float]:
    return {int(s): v for s, v in metrics["train"]["loss_curve"]}


# -- the 2-rank side (one spawn) -------------------------------------------------------------


def _two_rank_job(root: str) -> dict[str, Any]:
    import mlet_dist.train.run as T

    T.load_splits = splits  # the rows of this test instead of files
    root_p = Path(root)
    env = init_distributed(config(root_p, "table_wise").dist)
    out: dict[str, Any] = {}

    def copy_on_rank0(src: Path, dst: Path) -> None:
        if env.rank == 0:
            copy_checkpoint(src, dst)
        dist.barrier()

    for sharding, *extra in [[s] for s in RESHARDABLE] + [COLUMN]:
        d = root_p / sharding
        res: dict[str, Any] = {}
        res["full"] = T.train(config(d / "w2_full", sharding, f"--train.max_steps={N}", *extra))
        T.train(config(d / "w2_part", sharding, f"--train.max_steps={HALF}", *extra))
        copy_on_rank0(latest_checkpoint(d / "w2_part"), d / "w2_to_w1")
        res["resumed"] = T.train(config(d / "w2_part", sharding, f"--train.max_steps={N}", *extra))
        if sharding in RESHARDABLE:  # 1 -> 2: the checkpoint was written by this test's process
            trainer = T.Trainer(config(d / "w1_to_w2", sharding, f"--train.max_steps={N}"), env)
            trainer.load(latest_checkpoint(d / "w1_to_w2"))
            res["loaded_state"] = full_tensors(trainer.state())
            res["continued"] = {"train": trainer.fit(splits().train)}
        out[sharding] = res

    # column_wise under another plan on the same world size: refused
    trainer = T.Trainer(config(root_p / "cw_as_tw", "table_wise"), env)
    try:
        trainer.load(latest_checkpoint(root_p / "column_wise" / "w2_to_w1"))
        out["cw_other_plan"] = "loaded"
    except CheckpointError as e:
        out["cw_other_plan"] = str(e)
    # a changed model config: refused naming the key
    trainer = T.Trainer(config(root_p / "changed", "table_wise", "--model.inner_dim=16"), env)
    try:
        trainer.load(latest_checkpoint(root_p / "table_wise" / "w2_part"))
        out["changed_model"] = "loaded"
    except CheckpointError as e:
        out["changed_model"] = str(e)
    # evaluation of a 2-rank checkpoint on 2 ranks
    cfg = config(root_p / "table_wise" / "w2_full", "row_wise")
    trainer = T.Trainer(cfg, env)
    trainer.load(latest_checkpoint(cfg.train.run_dir), optimizer=False)
    out["predict"] = trainer.predict(splits().eval)
    out["evaluate"] = trainer.evaluate(splits().eval)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt_dist")
    from mlet_dist.train import train

    one_rank = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("mlet_dist.train.run.load_splits", splits)
        for sharding in RESHARDABLE:
            d = root / sharding
            m = train(
                config(
                    d / "w1_full", sharding, f"--train.max_steps={N}", "--train.checkpoint_every=5"
                )
            )
            one_rank[sharding] = m
            copy_checkpoint(d / "w1_full" / "checkpoints" / f"step_{HALF:08d}", d / "w1_to_w2")
    two_rank = run_ranks(_two_rank_job, 2, str(root), timeout=300)
    return {"root": root, "one_rank": one_rank, "rank0": two_rank[0], "ranks": two_rank}


def global_curve(ranks: list[dict[str, Any]], sharding: str, which: str) -> dict[int, float]:
    """The loss of each global batch: the mean of the ranks' losses on their halves."""
    curves = [curve(r[sharding][which]) for r in ranks]
    return {s: sum(c[s] for c in curves) / len(curves) for s in curves[0]}


# -- exact continuation on the same world size ------------------------------------------------


@pytest.mark.parametrize("sharding", [*RESHARDABLE, "column_wise"])
def test_resume_on_same_world_size_continues_exactly(runs, sharding, tmp_path):
    for rank_out in runs["ranks"]:
        res = rank_out[sharding]
        assert res["resumed"]["train"]["steps_this_run"] == N - HALF
        full, resumed = curve(res["full"]), curve(res["resumed"])
        assert sorted(resumed) == list(range(HALF + 1, N + 1))
        for step, loss in resumed.items():
            assert loss == full[step], (sharding, step)  # bit-identical continuation
    d = runs["root"] / sharding
    a = saved_tensors(latest_checkpoint(d / "w2_full"), tmp_path)
    b = saved_tensors(latest_checkpoint(d / "w2_part"), tmp_path)
    assert a.keys() == b.keys()
    w1 = [k for k in a if k.startswith("model.") and ".w1." in k]
    assert len(w1) == 26 and any(k.startswith("optim.") and "momentum1" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    state = read_train_state(latest_checkpoint(d / "w2_part"))
    assert state["world_size"] == 2 and state["step"] == N
    assert {s["sharding_type"] for s in state["sharding"].values()} == {sharding}


# -- resharding 2 -> 1 and 1 -> 2 -------------------------------------------------------------


def assert_same_state(loaded: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
    assert loaded.keys() == saved.keys()
    for k in saved:
        assert loaded[k].shape == saved[k].shape, k
        assert torch.equal(loaded[k], saved[k]), k
    assert sum("momentum1" in k for k in saved) == 26


@pytest.mark.parametrize("sharding", RESHARDABLE)
def test_reshard_two_ranks_to_one(runs, sharding, tmp_path, monkeypatch):
    from mlet_dist.train import Trainer

    monkeypatch.setattr("mlet_dist.train.run.load_splits", splits)
    run_dir = runs["root"] / sharding / "w2_to_w1"
    ckpt = latest_checkpoint(run_dir)
    assert read_train_state(ckpt)["world_size"] == 2
    cfg = config(run_dir, sharding, f"--train.max_steps={N}")
    trainer = Trainer(cfg, init_distributed(cfg.dist))
    assert trainer.env.world_size == 1
    trainer.load(ckpt)
    assert trainer.step == HALF
    assert_same_state(full_tensors(trainer.state()), saved_tensors(ckpt, tmp_path))
    after = curve({"train": trainer.fit(splits().train)})
    uninterrupted = global_curve(runs["ranks"], sharding, "full")
    assert after[HALF + 1] == pytest.approx(uninterrupted[HALF + 1], abs=1e-6, rel=0)
    for step in range(HALF + 2, N + 1):  # reduction order differs: ~1e-7 apart
        assert after[step] == pytest.approx(uninterrupted[step], abs=1e-5), step


@pytest.mark.parametrize("sharding", RESHARDABLE)
def test_reshard_one_rank_to_two(runs, sharding, tmp_path):
    ckpt = latest_checkpoint(runs["root"] / sharding / "w1_to_w2")
    assert read_train_state(ckpt)["world_size"] == 1
    assert_same_state(runs["rank0"][sharding]["loaded_state"], saved_tensors(ckpt, tmp_path))
    after = global_curve(runs["ranks"], sharding, "continued")
    uninterrupted = curve(runs["one_rank"][sharding])
    assert after[HALF + 1] == pytest.approx(uninterrupted[HALF + 1], abs=1e-6, rel=0)
    for step in range(HALF + 2, N + 1):
        assert after[step] == pytest.approx(uninterrupted[step], abs=1e-5), step


# -- column_wise: same world size and plan only -----------------------------------------------


def test_column_wise_checkpoint_really_splits_columns(runs):
    state = read_train_state(latest_checkpoint(runs["root"] / "column_wise" / "w2_to_w1"))
    for table in state["sharding"].values():
        assert table["sharding_type"] == "column_wise"
        assert len(table["shards"]) > 1 and {s[-1] for s in table["shards"]} == {0, 1}


def test_column_wise_resume_on_other_world_size_is_refused(runs, monkeypatch, tmp_path):
    from mlet_dist.train import Trainer

    monkeypatch.setattr("mlet_dist.train.run.load_splits", splits)
    run_dir = runs["root"] / "column_wise" / "w2_to_w1"
    cfg = config(run_dir, *COLUMN)
    trainer = Trainer(cfg, init_distributed(cfg.dist))
    with pytest.raises(CheckpointError) as err:
        trainer.load(latest_checkpoint(run_dir))
    msg = str(err.value)
    assert "world size 2" in msg and "world size 1" in msg
    assert "t_cat_0 (column_wise, 4 shard(s) on rank(s) [0, 1] in the checkpoint" in msg
    assert "resume on 2 rank(s)" in msg and "['table_wise'] or ['row_wise']" in msg
    # the weights alone still load on 1 rank (evaluation)
    trainer.load(latest_checkpoint(run_dir), optimizer=False)
    saved = saved_tensors(latest_checkpoint(run_dir), tmp_path)
    loaded = full_tensors({"model": trainer.model.state_dict()})
    assert loaded.keys() == {k for k in saved if k.startswith("model.")}
    for k, v in loaded.items():
        assert torch.equal(v, saved[k]), k


def test_column_wise_resume_under_other_plan_is_refused(runs):
    msg = runs["rank0"]["cw_other_plan"]
    assert msg != "loaded"
    assert "t_cat_0 (column_wise, 4 shard(s) on rank(s) [0, 1] in the checkpoint, table_wise" in msg
    assert "world size 2, this job has world size 2" in msg


def test_changed_model_config_is_refused_on_two_ranks(runs):
    assert "model.inner_dim: checkpoint 32 != config 16" in runs["rank0"]["changed_model"]
    assert "model.inner_dim" in runs["ranks"][1]["changed_model"]


# -- evaluation on 2 ranks --------------------------------------------------------------------


def test_two_rank_predictions_cover_every_row_in_order(runs):
    held = splits().eval
    logits, labels = runs["rank0"]["predict"]
    assert len(held) % 2 == 1 and logits.shape == (len(held),)  # the leftover row included
    assert torch.equal(labels, torch.from_numpy(held.labels))
    assert torch.equal(runs["ranks"][1]["predict"][0], logits)  # every rank gets all of them
    assert runs["rank0"]["evaluate"]["rows"] == len(held)
    cfg = config(runs["root"] / "table_wise" / "w2_full", "table_wise")
    model = load_unsharded(cfg, latest_checkpoint(cfg.train.run_dir)).eval()
    with torch.no_grad():
        expected = torch.cat(
            [model(b)[1][1] for b in make_batches(held, len(held), shuffle=False, seed=0)]
        )
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=1e-6)


def test_predict_pads_the_leftover_rows(monkeypatch):
    """Unit check of the padding with a fake 3-rank gather (no processes needed)."""
    from mlet_dist.distributed.parallelize import DistEnv
    from mlet_dist.train import predict

    class RowModel(torch.nn.Module):  # logit = the row's first dense feature
        def forward(self, batch):
            x = batch.dense_features[:, 0]
            return x.sum(), (x.sum(), x, batch.labels)

    world, n = 3, 23  # 23 = 2 * 9 + 5: each rank gets 3 + 1 rows, 2 rows are left over
    data = rows().slice(0, n)
    model = RowModel()

    def fake_gather(out, local):
        # rank r's share of the same batches: recompute it as the real rank would
        for r in range(world):
            env_r = DistEnv(r, world, r, world, torch.device("cpu"), "gloo")
            batches = real_batches(current["arrays"], current["bs"], env_r)
            out[r] = E.local_predictions(model, batches, env_r)

    current: dict[str, Any] = {}
    import mlet_dist.train.evaluation as E

    real_batches = E.array_batches

    def spy(arrays, batch_size, env):
        current.update(arrays=arrays, bs=batch_size)
        return real_batches(arrays, batch_size, env)

    monkeypatch.setattr(E, "array_batches", spy)
    monkeypatch.setattr(E.dist, "all_gather_object", fake_gather)
    env = DistEnv(0, world, 0, world, torch.device("cpu"), "gloo")
    logits, labels = predict(model, data, 9, env)
    assert torch.equal(logits, torch.from_numpy(data.dense[:, 0]))
    assert torch.equal(labels, torch.from_numpy(data.labels))
