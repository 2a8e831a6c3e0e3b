"""Output paths through symlinks, and one writer per output (issue 26; issue 28 item 1; issue 23
item 4).

- A symlinked output (`collapse --out`, `preprocess --out`, `generate`'s data.dir, `predict --out`,
  `train.run_dir`) is the directory or file it points to: written through when that is a previous
  output of the same kind (the link stays a link), else refused in one line, every byte unchanged.
- `preprocess --out` inside a checkpoint, a run or a serving directory is refused like every
  command's output, with a declared schema too.
- One writer per output: while another process holds an output's lock (a subprocess that takes it
  and sleeps: no timing in the assertions), `collapse`, `preprocess`, `generate` and the same
  `sweep` shard are refused naming its pid and host; a killed holder's lock is taken over; no lock
  file is left behind.
- Every attempt fills its own staging directory (stale ones of dead attempts are removed), so the
  manifest lists exactly the files its own attempt wrote.
- The AOTInductor package is written atomically: a compile that fails half-way, or a full disk
  while its bytes are written, publishes nothing.

Oracles: sha256 of every file and the target of every symlink under the test directory before and
after (:func:`tree`); the holder's pid and host as this process knows them; the serving
directory's files against its manifest (:func:`verify_manifest`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_reliability_a import (
    STEP,
    hold_lock,
    one_error_line,
    tiny_collapsed_run,
)
from test_schema import SCHEMA_TOML, write_rows

from mlet_dist import cli
from mlet_dist.config import load_config
from mlet_dist.data import ensure_source_data
from mlet_dist.serving.manifest import MANIFEST, verify_manifest
from mlet_dist.utils import files
from mlet_dist.utils.files import staging_dir
from mlet_dist.utils.locks import FileLock, OutputLock, OutputLockedError

REPO = Path(__file__).resolve().parents[1]


def tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, and ``-> target`` for every symlink (not followed)."""
    out = {}
    for parent, dirs, names in os.walk(root):
        for name in dirs + names:
            p = Path(parent, name)
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def listed_files(serving: Path) -> set[str]:
    """The files of a serving directory, relative to it (symlinks not followed)."""
    return {k for k in tree(serving)} - {
        p.relative_to(serving).as_posix() for p in serving.rglob("*") if p.is_dir()
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step MLET run (Criteo TSV), its config file, held-out rows and its collapse; never
    modified (tests copy what they change)."""
    return tiny_collapsed_run(tmp_path_factory.mktemp("outputs"), 256, 20, 16, [8, 8], [8, 1])


def copy_of(trained, tmp_path: Path, what: str) -> Path:
    dest = tmp_path / what
    shutil.copytree(trained[what], dest)
    return dest


def schema_config(tmp_path: Path) -> tuple[Path, Path]:
    """A declared-schema config (Parquet rows) and its input file."""
    rows = write_rows(tmp_path / "rows.parquet", n_copies=10, seed=3)
    config = tmp_path / "schema.toml"
    config.write_text(SCHEMA_TOML + "\n[train]\nprogress = false\n")
    return config, rows


_HOLD = """
import signal, sys, time
from mlet_dist.utils.locks import OutputLock
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # released (and its file removed) on exit
with OutputLock(sys.argv[1], sys.argv[2], part=sys.argv[3]):
    print("locked", flush=True)
    time.sleep(600)
"""


@contextlib.contextmanager
def output_held(
    out: Path, command: str, part: str = "", kill: bool = False
) -> Iterator[subprocess.Popen]:
    """Another process holding the output lock of ``out`` until the block ends; then it is
    stopped (SIGTERM: it releases the lock) or killed (SIGKILL: its lock file stays behind)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(out), command, part],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        proc.wait()


def holder_named(line: str, proc: subprocess.Popen) -> bool:
    return f"pid {proc.pid} on host {socket.gethostname()}" in line


# -- symlinked outputs ------------------------------------------------------------------------


def test_collapse_through_a_symlink_replaces_the_directory_it_points_to(trained, tmp_path):
    """Issue 26 case 1: `collapse --out LINK`, LINK -> a previous serving directory: the directory
    is replaced (atomically), the link stays a link; no staging directory or lock file is left."""
    served = tmp_path / "real" / "served"
    shutil.copytree(trained["served"], served)
    link = tmp_path / "link"
    link.symlink_to(served)
    argv = ["collapse", "--run", str(trained["run"]), "--out", str(link), "--quantize", "fp16"]
    assert cli.main(argv) == 0
    assert link.is_symlink() and os.readlink(link) == str(served)
    manifest = verify_manifest(served)
    assert manifest["serving"]["dtype"] == "fp16"
    assert listed_files(served) == {f["path"] for f in manifest["files"]} | {MANIFEST}
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]
    assert os.listdir(tmp_path / "real") == ["served"]  # no .served.tmp-*, no .served.lock


@pytest.mark.parametrize("points_to", ["notes", "run", "checkpoint", "loop"])
def test_collapse_into_a_symlink_to_anything_else_is_refused(trained, tmp_path, capsys, points_to):
    run = copy_of(trained, tmp_path, "run")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me\n")
    link = tmp_path / "link"
    targets = {"notes": notes, "run": run, "checkpoint": run / "checkpoints" / STEP, "loop": link}
    link.symlink_to(targets[points_to])
    before = tree(tmp_path)
    assert cli.main(["collapse", "--run", str(run), "--out", str(link)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{link}" in line, line
    assert tree(tmp_path) == before


def test_preprocess_into_a_checkpoint_a_run_or_a_serving_directory_is_refused(
    trained, tmp_path, capsys
):
    """Issue 26 case 2, with the Criteo reader and with a declared schema: every such --out is
    refused in one line and no byte changes (the serving directory gets no unlisted files)."""
    run = copy_of(trained, tmp_path, "run")
    served = copy_of(trained, tmp_path, "served")
    link = tmp_path / "link_to_served"
    link.symlink_to(served)
    ckpt = run / "checkpoints" / STEP
    schema, rows = schema_config(tmp_path)
    outs = {
        ckpt / "pq": "inside the checkpoint",
        ckpt: "is the checkpoint",
        run / "checkpoints" / "pq": "inside the run directory",
        run: "is the run directory",
        served / "pq": "inside the serving directory",
        served / "serving" / "pq": "inside the serving directory",
        served: "exists and is not a previous",
        link: "exists and is not a previous",
        link / "pq": "inside the serving directory",
    }
    before = tree(tmp_path)
    commands = {
        "criteo": ["preprocess", "--config", str(trained["config"])],
        "schema": ["preprocess", "--config", str(schema), "--input", str(rows)],
    }
    for name, argv in commands.items():
        for out, reason in outs.items():
            assert cli.main([*argv, "--out", str(out)]) == 2, (name, out)
            line = one_error_line(capsys.readouterr().err)
            assert f"refusing to write the preprocessed data to {out}" in line, line
            assert reason in line, (name, line)
            assert tree(tmp_path) == before, (name, out)
    # the input itself, and a directory holding it
    argv = commands["schema"]
    assert cli.main([*argv, "--out", str(rows)]) == 2
    assert "it is the input" in one_error_line(capsys.readouterr().err)
    assert cli.main([*argv, "--out", str(tmp_path)]) == 2
    assert "contains the input" in one_error_line(capsys.readouterr().err)
    assert tree(tmp_path) == before


def test_preprocess_through_a_symlink_writes_where_it_points(tmp_path):
    schema, rows = schema_config(tmp_path)
    fresh, real, link = tmp_path / "fresh", tmp_path / "real", tmp_path / "link"
    argv = ["preprocess", "--config", str(schema), "--input", str(rows), "--out"]
    assert cli.main([*argv, str(real)]) == 0
    link.symlink_to(real)
    assert cli.main([*argv, str(link), "--data.test_fraction=0.2"]) == 0  # replaces it
    assert cli.main([*argv, str(fresh), "--data.test_fraction=0.2"]) == 0
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert tree(real) == tree(fresh)  # the same bytes as a fresh output
    assert sorted(os.listdir(tmp_path)) == ["fresh", "link", "real", "rows.parquet", "schema.toml"]


def test_generate_through_a_symlink_and_a_symlink_to_someone_elses_days(tmp_path, capsys):
    argv = ["generate", "--synthetic.days=2", "--synthetic.rows_per_day=20", "--train.progress=false"]  # fmt: skip
    real, link = tmp_path / "real", tmp_path / "link"
    assert cli.main([*argv, f"--data.dir={real}"]) == 0
    link.symlink_to(real)
    before = tree(tmp_path)
    assert cli.main([*argv, f"--data.dir={link}"]) == 0  # the generator's own: regenerated
    assert tree(tmp_path) == before  # deterministic bytes, the link kept, nothing left beside
    theirs = tmp_path / "criteo"
    theirs.mkdir()
    (theirs / "day_0.gz").write_bytes(b"precious")
    link.unlink()
    link.symlink_to(theirs)
    before = tree(tmp_path)
    assert cli.main([*argv, f"--data.dir={link}"]) == 2
    assert "day_0.gz but no synthetic_meta.json" in one_error_line(capsys.readouterr().err)
    assert tree(tmp_path) == before


def test_predict_through_a_symlink_writes_the_file_it_points_to(trained, tmp_path, capsys):
    served, held = str(trained["served"]), str(trained["held"])
    fresh, real, link = tmp_path / "fresh.txt", tmp_path / "real.txt", tmp_path / "link.txt"
    predict = ["predict", "--serving", served, "--data", held, "--out"]
    real.write_text("0.5\n")  # a previous (one-row) predictions file
    link.symlink_to(real)
    assert cli.main([*predict, str(link)]) == 0
    assert cli.main([*predict, str(fresh)]) == 0
    capsys.readouterr()
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_bytes() == fresh.read_bytes() and len(real.read_text().split()) == 20
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    link.unlink()
    link.symlink_to(notes)
    before = tree(tmp_path)
    assert cli.main([*predict, str(link)]) == 2
    assert "is not a predictions file" in one_error_line(capsys.readouterr().err)
    assert tree(tmp_path) == before


def test_a_symlinked_run_directory_is_the_run_it_points_to(trained, tmp_path, capsys):
    """`train.run_dir = LINK`: LINK -> a serving directory is refused; LINK -> a run whose lock
    another process holds (by its real path) is refused naming that process."""
    run = copy_of(trained, tmp_path, "run")
    served = copy_of(trained, tmp_path, "served")
    link = tmp_path / "link"
    link.symlink_to(served)
    train = ["train", "--config", str(trained["config"]), f"--train.run_dir={link}"]
    before = tree(tmp_path)
    assert cli.main(train) == 2
    assert "is a serving directory" in one_error_line(capsys.readouterr().err)
    assert tree(tmp_path) == before
    link.unlink()
    link.symlink_to(run)
    holder = hold_lock(run)
    try:
        before = tree(tmp_path)
        assert cli.main([*train, "--train.max_steps=6"]) == 2
        assert holder_named(one_error_line(capsys.readouterr().err), holder)
        assert tree(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()


# -- one writer per output ----------------------------------------------------------------------


def test_a_second_collapse_into_one_out_is_refused_naming_the_first(trained, tmp_path, capsys):
    """Issue 26 case 3 / issue 23 item 4: while another process writes --out, a collapse into it
    (or into a symlink to it) is refused naming that process; a killed writer's lock is taken
    over, and the lock file is gone after the collapse."""
    served = copy_of(trained, tmp_path, "served")
    link = tmp_path / "link"
    link.symlink_to(served)
    collapse = ["collapse", "--run", str(trained["run"]), "--out"]
    with output_held(served, "collapse", kill=True) as holder:
        before = tree(tmp_path)
        for out in (served, link):
            assert cli.main([*collapse, str(out), "--quantize", "int8"]) == 2
            line = one_error_line(capsys.readouterr().err)
            assert holder_named(line, holder) and "`mlet-dist collapse`" in line, line
            assert f"cannot write the output {served}" in line, line
            assert tree(tmp_path) == before
    # the killed holder left its record behind; the kernel released its lock
    record = json.loads((tmp_path / ".served.lock").read_text())
    assert record["pid"] == holder.pid and record["command"] == "collapse"
    assert cli.main([*collapse, str(link), "--quantize", "int8"]) == 0
    assert verify_manifest(served)["serving"]["dtype"] == "int8"
    assert sorted(os.listdir(tmp_path)) == ["link", "served"]


def test_preprocess_generate_and_a_sweep_shard_are_locked_too(trained, tmp_path, capsys):
    schema, rows = schema_config(tmp_path)
    out = tmp_path / "pq"
    preprocess = ["preprocess", "--config", str(schema), "--input", str(rows), "--out", str(out)]
    criteo = ["preprocess", "--config", str(trained["config"]), "--out", str(out)]
    data = tmp_path / "days"
    generate = ["generate", f"--data.dir={data}", "--synthetic.days=1", "--synthetic.rows_per_day=10"]  # fmt: skip
    work = tmp_path / "work"
    sweep = ["sweep", "--config", str(trained["config"]), "--sweep", str(REPO / "configs/sweep/default.toml"), "--work", str(work), "--shard", "1/2", "--data.eval_fraction=0.2", "--data.test_fraction=0.1"]  # fmt: skip
    cases = [(out, "", preprocess), (out, "", criteo), (data, "", generate), (work, "shard-1-of-2", sweep)]  # fmt: skip
    for target, part, argv in cases:
        with output_held(target, argv[0], part) as holder:
            before = tree(tmp_path)
            assert cli.main(argv) == 2, argv
            line = one_error_line(capsys.readouterr().err)
            assert holder_named(line, holder) and f"`mlet-dist {argv[0]}`" in line, line
            assert tree(tmp_path) == before
    # other shards of a sweep are written beside each other: each shard has its own lock
    with OutputLock(work, "sweep", part="shard-0-of-2"), OutputLock(work, "sweep", part="shard-1-of-2"):  # fmt: skip
        with pytest.raises(OutputLockedError, match=r"\(shard-1-of-2\)"):
            OutputLock(work, "sweep", part="shard-1-of-2").acquire()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.parquet", "schema.toml"]


def test_running_jobs_wait_for_the_process_generating_their_data(tmp_path):
    """`run` and `sweep` need the data, not to write it: they wait for the generator that holds
    the lock, then use its data (a refusal is for `mlet-dist generate` itself)."""
    cfg = load_config(None, [f"--data.dir={tmp_path / 'days'}", "--synthetic.days=1", "--synthetic.rows_per_day=10"])  # fmt: skip
    result: list[object] = []
    with output_held(tmp_path / "days", "generate"):
        waiting = threading.Thread(
            target=lambda: result.append(ensure_source_data(cfg.data, cfg.synthetic, False))
        )
        waiting.start()
        waiting.join(timeout=2)
        assert waiting.is_alive() and not result  # still waiting for the holder
    waiting.join()
    assert result == [True] and (tmp_path / "days" / "synthetic_meta.json").is_file()


def test_a_lock_file_removed_by_its_last_holder_is_not_trusted(tmp_path):
    """The holder deletes the lock file as it releases it; a process that opened the old file
    just before must not hold a lock on the deleted file: it locks the file at the path."""
    out = tmp_path / "served"
    lock = OutputLock(out, "collapse")
    first = OutputLock(out, "collapse").acquire()
    stale = os.open(first.path, os.O_RDWR)  # opened before the holder released it
    first.release()
    assert not first.path.exists()
    opened = iter([stale])
    real_open = FileLock._open
    lock._open = lambda: next(opened, None) or real_open(lock)  # the stale file first
    with lock:
        assert lock.held and first.path.exists()
        with pytest.raises(OutputLockedError):
            OutputLock(out, "collapse").acquire()
    assert not first.path.exists()


# -- one staging directory per attempt ----------------------------------------------------------


def test_each_attempt_has_its_own_staging_directory(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    dead = tmp_path / ".link.tmp-1-dead"  # not beside the target: not this output's
    dead.mkdir()
    (tmp_path / ".real.tmp").mkdir()  # the fixed name of earlier versions
    (tmp_path / ".real.tmp-99999-0badf00d").mkdir()  # a dead attempt's
    a, b = staging_dir(link), staging_dir(real)
    assert a != b and a.parent == b.parent == tmp_path
    assert a.name.startswith(f".real.tmp-{os.getpid()}-") and b.is_dir()
    assert not a.exists()  # b's attempt removed a's: only one attempt holds the output lock
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".link.tmp-1-dead", b.name, "link", "real"])  # fmt: skip


def test_the_manifest_lists_what_its_own_attempt_wrote(trained, tmp_path):
    """Issue 28 item 1: a stale staging directory of another attempt (another quantization, a
    file of its own) is never published: the directory holds exactly its manifest's files."""
    served = copy_of(trained, tmp_path, "served")
    stale = tmp_path / f".served.tmp-99999-{'0' * 8}"
    shutil.copytree(trained["served"], stale)
    (stale / "parquet" / "theirs.parquet").write_bytes(b"another attempt's")
    argv = ["collapse", "--run", str(trained["run"]), "--out", str(served), "--quantize", "fp16"]
    assert cli.main(argv) == 0
    manifest = verify_manifest(served)
    assert listed_files(served) == {f["path"] for f in manifest["files"]} | {MANIFEST}
    assert manifest["serving"]["dtype"] == "fp16" and "serving/tables/.metadata" in listed_files(served)  # fmt: skip
    assert sorted(os.listdir(tmp_path)) == ["served"]


# -- the AOTInductor package, atomically ---------------------------------------------------------


@pytest.mark.parametrize("fails", ["compile", "write"])
def test_the_aoti_package_is_written_atomically(trained, tmp_path, capsys, monkeypatch, fails):
    """The compile writes part of its package then hits a full disk, or the package is complete
    and the disk fills while it is written: one line naming --out, nothing published, no
    staging directory or partial file left."""
    import torch

    monkeypatch.setattr("mlet_dist.serving.predictor.check_aoti_available", lambda: None)

    def compile_(program, package_path):
        package_path.write(b"PK\x03\x04 half a package")
        if fails == "compile":
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_)
    real_publish = files.publish_file

    def publish(tmp, final):
        if Path(final).name == "predictor_aoti.pt2":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_publish(tmp, final)

    monkeypatch.setattr(files, "publish_file", publish)
    served = copy_of(trained, tmp_path, "served")
    before = tree(tmp_path)
    assert cli.main(["collapse", "--run", str(trained["run"]), "--out", str(served), "--aoti"]) == 2  # fmt: skip
    line = one_error_line(capsys.readouterr().err)
    assert f"no space left on device: cannot write {served}" in line, line
    assert tree(tmp_path) == before and verify_manifest(served)
