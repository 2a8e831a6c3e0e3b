"""Checkpoints with torch.distributed.checkpoint (DCP), written atomically.

Layout of a run directory::

    RUN/config.json                  the config used (written at start)
    RUN/checkpoints/step_00000120/   one DCP checkpoint (all ranks' shards + .metadata)
        train_state.json             step, epoch, data position, world size, each table's
                                     sharding (type and shards), written last by rank 0
        plan.pt                      TorchRec's sharding plan (pickled): a resumed job on the
                                     same world size, device and [dist] config shards the same
    RUN/checkpoints/step_00000120.tmp/     an unfinished checkpoint: never used
    RUN/loss_curve.jsonl             the loss curve across restarts (rank 0; a resumed run drops
                                     the points after its checkpoint first; see
                                     mlet_dist.distributed.elastic)
    RUN/fault_injected.rank1.step7   marker of a fault injected by MLET_FAULT_INJECT (tests only)

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

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from mlet_dist.errors import MletError

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
TRAIN_STATE = "train_state.json"
PLAN_FILE = "plan.pt"

# Sharding types that split a table's columns. fbgemm's row-wise optimizer state of such a table
# has one value per row *of each column shard* (its size is rows x shards), which TorchRec cannot
# map onto another column split: resuming under another world size or plan fails in DCP with
# "Size mismatch ... momentum1" (or would be wrong), so it is refused up front.
COLUMN_BASED = ("column_wise", "table_column_wise", "grid_shard")


class CheckpointError(MletError, RuntimeError):
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
    plan: Any = None,
) -> Path:
    """Saves ``state`` (model/optimizer state dicts, may hold sharded tensors) collectively.

    Args:
        run_dir: the run directory.
        step: global step, names the checkpoint.
        state: the DCP state dict, e.g. {"model": dmp.state_dict(), "optim": opt.state_dict()}.
        train_state: small JSON-able dict (step, epoch, data position, config) from rank 0.
        keep: how many complete checkpoints to keep (older ones are removed by rank 0).
        plan: the job's TorchRec ``ShardingPlan``, saved by rank 0 (see :func:`saved_plan`).
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
        if plan is not None:
            torch.save(plan, tmp / PLAN_FILE)
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
    file = Path(path) / TRAIN_STATE
    if not file.is_file():
        raise CheckpointError(
            f"{path} is not a complete checkpoint (no {TRAIN_STATE}); pick a directory listed "
            f"under checkpoints/ without a .tmp suffix"
        )
    return json.loads(file.read_text())


def saved_plan(
    path: str | Path, dist_config: dict[str, Any], world_size: int, device_type: str
) -> Any:
    """The sharding plan of a checkpoint, when the resuming job may reuse it; else None.

    Why: TorchRec's planner is not reproducible across processes (it intersects the allowed
    sharding types as Python sets, whose order changes with the string hash seed of each
    process, and breaks cost ties by that order), so planning again on resume can shard some
    tables differently: the fused optimizer state then does not fit (refused, or a crash) or
    training is no longer bit-identical. Reusing the saved plan makes resumes exact.

    Args:
        path: a complete checkpoint.
        dist_config: the resuming job's ``[dist]`` section (as a dict).
        world_size: the resuming job's world size.
        device_type: the resuming job's device type ('cpu' or 'cuda').

    Returns:
        The ``ShardingPlan`` when the checkpoint has one and was written with the same world
        size, device type and ``[dist]`` config; None otherwise (the job plans anew and the
        checkpoint is resharded, see :func:`check_optimizer_resharding`). The caller checks
        that the model (its tables) is the same.
    """
    path = Path(path)
    state = read_train_state(path)
    same = (
        state.get("world_size") == world_size
        and state.get("device") == device_type
        and state.get("config", {}).get("dist") == dist_config
    )
    if not same:
        logger.info(
            "planning anew: %s was written with another world size, device or [dist] config",
            path.name,
        )
        return None
    if not (path / PLAN_FILE).is_file():
        logger.info("planning anew: %s holds no sharding plan (an older checkpoint)", path.name)
        return None
    try:
        plan = torch.load(path / PLAN_FILE, weights_only=False)  # written by this code only
    except Exception as e:  # e.g. written by another TorchRec version
        logger.warning("cannot read the sharding plan of %s (%s); planning anew", path, e)
        return None
    logger.info("resuming with the sharding plan saved in %s", path.name)
    return plan


def check_optimizer_resharding(
    path: str | Path,
    train_state: dict[str, Any],
    sharding: dict[str, dict[str, Any]],
    world_size: int,
) -> None:
    """Refuses to load fused optimizer state that TorchRec cannot reshard.

    Args:
        path: the checkpoint (for the message).
        train_state: its train state (``world_size`` and ``sharding`` as written by the trainer).
        sharding: the current model's tables: name -> {"sharding_type", "shards"}.
        world_size: the current world size.

    Raises:
        CheckpointError: a table is column-based (column_wise, table_column_wise, grid_shard) in
            the checkpoint or now, and the world size or that table's sharding differs. Checkpoints
            without a sharding record (older ones) are not checked.
    """
    saved = train_state.get("sharding")
    if saved is None:
        return
    saved_ws = train_state.get("world_size")
    bad = []
    for table in sorted(set(saved) | set(sharding)):
        before, now = saved.get(table), sharding.get(table)
        if not any(s and s["sharding_type"] in COLUMN_BASED for s in (before, now)):
            continue
        if saved_ws != world_size or before != now:
            bad.append(f"{table} ({_describe(before)} in the checkpoint, {_describe(now)} now)")
    if not bad:
        return
    shown = "; ".join(bad[:8]) + (f"; and {len(bad) - 8} more" if len(bad) > 8 else "")
    raise CheckpointError(
        f"cannot resume {path}: it was saved on world size {saved_ws}, this job has world size "
        f"{world_size}, and TorchRec cannot reshard the fused optimizer state of column-based "
        f"tables (row-wise Adagrad keeps one value per row of each column shard) to another world "
        f"size or column split. Tables: {shown}. Fix: resume on {saved_ws} rank(s) with the same "
        f"dist.sharding_types and dist.min_partition as the saved run, or, for a run that must "
        f"change world size, constrain dist.sharding_types to ['table_wise'] or ['row_wise'] "
        f"from the start. The weights alone do reshard (`mlet-dist collapse` reads this checkpoint "
        f"on one process)."
    )


def _describe(sharding: dict[str, Any] | None) -> str:
    if sharding is None:
        return "absent"
    shards = sharding.get("shards", [])
    ranks = sorted({s[-1] for s in shards})
    return f"{sharding['sharding_type']}, {len(shards)} shard(s) on rank(s) {ranks}"


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
