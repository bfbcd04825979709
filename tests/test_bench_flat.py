"""The flat-kernel benchmark compares like with like: dmtrec's flat DLRM and TorchRec's DLRM
start from the same weights and, trained on the same batches, stay the same model (no timing
assertions: speed belongs in the benchmark's JSON, not in a test)."""

from __future__ import annotations

import json

import pytest

from dmtrec.bench.flat import bench_flat
from dmtrec.parallel.launch import run_single


def _tiny(out: str) -> dict:
    return bench_flat(
        out,
        num_sparse=4,
        table_size=1000,
        embedding_dim=8,
        batch_size=64,
        bottom=(16,),
        top=(16,),
        warmup=1,
        steps=2,
    )


def test_bench_flat_tiny(tmp_path):
    result = run_single(_tiny, (str(tmp_path),))
    saved = json.loads((tmp_path / "bench_flat.json").read_text())
    assert saved["config"]["batch_size"] == 64 and saved["config"]["table_size"] == 1000
    for name in ("dmtrec", "torchrec"):
        assert saved[name]["steps_timed"] == 2  # each timed block ran its steps
    # the ratio is the two medians' quotient, as reported
    assert result["ratio_dmtrec_over_torchrec"] == pytest.approx(
        result["dmtrec"]["examples_per_s"] / result["torchrec"]["examples_per_s"]
    )
    # Same model, same shape: B logits from both (TorchRec's B x 1 squeezed) ...
    assert saved["dmtrec"]["output_shape"] == saved["torchrec"]["output_shape"] == [64]
    # ... and, with the same weights loaded, the same values.
    assert saved["initial_output_max_abs_diff"] < 1e-5
    # ... and after 3 identical training steps each, still the same model
    assert saved["final_output_max_abs_diff"] < 1e-4
