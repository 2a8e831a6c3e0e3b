"""Data sources: the one place that turns ``data.source`` into behaviour, through a registry
(``data.source`` name -> class, :func:`source_of`). A source (:class:`DataSource`) knows its
input files, reads a raw file into rows, makes the in-memory splits or streams its shards, gives
a split's batch source, names what ``mlet-dist preprocess`` reads and generates what it can.

The in-memory sources give Criteo-layout arrays (:class:`~mlet_dist.data.arrays.CriteoArrays`),
or with a declared schema its :class:`~mlet_dist.data.rows.FeatureRows`. The built-in sources
are in :mod:`mlet_dist.data.sources.builtin`; a new one is a class registered with
:func:`register_source` (:mod:`mlet_dist.data.sources.base`).

Example::

    source = source_of(cfg.data, schema)
    splits = source.splits()
    batches = source.batch_source("train", rank=rank, world_size=world, seed=cfg.train.seed,
                                  rows=splits.train, device=device)
    for i, batch in enumerate(batches.batches(epoch, start_batch), start=start_batch):
        loss, _ = model(batch.to(device, non_blocking=True))
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mlet_dist.config import DataConfig, SyntheticConfig
from mlet_dist.data.arrays import CriteoArrays, require_rows
from mlet_dist.data.batching import BatchSource
from mlet_dist.data.sources import builtin  # noqa: F401  (registers the built-in sources)
from mlet_dist.data.sources.base import (
    SOURCES,
    DataSource,
    Rows,
    RowSource,
    Splits,
    concat_rows,
    register_source,
    source_of,
)
from mlet_dist.data.synthetic import generate_synthetic
from mlet_dist.data.synthetic_schema import generate_schema_synthetic
from mlet_dist.schema import FeatureSchema, schema_of
from mlet_dist.utils.locks import OutputLock, OutputLockedError

logger = logging.getLogger(__name__)

__all__ = [
    "SOURCES",
    "DataSource",
    "RowSource",
    "Rows",
    "Splits",
    "build_batch_source",
    "concat_rows",
    "data_files",
    "ensure_source_data",
    "generate_source_data",
    "load_splits",
    "read_data_file",
    "register_source",
    "source_of",
]


def load_splits(data_cfg: DataConfig, schema: FeatureSchema | None = None) -> Splits:
    """Reads the configured files and splits them (train / eval / test); with a streamed source
    (``data.source = 'parquet'``) nothing is read and every split is None.

    ``schema``: the run's feature schema (:func:`~mlet_dist.schema.schema_of` when not given).
    """
    return source_of(data_cfg, schema).splits()


def data_files(data_cfg: DataConfig, schema: FeatureSchema | None = None) -> list[Path]:
    """The raw files of the training data, in order (chronological for day files)."""
    return source_of(data_cfg, schema).files()


def read_data_file(
    data_cfg: DataConfig, path: str | Path, schema: FeatureSchema | None = None
) -> Rows:
    """Reads one raw file of the configured source (at most ``data.max_rows`` rows).

    Raises:
        CriteoFormatError: the file is malformed, or holds no rows (named).
    """
    return require_rows(source_of(data_cfg, schema).read(path, max_rows=data_cfg.max_rows), path)


def build_batch_source(
    data_cfg: DataConfig,
    split: str,
    *,
    rank: int,
    world_size: int,
    seed: int,
    arrays: CriteoArrays | None = None,
    training: bool | None = None,
    device: torch.device | str | None = None,
    schema: FeatureSchema | None = None,
) -> BatchSource:
    """The batch source a config asks for: Parquet streaming or in-memory rows.

    Args:
        data_cfg: the [data] section; ``source = 'parquet'`` streams ``parquet_dir/<split>``,
            any other source batches ``arrays``.
        split: 'train', 'eval' or 'test'.
        rank: this process' rank.
        world_size: number of data-parallel ranks.
        seed: base seed of the data order (train.seed).
        arrays: the split's rows, for the in-memory sources (e.g. ``load_splits(cfg).train``).
        training: training order (shuffled per ``data.shuffle``, ``batch_size``, incomplete last
            batch dropped) or evaluation order (file order, ``eval_batch_size`` rounded down to a
            multiple of the world size, all batches). Default: ``split == 'train'``.
        device: the training device; batches are pinned when it is cuda.
        schema: the run's feature schema (:func:`~mlet_dist.schema.schema_of` when not given).

    Returns:
        A :class:`BatchSource`.

    Raises:
        ConfigError: parquet without ``data.parquet_dir`` or without shards; an in-memory source
            without ``arrays``.
    """
    return source_of(data_cfg, schema).batch_source(
        split,
        rank=rank,
        world_size=world_size,
        seed=seed,
        rows=arrays,
        training=training,
        device=device,
    )


def ensure_source_data(
    data_cfg: DataConfig,
    synthetic_cfg: SyntheticConfig,
    progress: bool = True,
    schema: FeatureSchema | None = None,
) -> bool:
    """Makes the configured data exist where it can be made: generates the synthetic data into
    ``data.dir`` unless it is there for this config (``data.source = 'synthetic'``: day files,
    :func:`~mlet_dist.data.synthetic.ensure_synthetic`, or with a declared schema Parquet files,
    :func:`~mlet_dist.data.synthetic_schema.ensure_schema_synthetic`); nothing for the other
    sources, whose files are the user's (a missing one stays an error). Returns True when it
    generated.

    Another process generating the same data (the shards of a sweep starting together) is waited
    for, then its data is used (`mlet-dist generate` itself refuses to write beside it)."""
    source = source_of(data_cfg, schema)
    try:
        return source.ensure(synthetic_cfg, progress=progress)
    except OutputLockedError as e:
        logger.info("waiting for the process generating the data: %s", e)
        OutputLock(data_cfg.dir, "generate").acquire(wait=True).release()
        return source.ensure(synthetic_cfg, progress=progress)


def generate_source_data(
    data_cfg: DataConfig,
    synthetic_cfg: SyntheticConfig,
    progress: bool = True,
    schema: FeatureSchema | None = None,
) -> list[Path]:
    """``mlet-dist generate``: writes synthetic data into ``data.dir`` (whatever ``data.source``):
    Parquet files in the declared schema's columns
    (:func:`~mlet_dist.data.synthetic_schema.generate_schema_synthetic`), or Criteo-format day
    files when none is declared (:func:`~mlet_dist.data.synthetic.generate_synthetic`). Returns
    the files written."""
    if data_cfg.sparse:
        schema = schema_of(data_cfg) if schema is None else schema
        return generate_schema_synthetic(data_cfg.dir, schema, synthetic_cfg, progress=progress)
    return generate_synthetic(data_cfg.dir, synthetic_cfg, progress=progress)
