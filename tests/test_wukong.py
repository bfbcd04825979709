"""Wukong blocks against their formulas, and the head / tower-module contracts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dmtrec.models.wukong import (
    FactorizationMachineBlock,
    LinearCompressBlock,
    WukongHead,
    WukongLayer,
    WukongTM,
)


def _zero_blocks(layer: WukongLayer) -> None:
    """Zero every FMB/LCB parameter so both blocks output exactly 0."""
    with torch.no_grad():
        for p in layer.fmb.parameters():
            p.zero_()
        if layer.lcb is not None:
            layer.lcb.weight.zero_()


def test_fmb_equals_explicit_formula() -> None:
    torch.manual_seed(0)
    b, n, d, k, nf = 3, 4, 5, 2, 3
    fmb = FactorizationMachineBlock(n, d, nf, k, [6, 7]).double()
    with torch.no_grad():  # non-trivial LayerNorm affine, so it is checked too
        fmb.norm.weight.uniform_(0.5, 1.5)
        fmb.norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(b, n, d, dtype=torch.float64)
    got = fmb(x)
    assert got.shape == (b, nf, d)

    y = fmb.y.detach()
    xs = x.detach()
    for s in range(b):
        # X (X^T Y) written as the (full) interaction matrix times Y, entry by entry.
        gram = [
            [sum(xs[s, i, e] * xs[s, j, e] for e in range(d)) for j in range(n)] for i in range(n)
        ]
        inter = torch.tensor(
            [[sum(gram[i][m] * y[m, c] for m in range(n)) for c in range(k)] for i in range(n)],
            dtype=torch.float64,
        ).reshape(-1)
        z = (inter - inter.mean()) / torch.sqrt(inter.var(unbiased=False) + fmb.norm.eps)
        z = z * fmb.norm.weight.detach() + fmb.norm.bias.detach()
        for perceptron in fmb.mlp._mlp:  # ReLU after each hidden layer
            lin = perceptron._linear
            z = torch.relu(lin.weight.detach() @ z + lin.bias.detach())
        out = fmb.out.weight.detach() @ z + fmb.out.bias.detach()
        torch.testing.assert_close(got[s].detach(), out.view(nf, d), atol=1e-6, rtol=0)


def test_lcb_equals_matrix_product() -> None:
    torch.manual_seed(1)
    lcb = LinearCompressBlock(5, 3)
    x = torch.randn(4, 5, 6)
    got = lcb(x)
    assert got.shape == (4, 3, 6)
    for s in range(4):
        torch.testing.assert_close(got[s], lcb.weight @ x[s])


def test_layer_identity_residual() -> None:
    torch.manual_seed(2)
    b, n, d = 3, 6, 4
    layer = WukongLayer(n, d, 4, 2, 3, [8])
    x = torch.randn(b, n, d)
    assert layer(x).shape == (b, 6, d)
    assert layer.residual is None
    _zero_blocks(layer)
    torch.testing.assert_close(layer(x), nn.functional.layer_norm(x, (d,)))


def test_layer_projected_residual() -> None:
    torch.manual_seed(3)
    b, n, d = 3, 5, 4
    layer = WukongLayer(n, d, 2, 1, 3, [8])
    x = torch.randn(b, n, d)
    assert layer(x).shape == (b, 3, d)
    assert layer.residual is not None and layer.residual.weight.shape == (3, n)
    _zero_blocks(layer)
    w = layer.residual.weight.detach()
    want = nn.functional.layer_norm(torch.einsum("ln,bnd->bld", w, x), (d,))
    torch.testing.assert_close(layer(x), want)
    # The projection is on the path to the loss: it gets a nonzero gradient. (A random
    # weighting, since the plain sum of a LayerNorm output with unit affine is always 0.)
    (layer(x) * torch.randn(b, 3, d)).sum().backward()
    assert layer.residual.weight.grad is not None
    assert layer.residual.weight.grad.abs().sum() > 0


def test_head_shape_and_gradients() -> None:
    torch.manual_seed(4)
    b, n_dense, n_sparse, d = 8, 13, 26, 16
    head = WukongHead(n_dense, n_sparse, d)
    dense = torch.randn(b, n_dense)
    emb = torch.randn(b, n_sparse, d, requires_grad=True)
    logits = head(dense, emb)
    assert logits.shape == (b,)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, torch.rand(b).round())
    loss.backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    for name, p in head.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("n", [1, 2, 4])
def test_tower_module_shapes(n: int) -> None:
    torch.manual_seed(5)
    m, d = 4, 8
    tm = WukongTM(m, d, n)
    assert tm.num_outputs == n
    assert (tm.layer.lcb is None) == (n == 1)
    assert (tm.layer.residual is None) == (n == m)
    x = torch.randn(3, m, d, requires_grad=True)
    y = tm(x)
    assert y.shape == (3, n, d)
    y.pow(2).sum().backward()
    assert x.grad is not None


# -- the scaling sweep's summaries (on planted numbers, no training) --------------------------


def _sweep(aucs: dict[tuple[str, int], list[float]], flops: dict[tuple[str, int], float]):
    runs = [
        {"model": m, "scale": s, "seed": i, "auc": a}
        for (m, s), vals in aucs.items()
        for i, a in enumerate(vals)
    ]
    points = [
        {
            "model": m,
            "scale": s,
            "gflop_per_example": flops[m, s],
            "auc_mean": sum(v) / len(v),
            "auc_std": float(np.std(v, ddof=1)),
        }
        for (m, s), v in aucs.items()
    ]
    return points, runs


def test_scaling_summary_pairs_wukong_with_the_nearest_flops_dlrm() -> None:
    from dmtrec.bench.scaling import _equal_flops, _flattens

    aucs = {
        ("dlrm", 1): [0.70, 0.71, 0.72],
        ("dlrm", 2): [0.72, 0.73, 0.74],  # +0.02: still climbing
        ("dlrm", 4): [0.7201, 0.7301, 0.7401],  # +0.0001 < std: flat from here
        ("wukong", 1): [0.73, 0.735, 0.75],
    }
    flops = {("dlrm", 1): 1.0, ("dlrm", 2): 2.0, ("dlrm", 4): 8.0, ("wukong", 1): 2.5}
    points, runs = _sweep(aucs, flops)
    (c,) = _equal_flops(points, runs)
    assert (c["wukong_scale"], c["dlrm_scale"]) == (1, 2)  # log-nearest: 2.5/2 < 8/2.5
    assert c["flops_ratio"] == pytest.approx(1.25)
    assert c["mean_auc_gain"] == pytest.approx((0.01 + 0.005 + 0.01) / 3)
    assert c["wins"] == 3 and c["paired_t_p_value"] < 0.05
    assert _flattens(points, "dlrm") == 4
    assert _flattens(points, "wukong") is None  # one size: never seen to flatten
