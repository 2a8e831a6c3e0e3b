from mlet_dist.modules.collapse import collapse, collapse_rows
from mlet_dist.modules.mlet import (
    MLETConfigError,
    MLETEmbeddingBagCollection,
    MLETEmbeddingBagConfig,
    MLETProjection,
    inner_dim_of,
)

__all__ = [
    "MLETConfigError",
    "MLETEmbeddingBagCollection",
    "MLETEmbeddingBagConfig",
    "MLETProjection",
    "collapse",
    "collapse_rows",
    "inner_dim_of",
]
