"""Multi-hot features (bags of 1..3 ids per sample) through the distributed models.

DMT/SPTT with identity TMs and the hybrid-parallel baseline give the flat model's outputs and
every gradient for sum and mean pooling, and the id bytes SPTT counts are those of the true bag
sizes. 2 emulated hosts x 2 ranks, gloo on loopback (the equivalence harness, slow-marked).
"""

from __future__ import annotations

import pytest

from dmtrec.data import DataConfig
from dmtrec.models import ModelConfig
from dmtrec.models.common import FlatModel
from dmtrec.parallel.sptt import assign_towers

from equivalence import (
    StepSetup,
    check_step,
    global_batch,
    plan,
    reference_model,
    reference_step,
    run_step,
)

pytestmark = pytest.mark.slow
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


def _identity(pooling: int, mode: str = "sum") -> StepSetup:
    return StepSetup(data(pooling, mode), ModelConfig(towers=TOWERS, tm="identity", cr=1))


# every setup the tests below ask for, so that the 2 x 2 processes are spawned once
plan(
    _identity(3, "sum"),
    _identity(3, "mean"),
    _identity(1),
    StepSetup(data(3, "mean"), ModelConfig(), mode="baseline"),
)


def _multi_hot_batch(setup: StepSetup):
    _, d = reference_model(setup)
    batch = global_batch(d, setup)
    lengths = batch.sparse_features.lengths()
    assert set(lengths.tolist()) == {1, 2, 3}  # really bags, of every size
    return batch


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_sptt_identity_with_multi_hot_equals_flat_model(mode: str) -> None:
    setup = _identity(3, mode)
    results = run_step(setup)
    mt, d = reference_model(setup)
    flat = FlatModel(mt.ebc, mt.head, [f for t in TOWERS for f in t])
    ref = reference_step(flat, _multi_hot_batch(setup))
    check_step(results, ref)


def test_baseline_with_multi_hot_equals_flat_model() -> None:
    setup = StepSetup(data(3, "mean"), ModelConfig(), mode="baseline")
    results = run_step(setup)
    model, _ = reference_model(setup)
    ref = reference_step(model, _multi_hot_batch(setup))
    check_step(results, ref)


def test_sptt_id_bytes_count_the_true_bag_sizes() -> None:
    """Same shapes, one-hot vs bags: the cross-host id bytes differ by 8 bytes (an int64 id)
    per extra id sent to another host; the pooled embeddings do not depend on the bag size."""
    multi, one = _identity(3), _identity(1)
    comm_multi, comm_one = run_step(multi)[0]["comm"], run_step(one)[0]["comm"]
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
