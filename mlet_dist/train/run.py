"""``train(cfg)``: a training run, from the checks of its run directory to its metrics.

``train(cfg)`` runs in a plain process (a one-rank group is created) or under torchrun/TorchX
(every rank runs it). Rank 0 logs, shows progress and writes the run directory.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mlet_dist.checkpoint import (
    check_model_config,
    list_checkpoints,
    read_train_state,
    resume_checkpoint,
    saved_plan,
    set_aside_checkpoints,
)
from mlet_dist.config import Config
from mlet_dist.context import RunContext
from mlet_dist.data import Splits, load_splits
from mlet_dist.data.vocab import (
    RUN_VOCAB_FILE,
    VOCAB_DIR,
    check_shard_vocabularies,
    record_run_vocabularies,
)
from mlet_dist.distributed.planning import planner_errors
from mlet_dist.quality import training_id_counts
from mlet_dist.train.loop import Trainer, remove_stale_checkpoints
from mlet_dist.train.metrics import log_evaluation
from mlet_dist.utils.files import (
    atomic_write_json,
    check_output,
    is_run_dir,
    is_serving_dir,
)

logger = logging.getLogger(__name__)


def train(run: Config | RunContext, resume: bool = True, fallback: bool = True) -> dict[str, Any]:
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

    Args:
        run: the config of the run, or its :class:`~mlet_dist.context.RunContext` when the caller
            (e.g. `mlet-dist run`) has resolved it already.

    Raises:
        OutputPathError: ``train.run_dir`` is refused.
        RunLockedError: another process holds the run (its pid and host are named).
        CheckpointError: the checkpoint to resume was written with another model config, or
            (with ``fallback=False``) the newest one is damaged.
        TrainingDiverged: the loss became NaN/inf (nothing is saved after that step).
        NoSpaceError: a checkpoint could not be written (the half-written one is removed).
    """
    ctx = run if isinstance(run, RunContext) else RunContext.of_config(run)
    cfg, env, run_dir = ctx.cfg, ctx.env, ctx.run_dir

    def check() -> None:
        check_output(
            run_dir,
            what="the training run",
            inputs=ctx.source.inputs(),
            previous=_previous_run,
            run_output=True,
            hint="set train.run_dir to a new directory",
        )

    with ctx.hold("train", shared=False, check=check):
        splits = load_splits(cfg.data, ctx.schema)
        _log_data(ctx, splits)
        last = resume_checkpoint(run_dir, fallback) if resume else None  # verified
        # --no-resume into a run with checkpoints: they are moved aside at start() (never mixed)
        earlier = not resume and bool(list_checkpoints(run_dir))
        plan = None  # the saved plan when it fits: TorchRec's planning is not reproducible
        if last is not None:  # before any write
            check_model_config(last, read_train_state(last)["config"], cfg, resume=True)
            plan = saved_plan(last, cfg.to_dict()["dist"], env.world_size, env.device.type)
        with planner_errors(cfg, env):  # a layout the planner cannot place: plan's message
            trainer = Trainer(cfg, env, plan=plan, schema=ctx.schema)
        if last is not None:
            trainer.load(last, verify=False)
        # ids = 'vocab' tables: the vocabularies the streamed shards were mapped with
        vocabs = ctx.source.vocabularies()
        if last is not None:
            check_shard_vocabularies(run_dir, vocabs, "resume")

        def start() -> None:  # every check passed: from here on the run directory is written
            if env.is_rank0:
                if earlier:
                    set_aside_checkpoints(run_dir)
                remove_stale_checkpoints(run_dir)
                atomic_write_json(run_dir / "config.json", cfg.to_dict())
                if vocabs:  # where `mlet-dist collapse` finds them
                    record_run_vocabularies(run_dir, cfg.data.parquet_dir, vocabs)

        counts = None
        if splits.train is not None:
            counts = training_id_counts(splits.train, ctx.schema.feature_sizes)

        def validate() -> dict[str, Any]:  # during training, every train.eval_every steps
            return trainer.evaluate(splits.eval, "eval", counts)

        has_eval = splits.has("eval")
        train_stats = trainer.fit(
            splits.train, on_start=start, validate=validate if has_eval else None
        )
        done = train_stats.pop("nothing_to_train", False)  # resumed a finished run: last
        checkpoint = last if done else trainer.save()
        metrics: dict[str, Any] = {"train": train_stats, "world_size": env.world_size}
        metrics["checkpoint"] = str(checkpoint)  # what evaluate/collapse of `mlet-dist run` use
        for split in ("eval", "test"):
            if splits.has(split):
                metrics[split] = trainer.evaluate(getattr(splits, split), split, counts)
        if "eval" in metrics:  # TensorBoard's eval AUC at the last step (train.tensorboard)
            log_evaluation(cfg.train, env, run_dir, trainer.step, metrics["eval"])
        if env.is_rank0 and not (done and (run_dir / "metrics.json").exists()):
            atomic_write_json(run_dir / "metrics.json", metrics)
            if "eval" in metrics:
                e = metrics["eval"]
                logger.info(
                    "eval: AUC %.4f  log loss %.4f  NE %.4f  (%d rows)",
                    e["auc"], e["log_loss"], e["ne"], e["rows"],
                )  # fmt: skip
        return metrics


# What training writes into its run directory (besides RUN/.lock and eval_*.json).
RUN_FILES = (
    "config.json",
    "metrics.json",
    "loss_curve.jsonl",
    "summary.json",
    RUN_VOCAB_FILE,
    VOCAB_DIR,
    "checkpoints",
)


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


def _log_data(ctx: RunContext, splits: Splits) -> None:
    env = ctx.env
    if splits.train is None:
        logger.info(
            "data: streaming Parquet from %s; world size %d on %s",
            ctx.cfg.data.parquet_dir, env.world_size, env.device,
        )  # fmt: skip
    else:
        logger.info(
            "data: %d train / %d eval / %d test rows; world size %d on %s",
            len(splits.train), len(splits.eval), len(splits.test), env.world_size, env.device,
        )  # fmt: skip
