"""Typed configuration: dataclasses loaded from TOML files with ``--section.key=value`` overrides.

Precedence is command line > TOML file > dataclass defaults (as in torchtitan). Every component
receives only its own sub-config. Unknown sections or keys are an error that lists the valid ones.

Example::

    cfg = load_config("configs/synthetic_small.toml", ["--model.inner_dim=128"])
    cfg.model.inner_dim  # 128

One module per section (``data``, ``synthetic``, ``model``, ``optim``, ``train``, ``dist``), each a
typed dataclass with a docstring under every field, its choices as ``Literal`` next to the field and
a ``check()`` of its own; ``load`` builds the whole :class:`Config` and runs the checks. A floor
package: it imports nothing of mlet_dist but :mod:`mlet_dist.errors`.
"""

from mlet_dist.config.data import (
    CATEGORICAL_FEATURES,
    DEFAULT_SYNTHETIC_CARDINALITIES,
    MLPERF_40M_TABLE_SIZES,
    DataConfig,
    check_feature_count,
    check_weight,
)
from mlet_dist.config.dist import DistConfig
from mlet_dist.config.error import ConfigError
from mlet_dist.config.features import DenseFeatureConfig, SparseFeatureConfig, TableConfig
from mlet_dist.config.load import (
    Config,
    apply_key,
    apply_overrides,
    config_from_dict,
    load_config,
    parse_overrides,
    validate,
)
from mlet_dist.config.model import ModelConfig, table_inner_dim
from mlet_dist.config.optim import OptimConfig
from mlet_dist.config.synthetic import SyntheticConfig
from mlet_dist.config.train import TrainConfig

__all__ = [
    "CATEGORICAL_FEATURES",
    "DEFAULT_SYNTHETIC_CARDINALITIES",
    "MLPERF_40M_TABLE_SIZES",
    "Config",
    "ConfigError",
    "DataConfig",
    "DenseFeatureConfig",
    "DistConfig",
    "ModelConfig",
    "OptimConfig",
    "SparseFeatureConfig",
    "SyntheticConfig",
    "TableConfig",
    "TrainConfig",
    "apply_key",
    "apply_overrides",
    "check_feature_count",
    "check_weight",
    "config_from_dict",
    "load_config",
    "parse_overrides",
    "table_inner_dim",
    "validate",
]
