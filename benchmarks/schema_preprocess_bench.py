"""Benchmark of ``mlet-dist preprocess`` for a declared schema: memory and speed of the streamed
(out-of-core) pass against the same code given every row as one chunk (what holding the rows in
memory costs), in one run.

Generates ``--rows`` rows of ``configs/schema_synthetic.toml``'s schema (2 dense, string user ids,
int item ids, a multi-hot tag list and a query sharing one table) with ``mlet-dist generate`` into
a temporary directory under /tmp (deleted afterwards) as Parquet files, and once more as one CSV
file, then preprocesses each input with a frequency threshold, in a fresh process per measurement
(``--repeats`` interleaved repeats), with

- ``streamed``: chunks of ``mlet_dist.data.preprocess.schema.CHUNK_ROWS`` rows (the default);
- ``one chunk``: ``chunk_rows`` = every row (the rows of each pass held at once, as before the
  streamed pass);

and reports the peak resident memory of the process (``VmHWM``), the wall time and rows/s.
Both write the same shards (tests/test_schema_preprocess.py checks it). Results go to
``benchmarks/results/schema-preprocess[-quick]_<hardware>_<date>.{json,md}`` with the machine,
library versions, git commit and load average.

Usage::

    python -m benchmarks.schema_preprocess_bench               # 2M rows
    python -m benchmarks.schema_preprocess_bench --quick       # 20k rows (format check)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import (
    DEFAULT_OUT,
    REPO,
    hardware_tag,
    library_versions,
    machine_info,
    result_stem,
)

CONFIG = REPO / "configs" / "schema_synthetic.toml"

# One measurement, in a fresh process: preprocess, then print peak RSS and wall time as JSON.
# Peak RSS is the process's VmHWM, not ru_maxrss: Linux carries the parent's high-water mark
# (taken at fork) into a child's ru_maxrss across exec, and the parent holds the generated data.
_CHILD = """
import json, sys, time
from mlet_dist.config import load_config
from mlet_dist.data.preprocess.schema import preprocess_schema
config, inputs, out, chunk, args = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5])
cfg = load_config(config, args)
t = time.perf_counter()
summary = preprocess_schema(cfg.data, inputs, out, progress=False, chunk_rows=chunk) if chunk else {"rows": 0}
wall = time.perf_counter() - t
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"wall_s": wall, "peak_rss_mb": hwm / 1024, "rows": summary["rows"]}))
"""


def _measure(config: Path, inputs: list[str], out: Path, chunk: int, args: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(config), json.dumps(inputs), str(out), str(chunk),
         json.dumps(args)],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    if proc.returncode:
        raise RuntimeError(f"preprocess failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return out.stdout.strip()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2_000_000, help="rows generated")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="20k rows, 1 repeat")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)
    rows, repeats = (20_000, 1) if a.quick else (a.rows, a.repeats)
    from mlet_dist.config import load_config
    from mlet_dist.data.preprocess.schema import CHUNK_ROWS
    from mlet_dist.data.sources import generate_source_data

    files_per_input = 1  # one file: "one chunk" then holds every row
    tmp = Path(tempfile.mkdtemp(prefix="schema_preprocess_bench_", dir="/tmp"))
    try:
        gen = [
            f"--data.dir={tmp / 'data'}",
            f"--synthetic.days={files_per_input}",
            f"--synthetic.rows_per_day={rows // files_per_input}",
        ]
        cfg = load_config(CONFIG, gen)
        parquet = [str(f) for f in generate_source_data(cfg.data, cfg.synthetic, progress=False)]
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.csv as pcsv
        import pyarrow.parquet as pq

        def as_csv(t: pa.Table) -> pa.Table:  # list columns joined with "|"
            for i, field in enumerate(t.schema):
                if pa.types.is_list(field.type):
                    joined = pc.binary_join(t.column(i).cast(pa.list_(pa.string())), "|")
                    t = t.set_column(i, field.name, joined)
            return t.replace_schema_metadata(None)

        csv_path = tmp / "rows.csv"  # the same rows as one CSV
        first = as_csv(pq.read_table(parquet[0]))
        with pcsv.CSVWriter(csv_path, first.schema) as w:
            w.write_table(first)
            for f in parquet[1:]:
                w.write_table(as_csv(pq.read_table(f)))
        common = ["--data.source=files", "--data.frequency_threshold=2"]
        inputs = {"parquet": parquet, "csv": [str(csv_path)]}
        results = []
        for name, files in inputs.items():
            for r in range(repeats):
                for mode, chunk in (("streamed", CHUNK_ROWS), ("one chunk", rows + 1)):
                    m = _measure(CONFIG, files, tmp / "out", chunk, common)
                    m.update(input=name, mode=mode, repeat=r, rows_per_s=m["rows"] / m["wall_s"])
                    results.append(m)
                    print(json.dumps(m), flush=True)
        imports = _measure(CONFIG, [], tmp / "out", 0, common)["peak_rss_mb"]
        input_mb = {k: sum(os.path.getsize(f) for f in v) / 2**20 for k, v in inputs.items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    machine = machine_info()
    record = {
        "benchmark": "schema-preprocess",
        "date": datetime.date.today().isoformat(),
        "git_commit": _git_commit(),
        "machine": machine,
        "libraries": library_versions(),
        "load_average": os.getloadavg(),
        "settings": {"config": str(CONFIG.relative_to(REPO)), "rows": rows, "repeats": repeats,
                     "chunk_rows": CHUNK_ROWS, "frequency_threshold": 2, "input_mb": input_mb},
        "imports_peak_rss_mb": imports,
        "results": results,
    }  # fmt: skip
    stem = result_stem("schema-preprocess", hardware_tag(machine), a.quick)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"# Schema preprocessing: streamed vs one chunk ({rows:,} rows)",
        "",
        f"Machine: {machine.get('cpu_model', '?')}, {machine.get('cores', '?')} cores; "
        f"commit {record['git_commit'][:10]}; load average at the end {record['load_average']}",
        f"Inputs: Parquet {input_mb['parquet']:.0f} MiB (one file), "
        f"CSV {input_mb['csv']:.0f} MiB; threshold 2; chunk {CHUNK_ROWS:,} rows; a process "
        f"that only imports the preprocessing (torch included) peaks at {imports:.0f} MiB",
        "",
        "| input | mode | peak RSS MiB (min of repeats) | rows/s (max of repeats) |",
        "|---|---|---|---|",
    ]
    for name in inputs:
        for mode in ("streamed", "one chunk"):
            rs = [x for x in results if x["input"] == name and x["mode"] == mode]
            lines.append(
                f"| {name} | {mode} | {min(x['peak_rss_mb'] for x in rs):.0f} | "
                f"{max(x['rows_per_s'] for x in rs):,.0f} |"
            )
    (a.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return record


if __name__ == "__main__":
    main()
