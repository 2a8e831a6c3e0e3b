"""``mlet-dist preprocess`` for a declared feature schema: inputs read through the schema, split,
rare ids replaced, vocabularies of the ``ids = 'vocab'`` tables built from the training split
(:mod:`mlet_dist.data.vocab`), written as the shards of :mod:`mlet_dist.data.schema_shards` (see
there) with ``vocab/<table>.parquet`` beside them."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mlet_dist.config import ConfigError, DataConfig
from mlet_dist.data.arrays import require_rows, split_arrays, split_sizes
from mlet_dist.data.columns import encode_table
from mlet_dist.data.parquet import RARE_ID
from mlet_dist.data.rows import FeatureRows
from mlet_dist.data.schema_shards import FORMAT, rows_to_table
from mlet_dist.data.sources import concat_rows, read_source_table
from mlet_dist.data.vocab import Vocabulary, build_vocabularies, write_vocabularies
from mlet_dist.schema import FeatureSchema, schema_of
from mlet_dist.utils.files import atomic_write_json, remove_path, replace_dir

__all__ = ["preprocess_schema"]

logger = logging.getLogger(__name__)


def _rare_to_zero(splits: Sequence[FeatureRows], schema: FeatureSchema, threshold: int) -> None:
    """Replaces, per table, the ids seen fewer than ``threshold`` times in ``splits[0]`` (the
    training rows) by :data:`RARE_ID`, in every split (in place)."""
    index = {f: j for j, f in enumerate(schema.feature_names)}
    train = splits[0]
    for t in schema.tables:
        if t in schema.vocab_tables:  # mapped through a vocabulary of the training rows already
            continue
        counts = np.zeros(t.num_embeddings, dtype=np.int64)
        for f in t.features:
            a, n = train.ids[index[f]], train.lengths[index[f]]
            counts += np.bincount(
                a[np.arange(a.shape[1])[None, :] < n[:, None]], minlength=t.num_embeddings
            )
        rare = counts < threshold
        for rows in splits:
            for f in t.features:
                a = rows.ids[index[f]]
                a[rare[a]] = RARE_ID


def preprocess_schema(
    data_cfg: DataConfig,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Reads ``inputs`` through the config's declared schema and writes shards to ``out_dir``
    (``train/``, ``eval/``, ``test/``, ``summary.json``), replacing a previous output atomically.

    Raises:
        ConfigError / ColumnError: a bad schema or input (named).
    """
    schema = schema_of(data_cfg)
    if not inputs:
        raise ConfigError("no inputs: set data.train_files or pass --input FILES")

    source = data_cfg.source if data_cfg.source != "parquet" else "files"
    threshold = data_cfg.frequency_threshold
    vocabs: dict[str, Vocabulary] = {}

    def raw(paths: Sequence[str | Path]) -> list[tuple[pa.Table, str | Path]]:
        return [
            (read_source_table(source, p, schema, data_cfg.csv_columns, data_cfg.max_rows), p)
            for p in paths
        ]

    def encode(tables: list[tuple[pa.Table, str | Path]]) -> FeatureRows:
        return concat_rows([require_rows(encode_table(t, schema, p, vocabs), p) for t, p in tables])

    inputs_raw = raw(inputs)
    fractions = (0.0 if data_cfg.eval_files else data_cfg.eval_fraction, data_cfg.test_fraction)
    if schema.vocab_tables:  # counted over the raw values of the training rows
        n_train = split_sizes(sum(t.num_rows for t, _ in inputs_raw), *fractions)[0]
        vocabs = build_vocabularies([t for t, _ in inputs_raw], n_train, schema, threshold)
    rows = encode(inputs_raw)
    del inputs_raw
    if data_cfg.eval_files:
        train, _, test = split_arrays(rows, *fractions)
        splits = {"train": train, "eval": encode(raw(data_cfg.eval_files)), "test": test}
    else:
        parts = split_arrays(rows, *fractions)
        splits = dict(zip(("train", "eval", "test"), parts))
    # copies: the rare-id replacement must not write into the rows other splits view
    splits = {k: v.take(np.arange(len(v))) for k, v in splits.items()}
    if threshold:
        _rare_to_zero(list(splits.values()), schema, threshold)
    out = Path(out_dir)
    staging = out.with_name(f".{out.name}.staging")
    previous = out / "summary.json"
    if out.exists() and any(out.iterdir()):
        if not previous.is_file() or json.loads(previous.read_text()).get("format") != FORMAT:
            raise ConfigError(
                f"{out} exists and is not a previous output of a feature-schema preprocessing: "
                f"choose another output directory (--out / data.parquet_dir)"
            )
    remove_path(staging)  # a stale staging directory of an interrupted run
    staging.mkdir(parents=True)
    vocab_entries = write_vocabularies(staging, vocabs)
    summary: dict[str, Any] = {
        "format": FORMAT,
        "frequency_threshold": threshold,
        "vocabularies": vocab_entries,
        "splits": {},
    }
    digests = {t: e["sha256"] for t, e in vocab_entries.items()}
    for name, part in splits.items():
        (staging / name).mkdir(parents=True, exist_ok=True)
        if len(part):
            table = rows_to_table(part, schema, threshold, digests)
            pq.write_table(
                table, staging / name / "part-00000.parquet", row_group_size=data_cfg.row_group_rows
            )
        summary["splits"][name] = {
            "rows": len(part),
            "positives": int(part.labels.sum()),
        }
    summary["rows"] = sum(s["rows"] for s in summary["splits"].values())
    summary["positives"] = sum(s["positives"] for s in summary["splits"].values())
    summary["bad_rows"] = 0
    atomic_write_json(staging / "summary.json", summary)
    replace_dir(staging, out)
    if progress:
        logger.info("preprocess: wrote %s (%s)", out, summary["splits"])
    return summary
