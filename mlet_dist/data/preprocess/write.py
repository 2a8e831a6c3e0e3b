"""Pass 2 of a preprocessing run: parse, transform and write one part as a Parquet file."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mlet_dist.data.arrays import DEFAULT_CAT_NAMES
from mlet_dist.data.parquet import arrays_to_table, parquet_schema
from mlet_dist.data.preprocess.counts import apply_threshold, load_frequent
from mlet_dist.data.preprocess.parts import (
    Part,
    PreprocessSettings,
    output_path,
    part_seen_path,
    part_state_path,
    quarantine_path,
    read_part,
)
from mlet_dist.data.preprocess.pool import peak_rss_mb, report, rss_mb
from mlet_dist.utils.files import atomic_path, atomic_write_json, publish_file, temp_path

# Distinct ids are counted with one bit per table row, for tables up to this size (32 MB of bits);
# larger ones (e.g. unhashed 64-bit ids) report no distinct count.
SEEN_MAX_TABLE = 1 << 28


def _mark_seen(seen: list[np.ndarray], sparse: np.ndarray) -> None:
    """Sets the bit of every id of ``sparse`` in the per-feature 'seen' bitmaps."""
    for j, bits in enumerate(seen):
        if bits.size:
            ids = sparse[:, j]
            np.bitwise_or.at(bits, ids >> 3, (128 >> (ids & 7)).astype(np.uint8))


def write_part(part: Part, out: str, settings: PreprocessSettings) -> dict[str, Any]:
    """Pass 2: parses, transforms and writes one part; returns its statistics.

    The Parquet file, the quarantine file and the statistics appear only once the part is
    complete; the Parquet file is renamed last, so it marks completion.
    """
    out_dir = Path(out)
    final = output_path(out_dir, part)
    t0 = time.perf_counter()
    rss_before = rss_mb()
    sizes = settings.num_embeddings_per_feature
    frequent = load_frequent(out_dir) if settings.frequency_threshold else None
    seen = [np.zeros((s + 7) // 8 if s <= SEEN_MAX_TABLE else 0, np.uint8) for s in sizes]
    schema = parquet_schema(sizes, settings.frequency_threshold)
    rg = settings.row_group_rows
    stats = {"rows": 0, "positives": 0, "bad_rows": 0, "input_bytes": 0, "row_groups": 0}
    tmp = temp_path(final)
    quarantine_final = quarantine_path(out_dir, part)
    quarantine_tmp: Path | None = None
    quarantine = None
    try:
        with pq.ParquetWriter(tmp, schema, compression=settings.compression) as writer:
            pending: list[pa.Table] = []
            buffered = 0

            def flush(final_flush: bool) -> None:
                # concat_tables does not copy; each write_table call below is one row group.
                nonlocal pending, buffered
                if not pending:
                    return
                table = pa.concat_tables(pending)
                while table.num_rows >= rg or (final_flush and table.num_rows):
                    writer.write_table(table.slice(0, rg), row_group_size=rg)
                    stats["row_groups"] += 1
                    table = table.slice(rg)
                pending, buffered = [table], table.num_rows

            for size, arrays, bad in read_part(part, settings):
                stats["input_bytes"] += size
                if bad:
                    if quarantine is None:
                        quarantine_tmp = temp_path(quarantine_final)
                        quarantine = open(quarantine_tmp, "w", encoding="utf-8")
                    for row in bad:
                        record = {
                            "file": row.path,
                            "line": row.line,
                            "reason": row.reason,
                            "text": row.text.decode("utf-8", errors="backslashreplace"),
                        }
                        quarantine.write(json.dumps(record) + "\n")
                    stats["bad_rows"] += len(bad)
                if frequent is not None:
                    apply_threshold(arrays.sparse, frequent)
                _mark_seen(seen, arrays.sparse)
                stats["rows"] += len(arrays)
                stats["positives"] += int(arrays.labels.sum())
                pending.append(arrays_to_table(arrays, schema))
                buffered += len(arrays)
                if buffered >= rg:
                    flush(final_flush=False)
                report(len(arrays) + len(bad))
            flush(final_flush=True)
        if quarantine is not None:
            quarantine.close()
            publish_file(quarantine_tmp, quarantine_final)
        else:
            quarantine_final.unlink(missing_ok=True)  # a stale one from other settings
        seconds = time.perf_counter() - t0
        stats.update(
            part=part.key,
            source=part.source,
            lines=[part.start, part.stop],
            file=str(final.relative_to(out_dir)),
            quarantine=str(quarantine_final.relative_to(out_dir)) if quarantine else None,
            seconds=seconds,
            mb_per_s=stats["input_bytes"] / 1e6 / seconds if seconds > 0 else 0.0,
            rss_before_mb=rss_before,
            peak_rss_mb=peak_rss_mb(),
        )
        with atomic_path(part_seen_path(out_dir, part)) as seen_tmp, open(seen_tmp, "wb") as f:
            np.savez_compressed(f, **{name: b for name, b in zip(DEFAULT_CAT_NAMES, seen)})
        atomic_write_json(part_state_path(out_dir, part), stats)
        publish_file(tmp, final)
    except BaseException:
        if quarantine is not None:
            quarantine.close()
        for path in (tmp, quarantine_tmp):
            if path is not None:
                path.unlink(missing_ok=True)
        raise
    return stats
