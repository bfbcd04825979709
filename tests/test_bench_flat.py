"""The flat-kernel benchmark runs end to end on a tiny config (no timing assertions)."""

from __future__ import annotations

import json
import math

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
    assert saved == result
    for key in ("config", "torch_threads", "dmtrec", "torchrec", "ratio_dmtrec_over_torchrec"):
        assert key in saved
    assert saved["config"]["batch_size"] == 64 and saved["config"]["table_size"] == 1000
    assert saved["torch_threads"] >= 1
    for name in ("dmtrec", "torchrec"):
        m = saved[name]
        for key in ("examples_per_s", "step_s_median"):
            assert math.isfinite(m[key]) and m[key] > 0, (name, key, m[key])
        assert m["steps_timed"] == 2
    ratio = saved["ratio_dmtrec_over_torchrec"]
    assert math.isfinite(ratio) and ratio > 0
    # Same model, same shape: B logits from both (TorchRec's B x 1 squeezed) ...
    assert saved["dmtrec"]["output_shape"] == saved["torchrec"]["output_shape"] == [64]
    # ... and, with the same weights loaded, the same values.
    assert saved["initial_output_max_abs_diff"] < 1e-5
