"""The training pipeline (``train.pipeline``), RecMetrics and TensorBoard, at world size 2 and 1.

Oracles:

- TorchRec's ``TrainPipelineSparseDist`` and the plain loop (``base``) give bit-identical losses
  and weights after N steps on 2 gloo ranks (same batches, same order; the N steps cross an
  epoch boundary);
- validation during training (``train.eval_every``: the pipeline detaches and re-attaches its
  model) leaves the training bit-identical; evaluation through TorchRec's eval pipeline gives
  the metrics of plain forwards, per id-frequency bucket too (each prediction paired with its
  batch's ids), with an odd tail of rows;
- a checkpoint written mid-epoch while the pipeline holds later batches in flight resumes
  bit-identically to the uninterrupted run (the saved data position is the batch trained);
- a stop signal on one rank between agreements (``train.sync_every``) stops both ranks at the
  next agreement step with a checkpoint of that step; a non-finite loss on one rank between
  agreements stops both ranks there naming the step and writes nothing;
- TorchRec's RecMetrics AUC / NE / calibration over 2 ranks equal :func:`binary_metrics` of all
  ranks' predictions gathered;
- the TensorBoard event files (read back with tensorboard's event reader) hold every listed
  scalar; the loss equals ``loss_curve.jsonl``, the LRs equal base LR x the schedule, the
  validation AUC equals ``metrics.json``'s validation entries;
- ``train.tensorboard = true`` alone shows AUC: RecMetrics every ``AUTO_METRICS_EVERY`` steps and
  at the last step (window AUC over the last N steps' rows, NE since the previous point and
  lifetime, each equal to :func:`binary_metrics` of the steps' predictions recorded on the side)
  and the final evaluation's AUC (``metrics.json``'s ``eval``) at the last step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from dist_utils import run_ranks
from test_checkpoint_dist import full_tensors

from mlet_dist.checkpoint import list_checkpoints
from mlet_dist.config import load_config
from mlet_dist.data import CriteoArrays, Splits
from mlet_dist.distributed.elastic import TrainingGuard, TrainingStopped
from mlet_dist.distributed.parallelize import init_distributed
from mlet_dist.metrics import binary_metrics
from mlet_dist.optim import lr_lambda, w1_learning_rate

pytestmark = pytest.mark.slow

SIZES = [50] * 26
TRAIN_ROWS, EVAL_ROWS, BATCH = 224, 64, 32  # 7 batches per epoch
N, HALF = 10, 5  # N crosses the epoch boundary; HALF is mid-epoch


def rows(n: int = TRAIN_ROWS + EVAL_ROWS, seed: int = 11) -> CriteoArrays:
    rng = np.random.default_rng(seed)
    return CriteoArrays(
        labels=rng.integers(0, 2, n).astype(np.float32),
        dense=rng.random((n, 13)).astype(np.float32),
        sparse=rng.integers(0, 50, (n, 26)).astype(np.int64),
    )


def config(run_dir: Path, *extra: str):
    return load_config(
        None,
        [
            f"--data.num_embeddings_per_feature={SIZES}",
            f"--data.batch_size={BATCH}",
            "--data.eval_batch_size=16",
            "--model.embedding_dim=8",
            "--model.inner_dim=32",
            "--model.dense_arch_layer_sizes=[16, 8]",
            "--model.over_arch_layer_sizes=[16, 1]",
            "--optim.warmup_steps=8",
            "--train.epochs=2",
            "--train.log_every=1",
            "--train.progress=false",
            "--dist.device='cpu'",
            "--dist.sharding_types=['row_wise']",
            f"--train.run_dir={run_dir}",
            *extra,
        ],
    )


def _fit(cfg, env, data, load: Path | None = None, validate=None) -> dict[str, Any]:
    from mlet_dist.train import Trainer

    trainer = Trainer(cfg, env)
    if load is not None:
        trainer.load(load)
    stats = trainer.fit(data, validate=validate)
    return {
        "curve": dict(map(tuple, stats["loss_curve"])),
        "state": full_tensors(trainer.state()),
        "pipelined": stats["pipelined_modules"],
    }


def _stop_step(cfg, env, data) -> int | str:
    from mlet_dist.train import Trainer

    try:
        Trainer(cfg, env).fit(data)
    except TrainingStopped as e:
        return e.step
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "not stopped"


def _two_rank_job(root: str) -> dict[str, Any]:
    from mlet_dist.train import Trainer

    root_p = Path(root)
    env = init_distributed(config(root_p).dist)
    all_rows = rows()
    data, held_out = all_rows.slice(0, TRAIN_ROWS), all_rows.slice(TRAIN_ROWS, len(all_rows))
    out: dict[str, Any] = {}
    steps = f"--train.max_steps={N}"
    out["init_equal"] = all(
        torch.equal(a, b)
        for a, b in zip(
            full_tensors(Trainer(config(root_p / "i1"), env).state()).values(),
            full_tensors(Trainer(config(root_p / "i2"), env).state()).values(),
        )
    )
    out["base"] = _fit(config(root_p / "base", steps, "--train.pipeline=base"), env, data)
    out["pipe"] = _fit(config(root_p / "pipe", steps), env, data)

    # validation every 3 steps under the pipeline (the pipeline detaches its model for it)
    trainer = Trainer(config(root_p / "eval", steps, "--train.eval_every=3"), env)
    stats = trainer.fit(data, validate=lambda: trainer.evaluate(held_out))
    out["eval"] = {
        "curve": dict(map(tuple, stats["loss_curve"])),
        "state": full_tensors(trainer.state()),
        "validation": stats.get("validation"),
    }

    # evaluation through TorchRec's eval pipeline vs plain forwards (67 rows: an odd tail)
    from mlet_dist.train.evaluation import evaluate

    odd = all_rows.slice(TRAIN_ROWS - 3, len(all_rows))
    # Per-bucket metrics make each prediction's batch matter: feature 0's id alone sets a row's
    # bucket (training counts id² there, 10^9 elsewhere), so rows spread over the buckets.
    counts = [np.arange(50) ** 2] + [np.full(50, 10**9)] * 25
    out["eval_pipelined"] = trainer.evaluate(odd, "eval", counts)
    out["eval_plain"] = evaluate(trainer.model, trainer.cfg, env, odd, "eval", counts, False)
    out["eval_again"] = trainer.evaluate(odd, "eval", counts)  # the model was given back intact

    # a checkpoint at HALF (mid-epoch, batches HALF+1 and HALF+2 in flight), resumed
    run = root_p / "ckpt"
    out["ckpt"] = _fit(config(run, steps, f"--train.checkpoint_every={HALF}"), env, data)
    half = run / "checkpoints" / f"step_{HALF:08d}"
    out["resumed"] = _fit(config(root_p / "resumed", steps), env, data, load=half)

    # a stop signal on rank 1 after step 2, agreement every 4 steps: both stop at 4
    original = TrainingGuard.check_fault

    def signal_at_2(self, step):
        if step == 2 and self.env.rank == 1:
            self._flag = True
        original(self, step)

    TrainingGuard.check_fault = signal_at_2
    try:
        run = root_p / "stop"
        out["stop"] = _stop_step(
            config(run, steps, "--train.sync_every=4", "--train.log_every=100"), env, data
        )
    finally:
        TrainingGuard.check_fault = original
    out["stop_checkpoints"] = [p.name for p in list_checkpoints(run)]

    # a non-finite loss on one rank at step 3, agreement every 4 steps
    bad = rows()
    bad.dense[2 * BATCH + 3, 0] = np.inf  # a row of the third global batch (no shuffling)
    run = root_p / "nan"
    out["nan"] = _stop_step(
        config(
            run, steps, "--train.sync_every=4", "--train.log_every=100",
            "--data.shuffle=false", "--train.checkpoint_every=8",
        ),
        env, bad.slice(0, TRAIN_ROWS),
    )  # fmt: skip
    out["nan_checkpoints"] = [p.name for p in list_checkpoints(run)]

    # RecMetrics over 2 ranks vs the project's metrics of the gathered predictions
    from mlet_dist.train.metrics import build_rec_metrics, scalars, update_rec_metrics

    module = build_rec_metrics(batch_size=32, window_steps=5, env=env)
    g = torch.Generator().manual_seed(100 + env.rank)
    logits, labels = [], []
    for _ in range(5):
        z = 2 * torch.randn(16, generator=g)
        y = (torch.rand(16, generator=g) < torch.sigmoid(z)).float()
        update_rec_metrics(module, z, y)
        logits.append(z)
        labels.append(y)
    values = scalars(module.compute())
    local = (torch.cat(logits), torch.cat(labels))
    gathered: list[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, local)
    all_z = torch.cat([z for z, _ in gathered])
    all_y = torch.cat([y for _, y in gathered])
    out["recmetrics"] = values
    out["reference"] = {
        **binary_metrics(all_z, all_y),
        "calibration": float(torch.sigmoid(all_z.double()).sum() / all_y.double().sum()),
    }
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe2")
    return run_ranks(_two_rank_job, 2, str(root), timeout=900)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_pipeline_equals_base_loop_on_two_ranks(runs):
    for r in runs:
        assert r["init_equal"]
        assert (r["pipe"]["pipelined"], r["base"]["pipelined"]) == (1, 0)  # the sharded W1
        assert len(r["pipe"]["curve"]) == N
        assert r["pipe"]["curve"] == r["base"]["curve"]  # bit-identical losses, every step
        assert _same(r["pipe"]["state"], r["base"]["state"]) == []  # weights and optimizer state
        assert r["base"]["curve"][1] != r["base"]["curve"][N]  # it trained


def test_validation_during_training_leaves_training_unchanged(runs):
    for r in runs:
        assert r["eval"]["curve"] == r["pipe"]["curve"]
        assert _same(r["eval"]["state"], r["pipe"]["state"]) == []
        steps = [v["step"] for v in r["eval"]["validation"]]
        assert steps == [3, 6, 9]
        assert all(
            0.0 <= v["auc"] <= 1.0 and v["rows"] == EVAL_ROWS for v in r["eval"]["validation"]
        )
    assert runs[0]["eval"]["validation"] == runs[1]["eval"]["validation"]


def test_eval_pipeline_equals_plain_evaluation(runs):
    for r in runs:
        assert r["eval_plain"]["rows"] == EVAL_ROWS + 3
        rows = [b["rows"] for b in r["eval_plain"]["buckets"].values()]
        assert sum(rows) == EVAL_ROWS + 3 and sum(n > 0 for n in rows) >= 3
        assert r["eval_pipelined"] == r["eval_plain"]  # the same logits: the same metrics
        assert r["eval_again"] == r["eval_plain"]


def test_mid_epoch_resume_under_the_pipeline_is_exact(runs):
    for r in runs:
        assert r["ckpt"]["curve"] == r["pipe"]["curve"]  # writing the checkpoint changed nothing
        after = {s: v for s, v in r["ckpt"]["curve"].items() if s > HALF}
        assert r["resumed"]["curve"] == after
        assert _same(r["resumed"]["state"], r["ckpt"]["state"]) == []


def test_stop_signal_between_agreements_stops_every_rank_at_the_next(runs):
    assert [r["stop"] for r in runs] == [4, 4]
    assert runs[0]["stop_checkpoints"] == ["step_00000004"]


def test_non_finite_loss_between_agreements_names_its_step(runs):
    messages = [r["nan"] for r in runs]
    for m in messages:
        assert m.startswith("TrainingDiverged: training diverged: the loss is")
        assert " at step 3 (rank " in m and "stopped at step 4" in m
        assert "the last checkpoint: none" in m
    assert runs[0]["nan_checkpoints"] == []


def test_recmetrics_equal_project_metrics_over_two_ranks(runs):
    assert "auc-ctr|window_auc" not in runs[1]["recmetrics"]  # TorchRec reduces to rank 0
    for r in runs[:1]:
        got, ref = r["recmetrics"], r["reference"]
        assert got["auc-ctr|window_auc"] == pytest.approx(ref["auc"], abs=1e-6)
        assert got["ne-ctr|lifetime_ne"] == pytest.approx(ref["ne"], rel=1e-5)
        assert got["ne-ctr|window_ne"] == pytest.approx(ref["ne"], rel=1e-5)
        assert got["calibration-ctr|lifetime_calibration"] == pytest.approx(
            ref["calibration"], rel=1e-5
        )
    for r in runs:
        assert r["recmetrics"]["throughput-throughput|total_examples"] == 5 * 32


# -- TensorBoard (one process) ------------------------------------------------------------------


def test_tensorboard_events_hold_the_listed_scalars(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mlet_dist.train import train

    all_rows = rows()
    data = Splits(
        all_rows.slice(0, TRAIN_ROWS),
        all_rows.slice(TRAIN_ROWS, len(all_rows)),
        all_rows.slice(0, 0),
    )
    monkeypatch.setattr("mlet_dist.train.run.load_splits", lambda *_: data)
    cfg = config(
        tmp_path / "run", "--train.max_steps=8", "--train.log_every=2",
        "--train.metrics_every=4", "--train.eval_every=4", "--train.tensorboard=true",
    )  # fmt: skip
    metrics = train(cfg)
    acc = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])

    def series(tag: str) -> dict[int, float]:
        return {e.step: e.value for e in acc.Scalars(tag)}

    wanted = {
        "train/loss", "lr/w1", "lr/w2", "lr/dense", "eval/auc", "eval/ne",
        "perf/samples_per_s", "perf/data_wait_ms", "perf/compute_ms", "perf/peak_memory_mb",
        "recmetrics/auc-ctr/window_auc", "recmetrics/ne-ctr/window_ne",
        "recmetrics/ne-ctr/lifetime_ne", "recmetrics/calibration-ctr/window_calibration",
        "recmetrics/calibration-ctr/lifetime_calibration",
    }  # fmt: skip
    assert wanted <= tags, sorted(wanted - tags)
    assert any(t.startswith("eval/") and t.endswith("/auc") and t != "eval/auc" for t in tags)
    assert any(t.startswith("recmetrics/throughput") for t in tags)
    curve = [
        json.loads(x) for x in (tmp_path / "run" / "loss_curve.jsonl").read_text().splitlines()
    ]
    assert series("train/loss") == pytest.approx({p["step"]: p["loss"] for p in curve}, rel=1e-6)
    assert sorted(series("train/loss")) == [2, 4, 6, 8]
    f = lr_lambda(cfg.optim)
    for tag, base in [
        ("lr/w1", w1_learning_rate(cfg.optim, cfg.model.embedding_dim, cfg.model.inner_dim)),
        ("lr/dense", cfg.optim.dense_lr),
    ]:
        assert series(tag) == pytest.approx({s: base * f(s) for s in (2, 4, 6, 8)}, rel=1e-6)
    validation = metrics["train"]["validation"]
    assert [v["step"] for v in validation] == [4]  # (the last step's is metrics.json's eval)
    assert series("eval/auc") == pytest.approx(
        {4: validation[0]["auc"], 8: metrics["eval"]["auc"]}, rel=1e-6
    )
    assert sorted(series("recmetrics/auc-ctr/window_auc")) == [4, 8]
    assert all(v > 0 for v in series("perf/samples_per_s").values())
    assert all(v >= 0 for v in series("perf/data_wait_ms").values())


def test_tensorboard_alone_shows_training_and_eval_auc(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mlet_dist.train import train
    from mlet_dist.train.metrics import AUTO_METRICS_EVERY, TrainingMonitor

    all_rows = rows()
    data = Splits(
        all_rows.slice(0, TRAIN_ROWS),
        all_rows.slice(TRAIN_ROWS, len(all_rows)),
        all_rows.slice(0, 0),
    )
    monkeypatch.setattr("mlet_dist.train.run.load_splits", lambda *_: data)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # every step's (logits, labels)
    step = TrainingMonitor.step

    def spy(self, output, data_s, step_s):
        seen.append((output[1].detach().clone(), output[2].detach().clone().float()))
        step(self, output, data_s, step_s)

    monkeypatch.setattr(TrainingMonitor, "step", spy)
    n = AUTO_METRICS_EVERY
    epochs = -(-(n + 5) // (TRAIN_ROWS // BATCH))  # past one cadence, ending off its multiple
    total = epochs * (TRAIN_ROWS // BATCH)
    assert total % n and total > n
    cfg = config(  # no train.metrics_every, no train.eval_every
        tmp_path / "run", f"--train.epochs={epochs}", "--train.log_every=50",
        "--train.tensorboard=true",
    )  # fmt: skip
    assert (cfg.train.metrics_every, cfg.train.eval_every) == (0, 0)  # the defaults
    metrics = train(cfg)
    assert len(seen) == total
    acc = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"scalars": 0})
    acc.Reload()

    def series(tag: str) -> dict[int, float]:
        return {e.step: e.value for e in acc.Scalars(tag)}

    def ref(first: int, last: int) -> dict[str, float]:  # steps first..last (1-based)
        z = torch.cat([s[0] for s in seen[first - 1 : last]])
        y = torch.cat([s[1] for s in seen[first - 1 : last]])
        return binary_metrics(z, y)

    auc = series("recmetrics/auc-ctr/window_auc")
    assert sorted(auc) == [n, total]
    assert auc[n] == pytest.approx(ref(1, n)["auc"], abs=1e-5)
    assert auc[total] == pytest.approx(ref(total - n + 1, total)["auc"], abs=1e-5)  # last n steps
    window_ne = series("recmetrics/ne-ctr/window_ne")
    assert window_ne[total] == pytest.approx(ref(n + 1, total)["ne"], rel=1e-4)  # since step n
    lifetime_ne = series("recmetrics/ne-ctr/lifetime_ne")
    assert lifetime_ne[total] == pytest.approx(ref(1, total)["ne"], rel=1e-4)
    assert series("eval/auc") == pytest.approx({total: metrics["eval"]["auc"]}, rel=1e-6)
    assert 0.0 < metrics["eval"]["auc"] < 1.0
