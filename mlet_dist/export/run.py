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
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from tqdm import tqdm

from mlet_dist.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_weights,
    verify_checkpoint,
)
from mlet_dist.config import Config, ModelConfig
from mlet_dist.context import RunContext
from mlet_dist.data import divisible_batch_size
from mlet_dist.data.vocab import run_vocabularies
from mlet_dist.distributed.collapse import (
    CollapsedBlock,
    MemoryTracker,
    TableLayout,
    collapse_table,
    layouts_from_state_dict,
    make_groups,
)
from mlet_dist.distributed.parallelize import DistEnv, build_sharded_model
from mlet_dist.export.finish import StagedCollapse, finish_collapse
from mlet_dist.export.load import served_model_config
from mlet_dist.export.options import CollapseError, CollapseOptions
from mlet_dist.export.sinks import SERVING_TABLE_KEY, ParquetSink, sharded_rows
from mlet_dist.models import (
    SERVED_TABLE_KEY,
    SPARSE_PREFIX,
    W1_PREFIX,
    W2_PREFIX,
    build_dlrm,
    schema_tables,
)
from mlet_dist.modules.mlet import inner_dim_of, served_tables
from mlet_dist.modules.quantize import serving_layout
from mlet_dist.schema import FeatureSchema
from mlet_dist.serving.manifest import MANIFEST, READABLE_FORMATS
from mlet_dist.utils.files import (
    check_output,
    is_no_space,
    no_space_error,
    remove_path,
    resolve,
    staging_dir,
)

logger = logging.getLogger(__name__)


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
    run_dir: str | Path, out_dir: str | Path, options: CollapseOptions | None = None
) -> dict[str, Any]:
    """Collapses the latest checkpoint of a run into a serving directory (collective).

    Call it on every rank of a launched job, or in one process. See :mod:`mlet_dist.export` for
    what is written. ``out_dir`` must not be or lie inside the run or another input directory (the
    run's own ``RUN/served``, where ``mlet-dist run`` puts it, is allowed), and an existing
    ``out_dir`` is replaced only if it is a previous serving directory
    (:func:`previous_serving_dir`); a symlink ``out_dir`` is resolved (the directory it points to
    is written, the link stays). The run is read under its shared lock (a training process
    writing it is refused) and ``out_dir`` is written under its output lock (a second collapse
    into it is refused, naming the first's pid and host). Each attempt fills its own staging
    directory, swapped in whole at the end; on any failure it is removed, and a full disk is
    reported as such.

    Args:
        run_dir: a training run (config.json and checkpoints/).
        out_dir: the serving directory; replaced atomically if it exists.
        options: what to write (:class:`~mlet_dist.export.options.CollapseOptions`; default: fp32
            tables, the torch.export predictor).

    Returns:
        The report (also ``OUT/collapse_report.json``), the same on every rank.

    Raises:
        OutputPathError: ``out_dir`` is refused (the message says why).
        RunLockedError: a training process holds the run.
        OutputLockedError: another process is writing ``out_dir``.
        NoSpaceError: the file system of ``out_dir`` is full.
        CollapseError: the run has no factorized tables and ``options.allow_plain`` is not set,
            or the options contradict each other.
        CheckpointError: the run has no complete checkpoint.
        AOTIError: 'aoti' was asked for and AOTInductor could not compile the predictor.
    """
    options = options or CollapseOptions()
    ctx = RunContext.of_run(run_dir)  # config, schema, distributed env: resolved once
    cfg, schema, env = ctx.cfg, ctx.schema, ctx.env

    def check() -> None:
        check_output(
            out_dir,
            what="the serving directory",
            inputs=[run_dir],
            previous=previous_serving_dir,
            allowed=[Path(run_dir) / "served"],  # where `mlet-dist run` collapses its run
            hint="choose a new --out directory",
        )

    with ctx.hold("collapse", shared=True, check=check, output=out_dir):
        out = resolve(out_dir)  # checked: a symlink --out is the directory it points to
        staging: Path | None = None  # this attempt's, once made
        try:
            options.check()
            source = _source(run_dir, cfg.model, schema, options.allow_plain)
            verify_checkpoint(source[0])  # collective; before anything is written
            staging = _new_staging(out, env)
            staged = _collapse_shards(run_dir, out, staging, source, cfg, schema, env, options)
            return _finish_on_rank0(staged, cfg, schema, env, options)
        except BaseException as e:
            # DCP's CheckpointException is a BaseException; the free space as it failed
            full = no_space_error(out_dir) if is_no_space(e) else None
            if env.is_rank0 and staging is not None:
                remove_path(staging)  # a half-written result must not fill the disk
            if full is not None:
                raise full from e
            raise


def _source(
    run_dir: str | Path, model_cfg: ModelConfig, schema: FeatureSchema, allow_plain: bool
) -> tuple[Path, list[EmbeddingBagConfig], list[str], dict[str, Path]]:
    """(checkpoint, tables, factorized table names, vocabulary files) of the run, checked before
    any work.

    Raises:
        CheckpointError: the run has no complete checkpoint.
        CollapseError: no table is factorized and ``allow_plain`` is not set.
    """
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(
            f"run {run_dir} has no complete checkpoint under checkpoints/; train it first"
        )
    tables = schema_tables(model_cfg, schema)
    vocab_files = run_vocabularies(run_dir, schema)
    factorized = [t.name for t in tables if inner_dim_of(t)]
    if not factorized and not allow_plain:
        raise CollapseError(
            f"run {run_dir} has no factorized tables (model.inner_dim = 0, or every table below "
            f"model.inner_dim_min_rows, and no model.inner_dim_per_table with k > 0): there is "
            f"nothing to collapse. Its tables already are "
            f"the served d-dim tables; pass --allow-plain (allow_plain=True) to export them as "
            f"they are."
        )
    if not factorized:
        logger.warning(
            "run %s has no factorized tables: its tables are exported as they are", run_dir
        )
    return ckpt, tables, factorized, vocab_files


def _new_staging(out: Path, env: DistEnv) -> Path:
    """This attempt's staging directory (:func:`~mlet_dist.utils.files.staging_dir`): made by
    rank 0, its name sent to every rank."""
    name: list[Any] = [str(staging_dir(out)) if env.is_rank0 else None]
    if env.world_size > 1:
        dist.broadcast_object_list(name, src=0)
    return Path(name[0])


def _collapse_shards(
    run_dir: str | Path,
    out: Path,
    staging: Path,
    source: tuple[Path, list[EmbeddingBagConfig], list[str], dict[str, Path]],
    cfg: Config,
    schema: FeatureSchema,
    env: DistEnv,
    options: CollapseOptions,
) -> StagedCollapse:
    """Every rank: loads the sharded model, collapses its own W1 shards in one chunked pass and
    writes the rows it owns (Parquet, the served checkpoint, the serving tables) into this
    attempt's ``staging`` directory. ``source``: :func:`_source`'s checked run."""
    ckpt, tables, factorized, vocab_files = source

    t0 = time.perf_counter()
    model = build_sharded_model(_collapse_config(cfg, env.world_size), env)
    load_weights(model, ckpt, cfg, verify=False)
    state = model.state_dict()
    t_load = time.perf_counter() - t0

    t0 = time.perf_counter()
    tracker = MemoryTracker()
    layouts, collapsed = _collapse_pass(state, tables, staging, env.rank, tracker, options)
    t_collapse = time.perf_counter() - t0

    t0 = time.perf_counter()
    dense_state = {k: v for k, v in state.items() if not k.startswith(SPARSE_PREFIX)}
    _save_checkpoints(staging, dense_state, layouts, collapsed, cfg.model, schema, options.quantize)
    t_save = time.perf_counter() - t0
    # Free the sharded model before rank 0 assembles the predictor's tables.
    dense_state = {k: v.detach().cpu().clone() for k, v in dense_state.items()}
    del collapsed, state, model
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
    return StagedCollapse(
        run_dir=run_dir,
        checkpoint=ckpt,
        staging=staging,
        out=out,
        tables=tables,
        factorized=factorized,
        layouts=layouts,
        dense_state=dense_state,
        rank_stats=all_stats,
        vocab_files=vocab_files,
    )


def _collapse_pass(
    state: dict[str, Any],
    tables: list[EmbeddingBagConfig],
    staging: Path,
    rank: int,
    tracker: MemoryTracker,
    options: CollapseOptions,
) -> tuple[dict[str, TableLayout], dict[str, list[CollapsedBlock]]]:
    """One pass over this rank's W1 shards: (layouts, the collapsed blocks this rank owns); the
    owned rows are also written to ``staging/parquet``."""
    dims = {t.name: t.embedding_dim for t in tables}
    layouts, local = layouts_from_state_dict(state, W1_PREFIX, dims)
    groups = make_groups(list(layouts.values()))
    sink = ParquetSink(staging / "parquet", options.row_group_rows)
    collapsed: dict[str, list[CollapsedBlock]] = {}
    bar = tqdm(  # rank 0, on a terminal
        layouts.items(),
        desc="collapse",
        unit=" tables",
        leave=False,
        disable=True if rank else None,
    )
    for name, layout in bar:
        collapsed[name] = collapse_table(
            layout,
            local[name],
            state.get(W2_PREFIX + name),
            groups,
            chunk_rows=options.chunk_rows,
            serving_dtype=options.quantize,
            tracker=tracker,
            sink=sink,
            rank=rank,
        )
    sink.close()
    return layouts, collapsed


def _save_checkpoints(
    staging: Path,
    dense_state: dict[str, torch.Tensor],
    layouts: dict[str, TableLayout],
    collapsed: dict[str, list[CollapsedBlock]],
    model_cfg: ModelConfig,
    schema: FeatureSchema,
    quantize: str,
) -> None:
    """The served checkpoint ``model/`` and (fp16/int8) ``serving/tables``, written collectively:
    every rank its own rows."""
    served_state: dict[str, Any] = dict(dense_state)
    for name, layout in layouts.items():
        served_state[SERVED_TABLE_KEY.format(name)] = sharded_rows(
            layout, collapsed[name], lambda cb: cb.values, torch.float32, layout.dim
        )
    _check_served_keys(served_state, model_cfg, schema)
    dcp.save({"model": served_state}, checkpoint_id=str(staging / "model"))
    if quantize == "fp32":
        return
    serving_state: dict[str, Any] = {}
    for name, layout in layouts.items():
        dt, cols = serving_layout(quantize, layout.dim)
        serving_state[SERVING_TABLE_KEY.format(name)] = sharded_rows(
            layout, collapsed[name], lambda cb: cb.served, dt, cols
        )
    dcp.save(serving_state, checkpoint_id=str(staging / "serving" / "tables"))


def _finish_on_rank0(
    staged: StagedCollapse,
    cfg: Config,
    schema: FeatureSchema,
    env: DistEnv,
    options: CollapseOptions,
) -> dict[str, Any]:
    """Rank 0 finishes (predictor, report, manifest, swap); every rank returns its report or
    raises its error."""
    result: list[Any] = [None]
    if env.is_rank0:
        try:
            result[0] = finish_collapse(staged, cfg, schema, options)
        except Exception as e:
            shutil.rmtree(staged.staging, ignore_errors=True)
            result[0] = e
    if env.world_size > 1:
        dist.broadcast_object_list(result, src=0)
    if isinstance(result[0], BaseException):
        if env.is_rank0:
            raise result[0]
        raise CollapseError(f"rank 0 failed to finish the collapse into {staged.out}: {result[0]}")
    return result[0]


def _check_served_keys(
    served_state: dict[str, Any], model_cfg: ModelConfig, schema: FeatureSchema
) -> None:
    """The saved keys must be exactly those of the plain d-dim served model (load_served)."""
    ebc = EmbeddingBagCollection(
        tables=served_tables(schema_tables(model_cfg, schema)), device=torch.device("meta")
    )
    served = build_dlrm(served_model_config(model_cfg), schema, embedding_module=ebc)
    expected = set(served.state_dict())
    if expected != set(served_state):
        raise RuntimeError(
            f"collapsed state keys differ from the served model's: missing "
            f"{sorted(expected - set(served_state))}, unexpected {sorted(set(served_state) - expected)}"
        )
