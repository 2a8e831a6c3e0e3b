"""The collapse of a run (``mlet-dist collapse``), collective: output checks and the run's lock,
the staging directory, the fused pass over every rank's W1 shards, the checkpoints written by the
owners of the rows, then rank 0's :func:`~mlet_dist.export.finish.finish_collapse`."""

from __future__ import annotations

import copy
import gc
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from mlet_dist.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_weights,
    verify_checkpoint,
)
from mlet_dist.config import Config, ConfigError
from mlet_dist.context import load_run_config
from mlet_dist.data import divisible_batch_size
from mlet_dist.data.vocab import run_vocabularies
from mlet_dist.distributed.collapse import (
    CollapsedBlock,
    MemoryTracker,
    collapse_table,
    layouts_from_state_dict,
    make_groups,
)
from mlet_dist.distributed.parallelize import build_sharded_model, init_distributed
from mlet_dist.export.finish import finish_collapse
from mlet_dist.export.load import served_config
from mlet_dist.export.sinks import (
    DEFAULT_ROW_GROUP_ROWS,
    SERVING_TABLE_KEY,
    ParquetSink,
    sharded_rows,
)
from mlet_dist.models import (
    SERVED_TABLE_KEY,
    SPARSE_PREFIX,
    W1_PREFIX,
    W2_PREFIX,
    build_dlrm,
    schema_tables,
)
from mlet_dist.modules.collapse import DEFAULT_CHUNK_ROWS
from mlet_dist.modules.mlet import inner_dim_of, served_tables
from mlet_dist.modules.quantize import check_dtype, serving_layout
from mlet_dist.schema import schema_of
from mlet_dist.serving.manifest import MANIFEST, READABLE_FORMATS, ServingError
from mlet_dist.serving.predictor import check_aoti_available
from mlet_dist.utils.files import (
    check_output,
    hold_run,
    is_no_space,
    no_space_error,
    remove_path,
)

logger = logging.getLogger(__name__)


class CollapseError(ServingError):
    """A run cannot be collapsed as asked (e.g. it has no factorized tables); the message says why."""


def previous_serving_dir(out: Path) -> str | None:
    """None when ``out`` may be replaced by a collapse: an empty directory, or a previous serving
    directory holding only the files its manifest lists; else the reason it may not."""
    if not out.is_dir():
        return f"{out} exists and is not a directory"
    manifest = out / MANIFEST
    if not manifest.is_file():
        if not any(out.iterdir()):
            return None
        return (
            f"{out} exists and is not a serving directory written by `mlet-dist collapse` "
            f"(no {MANIFEST})"
        )
    try:
        content = json.loads(manifest.read_text())
        listed = {entry["path"] for entry in content["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return f"{manifest} is not a readable serving manifest"
    if content.get("format") not in READABLE_FORMATS:
        return f"{manifest} has format {content.get('format')!r}, not one of {READABLE_FORMATS}"
    extra = sorted(
        rel
        for rel in (p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
        if rel != MANIFEST and rel not in listed
    )
    if extra:
        shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        return f"{out} holds files that `mlet-dist collapse` did not write ({shown})"
    return None


def _staging_dir(out: Path) -> Path:
    return out.with_name(f".{out.name}.tmp")


def _collapse_config(cfg: Config, world_size: int) -> Config:
    """The run's config for building the model at this world size.

    Only the planner's batch size depends on the world size here; it is rounded down to a
    multiple of it (the Trainer requires one) and does not change the parameters.
    """
    out = copy.deepcopy(cfg)
    out.data.batch_size = divisible_batch_size(cfg.data.batch_size, world_size)
    out.train.progress = False
    return out


def _barrier() -> None:
    if dist.get_world_size() > 1:
        dist.barrier()


def collapse_run(
    run_dir: str | Path,
    out_dir: str | Path,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    quantize: str = "fp32",
    allow_plain: bool = False,
    predictor: bool = True,
    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
    torchscript: bool = False,
    aoti: bool = False,
) -> dict[str, Any]:
    """Collapses the latest checkpoint of a run into a serving directory (collective).

    Call it on every rank of a launched job, or in one process. See :mod:`mlet_dist.export` for
    what is written; README "Serving contract" for the format.

    The output is checked first (rank 0, :func:`mlet_dist.utils.files.check_output`): it may not
    be, contain or lie inside the run, another run, a checkpoint or a serving directory (the run's
    own ``RUN/served``, where ``mlet-dist run`` puts it, is allowed), and an existing ``out_dir`` is
    replaced only if it is a previous serving directory (:func:`previous_serving_dir`). The run is
    read under its shared lock (a training process writing it is refused). On any failure the
    staging directory is removed; a full disk is reported as such.

    Args:
        run_dir: a training run (config.json and checkpoints/).
        out_dir: the serving directory; replaced atomically if it exists.
        (the other arguments: see :func:`_collapse_run`)

    Raises:
        OutputPathError: ``out_dir`` is refused (the message says why).
        RunLockedError: a training process holds the run.
        NoSpaceError: the file system of ``out_dir`` is full.
    """
    cfg = load_run_config(run_dir)
    env = init_distributed(cfg.dist)
    out = Path(out_dir)

    def check() -> None:
        check_output(
            out,
            what="the serving directory",
            inputs=[run_dir],
            previous=previous_serving_dir,
            allowed=[Path(run_dir) / "served"],  # where `mlet-dist run` collapses its run
            hint="choose a new --out directory",
        )

    with hold_run(run_dir, env, command="collapse", shared=True, check=check):
        try:
            return _collapse_run(
                run_dir, out, chunk_rows, quantize, allow_plain, predictor, row_group_rows,
                torchscript=torchscript, aoti=aoti,
            )  # fmt: skip
        except BaseException as e:
            # DCP's CheckpointException is a BaseException; the free space as it failed
            full = no_space_error(out) if is_no_space(e) else None
            if env.is_rank0:
                remove_path(_staging_dir(out))  # a half-written result must not fill the disk
            if full is not None:
                raise full from e
            raise


def _collapse_run(
    run_dir: str | Path,
    out_dir: str | Path,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    quantize: str = "fp32",
    allow_plain: bool = False,
    predictor: bool = True,
    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
    torchscript: bool = False,
    aoti: bool = False,
) -> dict[str, Any]:
    """The collapse itself (see :func:`collapse_run`, which checks the output and locks the run).

    Args:
        run_dir: a training run (config.json and checkpoints/).
        out_dir: the serving directory; replaced atomically if it exists.
        chunk_rows: rows per matmul/reduction/row group (bounds the temporary memory).
        quantize: serving table format of the predictor and ``serving/tables``: 'fp32' (none),
            'fp16' or 'int8' (TorchRec's row-wise int8, fp16 scale and bias).
        allow_plain: a run without factorized tables (``model.inner_dim = 0``) is refused unless
            this is set; then its tables are exported as they are.
        predictor: build the serving predictors (rank 0 assembles every serving table for them):
            ``serving/predictor.pt2`` (torch.export), and the two below when asked for.
        row_group_rows: rows per Parquet row group (the owners buffer this many).
        torchscript: also write the TorchScript predictor ``serving/predictor.pt`` (deprecated
            in torch 2.13; for torchrec.inference's C++ server).
        aoti: also write the AOTInductor package ``serving/predictor_aoti.pt2`` of the exported
            program; if AOTInductor cannot compile it, the collapse is refused (nothing is
            published) with the reason.

    Returns:
        The report (also ``OUT/collapse_report.json``), the same on every rank.

    Raises:
        CollapseError: the run has no factorized tables and ``allow_plain`` is not set.
        CheckpointError: the run has no complete checkpoint.
        AOTIError: ``aoti`` and AOTInductor could not compile the predictor.
    """
    check_dtype(quantize)
    if chunk_rows <= 0:
        raise ConfigError(f"chunk_rows must be positive, got {chunk_rows}")
    if not predictor and (torchscript or aoti):
        raise CollapseError(
            "--no-predictor (predictor=False) writes no predictor, so there is nothing to compile "
            "or script: drop it, or drop --aoti / --torchscript"
        )
    if aoti:
        check_aoti_available()
    cfg = load_run_config(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(
            f"run {run_dir} has no complete checkpoint under checkpoints/; train it first"
        )
    tables = schema_tables(cfg.model, schema_of(cfg.data))
    vocab_files = run_vocabularies(run_dir, schema_of(cfg.data))  # checked before any work
    factorized = [t.name for t in tables if inner_dim_of(t)]
    if not factorized and not allow_plain:
        raise CollapseError(
            f"run {run_dir} has no factorized tables (model.inner_dim = 0 and no "
            f"model.inner_dim_per_table): there is nothing to collapse. Its tables already are "
            f"the served d-dim tables; pass --allow-plain (allow_plain=True) to export them as "
            f"they are."
        )
    if not factorized:
        logger.warning(
            "run %s has no factorized tables: its tables are exported as they are", run_dir
        )

    env = init_distributed(cfg.dist)
    verify_checkpoint(ckpt)  # collective; before anything is written
    out = Path(out_dir)
    staging = _staging_dir(out)
    if env.is_rank0:
        out.parent.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)  # left over by a crashed attempt
        staging.mkdir()
    _barrier()

    t0 = time.perf_counter()
    model = build_sharded_model(_collapse_config(cfg, env.world_size), env)
    load_weights(model, ckpt, cfg, verify=False)
    state = model.state_dict()
    t_load = time.perf_counter() - t0

    # -- one pass over this rank's W1 shards ------------------------------------------------
    t0 = time.perf_counter()
    dims = {t.name: t.embedding_dim for t in tables}
    layouts, local = layouts_from_state_dict(state, W1_PREFIX, dims)
    groups = make_groups(list(layouts.values()))
    tracker = MemoryTracker()
    sink = ParquetSink(staging / "parquet", row_group_rows)
    collapsed: dict[str, list[CollapsedBlock]] = {}
    for name, layout in layouts.items():
        collapsed[name] = collapse_table(
            layout,
            local[name],
            state.get(W2_PREFIX + name),
            groups,
            chunk_rows=chunk_rows,
            serving_dtype=quantize,
            tracker=tracker,
            sink=sink,
            rank=env.rank,
        )
    sink.close()
    t_collapse = time.perf_counter() - t0

    # -- the checkpoints, written collectively: every rank its own rows ------------------------
    t0 = time.perf_counter()
    dense_state = {k: v for k, v in state.items() if not k.startswith(SPARSE_PREFIX)}
    served_state: dict[str, Any] = dict(dense_state)
    for name, layout in layouts.items():
        served_state[SERVED_TABLE_KEY.format(name)] = sharded_rows(
            layout, collapsed[name], lambda cb: cb.values, torch.float32, layout.dim
        )
    _check_served_keys(served_state, cfg)
    dcp.save({"model": served_state}, checkpoint_id=str(staging / "model"))
    serving_state: dict[str, Any] = {}
    if quantize != "fp32":
        for name, layout in layouts.items():
            dt, cols = serving_layout(quantize, layout.dim)
            serving_state[SERVING_TABLE_KEY.format(name)] = sharded_rows(
                layout, collapsed[name], lambda cb: cb.served, dt, cols
            )
        dcp.save(serving_state, checkpoint_id=str(staging / "serving" / "tables"))
    t_save = time.perf_counter() - t0
    # Free the sharded model before rank 0 assembles the predictor's tables.
    dense_state = {k: v.detach().cpu().clone() for k, v in dense_state.items()}
    del served_state, serving_state, collapsed, state, local, model
    gc.collect()

    rank_stats = {
        "rank": env.rank,
        "owned_rows": {n: sum(b.rows for b in lay.owned(env.rank)) for n, lay in layouts.items()},
        "memory": tracker.as_dict(),
        "seconds": {"load": t_load, "collapse": t_collapse, "save": t_save},
    }
    all_stats: list[Any] = [rank_stats]
    if env.world_size > 1:
        all_stats = [None] * env.world_size
        dist.all_gather_object(all_stats, rank_stats)
    _barrier()

    # -- rank 0: predictor, report, manifest, swap ------------------------------------------
    result: list[Any] = [None]
    if env.is_rank0:
        try:
            result[0] = finish_collapse(
                staging, out, run_dir, cfg, ckpt, tables, factorized, layouts, dense_state,
                quantize, chunk_rows, row_group_rows, predictor, env.world_size, all_stats,
                torchscript=torchscript, aoti=aoti, vocab_files=vocab_files,
            )  # fmt: skip
        except Exception as e:
            shutil.rmtree(staging, ignore_errors=True)
            result[0] = e
    if env.world_size > 1:
        dist.broadcast_object_list(result, src=0)
    if isinstance(result[0], BaseException):
        if env.is_rank0:
            raise result[0]
        raise CollapseError(f"rank 0 failed to finish the collapse into {out}: {result[0]}")
    return result[0]


def _check_served_keys(served_state: dict[str, Any], cfg: Config) -> None:
    """The saved keys must be exactly those of the plain d-dim served model (load_served)."""
    sizes = schema_of(cfg.data)
    ebc = EmbeddingBagCollection(
        tables=served_tables(schema_tables(cfg.model, sizes)), device=torch.device("meta")
    )
    expected = set(build_dlrm(served_config(cfg).model, sizes, embedding_module=ebc).state_dict())
    if expected != set(served_state):
        raise RuntimeError(
            f"collapsed state keys differ from the served model's: missing "
            f"{sorted(expected - set(served_state))}, unexpected {sorted(set(served_state) - expected)}"
        )
