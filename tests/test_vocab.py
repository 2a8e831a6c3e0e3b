"""``ids = 'vocab'``: vocabularies built by ``mlet-dist preprocess`` from the training split.

Oracles: a hand-written Parquet file (an int column, a multi-hot string list column and a string
column sharing one table, threshold 2); the vocabulary files equal a ``collections.Counter`` over
the training rows written here (ids cut to ``max_length``, ordered by descending count then value);
the shard rows equal a hand mapping through that vocabulary (out of vocabulary -> 0, in eval/test
too); end to end, ``mlet-dist predict`` on the raw file gives the trained (unsharded) model's
probabilities on the preprocessed rows.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mlet_dist.config import ConfigError, load_config
from mlet_dist.data.preprocess import preprocess_from_config
from mlet_dist.data.schema_shards import table_to_rows
from mlet_dist.schema import SchemaError, schema_of

CONFIG = """
[data]
source = "files"
label = "clicked"
eval_fraction = 0.25
test_fraction = 0.25
frequency_threshold = 2

[[data.dense]]
name = "price"

[[data.sparse]]
name = "user"
num_embeddings = 8
ids = "vocab"

[[data.sparse]]
name = "tags"
table = "words"
max_length = 2
ids = "vocab"

[[data.sparse]]
name = "query"
table = "words"
ids = "vocab"

[[data.tables]]
name = "words"
num_embeddings = {words_rows}
"""

# 12 rows: train = rows 0..5, eval = 6..8, test = 9..11
ROWS: dict[str, list[Any]] = {
    "clicked": [1, 0, 1, 0, 1, 1, 0, 1, 0, 1, 0, 0],
    "price": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0],
    "user": [7, 3, 7, 3, 7, 9, 7, 9, 5, 3, None, 7],
    # the third tag of row 0 ('big') is cut (max_length = 2): not counted
    "tags": [
        ["red", "blue", "big"],
        ["blue"],
        ["red", "old"],
        [],
        None,
        ["old", "new"],
        ["red", "zzz"],
        ["big"],
        ["new", "blue"],
        ["old"],
        ["blue", "red"],
        [],
    ],
    "query": [
        "blue",
        "red",
        "new",
        "blue",
        "shoes",
        "big",
        "blue",
        "old",
        "new",
        "shoes",
        "x",
        "red",
    ],
}
N_TRAIN = 6


def write_config(tmp: Path, words_rows: int = 10) -> Path:
    path = tmp / "vocab.toml"
    path.write_text(CONFIG.format(words_rows=words_rows))
    return path


def write_data(path: Path, rows: dict[str, list[Any]] = ROWS) -> Path:
    pq.write_table(pa.table(rows), path)
    return path


def expected_vocab(columns: list[tuple[str, int]], rows: dict[str, list[Any]], n_train: int):
    """{value: (row, count)} of the vocabulary of the features ``columns`` [(column, max_length)]
    over the first ``n_train`` rows, threshold 2."""
    counts: Counter = Counter()
    for column, max_length in columns:
        for v in rows[column][:n_train]:
            if v is None:
                continue
            counts.update(v[:max_length] if isinstance(v, list) else [v])
    kept = sorted((v for v, c in counts.items() if c >= 2), key=lambda v: (-counts[v], v))
    return {v: (i + 1, counts[v]) for i, v in enumerate(kept)}


def test_vocabularies_and_shard_rows_equal_a_hand_count(tmp_path):
    cfg = load_config(
        write_config(tmp_path), [f"--data.train_files=['{write_data(tmp_path / 'r.parquet')}']"]
    )
    out = tmp_path / "shards"
    summary = preprocess_from_config(cfg.data, out_dir=out)
    want = {
        "t_user": expected_vocab([("user", 1)], ROWS, N_TRAIN),
        "words": expected_vocab([("tags", 2), ("query", 1)], ROWS, N_TRAIN),
    }
    # by hand: users 7 (x3), 3 (x2); words blue 3, red 3, old 2, new 2 (big cut in row 0)
    assert list(want["t_user"]) == [7, 3]
    assert list(want["words"]) == ["blue", "red", "new", "old"]
    for table, vocab in want.items():
        got = pq.read_table(out / "vocab" / f"{table}.parquet").to_pydict()
        assert got["value"] == list(vocab)
        assert got["row"] == [r for r, _ in vocab.values()]
        assert got["count"] == [c for _, c in vocab.values()]
        entry = summary["vocabularies"][table]
        assert entry["path"] == f"vocab/{table}.parquet" and entry["values"] == len(vocab)
    assert json.loads((out / "summary.json").read_text())["vocabularies"] == summary["vocabularies"]

    schema = schema_of(cfg.data)
    bounds = {"train": (0, 6), "eval": (6, 9), "test": (9, 12)}
    for split, (lo, hi) in bounds.items():
        rows = table_to_rows(pq.read_table(out / split / "part-00000.parquet"), schema)
        for j, (feature, column, table, width) in enumerate(
            [
                ("user", "user", "t_user", 1),
                ("tags", "tags", "words", 2),
                ("query", "query", "words", 1),
            ]
        ):
            assert rows.names[j] == feature
            for i in range(lo, hi):
                v = ROWS[column][i]
                values = [] if v is None else (v[:width] if isinstance(v, list) else [v])
                mapped = [want[table].get(x, (0, 0))[0] for x in values]
                k = i - lo
                assert rows.ids[j][k, : rows.lengths[j][k]].tolist() == mapped, (split, i, feature)
    # out of vocabulary in held-out rows: user 9 (seen once in train), 5 (never); 'zzz', 'x'
    eval_rows = table_to_rows(pq.read_table(out / "eval" / "part-00000.parquet"), schema)
    assert eval_rows.ids[0][:, 0].tolist() == [1, 0, 0]
    assert eval_rows.ids[1][0, :2].tolist() == [2, 0]


def test_too_small_table_is_one_line_error(tmp_path):
    data = write_data(tmp_path / "r.parquet")
    cfg = load_config(write_config(tmp_path, words_rows=4), [f"--data.train_files=['{data}']"])
    with pytest.raises(ConfigError) as e:
        preprocess_from_config(cfg.data, out_dir=tmp_path / "shards")
    msg = str(e.value)
    assert "\n" not in msg and "'words'" in msg and "needs 5 rows" in msg
    assert "num_embeddings" in msg and "frequency_threshold" in msg
    assert not (tmp_path / "shards").exists()


def test_vocab_needs_preprocess_and_one_ids_kind_per_table(tmp_path):
    from mlet_dist.data.sources import load_splits

    data = write_data(tmp_path / "r.parquet")
    cfg = load_config(write_config(tmp_path), [f"--data.train_files=['{data}']"])
    with pytest.raises(ConfigError, match="preprocess first"):
        load_splits(cfg.data)
    mixed = (
        write_config(tmp_path)
        .read_text()
        .replace(
            'name = "query"\ntable = "words"\nids = "vocab"', 'name = "query"\ntable = "words"'
        )
    )
    (tmp_path / "mixed.toml").write_text(mixed)
    with pytest.raises(SchemaError, match="mix ids = 'vocab'"):
        schema_of(load_config(tmp_path / "mixed.toml").data)


def test_loader_refuses_another_threshold_or_vocabulary(tmp_path):
    from mlet_dist.data.sources import build_batch_source

    data = write_data(tmp_path / "r.parquet")
    cfg = load_config(write_config(tmp_path), [f"--data.train_files=['{data}']"])
    out = tmp_path / "shards"
    preprocess_from_config(cfg.data, out_dir=out)
    streamed = ["--data.source=parquet", f"--data.parquet_dir={out}", "--data.batch_size=2"]
    ok = load_config(write_config(tmp_path), streamed)
    assert build_batch_source(ok.data, "train", rank=0, world_size=1, seed=0).num_rows == 6
    other = load_config(write_config(tmp_path), [*streamed, "--data.frequency_threshold=3"])
    with pytest.raises(ConfigError, match="frequency_threshold = 2"):
        build_batch_source(other.data, "train", rank=0, world_size=1, seed=0)
    summary = json.loads((out / "summary.json").read_text())
    summary["vocabularies"]["words"]["sha256"] = "0" * 64  # as if another run's vocabulary
    (out / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ConfigError, match="other vocabularies"):
        build_batch_source(ok.data, "eval", rank=0, world_size=1, seed=0)


# -- preprocess -> train (streamed) -> collapse -> predict on the raw file --------------------------


def _big_rows(n: int, seed: int) -> dict[str, list[Any]]:
    rng = np.random.default_rng(seed)
    users = [int(u) for u in rng.zipf(1.5, n) % 40]
    words = [f"w{int(k)}" for k in rng.zipf(1.3, 3 * n) % 60]
    tags = [words[3 * i : 3 * i + int(rng.integers(0, 4))] for i in range(n)]
    return {
        "clicked": [int(x) for x in rng.integers(0, 2, n)],
        "price": [float(x) for x in rng.normal(size=n)],
        "user": users,
        "tags": tags,
        "query": [words[3 * i + 2] for i in range(n)],
    }


def _train_and_collapse(config: str, args: list[str], served: str) -> dict[str, Any]:
    from mlet_dist.config import DistConfig
    from mlet_dist.distributed.parallelize import init_distributed
    from mlet_dist.export import CollapseOptions, collapse_run
    from mlet_dist.train import train

    init_distributed(DistConfig(device="cpu"))
    cfg = load_config(config, args)
    metrics = train(cfg)
    collapse_run(cfg.train.run_dir, served, CollapseOptions(quantize="fp32"))
    return metrics


@pytest.mark.slow
def test_preprocess_train_collapse_predict_on_raw_values(tmp_path):
    from dist_utils import run_ranks

    from mlet_dist.checkpoint import latest_checkpoint
    from mlet_dist.data import make_batches
    from mlet_dist.data.schema_shards import summary_vocabularies
    from mlet_dist.data.sources import concat_rows
    from mlet_dist.data.vocab import VocabularyError, read_vocabularies
    from mlet_dist.export import CollapseOptions, collapse_run, load_unsharded
    from mlet_dist.predict_job import predict_file
    from mlet_dist.serving.manifest import ServingError, read_manifest

    rows = _big_rows(240, seed=3)
    data = write_data(tmp_path / "raw.parquet", rows)
    config = write_config(tmp_path, words_rows=64)
    config.write_text(config.read_text().replace("num_embeddings = 8", "num_embeddings = 48"))
    shards = tmp_path / "shards"
    preprocess_from_config(
        load_config(config, [f"--data.train_files=['{data}']"]).data, out_dir=shards
    )
    args = [
        "--data.source=parquet",
        f"--data.parquet_dir={shards}",
        "--data.batch_size=24",
        "--data.eval_batch_size=40",
        "--model.embedding_dim=8",
        "--model.inner_dim=16",
        "--model.dense_arch_layer_sizes=[16, 8]",
        "--model.over_arch_layer_sizes=[16, 1]",
        "--optim.w1_lr_scaling=none",
        "--train.max_steps=8",
        "--train.progress=false",
        f"--train.run_dir={tmp_path / 'run'}",
    ]
    served = tmp_path / "served"
    run_ranks(_train_and_collapse, 1, str(config), args, str(served), timeout=300)
    cfg = load_config(config, args)
    record = json.loads((tmp_path / "run" / "vocab.json").read_text())
    assert record["parquet_dir"] == str(shards.resolve())
    manifest = read_manifest(served)
    assert manifest["serving"]["vocabularies"] == {
        "t_user": "vocab/t_user.parquet",
        "words": "vocab/words.parquet",
    }
    listed = {f["path"] for f in manifest["files"]}
    assert {"vocab/t_user.parquet", "vocab/words.parquet"} <= listed

    schema = schema_of(cfg.data)
    preprocessed = concat_rows(
        [
            table_to_rows(pq.read_table(shards / split / "part-00000.parquet"), schema)
            for split in ("train", "eval", "test")
        ]
    )  # the raw file's rows, in order (contiguous splits)
    assert len(preprocessed) == 240
    model = load_unsharded(cfg, latest_checkpoint(cfg.train.run_dir)).eval()
    with torch.no_grad():
        logits = torch.cat(
            [model(b)[1][1] for b in make_batches(preprocessed, 40, shuffle=False, seed=0)]
        )
    out = tmp_path / "p.txt"
    assert predict_file(served, [data], out)["rows"] == 240
    np.testing.assert_allclose(
        np.loadtxt(out, dtype=np.float32), torch.sigmoid(logits).numpy(), atol=1e-5
    )
    # some held-out values are out of vocabulary (row 0), so the mapping is exercised
    assert (preprocessed.ids[2][180:, 0] == 0).any()

    # `mlet-dist evaluate --data` on the raw file maps it through the run's vocabularies too
    from mlet_dist.metrics import binary_metrics
    from mlet_dist.workflow import evaluate_run

    ev = evaluate_run(cfg.train.run_dir, files=[str(data)])
    want = binary_metrics(logits, torch.from_numpy(preprocessed.labels))
    assert ev["rows"] == 240
    assert ev["log_loss"] == pytest.approx(want["log_loss"], abs=1e-6)

    # a vocabulary changed after the collapse: predict refuses it (checksum), naming the file
    vocab = served / "vocab" / "words.parquet"
    table = pq.read_table(vocab)
    served_copy = tmp_path / "served_tampered"
    import shutil

    shutil.copytree(served, served_copy)
    swapped = table.set_column(0, "value", pa.array(list(reversed(table["value"].to_pylist()))))
    pq.write_table(swapped, served_copy / "vocab" / "words.parquet")
    with pytest.raises(ServingError, match="words.parquet"):
        predict_file(served_copy, [data], tmp_path / "q.txt")
    with pytest.raises(ServingError, match="words.parquet"):
        predict_file(served_copy, [data], tmp_path / "q.txt", verify="predictor")

    # the run keeps its own copy of its vocabularies (issue 28): preprocessing other rows into
    # its shard directory replaces the vocabularies there, not the run's
    assert sorted(p.name for p in (tmp_path / "run" / "vocab").iterdir()) == [
        "t_user.parquet",
        "words.parquet",
    ]
    other = write_data(tmp_path / "other.parquet", _big_rows(240, seed=9))
    preprocess_from_config(
        load_config(config, [f"--data.train_files=['{other}']"]).data, out_dir=shards
    )
    assert (
        read_vocabularies(shards, summary_vocabularies(shards, schema), "s")["words"]
        != (read_vocabularies(tmp_path / "run", record["vocabularies"], "r")["words"])
    )
    # ... so the run still collapses to the same served model (its own copy) ...
    collapse_run(cfg.train.run_dir, tmp_path / "served2", CollapseOptions(quantize="fp32"))
    assert predict_file(tmp_path / "served2", [data], tmp_path / "p2.txt")["rows"] == 240
    np.testing.assert_array_equal(np.loadtxt(tmp_path / "p2.txt"), np.loadtxt(out))
    # ... and every reader of the new shards refuses them: their ids mean other values
    for split in ("eval", "test"):
        with pytest.raises(VocabularyError, match="other vocabularies") as e:
            evaluate_run(cfg.train.run_dir, split=split)
        assert "\n" not in str(e.value)
    # the run's own copy changed: refused by its sha256, in one line
    pq.write_table(swapped, tmp_path / "run" / "vocab" / "words.parquet")
    with pytest.raises(VocabularyError, match="does not match its sha256") as e:
        collapse_run(cfg.train.run_dir, tmp_path / "served3", CollapseOptions(quantize="fp32"))
    assert "\n" not in str(e.value)
    # a truncated record: one line, for the collapse and for evaluate --data
    text = (tmp_path / "run" / "vocab.json").read_text()
    (tmp_path / "run" / "vocab.json").write_text(text[: len(text) // 2])
    with pytest.raises(VocabularyError, match="damaged or truncated") as e:
        collapse_run(cfg.train.run_dir, tmp_path / "served3", CollapseOptions(quantize="fp32"))
    assert "\n" not in str(e.value)
    with pytest.raises(VocabularyError, match="damaged or truncated"):
        evaluate_run(cfg.train.run_dir, files=[str(data)])
    (tmp_path / "run" / "vocab.json").unlink()
    with pytest.raises(VocabularyError, match="vocab.json is missing"):
        collapse_run(cfg.train.run_dir, tmp_path / "served3", CollapseOptions(quantize="fp32"))


def test_lookup_and_resume_record(tmp_path):
    from mlet_dist.data.vocab import (
        Vocabulary,
        VocabularyError,
        check_shard_vocabularies,
        record_run_vocabularies,
        write_vocabularies,
    )

    vocab = Vocabulary("t", pa.array([7, 3]), np.array([3, 2]))
    assert vocab.lookup(pa.array([3, 5, 7, 3])).tolist() == [2, 0, 1, 2]
    with pytest.raises(VocabularyError, match="holds int64"):
        vocab.lookup(pa.array(["7"]), "f.csv: column 'user'")  # a CSV reads ids as text
    shards = tmp_path / "shards"
    sha = write_vocabularies(shards, {"t": vocab})["t"]["sha256"]
    entries = {"t": {"path": "vocab/t.parquet", "values": 2, "sha256": sha}}
    run = tmp_path / "run"
    run.mkdir()
    record_run_vocabularies(run, shards, entries)
    assert (run / "vocab" / "t.parquet").read_bytes() == (
        shards / "vocab" / "t.parquet"
    ).read_bytes()
    check_shard_vocabularies(run, entries, "resume")  # the same: accepted
    changed = {"t": {**entries["t"], "sha256": "b" * 64}}
    with pytest.raises(VocabularyError, match="other vocabularies"):
        check_shard_vocabularies(run, changed, "resume")
    # a vocabulary of the shards that differs from its summary entry is not copied
    with pytest.raises(VocabularyError, match="does not match its sha256"):
        record_run_vocabularies(tmp_path / "run2", shards, changed)
    for damaged in ("", "{", '{"vocabularies": []}', '{"parquet_dir": 3, "vocabularies": {}}',
                    '{"parquet_dir": "x", "vocabularies": {"t": {"path": 1}}}'):  # fmt: skip
        (run / "vocab.json").write_text(damaged)
        with pytest.raises(VocabularyError, match="damaged or truncated") as e:
            check_shard_vocabularies(run, entries, "evaluate")
        assert "\n" not in str(e.value)
