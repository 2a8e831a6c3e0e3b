"""The training loop of (MLET) DLRM models: one code path for 1 or N ranks.

:class:`Trainer` owns the sharded model (:func:`mlet_dist.distributed.parallelize.
build_sharded_model`), the optimizer and LR schedule (:mod:`mlet_dist.optim`); it trains
from a batch source through the step runner of ``train.pipeline`` (:mod:`mlet_dist.train.pipeline`:
TorchRec's ``TrainPipelineSparseDist`` by default), shows RecMetrics, validation and TensorBoard
scalars while it trains (:mod:`mlet_dist.train.metrics`), saves and loads checkpoints and stops
every rank when the loss diverges.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mlet_dist.checkpoint import (
    check_model_config,
    check_optimizer_resharding,
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    read_train_state,
    save_checkpoint,
    verify_checkpoint,
)
from mlet_dist.config import Config, ConfigError
from mlet_dist.data import BatchSource, CriteoArrays, build_batch_source
from mlet_dist.distributed.elastic import TrainingGuard
from mlet_dist.distributed.parallelize import DistEnv, build_sharded_model
from mlet_dist.distributed.shards import plan_layout
from mlet_dist.errors import MletError
from mlet_dist.optim import build_optimizer
from mlet_dist.schema import FeatureSchema, schema_of
from mlet_dist.train.evaluation import evaluate, predict
from mlet_dist.train.metrics import TrainingMonitor, learning_rates
from mlet_dist.train.pipeline import PositionedBatches, build_steps, pipelined_modules
from mlet_dist.utils.files import is_no_space, no_space_error, remove_path

logger = logging.getLogger(__name__)


class TrainingDiverged(MletError, RuntimeError):
    """The training loss became NaN or infinite; training stopped without saving those weights."""


class Trainer:
    """Owns the sharded model, optimizer and schedule of one run."""

    def __init__(
        self, cfg: Config, env: DistEnv, plan: Any = None, schema: FeatureSchema | None = None
    ) -> None:
        """``plan``: a TorchRec ``ShardingPlan`` to shard with (a resumed run's saved one);
        ``schema``: the run's (``RunContext.schema``), None = derived from ``cfg.data``."""
        self.cfg = cfg
        self.env = env
        self.schema = schema_of(cfg.data) if schema is None else schema
        self.model = build_sharded_model(cfg, env, plan=plan, schema=self.schema)
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
        self,
        train: CriteoArrays | None,
        on_start: Callable[[], None] | None = None,
        validate: Callable[[], dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Trains to ``train.epochs`` / ``train.max_steps`` from the current position.

        Args:
            train: the training rows in memory, or None to stream ``data.parquet_dir/train``
                (``data.source = 'parquet'``).
            on_start: called once the data is checked, before the first write to the run
                directory (:func:`train` writes ``config.json`` there).
            validate: the eval split's metrics (collective), run every ``train.eval_every``
                steps.
        """
        cfg, env = self.cfg, self.env
        source, per_epoch, total, limit = self._training_batches(train)
        if self.step >= total:  # a finished run resumed: nothing is written, not even config.json
            logger.warning(
                "run %s is already complete at step %d (%s); nothing to train: raise "
                "train.max_steps or train.epochs to train further, or start over with --no-resume",
                cfg.train.run_dir, self.step, limit,
            )  # fmt: skip
            return {"steps": self.step, "steps_this_run": 0, "nothing_to_train": True}
        losses: list[list[float]] = []
        validations: list[dict[str, Any]] = []
        seen = 0
        start_step = self.step
        if on_start is not None:
            on_start()
        guard = TrainingGuard(cfg.train.run_dir, env, start_step=self.step)  # SIGTERM, loss log
        monitor = TrainingMonitor(cfg.train, cfg.data.batch_size, env, cfg.train.run_dir)
        self.model.train()
        bar = tqdm(
            total=total,
            initial=self.step,
            desc="train",
            disable=not (env.is_rank0 and cfg.train.progress),
            mininterval=1.0,
        )
        # Without a bar on a terminal (train.progress = false, or a log file under Slurm/TorchX)
        # every log_every steps reach the log at INFO: step, loss and throughput.
        log_level = logging.DEBUG if cfg.train.progress and sys.stderr.isatty() else logging.INFO
        last_log = (self.step, seen, time.perf_counter())
        # Resume: the stream starts at the next batch the checkpoint has not trained on; the
        # position saved is that of the last batch trained, not of those in flight.
        stream = PositionedBatches(source, self.epoch, self.batch_in_epoch, total - self.step)
        batches = iter(stream)
        steps = build_steps(cfg.train.pipeline, self.model, self.optimizer, env.device)
        # The first step with a non-finite loss on this rank (0: none), kept on the loss's
        # device so that a step reads nothing back; the ranks agree on it every sync_every steps.
        bad_step = torch.zeros((), dtype=torch.int64, device=env.device)
        pipelined: int | None = None
        t0 = time.perf_counter()
        try:
            while self.step < total:
                t, data_before = time.perf_counter(), stream.data_seconds
                output = steps.progress(batches)
                if pipelined is None:  # after the first step: the pipeline has traced the model
                    pipelined = pipelined_modules(steps)
                    if cfg.train.pipeline == "sparse_dist" and not pipelined:
                        logger.warning("train pipeline: no sharded module is pipelined")
                self.scheduler.step()
                self._sync_fused_lr()
                self.step += 1
                self.epoch, self.batch_in_epoch = stream.trained()
                loss = output[0]
                seen += output[2].numel()
                bad_step = torch.where(
                    (bad_step == 0) & ~torch.isfinite(loss.detach()), self.step, bad_step
                )
                monitor.step(output, stream.data_seconds - data_before, time.perf_counter() - t)
                logged = self.step % cfg.train.log_every == 0 or self.step == total
                saving = bool(cfg.train.checkpoint_every) and (
                    self.step % cfg.train.checkpoint_every == 0
                )
                stop = False
                if (
                    logged
                    or saving
                    or self.step == total
                    or self.step % cfg.train.sync_every == 0
                    or self.step == guard.fault_step
                ):  # agree before anything is logged or saved (no weights after a NaN loss)
                    stop, rank, first = guard.agree(self.step, int(bad_step.item()))
                    if rank >= 0:
                        self._diverged(loss if rank == env.rank else None, first, rank, bar, guard)
                else:
                    guard.check_fault(self.step)
                if logged:
                    value = loss.detach().item()
                    losses.append([self.step, value])
                    bar.set_postfix(loss=f"{value:.4f}")
                    now = time.perf_counter()
                    rate = (seen - last_log[1]) * env.world_size / max(now - last_log[2], 1e-9)
                    logger.log(
                        log_level, "step %d/%d loss %.5f  %.0f samples/s",
                        self.step, total, value, rate,
                    )  # fmt: skip
                    last_log = (self.step, seen, now)
                    guard.log_loss(self.step, value)
                    monitor.log(self.step, value, learning_rates(self.optimizer), env.device)
                monitor.rec_metrics(self.step, last=self.step == total)
                if validate is not None and cfg.train.eval_every:
                    if self.step % cfg.train.eval_every == 0 and self.step < total:
                        steps.detach()  # the plain model; the next progress() re-attaches it
                        validations.append({"step": self.step, **validate()})
                        monitor.validation(self.step, validations[-1])
                bar.update(1)
                if saving:
                    self.save()
                if stop:  # a rank got SIGTERM: all save this step, exit
                    guard.stop(self.step, save=None if saving else self.save)
        finally:
            steps.detach()  # the plain model again (evaluation, export)
            monitor.close()
        if self.batch_in_epoch == per_epoch:  # an epoch ended with the last step
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
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
            "pipeline": cfg.train.pipeline,
            "pipelined_modules": pipelined or 0,
            **({"validation": validations} if validations else {}),
        }

    def _training_batches(self, train: CriteoArrays | None) -> tuple[BatchSource, int, int, str]:
        """(the training split's batch source, steps per epoch, the last step, what limits it)."""
        cfg, env = self.cfg, self.env
        source = build_batch_source(
            cfg.data,
            "train",
            rank=env.rank,
            world_size=env.world_size,
            seed=cfg.train.seed,
            arrays=train,
            device=env.device,
            schema=self.schema,
        )
        per_epoch = source.num_batches()
        if per_epoch == 0:
            raise ConfigError(
                f"the training split has fewer rows than one batch (data.batch_size = "
                f"{cfg.data.batch_size}): lower the batch size or add data"
            )
        total = per_epoch * cfg.train.epochs
        limit = f"train.epochs = {cfg.train.epochs} of {per_epoch} steps"
        if cfg.train.max_steps and cfg.train.max_steps < total:
            total, limit = cfg.train.max_steps, f"train.max_steps = {cfg.train.max_steps}"
        return source, per_epoch, total, limit

    def _diverged(
        self, loss: torch.Tensor | None, step: int, rank: int, bar: Any, guard: TrainingGuard
    ) -> None:
        """Raises :class:`TrainingDiverged` (on every rank, after :meth:`TrainingGuard.agree`
        found a non-finite loss on ``rank`` at ``step``): the optimizer steps since made the
        weights NaN, so nothing may be saved from here on."""
        shown = "not finite"  # another rank's, or an earlier step's (its value is gone)
        if loss is not None and step == self.step:
            shown = f"{float(loss.detach().float().cpu())}"
        last = latest_checkpoint(self.cfg.train.run_dir)
        bar.close()
        guard.close()
        raise TrainingDiverged(
            f"training diverged: the loss is {shown} at step {step} (rank {rank}); stopped "
            f"at step {self.step} without writing a checkpoint of the non-finite weights (the last "
            f"checkpoint: {last.name if last else 'none'}). Lower the learning rates "
            f"(optim.embedding_lr, optim.dense_lr, optim.projection_lr) or check the data for "
            f"extreme values, then resume from the last checkpoint or start a new train.run_dir"
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
        """:func:`evaluate` of this trainer's model (under TorchRec's eval pipeline when it
        trains under ``train.pipeline = 'sparse_dist'``)."""
        pipelined = self.cfg.train.pipeline == "sparse_dist"
        return evaluate(
            self.model, self.cfg, self.env, arrays, split, id_counts, pipelined, self.schema
        )


def remove_stale_checkpoints(run_dir: str | Path) -> None:
    """Removes unfinished checkpoints (``checkpoints/*.tmp``) of crashed or failed writes.

    Only under the run's exclusive lock: then no other process is writing one.
    """
    root = checkpoint_dir(run_dir)
    for stale in root.glob("*.tmp") if root.is_dir() else []:
        remove_path(stale)
        logger.info("removed the unfinished checkpoint %s", stale)
