"""Collapse a trained run into the served model and its serving artifacts (``mlet-dist collapse``).

Runs on every rank of a launched job (torchrun/TorchX, any world size) or in one process. The
model is built and sharded as in training (:class:`mlet_dist.train.Trainer` with the run's config at
the current world size) and the latest checkpoint is loaded into it (DCP reshards). Then each
rank collapses its own W1 shards in one chunked pass (:mod:`mlet_dist.distributed.collapse`):
column pieces are summed only among the ranks that hold the same rows, and every finished chunk
is written by the rank that owns its rows, to all outputs at once (float32 rows for the
checkpoint, Parquet row groups, the quantized serving rows). No rank allocates a whole table
unless it owns all of it (table_wise). Rank 0 then builds the serving predictors (a torch.export
program; optionally an AOTInductor package and TorchScript), writes the manifest and swaps the
result in atomically.

Output directory (README "Serving contract")::

    OUT/manifest.json        tables, files with sha256, source run and config, library versions
    OUT/config.json          the served config (model.inner_dim = 0): the collapsed architecture
    OUT/collapse_report.json per-rank memory and timings, parameter counts
    OUT/model/               DCP checkpoint {"model": DLRMTrain state dict}, plain d-dim EBC rows
                             saved as row-block ShardedTensors by their owners
    OUT/parquet/<table>/rows-<first>-<end>.parquet   id (int64), embedding (fixed_size_list<float32>[d])
    OUT/serving/tables/      DCP checkpoint of the fp16 / int8 serving rows (absent for fp32)
    OUT/serving/predictor.pt2       torch.export program of the served model (the default predictor)
    OUT/serving/predictor_aoti.pt2  AOTInductor package of it (--aoti)
    OUT/serving/predictor.pt        TorchScript predictor (--torchscript)
                                    (see mlet_dist.serving.predictor)
"""

from __future__ import annotations

import copy
import gc
import io
import json
import logging
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torchrec.models.dlrm import DLRMTrain
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from mlet_dist.checkpoint import (
    CheckpointError,
    dcp_load,
    latest_checkpoint,
    load_weights,
    read_train_state,
    verify_checkpoint,
)
from mlet_dist.config import Config, ConfigError
from mlet_dist.distributed.collapse import (
    DEFAULT_CHUNK_ROWS,
    CollapsedBlock,
    MemoryTracker,
    RowBlock,
    TableLayout,
    collapse_bytes,
    collapse_table,
    layouts_from_state_dict,
    make_groups,
)
from mlet_dist.models import build_dlrm, build_tables
from mlet_dist.modules.collapse import collapse
from mlet_dist.modules.mlet import MLETEmbeddingBagCollection, inner_dim_of, served_tables
from mlet_dist.serving.manifest import (
    ARTIFACT_FILES,
    MANIFEST,
    READABLE_FORMATS,
    ServingError,
    write_manifest,
)
from mlet_dist.modules.quantize import check_dtype, serving_layout
from mlet_dist.utils.files import (
    check_output,
    hold_run,
    is_no_space,
    no_space_error,
    remove_path,
    replace_dir,
)

logger = logging.getLogger(__name__)
# Rank 0 reads the finished checkpoints in single-process mode (also inside a launched job):
# DCP's notice about that mode is expected there.
warnings.filterwarnings(
    "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
)
# The collapsed rows are saved as ShardedTensors, the sharded-state type TorchRec itself uses.
warnings.filterwarnings("ignore", message="Please use DTensor instead", category=FutureWarning)

SPARSE_PREFIX = "model.sparse_arch."
W1_PREFIX = "model.sparse_arch.embedding_bag_collection.w1.embedding_bags."
W2_PREFIX = "model.sparse_arch.embedding_bag_collection.projection.weights."
SERVED_TABLE_KEY = "model.sparse_arch.embedding_bag_collection.embedding_bags.{}.weight"
SERVING_TABLE_KEY = "embedding_bags.{}.weight"
DEFAULT_ROW_GROUP_ROWS = 65536


SERVING_FORMATS = {
    "fp32": "float32 (rows, d): the rows of model/",
    "fp16": "float16 (rows, d), round to nearest",
    "int8": "uint8 (rows, d + 4): d values q, then fp16 scale and fp16 bias; x = q * scale + bias "
    "(fbgemm FusedNBitRowwiseQuantizedSBHalf, 8 bits: TorchRec's INT8 table format)",
}


class CollapseError(ServingError):
    """A run cannot be collapsed as asked (e.g. it has no factorized tables); the message says why."""


def served_config(cfg: Config) -> Config:
    """The config of the collapsed model: same everything, single-layer d-dim tables."""
    out = copy.deepcopy(cfg)
    out.model.inner_dim = 0
    out.model.inner_dim_per_table = {}
    return out


def load_unsharded(cfg: Config, checkpoint: Path) -> DLRMTrain:
    """Builds the model on CPU with materialized tables and loads a (sharded) checkpoint into it."""
    model = build_dlrm(
        cfg.model, cfg.data.num_embeddings_per_feature, embedding_device=torch.device("cpu")
    )
    state = {"model": model.state_dict()}
    verify_checkpoint(checkpoint, collective=False)
    dcp_load(state, checkpoint, no_dist=True)  # this process alone; one-line CheckpointError
    model.load_state_dict(state["model"])
    return model


def mlet_module(model: DLRMTrain) -> MLETEmbeddingBagCollection:
    return model.model.sparse_arch.embedding_bag_collection


@torch.no_grad()
def collapse_model(
    model: DLRMTrain, cfg: Config, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> DLRMTrain:
    """Single-process reference: the MLET tables of a whole (unsharded) model collapsed, the dense
    network copied. The served path is :func:`collapse_run`."""
    ebc = collapse(mlet_module(model), chunk_rows=chunk_rows)
    served = build_dlrm(
        served_config(cfg).model, cfg.data.num_embeddings_per_feature, embedding_module=ebc
    )
    dense = {k: v for k, v in model.state_dict().items() if not k.startswith(SPARSE_PREFIX)}
    missing, unexpected = served.load_state_dict(dense, strict=False)
    if unexpected or any(not k.startswith(SPARSE_PREFIX) for k in missing):
        raise RuntimeError(f"dense state mismatch: missing {missing}, unexpected {unexpected}")
    return served


# -- outputs written by the owners of the rows ---------------------------------------------------


class ParquetSink:
    """Writes each owned row block of a table to ``root/<table>/rows-<first>-<end>.parquet``.

    Columns ``id`` (int64) and ``embedding`` (fixed-size list of d float32). Finished chunks are
    buffered up to ``row_group_rows`` rows and written as one row group (the last group of a
    block may be smaller), so the row groups do not depend on the chunk size.
    """

    def __init__(self, root: Path, row_group_rows: int = DEFAULT_ROW_GROUP_ROWS) -> None:
        if row_group_rows <= 0:
            raise ValueError(f"row_group_rows must be positive, got {row_group_rows}")
        self.root = root
        self.row_group_rows = row_group_rows
        self._open: dict[tuple[str, int], tuple[Any, list[np.ndarray], int]] = {}
        self.files: list[Path] = []

    def __call__(self, table: str, block: RowBlock, start: int, rows: torch.Tensor) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        key = (table, block.start)
        if key not in self._open:
            path = self.root / table / f"rows-{block.start:012d}-{block.stop:012d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            d = rows.shape[1]
            schema = pa.schema(
                [("id", pa.int64()), ("embedding", pa.list_(pa.float32(), d))],
                metadata={"table": table, "dim": str(d)},
            )
            self._open[key] = (pq.ParquetWriter(path, schema), [], start)
            self.files.append(path)
        writer, pending, first = self._open[key]
        pending.append(rows.detach().cpu().numpy())  # owner rows: not overwritten later
        buffered = start + rows.shape[0] - first
        done = start + rows.shape[0] == block.stop
        if buffered >= self.row_group_rows or done:
            self._write(writer, np.concatenate(pending), first)
            pending.clear()
            self._open[key] = (writer, pending, start + rows.shape[0])
        if done:
            self._open.pop(key)[0].close()

    @staticmethod
    def _write(writer: Any, values: np.ndarray, first: int) -> None:
        import pyarrow as pa

        n, d = values.shape
        flat = pa.array(values.reshape(-1), pa.float32())
        ids = pa.array(np.arange(first, first + n, dtype=np.int64))
        embedding = pa.FixedSizeListArray.from_arrays(flat, d)
        writer.write_table(
            pa.table({"id": ids, "embedding": embedding}, schema=writer.schema),
            row_group_size=n,
        )

    def close(self) -> None:
        for writer, _, _ in self._open.values():
            writer.close()
        self._open.clear()


def _sharded(
    layout: TableLayout,
    blocks: list[CollapsedBlock],
    tensor_of: Any,
    dtype: torch.dtype,
    cols: int,
) -> Any:
    """A row-block ShardedTensor of a collapsed table: every rank contributes the blocks it owns.

    Built from the layout every rank knows (no collective); shards live on CPU.
    """
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
    from torch.distributed._shard.sharded_tensor.metadata import (
        ShardedTensorMetadata,
        TensorProperties,
    )

    def meta(b: RowBlock) -> ShardMetadata:
        return ShardMetadata([b.start, 0], [b.rows, cols], f"rank:{b.owner}/cpu")

    local = [Shard(tensor_of(cb).cpu().contiguous(), meta(cb.block)) for cb in blocks]
    metadata = ShardedTensorMetadata(
        shards_metadata=[meta(b) for b in layout.blocks],
        size=torch.Size([layout.rows, cols]),
        tensor_properties=TensorProperties(dtype=dtype, requires_grad=False),
    )
    return ShardedTensor._init_from_local_shards_and_global_metadata(local, metadata)


# -- the rank-0 steps: predictor, manifest, atomic swap -----------------------------------------


def _load_served_rows(
    out: Path, tables: list[EmbeddingBagConfig], dtype: str
) -> dict[str, torch.Tensor]:
    """Whole serving tables read back from the checkpoints just written (this process alone).

    This is the one step that holds whole tables: the predictor is a single-process model.
    """
    if dtype == "fp32":
        key = SERVED_TABLE_KEY
        state = {key.format(t.name): torch.empty(t.num_embeddings, t.embedding_dim) for t in tables}
        dcp_load({"model": state}, out / "model", no_dist=True)
    else:
        key = SERVING_TABLE_KEY
        state = {}
        for t in tables:
            dt, cols = serving_layout(dtype, t.embedding_dim)
            state[key.format(t.name)] = torch.empty(t.num_embeddings, cols, dtype=dt)
        dcp_load(state, out / "serving" / "tables", no_dist=True)
    return {t.name: state[key.format(t.name)] for t in tables}


def build_predictor(
    out: Path,
    cfg: Config,
    tables: list[EmbeddingBagConfig],
    dense_state: dict[str, torch.Tensor],
    dtype: str,
    torchscript: bool = False,
    aoti: bool = False,
) -> dict[str, Any]:
    """Writes the serving predictors of the served DLRM (TorchRec's quantized EBC) into ``out``.

    Always ``serving/predictor.pt2`` (``torch.export``); with ``aoti`` also the AOTInductor
    package ``serving/predictor_aoti.pt2``, with ``torchscript`` also ``serving/predictor.pt``.

    Returns:
        {"artifacts": {kind: manifest entry}, "signature": input_signature(...)}.

    Raises:
        AOTIError: ``aoti`` was asked for and AOTInductor could not compile the program.
    """
    from mlet_dist.serving.predictor import (
        aoti_package,
        export_predictor,
        input_signature,
        script,
        serving_model,
    )

    model = serving_model(
        served_config(cfg).model,
        cfg.data.num_embeddings_per_feature,
        tables,
        _load_served_rows(out, tables, dtype),
        dense_state,
        dtype,
    )
    (out / "serving").mkdir(parents=True, exist_ok=True)
    artifacts: dict[str, Any] = {}
    ep = export_predictor(model)
    _write_serialized(out / ARTIFACT_FILES["export"], lambda f: torch.export.save(ep, f))
    artifacts["export"] = {
        "path": ARTIFACT_FILES["export"],
        "format": "torch.export ExportedProgram (torch.export.save)",
        "load": "import torch, fbgemm_gpu; model = torch.export.load(path).module()",
        "device": "cpu",
    }
    if aoti:
        aoti_package(ep, out / ARTIFACT_FILES["aoti"])
        artifacts["aoti"] = {
            "path": ARTIFACT_FILES["aoti"],
            "format": "AOTInductor package (torch._inductor.aoti_compile_and_package)",
            "load": "import torch, fbgemm_gpu; model = torch._inductor.aoti_load_package(path)",
            "device": "cpu",
        }
    if torchscript:
        scripted = script(model)
        _write_serialized(
            out / ARTIFACT_FILES["torchscript"], lambda f: torch.jit.save(scripted, f)
        )
        artifacts["torchscript"] = {
            "path": ARTIFACT_FILES["torchscript"],
            "format": "TorchScript (torchrec.fx.symbolic_trace + torch.jit.script; deprecated)",
            "load": "import torch, fbgemm_gpu; model = torch.jit.load(path)",
            "device": "cpu",
        }
    return {"artifacts": artifacts, "signature": input_signature(ep)}


def _write_serialized(path: Path, save: Any) -> None:
    """``save(buffer)`` in memory, then the bytes written by Python: torch's zip writer aborts the
    process when the disk fills up (a C++ exception in a destructor); a Python write raises
    ENOSPC, which the collapse reports."""
    buffer = io.BytesIO()
    save(buffer)
    path.write_bytes(buffer.getvalue())


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
    out.data.batch_size = max(world_size, cfg.data.batch_size - cfg.data.batch_size % world_size)
    out.train.progress = False
    return out


def _barrier() -> None:
    if dist.get_world_size() > 1:
        dist.barrier()


def _table_report(cfg: Config) -> list[dict[str, Any]]:
    return [
        {
            "name": t.name,
            "features": list(t.feature_names),
            "rows": t.num_embeddings,
            "inner_dim": inner_dim_of(t),
            "dim": t.embedding_dim,
            "pooling": t.pooling.name,
        }
        for t in build_tables(cfg.model, cfg.data.num_embeddings_per_feature)
    ]


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

    Call it on every rank of a launched job, or in one process. See the module docstring for
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
    from mlet_dist.config import load_run_config
    from mlet_dist.distributed.parallelize import init_distributed

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
    from mlet_dist.config import load_run_config
    from mlet_dist.distributed.parallelize import build_sharded_model, init_distributed

    check_dtype(quantize)
    if chunk_rows <= 0:
        raise ConfigError(f"chunk_rows must be positive, got {chunk_rows}")
    if not predictor and (torchscript or aoti):
        raise CollapseError(
            "--no-predictor (predictor=False) writes no predictor, so there is nothing to compile "
            "or script: drop it, or drop --aoti / --torchscript"
        )
    if aoti:
        from mlet_dist.serving.predictor import check_aoti_available

        check_aoti_available()
    cfg = load_run_config(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(
            f"run {run_dir} has no complete checkpoint under checkpoints/; train it first"
        )
    tables = build_tables(cfg.model, cfg.data.num_embeddings_per_feature)
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
        served_state[SERVED_TABLE_KEY.format(name)] = _sharded(
            layout, collapsed[name], lambda cb: cb.values, torch.float32, layout.dim
        )
    _check_served_keys(served_state, cfg)
    dcp.save({"model": served_state}, checkpoint_id=str(staging / "model"))
    serving_state: dict[str, Any] = {}
    if quantize != "fp32":
        for name, layout in layouts.items():
            dt, cols = serving_layout(quantize, layout.dim)
            serving_state[SERVING_TABLE_KEY.format(name)] = _sharded(
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
            result[0] = _finish(
                staging, out, run_dir, cfg, ckpt, tables, factorized, layouts, dense_state,
                quantize, chunk_rows, row_group_rows, predictor, env.world_size, all_stats,
                torchscript=torchscript, aoti=aoti,
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
    sizes = cfg.data.num_embeddings_per_feature
    ebc = EmbeddingBagCollection(
        tables=served_tables(build_tables(cfg.model, sizes)), device=torch.device("meta")
    )
    expected = set(build_dlrm(served_config(cfg).model, sizes, embedding_module=ebc).state_dict())
    if expected != set(served_state):
        raise RuntimeError(
            f"collapsed state keys differ from the served model's: missing "
            f"{sorted(expected - set(served_state))}, unexpected {sorted(set(served_state) - expected)}"
        )


def _finish(
    staging: Path,
    out: Path,
    run_dir: str | Path,
    cfg: Config,
    ckpt: Path,
    tables: list[EmbeddingBagConfig],
    factorized: list[str],
    layouts: dict[str, TableLayout],
    dense_state: dict[str, torch.Tensor],
    quantize: str,
    chunk_rows: int,
    row_group_rows: int,
    predictor: bool,
    world_size: int,
    all_stats: list[dict[str, Any]],
    torchscript: bool = False,
    aoti: bool = False,
) -> dict[str, Any]:
    """Rank 0, after every rank's rows are written: config, predictor, report, manifest, swap."""
    served = served_config(cfg)
    (staging / "config.json").write_text(json.dumps(served.to_dict(), indent=1))
    t0 = time.perf_counter()
    plain = served_tables(tables)
    built = {"artifacts": {}, "signature": None}
    if predictor:
        built = build_predictor(
            staging, cfg, plain, dense_state, quantize, torchscript=torchscript, aoti=aoti
        )
    t_predictor = time.perf_counter() - t0
    table_info = _table_report(cfg)
    total_bytes = sum(collapse_bytes(layout) for layout in layouts.values())
    slowest = max(s["seconds"]["collapse"] for s in all_stats)
    report = {
        "source_run": str(Path(run_dir).resolve()),
        "source_checkpoint": ckpt.name,
        "factorized_tables": factorized,
        "tables": table_info,
        "training_embedding_params": sum(
            t["rows"] * (t["inner_dim"] or t["dim"]) + (t["inner_dim"] or 0) * t["dim"]
            for t in table_info
        ),
        "served_embedding_params": sum(t["rows"] * t["dim"] for t in table_info),
        "world_size": world_size,
        "chunk_rows": chunk_rows,
        "serving_dtype": quantize,
        "collapse_gb_per_s": total_bytes / slowest / 1e9 if slowest > 0 else None,
        "predictor_seconds": t_predictor,
        "ranks": all_stats,
        "layouts": {
            n: [[b.start, b.stop, b.owner, list(b.ranks)] for b in layout.blocks]
            for n, layout in layouts.items()
        },
    }
    (staging / "collapse_report.json").write_text(json.dumps(report, indent=1))
    step = read_train_state(ckpt).get("step")
    features = [f for t in plain for f in t.feature_names]
    write_manifest(
        staging,
        {
            "source": {
                "run": str(Path(run_dir).resolve()),
                "checkpoint": ckpt.name,
                "step": step,
                "config": cfg.to_dict(),
            },
            "tables": [
                {
                    "name": t["name"],
                    "features": t["features"],
                    "rows": t["rows"],
                    "d": t["dim"],
                    "pooling": t["pooling"],
                    "dtype": quantize,
                    "collapsed_from_inner_dim": t["inner_dim"],
                    "parquet": sorted(
                        f"parquet/{t['name']}/rows-{b.start:012d}-{b.stop:012d}.parquet"
                        for b in layouts[t["name"]].blocks
                    ),
                }
                for t in table_info
            ],
            "model": {
                "checkpoint": "model",
                "config": "config.json",
                "state_dict_key": "model",
                "table_key": SERVED_TABLE_KEY,
                "dtype": "fp32",
            },
            "serving": {
                "dtype": quantize,
                "tables": None if quantize == "fp32" else "serving/tables",
                "table_key": None if quantize == "fp32" else SERVING_TABLE_KEY,
                "table_format": SERVING_FORMATS[quantize],
                # the default predictor; every one written is in "artifacts"
                "predictor": ARTIFACT_FILES["export"] if predictor else None,
                "artifacts": built["artifacts"],
                # "inputs", "output", "dynamic_dims": read from the exported program
                **(built["signature"] or {"inputs": None, "output": None, "dynamic_dims": None}),
                "layout": {
                    "dense": "the 13 integer features as log(max(x, 0) + 1), missing = 0",
                    "values": "categorical ids (modulo the table rows), feature-major: all ids "
                    "of feature_order[0] for the batch, then feature_order[1], ...",
                    "lengths": "ids per (feature, sample), feature-major",
                    "output": "click probability (sigmoid of the logit)",
                },
                "feature_order": features,
                "feature_tables": {f: t.name for t in plain for f in t.feature_names},
                "dense_features": 13,
            },
            "parquet": {
                "columns": {"id": "int64", "embedding": "fixed_size_list<float32>[d]"},
                "row_group_rows": row_group_rows,
            },
        },
    )
    replace_dir(staging, out)
    logger.info(
        "collapsed %d factorized tables of %s into %s (world size %d, serving dtype %s)",
        len(factorized), run_dir, out, world_size, quantize,
    )  # fmt: skip
    return report


def load_served(out_dir: str | Path) -> tuple[DLRMTrain, Config]:
    """Loads a collapsed model written by :func:`collapse_run` (plain EBC, CPU, one process)."""
    from mlet_dist.config import load_run_config

    cfg = load_run_config(out_dir)
    tables = build_tables(cfg.model, cfg.data.num_embeddings_per_feature)
    ebc = EmbeddingBagCollection(tables=served_tables(tables), device=torch.device("cpu"))
    model = build_dlrm(cfg.model, cfg.data.num_embeddings_per_feature, embedding_module=ebc)
    state = {"model": model.state_dict()}
    dcp_load(state, Path(out_dir) / "model", no_dist=True)  # refuses a crafted .metadata
    model.load_state_dict(state["model"])
    return model, cfg
