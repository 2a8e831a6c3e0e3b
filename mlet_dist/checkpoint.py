"""Checkpoints with torch.distributed.checkpoint (DCP), written atomically.

Layout of a run directory::

    RUN/config.json                  the config used (written at start)
    RUN/checkpoints/step_00000120/   one DCP checkpoint (all ranks' shards + .metadata)
        train_state.json             step, epoch, data position, world size, each table's
                                     sharding (type and shards), written by rank 0
        plan.json                    TorchRec's sharding plan (JSON): a resumed job on the
                                     same world size, device and [dist] config shards the same
                                     (older checkpoints hold a pickled plan.pt instead)
        integrity.json               size and CRC-32 of every other file, written last
    RUN/checkpoints/step_00000120.tmp/     an unfinished checkpoint: never used
    RUN/checkpoints/step_00000120.damaged/ a damaged checkpoint a resume moved aside
    RUN/loss_curve.jsonl             the loss curve across restarts (rank 0; a resumed run drops
                                     the points after its checkpoint first; see
                                     mlet_dist.distributed.elastic)
    RUN/fault_injected.rank1.step7   marker of a fault injected by MLET_FAULT_INJECT (tests only)

A checkpoint is written under a temporary name and renamed by rank 0 after every rank finished,
so a crash mid-write never leaves something that looks complete. Its ``integrity.json`` records
each file's size and CRC-32 (:func:`verify_checkpoint`): a resume, ``evaluate`` and ``collapse``
check them before loading, so a flipped byte, a truncated or a missing file is reported as a
one-line :class:`CheckpointError` naming the checkpoint and the file; a resume then falls back to
the newest intact checkpoint (:func:`resume_checkpoint`).

Nothing read from a checkpoint executes code: the plan is JSON, DCP's pickled ``.metadata`` is
read by an unpickler that allows only DCP's metadata classes, torch sizes and dtypes
(:class:`SafeFileSystemReader`), and non-tensor values are read with ``torch.load(weights_only=
True)`` (:class:`SafeLoadPlanner`); :func:`dcp_load` uses both. A file that asks for anything else
(e.g. ``os.system``) is refused with a :class:`CheckpointError`.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import re
import shutil
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from mlet_dist.config import Config
from mlet_dist.distributed.sharding import COLUMN_BASED  # resharding refused (see there)
from mlet_dist.errors import MletError

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
TRAIN_STATE = "train_state.json"
PLAN_FILE = "plan.json"
OLD_PLAN_FILE = "plan.pt"  # pickled plan of checkpoints written before plan.json
PLAN_FORMAT = "mlet_dist.sharding_plan/1"
INTEGRITY_FILE = "integrity.json"
INTEGRITY_FORMAT = "mlet_dist.checkpoint_integrity/1"
DAMAGED_SUFFIX = ".damaged"


class CheckpointError(MletError, RuntimeError):
    """A checkpoint is missing, incomplete or does not match the model; the message says which.

    ``problem``: for a damaged checkpoint, what is wrong without the advice (else the message).
    """

    def __init__(self, message: str, problem: str | None = None) -> None:
        super().__init__(message)
        self.problem = problem or message


# Config sections/keys that define the model's parameters: a checkpoint written under other values
# cannot be loaded. Everything else (steps, learning rates, data files, logging) may change.
MODEL_KEYS = {
    "model": None,  # every key
    "data": {"num_embeddings_per_feature"},
}


def model_config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys defining the model's parameters that differ between two config dicts."""
    diffs = []
    for section, keys in MODEL_KEYS.items():
        a, b = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(a) | set(b)) if keys is None else sorted(keys):
            if a.get(key) != b.get(key):
                diffs.append(f"{section}.{key}: checkpoint {a.get(key)!r} != config {b.get(key)!r}")
    return diffs


def check_model_config(path: Path, saved: dict[str, Any], cfg: Config) -> None:
    """Refuses a checkpoint (``saved``: its config dict) written with another model config.

    Raises:
        CheckpointError: the differing keys are named.
    """
    diffs = model_config_diff(saved, cfg.to_dict())
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was written with a different model config; differing keys: "
            + "; ".join(diffs)
            + ". Use a new train.run_dir, or restore these values."
        )


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


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
    _barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    _barrier()
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
    _barrier()
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
    try:
        if (path / PLAN_FILE).is_file():
            plan = plan_from_json(json.loads((path / PLAN_FILE).read_text()))
        elif (path / OLD_PLAN_FILE).is_file():
            plan = _load_old_plan(path / OLD_PLAN_FILE)  # refuses a crafted file (CheckpointError)
        else:
            logger.info("planning anew: %s holds no sharding plan", path.name)
            return None
    except CheckpointError:
        raise
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


# -- integrity: size and CRC-32 of every file ------------------------------------------------------
#
# CRC-32 (zlib, stdlib) rather than sha256: it only has to catch accidental damage (a flipped bit,
# a truncated or half-copied file; all bursts up to 32 bits and any other change with probability
# 1 - 2**-32), not tampering (whoever can change a shard can rewrite integrity.json too; see
# README "Trust"). It runs at ~1.5 GB/s per core here vs ~0.5 GB/s for hashlib's sha256, and the
# files are split among the ranks, so checking a checkpoint costs about one read of 1/world_size
# of it per rank.


def _crc32(path: Path, block: int = 8 << 20) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(block):
            crc = zlib.crc32(chunk, crc)
    return crc


def _rank_world(collective: bool) -> tuple[int, int]:
    if collective and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(obj: Any, collective: bool) -> list[Any]:
    _, world = _rank_world(collective)
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _checkpoint_files(root: Path) -> list[str]:
    """Every file of a checkpoint directory except its integrity record, as sorted relative paths."""
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).as_posix() != INTEGRITY_FILE
    )


def write_integrity(root: Path) -> None:
    """Writes ``root/integrity.json``: size and CRC-32 of every other file of the checkpoint.

    Collective (every rank calls it after all files are written): rank 0 lists the files, every
    rank checksums its share of them, rank 0 writes the record.
    """
    rank, world = _rank_world(True)
    names = [_checkpoint_files(root) if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(names, src=0)
    mine = {
        n: {"bytes": (root / n).stat().st_size, "crc32": f"{_crc32(root / n):08x}"}
        for n in names[0][rank::world]
    }
    parts = _all_gather(mine, True)
    if rank == 0:
        files = {k: v for part in parts for k, v in part.items()}
        record = {
            "format": INTEGRITY_FORMAT,
            "checksum": "crc32",
            "files": dict(sorted(files.items())),
        }
        (root / INTEGRITY_FILE).write_text(json.dumps(record, indent=1))


def _file_problem(root: Path, name: Any, entry: Any) -> str | None:
    """What is wrong with one file of a checkpoint against its integrity entry, or None."""
    if (
        not isinstance(name, str)
        or not isinstance(entry, dict)
        or not isinstance(entry.get("bytes"), int)
        or not isinstance(entry.get("crc32"), str)
        or Path(name).is_absolute()
        or ".." in Path(name).parts
    ):
        return f"{INTEGRITY_FILE} has an invalid entry {name!r}"
    path = root / name
    if not path.is_file():
        return f"{name} is missing (listed in {INTEGRITY_FILE})"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return (
            f"{name} has {size} bytes, {INTEGRITY_FILE} records {entry['bytes']} (truncated or "
            f"overwritten)"
        )
    crc = f"{_crc32(path):08x}"
    if crc != entry["crc32"]:
        return (
            f"{name} does not match its CRC-32 in {INTEGRITY_FILE} ({crc}, recorded "
            f"{entry['crc32']}): its bytes changed after it was written"
        )
    return None


def verify_checkpoint(path: str | Path, collective: bool = True) -> bool:
    """Checks every file of a checkpoint against its ``integrity.json`` (size and CRC-32).

    Args:
        path: a checkpoint directory.
        collective: split the files among the ranks of the process group (every rank must call
            it); False checks them all in this process.

    Returns:
        True when verified; False for a checkpoint without ``integrity.json`` (written by an
        older mlet_dist), which is accepted unverified with a warning.

    Raises:
        CheckpointError: a file is missing, has another size or CRC-32, or the record is
            unreadable; one line naming the checkpoint and the file.
    """
    path = Path(path)
    rank, world = _rank_world(collective)
    record_file = path / INTEGRITY_FILE
    if not record_file.is_file():
        if rank == 0:
            logger.warning(
                "checkpoint %s has no %s (written by an older mlet_dist): its files are not "
                "verified",
                path,
                INTEGRITY_FILE,
            )
        return False
    problems: list[tuple[str, str]] = []
    try:
        record = json.loads(record_file.read_text())
        files = record["files"]
        if record.get("format") != INTEGRITY_FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {record.get('format')!r}, expected {INTEGRITY_FORMAT!r}")
    except (ValueError, KeyError, TypeError, OSError) as e:
        problems.append(("", f"{INTEGRITY_FILE} is unreadable ({type(e).__name__}: {e})"))
        files = {}
    for name in sorted(files, key=str)[rank::world]:
        problem = _file_problem(path, name, files[name])
        if problem is not None:
            problems.append((str(name), problem))
            break
    found = sorted(p for part in _all_gather(problems, collective) for p in part)
    if found:
        problem = f"checkpoint {path} is damaged: {found[0][1]}"
        raise CheckpointError(
            f"{problem}. Restore the file, or rename the directory (e.g. to "
            f"{path.name}{DAMAGED_SUFFIX}) to use the previous checkpoint; `mlet-dist train` "
            f"falls back to the newest intact one by itself",
            problem,
        )
    return True


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
        if _rank_world(True)[0] == 0:
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
        _barrier()
    return chosen


# -- the sharding plan as JSON ---------------------------------------------------------------------
#
# TorchRec has only a private, one-way ``ShardingPlan._serialize`` (no loader; it drops the
# optional fields), so the plan is written and read here: every field of ParameterSharding that
# our planner sets, explicitly. A plan with cache or key-value parameters is not written (a resume
# plans anew).

_PLAN_BOOLS = ("enforce_hbm", "stochastic_rounding")


def _plan_enums() -> dict[str, Any]:
    from torchrec.distributed.types import BoundsCheckMode, DataType

    return {"bounds_check_mode": BoundsCheckMode, "output_dtype": DataType}


def plan_to_json(plan: Any) -> dict[str, Any] | None:
    """A TorchRec ``ShardingPlan`` as JSON-able data, or None when it holds settings this format
    does not cover (cache/key-value parameters, other module plan or sharding spec types)."""
    from torch.distributed._shard.sharding_spec import EnumerableShardingSpec
    from torchrec.distributed.types import EmbeddingModuleShardingPlan

    modules: dict[str, Any] = {}
    for module_path, module_plan in plan.plan.items():
        if type(module_plan) is not EmbeddingModuleShardingPlan:
            return None
        params: dict[str, Any] = {}
        for name, ps in module_plan.items():
            spec = ps.sharding_spec
            if ps.cache_params is not None or ps.key_value_params is not None:
                return None
            if spec is not None and type(spec) is not EnumerableShardingSpec:
                return None
            entry: dict[str, Any] = {
                "sharding_type": ps.sharding_type,
                "compute_kernel": ps.compute_kernel,
                "ranks": None if ps.ranks is None else [int(r) for r in ps.ranks],
                "shards": None
                if spec is None
                else [
                    {
                        "offsets": [int(v) for v in m.shard_offsets],
                        "sizes": [int(v) for v in m.shard_sizes],
                        "placement": None if m.placement is None else str(m.placement),
                    }
                    for m in spec.shards
                ],
            }
            for key in _PLAN_BOOLS:
                entry[key] = getattr(ps, key)
            for key in _plan_enums():
                value = getattr(ps, key)
                entry[key] = None if value is None else value.name
            params[name] = entry
        modules[module_path] = params
    return {"format": PLAN_FORMAT, "modules": modules}


def plan_from_json(data: dict[str, Any]) -> Any:
    """The ``ShardingPlan`` of :func:`plan_to_json` output.

    Raises:
        ValueError: not that format (a KeyError/TypeError for a malformed one).
    """
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharding_spec import EnumerableShardingSpec
    from torchrec.distributed.types import (
        EmbeddingModuleShardingPlan,
        ParameterSharding,
        ShardingPlan,
    )

    if data.get("format") != PLAN_FORMAT:
        raise ValueError(f"plan format {data.get('format')!r}, expected {PLAN_FORMAT!r}")
    enums = _plan_enums()
    plan: dict[str, Any] = {}
    for module_path, params in data["modules"].items():
        module_plan = EmbeddingModuleShardingPlan()
        for name, e in params.items():
            shards = e["shards"]
            spec = None
            if shards is not None:
                spec = EnumerableShardingSpec(
                    [
                        ShardMetadata(
                            shard_offsets=[int(v) for v in s["offsets"]],
                            shard_sizes=[int(v) for v in s["sizes"]],
                            placement=s["placement"],
                        )
                        for s in shards
                    ]
                )
            module_plan[name] = ParameterSharding(
                sharding_type=str(e["sharding_type"]),
                compute_kernel=str(e["compute_kernel"]),
                ranks=None if e["ranks"] is None else [int(r) for r in e["ranks"]],
                sharding_spec=spec,
                **{k: None if e.get(k) is None else bool(e[k]) for k in _PLAN_BOOLS},
                **{k: None if e.get(k) is None else enum[e[k]] for k, enum in enums.items()},
            )
        plan[module_path] = module_plan
    return ShardingPlan(plan)


# -- loading without executing code --------------------------------------------------------------

_TORCH_DTYPES = frozenset(n for n, v in vars(torch).items() if isinstance(v, torch.dtype))


def _names(*objects: Any) -> set[tuple[str, str]]:
    return {(o.__module__, o.__qualname__) for o in objects}


def _dcp_metadata_globals() -> set[tuple[str, str]]:
    """What DCP's ``.metadata`` pickle may refer to: DCP's metadata classes, sizes, paths."""
    import pathlib

    from torch.distributed.checkpoint import filesystem, metadata

    return _names(
        metadata.Metadata,
        metadata.ChunkStorageMetadata,
        metadata.TensorStorageMetadata,
        metadata.BytesStorageMetadata,
        metadata.TensorProperties,
        metadata.MetadataIndex,
        metadata.StorageMeta,
        metadata._MEM_FORMAT_ENCODING,
        filesystem._StorageInfo,
        torch.Size,
        pathlib.PurePosixPath,
        pathlib.PosixPath,
        pathlib.PureWindowsPath,
        pathlib.WindowsPath,
    ) | {
        ("torch.serialization", "_get_layout"),  # looks a torch.layout up by name
        ("collections", "OrderedDict"),
    }


def _plan_globals() -> set[tuple[str, str]]:
    """What an old pickled ``plan.pt`` may refer to: TorchRec's plan classes and their parts."""
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharding_spec import EnumerableShardingSpec
    from torch.distributed.remote_device import _remote_device
    from torchrec.distributed.types import (
        EmbeddingModuleShardingPlan,
        ParameterSharding,
        ShardingPlan,
    )

    return _names(
        ShardingPlan,
        EmbeddingModuleShardingPlan,
        ParameterSharding,
        EnumerableShardingSpec,
        ShardMetadata,
        _remote_device,
        *_plan_enums().values(),
    ) | {("torch", "device"), ("collections", "OrderedDict")}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only allow-listed classes (and torch dtypes); anything else, e.g.
    ``os.system``, is refused before it is imported, so loading cannot run code.

    Why our own: DCP reads ``.metadata`` with plain ``pickle.load``, and ``torch.load(
    weights_only=True)`` cannot rebuild DCP's metadata or TorchRec's plan (dict subclasses)."""

    def __init__(self, file: Any, source: str, allowed: set[tuple[str, str]], what: str) -> None:
        super().__init__(file)
        self.source, self.allowed, self.what = source, allowed, what

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.allowed or (module == "torch" and name in _TORCH_DTYPES):
            return super().find_class(module, name)
        raise CheckpointError(
            f"{self.source} refers to {module}.{name}, which {self.what} never holds: refused to "
            f"load it (a crafted or foreign file could run code this way; see README 'Trust')"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(
            f"{self.source} refers to external data ({str(pid)[:40]}), which {self.what} never "
            f"holds: refused to load it (see README 'Trust')"
        )


def _load_old_plan(path: Path) -> Any:
    """A ``plan.pt`` of an older checkpoint (``torch.save`` zip), unpickled with the allow-list.

    ``torch.load(weights_only=True)`` cannot rebuild TorchRec's plan (it refuses SETITEMS on
    the dict subclass EmbeddingModuleShardingPlan), so its ``data.pkl`` is read here.
    """
    with zipfile.ZipFile(path) as z:
        member = next((n for n in z.namelist() if n.endswith("/data.pkl")), None)
        if member is None:
            raise ValueError(f"{path} is not a torch.save zip file")
        data = z.read(member)
    plan = _RestrictedUnpickler(
        io.BytesIO(data), str(path), _plan_globals(), "a sharding plan"
    ).load()
    from torchrec.distributed.types import ShardingPlan

    if not isinstance(plan, ShardingPlan):
        raise ValueError(f"{path} holds a {type(plan).__name__}, not a ShardingPlan")
    return plan


class SafeFileSystemReader(FileSystemReader):
    """DCP's ``FileSystemReader`` whose ``.metadata`` is unpickled with an allow-list.

    DCP's own ``read_metadata`` uses ``pickle.load``: a crafted ``.metadata`` would run code on
    every rank that loads the checkpoint. Here only DCP's metadata classes, ``torch.Size``, torch
    dtypes/layouts and paths are built; anything else is a :class:`CheckpointError`.
    """

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = _RestrictedUnpickler(
                    f, str(path), _dcp_metadata_globals(), "DCP checkpoint metadata"
                ).load()
        except CheckpointError:
            raise
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing: not a complete DCP checkpoint") from None
        except Exception as e:  # truncated/garbled pickle: UnpicklingError, EOFError, ...
            raise CheckpointError(
                f"{path} is damaged ({type(e).__name__}: {_first_line(e)})"
            ) from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's ``DefaultLoadPlanner``, but non-tensor values are only loaded when
    ``torch.load(weights_only=True)`` accepts them (DCP loads them with ``weights_only=False``)."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            raise CheckpointError(
                f"the checkpoint value {read_item.dest_index.fqn} needs "
                f"{found.group(1) if found else 'classes'} that torch.load(weights_only=True) "
                f"refuses: refused to load it (a crafted or foreign file could run code this way; "
                f"see README 'Trust')"
            ) from None
        value.seek(0)
        super().load_bytes(read_item, value)  # loads the same, checked bytes


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return text if len(text) <= limit else text[:limit] + "..."


def _root_cause(e: BaseException) -> BaseException:
    """The first rank's original exception inside DCP's CheckpointException (which wraps every
    rank's failure with its traceback in its message)."""
    from torch.distributed.checkpoint.api import CheckpointException

    while isinstance(e, CheckpointException) and e.failures:
        e = next(iter(sorted(e.failures.items())))[1][0]
    return e


def dcp_load(state: dict[str, Any], path: str | Path, *, no_dist: bool = False) -> None:
    """``dcp.load`` of a checkpoint directory that cannot execute code, with one-line errors.

    Uses :class:`SafeFileSystemReader` and :class:`SafeLoadPlanner`; collective unless
    ``no_dist``. Any failure (damaged file, mismatched state, refused content) is raised as a
    :class:`CheckpointError` naming the checkpoint.
    """
    # Every rank reads .metadata first: DCP would report a refused or damaged one only inside an
    # AssertionError of its own ("metadata is None; global metadata read failed: ...").
    SafeFileSystemReader(str(path)).read_metadata()
    try:
        dcp.load(
            state,
            storage_reader=SafeFileSystemReader(str(path)),
            planner=SafeLoadPlanner(),
            no_dist=no_dist,
        )
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        cause = _root_cause(e)
        if isinstance(cause, CheckpointError):
            raise CheckpointError(str(cause)) from None
        raise CheckpointError(
            f"cannot load checkpoint {path}: {type(cause).__name__}: {_first_line(cause)}"
        ) from None
