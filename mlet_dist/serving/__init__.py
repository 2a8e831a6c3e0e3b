"""The serving handoff: the predictors (torch.export, AOTInductor, TorchScript), the manifest,
scoring arrays of rows. The served table formats are :mod:`mlet_dist.modules.quantize` (its public
names are re-exported here).

See README "Serving contract" for what a serving directory holds.
"""

from mlet_dist.modules.quantize import SERVING_DTYPES, dequantize_rows, quantize_rows
from mlet_dist.serving.manifest import ServingError, read_manifest, verify_manifest

__all__ = [
    "SERVING_DTYPES",
    "ServingError",
    "dequantize_rows",
    "quantize_rows",
    "read_manifest",
    "verify_manifest",
]
