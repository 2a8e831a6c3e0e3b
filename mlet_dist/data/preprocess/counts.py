"""The frequency threshold: counting the ids of the training parts (pass 1), merging the counts
into 'frequent' bitmaps, and replacing the rare ids while writing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from mlet_dist.data.arrays import CAT_FEATURE_COUNT, DEFAULT_CAT_NAMES
from mlet_dist.data.parquet import RARE_ID
from mlet_dist.data.preprocess.parts import (
    Part,
    PreprocessSettings,
    counts_path,
    frequent_path,
    read_part,
)
from mlet_dist.data.preprocess.pool import peak_rss_mb, report, rss_mb
from mlet_dist.utils.files import atomic_path

# Counting with np.bincount allocates the whole table; beyond this many rows per table row
# np.unique on the chunk is cheaper.
_BINCOUNT_MAX_TABLE_PER_ROW = 4


def _add_counts(counts: np.ndarray, ids: np.ndarray, cap: int) -> None:
    """counts[id] += occurrences of id in ``ids``, saturating at ``cap`` (bounded temporaries)."""
    if counts.shape[0] <= _BINCOUNT_MAX_TABLE_PER_ROW * max(ids.shape[0], 1):
        added = np.bincount(ids, minlength=counts.shape[0])
        counts[:] = np.minimum(counts + added, cap)
    else:
        unique, occurrences = np.unique(ids, return_counts=True)
        counts[unique] = np.minimum(counts[unique].astype(np.int64) + occurrences, cap)


def count_part(part: Part, out: str, settings: PreprocessSettings) -> dict[str, Any]:
    """Pass 1 (threshold only): saturating per-id counts of a training part, saved to _state."""
    out_dir = Path(out)
    final = counts_path(out_dir, part)
    if final.is_file():
        return {"part": part.key, "skipped": True}
    t0 = time.perf_counter()
    rss_before = rss_mb()
    sizes = settings.num_embeddings_per_feature
    cap = settings.frequency_threshold
    dtype = np.uint8 if cap <= 255 else np.uint16
    counts = [np.zeros(s, dtype=dtype) for s in sizes]
    rows = input_bytes = 0
    for size, arrays, bad in read_part(part, settings):
        input_bytes += size
        for j in range(CAT_FEATURE_COUNT):
            _add_counts(counts[j], arrays.sparse[:, j], cap)
        rows += len(arrays)
        report(len(arrays) + len(bad))
    with atomic_path(final) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **{name: c for name, c in zip(DEFAULT_CAT_NAMES, counts)})
    seconds = time.perf_counter() - t0
    return {
        "part": part.key,
        "rows": rows,
        "input_bytes": input_bytes,
        "seconds": seconds,
        "mb_per_s": input_bytes / 1e6 / seconds if seconds > 0 else 0.0,
        "rss_before_mb": rss_before,
        "peak_rss_mb": peak_rss_mb(),
    }


def load_frequent(out: Path) -> list[np.ndarray]:
    """The packed 'frequent' bitmaps of :func:`merge_counts`, one per feature."""
    with np.load(frequent_path(out)) as z:
        return [z[name] for name in DEFAULT_CAT_NAMES]


def apply_threshold(sparse: np.ndarray, frequent: list[np.ndarray]) -> None:
    """Replaces, in place, ids whose bit in the packed ``frequent`` bitmaps is 0 by RARE_ID."""
    for j, bits in enumerate(frequent):
        ids = sparse[:, j]
        keep = (bits[ids >> 3] >> (7 - (ids & 7))) & 1
        ids[keep == 0] = RARE_ID


def merge_counts(out: Path, train_parts: list[Part], settings: PreprocessSettings) -> list[int]:
    """Sums the per-part counts (saturating) into the packed 'frequent' bitmaps; returns how many
    ids of each feature are frequent. Memory: 4 bytes per row of one table + one part's array."""
    final = frequent_path(out)
    cap = settings.frequency_threshold
    if final.is_file():
        return [int(np.bitwise_count(b).sum()) for b in load_frequent(out)]  # resumed run
    frequent, kept = {}, []
    for j, name in enumerate(DEFAULT_CAT_NAMES):
        total = np.zeros(settings.num_embeddings_per_feature[j], dtype=np.uint32)
        for part in train_parts:
            with np.load(counts_path(out, part)) as z:
                np.add(total, z[name], out=total)
            np.minimum(total, cap, out=total)
        bits = total >= cap
        kept.append(int(bits.sum()))
        frequent[name] = np.packbits(bits)
    with atomic_path(final) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **frequent)
    return kept
