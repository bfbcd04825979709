"""TorchRec's TrainPipelineSparseDist driving DMT (SPTT) and the hybrid-parallel baseline.

Three training steps with the trainer's optimizers (Adam on the dense parameters, row-wise
Adagrad fused into the tables' backward), pipelined (``--pipeline sparse-dist``: the next
batch's id exchange runs ahead), against the same steps on the plain single-process model:

- DMT with identity TMs == the flat model (features in tower order), intra-host table-wise,
  row-wise and column-wise, on 2x2, 2x1 and 1x2;
- DMT with DLRM TMs at CR 2 == its MultiTower reference;
- the baseline (table-wise, row-wise) == the flat model;
- the pipeline changes no number: pipelined and unpipelined runs agree bit for bit.

The one-step tests (test_parallel.py, SGD) pin the gradient scale exactly; these cover what
only several steps show (DDP's bucket rebuild after step 1, optimizer state, the pipeline's
prefetch). Each topology's runs share one spawn (gloo on loopback, slow-marked).
"""

from __future__ import annotations

import pytest
import torch

from dmtrec.data import DataConfig
from dmtrec.models import ModelConfig
from dmtrec.parallel.launch import spawn

from equivalence import StepSetup, reference_model, reference_train, train_steps

pytestmark = pytest.mark.slow
TOL = 1e-5
STEPS = 3
DATA = DataConfig(
    synthetic=dict(
        num_sparse=8,
        num_groups=2,
        table_size=40,
        num_train=96,  # 3 global batches of 32
        num_valid=0,
        num_test=0,
        num_dense=5,
    )
)
TOWERS = [["C2", "C7", "C4"], ["C1"], ["C8", "C3", "C6", "C5"]]
EVEN_TOWERS = [["C2", "C7", "C4", "C1"], ["C8", "C3", "C6", "C5"]]
IDENTITY = ModelConfig(towers=TOWERS, tm="identity", cr=1)
DLRM_TMS = ModelConfig(towers=EVEN_TOWERS, tm="dlrm", cr=2)


def _setup(model: ModelConfig, mode: str = "dmt", pipeline: str = "sparse-dist", **kw):
    return StepSetup(DATA, model, mode=mode, extra={"pipeline": pipeline}, **kw)


# name -> setup (references: the flat model of the towers' order for identity TMs, else
# the plain model itself)
RUNS_2X2 = {
    "dmt_identity_table_wise": _setup(IDENTITY),
    "dmt_identity_row_wise": _setup(IDENTITY, sharding="row_wise"),
    "dmt_identity_column_wise": _setup(IDENTITY, sharding="column_wise"),
    "dmt_dlrm_cr2": _setup(DLRM_TMS),
    "dmt_dcn_cr2": _setup(ModelConfig(towers=EVEN_TOWERS, tm="dcn", cr=2)),
    "dmt_wukong_cr2": _setup(ModelConfig(towers=EVEN_TOWERS, tm="wukong", cr=2)),
    # beyond the towers' widths: narrow TM outputs, zero-padded after the exchange
    "dmt_dlrm_cr8": _setup(ModelConfig(towers=TOWERS, tm="dlrm", cr=8)),
    "baseline_table_wise": _setup(ModelConfig(), "baseline"),
    "baseline_row_wise": _setup(ModelConfig(), "baseline", sharding="row_wise"),
    "baseline_column_wise": _setup(ModelConfig(), "baseline", sharding="column_wise"),
    "dmt_identity_unpipelined": _setup(IDENTITY, pipeline="none"),
    "dmt_dlrm_cr2_unpipelined": _setup(DLRM_TMS, pipeline="none"),
    "baseline_table_wise_unpipelined": _setup(ModelConfig(), "baseline", pipeline="none"),
}
TOPOLOGIES = {  # hosts x ranks per host, batch per rank: the same global batch of 32
    "2x2": RUNS_2X2,
    "2x1": {"dmt_identity_table_wise": _setup(IDENTITY, hosts=2, ranks_per_host=1, batch_size=16)},
    "1x2": {"dmt_identity_table_wise": _setup(IDENTITY, hosts=1, ranks_per_host=2, batch_size=16)},
}
_RUNS: dict[str, dict[str, dict]] = {}


def _runs(topology: str) -> dict[str, dict]:
    """Every run of one topology, in one spawn (rank 0's results)."""
    if topology not in _RUNS:
        named = TOPOLOGIES[topology]
        hosts, ranks = map(int, topology.split("x"))
        results = spawn(train_steps, (list(named.values()), STEPS), hosts * ranks, ranks)[0]
        _RUNS[topology] = dict(zip(named, results))
    return _RUNS[topology]


def _reference(setup: StepSetup) -> dict:
    flat = setup.mode == "dmt" and setup.model.tm == "identity"
    return reference_train(StepSetup(**{**vars(setup), "flat": flat}), STEPS)


def _assert_close(run: dict, ref: dict, initial: dict) -> None:
    assert len(run["losses"]) == STEPS
    assert max(abs(a - b) for a, b in zip(run["losses"], ref["losses"])) <= TOL
    state, expected = run["state"], ref["state"]
    assert set(state) == set(expected), set(state) ^ set(expected)
    for key, value in expected.items():
        assert float((state[key] - value).abs().max()) <= TOL, key
    # the steps trained every table and every dense parameter (frozen ones would also agree)
    moved = [k for k, v in expected.items() if k in initial and not torch.equal(v, initial[k])]
    assert set(moved) == {k for k, v in initial.items() if v.is_floating_point()}


@pytest.mark.parametrize(
    "topology, name",
    [("2x2", n) for n in RUNS_2X2 if not n.endswith("_unpipelined")]
    + [("2x1", "dmt_identity_table_wise"), ("1x2", "dmt_identity_table_wise")],
)
def test_pipelined_training_equals_the_single_process_reference(topology: str, name: str) -> None:
    setup = TOPOLOGIES[topology][name]
    run = _runs(topology)[name]
    ref = _reference(setup)
    initial = StepSetup(**{**vars(setup), "flat": False})
    _assert_close(run, ref, reference_model(initial)[0].state_dict())
    # the pipeline really drove the sharded module with the batch's KJT (found by FX tracing)
    assert run["pipelined"] == (["sparse_arch"] if setup.mode == "dmt" else ["ebc"])


UNPIPELINED = {
    "dmt_identity_table_wise": "dmt_identity_unpipelined",
    "dmt_dlrm_cr2": "dmt_dlrm_cr2_unpipelined",
    "baseline_table_wise": "baseline_table_wise_unpipelined",
}


@pytest.mark.parametrize("name", list(UNPIPELINED))
def test_the_pipeline_changes_no_number(name: str) -> None:
    """Same math, only overlap: pipelined == unpipelined bit for bit, losses and parameters."""
    runs = _runs("2x2")
    piped, plain = runs[name], runs[UNPIPELINED[name]]
    assert plain["pipelined"] == []
    assert piped["losses"] == plain["losses"]
    assert piped["state"].keys() == plain["state"].keys()
    differ = [k for k in piped["state"] if not torch.equal(piped["state"][k], plain["state"][k])]
    assert differ == []
