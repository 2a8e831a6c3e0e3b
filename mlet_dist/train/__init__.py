"""Training and evaluation of (MLET) DLRM models: one code path for 1 or N ranks.

- :mod:`~mlet_dist.train.run`: ``train(cfg)``, a whole run (run-directory checks, resume,
  training, evaluation, metrics).
- :mod:`~mlet_dist.train.loop`: :class:`Trainer` (fit, checkpoints, LR sync, divergence stop),
  with the optimizer and LR schedule of :mod:`mlet_dist.optim`.
- :mod:`~mlet_dist.train.evaluation`: ``evaluate`` / ``predict``, one loop and one gather.
"""

from mlet_dist.train.evaluation import evaluate, predict
from mlet_dist.train.loop import Trainer, TrainingDiverged
from mlet_dist.train.run import train

__all__ = ["Trainer", "TrainingDiverged", "evaluate", "predict", "train"]
