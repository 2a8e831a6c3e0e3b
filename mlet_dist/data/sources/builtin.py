"""The built-in data sources, one class per ``data.source`` value, registered by name.

'criteo' Criteo TSV, 'avazu' Avazu CSV (:mod:`mlet_dist.data.avazu`) and 'movielens' MovieLens
ratings (:mod:`mlet_dist.data.movielens`; with a declared schema its named columns) are read into
memory, mapped onto the Criteo layout; 'files' reads Parquet/CSV/TSV files with named columns
through a declared schema (:mod:`mlet_dist.data.columns`); 'synthetic' is generated into
``data.dir`` (Criteo-format day files, :mod:`mlet_dist.data.synthetic`, or with a declared schema
Parquet files in its columns, :mod:`mlet_dist.data.synthetic_schema`); 'parquet' streams the
shards of ``mlet-dist preprocess`` (:class:`~mlet_dist.data.parquet.ParquetBatchSource`), and its
raw files (for preprocessing, ``evaluate --data`` and ``predict``) are Criteo TSV or, with a
declared schema, files with named columns.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mlet_dist.config import ConfigError, SyntheticConfig
from mlet_dist.data.arrays import CriteoArrays
from mlet_dist.data.avazu import read_avazu_csv
from mlet_dist.data.batching import BatchSource
from mlet_dist.data.columns import encode_table, iter_columns_file, read_columns_file
from mlet_dist.data.criteo import iter_criteo_tsv, read_criteo_tsv
from mlet_dist.data.movielens import read_movielens, read_movielens_table
from mlet_dist.data.parquet import ParquetBatchSource
from mlet_dist.data.schema_shards import SchemaCodec, summary_vocabularies
from mlet_dist.data.sources.base import (
    Rows,
    RowSource,
    Splits,
    batch_settings,
    register_source,
)
from mlet_dist.data.synthetic import ensure_synthetic
from mlet_dist.data.synthetic_schema import ensure_schema_synthetic, generated_files
from mlet_dist.data.vocab import Vocabulary

__all__ = [
    "AvazuSource",
    "CriteoSource",
    "FilesSource",
    "MovieLensSource",
    "ParquetSource",
    "SyntheticSource",
]


class _CriteoTsv(RowSource):
    """Raw files in the Criteo layout are Criteo TSV."""

    preprocessable = True

    def read_rows(
        self, path: str | Path, *, max_rows: int = 0, in_file_order: bool = False
    ) -> CriteoArrays:
        return read_criteo_tsv(path, self.cfg.num_embeddings_per_feature, max_rows=max_rows)

    def iter_read(
        self,
        path: str | Path,
        *,
        chunk_rows: int = 1 << 16,
        in_file_order: bool = False,
        vocabs: Mapping[str, Vocabulary] | None = None,
    ) -> Iterator[Rows]:
        if not self.schema.criteo:
            yield from super().iter_read(
                path, chunk_rows=chunk_rows, in_file_order=in_file_order, vocabs=vocabs
            )
            return
        sizes, max_rows = self.cfg.num_embeddings_per_feature, self.cfg.max_rows
        # TSV blocks of about chunk_rows lines (a Criteo line is ~100-250 bytes)
        chunks = iter_criteo_tsv(path, sizes, max_rows=max_rows, chunk_bytes=160 * chunk_rows)
        empty = True
        for chunk in chunks:
            empty = False
            yield chunk
        if empty:
            yield CriteoArrays.concat([])


class _Columns(RowSource):
    """With a declared schema, raw files are Parquet/CSV/TSV files with named columns, streamed."""

    def read_table(
        self, path: str | Path, *, max_rows: int = 0, in_file_order: bool = False
    ) -> pa.Table:
        return read_columns_file(path, self.schema, self.cfg.csv_columns, max_rows=max_rows)

    def iter_read(
        self,
        path: str | Path,
        *,
        chunk_rows: int = 1 << 16,
        in_file_order: bool = False,
        vocabs: Mapping[str, Vocabulary] | None = None,
    ) -> Iterator[Rows]:
        if self.schema.criteo:  # Criteo TSV (_CriteoTsv)
            yield from super().iter_read(
                path, chunk_rows=chunk_rows, in_file_order=in_file_order, vocabs=vocabs
            )
            return
        for table in self.iter_table(path, chunk_rows):
            yield encode_table(table, self.schema, path, vocabs)

    def iter_table(self, path: str | Path, chunk_rows: int = 1 << 16) -> Iterator[pa.Table]:
        cfg = self.cfg
        yield from iter_columns_file(path, self.schema, cfg.csv_columns, cfg.max_rows, chunk_rows)

    def table_rows(self, path: str | Path) -> int:
        if Path(path).suffix.lower() not in (".parquet", ".pq"):
            return super().table_rows(path)
        next(iter_columns_file(path, self.schema, self.cfg.csv_columns, 1))  # checks the columns
        rows = pq.ParquetFile(path).metadata.num_rows
        return min(rows, self.cfg.max_rows) if self.cfg.max_rows else rows


@register_source("synthetic")
class SyntheticSource(_Columns, _CriteoTsv):
    """Generated into ``data.dir``: Criteo-format day files, or with a declared schema Parquet
    files in its columns (read as 'files')."""

    file_kind = "Criteo TSV (with a declared schema: Parquet files of `mlet-dist generate`)"

    def inputs(self) -> list[str]:
        return [self.cfg.dir] if self.cfg.dir else []

    def files(self) -> list[Path]:
        if not self.schema.criteo:
            return generated_files(self.cfg.dir)
        root = Path(self.cfg.dir)
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

    def preprocess_inputs(self) -> list[str | Path]:
        return list(self.files())

    def ensure(self, synthetic_cfg: SyntheticConfig, progress: bool = True) -> bool:
        if self.schema.criteo:
            return ensure_synthetic(self.cfg.dir, synthetic_cfg, progress=progress)
        return ensure_schema_synthetic(self.cfg.dir, self.schema, synthetic_cfg, progress=progress)


@register_source("criteo")
class CriteoSource(_CriteoTsv):
    """Criteo TSV files (``data.train_files``)."""


@register_source("avazu")
class AvazuSource(RowSource):
    """Avazu CSV files, mapped onto the Criteo layout."""

    file_kind = "Avazu CSV"

    def read_rows(
        self, path: str | Path, *, max_rows: int = 0, in_file_order: bool = False
    ) -> CriteoArrays:
        return read_avazu_csv(path, self.cfg.num_embeddings_per_feature, max_rows=max_rows)


@register_source("movielens")
class MovieLensSource(RowSource):
    """MovieLens ratings with the users/movies files beside them, sorted by time unless
    ``in_file_order``: mapped onto the Criteo layout, or a declared schema's named columns (read
    whole, a fixed small dataset)."""

    file_kind = "MovieLens ratings.dat(.gz), with users.dat and movies.dat beside it"

    def read_rows(
        self, path: str | Path, *, max_rows: int = 0, in_file_order: bool = False
    ) -> CriteoArrays:
        sizes = self.cfg.num_embeddings_per_feature
        return read_movielens(path, sizes, max_rows=max_rows, in_file_order=in_file_order)

    def read_table(
        self, path: str | Path, *, max_rows: int = 0, in_file_order: bool = False
    ) -> pa.Table:
        return read_movielens_table(path, max_rows=max_rows, in_file_order=in_file_order)


@register_source("parquet")
class ParquetSource(_Columns, _CriteoTsv):
    """The shards of ``mlet-dist preprocess`` in ``data.parquet_dir``, streamed; its raw files
    are Criteo TSV, or with a declared schema files with named columns."""

    file_kind = "Criteo TSV (with a declared schema: Parquet, CSV or TSV files), preprocessed"
    streamed = True

    def check(self) -> None:  # on every use of the shards
        if not self.cfg.parquet_dir:
            raise ConfigError(
                "data.source = 'parquet' needs data.parquet_dir (the output directory of "
                "`mlet-dist preprocess`)"
            )

    def inputs(self) -> list[str]:
        return [self.cfg.parquet_dir] if self.cfg.parquet_dir else []

    def splits(self) -> Splits:
        self.check()
        return Splits(None, None, None, shards=Path(self.cfg.parquet_dir))

    def vocabularies(self) -> dict[str, dict[str, Any]]:
        self.check()
        return summary_vocabularies(self.cfg.parquet_dir, self.schema)

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
        self.check()
        cfg, schema = self.cfg, self.schema
        codec = None
        if not schema.criteo:  # shards of mlet_dist.data.schema_shards
            vocabs = self.vocabularies()
            codec = SchemaCodec(
                schema, cfg.frequency_threshold, {t: e["sha256"] for t, e in vocabs.items()}
            )
        return ParquetBatchSource(
            Path(cfg.parquet_dir) / split,
            batch_size,
            shuffle_buffer_rows=cfg.shuffle_buffer_rows,
            prefetch_batches=cfg.prefetch_batches,
            num_embeddings_per_feature=cfg.num_embeddings_per_feature if schema.criteo else None,
            codec=codec,
            rank=rank,
            world_size=world_size,
            seed=seed,
            **common,
        )


@register_source("files")
class FilesSource(_Columns):
    """Parquet, CSV or TSV files with named columns, read through the declared schema."""

    file_kind = "Parquet, CSV or TSV files with the declared schema's columns"

    def read_rows(
        self, path: str | Path, *, max_rows: int = 0, in_file_order: bool = False
    ) -> CriteoArrays:
        raise ConfigError(
            "data.source = 'files' reads named columns through a declared schema: declare the "
            "features ([[data.sparse]], docs/own-data.md)"
        )
