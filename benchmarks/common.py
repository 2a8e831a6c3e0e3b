"""Shared pieces of the benchmarks: the benchmark config, the compared model variants, random
batches, the training step, memory counters, and the machine / library record of a result file.

The three variants are one code path (``mlet_dist.models.build_dlrm`` + ``Trainer``), changed only
through the config, as everywhere in mlet_dist:

- ``mlet``: W1 of width k, projected to d (``model.inner_dim = k``, ``model.embedding_dim = d``);
- ``plain_k``: ordinary tables of width k (``inner_dim = 0``, ``embedding_dim = k``): the same W1
  as MLET without the projection, and a DLRM whose interaction works on k-dim vectors;
- ``plain_d``: ordinary tables of width d (``inner_dim = 0``, ``embedding_dim = d``): what is
  served after collapse.

The bottom MLP must end with ``embedding_dim``, so its last size follows the variant's width.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import os
import platform
import re
import resource
import socket
import subprocess
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tomllib

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TRAIN_CONFIG = REPO / "configs" / "bench_train.toml"
DEFAULT_OUT = REPO / "benchmarks" / "results"
VARIANTS = ("mlet", "plain_k", "plain_d")


class BenchmarkError(RuntimeError):
    """A measuring process failed; the message holds the tail of its log."""


class BenchConfigError(ValueError):
    """A benchmark config or override is invalid; the message names the key and the fix."""


@dataclass
class BenchConfig:
    """The ``[bench]`` section of a benchmark config: what is measured and how often."""

    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    """Compared variants: 'mlet' (k -> d), 'plain_k' (plain tables of width k), 'plain_d' (width d)."""
    world_sizes: list[int] = field(default_factory=lambda: [1, 2])
    """Ranks to measure on CPU (one process per rank, gloo). On GPU: 1 and all visible GPUs."""
    repeats: int = 3
    """Fresh processes per (variant, world size), run interleaved (v1 v2 v3 v1 v2 v3 ...)."""
    warmup_steps: int = 10
    """Untimed training steps before timing (allocator, thread pools, optimizer state)."""
    windows: int = 5
    """Timed windows per process; each gives one throughput sample (median taken)."""
    steps_per_window: int = 10
    """Training steps per timed window."""
    batches: str = "uniform"
    """'uniform': ``distinct_batches`` random batches per rank (ids uniform over each table),
    cycled; 'zipf': a fresh batch for every step, never reused, drawn from the synthetic
    generator (``[synthetic]``: Zipf ids, teacher labels) before timing (benchmarks/traffic.py)."""
    distinct_batches: int = 8
    """Random batches generated per rank and cycled through (``batches = 'uniform'``)."""
    ids_per_bag: list[int] = field(default_factory=list)
    """Multi-hot bags (``batches = 'zipf'``): ids per bag of each of the 26 features, or one
    value for all; [] = one id per bag. DLRMv2's synthetic multi-hot Criteo:
    [3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1]."""
    axes: dict[str, list[str]] = field(default_factory=dict)
    """Config keys compared within one run, e.g. {"train.pipeline" = ["base", "sparse_dist"],
    "model.w1_dtype" = ["fp32", "fp16"]}: the reference point sets every axis to its first
    value; each other value is measured with only its own axis changed, and reported as a ratio
    to the reference (value / first value). Values are written as on the command line."""
    threads: int = 0
    """Intra-op threads per rank on CPU; 0 = cores // ranks."""
    seed: int = 0
    """Seed of the random batches."""
    timeout_s: float = 900.0
    """Time limit of one measuring process."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables of the measuring processes, e.g. glibc's allocator settings
    {MALLOC_MMAP_THRESHOLD_ = "33554432", MALLOC_TRIM_THRESHOLD_ = "17179869184"}, which keep the
    large per-step tensors from being unmapped and page-faulted in again every step."""


def _check(where: str, value: Any, tp: Any) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typing.get_origin(tp) is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise BenchConfigError(f"{where}: expected a table {{key = value}}, got {value!r}")
        return {
            _check(f"{where} key", k, key_tp): _check(f"{where}.{k}", v, val_tp)
            for k, v in value.items()
        }
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise BenchConfigError(f"{where}: expected a list, got {value!r}")
        return [_check(f"{where}[{i}]", v, item) for i, v in enumerate(value)]
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise BenchConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _set_bench(bench: BenchConfig, key: str, value: Any, origin: str) -> None:
    hints = typing.get_type_hints(BenchConfig)
    if key not in hints:
        raise BenchConfigError(
            f"{origin}: unknown key 'bench.{key}'; valid keys of [bench]: {', '.join(hints)}"
        )
    setattr(bench, key, _check(f"{origin}: bench.{key}", value, hints[key]))


def _validate_bench(bench: BenchConfig) -> None:
    bad = sorted(set(bench.variants) - set(VARIANTS))
    if bad or not bench.variants:
        raise BenchConfigError(
            f"bench.variants = {bench.variants}: use a non-empty subset of {list(VARIANTS)}"
        )
    if not bench.world_sizes or any(w < 1 for w in bench.world_sizes):
        raise BenchConfigError(f"bench.world_sizes must be positive, got {bench.world_sizes}")
    for key in ("repeats", "windows", "steps_per_window", "distinct_batches"):
        if getattr(bench, key) < 1:
            raise BenchConfigError(f"bench.{key} must be at least 1, got {getattr(bench, key)}")
    if bench.warmup_steps < 0 or bench.threads < 0:
        raise BenchConfigError("bench.warmup_steps and bench.threads must be >= 0")
    if bench.batches not in ("uniform", "zipf"):
        raise BenchConfigError(f"bench.batches = {bench.batches!r}: use 'uniform' or 'zipf'")
    if bench.ids_per_bag and bench.batches != "zipf":
        raise BenchConfigError("bench.ids_per_bag (multi-hot) needs bench.batches = 'zipf'")
    if len(bench.ids_per_bag) not in (0, 1, 26) or any(n < 1 for n in bench.ids_per_bag):
        raise BenchConfigError(
            f"bench.ids_per_bag = {bench.ids_per_bag}: give 26 positive counts (one per "
            "feature), one for all features, or [] for one id per bag"
        )
    for key, values in bench.axes.items():
        if len(values) < 2 or len(set(values)) != len(values):
            raise BenchConfigError(
                f"bench.axes['{key}'] = {values}: give two or more distinct values, the "
                "reference first"
            )


def check_axes(cfg, bench: BenchConfig) -> None:
    """Refuses an axis whose key this mlet_dist's config lacks, or a value it rejects.

    Raises:
        BenchConfigError: naming the axis and the fix.
    """
    from mlet_dist.config import ConfigError, apply_overrides

    for key, values in bench.axes.items():
        section, _, name = key.partition(".")
        part = getattr(cfg, section, None)
        if section == "bench" or not dataclasses.is_dataclass(part) or not hasattr(part, name):
            known = ", ".join(f.name for f in dataclasses.fields(part)) if part else "none"
            raise BenchConfigError(
                f"bench.axes: '{key}' is not a key of this mlet_dist's config (keys of "
                f"[{section}]: {known}); the axis needs the change that adds the key (issue 13), "
                "or remove it from bench.axes"
            )
        for value in values:
            try:
                apply_overrides(copy.deepcopy(cfg), [f"--{key}={value}"])
            except ConfigError as e:
                raise BenchConfigError(f"bench.axes['{key}'] value {value!r}: {e}") from e


def axis_points(bench: BenchConfig) -> list[tuple[str, str] | None]:
    """The measured points: None (the reference: every axis at its first value), then
    ``(key, value)`` for each further value of each axis."""
    return [None] + [(k, v) for k, values in bench.axes.items() for v in values[1:]]


def point_label(point: tuple[str, str] | None) -> str:
    """'' for the reference, else 'key=value'."""
    return "" if point is None else f"{point[0]}={point[1]}"


def point_config(cfg, variant: str, bench: BenchConfig, point: tuple[str, str] | None):
    """The config of one variant at one point: :func:`variant_config`, then every axis at its
    reference value, then the point's own value."""
    from mlet_dist.config import apply_overrides

    out = variant_config(cfg, variant)
    overrides = [f"--{k}={values[0]}" for k, values in bench.axes.items()]
    if point is not None:
        overrides.append(f"--{point[0]}={point[1]}")
    return apply_overrides(out, overrides)


def load_bench_config(
    path: str | Path = DEFAULT_TRAIN_CONFIG, overrides: list[str] | None = None, quick: bool = False
):
    """Loads a benchmark config: the mlet_dist sections, ``[bench]`` and ``[quick.*]``.

    The file is an ordinary mlet_dist config (``[data]``, ``[model]``, ``[optim]``, ``[dist]`` ...)
    plus a ``[bench]`` section (:class:`BenchConfig`) and ``[quick.<section>]`` tables whose keys
    replace the others in quick mode. Command-line overrides (``--section.key=value``, also
    ``--bench.key=value``) come last.

    Args:
        path: the TOML file.
        overrides: ``--section.key=value`` strings.
        quick: apply the file's ``[quick.*]`` tables.

    Returns:
        ``(Config, BenchConfig)``.

    Example::

        cfg, bench = load_bench_config("configs/bench_train.toml", ["--bench.repeats=1"], quick=True)
    """
    from mlet_dist.config import apply_overrides, config_from_dict, parse_overrides

    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as e:
        raise BenchConfigError(f"benchmark config {path} does not exist") from e
    quick_tables = raw.pop("quick", {})
    if quick:
        for section, table in quick_tables.items():
            raw.setdefault(section, {}).update(table)
    bench = BenchConfig()
    for key, value in raw.pop("bench", {}).items():
        _set_bench(bench, key, value, str(path))
    cfg = config_from_dict(raw, origin=str(path))
    rest = []
    for (section, key, value), text in zip(parse_overrides(overrides or []), overrides or []):
        if section == "bench":
            _set_bench(bench, key, value, "command line")
        else:
            rest.append(text)
    apply_overrides(cfg, rest)
    _validate_bench(bench)
    check_axes(cfg, bench)
    return cfg, bench


def variant_config(cfg, variant: str):
    """The config of one compared variant (see the module docstring).

    Args:
        cfg: the benchmark's base config (MLET: ``model.inner_dim`` = k, ``embedding_dim`` = d).
        variant: 'mlet', 'plain_k' or 'plain_d'.
    """
    from mlet_dist.config import validate

    k, d = cfg.model.inner_dim, cfg.model.embedding_dim
    if not k:
        raise BenchConfigError("the benchmark config needs model.inner_dim = k > 0 (MLET)")
    out = copy.deepcopy(cfg)
    m = out.model
    if variant == "plain_k":
        m.inner_dim, m.embedding_dim = 0, k
    elif variant == "plain_d":
        m.inner_dim, m.embedding_dim = 0, d
    elif variant != "mlet":
        raise BenchConfigError(f"unknown variant {variant!r}; use one of {list(VARIANTS)}")
    m.inner_dim_per_table = {}
    m.dense_arch_layer_sizes = [*m.dense_arch_layer_sizes[:-1], m.embedding_dim]
    validate(out)
    return out


def variant_label(cfg, variant: str) -> str:
    """'MLET(64,16)', 'EBC(64)', 'EBC(16)'."""
    k, d = cfg.model.inner_dim, cfg.model.embedding_dim
    return {"mlet": f"MLET({k},{d})", "plain_k": f"EBC({k})", "plain_d": f"EBC({d})"}[variant]


# -- data and the training step ------------------------------------------------------------------


def random_batches(cfg, n: int, batch_size: int, seed: int) -> list[Any]:
    """``n`` TorchRec batches of ``batch_size`` random rows (ids uniform over each table)."""
    from mlet_dist.data import CriteoArrays, to_batch

    rng = np.random.default_rng(seed)
    sizes = np.asarray(cfg.data.num_embeddings_per_feature, dtype=np.int64)
    out = []
    for _ in range(n):
        arrays = CriteoArrays(
            labels=rng.integers(0, 2, batch_size).astype(np.float32),
            dense=rng.random((batch_size, 13), dtype=np.float32),
            sparse=(rng.random((batch_size, len(sizes))) * sizes).astype(np.int64),
        )
        out.append(to_batch(arrays))
    return out


def train_step(trainer, batch) -> Any:
    """One training step exactly as ``Trainer.fit`` runs it; returns the model's output
    ``(loss, logits, labels[, weights])``, detached."""
    loss, output = trainer.model(batch.to(trainer.env.device, non_blocking=True))
    loss.backward()
    trainer.optimizer.step()
    trainer.scheduler.step()
    # Trainer._sync_fused_lr: push the scheduled LR into fbgemm's kernels before the next backward.
    trainer.model.fused_optimizer.step()
    trainer.optimizer.zero_grad()
    return output


# -- rank processes ------------------------------------------------------------------------------

# Launcher variables of an outer torchrun/TorchX job that must not leak into the rank processes.
_LAUNCH_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(
    args_of_rank: Callable[[int], list[str]],
    world_size: int,
    threads: int,
    timeout_s: float,
    log_prefix: Path,
    what: str,
    extra_env: dict[str, str] | None = None,
) -> None:
    """Runs ``python <args_of_rank(r)>`` as ``world_size`` fresh rank processes and waits.

    Each rank gets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (a free local port)
    as under torchrun, so ``init_distributed`` joins the group, ``OMP_NUM_THREADS=threads`` and
    ``extra_env``. Its output goes to ``<log_prefix>_<rank>.txt``.

    Raises:
        BenchmarkError: a rank exited with an error or the time ran out; the message has the tail
            of every rank's log. The other ranks are killed.
    """
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env.update(
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        OMP_NUM_THREADS=str(threads),
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    env.update(extra_env or {})
    procs, logs = [], []
    for rank in range(world_size):
        log = Path(f"{log_prefix}_{rank}.txt")
        with open(log, "w") as log_file:
            procs.append(
                subprocess.Popen(
                    [sys.executable, *args_of_rank(rank)],
                    cwd=REPO,
                    env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                )
            )
        logs.append(log)
    deadline = time.monotonic() + timeout_s
    failed = None
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                failed = f"timed out after {timeout_s:.0f} s"
                break
            bad = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
            if bad:
                failed = f"rank {bad[0]} exited with code {procs[bad[0]].returncode}"
                break
            time.sleep(0.05)
        else:
            bad = [r for r, p in enumerate(procs) if p.returncode != 0]
            if bad:
                failed = f"rank {bad[0]} exited with code {procs[bad[0]].returncode}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    if failed is not None:
        tails = "\n".join(
            f"--- rank {r} log ({log}):\n" + "\n".join(log.read_text().splitlines()[-25:])
            for r, log in enumerate(logs)
        )
        raise BenchmarkError(f"{what} failed: {failed}\n{tails}")


# -- memory ------------------------------------------------------------------------------------


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far: Linux's VmHWM, else ru_maxrss (KiB on
    Linux, bytes on macOS). Not ru_maxrss on Linux: a process started by fork + exec (spawned
    ranks) inherits its parent's high-water mark there, so it would report the parent's RSS."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def local_tensor_bytes(value: Any) -> int:
    """Bytes this rank holds for a tensor, ShardedTensor or DTensor (its local shards)."""
    import torch

    if hasattr(value, "local_shards"):
        return sum(local_tensor_bytes(s.tensor) for s in value.local_shards())
    if hasattr(value, "to_local"):
        return local_tensor_bytes(value.to_local())
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return 0


# -- machine and versions ----------------------------------------------------------------------


def git_output(*args: str, default: str = "") -> str:
    """``git ARGS`` in this checkout, stripped; ``default`` where git fails or is absent."""
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return default


def machine_info() -> dict[str, Any]:
    """Cores, CPU model, memory and GPUs of this machine."""
    import torch

    cpu_model = platform.processor()
    cpu: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "vendor_id", "cpu family", "model", "flags"):
                cpu.setdefault(key, value.strip())
            elif not line.strip() and cpu:
                break  # the first processor's block is enough
    except OSError:
        pass
    cpu_model = cpu.get("model name", cpu_model)
    mem = 0
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        pass
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"name": p.name, "memory_bytes": p.total_memory})
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "cpu_model": cpu_model,
        # A virtual machine's model name can be generic ("Intel Xeon Processor"): family, model
        # and the vector extensions name the microarchitecture the kernels ran on.
        "cpu_id": {
            "vendor": cpu.get("vendor_id"),
            "family": cpu.get("cpu family"),
            "model": cpu.get("model"),
            "vector_flags": sorted(
                f for f in cpu.get("flags", "").split() if f.startswith(("avx", "amx", "fma"))
            ),
        },
        "memory_bytes": mem,
        "gpus": gpus,
        "cuda_driver": _nvidia_driver() if gpus else None,
    }


def _nvidia_driver() -> str | None:
    try:
        return Path("/proc/driver/nvidia/version").read_text().split("Kernel Module")[1].split()[0]
    except (OSError, IndexError):
        return None


def library_versions() -> dict[str, str | None]:
    """Versions of python, torch, torchrec, fbgemm_gpu (and numpy, CUDA) in this process."""
    import importlib.metadata as md

    import torch

    def dist_version(*names: str) -> str | None:
        for n in names:
            try:
                return md.version(n)
            except md.PackageNotFoundError:
                continue
        return None

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchrec": dist_version("torchrec"),
        "fbgemm_gpu": dist_version("fbgemm-gpu", "fbgemm-gpu-cpu", "fbgemm_gpu"),
        "numpy": np.__version__,
        "cuda": torch.version.cuda,
    }


def hardware_tag(machine: dict[str, Any] | None = None) -> str:
    """'cpu2' (2 cores, no GPU) or 'h100x1', 'a100x8' (GPU model and count)."""
    machine = machine or machine_info()
    gpus = machine["gpus"]
    if not gpus:
        return f"cpu{machine['cores']}"
    name = gpus[0]["name"]
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Za-z]?)\b", name)
    model = (m.group(1) if m else re.sub(r"[^A-Za-z0-9]+", "", name)).lower()
    return f"{model}x{len(gpus)}"


def result_stem(suite: str, tag: str, quick: bool, when: datetime.date | None = None) -> str:
    """'train_cpu2_2026-11-21'; quick runs 'train-quick_cpu2_2026-11-21' (as collapse_bench)."""
    when = when or datetime.date.today()
    return f"{suite}{'-quick' if quick else ''}_{tag}_{when.isoformat()}"


def config_record(cfg, bench: BenchConfig | None = None) -> dict[str, Any]:
    out = cfg.to_dict()
    if bench is not None:
        out["bench"] = dataclasses.asdict(bench)
    return out
