"""``bench dmt``'s link floor (cross-host bytes of the busiest host link / its rate) and the
precision it runs both sides at."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dmtrec.bench.dmt import bench_dmt, host_link_Bps
from dmtrec.emulate.netns import LinkSpec
from dmtrec.errors import ConfigError


def test_host_link_rate_is_the_probe_times_the_host_ranks_or_the_delay_model() -> None:
    spec = LinkSpec(cross_mbit=100.0, ratio=48.0, queue_ms=100.0)
    measured = {"intra_MBps": 400.0, "cross_MBps": 5.5}
    # the probe: 5.5 MB/s per rank while the host's 2 ranks send at once
    assert host_link_Bps("netns", measured, spec, 2) == (
        11e6,
        "measured (probe all-to-all x L ranks)",
    )
    assert host_link_Bps("none", measured, spec, 4)[0] == 22e6
    # the slept model charges the host 100 Mbit/s, whatever was probed on loopback
    assert host_link_Bps("delay", measured, spec, 2) == (12.5e6, "delay model (--cross-mbit)")


def test_bad_precision_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match="--comm-precision must be one of fp32, fp16, bf16, got 'fp8'"
    ):
        bench_dmt(str(tmp_path), comm_precision="fp8")


@pytest.mark.slow
def test_bench_json_has_precision_and_floor_per_run(tmp_path: Path) -> None:
    """A short 2 x 2 loopback run at fp16: every run records the precision it ran and the
    floor; the busiest host sends at least its share of the cross-host bytes; DMT's pooled
    bytes are still exactly 1/CR of the fp16 baseline's."""
    rep = bench_dmt(
        str(tmp_path), link="none", crs=(1, 4), warmup=1, steps=2, batch_size=32,
        num_sparse=8, towers=2, comm_precision="fp16",
    )  # fmt: skip
    assert rep == json.loads((tmp_path / "bench.json").read_text())
    assert rep["comm_precision"] == "fp16" and rep["host_link_Bps"] > 0
    for r in rep["runs"]:
        assert r["comm_precision"] == "fp16"
        assert r["comm_precision_effective"] in ("fp16", "fp32")
        total = r["cross_host_bytes_per_step"]
        assert total / 2 - 1e-6 <= r["busiest_host_cross_bytes_per_step"] <= total + 1e-6
        assert r["link_floor_s"] == pytest.approx(
            r["busiest_host_cross_bytes_per_step"] / rep["host_link_Bps"]
        )
        assert r["step_over_floor"] == pytest.approx(r["step_s_median"] / r["link_floor_s"])
    dmt4 = next(r for r in rep["runs"] if r["name"] == "dmt_cr4")
    assert dmt4["pooled_bytes_ratio_is_1_over_cr"]
