"""The one place that reads ``data.source``: which files a run reads, how a raw file is parsed, and
the in-memory splits. Every in-memory source gives Criteo-layout arrays.

'synthetic' and 'criteo' are Criteo TSV files, 'avazu' Avazu CSV (:mod:`mlet_dist.data.avazu`),
'movielens' MovieLens ratings with their users/movies files (:mod:`mlet_dist.data.movielens`).
'parquet' is streamed by :mod:`mlet_dist.data.loader` and has no raw reader here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlet_dist.config import ConfigError, DataConfig
from mlet_dist.data.criteo import CriteoArrays, read_criteo_tsv, require_rows, split_arrays

FILE_KINDS = {
    "synthetic": "Criteo TSV",
    "criteo": "Criteo TSV",
    "avazu": "Avazu CSV",
    "movielens": "MovieLens ratings.dat(.gz), with users.dat and movies.dat beside it",
}
"""What a raw file of each source is, for messages."""


def read_source_file(
    source: str,
    path: str | Path,
    num_embeddings_per_feature: list[int],
    max_rows: int = 0,
    in_file_order: bool = False,
) -> CriteoArrays:
    """Reads one raw file of ``source`` into Criteo-layout arrays.

    ``in_file_order``: keep the rows in file order (MovieLens is otherwise sorted by time; the other
    sources are always in file order). 'parquet' is read as Criteo TSV: its shards come from
    Criteo TSV files (``mlet-dist preprocess``).
    """
    sizes = num_embeddings_per_feature
    if source == "avazu":
        from mlet_dist.data.avazu import read_avazu_csv

        return read_avazu_csv(path, sizes, max_rows=max_rows)
    if source == "movielens":
        from mlet_dist.data.movielens import read_movielens

        return read_movielens(path, sizes, max_rows=max_rows, in_file_order=in_file_order)
    return read_criteo_tsv(path, sizes, max_rows=max_rows)


@dataclass
class Splits:
    """The rows of each split in memory (None: streamed from Parquet)."""

    train: CriteoArrays | None
    eval: CriteoArrays | None
    test: CriteoArrays | None

    def has(self, cfg: DataConfig, split: str) -> bool:
        arrays = getattr(self, split)
        if arrays is not None:
            return len(arrays) > 0
        return cfg.source == "parquet" and any(Path(cfg.parquet_dir, split).glob("*.parquet"))


def data_files(data_cfg: DataConfig) -> list[Path]:
    """The raw files of the training data, in order (chronological for day files)."""
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
    arrays = read_source_file(data_cfg.source, path, sizes, max_rows=data_cfg.max_rows)
    return require_rows(arrays, path)


def load_splits(data_cfg: DataConfig) -> Splits:
    """Reads the configured files and splits them (train / eval / test).

    Criteo TSV files (synthetic day files, ``source = 'criteo'``), Avazu CSV files
    (``source = 'avazu'``, :func:`mlet_dist.data.avazu.read_avazu_csv`) or MovieLens ratings
    (``source = 'movielens'``, :func:`mlet_dist.data.movielens.read_movielens`), concatenated in
    order.

    With ``data.source = 'parquet'`` nothing is read here: every split is None and is streamed
    from ``data.parquet_dir`` by the loader.
    """
    if data_cfg.source == "parquet":
        return Splits(None, None, None)

    def read(paths: list[Path]) -> CriteoArrays:
        return CriteoArrays.concat([read_data_file(data_cfg, p) for p in paths])

    rows = read(data_files(data_cfg))
    if data_cfg.eval_files:
        train, _, test = split_arrays(rows, 0.0, data_cfg.test_fraction)
        return Splits(train, read([Path(p) for p in data_cfg.eval_files]), test)
    return Splits(*split_arrays(rows, data_cfg.eval_fraction, data_cfg.test_fraction))


def data_inputs(data_cfg: DataConfig) -> list[str]:
    """The paths training reads (files and data directories), for the output checks."""
    if data_cfg.source == "synthetic":
        paths = [data_cfg.dir]
    elif data_cfg.source == "parquet":
        paths = [data_cfg.parquet_dir]
    else:
        paths = [*data_cfg.train_files, *data_cfg.eval_files]
    return [p for p in paths if p]
