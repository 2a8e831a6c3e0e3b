"""TorchX components for mlet_dist jobs.

Each component returns a ``torchx.specs.AppDef`` built on TorchX's own ``dist.ddp`` component
(torchrun under the hood: c10d rendezvous, elastic restarts via ``max_retries``), running
``python -m mlet_dist <command>`` on every rank. The same command runs locally and on a cluster:

    torchx run -s local_cwd launch/components.py:train --config configs/synthetic_small.toml -j 1x2
    torchx run -s slurm     launch/components.py:train --config configs/criteo_1tb.toml -j 2x8 --gpu 8
    torchx run -s kubernetes launch/components.py:train --config configs/criteo_1tb.toml -j 2x8 \\
        --gpu 8 --image <your image with mlet_dist installed>

Config overrides go after ``--``, as on the mlet-dist command line, e.g.
``... train --config C -j 1x2 -- --train.max_steps=100 --model.inner_dim=128``.
"""

# typing.Optional/List/Dict (not `X | None`): TorchX's component linter only understands these.
from typing import Dict, List, Optional

from torchx import specs
from torchx.components import dist

DEFAULT_IMAGE = "ghcr.io/pytorch/torchx:0.7.0"


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
    rdzv_backend: str,
    rdzv_port: int,
    env: Optional[Dict[str, str]],
) -> specs.AppDef:
    return dist.ddp(
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
        env={"OMP_NUM_THREADS": "1", **(env or {})},
    )


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
    rdzv_backend: str = "c10d",
    rdzv_port: int = 29500,
    env: Optional[Dict[str, str]] = None,
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
        max_retries: restarts of the whole job on a failure (resumes from the last checkpoint)
        rdzv_backend: rendezvous backend (c10d, or etcd)
        rdzv_port: rendezvous port on the first node
        env: extra environment variables
    """
    return _job(
        ["train", "--config", config, *_overrides(overrides)],
        "mlet-train", j, image, cpu, gpu, memMB, h, max_retries, rdzv_backend, rdzv_port, env,
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
    rdzv_backend: str = "c10d",
    rdzv_port: int = 29500,
    env: Optional[Dict[str, str]] = None,
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
        max_retries: restarts of the whole job on a failure
        rdzv_backend: rendezvous backend
        rdzv_port: rendezvous port on the first node
        env: extra environment variables
    """
    return _job(
        ["collapse", "--run", run, "--out", out],
        "mlet-collapse", j, image, cpu, gpu, memMB, h, max_retries, rdzv_backend, rdzv_port, env,
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
        "mlet-preprocess", "1x1", image, cpu, 0, memMB, h, max_retries, "c10d", 29500, env,
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
        suite: train, collapse, loader or all
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
    return app
