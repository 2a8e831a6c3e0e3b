"""The feature schema: which dense and categorical features a model reads, and its tables.

A config either declares a schema (``[[data.dense]]``, ``[[data.sparse]]``, ``[[data.tables]]``,
``data.label``; docs/own-data.md) or declares none, which is the Criteo preset: 13 dense
features ``int_0..int_12`` (log1p) and 26 single-id features ``cat_0..cat_25``, each with its own
table ``t_cat_j`` of ``data.num_embeddings_per_feature[j]`` rows. :func:`schema_of` resolves a
``[data]`` section into a validated :class:`FeatureSchema`; every part of the package that shapes
a model or reads rows takes it from there, so a schema means the same thing everywhere.

Feature order: the model's categorical features are grouped by table (tables in order of their
first feature, a table's features in declaration order), the order the MLET module and the served
predictor use; batches are built in that order, so no permutation is needed.

No dense feature: DLRM's bottom MLP needs at least one input, so a schema without dense features
feeds it one constant 1.0 (``dense_in_features`` = 1). The bottom MLP then outputs a learned
constant vector, which takes part in the interaction like a bias "feature"; nothing else changes.

Pure (config only): models, data and serving import it.

Example::

    schema = schema_of(cfg.data)
    schema.feature_names      # ('user', 'movie', 'genres', ...)
    schema.dense_in_features  # 1 when no dense feature is declared
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from mlet_dist.config import (
    ConfigError,
    DataConfig,
    DenseFeatureConfig,
    SparseFeatureConfig,
    check_weight,
)

__all__ = [
    "CRITEO_DENSE",
    "FeatureSchema",
    "SchemaError",
    "Table",
    "criteo_schema",
    "schema_from_dict",
    "schema_of",
]

CRITEO_DENSE = 13
TRANSFORMS = ("none", "log1p")
ID_KINDS = ("hash", "int", "vocab")
POOLINGS = ("", "sum", "mean")


class SchemaError(ConfigError):
    """A declared feature schema is invalid; the message names the key and the fix."""


@dataclass(frozen=True)
class Table:
    """One embedding table of the model.

    Attributes:
        name: table name (``t_<feature>`` for a feature's own table).
        num_embeddings: rows.
        pooling: 'sum', 'mean' or '' (= ``model.pooling``).
        features: the features looking it up, in model order.
    """

    name: str
    num_embeddings: int
    pooling: str
    features: tuple[str, ...]


@dataclass(frozen=True)
class FeatureSchema:
    """A validated feature schema (see the module docstring).

    Attributes:
        dense: the dense features, in model input order.
        sparse: the categorical features in model order (grouped by table).
        tables: the tables in model order.
        label: the label column.
        weight: the sample-weight column ('' = unweighted; not a model input).
        criteo: the Criteo preset (no schema declared): read by the Criteo-layout fast path.
    """

    dense: tuple[DenseFeatureConfig, ...]
    sparse: tuple[SparseFeatureConfig, ...]
    tables: tuple[Table, ...]
    label: str = "label"
    criteo: bool = False
    weight: str = ""

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The categorical features (KJT keys) in model order."""
        return tuple(f.name for f in self.sparse)

    @property
    def dense_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.dense)

    @property
    def dense_in_features(self) -> int:
        """Width of the bottom MLP's input: the dense features, or 1 (a constant) when none."""
        return max(1, len(self.dense))

    def table_of(self, feature: str) -> Table:
        for t in self.tables:
            if feature in t.features:
                return t
        raise KeyError(feature)

    @property
    def vocab_tables(self) -> tuple[Table, ...]:
        """The tables whose features map values through a vocabulary (``ids = 'vocab'``)."""
        kinds = {f.name: f.ids for f in self.sparse}
        return tuple(t for t in self.tables if kinds[t.features[0]] == "vocab")

    @property
    def feature_sizes(self) -> list[int]:
        """Rows of each feature's table, in model order."""
        return [self.table_of(f).num_embeddings for f in self.feature_names]

    def to_dict(self) -> dict:
        """JSON form (the serving manifest's ``schema``); :func:`schema_from_dict` inverts it."""
        return {
            "dense": [asdict(f) for f in self.dense],
            "sparse": [asdict(f) for f in self.sparse],
            "tables": [
                {
                    "name": t.name,
                    "num_embeddings": t.num_embeddings,
                    "pooling": t.pooling,
                    "features": list(t.features),
                }
                for t in self.tables
            ],
            "label": self.label,
            "criteo": self.criteo,
            # only when set: unweighted schemas write what they wrote before the key existed
            **({"weight": self.weight} if self.weight else {}),
        }


def schema_from_dict(raw: dict) -> FeatureSchema:
    """The schema :meth:`FeatureSchema.to_dict` wrote."""
    return FeatureSchema(
        dense=tuple(DenseFeatureConfig(**f) for f in raw["dense"]),
        sparse=tuple(SparseFeatureConfig(**f) for f in raw["sparse"]),
        tables=tuple(
            Table(t["name"], int(t["num_embeddings"]), t["pooling"], tuple(t["features"]))
            for t in raw["tables"]
        ),
        label=raw.get("label", "label"),
        criteo=bool(raw.get("criteo", False)),
        weight=raw.get("weight", ""),
    )


def criteo_schema(num_embeddings_per_feature: Sequence[int]) -> FeatureSchema:
    """The Criteo preset: ``int_0..int_12`` (log1p), ``cat_j`` with own tables ``t_cat_j``."""
    dense = tuple(
        DenseFeatureConfig(name=f"int_{j}", transform="log1p") for j in range(CRITEO_DENSE)
    )
    sparse = tuple(
        SparseFeatureConfig(name=f"cat_{j}", num_embeddings=int(n))
        for j, n in enumerate(num_embeddings_per_feature)
    )
    tables = tuple(
        Table(f"t_cat_{j}", int(n), "", (f"cat_{j}",))
        for j, n in enumerate(num_embeddings_per_feature)
    )
    return FeatureSchema(dense, sparse, tables, "label", criteo=True)


def _check_name(key: str, name: str, seen: set[str]) -> None:
    if not name:
        raise SchemaError(f"{key}.name is empty: give every feature and table a name")
    if name in seen:
        raise SchemaError(f"{key}.name = {name!r} is used twice: names must be unique")
    seen.add(name)


def _check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise SchemaError(
            f"{key} = {value!r} is not one of {', '.join(repr(a) for a in allowed if a)}"
        )


def schema_of(data: DataConfig) -> FeatureSchema:
    """The validated schema of a ``[data]`` section (the Criteo preset when none is declared).

    Raises:
        SchemaError: a declared schema is inconsistent; the message names the key
            (``data.sparse[2].table``, ...) and the fix.
    """
    check_weight(data)
    if not data.sparse:
        if data.dense or data.tables:
            raise SchemaError(
                "data.dense / data.tables are declared but data.sparse is empty: a declared "
                "schema needs at least one [[data.sparse]] feature (DLRM interacts embeddings)"
            )
        return criteo_schema(data.num_embeddings_per_feature)
    if not data.label:
        raise SchemaError("data.label is empty: name the label column (0/1)")
    seen: set[str] = set()
    for i, f in enumerate(data.dense):
        _check_name(f"data.dense[{i}]", f.name, seen)
        _check_choice(f"data.dense[{i}].transform ({f.name})", f.transform, TRANSFORMS)
    shared: dict[str, tuple[int, str]] = {}
    table_names: set[str] = set()
    for i, t in enumerate(data.tables):
        _check_name(f"data.tables[{i}]", t.name, table_names)
        if t.num_embeddings <= 0:
            raise SchemaError(
                f"data.tables[{i}].num_embeddings ({t.name}) = {t.num_embeddings}: give the "
                f"table's row count (> 0)"
            )
        _check_choice(f"data.tables[{i}].pooling ({t.name})", t.pooling, POOLINGS)
        shared[t.name] = (t.num_embeddings, t.pooling)
    seen = set()
    members: dict[str, list[SparseFeatureConfig]] = {}
    own: dict[str, tuple[int, str]] = {}
    for i, f in enumerate(data.sparse):
        key = f"data.sparse[{i}]"
        _check_name(key, f.name, seen)
        _check_choice(f"{key}.ids ({f.name})", f.ids, ID_KINDS)
        _check_choice(f"{key}.pooling ({f.name})", f.pooling, POOLINGS)
        if f.max_length < 1:
            raise SchemaError(
                f"{key}.max_length ({f.name}) = {f.max_length}: use 1 for one id per sample or "
                f"the longest list to keep for a multi-hot feature"
            )
        if f.chars and f.ids == "vocab":
            raise SchemaError(
                f"{key}.chars ({f.name}): a part of a value cannot be looked up in a vocabulary "
                f"(ids = 'vocab'): use ids = 'hash' or 'int' with chars"
            )
        if f.chars and not (
            len(f.chars) == 2 and 0 <= f.chars[0] < f.chars[1] and f.max_length == 1
        ):
            raise SchemaError(
                f"{key}.chars ({f.name}) = {f.chars}: give [start, stop] with 0 <= start < stop "
                f"(characters start..stop-1 of the value) on a single-id feature (max_length = 1)"
            )
        if f.table:
            if f.table not in shared:
                raise SchemaError(
                    f"{key}.table ({f.name}) = {f.table!r} is not a [[data.tables]] name "
                    f"({', '.join(sorted(shared)) or 'none declared'}): declare it, or leave "
                    f"table empty for a table of the feature's own"
                )
            if f.num_embeddings or f.pooling:
                raise SchemaError(
                    f"{key} ({f.name}) looks up the shared table {f.table!r}: set its "
                    f"num_embeddings and pooling on the [[data.tables]] entry, not on the feature"
                )
            name = f.table
        else:
            if f.num_embeddings <= 0:
                raise SchemaError(
                    f"{key}.num_embeddings ({f.name}) = {f.num_embeddings}: a feature with its "
                    f"own table needs its row count (> 0), or set table to a [[data.tables]] name"
                )
            name = f"t_{f.name}"
            if name in shared:
                raise SchemaError(
                    f"{key} ({f.name}): its own table would be named {name!r}, which is a "
                    f"[[data.tables]] name; rename that table or set table = {name!r}"
                )
            own[name] = (f.num_embeddings, f.pooling)
        members.setdefault(name, []).append(f)
    unused = [t for t in shared if t not in members]
    if unused:
        raise SchemaError(
            f"data.tables: {unused[0]!r} is looked up by no [[data.sparse]] feature: set a "
            f"feature's table = {unused[0]!r} or remove the table"
        )
    tables = []
    for name, feats in members.items():  # dicts keep first-use order
        vocab = [f.name for f in feats if f.ids == "vocab"]
        if vocab and len(vocab) != len(feats):
            other = next(f for f in feats if f.ids != "vocab")
            raise SchemaError(
                f"data.sparse: the features of table {name!r} mix ids = 'vocab' ({vocab[0]}) and "
                f"ids = {other.ids!r} ({other.name}): one vocabulary serves the whole table, so "
                f"set the same ids on all of its features"
            )
        rows, pooling = shared.get(name) or own[name]
        tables.append(Table(name, rows, pooling, tuple(f.name for f in feats)))
    sparse = tuple(f for name in members for f in members[name])
    _check_weight_column(data)
    return FeatureSchema(tuple(data.dense), sparse, tuple(tables), data.label, weight=data.weight)


def _check_weight_column(data: DataConfig) -> None:
    """``data.weight`` is neither the label nor named like a shard column of a feature."""
    if not data.weight:
        return
    if data.weight == data.label:
        raise SchemaError(
            f"data.weight = {data.weight!r} is the label column (data.label): name the column of "
            f"sample weights, or leave data.weight empty"
        )
    for key, feats in (("data.dense", data.dense), ("data.sparse", data.sparse)):
        for i, f in enumerate(feats):
            if f.name == "weight":  # the preprocessed shards' column of the weights
                raise SchemaError(
                    f"{key}[{i}].name = 'weight' is reserved when data.weight is set (the "
                    f"shards' weight column): rename the feature and read it with column = "
                    f"{f.column or f.name!r}"
                )
