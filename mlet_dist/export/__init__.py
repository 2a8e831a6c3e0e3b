"""Collapse a trained run into the served model and its serving artifacts (``mlet-dist collapse``).

Runs on every rank of a launched job (torchrun/TorchX, any world size) or in one process. The
model is built and sharded as in training
(:func:`mlet_dist.distributed.parallelize.build_sharded_model` with the run's config at the current
world size) and the latest checkpoint is loaded into it (DCP reshards). Then each rank collapses
its own W1 shards in one chunked pass (:mod:`mlet_dist.distributed.collapse`): column pieces are
summed only among the ranks that hold the same rows, and every finished chunk is written by the
rank that owns its rows, to all outputs at once (float32 rows for the checkpoint, Parquet row
groups, the quantized serving rows). No rank allocates a whole table unless it owns all of it
(table_wise). Rank 0 then builds the serving predictors (a torch.export
program; optionally an AOTInductor package and TorchScript), writes the manifest and swaps the
result in atomically.

Output directory (docs/serving.md)::

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
                                    (the kinds: mlet_dist.serving.artifacts)

Modules: :mod:`~mlet_dist.export.options` (:class:`CollapseOptions`: what to write, checked),
:mod:`~mlet_dist.export.run` (the collective pass, staging, the checks of the output),
:mod:`~mlet_dist.export.sinks` (the outputs the owners of the rows write),
:mod:`~mlet_dist.export.finish` (rank 0: predictors, report, manifest, swap),
:mod:`~mlet_dist.export.load` (the single-process loaders and the reference collapse).
"""

import warnings

from mlet_dist.export.finish import SERVING_FORMATS, StagedCollapse, build_predictor
from mlet_dist.export.load import (
    collapse_model,
    load_served,
    load_unsharded,
    mlet_module,
    served_config,
    served_model_config,
)
from mlet_dist.export.options import CollapseError, CollapseOptions
from mlet_dist.export.run import collapse_run, previous_serving_dir
from mlet_dist.export.sinks import (
    DEFAULT_ROW_GROUP_ROWS,
    SERVING_TABLE_KEY,
    ParquetSink,
)
from mlet_dist.models import SERVED_TABLE_KEY

# Rank 0 reads the finished checkpoints in single-process mode (also inside a launched job):
# DCP's notice about that mode is expected there.
warnings.filterwarnings(
    "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
)
# The collapsed rows are saved as ShardedTensors, the sharded-state type TorchRec itself uses.
warnings.filterwarnings("ignore", message="Please use DTensor instead", category=FutureWarning)

__all__ = [
    "DEFAULT_ROW_GROUP_ROWS",
    "SERVED_TABLE_KEY",
    "SERVING_FORMATS",
    "SERVING_TABLE_KEY",
    "CollapseError",
    "CollapseOptions",
    "ParquetSink",
    "StagedCollapse",
    "build_predictor",
    "collapse_model",
    "collapse_run",
    "load_served",
    "load_unsharded",
    "mlet_module",
    "previous_serving_dir",
    "served_config",
    "served_model_config",
]
