"""Synthetic data in a declared schema's columns, labelled by a hidden low-rank teacher.

``mlet-dist generate`` with a config that declares features (``[[data.sparse]]``, docs/own-data.md)
writes ``synthetic.days`` Parquet files ``part-00000.parquet``, ... of
``synthetic.rows_per_day`` rows each into ``data.dir``, plus ``synthetic_meta.json`` (the config,
the schema, the files; :func:`generated_files` reads the file list back). The files hold exactly
the columns the schema reads (:mod:`mlet_dist.data.columns`), so ``data.source = 'synthetic'``
(or ``'files'`` with ``data.train_files`` naming them) trains on them, and ``preprocess``,
``evaluate`` and ``predict`` read them, unchanged:

- label: int8 0/1;
- a dense feature: int64 heavy-tailed counts (floor of a lognormal) when ``transform = 'log1p'``,
  else float64 normal values; ``synthetic.dense_missing_rate`` of them null;
- a categorical feature: ids of its table, drawn from a truncated Zipf law (rank 1 most frequent,
  ``synthetic.zipf_exponent``) and mapped to rows by a seeded affine bijection of the table (the
  frequent ids are not simply 0, 1, ...). ``ids = 'int'``: int64 rows of the table; ``ids =
  'hash'``: string tokens ``<prefix>_<id>`` (prefix = the shared table's name, else the feature's
  name, e.g. ``user_123``), so features sharing a table share their tokens; ``ids = 'vocab'``:
  such tokens of ``num_embeddings - 1`` ids (the vocabulary preprocess builds from them maps them
  to rows 1..V and keeps row 0 for unknown values, so it fits the table). A multi-hot feature
  (``max_length`` > 1) is a list of 1..max_length ids (uniform length, drawn independently, so
  an id may repeat). ``synthetic.sparse_missing_rate`` of the values are missing: null, or for a
  list half null and half an empty list;
- the weight column (``data.weight``), if declared: float32 0.5, 1 or 2, uniformly, independent
  of the label.

The teacher is the one of :mod:`mlet_dist.data.synthetic_teacher` over the schema: each table
id has a vector in R^rank (``synthetic.teacher_rank``, spectrum ``teacher_spectrum_decay``) and a
bias; a feature's vector is its id's (a bag's: the mean when its table pools by mean, else the sum
divided by sqrt(max_length)); ``logit = teacher_scale * sum_{i<j} <u_i, u_j> / sqrt(pairs / rank)
+ biases + w . dense + intercept``, where dense is each dense feature as the reader transforms it
(missing = 0); the intercept is calibrated for the Criteo generator's positive rate. Every random
stream is keyed by the seed and a name (table, feature) or the file index, so each file is
reproducible on its own and depends only on the seed, the schema and ``rows_per_day``.

Example::

    paths = generate_schema_synthetic("data/events", schema_of(cfg.data), cfg.synthetic)
    read_columns_file(paths[0], schema)  # the schema's columns
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from mlet_dist.config import ConfigError, SyntheticConfig
from mlet_dist.data.synthetic import META_FILE_NAME, previous_output
from mlet_dist.data.synthetic_teacher import (
    TARGET_POSITIVE_RATE,
    calibrate_intercept,
    check_sampling,
    teacher_spectrum,
)
from mlet_dist.schema import FeatureSchema
from mlet_dist.utils.files import atomic_write, check_output
from mlet_dist.utils.locks import OutputLock

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT",
    "SchemaTeacher",
    "build_schema_teacher",
    "ensure_schema_synthetic",
    "generate_schema_synthetic",
    "generated_files",
    "part_file_name",
    "sample_block",
]

FORMAT = "parquet-schema"
"""The ``format`` of the meta file of a schema's synthetic data (the Criteo one: 'criteo-tsv')."""

# Rows per row group, each drawn in turn from the file's generator: a file's content depends only
# on (seed, schema, file index, rows_per_day); changing it changes every generated file.
_BLOCK_ROWS = 1 << 16
_CALIBRATION_ROWS = 20_000
_MAX_TABLE_ROWS = 1 << 31  # the teacher alone would take rows * teacher_rank * 8 bytes
_DENSE_WEIGHT_STD = 0.5  # divided by sqrt(dense features): the dense part's spread
# Seed-sequence tags (own streams, apart from the Criteo generator's).
_TAG_TABLE, _TAG_DENSE, _TAG_CALIBRATION, _TAG_FILE = 11, 12, 13, 14


def part_file_name(index: int) -> str:
    """``part-00000.parquet``, ... (file ``index`` of the generated data)."""
    return f"part-{index:05d}.parquet"


def _key(name: str) -> int:
    """A stable 32-bit key of a name (for seed sequences: a stream per table or feature)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "little")


@dataclass
class _TableTeacher:
    vectors: np.ndarray  # (rows, rank), by Zipf rank
    biases: np.ndarray  # (rows,)
    zipf_cdf: np.ndarray  # (rows,)
    mult: int  # rank -> id: (mult * rank + offset) % rows, gcd(mult, rows) = 1
    offset: int

    def ids(self, ranks: np.ndarray) -> np.ndarray:
        # mult, rank < rows < 2**31 (build_schema_teacher): exact in int64
        return (ranks * self.mult + self.offset) % self.zipf_cdf.shape[0]


@dataclass
class SchemaTeacher:
    """The hidden model of a schema's synthetic data (see the module docstring).

    Attributes:
        schema: the schema it labels.
        tables: per table name, its ids' teacher vectors, biases, Zipf law and id bijection.
        dense_mu, dense_sigma: (D,) location and scale of each dense feature's draw.
        dense_weights: (D,) weights of the transformed dense features in the logit.
        rank: teacher rank; scale: teacher_scale; intercept: calibrated logit offset.
    """

    schema: FeatureSchema
    tables: dict[str, _TableTeacher]
    dense_mu: np.ndarray
    dense_sigma: np.ndarray
    dense_weights: np.ndarray
    rank: int
    scale: float
    intercept: float = 0.0


# Sample weights (data.weight) of generated rows: drawn uniformly, independent of the label.
_WEIGHTS = np.array([0.5, 1.0, 2.0])


def _columns(schema: FeatureSchema) -> list[str]:
    """The columns written, label first; refuses two features declared on one column."""
    owners: dict[str, str] = {schema.label: "data.label"}
    if schema.weight:
        owners[schema.weight] = "data.weight"
    for kind, feats in (("dense", schema.dense), ("sparse", schema.sparse)):
        for f in feats:
            c = f.column or f.name
            if c in owners:
                raise ConfigError(
                    f"data.{kind} ({f.name}) reads column {c!r}, which {owners[c]} reads too: the "
                    f"generator writes one column per feature; give each its own column"
                )
            owners[c] = f"data.{kind} ({f.name})"
    return list(owners)


def build_schema_teacher(schema: FeatureSchema, cfg: SyntheticConfig) -> SchemaTeacher:
    """The teacher of a schema (deterministic in the seed, the schema and the teacher keys).

    Raises:
        ConfigError: invalid ``[synthetic]`` keys, or two features declared on one column.
    """
    check_sampling(cfg)
    _columns(schema)
    rank = cfg.teacher_rank
    spectrum = teacher_spectrum(rank, cfg.teacher_spectrum_decay)
    bias_std = 1.0 / math.sqrt(len(schema.sparse))
    tables = {}
    for t in schema.tables:
        rng = np.random.default_rng([cfg.seed, _TAG_TABLE, _key(t.name)])
        n = t.num_embeddings
        if n >= _MAX_TABLE_ROWS:
            raise ConfigError(
                f"table {t.name} has {n} rows: the generator draws ids of tables below "
                f"{_MAX_TABLE_ROWS} rows (its teacher holds a vector per row); declare a smaller "
                f"num_embeddings for synthetic data"
            )
        vocab = any(schema.sparse[i].ids == "vocab" for i in _features_of(schema, t.name))
        if vocab and n > 1:  # preprocess maps V distinct values to rows 1..V (0 = unknown)
            n -= 1
        weights = np.arange(1, n + 1, dtype=np.float64) ** -cfg.zipf_exponent
        cdf = np.cumsum(weights)
        mult = int(rng.integers(1, max(n, 2)))
        while math.gcd(mult, n) != 1:
            mult = mult % n + 1
        tables[t.name] = _TableTeacher(
            vectors=rng.normal(0.0, 1.0 / math.sqrt(rank), (n, rank)) * spectrum,
            biases=rng.normal(0.0, bias_std, n),
            zipf_cdf=cdf / cdf[-1],
            mult=mult,
            offset=int(rng.integers(0, n)),
        )
    d = len(schema.dense)
    mu, sigma, w = np.zeros(d), np.ones(d), np.zeros(d)
    for j, f in enumerate(schema.dense):
        rng = np.random.default_rng([cfg.seed, _TAG_DENSE, _key(f.name)])
        if f.transform == "log1p":  # lognormal counts
            mu[j], sigma[j] = rng.uniform(0.5, 3.5), rng.uniform(0.5, 1.5)
        else:  # normal values
            mu[j], sigma[j] = rng.uniform(-1.0, 1.0), rng.uniform(0.5, 2.0)
        w[j] = rng.normal(0.0, _DENSE_WEIGHT_STD / math.sqrt(d))
    teacher = SchemaTeacher(schema, tables, mu, sigma, w, rank, float(cfg.teacher_scale))
    rng = np.random.default_rng([cfg.seed, _TAG_CALIBRATION])
    draw = _draw(teacher, cfg, rng, _CALIBRATION_ROWS)
    teacher.intercept = calibrate_intercept(_logits(teacher, draw), TARGET_POSITIVE_RATE)
    return teacher


@dataclass
class _Draw:
    """Features of n rows before formatting."""

    ranks: list[np.ndarray]  # per sparse feature (n, max_length) Zipf ranks
    lengths: list[np.ndarray]  # per sparse feature (n,) ids in the row (0 = missing)
    null: list[np.ndarray]  # per sparse feature (n,) bool: missing written as null
    dense: list[np.ndarray]  # per dense feature (n,) raw values
    dense_missing: list[np.ndarray]  # per dense feature (n,) bool


def _draw(teacher: SchemaTeacher, cfg: SyntheticConfig, rng: np.random.Generator, n: int) -> _Draw:
    schema = teacher.schema
    out = _Draw([], [], [], [], [])
    for f in schema.sparse:
        cdf = teacher.tables[schema.table_of(f.name).name].zipf_cdf
        width = f.max_length
        lengths = rng.integers(1, width + 1, n) if width > 1 else np.ones(n, dtype=np.int64)
        ranks = np.searchsorted(cdf, rng.random((n, width)), side="right")
        missing = rng.random(n) < cfg.sparse_missing_rate
        as_null = missing & ((rng.random(n) < 0.5) if width > 1 else True)
        out.ranks.append(np.minimum(ranks, cdf.shape[0] - 1))  # guards float round-off
        out.lengths.append(np.where(missing, 0, lengths))
        out.null.append(as_null)
    for j, f in enumerate(schema.dense):
        mu, sigma = teacher.dense_mu[j], teacher.dense_sigma[j]
        if f.transform == "log1p":
            x = np.floor(rng.lognormal(mu, sigma, n)).astype(np.int64)
        else:
            x = rng.normal(mu, sigma, n)
        out.dense.append(x)
        out.dense_missing.append(rng.random(n) < cfg.dense_missing_rate)
    return out


def _logits(teacher: SchemaTeacher, draw: _Draw) -> np.ndarray:
    """Teacher logits without the intercept."""
    schema = teacher.schema
    n = draw.lengths[0].shape[0]
    total = np.zeros((n, teacher.rank))
    sq_norms = np.zeros(n)
    biases = np.zeros(n)
    for i, f in enumerate(schema.sparse):
        table = schema.table_of(f.name)
        t = teacher.tables[table.name]
        lengths = draw.lengths[i]
        valid = np.arange(f.max_length)[None, :] < lengths[:, None]
        u = (t.vectors[draw.ranks[i]] * valid[..., None]).sum(axis=1)
        b = (t.biases[draw.ranks[i]] * valid).sum(axis=1)
        if f.max_length > 1:  # a bag: mean for a mean-pooled table, else sum / sqrt(max_length)
            if table.pooling == "mean":
                norm = np.maximum(lengths, 1).astype(np.float64)
            else:
                norm = np.full(n, math.sqrt(f.max_length))
            u, b = u / norm[:, None], b / norm
        total += u
        sq_norms += np.einsum("nr,nr->n", u, u)
        biases += b
    pairs = max(1, len(schema.sparse) * (len(schema.sparse) - 1) // 2)
    logit = teacher.scale * 0.5 * (np.einsum("nr,nr->n", total, total) - sq_norms)
    logit /= math.sqrt(pairs / teacher.rank)
    for j, f in enumerate(schema.dense):
        x = np.where(draw.dense_missing[j], 0, draw.dense[j]).astype(np.float64)
        x = np.log1p(np.maximum(x, 0.0)) if f.transform == "log1p" else x
        logit += teacher.dense_weights[j] * x.astype(np.float32)  # as the reader gives it
    return logit + biases


def _features_of(schema, table: str) -> list[int]:
    """Indices (in ``schema.sparse``) of the features looking up ``table``."""
    return [i for i, f in enumerate(schema.sparse) if schema.table_of(f.name).name == table]


def _tokens(prefix: str, ids: pa.Array) -> pa.Array:
    return pc.binary_join_element_wise(f"{prefix}_", pc.cast(ids, pa.string()), "")


def _sparse_column(teacher: SchemaTeacher, draw: _Draw, i: int) -> pa.Array:
    schema = teacher.schema
    f = schema.sparse[i]
    table = schema.table_of(f.name)
    prefix = f.table or f.name  # a shared table's features share its tokens
    ids = teacher.tables[table.name].ids(draw.ranks[i])
    lengths, null = draw.lengths[i], draw.null[i]
    if f.max_length == 1:
        values = pa.array(ids[:, 0].astype(np.int64), mask=null)
        return _tokens(prefix, values) if f.ids in ("hash", "vocab") else values
    valid = np.arange(f.max_length)[None, :] < lengths[:, None]
    values = pa.array(ids[valid].astype(np.int64))  # row-major: each row's ids in order
    if f.ids in ("hash", "vocab"):
        values = _tokens(prefix, values)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, values, mask=pa.array(null))


def sample_block(
    teacher: SchemaTeacher, cfg: SyntheticConfig, rng: np.random.Generator, n: int
) -> tuple[pa.Table, np.ndarray]:
    """Draws ``n`` labelled rows from ``rng``: (the table of the schema's columns, the logits)."""
    schema = teacher.schema
    draw = _draw(teacher, cfg, rng, n)
    logits = _logits(teacher, draw) + teacher.intercept
    labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logits))).astype(np.int8)
    columns = {schema.label: pa.array(labels)}
    for j, f in enumerate(schema.dense):
        columns[f.column or f.name] = pa.array(draw.dense[j], mask=draw.dense_missing[j])
    for i, f in enumerate(schema.sparse):
        columns[f.column or f.name] = _sparse_column(teacher, draw, i)
    if schema.weight:  # drawn last: the other columns do not depend on it
        columns[schema.weight] = pa.array(rng.choice(_WEIGHTS, n).astype(np.float32))
    return pa.table(columns), logits


def generate_schema_synthetic(
    out_dir: str | Path, schema: FeatureSchema, cfg: SyntheticConfig, *, progress: bool = True
) -> list[Path]:
    """Writes ``cfg.days`` Parquet files of ``cfg.rows_per_day`` rows in the schema's columns
    into ``out_dir``, plus ``synthetic_meta.json`` (see the module docstring). Each file appears
    atomically; the output is deterministic in the seed, the schema and ``rows_per_day``.

    Raises:
        ConfigError: invalid ``[synthetic]`` keys or schema columns.
        OutputPathError: ``out_dir`` holds files of the same names not written by a generator
            (no meta file), or lies in a run, checkpoint or serving directory.
    """
    out = Path(out_dir)
    names = [part_file_name(i) for i in range(cfg.days)] + [META_FILE_NAME]
    check_output(
        out,
        what="synthetic data",
        previous=lambda p: previous_output(p, names),
        hint="set data.dir to a new directory",
    )
    teacher = build_schema_teacher(schema, cfg)
    with OutputLock(out, "generate", what="synthetic data"):
        return _write_parts(out, schema, cfg, teacher, progress)


def _write_parts(
    out: Path, schema: FeatureSchema, cfg: SyntheticConfig, teacher: SchemaTeacher, progress: bool
) -> list[Path]:
    """:func:`generate_schema_synthetic` once its output is checked and locked."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    bar = tqdm(
        total=cfg.days * cfg.rows_per_day, unit="rows", unit_scale=True, disable=not progress
    )
    with bar:
        for index in range(cfg.days):
            positives = 0

            def write(f, index: int = index) -> None:
                nonlocal positives
                rng = np.random.default_rng([cfg.seed, _TAG_FILE, index])
                writer = None
                for start in range(0, cfg.rows_per_day, _BLOCK_ROWS):
                    n = min(_BLOCK_ROWS, cfg.rows_per_day - start)
                    table, _ = sample_block(teacher, cfg, rng, n)
                    writer = writer or pq.ParquetWriter(f, table.schema)
                    writer.write_table(table)
                    positives += int(pc.sum(table.column(schema.label)).as_py() or 0)
                    bar.update(n)
                if writer is None:  # zero rows: an empty file with the columns
                    empty, _ = sample_block(teacher, cfg, rng, 0)
                    writer = pq.ParquetWriter(f, empty.schema)
                writer.close()

            atomic_write(out / part_file_name(index), write)
            files.append(
                {"file": part_file_name(index), "rows": cfg.rows_per_day, "positives": positives}
            )
    rows = cfg.days * cfg.rows_per_day
    positives = sum(f["positives"] for f in files)
    meta = {
        "format": FORMAT,
        "generator": __name__,
        "config": dataclasses.asdict(cfg),
        "schema": schema.to_dict(),
        "files": files,
        "rows": rows,
        "positives": positives,
        "positive_rate": positives / rows if rows else 0.0,
        "target_positive_rate": TARGET_POSITIVE_RATE,
        "teacher_intercept": teacher.intercept,
    }
    text = json.dumps(meta, indent=2).encode() + b"\n"
    atomic_write(out / META_FILE_NAME, lambda f: f.write(text))
    stale = sorted({p.name for p in out.glob("part-*.parquet")} - {f["file"] for f in files})
    if stale:
        logger.warning(
            "%s also holds %s, not written by this run: readers of the generated data read only "
            "the files %s lists", out, ", ".join(stale[:3]), META_FILE_NAME,
        )  # fmt: skip
    logger.info(
        "generated %d Parquet files x %d rows in %s (positive rate %.3f); read them with "
        "data.source = 'synthetic' and this schema",
        cfg.days, cfg.rows_per_day, out, meta["positive_rate"],
    )  # fmt: skip
    return [out / f["file"] for f in files]


def _meta(data_dir: Path) -> dict | None:
    path = data_dir / META_FILE_NAME
    try:
        meta = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def generated_files(data_dir: str | Path) -> list[Path]:
    """The Parquet files of a schema's synthetic data in ``data_dir``, as its meta file lists them.

    Raises:
        ConfigError: ``data_dir`` holds no such data (no meta file of this format).
    """
    meta = _meta(Path(data_dir))
    if meta is None:
        raise ConfigError(
            f"no synthetic data of a declared schema in {data_dir} (data.dir: no "
            f"{META_FILE_NAME} of format {FORMAT!r}); run `mlet-dist generate --config <same "
            f"config>` first, or point data.dir at generated data"
        )
    return [Path(data_dir) / f["file"] for f in meta["files"]]


def ensure_schema_synthetic(
    data_dir: str | Path, schema: FeatureSchema, cfg: SyntheticConfig, progress: bool = True
) -> bool:
    """Generates the schema's synthetic data into ``data_dir`` unless its meta file records this
    config and schema and its files are there. Returns True when it generated."""
    meta = _meta(Path(data_dir))
    same = (
        meta is not None
        and meta.get("config") == dataclasses.asdict(cfg)
        and meta.get("schema") == schema.to_dict()
    )
    if same and all(p.is_file() for p in generated_files(data_dir)):
        logger.info("using the synthetic data already in %s", data_dir)
        return False
    logger.info(
        "generating synthetic data of the declared schema into %s (%s)",
        data_dir, "config changed" if meta else "none there yet",
    )  # fmt: skip
    generate_schema_synthetic(data_dir, schema, cfg, progress=progress)
    return True
