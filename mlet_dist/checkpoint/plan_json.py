"""The sharding plan of a checkpoint: written as JSON, read back when a resumed job may reuse it.

TorchRec has only a private, one-way ``ShardingPlan._serialize`` (no loader; it drops the
optional fields), so the plan is written and read here: every field of ParameterSharding that
our planner sets, explicitly. A plan with cache or key-value parameters is not written (a resume
plans anew).

Older checkpoints hold a pickled ``plan.pt``, read with an allow-list (:func:`_load_old_plan`).
:func:`check_optimizer_resharding` refuses fused optimizer state TorchRec cannot reshard.
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
from pathlib import Path
from typing import Any

from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec
from torch.distributed.remote_device import _remote_device
from torchrec.distributed.types import (
    BoundsCheckMode,
    DataType,
    EmbeddingModuleShardingPlan,
    ParameterSharding,
    ShardingPlan,
)

from mlet_dist.checkpoint.layout import OLD_PLAN_FILE, PLAN_FILE, CheckpointError, read_train_state
from mlet_dist.checkpoint.safe import RestrictedUnpickler, qualified_names
from mlet_dist.distributed.sharding import COLUMN_BASED  # resharding refused (see there)
from mlet_dist.distributed.shards import metadata_from_json, metadata_to_json

logger = logging.getLogger(__name__)

PLAN_FORMAT = "mlet_dist.sharding_plan/1"


_PLAN_BOOLS = ("enforce_hbm", "stochastic_rounding")
_PLAN_ENUMS = {"bounds_check_mode": BoundsCheckMode, "output_dtype": DataType}


def plan_to_json(plan: Any) -> dict[str, Any] | None:
    """A TorchRec ``ShardingPlan`` as JSON-able data, or None when it holds settings this format
    does not cover (cache/key-value parameters, other module plan or sharding spec types)."""
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
                "shards": None if spec is None else [metadata_to_json(m) for m in spec.shards],
            }
            for key in _PLAN_BOOLS:
                entry[key] = getattr(ps, key)
            for key in _PLAN_ENUMS:
                value = getattr(ps, key)
                entry[key] = None if value is None else value.name
            params[name] = entry
        modules[module_path] = params
    return {"format": PLAN_FORMAT, "modules": modules}


def plan_from_json(data: dict[str, Any]) -> ShardingPlan:
    """The ``ShardingPlan`` of :func:`plan_to_json` output.

    Raises:
        ValueError: not that format (a KeyError/TypeError for a malformed one).
    """
    if data.get("format") != PLAN_FORMAT:
        raise ValueError(f"plan format {data.get('format')!r}, expected {PLAN_FORMAT!r}")
    plan: dict[str, Any] = {}
    for module_path, params in data["modules"].items():
        module_plan = EmbeddingModuleShardingPlan()
        for name, e in params.items():
            shards = e["shards"]
            spec = None
            if shards is not None:
                spec = EnumerableShardingSpec([metadata_from_json(s) for s in shards])
            module_plan[name] = ParameterSharding(
                sharding_type=str(e["sharding_type"]),
                compute_kernel=str(e["compute_kernel"]),
                ranks=None if e["ranks"] is None else [int(r) for r in e["ranks"]],
                sharding_spec=spec,
                **{k: None if e.get(k) is None else bool(e[k]) for k in _PLAN_BOOLS},
                **{k: None if e.get(k) is None else enum[e[k]] for k, enum in _PLAN_ENUMS.items()},
            )
        plan[module_path] = module_plan
    return ShardingPlan(plan)


def _plan_globals() -> set[tuple[str, str]]:
    """What an old pickled ``plan.pt`` may refer to: TorchRec's plan classes and their parts."""
    return qualified_names(
        ShardingPlan,
        EmbeddingModuleShardingPlan,
        ParameterSharding,
        EnumerableShardingSpec,
        ShardMetadata,
        _remote_device,
        *_PLAN_ENUMS.values(),
    ) | {("torch", "device"), ("collections", "OrderedDict")}


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
    plan = RestrictedUnpickler(
        io.BytesIO(data), str(path), _plan_globals(), "a sharding plan"
    ).load()
    if not isinstance(plan, ShardingPlan):
        raise ValueError(f"{path} holds a {type(plan).__name__}, not a ShardingPlan")
    return plan


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
    more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
    raise CheckpointError(
        f"cannot resume {path}: it was saved on world size {saved_ws}, this job has world size "
        f"{world_size}, and TorchRec cannot reshard the fused optimizer state of column-based "
        f"tables ({bad[0]}{more}). Start over with --no-resume or a new train.run_dir, or resume "
        f"on {saved_ws} rank(s) with the same [dist] config (dist.sharding_types = "
        f"['table_wise'] or ['row_wise'] resumes on any world size)"
    )


def _describe(sharding: dict[str, Any] | None) -> str:
    if sharding is None:
        return "absent"
    shards = sharding.get("shards", [])
    ranks = sorted({s[-1] for s in shards})
    return f"{sharding['sharding_type']}, {len(shards)} shard(s) on rank(s) {ranks}"
