"""Model math against hand computations, and the multi-tower model's contracts."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from dmtrec.data.base import FeatureSpec, make_batch
from dmtrec.errors import ConfigError
from dmtrec.models import ModelConfig, build_model
from dmtrec.models.common import FlatModel
from dmtrec.models.tower_modules import CrossTM, DotTM, make_tower_module, widen

SPEC = FeatureSpec(dense=["d1", "d2"], sparse=["a", "b", "c"], num_embeddings=[5, 6, 7])


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def test_dlrm_forward_equals_hand_computation() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(embedding_dim=4, bottom=[3], top=[5]), SPEC)
    rng = np.random.default_rng(1)
    dense = rng.standard_normal((2, 2)).astype(np.float32)
    ids = np.array([[0, 5, 6], [4, 1, 2]])
    batch = make_batch(dense, ids, np.zeros(2), SPEC.sparse)
    got = model(batch.dense_features, batch.sparse_features).detach().numpy()

    p = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    tables = [p[f"ebc.embedding_bags.t_{f}.weight"] for f in SPEC.sparse]
    bottom = [k for k in p if k.startswith("head.dense_arch") and k.endswith("weight")]
    top = [k for k in p if k.startswith("head.over_arch") and k.endswith("weight")]
    assert len(bottom) == 2 and len(top) == 2
    for i in range(2):
        x = dense[i].astype(np.float64)
        for w in bottom:  # bottom MLP: ReLU after every layer (the last one gives D)
            x = _relu(p[w] @ x + p[w[: -len("weight")] + "bias"])
        vecs = [x] + [tables[f][ids[i, f]] for f in range(3)]
        dots = [vecs[a] @ vecs[b] for a in range(4) for b in range(a + 1, 4)]
        z = np.concatenate([x, dots])
        h = _relu(p[top[0]] @ z + p[top[0][:-6] + "bias"])  # top MLP hidden layer
        logit = p[top[1]] @ h + p[top[1][:-6] + "bias"]  # final linear layer: the logit
        assert got[i] == pytest.approx(float(logit[0]), abs=1e-5)


@pytest.mark.parametrize("kind", ["dlrm", "dcn", "wukong"])
@pytest.mark.parametrize("regularised", [False, True])
def test_no_dense_features_is_a_learned_constant_without_warnings(
    kind: str, regularised: bool
) -> None:
    """Data without dense columns (e.g. MovieLens): the dense slot is one learned D-vector,
    the same for every sample, and it trains; no zero-element weights are initialised."""
    spec = FeatureSpec(dense=[], sparse=["a", "b", "c"], num_embeddings=[5, 6, 7])
    extra = dict(dropout=0.1, batch_norm=True) if regularised else {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = build_model(ModelConfig(model=kind, embedding_dim=4, **extra), spec)
        batch = make_batch(
            np.zeros((3, 0), np.float32), np.array([[0, 1, 2]] * 3), np.ones(3), spec.sparse
        )
        model.eval()
        out = model(batch.dense_features, batch.sparse_features)
    const = model.head.dense_arch
    assert list(const(batch.dense_features).shape) == [3, 4]
    assert torch.equal(const(batch.dense_features)[0], const(batch.dense_features)[2])
    out.sum().backward()
    assert const.value.grad is not None and const.value.grad.abs().sum() > 0
    assert not [p for p in model.parameters() if p.numel() == 0]


def test_dot_tower_module_formula() -> None:
    torch.manual_seed(0)
    tm = DotTM(num_features=3, embedding_dim=2, num_outputs=1)
    x = torch.randn(4, 3, 2)
    dots = torch.stack([(x[:, i] * x[:, j]).sum(-1) for i in range(3) for j in range(i + 1, 3)], 1)
    z = torch.cat([x.reshape(4, -1), dots], 1)
    expected = (z @ tm.proj.weight.T + tm.proj.bias).view(4, 1, 2)
    assert torch.allclose(tm(x), expected, atol=1e-6)


def test_cross_tower_module_compresses() -> None:
    tm = CrossTM(num_features=4, embedding_dim=8, num_outputs=1)
    out = tm(torch.randn(5, 4, 8))
    assert out.shape == (5, 1, 8)
    assert sum(p.numel() for p in tm.parameters()) > 0


def test_identity_towers_equal_flat_model_in_tower_order() -> None:
    towers = [["c", "a"], ["b"]]
    torch.manual_seed(0)
    mt = build_model(ModelConfig(embedding_dim=4, towers=towers, tm="identity"), SPEC)
    flat = FlatModel(mt.ebc, mt.head, ["c", "a", "b"])
    batch = make_batch(
        np.ones((3, 2)), np.array([[0, 1, 2], [1, 2, 3], [4, 5, 6]]), np.zeros(3), SPEC.sparse
    )
    assert torch.equal(
        mt(batch.dense_features, batch.sparse_features),
        flat(batch.dense_features, batch.sparse_features),
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(towers=[["a"], ["b"], ["c"], []]), "at least one feature"),
        (dict(towers=[["a", "b"], ["x", "c"]]), "unknown feature(s): x"),
        (dict(towers=[["a", "b"]]), "in no tower: c"),
        (dict(towers=[["a", "b"], ["b", "c"]]), "more than one tower: b"),
        (dict(towers=[["a", "b"], ["c"]], tm="mystery"), "--tm: unknown tower module 'mystery'"),
        (
            dict(towers=[["a", "b"], ["c"]], tm="dlrm", cr=17),
            "--cr 17 is larger than a tower of 1 features x 16 dims (16 numbers per sample)",
        ),
        (dict(towers=[["a", "b"], ["c"]], tm="dlrm", cr=0), "--cr must be >= 1"),
        (
            dict(towers=[["a", "b"], ["c"]], tm="identity", cr=2),
            "identity tower module does not compress",
        ),
        (dict(model="xgboost"), "--model: unknown model 'xgboost'"),
    ],
)
def test_bad_model_options_are_clear(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        build_model(ModelConfig(**kwargs), SPEC)
    assert message in str(e.value)


def test_make_tower_module_output_count() -> None:
    for cr in (1, 2, 4, 8):
        tm = make_tower_module("dlrm", 8, 4, cr)
        assert tm(torch.randn(2, 8, 4)).shape == (2, 8 // cr, 4)
    # any CR <= m: a tower of m features yields ceil(m / CR) virtual features
    for kind in ("dlrm", "dcn", "wukong"):
        for m, cr, n in ((7, 2, 4), (7, 3, 3), (7, 7, 1), (5, 4, 2)):
            assert make_tower_module(kind, m, 4, cr)(torch.randn(3, m, 4)).shape == (3, n, 4)
    # beyond the width (m < CR <= m * D): one output of ceil(m * D / CR) numbers, which
    # ``widen`` zero-pads to D on the home side
    for kind in ("dlrm", "dcn", "wukong"):
        for m, cr, w in ((4, 8, 2), (3, 5, 3), (2, 8, 1)):
            tm = make_tower_module(kind, m, 4, cr)
            out = tm(torch.randn(3, m, 4))
            assert (tm.num_outputs, tm.width, out.shape) == (1, w, (3, 1, w))
            padded = widen(out, 4)
            assert padded.shape == (3, 1, 4) and torch.equal(padded[..., :w], out)
            assert not padded[..., w:].any()
