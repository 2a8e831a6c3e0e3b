"""What a checkpoint directory holds (its file names), the checkpoint error, and the collective
helpers the checkpoint modules share. The layout of a run directory: :mod:`mlet_dist.checkpoint`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.distributed as dist

from mlet_dist.errors import MletError

TRAIN_STATE = "train_state.json"
PLAN_FILE = "plan.json"
OLD_PLAN_FILE = "plan.pt"  # pickled plan of checkpoints written before plan.json
INTEGRITY_FILE = "integrity.json"
DAMAGED_SUFFIX = ".damaged"


class CheckpointError(MletError, RuntimeError):
    """A checkpoint is missing, incomplete or does not match the model; the message says which.

    ``problem``: for a damaged checkpoint, what is wrong without the advice (else the message).
    """

    def __init__(self, message: str, problem: str | None = None) -> None:
        super().__init__(message)
        self.problem = problem or message


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def read_train_state(path: str | Path) -> dict[str, Any]:
    file = Path(path) / TRAIN_STATE
    if not file.is_file():
        raise CheckpointError(
            f"{path} is not a complete checkpoint (no {TRAIN_STATE}); pick a directory listed "
            f"under checkpoints/ without a .tmp suffix"
        )
    return json.loads(file.read_text())


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def rank_world(collective: bool) -> tuple[int, int]:
    if collective and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather(obj: Any, collective: bool) -> list[Any]:
    _, world = rank_world(collective)
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out
