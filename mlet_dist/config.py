"""Typed configuration: dataclasses loaded from TOML files with ``--section.key=value`` overrides.

Precedence is command line > TOML file > dataclass defaults (as in torchtitan). Every component
receives only its own sub-config. Unknown sections or keys are an error that lists the valid ones.

Example::

    cfg = load_config("configs/synthetic_small.toml", ["--model.inner_dim=128"])
    cfg.model.inner_dim  # 128
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from mlet_dist.config_features import DenseFeatureConfig, SparseFeatureConfig, TableConfig
from mlet_dist.errors import MletError

# MLPerf DLRMv2 per-feature hash sizes for Criteo 1TB (40M cap on the largest features).
MLPERF_40M_TABLE_SIZES: list[int] = [
    40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10,
    2209, 11938, 155, 4, 976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36,
]  # fmt: skip

# Cardinalities used by the synthetic generator by default: a scaled-down, Criteo-like spread of
# tiny, medium and large features (26 categorical features).
DEFAULT_SYNTHETIC_CARDINALITIES: list[int] = [
    2000, 500, 1500, 300, 800, 3, 400, 150, 20, 2000, 1500, 1000, 10, 200, 600, 50, 4, 100, 14,
    2000, 2000, 2000, 800, 400, 40, 12,
]  # fmt: skip


class ConfigError(MletError, ValueError):
    """A configuration file or override is invalid; the message names the key and the fix."""


@dataclass
class SyntheticConfig:
    """Synthetic data drawn from a hidden low-rank 'teacher': Criteo-format day files, or Parquet files in a declared schema's columns (README "Your own data")."""

    days: int = 2
    """Number of files written: day files day_0 … day_{days-1}, or with a declared schema part-00000.parquet …"""
    rows_per_day: int = 20000
    """Rows in each file."""
    cardinalities: list[int] = field(default_factory=lambda: list(DEFAULT_SYNTHETIC_CARDINALITIES))
    """Distinct ids per categorical feature (26 values; Criteo format only: a declared schema's features draw from their tables' rows)."""
    zipf_exponent: float = 1.05
    """Exponent of the Zipf distribution of ids: larger means more skew (more rare ids)."""
    teacher_rank: int = 8
    """Rank of the hidden teacher embeddings that generate the labels."""
    teacher_scale: float = 2.0
    """Scale of the teacher logit; larger gives a more learnable (higher-AUC) task."""
    teacher_spectrum_decay: float = 0.0
    """Power-law decay of the teacher's spectrum: component r of every teacher vector has variance proportional to (r + 1) ** -decay (renormalized to the same total). 0 = flat (every direction equally strong); > 0 makes a high-rank teacher whose leading directions matter most, so the quality keeps rising with the served d."""
    dense_missing_rate: float = 0.1
    """Fraction of integer features left empty (missing)."""
    sparse_missing_rate: float = 0.02
    """Fraction of categorical features left empty (missing; in a declared schema's files: null, or for a list half null and half empty)."""
    seed: int = 1234
    """Seed of the teacher and of the sampling."""
    gzip: bool = True
    """Write day_N.gz (True) or plain day_N (False); Criteo format only."""


@dataclass
class DataConfig:
    """Where the data is and how it is batched."""

    source: str = "synthetic"
    """'synthetic' (generated into `dir` by `mlet-dist generate`: Criteo-format day files, or with a declared schema Parquet files in its columns), 'criteo' (Criteo TSV files in `train_files`), 'avazu' (Avazu CSV files in `train_files`, mapped onto the Criteo layout by `mlet_dist.data.avazu`), 'movielens' (MovieLens-1M `ratings.dat(.gz)` in `train_files` with `users.dat` and `movies.dat` beside it, mapped onto the Criteo layout by `mlet_dist.data.movielens`, rows sorted by time; with a declared schema: its named columns, genres multi-hot), 'parquet' (shards of `mlet-dist preprocess` in `parquet_dir`, streamed) or 'files' (Parquet, CSV or TSV files with named columns in `train_files`, read through the declared schema `dense`/`sparse`/`tables`)."""
    dir: str = "data/synthetic"
    """Directory of the synthetic data (source = 'synthetic'), written by `mlet-dist generate` (and by `run` when missing)."""
    train_files: list[str] = field(default_factory=list)
    """Criteo TSV (source = 'criteo'), Avazu CSV (source = 'avazu'), MovieLens ratings (source = 'movielens') or Parquet/CSV/TSV files with named columns (source = 'files'), plain or .gz, used for training, read in this order."""
    eval_files: list[str] = field(default_factory=list)
    """Held-out files. Empty: the last `eval_fraction` of the training rows is held out."""
    eval_fraction: float = 0.1
    """Fraction of rows held out for evaluation when `eval_files` is empty."""
    test_fraction: float = 0.0
    """Fraction of rows after the evaluation rows kept as a test split (0 = none)."""
    num_embeddings_per_feature: list[int] = field(
        default_factory=lambda: list(DEFAULT_SYNTHETIC_CARDINALITIES)
    )
    """Hash size (table rows) of each of the 26 categorical features; ids are taken modulo it."""
    max_rows: int = 0
    """Read at most this many rows per file (0 = all)."""
    batch_size: int = 256
    """Global training batch size (split evenly across ranks)."""
    eval_batch_size: int = 4096
    """Evaluation batch size."""
    shuffle: bool = True
    """Shuffle training rows each epoch (seeded by train.seed)."""
    parquet_dir: str = ""
    """Directory of preprocessed Parquet shards (train/, eval/, test/): output of `mlet-dist preprocess`, input of source = 'parquet'."""
    on_bad_row: str = "error"
    """Malformed rows in preprocessing: 'error' (stop, naming file and line) or 'skip' (count them and write them to a quarantine file)."""
    frequency_threshold: int = 0
    """Preprocessing: hashed ids seen fewer than this many times in the training split map to id 0 (0 = keep all ids); for an `ids = 'vocab'` table, the least count of a vocabulary value (others map to row 0)."""
    row_group_rows: int = 131072
    """Rows per Parquet row group written by preprocessing (the unit of reading and of the rank split)."""
    shuffle_buffer_rows: int = 262144
    """Parquet loader: rows shuffled together in one window (bounds its memory; 0 = row groups shuffled, rows in file order)."""
    prefetch_batches: int = 4
    """Parquet loader: batches prepared ahead by its background thread (0 = no thread)."""
    dense: list[DenseFeatureConfig] = field(default_factory=list)
    """Declared schema: the dense features, in model input order (README "Your own data"). With no `sparse` declared, the schema is Criteo's (13 dense + 26 single ids, `num_embeddings_per_feature`)."""
    sparse: list[SparseFeatureConfig] = field(default_factory=list)
    """Declared schema: the categorical features (KJT keys), in model order. Non-empty = a declared schema (`num_embeddings_per_feature` is then unused)."""
    tables: list[TableConfig] = field(default_factory=list)
    """Declared schema: tables shared by several sparse features."""
    label: str = "label"
    """Declared schema: the label column (0/1, or bool)."""
    weight: str = ""
    """Declared schema: a column of non-negative sample weights (numbers, no missing value) that weight each row's loss (mean over the batch of weight x log loss) and the evaluation metrics (README "Your own data"); not a model input. Empty = unweighted."""
    csv_columns: list[str] = field(default_factory=list)
    """source = 'files': the column names of CSV/TSV files without a header line (empty = the first line is the header)."""


@dataclass
class ModelConfig:
    """DLRM with (optionally) factorized MLET embedding tables."""

    embedding_dim: int = 16
    """d: the served embedding dimension."""
    inner_dim: int = 64
    """k: the inner (training) dimension of W1 = vocab × k. 0 = ordinary single-layer tables."""
    inner_dim_per_table: dict[str, int] = field(default_factory=dict)
    """Per-table k overriding `inner_dim`, e.g. {t_cat_0 = 128}; 0 makes that table single-layer."""
    pooling: str = "sum"
    """Pooling of each bag: 'sum' or 'mean'."""
    projection_init: str = "orthogonal"
    """Init of W2 (k × d): 'orthogonal' (orthonormal columns: with optim.w1_lr_scaling the collapsed table then trains exactly like a plain one, README "When does MLET pay off?"), 'normal' (std = projection_init_std) or 'xavier'."""
    projection_init_std: float = 0.0
    """Std of the 'normal' W2 init; 0 means 1/sqrt(k) (keeps the row norm of W1 @ W2 like W1's)."""
    interaction: str = "dot"
    """Feature interaction: 'dot' (DLRM) or 'dcn' (DCNv2 low-rank cross net, as in DLRMv2)."""
    dense_arch_layer_sizes: list[int] = field(default_factory=lambda: [64, 16])
    """Bottom MLP sizes; the last must equal embedding_dim."""
    over_arch_layer_sizes: list[int] = field(default_factory=lambda: [64, 32, 1])
    """Top MLP sizes; the last must be 1."""
    dcn_num_layers: int = 3
    """Cross layers of the DCN interaction."""
    dcn_low_rank_dim: int = 32
    """Low-rank dimension of the DCN cross layers."""
    w1_dtype: str = "fp32"
    """Storage of the trained tables: W1 of every factorized table and the table itself when k = 0 (a single-layer table is the W1 of its model): 'fp32' or 'fp16' (TorchRec `data_type`, half the W1 bytes; the fused optimizer state stays fp32, W2, the MLPs and the collapsed (served) tables stay fp32; quality: README "fp16 W1"). A checkpoint resumes only under the w1_dtype it was written with."""


@dataclass
class OptimConfig:
    """Optimizers: fused (fbgemm, in backward) for W1, a dense one for W2 and the MLPs."""

    embedding_optimizer: str = "rowwise_adagrad"
    """W1 optimizer: 'rowwise_adagrad', 'adagrad', 'sgd' (fbgemm fused) or 'adam' (GPU only)."""
    embedding_lr: float = 0.1
    """Learning rate of single-layer tables, and of W1 (times sqrt(d / k) under w1_lr_scaling). 0.1: the tuned optimum of row-wise Adagrad on the synthetic teacher and MovieLens (README "When does MLET pay off?")."""
    dense_optimizer: str = "adagrad"
    """Optimizer of W2 and the MLPs: 'adagrad', 'adam' or 'sgd'."""
    dense_lr: float = 0.05
    """Learning rate of the MLPs."""
    projection_lr: float = 0.02
    """Learning rate of W2; 0 means the same as dense_lr."""
    w1_lr_scaling: str = "auto"
    """'sqrt_d_over_k': W1 of MLET(k, d) trains with embedding_lr * sqrt(d / k). With row-wise Adagrad and W2 of orthonormal columns (model.projection_init = 'orthogonal') a W1 step then moves the collapsed rows W1 @ W2 exactly as far as a plain d-dim table's step at embedding_lr (README "When does MLET pay off?"), so one tuned embedding_lr serves both and MLET differs from the plain table only by what W2 learns. Needs one k for every table. 'auto': the same when every table is factorized with one k, else 'none'. 'none': embedding_lr as it is (W1's steps then move the collapsed table about sqrt(k / d) times further than a plain table's)."""
    eps: float = 1e-8
    """Epsilon of the Adagrad/Adam optimizers."""
    warmup_steps: int = 0
    """Linear warm-up steps of the learning rate."""
    decay_start_step: int = 0
    """Step at which polynomial decay starts (0 with decay_steps = 0: no decay)."""
    decay_steps: int = 0
    """Steps over which the learning rate decays to 0 (squared polynomial, as MLPerf DLRM)."""


@dataclass
class TrainConfig:
    """The training loop."""

    epochs: int = 1
    """Passes over the training split."""
    max_steps: int = 0
    """Stop after this many steps (0 = no limit)."""
    seed: int = 0
    """Seed of model init and data order."""
    log_every: int = 50
    """Log training loss every N steps (rank 0)."""
    checkpoint_every: int = 0
    """Write a checkpoint every N steps (0 = only at the end)."""
    run_dir: str = "runs/default"
    """Directory of the run: config, metrics, checkpoints."""
    progress: bool = True
    """Show a progress bar (rank 0)."""
    pipeline: str = "sparse_dist"
    """'sparse_dist' (TorchRec TrainPipelineSparseDist: next batch's copy/input dist overlap) or 'base'."""
    sync_every: int = 10
    """Ranks agree on stop/NaN flags every N steps (and before every save and logged loss)."""
    metrics_every: int = 0
    """Compute and log TorchRec RecMetrics (AUC, NE, calibration, throughput) every N steps (0 = off)."""
    eval_every: int = 0
    """Evaluate on the eval split every N steps during training (0 = only at the end)."""
    tensorboard: bool = False
    """Write TensorBoard scalars to RUN/tb/ (rank 0; `tensorboard --logdir runs/`)."""


@dataclass
class DistConfig:
    """Placement of the embedding tables across ranks."""

    backend: str = ""
    """'gloo' or 'nccl'; empty = nccl on GPU, gloo on CPU."""
    device: str = "auto"
    """'cpu', 'cuda' or 'auto' (cuda when available)."""
    sharding_types: list[str] = field(default_factory=list)
    """Sharding types the planner may use for every table (empty = any that fits)."""
    compute_kernel: str = "fused"
    """Embedding compute kernel: 'fused' (fbgemm TBE with optimizer in backward)."""
    hbm_cap_gb: float = 0.0
    """Per-device memory cap given to the planner in GB (0 = the device default)."""
    ddr_cap_gb: float = 0.0
    """Per-host DDR cap given to the planner in GB (0 = the default)."""
    min_partition: int = 0
    """Smallest column-wise shard width (0 = planner default); set below k to split columns."""


@dataclass
class Config:
    """The whole configuration of a run."""

    data: DataConfig = field(default_factory=DataConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_ALLOWED = {
    ("model", "pooling"): ("sum", "mean"),
    ("model", "projection_init"): ("normal", "xavier", "orthogonal"),
    ("model", "interaction"): ("dot", "dcn"),
    ("model", "w1_dtype"): ("fp32", "fp16"),
    ("optim", "embedding_optimizer"): ("rowwise_adagrad", "adagrad", "sgd", "adam"),
    ("optim", "dense_optimizer"): ("adagrad", "adam", "sgd"),
    ("optim", "w1_lr_scaling"): ("none", "sqrt_d_over_k", "auto"),
    ("data", "source"): ("synthetic", "criteo", "avazu", "movielens", "parquet", "files"),
    ("data", "on_bad_row"): ("error", "skip"),
    ("train", "pipeline"): ("sparse_dist", "base"),
    ("dist", "backend"): ("", "gloo", "nccl"),
    ("dist", "device"): ("auto", "cpu", "cuda"),
    ("dist", "compute_kernel"): ("fused",),
}


def _check_type(where: str, value: Any, tp: Any) -> Any:
    """Checks (and mildly coerces: int -> float) a value against a field annotation."""
    origin = typing.get_origin(tp)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
            return value
        raise ConfigError(
            f"{where}: expected {tp.__name__}, got {value!r} ({type(value).__name__})"
        )
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_check_type(f"{where}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table {{key = value}}, got {value!r}")
        return {
            _check_type(f"{where} key", k, key_tp): _check_type(f"{where}.{k}", v, val_tp)
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(tp):  # an item of an array of tables ([[data.sparse]])
        if isinstance(value, tp):
            value = dataclasses.asdict(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table {{key = value}}, got {value!r}")
        hints = typing.get_type_hints(tp)
        unknown = sorted(set(value) - set(hints))
        if unknown:
            raise ConfigError(
                f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(hints)}"
            )
        return tp(**{k: _check_type(f"{where}.{k}", v, hints[k]) for k, v in value.items()})
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check_type(where, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {value!r} does not match {tp}")
    raise TypeError(f"unsupported config annotation {tp} at {where}")  # a bug in this file


def _section_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _apply(cfg: Config, section: str, key: str, value: Any, origin: str) -> None:
    sections = {f.name: f for f in dataclasses.fields(Config)}
    if section not in sections:
        raise ConfigError(
            f"{origin}: unknown section [{section}]; valid sections: {', '.join(sections)}"
        )
    sub = getattr(cfg, section)
    hints = _section_types(type(sub))
    if key not in hints:
        raise ConfigError(
            f"{origin}: unknown key '{section}.{key}'; valid keys of [{section}]: "
            f"{', '.join(hints)}"
        )
    value = _check_type(f"{origin}: {section}.{key}", value, hints[key])
    allowed = _ALLOWED.get((section, key))
    if allowed is not None and value not in allowed:
        raise ConfigError(
            f"{origin}: {section}.{key} = {value!r} is not one of {', '.join(map(repr, allowed))}"
        )
    setattr(sub, key, value)


def _parse_override_value(raw: str) -> Any:
    """Parses the right-hand side of ``--a.b=value`` as a TOML value, else as a plain string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def parse_overrides(overrides: list[str]) -> list[tuple[str, str, Any]]:
    """Turns ``["--model.inner_dim=64", ...]`` into ``[("model", "inner_dim", 64), ...]``."""
    out = []
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text or "." not in text.split("=", 1)[0]:
            raise ConfigError(
                f"override '{item}' must look like --section.key=value (e.g. --model.inner_dim=64)"
            )
        path, raw = text.split("=", 1)
        section, key = path.split(".", 1)
        out.append((section, key, _parse_override_value(raw)))
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Loads a Config from an optional TOML file and ``--section.key=value`` overrides.

    Args:
        path: TOML file with one table per section ([data], [model], ...); None = defaults.
        overrides: command-line overrides applied after the file.

    Returns:
        The validated Config.

    Raises:
        ConfigError: unreadable file, unknown section/key, wrong type or value.
    """
    cfg = Config()
    if path is not None:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError as e:
            raise ConfigError(
                f"config file {path} does not exist (see configs/ for examples)"
            ) from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from e
        for section, table in raw.items():
            if not isinstance(table, dict):
                raise ConfigError(
                    f"{path}: top-level key '{section}' must be a [section] table; "
                    f"valid sections: {', '.join(f.name for f in dataclasses.fields(Config))}"
                )
            for key, value in table.items():
                _apply(cfg, section, key, value, str(path))
    for section, key, value in parse_overrides(overrides or []):
        _apply(cfg, section, key, value, "command line")
    validate(cfg)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Applies ``--section.key=value`` overrides to a Config in place and re-validates it."""
    for section, key, value in parse_overrides(overrides):
        _apply(cfg, section, key, value, "command line")
    validate(cfg)
    return cfg


def config_from_dict(raw: dict[str, Any], origin: str = "saved config") -> Config:
    """Rebuilds a Config from ``Config.to_dict()`` output (e.g. a run's config.json)."""
    cfg = Config()
    for section, table in raw.items():
        for key, value in table.items():
            _apply(cfg, section, key, value, origin)
    validate(cfg)
    return cfg


CATEGORICAL_FEATURES = 26
"""Categorical features of every data source (Criteo C1..C26; Avazu, MovieLens mapped onto them)."""


def check_feature_count(data: DataConfig) -> None:
    """Refuses a table-size list that does not match the data's 26 categorical features.

    Called before any data is read or anything is written by the commands that read data
    (train, run, evaluate, preprocess). Not part of :func:`validate`: `plan`, a dry run
    without data, accepts any number of tables.
    """
    if data.sparse:  # a declared schema: checked by mlet_dist.schema.schema_of
        return
    n = len(data.num_embeddings_per_feature)
    if n != CATEGORICAL_FEATURES:
        raise ConfigError(
            f"data.num_embeddings_per_feature has {n} values, expected {CATEGORICAL_FEATURES} "
            f"(one hash size per categorical feature of the Criteo layout every data source is "
            f"read into: Criteo's C1..C26; Avazu and MovieLens leave their last ones unused, "
            f"size 1)"
        )


def check_weight(data: DataConfig) -> None:
    """Refuses ``data.weight`` without a declared schema (the Criteo preset has no weights)."""
    if data.weight and not data.sparse:
        raise ConfigError(
            f"data.weight = {data.weight!r} needs a declared schema ([[data.sparse]], README "
            f'"Your own data"): the Criteo preset has no weight column; remove data.weight'
        )


def validate(cfg: Config) -> None:
    """Cross-field checks that a single key cannot express."""
    m = cfg.model
    if m.embedding_dim <= 0:
        raise ConfigError(f"model.embedding_dim must be positive, got {m.embedding_dim}")
    if m.dense_arch_layer_sizes and m.dense_arch_layer_sizes[-1] != m.embedding_dim:
        raise ConfigError(
            f"model.dense_arch_layer_sizes must end with embedding_dim={m.embedding_dim} (the "
            f"bottom MLP output is interacted with the embeddings), got {m.dense_arch_layer_sizes}"
        )
    if not m.over_arch_layer_sizes or m.over_arch_layer_sizes[-1] != 1:
        raise ConfigError(
            f"model.over_arch_layer_sizes must end with 1 (one logit), got {m.over_arch_layer_sizes}"
        )
    # fbgemm's TBE kernels (training W1, serving the collapsed table) need widths divisible by 4.
    for name, width in [
        ("model.embedding_dim", m.embedding_dim),
        ("model.inner_dim", m.inner_dim),
        *((f"model.inner_dim_per_table.{t}", k) for t, k in m.inner_dim_per_table.items()),
    ]:
        if width % 4:
            raise ConfigError(
                f"{name} = {width} is not a multiple of 4: fbgemm's embedding kernels (TorchRec "
                f"training and serving) need table widths divisible by 4; use e.g. "
                f"{max(4, width - width % 4)} or {width - width % 4 + 4}"
            )
    for name, k in [("model.inner_dim", m.inner_dim), *m.inner_dim_per_table.items()]:
        if k and k < m.embedding_dim:
            raise ConfigError(
                f"{name} = {k} is smaller than model.embedding_dim = {m.embedding_dim}: MLET needs "
                f"k >= d (use 0 for an ordinary single-layer table)"
            )
    if cfg.optim.w1_lr_scaling == "sqrt_d_over_k":
        ks = {m.inner_dim, *m.inner_dim_per_table.values()}
        if len(ks) > 1:
            raise ConfigError(
                f"optim.w1_lr_scaling = {cfg.optim.w1_lr_scaling!r} needs one inner dimension for "
                f"every table (all W1 tables share one fused optimizer), got k in {sorted(ks)}: "
                f"drop model.inner_dim_per_table or set optim.w1_lr_scaling = 'none'"
            )
    n = len(cfg.data.num_embeddings_per_feature)
    if any(v <= 0 for v in cfg.data.num_embeddings_per_feature):
        raise ConfigError("data.num_embeddings_per_feature must all be positive")
    if n == 0:
        raise ConfigError(
            "data.num_embeddings_per_feature is empty: give one hash size per feature"
        )
    if not 0.0 <= cfg.data.eval_fraction < 1.0 or not 0.0 <= cfg.data.test_fraction < 1.0:
        raise ConfigError("data.eval_fraction and data.test_fraction must be in [0, 1)")
    if cfg.data.batch_size <= 0:
        raise ConfigError(f"data.batch_size must be positive, got {cfg.data.batch_size}")
    if not 0 <= cfg.data.frequency_threshold <= 65535:
        raise ConfigError(
            f"data.frequency_threshold must be in [0, 65535] (0 = off), got "
            f"{cfg.data.frequency_threshold}"
        )
    if cfg.data.row_group_rows <= 0:
        raise ConfigError(f"data.row_group_rows must be positive, got {cfg.data.row_group_rows}")
    if cfg.data.shuffle_buffer_rows < 0 or cfg.data.prefetch_batches < 0:
        raise ConfigError("data.shuffle_buffer_rows and data.prefetch_batches must be >= 0")
    t = cfg.train
    if t.sync_every < 1 or t.metrics_every < 0 or t.eval_every < 0:
        raise ConfigError("train.sync_every must be >= 1, train.metrics_every/eval_every >= 0")
    check_weight(cfg.data)
    if cfg.data.source == "parquet" and not cfg.data.parquet_dir:
        raise ConfigError(
            "data.source = 'parquet' needs data.parquet_dir (the output directory of "
            "`mlet-dist preprocess`)"
        )


def w1_learning_rate(cfg: Config) -> float:
    """The learning rate W1's fused optimizer gets: ``optim.embedding_lr``, times sqrt(d / k)
    under ``optim.w1_lr_scaling`` = 'sqrt_d_over_k', or 'auto' when every table is factorized
    with one k (see that key)."""
    o, m = cfg.optim, cfg.model
    uniform = bool(m.inner_dim) and all(k == m.inner_dim for k in m.inner_dim_per_table.values())
    if o.w1_lr_scaling in ("sqrt_d_over_k", "auto") and uniform:
        return o.embedding_lr * (m.embedding_dim / m.inner_dim) ** 0.5
    return o.embedding_lr


def load_run_config(run_dir: str | Path) -> Config:
    """The config a training run was trained with (``RUN/config.json``)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"{run_dir} is not a run directory (no config.json); pass --run RUN_DIR of a training run"
        )
    return config_from_dict(json.loads(path.read_text()), origin=str(path))
