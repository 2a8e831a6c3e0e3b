"""Fault tolerance of the training loop: stop with a checkpoint on SIGTERM, restarts, fault tests.

The launcher (``torchrun --max-restarts N``, TorchX ``max_restarts``/``max_retries``) restarts a
failed job; the restarted ranks resume the run directory's latest checkpoint. This module adds
what the loop itself needs, in one object created by ``Trainer.fit`` (:class:`TrainingGuard`):

- **SIGTERM → checkpoint → exit.** A SIGTERM handler sets a flag on the rank that got it. Every
  ``train.sync_every`` steps (and before every checkpoint, logged loss and the last step) all
  ranks agree on the flags (:meth:`TrainingGuard.agree`: one all-reduce of three ints, on a
  CPU/gloo group so a GPU job does not sync its stream), so every rank stops after *the same*
  step (up to ``sync_every - 1`` steps after the signal), they write a checkpoint together
  and exit with :data:`EXIT_CODE_STOPPED` (143 = 128 + SIGTERM, the code of a process ended by
  SIGTERM): the job counts as interrupted, not finished, so a scheduler with retries (Slurm
  requeue, Volcano, ``torchx ... max_retries``) runs it again and it resumes. torchrun forwards
  its SIGTERM to the workers and kills them ``--shutdown-timeout`` seconds later (default 30):
  that must cover ``sync_every`` steps plus writing a checkpoint.
- **The whole loss curve across restarts.** Rank 0 appends ``{"step", "loss"}`` lines to
  ``RUN/loss_curve.jsonl`` at every logged step; a resumed run first drops the lines after its
  checkpoint's step (they were trained again), so the file always holds the curve of the
  training that the latest checkpoint continues. ``metrics.json`` holds the current process's
  part only.
- **Fault injection, for tests only.** ``MLET_FAULT_INJECT="rank=1,step=7"`` makes rank 1 fail
  right after step 7 (before that step's checkpoint). It fires once per run directory: the rank
  first creates the marker file ``RUN/fault_injected.rank1.step7`` and skips the fault when the
  marker exists (a restarted job sees it and trains on). Delete the marker to arm it again.
  Keys: ``rank``, ``step``, ``action`` (``raise``: an :class:`InjectedFault` exception, the
  default; ``kill``: the rank SIGKILLs itself, like an OOM kill; ``hang``: the rank stops making
  progress until it gets SIGTERM, or ``timeout`` seconds pass (default 300), then goes on; with
  SIGTERM that is a stop at exactly that step, which is how tests signal a job at a known step)
  and ``timeout``.

Example::

    MLET_FAULT_INJECT="rank=1,step=7" torchrun --nproc-per-node 2 --max-restarts 1 \\
        -m mlet_dist train --config C --train.checkpoint_every=5
    # rank 1 raises after step 7; torchrun restarts both ranks; they resume step 5 and finish
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from mlet_dist.config import ConfigError
from mlet_dist.distributed.parallelize import DistEnv
from mlet_dist.utils.files import atomic_write_text

logger = logging.getLogger(__name__)

FAULT_ENV = "MLET_FAULT_INJECT"
LOSS_LOG = "loss_curve.jsonl"
EXIT_CODE_STOPPED = 128 + signal.SIGTERM  # 143: what a shell reports for a SIGTERM'ed process
FAULT_ACTIONS = ("raise", "kill", "hang")


class InjectedFault(RuntimeError):
    """The failure asked for by ``MLET_FAULT_INJECT`` (testing only)."""


class TrainingStopped(SystemExit):
    """Raised by every rank after the checkpoint written on a stop signal; exits with code 143."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        super().__init__(EXIT_CODE_STOPPED)
        self.step = step
        self.checkpoint = checkpoint


# -- fault injection (testing only) -------------------------------------------------------------


@dataclass(frozen=True)
class FaultSpec:
    """One injected fault: ``action`` on ``rank`` right after it finished ``step``."""

    rank: int
    step: int
    action: str = "raise"
    timeout: float = 300.0

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        """Parses ``"rank=1,step=7[,action=raise|kill|hang][,timeout=300]"``.

        Raises:
            ConfigError: an unknown or missing key, or a bad value (the message shows the format).
        """
        usage = (
            f'{FAULT_ENV}="{text}": expected "rank=R,step=S[,action=raise|kill|hang][,timeout=SEC]" '
            f"(testing only; unset it for real runs)"
        )
        fields: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key.strip() not in ("rank", "step", "action", "timeout"):
                raise ConfigError(f"{usage}; bad item {part!r}")
            fields[key.strip()] = value.strip()
        if "rank" not in fields or "step" not in fields:
            raise ConfigError(f"{usage}; rank and step are required")
        action = fields.get("action", "raise")
        if action not in FAULT_ACTIONS:
            raise ConfigError(f"{usage}; unknown action {action!r}")
        try:
            spec = cls(
                int(fields["rank"]), int(fields["step"]), action, float(fields.get("timeout", 300))
            )
        except ValueError as e:
            raise ConfigError(f"{usage}; {e}") from e
        if spec.rank < 0 or spec.step < 1:
            raise ConfigError(f"{usage}; rank must be >= 0 and step >= 1")
        return spec

    def marker(self, run_dir: str | Path) -> Path:
        return Path(run_dir) / f"fault_injected.rank{self.rank}.step{self.step}"


# -- the guard used by the training loop ---------------------------------------------------------


class TrainingGuard:
    """Stop-on-SIGTERM, the loss log and fault injection of one ``Trainer.fit`` call.

    Collective: every rank creates it; after every step each rank calls either
    :meth:`check_fault` (local) or, at the same agreement steps on every rank (the training loop
    picks them: every ``train.sync_every`` steps, before a save or logged loss, the last step and
    :attr:`fault_step`), :meth:`agree` (the all-reduce of the stop and non-finite-loss flags;
    :meth:`should_stop` is the flag-only form, for a loop that agrees after every step). The
    SIGTERM handler is installed only in the main thread and restored by :meth:`close` (a fit
    that raises leaves it installed; its process is failing).

    Args:
        run_dir: the run directory (loss log, fault markers).
        env: this process's rank and world.
        start_step: the step training starts from (the resumed checkpoint's, or 0); rank 0 cuts
            the loss log back to it.
        signals: the signals that request a stop.

    Example::

        guard = TrainingGuard(run_dir, env, start_step=trainer.step)
        for ...:  # one training step
            guard.log_loss(step, loss)
            if guard.should_stop(step):  # or, every N steps: stop, rank, bad = guard.agree(...)
                guard.stop(step, save=trainer.save)  # collective save, raises TrainingStopped
        guard.close()
    """

    def __init__(
        self,
        run_dir: str | Path,
        env: DistEnv,
        start_step: int = 0,
        signals: tuple[signal.Signals, ...] = (signal.SIGTERM,),
    ) -> None:
        self.run_dir = Path(run_dir)
        self.env = env
        self._flag = False
        self._signum: int | None = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for s in signals:
                self._previous[s] = signal.signal(s, self._on_signal)
        else:
            logger.debug("not in the main thread: %s handler not installed", signals)
        self._group = flag_group(env)
        text = os.environ.get(FAULT_ENV, "").strip()
        spec = FaultSpec.parse(text) if text else None
        self.fault = spec if spec is not None and spec.rank == env.rank else None
        # Every rank parses the same spec: the fault's step is an agreement step on all ranks,
        # so a rank held there ("hang") and signalled stops all ranks at exactly that step.
        self.fault_step = spec.step if spec is not None else None
        self._loss_log = self.run_dir / LOSS_LOG
        if env.is_rank0:
            self._truncate_loss_log(start_step)

    # signals ---------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self._flag:
            # Logging from a signal handler is safe enough here: the main thread runs it.
            logger.warning(
                "got %s: will write a checkpoint after the current step and stop",
                signal.Signals(signum).name,
            )
        self._flag = True
        self._signum = signum

    @property
    def stop_requested_locally(self) -> bool:
        """Whether this rank got a stop signal (no collective)."""
        return self._flag

    def should_stop(self, step: int) -> bool:
        """Collective, after every step: fires an injected fault, then agrees on the stop flags.

        Returns True on every rank when any rank got a stop signal.
        """
        if self.fault is not None and step == self.fault.step:
            self._inject(self.fault)
        if self.env.world_size == 1:
            return self._flag
        flag = torch.tensor([1 if self._flag else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())

    def check_fault(self, step: int) -> None:
        """Local, after every step: fires this rank's injected fault of ``step``."""
        if self.fault is not None and step == self.fault.step:
            self._inject(self.fault)

    def agree(self, step: int, bad_step: int) -> tuple[bool, int, int]:
        """Collective: one all-reduce of the stop flags and the first non-finite loss step.

        Args:
            step: the step just trained (this rank's fault of it fires first).
            bad_step: this rank's first step with a non-finite loss since the last agreement
                (0: none).

        Returns:
            (stop, rank, bad_step): whether any rank got a stop signal; the rank with a
            non-finite loss (-1: none) and the earliest such step.
        """
        self.check_fault(step)
        none = -(2**31 - 1)  # MAX-reduced: -step gives the earliest step
        flags = torch.tensor(
            [
                int(self._flag),
                self.env.rank + 1 if bad_step else 0,
                -bad_step if bad_step else none,
            ],
            dtype=torch.int64,
        )
        if self.env.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
        stop, rank, neg = (int(v) for v in flags)
        return bool(stop), rank - 1, (-neg if rank else 0)

    def stop(self, step: int, save: Callable[[], Path] | None) -> None:
        """Writes the checkpoint of ``step`` (collectively, unless ``save`` is None because it
        was just written), restores the signal handlers and raises :class:`TrainingStopped`."""
        checkpoint = save() if save is not None else None
        logger.warning(
            "stopped after step %d on a stop signal; checkpoint %s; exiting with code %d "
            "(resume by running the same command again)",
            step,
            checkpoint or "of this step already written",
            EXIT_CODE_STOPPED,
        )
        self.close()
        raise TrainingStopped(step, checkpoint)

    def close(self) -> None:
        """Restores the previous signal handlers."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    # loss log --------------------------------------------------------------------------------
    def log_loss(self, step: int, loss: float) -> None:
        """Appends one point of the loss curve (rank 0; a no-op elsewhere)."""
        if not self.env.is_rank0:
            return
        with self._loss_log.open("a") as f:
            f.write(json.dumps({"step": step, "loss": loss}) + "\n")

    def _truncate_loss_log(self, start_step: int) -> None:
        """Keeps the points up to ``start_step``: later ones are about to be trained again."""
        kept = [p for p in read_loss_log(self.run_dir) if p[0] <= start_step]
        text = "".join(json.dumps({"step": s, "loss": v}) + "\n" for s, v in kept)
        atomic_write_text(self._loss_log, text)

    # faults ----------------------------------------------------------------------------------
    def _inject(self, spec: FaultSpec) -> None:
        marker = spec.marker(self.run_dir)
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return  # fired in an earlier attempt of this run: train on
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"pid": os.getpid(), "time": time.time(), **asdict(spec)}) + "\n")
        logger.warning("%s: injecting %s on rank %d after step %d", FAULT_ENV, spec.action, spec.rank, spec.step)  # fmt: skip
        if spec.action == "raise":
            raise InjectedFault(
                f"{FAULT_ENV}: injected failure on rank {spec.rank} after step {spec.step} "
                f"(testing only; marker {marker})"
            )
        if spec.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        deadline = time.monotonic() + spec.timeout  # "hang"
        while not self._flag and time.monotonic() < deadline:
            time.sleep(0.02)


def read_loss_log(run_dir: str | Path) -> list[tuple[int, float]]:
    """The loss curve of a run across restarts: ``[(step, loss), ...]`` from ``RUN/loss_curve.jsonl``
    (rank 0's loss on its part of each logged global batch). Empty when there is none."""
    path = Path(run_dir) / LOSS_LOG
    if not path.is_file():
        return []
    points = []
    for line in path.read_text().splitlines():
        if line.strip():
            point = json.loads(line)
            points.append((int(point["step"]), float(point["loss"])))
    return points


STORE_RESTART_FIX = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"
_WORKERS_KEY = "mlet_dist/workers_started"


def check_agent_store(timeout_s: float = 60.0) -> None:
    """Refuses to start a restarted worker on a TCPStore that still holds the last attempt's keys.

    Call before ``init_process_group``. With the c10d rendezvous, torchrun (torch 2.13) shares its
    rendezvous TCPStore with the workers (``TORCHELASTIC_USE_AGENT_STORE=True``) and keeps the
    same store for every rendezvous round: after an in-place restart (``--max-restarts``) the
    process group finds the previous attempt's keys (gloo's peer addresses, NCCL's unique id) and
    hangs until its 30-minute timeout. Every worker counts itself into the store; a count above
    the world size means a previous attempt used it, and the worker fails at once with the fix
    (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` in torchrun's environment: then rank 0 hosts a new
    store each round). The TorchX components in ``launch/components.py`` set it.

    Raises:
        ConfigError: the store is shared and was used by an earlier attempt.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_ADDR" not in os.environ:
        return
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    started = store.add(_WORKERS_KEY, 1)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if started > world_size:
        raise ConfigError(
            f"this worker was restarted (attempt {os.environ.get('TORCHELASTIC_RESTART_COUNT')}) "
            f"on the TCPStore that torchrun shares across restarts, which still holds the previous "
            f"attempt's keys: the process group would hang. Set {STORE_RESTART_FIX}=1 in the "
            f"environment of torchrun (docs/operations.md#run-on-a-cluster); the TorchX components do"
        )


_GLOO_GROUPS: dict[int, Any] = {}


def flag_group(env: DistEnv) -> Any:
    """The group of the stop-flag all-reduce: the default one under gloo; under another backend
    (nccl) a gloo group over the same ranks, made once per process group (collectively), so that
    the per-step check is a CPU message and never waits for the GPU stream."""
    if env.world_size == 1 or not dist.is_initialized():
        return None
    if dist.get_backend() == "gloo":
        return None
    key = id(dist.group.WORLD)
    if key not in _GLOO_GROUPS:
        _GLOO_GROUPS[key] = dist.new_group(backend="gloo")
    return _GLOO_GROUPS[key]
