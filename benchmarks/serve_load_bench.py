"""Load benchmark of ``mlet-dist serve`` on loopback vs calling the predictor in-process.

    python -m benchmarks.serve_load_bench [--requests 1000] [--rows-per-request 1]
        [--concurrency 1 8 64] [--rows 20000] [--threads 1] [--out benchmarks/results]

Builds a serving directory the way users get one: a short MLET(64 -> 16) training run on random
Criteo-format rows (26 tables x ``--rows`` rows, DLRM dot, bottom MLP [64, 16], top MLP
[64, 32, 1]), collapsed with the defaults (AOTInductor where a C++ compiler is present). Then,
with the same request rows (``--rows-per-request`` Criteo rows each, JSON):

- in-process: ``load_predictor(auto)`` and the request decoder ``serve`` uses
  (:func:`mlet_dist.predict_job.request_decoder`), one request after another: decode + predict
  per request (and predict alone);
- HTTP: ``mlet-dist serve`` in a subprocess on 127.0.0.1 (``--threads``), and an aiohttp client
  with 1, 8 and 64 requests in flight; ``--requests`` requests per concurrency level (bounded;
  each with a 60 s timeout). Every answer is checked against the in-process probabilities.

Reported per mode: throughput (requests/s and rows/s over the wall time of all requests) and the
latency per request (p50, p99; client-side for HTTP). Client and server share the machine's cores.
Results: ``serve-load_<hardware>_<date>.{json,md}`` in ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 60


def _criteo_lines(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        ints = ["" if rng.random() < 0.1 else str(int(rng.integers(0, 1000))) for _ in range(13)]
        cats = [
            "" if rng.random() < 0.05 else f"{int(rng.integers(0, 2**32)):08x}" for _ in range(26)
        ]
        lines.append("\t".join([str(int(rng.integers(0, 2))), *ints, *cats]))
    return lines


def _request_row(line: str) -> dict[str, Any]:
    fields = line.split("\t")
    row: dict[str, Any] = {f"int_{j}": int(v) if v else None for j, v in enumerate(fields[1:14])}
    row |= {f"cat_{j}": v or None for j, v in enumerate(fields[14:40])}
    return row


def build_serving_dir(tmp: Path, rows: int) -> tuple[Path, dict[str, float]]:
    """A short MLET run on random Criteo rows, collapsed with the default options; and the
    seconds of that collapse and of one without the AOTInductor package (``--no-aoti``)."""
    from mlet_dist.config import DistConfig, load_config
    from mlet_dist.distributed.parallelize import init_distributed
    from mlet_dist.export import CollapseOptions, collapse_run
    from mlet_dist.train import train

    data = tmp / "train.tsv"
    data.write_text("\n".join(_criteo_lines(2048, seed=0)) + "\n")
    cfg = load_config(
        None,
        [
            "--data.source=criteo",
            f"--data.train_files=['{data}']",
            "--data.eval_fraction=0.0",
            f"--data.num_embeddings_per_feature={[rows] * 26}",
            "--data.batch_size=256",
            "--model.embedding_dim=16",
            "--model.inner_dim=64",
            "--model.dense_arch_layer_sizes=[64, 16]",
            "--model.over_arch_layer_sizes=[64, 32, 1]",
            "--train.max_steps=4",
            "--train.progress=false",
            f"--train.run_dir={tmp / 'run'}",
        ],
    )
    init_distributed(DistConfig(device="cpu"))
    train(cfg)
    seconds = {}
    for name, options in (
        ("collapse_no_aoti_s", CollapseOptions(skip=("aoti",))),
        ("collapse_default_s", CollapseOptions()),
    ):
        out = tmp / name
        start = time.perf_counter()
        collapse_run(cfg.train.run_dir, out, options)
        seconds[name] = time.perf_counter() - start
    print(f"collapse: {seconds}", flush=True)
    return out, seconds


def _stats(latencies_s: list[float], wall_s: float, rows_per_request: int) -> dict[str, Any]:
    ms = np.asarray(latencies_s) * 1e3
    return {
        "requests": len(latencies_s),
        "wall_s": wall_s,
        "requests_per_s": len(latencies_s) / wall_s,
        "rows_per_s": len(latencies_s) * rows_per_request / wall_s,
        "latency_ms": {
            "p50": float(np.percentile(ms, 50)),
            "p99": float(np.percentile(ms, 99)),
            "mean": float(ms.mean()),
        },
    }


def in_process(serving: Path, bodies: list[list[dict]], threads: int) -> tuple[dict, list]:
    """Decode + predict per request, one after another; and predict alone."""
    import pyarrow as pa
    import torch

    from mlet_dist.predict_job import request_decoder
    from mlet_dist.serving.predict import load_predictor

    torch.set_num_threads(threads)
    predictor, manifest = load_predictor(serving)
    decode = request_decoder(serving, manifest)
    answers, lat, lat_predict = [], [], []
    with torch.no_grad():
        for body in bodies[:20]:  # warm-up
            predictor(*decode(pa.Table.from_pylist(body)))
        wall = time.perf_counter()
        for body in bodies:
            start = time.perf_counter()
            inputs = decode(pa.Table.from_pylist(body))
            mid = time.perf_counter()
            answers.append(predictor(*inputs).tolist())
            end = time.perf_counter()
            lat.append(end - start)
            lat_predict.append(end - mid)
        wall = time.perf_counter() - wall
    rows = len(bodies[0])
    result = {
        "predictor": manifest["predictor_used"],
        "decode_and_predict": _stats(lat, wall, rows),
        "predict_only": _stats(lat_predict, sum(lat_predict), rows),
    }
    return result, answers


async def _load(url: str, bodies: list, concurrency: int) -> tuple[list[float], float, list]:
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = [0.0] * len(bodies)
    answers: list[Any] = [None] * len(bodies)

    async def one(session, i: int) -> None:
        async with sem:
            start = time.perf_counter()
            async with session.post(f"{url}/predict", json=bodies[i]) as r:
                body = await r.json()
                if r.status != 200:
                    raise RuntimeError(f"request {i}: HTTP {r.status}: {body}")
            lat[i] = time.perf_counter() - start
            answers[i] = body["probabilities"]

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for i in range(min(20, len(bodies))):  # warm-up
            await one(session, i)
        wall = time.perf_counter()
        await asyncio.gather(*(one(session, i) for i in range(len(bodies))))
        wall = time.perf_counter() - wall
    return lat, wall, answers


def over_http(serving: Path, bodies: list, levels: list[int], threads: int, expected: list):
    cmd = [sys.executable, "-m", "mlet_dist", "serve", "--serving", str(serving), "--port", "0"]
    proc = subprocess.Popen(
        [*cmd, "--threads", str(threads)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        line = proc.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"serve did not start: {line!r}")
        url = line.split()[-1]
        out = {}
        for c in levels:
            lat, wall, answers = asyncio.run(_load(url, bodies, c))
            diff = max(
                float(np.abs(np.asarray(a) - np.asarray(e)).max())
                for a, e in zip(answers, expected, strict=True)
            )
            out[str(c)] = {**_stats(lat, wall, len(bodies[0])), "max_abs_diff": diff}
            print(f"HTTP concurrency {c}: {out[str(c)]}", flush=True)
        return out
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def markdown(record: dict[str, Any]) -> str:
    m, r = record["machine"], record["results"]
    lines = [
        f"# mlet-dist serve under load (loopback) vs in-process — {record['date']}",
        "",
        f"Machine: {m['cores']} cores ({m['cpu']}), shared with other jobs while measured "
        f"(absolute numbers are noisy; the rows are from one run). Versions: "
        f"{', '.join(f'{k} {v}' for k, v in record['versions'].items())}.",
        "",
        f"Command: `{record['command']}`",
        "",
        f"Model: {record['config']['model']}. Requests: {record['config']['requests']} per mode, "
        f"{record['config']['rows_per_request']} row(s) each (JSON, Criteo raw columns). Server: "
        f"`mlet-dist serve --threads {record['config']['threads']}` (max batch 4096, max wait "
        f"2 ms), predictor `{r['in_process']['predictor']}` (auto); client: aiohttp on the same "
        f"machine. Collapse of this run: {record['collapse_s']['collapse_default_s']:.1f} s with "
        f"the defaults (AOTInductor), {record['collapse_s']['collapse_no_aoti_s']:.1f} s with "
        "`--no-aoti`.",
        "",
        "| mode | requests/s | rows/s | p50 ms | p99 ms | vs in-process (req/s) | max abs diff |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = r["in_process"]["decode_and_predict"]["requests_per_s"]
    rows = [
        ("in-process: predict only", r["in_process"]["predict_only"], None),
        ("in-process: decode + predict", r["in_process"]["decode_and_predict"], None),
    ]
    rows += [(f"HTTP, concurrency {c}", s, s["max_abs_diff"]) for c, s in r["http"].items()]
    for name, s, diff in rows:
        lines.append(
            f"| {name} | {s['requests_per_s']:,.0f} | {s['rows_per_s']:,.0f} | "
            f"{s['latency_ms']['p50']:.3f} | {s['latency_ms']['p99']:.3f} | "
            f"{s['requests_per_s'] / base:.2f}x | {'-' if diff is None else f'{diff:.1e}'} |"
        )
    lines += [
        "",
        "In-process: one request after another in one thread (no batching). HTTP latency is the "
        "client's (send to answer); throughput is requests over the wall time of all of them. "
        "Max abs diff: the served probabilities vs the in-process ones.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_load_bench")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--rows-per-request", type=int, default=1)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--rows", type=int, default=20000, help="rows per table")
    p.add_argument("--threads", type=int, default=1, help="torch threads (server, in-process)")
    p.add_argument("--out", default=str(REPO / "benchmarks/results"))
    args = p.parse_args(argv)
    import torch

    from benchmarks.common import hardware_tag, library_versions, machine_info, result_stem

    lines = _criteo_lines(args.requests * args.rows_per_request, seed=1)
    rows = [_request_row(line) for line in lines]
    k = args.rows_per_request
    bodies = [rows[i * k : (i + 1) * k] for i in range(args.requests)]
    with tempfile.TemporaryDirectory(prefix="mlet-serve-load-") as tmp:
        serving, collapse_s = build_serving_dir(Path(tmp), args.rows)
        local, expected = in_process(serving, bodies, args.threads)
        print(f"in-process: {local}", flush=True)
        http = over_http(serving, bodies, args.concurrency, args.threads, expected)
    machine = machine_info()
    record = {
        "suite": "serve-load",
        "date": datetime.date.today().isoformat(),
        "command": "python -m benchmarks.serve_load_bench " + " ".join(argv or sys.argv[1:]),
        "machine": {"cores": machine["cores"], "cpu": machine.get("cpu_model", "")},
        "versions": {**library_versions(), "torch": torch.__version__},
        "config": {
            "requests": args.requests,
            "rows_per_request": k,
            "threads": args.threads,
            "model": f"MLET(64 -> 16) collapsed, 26 tables x {args.rows:,} rows, DLRM dot, "
            "bottom MLP [64, 16], top MLP [64, 32, 1]",
        },
        "collapse_s": collapse_s,
        "results": {"in_process": local, "http": http},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / result_stem("serve-load", hardware_tag(machine), False)
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(record))
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
