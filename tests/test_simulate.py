"""The simulator's formulas on small closed-form cases, and its calibration on planted data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from torchrec.modules.mlp import MLP

from dmtrec.bench import simulate as sim
from dmtrec.cli import main

INF = math.inf


def test_a2a_is_pairwise_exchange_on_the_slower_link_class() -> None:
    links = sim.Links(intra_Bps=1e9, cross_Bps=1e8, alpha_intra_s=1e-6, alpha_cross_s=1e-5)
    # 1 local peer: 1e-6 + 1e6/1e9; 2 remote peers: 2 * (1e-5 + 1e6/1e8)
    assert sim.a2a_time(1e6, 1, 2, links) == pytest.approx(2 * (1e-5 + 1e-2))
    # only local peers: the intra term
    assert sim.a2a_time(1e6, 3, 0, links) == pytest.approx(3 * (1e-6 + 1e-3))


def test_ring_allreduce() -> None:
    assert sim.allreduce_time(4e6, 4, 1e9, 0.0) == pytest.approx(2 * 3 * 1e6 / 1e9)
    assert sim.allreduce_time(4e6, 4, INF, 1e-5) == pytest.approx(6e-5)
    assert sim.allreduce_time(4e6, 1, 1e9, 1e-5) == 0.0


def test_dlrm_dense_flops_and_params_by_hand() -> None:
    w = sim.Workload(num_dense=2, bottom=(4, 2), top=(3, 1), embedding_dim=2)
    flops, params = sim.dlrm_dense(w, 2)
    # bottom 2->4->2: 2*2*4 + 2*4*2 = 32; 3 vectors -> 3 pairs of dim 2: 2*2*3 = 12;
    # top (2 + 3)->3->1: 2*5*3 + 2*3*1 = 36
    assert flops == 32 + 12 + 36
    assert params == (2 * 4 + 4) + (4 * 2 + 2) + (5 * 3 + 3) + (3 * 1 + 1)


def test_mlp_flops_match_flop_counter_on_torchrec_mlp() -> None:
    sizes = [37, 16, 8, 1]
    mlp = MLP(sizes[0], sizes[1:])
    with FlopCounterMode(display=False) as counter:
        mlp(torch.randn(5, sizes[0]))
    assert counter.get_total_flops() / 5 == sim.mlp_flops(sizes)
    assert sum(p.numel() for p in mlp.parameters()) == sim.mlp_params(sizes)


def _bandwidth_only() -> sim.Links:
    return sim.Links(intra_Bps=INF, cross_Bps=1e9, alpha_intra_s=0.0, alpha_cross_s=0.0)


@pytest.mark.parametrize("gpus", [16, 64, 256])
def test_pooled_time_is_cross_bytes_over_bandwidth(gpus: int) -> None:
    """With no latency and a free intra link, the pooled AlltoAlls cost exactly the cross-host
    bytes / NIC bandwidth, forward + backward; DMT sends 1/CR of the baseline's bytes."""
    w, hw, lk = sim.Workload(), sim.HARDWARE["h100"], _bandwidth_only()
    base = sim.cross_pooled_bytes(w, gpus, 8, None)
    hosts = gpus // 8
    assert base == pytest.approx(
        w.batch_per_gpu * w.num_sparse * w.embedding_dim * 2 * (hosts - 1) / hosts
    )
    assert sim.baseline_step(w, hw, gpus, lk)["pooled_a2a"] == pytest.approx(2 * base / 1e9)
    for cr in (1, 2, 4):
        dmt = sim.cross_pooled_bytes(w, gpus, 8, cr)
        assert dmt == pytest.approx(base / cr)
        assert sim.dmt_step(w, hw, gpus, cr, lk)["pooled_a2a"] == pytest.approx(2 * dmt / 1e9)


def test_cr1_gain_comes_from_fewer_cross_host_peers() -> None:
    """Latency only: the baseline's pooled AlltoAll pays N-L messages across hosts, DMT's H-1."""
    w, hw = sim.Workload(), sim.HARDWARE["a100"]
    lk = sim.Links(intra_Bps=INF, cross_Bps=INF, alpha_intra_s=0.0, alpha_cross_s=1e-5)
    n = 64
    assert sim.baseline_step(w, hw, n, lk)["pooled_a2a"] == pytest.approx(2 * (n - 8) * 1e-5)
    assert sim.dmt_step(w, hw, n, 1, lk)["pooled_a2a"] == pytest.approx(2 * (n // 8 - 1) * 1e-5)


@pytest.mark.parametrize("hw", ["v100", "a100", "h100"])
def test_speedup_grows_with_gpu_count(hw: str) -> None:
    rows = sim.simulate(sim.HARDWARE[hw], [16, 32, 64, 128, 256, 512], [1])
    speedups = [r["speedup"] for r in rows]
    assert speedups == sorted(speedups) and speedups[-1] > speedups[0] + 0.1


def test_towers_split_a_host_share_wider_than_max_tower() -> None:
    w = sim.Workload(num_sparse=256, max_tower=16)
    assert sim.num_towers(w, 2) == 16  # 128 features per host -> 8 towers of 16
    assert sim.num_towers(w, 64) == 64  # 4 features per host -> one tower each
    with pytest.raises(sim.ConfigError, match="divides by CR=8"):
        sim.dmt_step(w, sim.HARDWARE["h100"], 512, 8)


# -- calibration ------------------------------------------------------------------------------


def _report(mode: str, mbit: float, steps: dict[str, float]) -> dict:
    runs = []
    for i, (name, t) in enumerate(steps.items()):
        runs.append(
            {
                "name": name,
                "step_s_median": t,
                "cross_host_bytes_per_step": 4e6 / (1 + i),
                "intra_host_bytes_per_step": 2e6 * (1 + i % 2),
                "cross_host_messages_per_step": 48.0 if name.startswith("baseline") else 28.0,
            }
        )
    rep = {
        "link_mode": mode,
        "link": {"cross_mbit": mbit, "intra_mbit": 48 * mbit},
        "hosts": 2,
        "ranks_per_host": 2,
        "runs": runs,
    }
    best = min(r["step_s_median"] for r in runs if r["name"].startswith("baseline"))
    for r in runs:
        r["speedup_vs_baseline"] = best / r["step_s_median"]
    return rep


def _shaped(unshaped: dict, mbit: float, kappa: float, eta: float, q: float) -> dict:
    """The same runs on a shaped link, timed by the emulated model with planted parameters."""
    steps = {}
    for r in unshaped["runs"]:
        net = (r["cross_host_bytes_per_step"] / 2) / (mbit * 1e6 / 8) + (
            r["intra_host_bytes_per_step"] / 2
        ) / (48 * mbit * 1e6 / 8)
        steps[r["name"]] = ((kappa * r["step_s_median"]) ** q + (net / eta) ** q) ** (1 / q)
    return _report("netns", mbit, steps)


# loopback step times of four runs: 4 runs, 3 parameters, an over-determined fit
LOOPBACK_STEPS = {
    "baseline_table_wise": 0.05,
    "baseline_row_wise": 0.09,
    "dmt_cr1": 0.08,
    "dmt_cr4": 0.07,
}


def test_calibration_recovers_planted_link_parameters() -> None:
    steps = LOOPBACK_STEPS
    unshaped = _report("none", 0.0, steps)  # 4 runs, 3 parameters: an over-determined fit
    fit = _shaped(unshaped, 100.0, kappa=0.6, eta=0.8, q=2.0)
    held = _shaped(unshaped, 25.0, kappa=0.6, eta=0.8, q=2.0)
    cal = sim.calibrate(unshaped, fit, [held])
    assert (cal.kappa, cal.eta, cal.q) == pytest.approx((0.6, 0.8, 2.0), rel=1e-4)
    assert {c["role"] for c in cal.checks} == {"fit", "held_out"}
    assert cal.max_speedup_error < 1e-6


def test_injected_latency_is_added_to_the_prediction_not_fitted() -> None:
    steps = LOOPBACK_STEPS
    unshaped = _report("none", 0.0, steps)
    fit = _shaped(unshaped, 100.0, kappa=0.6, eta=0.8, q=2.0)
    # the same links with per-message latency slept around the collectives: more for the
    # baselines (more cross-host peers), a planted amount the prediction must add as it is
    held = _shaped(unshaped, 100.0, kappa=0.6, eta=0.8, q=2.0)
    held["link_mode"] = "netns + injected latency"
    for r in held["runs"]:
        r["injected_delay_s_per_step"] = 0.24 if r["name"].startswith("baseline") else 0.19
        r["step_s_median"] += r["injected_delay_s_per_step"]
    best = min(r["step_s_median"] for r in held["runs"] if r["name"].startswith("baseline"))
    for r in held["runs"]:
        r["speedup_vs_baseline"] = best / r["step_s_median"]
    cal = sim.calibrate(unshaped, fit, [held])
    assert cal.max_speedup_error < 1e-6
    # the latency moved the speedups, so ignoring it would mispredict these runs
    held_checks = [c for c in cal.checks if c["role"] == "held_out"]
    fit_speedup = {r["name"]: r["speedup_vs_baseline"] for r in fit["runs"]}
    assert len(held_checks) == 4
    assert max(abs(c["measured_speedup"] / fit_speedup[c["run"]] - 1) for c in held_checks) > 0.1
    with pytest.raises(sim.ConfigError, match="--link none"):
        sim.calibrate(held, fit, [])
    # loopback with latency slept is not the unshaped compute time either
    slept = _report("none", 0.0, steps)
    slept["link_mode"] = "none + injected latency"
    slept["runs"][0]["injected_delay_s_per_step"] = 0.05
    with pytest.raises(sim.ConfigError, match="--link none"):
        sim.calibrate(slept, fit, [])


def test_calibration_rejects_a_shaped_file_as_the_unshaped_one(tmp_path: Path) -> None:
    unshaped = _report("none", 0.0, {"baseline_table_wise": 0.05, "dmt_cr1": 0.08})
    fit = _shaped(unshaped, 100.0, kappa=1.0, eta=1.0, q=1.0)
    with pytest.raises(sim.ConfigError, match="--link none"):
        sim.calibrate(fit, fit, [])


def test_cli_simulate_writes_json_and_reports_bad_files(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "sim"
    assert main(["simulate", "--hardware", "h100", "--gpus", "16,64", "--out", str(out)]) == 0
    rep = json.loads((out / "simulate.json").read_text())
    rows = rep["hardware"]["h100"]["rows"]
    assert [(r["gpus"], r["cr"]) for r in rows] == [(g, c) for g in (16, 64) for c in (1, 2, 4)]
    assert (out / "simulate.png").stat().st_size > 0
    capsys.readouterr()
    bad = tmp_path / "bench.json"
    bad.write_text('{"runs": [\n  1,,\n]}')
    assert main(["simulate", "--out", str(out), "--calibrate", str(bad), str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dmtrec: error: {bad}:2:5: not JSON") and "\n" not in err
    assert main(["simulate", "--hardware", "x100", "--out", str(out)]) == 2
    assert "--hardware x100" in capsys.readouterr().err
    assert main(["simulate", "--gpus", "12", "--out", str(out)]) == 2
    assert "--gpus 12" in capsys.readouterr().err
    assert main(["simulate", "--crs", "0,2", "--out", str(out)]) == 2
    assert "--crs must be integers >= 1" in capsys.readouterr().err
    assert main(["simulate", "--crs", "3", "--out", str(out)]) == 2
    assert "divides by CR=3" in capsys.readouterr().err
