"""Reliability, part B (issue 16, items 4, 5, 8, 9): damaged checkpoints, non-finite values,
empty data, wrong table-size lists, and loading that never runs code.

Oracles: CRC-32s recomputed here with zlib; the run's own loss log (a resume from an older
checkpoint must retrain those steps bit for bit); the sharding recorded independently in
train_state.json; a side-effect marker file that a crafted pickle would create.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed.checkpoint as dcp
from dist_utils import run_ranks

from mlet_dist import cli
from mlet_dist.checkpoint import (
    INTEGRITY_FILE,
    CheckpointError,
    dcp_load,
    list_checkpoints,
    plan_from_json,
    plan_to_json,
    verify_checkpoint,
)
from mlet_dist.checkpoint.plan_json import _load_old_plan
from mlet_dist.config import ConfigError, DistConfig, load_config
from mlet_dist.data import CriteoArrays, CriteoFormatError, Splits, read_criteo_tsv
from mlet_dist.data.preprocess import PreprocessSettings, preprocess, preprocess_from_config
from mlet_dist.distributed.parallelize import init_distributed
from mlet_dist.export import load_served, load_unsharded
from mlet_dist.train import TrainingDiverged, train
from mlet_dist.workflow import evaluate_run

SIZES = [50] * 26
# What a crafted pickle would create: it must never exist.
MARKER = Path(tempfile.gettempdir()) / f"mlet_pwned_{os.getpid()}"


class Evil:
    """Unpickling this runs ``touch MARKER`` (os.system), as a crafted checkpoint would."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def criteo_line(rng: np.random.Generator, dense0: str | None = None) -> str:
    ints = [str(int(rng.integers(0, 1000))) for _ in range(13)]
    if dense0 is not None:
        ints[0] = dense0
    cats = [f"{int(rng.integers(0, 2**32)):08x}" for _ in range(26)]
    return "\t".join([str(int(rng.integers(0, 2))), *ints, *cats])


def write_tsv(path: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.write_text("".join(criteo_line(rng) + "\n" for _ in range(n)))
    return path


def overrides(run_dir: Path, data: Path, *extra: str) -> list[str]:
    return [
        "--data.source='criteo'",
        f"--data.train_files=['{data}']",
        "--data.eval_fraction=0.125",
        f"--data.num_embeddings_per_feature={SIZES}",
        "--data.batch_size=32",
        "--model.embedding_dim=8",
        "--model.inner_dim=32",
        "--model.dense_arch_layer_sizes=[16, 8]",
        "--model.over_arch_layer_sizes=[16, 1]",
        "--dist.device='cpu'",
        "--train.log_every=1",
        "--train.progress=false",
        f"--train.run_dir={run_dir}",
        *extra,
    ]


def config(run_dir: Path, data: Path, *extra: str):
    return load_config(None, overrides(run_dir, data, *extra))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4 (copied by each test that damages it)."""
    root = tmp_path_factory.mktemp("base")
    data = write_tsv(root / "train.tsv", 384)
    init_distributed(DistConfig(device="cpu"))
    train(config(root / "run", data, "--train.max_steps=4", "--train.checkpoint_every=2"))
    return {"root": root, "data": data, "run": root / "run"}


def copy_run(base, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(base["run"], run)
    # the run's config names its own run_dir: point it at the copy
    cfg = json.loads((run / "config.json").read_text())
    cfg["train"]["run_dir"] = str(run)
    (run / "config.json").write_text(json.dumps(cfg))
    return run


def ckpts(run: Path) -> list[Path]:
    return list_checkpoints(run)


def flip_bytes(path: Path, count: int = 3) -> None:
    data = bytearray(path.read_bytes())
    for k in range(count):
        data[len(data) // 2 + 97 * k] ^= 0xFF
    path.write_bytes(bytes(data))


def rewrite_integrity(ckpt: Path) -> None:
    """What an attacker who edits a checkpoint can do too: a consistent integrity record."""
    record = json.loads((ckpt / INTEGRITY_FILE).read_text())
    for name in record["files"]:
        data = (ckpt / name).read_bytes()
        record["files"][name] = {"bytes": len(data), "crc32": f"{zlib.crc32(data):08x}"}
    (ckpt / INTEGRITY_FILE).write_text(json.dumps(record))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("mlet-dist")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------- 4. checkpoint integrity


def test_integrity_record_lists_every_file_with_its_crc(base):
    for ckpt in ckpts(base["run"]):
        record = json.loads((ckpt / INTEGRITY_FILE).read_text())
        files = sorted(
            p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.name != INTEGRITY_FILE
        )
        assert sorted(record["files"]) == files and "plan.json" in files and ".metadata" in files
        for name, entry in record["files"].items():
            data = (ckpt / name).read_bytes()
            assert entry == {"bytes": len(data), "crc32": f"{zlib.crc32(data):08x}"}, name
        assert verify_checkpoint(ckpt, collective=False) is True


def test_flipped_bytes_are_refused_by_collapse_naming_the_file(base, tmp_path, capsys):
    run = copy_run(base, tmp_path)
    shard = ckpts(run)[-1] / "__0_0.distcp"
    flip_bytes(shard)
    out = tmp_path / "served"
    assert cli.main(["collapse", "--run", str(run), "--out", str(out)]) == 2
    line = one_error_line(capsys)
    assert str(ckpts(run)[-1]) in line and "__0_0.distcp does not match its CRC-32" in line
    assert not out.exists() and not (tmp_path / ".served.tmp").exists()
    with pytest.raises(CheckpointError, match="__0_0.distcp does not match its CRC-32"):
        load_unsharded(config(run, base["data"]), ckpts(run)[-1])


def test_truncated_shard_is_a_one_line_error(base, tmp_path, capsys):
    run = copy_run(base, tmp_path)
    ckpt = ckpts(run)[-1]
    shard = ckpt / "__0_0.distcp"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    assert cli.main(["collapse", "--run", str(run), "--out", str(tmp_path / "o")]) == 2
    line = one_error_line(capsys)
    assert f"__0_0.distcp has {size // 2} bytes, {INTEGRITY_FILE} records {size}" in line
    assert str(ckpt) in line
    # A checkpoint of an older mlet_dist (no integrity record): DCP's failure, in one line.
    (ckpt / INTEGRITY_FILE).unlink()
    with pytest.raises(CheckpointError) as e:
        load_unsharded(config(run, base["data"]), ckpt)
    assert str(e.value).startswith(f"cannot load checkpoint {ckpt}: ")
    assert "\n" not in str(e.value)


def test_a_missing_file_makes_resume_fall_back(base, tmp_path, caplog):
    run = copy_run(base, tmp_path)
    before = [json.loads(x) for x in (run / "loss_curve.jsonl").read_text().splitlines()]
    _, step4 = ckpts(run)
    (step4 / "__0_0.distcp").unlink()
    with caplog.at_level(logging.WARNING, logger="mlet_dist"):
        metrics = train(config(run, base["data"], "--train.max_steps=6"))
    warned = [r.getMessage() for r in caplog.records if "falling back" in r.getMessage()]
    assert len(warned) == 1 and "__0_0.distcp is missing" in warned[0] and step4.name in warned[0]
    assert metrics["train"]["steps_this_run"] == 4  # from step 2, not 4
    # moved aside (kept, not deleted); the run's checkpoints are intact again
    assert (run / "checkpoints" / f"{step4.name}.damaged" / ".metadata").is_file()
    assert [p.name for p in ckpts(run)] == ["step_00000002", "step_00000006"]
    # steps 3 and 4 were retrained from step 2 exactly as the first time
    after = dict(map(tuple, metrics["train"]["loss_curve"]))
    for point in before:
        if point["step"] > 2:
            assert after[point["step"]] == point["loss"], point


def test_no_fallback_refuses_and_changes_nothing(base, tmp_path, capsys):
    run = copy_run(base, tmp_path)
    step4 = ckpts(run)[-1]
    (step4 / ".metadata").unlink()
    listing = sorted(p.relative_to(run) for p in (run / "checkpoints").rglob("*"))
    args = ["train", "--no-fallback", *overrides(run, base["data"], "--train.max_steps=6")]
    assert cli.main(args) == 2
    line = one_error_line(capsys)
    assert ".metadata is missing" in line and "--no-fallback" in line and str(step4) in line
    assert sorted(p.relative_to(run) for p in (run / "checkpoints").rglob("*")) == listing


def test_every_checkpoint_damaged_is_refused_without_moving_them(base, tmp_path):
    run = copy_run(base, tmp_path)
    for ckpt in ckpts(run):
        flip_bytes(ckpt / "__0_0.distcp")
    with pytest.raises(CheckpointError, match="has no intact checkpoint"):
        train(config(run, base["data"], "--train.max_steps=6"))
    assert len(ckpts(run)) == 2 and not list((run / "checkpoints").glob("*.damaged"))


def test_old_checkpoint_without_integrity_is_accepted_with_a_warning(base, tmp_path, caplog):
    run = copy_run(base, tmp_path)
    ckpt = ckpts(run)[-1]
    (ckpt / INTEGRITY_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="mlet_dist"):
        assert verify_checkpoint(ckpt, collective=False) is False
        load_unsharded(config(run, base["data"]), ckpt)
    assert any("not verified" in r.getMessage() for r in caplog.records)


def _verify_two_ranks(path: str) -> str:
    init_distributed(DistConfig(device="cpu"))
    try:
        verify_checkpoint(path)
    except CheckpointError as e:
        return str(e)
    return "verified"


@pytest.mark.slow
def test_ranks_agree_on_a_damage_only_one_of_them_checked(base, tmp_path):
    run = copy_run(base, tmp_path)
    ckpt = ckpts(run)[-1]
    names = sorted(json.loads((ckpt / INTEGRITY_FILE).read_text())["files"])
    assert names[1::2][0] == "__0_0.distcp"  # rank 1's share
    flip_bytes(ckpt / "__0_0.distcp")
    a, b = run_ranks(_verify_two_ranks, 2, str(ckpt), timeout=120)
    assert a == b and "__0_0.distcp does not match its CRC-32" in a


# ---------------------------------------------------------------- 9. loading never runs code


def test_plan_json_round_trip_matches_the_recorded_sharding(base):
    ckpt = ckpts(base["run"])[-1]
    data = json.loads((ckpt / "plan.json").read_text())
    plan = plan_from_json(data)
    assert plan_to_json(plan) == data
    recorded = json.loads((ckpt / "train_state.json").read_text())["sharding"]
    (module_plan,) = plan.plan.values()
    assert sorted(module_plan) == sorted(recorded)
    for table, ps in module_plan.items():
        shards = [
            [*m.shard_offsets, *m.shard_sizes, m.placement.rank()] for m in ps.sharding_spec.shards
        ]
        assert {"sharding_type": ps.sharding_type, "shards": shards} == recorded[table]
    # an older checkpoint's pickled plan.pt is read with the allow-list, to the same plan
    torch.save(plan, Path(base["root"]) / "plan.pt")
    assert _load_old_plan(Path(base["root"]) / "plan.pt") == plan


def test_crafted_plan_pt_is_refused(base, tmp_path):
    run = copy_run(base, tmp_path)
    ckpt = ckpts(run)[-1]
    (ckpt / "plan.json").unlink()
    (ckpt / INTEGRITY_FILE).unlink()  # an older checkpoint: plan.pt, no integrity record
    torch.save(Evil(), ckpt / "plan.pt")
    with pytest.raises(CheckpointError, match=r"plan.pt refers to posix.system") as e:
        train(config(run, base["data"], "--train.max_steps=6"))
    assert "docs/operations.md#trust" in str(e.value) and "\n" not in str(e.value)
    assert not MARKER.exists()


def test_crafted_dcp_metadata_is_refused(base, tmp_path, capsys):
    run = copy_run(base, tmp_path)
    ckpt = ckpts(run)[-1]
    (ckpt / ".metadata").write_bytes(pickle.dumps(Evil()))
    rewrite_integrity(ckpt)  # so that only the unpickler stands in the way
    assert cli.main(["collapse", "--run", str(run), "--out", str(tmp_path / "o")]) == 2
    line = one_error_line(capsys)
    assert f"{ckpt / '.metadata'} refers to posix.system" in line
    assert not MARKER.exists() and not (tmp_path / "o").exists()
    with pytest.raises(CheckpointError, match="refers to posix.system"):
        evaluate_run(run)
    assert not MARKER.exists()


def test_crafted_served_model_metadata_is_refused(base, tmp_path):
    served = tmp_path / "served"
    (served / "model").mkdir(parents=True)
    cfg = json.loads((base["run"] / "config.json").read_text())
    cfg["model"]["inner_dim"] = 0
    (served / "config.json").write_text(json.dumps(cfg))
    (served / "model" / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="refers to posix.system"):
        load_served(served)
    assert not MARKER.exists()


def test_crafted_non_tensor_value_is_refused(tmp_path):
    dcp.save({"w": torch.ones(3), "evil": Evil()}, checkpoint_id=str(tmp_path), no_dist=True)
    with pytest.raises(CheckpointError, match="evil needs posix.system"):
        dcp_load({"w": torch.zeros(3), "evil": None}, tmp_path, no_dist=True)
    assert not MARKER.exists()
    state = {"w": torch.zeros(3)}  # the rest of the checkpoint still loads
    dcp_load(state, tmp_path, no_dist=True)
    assert torch.equal(state["w"], torch.ones(3))


# ---------------------------------------------------------------- 5. finite or refused


def test_309_digit_integer_is_refused_naming_file_and_line(tmp_path):
    rng = np.random.default_rng(1)
    lines = [criteo_line(rng) for _ in range(5)]
    lines[2] = criteo_line(rng, dense0="9" * 309)
    path = tmp_path / "huge.tsv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CriteoFormatError) as e:
        read_criteo_tsv(path, SIZES)
    assert e.value.line == 3 and f"{path}, line 3: integer feature I1" in str(e.value)
    assert "309 significant digits, at most 38" in str(e.value)
    # preprocess, skip policy: the row is quarantined and every written value is finite
    out = tmp_path / "pq"
    summary = preprocess([path], out, PreprocessSettings(tuple(SIZES), on_bad_row="skip"), workers=1, progress=False)  # fmt: skip
    assert summary["rows"] == 4 and summary["bad_rows"] == 1
    table = pq.read_table(out / "train" / "huge.parquet")
    assert table.num_rows == 4
    for i in range(13):
        assert np.isfinite(table.column(f"int_{i}").to_numpy()).all()
    (quarantined,) = [
        json.loads(x) for f in out.rglob("*.jsonl") for x in f.read_text().splitlines()
    ]
    assert quarantined["line"] == 3 and "significant digits" in quarantined["reason"]
    with pytest.raises(CriteoFormatError, match="line 3: integer feature I1"):
        preprocess([path], tmp_path / "pq2", PreprocessSettings(tuple(SIZES)), workers=1, progress=False)  # fmt: skip


def test_training_stops_at_the_first_non_finite_loss(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(3)
    n = 256
    dense = rng.random((n, 13)).astype(np.float32)
    dense[2 * 32 + 5, 4] = np.inf  # a row of the third batch (no shuffling)
    rows = CriteoArrays(
        rng.integers(0, 2, n).astype(np.float32), dense, rng.integers(0, 50, (n, 26))
    )
    none = rows.slice(0, 0)
    monkeypatch.setattr("mlet_dist.train.run.load_splits", lambda *_: Splits(rows, none, none))
    run = tmp_path / "run"
    args = overrides(run, tmp_path / "unused.tsv", "--train.max_steps=6", "--data.shuffle=false")
    assert cli.main(["train", *args, "--train.checkpoint_every=1"]) == 2
    line = one_error_line(capsys)
    assert "training diverged: the loss is nan at step 3 (rank 0)" in line
    assert "the last checkpoint: step_00000002" in line
    assert [p.name for p in list_checkpoints(run)] == ["step_00000001", "step_00000002"]
    assert not (run / "checkpoints" / "step_00000003.tmp").exists()
    assert not (run / "metrics.json").exists()
    steps = [json.loads(x)["step"] for x in (run / "loss_curve.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    cfg = config(run, tmp_path / "unused.tsv")
    for value in load_unsharded(cfg, list_checkpoints(run)[-1]).state_dict().values():
        assert torch.isfinite(value).all()
    with pytest.raises(TrainingDiverged):  # the same through the API, from the checkpoint
        train(config(run, tmp_path / "unused.tsv", "--train.max_steps=6", "--data.shuffle=false"))


class _FakePredictor:
    """Probability 0.5 for every row, NaN for global row ``nan_row``."""

    def __init__(self, nan_row: int) -> None:
        self.nan_row, self.seen = nan_row, 0

    def __call__(self, dense, values, lengths):
        out = torch.full((dense.shape[0],), 0.5)
        k = self.nan_row - self.seen
        if 0 <= k < len(out):
            out[k] = float("nan")
        self.seen += len(out)
        return out


def _fake_serving(monkeypatch, nan_row: int) -> None:
    features = [f"cat_{j}" for j in range(26)]
    manifest = {
        "tables": [{"features": [f], "rows": 50} for f in features],
        "serving": {"feature_order": features, "dtype": "fp32"},
        "predictor_used": "export",
    }
    monkeypatch.setattr(
        "mlet_dist.predict_job.load_predictor",
        lambda *a, **k: (_FakePredictor(nan_row), manifest),
    )


def test_predict_refuses_to_write_nan(tmp_path, monkeypatch, capsys):
    _fake_serving(monkeypatch, nan_row=5)
    a, b = write_tsv(tmp_path / "a.tsv", 4), write_tsv(tmp_path / "b.tsv", 3, seed=1)
    out = tmp_path / "p.txt"
    serving = tmp_path / "serving"  # (faked) the output may not lie inside the serving directory
    args = ["predict", "--serving", str(serving), "--data", str(a), str(b), "--out", str(out)]
    assert cli.main([*args, "--batch-size", "2"]) == 2
    line = one_error_line(capsys)
    assert f"refusing to write {out}" in line and f"(first: {b}, data row 2)" in line
    assert "1 of 7 rows" in line
    assert not out.exists() and not list(tmp_path.glob("p.txt*"))
    _fake_serving(monkeypatch, nan_row=100)  # no NaN: written
    assert cli.main(args) == 0
    assert out.read_text().split() == ["0.5"] * 7


def test_predict_refuses_a_huge_integer_and_an_empty_file(tmp_path, monkeypatch, capsys):
    _fake_serving(monkeypatch, nan_row=-1)
    rng = np.random.default_rng(0)
    huge = tmp_path / "huge.tsv"
    huge.write_text(criteo_line(rng) + "\n" + criteo_line(rng, dense0="1" * 400) + "\n")
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    for data, needle in [(huge, f"{huge}, line 2: integer feature I1"), (empty, f"{empty}: the file is empty")]:  # fmt: skip
        out = tmp_path / "p.txt"
        serving = tmp_path / "serving"  # (faked) the output may not lie inside it
        args = ["predict", "--serving", str(serving), "--data", str(data), "--out", str(out)]
        assert cli.main(args) == 2
        assert needle in one_error_line(capsys)
        assert not out.exists()


# ---------------------------------------------------------------- 8. empty files, table sizes


def test_empty_training_file_is_named(tmp_path, capsys):
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    assert cli.main(["train", *overrides(tmp_path / "run", empty)]) == 2
    line = one_error_line(capsys)
    assert f"{empty}: the file is empty" in line and "fewer rows than one batch" not in line
    good = write_tsv(tmp_path / "good.tsv", 64)
    both = [f"--data.train_files=['{good}', '{empty}']"]
    assert cli.main(["train", *overrides(tmp_path / "run", good), *both]) == 2
    assert f"{empty}: the file is empty" in one_error_line(capsys)


def test_evaluate_refuses_an_empty_file_and_an_empty_split(base, tmp_path, capsys):
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    assert cli.main(["evaluate", "--run", str(base["run"]), "--data", str(empty)]) == 2
    assert f"{empty}: the file is empty" in one_error_line(capsys)
    assert cli.main(["evaluate", "--run", str(base["run"]), "--split", "test"]) == 2
    line = one_error_line(capsys)
    assert "the 'test' split of run" in line and "data.test_fraction = 0.0" in line
    assert not (base["run"] / "eval_files.json").exists()
    assert not (base["run"] / "eval_test.json").exists()


def test_wrong_number_of_table_sizes_is_refused_before_reading(tmp_path, monkeypatch, capsys):
    def no_reading(*_):
        raise AssertionError("data was read before the config was checked")

    monkeypatch.setattr("mlet_dist.train.run.load_splits", no_reading)
    run = tmp_path / "run"
    data = write_tsv(tmp_path / "d.tsv", 64)
    args = overrides(run, data, "--data.num_embeddings_per_feature=[50, 50, 50]")
    assert cli.main(["train", *args]) == 2  # a configuration error
    err = capsys.readouterr().err
    assert "data.num_embeddings_per_feature has 3 values, expected 26" in err
    assert "Traceback" not in err and not run.exists()
    with pytest.raises(ConfigError, match="has 25 values, expected 26"):
        preprocess_from_config(
            config(run, data, f"--data.num_embeddings_per_feature={[50] * 25}").data,
            out_dir=tmp_path / "pq",
        )
    assert not (tmp_path / "pq").exists()
