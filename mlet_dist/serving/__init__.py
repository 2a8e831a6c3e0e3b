"""The serving handoff: the serving artifacts (:mod:`~mlet_dist.serving.artifacts`: torch.export,
AOTInductor, TorchScript), the manifest, scoring arrays of rows. The served table formats are
:mod:`mlet_dist.modules.quantize` (its public names are re-exported here).

See docs/serving.md for what a serving directory holds.

Importing this package does not import torch (the command line reads the artifact registry for its
flags): the table-format names are imported from :mod:`mlet_dist.modules.quantize` on first use.
"""

from typing import Any

from mlet_dist.serving.manifest import ServingError, read_manifest, verify_manifest

_FROM_QUANTIZE = ("SERVING_DTYPES", "dequantize_rows", "quantize_rows")

__all__ = [
    "SERVING_DTYPES",
    "ServingError",
    "dequantize_rows",
    "quantize_rows",
    "read_manifest",
    "verify_manifest",
]


def __getattr__(name: str) -> Any:
    if name in _FROM_QUANTIZE:
        from mlet_dist.modules import quantize

        return getattr(quantize, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
