"""Launching: TorchX, two nodes over a real network link, elastic restarts, SIGTERM.

Every job trains the same tiny config on 2 gloo ranks (a checkpoint every 5 steps, the loss logged
at every step, a warm-up so the LR still changes after a restart) for 44 steps, and must
reproduce an uninterrupted run of it **bit for bit**: the loss at every step of the run
directory's ``loss_curve.jsonl`` (kept across restarts) and the tables collapsed by
``mlet-dist collapse`` (for the 2-node job: every tensor of the final checkpoint, weights and
optimizer state).

- 2 nodes × 1 process: two network namespaces joined by a veth pair, one torchrun per namespace,
  c10d rendezvous and gloo across the link, vs ``torchrun --standalone --nproc-per-node 2``
  (skipped where namespaces cannot be created);
- ``MLET_FAULT_INJECT`` makes rank 1 raise after step 7; ``--max-restarts 1`` restarts both
  ranks from the step-5 checkpoint and they finish;
- ``torchx run -s local_cwd launch/components.py:train -j 1x2`` (the venv *not* on PATH) runs the
  reference of the SIGTERM test: SIGTERM to torchrun's process group while rank 0 is held at step
  9 makes every rank write the step-9 checkpoint and exit (143); the same command again finishes
  the job, in a process with another string hash seed, under which TorchRec's planner would
  shard the tables differently (table_column_wise instead of table_wise, refused on resume): the
  saved sharding plan is reused.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from mlet_dist.checkpoint import latest_checkpoint, list_checkpoints, read_train_state
from mlet_dist.config import load_config
from mlet_dist.distributed.elastic import (
    EXIT_CODE_STOPPED,
    FAULT_ENV,
    FaultSpec,
    read_loss_log,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SIZES = [40] * 26
STEPS = 44  # 2 epochs of 360 training rows / 16 per batch = 22 steps

CONFIG = """\
[data]
source = "synthetic"
dir = "{data}"
num_embeddings_per_feature = {sizes}
eval_fraction = 0.1
batch_size = 16
eval_batch_size = 64

[synthetic]
days = 1
rows_per_day = 400
cardinalities = {sizes}
gzip = false

[model]
embedding_dim = 8
inner_dim = 16
dense_arch_layer_sizes = [16, 8]
over_arch_layer_sizes = [16, 1]

[optim]
warmup_steps = 30

[train]
epochs = 2
log_every = 1
checkpoint_every = 5
progress = false

[dist]
device = "cpu"
sharding_types = {sharding}
"""
ROW_WISE = '["row_wise"]'
# Equal-cost options: TorchRec's planner picks by the order of a Python set of the type names,
# i.e. by the string hash seed: table_wise under PYTHONHASHSEED=1, table_column_wise under 2.
TIED = '["table_wise", "table_column_wise"]'


# -- helpers ---------------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without launcher variables, plus ``extra``."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", FAULT_ENV):
        env.pop(key, None)
    env.pop("MLET_LOG_ALL_RANKS", None)
    # torchrun 2.13 reuses its TCPStore across in-place restarts (see elastic.check_agent_store)
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    env.update(extra)
    return env


def torchrun_cmd(*launcher_args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher_args]


def train_args(config: Path, run_dir: Path) -> list[str]:
    return ["-m", "mlet_dist", "train", "--config", str(config), f"--train.run_dir={run_dir}"]


def run(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=timeout, start_new_session=True,
    )  # fmt: skip


def dcp_tensors(checkpoint: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """Every tensor a DCP checkpoint holds, read back in full and flattened to ``a.b.c``."""
    out = tmp / f"{checkpoint.parent.parent.name}_{checkpoint.name}_{secrets.token_hex(3)}.pt"
    dcp_to_torch_save(str(checkpoint), str(out))
    flat: dict[str, torch.Tensor] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(value, torch.Tensor):
            flat[prefix[:-1]] = value

    walk(torch.load(out, weights_only=False), "")
    return flat


def collapsed_tables(run_dir: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """``mlet-dist collapse --run RUN --out DIR``, then the served model's tensors."""
    from mlet_dist.cli import main

    out = tmp / f"served_{run_dir.name}"
    assert main(["collapse", "--run", str(run_dir), "--out", str(out)]) == 0
    tensors = dcp_tensors(out / "model", tmp)
    assert sum(".embedding_bags." in k for k in tensors) == 26, sorted(tensors)
    return tensors


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def assert_reference_curve(run_dir: Path, reference: list[tuple[int, float]]) -> None:
    curve = read_loss_log(run_dir)
    assert [s for s, _ in curve] == list(range(1, STEPS + 1))
    assert curve == reference  # bit-identical losses at every step


# -- the data, the configs and the uninterrupted references -------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """The tiny data set and its two configs: row-wise tables, and tied sharding options."""
    from mlet_dist.data import generate_synthetic

    root = tmp_path_factory.mktemp("launch")
    configs = {}
    for name, sharding in [("row_wise", ROW_WISE), ("tied", TIED)]:
        configs[name] = root / f"{name}.toml"
        configs[name].write_text(CONFIG.format(data=root / "data", sizes=SIZES, sharding=sharding))
    generate_synthetic(root / "data", load_config(configs["tied"], []).synthetic, progress=False)
    return {"root": root, **configs}


def reference(run_dir: Path, tmp: Path) -> dict[str, Any]:
    """An uninterrupted run's loss curve, collapsed tables and final checkpoint tensors."""
    curve = read_loss_log(run_dir)
    assert [s for s, _ in curve] == list(range(1, STEPS + 1))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["steps"] == STEPS and metrics["world_size"] == 2
    assert [tuple(p) for p in metrics["train"]["loss_curve"]] == curve  # one process: the same
    return {
        "run": run_dir,
        "curve": curve,
        "tables": collapsed_tables(run_dir, tmp),
        "final": dcp_tensors(latest_checkpoint(run_dir), tmp),
    }


@pytest.fixture(scope="module")
def row_wise_ref(data) -> dict[str, Any]:
    """``torchrun --standalone --nproc-per-node 2`` of the row-wise config."""
    run_dir = data["root"] / "row_wise_ref"
    proc = run(
        torchrun_cmd(
            "--standalone", "--nproc-per-node", "2", *train_args(data["row_wise"], run_dir)
        ),
        clean_env(),
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-6000:]
    return reference(run_dir, data["root"])


@pytest.fixture(scope="module")
def torchx_ref(data) -> dict[str, Any]:
    """``torchx run -s local_cwd launch/components.py:train -j 1x2`` of the tied config (hash
    seed 1), with neither torchrun nor the venv's python on PATH."""
    run_dir = data["root"] / "torchx_ref"
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(
        p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin
    )
    proc = run(
        [
            sys.executable, "-m", "torchx.cli.main", "run", "-s", "local_cwd",
            "-cfg", f"log_dir={data['root'] / 'torchx'}",
            "launch/components.py:train", "--config", str(data["tied"]), "-j", "1x2",
            "--env", "PYTHONHASHSEED=1", "--", f"--train.run_dir={run_dir}",
        ],
        clean_env(PATH=path),
        timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:]
    return {"stdout": proc.stdout, **reference(run_dir, data["root"])}


# -- TorchX -----------------------------------------------------------------------------------


def test_torchx_local_cwd_one_node_two_processes(torchx_ref):
    assert "Job finished: SUCCEEDED" in torchx_ref["stdout"], torchx_ref["stdout"][-6000:]
    state = read_train_state(latest_checkpoint(torchx_ref["run"]))
    assert state["world_size"] == 2 and state["step"] == STEPS
    assert {t["sharding_type"] for t in state["sharding"].values()} == {"table_wise"}  # seed 1


def test_torchx_component_command():
    """dist.ddp's bare `torchrun` is replaced by python -m torch.distributed.run with restarts."""
    sys.path.insert(0, str(REPO / "launch"))
    try:
        import components
    finally:
        sys.path.pop(0)
    app = components.train("--train.max_steps=3", config="c.toml", j="2x8", max_restarts=3)
    (role,) = app.roles
    assert role.entrypoint == "bash" and role.args[0] == "-c"
    cmd = role.args[1]
    assert "torchrun" not in cmd
    assert " -m torch.distributed.run --max_restarts 3 --rdzv_backend c10d " in cmd
    assert cmd.endswith("-m mlet_dist train --config c.toml --train.max_steps=3")
    assert role.env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert role.num_replicas == 2 and role.max_retries == 0
    # the interpreter: $MLET_PYTHON, else ./.venv/bin/python, else python3 (run the shell part)
    pick = cmd.replace("$$", "$").split(" -m torch.distributed.run")[0].replace("exec ", "echo ")
    for env, want in [({}, ".venv/bin/python"), ({"MLET_PYTHON": "/bin/sh"}, "/bin/sh")]:
        out = subprocess.run(
            ["bash", "-c", pick], cwd=REPO, env={"PATH": "/usr/bin:/bin", **env},
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert out.stdout.strip() == want
    out = subprocess.run(
        ["bash", "-c", pick], cwd="/", env={"PATH": "/usr/bin:/bin"}, capture_output=True,
        text=True, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "python3"  # no .venv in the working directory (an image)
    with pytest.raises(ValueError, match="--section.key=value"):
        components.train("max_steps=3", config="c.toml")


# -- two nodes, one network link --------------------------------------------------------------


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture
def netns_pair() -> Iterator[list[dict[str, str]]]:
    """Two network namespaces joined by a veth pair: ``[{ns, dev, addr}, {ns, dev, addr}]``.

    Names are unique per test run; the namespaces (and with them the veth pair) are deleted on
    teardown, also after a failure.
    """
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip` to create network namespaces")
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces (ip netns add)")
    tag = secrets.token_hex(3)
    subnet = f"10.231.{secrets.randbelow(250) + 1}"
    nodes = [
        {"ns": f"mlet-{tag}-{i}", "dev": f"vm{tag}{i}", "addr": f"{subnet}.{i + 1}"}
        for i in range(2)
    ]
    created: list[str] = []
    try:
        for n in nodes:
            _ip("netns", "add", n["ns"])
            created.append(n["ns"])
        _ip("link", "add", nodes[0]["dev"], "type", "veth", "peer", "name", nodes[1]["dev"])
        for n in nodes:
            _ip("link", "set", n["dev"], "netns", n["ns"])
            _ip("-n", n["ns"], "addr", "add", f"{n['addr']}/24", "dev", n["dev"])
            _ip("-n", n["ns"], "link", "set", "lo", "up")
            _ip("-n", n["ns"], "link", "set", n["dev"], "up")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        for ns in created:
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        stderr = getattr(e, "stderr", "") or ""
        pytest.skip(f"cannot create network namespaces here ({' '.join(e.cmd)}: {stderr.strip()})")
    try:
        yield nodes
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)


def test_two_nodes_over_a_veth_link_equal_one_node(data, row_wise_ref, netns_pair, tmp_path):
    """2 nodes x 1 process (c10d rendezvous and gloo over the link) == 1 node x 2 processes."""
    run_dir = tmp_path / "run"
    host, rdzv_id = netns_pair[0]["addr"], f"mlet-{secrets.token_hex(4)}"
    procs: list[subprocess.Popen] = []
    try:
        for i, node in enumerate(netns_pair):
            cmd = [
                "ip", "netns", "exec", node["ns"],
                *torchrun_cmd(
                    "--nnodes", "2", "--nproc-per-node", "1",
                    "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{host}:29400",
                    "--rdzv-id", rdzv_id,
                    "--rdzv-conf", f"is_host={int(i == 0)}",  # the endpoint is no hostname
                    "--local-addr", node["addr"],  # MASTER_ADDR: not the host's name
                    *train_args(data["row_wise"], run_dir),
                ),
            ]  # fmt: skip
            log = (tmp_path / f"node{i}.log").open("w")
            p = subprocess.Popen(
                cmd, cwd=REPO, env=clean_env(GLOO_SOCKET_IFNAME=node["dev"]), stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            procs.append(p)
        deadline = time.monotonic() + 240
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    logs = "\n".join((tmp_path / f"node{i}.log").read_text()[-4000:] for i in range(2))
    assert [p.returncode for p in procs] == [0, 0], logs
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["train"]["steps"] == STEPS
    assert_reference_curve(run_dir, row_wise_ref["curve"])
    final, ref_final = latest_checkpoint(run_dir), latest_checkpoint(row_wise_ref["run"])
    assert read_train_state(final)["sharding"] == read_train_state(ref_final)["sharding"]
    tensors = dcp_tensors(final, tmp_path)
    assert any("momentum1" in k for k in tensors)  # the fused optimizer state is compared too
    assert_same_tensors(tensors, row_wise_ref["final"])


# -- elastic restart after a fault ------------------------------------------------------------


def test_injected_fault_restarts_from_checkpoint_and_matches(data, row_wise_ref, tmp_path):
    run_dir = tmp_path / "run"
    proc = run(
        torchrun_cmd(
            "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
            *train_args(data["row_wise"], run_dir),
        ),
        clean_env(**{FAULT_ENV: "rank=1,step=7"}),
        timeout=240,
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, out[-6000:]
    assert "InjectedFault" in out and "resumed from" in out, out[-6000:]
    assert "step_00000005 at step 5" in out, out[-6000:]  # the restart point
    assert FaultSpec(1, 7).marker(run_dir).is_file()  # fired once, then skipped
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["steps"] == STEPS
    assert metrics["train"]["steps_this_run"] == STEPS - 5  # this process's part only
    assert_reference_curve(run_dir, row_wise_ref["curve"])
    assert_same_tensors(collapsed_tables(run_dir, tmp_path), row_wise_ref["tables"])


# -- SIGTERM ----------------------------------------------------------------------------------


def test_sigterm_checkpoints_every_rank_then_resume_matches(data, torchx_ref, tmp_path):
    run_dir = tmp_path / "run"
    held = FaultSpec(0, 9, "hang", timeout=120)  # rank 0 waits at step 9 for the signal
    cmd = torchrun_cmd("--standalone", "--nproc-per-node", "2", *train_args(data["tied"], run_dir))
    fault = {FAULT_ENV: f"rank=0,step=9,action=hang,timeout={held.timeout:g}"}
    with (tmp_path / "signalled.log").open("w") as log:
        p = subprocess.Popen(
            cmd, cwd=REPO, env=clean_env(PYTHONHASHSEED="1", **fault), stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 180
            while not held.marker(run_dir).exists():
                assert p.poll() is None, "the job ended before step 9"
                assert time.monotonic() < deadline, "step 9 was not reached"
                time.sleep(0.1)
            os.killpg(p.pid, signal.SIGTERM)  # torchrun's process group (the workers: its own)
            p.wait(timeout=60)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    out = (tmp_path / "signalled.log").read_text()
    assert p.returncode != 0, out[-6000:]
    for rank in (0, 1):
        assert f"[rank{rank}] WARNING mlet_dist.distributed.elastic: stopped after step 9" in out
    assert f"exiting with code {EXIT_CODE_STOPPED}" in out
    assert [c.name for c in list_checkpoints(run_dir)] == ["step_00000005", "step_00000009"]
    ckpt = latest_checkpoint(run_dir)
    state = read_train_state(ckpt)
    assert (state["step"], state["batch_in_epoch"], state["world_size"]) == (9, 9, 2)
    assert {f.name for f in ckpt.glob("*.distcp")} >= {"__0_0.distcp", "__1_0.distcp"}
    assert (ckpt / "plan.json").is_file()
    assert not (run_dir / "metrics.json").exists()
    assert [s for s, _ in read_loss_log(run_dir)] == list(range(1, 10))

    # The same command again (the fault already fired), in processes whose planner would choose
    # table_column_wise: the saved plan is reused, the job resumes step 9 and finishes.
    proc = run(cmd, clean_env(PYTHONHASHSEED="2", **fault), timeout=180)
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert "resuming with the sharding plan saved in step_00000009" in proc.stdout
    assert "step_00000009 at step 9" in proc.stdout, proc.stdout[-6000:]
    assert read_train_state(latest_checkpoint(run_dir))["sharding"] == state["sharding"]
    assert_reference_curve(run_dir, torchx_ref["curve"])
    assert_same_tensors(collapsed_tables(run_dir, tmp_path), torchx_ref["tables"])


# -- units of mlet_dist.distributed.elastic (in this process) ----------------------------------


def _one_rank():
    from mlet_dist.distributed.parallelize import DistEnv

    return DistEnv(0, 1, 0, 1, torch.device("cpu"), "gloo")


def test_fault_spec_parsing():
    from mlet_dist.config import ConfigError

    assert FaultSpec.parse("rank=1,step=7") == FaultSpec(1, 7, "raise", 300.0)
    assert FaultSpec.parse(" rank=0, step=3, action=hang, timeout=5 ") == FaultSpec(0, 3, "hang", 5)
    for bad, why in [
        ("rank=1", "rank and step are required"),
        ("rank=1,step=7,action=explode", "unknown action 'explode'"),
        ("rank=1,step=7,when=now", "bad item 'when=now'"),
        ("rank=one,step=7", "invalid literal"),
        ("rank=0,step=0", "step >= 1"),
    ]:
        with pytest.raises(ConfigError, match=why) as e:
            FaultSpec.parse(bad)
        assert "testing only" in str(e.value)


def test_guard_sigterm_loss_log_and_one_shot_fault(tmp_path, monkeypatch):
    from mlet_dist.distributed.elastic import (
        LOSS_LOG,
        InjectedFault,
        TrainingGuard,
        TrainingStopped,
    )

    (tmp_path / LOSS_LOG).write_text("".join(f'{{"step": {s}, "loss": 0.5}}\n' for s in range(9)))
    before = signal.getsignal(signal.SIGTERM)
    guard = TrainingGuard(tmp_path, _one_rank(), start_step=5)
    assert [s for s, _ in read_loss_log(tmp_path)] == [0, 1, 2, 3, 4, 5]  # later ones retrained
    guard.log_loss(6, 0.25)
    assert read_loss_log(tmp_path)[-1] == (6, 0.25)
    assert not guard.should_stop(6)
    os.kill(os.getpid(), signal.SIGTERM)  # handled: sets the flag only
    assert guard.stop_requested_locally and guard.should_stop(7)
    saved = []
    with pytest.raises(TrainingStopped) as e:
        guard.stop(7, save=lambda: saved.append(7) or tmp_path / "ckpt")
    assert e.value.code == EXIT_CODE_STOPPED == 143 and e.value.step == 7 and saved == [7]
    assert signal.getsignal(signal.SIGTERM) is before  # restored

    monkeypatch.setenv(FAULT_ENV, "rank=0,step=3")
    for attempt in range(2):
        guard = TrainingGuard(tmp_path, _one_rank(), start_step=0)
        assert guard.should_stop(2) is False
        if attempt == 0:
            with pytest.raises(InjectedFault, match="after step 3"):
                guard.should_stop(3)
        else:
            assert guard.should_stop(3) is False  # the marker exists: fired once only
        guard.close()
    assert FaultSpec(0, 3).marker(tmp_path).is_file()
    monkeypatch.setenv(FAULT_ENV, "rank=1,step=3")  # another rank's fault: nothing here
    TrainingGuard(tmp_path / "other", _one_rank()).should_stop(3)


def test_restart_on_a_shared_agent_store_fails_fast(monkeypatch):
    """A second attempt on the same store (what torchrun does) is refused with the fix."""
    import torch.distributed as dist

    from mlet_dist.config import ConfigError
    from mlet_dist.distributed.elastic import check_agent_store

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    for key, value in {
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "TORCHELASTIC_RESTART_COUNT": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(server.port),
        "WORLD_SIZE": "2",
    }.items():
        monkeypatch.setenv(key, value)
    check_agent_store()  # the two workers of the first attempt
    check_agent_store()
    with pytest.raises(ConfigError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        check_agent_store()  # a restarted worker
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # the fix: not checked
    check_agent_store()


def test_schedule_restores_on_a_rank_with_other_param_groups():
    """Rank 0's saved schedule (2 groups) restored on a rank with 3 groups: the LRs of an
    uninterrupted schedule at that step (the saved per-group lists would not even fit)."""
    from types import SimpleNamespace

    from mlet_dist.config import OptimConfig
    from mlet_dist.optim import lr_lambda
    from mlet_dist.train import Trainer

    cfg = OptimConfig(warmup_steps=10, decay_start_step=12, decay_steps=20)

    def job(lrs: list[float]) -> SimpleNamespace:
        groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
        opt = torch.optim.SGD(groups, lr=1.0)
        return SimpleNamespace(
            optimizer=opt, scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
        )

    rank0, uninterrupted, resumed = job([0.1, 0.2]), job([0.1, 0.2, 0.3]), job([0.1, 0.2, 0.3])
    for j in (rank0, uninterrupted):
        for _ in range(15):
            j.optimizer.step()
            j.scheduler.step()
    Trainer._restore_schedule(resumed, json.loads(json.dumps(rank0.scheduler.state_dict())))
    want = [g["lr"] for g in uninterrupted.optimizer.param_groups]
    assert [g["lr"] for g in resumed.optimizer.param_groups] == want
    assert resumed.scheduler.get_last_lr() == want and resumed.scheduler.last_epoch == 15
    for j in (resumed, uninterrupted):  # and the schedule goes on identically
        j.optimizer.step()
        j.scheduler.step()
    assert resumed.scheduler.get_last_lr() == uninterrupted.scheduler.get_last_lr()


def test_saved_plan_is_reused_only_where_it_fits(tmp_path):
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharding_spec import EnumerableShardingSpec
    from torchrec.distributed.types import (
        EmbeddingModuleShardingPlan,
        ParameterSharding,
        ShardingPlan,
    )

    from mlet_dist.checkpoint import PLAN_FILE, TRAIN_STATE, plan_to_json, saved_plan

    dist_cfg = {"device": "cpu", "sharding_types": ["table_wise"]}
    ckpt = tmp_path / "step_00000009"
    ckpt.mkdir()
    state = {"world_size": 2, "device": "cpu", "config": {"dist": dist_cfg}}
    (ckpt / TRAIN_STATE).write_text(json.dumps(state))
    assert saved_plan(ckpt, dist_cfg, 2, "cpu") is None  # no plan (an older checkpoint)
    spec = EnumerableShardingSpec([ShardMetadata([0, 0], [10, 4], "rank:1/cpu")])
    table = ParameterSharding("table_wise", "fused", [1], spec)
    plan = ShardingPlan({"model.ebc": EmbeddingModuleShardingPlan({"t_cat_0": table})})
    (ckpt / PLAN_FILE).write_text(json.dumps(plan_to_json(plan)))
    assert saved_plan(ckpt, dist_cfg, 2, "cpu") == plan
    assert saved_plan(ckpt, dist_cfg, 4, "cpu") is None  # another world size: plan anew
    assert saved_plan(ckpt, dist_cfg, 2, "cuda") is None
    assert saved_plan(ckpt, {**dist_cfg, "sharding_types": []}, 2, "cpu") is None
