"""The one place that reads ``data.source``: which files a run reads, how a raw file is parsed,
the in-memory splits, which batch source a split gets, what ``mlet-dist preprocess`` reads and
what ``mlet-dist generate`` writes. The in-memory sources give Criteo-layout arrays
(:class:`~mlet_dist.data.arrays.CriteoArrays`), or with a declared schema its
:class:`~mlet_dist.data.rows.FeatureRows`.

'synthetic' and 'criteo' are Criteo TSV files ('synthetic' with a declared schema: the Parquet
files :mod:`mlet_dist.data.synthetic_schema` generates into ``data.dir``, read like 'files'), 'avazu' Avazu CSV (:mod:`mlet_dist.data.avazu`),
'movielens' MovieLens ratings with their users/movies files (:mod:`mlet_dist.data.movielens`).
'parquet' is streamed (:class:`~mlet_dist.data.parquet.ParquetBatchSource`) and has no raw
reader here.

Example::

    splits = load_splits(cfg.data)
    source = build_batch_source(cfg.data, "train", rank=rank, world_size=world, seed=cfg.train.seed,
                                arrays=splits.train, device=device)
    for i, batch in enumerate(source.batches(epoch, start_batch), start=start_batch):
        loss, _ = model(batch.to(device, non_blocking=True))
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mlet_dist.config import ConfigError, DataConfig, SyntheticConfig
from mlet_dist.data.arrays import CriteoArrays, require_rows, split_arrays
from mlet_dist.data.avazu import read_avazu_csv
from mlet_dist.data.batching import ArrayBatchSource, BatchSource, divisible_batch_size
from mlet_dist.data.columns import encode_table, iter_columns_file, read_columns_file
from mlet_dist.data.criteo import read_criteo_tsv
from mlet_dist.data.movielens import read_movielens, read_movielens_table
from mlet_dist.data.parquet import ParquetBatchSource
from mlet_dist.data.rows import FeatureRows
from mlet_dist.data.schema_shards import SchemaCodec, summary_vocabularies
from mlet_dist.data.synthetic import ensure_synthetic, generate_synthetic
from mlet_dist.data.synthetic_schema import (
    ensure_schema_synthetic,
    generate_schema_synthetic,
    generated_files,
)
from mlet_dist.data.vocab import Vocabulary
from mlet_dist.schema import FeatureSchema, schema_of

__all__ = [
    "FILE_KINDS",
    "Splits",
    "build_batch_source",
    "check_preprocessable",
    "concat_rows",
    "data_files",
    "data_inputs",
    "ensure_source_data",
    "generate_source_data",
    "is_streamed",
    "iter_source_table",
    "load_splits",
    "preprocess_inputs",
    "read_data_file",
    "read_source_file",
    "read_source_table",
    "source_table_rows",
]

FILE_KINDS = {
    "synthetic": "Criteo TSV (with a declared schema: Parquet files of `mlet-dist generate`)",
    "criteo": "Criteo TSV",
    "avazu": "Avazu CSV",
    "movielens": "MovieLens ratings.dat(.gz), with users.dat and movies.dat beside it",
    "files": "Parquet, CSV or TSV files with the declared schema's columns",
}
"""What a raw file of each source is, for messages."""


def is_streamed(data_cfg: DataConfig) -> bool:
    """Whether the source is streamed from preprocessed Parquet shards (``data.source =
    'parquet'``) rather than read into memory."""
    return data_cfg.source == "parquet"


def read_source_file(
    source: str,
    path: str | Path,
    num_embeddings_per_feature: list[int],
    max_rows: int = 0,
    in_file_order: bool = False,
    schema: FeatureSchema | None = None,
    csv_columns: list[str] | None = None,
    vocabs: Mapping[str, Vocabulary] | None = None,
) -> CriteoArrays | FeatureRows:
    """Reads one raw file of ``source`` into Criteo-layout arrays, or, with a declared
    ``schema`` (not the Criteo preset), into its :class:`~mlet_dist.data.rows.FeatureRows`
    (:func:`read_source_table`, encoded by :func:`~mlet_dist.data.columns.encode_table` with the
    ``vocabs`` of the ``ids = 'vocab'`` tables).

    ``in_file_order``: keep the rows in file order (MovieLens is otherwise sorted by time; the other
    sources are always in file order). 'parquet' is read as Criteo TSV: its shards come from
    Criteo TSV files (``mlet-dist preprocess``).
    """
    if schema is not None and not schema.criteo:
        table = read_source_table(source, path, schema, csv_columns, max_rows, in_file_order)
        return encode_table(table, schema, path, vocabs)
    if source == "files":
        raise ConfigError(
            "data.source = 'files' reads named columns through a declared schema: declare the "
            'features ([[data.sparse]], README "Your own data")'
        )
    sizes = num_embeddings_per_feature
    if source == "avazu":
        return read_avazu_csv(path, sizes, max_rows=max_rows)
    if source == "movielens":
        return read_movielens(path, sizes, max_rows=max_rows, in_file_order=in_file_order)
    return read_criteo_tsv(path, sizes, max_rows=max_rows)


def read_source_table(
    source: str,
    path: str | Path,
    schema: FeatureSchema,
    csv_columns: list[str] | None = None,
    max_rows: int = 0,
    in_file_order: bool = False,
) -> pa.Table:
    """The named columns of one raw file of a declared schema, not encoded yet ('files':
    :mod:`mlet_dist.data.columns`; 'movielens': its named columns)."""
    # 'parquet': shards preprocessed from such files; raw inputs (predict) are those files;
    # 'synthetic': the Parquet files generated in the schema's columns
    if source in ("files", "parquet", "synthetic"):
        return read_columns_file(path, schema, csv_columns or [], max_rows=max_rows)
    if source == "movielens":
        return read_movielens_table(path, max_rows=max_rows, in_file_order=in_file_order)
    raise _not_a_schema_source(source)


def iter_source_table(
    source: str,
    path: str | Path,
    schema: FeatureSchema,
    csv_columns: list[str] | None = None,
    max_rows: int = 0,
    chunk_rows: int = 1 << 16,
) -> Iterator[pa.Table]:
    """:func:`read_source_table` in chunks of at most ``chunk_rows`` rows (at least one chunk):
    files with named columns are streamed (:func:`~mlet_dist.data.columns.iter_columns_file`);
    MovieLens (a fixed, small dataset sorted by time) is read whole and cut."""
    if source in ("files", "parquet", "synthetic"):
        yield from iter_columns_file(path, schema, csv_columns or [], max_rows, chunk_rows)
        return
    if source != "movielens":
        raise _not_a_schema_source(source)
    table = read_movielens_table(path, max_rows=max_rows)
    for start in range(0, max(table.num_rows, 1), chunk_rows):
        yield table.slice(start, chunk_rows)


def source_table_rows(
    source: str,
    path: str | Path,
    schema: FeatureSchema,
    csv_columns: list[str] | None = None,
    max_rows: int = 0,
) -> int:
    """Rows :func:`iter_source_table` yields for a file: a Parquet file's footer, else a pass."""
    if source in ("files", "parquet", "synthetic") and Path(path).suffix.lower() in (
        ".parquet",
        ".pq",
    ):
        next(iter_columns_file(path, schema, csv_columns or [], 1))  # checks the columns
        rows = pq.ParquetFile(path).metadata.num_rows
        return min(rows, max_rows) if max_rows else rows
    return sum(t.num_rows for t in iter_source_table(source, path, schema, csv_columns, max_rows))


def _not_a_schema_source(source: str) -> ConfigError:
    return ConfigError(
        f"data.source = {source!r} has the fixed Criteo layout and cannot be read through "
        f"a declared schema ([[data.sparse]]): use data.source = 'files' (Parquet/CSV/TSV), "
        f"'movielens' or 'synthetic' (generated data), or remove the schema"
    )


@dataclass
class Splits:
    """The rows of each split in memory (None: streamed from Parquet)."""

    train: CriteoArrays | FeatureRows | None
    eval: CriteoArrays | FeatureRows | None
    test: CriteoArrays | FeatureRows | None

    def has(self, cfg: DataConfig, split: str) -> bool:
        arrays = getattr(self, split)
        if arrays is not None:
            return len(arrays) > 0
        return is_streamed(cfg) and any(Path(cfg.parquet_dir, split).glob("*.parquet"))


def data_files(data_cfg: DataConfig) -> list[Path]:
    """The raw files of the training data, in order (chronological for day files)."""
    if data_cfg.source == "synthetic" and data_cfg.sparse:  # a declared schema's Parquet files
        return generated_files(data_cfg.dir)
    if data_cfg.source == "synthetic":
        root = Path(data_cfg.dir)
        files = sorted(
            (
                p
                for p in root.glob("day_*")
                if p.name.split(".")[0][4:].isdigit() and ".tmp" not in p.name
            ),
            key=lambda p: int(p.name.split(".")[0][4:]),
        )
        if not files:
            raise ConfigError(
                f"no synthetic day files in {root} (data.dir); run `mlet-dist generate --config "
                f"<same config>` first, or point data.dir at generated data"
            )
        return files
    if not data_cfg.train_files:
        kind = FILE_KINDS.get(data_cfg.source, "Criteo TSV")
        raise ConfigError(f"data.source = {data_cfg.source!r} needs data.train_files ({kind})")
    return [Path(f) for f in data_cfg.train_files]


def read_data_file(data_cfg: DataConfig, path: str | Path) -> CriteoArrays:
    """Reads one raw file of the configured source: an Avazu CSV (``data.source = 'avazu'``),
    MovieLens ratings (``'movielens'``, sorted by time), both mapped onto the Criteo layout, or a
    Criteo-format TSV (every other source); :func:`mlet_dist.data.sources.read_source_file`.

    Raises:
        CriteoFormatError: the file is malformed, or holds no rows (named).
    """
    sizes = data_cfg.num_embeddings_per_feature
    arrays = read_source_file(
        data_cfg.source,
        path,
        sizes,
        max_rows=data_cfg.max_rows,
        schema=schema_of(data_cfg),
        csv_columns=data_cfg.csv_columns,
    )
    return require_rows(arrays, path)


def load_splits(data_cfg: DataConfig) -> Splits:
    """Reads the configured files and splits them (train / eval / test).

    Criteo TSV files (synthetic day files, ``source = 'criteo'``), Avazu CSV files
    (``source = 'avazu'``, :func:`mlet_dist.data.avazu.read_avazu_csv`) or MovieLens ratings
    (``source = 'movielens'``, :func:`mlet_dist.data.movielens.read_movielens`), concatenated in
    order.

    With ``data.source = 'parquet'`` nothing is read here: every split is None and is streamed
    from ``data.parquet_dir`` (:func:`build_batch_source`).
    """
    if is_streamed(data_cfg):
        return Splits(None, None, None)
    vocab = schema_of(data_cfg).vocab_tables
    if vocab:
        raise ConfigError(
            f"table {vocab[0].name!r} has ids = 'vocab': its vocabulary is built by `mlet-dist "
            f"preprocess` from the training split; preprocess first and train on the shards "
            f"(data.source = 'parquet', data.parquet_dir = the output)"
        )

    def read(paths: list[Path]) -> CriteoArrays:
        parts = [read_data_file(data_cfg, p) for p in paths]
        return type(parts[0]).concat(parts) if parts else CriteoArrays.empty()

    rows = read(data_files(data_cfg))
    if data_cfg.eval_files:
        train, _, test = split_arrays(rows, 0.0, data_cfg.test_fraction)
        return Splits(train, read([Path(p) for p in data_cfg.eval_files]), test)
    return Splits(*split_arrays(rows, data_cfg.eval_fraction, data_cfg.test_fraction))


def data_inputs(data_cfg: DataConfig) -> list[str]:
    """The paths training reads (files and data directories), for the output checks."""
    if data_cfg.source == "synthetic":
        paths = [data_cfg.dir]
    elif is_streamed(data_cfg):
        paths = [data_cfg.parquet_dir]
    else:
        paths = [*data_cfg.train_files, *data_cfg.eval_files]
    return [p for p in paths if p]


def check_preprocessable(data_cfg: DataConfig) -> None:
    """Raises ConfigError unless ``mlet-dist preprocess`` can read the source (Criteo TSV)."""
    if data_cfg.sparse:  # a declared schema: mlet_dist.data.schema_shards reads any source
        return
    if data_cfg.source in ("avazu", "movielens", "files"):
        raise ConfigError(
            f"mlet-dist preprocess reads Criteo TSV only, not data.source = {data_cfg.source!r}: "
            f"train, run and evaluate read that source into memory (no preprocessing needed); "
            f"for Criteo TSV inputs set --data.source=criteo"
        )


def preprocess_inputs(data_cfg: DataConfig) -> list[str | Path]:
    """The raw files ``mlet-dist preprocess`` reads by default: the synthetic files in
    ``data.dir`` (source = 'synthetic', :func:`data_files`) or ``data.train_files``."""
    if data_cfg.source == "synthetic":
        return list(data_files(data_cfg))
    return list(data_cfg.train_files)


def ensure_source_data(
    data_cfg: DataConfig, synthetic_cfg: SyntheticConfig, progress: bool = True
) -> bool:
    """Makes the configured data exist where it can be made: generates the synthetic data into
    ``data.dir`` unless it is there for this config (``data.source = 'synthetic'``: day files,
    :func:`~mlet_dist.data.synthetic.ensure_synthetic`, or with a declared schema Parquet files,
    :func:`~mlet_dist.data.synthetic_schema.ensure_schema_synthetic`); nothing for the other
    sources, whose files are the user's (a missing one stays an error). Returns True when it
    generated."""
    if data_cfg.source != "synthetic":
        return False
    if data_cfg.sparse:
        schema = schema_of(data_cfg)
        return ensure_schema_synthetic(data_cfg.dir, schema, synthetic_cfg, progress=progress)
    return ensure_synthetic(data_cfg.dir, synthetic_cfg, progress=progress)


def generate_source_data(
    data_cfg: DataConfig, synthetic_cfg: SyntheticConfig, progress: bool = True
) -> list[Path]:
    """``mlet-dist generate``: writes synthetic data into ``data.dir`` (whatever ``data.source``):
    Parquet files in the declared schema's columns
    (:func:`~mlet_dist.data.synthetic_schema.generate_schema_synthetic`), or Criteo-format day
    files when none is declared (:func:`~mlet_dist.data.synthetic.generate_synthetic`). Returns
    the files written."""
    if data_cfg.sparse:
        schema = schema_of(data_cfg)
        return generate_schema_synthetic(data_cfg.dir, schema, synthetic_cfg, progress=progress)
    return generate_synthetic(data_cfg.dir, synthetic_cfg, progress=progress)


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

    Returns:
        A :class:`BatchSource`.

    Raises:
        ConfigError: parquet without ``data.parquet_dir`` or without shards; an in-memory source
            without ``arrays``.
    """
    if split not in ("train", "eval", "test"):
        raise ValueError(f"split must be 'train', 'eval' or 'test', got {split!r}")
    training = split == "train" if training is None else training
    if training:
        batch_size = data_cfg.batch_size
    else:
        batch_size = divisible_batch_size(data_cfg.eval_batch_size, world_size)
    pin = device is not None and torch.device(device).type == "cuda"
    common = {
        "rank": rank,
        "world_size": world_size,
        "seed": seed,
        "shuffle": training and data_cfg.shuffle,
        "drop_last": training,
        "pin_memory": pin,
    }
    if is_streamed(data_cfg):
        if not data_cfg.parquet_dir:
            raise ConfigError(
                "data.source = 'parquet' needs data.parquet_dir (the output directory of "
                "`mlet-dist preprocess`)"
            )
        schema = schema_of(data_cfg)
        declared = not schema.criteo  # shards of mlet_dist.data.schema_shards
        codec = None
        if declared:
            vocabs = summary_vocabularies(data_cfg.parquet_dir, schema)
            codec = SchemaCodec(
                schema,
                data_cfg.frequency_threshold,
                {t: e["sha256"] for t, e in vocabs.items()},
            )
        return ParquetBatchSource(
            Path(data_cfg.parquet_dir) / split,
            batch_size,
            shuffle_buffer_rows=data_cfg.shuffle_buffer_rows,
            prefetch_batches=data_cfg.prefetch_batches,
            num_embeddings_per_feature=None if declared else data_cfg.num_embeddings_per_feature,
            codec=codec,
            **common,
        )
    if arrays is None:
        raise ConfigError(
            f"data.source = {data_cfg.source!r} reads its rows into memory: pass the {split} "
            f"split's arrays (or set data.source = 'parquet' to stream preprocessed shards)"
        )
    return ArrayBatchSource(arrays, batch_size, **common)


def concat_rows(parts: list[CriteoArrays | FeatureRows]) -> CriteoArrays | FeatureRows:
    """Row-wise concatenation of what the readers return (Criteo arrays or schema rows)."""
    return type(parts[0]).concat(parts) if parts else CriteoArrays.empty()
