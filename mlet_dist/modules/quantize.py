"""Row formats of the served tables: fp32, fp16 and TorchRec's row-wise int8.

One tensor per table, one row per embedding row:

- ``fp32``: float32 (rows, d).
- ``fp16``: float16 (rows, d), round to nearest (``Tensor.half()``), as TorchRec's FP16 tables.
- ``int8``: uint8 (rows, d + 4): d quantized values, then an fp16 scale and an fp16 bias (4 bytes),
  ``x ≈ q * scale + bias`` with ``bias = min(row)`` and ``scale = (max(row) - min(row)) / 255``,
  both rounded to fp16. This is fbgemm's "fused 8-bit row-wise, SBHalf" layout, made by the very
  kernel TorchRec's ``quantize_state_dict`` uses for INT8 tables
  (``FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf`` with 8 bits); TorchRec's quantized
  ``EmbeddingBagCollection`` (fbgemm's ``IntNBitTableBatchedEmbeddingBagsCodegen``) serves it, the
  first d bytes as the weight and the last 4 as ``scale_shift``.

Note: fbgemm's ``FloatToFused8BitRowwiseQuantized`` (fp32 scale and bias, d + 8 bytes) is the
training-side format; TorchRec's INT8 inference tables do not load it, so it is not used here.

Quantization is per row: quantizing a table chunk by chunk gives exactly the bytes that quantizing
the whole table at once gives.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
import torch

SERVING_DTYPES = ("fp32", "fp16", "int8")
"""Names of the serving table formats (``--quantize``)."""

INT8_SCALE_BIAS_BYTES = 4  # fp16 scale + fp16 bias per row


def check_dtype(dtype: str) -> str:
    if dtype not in SERVING_DTYPES:
        raise ValueError(f"unknown serving dtype '{dtype}'; use one of {', '.join(SERVING_DTYPES)}")
    return dtype


def serving_layout(dtype: str, dim: int) -> tuple[torch.dtype, int]:
    """(torch dtype, columns) of one served table of dimension ``dim`` in this format."""
    check_dtype(dtype)
    if dtype == "fp32":
        return torch.float32, dim
    if dtype == "fp16":
        return torch.float16, dim
    return torch.uint8, dim + INT8_SCALE_BIAS_BYTES


_MIN_ROWS_PER_THREAD = 1024
_pool: ThreadPoolExecutor | None = None
_pool_workers = 0


def _int8_rows_into(rows: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(rows, 8))


def quantize_rows_into(rows: torch.Tensor, dtype: str, out: torch.Tensor) -> None:
    """Writes float32 ``rows`` (n, d) in the serving format into ``out`` (n rows, see
    :func:`serving_layout`).

    fbgemm's CPU quantization kernel runs on one thread; on CPU, large chunks are split over
    ``torch.get_num_threads()`` Python threads (the operator releases the GIL). The bytes do not
    depend on the split (the format is per row).
    """
    global _pool, _pool_workers
    if dtype != "int8":
        out.copy_(rows)  # float32, or float16 rounded to nearest
        return
    parts = min(torch.get_num_threads(), rows.shape[0] // _MIN_ROWS_PER_THREAD)
    if rows.device.type != "cpu" or parts < 2:
        _int8_rows_into(rows, out)
        return
    if _pool is None or _pool_workers < parts:
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool = ThreadPoolExecutor(max_workers=parts, thread_name_prefix="mlet-quantize")
        _pool_workers = parts
    bounds = [rows.shape[0] * j // parts for j in range(parts + 1)]
    futures = [
        _pool.submit(_int8_rows_into, rows[a:b], out[a:b]) for a, b in itertools.pairwise(bounds)
    ]
    for f in futures:
        f.result()


def quantize_rows(rows: torch.Tensor, dtype: str) -> torch.Tensor:
    """Float rows (n, d) in the serving format."""
    dt, cols = serving_layout(dtype, rows.shape[1])
    out = torch.empty(rows.shape[0], cols, dtype=dt, device=rows.device)
    quantize_rows_into(rows.float().contiguous(), dtype, out)
    return out


def dequantize_rows(served: torch.Tensor, dtype: str) -> torch.Tensor:
    """The float32 values (n, d) a served table of this format represents (plain torch)."""
    check_dtype(dtype)
    if dtype != "int8":
        return served.float()
    scale_bias = served[:, -INT8_SCALE_BIAS_BYTES:].contiguous().view(torch.float16).float()
    return served[:, :-INT8_SCALE_BIAS_BYTES].float() * scale_bias[:, :1] + scale_bias[:, 1:]


def tbe_weights(served: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight bytes, scale_shift bytes) as TorchRec's quantized EBC takes a table
    (``table_name_to_quantized_weights``): uint8 views, the fp16 scale and bias split off."""
    check_dtype(dtype)
    if dtype != "int8":
        return served.contiguous().view(torch.uint8), None
    return (
        served[:, :-INT8_SCALE_BIAS_BYTES].contiguous(),
        served[:, -INT8_SCALE_BIAS_BYTES:].contiguous(),
    )
