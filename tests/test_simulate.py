"""The simulator's formulas on small closed-form cases, against TorchRec's and dmtrec's own
modules (FLOPs by ``torch.utils.flop_counter``), and its calibration on planted data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from torchrec.models.dlrm import DLRM, DLRM_DCN
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mlp import MLP
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dmtrec.bench import simulate as sim
from dmtrec.cli import main
from dmtrec.models.tower_modules import make_tower_module

INF = math.inf
H100 = sim.HARDWARE["h100"]


def test_a2a_is_pairwise_exchange_on_the_slower_link_class() -> None:
    links = sim.Links(intra_Bps=1e9, cross_Bps=1e8, alpha_intra_s=1e-6, alpha_cross_s=1e-5)
    # 1 local peer: 1e-6 + 1e6/1e9; 2 remote peers: 2 * (1e-5 + 1e6/1e8)
    assert sim.a2a_time(1e6, 1, 2, links) == pytest.approx(2 * (1e-5 + 1e-2))
    # only local peers: the intra term
    assert sim.a2a_time(1e6, 3, 0, links) == pytest.approx(3 * (1e-6 + 1e-3))
    # two collectives one after the other: their times add, and so does each link's busy time
    two = sim.a2a(1e6, 1, 2, links) + sim.a2a(1e6, 3, 0, links)
    assert two.time == pytest.approx(2 * (1e-5 + 1e-2) + 3 * (1e-6 + 1e-3))
    assert two.intra == pytest.approx((1e-6 + 1e-3) + 3 * (1e-6 + 1e-3))


def test_ring_and_hierarchical_allreduce() -> None:
    assert sim.allreduce_time(4e6, 4, 1e9, 0.0) == pytest.approx(2 * 3 * 1e6 / 1e9)
    assert sim.allreduce_time(4e6, 4, INF, 1e-5) == pytest.approx(6e-5)
    assert sim.allreduce_time(4e6, 1, 1e9, 1e-5) == 0.0
    links = sim.Links(intra_Bps=4e9, cross_Bps=1e9, alpha_intra_s=0.0, alpha_cross_s=0.0)
    # 8 MB over 2 hosts x 4 GPUs: reduce-scatter + all-gather of 2 MB chunks inside (2 * 3 steps
    # at 4 GB/s), then a ring over the 2 hosts of each GPU's 2 MB shard (2 steps of 1 MB)
    ar = sim.hier_allreduce(8e6, 2, 4, links)
    assert ar.intra == pytest.approx(6 * 2e6 / 4e9)
    assert ar.cross == pytest.approx(2 * 1e6 / 1e9)
    assert ar.time == pytest.approx(ar.intra + ar.cross)
    assert sim.hier_allreduce(0.0, 2, 4, links).time == 0.0


def _kjt(keys: list[str], batch: int) -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_lengths_sync(
        keys,
        torch.zeros(len(keys) * batch, dtype=torch.long),
        torch.ones(len(keys) * batch, dtype=torch.long),
    )


def _dense(model: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embedding_bags" not in n)


@pytest.mark.parametrize("interaction", ["dot", "dcn"])
def test_dense_head_matches_torchrec_dlrm(interaction: str) -> None:
    """FLOPs per example and dense parameters of TorchRec's DLRM / DLRM_DCN, counted."""
    f, d, batch = 3, 8, 4
    w = sim.Workload(
        pooling=(1.0,) * f,
        embedding_dim=d,
        num_dense=5,
        bottom=(16, d),
        top=(12, 6, 1),
        interaction=interaction,
        dcn_layers=2,
        dcn_rank=4,
    )
    keys = [f"f{i}" for i in range(f)]
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(num_embeddings=5, embedding_dim=d, name=k, feature_names=[k])
            for k in keys
        ]  # fmt: skip
    )
    if interaction == "dot":
        model = DLRM(ebc, 5, list(w.bottom), list(w.top))
    else:
        model = DLRM_DCN(ebc, 5, list(w.bottom), list(w.top), dcn_num_layers=2, dcn_low_rank_dim=4)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(batch, 5), _kjt(keys, batch))
    flops, params = sim.dense_head(w, f)
    assert counter.get_total_flops() / batch == flops
    assert _dense(model) == params


@pytest.mark.parametrize(
    "tm, m, cr", [("dlrm", 3, 2), ("dcn", 4, 2), ("dcn", 3, 4), ("dlrm", 2, 8)]
)
def test_tower_module_cost_matches_dmtrec_tower_modules(tm: str, m: int, cr: int) -> None:
    """Including CR beyond the tower's width (a narrow output: ceil(m * D / CR) numbers)."""
    d, batch = 8, 5
    w = sim.Workload(embedding_dim=d, tm=tm)
    module = make_tower_module(tm, m, d, cr)
    with FlopCounterMode(display=False) as counter:
        module(torch.randn(batch, m, d))
    flops, params = sim.tm_cost(w, m, cr)
    assert counter.get_total_flops() / batch == flops
    assert sum(p.numel() for p in module.parameters()) == params


def test_mlp_flops_match_flop_counter_on_torchrec_mlp() -> None:
    sizes = [37, 16, 8, 1]
    mlp = MLP(sizes[0], sizes[1:])
    with FlopCounterMode(display=False) as counter:
        mlp(torch.randn(5, sizes[0]))
    assert counter.get_total_flops() / 5 == sim.mlp_flops(sizes)
    assert sum(p.numel() for p in mlp.parameters()) == sim.mlp_params(sizes)


def test_mlperf_workload_is_the_reference_config() -> None:
    w = sim.Workload()
    assert w.name == "mlperf-dlrmv2" and w.num_sparse == 26 and w.embedding_dim == 128
    assert max(w.rows) == 40_000_000 and sum(w.pooling) == 214 and w.pooling[20] == 100
    assert (w.bottom, w.top, w.interaction) == ((512, 256, 128), (1024, 1024, 512, 256, 1), "dcn")
    assert (w.dcn_layers, w.dcn_rank, w.global_batch) == (3, 512, 65536)
    assert [w.local_batch(n) for n in (16, 64, 512)] == [4096, 1024, 128]
    with pytest.raises(sim.ConfigError, match="--gpus 24 does not divide the global batch 65536"):
        w.local_batch(24)


def test_hosts_get_balanced_lookups_and_at_most_ceil_f_over_h_features() -> None:
    w = sim.Workload()
    hosts = sim.host_features(w, 8)
    assert sorted(i for fs in hosts for i in fs) == list(range(26))
    assert max(len(fs) for fs in hosts) == 4
    load = sorted(sum(w.pooling[i] for i in fs) for fs in hosts)
    # the 100-hot table is a host by itself (100 > 214 / 8): DMT cannot split one table
    assert load[-1] == 100 and [20] in hosts
    assert load[-2] <= 27
    with pytest.raises(sim.ConfigError, match="32 hosts but 26 features"):
        sim.num_towers(w, 32)


def _bandwidth_only() -> sim.Links:
    return sim.Links(intra_Bps=INF, cross_Bps=1e9, alpha_intra_s=0.0, alpha_cross_s=0.0)


@pytest.mark.parametrize("gpus", [16, 64, 256])
@pytest.mark.parametrize("precision, nbytes", [("fp32", 4), ("fp16", 2), ("bf16", 2)])
def test_pooled_time_is_cross_bytes_over_bandwidth(gpus: int, precision: str, nbytes: int) -> None:
    """With no latency and a free intra link, each pooled AlltoAll costs exactly the
    cross-host bytes / NIC bandwidth; DMT sends 1/CR of the baseline's bytes; fp16 half fp32."""
    w, lk, run = sim.dlrm_256(), _bandwidth_only(), sim.RunSettings(precision)
    base = sim.cross_pooled_bytes(w, gpus, 8, None, run)
    hosts = gpus // 8
    assert base == pytest.approx(1024 * 256 * 128 * nbytes * (hosts - 1) / hosts)
    assert sim.baseline_step(w, H100, gpus, lk, run)["pooled_fwd"] == pytest.approx(base / 1e9)
    for cr in (1, 2, 4):
        dmt = sim.cross_pooled_bytes(w, gpus, 8, cr, run)
        assert dmt == pytest.approx(base / cr)
        assert sim.dmt_step(w, H100, gpus, cr, lk, run)["pooled_bwd"] == pytest.approx(dmt / 1e9)


def test_cr1_gain_comes_from_fewer_cross_host_peers() -> None:
    """Latency only: the baseline's pooled AlltoAll pays N-L messages across hosts, DMT's H-1."""
    w = sim.dlrm_256()
    lk = sim.Links(intra_Bps=INF, cross_Bps=INF, alpha_intra_s=0.0, alpha_cross_s=1e-5)
    n = 64
    assert sim.baseline_step(w, H100, n, lk)["pooled_fwd"] == pytest.approx((n - 8) * 1e-5)
    assert sim.dmt_step(w, H100, n, 1, lk)["pooled_fwd"] == pytest.approx((n // 8 - 1) * 1e-5)


@pytest.mark.parametrize("workload", [sim.Workload(), sim.dlrm_256()])
def test_overlap_only_shortens_the_step_down_to_the_busier_link(workload: sim.Workload) -> None:
    """serial >= none (DDP) >= sparse-dist >= the time the busier link class is busy; serial
    is the sum of the terms."""
    for gpus in (16, 64, 128):
        for step in (
            lambda run, n=gpus: sim.baseline_step(workload, H100, n, run=run),
            lambda run, n=gpus: sim.dmt_step(workload, H100, n, 2, run=run),
        ):
            t = {p: step(sim.RunSettings("fp16", p)) for p in sim.PIPELINES}
            terms = ("ids_a2a", "lookup_fwd", "pooled_fwd", "dense_fwd", "dense_bwd",
                     "allreduce", "pooled_bwd", "lookup_bwd")  # fmt: skip
            assert t["serial"]["total"] == pytest.approx(sum(t["serial"][k] for k in terms))
            assert t["serial"]["total"] >= t["none"]["total"] >= t["sparse-dist"]["total"]
            sd = t["sparse-dist"]
            assert sd["total"] >= max(sd["intra_comm"], sd["cross_comm"]) - 1e-12
            assert sd["hidden_by_overlap"] == pytest.approx(sd["serial"] - sd["total"])


def test_compute_free_pipelined_baseline_is_its_cross_host_bytes_over_the_nic() -> None:
    """Planted: infinite flops, HBM and NVLink, no latency. The pipelined step is then the
    NIC's busy time: every cross-host byte of the step (ids, pooled forward and backward, the
    all-reduce's cross-host ring) over its bandwidth, counted here by hand."""
    hw = sim.Hardware("free", 8, INF, 50.0, peak_tflops=INF, hbm_GBps=INF)
    lk = sim.Links(intra_Bps=INF, cross_Bps=50e9, alpha_intra_s=0.0, alpha_cross_s=0.0)
    w, n, hosts, loc = sim.Workload(), 64, 8, 8
    b, f, d = 1024, 26, 128
    ids = b * (214 * 8 + f * 4) * (n - loc) / n
    pooled = 2 * b * f * d * 2 * (n - loc) / n  # forward + backward, fp16
    _, params = sim.dense_head(w, f)
    ring = 2 * (hosts - 1) / hosts * params * 4 / loc  # each GPU's 1/L shard across hosts
    step = sim.baseline_step(w, hw, n, lk)
    assert step["compute"] == 0.0 and step["intra_comm"] == 0.0
    assert step["total"] == pytest.approx((ids + pooled + ring) / 50e9)
    assert step["hidden_by_overlap"] == pytest.approx(0.0, abs=1e-12)  # nothing left to hide


@pytest.mark.parametrize("pipeline", sim.PIPELINES)
def test_dlrm_256_speedup_grows_with_gpu_count(pipeline: str) -> None:
    rows = sim.simulate(H100, [16, 32, 64, 128, 256, 512], [1], sim.dlrm_256(),
                        sim.RunSettings("fp16", pipeline))  # fmt: skip
    speedups = [r["speedup"] for r in rows]
    assert speedups == sorted(speedups) and speedups[-1] > speedups[0] + 0.1


def test_towers_split_a_host_share_wider_than_max_tower() -> None:
    w = sim.dlrm_256()
    assert sim.num_towers(w, 2) == 16  # 128 features per host -> 8 towers of 16
    assert sim.num_towers(w, 64) == 64  # 4 features per host -> one tower each
    assert [len(t) for t in sim.towers(w, 2)[0]] == [16] * 8
    with pytest.raises(sim.ConfigError, match="--crs 600 is larger than a tower of 4 features"):
        sim.dmt_step(w, H100, 512, 600)


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
    argv = ["simulate", "--hardware", "h100", "--gpus", "16,64,256", "--out", str(out)]
    assert main(argv) == 0
    rep = json.loads((out / "simulate.json").read_text())
    assert rep["workload"]["name"] == "mlperf-dlrmv2"
    assert rep["run"] == {"comm_precision": "fp16", "pipeline": "sparse-dist"}
    rows = rep["hardware"]["h100"]["rows"]
    assert [(r["gpus"], r["cr"]) for r in rows] == [
        (g, c) for g in (16, 64, 256) for c in (1, 2, 4)
    ]
    # 256 GPUs = 32 hosts > 26 tables: no DMT row, and the reason
    assert all(r["speedup"] is None and "32 hosts but 26 features" in r["dmt_error"]
               for r in rows if r["gpus"] == 256)  # fmt: skip
    r64 = next(r for r in rows if r["gpus"] == 64 and r["cr"] == 1)
    assert r64["speedup"] == pytest.approx(r64["baseline_step_s"] / r64["dmt_step_s"])
    assert r64["local_batch"] == 1024 and r64["table_gb_per_gpu"]["dmt"] < 80
    assert (out / "simulate.png").stat().st_size > 0
    fp32 = tmp_path / "fp32"
    assert main([*argv[:-1], str(fp32), "--comm-precision", "fp32", "--pipeline", "none"]) == 0
    r32 = json.loads((fp32 / "simulate.json").read_text())["hardware"]["h100"]["rows"][3]
    assert r32["cross_pooled_bytes"]["baseline"] == 2 * r64["cross_pooled_bytes"]["baseline"]
    old = tmp_path / "old"
    assert main(["simulate", "--workload", "dlrm-256", "--gpus", "512", "--out", str(old)]) == 0
    assert json.loads((old / "simulate.json").read_text())["workload"]["batch_per_gpu"] == 1024
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
    assert main(["simulate", "--num-sparse", "100", "--out", str(out)]) == 2
    assert "--num-sparse: the MLPerf workload has its 26 tables" in capsys.readouterr().err
    assert main(["simulate", "--comm-precision", "fp8", "--out", str(out)]) == 2
    assert "fp8" in capsys.readouterr().err
