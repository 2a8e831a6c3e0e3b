"""Layouts of the MLET projection, timed op by op: which bmm / einsum / mm form is fastest.

The projection maps W1's pooled output x, viewed as (B, F, k) (B-major, as TorchRec returns it),
through one k x d matrix per feature (W2 stacked as (F, k, d)) to (B, F, d); backward needs the
gradient of x in the same (B, F, k) layout (W1's kernel reads it contiguous) and of W2. Each row
of the output is one candidate for one of the three products, timed alone (best and median of
``--repeats``, interleaved rounds), by default on one thread and in thread CPU time, which other
jobs on a shared machine disturb least.

    python -m benchmarks.projection_layouts [--batch 4096] [--features 26] [--k 64] [--d 16]
        [--threads 1] [--repeats 20] [--out benchmarks/results]

The module's choice (``mlet_dist.modules.mlet._Project``): forward ``bmm(x.transpose(0, 1), w2)``,
backward ``bmm(grad, w2^T, out=<(B, F, k) buffer>.transpose(0, 1))`` and
``bmm(x.permute(1, 2, 0), grad)``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import DEFAULT_OUT, hardware_tag, result_stem


def candidates(b: int, f: int, k: int, d: int) -> dict[str, dict[str, Callable[[], object]]]:
    x = torch.randn(b, f, k)  # W1's output, B-major
    x_fbk = x.transpose(0, 1).contiguous()
    w2 = torch.randn(f, k, d)
    w2t = w2.transpose(1, 2)
    g_bfd = torch.randn(b, f, d)  # gradient of the output, as the interaction hands it back
    g_fbd = g_bfd.transpose(0, 1)
    y_bfd = torch.empty(b, f, d)
    gx_bfk = torch.empty(b, f, k)

    def loop_fwd() -> None:
        for i in range(f):
            torch.mm(x[:, i], w2[i], out=y_bfd[:, i])

    def loop_gx() -> None:
        for i in range(f):
            torch.mm(g_bfd[:, i], w2t[i], out=gx_bfk[:, i])

    def loop_gw() -> None:
        out = torch.empty(f, k, d)
        for i in range(f):
            torch.mm(x[:, i].t(), g_bfd[:, i], out=out[i])

    return {
        "forward y = x W2": {
            "bmm on the (F, B, k) view of x (module)": lambda: torch.bmm(x.transpose(0, 1), w2),
            "copy x to (F, B, k), then bmm": lambda: torch.bmm(x.transpose(0, 1).contiguous(), w2),
            "bmm into a (B, F, d) output": lambda: torch.bmm(
                x.transpose(0, 1), w2, out=y_bfd.transpose(0, 1)
            ),
            "einsum bfk,fkd->bfd": lambda: torch.einsum("bfk,fkd->bfd", x, w2),
            "F x mm into strided outputs": loop_fwd,
        },
        "backward dx = dy W2^T, in (B, F, k)": {
            "bmm into the (B, F, k) buffer (module)": lambda: torch.bmm(
                g_fbd, w2t, out=gx_bfk.transpose(0, 1)
            ),
            "bmm to (F, B, k), then copy (autograd)": lambda: (
                torch.bmm(g_fbd, w2t).transpose(0, 1).contiguous()
            ),
            "F x mm into strided outputs": loop_gx,
        },
        "backward dW2 = x^T dy": {
            "bmm on strided views (module)": lambda: torch.bmm(x.permute(1, 2, 0), g_fbd),
            "bmm on contiguous (F, B, .) copies": lambda: torch.bmm(
                x_fbk.transpose(1, 2), g_fbd.contiguous()
            ),
            "einsum bfk,bfd->fkd": lambda: torch.einsum("bfk,bfd->fkd", x, g_bfd),
            "F x mm": loop_gw,
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.projection_layouts", description=__doc__)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--features", type=int, default=26)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--d", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="directory of the text file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # One thread: thread CPU time (robust on a shared machine); more: wall time.
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    groups = candidates(args.batch, args.features, args.k, args.d)
    times: dict[tuple[str, str], list[float]] = {}
    for fns in groups.values():
        for fn in fns.values():
            fn()  # warm up (and fault in the output buffers)
    for _ in range(args.repeats):
        for group, fns in groups.items():
            for name, fn in fns.items():
                start = clock()
                fn()
                times.setdefault((group, name), []).append(clock() - start)
    kind = "thread CPU" if args.threads == 1 else "wall"
    lines = [
        f"B={args.batch} F={args.features} k={args.k} d={args.d}, {args.threads} thread(s), "
        f"{kind} time in ms, best / median of {args.repeats}; torch {torch.__version__}, "
        f"{hardware_tag()}"
    ]
    for group, fns in groups.items():
        lines += ["", group]
        for name in fns:
            ts = times[(group, name)]
            lines.append(f"  {min(ts) * 1e3:7.2f} / {statistics.median(ts) * 1e3:7.2f}  {name}")
    text = "\n".join(lines)
    print(text)
    path = Path(args.out) / f"{result_stem('projection-layouts', hardware_tag(), False)}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
