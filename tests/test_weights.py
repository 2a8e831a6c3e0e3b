"""Sample weights (``data.weight``): reading, shards, the weighted loss and gradient, weighted
metrics, and the refusals.

Oracles: the weighted loss equals a float64 computation written here from the logits
(``mean(w * bce)``); its gradient equals autograd's gradient of ``sum(w * l) / n`` written here on
a copy of the model, and (integer weights) the gradient of the unweighted loss of a batch where
each row is repeated w times, rescaled; the weighted AUC equals a brute-force count over every
(positive, negative) pair with ties counted half, the log loss and NE a numpy float64 computation;
all weights 1 give the unweighted metrics; the shards decode to the weights that were written; the
weight column read from Parquet and CSV equals the values written.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_schema import ROWS, write_config, write_rows
from torchrec.datasets.utils import Batch
from torchrec.models.dlrm import DLRMTrain

from mlet_dist.config import ConfigError, DataConfig, load_config
from mlet_dist.data.columns import ColumnError
from mlet_dist.data.rows import FeatureRows, WeightedBatch
from mlet_dist.data.schema_shards import SchemaCodec, rows_to_table, table_to_rows
from mlet_dist.data.sources import source_of
from mlet_dist.metrics import binary_metrics
from mlet_dist.models import WeightedDLRMTrain, build_dlrm
from mlet_dist.quality import bucket_metrics
from mlet_dist.schema import SchemaError, schema_from_dict, schema_of

WEIGHTS = [1.0, 2.0, 0.0, 0.5, 3.0, 1.25]


def read_file(source: str, path, *, schema, csv_columns=(), **kw):
    """One raw file of ``source`` read through ``schema`` (the registry's source class)."""
    data = DataConfig(source=source, csv_columns=list(csv_columns))
    return source_of(data, schema).read(path, **kw)


def weighted_config(tmp_path, *extra: str):
    return load_config(write_config(tmp_path), ["--data.weight='w'", *extra])


def write_weighted(path, weights=WEIGHTS, n_copies: int = 1, seed: int | None = None):
    """test_schema's rows with a weight column ``w`` (repeated like the rows)."""
    write_rows(path, n_copies=n_copies, seed=seed)
    table = pq.read_table(path)
    pq.write_table(table.append_column("w", pa.array(list(weights) * n_copies)), path)
    return path


def bce64(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Per-row log loss in float64, written out: max(z, 0) - z y + log(1 + exp(-|z|))."""
    z = logits.double().numpy()
    y = labels.double().numpy()
    return np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))


def test_weight_column_is_read_from_parquet_and_csv(tmp_path):
    cfg = weighted_config(tmp_path)
    schema = schema_of(cfg.data)
    assert schema.weight == "w"
    assert schema_from_dict(schema.to_dict()) == schema
    # a schema recorded before the key existed (no "weight") reads as unweighted
    old = {k: v for k, v in schema.to_dict().items() if k != "weight"}
    assert schema_from_dict(old).weight == ""
    assert "weight" not in schema_of(load_config(write_config(tmp_path)).data).to_dict()
    rows = read_file("files", write_weighted(tmp_path / "r.parquet"), schema=schema)
    assert rows.weights.dtype == np.float32
    np.testing.assert_array_equal(rows.weights, WEIGHTS)
    names = [*ROWS, "w"]
    values = {**ROWS, "w": WEIGHTS}
    lines = []
    for i in range(6):
        fields = []
        for c in names:
            v = values[c][i]
            fields.append("" if v is None else "|".join(v) if isinstance(v, list) else str(v))
        lines.append(",".join(fields))
    (tmp_path / "r.csv").write_text(",".join(names) + "\n" + "\n".join(lines) + "\n")
    csv = read_file("files", tmp_path / "r.csv", schema=schema)
    np.testing.assert_array_equal(csv.weights, WEIGHTS)
    # selections keep the weights row by row
    np.testing.assert_array_equal(rows.take(np.array([4, 1])).weights, [3.0, 2.0])
    np.testing.assert_array_equal(rows.slice(2, 4).weights, [0.0, 0.5])
    both = FeatureRows.concat([rows.slice(0, 2), rows.slice(4, 6)])
    np.testing.assert_array_equal(both.weights, [1.0, 2.0, 3.0, 1.25])
    batch = rows.take(np.array([3, 0])).to_batch()
    assert isinstance(batch, WeightedBatch)
    assert batch.weights.tolist() == [0.5, 1.0]
    moved = batch.to(torch.device("cpu"))
    assert isinstance(moved, WeightedBatch) and moved.weights.tolist() == [0.5, 1.0]
    # unweighted rows keep TorchRec's plain Batch
    plain = read_file("files", tmp_path / "r.parquet", schema=schema_of(DataConfig(
        source="files", sparse=cfg.data.sparse, dense=cfg.data.dense, tables=cfg.data.tables,
        label="clicked",
    )))  # fmt: skip
    assert plain.weights is None and type(plain.to_batch()) is Batch


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([1.0, -2.0, 1, 1, 1, 1], r"column 'w' \(data\.weight\): data row 2 has weight -2\.0; weights must be finite"),
        ([1.0, 1, float("inf"), 1, 1, 1], r"column 'w' \(data\.weight\): data row 3 has weight inf"),
        (["a", "b", "c", "d", "e", "f"], r"column 'w' \(data\.weight\): holds string values, expected numbers"),
        ([1.0, None, 1, 1, 1, None], r"column 'w' \(data\.weight\): 2 rows have no weight"),
        ([True] * 6, r"column 'w' \(data\.weight\): holds booleans"),
    ],
)  # fmt: skip
def test_bad_weight_column_names_the_column(tmp_path, weights, match):
    schema = schema_of(weighted_config(tmp_path).data)
    path = write_weighted(tmp_path / "bad.parquet", weights)
    with pytest.raises(ColumnError, match=match) as e:
        read_file("files", path, schema=schema)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_weight_column_is_named(tmp_path):
    schema = schema_of(weighted_config(tmp_path).data)
    path = write_rows(tmp_path / "no_w.parquet")
    with pytest.raises(ColumnError, match=r"no column 'w' \(data\.weight\).*data\.weight") as e:
        read_file("files", path, schema=schema)
    assert "\n" not in str(e.value)
    (tmp_path / "r.csv").write_text("clicked,price,score,user,tags,query\n1,1,1,a,b,c\n")
    with pytest.raises(ColumnError, match=r"no column 'w' \(data\.weight\)"):
        read_file("files", tmp_path / "r.csv", schema=schema)


def test_weight_key_is_refused_without_a_declared_schema(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.weight = 'w' needs a declared schema") as e:
        load_config(None, ["--data.weight='w'"])
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"data\.weight"):
        schema_of(DataConfig(weight="w"))  # a config built in code, not validated
    with pytest.raises(SchemaError, match=r"data\.weight = 'clicked' is the label column"):
        schema_of(weighted_config(tmp_path, "--data.weight='clicked'").data)


def test_shards_keep_the_weights(tmp_path):
    schema = schema_of(weighted_config(tmp_path).data)
    rows = read_file("files", write_weighted(tmp_path / "r.parquet"), schema=schema)
    table = rows_to_table(rows, schema)
    assert table.schema.field("weight").type == pa.float32()
    pq.write_table(table, tmp_path / "s.parquet")
    back = table_to_rows(
        pq.read_table(tmp_path / "s.parquet", columns=SchemaCodec(schema).columns), schema
    )
    np.testing.assert_array_equal(back.weights, WEIGHTS)
    np.testing.assert_array_equal(back.labels, rows.labels)
    # a shard of the unweighted schema is refused by the weighted loader (and back)
    unweighted = schema_of(load_config(write_config(tmp_path)).data)
    assert "weight" not in SchemaCodec(unweighted).columns
    unweighted_rows = dataclasses.replace(rows, weights=None)
    pq.write_table(rows_to_table(unweighted_rows, unweighted), tmp_path / "u.parquet")
    with pytest.raises(ConfigError, match=r"data\.weight"):
        SchemaCodec(schema).check(tmp_path / "u.parquet", pq.read_schema(tmp_path / "u.parquet"))


def test_preprocess_and_streamed_batches_keep_the_weights(tmp_path):
    from mlet_dist.data.preprocess import preprocess_from_config
    from mlet_dist.data.sources import build_batch_source

    rng = np.random.default_rng(2)
    weights = rng.choice([0.0, 0.25, 1.0, 3.0], size=60)
    path = write_rows(tmp_path / "r.parquet", n_copies=10, seed=4)
    pq.write_table(pq.read_table(path).append_column("w", pa.array(weights)), path)
    args = [f"--data.train_files=['{path}']", "--data.eval_fraction=0.25"]
    cfg = weighted_config(tmp_path, *args)
    preprocess_from_config(cfg.data, out_dir=tmp_path / "shards")
    streamed = weighted_config(
        tmp_path, *args, "--data.source='parquet'", f"--data.parquet_dir='{tmp_path / 'shards'}'"
    )
    for split, rows in (("train", slice(0, 45)), ("eval", slice(45, 60))):
        source = build_batch_source(streamed.data, split, rank=0, world_size=1, seed=0,
                                    training=False)  # fmt: skip
        batches = list(source.batches(0))  # file order, every row
        assert all(isinstance(b, WeightedBatch) for b in batches)
        got = torch.cat([b.weights for b in batches]).numpy()
        np.testing.assert_array_equal(got, weights[rows].astype(np.float32))


def _model_and_rows(tmp_path, n_copies: int = 4):
    cfg = weighted_config(tmp_path)
    schema = schema_of(cfg.data)
    rng = np.random.default_rng(3)
    weights = rng.integers(0, 4, 6 * n_copies).astype(float)  # integers 0..3, zeros included
    path = write_rows(tmp_path / "r.parquet", n_copies=n_copies, seed=1)
    pq.write_table(pq.read_table(path).append_column("w", pa.array(weights)), path)
    rows = read_file("files", path, schema=schema)
    torch.manual_seed(0)
    model = build_dlrm(cfg.model, schema, embedding_device=torch.device("cpu"))
    return cfg, schema, model, rows


def test_weighted_loss_is_the_mean_of_weighted_row_losses(tmp_path):
    cfg, _, model, rows = _model_and_rows(tmp_path)
    assert type(model) is WeightedDLRMTrain
    loss, (detached, logits, labels, weights) = model(rows.to_batch())
    want = np.mean(rows.weights.astype(np.float64) * bce64(logits, labels))
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert detached.item() == loss.item()
    np.testing.assert_array_equal(weights.numpy(), rows.weights)
    # the unweighted schema builds TorchRec's own DLRMTrain, whose loss is the plain mean
    plain = build_dlrm(cfg.model, schema_of(load_config(write_config(tmp_path)).data))
    assert type(plain) is DLRMTrain


def test_weighted_gradient_equals_hand_autograd_and_repeated_rows(tmp_path):
    _, _, model, rows = _model_and_rows(tmp_path)
    n = len(rows)
    hand = copy.deepcopy(model)
    twin = copy.deepcopy(model)
    loss, _ = model(rows.to_batch())
    loss.backward()
    # by hand: sum(w * l) / n on the copy, with the log loss written out
    batch = rows.to_batch()
    z = hand.model(batch.dense_features, batch.sparse_features).squeeze(-1)
    y = batch.labels
    per_row = torch.clamp(z, min=0) - z * y + torch.log1p(torch.exp(-z.abs()))
    (torch.from_numpy(rows.weights) * per_row).sum().div(n).backward()
    # integer weights: row i repeated w_i times, unweighted mean over the m repeated rows
    repeated = rows.take(np.repeat(np.arange(n), rows.weights.astype(int)))
    repeated.weights = None
    m = len(repeated)
    plain_loss, _ = DLRMTrain.forward(twin, repeated.to_batch())
    (plain_loss * m / n).backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert len(grads) == len(list(model.parameters()))
    for name, p in hand.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-7, msg=name)
    for name, p in twin.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-7, msg=name)


def _brute_force(z: np.ndarray, y: np.ndarray, w: np.ndarray) -> dict[str, float]:
    num = den = 0.0
    for i in np.flatnonzero(y == 1):
        for j in np.flatnonzero(y == 0):
            pair = w[i] * w[j]
            den += pair
            num += pair * (1.0 if z[i] > z[j] else 0.5 if z[i] == z[j] else 0.0)
    loss = float(np.sum(w * bce64(torch.from_numpy(z), torch.from_numpy(y))) / w.sum())
    p = float(np.sum(w * y) / w.sum())
    entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    prob = 1 / (1 + np.exp(-z))
    return {
        "auc": num / den,
        "log_loss": loss,
        "ne": loss / entropy,
        "positive_rate": p,
        "mean_prediction": float(np.sum(w * prob) / w.sum()),
    }


def test_weighted_metrics_equal_a_brute_force_reference():
    rng = np.random.default_rng(7)
    n = 200
    z = np.round(rng.normal(size=n), 1)  # rounded: many tied scores, across labels too
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(np.float64)
    w = rng.choice([0.0, 0.5, 1.0, 2.0, 3.5], size=n)
    got = binary_metrics(torch.from_numpy(z), torch.from_numpy(y), torch.from_numpy(w))
    want = _brute_force(z, y, w)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert got["rows"] == n and got["weight_sum"] == pytest.approx(w.sum())
    # all weights 1: the unweighted metrics (torchmetrics' AUC, float32; the mean log loss)
    ones = binary_metrics(torch.from_numpy(z), torch.from_numpy(y), torch.ones(n))
    plain = binary_metrics(torch.from_numpy(z), torch.from_numpy(y))
    for key in ("auc", "log_loss", "ne", "positive_rate", "mean_prediction"):
        assert ones[key] == pytest.approx(plain[key], rel=1e-7), key
    zero = binary_metrics(torch.from_numpy(z), torch.from_numpy(y), torch.zeros(n))
    assert zero["rows"] == n and zero["weight_sum"] == 0 and math.isnan(zero["auc"])
    # per id-frequency bucket: each bucket's rows with their weights
    rarest = rng.integers(0, 2000, n)
    buckets = bucket_metrics(
        torch.from_numpy(z), torch.from_numpy(y), rarest, weights=torch.from_numpy(w)
    )
    low = rarest <= 10
    for name, mask in (("<=10", low), (">1000", rarest > 1000)):
        if mask.sum() and 0 < np.sum(w[mask] * y[mask]) < np.sum(w[mask]):
            assert buckets[name]["auc"] == pytest.approx(
                _brute_force(z[mask], y[mask], w[mask])["auc"], rel=1e-12
            )
    big = rarest > 1000
    assert buckets[">1000"]["log_loss"] == pytest.approx(
        _brute_force(z[big], y[big], w[big])["log_loss"]
    )
