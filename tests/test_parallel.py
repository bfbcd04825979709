"""Distributed DMT (SPTT) and the hybrid-parallel baseline vs their single-process references.

2 emulated hosts x 2 ranks, gloo on loopback. Each test spawns 4 processes (slow-marked).
"""

from __future__ import annotations

import pytest

from dmtrec.data import DataConfig
from dmtrec.models import ModelConfig
from dmtrec.models.common import FlatModel

from equivalence import (
    StepSetup,
    check_step,
    global_batch,
    max_diff,
    plan,
    reference_model,
    reference_step,
    run_step,
)

pytestmark = pytest.mark.slow
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
SHARDINGS = ["table_wise", "row_wise"]


SPTT_CASES = [
    ("dlrm", EVEN_TOWERS, 2),
    ("dcn", EVEN_TOWERS, 2),
    ("wukong", EVEN_TOWERS, 2),
    # beyond the towers' widths (3, 1, 4 features x 16 dims): narrow outputs of 6, 2, 8
    # numbers, zero-padded after the exchange; towers arrive host-major, not in order
    ("dlrm", TOWERS, 8),
]
BYTES_CASES = [
    (TOWERS, "identity", 1),
    (EVEN_TOWERS, "dlrm", 2),
    (EVEN_TOWERS, "dlrm", 4),
    (EVEN_TOWERS, "dlrm", 8),  # CR > m = 4: one narrow output of 4 * 16 / 8 numbers
]


def _fp16_setups(mode: str) -> tuple[StepSetup, StepSetup]:
    """The same 2 x 1 step at fp32 and at fp16 comms."""
    towers = EVEN_TOWERS if mode == "dmt" else None
    model = ModelConfig(embedding_dim=8, bottom=[8], top=[8], towers=towers, tm="identity")
    base = dict(data=DATA, model=model, mode=mode, hosts=2, ranks_per_host=1)
    return StepSetup(**base), StepSetup(**base, extra={"comm_precision": "fp16"})


# every setup the tests below ask for, so that each topology spawns its processes once
plan(
    StepSetup(DATA, ModelConfig(towers=TOWERS, tm="identity", cr=1)),
    *(StepSetup(DATA, ModelConfig(towers=t, tm=tm, cr=cr)) for tm, t, cr in SPTT_CASES),
    *(StepSetup(DATA, ModelConfig(), mode="baseline", sharding=s) for s in SHARDINGS),
    *(StepSetup(DATA, ModelConfig(towers=t, tm=tm, cr=cr)) for t, tm, cr in BYTES_CASES),
    *_fp16_setups("baseline"),
    *_fp16_setups("dmt"),
)


def test_sptt_identity_equals_flat_model() -> None:
    """Semantic preservation: DMT with identity TMs == the flat model (features in tower order)."""
    setup = StepSetup(DATA, ModelConfig(towers=TOWERS, tm="identity", cr=1))
    results = run_step(setup)
    mt, data = reference_model(setup)
    features = [f for t in TOWERS for f in t]
    flat = FlatModel(mt.ebc, mt.head, features)  # the flat model, same initial weights
    assert not any(p.numel() for p in mt.tower_modules.parameters())
    ref = reference_step(flat, global_batch(data, setup))
    check_step(results, ref)


@pytest.mark.parametrize("tm, towers, cr", SPTT_CASES)
def test_sptt_equals_multitower_reference(tm: str, towers: list, cr: int) -> None:
    setup = StepSetup(DATA, ModelConfig(towers=towers, tm=tm, cr=cr))
    results = run_step(setup)
    model, data = reference_model(setup)
    ref = reference_step(model, global_batch(data, setup))
    check_step(results, ref)
    assert any(n.startswith("tower_modules.") for n in ref["grads"])


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_baseline_equals_flat_model(sharding: str) -> None:
    setup = StepSetup(DATA, ModelConfig(), mode="baseline", sharding=sharding)
    results = run_step(setup)
    model, data = reference_model(setup)
    ref = reference_step(model, global_batch(data, setup))
    check_step(results, ref)


def test_pooled_cross_host_bytes_scale_as_one_over_cr() -> None:
    """Same batch: DMT's pooled-embedding cross-host bytes = baseline / CR = the closed form."""
    n, h, b, f, d = 4, 2, 8, 8, 16
    closed_form = n * b * f * d * 4 * (1 - 1 / h)  # dmt.md: N*B*F*D*elem*(1-1/H)
    base = run_step(StepSetup(DATA, ModelConfig(), mode="baseline"))[0]["comm"]
    assert base["pooled_cross_host_bytes_per_step"] == closed_form
    for towers, tm, cr in BYTES_CASES:
        comm = run_step(StepSetup(DATA, ModelConfig(towers=towers, tm=tm, cr=cr)))[0]["comm"]
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
    fp32, fp16 = (run_step(s) for s in _fp16_setups(mode))
    c32, c16 = fp32[0]["comm"], fp16[0]["comm"]
    assert c16["pooled_cross_host_bytes_per_step"] == 0.5 * c32["pooled_cross_host_bytes_per_step"]
    ids = "forward/ids"
    assert c16["by_kind"][ids]["cross_host_bytes"] == c32["by_kind"][ids]["cross_host_bytes"]
    assert max_diff(fp16[0]["logits"], fp32[0]["logits"]) < 1e-2
