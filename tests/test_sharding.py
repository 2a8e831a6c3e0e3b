"""Oracle tests of sharded MLET training: 2 gloo ranks on CPU vs the unsharded model.

For every sharding type the same DLRM over MLET tables is built twice from one seed: unsharded on
CPU (the oracle, run here in the test process on the full global batch) and on ``meta``, planned
with ``dist.sharding_types = [type]`` and wrapped by ``parallelize`` on 2 spawned ranks, each
rank training on its half of every global batch. The unsharded weights are copied into the shards
before the first step. Compared, step by step: logits and loss (forward), the DDP-averaged dense
gradients (backward), and after each optimizer step W1 (gathered from its shards), W2 and the MLP
weights. The oracle's optimizer is plain PyTorch: row-wise Adagrad (fbgemm EXACT_ROWWISE_ADAGRAD
semantics) or SGD for W1, ``torch.optim.Adagrad`` for W2 and the MLPs.

Measured semantics worth knowing: fbgemm keeps the row-wise Adagrad state per row *of each shard*,
so with column-based types (column_wise, table_column_wise, grid_shard) a row's state is the mean
of g^2 over that shard's columns only, not over all k columns. Training then depends on the column
split (the oracle follows the plan's column blocks; a full-row oracle differs by far more than the
tolerance). Row-based and table-wise types match the unsharded optimizer exactly.

All cases run inside one 2-rank spawn (a module-scoped fixture) to pay the ~10 s start-up once;
each case is still its own test.
"""

from __future__ import annotations

import dataclasses
import operator
import os
import time
import traceback
from dataclasses import dataclass

import pytest
import torch
from dist_utils import RankError, run_ranks
from torchrec.datasets.utils import Batch
from torchrec.distributed.types import EmbeddingModuleShardingPlan, ParameterSharding, ShardingPlan
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mlet_dist.config import ConfigError, DistConfig, ModelConfig, OptimConfig
from mlet_dist.distributed.parallelize import init_distributed, parallelize
from mlet_dist.distributed.sharding import (
    MLETEmbeddingBagCollectionSharder,
    build_constraints,
    check_plan,
)
from mlet_dist.models import build_dlrm
from mlet_dist.modules import MLETEmbeddingBagCollection, MLETEmbeddingBagConfig
from mlet_dist.optim import build_optimizer

WORLD_SIZE = 2
D = 8
GLOBAL_BATCH = 32
STEPS = 2
SEED = 0
DENSE_IN = 13
ATOL, RTOL = 1e-5, 1e-4
W1_MODULE = "model.sparse_arch.embedding_bag_collection.w1"
W1_PREFIX = W1_MODULE + ".embedding_bags."


# -- the model and the data -------------------------------------------------------------------


def make_tables(mean: bool, uniform: bool = False) -> list[MLETEmbeddingBagConfig]:
    """Four tables: factorized (k=32, k=16 shared by two features), one ordinary (inner_dim None).

    With ``mean`` two of them are MEAN-pooled, the others SUM-pooled. With ``uniform`` every table
    is factorized with k=32, which takes the module's (B, F, d) fast path.
    """
    sum_, mean_ = PoolingType.SUM, (PoolingType.MEAN if mean else PoolingType.SUM)
    tables = [
        MLETEmbeddingBagConfig(
            name="t_wide", num_embeddings=200, embedding_dim=D, inner_dim=32,
            feature_names=["f_wide"], pooling=sum_,
        ),
        MLETEmbeddingBagConfig(
            name="t_shared", num_embeddings=120, embedding_dim=D, inner_dim=16,
            feature_names=["f_a", "f_b"], pooling=mean_,
        ),
        MLETEmbeddingBagConfig(
            name="t_plain", num_embeddings=50, embedding_dim=D, inner_dim=None,
            feature_names=["f_plain"], pooling=sum_,
        ),
        MLETEmbeddingBagConfig(
            name="t_mean", num_embeddings=80, embedding_dim=D, inner_dim=32,
            feature_names=["f_mean"], pooling=mean_,
        ),
    ]  # fmt: skip
    if uniform:
        tables = [dataclasses.replace(t, inner_dim=32) for t in tables]
    return tables


def build_model(
    tables: list[MLETEmbeddingBagConfig],
    w1_device: torch.device,
    dense_device: torch.device | None = None,
):
    """DLRMTrain over an MLET module; W2 and the MLPs on ``dense_device`` (CPU), W1 on
    ``w1_device``."""
    dense_device = dense_device or torch.device("cpu")
    torch.manual_seed(SEED)
    mlet = MLETEmbeddingBagCollection(tables, device=w1_device, projection_device=dense_device)
    model_cfg = ModelConfig(
        embedding_dim=D, dense_arch_layer_sizes=[16, D], over_arch_layer_sizes=[16, 1]
    )
    return build_dlrm(model_cfg, [], w1_device, dense_device, embedding_module=mlet)


@dataclass
class GlobalBatch:
    dense: torch.Tensor  # (B, 13)
    labels: torch.Tensor  # (B,)
    lengths: dict[str, torch.Tensor]  # feature -> (B,) ids per bag, 0..3 (empty bags too)
    ids: dict[str, torch.Tensor]  # feature -> concatenated ids of the B bags


def global_batch(tables: list[MLETEmbeddingBagConfig], step: int) -> GlobalBatch:
    """The same seeded global batch on every process; bags of 0-3 ids, repeats included."""
    g = torch.Generator().manual_seed(1000 + step)
    lengths, ids = {}, {}
    for t in tables:
        for f in t.feature_names:
            lengths[f] = torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)
            ids[f] = torch.randint(0, t.num_embeddings, (int(lengths[f].sum()),), generator=g)
    dense = torch.rand(GLOBAL_BATCH, DENSE_IN, generator=g)
    labels = torch.randint(0, 2, (GLOBAL_BATCH,), generator=g).float()
    return GlobalBatch(dense, labels, lengths, ids)


def slice_batch(gb: GlobalBatch, lo: int, hi: int) -> Batch:
    """Samples ``lo:hi`` of a global batch as a TorchRec Batch."""
    keys = list(gb.lengths)
    values, lengths = [], []
    for f in keys:
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), gb.lengths[f].cumsum(0)])
        values.append(gb.ids[f][offsets[lo] : offsets[hi]])
        lengths.append(gb.lengths[f][lo:hi])
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.cat(values), lengths=torch.cat(lengths)
    )
    return Batch(dense_features=gb.dense[lo:hi], sparse_features=kjt, labels=gb.labels[lo:hi])


# -- the cases --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    sharding_type: str
    mean: bool = True
    embedding_optimizer: str = "rowwise_adagrad"
    min_partition: int = 0
    uniform: bool = False
    dense_optimizer: str = "adagrad"

    def tables(self) -> list[MLETEmbeddingBagConfig]:
        return make_tables(self.mean, self.uniform)

    def dist_cfg(self, device: str = "cpu") -> DistConfig:
        return DistConfig(
            device=device, sharding_types=[self.sharding_type], min_partition=self.min_partition
        )

    def optim_cfg(self) -> OptimConfig:
        return OptimConfig(
            embedding_optimizer=self.embedding_optimizer,
            embedding_lr=0.1,
            dense_optimizer=self.dense_optimizer,
            dense_lr=0.05,
            projection_lr=0.03,
            eps=1e-8,
        )


CASES = [
    Case("table_wise", "table_wise"),
    Case("row_wise", "row_wise"),
    Case("column_wise", "column_wise", min_partition=8),
    Case("table_row_wise", "table_row_wise"),
    Case("table_column_wise", "table_column_wise", min_partition=8),
    # grid_shard is refused for MEAN tables (see the guard tests below): SUM pooling only.
    Case("grid_shard_sum", "grid_shard", mean=False, min_partition=8),
    # SGD is linear in the gradient, so it also checks the scale of W1's gradient (Adagrad's
    # first step is scale-invariant): the oracle's loss is the mean over the global batch.
    Case("row_wise_sgd", "row_wise", embedding_optimizer="sgd"),
    # every table k=32: the (B, F, d) fast path over the sharded EBC's reordered output
    Case("table_wise_uniform", "table_wise", uniform=True),
    # (dense SGD here: Adagrad's first steps normalize near-zero gradients, which turns float32
    # summation-order noise of the column pieces into 1e-5 differences on single elements)
    Case(
        "column_wise_uniform", "column_wise", min_partition=8, uniform=True, dense_optimizer="sgd"
    ),
    Case("column_wise_sgd", "column_wise", embedding_optimizer="sgd", min_partition=8),
]


# -- the sharded side (runs on every rank) ----------------------------------------------------


def _dense_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Parameters not trained by the fused optimizer (W2 and the MLPs), by unsharded name."""
    return {
        n: p
        for n, p in model.named_parameters()
        if not n.startswith(W1_MODULE) and not hasattr(p, "_in_backward_optimizers")
    }


def _plan_of(dmp) -> dict[str, dict]:
    """table -> sharding type and its shards as (row0, col0, rows, cols, rank)."""
    out = {}
    for name, ps in dmp.plan.plan[W1_MODULE].items():
        shards = [
            (*m.shard_offsets, *m.shard_sizes, m.placement.rank()) for m in ps.sharding_spec.shards
        ]
        out[name] = {"sharding_type": ps.sharding_type, "shards": shards}
    return out


def _w1_local_shards(dmp) -> dict[str, list[tuple[int, int, torch.Tensor]]]:
    """table -> this rank's W1 shards as (row0, col0, tensor on CPU)."""
    out: dict[str, list] = {}
    for key, value in dmp.state_dict().items():
        if key.startswith(W1_PREFIX):
            table = key[len(W1_PREFIX) :].removesuffix(".weight")
            out[table] = [
                (*s.metadata.shard_offsets, s.tensor.detach().to("cpu", copy=True))
                for s in value.local_shards()
            ]
    return out


@torch.no_grad()
def _copy_unsharded_state(dmp, state: dict[str, torch.Tensor]) -> None:
    """Copies a full (unsharded) state dict into the sharded model, shard by shard."""
    sharded = dmp.state_dict()
    assert sorted(sharded) == sorted(state), (sorted(sharded), sorted(state))
    for key, target in sharded.items():
        full = state[key]
        if hasattr(target, "local_shards"):
            for s in target.local_shards():
                (r0, c0), (nr, nc) = s.metadata.shard_offsets, s.metadata.shard_sizes
                s.tensor.copy_(full[r0 : r0 + nr, c0 : c0 + nc])
        else:
            target.copy_(full)


def _run_case(case: Case, env) -> dict:
    """Trains the sharded model on this rank's slices (on ``env.device``); results on CPU."""
    tables = case.tables()
    state = build_model(tables, torch.device("cpu")).state_dict()
    per_rank = GLOBAL_BATCH // env.world_size
    dmp = parallelize(
        build_model(tables, torch.device("meta"), env.device),
        env,
        case.dist_cfg(env.device.type),
        case.optim_cfg(),
        batch_size_per_rank=per_rank,
    )
    _copy_unsharded_state(dmp, state)
    optimizer, _ = build_optimizer(dmp, case.optim_cfg())
    dense = _dense_params(dmp.module)
    result: dict = {"plan": _plan_of(dmp), "w1_initial": _w1_local_shards(dmp), "steps": []}
    lo = env.rank * per_rank
    for step in range(STEPS):
        batch = slice_batch(global_batch(tables, step), lo, lo + per_rank).to(env.device)
        loss, (_, logits, _) = dmp(batch)
        loss.backward()  # the fused W1 optimizer steps here
        grads = {n: p.grad.detach().to("cpu", copy=True) for n, p in dense.items()}
        optimizer.step()
        optimizer.zero_grad()
        result["steps"].append(
            {
                "loss": loss.detach().to("cpu", copy=True),
                "logits": logits.detach().to("cpu", copy=True),
                "grads": grads,
                "dense": {n: p.detach().to("cpu", copy=True) for n, p in dense.items()},
                "w1": _w1_local_shards(dmp),
            }
        )
    return result


def _run_cases(cases: list[Case], device: str = "cpu") -> dict[str, dict]:
    """On each rank: every case in turn; a case that raises records its traceback."""
    env = init_distributed(DistConfig(device=device))
    out = {}
    for case in cases:
        try:
            out[case.name] = _run_case(case, env)
        except Exception:
            out[case.name] = {"error": traceback.format_exc()}
    return out


# -- the oracle (unsharded, plain PyTorch) ----------------------------------------------------


def _column_blocks(plan: dict) -> list[tuple[int, int]]:
    """The column ranges of a table's shards: fbgemm keeps row-wise Adagrad state per shard."""
    return sorted({(s[1], s[1] + s[3]) for s in plan["shards"]})


def run_oracle(case: Case, plan: dict[str, dict]) -> list[dict]:
    """The unsharded model trained on the full global batches, one snapshot per step.

    W1: row-wise Adagrad (fbgemm EXACT_ROWWISE_ADAGRAD: per row, state += mean(g^2) over the
    row's columns *within one shard*, w -= lr * g / (sqrt(state) + eps)) or SGD; dense: torch
    Adagrad (or SGD) with the projection's own learning rate.
    """
    tables = case.tables()
    model = build_model(tables, torch.device("cpu"))
    opt_cfg = case.optim_cfg()
    named = dict(model.named_parameters())
    w1 = {t.name: named[f"{W1_PREFIX}{t.name}.weight"] for t in tables}
    dense = {n: p for n, p in named.items() if not n.startswith(W1_MODULE)}
    projection = [p for n, p in dense.items() if ".projection." in n]
    others = [p for n, p in dense.items() if ".projection." not in n]
    groups = [{"params": projection, "lr": opt_cfg.projection_lr}, {"params": others}]
    if opt_cfg.dense_optimizer == "sgd":
        dense_opt = torch.optim.SGD(groups, lr=opt_cfg.dense_lr)
    else:
        dense_opt = torch.optim.Adagrad(groups, lr=opt_cfg.dense_lr, eps=opt_cfg.eps)
    w1_state = {
        name: torch.zeros(w.shape[0], len(_column_blocks(plan[name]))) for name, w in w1.items()
    }
    snapshots = []
    for step in range(STEPS):
        gb = global_batch(tables, step)
        loss, (_, logits, _) = model(slice_batch(gb, 0, GLOBAL_BATCH))
        per_sample = torch.nn.functional.binary_cross_entropy_with_logits(
            logits.detach(), gb.labels, reduction="none"
        )
        model.zero_grad()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in dense.items()}
        with torch.no_grad():
            for name, w in w1.items():
                g = w.grad
                if case.embedding_optimizer == "sgd":
                    w -= opt_cfg.embedding_lr * g
                    continue
                for j, (c0, c1) in enumerate(_column_blocks(plan[name])):
                    w1_state[name][:, j] += g[:, c0:c1].pow(2).mean(dim=1)
                    denom = w1_state[name][:, j : j + 1].sqrt() + opt_cfg.eps
                    w[:, c0:c1] -= opt_cfg.embedding_lr * g[:, c0:c1] / denom
        dense_opt.step()
        snapshots.append(
            {
                "loss": loss.detach(),
                "per_sample_loss": per_sample,
                "logits": logits.detach(),
                "grads": grads,
                "dense": {n: p.detach().clone() for n, p in dense.items()},
                "w1": {n: w.detach().clone() for n, w in w1.items()},
            }
        )
    return snapshots


def gather_w1(
    per_rank: list[dict[str, list]], shapes: dict[str, tuple[int, int]]
) -> dict[str, torch.Tensor]:
    """Assembles full W1 tables from every rank's shards; checks each element is covered once."""
    out = {}
    for name, (rows, cols) in shapes.items():
        full = torch.zeros(rows, cols)
        cover = torch.zeros(rows, cols, dtype=torch.int)
        for shards in per_rank:
            for r0, c0, t in shards.get(name, []):
                full[r0 : r0 + t.shape[0], c0 : c0 + t.shape[1]] = t
                cover[r0 : r0 + t.shape[0], c0 : c0 + t.shape[1]] += 1
        assert bool((cover == 1).all()), f"{name}: shards do not tile the table exactly once"
        out[name] = full
    return out


# -- the tests --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded_results() -> list[dict[str, dict]]:
    return run_ranks(_run_cases, WORLD_SIZE, CASES, timeout=150)


def _close(actual, expected, what: str) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def _check_plan(case: Case, plan: dict[str, dict]) -> None:
    """The 2-rank plan really splits the tables as the case's sharding type says."""
    ranks_of = {name: {s[4] for s in p["shards"]} for name, p in plan.items()}
    col_splits = {name: len(_column_blocks(p)) for name, p in plan.items()}
    row_splits = {name: len({s[0] for s in p["shards"]}) for name, p in plan.items()}
    kind = case.sharding_type
    if kind == "table_wise":
        assert all(len(p["shards"]) == 1 for p in plan.values()), plan
        assert set().union(*ranks_of.values()) == set(range(WORLD_SIZE)), ranks_of
    if kind in ("row_wise", "table_row_wise", "grid_shard"):
        # every table is split by rows over both ranks
        assert all(r == set(range(WORLD_SIZE)) for r in ranks_of.values()), ranks_of
        assert all(n == WORLD_SIZE for n in row_splits.values()), row_splits
    if kind in ("column_wise", "table_column_wise", "grid_shard"):
        # min_partition=8 < k: the k=32 tables really are split into column blocks
        assert col_splits["t_wide"] > 1 and col_splits["t_mean"] > 1, col_splits
    if kind in ("column_wise", "table_column_wise"):
        assert all(n == 1 for n in row_splits.values()), row_splits
        assert any(len(r) == WORLD_SIZE for r in ranks_of.values()), ranks_of


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_sharded_training_matches_unsharded(case: Case, sharded_results) -> None:
    ranks = [r[case.name] for r in sharded_results]
    check_against_oracle(case, ranks)
    _check_plan(case, ranks[0]["plan"])


def check_against_oracle(case: Case, ranks: list[dict]) -> None:
    """Every rank's results of one case (any world size) vs the unsharded oracle, step by step."""
    for rank, r in enumerate(ranks):
        if "error" in r:
            pytest.fail(f"rank {rank} failed on {case.name}:\n{r['error']}")
    plan = ranks[0]["plan"]
    assert all(r["plan"] == plan for r in ranks[1:]), "the ranks disagree on the sharding plan"
    for name, p in plan.items():
        assert p["sharding_type"] == case.sharding_type, (name, p)

    tables = case.tables()
    shapes = {t.name: (t.num_embeddings, t.inner_dim or t.embedding_dim) for t in tables}
    oracle = run_oracle(case, plan)
    initial = build_model(tables, torch.device("cpu")).state_dict()
    w1_initial = gather_w1([r["w1_initial"] for r in ranks], shapes)
    for name, w in w1_initial.items():
        assert torch.equal(w, initial[f"{W1_PREFIX}{name}.weight"]), f"copy of W1 {name}"

    per_rank = GLOBAL_BATCH // len(ranks)
    for step, ref in enumerate(oracle):
        got = [r["steps"][step] for r in ranks]
        where = f"{case.name} step {step}"
        # forward: each rank's logits are its slice of the global batch
        _close(torch.cat([g["logits"] for g in got]), ref["logits"], f"{where} logits")
        for rank, g in enumerate(got):
            half = ref["per_sample_loss"][rank * per_rank : (rank + 1) * per_rank].mean()
            _close(g["loss"], half, f"{where} loss of rank {rank}")
        _close(torch.stack([g["loss"] for g in got]).mean(), ref["loss"], f"{where} mean loss")
        # backward: DDP's averaged dense gradients equal the full-batch gradient
        for name, grad in ref["grads"].items():
            for rank, g in enumerate(got):
                _close(g["grads"][name], grad, f"{where} grad of {name} on rank {rank}")
        # optimizer step: W1 from the shards of both ranks; W2 and MLPs, identical on both ranks
        w1 = gather_w1([g["w1"] for g in got], shapes)
        for name, w in ref["w1"].items():
            _close(w1[name], w, f"{where} W1 {name}")
        for name, w in ref["dense"].items():
            _close(got[0]["dense"][name], w, f"{where} {name}")
            for rank, g in enumerate(got[1:], 1):
                assert torch.equal(got[0]["dense"][name], g["dense"][name]), (
                    f"{where}: {name} differs between rank 0 and rank {rank}"
                )


# -- the grid_shard + MEAN guard (no processes needed) ----------------------------------------


def test_constraints_never_offer_grid_shard_for_mean_tables() -> None:
    tables = make_tables(mean=True)
    for allowed in ([], ["grid_shard", "row_wise"], ["grid_shard", "table_wise", "column_wise"]):
        constraints = build_constraints(tables, DistConfig(sharding_types=allowed))
        for t in tables:
            types = constraints[t.name].sharding_types
            assert (t.pooling == PoolingType.MEAN) == ("grid_shard" not in types), (t.name, types)
    with pytest.raises(ConfigError, match=r"t_shared.*MEAN"):
        build_constraints(tables, DistConfig(sharding_types=["grid_shard"]))


def test_check_plan_refuses_grid_shard_for_a_mean_table() -> None:
    tables = make_tables(mean=True)

    def plan(sharding: dict[str, str]) -> ShardingPlan:
        return ShardingPlan(
            plan={
                W1_MODULE: EmbeddingModuleShardingPlan(
                    {
                        name: ParameterSharding(
                            sharding_type=kind, compute_kernel="fused", ranks=[0, 1]
                        )
                        for name, kind in sharding.items()
                    }
                )
            }
        )

    ok = {"t_wide": "grid_shard", "t_shared": "row_wise", "t_plain": "grid_shard"}
    check_plan(plan({**ok, "t_mean": "table_wise"}), tables)
    with pytest.raises(ConfigError, match="t_mean"):
        check_plan(plan({**ok, "t_mean": "grid_shard"}), tables)


def test_sharder_offers_row_based_types_on_cpu() -> None:
    types = MLETEmbeddingBagCollectionSharder().sharding_types("cpu")
    for kind in ("table_wise", "row_wise", "column_wise", "table_row_wise", "table_column_wise"):
        assert kind in types
    assert "grid_shard" in types


# -- the multi-process helper itself ----------------------------------------------------------


@pytest.mark.slow
def test_run_ranks_returns_each_ranks_result() -> None:
    assert run_ranks(os.getenv, WORLD_SIZE, "RANK", timeout=60) == ["0", "1"]


@pytest.mark.slow
def test_run_ranks_reports_exceptions_and_timeouts() -> None:
    with pytest.raises(RankError, match=r"(?s)rank 0 raised.*ZeroDivisionError"):
        run_ranks(operator.truediv, WORLD_SIZE, 1, 0, timeout=60)
    with pytest.raises(RankError, match="did not finish within 3 s"):
        run_ranks(time.sleep, WORLD_SIZE, 60, timeout=3)


def _one_rank_with_and_without_ddp() -> dict:
    """One rank: the same model sharded twice, once wrapped in DDP (TorchRec's default) and once
    as ``parallelize`` leaves it at world size 1; two training steps on each."""
    from torch.nn.parallel import DistributedDataParallel

    env = init_distributed(DistConfig(device="cpu"))
    case = CASES[0]
    tables = case.tables()
    out = {}
    for name, data_parallel in (("ddp", True), ("auto", None)):
        dmp = parallelize(
            build_model(tables, torch.device("meta")),
            env,
            case.dist_cfg(),
            case.optim_cfg(),
            batch_size_per_rank=GLOBAL_BATCH,
            data_parallel=data_parallel,
        )
        _copy_unsharded_state(dmp, build_model(tables, torch.device("cpu")).state_dict())
        optimizer, _ = build_optimizer(dmp, case.optim_cfg())
        dense = _dense_params(dmp.module)
        steps = []
        for step in range(STEPS):
            batch = slice_batch(global_batch(tables, step), 0, GLOBAL_BATCH)
            loss, _ = dmp(batch)
            loss.backward()
            steps.append({n: p.grad.detach().clone() for n, p in dense.items()})
            optimizer.step()
            optimizer.zero_grad()
        out[name] = {
            "wrapped": isinstance(dmp._dmp_wrapped_module, DistributedDataParallel),
            "grads": steps,
            "w1": _w1_local_shards(dmp),
            "state_keys": sorted(dmp.state_dict()),
            "param_names": [n for n, _ in dmp.named_parameters()],
        }
    return out


def test_one_rank_skips_ddp_with_identical_gradients() -> None:
    """At world size 1 ``parallelize`` leaves the dense part unwrapped (no all-reduce to pay);
    the oracle is TorchRec's default DDP wrapping of the same model: same gradients bit for bit,
    same W1 after the fused updates, same state-dict keys and parameter names."""
    (res,) = run_ranks(_one_rank_with_and_without_ddp, 1, timeout=120)
    ddp, auto = res["ddp"], res["auto"]
    assert ddp["wrapped"] and not auto["wrapped"]
    assert ddp["state_keys"] == auto["state_keys"]
    assert ddp["param_names"] == auto["param_names"]
    for g_ddp, g_auto in zip(ddp["grads"], auto["grads"], strict=True):
        assert g_ddp.keys() == g_auto.keys() and g_ddp
        for n in g_ddp:
            assert torch.equal(g_ddp[n], g_auto[n]), n
    for t in ddp["w1"]:
        for (r0, c0, a), (r1, c1, b) in zip(ddp["w1"][t], auto["w1"][t], strict=True):
            assert (r0, c0) == (r1, c1) and torch.equal(a, b), t
