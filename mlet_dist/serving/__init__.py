"""The serving handoff: served table formats, the predictors (torch.export, AOTInductor,
TorchScript), the manifest, scoring.

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
