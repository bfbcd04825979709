"""Distributed DMT (SPTT) and the hybrid-parallel baseline vs their single-process references.

2 emulated hosts x 2 ranks, gloo on loopback. Each test spawns 4 processes (slow-marked).
"""

from __future__ import annotations

import pytest
import torch

from dmtrec.data import DataConfig
from dmtrec.models import ModelConfig
from dmtrec.models.common import FlatModel
from dmtrec.parallel.launch import spawn

from equivalence import (
    StepSetup,
    assemble_table_grads,
    global_batch,
    one_step,
    reference_model,
    reference_step,
)

pytestmark = pytest.mark.slow
TOL = 1e-5
DATA = DataConfig(
    synthetic=dict(
        num_sparse=8,
        num_groups=2,
        table_size=40,
        num_train=64,
        num_valid=0,
        num_test=0,
        num_dense=5,
    )
)
# an arbitrary 3-tower partition, not contiguous, uneven
TOWERS = [["C2", "C7", "C4"], ["C1"], ["C8", "C3", "C6", "C5"]]
EVEN_TOWERS = [["C2", "C7", "C4", "C1"], ["C8", "C3", "C6", "C5"]]


_RUNS: dict[str, list[dict]] = {}


def _run(setup: StepSetup) -> list[dict]:
    """One distributed step per distinct setup (tests share runs: each costs ~30 s here)."""
    key = repr(setup)
    if key not in _RUNS:
        _RUNS[key] = spawn(
            one_step, (setup,), setup.hosts * setup.ranks_per_host, setup.ranks_per_host
        )
    return _RUNS[key]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def _check(results: list[dict], ref: dict) -> None:
    r0 = results[0]
    assert _max_diff(r0["logits"], ref["logits"]) <= TOL
    assert abs(r0["loss"] - ref["loss"]) <= TOL
    # every dense gradient: head (DDP over all ranks) and tower modules (DDP inside a host)
    dense = {}
    for res in results:
        for name, g in res["dense_grads"].items():
            if name in dense:  # replicas must agree exactly enough
                assert _max_diff(dense[name], g) <= TOL, name
            dense[name] = g
    expected = {n: g for n, g in ref["grads"].items() if "embedding_bags" not in n}
    assert set(dense) == set(expected), set(dense) ^ set(expected)
    for name, g in expected.items():
        assert _max_diff(dense[name], g) <= TOL, name
    # every embedding row's gradient
    shapes = {
        n.split(".")[-2] + ".weight": g.shape
        for n, g in ref["grads"].items()
        if "embedding_bags" in n
    }
    tables = assemble_table_grads(results, shapes)
    for n, g in ref["grads"].items():
        if "embedding_bags" in n:
            key = n.split(".")[-2] + ".weight"
            assert _max_diff(tables[key], g) <= TOL, key
            assert g.abs().sum() > 0  # the batch touched the table: the check means something


def test_sptt_identity_equals_flat_model() -> None:
    """Semantic preservation: DMT with identity TMs == the flat model (features in tower order)."""
    setup = StepSetup(DATA, ModelConfig(towers=TOWERS, tm="identity", cr=1))
    results = _run(setup)
    mt, data = reference_model(setup)
    features = [f for t in TOWERS for f in t]
    flat = FlatModel(mt.ebc, mt.head, features)  # the flat model, same initial weights
    assert not any(p.numel() for p in mt.tower_modules.parameters())
    ref = reference_step(flat, global_batch(data, setup))
    _check(results, ref)


@pytest.mark.parametrize(
    "tm, towers, cr",
    [
        ("dlrm", EVEN_TOWERS, 2),
        ("dcn", EVEN_TOWERS, 2),
        ("wukong", EVEN_TOWERS, 2),
        # beyond the towers' widths (3, 1, 4 features x 16 dims): narrow outputs of 6, 2, 8
        # numbers, zero-padded after the exchange; towers arrive host-major, not in order
        ("dlrm", TOWERS, 8),
    ],
)
def test_sptt_equals_multitower_reference(tm: str, towers: list, cr: int) -> None:
    setup = StepSetup(DATA, ModelConfig(towers=towers, tm=tm, cr=cr))
    results = _run(setup)
    model, data = reference_model(setup)
    ref = reference_step(model, global_batch(data, setup))
    _check(results, ref)
    assert any(n.startswith("tower_modules.") for n in ref["grads"])


@pytest.mark.parametrize("sharding", ["table_wise", "row_wise"])
def test_baseline_equals_flat_model(sharding: str) -> None:
    setup = StepSetup(DATA, ModelConfig(), mode="baseline", sharding=sharding)
    results = _run(setup)
    model, data = reference_model(setup)
    ref = reference_step(model, global_batch(data, setup))
    _check(results, ref)


def test_pooled_cross_host_bytes_scale_as_one_over_cr() -> None:
    """Same batch: DMT's pooled-embedding cross-host bytes = baseline / CR = the closed form."""
    n, h, b, f, d = 4, 2, 8, 8, 16
    closed_form = n * b * f * d * 4 * (1 - 1 / h)  # dmt.md: N*B*F*D*elem*(1-1/H)
    base = _run(StepSetup(DATA, ModelConfig(), mode="baseline"))[0]["comm"]
    assert base["pooled_cross_host_bytes_per_step"] == closed_form
    for towers, tm, cr in [
        (TOWERS, "identity", 1),
        (EVEN_TOWERS, "dlrm", 2),
        (EVEN_TOWERS, "dlrm", 4),
        (EVEN_TOWERS, "dlrm", 8),  # CR > m = 4: one narrow output of 4 * 16 / 8 numbers
    ]:
        comm = _run(StepSetup(DATA, ModelConfig(towers=towers, tm=tm, cr=cr)))[0]["comm"]
        assert comm["pooled_cross_host_bytes_per_step"] == closed_form / cr
        # the backward sends the same gradients back over the same links
        assert comm["by_kind"]["backward/embeddings"]["cross_host_bytes"] == closed_form / cr
        # SPTT's AlltoAlls are among H peers: each rank sends to H-1 hosts, not N-1 ranks
        assert comm["by_kind"]["forward/embeddings"]["cross_host_messages"] == n * (h - 1)
    assert base["by_kind"]["forward/embeddings"]["cross_host_messages"] == n * (n - n // h)


@pytest.mark.parametrize("mode", ["baseline", "dmt"])
def test_fp16_comms_halve_pooled_bytes(mode: str) -> None:
    """--comm-precision fp16 (TorchRec qcomm codecs): the pooled embeddings cross hosts in
    exactly half the fp32 bytes, ids unchanged, and the step computes nearly the same."""
    towers = EVEN_TOWERS if mode == "dmt" else None
    model = ModelConfig(embedding_dim=8, bottom=[8], top=[8], towers=towers, tm="identity")
    base = dict(data=DATA, model=model, mode=mode, hosts=2, ranks_per_host=1)
    fp32 = _run(StepSetup(**base))
    fp16 = _run(StepSetup(**base, extra={"comm_precision": "fp16"}))
    c32, c16 = fp32[0]["comm"], fp16[0]["comm"]
    assert c16["pooled_cross_host_bytes_per_step"] == 0.5 * c32["pooled_cross_host_bytes_per_step"]
    ids = "forward/ids"
    assert c16["by_kind"][ids]["cross_host_bytes"] == c32["by_kind"][ids]["cross_host_bytes"]
    assert _max_diff(fp16[0]["logits"], fp32[0]["logits"]) < 1e-2
