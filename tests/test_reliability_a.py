"""Nothing a user types may destroy a run (issue 16, part A).

- outputs never overlap inputs: collapse/predict/preprocess/generate/train/plan refuse an output
  that is, contains or lies inside a run, a checkpoint or their own input, and replace an existing
  output only when it is a previous output of the same kind;
- one writer per run directory: ``RUN/.lock`` (flock), the holder named, a killed holder's lock
  taken over, a refusal reaching every rank;
- nothing is written before validation passes (a refused resume leaves the run as it was);
- CLI numbers and choices are validated, ``--version``, user errors are one line (``--debug``
  shows the traceback);
- a full disk is reported as such, naming the path, and half-written outputs are removed.

Oracles: the run directory's bytes (sha256 of every file) before and after each refused command;
the lock holder's pid/host as the test process knows them; the versions from importlib.metadata.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from dist_utils import run_ranks

from mlet_dist import cli
from mlet_dist.checkpoint import latest_checkpoint
from mlet_dist.utils import files
from mlet_dist.utils.locks import RunLock, RunLockedError

REPO = Path(__file__).resolve().parents[1]
SIZES = [50] * 26
STEP = "step_00000004"


def write_criteo_tsv(path: Path, n: int, seed: int) -> Path:
    """Raw Criteo lines: label, 13 integers (some missing), 26 hex hashes."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        ints = ["" if rng.random() < 0.1 else str(int(rng.integers(0, 1000))) for _ in range(13)]
        cats = [f"{int(rng.integers(0, 2**32)):08x}" for _ in range(26)]
        lines.append("\t".join([str(int(rng.integers(0, 2))), *ints, *cats]))
    path.write_text("\n".join(lines) + "\n")
    return path


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (the lock file, which holds no data, aside)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != files.RUN_LOCK
    }


def one_error_line(err: str) -> str:
    """The single line a user error prints (fails on a traceback or several lines)."""
    lines = [line for line in err.splitlines() if line.strip() and " INFO " not in line]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("mlet-dist: error: "), lines[0]
    return lines[0]


def tiny_collapsed_run(
    tmp: Path, rows: int, held_rows: int, inner_dim: int, dense: list[int], over: list[int]
) -> dict[str, Path]:
    """Trains a 4-step MLET run on Criteo TSV rows in ``tmp`` and collapses it into
    ``tmp/served``: its config file, run, data and held-out rows."""
    data = write_criteo_tsv(tmp / "train.tsv", rows, seed=0)
    held = write_criteo_tsv(tmp / "held.tsv", held_rows, seed=1)
    config = tmp / "tiny.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [data]
            source = "criteo"
            train_files = ["{data}"]
            eval_fraction = 0.0
            num_embeddings_per_feature = {SIZES}
            batch_size = 32
            [model]
            embedding_dim = 8
            inner_dim = {inner_dim}
            dense_arch_layer_sizes = {dense}
            over_arch_layer_sizes = {over}
            [train]
            max_steps = 4
            progress = false
            run_dir = "{tmp / "run"}"
            """
        )
    )
    assert cli.main(["train", "--config", str(config)]) == 0
    assert cli.main(["collapse", "--run", str(tmp / "run"), "--out", str(tmp / "served")]) == 0
    return {
        "config": config,
        "run": tmp / "run",
        "served": tmp / "served",
        "held": held,
        "data": data,
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step MLET run, its config file, held-out rows and its collapse (never modified: tests
    that change a run work on a copy)."""
    tmp = tmp_path_factory.mktemp("reliability")
    return {"tmp": tmp, **tiny_collapsed_run(tmp, 384, 100, 32, [16, 8], [16, 1])}


def copy_run(trained, dest: Path) -> Path:
    shutil.copytree(trained["run"], dest)
    return dest


# -- 1. outputs never overlap inputs --------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    ["run", "run/checkpoints", f"run/checkpoints/{STEP}", "run/config.json", "."],
)
def test_collapse_never_replaces_the_run_or_its_checkpoints(trained, tmp_path, capsys, target):
    """`collapse --out` = the run, its checkpoints, one checkpoint, a run file, or a directory
    holding the run: refused in one line, every byte of the run unchanged."""
    run = copy_run(trained, tmp_path / "run")
    before = snapshot(tmp_path)
    out = tmp_path / target
    assert cli.main(["collapse", "--run", str(run), "--out", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"refusing to write the serving directory to {out}" in line
    assert snapshot(tmp_path) == before
    assert latest_checkpoint(run).name == STEP


def test_other_outputs_that_overlap_a_run_are_refused(trained, tmp_path, capsys):
    """predict, preprocess, generate, plan and train pointed into a run, a checkpoint or a
    serving directory: refused, nothing changed."""
    run = copy_run(trained, tmp_path / "run")
    served = tmp_path / "served"
    shutil.copytree(trained["tmp"] / "served", served)
    other = tmp_path / "other_tool"  # someone else's directory with a config.json
    other.mkdir()
    (other / "config.json").write_text('{"theirs": true}')
    before = snapshot(tmp_path)
    config, held = str(trained["config"]), str(trained["held"])
    cases = [
        (
            [
                "predict",
                "--serving",
                str(served),
                "--data",
                held,
                "--out",
                str(run / "metrics.json"),
            ],
            "inside the run directory",
        ),
        (
            ["predict", "--serving", str(served), "--data", held, "--out", str(run)],
            "is the run directory",
        ),
        (["predict", "--serving", str(served), "--data", held, "--out", held], "is the input"),
        (
            ["predict", "--serving", str(served), "--data", held, "--out", str(served / "p.txt")],
            "inside the serving directory",
        ),
        (
            ["preprocess", "--config", config, "--out", str(run), "--train.progress=false"],
            "is the run directory",
        ),
        (
            ["preprocess", "--config", config, "--out", str(run / "checkpoints" / STEP / "pq")],
            "inside the checkpoint",
        ),
        (
            ["generate", "--config", config, f"--data.dir={run / 'checkpoints'}"],
            "inside the run directory",
        ),
        (
            ["plan", "--config", config, "--world-size", "1", "--out", str(run / "config.json")],
            "inside the run directory",
        ),
        (["train", "--config", config, f"--train.run_dir={served}"], "is a serving directory"),
        (
            ["train", "--config", config, f"--train.run_dir={other}"],
            "holds config.json, which training would overwrite",
        ),
        (
            ["train", "--config", config, f"--train.run_dir={run / 'checkpoints'}"],
            "inside the run directory",
        ),
        (
            ["train", "--config", config, f"--train.run_dir={run / 'checkpoints' / STEP}"],
            "is the checkpoint",
        ),
        (["train", "--config", config, f"--train.run_dir={trained['data']}"], "is the input"),
    ]
    for argv, reason in cases:
        assert cli.main(argv) == 2, argv
        assert reason in one_error_line(capsys.readouterr().err), argv
        assert snapshot(tmp_path) == before, argv


def test_an_existing_output_is_replaced_only_if_it_is_a_previous_one(trained, tmp_path, capsys):
    run, held = str(trained["run"]), str(trained["held"])
    # a directory of someone else's files is not a serving directory
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me\n")
    assert cli.main(["collapse", "--run", run, "--out", str(other)]) == 2
    assert "is not a serving directory" in one_error_line(capsys.readouterr().err)
    assert (other / "todo.txt").read_text() == "keep me\n"
    # a previous serving directory is replaced, but not when someone added a file to it
    served = tmp_path / "served"
    assert cli.main(["collapse", "--run", run, "--out", str(served), "--quantize", "fp16"]) == 0
    assert cli.main(["collapse", "--run", run, "--out", str(served)]) == 0
    assert json.loads((served / "manifest.json").read_text())["serving"]["dtype"] == "fp32"
    (served / "parquet" / "mine.txt").write_text("x")
    assert cli.main(["collapse", "--run", run, "--out", str(served)]) == 2
    assert "did not write (parquet/mine.txt)" in one_error_line(capsys.readouterr().err)
    (served / "parquet" / "mine.txt").unlink()
    # the run's own served/ slot (where `mlet-dist run` collapses) is allowed
    own = copy_run(trained, tmp_path / "run")
    assert cli.main(["collapse", "--run", str(own), "--out", str(own / "served")]) == 0
    assert (own / "served" / "manifest.json").is_file() and latest_checkpoint(own).name == STEP
    # predict: an existing file that is not a predictions file, or a directory, is refused
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    pred = ["predict", "--serving", str(served), "--data", held, "--out"]
    assert cli.main([*pred, str(notes)]) == 2
    assert "is not a predictions file" in one_error_line(capsys.readouterr().err)
    assert notes.read_text() == "my notes\n"
    assert cli.main([*pred, str(other)]) == 2  # an existing directory (was a traceback)
    assert "is not a file" in one_error_line(capsys.readouterr().err)
    for name in ("p.txt", "p.parquet"):  # previous predictions are replaced
        assert cli.main([*pred, str(tmp_path / name)]) == 0
        assert cli.main([*pred, str(tmp_path / name)]) == 0
    assert len((tmp_path / "p.txt").read_text().split()) == 100


def test_generate_never_overwrites_day_files_it_did_not_write(tmp_path, capsys):
    """Real Criteo day files are named day_0.gz … too: without the generator's meta file, they
    are someone else's data."""
    data = tmp_path / "criteo"
    data.mkdir()
    (data / "day_0.gz").write_bytes(b"precious")
    argv = ["generate", f"--data.dir={data}", "--synthetic.days=1", "--synthetic.rows_per_day=10"]
    assert cli.main([*argv, "--train.progress=false"]) == 2
    assert "day_0.gz but no synthetic_meta.json" in one_error_line(capsys.readouterr().err)
    assert (data / "day_0.gz").read_bytes() == b"precious"
    fresh = tmp_path / "fresh"
    assert cli.main([*argv, f"--data.dir={fresh}", "--train.progress=false"]) == 0
    assert cli.main([*argv, f"--data.dir={fresh}", "--train.progress=false"]) == 0  # its own


# -- 2. one writer per run directory ----------------------------------------------------------

_HOLD = """
import sys, time
from mlet_dist.utils.locks import RunLock
RunLock(sys.argv[1], "train", shared=sys.argv[2] == "shared").acquire()
print("locked", flush=True)
time.sleep(600)
"""


def hold_lock(run: Path, mode: str = "exclusive") -> subprocess.Popen:
    """A process that holds the run's lock until killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(run), mode],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_is_refused_and_a_killed_holders_lock_is_taken_over(trained, tmp_path, capsys):  # fmt: skip
    run = copy_run(trained, tmp_path / "run")
    config = str(trained["config"])
    train = ["train", "--config", config, f"--train.run_dir={run}", "--train.max_steps=6"]
    holder = hold_lock(run)
    try:
        before = snapshot(run)
        assert cli.main(train) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in line, line
        # readers are refused too while a writer holds the run
        out = tmp_path / "served"
        assert cli.main(["collapse", "--run", str(run), "--out", str(out)]) == 2
        assert f"pid {holder.pid}" in one_error_line(capsys.readouterr().err)
        assert cli.main(["evaluate", "--run", str(run), "--data", str(trained["held"])]) == 2
        assert f"pid {holder.pid}" in one_error_line(capsys.readouterr().err)
        assert snapshot(run) == before and not out.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the dead holder's record is still in the file; the kernel released its lock
    assert json.loads((run / files.RUN_LOCK).read_text())["pid"] == holder.pid
    assert cli.main(train) == 0
    assert latest_checkpoint(run).name == "step_00000006"


def test_a_reader_keeps_writers_out(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path / "run")
    reader = hold_lock(run, "shared")
    try:
        assert cli.main(["train", "--config", str(trained["config"]), f"--train.run_dir={run}"]) == 2  # fmt: skip
        assert "another process is reading it" in one_error_line(capsys.readouterr().err)
        # another reader is fine
        assert cli.main(["collapse", "--run", str(run), "--out", str(tmp_path / "served")]) == 0
    finally:
        reader.kill()
        reader.wait()


def _train_on_rank(config: str, run: str) -> str:
    from mlet_dist.config import load_config
    from mlet_dist.train import train

    try:
        train(load_config(config, [f"--train.run_dir={run}", "--data.batch_size=32"]))
    except RunLockedError as e:
        return str(e)
    return "trained"


@pytest.mark.slow
def test_a_refusal_reaches_every_rank(trained, tmp_path):
    """Rank 0 is refused the lock; rank 1 learns it from rank 0 (no hang, the same error)."""
    run = tmp_path / "run"  # a new run: without the lock both ranks would train it
    with RunLock(run, "train"):  # held by this process
        results = run_ranks(_train_on_rank, 2, str(trained["config"]), str(run), timeout=180)
    assert results[0] == results[1] and f"pid {os.getpid()}" in results[0], results


# -- 3. nothing is written before validation passes -------------------------------------------


def test_a_refused_resume_changes_nothing_in_the_run(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path / "run")
    before = snapshot(run)
    argv = ["train", "--config", str(trained["config"]), f"--train.run_dir={run}"]
    code = cli.main([*argv, "--model.inner_dim=16"])
    assert snapshot(run) == before  # config.json, metrics.json, loss curve, checkpoints
    assert code == 2
    line = one_error_line(capsys.readouterr().err)
    assert "different model config" in line and "model.inner_dim: checkpoint 32 != config 16" in line  # fmt: skip
    assert cli.main(["collapse", "--run", str(run), "--out", str(tmp_path / "served")]) == 0


def test_a_run_refused_for_its_data_writes_no_config(trained, tmp_path, capsys):
    run = tmp_path / "run"
    missing = tmp_path / "missing.tsv"
    argv = ["train", "--config", str(trained["config"]), f"--train.run_dir={run}"]
    code = cli.main([*argv, f"--data.train_files=['{missing}']"])
    assert not (run / "config.json").exists()
    assert sorted(p.name for p in run.iterdir()) == [files.RUN_LOCK]
    assert code == 2 and "missing.tsv" in one_error_line(capsys.readouterr().err)
    assert cli.main(argv) == 0  # the same directory then trains


def test_atomic_write_keeps_the_previous_file_on_failure(tmp_path):
    final = tmp_path / "metrics.json"
    files.atomic_write_json(final, {"a": 1})

    def half_then_fail(f):
        f.write(b'{"a": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(final, half_then_fail)
    assert json.loads(final.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


# -- 6. CLI numbers and choices; one-line errors; --version -------------------------------------


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlet_dist", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )


def test_bad_numbers_and_choices_are_one_line_errors(trained, tmp_path):
    served, held = str(trained["tmp"] / "served"), str(trained["held"])
    existing_dir = tmp_path / "somedir"
    existing_dir.mkdir()
    predict = ["predict", "--serving", served, "--data", held, "--out", str(tmp_path / "p.txt")]
    cases = [
        (
            [*predict, "--batch-size", "-5"],
            "argument --batch-size: expected a positive integer, got -5",
        ),
        (
            [*predict, "--batch-size", "0"],
            "argument --batch-size: expected a positive integer, got 0",
        ),
        (
            [
                "collapse",
                "--run",
                str(trained["run"]),
                "--out",
                str(tmp_path / "s"),
                "--chunk-rows",
                "-5",
            ],
            "argument --chunk-rows: expected a positive integer, got -5",
        ),
        (["--log-level", "LOUD", *predict], "argument --log-level: invalid choice: 'LOUD'"),
        (
            ["predict", "--serving", served, "--data", held, "--out", str(existing_dir)],
            f"{existing_dir} exists and is not a file",
        ),
    ]
    for argv, message in cases:
        proc = run_cli(*argv)
        assert proc.returncode == 2, (argv, proc.stderr[-3000:])
        assert message in one_error_line(proc.stderr), argv
    assert not (tmp_path / "p.txt").exists() and not (tmp_path / "s").exists()
    # --debug shows the traceback of the same error
    proc = run_cli("--debug", "predict", "--serving", served, "--data", held, "--out", str(existing_dir))  # fmt: skip
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "OutputPathError" in proc.stderr


def test_version_names_the_package_and_its_libraries():
    proc = run_cli("--version")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.strip()
    assert text.startswith("mlet-dist 0.1.0 ("), text
    for dist in ("torch", "torchrec", "pyarrow"):
        assert f"{dist} {importlib.metadata.version(dist)}" in text
    fbgemm = [d for d in ("fbgemm-gpu-cpu", "fbgemm-gpu") if _installed(d)]
    assert fbgemm and all(f"{d} {importlib.metadata.version(d)}" in text for d in fbgemm)


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# -- 7. disk full -------------------------------------------------------------------------------


def _inline_container_error() -> RuntimeError:  # what torch.save raises on a full disk
    return RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


def _dcp_error() -> Exception:  # what dcp.save raises when a rank hits ENOSPC
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException(
        "CheckpointException ranks:dict_keys([0])",
        {0: (OSError(errno.ENOSPC, "No space left on device"), None)},
    )


@pytest.mark.parametrize("make_error", [_inline_container_error, _dcp_error])
def test_disk_full_while_checkpointing(trained, tmp_path, capsys, monkeypatch, make_error):
    """The checkpoint write fails half-way as on a full disk: one line naming the checkpoint
    directory, no step_N.tmp left behind, the previous checkpoint intact."""
    import mlet_dist.checkpoint.store as checkpoint_module

    run = copy_run(trained, tmp_path / "run")
    before = snapshot(run / "checkpoints")

    def half_written(state, checkpoint_id):
        Path(checkpoint_id, "__0_0.distcp").write_bytes(b"\0" * 4096)
        raise make_error()

    monkeypatch.setattr(checkpoint_module.dcp, "save", half_written)
    argv = ["train", "--config", str(trained["config"]), f"--train.run_dir={run}"]
    assert cli.main([*argv, "--train.max_steps=6"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"no space left on device: cannot write {run / 'checkpoints'}" in line, line
    assert snapshot(run / "checkpoints") == before  # no step_00000006.tmp, step 4 untouched


def test_disk_full_while_collapsing(trained, tmp_path, capsys, monkeypatch):
    import mlet_dist.export.run as export_module

    out = tmp_path / "served"
    run = str(trained["run"])
    assert cli.main(["collapse", "--run", run, "--out", str(out)]) == 0
    before = snapshot(out)
    real_save = export_module.dcp.save

    def fills_the_disk(state, checkpoint_id, **kwargs):
        real_save(state, checkpoint_id=checkpoint_id, **kwargs)  # something is written first
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_module.dcp, "save", fills_the_disk)
    assert cli.main(["collapse", "--run", run, "--out", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"no space left on device: cannot write {out}" in line, line
    assert snapshot(out) == before  # the previous result is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["served"]  # no .served.tmp


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 256 KiB tmpfs (root only): smaller than one checkpoint of the tiny run (~600 KiB)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_file_system(trained, small_tmpfs, capsys):
    run = small_tmpfs / "run"
    argv = ["train", "--config", str(trained["config"]), f"--train.run_dir={run}"]
    assert cli.main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"no space left on device: cannot write {run / 'checkpoints'}" in line, line
    assert not list((run / "checkpoints").glob("*.tmp"))
    out = small_tmpfs / "served"
    assert cli.main(["collapse", "--run", str(trained["run"]), "--out", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"no space left on device: cannot write {out}" in line, line
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["run"]  # no .served.tmp
