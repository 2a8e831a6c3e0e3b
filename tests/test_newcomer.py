"""Regression tests of issue 27: what a new user met following README.md block by block."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mlet_dist.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints
from mlet_dist.export import collapse_run
from mlet_dist.train import train
from mlet_dist.workflow import check_collapsed
from tests.test_train import _splits, random_arrays, tiny_config


@pytest.fixture
def rows(monkeypatch):
    rows = random_arrays(512, seed=27)
    monkeypatch.setattr("mlet_dist.train.run.load_splits", lambda *_: _splits(rows))
    return rows


def _steps(run_dir) -> list[int]:
    return [int(p.name.split("_")[1]) for p in list_checkpoints(run_dir)]


def test_no_resume_moves_the_earlier_checkpoints_aside(tmp_path, rows):
    """Item 1: --no-resume into a run holding step 8 of an earlier run trains from step 0 and
    leaves only its own checkpoints; the earlier ones are kept aside, not mixed in."""
    run = tmp_path / "run"
    train(tiny_config(tmp_path, "--data.batch_size=32", "--train.max_steps=8"))
    earlier = latest_checkpoint(run)
    metrics = train(
        tiny_config(tmp_path, "--data.batch_size=32", "--train.max_steps=3"), resume=False
    )
    assert metrics["train"]["steps_this_run"] == 3
    assert _steps(run) == [3]  # before: [3, 8], and evaluate/collapse picked step 8
    assert metrics["checkpoint"] == str(latest_checkpoint(run))
    aside = run / "checkpoints.earlier-1" / earlier.name
    assert (aside / "train_state.json").is_file()
    assert json.loads((aside / "train_state.json").read_text())["step"] == 8


def test_collapse_check_refuses_another_runs_checkpoint(tmp_path, rows):
    """Item 1: a collapse check compares the served model with the checkpoint it was collapsed
    from, never with another step (before: "passed" against whatever was latest)."""
    cfg = tiny_config(tmp_path, "--data.batch_size=32", "--train.max_steps=4")
    first = train(cfg)["checkpoint"]
    collapse_run(cfg.train.run_dir, tmp_path / "served")
    more = tiny_config(tmp_path, "--data.batch_size=32", "--train.max_steps=6")
    second = train(more)["checkpoint"]
    assert first != second
    held_out = rows.slice(448, 512)
    assert check_collapsed(cfg.train.run_dir, tmp_path / "served", held_out, first)["passed"]
    with pytest.raises(CheckpointError, match="was collapsed from step_00000004, not from"):
        check_collapsed(cfg.train.run_dir, tmp_path / "served", held_out, second)


def test_finished_run_resumed_says_nothing_to_train(tmp_path, rows, caplog):
    """Item 2: resuming a run already at max_steps trains 0 steps, says so, writes nothing."""
    cfg = tiny_config(tmp_path, "--data.batch_size=32", "--train.max_steps=5")
    train(cfg)
    run = Path(cfg.train.run_dir)
    before = {p: p.stat().st_mtime_ns for p in (run / "config.json", run / "metrics.json")}
    lower = tiny_config(tmp_path, "--data.batch_size=32", "--train.max_steps=3")
    with caplog.at_level(logging.WARNING, logger="mlet_dist"):
        metrics = train(lower)
    assert "already complete at step 5 (train.max_steps = 3); nothing to train" in caplog.text
    assert metrics["train"]["steps_this_run"] == 0
    assert _steps(run) == [5]
    assert {p: p.stat().st_mtime_ns for p in before} == before  # config.json not rewritten
    assert json.loads((run / "config.json").read_text())["train"]["max_steps"] == 5


def test_changed_data_source_is_refused_on_resume(tmp_path, rows):
    """Item 2: a changed data.source is refused like a changed model key (before: trained 0
    steps and rewrote config.json with the new source)."""
    cfg = tiny_config(tmp_path, "--data.batch_size=32", "--train.max_steps=3")
    train(cfg)
    changed = tiny_config(
        tmp_path,
        "--data.batch_size=32",
        "--train.max_steps=6",
        "--data.source=criteo",
        "--data.train_files=['x.tsv']",
    )
    with pytest.raises(
        CheckpointError, match=r"data.source: checkpoint 'synthetic' != config 'criteo'"
    ):
        train(changed)
    assert (
        json.loads((Path(cfg.train.run_dir) / "config.json").read_text())["data"]["source"]
        == "synthetic"
    )


def test_column_based_resume_error_is_one_short_line_naming_the_fix():
    """Item 4: after the Quick start (2 ranks, column-wise tables) the one-process run was refused
    with a 1.8 kB message; now one line that names --no-resume and a new train.run_dir."""
    from mlet_dist.checkpoint import check_optimizer_resharding

    def column_wise(ranks):
        return {"sharding_type": "column_wise", "shards": [[0, 8 * r, 10, 8, r] for r in ranks]}

    saved = {"world_size": 2, "sharding": {f"t_cat_{i}": column_wise([0, 1]) for i in range(26)}}
    now = {f"t_cat_{i}": column_wise([0]) for i in range(26)}
    with pytest.raises(CheckpointError) as err:
        check_optimizer_resharding("runs/x/checkpoints/step_00000390", saved, now, 1)
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 500, len(msg)  # before: 1.8 kB
    assert "--no-resume or a new train.run_dir" in msg
    assert "t_cat_0 (column_wise, 2 shard(s) on rank(s) [0, 1] in the checkpoint" in msg
    assert "and 25 more" in msg


def test_plain_process_uses_one_intra_op_thread_like_torchrun(monkeypatch):
    """Item 3: without torchrun a process got a thread per core (8-16x slower training on a busy
    2-core machine); now 1 unless OMP_NUM_THREADS says otherwise, set before torch is imported."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    code = (
        "import mlet_dist.cli as c; c._intra_op_threads(); import torch; "
        "print(torch.get_num_threads())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "1"
    env["OMP_NUM_THREADS"] = "2"  # the user's choice is kept
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "2"


def test_loss_and_throughput_reach_the_log_without_the_bar(tmp_path, rows, caplog):
    """Item 5: with train.progress = false (or no terminal: Slurm/TorchX log files) every
    log_every steps log the loss and samples/s at INFO (before: DEBUG, so nothing)."""
    cfg = tiny_config(
        tmp_path, "--data.batch_size=32", "--train.max_steps=6", "--train.log_every=2"
    )
    with caplog.at_level(logging.INFO, logger="mlet_dist"):
        metrics = train(cfg)
    lines = [r for r in caplog.records if r.levelno == logging.INFO and "samples/s" in r.message]
    assert [r.message.split()[1] for r in lines] == ["2/6", "4/6", "6/6"]
    logged = {step: loss for step, loss in metrics["train"]["loss_curve"]}
    for r in lines:
        step = int(r.message.split()[1].split("/")[0])
        assert f"loss {logged[step]:.5f}" in r.message


def _sigterm_caught(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(x for x in status.splitlines() if x.startswith("SigCgt:")).split()[1], 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


def test_other_ranks_exit_quietly_with_the_code_when_stopped(tmp_path):
    """Item 6: a rank other than 0 meeting a user error prints nothing while the launcher stops it
    (rank 0 said it): it exits 2 on SIGTERM and leaves the line in torchrun's error file."""
    error_file = tmp_path / "error.json"
    env = dict(os.environ, RANK="1", WORLD_SIZE="2", TORCHELASTIC_ERROR_FILE=str(error_file))
    code = (
        "import mlet_dist.cli as c; raise SystemExit(c._report_user_error('mlet-dist: error: x'))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        while not _sigterm_caught(proc.pid):  # its handler is installed: it waits for the launcher
            assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 2 and err == ""
    saved = json.loads(error_file.read_text())["message"]
    assert saved["message"] == "mlet-dist: error: x"


def test_a_rank_whose_error_is_its_own_reports_it_after_the_grace(tmp_path, monkeypatch, capsys):
    """Item 6: when the launcher does not stop it (rank 0 did not fail), the rank says it."""
    from mlet_dist import cli

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    monkeypatch.setattr(cli, "PEER_GRACE_S", 0.01)
    assert cli._report_user_error("mlet-dist: error: x") == 2
    assert capsys.readouterr().err == "mlet-dist: error: x (rank 1)\n"
    saved = json.loads((tmp_path / "error.json").read_text())["message"]
    assert saved["extraInfo"]["py_callstack"] == "mlet-dist: error: x (rank 1)"


@pytest.mark.slow
def test_torchrun_user_error_is_one_line_from_rank_0(tmp_path):
    """Item 6: under torchrun a config error was printed by every rank, and torchrun's report
    linked to its docs; now rank 0 prints it once, the report's root cause (rank 0) carries it
    and the exit code stays non-zero."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "mlet_dist", "train", f"--train.run_dir={tmp_path / 'run'}",
         "--data.batch_size=0"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode != 0
    printed = [line for line in out.stderr.splitlines() if line.startswith("mlet-dist: error:")]
    assert len(printed) == 1 and "data.batch_size" in printed[0], out.stderr
    root = out.stderr.split("Root Cause")[1]
    assert "rank      : 0" in root and "exitcode  : 2" in root and printed[0] in root


class _RowPredictor:
    """A predictor whose probability is a function of each row alone (any chunking gives the
    same outputs): sigmoid of a fixed mix of its dense values and ids."""

    def __call__(self, dense, values, lengths):
        ids = values.reshape(26, dense.shape[0]).T.double()  # feature-major -> (B, 26)
        return torch.sigmoid(dense.double().sum(1) * 0.01 + (ids * 0.003).sum(1) - 2).float()


def _fake_row_serving(monkeypatch) -> None:
    features = [f"cat_{j}" for j in range(26)]
    manifest = {
        "tables": [{"features": [f], "rows": 50} for f in features],
        "serving": {"feature_order": features, "dtype": "fp32"},
        "predictor_used": "export",
    }
    monkeypatch.setattr(
        "mlet_dist.predict_job.load_predictor", lambda *a, **k: (_RowPredictor(), manifest)
    )


@pytest.mark.parametrize("suffix", [".txt", ".parquet"])
def test_predict_streams_in_chunks_and_writes_what_the_whole_gives(tmp_path, monkeypatch, suffix):
    """Item 7: predict read every row into memory (500k rows: 825 MB); now it reads, scores and
    writes chunk by chunk: many bounded chunks, the same output as one chunk, and both equal the
    predictor applied to the whole files read at once (the oracle)."""
    import pyarrow.parquet as pq

    from mlet_dist import predict_job
    from mlet_dist.data.criteo import read_criteo_tsv
    from tests.test_reliability_b import write_tsv

    _fake_row_serving(monkeypatch)
    files = [write_tsv(tmp_path / "a.tsv", 700, seed=1), write_tsv(tmp_path / "b.tsv", 300, seed=2)]
    sizes = []
    scored = predict_job.predict_arrays

    def counting(predictor, rows, batch_size=4096):
        sizes.append(len(rows.dense))
        return scored(predictor, rows, batch_size)

    monkeypatch.setattr(predict_job, "predict_arrays", counting)
    serving = tmp_path / "serving"  # (faked)
    outs = {}
    for chunk_rows in (64, 1 << 20):
        sizes.clear()
        out = tmp_path / f"p{chunk_rows}{suffix}"
        result = predict_job.predict_file(serving, files, out, batch_size=16, chunk_rows=chunk_rows)
        assert result["rows"] == 1000
        if suffix == ".parquet":
            outs[chunk_rows] = pq.read_table(out)["probability"].to_numpy()
        else:
            outs[chunk_rows] = np.loadtxt(out, dtype=np.float32)
        if chunk_rows == 64:
            assert len(sizes) >= 1000 // 64 and max(sizes) <= 64, sizes  # bounded chunks
        else:
            assert sizes == [700, 300]  # one chunk per file
    assert np.array_equal(outs[64], outs[1 << 20])
    rows = [read_criteo_tsv(f, [50] * 26) for f in files]
    dense = torch.from_numpy(np.concatenate([r.dense for r in rows]))
    ids = torch.from_numpy(np.concatenate([r.sparse for r in rows]).T.reshape(-1).copy())
    expected = _RowPredictor()(dense, ids, None).numpy()
    np.testing.assert_allclose(outs[64], expected, rtol=1e-6)


def test_sweep_knows_its_total_up_front(tmp_path):
    """Item 8: the sweep logs its total before the first run (the frontier's count is known
    before the tune stage picks the recipes): it equals the runs the frontier stage makes."""
    from mlet_dist.config import load_config
    from mlet_dist.sweep import load_sweep
    from mlet_dist.sweep.spec import frontier_count, frontier_runs

    cfg = load_config("configs/synthetic_small.toml", [])
    for extra in ({}, {"seeds": 2, "dims": [4, 64, 128], "inner_dims": [16, 64]}):
        spec = load_sweep("configs/sweep/default.toml", extra)
        best = {(0, spec.tune_dim): (spec.baseline[0].name, {}, 0.5)}  # every side has a winner
        best |= {(k, spec.tune_dim): (spec.mlet[0].name, {}, 0.5) for k in spec.inner_dims}
        assert frontier_count(spec) == len(frontier_runs(cfg, spec, tmp_path, best))


def test_preprocess_bars_have_their_total(tmp_path, monkeypatch):
    """Item 8: the preprocess bars counted rows without a total (no ETA); now the 'count ids'
    and 'preprocess' bars know the lines they will read (counted first), and reach them."""
    from mlet_dist.data.preprocess import PreprocessSettings, preprocess
    from mlet_dist.data.preprocess import pool as pool_module
    from tests.test_reliability_b import write_tsv

    bars = {}

    class Bar(pool_module.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})
            self.seen = 0
            bars[kwargs["desc"]] = self

        def update(self, n=1):
            self.seen += n

    monkeypatch.setattr(pool_module, "tqdm", Bar)
    files = [write_tsv(tmp_path / "a.tsv", 120, seed=1), write_tsv(tmp_path / "b.tsv", 80, seed=2)]
    settings = PreprocessSettings([50] * 26, frequency_threshold=2, eval_fraction=0.25)
    preprocess(files, tmp_path / "out", settings, workers=1, progress=True)
    assert bars["preprocess"].total == bars["preprocess"].seen == 200
    assert bars["count ids"].total == bars["count ids"].seen == 150  # the training lines


def test_evaluate_and_collapse_show_progress(tmp_path, rows, monkeypatch):
    """Item 8: evaluation (rows, with its total) and collapse (tables) have progress bars."""
    from mlet_dist.export import run as export_run
    from mlet_dist.train import evaluation

    bars = []

    class Bar(evaluation.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})
            self.seen = 0
            bars.append((kwargs["desc"], self))

        def update(self, n=1):
            self.seen += n

        def __iter__(self):
            for item in self.iterable:
                self.seen += 1
                yield item

    monkeypatch.setattr(evaluation, "tqdm", Bar)
    monkeypatch.setattr(export_run, "tqdm", Bar)
    cfg = tiny_config(tmp_path, "--data.batch_size=32", "--train.max_steps=2")
    metrics = train(cfg)
    evaluated = [b for desc, b in bars if desc == "evaluate"]
    assert [(b.total, b.seen) for b in evaluated] == [(64, 64)]  # the eval split; test is empty
    assert metrics["eval"]["rows"] == 64
    collapse_run(cfg.train.run_dir, tmp_path / "served")
    collapsed = [b for desc, b in bars if desc == "collapse"]
    assert [b.seen for b in collapsed] == [26]  # one table per feature


def test_bool_override_in_python_spelling_names_true_false():
    """Item 9: `--train.progress=True` said only "expected bool, got 'True' (str)"."""
    from mlet_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"got 'True' \(str\): write true or false"):
        load_config(None, ["--train.progress=True"])
    assert load_config(None, ["--train.progress=false"]).train.progress is False


def test_sweep_report_names_each_buckets_rows():
    """Item 9: the sweep's per-bucket AUC columns did not say how many test rows each is over."""
    from mlet_dist.sweep import load_sweep
    from mlet_dist.sweep.report import markdown, summarize

    spec = load_sweep("configs/sweep/default.toml", {"dims": [4, 8], "inner_dims": [64]})
    buckets = {"<=10": 30, "11-100": 200, "101-1000": 0, ">1000": 770}

    def result(k, d, seed, auc):
        test = {"auc": auc, "log_loss": 0.5, "rows": 1000}
        test["buckets"] = {
            b: ({"rows": n, "auc": auc} if n else {"rows": 0}) for b, n in buckets.items()
        }
        variant = f"MLET({k},{d})" if k else f"EBC({d})"
        chosen = {"epoch": 1, "eval": {"auc": auc}, "test": test}
        return {"variant": variant, "k": k, "d": d, "recipe": "r", "point": {}, "seed": seed,
                "chosen": chosen, "seconds": 1.0, "side": "mlet" if k else "baseline"}  # fmt: skip

    runs = [result(k, d, s, 0.7 + d / 1000 + k / 10000 + s / 100000)
            for k in (0, 64) for d in (4, 8) for s in range(2)]  # fmt: skip
    report = summarize(spec, [], runs)
    text = markdown({**report, "meta": {}}, "t", 26)
    header = next(line for line in text.splitlines() if line.startswith("| variant | recipe"))
    for b, n in buckets.items():
        if n:
            assert f"AUC {b} ({n} rows)" in header, header


def test_criteo_1tb_config_trains_from_its_shards_as_the_slurm_block_says():
    """Item 9: configs/criteo_1tb.toml had data.source = 'criteo' with train_files = [], so the
    Slurm block of docs/operations.md failed ("needs data.train_files"); now it streams the
    preprocessed shards, which the block points at on the shared file system."""
    from mlet_dist.config import load_config
    from mlet_dist.data.sources import source_of
    from tests.test_docs import REPO, documented_commands

    block = next(
        c
        for p, _, c in documented_commands()
        if p.name == "operations.md" and "configs/criteo_1tb.toml" in c and "slurm" in c
    )
    overrides = [w for w in block.split(" -- ", 1)[1].split() if w.startswith("--")]
    cfg = load_config(REPO / "configs/criteo_1tb.toml", overrides)
    source = source_of(cfg.data)
    source.check()
    assert source.streamed and source.inputs() == ["/shared/criteo_parquet"]
