"""``mlet-dist serve``: a reference HTTP endpoint over a serving directory's predictor (aiohttp).

Routes::

    POST /predict   rows in the manifest's feature schema -> {"probabilities": [...]}
                    body: JSON, a list of row objects or {"rows": [...]}, e.g.
                    [{"int_0": 5, ..., "cat_0": "68fd1e64", ...}], or a Parquet file (its
                    magic bytes, or Content-Type application/vnd.apache.parquet)
    GET  /healthz   {"status": "ok", "predictor": kind}
    GET  /metadata  the manifest (manifest.json as loaded)

Requests are decoded by the ``decode`` function the command gives (the run's raw-row mapping:
:func:`mlet_dist.predict_job.request_decoder`, the same as ``mlet-dist predict``); decoded rows
wait in a queue and are scored together (dynamic batching): a batch closes when it holds
``max_batch`` rows or ``max_wait_ms`` after its first request arrived. Decoding and the predictor
run on the event loop's thread (the predictor uses torch's intra-op threads): handing each request
to worker threads cost 5x the batch-1 latency on a busy 2-core machine (thread wake-ups of
milliseconds, ``benchmarks/results/serve-load_cpu2_2026-12-04.md``); while a batch is scored, new
requests wait in the socket and join the next one. A bad request (no or a wrong column, malformed JSON or
Parquet, an empty body) gets 400 with the reason (naming the column); the server goes on.

Start: the manifest's checksums are verified (every file) and the predictor loaded before the
socket opens. Binds 127.0.0.1 unless ``host`` says otherwise. SIGTERM / SIGINT: stop accepting,
answer the requests in flight (up to ``shutdown_timeout`` seconds), then exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from aiohttp import web

from mlet_dist.errors import MletError
from mlet_dist.serving.predict import load_predictor

logger = logging.getLogger(__name__)

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(dense (B, D), values (N,), lengths (F * B,)): the predictor's inputs, feature-major."""
PARQUET_TYPES = ("application/vnd.apache.parquet", "application/x-parquet")
MAX_BODY_BYTES = 64 << 20


class RequestError(MletError, ValueError):
    """A request cannot be scored; the message (one line) says why (the column, the fix)."""


@dataclass(frozen=True)
class ServeOptions:
    """Settings of :func:`serve`.

    Attributes:
        host: address to bind (loopback by default).
        port: TCP port (0: any free one; the chosen port is printed).
        max_batch: rows per predictor call at most (a larger request runs alone).
        max_wait_ms: how long the first request of a batch waits for others.
        predictor: the predictor kind ('auto': see :func:`mlet_dist.serving.predict.load_predictor`).
        shutdown_timeout: seconds in-flight requests get after SIGTERM.
        threads: torch intra-op threads (0: torch's default).
    """

    host: str = "127.0.0.1"
    port: int = 8080
    max_batch: int = 4096
    max_wait_ms: float = 2.0
    predictor: str = "auto"
    shutdown_timeout: float = 30.0
    threads: int = 0


def request_table(body: bytes, content_type: str) -> pa.Table:
    """The rows of a request body as a table of named columns.

    Raises:
        RequestError: an empty body, malformed JSON or Parquet, not a list of row objects.
    """
    if not body:
        raise RequestError("empty request body: send JSON rows or a Parquet file")
    if content_type in PARQUET_TYPES or body[:4] == b"PAR1":
        try:
            return pq.read_table(io.BytesIO(body))
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise RequestError(f"the body is not a Parquet file: {e}") from None
    try:
        rows = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"the body is not JSON: {e}") from None
    if isinstance(rows, dict) and "rows" in rows:
        rows = rows["rows"]
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise RequestError(
            'JSON body: expected a non-empty list of row objects (or {"rows": [...]}), one '
            "key per column of the manifest's schema"
        )
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowException, TypeError, ValueError) as e:
        raise RequestError(f"JSON rows of mixed types in one column: {e}") from None


def merge_inputs(parts: list[Inputs], num_features: int) -> Inputs:
    """The inputs of several requests as one batch (rows in order): dense stacked, and per
    feature the ids of every request, one after the other (the feature-major layout)."""
    if len(parts) == 1:
        return parts[0]
    dense = torch.cat([p[0] for p in parts])
    lengths = [p[2].view(num_features, -1) for p in parts]
    values = [p[1].split(lg.sum(dim=1).tolist()) for p, lg in zip(parts, lengths, strict=True)]
    merged_values = torch.cat([v[f] for f in range(num_features) for v in values])
    return dense, merged_values, torch.cat(lengths, dim=1).reshape(-1)


@dataclass
class _Pending:
    inputs: Inputs
    rows: int
    future: asyncio.Future


class Batcher:
    """Dynamic batching: requests queue up; one task closes batches (``max_batch`` rows or
    ``max_wait_ms`` after the first) and scores each in one predictor call."""

    def __init__(self, predictor: Any, num_features: int, options: ServeOptions) -> None:
        self.predictor = predictor
        self.num_features = num_features
        self.options = options
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self.batches = 0

    async def score(self, inputs: Inputs) -> torch.Tensor:
        pending = _Pending(inputs, inputs[0].shape[0], asyncio.get_running_loop().create_future())
        await self.queue.put(pending)
        return await pending.future

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        wait_s = self.options.max_wait_ms / 1000
        carried: _Pending | None = None  # the request that did not fit the previous batch
        while True:
            batch = [carried if carried is not None else await self.queue.get()]
            carried = None
            rows, deadline = batch[0].rows, loop.time() + wait_s
            while rows < self.options.max_batch:
                try:
                    item = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self.queue.get(), left)
                    except TimeoutError:
                        break
                if rows + item.rows > self.options.max_batch:
                    carried = item  # the next batch's first
                    break
                batch.append(item)
                rows += item.rows
            self._score_batch(batch)

    def _score_batch(self, batch: list[_Pending]) -> None:
        try:
            inputs = merge_inputs([p.inputs for p in batch], self.num_features)
            out = self._call(inputs)
        except Exception as e:  # the predictor failed: every request of the batch is told
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(e)
            return
        self.batches += 1
        start = 0
        for p in batch:
            if not p.future.done():
                p.future.set_result(out[start : start + p.rows])
            start += p.rows

    def _call(self, inputs: Inputs) -> torch.Tensor:
        with torch.no_grad():
            return self.predictor(*inputs).reshape(-1)


def make_app(
    predictor: Any,
    manifest: dict[str, Any],
    decode: Callable[[pa.Table], Inputs],
    options: ServeOptions,
) -> web.Application:
    """The aiohttp application (routes in the module docstring); the batcher starts and stops
    with it (after the requests in flight are answered)."""
    num_features = len(manifest["serving"]["feature_order"])
    batcher = Batcher(predictor, num_features, options)
    kind = manifest.get("predictor_used", "")

    async def predict(request: web.Request) -> web.Response:
        try:
            body = await request.read()
            table = request_table(body, request.content_type)
            inputs = decode(table)
        except web.HTTPException:
            raise
        except MletError as e:  # RequestError, the decoder's column errors
            return web.json_response({"error": str(e)}, status=400)
        except Exception as e:  # anything else about this request: it is refused, not the server
            logger.warning("bad request: %s: %s", type(e).__name__, e)
            return web.json_response({"error": f"{type(e).__name__}: {e}"}, status=400)
        try:
            probs = await batcher.score(inputs)
        except Exception as e:
            logger.error("the predictor failed: %s: %s", type(e).__name__, e)
            return web.json_response({"error": f"the predictor failed: {e}"}, status=500)
        return web.json_response({"probabilities": probs.tolist()})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "predictor": kind})

    async def metadata(request: web.Request) -> web.Response:
        return web.json_response(manifest)

    async def lifecycle(app: web.Application):
        batcher.start()
        yield
        await batcher.stop()

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.add_routes(
        [
            web.post("/predict", predict),
            web.get("/healthz", healthz),
            web.get("/metadata", metadata),
        ]
    )
    app.cleanup_ctx.append(lifecycle)
    return app


async def _listen_until_stopped(app: web.Application, options: ServeOptions) -> None:
    runner = web.AppRunner(app, shutdown_timeout=options.shutdown_timeout, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, options.host, options.port)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    host, port = runner.addresses[0][:2]
    print(f"mlet-dist serve: listening on http://{host}:{port}", flush=True)
    try:
        await stop.wait()
        logger.info("stopping: answering the requests in flight")
    finally:
        await runner.cleanup()  # stops accepting, waits for the handlers, then the batcher


def serve(
    serving_dir: str | Path,
    decode_for: Callable[[str | Path, dict[str, Any]], Callable[[pa.Table], Inputs]],
    options: ServeOptions,
) -> None:
    """Verifies the serving directory (every checksum), loads its predictor and serves it until
    SIGTERM/SIGINT.

    Args:
        serving_dir: output of ``mlet-dist collapse``.
        decode_for: ``decode_for(serving_dir, manifest)`` -> the request decoder (rows of named
            columns -> predictor inputs; raises an :class:`~mlet_dist.errors.MletError` naming
            the column for a bad request).
        options: address, batching, predictor.

    Raises:
        ServingError: the directory does not match its manifest, or the predictor does not load.
    """
    if options.threads:
        torch.set_num_threads(options.threads)
    started = time.perf_counter()
    predictor, manifest = load_predictor(serving_dir, verify="all", kind=options.predictor)
    decode = decode_for(serving_dir, manifest)
    logger.info(
        "loaded %s (%s predictor, checksums verified) in %.1f s",
        serving_dir,
        manifest["predictor_used"],
        time.perf_counter() - started,
    )
    asyncio.run(_listen_until_stopped(make_app(predictor, manifest, decode, options), options))
