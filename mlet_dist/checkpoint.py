"""Checkpoints with torch.distributed.checkpoint (DCP), written atomically.

Layout of a run directory::

    RUN/config.json                  the config used (written at start)
    RUN/checkpoints/step_00000120/   one DCP checkpoint (all ranks' shards + .metadata)
        train_state.json             step, epoch, data position, written last by rank 0
    RUN/checkpoints/step_00000120.tmp-*/   an unfinished checkpoint: never used

A checkpoint is written under a temporary name and renamed by rank 0 after every rank finished,
so a crash mid-write never leaves something that looks complete.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
TRAIN_STATE = "train_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match the model; the message says which."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (incomplete/temporary ones are skipped)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    done = [
        p
        for p in root.iterdir()
        if _STEP_DIR.match(p.name) and (p / ".metadata").is_file() and (p / TRAIN_STATE).is_file()
    ]
    return sorted(done, key=lambda p: p.name)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    state: dict[str, Any],
    train_state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Saves ``state`` (model/optimizer state dicts, may hold sharded tensors) collectively.

    Args:
        run_dir: the run directory.
        step: global step, names the checkpoint.
        state: the DCP state dict, e.g. {"model": dmp.state_dict(), "optim": opt.state_dict()}.
        train_state: small JSON-able dict (step, epoch, data position, config) from rank 0.
        keep: how many complete checkpoints to keep (older ones are removed by rank 0).
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    final = checkpoint_dir(run_dir) / f"step_{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # leftover of a crashed attempt at the same step
        tmp.mkdir(parents=True)
    _barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    _barrier()
    if rank == 0:
        (tmp / TRAIN_STATE).write_text(json.dumps(train_state, indent=1, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("checkpoint written: %s", final)
    _barrier()
    return final


def load_checkpoint(path: str | Path, state: dict[str, Any]) -> dict[str, Any]:
    """Loads a checkpoint in place into ``state`` (resharding as needed); returns its train state."""
    path = Path(path)
    if not (path / ".metadata").is_file() or not (path / TRAIN_STATE).is_file():
        raise CheckpointError(
            f"{path} is not a complete checkpoint (no .metadata or {TRAIN_STATE}); "
            f"pick a directory listed under checkpoints/ without a .tmp suffix"
        )
    dcp.load(state, checkpoint_id=str(path))
    return json.loads((path / TRAIN_STATE).read_text())


def read_train_state(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / TRAIN_STATE).read_text())


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
