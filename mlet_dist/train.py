"""Training and evaluation of (MLET) DLRM models: one code path for 1 or N ranks.

``train(cfg)`` runs in a plain process (a one-rank group is created) or under torchrun/TorchX
(every rank runs it). Rank 0 logs, shows progress and writes the run directory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from mlet_dist.checkpoint import (
    check_model_config,
    check_optimizer_resharding,
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    read_train_state,
    resume_checkpoint,
    save_checkpoint,
    saved_plan,
    verify_checkpoint,
)
from mlet_dist.config import Config, ConfigError, check_feature_count
from mlet_dist.data import CriteoArrays, load_splits, make_batches
from mlet_dist.data.loader import build_batch_source
from mlet_dist.data.sources import data_inputs
from mlet_dist.distributed.elastic import TrainingGuard, _flag_group, check_agent_store
from mlet_dist.distributed.parallelize import (
    DistEnv,
    build_optimizer,
    build_sharded_model,
    init_distributed,
)
from mlet_dist.distributed.shards import plan_layout
from mlet_dist.errors import MletError
from mlet_dist.metrics import binary_metrics
from mlet_dist.quality import bucket_metrics, id_counts, rarest_id_count
from mlet_dist.utils.files import (
    atomic_write_json,
    check_output,
    hold_run,
    is_no_space,
    is_run_dir,
    is_serving_dir,
    no_space_error,
    remove_path,
)

logger = logging.getLogger(__name__)


class TrainingDiverged(MletError, RuntimeError):
    """The training loss became NaN or infinite; training stopped without saving those weights."""


class Trainer:
    """Owns the sharded model, optimizer and schedule of one run."""

    def __init__(self, cfg: Config, env: DistEnv, plan: Any = None) -> None:
        """``plan``: a TorchRec ``ShardingPlan`` to shard with (a resumed run's saved one)."""
        self.cfg = cfg
        self.env = env
        self.model = build_sharded_model(cfg, env, plan=plan)
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.optim)
        self._sync_fused_lr()
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0

    # -- checkpoints -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optim": self.optimizer.state_dict()}

    def sharding_layout(self) -> dict[str, dict[str, Any]]:
        """Each sharded table's type and shards ``[row0, col0, rows, cols, rank]``, from the plan."""
        return plan_layout(self.model.plan)

    def save(self) -> Path:
        train_state = {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "world_size": self.env.world_size,
            "device": self.env.device.type,
            "sharding": self.sharding_layout(),
            "scheduler": self.scheduler.state_dict(),
            "config": self.cfg.to_dict(),
        }
        try:
            return save_checkpoint(
                self.cfg.train.run_dir, self.step, self.state(), train_state, plan=self.model.plan
            )
        except BaseException as e:
            full = None  # DCP's CheckpointException is a BaseException
            if is_no_space(e, writing=True):  # (the free space as it failed, before the cleanup)
                full = no_space_error(checkpoint_dir(self.cfg.train.run_dir))
            if self.env.is_rank0:  # a half-written step_N.tmp must not keep the disk full
                remove_stale_checkpoints(self.cfg.train.run_dir)
            if full is not None:
                raise full from e
            raise

    def load(self, path: Path, optimizer: bool = True, verify: bool = True) -> None:
        """Loads a checkpoint (collectively), resharding it to this job's plan.

        Args:
            path: a complete checkpoint directory.
            optimizer: also load the optimizer state and LR schedule (to resume training).
                ``False`` loads the weights only (evaluation), which reshards from any plan.
            verify: check the files' sizes and CRC-32 first (False: the caller just did).

        Raises:
            CheckpointError: a file of the checkpoint is damaged or missing (named), the model
                config differs from the checkpoint's (the keys are named), or (with
                ``optimizer``) a column-based table's fused optimizer state would have to be
                resharded to another world size or column split, which TorchRec cannot do.
        """
        if not optimizer:
            load_weights(self.model, path, self.cfg, verify=verify)
            return
        if verify:
            verify_checkpoint(path)
        saved = read_train_state(path)
        check_model_config(path, saved["config"], self.cfg)
        check_optimizer_resharding(path, saved, self.sharding_layout(), self.env.world_size)
        self.optimizer.init_state()  # lazy optimizer state must exist before DCP loads into it
        state = self.state()
        train_state = load_checkpoint(path, state)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])
        self._restore_schedule(train_state["scheduler"])
        self._sync_fused_lr()
        self.step = train_state["step"]
        self.epoch = train_state["epoch"]
        self.batch_in_epoch = train_state["batch_in_epoch"]
        logger.info("resumed from %s at step %d (epoch %d)", path, self.step, self.epoch)

    def _restore_schedule(self, saved: dict[str, Any]) -> None:
        """Puts the LR schedule at the saved position, with this rank's own param groups.

        The saved scheduler state is rank 0's, but ranks can have different param groups (each
        rank's fused tables form their own groups, e.g. 3 on one rank and 4 on another under a
        mixed table/column-wise plan): loading rank 0's per-group lists (``base_lrs``) would
        break the other ranks. The schedule is one function of the step, so only its position
        is restored; each group's LR is its base LR (from the config) times the schedule.
        """
        sched = self.scheduler
        sched.last_epoch = saved["last_epoch"]
        sched._step_count = saved.get("_step_count", saved["last_epoch"] + 1)
        lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
        sched._last_lr = lrs
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr

    def _sync_fused_lr(self) -> None:
        """Pushes the scheduled LR into fbgemm's TBEs before the next backward.

        The fused optimizer updates W1 inside backward with the LR the TBE holds, which its
        ``step()`` sets from the param group (that is all the fused ``step()`` does). Without
        this call W1 would train with the previous step's LR, and a resumed run would use the
        construction-time LR for its first step.
        """
        self.model.fused_optimizer.step()

    # -- training ----------------------------------------------------------------------------
    def fit(
        self, train: CriteoArrays | None, on_start: Callable[[], None] | None = None
    ) -> dict[str, Any]:
        """Trains to ``train.epochs`` / ``train.max_steps`` from the current position.

        Args:
            train: the training rows in memory, or None to stream ``data.parquet_dir/train``
                (``data.source = 'parquet'``).
            on_start: called once the data is checked, before the first write to the run
                directory (:func:`train` writes ``config.json`` there).
        """
        cfg, env = self.cfg, self.env
        source = build_batch_source(
            cfg.data,
            "train",
            rank=env.rank,
            world_size=env.world_size,
            seed=cfg.train.seed,
            arrays=train,
            device=env.device,
        )
        per_epoch = source.num_batches()
        if per_epoch == 0:
            raise ConfigError(
                f"the training split has fewer rows than one batch (data.batch_size = "
                f"{cfg.data.batch_size}): lower the batch size or add data"
            )
        total = per_epoch * cfg.train.epochs
        if cfg.train.max_steps:
            total = min(total, cfg.train.max_steps)
        losses: list[list[float]] = []
        seen = 0
        start_step = self.step
        if on_start is not None:
            on_start()
        guard = TrainingGuard(cfg.train.run_dir, env, start_step=self.step)  # SIGTERM, loss log
        self.model.train()
        bar = tqdm(
            total=total,
            initial=self.step,
            desc="train",
            disable=not (env.is_rank0 and cfg.train.progress),
            mininterval=1.0,
        )
        t0 = time.perf_counter()
        while self.step < total:
            # Resume: the source starts at the next batch the checkpoint has not trained on.
            batches = source.batches(self.epoch, self.batch_in_epoch)
            for i, batch in enumerate(batches, start=self.batch_in_epoch):
                if self.step >= total:
                    break
                loss, _ = self.model(batch.to(env.device, non_blocking=True))
                loss.backward()
                self.optimizer.step()
                self.scheduler.step()
                self._sync_fused_lr()
                self.optimizer.zero_grad()
                self.step += 1
                self.batch_in_epoch = i + 1
                seen += batch.labels.numel()
                self._stop_if_diverged(loss, bar, guard)  # before anything is logged or saved
                if self.step % cfg.train.log_every == 0 or self.step == total:
                    value = loss.detach().item()
                    losses.append([self.step, value])
                    bar.set_postfix(loss=f"{value:.4f}")
                    logger.debug("step %d loss %.5f", self.step, value)
                    guard.log_loss(self.step, value)
                bar.update(1)
                saved = (
                    bool(cfg.train.checkpoint_every) and self.step % cfg.train.checkpoint_every == 0
                )
                if saved:
                    self.save()
                if guard.should_stop(self.step):  # a rank got SIGTERM: all save this step, exit
                    guard.stop(self.step, save=None if saved else self.save)
            else:
                self.epoch += 1
                self.batch_in_epoch = 0
        bar.close()
        guard.close()
        seconds = time.perf_counter() - t0
        return {
            "steps": self.step,
            "steps_this_run": self.step - start_step,
            "samples_per_rank": seen,
            "seconds": seconds,
            "samples_per_s": seen * env.world_size / seconds if seconds > 0 else 0.0,
            "loss_curve": losses,
        }

    def _stop_if_diverged(self, loss: torch.Tensor, bar: Any, guard: TrainingGuard) -> None:
        """Collective, after every step: raises :class:`TrainingDiverged` on every rank when the
        loss of any rank is not finite (the optimizer step already made the weights NaN, so
        nothing may be saved from here on).

        One scalar read per step and, on several ranks, an all-reduce of one int on the CPU
        (gloo) group of the stop flags: every rank must stop at the same step.
        """
        value = float(loss.detach().float().cpu())
        bad = torch.tensor([0 if np.isfinite(value) else self.env.rank + 1], dtype=torch.int32)
        if self.env.world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=_flag_group(self.env))
        if not bad.item():
            return
        rank = int(bad.item()) - 1
        shown = f"{value}" if rank == self.env.rank else "not finite"
        last = latest_checkpoint(self.cfg.train.run_dir)
        bar.close()
        guard.close()
        raise TrainingDiverged(
            f"training diverged: the loss is {shown} at step {self.step} (rank {rank}); stopped "
            f"without writing a checkpoint of the non-finite weights (the last checkpoint: "
            f"{last.name if last else 'none'}). Lower the learning rates (optim.embedding_lr, "
            f"optim.dense_lr, optim.projection_lr) or check the data for extreme values, then "
            f"resume from the last checkpoint or start a new train.run_dir"
        )

    def predict(self, arrays: CriteoArrays) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and labels of all rows (gathered from every rank, in row order)."""
        return predict(self.model, arrays, self.cfg.data.eval_batch_size, self.env)

    def evaluate(
        self,
        arrays: CriteoArrays | None,
        split: str = "eval",
        id_counts: list[np.ndarray] | None = None,
    ) -> dict[str, Any]:
        """:func:`evaluate` of this trainer's model."""
        return evaluate(self.model, self.cfg, self.env, arrays, split, id_counts)


def evaluate(
    model: torch.nn.Module,
    cfg: Config,
    env: DistEnv,
    arrays: CriteoArrays | None,
    split: str = "eval",
    id_counts: list[np.ndarray] | None = None,
) -> dict[str, Any]:
    """Metrics of a (sharded) model on rows in memory, or on the streamed Parquet ``split`` when
    ``arrays`` is None. Collective.

    With ``id_counts`` (training-split id occurrences, :func:`mlet_dist.quality.id_counts`)
    the metrics are also reported per id-frequency bucket (``"buckets"``, see
    :mod:`mlet_dist.quality`); rows must be in memory for that.
    """
    if arrays is None:
        logits, labels = _predict_stream(model, cfg, env, split)
    else:
        logits, labels = predict(model, arrays, cfg.data.eval_batch_size, env)
    metrics: dict[str, Any] = binary_metrics(logits, labels)
    if id_counts is not None and arrays is not None:
        rarest = rarest_id_count(arrays.sparse, id_counts)
        metrics["buckets"] = bucket_metrics(logits, labels, rarest)
    return metrics


@torch.no_grad()
def _predict_stream(
    model: torch.nn.Module, cfg: Config, env: DistEnv, split: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of a Parquet split, every rank's share gathered (order is irrelevant
    for the metrics; fewer than world_size rows may be left out, see the loader)."""
    source = build_batch_source(
        cfg.data, split, rank=env.rank, world_size=env.world_size,
        seed=cfg.train.seed, training=False, device=env.device,
    )  # fmt: skip
    was_training = model.training
    model.eval()
    outs, labels = [torch.zeros(0)], [torch.zeros(0)]
    try:
        for batch in source.batches(0):
            _, (_, logits, lab) = model(batch.to(env.device, non_blocking=True))
            outs.append(logits.float().cpu())
            labels.append(lab.float().cpu())
    finally:
        model.train(was_training)
    local = torch.stack([torch.cat(outs), torch.cat(labels)])
    if env.world_size == 1:
        return local[0], local[1]
    gathered: list[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, local)
    merged = torch.cat(gathered, dim=1)
    return merged[0], merged[1]


@torch.no_grad()
def predict(
    model: torch.nn.Module, arrays: CriteoArrays, batch_size: int, env: DistEnv
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs a (sharded) DLRMTrain over every row; returns all logits and labels, in row order.

    Collective: every rank passes the same rows and gets the same result. Each global batch is
    split across the ranks and the pieces are gathered back. ``make_batches`` leaves out the last
    ``len(arrays) % world_size`` rows (fewer than world_size) of the final, partial batch; those
    are evaluated in one extra batch padded with copies of the last row to one row per rank, and
    the padded predictions are dropped.
    """
    was_training = model.training
    model.eval()
    try:
        batch_size = max(env.world_size, batch_size - batch_size % env.world_size)
        logits, labels = _predict_split(model, arrays, batch_size, env)
        n, left = len(arrays), len(arrays) % env.world_size
        if left:
            pad = np.concatenate([np.arange(n - left, n), np.full(env.world_size - left, n - 1)])
            rest = CriteoArrays(arrays.labels[pad], arrays.dense[pad], arrays.sparse[pad])
            more_logits, more_labels = _predict_split(model, rest, env.world_size, env)
            logits = torch.cat([logits, more_logits[:left]])
            labels = torch.cat([labels, more_labels[:left]])
    finally:
        model.train(was_training)
    return logits, labels


def _predict_split(
    model: torch.nn.Module, arrays: CriteoArrays, batch_size: int, env: DistEnv
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of the rows ``make_batches`` gives out (all but the leftover ones)."""
    outs, labels = [], []
    for batch in make_batches(
        arrays, batch_size, shuffle=False, seed=0, rank=env.rank, world_size=env.world_size
    ):
        _, (_, logits, lab) = model(batch.to(env.device))
        outs.append(logits.float().cpu())
        labels.append(lab.float().cpu())
    local = torch.stack([torch.cat(outs), torch.cat(labels)]) if outs else torch.zeros(2, 0)
    sizes = _local_sizes(len(arrays), batch_size, env.world_size)
    if env.world_size == 1 or not sizes:
        return local[0], local[1]
    # Each rank holds a slice of every global batch: gather, then interleave back to row order.
    gathered: list[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, local)
    chunks = [g.split(sizes, dim=1) for g in gathered]
    merged = torch.cat(
        [chunks[r][b] for b in range(len(sizes)) for r in range(env.world_size)], dim=1
    )
    return merged[0], merged[1]


def _local_sizes(n: int, batch_size: int, world_size: int) -> list[int]:
    """Rows per rank of each batch ``make_batches`` yields (drop_last=False)."""
    local = batch_size // world_size
    full, tail = divmod(n, batch_size)
    sizes = [local] * full
    if tail // world_size:
        sizes.append(tail // world_size)
    return sizes


def train(cfg: Config, resume: bool = True, fallback: bool = True) -> dict[str, Any]:
    """Trains a model as configured; returns (and on rank 0 writes) the run's metrics.

    Writes ``RUN/config.json``, ``RUN/metrics.json`` and checkpoints under ``RUN/checkpoints``.
    With ``resume`` the newest intact checkpoint of the run directory is continued: a damaged
    newer one is moved aside with a warning, or, with ``fallback=False``, refused
    (:func:`mlet_dist.checkpoint.resume_checkpoint`).

    Safety: rank 0 checks ``train.run_dir`` (not an input, a checkpoint, a serving directory or
    inside another run; an existing one must be a run) and holds the run's exclusive lock
    (``RUN/.lock``) for the whole training; every rank learns of a refusal at once. Nothing is
    written into the run directory before the data, the config and a resumed checkpoint are
    checked, and what is written is written atomically.

    Raises:
        OutputPathError: ``train.run_dir`` is refused.
        RunLockedError: another process holds the run (its pid and host are named).
        CheckpointError: the checkpoint to resume was written with another model config, or
            (with ``fallback=False``) the newest one is damaged.
        TrainingDiverged: the loss became NaN/inf (nothing is saved after that step).
        NoSpaceError: a checkpoint could not be written (the half-written one is removed).
    """
    check_feature_count(cfg.data)
    check_agent_store()  # fail fast where torchrun's restart would hang (elastic.py)
    env = init_distributed(cfg.dist)
    run_dir = Path(cfg.train.run_dir)

    def check() -> None:
        check_output(
            run_dir,
            what="the training run",
            inputs=data_inputs(cfg.data),
            previous=_previous_run,
            run_output=True,
            hint="set train.run_dir to a new directory",
        )

    with hold_run(run_dir, env, command="train", shared=False, check=check):
        return _train(cfg, env, run_dir, resume, fallback)


# What training writes into its run directory (besides RUN/.lock and eval_*.json).
RUN_FILES = ("config.json", "metrics.json", "loss_curve.jsonl", "summary.json", "checkpoints")


def _previous_run(path: Path) -> str | None:
    """None when training may write into an existing ``path``: a run directory, or a directory
    holding none of the files training writes (it only adds to it, e.g. a sweep's run spec)."""
    if not path.is_dir():
        return f"{path} exists and is not a directory"
    if is_serving_dir(path):
        return f"{path} is a serving directory (output of `mlet-dist collapse`), not a run"
    if is_run_dir(path):
        return None
    clash = [name for name in RUN_FILES if (path / name).exists()]
    if clash:
        return (
            f"{path} exists and is not a run directory, but holds {', '.join(clash)}, which "
            f"training would overwrite"
        )
    return None


def remove_stale_checkpoints(run_dir: str | Path) -> None:
    """Removes unfinished checkpoints (``checkpoints/*.tmp``) of crashed or failed writes.

    Only under the run's exclusive lock: then no other process is writing one.
    """
    root = checkpoint_dir(run_dir)
    for stale in root.glob("*.tmp") if root.is_dir() else []:
        remove_path(stale)
        logger.info("removed the unfinished checkpoint %s", stale)


def _train(
    cfg: Config, env: DistEnv, run_dir: Path, resume: bool, fallback: bool = True
) -> dict[str, Any]:
    splits = load_splits(cfg.data)
    if splits.train is None:
        logger.info(
            "data: streaming Parquet from %s; world size %d on %s",
            cfg.data.parquet_dir, env.world_size, env.device,
        )  # fmt: skip
    else:
        logger.info(
            "data: %d train / %d eval / %d test rows; world size %d on %s",
            len(splits.train), len(splits.eval), len(splits.test), env.world_size, env.device,
        )  # fmt: skip
    last = resume_checkpoint(run_dir, fallback) if resume else None  # verified
    plan = None  # the saved plan when it fits: TorchRec's planning is not reproducible
    if last is not None:
        check_model_config(last, read_train_state(last)["config"], cfg)  # before any write
        plan = saved_plan(last, cfg.to_dict()["dist"], env.world_size, env.device.type)
    trainer = Trainer(cfg, env, plan=plan)
    if last is not None:
        trainer.load(last, verify=False)

    def start() -> None:  # every check passed: from here on the run directory is written
        if env.is_rank0:
            remove_stale_checkpoints(run_dir)
            atomic_write_json(run_dir / "config.json", cfg.to_dict())

    train_stats = trainer.fit(splits.train, on_start=start)
    trainer.save()
    metrics: dict[str, Any] = {"train": train_stats, "world_size": env.world_size}
    counts = None
    if splits.train is not None:
        counts = id_counts(splits.train.sparse, cfg.data.num_embeddings_per_feature)
    for split in ("eval", "test"):
        if splits.has(cfg.data, split):
            metrics[split] = trainer.evaluate(getattr(splits, split), split, counts)
    if env.is_rank0:
        atomic_write_json(run_dir / "metrics.json", metrics)
        if "eval" in metrics:
            e = metrics["eval"]
            logger.info(
                "eval: AUC %.4f  log loss %.4f  NE %.4f  (%d rows)",
                e["auc"],
                e["log_loss"],
                e["ne"],
                e["rows"],
            )
    return metrics
