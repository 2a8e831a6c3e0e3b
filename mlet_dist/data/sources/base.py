"""What a data source is: the :class:`DataSource` protocol, the in-memory :class:`RowSource` most
sources build on, and the registry (``data.source`` name -> class) that :func:`source_of` reads.

The registry is the one place that turns ``data.source`` into behaviour. A new source is a class
registered under its name (:func:`register_source`), in its own module imported by
:mod:`mlet_dist.data.sources` or beside the built-in ones (:mod:`mlet_dist.data.sources.builtin`),
plus its name among the config's choices for ``data.source``.

Example (a source of rows in a hand-written format)::

    @register_source("mine")
    class MySource(RowSource):
        file_kind = "my files"

        def read_rows(self, path, *, max_rows=0, in_file_order=False):
            return CriteoArrays(labels, dense, sparse)  # the file's rows, Criteo layout

    splits = source_of(data_cfg, schema).splits()  # data_cfg.source == "mine"
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import pyarrow as pa
import torch

from mlet_dist.config import ConfigError, DataConfig, SyntheticConfig
from mlet_dist.data.arrays import CriteoArrays, require_rows, split_arrays
from mlet_dist.data.batching import ArrayBatchSource, BatchSource, divisible_batch_size
from mlet_dist.data.columns import encode_table
from mlet_dist.data.rows import FeatureRows
from mlet_dist.data.vocab import Vocabulary
from mlet_dist.schema import FeatureSchema, schema_of

__all__ = [
    "SOURCES",
    "DataSource",
    "RowSource",
    "Rows",
    "Splits",
    "register_source",
    "source_of",
]

Rows = CriteoArrays | FeatureRows
"""What a reader returns: Criteo-layout arrays, or the rows of a declared schema."""

SPLITS = ("train", "eval", "test")


@dataclass
class Splits:
    """The rows of each split in memory (None: streamed from the Parquet shards in ``shards``)."""

    train: Rows | None
    eval: Rows | None
    test: Rows | None
    shards: Path | None = None
    """The directory holding ``<split>/*.parquet`` of a streamed source."""

    def has(self, split: str) -> bool:
        """Whether ``split`` has rows: in memory, or as streamed shards."""
        rows = getattr(self, split)
        if rows is not None:
            return len(rows) > 0
        return self.shards is not None and any(Path(self.shards, split).glob("*.parquet"))


class DataSource(Protocol):
    """What a data source can do. One class per ``data.source`` value, constructed from the
    ``[data]`` section and the run's feature schema (:func:`source_of`)."""

    name: ClassVar[str]
    """The ``data.source`` value (set by :func:`register_source`)."""
    file_kind: ClassVar[str]
    """What one raw file of the source is, for messages."""
    streamed: ClassVar[bool]
    """Batches come from preprocessed Parquet shards (no rows in memory)."""
    preprocessable: ClassVar[bool]
    """Without a declared schema its raw files are Criteo TSV, which ``mlet-dist preprocess``
    reads (with one, every source's named columns are preprocessed)."""
    cfg: DataConfig
    schema: FeatureSchema

    def __init__(self, cfg: DataConfig, schema: FeatureSchema) -> None:
        """A source of this ``[data]`` section's files, read through the run's feature schema."""

    def check(self) -> None:
        """Raises ConfigError when a ``[data]`` key this source needs is missing or wrong."""

    def inputs(self) -> list[str]:
        """The paths training reads (files and data directories), for the output checks."""

    def files(self) -> list[Path]:
        """The raw files of the training data, in order (chronological for day files)."""

    def read(
        self,
        path: str | Path,
        *,
        max_rows: int = 0,
        in_file_order: bool = False,
        vocabs: Mapping[str, Vocabulary] | None = None,
    ) -> Rows:
        """One raw file's rows: Criteo-layout arrays, or with a declared schema its rows
        (encoded with ``vocabs``, the ``ids = 'vocab'`` tables' vocabularies)."""

    def iter_read(
        self,
        path: str | Path,
        *,
        chunk_rows: int = 1 << 16,
        in_file_order: bool = False,
        vocabs: Mapping[str, Vocabulary] | None = None,
    ) -> Iterator[Rows]:
        """:meth:`read` in chunks of about ``chunk_rows`` rows, at least one (maybe empty): in
        bounded memory where the format streams (Criteo TSV, Parquet/CSV named columns)."""

    def iter_table(self, path: str | Path, chunk_rows: int = 1 << 16) -> Iterator[pa.Table]:
        """A declared schema's named columns of one raw file, not encoded yet, in chunks."""

    def table_rows(self, path: str | Path) -> int:
        """The rows :meth:`iter_table` yields for a file."""

    def splits(self) -> Splits:
        """The train / eval / test rows (None where streamed)."""

    def batch_source(
        self,
        split: str,
        *,
        rank: int,
        world_size: int,
        seed: int,
        rows: Rows | None = None,
        training: bool | None = None,
        device: torch.device | str | None = None,
    ) -> BatchSource:
        """The batches of one split (:func:`mlet_dist.data.sources.build_batch_source`)."""

    def vocabularies(self) -> dict[str, dict[str, Any]]:
        """The ``ids = 'vocab'`` vocabularies the data was mapped with ({} when none)."""

    def preprocess_inputs(self) -> list[str | Path]:
        """The raw files ``mlet-dist preprocess`` reads by default."""

    def ensure(self, synthetic_cfg: SyntheticConfig, progress: bool = True) -> bool:
        """Makes the data exist where it can be made; True when it generated."""


SOURCES: dict[str, type[DataSource]] = {}
"""The registry: ``data.source`` name -> source class."""

S = TypeVar("S", bound=type)


def register_source(name: str) -> Callable[[S], S]:
    """Class decorator registering a source class under ``name`` (its ``data.source`` value).

    Raises:
        ValueError: ``name`` is registered already.
    """

    def add(cls: S) -> S:
        if name in SOURCES:
            raise ValueError(f"data source {name!r} is registered already ({SOURCES[name]})")
        cls.name = name
        SOURCES[name] = cls
        return cls

    return add


def source_of(data_cfg: DataConfig, schema: FeatureSchema | None = None) -> DataSource:
    """The source ``data.source`` names, for this ``[data]`` section and feature schema
    (:func:`~mlet_dist.schema.schema_of` when not given).

    Raises:
        ConfigError: no source of that name is registered.
    """
    cls = SOURCES.get(data_cfg.source)
    if cls is None:
        raise ConfigError(
            f"data.source = {data_cfg.source!r} is not one of {', '.join(map(repr, SOURCES))}"
        )
    return cls(data_cfg, schema_of(data_cfg) if schema is None else schema)


def _not_a_schema_source(name: str) -> ConfigError:
    return ConfigError(
        f"data.source = {name!r} has the fixed Criteo layout and cannot be read through "
        f"a declared schema ([[data.sparse]]): use data.source = 'files' (Parquet/CSV/TSV), "
        f"'movielens' or 'synthetic' (generated data), or remove the schema"
    )


class RowSource:
    """A source of raw files read into memory: the defaults of :class:`DataSource`.

    A subclass reads its files: :meth:`read_rows` (Criteo layout, no schema declared) and, if it
    can read named columns, :meth:`read_table` (a declared schema); everything else follows.
    """

    name: ClassVar[str] = ""
    file_kind: ClassVar[str] = "Criteo TSV"
    streamed: ClassVar[bool] = False
    preprocessable: ClassVar[bool] = False

    def __init__(self, cfg: DataConfig, schema: FeatureSchema) -> None:
        self.cfg, self.schema = cfg, schema

    # --- reading one file
    def read_rows(
        self, path: str | Path, *, max_rows: int = 0, in_file_order: bool = False
    ) -> CriteoArrays:
        """One raw file in the Criteo layout (no schema declared)."""
        raise NotImplementedError(f"data source {self.name!r} reads no Criteo-layout rows")

    def read_table(
        self, path: str | Path, *, max_rows: int = 0, in_file_order: bool = False
    ) -> pa.Table:
        """One raw file's named columns of the declared schema, not encoded yet."""
        raise _not_a_schema_source(self.name)

    def read(
        self,
        path: str | Path,
        *,
        max_rows: int = 0,
        in_file_order: bool = False,
        vocabs: Mapping[str, Vocabulary] | None = None,
    ) -> Rows:
        if self.schema.criteo:
            return self.read_rows(path, max_rows=max_rows, in_file_order=in_file_order)
        table = self.read_table(path, max_rows=max_rows, in_file_order=in_file_order)
        return encode_table(table, self.schema, path, vocabs)

    def iter_read(
        self,
        path: str | Path,
        *,
        chunk_rows: int = 1 << 16,
        in_file_order: bool = False,
        vocabs: Mapping[str, Vocabulary] | None = None,
    ) -> Iterator[Rows]:
        rows = self.read(path, in_file_order=in_file_order, vocabs=vocabs)  # whole, then cut
        for start in range(0, max(len(rows), 1), chunk_rows):
            yield rows.slice(start, start + chunk_rows)

    def iter_table(self, path: str | Path, chunk_rows: int = 1 << 16) -> Iterator[pa.Table]:
        table = self.read_table(path, max_rows=self.cfg.max_rows)  # read whole, then cut
        for start in range(0, max(table.num_rows, 1), chunk_rows):
            yield table.slice(start, chunk_rows)

    def table_rows(self, path: str | Path) -> int:
        return sum(t.num_rows for t in self.iter_table(path))

    # --- the run's data
    def check(self) -> None:
        pass

    def inputs(self) -> list[str]:
        return [p for p in (*self.cfg.train_files, *self.cfg.eval_files) if p]

    def files(self) -> list[Path]:
        if not self.cfg.train_files:
            raise ConfigError(
                f"data.source = {self.name!r} needs data.train_files ({self.file_kind})"
            )
        return [Path(f) for f in self.cfg.train_files]

    def splits(self) -> Splits:
        vocab = self.schema.vocab_tables
        if vocab:
            raise ConfigError(
                f"table {vocab[0].name!r} has ids = 'vocab': its vocabulary is built by `mlet-dist "
                f"preprocess` from the training split; preprocess first and train on the shards "
                f"(data.source = 'parquet', data.parquet_dir = the output)"
            )
        cfg = self.cfg

        def read(paths: list[Path]) -> Rows:
            return concat_rows(
                [require_rows(self.read(p, max_rows=cfg.max_rows), p) for p in paths]
            )

        rows = read(self.files())
        if cfg.eval_files:
            train, _, test = split_arrays(rows, 0.0, cfg.test_fraction)
            return Splits(train, read([Path(p) for p in cfg.eval_files]), test)
        return Splits(*split_arrays(rows, cfg.eval_fraction, cfg.test_fraction))

    def batch_source(
        self,
        split: str,
        *,
        rank: int,
        world_size: int,
        seed: int,
        rows: Rows | None = None,
        training: bool | None = None,
        device: torch.device | str | None = None,
    ) -> BatchSource:
        batch_size, common = batch_settings(self.cfg, split, world_size, training, device)
        if rows is None:
            raise ConfigError(
                f"data.source = {self.name!r} reads its rows into memory: pass the {split} "
                f"split's arrays (or set data.source = 'parquet' to stream preprocessed shards)"
            )
        return ArrayBatchSource(
            rows, batch_size, rank=rank, world_size=world_size, seed=seed, **common
        )

    def vocabularies(self) -> dict[str, dict[str, Any]]:
        return {}

    def preprocess_inputs(self) -> list[str | Path]:
        return list(self.cfg.train_files)

    def ensure(self, synthetic_cfg: SyntheticConfig, progress: bool = True) -> bool:
        return False  # the files are the user's: a missing one stays an error


def batch_settings(
    cfg: DataConfig,
    split: str,
    world_size: int,
    training: bool | None,
    device: torch.device | str | None,
) -> tuple[int, dict[str, bool]]:
    """(batch size, order and pinning keywords) of a split's batch source: training order
    (shuffled per ``data.shuffle``, ``batch_size``, incomplete last batch dropped) or evaluation
    order (file order, ``eval_batch_size`` rounded down to a multiple of the world size)."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train', 'eval' or 'test', got {split!r}")
    training = split == "train" if training is None else training
    if training:
        batch_size = cfg.batch_size
    else:
        batch_size = divisible_batch_size(cfg.eval_batch_size, world_size)
    pin = device is not None and torch.device(device).type == "cuda"
    return batch_size, {
        "shuffle": training and cfg.shuffle,
        "drop_last": training,
        "pin_memory": pin,
    }


def concat_rows(parts: list[Rows]) -> Rows:
    """Row-wise concatenation of what the readers return (Criteo arrays or schema rows)."""
    return type(parts[0]).concat(parts) if parts else CriteoArrays.empty()
