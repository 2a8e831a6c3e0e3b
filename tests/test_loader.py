"""Oracle tests of the batch sources (mlet_dist.data.batching, mlet_dist.data.parquet).

Parquet shards are written here with numbered rows (``cat_0`` = the row's global id, the other
columns functions of it), so every batch can be checked against the rows it claims to hold, and
coverage, disjointness and resumption can be checked exactly. Ranks are simulated in one process.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mlet_dist.config import ConfigError, DataConfig
from mlet_dist.data import (
    DEFAULT_CAT_NAMES,
    ArrayBatchSource,
    BatchSource,
    CriteoArrays,
    ParquetBatchSource,
    build_batch_source,
    make_batches,
    num_batches,
    parquet_schema,
    read_criteo_tsv,
)
from mlet_dist.data.preprocess import PreprocessSettings, preprocess

SIZES = [2**31] + [1000] * 25
FILE_ROWS = [1000, 537, 1, 250]  # uneven files; row groups of 100 leave uneven last groups
ROW_GROUP = 100
SHARED = Path(__file__).resolve().parents[2] / "shared/data/criteo_kaggle_sample"


def numbered(ids: np.ndarray) -> CriteoArrays:
    """Row content as a function of the row id (what the shards below hold)."""
    ids = np.asarray(ids, dtype=np.int64)
    sparse = (ids[:, None] * 31 + np.arange(26)) % 1000
    sparse[:, 0] = ids
    return CriteoArrays(
        labels=(ids % 3 == 0).astype(np.float32),
        dense=(ids[:, None] + np.arange(13) / 16).astype(np.float32),
        sparse=sparse,
    )


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards") / "train"
    root.mkdir()
    schema = parquet_schema(SIZES)
    first = 0
    for k, n in enumerate(FILE_ROWS):
        a = numbered(np.arange(first, first + n))
        columns = [pa.array(a.labels.astype(np.int8))]
        columns += [pa.array(a.dense[:, i].copy()) for i in range(13)]
        columns += [pa.array(a.sparse[:, j].astype(np.int32)) for j in range(26)]
        pq.write_table(
            pa.Table.from_arrays(columns, schema=schema),
            root / f"part_{k}.parquet",
            row_group_size=ROW_GROUP,
        )
        first += n
    (root / ".part_9.parquet.x.tmp").write_bytes(b"an interrupted write, ignored")
    return root


N = sum(FILE_ROWS)


def ids_of(batch) -> np.ndarray:
    return batch.sparse_features["cat_0"].values().numpy()


def check_batch(batch) -> None:
    """The batch holds exactly the rows its ids say, in make_batches' layout."""
    ids = ids_of(batch)
    want = numbered(ids)
    kjt = batch.sparse_features
    assert kjt.keys() == list(DEFAULT_CAT_NAMES)
    assert kjt.values().dtype == torch.int64 and batch.labels.dtype == torch.float32
    assert batch.dense_features.dtype == torch.float32 and batch.dense_features.shape == (
        len(ids),
        13,
    )
    assert torch.equal(kjt.lengths(), torch.ones(26 * len(ids), dtype=kjt.lengths().dtype))
    np.testing.assert_array_equal(kjt.values().numpy(), want.sparse.T.reshape(-1))
    np.testing.assert_array_equal(batch.dense_features.numpy(), want.dense)
    np.testing.assert_array_equal(batch.labels.numpy(), want.labels)


def source(shards, world_size=1, rank=0, **kw) -> ParquetBatchSource:
    kw.setdefault("seed", 5)
    kw.setdefault("shuffle_buffer_rows", 130)
    kw.setdefault("prefetch_batches", 2)
    return ParquetBatchSource(shards, 48, rank=rank, world_size=world_size, **kw)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("shuffle", [True, False])
def test_every_row_exactly_once_across_ranks(shards, world_size, shuffle):
    per_rank = []
    for rank in range(world_size):
        src = source(shards, world_size, rank, shuffle=shuffle, drop_last=False)
        batches = list(src.batches(epoch=1))
        for b in batches:
            check_batch(b)
        per_rank.append(batches)
        # The same count as make_batches would give every rank for the same rows.
        assert src.num_batches() == len(batches)
        assert len(batches) == num_batches(N, 48, drop_last=False, world_size=world_size)
    # Same number of batches, and the same size batch by batch, on every rank (DMP is collective).
    sizes = [[b.labels.shape[0] for b in batches] for batches in per_rank]
    assert all(s == sizes[0] for s in sizes)
    assert all(s == 48 // world_size for s in sizes[0][:-1])
    seen = np.concatenate([ids_of(b) for batches in per_rank for b in batches])
    assert len(seen) == len(set(seen.tolist()))  # nothing twice
    assert len(seen) == N - N % world_size  # all but fewer than world_size rows
    if world_size == 1:
        assert sorted(seen.tolist()) == list(range(N))
    order = np.concatenate([ids_of(b) for b in per_rank[0]])
    assert (np.diff(order) > 0).all() != shuffle  # file order iff not shuffled


def test_drop_last_counts(shards):
    for world_size in (1, 2, 3):
        counts = {
            len(list(source(shards, world_size, r, drop_last=True).batches(0)))
            for r in range(world_size)
        }
        assert counts == {N // 48}


def recording_reads(monkeypatch) -> list[tuple[str, int]]:
    """Records every (file, row group) the loader reads."""
    reads: list[tuple[str, int]] = []

    class Recording(pq.ParquetFile):
        def __init__(self, source, *args, **kwargs):
            super().__init__(source, *args, **kwargs)
            self.path = str(source)

        def read_row_group(self, i, *args, **kwargs):
            reads.append((self.path, i))
            return super().read_row_group(i, *args, **kwargs)

    monkeypatch.setattr(pq, "ParquetFile", Recording)
    return reads


def test_ranks_read_disjoint_row_groups(shards, monkeypatch):
    """Each rank reads only the row groups of its contiguous range; neighbours share at most the
    one row group on their boundary."""
    reads = recording_reads(monkeypatch)
    groups = sum(-(-n // ROW_GROUP) for n in FILE_ROWS)
    world_size = 3
    per_rank = []
    for rank in range(world_size):
        reads.clear()
        list(source(shards, world_size, rank, drop_last=False).batches(0))
        per_rank.append(set(reads))
        assert len(reads) == len(set(reads))  # no row group read twice by a rank
    total = sum(len(r) for r in per_rank)
    assert groups <= total <= groups + world_size - 1
    for a in range(world_size):
        for b in range(a + 1, world_size):
            assert len(per_rank[a] & per_rank[b]) <= 1


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_mid_epoch_gives_the_same_sequence(shards, world_size, monkeypatch):
    for rank in range(world_size):
        src = source(shards, world_size, rank, drop_last=False)
        full = [ids_of(b) for b in src.batches(epoch=3)]
        count = src.num_batches()
        # Starts inside the first window, across window and row-group boundaries, at the end.
        for start in sorted({0, 1, 2, 3, 5, count // 2, count - 1, count}):
            again = [
                ids_of(b)
                for b in source(shards, world_size, rank, drop_last=False).batches(3, start)
            ]
            assert len(again) == count - start
            for a, b in zip(again, full[start:]):
                np.testing.assert_array_equal(a, b)
    # Resuming late does not re-read the epoch: only the row groups from the resumed window on.
    reads = recording_reads(monkeypatch)
    src = source(shards, 1, 0, drop_last=False)
    list(src.batches(0))
    full_reads = len(reads)
    reads.clear()
    list(src.batches(0, src.num_batches() - 2))
    assert 0 < len(reads) <= 3 < full_reads


def test_order_is_seeded_per_epoch_and_window_bounded(shards):
    a = [ids_of(b) for b in source(shards).batches(0)]
    b = [ids_of(b) for b in source(shards).batches(0)]
    c = [ids_of(b) for b in source(shards).batches(1)]
    assert all((x == y).all() for x, y in zip(a, b))
    assert not all((x == y).all() for x, y in zip(a, c))
    # No window: row groups are shuffled, rows inside a row group keep their order.
    rows = np.concatenate([ids_of(b) for b in source(shards, shuffle_buffer_rows=0).batches(0)])
    steps = np.diff(rows)
    assert (steps == 1).mean() > 0.9 and not (steps == 1).all()


def test_prefetch_errors_and_early_exit(shards, tmp_path):
    before = threading.active_count()
    it = source(shards, prefetch_batches=3).batches(0)
    next(it), next(it)
    it.close()  # leaving a training loop early stops the thread
    assert threading.active_count() == before
    for b in source(shards, prefetch_batches=0).batches(0):
        check_batch(b)
    # A shard that breaks while streaming: the error reaches the consumer.
    broken = tmp_path / "broken"
    broken.mkdir()
    data = (shards / "part_0.parquet").read_bytes()
    (broken / "a.parquet").write_bytes(data)
    src = ParquetBatchSource(broken, 48, seed=0, prefetch_batches=2)
    (broken / "a.parquet").write_bytes(data[:4] + b"\0" * (len(data) - 1000) + data[-1000:])
    with pytest.raises((OSError, ValueError)):
        list(src.batches(0))


def test_array_source_is_make_batches_with_the_trainer_seed():
    arrays = numbered(np.arange(1001))
    for rank in range(2):
        src = ArrayBatchSource(arrays, 64, rank=rank, world_size=2, seed=7)
        assert isinstance(src, BatchSource)
        want = list(
            make_batches(
                arrays,
                64,
                shuffle=True,
                seed=7 * 100003 + 4,
                drop_last=True,
                rank=rank,
                world_size=2,
            )
        )
        got = list(src.batches(4))
        assert src.num_batches() == len(got) == len(want) == 1001 // 64
        for g, w in zip(got, want):
            np.testing.assert_array_equal(ids_of(g), ids_of(w))
        resumed = list(src.batches(4, 9))
        assert [ids_of(b).tolist() for b in resumed] == [ids_of(b).tolist() for b in want[9:]]
    with pytest.raises(ValueError, match="outside"):
        ArrayBatchSource(arrays, 64).batches(0, 99)


def test_build_batch_source_from_config(shards):
    root = shards.parent
    cfg = DataConfig(
        source="parquet",
        parquet_dir=str(root),
        batch_size=48,
        eval_batch_size=100,
        num_embeddings_per_feature=SIZES,
    )
    src = build_batch_source(cfg, "train", rank=1, world_size=3, seed=0)
    assert isinstance(src, ParquetBatchSource) and src.local_batch == 16 and src.drop_last
    assert src.describe()["rows"] == N
    with pytest.raises(ConfigError, match="hashed for table sizes"):
        build_batch_source(
            DataConfig(
                source="parquet", parquet_dir=str(root), num_embeddings_per_feature=[7] * 26
            ),
            "train",
            rank=0,
            world_size=1,
            seed=0,
        )
    with pytest.raises(ConfigError, match="no Parquet shards"):
        build_batch_source(cfg, "eval", rank=0, world_size=1, seed=0)
    arrays = numbered(np.arange(500))
    ev = build_batch_source(
        DataConfig(source="criteo", eval_batch_size=100),
        "eval",
        rank=0,
        world_size=3,
        seed=0,
        arrays=arrays,
    )
    assert isinstance(ev, ArrayBatchSource) and ev.batch_size == 99 and not ev.shuffle
    # make_batches' evaluation batches: 5 of 33 rows, then one row of the 5-row tail per rank.
    assert [b.labels.shape[0] for b in ev.batches(0)] == [33] * 5 + [1]
    with pytest.raises(ConfigError, match="arrays"):
        build_batch_source(DataConfig(source="synthetic"), "train", rank=0, world_size=1, seed=0)


def test_preprocessed_real_rows_reach_the_batches(tmp_path):
    """Kaggle sample -> preprocess -> loader: the batches hold exactly the reader's rows."""
    path = SHARED / "criteo_kaggle_train_first10k.tsv.gz"
    if not path.exists():
        pytest.skip(f"../shared/data absent (fresh clone): {path} does not exist")
    sizes = [100_000] * 26
    preprocess([path], tmp_path, PreprocessSettings(sizes, row_group_rows=999), progress=False)
    want = read_criteo_tsv(path, sizes)
    src = ParquetBatchSource(tmp_path / "train", 256, seed=1, shuffle_buffer_rows=3000)
    assert src.num_batches() == len(want) // 256
    batches = list(ParquetBatchSource(tmp_path / "train", 256, seed=1, drop_last=False).batches(0))
    got = np.concatenate(
        [
            np.concatenate(
                [
                    b.labels.numpy()[:, None],
                    b.dense_features.numpy(),
                    b.sparse_features.values().numpy().reshape(26, -1).T,
                ],
                axis=1,
            )
            for b in batches
        ]
    )
    ref = np.concatenate([want.labels[:, None], want.dense, want.sparse], axis=1)
    # The same multiset of rows (the order is shuffled).
    np.testing.assert_array_equal(np.unique(got, axis=0), np.unique(ref, axis=0))
    assert got.shape == ref.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs cuda")
def test_pinned_batches(shards):
    b = next(iter(source(shards, pin_memory=True).batches(0)))
    assert b.dense_features.is_pinned() and b.sparse_features.values().is_pinned()


def test_divisible_batch_size_is_the_largest_multiple_not_above():
    from mlet_dist.data import divisible_batch_size

    for world in range(1, 6):
        for batch in range(1, 40):
            multiples = [m for m in range(world, batch + 1, world)]
            expected = multiples[-1] if multiples else world  # at least one row per rank
            assert divisible_batch_size(batch, world) == expected, (batch, world)
