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
    RUN/checkpoints.earlier-1/       an earlier run's checkpoints, moved aside by a run started
                                     over in the same directory (--no-resume)
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

from mlet_dist.checkpoint.integrity import INTEGRITY_FORMAT, verify_checkpoint, write_integrity
from mlet_dist.checkpoint.layout import (
    DAMAGED_SUFFIX,
    INTEGRITY_FILE,
    OLD_PLAN_FILE,
    PLAN_FILE,
    TRAIN_STATE,
    CheckpointError,
    checkpoint_dir,
    read_train_state,
)
from mlet_dist.checkpoint.plan_json import (
    COLUMN_BASED,
    PLAN_FORMAT,
    check_optimizer_resharding,
    plan_from_json,
    plan_to_json,
    saved_plan,
)
from mlet_dist.checkpoint.safe import SafeFileSystemReader, SafeLoadPlanner, dcp_load
from mlet_dist.checkpoint.store import (
    MODEL_KEYS,
    RESUME_KEYS,
    check_model_config,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    model_config_diff,
    resume_checkpoint,
    save_checkpoint,
    set_aside_checkpoints,
)

__all__ = [
    "COLUMN_BASED",
    "DAMAGED_SUFFIX",
    "INTEGRITY_FILE",
    "INTEGRITY_FORMAT",
    "MODEL_KEYS",
    "OLD_PLAN_FILE",
    "PLAN_FILE",
    "PLAN_FORMAT",
    "RESUME_KEYS",
    "TRAIN_STATE",
    "CheckpointError",
    "SafeFileSystemReader",
    "SafeLoadPlanner",
    "check_model_config",
    "check_optimizer_resharding",
    "checkpoint_dir",
    "dcp_load",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_weights",
    "model_config_diff",
    "plan_from_json",
    "plan_to_json",
    "read_train_state",
    "resume_checkpoint",
    "save_checkpoint",
    "saved_plan",
    "set_aside_checkpoints",
    "verify_checkpoint",
    "write_integrity",
]
