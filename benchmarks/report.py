"""Markdown tables and PNG plots of benchmark results (matplotlib, Agg backend: no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MIB = 2**20


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / MIB:,.1f}"


def _x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    align = ["---"] + ["---:"] * (len(header) - 1)
    return [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(align) + " |",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def header_lines(record: dict[str, Any], title: str) -> list[str]:
    m, v = record["machine"], record["versions"]
    gpus = ", ".join(g["name"] for g in m["gpus"]) or "none"
    if m["gpus"]:  # a GPU result names the driver and CUDA it ran with
        gpus += f" (driver {m.get('cuda_driver') or '?'}, CUDA {v.get('cuda') or '?'})"
    return [
        f"# {title} — {record['hardware_tag']} — {record['date']}"
        + (" (quick mode)" if record["quick"] else ""),
        "",
        f"Machine: {m['cores']} cores ({m['cpu_model']}{_cpu_id(m)}), "
        f"{m['memory_bytes'] / 2**30:.0f} GiB, "
        f"GPUs: {gpus}. Versions: python {v['python']}, torch {v['torch']}, torchrec "
        f"{v['torchrec']}, fbgemm_gpu {v['fbgemm_gpu']}.",
        "",
        f"Command: `{record['command']}`",
        "",
    ]


def _cpu_id(machine: dict[str, Any]) -> str:
    cpu = machine.get("cpu_id") or {}
    if not cpu.get("family"):
        return ""
    vec = [f for f in cpu.get("vector_flags", []) if f in ("avx2", "avx512f", "amx_tile")]
    return f"; family {cpu['family']} model {cpu['model']}" + (f", {'/'.join(vec)}" if vec else "")


# -- train ---------------------------------------------------------------------------------------


def train_markdown(record: dict[str, Any]) -> str:
    res, cfg = record["results"], record["config"]
    bench, data, model = cfg["bench"], cfg["data"], cfg["model"]
    rows_per_table = data["num_embeddings_per_feature"]
    lines = header_lines(record, "Training throughput and memory: MLET vs plain tables")
    lines += [
        f"DLRM ({model['interaction']}), {len(rows_per_table)} tables x "
        f"{max(rows_per_table):,} rows ({_pooling(bench, res)}), W1 "
        f"{cfg['optim']['embedding_optimizer']}, "
        f"dense {cfg['optim']['dense_optimizer']}, global batch {data['batch_size']}, "
        f"bottom MLP {model['dense_arch_layer_sizes'][:-1]} + [width], top MLP "
        f"{model['over_arch_layer_sizes']}; device {res['device']}. Each number: median over "
        f"{bench['repeats']} fresh runs (interleaved) x {bench['windows']} windows of "
        f"{bench['steps_per_window']} steps, after {bench['warmup_steps']} warm-up steps.",
        "",
        "## Throughput",
        "",
    ]
    by = {(r["variant"], r["world_size"]): r for r in res["rows"]}
    table = []
    for r in res["rows"]:
        k_row = by.get(("plain_k", r["world_size"]))
        d_row = by.get(("plain_d", r["world_size"]))
        table.append(
            [
                r["label"],
                str(r["world_size"]),
                str(r["threads_per_rank"]),
                f"{r['samples_per_s']:,.0f}",
                f"{r['samples_per_s_min']:,.0f} – {r['samples_per_s_max']:,.0f}",
                f"{r['ms_per_step']:.1f}",
                _x(r["samples_per_s"] / k_row["samples_per_s"]) if k_row else "-",
                _x(r["samples_per_s"] / d_row["samples_per_s"]) if d_row else "-",
                f"{r['page_fault_mib_per_step_max_rank']:.0f} / {r['sys_ms_per_step_max_rank']:.0f}",
                ", ".join(f"{t} x{n}" for t, n in sorted(r["sharding"].items())),
            ]
        )
    labels = {r["variant"]: r["label"] for r in res["rows"]}
    lines += _table(
        [
            "variant",
            "ranks",
            "threads/rank",
            "samples/s",
            "range",
            "ms/step",
            f"vs {labels.get('plain_k', 'EBC(k)')}",
            f"vs {labels.get('plain_d', 'EBC(d)')}",
            "page faults MiB / sys ms per step",
            "sharding (tables)",
        ],
        table,
    )
    env = bench.get("env") or {}
    lines += [
        "",
        "Page faults: memory first-touched per step on the busiest rank, and the system time it "
        "costs. glibc hands large freed blocks back to the OS and the next step faults them in "
        "again; "
        + (
            "this run set " + ", ".join(f"`{k}={v}`" for k, v in sorted(env.items())) + "."
            if env
            else "this run used the stock allocator settings (see benchmarks/README.md, "
            "'Page faults', for the tuned run)."
        ),
        "",
        "## Memory (MiB)",
        "",
    ]
    cuda = res["device"] == "cuda"
    peak_name = "max allocated" if cuda else "peak RSS"
    mem = []
    for r in res["rows"]:
        p, o = r["param_bytes"], r["optimizer_bytes"]
        mem.append(
            [
                r["label"],
                str(r["world_size"]),
                _mib(p["w1"]),
                _mib(o["fused"]),
                _mib(p["projection"] + o["projection"]),
                _mib(r["training_state_bytes_model"]),
                _mib(r["training_state_bytes_max_rank"]),
                _mib(r["max_allocated_bytes_max_rank"] if cuda else r["peak_rss_bytes_max_rank"]),
                "-" if cuda else _mib(r["peak_rss_above_pre_model_bytes_max_rank"]),
                _mib(r["served_model_bytes"]),
                _mib(r.get("served_bytes_max_rank")),
                _x(r["training_state_bytes_model"] / r["served_model_bytes"]),
            ]
        )
    lines += _table(
        [
            "variant",
            "ranks",
            "W1",
            "W1 optimizer",
            "W2 + its optimizer",
            "training state: model",
            "training state: busiest rank",
            f"{peak_name}: busiest rank",
            "peak RSS above RSS before the model",
            "served: model",
            "served: busiest rank",
            "training / served (model)",
        ],
        mem,
    )
    lines += [
        "",
        "Training state = parameters + optimizer state (model: W1 and its fused optimizer summed "
        "over ranks, W2, MLPs and their Adagrad state counted once; busiest rank: what one rank "
        "holds, replicated parts included). Peak RSS includes the ~0.4 GB of the imported "
        "libraries; the next column subtracts the RSS measured before the model was built "
        "(activations, gradients, batches, communication buffers and allocator slack remain). "
        "Served = the collapsed vocab x d fp32 tables + MLPs (a plain variant serves its own "
        "width); busiest rank: the served tables sharded like W1.",
        "",
        "## Planner estimates vs measured (busiest rank, MiB)",
        "",
    ]
    plan = []
    for p in res["planner"]:
        if "error" in p:
            plan.append([p["label"], str(p["world_size"]), p["error"][:80], "", "", "", "", ""])
            continue
        plan.append(
            [
                p["label"],
                str(p["world_size"]),
                _mib(p["estimate_training_bytes_max_rank"]),
                _mib(p["measured_state_bytes_max_rank"]),
                _x(p["estimate_over_measured_state"]),
                _mib(p["planner_storage_bytes_max_rank"]),
                _mib(p["measured_peak_bytes_max_rank"]),
                _x(p["planner_over_measured_peak"]),
            ]
        )
    lines += _table(
        [
            "variant",
            "ranks",
            "dry-run estimate (W1 + opt + replicated)",
            "measured state",
            "estimate / measured",
            "TorchRec planner storage",
            f"measured {res['planner'][0].get('measured_peak_kind', 'peak') if res['planner'] else 'peak'}",
            "planner / measured",
        ],
        plan,
    )
    lines += [
        "",
        "Dry-run estimate: `mlet-dist plan`'s per-rank training bytes (mlet_dist.distributed."
        "planning.plan_report). TorchRec planner storage: the planner's own per-rank estimate "
        "for the sharded tables (W1, optimizer state, and on GPU its input/output buffers).",
        "",
        "## Ratios",
        "",
    ]
    lines += _table(
        [
            "ranks",
            "ratio",
            "samples/s (median)",
            "samples/s (best windows)",
            "training state",
            f"{peak_name}",
        ],
        [
            [
                str(q["world_size"]),
                q["ratio"],
                _x(q["samples_per_s"]),
                _x(q.get("samples_per_s_best")),
                _x(q["training_state_bytes"]),
                _x(q["peak_memory"]),
            ]
            for q in res["ratios"]
        ],
    )
    lines += [
        "",
        "The median is the result; the best windows are the least disturbed by other jobs when "
        "the machine is shared (compare both: far apart means the run was disturbed).",
        "",
    ]
    lines += _batches_lines(bench, res)
    lines += _axes_lines(bench, res, peak_name)
    return "\n".join(lines)


def _pooling(bench: dict[str, Any], res: dict[str, Any]) -> str:
    if bench.get("batches", "uniform") != "zipf":
        return f"pooling 1, {bench['distinct_batches']} uniform random batches cycled"
    bags = bench.get("ids_per_bag") or [1]
    mean = res["rows"][0].get("mean_ids_per_bag") if res["rows"] else None
    pooling = "pooling 1" if bags == [1] else f"multi-hot, {mean or 0:.2f} ids per bag on average"
    return f"{pooling}, a fresh Zipf batch every step"


def _batches_lines(bench: dict[str, Any], res: dict[str, Any]) -> list[str]:
    """Where the batches came from and the memory they took (apart from the model's)."""
    lines = ["## Batches", ""]
    if bench.get("batches", "uniform") != "zipf":
        lines += [
            f"{bench['distinct_batches']} random batches per rank (ids uniform over each table), "
            "cycled through.",
            "",
        ]
    else:
        lines += [
            "Every step trains a batch never trained before, drawn from the synthetic generator "
            "(Zipf ids through the generator's hash and the table modulo, teacher labels; "
            "benchmarks/traffic.py) before any measurement started"
            + (f"; ids per bag {bench['ids_per_bag']}" if bench.get("ids_per_bag") else "")
            + ".",
            "",
        ]
        lines += _table(
            ["pool", "global batches", "global batch", "draw s (untimed)", "MiB on disk"],
            [
                [
                    name,
                    str(p["batches"]),
                    str(p["global_batch"]),
                    f"{p['draw_seconds']:.1f}",
                    _mib(p["file_bytes"]),
                ]
                for name, p in res.get("batch_pools", {}).items()
            ],
        )
        lines.append("")
    rows = res["rows"] + res.get("axis_rows", [])
    lines += _table(
        ["variant", "ranks", "batches held", "tensor MiB (busiest rank)", "RSS MiB while loading"],
        [
            [
                r["label"],
                str(r["world_size"]),
                str(r.get("batch_pool")),
                _mib(r.get("batch_pool_bytes_max_rank")),
                _mib(r.get("rss_batches_bytes_max_rank")),
            ]
            for r in rows
        ],
    )
    lines += [
        "",
        "The batches are loaded before the model is built: their memory is in peak RSS but not "
        "in 'peak RSS above RSS before the model'.",
        "",
    ]
    return lines


def _axes_lines(bench: dict[str, Any], res: dict[str, Any], peak_name: str) -> list[str]:
    """The axis comparisons of this run: each value vs the axis's first (reference) value."""
    if not res.get("axis_rows"):
        return []
    ref = ", ".join(f"`{k} = {v}`" for k, v in res.get("reference", {}).items())
    lines = [
        "## Axes",
        "",
        f"Reference point: {ref}. Each other value changes only its own axis; ratios are value "
        "/ reference, same variant and ranks, measured in this run (interleaved). CPU ms/step: "
        "the process CPU time (user + system, all threads) per timed step, median over the "
        "runs; on a shared machine it is disturbed much less than samples/s (with one thread "
        "per rank, `--bench.threads=1`, no thread pool spins while waiting).",
        "",
    ]
    by = {(r["variant"], r["world_size"]): r for r in res["rows"]}
    table = []
    for q, a in zip(res["axis_ratios"], res["axis_rows"]):
        r = by[(a["variant"], a["world_size"])]
        table.append(
            [
                q["label"],
                str(q["world_size"]),
                q["ratio"],
                f"{a['samples_per_s']:,.0f} vs {r['samples_per_s']:,.0f}",
                _x(q["samples_per_s"]),
                _x(q["samples_per_s_best"]),
                f"{a['cpu_ms_per_step_max_rank']:.2f} vs {r['cpu_ms_per_step_max_rank']:.2f}",
                _x(q["cpu_time_per_step"]),
                f"{_mib(a['param_bytes']['w1'])} vs {_mib(r['param_bytes']['w1'])}",
                _x(q["w1_bytes"]),
                _x(q["training_state_bytes"]),
                f"{_mib(_peak_of(a))} vs {_mib(_peak_of(r))}",
                _x(q["peak_memory"]),
            ]
        )
    lines += _table(
        [
            "variant",
            "ranks",
            "ratio",
            "samples/s",
            "samples/s ratio",
            "best windows",
            "CPU ms/step (busiest rank)",
            "CPU time ratio",
            "W1 MiB (all ranks)",
            "W1 ratio",
            "training state ratio",
            f"{peak_name} MiB (busiest rank)",
            f"{peak_name} ratio",
        ],
        table,
    )
    lines.append("")
    return lines


def _peak_of(row: dict[str, Any]) -> int:
    return row.get("max_allocated_bytes_max_rank", row["peak_rss_bytes_max_rank"])


def train_plots(record: dict[str, Any], stem: Path) -> list[Path]:
    """``<stem>_throughput.png`` and ``<stem>_memory.png``."""
    plt = _pyplot()
    res = record["results"]
    rows = res["rows"]
    sizes = sorted({r["world_size"] for r in rows})
    labels = list(dict.fromkeys(r["label"] for r in rows))
    by = {(r["label"], r["world_size"]): r for r in rows}
    out = []

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        xs = [j + i * width for j in range(len(sizes))]
        vals = [by[(label, ws)]["samples_per_s"] if (label, ws) in by else 0 for ws in sizes]
        lo = [v - by[(label, ws)]["samples_per_s_min"] if v else 0 for v, ws in zip(vals, sizes)]
        hi = [by[(label, ws)]["samples_per_s_max"] - v if v else 0 for v, ws in zip(vals, sizes)]
        ax.bar(xs, vals, width, label=label, yerr=[lo, hi], capsize=3)
    ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(sizes))])
    ax.set_xticklabels([f"{ws} rank{'s' if ws > 1 else ''}" for ws in sizes])
    ax.set_ylabel("training samples/s (median, min-max)")
    ax.set_title(f"Training throughput — {record['hardware_tag']} {record['date']}")
    ax.legend()
    fig.tight_layout()
    path = stem.with_name(stem.name + "_throughput.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    out.append(path)

    cuda = res["device"] == "cuda"
    peak_key = "max_allocated_bytes_max_rank" if cuda else "peak_rss_above_pre_model_bytes_max_rank"
    series = [
        ("training state: params + optimizer", "training_state_bytes_max_rank"),
        ("max allocated" if cuda else "peak RSS above RSS before the model", peak_key),
        ("served after collapse (tables sharded like W1, + MLPs)", "served_bytes_max_rank"),
    ]
    plan = {(p["label"], p["world_size"]): p for p in res["planner"] if "error" not in p}
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4.2), squeeze=False)
    width = 0.8 / len(series)
    for ax, ws in zip(axes[0], sizes):
        for i, (name, key) in enumerate(series):
            vals = [
                by[(label, ws)].get(key, 0) / MIB if (label, ws) in by else 0 for label in labels
            ]
            ax.bar([j + i * width for j in range(len(labels))], vals, width, label=name)
        est = [
            plan[(label, ws)]["estimate_training_bytes_max_rank"] / MIB
            if (label, ws) in plan
            else 0
            for label in labels
        ]
        ax.scatter(
            range(len(labels)), est, marker="_", s=500, color="k", zorder=3,
            label="dry-run estimate of the training state",
        )  # fmt: skip
        ax.set_xticks([j + width for j in range(len(labels))])
        ax.set_xticklabels(labels)
        ax.set_ylabel("MiB, busiest rank")
        ax.set_title(f"{ws} rank{'s' if ws > 1 else ''}")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"Training vs serving memory — {record['hardware_tag']} {record['date']}")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    path = stem.with_name(stem.name + "_memory.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    out.append(path)
    return out


# -- collapse and loader (results of the delegated benchmark modules) ------------------------------


def bar_plot(
    path: Path, title: str, ylabel: str, bars: list[tuple[str, float]], log: bool = False
) -> Path:
    """One simple bar chart (e.g. collapse GB/s vs copy GB/s)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if log:
        ax.set_yscale("log")
    names = [b[0] for b in bars]
    ax.bar(range(len(bars)), [b[1] for b in bars], color=[f"C{i}" for i in range(len(bars))])
    ax.set_xticks(range(len(bars)))
    ax.set_xticklabels(names, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
