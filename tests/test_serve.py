"""The fast default predictor and ``mlet-dist serve`` (HTTP on loopback).

Oracles: the trained (unsharded) MLET model's probabilities and ``mlet-dist predict``'s output for
the same raw rows; the manifest file read here. Every server is a subprocess on 127.0.0.1 that the
test stops (SIGTERM, then kill after a bounded wait); every request loop is bounded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_serving import SIZES, tiny_run, trained_probabilities, write_criteo_tsv

from mlet_dist import cli
from mlet_dist.data import read_criteo_tsv
from mlet_dist.export import CollapseOptions, collapse_run
from mlet_dist.predict_job import predict_file
from mlet_dist.serving import ServingError
from mlet_dist.serving.artifacts import ARTIFACTS, SKIP_ENV
from mlet_dist.serving.manifest import MANIFEST
from mlet_dist.serving.predict import load_predictor
from mlet_dist.serving.predictor import AOTIError

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 120
REQUEST_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny trained run collapsed with the defaults (the AOTInductor package where g++ is here),
    its held-out rows as request rows, and predict's probabilities for them."""
    tmp = tmp_path_factory.mktemp("serve")
    cfg = tiny_run(tmp)
    held_out = write_criteo_tsv(tmp / "held_out.tsv", 40, seed=1)
    out = tmp / "served"
    saved = os.environ.pop(SKIP_ENV, None)  # this one collapse: the default, AOTI included
    try:
        collapse_run(cfg.train.run_dir, out, CollapseOptions(chunk_rows=16))
    finally:
        if saved is not None:
            os.environ[SKIP_ENV] = saved
    predict_file(out, held_out, tmp / "predict.txt")
    return {
        "cfg": cfg,
        "tmp": tmp,
        "out": out,
        "held_out": held_out,
        "rows": request_rows(held_out),
        "predict": np.loadtxt(tmp / "predict.txt"),
    }


def request_rows(tsv: Path) -> list[dict]:
    """The raw Criteo rows of a TSV file as request rows (int_j: int or null, cat_j: hex or null)."""
    rows = []
    for line in tsv.read_text().splitlines():
        fields = line.split("\t")
        row = {f"int_{j}": int(v) if v else None for j, v in enumerate(fields[1:14])}
        row |= {f"cat_{j}": v or None for j, v in enumerate(fields[14:40])}
        rows.append(row)
    return rows


class Server:
    """``mlet-dist serve`` in a subprocess on 127.0.0.1, any free port."""

    def __init__(self, serving: Path, *extra: str) -> None:
        cmd = [sys.executable, "-m", "mlet_dist", "serve", "--serving", str(serving)]
        self.proc = subprocess.Popen(
            [*cmd, "--port", "0", "--threads", "1", *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        line = self.proc.stdout.readline()  # the first line, after the predictor is loaded
        if "listening on http://127.0.0.1:" not in line:
            self.stop()
            raise AssertionError(f"serve did not start: {line!r} {self.proc.stderr.read()[-2000:]}")
        self.url = line.split()[-1]
        self.terminated = False

    def terminate(self) -> None:
        """SIGTERM, once (a second one during the shutdown would kill the interpreter)."""
        if not self.terminated and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.terminated = True

    def stop(self) -> int:
        self.terminate()
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            raise


@pytest.fixture(scope="module")
def server(served):
    s = Server(served["out"])
    yield s
    assert s.stop() == 0


async def _post(session, url: str, body, parquet: bool = False):
    if parquet:
        kwargs = {"data": body, "headers": {"Content-Type": "application/vnd.apache.parquet"}}
    elif isinstance(body, (bytes, str)):
        kwargs = {"data": body, "headers": {"Content-Type": "application/json"}}
    else:
        kwargs = {"json": body}
    async with session.post(f"{url}/predict", **kwargs) as r:
        return r.status, await r.json()


def post_all(url: str, bodies: list, parquet: bool = False) -> list[tuple[int, dict]]:
    """Every body posted at once (bounded: one request each); answers in order."""

    async def go():
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            return await asyncio.gather(*(_post(session, url, b, parquet) for b in bodies))

    return asyncio.run(go())


def get(url: str, path: str) -> dict:
    async def go():
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(f"{url}{path}") as r:
                assert r.status == 200
                return await r.json()

    return asyncio.run(go())


def test_collapse_writes_the_aoti_package_by_default_and_auto_serves_it(served, tmp_path) -> None:
    """The default: AOTInductor package and the portable program; auto loads the package, and
    its probabilities are the trained model's."""
    manifest = json.loads((served["out"] / MANIFEST).read_text())
    assert set(manifest["serving"]["artifacts"]) == {"export", "aoti"}
    _, loaded = load_predictor(served["out"])
    assert loaded["predictor_used"] == "aoti"
    expected = trained_probabilities(served["cfg"], read_criteo_tsv(served["held_out"], SIZES))
    np.testing.assert_allclose(served["predict"], expected.double().numpy(), atol=1e-5, rtol=0)


def test_without_a_compiler_the_portable_program_is_written_with_a_one_line_note(
    served, tmp_path, monkeypatch, caplog
) -> None:
    def no_compiler() -> None:
        raise AOTIError("AOTInductor needs a C++ compiler and found none (test); install g++")

    monkeypatch.setitem(
        ARTIFACTS, "aoti", dataclasses.replace(ARTIFACTS["aoti"], check=no_compiler)
    )
    monkeypatch.delenv(SKIP_ENV, raising=False)
    out = tmp_path / "served"
    with caplog.at_level(logging.WARNING):
        collapse_run(served["cfg"].train.run_dir, out, CollapseOptions(chunk_rows=16))
    notes = [r.getMessage() for r in caplog.records if "predictor_aoti.pt2" in r.getMessage()]
    assert len(notes) == 1 and "\n" not in notes[0] and "--no-aoti" in notes[0], notes
    assert "found none" in notes[0] and "serving/predictor.pt2" in notes[0]
    manifest = json.loads((out / MANIFEST).read_text())
    assert set(manifest["serving"]["artifacts"]) == {"export"}
    assert not (out / "serving/predictor_aoti.pt2").exists()
    # asked for explicitly, it is refused instead
    with pytest.raises(AOTIError, match="found none"):
        collapse_run(
            served["cfg"].train.run_dir,
            tmp_path / "asked",
            CollapseOptions(chunk_rows=16, artifacts=("aoti",)),
        )


def test_auto_falls_back_to_the_portable_program_when_the_package_does_not_load(
    served, tmp_path, monkeypatch, caplog
) -> None:
    def cannot_load(path: str):
        raise RuntimeError("built for another platform")

    monkeypatch.setitem(ARTIFACTS, "aoti", dataclasses.replace(ARTIFACTS["aoti"], load=cannot_load))
    with caplog.at_level(logging.WARNING):
        got = predict_file(served["out"], served["held_out"], tmp_path / "p.txt")
    assert got["predictor"] == "export"
    assert any("another platform" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(np.loadtxt(tmp_path / "p.txt"), served["predict"], atol=1e-5)
    with pytest.raises(ServingError, match="another platform"):  # asked for: no fallback
        load_predictor(served["out"], kind="aoti")


def test_collapse_flags_for_the_default_package(served, tmp_path, capsys) -> None:
    run = str(served["cfg"].train.run_dir)
    code = cli.main(["collapse", "--run", run, "--out", str(tmp_path / "a"), "--aoti", "--no-aoti"])
    assert code == 2 and "--aoti and --no-aoti contradict" in capsys.readouterr().err
    assert cli.main(["collapse", "--run", run, "--out", str(tmp_path / "b"), "--no-aoti"]) == 0
    manifest = json.loads((tmp_path / "b" / MANIFEST).read_text())
    assert set(manifest["serving"]["artifacts"]) == {"export"}


def test_served_answers_equal_predict_at_batch_1(served, server) -> None:
    answers = post_all(server.url, [[row] for row in served["rows"]])
    assert all(status == 200 for status, _ in answers), answers[:3]
    got = np.array([a["probabilities"][0] for _, a in answers])
    np.testing.assert_allclose(got, served["predict"], atol=1e-5, rtol=0)


def test_concurrent_burst_of_valid_and_malformed_requests(served, server) -> None:
    """64 requests at once, dynamically batched: valid ones (1-5 rows, overlapping) get exactly
    predict's probabilities; malformed ones a 400 naming the column; the server goes on."""
    rows, expected = served["rows"], served["predict"]
    valid = [(i % 36, i % 36 + 1 + i % 5) for i in range(40)]
    no_column = [{k: v for k, v in rows[0].items() if k != "cat_7"}]
    bad_int = [{**rows[1], "int_4": "twelve"}]
    bad_hex = [{**rows[2], "cat_11": "not-hex"}]
    malformed = [
        (no_column, "cat_7"),
        (bad_int, "int_4"),
        (bad_hex, "cat_11"),
        (b"{not json", "not JSON"),
        (b"", "empty"),
        ({"rows": []}, "non-empty list"),
        ([1, 2, 3], "row objects"),
        ([{**rows[3], "int_0": [1, 2]}], "int_0"),
    ] * 3
    bodies = []
    for k in range(64):
        if k % 8 == 3 and malformed:
            bodies.append(("bad", malformed.pop()))
        else:
            a, b = valid[k % len(valid)]
            bodies.append(("ok", (a, b)))
    answers = post_all(
        server.url, [rows[v[0] : v[1]] if kind == "ok" else v[0] for kind, v in bodies]
    )
    for (kind, v), (status, answer) in zip(bodies, answers, strict=True):
        if kind == "ok":
            assert status == 200, answer
            np.testing.assert_allclose(answer["probabilities"], expected[v[0] : v[1]], atol=1e-5)
        else:
            assert status == 400 and v[1] in answer["error"], (v, answer)
    assert get(server.url, "/healthz")["status"] == "ok"


def test_parquet_body_metadata_and_healthz(served, server) -> None:
    table = pa.Table.from_pylist(served["rows"][:10])
    buf = io.BytesIO()
    pq.write_table(table, buf)
    ((status, answer),) = post_all(server.url, [buf.getvalue()], parquet=True)
    assert status == 200
    np.testing.assert_allclose(answer["probabilities"], served["predict"][:10], atol=1e-5)
    ((status, answer),) = post_all(server.url, [b"PAR1 but broken"], parquet=True)
    assert status == 400 and "Parquet" in answer["error"]
    metadata = get(server.url, "/metadata")
    manifest = json.loads((served["out"] / MANIFEST).read_text())
    assert metadata["files"] == manifest["files"] and metadata["serving"] == manifest["serving"]
    assert get(server.url, "/healthz") == {"status": "ok", "predictor": "aoti"}


def test_sigterm_answers_the_requests_in_flight(served) -> None:
    """Requests wait in batches (max wait 1.5 s, at most 3 rows) when SIGTERM arrives: each is
    answered, then the server exits 0. The portable program, through HTTP."""
    s = Server(served["out"], "--max-wait-ms", "1500", "--max-batch", "3", "--predictor", "export")
    try:

        async def go():
            timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                tasks = [
                    asyncio.create_task(_post(session, s.url, [row])) for row in served["rows"][:8]
                ]
                await asyncio.sleep(0.5)  # sent; the batch is still waiting
                s.terminate()
                return await asyncio.gather(*tasks)

        answers = asyncio.run(go())
    finally:
        code = s.stop()
    assert code == 0
    assert [status for status, _ in answers] == [200] * 8
    got = [a["probabilities"][0] for _, a in answers]
    np.testing.assert_allclose(got, served["predict"][:8], atol=1e-5, rtol=0)


def test_serve_refuses_a_tampered_directory_before_listening(served, tmp_path, capsys) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(served["out"], copy)
    with open(copy / "serving/predictor.pt2", "r+b") as f:
        f.seek(100)
        f.write(b"\0")
    assert cli.main(["serve", "--serving", str(copy), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "predictor.pt2" in err and len(err.strip().splitlines()) == 1


def test_merged_requests_are_the_rows_of_one_batch_with_multi_hot_features() -> None:
    """Dynamic batching of jagged inputs: merging requests (variable ids per feature and row,
    empty bags included) gives the feature-major layout of all their rows in order."""
    import torch

    from mlet_dist.serving.server import merge_inputs

    rng = np.random.default_rng(0)
    num_features, requests = 3, []
    for batch in (2, 1, 4):
        ids = [
            [list(rng.integers(0, 100, rng.integers(0, 4))) for _ in range(batch)]
            for _ in range(num_features)
        ]  # ids[f][row]
        requests.append((torch.rand(batch, 5), ids))

    def inputs(dense, ids):
        values = [v for per_feature in ids for row in per_feature for v in row]
        lengths = [len(row) for per_feature in ids for row in per_feature]
        return (
            dense,
            torch.tensor(values, dtype=torch.int64),
            torch.tensor(lengths, dtype=torch.int32),
        )

    merged = merge_inputs([inputs(d, i) for d, i in requests], num_features)
    all_ids = [[row for _, ids in requests for row in ids[f]] for f in range(num_features)]
    expected = inputs(torch.cat([d for d, _ in requests]), all_ids)
    for got, want in zip(merged, expected, strict=True):
        assert torch.equal(got, want)
