"""Oracle tests of the fused sharded collapse at world size 2 (gloo on CPU).

Kernel, per sharding type (table_wise, row_wise, column_wise with min_partition below k,
table_row_wise; row_wise and column_wise again with fp16 W1 shards, model.w1_dtype): a DLRM over
four tables (k=32, k=16 shared by two features, an ordinary d-dim table, a MEAN-pooled k=32
table) is sharded by ``parallelize``; the unsharded model's weights are
copied into the shards, and every rank collapses its own shards with tiny chunks (7 rows, so the
chunk loop, its tail and many reductions run). Checked against independent computations:

- the owned row blocks of both ranks tile each table exactly once and equal W1 @ W2 computed in
  float64 from the unsharded factors (the ordinary table equals W1 exactly);
- the int8 serving rows are bit-identical to fbgemm's quantization of the whole table (the kernel
  TorchRec's ``quantize_state_dict`` uses), i.e. chunking and sharding do not change them;
- no rank allocated a tensor as large as a table it does not own whole (the collapse's memory
  tracker), and the collapse never calls a global ``all_reduce``.

End to end: a run trained here on one process (column_wise, 4 column shards per table) is
collapsed by ``collapse_run`` on 2 ranks (int8); the written checkpoint loads into an unsharded
``EmbeddingBagCollection`` (one process) and, with a new row_wise plan, into a sharded one on 2
ranks; both equal the float64 product of the trained factors; the Parquet files hold the same rows.

Sub-groups, at world size 3 without TorchRec: hand-made layouts whose column pieces lie on rank
pairs {0,1}, {1,2}, {0,2} (a grid layout, two pieces on one rank, an ordinary table split by
columns, a whole table on one rank) are reduced only within those pairs and equal the float64
product; the fp16 serving rows are the float rows rounded.

One 2-rank spawn runs the TorchRec cases and the end-to-end collapse (a module-scoped fixture,
paying the start-up once); one 3-rank spawn runs the hand-made layouts.
"""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from dist_utils import run_ranks
from torchrec.modules.embedding_configs import DataType, PoolingType

from mlet_dist.checkpoint import latest_checkpoint
from mlet_dist.config import DistConfig, ModelConfig, OptimConfig, load_config
from mlet_dist.data import CriteoArrays
from mlet_dist.distributed.collapse import (
    MemoryTracker,
    collapse_table,
    layouts_from_state_dict,
    make_groups,
)
from mlet_dist.distributed.parallelize import init_distributed, parallelize
from mlet_dist.export import SERVED_TABLE_KEY, load_served, load_unsharded
from mlet_dist.models import build_dlrm
from mlet_dist.modules import MLETEmbeddingBagCollection, MLETEmbeddingBagConfig
from mlet_dist.modules.quantize import dequantize_rows
from mlet_dist.serving.manifest import verify_manifest

pytestmark = pytest.mark.slow

WORLD_SIZE = 2
D = 8
CHUNK = 7
W1_PREFIX = "model.sparse_arch.embedding_bag_collection.w1.embedding_bags."
W2_PREFIX = "model.sparse_arch.embedding_bag_collection.projection.weights."


def make_tables(data_type: DataType = DataType.FP32) -> list[MLETEmbeddingBagConfig]:
    tables = [
        MLETEmbeddingBagConfig(
            name="t_wide", num_embeddings=200, embedding_dim=D, inner_dim=32,
            feature_names=["f_wide"],
        ),
        MLETEmbeddingBagConfig(
            name="t_shared", num_embeddings=121, embedding_dim=D, inner_dim=16,
            feature_names=["f_a", "f_b"],
        ),
        MLETEmbeddingBagConfig(
            name="t_plain", num_embeddings=50, embedding_dim=D, inner_dim=None,
            feature_names=["f_plain"],
        ),
        MLETEmbeddingBagConfig(
            name="t_mean", num_embeddings=83, embedding_dim=D, inner_dim=32,
            feature_names=["f_mean"], pooling=PoolingType.MEAN,
        ),
    ]  # fmt: skip
    for t in tables:
        t.data_type = data_type  # W1's storage (model.w1_dtype)
    return tables


def build_model(
    w1_device: torch.device,
    dense_device: torch.device | None = None,
    data_type: DataType = DataType.FP32,
):
    dense_device = dense_device or torch.device("cpu")
    torch.manual_seed(0)
    mlet = MLETEmbeddingBagCollection(
        make_tables(data_type), device=w1_device, projection_device=dense_device
    )
    model_cfg = ModelConfig(
        embedding_dim=D, dense_arch_layer_sizes=[16, D], over_arch_layer_sizes=[16, 1]
    )
    return build_dlrm(model_cfg, [], w1_device, dense_device, embedding_module=mlet)


@dataclass(frozen=True)
class Case:
    name: str
    min_partition: int = 0
    sharding: str = ""  # default: name
    data_type: DataType = DataType.FP32  # W1's storage

    @property
    def sharding_type(self) -> str:
        return self.sharding or self.name


CASES = [
    Case("table_wise"),
    Case("row_wise"),
    Case("column_wise", min_partition=8),
    Case("table_row_wise"),
    # fp16 W1 (model.w1_dtype): shards read exactly, the product computed in fp32
    Case("row_wise_fp16", sharding="row_wise", data_type=DataType.FP16),
    Case("column_wise_fp16", min_partition=8, sharding="column_wise", data_type=DataType.FP16),
]


# -- on every rank ------------------------------------------------------------------------------


def _no_all_reduce(*args, **kwargs):
    raise AssertionError("the collapse must not all-reduce; partial sums go to their owner")


def _kernel_case(case: Case, env) -> dict[str, Any]:
    """Shards the model on ``env.device``, copies the unsharded weights in, collapses this rank's
    shards; the blocks come back on CPU."""
    state = build_model(torch.device("cpu"), data_type=case.data_type).state_dict()
    dmp = parallelize(
        build_model(torch.device("meta"), env.device, case.data_type),
        env,
        DistConfig(
            device=env.device.type,
            sharding_types=[case.sharding_type],
            min_partition=case.min_partition,
        ),
        OptimConfig(),
        batch_size_per_rank=16,
    )
    sharded = dmp.state_dict()
    with torch.no_grad():
        for key, target in sharded.items():
            if hasattr(target, "local_shards"):
                for s in target.local_shards():
                    (r0, c0), (nr, nc) = s.metadata.shard_offsets, s.metadata.shard_sizes
                    s.tensor.copy_(state[key][r0 : r0 + nr, c0 : c0 + nc])
            else:
                target.copy_(state[key])
    layouts, local = layouts_from_state_dict(sharded, W1_PREFIX, {t.name: D for t in make_tables()})
    groups = make_groups(list(layouts.values()))
    w1_dtypes = sorted({str(t.dtype) for shards in local.values() for _, t in shards})
    out: dict[str, Any] = {"layouts": layouts, "tables": {}, "w1_dtypes": w1_dtypes}
    real_all_reduce, dist.all_reduce = dist.all_reduce, _no_all_reduce
    try:
        for name, layout in layouts.items():
            tracker = MemoryTracker()
            blocks = collapse_table(
                layout, local[name], sharded.get(W2_PREFIX + name), groups, CHUNK, "int8", tracker
            )
            out["tables"][name] = {
                "blocks": [
                    (b.block.start, b.values.to("cpu", copy=True), b.served.to("cpu", copy=True))
                    for b in blocks
                ],
                "largest": tracker.largest_bytes,
            }
    finally:
        dist.all_reduce = real_all_reduce
    return out


def _sharded_served_load(run_cfg, out_dir: Path, env) -> dict[str, list]:
    """The collapsed checkpoint loaded into a plain EBC sharded row_wise on this world."""
    import torch.distributed.checkpoint as dcp
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.distributed.types import ShardingEnv
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from mlet_dist.distributed.sharding import MLETEmbeddingBagCollectionSharder
    from mlet_dist.models import build_tables
    from mlet_dist.modules.mlet import served_tables

    tables = served_tables(build_tables(run_cfg.model, run_cfg.data.num_embeddings_per_feature))
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    sharder = MLETEmbeddingBagCollectionSharder()
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=env.world_size, compute_device="cpu"),
        constraints={t.name: ParameterConstraints(sharding_types=["row_wise"]) for t in tables},
    )
    plan = planner.collective_plan(ebc, [sharder], dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(
        ebc,
        env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
        device=torch.device("cpu"),
        plan=plan,
        sharders=[sharder],
    )
    sd = dmp.state_dict()
    state = {
        "model": {
            SERVED_TABLE_KEY.format(t.name): sd[f"embedding_bags.{t.name}.weight"] for t in tables
        }
    }
    dcp.load(state, checkpoint_id=str(out_dir / "model"))
    return {
        t.name: [
            (s.metadata.shard_offsets[0], s.tensor.clone())
            for s in sd[f"embedding_bags.{t.name}.weight"].local_shards()
        ]
        for t in tables
    }


def _rank_main(run_dir: str, out_dir: str) -> dict[str, Any]:
    from mlet_dist.context import load_run_config
    from mlet_dist.export import CollapseOptions, collapse_run

    env = init_distributed(DistConfig(device="cpu"))
    result: dict[str, Any] = {}
    for case in CASES:
        try:
            result[case.name] = _kernel_case(case, env)
        except Exception:
            result[case.name] = {"error": traceback.format_exc()}
    result["report"] = collapse_run(
        run_dir, out_dir, CollapseOptions(chunk_rows=16, quantize="int8", row_group_rows=20)
    )
    result["sharded_load"] = _sharded_served_load(load_run_config(run_dir), Path(out_dir), env)
    return result


# -- the oracle ---------------------------------------------------------------------------------


def float64_tables(data_type: DataType = DataType.FP32) -> dict[str, torch.Tensor]:
    """W1 @ W2 in float64 from the unsharded factors (an fp16 W1 widened exactly)."""
    state = build_model(torch.device("cpu"), data_type=data_type).state_dict()
    out = {}
    for t in make_tables():
        w1 = state[W1_PREFIX + t.name + ".weight"].double()
        out[t.name] = w1 @ state[W2_PREFIX + t.name].double() if t.inner_dim else w1
    return out


def assemble(per_rank: list[list[tuple[int, torch.Tensor]]], rows: int, what: str) -> torch.Tensor:
    """Whole table from every rank's (first row, rows) blocks; each row exactly once."""
    first = per_rank[0][0][1] if per_rank[0] else per_rank[1][0][1]
    full = torch.zeros(rows, *first.shape[1:], dtype=first.dtype)
    cover = torch.zeros(rows, dtype=torch.int)
    for blocks in per_rank:
        for start, t in blocks:
            full[start : start + t.shape[0]] = t
            cover[start : start + t.shape[0]] += 1
    assert bool((cover == 1).all()), f"{what}: the owned blocks do not tile the rows exactly once"
    return full


# -- the tests ----------------------------------------------------------------------------------


def train_run(tmp: Path) -> Any:
    from mlet_dist.data import Splits
    from mlet_dist.train import train

    rng = np.random.default_rng(3)
    n = 320
    rows = CriteoArrays(
        labels=rng.integers(0, 2, n).astype(np.float32),
        dense=rng.random((n, 13)).astype(np.float32),
        sparse=rng.integers(0, 50, (n, 26)).astype(np.int64),
    )
    cfg = load_config(
        None,
        [
            "--data.num_embeddings_per_feature=[50, 37, 64, 3, 50, 50, 50, 50, 50, 50, 50, 50, 50, "
            "50, 50, 50, 50, 50, 50, 50, 50, 50, 50, 50, 50, 50]",
            "--data.batch_size=32",
            "--model.embedding_dim=8",
            "--model.inner_dim=32",
            "--model.dense_arch_layer_sizes=[16, 8]",
            "--model.over_arch_layer_sizes=[16, 1]",
            "--dist.sharding_types=['column_wise']",
            "--dist.min_partition=8",
            "--train.max_steps=4",
            "--train.progress=false",
            f"--train.run_dir={tmp / 'run'}",
        ],
    )
    import mlet_dist.train.run as train_module

    saved = train_module.load_splits
    train_module.load_splits = lambda *_: Splits(
        rows.slice(0, 256), rows.slice(256, n), rows.slice(n, n)
    )
    try:
        train(cfg)
    finally:
        train_module.load_splits = saved
    return cfg


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("collapse_dist")
    init_distributed(DistConfig(device="cpu"))
    cfg = train_run(tmp)
    out = tmp / "served"
    ranks = run_ranks(_rank_main, WORLD_SIZE, cfg.train.run_dir, str(out), timeout=240)
    return {"cfg": cfg, "out": out, "ranks": ranks}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_collapsed_tables_equal_float64_product(case: Case, spawned) -> None:
    ranks = [r[case.name] for r in spawned["ranks"]]
    check_collapsed_tables(case, ranks)
    layouts = ranks[0]["layouts"]
    kinds = {len({s.col0 for s in layout.shards}) for layout in layouts.values()}
    if case.sharding_type == "column_wise":
        assert max(kinds) > 1, "min_partition below k must split the columns"
    want = "torch.float16" if case.data_type == DataType.FP16 else "torch.float32"
    assert all(r["w1_dtypes"] == [want] for r in ranks), "the shards must hold W1 as configured"


def check_collapsed_tables(case: Case, ranks: list[dict], quant_device: str = "cpu") -> None:
    """Every rank's collapsed blocks of one case (any world size) vs the float64 product; the
    int8 rows vs fbgemm's quantization of the whole table, run on ``quant_device`` (the device
    the collapse ran on: fbgemm's CPU and CUDA kernels need not round alike)."""
    for rank, r in enumerate(ranks):
        if "error" in r:
            pytest.fail(f"rank {rank} failed on {case.name}:\n{r['error']}")
    expected = float64_tables(case.data_type)
    for t in make_tables():
        got = assemble(
            [[(s, v) for s, v, _ in r["tables"][t.name]["blocks"]] for r in ranks],
            t.num_embeddings,
            t.name,
        )
        ref = expected[t.name]
        if t.inner_dim:
            err = (got.double() - ref).abs().max().item()
            assert err <= 2e-6 * max(1.0, ref.abs().max().item()), (case.name, t.name, err)
        else:
            assert torch.equal(got, ref.float()), (case.name, t.name)

        # int8 serving rows: exactly fbgemm's quantization of the whole collapsed table, and
        # within half a quantization step (+ fp16 rounding of scale and bias) of the float rows
        served = assemble(
            [[(s, q) for s, _, q in r["tables"][t.name]["blocks"]] for r in ranks],
            t.num_embeddings,
            t.name,
        )
        whole = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(
            got.to(quant_device), 8
        ).cpu()
        assert torch.equal(served, whole), (case.name, t.name)
        scale = served[:, D:].contiguous().view(torch.float16)[:, :1].float()
        err = (dequantize_rows(served, "int8") - got).abs()
        assert bool((err <= scale / 2 + 2e-3 * got.abs().amax(1, keepdim=True) + 1e-6).all())


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_no_rank_allocates_a_table_it_does_not_own_whole(case: Case, spawned) -> None:
    ranks = [r[case.name] for r in spawned["ranks"]]
    if any("error" in r for r in ranks):
        pytest.skip("the kernel failed; see test_collapsed_tables_equal_float64_product")
    layouts = ranks[0]["layouts"]
    if case.name != "table_wise":
        assert all(layouts[n].ranks() == {0, 1} for n in ("t_wide", "t_shared", "t_mean"))
    for t in make_tables():
        table_bytes = t.num_embeddings * D * 4
        layout = layouts[t.name]
        for rank, r in enumerate(ranks):
            largest = r["tables"][t.name]["largest"]
            owns_all = sum(b.rows for b in layout.owned(rank)) == t.num_embeddings
            if owns_all:
                assert largest <= table_bytes
            else:
                assert largest < table_bytes, (case.name, t.name, rank, largest, table_bytes)
        if layout.ranks() == {0, 1}:
            # a table split over both ranks (by rows or columns): each owns part, none all of it
            for rank in range(WORLD_SIZE):
                owned = sum(b.rows for b in layout.owned(rank))
                assert 0 < owned < t.num_embeddings, (case.name, t.name, rank, owned)
        if case.sharding_type == "column_wise" and len({s.col0 for s in layout.shards}) > 1:
            assert all(b.ranks == (0, 1) for b in layout.blocks), layout.blocks


def _trained_tables(cfg) -> dict[str, torch.Tensor]:
    model = load_unsharded(cfg, latest_checkpoint(cfg.train.run_dir))
    mlet = model.model.sparse_arch.embedding_bag_collection
    return {
        name: bag.weight.double() @ mlet.projection.weights[name].double()
        for name, bag in mlet.w1.embedding_bags.items()
    }


def test_collapse_run_on_two_ranks_writes_a_loadable_checkpoint(spawned) -> None:
    cfg, out = spawned["cfg"], spawned["out"]
    report = spawned["ranks"][0]["report"]
    assert report == spawned["ranks"][1]["report"]
    assert report["world_size"] == 2 and report["serving_dtype"] == "int8"
    assert len(report["factorized_tables"]) == 26
    expected = _trained_tables(cfg)
    # unsharded, one process: the plain d-dim EBC of load_served
    served, _ = load_served(out)
    bags = served.model.sparse_arch.embedding_bag_collection.embedding_bags
    for name, ref in expected.items():
        err = (bags[name].weight.double() - ref).abs().max().item()
        assert err <= 2e-6 * max(1.0, ref.abs().max().item()), (name, err)
    # sharded with a new (row_wise) plan on 2 ranks
    loaded = [r["sharded_load"] for r in spawned["ranks"]]
    for name in expected:
        got = assemble([loaded[0][name], loaded[1][name]], expected[name].shape[0], name)
        assert torch.equal(got, bags[name].weight.detach()), name
        assert all(len(lr[name]) == 1 for lr in loaded), "row_wise: one shard per rank"
    # every rank collapsed part of each table: column pieces were reduced, not gathered
    owned = [r["owned_rows"] for r in report["ranks"]]
    assert all(0 < owned[0][n] < owned[0][n] + owned[1][n] for n in expected)
    for r in report["ranks"]:
        rows = {t["name"]: t["rows"] for t in report["tables"]}
        assert r["memory"]["largest_tensor_bytes"] < max(rows.values()) * 8 * 4


def test_parquet_files_hold_the_collapsed_rows(spawned) -> None:
    import pyarrow.parquet as pq

    out = spawned["out"]
    manifest = verify_manifest(out)
    served, _ = load_served(out)
    bags = served.model.sparse_arch.embedding_bag_collection.embedding_bags
    for table in manifest["tables"]:
        ids, vecs = [], []
        for rel in table["parquet"]:
            f = pq.ParquetFile(out / rel)
            # chunks of 16 rows, buffered into row groups of >= 20 rows (2 chunks)
            groups = [f.metadata.row_group(i).num_rows for i in range(f.metadata.num_row_groups)]
            assert all(g == 32 for g in groups[:-1]) and 0 < groups[-1] <= 32, groups
            t = f.read()
            assert (
                str(t.schema.field("embedding").type)
                == f"fixed_size_list<element: float>[{table['d']}]"
            )
            ids.append(t["id"].to_numpy())
            vecs.append(np.stack(t["embedding"].to_numpy(zero_copy_only=False)))
        ids_all, vec_all = np.concatenate(ids), np.concatenate(vecs)
        assert sorted(ids_all.tolist()) == list(range(table["rows"]))
        ref = bags[table["name"]].weight.detach().numpy()
        np.testing.assert_array_equal(vec_all, ref[ids_all])
    listed = {f["path"] for f in manifest["files"]}
    assert "serving/predictor.pt2" in listed and "model/.metadata" in listed
    assert json.loads((out / "config.json").read_text())["model"]["inner_dim"] == 0


# -- sub-groups: hand-made layouts at world size 3 (no TorchRec) --------------------------------

W3 = 3
HAND_TABLES = {  # name: (rows, cols of W1, d, [(row0, col0, rows, cols, rank)]); d == cols: identity
    "cols_on_0_1": (50, 32, D, [(0, 0, 50, 16, 0), (0, 16, 50, 16, 1)]),
    "cols_on_1_2": (41, 32, D, [(0, 0, 41, 8, 1), (0, 8, 41, 24, 2)]),
    "grid": (60, 32, D, [(0, 0, 30, 16, 0), (0, 16, 30, 16, 1), (30, 0, 30, 16, 2), (30, 16, 30, 16, 0)]),
    "two_pieces_on_2": (45, 32, D, [(0, 0, 45, 8, 2), (0, 8, 45, 8, 2), (0, 16, 45, 16, 0)]),
    "plain_cols_1_2": (20, D, D, [(0, 0, 20, 4, 1), (0, 4, 20, 4, 2)]),
    "whole_on_1": (33, 32, D, [(0, 0, 33, 32, 1)]),
}  # fmt: skip


def _hand_factors(name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    rows, cols, d, _ = HAND_TABLES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    w1 = torch.randn(rows, cols, generator=g)
    return w1, (torch.randn(cols, d, generator=g) if cols != d else None)


def _hand_rank_main() -> dict[str, Any]:
    from mlet_dist.distributed.collapse import table_layout
    from mlet_dist.distributed.shards import ShardSpec

    env = init_distributed(DistConfig(device="cpu"))
    layouts = {
        name: table_layout(name, rows, cols, d, [ShardSpec(*s) for s in shards])
        for name, (rows, cols, d, shards) in HAND_TABLES.items()
    }
    groups = make_groups(list(layouts.values()))
    out: dict[str, Any] = {"groups": sorted(groups)}
    real_all_reduce, dist.all_reduce = dist.all_reduce, _no_all_reduce
    try:
        for name, layout in layouts.items():
            w1, w2 = _hand_factors(name)
            local = [
                (s, w1[s.row0 : s.row0 + s.rows, s.col0 : s.col0 + s.cols].clone())
                for s in layout.shards
                if s.rank == env.rank
            ]
            tracker = MemoryTracker()
            blocks = collapse_table(layout, local, w2, groups, 4, "fp16", tracker)
            out[name] = {
                "blocks": [(b.block.start, b.values.clone(), b.served.clone()) for b in blocks],
                "largest": tracker.largest_bytes,
                "layout": layout,
            }
    finally:
        dist.all_reduce = real_all_reduce
    return out


@pytest.fixture(scope="module")
def hand_spawned() -> list[dict[str, Any]]:
    return run_ranks(_hand_rank_main, W3, timeout=180)


def test_partial_sums_are_reduced_within_sub_groups(hand_spawned) -> None:
    ranks = hand_spawned
    assert all(r["groups"] == [(0, 1), (0, 2), (1, 2)] for r in ranks), ranks[0]["groups"]
    for name, (rows, _, d, _) in HAND_TABLES.items():
        w1, w2 = _hand_factors(name)
        ref = w1.double() @ w2.double() if w2 is not None else w1.double()
        got = assemble([[(s, v) for s, v, _ in r[name]["blocks"]] for r in ranks], rows, name)
        assert (got.double() - ref).abs().max().item() <= 2e-6 * max(1.0, ref.abs().max().item())
        served = assemble([[(s, q) for s, _, q in r[name]["blocks"]] for r in ranks], rows, name)
        assert torch.equal(served, got.half()), name
        layout = ranks[0][name]["layout"]
        holders = {s.rank for s in layout.shards}
        for rank, r in enumerate(ranks):
            owned = sum(b.rows for b in layout.owned(rank))
            assert (owned > 0) == (rank in holders), (name, rank)  # owners hold a piece
            if len(holders) > 1:
                assert r[name]["largest"] < rows * d * 4, (name, rank)
    grid = ranks[0]["grid"]["layout"]
    assert [(b.start, b.stop, b.ranks) for b in grid.blocks] == [
        (0, 15, (0, 1)), (15, 30, (0, 1)), (30, 45, (0, 2)), (45, 60, (0, 2)),
    ]  # fmt: skip
