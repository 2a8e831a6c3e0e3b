"""TorchX components for mlet_dist jobs.

Each component returns a ``torchx.specs.AppDef`` built on TorchX's own ``dist.ddp`` component
(torchrun under the hood: c10d rendezvous, restarts via ``max_restarts``/``max_retries``), running
``python -m mlet_dist <command>`` on every rank. The same command runs locally and on a cluster:

    torchx run -s local_cwd launch/components.py:train --config configs/synthetic_small.toml -j 1x2
    torchx run -s slurm     launch/components.py:train --config configs/criteo_1tb.toml -j 2x8 --gpu 8
    torchx run -s kubernetes launch/components.py:train --config configs/criteo_1tb.toml -j 2x8 \\
        --gpu 8 --image <your image with mlet_dist installed>

Config overrides go after ``--``, as on the mlet-dist command line, e.g.
``... train --config C -j 1x2 -- --train.max_steps=100 --model.inner_dim=128``.

The interpreter on the nodes: TorchX's ``dist.ddp`` runs ``torchrun``, which would have to be on
the job's PATH (``local_cwd`` inherits the PATH of ``torchx run``, so it fails unless the venv is
activated). These components run ``python -m torch.distributed.run`` instead, with the first of:
``$MLET_PYTHON`` (e.g. ``--env MLET_PYTHON=/opt/conda/bin/python``), ``.venv/bin/python`` in the
job's working directory (the environment of ``launch/setup.sh``: local_cwd from the checkout,
Slurm with ``job_dir`` = the checkout), ``python3`` on the PATH (container images).

Restarts: ``max_restarts`` restarts the workers of all nodes in place (torchrun's
``--max-restarts``, every scheduler, local_cwd included); ``max_retries`` resubmits the whole job
through the scheduler (Slurm requeue, Volcano; the local schedulers ignore it). Either way the
ranks resume the run directory's latest checkpoint.
"""

# typing.Optional/List/Dict (not `X | None`): TorchX's component linter only understands these.
from typing import Dict, List, Optional

from torchx import specs
from torchx.components import dist

DEFAULT_IMAGE = "ghcr.io/pytorch/torchx:0.7.0"

# Replaces the bare `torchrun` of dist.ddp's command (`$$` is TorchX's escape of a shell `$`).
_LAUNCHER = (
    'PY="$${MLET_PYTHON:-.venv/bin/python}"; command -v "$$PY" >/dev/null || PY=python3; '
    'exec "$$PY" -m torch.distributed.run'
)


def _use_python_launcher(app: specs.AppDef, max_restarts: int) -> specs.AppDef:
    """Runs torchrun as ``python -m torch.distributed.run --max_restarts N`` (see the module doc)."""
    if max_restarts < 0:
        raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
    for role in app.roles:
        if (
            role.entrypoint != "bash"
            or role.args[:1] != ["-c"]
            or not role.args[1].startswith("torchrun ")
        ):
            raise RuntimeError(
                f"unexpected dist.ddp role ({role.entrypoint} {role.args[:2]}): this TorchX "
                f"version builds its command differently; pin torchx 0.7 (launch/setup.sh)"
            )
        rest = role.args[1][len("torchrun") :]
        role.args[1] = f"{_LAUNCHER} --max_restarts {max_restarts}{rest}"
    return app


def _job(
    command: List[str],
    name: str,
    j: str,
    image: str,
    cpu: int,
    gpu: int,
    memMB: int,
    h: Optional[str],
    max_retries: int,
    max_restarts: int,
    rdzv_backend: str,
    rdzv_port: int,
    env: Optional[Dict[str, str]],
    mounts: Optional[List[str]],
) -> specs.AppDef:
    app = dist.ddp(
        *command,
        m="mlet_dist",
        name=name,
        image=image,
        j=j,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        h=h,
        max_retries=max_retries,
        rdzv_backend=rdzv_backend,
        rdzv_port=rdzv_port,
        # torchrun 2.13 keeps one TCPStore across in-place restarts, with the last attempt's keys
        # in it (the restarted process group hangs): a fresh store per round instead.
        env={"OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **(env or {})},
        mounts=mounts,
    )
    return _use_python_launcher(app, max_restarts)


def _overrides(overrides: tuple) -> List[str]:
    out = []
    for o in overrides:
        o = o if o.startswith("--") else f"--{o}"
        if "=" not in o or "." not in o.split("=", 1)[0]:
            raise ValueError(f"override '{o}' must look like --section.key=value")
        out.append(o)
    return out


def train(
    *overrides: str,
    config: str,
    j: str = "1x2",
    image: str = DEFAULT_IMAGE,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    max_retries: int = 0,
    max_restarts: int = 0,
    rdzv_backend: str = "c10d",
    rdzv_port: int = 29500,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Trains an MLET (or baseline) DLRM; resumes the run directory's latest checkpoint.

    Args:
        config: TOML config file (relative to the job's working directory)
        overrides: config overrides, after --: --section.key=value ...
        j: nodes x processes per node, e.g. 2x8 (elastic: 1:2x8)
        image: container image (ignored by local_cwd)
        cpu: CPUs per node
        gpu: GPUs per node (one process per GPU)
        memMB: memory per node in MB
        h: named resource (overrides cpu/gpu/memMB), e.g. aws_p4d.24xlarge
        max_retries: job resubmissions by the scheduler on a failure (Slurm, Kubernetes)
        max_restarts: in-place restarts of all workers by torchrun on a failure (any scheduler)
        rdzv_backend: rendezvous backend (c10d, or etcd)
        rdzv_port: rendezvous port on the first node
        env: extra environment variables
        mounts: volumes for container schedulers: type=volume,src=<PVC>,dst=/runs
    """
    return _job(
        ["train", "--config", config, *_overrides(overrides)],
        "mlet-train", j, image, cpu, gpu, memMB, h, max_retries, max_restarts, rdzv_backend,
        rdzv_port, env, mounts,
    )  # fmt: skip


def collapse(
    run: str,
    out: str,
    j: str = "1x1",
    image: str = DEFAULT_IMAGE,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    max_retries: int = 0,
    max_restarts: int = 0,
    rdzv_backend: str = "c10d",
    rdzv_port: int = 29500,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Collapses a trained run's factorized tables into the served model.

    Args:
        run: run directory of a training run
        out: output directory of the collapsed model
        j: nodes x processes per node
        image: container image (ignored by local_cwd)
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        h: named resource (overrides cpu/gpu/memMB)
        max_retries: resubmissions of the whole job by the scheduler on a failure
        max_restarts: in-place restarts of the workers by torchrun on a failure
        rdzv_backend: rendezvous backend
        rdzv_port: rendezvous port on the first node
        env: extra environment variables
        mounts: volumes for container schedulers, e.g. type=volume,src=<PVC>,dst=/runs
    """
    return _job(
        ["collapse", "--run-dir", run, "--out", out],
        "mlet-collapse", j, image, cpu, gpu, memMB, h, max_retries, max_restarts, rdzv_backend,
        rdzv_port, env, mounts,
    )  # fmt: skip


def preprocess(
    *overrides: str,
    config: str,
    image: str = DEFAULT_IMAGE,
    cpu: int = 16,
    memMB: int = 32768,
    h: Optional[str] = None,
    max_retries: int = 0,
    env: Optional[Dict[str, str]] = None,
) -> specs.AppDef:
    """Preprocesses raw Criteo day files to Parquet (one node; a process pool inside).

    Args:
        config: TOML config file
        overrides: config overrides, after --: --section.key=value ...
        image: container image (ignored by local_cwd)
        cpu: CPUs of the node (the process pool uses them)
        memMB: memory of the node in MB
        h: named resource (overrides cpu/memMB)
        max_retries: restarts on a failure (finished outputs are skipped)
        env: extra environment variables
    """
    return _job(
        ["preprocess", "--config", config, *_overrides(overrides)],
        "mlet-preprocess", "1x1", image, cpu, 0, memMB, h, max_retries, 0, "c10d", 29500, env,
        None,
    )  # fmt: skip


def benchmark(
    suite: str = "train",
    quick: bool = False,
    image: str = DEFAULT_IMAGE,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 16384,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
) -> specs.AppDef:
    """Runs a benchmark suite (python -m benchmarks.run) on one node.

    Args:
        suite: train, collapse, loader, serving or all
        quick: quick mode (small sizes)
        image: container image (ignored by local_cwd)
        cpu: CPUs of the node
        gpu: GPUs of the node
        memMB: memory of the node in MB
        h: named resource (overrides cpu/gpu/memMB)
        env: extra environment variables
    """
    args = ["--suite", suite, *(["--quick"] if quick else [])]
    app = dist.ddp(
        *args, m="benchmarks.run", name="mlet-benchmark", image=image, j="1x1", cpu=cpu,
        gpu=gpu, memMB=memMB, h=h, env=env,
    )  # fmt: skip
    return _use_python_launcher(app, 0)


def sweep(
    *overrides: str,
    config: str,
    sweep: str,
    work: str,
    stage: str = "all",
    shards: int = 1,
    jobs: int = 1,
    image: str = DEFAULT_IMAGE,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 16384,
    h: Optional[str] = None,
    max_retries: int = 0,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """MLET vs the tuned baseline over served d (``mlet-dist sweep``), as ``shards`` replicas.

    Replica i runs the runs with index % shards == i of the stage (``mlet-dist sweep --shard
    i/shards``: ``--shards N`` is how many replicas, ``--shard I/N`` which one); every
    run resumes from its result file, so retries and reruns skip finished runs. On a cluster run
    the stages in order, each as one job, with ``work`` on a filesystem all replicas share:
    ``--stage tune --shards 8``, then ``--stage frontier --shards 8``, then ``--stage report``
    (one replica). ``--stage all`` with one replica runs everything in one job.

    Args:
        config: TOML config file of the data and model (relative to the job's working directory)
        overrides: config overrides, after --: --section.key=value ...
        sweep: the sweep file (configs/sweep/*.toml), as `mlet-dist sweep --sweep`
        work: directory of the runs and the report (shared by the replicas)
        stage: all, tune, frontier or report
        shards: replicas (each a node running its share of the runs)
        jobs: runs at a time in each replica
        image: container image (ignored by local_cwd)
        cpu: CPUs per replica
        gpu: GPUs per replica
        memMB: memory per replica in MB
        h: named resource (overrides cpu/gpu/memMB)
        max_retries: resubmissions by the scheduler on a failure (finished runs are kept)
        env: extra environment variables
        mounts: volumes for container schedulers, e.g. type=volume,src=<PVC>,dst=/runs
    """
    if shards < 1 or jobs < 1:
        raise ValueError(f"shards and jobs must be >= 1, got {shards}, {jobs}")
    if stage not in ("all", "tune", "frontier", "report"):
        raise ValueError(f"stage must be all, tune, frontier or report, got {stage!r}")
    if stage in ("all", "report") and shards != 1:
        raise ValueError(f"--stage {stage} runs in one replica: use --shards 1")
    python = 'PY="$${MLET_PYTHON:-.venv/bin/python}"; command -v "$$PY" >/dev/null || PY=python3; '
    cmd = " ".join(
        [
            'exec "$$PY" -m mlet_dist sweep',
            f"--config {config} --sweep {sweep} --work {work} --stage {stage}",
            f"--shard {specs.macros.replica_id}/{shards} --jobs {jobs}",
            *_overrides(overrides),
        ]
    )
    resource = specs.resource(cpu=cpu, gpu=gpu, memMB=memMB, h=h)
    role = specs.Role(
        name="sweep",
        image=image,
        entrypoint="bash",
        args=["-c", python + cmd],
        num_replicas=shards,
        resource=resource,
        max_retries=max_retries,
        env={"OMP_NUM_THREADS": "1", **(env or {})},
        mounts=specs.parse_mounts(mounts) if mounts else [],
    )
    return specs.AppDef(name="mlet-sweep", roles=[role])
