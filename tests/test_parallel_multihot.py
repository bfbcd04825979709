"""Multi-hot features (bags of 1..3 ids per sample) through the distributed models.

DMT/SPTT with identity TMs and the hybrid-parallel baseline give the flat model's outputs and
every gradient for sum and mean pooling, and the id bytes SPTT counts are those of the true bag
sizes. 2 emulated hosts x 2 ranks, gloo on loopback (the equivalence harness, slow-marked).
"""

from __future__ import annotations

import pytest
import torch

from dmtrec.data import DataConfig
from dmtrec.models import ModelConfig
from dmtrec.models.common import FlatModel
from dmtrec.parallel.launch import spawn
from dmtrec.parallel.sptt import assign_towers

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
TOWERS = [["C2", "C7", "C4"], ["C1"], ["C8", "C3", "C6", "C5"]]


def data(pooling: int, mode: str = "sum") -> DataConfig:
    return DataConfig(
        synthetic=dict(
            num_sparse=8,
            num_groups=2,
            table_size=40,
            num_train=64,
            num_valid=0,
            num_test=0,
            num_dense=5,
            pooling=pooling,
        ),
        pooling_mode=mode,
    )


_RUNS: dict[str, list[dict]] = {}


def _run(setup: StepSetup) -> list[dict]:
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
    """Logits, loss, every dense gradient and every embedding row's gradient."""
    r0 = results[0]
    assert _max_diff(r0["logits"], ref["logits"]) <= TOL
    assert abs(r0["loss"] - ref["loss"]) <= TOL
    dense = {}
    for res in results:
        for name, g in res["dense_grads"].items():
            dense[name] = g
    expected = {n: g for n, g in ref["grads"].items() if "embedding_bags" not in n}
    assert set(dense) == set(expected), set(dense) ^ set(expected)
    for name, g in expected.items():
        assert _max_diff(dense[name], g) <= TOL, name
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
            assert g.abs().sum() > 0


def _multi_hot_batch(setup: StepSetup):
    _, d = reference_model(setup)
    batch = global_batch(d, setup)
    lengths = batch.sparse_features.lengths()
    assert set(lengths.tolist()) == {1, 2, 3}  # really bags, of every size
    return batch


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_sptt_identity_with_multi_hot_equals_flat_model(mode: str) -> None:
    setup = StepSetup(data(3, mode), ModelConfig(towers=TOWERS, tm="identity", cr=1))
    results = _run(setup)
    mt, d = reference_model(setup)
    flat = FlatModel(mt.ebc, mt.head, [f for t in TOWERS for f in t])
    ref = reference_step(flat, _multi_hot_batch(setup))
    _check(results, ref)


def test_baseline_with_multi_hot_equals_flat_model() -> None:
    setup = StepSetup(data(3, "mean"), ModelConfig(), mode="baseline")
    results = _run(setup)
    model, _ = reference_model(setup)
    ref = reference_step(model, _multi_hot_batch(setup))
    _check(results, ref)


def test_sptt_id_bytes_count_the_true_bag_sizes() -> None:
    """Same shapes, one-hot vs bags: the cross-host id bytes differ by 8 bytes (an int64 id)
    per extra id sent to another host; the pooled embeddings do not depend on the bag size."""
    multi = StepSetup(data(3), ModelConfig(towers=TOWERS, tm="identity", cr=1))
    one = StepSetup(data(1), ModelConfig(towers=TOWERS, tm="identity", cr=1))
    comm_multi, comm_one = _run(multi)[0]["comm"], _run(one)[0]["comm"]
    hosts, per_host, b = multi.hosts, multi.ranks_per_host, multi.batch_size
    tower_host = assign_towers([len(t) for t in TOWERS], hosts)
    host_of = {f: tower_host[k] for k, t in enumerate(TOWERS) for f in t}
    batch = _multi_hot_batch(multi)
    kjt = batch.sparse_features
    extra = 0  # ids sent cross-host beyond one per (sample, feature)
    for f in kjt.keys():
        lengths = kjt[f].lengths()
        for i, n in enumerate(lengths.tolist()):
            if host_of[f] != (i // b) // per_host:  # the sample's home host
                extra += n - 1
    assert extra > 0
    ids_multi = comm_multi["by_kind"]["forward/ids"]["cross_host_bytes"]
    ids_one = comm_one["by_kind"]["forward/ids"]["cross_host_bytes"]
    assert ids_multi - ids_one == 8 * extra
    n, d = hosts * per_host, 16
    closed_form = n * b * 8 * d * 4 * (1 - 1 / hosts)  # N*B*F*D*4*(1-1/H), any bag size
    assert comm_multi["pooled_cross_host_bytes_per_step"] == closed_form
    assert comm_one["pooled_cross_host_bytes_per_step"] == closed_form
