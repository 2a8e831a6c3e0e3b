"""One reader per raw ``data.source``: every in-memory source gives Criteo-layout arrays.

'synthetic' and 'criteo' are Criteo TSV files, 'avazu' Avazu CSV (:mod:`mlet_dist.data.avazu`),
'movielens' MovieLens ratings with their users/movies files (:mod:`mlet_dist.data.movielens`).
'parquet' is streamed by :mod:`mlet_dist.data.loader` and has no raw reader here.
"""

from __future__ import annotations

from pathlib import Path

from mlet_dist.data.criteo import CriteoArrays, read_criteo_tsv

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
