"""What a training run shows while it runs: TorchRec RecMetrics, validation, TensorBoard.

- **RecMetrics** (every N = :func:`effective_metrics_every` steps: ``train.metrics_every``, or
  with ``train.metrics_every = 0`` every :data:`AUTO_METRICS_EVERY` steps when TensorBoard is on):
  TorchRec's ``RecMetricModule`` with AUC, NE and calibration (AUC windowed over the last N
  steps' rows, NE and calibration over the steps since the previous computation and lifetime)
  and throughput, given every row's prediction (weighted by the sample weights of
  ``data.weight``) and computed (collectively: the states are reduced to rank 0, which alone gets
  AUC/NE/calibration back) every N steps and at the last step; rank 0 logs. The rows of the N
  steps are kept and handed over in one update before each computation: TorchRec's update costs
  ~0.6 ms of Python per call whatever its rows (~9% of synthetic_small's 7 ms step on one CPU
  thread); fed once per 100 steps, RecMetrics cost ~0.09 ms a step, computations included
  (``python -m benchmarks.recmetrics_bench``). With ``train.tensorboard`` alone they run every
  :data:`AUTO_METRICS_EVERY` = 500 steps: measured alone on 2 cores, every 100 steps cost 6% of
  the samples/s (1.07x CPU time), every 500 steps 1% (0.98x CPU time; +175 MiB peak RSS)
  (benchmarks/results/train_cpu2_2026-12-04_metrics.md).
- **Validation** (``train.eval_every = N``): the eval split's metrics (AUC, NE, log loss, and
  per id-frequency bucket) every N steps, by :func:`mlet_dist.train.evaluation.evaluate`
  (through TorchRec's eval pipeline under ``train.pipeline = 'sparse_dist'``); the evaluation
  after the last step (``metrics.json``'s ``eval``) goes to TensorBoard too
  (:func:`log_evaluation`), so a run shows an eval AUC with ``train.eval_every = 0``.
- **TensorBoard** (``train.tensorboard = true``): rank 0 writes scalars to ``RUN/tb/``
  (``tensorboard --logdir runs/``): ``train/loss``; ``lr/w1``, ``lr/w2``, ``lr/dense``;
  ``recmetrics/<metric>``; ``eval/auc``, ``eval/ne``, ``eval/<bucket>/auc|ne``;
  ``perf/samples_per_s``, ``perf/data_wait_ms``, ``perf/compute_ms`` (per step, averaged over
  the logged interval) and ``perf/peak_memory_mb`` (CUDA: peak allocated; CPU: peak RSS).
"""

from __future__ import annotations

import logging
import resource
import sys
from pathlib import Path
from typing import Any

import torch
from torchrec.metrics.metric_module import RecMetricModule, generate_metric_module
from torchrec.metrics.metrics_config import (
    MetricsConfig,
    RecComputeMode,
    RecMetricDef,
    RecMetricEnum,
    RecTaskInfo,
    ThroughputDef,
)

from mlet_dist.config import TrainConfig
from mlet_dist.distributed.parallelize import DistEnv

logger = logging.getLogger(__name__)

TASK = RecTaskInfo(
    name="ctr", label_name="label", prediction_name="prediction", weight_name="weight"
)

AUTO_METRICS_EVERY = 500
"""RecMetrics cadence of a run with ``train.tensorboard = true`` and ``train.metrics_every = 0``.
Measured: benchmarks/results/train_cpu2_2026-12-04_metrics.md (TensorBoard with these RecMetrics
vs neither: ~3% of the step of synthetic_small's model at batch 256 on a shared 2-core CPU)."""

THROUGHPUT_WARMUP_STEPS = 100
"""TorchRec's default throughput warm-up, in training steps."""


def effective_metrics_every(train: TrainConfig) -> int:
    """Steps between two RecMetrics computations (0: none): ``train.metrics_every`` when set,
    else :data:`AUTO_METRICS_EVERY` when ``train.tensorboard`` is on (so that TensorBoard shows
    a training AUC by default), else 0; -1 turns them off."""
    if train.metrics_every < 0:
        return 0
    if train.metrics_every:
        return train.metrics_every
    return AUTO_METRICS_EVERY if train.tensorboard else 0


def build_rec_metrics(
    batch_size: int, window_steps: int, env: DistEnv, steps_per_update: int = 1
) -> RecMetricModule:
    """TorchRec's metric module of AUC, NE, calibration and throughput for one binary task.

    Args:
        batch_size: the global batch size (each rank sees ``batch_size / world_size`` rows).
        window_steps: the windowed metrics cover the rows of the last this many steps.
        env: the ranks whose states ``compute()`` all-reduces.
        steps_per_update: each ``update`` brings the rows of this many steps (TorchRec counts
            an update as one batch: its throughput examples and window sizes).
    """
    per_rank = batch_size // env.world_size * steps_per_update
    window = batch_size * window_steps  # TorchRec's window size counts the rows of all ranks
    warmup = max(1, -(-THROUGHPUT_WARMUP_STEPS // steps_per_update))
    config = MetricsConfig(
        rec_tasks=[TASK],
        rec_metrics={
            m: RecMetricDef(rec_tasks=[TASK], window_size=window)
            for m in (RecMetricEnum.AUC, RecMetricEnum.NE, RecMetricEnum.CALIBRATION)
        },
        throughput_metric=ThroughputDef(warmup_steps=warmup),
        rec_compute_mode=RecComputeMode.UNFUSED_TASKS_COMPUTATION,
        compute_interval_steps=1,
    )
    return generate_metric_module(
        RecMetricModule,
        config,
        batch_size=per_rank,
        world_size=env.world_size,
        my_rank=env.rank,
        state_metrics_mapping={},
        device=env.device,
    )


def update_rec_metrics(
    module: RecMetricModule,
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> None:
    """Adds one step's predictions (``sigmoid(logits)``) to the metric states, weighted by the
    sample weights (``data.weight``; None: all 1)."""
    labels = labels.float()
    module.update(
        {
            "prediction": torch.sigmoid(logits.detach().float()),
            "label": labels,
            "weight": torch.ones_like(labels) if weights is None else weights.detach().float(),
        }
    )


def scalars(values: dict[str, Any]) -> dict[str, float]:
    """RecMetric results as ``{"auc-ctr|window_auc": 0.71, ...}`` floats."""
    return {k: float(v) for k, v in values.items() if torch.as_tensor(v).numel() == 1}


def peak_memory_mb(device: torch.device) -> float:
    """The peak memory of this process: CUDA's peak allocation, else the peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def learning_rates(optimizer: Any) -> dict[str, float]:
    """The current LR of W1 (the fused TBE optimizer), W2 (``projection``) and the dense MLPs.

    W1's is its first TBE's: tables of different k train at different rates (each table's base
    rate, :func:`mlet_dist.optim.w1_learning_rate`, times the one schedule), in different TBEs.
    """
    names = {"fused": "w1", "projection": "w2", "dense": "dense"}
    out = {}
    for key, opt in optimizer.optimizers:
        if key in names and opt.param_groups:
            out[names[key]] = float(opt.param_groups[0]["lr"])
    return out


def evaluation_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """An evaluation's TensorBoard scalars: ``eval/auc``, ``eval/ne`` and per bucket."""
    values = {"eval/auc": metrics["auc"], "eval/ne": metrics["ne"]}
    for bucket, m in metrics.get("buckets", {}).items():
        for key in ("auc", "ne"):
            if key in m:  # (a bucket without rows has no metrics)
                values[f"eval/{bucket}/{key}"] = m[key]
    return values


def _summary_writer(run_dir: str | Path) -> Any:
    # torch's writer (the tensorboard package only for its protobufs, no TensorFlow); imported
    # only when asked for: it loads tensorboard's protobuf modules.
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(Path(run_dir) / "tb"))


def log_evaluation(
    train: TrainConfig, env: DistEnv, run_dir: str | Path, step: int, metrics: dict[str, Any]
) -> None:
    """Rank 0 with ``train.tensorboard``: the evaluation after training (``metrics.json``'s
    ``eval``) as ``eval/*`` scalars at the last step, beside those of :class:`TrainingMonitor`
    (another event file in ``RUN/tb/``: TensorBoard reads a directory's files as one run)."""
    if not (train.tensorboard and env.is_rank0):
        return
    writer = _summary_writer(run_dir)
    try:
        for tag, value in evaluation_scalars(metrics).items():
            writer.add_scalar(tag, value, step)
    finally:
        writer.close()


class TrainingMonitor:
    """RecMetrics and TensorBoard of one ``Trainer.fit`` (every rank creates it: collective)."""

    def __init__(
        self, train: TrainConfig, batch_size: int, env: DistEnv, run_dir: str | Path
    ) -> None:
        """``batch_size``: the global batch size (``data.batch_size``)."""
        self.env = env
        self.every = effective_metrics_every(train)
        self.rec = (
            build_rec_metrics(batch_size, self.every, env, steps_per_update=self.every)
            if self.every
            else None
        )
        # The steps' (logits, labels, weights) since the last RecMetrics update.
        self._rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self.writer = _summary_writer(run_dir) if train.tensorboard and env.is_rank0 else None
        self._steps = 0
        self._data_s = 0.0
        self._step_s = 0.0
        self._samples = 0

    def step(self, output: Any, data_s: float, step_s: float) -> None:
        """Every step: its ``(loss, logits, labels[, weights])``, its time reading the batch and in
        all."""
        logits, labels = output[1], output[2]
        if self.rec is not None:  # copies: a batch source may reuse its label buffer
            weights = output[3] if len(output) > 3 else None
            self._rows.append(
                (
                    logits.detach(),
                    labels.detach().to(torch.float32, copy=True),
                    None if weights is None else weights.detach().to(torch.float32, copy=True),
                )
            )
        self._steps += 1
        self._data_s += data_s
        self._step_s += step_s
        self._samples += labels.numel() * self.env.world_size

    def rec_metrics(self, step: int, last: bool = False) -> dict[str, float] | None:
        """Collective every ``metrics_every`` steps and at the ``last`` step: the RecMetrics of
        the rows since the last computation (logged on rank 0)."""
        if self.rec is None or (step % self.every and not last) or not self._rows:
            return None
        logits, labels, weights = zip(*self._rows)
        self._rows = []
        update_rec_metrics(
            self.rec,
            torch.cat(logits),
            torch.cat(labels),
            None if weights[0] is None else torch.cat(weights),  # type: ignore[arg-type]
        )
        values = scalars(self.rec.compute())
        if self.env.is_rank0:
            shown = {k.split("|")[-1]: v for k, v in values.items() if "-ctr|" in k}
            logger.info(
                "step %d: %s", step, "  ".join(f"{k} {v:.4f}" for k, v in sorted(shown.items()))
            )
            self.add(step, {f"recmetrics/{k.replace('|', '/')}": v for k, v in values.items()})
        return values

    def log(self, step: int, loss: float, lrs: dict[str, float], device: torch.device) -> None:
        """At a logged step (rank 0): loss, LRs and the time split since the last logged step."""
        n = max(self._steps, 1)
        values = {"train/loss": loss, **{f"lr/{k}": v for k, v in lrs.items()}}
        values["perf/data_wait_ms"] = 1e3 * self._data_s / n
        values["perf/compute_ms"] = 1e3 * (self._step_s - self._data_s) / n
        if self._step_s > 0:
            values["perf/samples_per_s"] = self._samples / self._step_s
        values["perf/peak_memory_mb"] = peak_memory_mb(device)
        self.add(step, values)
        self._steps, self._data_s, self._step_s, self._samples = 0, 0.0, 0.0, 0

    def validation(self, step: int, metrics: dict[str, Any]) -> None:
        """Rank 0: logs a validation's metrics (and per-bucket AUC/NE to TensorBoard)."""
        if not self.env.is_rank0:
            return
        logger.info(
            "step %d: eval AUC %.4f  NE %.4f  (%d rows)",
            step, metrics["auc"], metrics["ne"], metrics["rows"],
        )  # fmt: skip
        self.add(step, evaluation_scalars(metrics))

    def add(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
