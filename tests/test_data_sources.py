"""The data-source registry (mlet_dist.data.sources): its names are the config's choices, and a
source added in one class (here: in this file) trains like the same rows read by a built-in one."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

from mlet_dist.config import ConfigError, DataConfig, load_config
from mlet_dist.data import CriteoArrays
from mlet_dist.data.sources import (
    SOURCES,
    RowSource,
    build_batch_source,
    load_splits,
    register_source,
    source_of,
)
from mlet_dist.train import train

SIZES = [50] * 26


def config_choices() -> tuple[str, ...]:
    """The config's choices for data.source: its Literal annotation."""
    tp = typing.get_type_hints(DataConfig)["source"]
    assert typing.get_origin(tp) is typing.Literal
    return typing.get_args(tp)


def test_registry_names_are_the_config_choices():
    assert set(SOURCES) == set(config_choices())
    for name, cls in SOURCES.items():
        assert cls.name == name
        assert source_of(DataConfig(source=name)).name == name


def test_unknown_source_and_a_second_registration_are_refused():
    with pytest.raises(ConfigError, match="data.source = 'nope' is not one of 'synthetic'"):
        source_of(DataConfig(source="nope"))
    with pytest.raises(ValueError, match="'criteo' is registered already"):
        register_source("criteo")(type("Again", (RowSource,), {}))


def test_parquet_source_checks_its_directory(tmp_path):
    nowhere = source_of(DataConfig(source="parquet"))
    for use in (nowhere.check, nowhere.splits, nowhere.vocabularies):
        with pytest.raises(ConfigError, match="data.source = 'parquet' needs data.parquet_dir"):
            use()
    with pytest.raises(ConfigError, match="needs data.parquet_dir"):
        build_batch_source(nowhere.cfg, "train", rank=0, world_size=1, seed=0)
    source_of(DataConfig(source="parquet", parquet_dir=str(tmp_path))).check()
    for name in SOURCES:  # the others need no such key
        if name != "parquet":
            source_of(DataConfig(source=name)).check()


# ---- a new source: rows as JSON lines ({"label": 0/1, "int": [13 ints], "cat": [26 hex]})


class JsonLinesSource(RowSource):
    """A hand-written format, mapped onto the Criteo layout as Criteo TSV is (log1p of the
    non-negative integers, hex ids modulo the table sizes)."""

    file_kind = "JSON lines"

    def read_rows(self, path, *, max_rows=0, in_file_order=False) -> CriteoArrays:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
        rows = rows[:max_rows] if max_rows else rows
        sizes = np.array(self.cfg.num_embeddings_per_feature, dtype=np.int64)
        return CriteoArrays(
            labels=np.array([r["label"] for r in rows], np.float32),
            dense=np.log1p(np.maximum([r["int"] for r in rows], 0)).astype(np.float32),
            sparse=np.array([[int(c, 16) for c in r["cat"]] for r in rows], np.int64) % sizes,
        )


@pytest.fixture
def jsonl_source():
    register_source("jsonl")(JsonLinesSource)
    yield JsonLinesSource
    del SOURCES["jsonl"]


def write_rows(tmp_path: Path, n: int) -> tuple[Path, Path, dict]:
    """The same n rows as a Criteo TSV file and as JSON lines; and the arrays, built by hand."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, n)
    ints = rng.integers(-1, 30, (n, 13))
    cats = rng.integers(0, 2**32, (n, 26))
    tsv, jsonl = tmp_path / "rows.tsv", tmp_path / "rows.jsonl"
    lines, records = [], []
    for i in range(n):
        hexes = [f"{c:08x}" for c in cats[i]]
        lines.append("\t".join([str(labels[i]), *map(str, ints[i]), *hexes]))
        records.append(json.dumps({"label": int(labels[i]), "int": ints[i].tolist(), "cat": hexes}))
    tsv.write_text("\n".join(lines) + "\n")
    jsonl.write_text("\n".join(records) + "\n")
    want = {
        "labels": labels.astype(np.float32),
        "dense": np.log(np.maximum(ints, 0) + 1.0).astype(np.float32),
        "sparse": cats % np.array(SIZES),
    }
    return tsv, jsonl, want


def configs(tmp_path: Path, tsv: Path, jsonl: Path):
    """A tiny model on the Criteo TSV file, and the same config reading the JSON lines; the
    new source is registered, not (yet) among the config's choices, so it is set after
    loading (a real one adds its name there too)."""
    common = [
        f"--data.num_embeddings_per_feature={SIZES}",
        "--data.eval_fraction=0.125",
        "--data.test_fraction=0.125",
        "--data.batch_size=32",
        "--model.embedding_dim=8",
        "--model.inner_dim=16",
        "--model.dense_arch_layer_sizes=[16, 8]",
        "--model.over_arch_layer_sizes=[16, 1]",
        "--train.max_steps=8",
        "--train.progress=false",
    ]
    criteo = load_config(
        None,
        [*common, "--data.source=criteo", f"--data.train_files=['{tsv}']",
         f"--train.run_dir={tmp_path / 'criteo_run'}"],
    )  # fmt: skip
    mine = load_config(None, [*common, f"--train.run_dir={tmp_path / 'jsonl_run'}"])
    mine.data = dataclasses.replace(criteo.data, source="jsonl", train_files=[str(jsonl)])
    return criteo, mine


def test_a_new_source_reads_batches_and_trains_as_the_same_rows_in_criteo_tsv(
    tmp_path, jsonl_source
):
    tsv, jsonl, want = write_rows(tmp_path, 256)
    criteo, mine = configs(tmp_path, tsv, jsonl)
    assert isinstance(source_of(mine.data), JsonLinesSource)
    # the rows, against the hand-built arrays and the Criteo TSV reader
    rows = source_of(mine.data).read(jsonl)
    for key, value in want.items():
        np.testing.assert_array_equal(getattr(rows, key), value)
    a, b = load_splits(criteo.data), load_splits(mine.data)
    for split in ("train", "eval", "test"):
        x, y = getattr(a, split), getattr(b, split)
        assert len(x) == len(y) > 0
        for key in want:
            np.testing.assert_array_equal(getattr(x, key), getattr(y, key))
    # the batches every rank gets, in training order
    for rank in (0, 1):
        kw = {"rank": rank, "world_size": 2, "seed": 3}
        xs = list(build_batch_source(criteo.data, "train", arrays=a.train, **kw).batches(1))
        ys = list(build_batch_source(mine.data, "train", arrays=b.train, **kw).batches(1))
        assert len(xs) == len(ys) == 6  # 192 training rows in global batches of 32
        for x, y in zip(xs, ys):
            assert len(x.labels) == 16  # this rank's half
            assert torch.equal(x.dense_features, y.dense_features)
            assert torch.equal(x.sparse_features.values(), y.sparse_features.values())
            assert torch.equal(x.labels, y.labels)
    # through the training entry point: the same losses and held-out metrics
    got, ref = train(mine), train(criteo)
    assert len(ref["train"]["loss_curve"]) > 0
    assert got["train"]["loss_curve"] == ref["train"]["loss_curve"]
    for split in ("eval", "test"):
        assert got[split]["rows"] == ref[split]["rows"] == 32
        assert got[split]["auc"] == ref[split]["auc"]
        assert got[split]["log_loss"] == ref[split]["log_loss"]
    assert source_of(mine.data).inputs() == [str(jsonl)]  # the run's output checks know it
