"""``[train]``: the training loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mlet_dist.config.error import ConfigError, check_number


@dataclass
class TrainConfig:
    """The training loop."""

    epochs: int = 1
    """Passes over the training split."""
    max_steps: int = 0
    """Stop after this many steps (0 = no limit)."""
    seed: int = 0
    """Seed of model init and data order."""
    log_every: int = 50
    """Log the step, training loss and samples/s every N steps (rank 0; at INFO when no progress bar shows on a terminal, e.g. in Slurm/TorchX log files)."""
    checkpoint_every: int = 0
    """Write a checkpoint every N steps (0 = only at the end)."""
    run_dir: str = "runs/default"
    """Directory of the run: config, metrics, checkpoints."""
    progress: bool = True
    """Show a progress bar (rank 0)."""
    pipeline: Literal["sparse_dist", "base"] = "sparse_dist"
    """'sparse_dist' (TorchRec TrainPipelineSparseDist: next batch's copy/input dist overlap) or 'base'."""
    sync_every: int = 10
    """Ranks agree on stop/NaN flags every N steps (and before every save and logged loss)."""
    metrics_every: int = 0
    """Compute and log TorchRec RecMetrics (AUC, NE, calibration, throughput) every N steps; 0 = every 500 steps when `tensorboard` is on, else off; -1 = off."""
    eval_every: int = 0
    """Evaluate on the eval split every N steps during training (0 = only at the end; that evaluation also goes to TensorBoard)."""
    tensorboard: bool = False
    """Write TensorBoard scalars to RUN/tb/ (rank 0; `tensorboard --logdir runs/`), with the RecMetrics training-window AUC (every 500 steps unless `metrics_every` says otherwise) and the final eval AUC."""

    def check(self) -> None:
        """Checks of this section alone."""
        if self.sync_every < 1 or self.metrics_every < -1 or self.eval_every < 0:
            raise ConfigError(
                "train.sync_every must be >= 1, train.metrics_every >= -1 (-1 = off), "
                "train.eval_every >= 0"
            )
        check_number("train.epochs", self.epochs, 1, why="passes over the training split")
        check_number("train.max_steps", self.max_steps, 0, why="0 = no limit")
        check_number("train.log_every", self.log_every, 1, why="steps between logged losses")
        check_number("train.checkpoint_every", self.checkpoint_every, 0, why="0 = at the end")
        check_number("train.seed", self.seed, 0)
