"""The dry-run report as readable text: tables, per-rank memory, totals."""

from __future__ import annotations

from typing import Any

from mlet_dist.distributed.planning.memory import GIB


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f} GiB"


def compress_ranks(ranks: list[int]) -> str:
    """[0, 1, 2, 3, 7] -> '0-3,7'."""
    parts: list[str] = []
    for r in sorted(set(ranks)):
        if parts and "-" in parts[-1] and int(parts[-1].split("-")[1]) == r - 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{r}"
        elif parts and "-" not in parts[-1] and int(parts[-1]) == r - 1:
            parts[-1] = f"{parts[-1]}-{r}"
        else:
            parts.append(str(r))
    return ",".join(parts)


def shards_summary(shards: list[dict[str, Any]]) -> str:
    shapes = [tuple(s["sizes"]) for s in shards]
    if len(set(shapes)) == 1:
        rows, cols = shapes[0]
        return f"{len(shapes)} x [{rows:,}, {cols}]"
    return " ".join(f"[{r:,},{c}]" for r, c in shapes)


def table_text(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def format_report(report: dict[str, Any]) -> str:
    """The report as readable text: tables, per-rank memory, totals."""
    tg, tot, m = report["target"], report["totals"], report["model"]
    kind = tg["memory_kind"].upper()
    k = m["inner_dim"] or "none (single-layer)"
    if m.get("inner_dim_per_table") or m.get("inner_dim_min_rows"):
        k = f"{k} (varies per table, see below)"  # inner_dim_per_table, inner_dim_min_rows
    out = [
        f"Sharding plan: {m['num_tables']} tables (d={m['embedding_dim']}, "
        f"k={k}, W1 {m.get('w1_dtype', 'fp32')}) on {tg['world_size']} x {tg['device']} "
        f"({tg['local_world_size']} per node), {kind} cap {gib(tot['device_cap_bytes'])} per "
        f"rank, batch {tg['batch_size_per_rank']}/rank, W1 optimizer {m['embedding_optimizer']}",
        "",
    ]
    rows = [
        [
            t["name"],
            f"{t['num_embeddings']:,}",
            str(t["inner_dim"] or "-"),
            str(t["embedding_dim"]),
            t["sharding_type"],
            t["compute_kernel"],
            compress_ranks(t["ranks"]),
            shards_summary(t["shards"]),
            gib(t["w1_bytes"] + t["w1_optimizer_bytes"]),
        ]
        for t in report["tables"]
    ]
    out += table_text(
        ["table", "rows", "k", "d", "sharding", "kernel", "ranks", "shards", "W1+opt"],
        rows,
        right={1, 2, 3, 8},
    )
    out.append("")
    planner = "planner_hbm_bytes" if kind == "HBM" else "planner_ddr_bytes"
    rank_rows = []
    for r in report["ranks"]:
        repl = r["training_bytes"] - r["w1_bytes"] - r["w1_optimizer_bytes"]
        rank_rows.append(
            [
                str(r["rank"]),
                str(r["num_shards"]),
                gib(r["w1_bytes"]),
                gib(r["w1_optimizer_bytes"]),
                gib(repl),
                gib(r["training_bytes"]),
                gib(r.get(planner)),
                gib(r["served_bytes"]),
            ]
        )
    out += table_text(
        ["rank", "shards", "W1", "W1 optim", "replicated", "training", "planner est", "serving"],
        rank_rows,
        right=set(range(8)),
    )
    verdict = "fits" if tot["fits"] else "DOES NOT FIT"
    out += [
        "",
        f"W1 total {gib(tot['w1_bytes'])} ({m.get('w1_dtype', 'fp32')}) + "
        f"{m['embedding_optimizer']} state (fp32) "
        f"{gib(tot['w1_optimizer_bytes'])}; replicated W2 + MLPs (params, grads, "
        f"{m['dense_optimizer']} state) {gib(tot['replicated_bytes_per_rank'])} per rank",
        f"Serving after collapse (vocab x d x 4 B): {gib(tot['served_bytes'])} in all, "
        f"{gib(tot['max_rank_served_bytes'])} on the busiest rank if sharded like W1; "
        f"training/serving: tables {tot['tables_training_over_serving']:.2f}x, busiest rank "
        f"{tot['max_rank_training_over_serving']:.2f}x",
        f"Max training memory per rank: {gib(tot['max_rank_training_bytes'])} (rank "
        f"{tot['max_rank']}) vs cap {gib(tot['device_cap_bytes'])}: {verdict}"
        + (
            f" (headroom {gib(tot['headroom_bytes'])})"
            if tot.get("headroom_bytes") is not None
            else ""
        ),
        "  (not counted: activations, all-to-all buffers, allocator and CUDA context)",
    ]
    if not tot["fits"]:
        out.append(
            "  TorchRec's planner accepted this plan, but it leaves out the replicated dense "
            "state and its reservation may be too small: raise the cap or the number of ranks"
        )
    if "planner_num_proposals" in tot:
        out.append(
            f"Planner: {tot['planner_num_proposals']} proposals, {tot['planner_num_plans']} "
            f"plans, {tot['planner_run_time_s']:.2f} s; usable {kind} per rank after its "
            f"reservation {gib(tot['planner_usable_bytes_per_rank'])}, its own busiest-rank "
            f"estimate {gib(tot['planner_max_rank_bytes'])} (W1 + optimizer state + IO "
            f"buffers)"
        )
    if "dry_run_s" in tot:
        out.append(f"Dry run: {tot['dry_run_s']:.2f} s")
    return "\n".join(out)
