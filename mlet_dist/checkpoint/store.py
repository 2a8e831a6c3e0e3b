"""Saving, listing, loading and resuming checkpoints (see :mod:`mlet_dist.checkpoint`)."""

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

from mlet_dist.checkpoint.integrity import verify_checkpoint, write_integrity
from mlet_dist.checkpoint.layout import (
    DAMAGED_SUFFIX,
    INTEGRITY_FILE,
    PLAN_FILE,
    TRAIN_STATE,
    CheckpointError,
    barrier,
    checkpoint_dir,
    rank_world,
    read_train_state,
)
from mlet_dist.checkpoint.plan_json import plan_to_json
from mlet_dist.checkpoint.safe import dcp_load
from mlet_dist.config import Config

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")

# Config sections/keys that define the model's parameters: a checkpoint written under other values
# cannot be loaded. Everything else (steps, learning rates, data files, logging) may change.
MODEL_KEYS = {
    "model": None,  # every key
    "data": {"num_embeddings_per_feature", "dense", "sparse", "tables"},
}
# Keys a resumed run must keep besides MODEL_KEYS: the data its saved position counts batches of.
RESUME_KEYS = {"data": {"source"}}

# Where a run started over (--no-resume) puts the earlier run's checkpoints/: checkpoints.earlier-N.
EARLIER_CHECKPOINTS = "checkpoints.earlier"


def model_config_diff(
    saved: dict[str, Any],
    current: dict[str, Any],
    keys: dict[str, set[str] | None] = MODEL_KEYS,
) -> list[str]:
    """Keys defining the model's parameters (``keys``: section -> keys, None = all) that differ
    between two config dicts.

    A key missing from ``saved`` (a checkpoint written before the key existed, e.g.
    ``model.w1_dtype``) counts as its default, the behaviour the checkpoint was written under.
    """
    defaults = Config().to_dict()
    diffs = []
    for section, names in keys.items():
        a = {**defaults.get(section, {}), **saved.get(section, {})}
        b = current.get(section, {})
        for key in sorted(set(a) | set(b)) if names is None else sorted(names):
            if a.get(key) != b.get(key):
                diffs.append(f"{section}.{key}: checkpoint {a.get(key)!r} != config {b.get(key)!r}")
    return diffs


def check_model_config(
    path: Path, saved: dict[str, Any], cfg: Config, resume: bool = False
) -> None:
    """Refuses a checkpoint (``saved``: its config dict) written with another model config, and,
    to ``resume`` training from it, with another data source (:data:`RESUME_KEYS`).

    Raises:
        CheckpointError: the differing keys are named.
    """
    current = cfg.to_dict()
    model = model_config_diff(saved, current)
    data = model_config_diff(saved, current, RESUME_KEYS) if resume else []
    diffs = model + data
    if diffs:
        what = " and ".join(w for w, d in (("model config", model), ("data source", data)) if d)
        raise CheckpointError(
            f"checkpoint {path} was written with a different {what}; differing keys: "
            + "; ".join(diffs)
            + ". Restore these values, or start over with --no-resume or a new train.run_dir."
        )


def set_aside_checkpoints(run_dir: str | Path) -> Path | None:
    """Moves an earlier run's ``checkpoints/`` aside to ``checkpoints.earlier-N`` (kept, never
    deleted), so that a run started over (``--no-resume``) never mixes its steps with them: its
    ``evaluate`` and ``collapse`` then see only its own. Rank 0, under the run's exclusive lock.

    Returns:
        Where they went, or None when the run had no checkpoints directory.
    """
    root = checkpoint_dir(run_dir)
    if not root.exists():
        return None
    n = 1
    while (aside := root.with_name(f"{EARLIER_CHECKPOINTS}-{n}")).exists():
        n += 1
    found = [p.name for p in list_checkpoints(run_dir)]
    root.rename(aside)
    logger.warning(
        "--no-resume: moved the earlier run's checkpoints (%s) aside to %s; this run starts at "
        "step 0",
        ", ".join(found) or "none complete",
        aside,
    )
    return aside


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (incomplete/temporary ones are skipped)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    # A checkpoint with integrity.json was complete when renamed: if a file went missing since,
    # it is listed (and reported as damaged when verified) rather than silently skipped.
    done = [
        p
        for p in root.iterdir()
        if _STEP_DIR.match(p.name)
        and (
            (p / INTEGRITY_FILE).is_file()
            or ((p / ".metadata").is_file() and (p / TRAIN_STATE).is_file())
        )
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
    barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    barrier()
    if rank == 0:
        if plan is not None:
            plan_json = plan_to_json(plan)
            if plan_json is None:
                logger.warning(
                    "the sharding plan uses settings plan.json cannot hold; %s is saved without "
                    "it (a resume plans anew)",
                    final.name,
                )
            else:
                (tmp / PLAN_FILE).write_text(json.dumps(plan_json, indent=1))
        (tmp / TRAIN_STATE).write_text(json.dumps(train_state, indent=1, sort_keys=True))
    write_integrity(tmp)  # collective: every rank checksums a share of the files
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("checkpoint written: %s", final)
    barrier()
    return final


def load_checkpoint(path: str | Path, state: dict[str, Any]) -> dict[str, Any]:
    """Loads a checkpoint in place into ``state`` (resharding as needed); returns its train state.

    Collective. Reads through :func:`dcp_load` (no code execution); does not verify the
    checksums (:func:`verify_checkpoint` does, before)."""
    path = Path(path)
    if not (path / ".metadata").is_file() or not (path / TRAIN_STATE).is_file():
        raise CheckpointError(
            f"{path} is not a complete checkpoint (no .metadata or {TRAIN_STATE}); "
            f"pick a directory listed under checkpoints/ without a .tmp suffix"
        )
    dcp_load(state, path)
    return json.loads((path / TRAIN_STATE).read_text())


def load_weights(model: torch.nn.Module, path: str | Path, cfg: Config, verify: bool = True) -> int:
    """Loads the weights of a checkpoint (no optimizer state) into a (sharded) model; collective.

    The checkpoint is resharded to the model's plan, whatever plan wrote it. Returns its step.

    Args:
        verify: check the files' sizes and CRC-32 first (False: the caller just did).

    Raises:
        CheckpointError: a file is damaged or missing, or the checkpoint was written with another
            model config (the differing keys are named).
    """
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    saved = read_train_state(path)
    check_model_config(path, saved["config"], cfg)
    state = {"model": model.state_dict()}
    load_checkpoint(path, state)
    model.load_state_dict(state["model"])
    logger.info("loaded the weights of %s (step %d)", path, saved["step"])
    return int(saved["step"])


def resume_checkpoint(run_dir: str | Path, fallback: bool = True) -> Path | None:
    """The checkpoint a resumed run continues: the newest one whose files verify. Collective.

    A damaged newer checkpoint is reported with a warning and moved aside to
    ``step_N.damaged`` (kept for inspection; never deleted), so that ``evaluate`` and
    ``collapse`` of the run do not pick it up later; with ``fallback=False`` it is an error.

    Returns:
        The checkpoint, or None when the run has none.

    Raises:
        CheckpointError: the newest checkpoint is damaged and ``fallback`` is False, or every
            checkpoint of the run is damaged (then nothing is moved).
    """
    damaged: list[tuple[Path, CheckpointError]] = []
    chosen = None
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(ckpt)
        except CheckpointError as e:
            if not fallback:
                raise CheckpointError(
                    f"{e.problem}; not resuming an older checkpoint (--no-fallback). Restore the "
                    f"file, or run without --no-fallback to resume the newest intact checkpoint"
                ) from None
            damaged.append((ckpt, e))
            continue
        chosen = ckpt
        break
    if damaged and chosen is None:
        raise CheckpointError(
            f"run {run_dir} has no intact checkpoint ({len(damaged)} damaged; the newest: "
            f"{damaged[0][1].problem}). Restore the files, or start over with --no-resume or a "
            f"new train.run_dir"
        )
    if damaged:
        if rank_world(True)[0] == 0:
            for ckpt, error in damaged:
                aside = ckpt.with_name(ckpt.name + DAMAGED_SUFFIX)
                n = 1
                while aside.exists():
                    aside = ckpt.with_name(f"{ckpt.name}{DAMAGED_SUFFIX}.{n}")
                    n += 1
                ckpt.rename(aside)
                logger.warning(
                    "%s; moved it aside to %s and falling back to %s",
                    error.problem,
                    aside.name,
                    chosen.name,
                )
        barrier()
    return chosen
