"""Run a function on N gloo ranks in spawned processes, for multi-process tests on CPU.

Each rank is a fresh ``spawn``-ed interpreter with RANK / WORLD_SIZE / LOCAL_RANK /
LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT set (a free TCP port per call), so that
``mlet_dist.distributed.parallelize.init_distributed`` joins the group exactly as under torchrun.
``OMP_NUM_THREADS=1`` keeps the ranks from fighting over the cores.

The function's return value on each rank comes back through a ``torch.save`` file (any picklable
object; tensors are saved by value). An exception on any rank fails the caller with that rank's
traceback; a rank that neither returns nor fails within ``timeout`` seconds is killed.

Example::

    def _sum_of_ranks(scale):  # module level: the children import it by name
        env = init_distributed(DistConfig(device="cpu"))
        t = torch.tensor([float(env.rank)])
        torch.distributed.all_reduce(t)
        return scale * t.item()

    assert run_ranks(_sum_of_ranks, 2, 10.0) == [10.0, 10.0]
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

# After the first rank fails, how long the others get to finish (or fail) on their own before they
# are killed: a rank blocked in a collective with a dead peer would otherwise wait for `timeout`.
_GRACE_AFTER_FAILURE_S = 5.0
_POLL_S = 0.05


class RankError(RuntimeError):
    """One or more ranks raised, crashed or timed out; the message holds their tracebacks."""


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Sets environment variables for the duration (spawned children inherit them)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _rank_main(
    fn: Callable[..., Any], rank: int, env: dict[str, str], out: str, args: tuple[Any, ...]
) -> None:
    """Entry point of one spawned rank: run ``fn(*args)``, save its result or its traceback."""
    os.environ.update(env)
    os.environ["RANK"] = str(rank)
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    try:
        payload: dict[str, Any] = {"result": fn(*args)}
    except BaseException:
        payload = {"error": traceback.format_exc()}
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            with contextlib.suppress(Exception):
                torch.distributed.destroy_process_group()
    try:
        torch.save(payload, out)
    except Exception:
        torch.save({"error": f"the result could not be saved:\n{traceback.format_exc()}"}, out)


def run_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0
) -> list[Any]:
    """Runs ``fn(*args)`` on ``world_size`` spawned ranks and returns their results by rank.

    Args:
        fn: a module-level (picklable) function; it joins the process group itself, e.g. with
            ``init_distributed(DistConfig(device="cpu"))``.
        world_size: number of ranks (all local: LOCAL_WORLD_SIZE = world_size).
        *args: picklable arguments given to ``fn`` on every rank.
        timeout: seconds for the whole run, start-up included.

    Returns:
        ``[result of rank 0, result of rank 1, ...]``.

    Raises:
        RankError: a rank raised (its traceback is in the message), died without a result, or
            did not finish within ``timeout``.
    """
    env = {
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
    }
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="run_ranks_") as tmp:
        outs = [str(Path(tmp) / f"rank{r}.pt") for r in range(world_size)]
        procs = []
        # OMP_NUM_THREADS must be in the environment the child starts with (before torch loads).
        with _environ({"OMP_NUM_THREADS": "1"}):
            for r in range(world_size):
                p = ctx.Process(
                    target=_rank_main, args=(fn, r, env, outs[r], args), name=f"rank{r}"
                )
                p.start()
                procs.append(p)
        deadline = time.monotonic() + timeout
        first_failure: float | None = None
        finished: set[int] = set()
        try:
            while any(p.is_alive() for p in procs):
                now = time.monotonic()
                if now > deadline:
                    break
                for r, p in enumerate(procs):
                    if r in finished or p.is_alive():
                        continue
                    finished.add(r)
                    if first_failure is None and (p.exitcode != 0 or "error" in _load(outs[r])):
                        first_failure = now
                if first_failure is not None and now - first_failure > _GRACE_AFTER_FAILURE_S:
                    break
                time.sleep(_POLL_S)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join()
        results, errors = [], []
        for r, p in enumerate(procs):
            payload = _load(outs[r])
            if "result" in payload:
                results.append(payload["result"])
            elif "error" in payload:
                errors.append(f"--- rank {r} raised:\n{payload['error']}")
            elif time.monotonic() > deadline:
                errors.append(f"--- rank {r} did not finish within {timeout:.0f} s (killed)")
            else:
                errors.append(
                    f"--- rank {r} exited with code {p.exitcode} without a result "
                    f"(killed after another rank failed, or crashed)"
                )
        if errors:
            raise RankError(f"{len(errors)} of {world_size} ranks failed:\n" + "\n".join(errors))
        return results


def _load(path: str) -> dict[str, Any]:
    """A rank's saved payload; empty while the file is missing (not written yet)."""
    if not os.path.exists(path):
        return {}
    return torch.load(path, weights_only=False)
