"""The optimizer registry of :mod:`mlet_dist.optim`: a new optimizer is one entry there.

The oracle test registers two optimizers the package does not have, a fused W1 kind (a damped
row-wise Adagrad: fbgemm's EXACT_ROWWISE_ADAGRAD with its own fixed eps, given as an extra fused
param) and a dense one (``torch.optim.RMSprop``), trains the sharded model (one gloo rank in this process) with them
through the ordinary road (``parallelize`` -> the sharder's fused params, ``build_optimizer``) and
compares every weight after each step with the unsharded copy trained by hand: W1 by the formula
below, W2 and the MLPs by ``torch.optim.RMSprop`` at their own rates.
"""

from __future__ import annotations

import typing

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from test_sharding import (
    ATOL,
    GLOBAL_BATCH,
    RTOL,
    W1_MODULE,
    W1_PREFIX,
    _copy_unsharded_state,
    _dense_params,
    build_model,
    global_batch,
    make_tables,
    slice_batch,
)
from torchrec.distributed.utils import optimizer_type_to_emb_opt_type
from torchrec.optim import RowWiseAdagrad

from mlet_dist.config import ConfigError, DistConfig, OptimConfig
from mlet_dist.distributed.parallelize import init_distributed, parallelize
from mlet_dist.distributed.sharding import annotate_fused_optimizer
from mlet_dist.optim import (
    DENSE_OPTIMIZERS,
    W1_OPTIMIZERS,
    DenseOptimizer,
    W1Optimizer,
    build_optimizer,
    dense_state_values,
    fused_params,
    fused_state_bytes,
)

DAMPING = 0.01  # the damped kind's eps: far above the row-wise Adagrad denominators here
STEPS = 3


def _rowwise_adagrad(w, state, grad, rows, lr, eps):
    """fbgemm EXACT_ROWWISE_ADAGRAD on the rows a batch looked up:
    state_r += mean_j g_rj^2; w_r -= lr * g_r / (sqrt(state_r) + eps)."""
    g = grad[rows]
    state[rows] += g.pow(2).mean(dim=1)
    w[rows] -= lr * g / (state[rows].sqrt() + eps).unsqueeze(1)


def _rmsprop(params, lr, cfg):
    return torch.optim.RMSprop(params, lr=lr, eps=cfg.eps)


@pytest.fixture
def registered(monkeypatch):
    """'rowwise_adagrad_damped' (W1) and 'rmsprop' (dense), registered for this test only."""
    monkeypatch.setitem(
        W1_OPTIMIZERS,
        "rowwise_adagrad_damped",
        W1Optimizer(
            EmbOptimType.EXACT_ROWWISE_ADAGRAD,
            RowWiseAdagrad,
            state_per_row=1,
            extra={"eps": DAMPING},
        ),
    )
    monkeypatch.setitem(DENSE_OPTIMIZERS, "rmsprop", DenseOptimizer(_rmsprop, state_per_param=1))
    return OptimConfig(
        embedding_optimizer="rowwise_adagrad_damped",
        embedding_lr=0.1,
        dense_optimizer="rmsprop",
        dense_lr=0.01,
        projection_lr=0.003,
        eps=1e-8,
    )


def _oracle(tables, opt_cfg, w1_eps):
    """The unsharded model trained by hand: W1 by :func:`_rowwise_adagrad`, the rest by
    ``torch.optim.RMSprop`` (W2 at projection_lr, the MLPs at dense_lr). Snapshots per step."""
    model = build_model(tables, torch.device("cpu"))
    named = dict(model.named_parameters())
    w1 = {t.name: named[f"{W1_PREFIX}{t.name}.weight"] for t in tables}
    feats = {t.name: t.feature_names for t in tables}
    dense = {n: p for n, p in named.items() if not n.startswith(W1_MODULE)}
    groups = [
        {
            "params": [p for n, p in dense.items() if ".projection." in n],
            "lr": opt_cfg.projection_lr,
        },
        {"params": [p for n, p in dense.items() if ".projection." not in n]},
    ]
    dense_opt = torch.optim.RMSprop(groups, lr=opt_cfg.dense_lr, eps=opt_cfg.eps)
    state = {name: torch.zeros(w.shape[0]) for name, w in w1.items()}
    snapshots = []
    for step in range(STEPS):
        gb = global_batch(tables, step)
        loss, _ = model(slice_batch(gb, 0, GLOBAL_BATCH))
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            for name, w in w1.items():
                rows = torch.cat([gb.ids[f] for f in feats[name]]).unique()
                _rowwise_adagrad(w, state[name], w.grad, rows, opt_cfg.embedding_lr, w1_eps)
        dense_opt.step()
        snapshots.append({n: p.detach().clone() for n, p in named.items()})
    return snapshots


def test_registered_optimizers_train_like_the_hand_computation(registered):
    opt_cfg = registered
    tables = make_tables(mean=True)
    env = init_distributed(DistConfig(device="cpu"))
    state = build_model(tables, torch.device("cpu")).state_dict()
    dmp = parallelize(
        build_model(tables, torch.device("meta")),
        env,
        DistConfig(device="cpu", sharding_types=["table_wise"]),
        opt_cfg,
        batch_size_per_rank=GLOBAL_BATCH,
    )
    _copy_unsharded_state(dmp, state)
    optimizer, _ = build_optimizer(dmp, opt_cfg)
    dense_parts = [o for name, o in optimizer.optimizers if name != "fused"]
    assert dense_parts and all(isinstance(o._optimizer, torch.optim.RMSprop) for o in dense_parts)
    dense = _dense_params(dmp.module)
    expected = _oracle(tables, opt_cfg, DAMPING)
    plain = _oracle(tables, opt_cfg, opt_cfg.eps)  # plain row-wise Adagrad: the test can tell
    for step in range(STEPS):
        loss, _ = dmp(slice_batch(global_batch(tables, step), 0, GLOBAL_BATCH))
        loss.backward()  # the fused W1 optimizer steps here
        optimizer.step()
        optimizer.zero_grad()
        got = {k: v for k, v in dmp.state_dict().items() if k.startswith(W1_PREFIX)}
        for key, value in got.items():
            (shard,) = value.local_shards()  # table_wise on one rank: the whole table
            want = expected[step][key]
            torch.testing.assert_close(shard.tensor, want, atol=ATOL, rtol=RTOL, msg=key)
            assert (shard.tensor - plain[step][key]).abs().max() > 100 * ATOL, key
        for name, p in dense.items():
            want = expected[step][name]
            torch.testing.assert_close(p.detach(), want, atol=ATOL, rtol=RTOL, msg=name)


def test_registered_kinds_reach_the_sharder_planner_and_memory_report(registered):
    opt_cfg = registered
    params = fused_params(opt_cfg, torch.device("cpu"))
    assert params["optimizer"] == EmbOptimType.EXACT_ROWWISE_ADAGRAD
    assert params["eps"] == DAMPING and params["learning_rate"] == opt_cfg.embedding_lr
    model = build_model(make_tables(mean=False), torch.device("meta"))
    annotate_fused_optimizer(model, opt_cfg)
    w1 = [p for n, p in model.named_parameters() if n.startswith(W1_MODULE)]
    assert w1 and all(p._optimizer_classes == [RowWiseAdagrad] for p in w1)
    assert fused_state_bytes("rowwise_adagrad_damped", 10, 32) == 10 * 4
    assert dense_state_values("rmsprop") == 1


@pytest.mark.parametrize("kind", sorted(W1_OPTIMIZERS))
def test_each_w1_kind_is_what_the_planner_and_fbgemm_agree_on(kind):
    """The sharder derives fbgemm's type from the planner's class: both must name one optimizer;
    the state the dry run counts is fbgemm's (row-wise: one fp32 per row, Adam: two per weight)."""
    spec = W1_OPTIMIZERS[kind]
    assert optimizer_type_to_emb_opt_type(spec.planner_class) == spec.fbgemm_type
    want = {"rowwise_adagrad": 7 * 4, "adagrad": 7 * 16 * 4, "sgd": 0, "adam": 2 * 7 * 16 * 4}
    assert fused_state_bytes(kind, 7, 16) == want[kind]


def _config_choices(key: str) -> set[str]:
    """The values the config accepts for ``optim.<key>`` (its Literal)."""
    hint = typing.get_type_hints(OptimConfig)[key]
    assert typing.get_origin(hint) is typing.Literal
    return set(typing.get_args(hint))


def test_config_choices_are_the_registered_optimizers():
    assert _config_choices("embedding_optimizer") == set(W1_OPTIMIZERS)
    assert _config_choices("dense_optimizer") == set(DENSE_OPTIMIZERS)


def test_unknown_and_gpu_only_kinds_are_refused_with_the_choices():
    with pytest.raises(ConfigError, match="'rowwise_adagrad', 'adagrad', 'sgd' on CPU"):
        fused_params(OptimConfig(embedding_optimizer="adam"), torch.device("cpu"))
    assert fused_params(OptimConfig(embedding_optimizer="adam"), torch.device("cuda"))["eps"]
    with pytest.raises(ConfigError, match="optim.dense_optimizer = 'nope'.*adagrad, adam, sgd"):
        dense_state_values("nope")
