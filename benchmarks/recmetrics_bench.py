"""What TorchRec's RecMetrics cost per training step: one update per step vs one per N steps.

    python -m benchmarks.recmetrics_bench [--batch 256] [--every 100] [--steps 500] [--repeats 3]

TorchRec's ``RecMetricModule.update`` (AUC, NE, calibration, throughput) costs a fixed ~0.5 ms of
Python per call whatever its rows. ``TrainingMonitor`` (mlet_dist/train/metrics.py) keeps each
step's predictions and hands the rows of N steps over in one update before each computation.
This times both on one process (one thread, gloo group of one): per training step, the updates
plus a ``compute()`` every N steps, best of ``--repeats``; prints one JSON line. The training
step itself is timed by the train suite's ``train.tensorboard`` axis (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any


def measure(batch: int, every: int, steps: int, repeats: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from mlet_dist.distributed.parallelize import DistEnv
    from mlet_dist.train.metrics import build_rec_metrics, scalars, update_rec_metrics

    torch.set_num_threads(1)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29561")
        dist.init_process_group("gloo", rank=0, world_size=1)
    env = DistEnv(0, 1, 0, 1, torch.device("cpu"), "gloo")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, generator=g)
    labels = (torch.rand(batch, generator=g) < torch.sigmoid(logits)).float()
    out: dict[str, Any] = {"batch": batch, "every": every, "steps": steps}
    for name, chunk in (("per_step", 1), ("per_n_steps", every)):
        module = build_rec_metrics(batch, every, env, steps_per_update=chunk)
        best = float("inf")
        for _ in range(repeats):
            kept: list[tuple[torch.Tensor, torch.Tensor]] = []
            start = time.perf_counter()
            for step in range(1, steps + 1):
                if chunk == 1:
                    update_rec_metrics(module, logits, labels)
                else:  # what TrainingMonitor.step keeps
                    kept.append((logits.detach(), labels.to(torch.float32, copy=True)))
                if step % every == 0:
                    if kept:
                        z, y = zip(*kept)
                        kept = []
                        update_rec_metrics(module, torch.cat(z), torch.cat(y))
                    values = scalars(module.compute())
            best = min(best, (time.perf_counter() - start) / steps)
        out[f"{name}_ms_per_step"] = 1e3 * best
        out[f"{name}_window_auc"] = values["auc-ctr|window_auc"]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recmetrics_bench")
    parser.add_argument("--batch", type=int, default=256, help="rows per step")
    parser.add_argument("--every", type=int, default=100, help="steps between computations")
    parser.add_argument("--steps", type=int, default=500, help="timed steps (per repeat)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    result = measure(args.batch, args.every, args.steps, args.repeats)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
