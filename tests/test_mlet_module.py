"""Oracle tests of the pure MLET module and its collapse.

The reference is an independent float64 computation: pool the rows of (W1 @ W2) by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from mlet_dist.config import ModelConfig
from mlet_dist.models import build_dlrm
from mlet_dist.modules import (
    MLETConfigError,
    MLETEmbeddingBagCollection,
    MLETEmbeddingBagConfig,
    collapse,
)


def make_tables(pooling: PoolingType, d: int = 8) -> list[MLETEmbeddingBagConfig]:
    return [
        # two features share one factorized table
        MLETEmbeddingBagConfig(
            name="t_shared",
            num_embeddings=97,
            embedding_dim=d,
            inner_dim=32,
            feature_names=["f_a", "f_b"],
            pooling=pooling,
        ),
        MLETEmbeddingBagConfig(
            name="t_wide",
            num_embeddings=50,
            embedding_dim=d,
            inner_dim=64,
            feature_names=["f_c"],
            pooling=pooling,
        ),
        # k == d is allowed
        MLETEmbeddingBagConfig(
            name="t_square",
            num_embeddings=13,
            embedding_dim=d,
            inner_dim=d,
            feature_names=["f_d"],
            pooling=pooling,
        ),
        # an ordinary single-layer table in the same module
        MLETEmbeddingBagConfig(
            name="t_plain",
            num_embeddings=31,
            embedding_dim=d,
            inner_dim=None,
            feature_names=["f_e"],
            pooling=pooling,
        ),
    ]


def random_kjt(
    tables: list[MLETEmbeddingBagConfig], batch: int, weighted: bool, gen: torch.Generator
) -> KeyedJaggedTensor:
    keys, lengths, values = [], [], []
    for t in tables:
        for f in t.feature_names:
            keys.append(f)
            ln = torch.randint(0, 5, (batch,), generator=gen)
            ln[0] = 0  # always at least one empty bag
            lengths.append(ln)
            values.append(torch.randint(0, t.num_embeddings, (int(ln.sum()),), generator=gen))
    v = torch.cat(values)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=v,
        lengths=torch.cat(lengths),
        weights=torch.rand(v.numel(), generator=gen) + 0.1 if weighted else None,
    )


def reference_pooled(
    mlet: MLETEmbeddingBagCollection, kjt: KeyedJaggedTensor
) -> dict[str, torch.Tensor]:
    """Float64 pooling of the collapsed rows, written with loops (independent of TorchRec)."""
    out = {}
    jt = kjt.to_dict()
    for t in mlet.mlet_configs():
        w1 = mlet.w1.embedding_bags[t.name].weight.detach().double()
        w = w1 @ mlet.projection.weights[t.name].detach().double() if t.inner_dim else w1
        for f in t.feature_names:
            rows = []
            for i in range(kjt.stride()):
                start, stop = jt[f].offsets()[i].item(), jt[f].offsets()[i + 1].item()
                ids = jt[f].values()[start:stop]
                wts = (
                    jt[f].weights()[start:stop].double()
                    if kjt.weights_or_none() is not None
                    else torch.ones(len(ids), dtype=torch.float64)
                )
                pooled = (w[ids] * wts[:, None]).sum(0)
                if t.pooling == PoolingType.MEAN and len(ids) > 0:
                    pooled = pooled / len(ids)
                rows.append(pooled)
            out[f] = torch.stack(rows)
    return out


@pytest.mark.parametrize(
    "pooling,weighted",
    [(PoolingType.SUM, False), (PoolingType.SUM, True), (PoolingType.MEAN, False)],
)
def test_mlet_and_collapsed_outputs_match_float64_reference(pooling, weighted):
    torch.manual_seed(0)
    tables = make_tables(pooling)
    mlet = MLETEmbeddingBagCollection(tables, is_weighted=weighted)
    ebc = collapse(mlet, chunk_rows=7)  # small chunks: exercise the chunk loop and its tail
    assert type(ebc) is EmbeddingBagCollection
    assert [c.name for c in ebc.embedding_bag_configs()] == [t.name for t in tables]
    assert all(c.embedding_dim == 8 and c.pooling == pooling for c in ebc.embedding_bag_configs())
    assert ebc.is_weighted() == weighted
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        kjt = random_kjt(tables, batch=11, weighted=weighted, gen=gen)
        ref = reference_pooled(mlet, kjt)
        got_mlet = mlet(kjt)
        got_collapsed = ebc(kjt)
        assert got_mlet.keys() == ["f_a", "f_b", "f_c", "f_d", "f_e"]
        for f, expected in ref.items():
            scale = expected.abs().max().clamp_min(1e-6)
            assert (got_mlet[f].double() - expected).abs().max() / scale < 1e-5, f
            assert (got_collapsed[f].double() - expected).abs().max() / scale < 1e-5, f
            assert (got_collapsed[f] - got_mlet[f]).abs().max() / scale < 1e-5, f
            assert expected[0].abs().max() == 0  # the empty bag pools to zero


def test_collapsed_weights_are_w1_times_w2():
    mlet = MLETEmbeddingBagCollection(make_tables(PoolingType.SUM))
    ebc = collapse(mlet, chunk_rows=10)
    for t in mlet.mlet_configs():
        w1 = mlet.w1.embedding_bags[t.name].weight.detach().double()
        expected = w1 @ mlet.projection.weights[t.name].detach().double() if t.inner_dim else w1
        got = ebc.embedding_bags[t.name].weight.detach().double()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


class _PermutingEBC(torch.nn.Module):
    """Wraps an EBC and returns its output keys in reversed order, as a sharded EBC may."""

    def __init__(self, ebc: EmbeddingBagCollection) -> None:
        super().__init__()
        self.ebc = ebc

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
        kt = self.ebc(kjt)
        d = kt.to_dict()
        keys = list(reversed(kt.keys()))
        return KeyedTensor.from_tensor_list(keys, [d[k] for k in keys])


def test_output_does_not_depend_on_w1_key_order():
    tables = make_tables(PoolingType.SUM)
    mlet = MLETEmbeddingBagCollection(tables)
    kjt = random_kjt(tables, 6, False, torch.Generator().manual_seed(3))
    before = mlet(kjt).to_dict()
    mlet.w1 = _PermutingEBC(mlet.w1)
    after = mlet(kjt)
    assert after.keys() == list(before)
    for f, v in before.items():
        torch.testing.assert_close(after[f], v)


def test_k_smaller_than_d_is_refused_naming_the_table():
    bad = MLETEmbeddingBagConfig(
        name="t_small", num_embeddings=10, embedding_dim=16, inner_dim=8, feature_names=["f"]
    )
    with pytest.raises(MLETConfigError, match=r"t_small.*k=8.*d=16"):
        MLETEmbeddingBagCollection([bad])


def test_single_layer_tables_equal_a_plain_ebc():
    """inner_dim=None goes through the same module and equals TorchRec's EBC with those weights."""
    tables = [
        MLETEmbeddingBagConfig(
            name=f"t{i}", num_embeddings=20, embedding_dim=4, feature_names=[f"f{i}"]
        )
        for i in range(3)
    ]
    mlet = MLETEmbeddingBagCollection(tables)
    assert len(list(mlet.projection.parameters())) == 0
    plain = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name=t.name, num_embeddings=20, embedding_dim=4, feature_names=t.feature_names
            )
            for t in tables
        ]
    )
    plain.load_state_dict({k.removeprefix("w1."): v for k, v in mlet.state_dict().items()})
    kjt = random_kjt(tables, 5, False, torch.Generator().manual_seed(4))
    torch.testing.assert_close(mlet(kjt).values(), plain(kjt).values())


def test_baseline_and_mlet_models_share_the_code_path():
    sizes = [30, 40, 50]
    names = ["cat_0", "cat_1", "cat_2"]
    mlet_model = build_dlrm(ModelConfig(inner_dim=32), sizes, embedding_device=torch.device("cpu"))
    base_model = build_dlrm(ModelConfig(inner_dim=0), sizes, embedding_device=torch.device("cpu"))
    m = mlet_model.model.sparse_arch.embedding_bag_collection
    b = base_model.model.sparse_arch.embedding_bag_collection
    assert type(m) is type(b) is MLETEmbeddingBagCollection
    assert [t.feature_names[0] for t in b.mlet_configs()] == names
    assert len(list(b.projection.parameters())) == 0
    assert {p.shape for p in m.projection.parameters()} == {torch.Size([32, 16])}
    assert all(bag.weight.shape[1] == 16 for bag in b.w1.embedding_bags.values())
    assert all(bag.weight.shape[1] == 32 for bag in m.w1.embedding_bags.values())


def test_meta_build_then_materialize():
    tables = make_tables(PoolingType.SUM)
    mlet = MLETEmbeddingBagCollection(tables, device=torch.device("meta"))
    assert all(p.is_meta for p in mlet.w1.parameters())
    assert not any(p.is_meta for p in mlet.projection.parameters())
    mlet.w1.to_empty(device="cpu")
    mlet.reset_parameters()
    for t in tables:
        w = mlet.w1.embedding_bags[t.name].weight
        bound = math.sqrt(1.0 / t.num_embeddings)
        assert w.abs().max() <= bound + 1e-7
        assert w.abs().max() > 0.5 * bound  # actually drawn over the range


@pytest.mark.parametrize("init", ["normal", "xavier", "orthogonal"])
def test_projection_inits(init):
    k, d = 256, 16
    t = MLETEmbeddingBagConfig(
        name="t", num_embeddings=5, embedding_dim=d, inner_dim=k, feature_names=["f"]
    )
    torch.manual_seed(0)
    w2 = MLETEmbeddingBagCollection([t], projection_init=init).projection.weights["t"].detach()
    assert w2.shape == (k, d)
    if init == "normal":
        assert abs(w2.std().item() - 1 / math.sqrt(k)) < 0.1 / math.sqrt(k)
    elif init == "xavier":
        bound = math.sqrt(6.0 / (k + d))
        assert w2.abs().max() <= bound and w2.abs().max() > 0.9 * bound
    else:
        torch.testing.assert_close(w2.T @ w2, torch.eye(d), atol=1e-5, rtol=0)
    w2_std = MLETEmbeddingBagCollection([t], projection_init="normal", projection_init_std=0.5)
    assert abs(w2_std.projection.weights["t"].std().item() - 0.5) < 0.05


def test_unknown_projection_init_is_refused():
    t = MLETEmbeddingBagConfig(
        name="t", num_embeddings=5, embedding_dim=4, inner_dim=8, feature_names=["f"]
    )
    with pytest.raises(MLETConfigError, match="kaiming"):
        MLETEmbeddingBagCollection([t], projection_init="kaiming")


def test_weighted_mean_is_refused_clearly():
    with pytest.raises(MLETConfigError, match="MEAN pooling"):
        MLETEmbeddingBagCollection(make_tables(PoolingType.MEAN), is_weighted=True)


@pytest.mark.parametrize("inner_dim", [32, None])
@pytest.mark.parametrize("permute", [False, True])
def test_uniform_fast_path_matches_reference(inner_dim, permute):
    """All tables with the same (k, d) (or all single-layer): the (B, F, d) fast path."""
    tables = [
        MLETEmbeddingBagConfig(
            name=f"t{i}",
            num_embeddings=20 + i,
            embedding_dim=8,
            inner_dim=inner_dim,
            feature_names=[f"f{i}"] if i else ["f0", "f0b"],
        )
        for i in range(4)
    ]
    mlet = MLETEmbeddingBagCollection(tables, is_weighted=True)
    assert mlet._uniform is not None
    kjt = random_kjt(tables, 9, True, torch.Generator().manual_seed(5))
    ref = reference_pooled(mlet, kjt)
    if permute:
        mlet.w1 = _PermutingEBC(mlet.w1)
    pooled = mlet.forward_pooled(kjt)
    kt = mlet(kjt)
    assert kt.keys() == ["f0", "f0b", "f1", "f2", "f3"]
    assert pooled.shape == (9, 5, 8)
    for i, f in enumerate(kt.keys()):
        torch.testing.assert_close(pooled[:, i].double(), ref[f], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(kt[f].double(), ref[f], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("inner_dim", [32, None])
@pytest.mark.parametrize("permute", [False, True])
def test_uniform_fast_path_gradients_match_reference(inner_dim, permute):
    """Gradients of W1 and W2 through the fast path (also when W1 reorders its output keys,
    which takes the permuted projection and the inverse-gather backward) equal float64 autograd
    through the hand-written pooling."""
    tables = [
        MLETEmbeddingBagConfig(
            name=f"t{i}",
            num_embeddings=20 + i,
            embedding_dim=8,
            inner_dim=inner_dim,
            feature_names=[f"f{i}"] if i else ["f0", "f0b"],
        )
        for i in range(4)
    ]
    mlet = MLETEmbeddingBagCollection(tables)
    gen = torch.Generator().manual_seed(11)
    kjt = random_kjt(tables, 7, False, gen)
    feats = mlet.feature_names
    upstream = torch.randn(7, len(feats), 8, generator=gen, dtype=torch.float64)

    # reference: float64 copies of the weights, pooled with the loops of reference_pooled
    w1 = {t.name: mlet.w1.embedding_bags[t.name].weight.detach().double() for t in tables}
    w2 = {n: w.detach().double() for n, w in mlet.projection.weights.items()}
    for w in (*w1.values(), *w2.values()):
        w.requires_grad_(True)
    jt = kjt.to_dict()
    loss = torch.zeros((), dtype=torch.float64)
    for t in tables:
        w = w1[t.name] @ w2[t.name] if inner_dim else w1[t.name]
        for f in t.feature_names:
            i = feats.index(f)
            for b in range(7):
                start, stop = jt[f].offsets()[b].item(), jt[f].offsets()[b + 1].item()
                loss = loss + (w[jt[f].values()[start:stop]].sum(0) * upstream[b, i]).sum()
    loss.backward()

    if permute:
        mlet.w1 = _PermutingEBC(mlet.w1)
    (mlet.forward_pooled(kjt).double() * upstream).sum().backward()
    bags = (mlet.w1.ebc if permute else mlet.w1).embedding_bags
    for t in tables:
        torch.testing.assert_close(
            bags[t.name].weight.grad.double(), w1[t.name].grad, rtol=1e-5, atol=1e-6
        )
        if inner_dim:
            torch.testing.assert_close(
                mlet.projection.weights[t.name].grad.double(), w2[t.name].grad, rtol=1e-5, atol=1e-6
            )
