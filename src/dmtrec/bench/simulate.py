"""``dmtrec simulate``: project DMT vs hybrid-parallel step time from one box to 16-512 GPUs.

An alpha-beta model per link class. Every all-to-all is modelled as pairwise exchange
(Thakur, Rabenseifner & Gropp, "Optimization of Collective Communication Operations in MPICH",
IJHPCA 2005): a rank sends one message to each peer, each costing ``alpha + bytes / bandwidth``
of the link it crosses; peers inside the host (NVLink) and across hosts (NIC) are served
concurrently by different hardware, so the collective takes the slower of the two link classes:

    t_a2a = max( (L_peers) * alpha_intra + V_intra / BW_intra ,
                 (X_peers) * alpha_cross + V_cross / BW_cross )

Dense gradients are all-reduced with a ring over the slowest link:
``2 (p-1) alpha + 2 (p-1)/p * M / BW``. Compute is roofline: dense FLOPs (fwd + 2x for bwd) at
``mfu`` of peak, embedding rows moved (lookup, gradient, row-wise Adagrad update) at
``lookup_efficiency`` of HBM bandwidth. No overlap of communication with compute is assumed
(both systems would gain from it; the ratio is what we report).

Dataflow of one training step per GPU (N = H hosts x L GPUs, local batch B, F features with
pooling factor P, dim D, K = H towers of m = F/H features, one tower per host; see
``../shared/notes/dmt.md``):

- baseline (TorchRec table-wise): ids AlltoAll over N; pooled AlltoAll over N, forward and
  backward; dense DLRM on F features; all-reduce of the dense parameters over N.
- DMT (SPTT + TM): ids peer AlltoAll over H (cross only); ids and pooled AlltoAll inside the
  host over L (NVLink); tower module on the host's H*B samples; compressed pooled peer AlltoAll
  over H (bytes / CR), forward and backward; the head on F/CR virtual features; all-reduce of
  the head over N and of the tower modules over L.

The cross-host pooled bytes per GPU are the same in both at CR=1, ``B F D e (H-1)/H``; what
differs is the number of peers a rank talks to across hosts, N-L against H-1 (the paper's
"running in a smaller world size improves communication throughput"), and the bytes / CR.

Calibration (``calibrate``): the emulated 2 x 2 benchmark gives, per run, the step time on
unshaped loopback (compute plus fast communication, ``c``) and on the shaped links, and the
exact bytes of every run, hence ``n`` = seconds those bytes take at the shaped rates (each host
link carries 1/H of them). The emulated step is a partial overlap of the two:

    t_shaped = ((kappa * c)^q + (n / eta)^q)^(1/q)

q = 1 is no overlap, q -> inf is perfect overlap (with H*L processes, one rank computes while
another waits on the link); kappa < 1 because on loopback the processes contend for the box's
few cores; eta is the fraction of the shaped rate TCP reaches. (kappa, eta, q) are a
least-squares fit (relative error) on one shaped run; the model is then scored on the speedups
of every run, including other bandwidths it never saw. tbf shapes bandwidth only, so there is
no fitted per-message latency term (an additive alpha * messages term fitted to 0); runs with
latency slept before their collectives (``bench dmt --cross-latency-ms``, or ``--link
delay``) record the seconds they slept per step, which are added to the prediction as they are,
so such runs test the model's alpha terms with nothing refitted.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dmtrec.errors import ConfigError


@dataclass(frozen=True)
class Hardware:
    """One GPU generation in a DGX-class host. Bandwidths are per GPU, per direction."""

    name: str
    gpus_per_host: int
    intra_GBps: float
    cross_GBps: float
    peak_tflops: float  # dense fp16/bf16 tensor-core peak
    hbm_GBps: float
    alpha_intra_us: float = 5.0
    alpha_cross_us: float = 15.0
    source: str = ""


# Published link figures (NVIDIA DGX-1/DGX A100/DGX H100 datasheets and user guides; the
# NVLink figure is bidirectional per GPU, halved here to one direction; the NIC figure is the
# ConnectX bandwidth per GPU). Latencies are our setting, of the order of NCCL's own tuning
# model (src/graph/tuning.cc: NVLink ring/Simple hwLat 3.4 us, base latency 8.4 us; the
# network adds ~5-10 us per hop). All of these are fields of ``Hardware`` (and ``--alpha-*-us`` options), not
# constants: Meta's ZionEX/Grand Teton hosts differ in NIC count, and the paper's exact
# topology is not public.
HARDWARE: dict[str, Hardware] = {
    "v100": Hardware(
        "v100",
        8,
        intra_GBps=150.0,  # NVLink 2: 6 links x 50 GB/s = 300 GB/s bidirectional
        cross_GBps=6.25,  # DGX-1: 4x EDR 100 Gb/s IB for 8 GPUs = 50 Gb/s per GPU
        peak_tflops=125.0,  # V100 SXM2 tensor core fp16
        hbm_GBps=900.0,
        source="DGX-1 (V100 SXM2): NVLink 2 300 GB/s bidir/GPU; 4x EDR IB 100 Gb/s per 8 GPUs",
    ),
    "a100": Hardware(
        "a100",
        8,
        intra_GBps=300.0,  # NVLink 3: 12 x 50 GB/s = 600 GB/s bidirectional
        cross_GBps=25.0,  # DGX A100: 8x ConnectX-6 HDR 200 Gb/s, one per GPU
        peak_tflops=312.0,  # A100 SXM bf16 dense
        hbm_GBps=2039.0,  # A100 80GB SXM
        source="DGX A100: NVLink 3 600 GB/s bidir/GPU; 8x HDR IB 200 Gb/s (1 per GPU)",
    ),
    "h100": Hardware(
        "h100",
        8,
        intra_GBps=450.0,  # NVLink 4: 18 x 50 GB/s = 900 GB/s bidirectional
        cross_GBps=50.0,  # DGX H100: 8x ConnectX-7 NDR 400 Gb/s, one per GPU
        peak_tflops=989.0,  # H100 SXM bf16 dense
        hbm_GBps=3350.0,
        source="DGX H100: NVLink 4 900 GB/s bidir/GPU; 8x NDR IB 400 Gb/s (1 per GPU)",
    ),
}


@dataclass(frozen=True)
class Workload:
    """The model and batch of the projection. Defaults: a DLRM-scale ranking model (our choice,
    documented in the README): MLPerf DLRM's MLPs and dim 128, with the hundreds of sparse
    features of production models (Neo/ZionEX, arXiv 2104.05158), multi-hot (pooling 10),
    fp16 embedding communication as in Neo, fixed local batch (weak scaling)."""

    num_sparse: int = 256
    embedding_dim: int = 128
    pooling: float = 10.0
    batch_per_gpu: int = 1024
    num_dense: int = 13
    bottom: tuple[int, ...] = (512, 256, 128)
    top: tuple[int, ...] = (1024, 1024, 512, 256, 1)
    comm_bytes: int = 2  # pooled embeddings and their gradients (fp16)
    id_bytes: int = 8  # int64 ids (+ int32 lengths)
    weight_bytes: int = 4  # fp32 tables
    grad_bytes: int = 4  # fp32 dense all-reduce
    mfu: float = 0.35  # fraction of peak the dense part reaches
    lookup_efficiency: float = 0.5  # fraction of HBM bandwidth the embedding kernels reach
    max_tower: int = 16  # most features in one tower (sets K, see ``num_towers``)


@dataclass(frozen=True)
class Links:
    """Effective per-rank link model: bytes/s and seconds per message of each link class."""

    intra_Bps: float
    cross_Bps: float
    alpha_intra_s: float
    alpha_cross_s: float

    @classmethod
    def of(cls, hw: Hardware) -> Links:
        return cls(
            hw.intra_GBps * 1e9,
            hw.cross_GBps * 1e9,
            hw.alpha_intra_us * 1e-6,
            hw.alpha_cross_us * 1e-6,
        )


MODEL = (
    "per step: pairwise-exchange AlltoAll per link class (alpha * peers + bytes / bandwidth, "
    "intra and cross concurrent), ring all-reduce, roofline compute, no overlap"
)


# -- closed forms ---------------------------------------------------------------------------


def a2a_time(bytes_per_peer: float, intra_peers: int, cross_peers: int, links: Links) -> float:
    """Pairwise-exchange all-to-all: one message per peer; link classes run concurrently."""
    intra = intra_peers * (links.alpha_intra_s + bytes_per_peer / links.intra_Bps)
    cross = cross_peers * (links.alpha_cross_s + bytes_per_peer / links.cross_Bps)
    return max(intra, cross)


def allreduce_time(nbytes: float, ranks: int, bw_Bps: float, alpha_s: float) -> float:
    """Ring all-reduce of ``nbytes``: 2(p-1) steps of nbytes/p each."""
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) * (alpha_s + nbytes / ranks / bw_Bps)


def mlp_flops(sizes: list[int]) -> float:
    """Forward FLOPs of a chain of Linear layers ``sizes[0] -> sizes[1] -> ...`` per example."""
    return float(sum(2 * a * b for a, b in zip(sizes, sizes[1:], strict=False)))


def mlp_params(sizes: list[int]) -> float:
    return float(sum(a * b + b for a, b in zip(sizes, sizes[1:], strict=False)))


def dlrm_dense(w: Workload, num_features: int) -> tuple[float, float]:
    """(forward FLOPs per example, parameters) of a DLRM dense part over ``num_features``
    embedding vectors: bottom MLP, pairwise dots of the F+1 vectors, top MLP."""
    d = w.embedding_dim
    bottom = [w.num_dense, *w.bottom]
    n = num_features + 1
    pairs = n * (n - 1) // 2
    top = [w.bottom[-1] + pairs, *w.top]
    flops = mlp_flops(bottom) + 2.0 * d * pairs + mlp_flops(top)
    return flops, mlp_params(bottom) + mlp_params(top)


def dot_tm(w: Workload, m: int, cr: int) -> tuple[float, float]:
    """(forward FLOPs per example, parameters) of one DLRM tower module: pairwise dots of the
    tower's m embeddings, then a linear map of (embeddings, dots) to m/CR vectors of dim D."""
    if cr == 1:
        return 0.0, 0.0  # identity TM
    d = w.embedding_dim
    pairs = m * (m - 1) // 2
    sizes = [m * d + pairs, (m // cr) * d]
    return 2.0 * d * pairs + mlp_flops(sizes), mlp_params(sizes)


def _compute(w: Workload, hw: Hardware, flops_per_example: float, samples: float) -> float:
    return 3.0 * flops_per_example * samples / (hw.peak_tflops * 1e12 * w.mfu)


def _lookup(w: Workload, hw: Hardware) -> float:
    # Each GPU pools B*F*P rows in total in both systems (its tables, everybody's samples):
    # read in forward, gradient rows written in backward, row-wise Adagrad read-modify-write.
    rows = w.batch_per_gpu * w.num_sparse * w.pooling
    return 4.0 * rows * w.embedding_dim * w.weight_bytes / (hw.hbm_GBps * 1e9 * w.lookup_efficiency)


def baseline_step(
    w: Workload, hw: Hardware, gpus: int, links: Links | None = None
) -> dict[str, float]:
    """Seconds per step of TorchRec hybrid parallelism (table-wise) on ``gpus`` GPUs."""
    lk = links or Links.of(hw)
    n, loc = gpus, min(hw.gpus_per_host, gpus)
    b, f, d = w.batch_per_gpu, w.num_sparse, w.embedding_dim
    ids_peer = b * f * (w.pooling * w.id_bytes + 4) / n
    pooled_peer = b * f * d * w.comm_bytes / n
    flops, params = dlrm_dense(w, f)
    hosts = n // loc
    ar_bw, ar_alpha = (
        (lk.cross_Bps, lk.alpha_cross_s) if hosts > 1 else (lk.intra_Bps, lk.alpha_intra_s)
    )
    parts = {
        "ids_a2a": a2a_time(ids_peer, loc - 1, n - loc, lk),
        "pooled_a2a": 2 * a2a_time(pooled_peer, loc - 1, n - loc, lk),
        "lookup": _lookup(w, hw),
        "dense": _compute(w, hw, flops, b),
        "allreduce": allreduce_time(params * w.grad_bytes, n, ar_bw, ar_alpha),
    }
    parts["total"] = sum(parts.values())
    return parts


def num_towers(w: Workload, hosts: int) -> int:
    """K: one tower per host, more when a host's share of features exceeds ``max_tower``
    (a TM's projection grows with the square of its width); a multiple of H."""
    per_host = w.num_sparse // hosts
    return hosts * max(1, math.ceil(per_host / w.max_tower))


def dmt_step(
    w: Workload, hw: Hardware, gpus: int, cr: int, links: Links | None = None
) -> dict[str, float]:
    """Seconds per step of DMT (SPTT, K towers spread evenly over the hosts, DLRM tower
    modules at ``cr``)."""
    lk = links or Links.of(hw)
    loc = min(hw.gpus_per_host, gpus)
    hosts = gpus // loc
    b, f, d = w.batch_per_gpu, w.num_sparse, w.embedding_dim
    k = num_towers(w, hosts)
    if f % k or (f // k) % cr:
        raise ConfigError(
            f"{f} features over {k} towers must give towers whose width divides by CR={cr}"
        )
    m = f // k  # features per tower
    mh = f // hosts  # features per host
    # (1) ids of host h's features for my B samples go to host h's rank with my local rank.
    ids_peer = a2a_time(b * mh * (w.pooling * w.id_bytes + 4), 0, hosts - 1, lk)
    # (2) inside the host, its tables are sharded over L ranks: ids and pooled embeddings of
    # H*B samples x mh features, 1/L to each local peer.
    ids_intra = a2a_time(hosts * b * mh * (w.pooling * w.id_bytes + 4) / loc, loc - 1, 0, lk)
    pooled_intra = 2 * a2a_time(hosts * b * mh * d * w.comm_bytes / loc, loc - 1, 0, lk)
    # (3) the host's K/H TMs on its H*B samples; (4) their outputs, mh/CR vectors per sample,
    # back to the samples' home ranks.
    tm_flops, tm_params = dot_tm(w, m, cr)
    pooled_peer = 2 * a2a_time(b * (mh // cr) * d * w.comm_bytes, 0, hosts - 1, lk)
    head_flops, head_params = dlrm_dense(w, f // cr)
    ar_bw, ar_alpha = (
        (lk.cross_Bps, lk.alpha_cross_s) if hosts > 1 else (lk.intra_Bps, lk.alpha_intra_s)
    )
    parts = {
        "ids_a2a": ids_peer + ids_intra,
        "pooled_a2a": pooled_intra + pooled_peer,
        "lookup": _lookup(w, hw),
        "dense": _compute(w, hw, head_flops, b)
        + _compute(w, hw, tm_flops * (k // hosts), hosts * b),
        "allreduce": allreduce_time(head_params * w.grad_bytes, gpus, ar_bw, ar_alpha)
        + allreduce_time(
            tm_params * (k // hosts) * w.grad_bytes, loc, lk.intra_Bps, lk.alpha_intra_s
        ),
    }
    parts["total"] = sum(parts.values())
    return parts


def cross_pooled_bytes(w: Workload, gpus: int, gpus_per_host: int, cr: int | None) -> float:
    """Pooled-embedding bytes one GPU sends across hosts per forward (``cr=None``: baseline)."""
    hosts = gpus // gpus_per_host
    b, f, d = w.batch_per_gpu, w.num_sparse, w.embedding_dim
    if cr is None:
        return (gpus - gpus_per_host) * b * f * d * w.comm_bytes / gpus
    return (hosts - 1) * b * (f // hosts // cr) * d * w.comm_bytes


def simulate(
    hw: Hardware, gpus: list[int], crs: list[int], w: Workload | None = None
) -> list[dict[str, Any]]:
    """Rows of (gpus, cr): baseline and DMT step time, their breakdowns and the speedup."""
    w = w or Workload()
    rows = []
    for n in gpus:
        if n % hw.gpus_per_host or n < 2 * hw.gpus_per_host:
            raise ConfigError(
                f"--gpus {n}: need a multiple of {hw.gpus_per_host} GPUs per host and >= 2 hosts"
            )
        base = baseline_step(w, hw, n)
        for cr in crs:
            dmt = dmt_step(w, hw, n, cr)
            rows.append(
                {
                    "gpus": n,
                    "hosts": n // hw.gpus_per_host,
                    "cr": cr,
                    "baseline_step_s": base["total"],
                    "dmt_step_s": dmt["total"],
                    "speedup": base["total"] / dmt["total"],
                    "baseline_breakdown_s": base,
                    "dmt_breakdown_s": dmt,
                }
            )
    return rows


# -- calibration on the emulated benchmark ---------------------------------------------------


@dataclass
class Calibration:
    """Fitted emulated-link parameters and how well they predict held-out speedups."""

    kappa: float
    eta: float
    q: float
    fit_on: str
    checks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def max_speedup_error(self) -> float:
        return max((abs(c["rel_error"]) for c in self.checks), default=float("nan"))


def _runs(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in report["runs"]}


def _net_seconds(run: dict[str, Any], report: dict[str, Any]) -> float:
    """Seconds the run's bytes take at the shaped rates: each host link carries 1/H of the
    cross-host bytes and each host's loopback 1/H of the intra-host bytes."""
    hosts, link = report["hosts"], report["link"]
    if not report["link_mode"].startswith("netns"):
        return 0.0  # no shaped link: loopback, or the bytes' time is in the injected delay
    cross_Bps = link["cross_mbit"] * 1e6 / 8
    intra_Bps = link["intra_mbit"] * 1e6 / 8
    return (run["cross_host_bytes_per_step"] / hosts) / cross_Bps + (
        run["intra_host_bytes_per_step"] / hosts
    ) / intra_Bps


def overlap_time(compute_s: np.ndarray, net_s: np.ndarray, kappa: float, eta: float, q: float):
    """The emulated step: a q-norm of (kappa * compute, net / eta), see the module docstring."""
    return ((kappa * compute_s) ** q + (net_s / eta) ** q) ** (1.0 / q)


def _injected(run: dict[str, Any]) -> float:
    """Seconds per step the run slept in injected link delays (``emulate/delay.py``): known
    exactly, serial with everything else, so added to the model, not fitted."""
    return float(run.get("injected_delay_s_per_step", 0.0))


def _predict(
    unshaped: dict[str, Any], shaped: dict[str, Any], cal: Calibration
) -> dict[str, float]:
    base = _runs(unshaped)
    names = [n for n in _runs(shaped) if n in base]
    c = np.array([base[n]["step_s_median"] for n in names])
    net = np.array([_net_seconds(_runs(shaped)[n], shaped) for n in names])
    inj = np.array([_injected(_runs(shaped)[n]) for n in names])
    t = overlap_time(c, net, cal.kappa, cal.eta, cal.q) + inj
    return dict(zip(names, t.tolist(), strict=True))


def _speedups(times: dict[str, float]) -> dict[str, float]:
    best = min(t for n, t in times.items() if n.startswith("baseline"))
    return {n: best / t for n, t in times.items()}


def calibrate(
    unshaped: dict[str, Any], fit: dict[str, Any], held_out: list[dict[str, Any]]
) -> Calibration:
    """Fit (kappa, eta, q) on ``fit``'s step times (least squares of the relative error);
    score the predicted speedups of every run of ``fit`` and of each ``held_out`` report."""
    from scipy.optimize import least_squares

    for rep in (unshaped, fit, *held_out):
        if "runs" not in rep or "hosts" not in rep:
            raise ConfigError("calibration input is not a bench.json of `dmtrec bench dmt`")
    if not unshaped["link_mode"].startswith("none") or any(_injected(r) for r in unshaped["runs"]):
        raise ConfigError("the first calibration file must be a `bench dmt --link none` run")
    base = _runs(unshaped)
    names = [n for n in _runs(fit) if n in base]
    if len(names) < 4:
        raise ConfigError("calibration needs >= 4 runs present in both bench.json files")
    c = np.array([base[n]["step_s_median"] for n in names])
    net = np.array([_net_seconds(_runs(fit)[n], fit) for n in names])
    t = np.array([_runs(fit)[n]["step_s_median"] for n in names])
    inj = np.array([_injected(_runs(fit)[n]) for n in names])
    sol = least_squares(
        lambda p: (overlap_time(c, net, *p) + inj) / t - 1.0,
        x0=[0.5, 0.8, 2.0],
        bounds=([0.0, 0.05, 1.0], [2.0, 1.5, 50.0]),
    )
    cal = Calibration(*map(float, sol.x), fit_on=_label(fit))
    for rep, role in [(fit, "fit"), *[(h, "held_out") for h in held_out]]:
        pred = _speedups(_predict(unshaped, rep, cal))
        meas = {n: r["speedup_vs_baseline"] for n, r in _runs(rep).items()}
        for name in pred:
            cal.checks.append(
                {
                    "report": _label(rep),
                    "role": role,
                    "run": name,
                    "measured_speedup": meas[name],
                    "predicted_speedup": pred[name],
                    "rel_error": pred[name] / meas[name] - 1.0,
                }
            )
    return cal


def _label(report: dict[str, Any]) -> str:
    link = report.get("link", {})
    mode = report["link_mode"].split(" ")[0]
    label = (
        f"{report['hosts']}x{report['ranks_per_host']} {mode} {link.get('cross_mbit', '-')} Mbit"
    )
    alpha = link.get("injected", {})
    if alpha.get("alpha_cross_ms") or alpha.get("alpha_intra_ms"):
        label += f" a={alpha['alpha_cross_ms']:g}/{alpha['alpha_intra_ms']:g}ms"
    return label


def load_bench(path: str) -> dict[str, Any]:
    """A ``bench.json``, or a one-line error naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}:{e.colno}: not JSON ({e.msg})") from None


# -- the command -----------------------------------------------------------------------------


def run_simulate(
    out: str,
    *,
    hardware: list[str],
    gpus: list[int],
    crs: list[int],
    workload: Workload | None = None,
    calibration: list[str] | None = None,
    alpha_cross_us: float | None = None,
    alpha_intra_us: float | None = None,
) -> dict[str, Any]:
    """Simulate each hardware generation; optionally calibrate on bench.json files
    (``[unshaped, fit, held_out...]``). Writes ``OUT/simulate.json`` and ``OUT/simulate.png``."""
    w = workload or Workload()
    report: dict[str, Any] = {
        "workload": asdict(w),
        "model": MODEL,
        "hardware": {},
    }
    for name in hardware:
        if name not in HARDWARE:
            raise ConfigError(f"--hardware {name}: expected one of {', '.join(HARDWARE)}")
        hw = HARDWARE[name]
        if alpha_cross_us is not None:
            hw = replace(hw, alpha_cross_us=alpha_cross_us)
        if alpha_intra_us is not None:
            hw = replace(hw, alpha_intra_us=alpha_intra_us)
        report["hardware"][name] = {"settings": asdict(hw), "rows": simulate(hw, gpus, crs, w)}
    if calibration:
        if len(calibration) < 2:
            raise ConfigError("--calibrate needs UNSHAPED.json SHAPED.json [HELD_OUT.json ...]")
        reps = [load_bench(p) for p in calibration]
        cal = calibrate(reps[0], reps[1], reps[2:])
        report["calibration"] = {
            "files": calibration,
            "compute_factor_kappa": cal.kappa,
            "bandwidth_efficiency_eta": cal.eta,
            "overlap_q": cal.q,
            "fit_on": cal.fit_on,
            "max_abs_speedup_error": cal.max_speedup_error,
            "checks": cal.checks,
        }
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "simulate.json").write_text(json.dumps(report, indent=2))
    _plot(report, crs, Path(out) / "simulate.png")
    _print(report)
    return report


def _print(report: dict[str, Any]) -> None:
    for name, h in report["hardware"].items():
        print(f"{name}: {h['settings']['source']}")
        print(f"{'GPUs':>6}{'CR':>4}{'baseline ms':>13}{'DMT ms':>9}{'speedup':>9}")
        for r in h["rows"]:
            print(
                f"{r['gpus']:>6}{r['cr']:>4}{r['baseline_step_s'] * 1e3:>13.2f}"
                f"{r['dmt_step_s'] * 1e3:>9.2f}{r['speedup']:>9.2f}"
            )
    cal = report.get("calibration")
    if cal:
        print(
            f"calibration on {cal['fit_on']}: kappa {cal['compute_factor_kappa']:.2f}, "
            f"eta {cal['bandwidth_efficiency_eta']:.2f}, q {cal['overlap_q']:.2f}"
        )
        for c in cal["checks"]:
            print(
                f"  {c['role']:<9}{c['report']:<36}{c['run']:<22}measured {c['measured_speedup']:.2f}"
                f"  predicted {c['predicted_speedup']:.2f}  ({c['rel_error']:+.0%})"
            )
        print(f"  max |error| {cal['max_abs_speedup_error']:.0%}")


def _plot(report: dict[str, Any], crs: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, h in report["hardware"].items():
        for cr, style in zip(crs, ["-", "--", ":", "-."] * 4, strict=False):
            rs = [r for r in h["rows"] if r["cr"] == cr]
            ax.plot(
                [r["gpus"] for r in rs],
                [r["speedup"] for r in rs],
                style,
                marker="o",
                label=f"{name} CR={cr}",
            )
    ax.axhline(1.0, color="#999", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("GPUs")
    ax.set_ylabel("DMT speedup over hybrid parallel")
    ax.set_title("alpha-beta projection (dmtrec simulate)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_simulate_cli(
    out: str,
    *,
    hardware: tuple[str, ...] = ("v100", "a100", "h100"),
    gpus: tuple[int, ...] = (16, 32, 64, 128, 256, 512),
    crs: tuple[int, ...] = (1, 2, 4),
    num_sparse: int = Workload.num_sparse,
    embedding_dim: int = Workload.embedding_dim,
    pooling: float = Workload.pooling,
    batch_size: int = Workload.batch_per_gpu,
    alpha_cross_us: float | None = None,
    alpha_intra_us: float | None = None,
    calibrate: list[str] | None = None,
) -> dict[str, Any]:
    """``dmtrec simulate``: ``run_simulate`` with the workload's main sizes as options."""
    if not crs or min(crs) < 1:
        raise ConfigError(f"--crs must be integers >= 1, got {list(crs)}")
    return run_simulate(
        out,
        hardware=list(hardware),
        gpus=list(gpus),
        crs=list(crs),
        workload=Workload(
            num_sparse=num_sparse,
            embedding_dim=embedding_dim,
            pooling=pooling,
            batch_per_gpu=batch_size,
        ),
        calibration=calibrate,
        alpha_cross_us=alpha_cross_us,
        alpha_intra_us=alpha_intra_us,
    )
