"""``dmtrec simulate``: project DMT vs hybrid-parallel step time from one box to 16-512 GPUs.

An alpha-beta model per link class. Every all-to-all is modelled as pairwise exchange
(Thakur, Rabenseifner & Gropp, "Optimization of Collective Communication Operations in MPICH",
IJHPCA 2005): a rank sends one message to each peer, each costing ``alpha + bytes / bandwidth``
of the link it crosses; peers inside the host (NVLink) and across hosts (NIC) are served
concurrently by different hardware, so the collective takes the slower of the two link classes:

    t_a2a = max( (L_peers) * alpha_intra + V_intra / BW_intra ,
                 (X_peers) * alpha_cross + V_cross / BW_cross )

Dense gradients are all-reduced hierarchically, as NCCL does on DGX-class hosts with one NIC
per GPU: reduce-scatter inside the host (NVLink), a ring all-reduce of the 1/L shard across
hosts over each GPU's own NIC, all-gather inside the host. Compute is roofline: dense matmul
FLOPs (forward, 2x for backward; counted as ``torch.utils.flop_counter`` counts them) at ``mfu``
of peak, embedding rows moved (lookup; gradient and row-wise Adagrad update) at
``lookup_efficiency`` of HBM bandwidth.

Workloads (``--workload``):

- ``mlperf-dlrmv2`` (default): the MLPerf Training DLRM-DCNv2 reference
  (mlcommons/training ``recommendation_v2/torchrec_dlrm``): 26 tables capped at 40M rows with
  the reference multi-hot sizes, dim 128, bottom 512-256-128, DCNv2 interaction (3 low-rank
  cross layers, rank 512), top 1024-1024-512-256-1, a fixed global batch of 65,536 (so the
  local batch shrinks as GPUs are added). DMT's towers use DCN tower modules.
- ``dlrm-256``: our earlier choice, a DLRM (dot interaction) with the hundreds of sparse
  features of production models (Neo/ZionEX, arXiv 2104.05158), pooling 10, a fixed local
  batch of 1024 (weak scaling), DLRM tower modules.

The run's settings are modelled as ``dmtrec train`` / ``bench dmt`` have them: ``--comm-precision``
sets the bytes of pooled embeddings, TM outputs and their gradients (fp32: 4; fp16/bf16: 2, as
TorchRec's qcomm codecs send them; ids stay int64, dense gradients fp32) on both sides;
``--pipeline`` the overlap:

- ``serial``: nothing overlaps (the sum of every term);
- ``none``: DDP overlaps the dense all-reduce with the dense backward (``max`` of the two);
- ``sparse-dist`` (TorchRec ``TrainPipelineSparseDist``): also the input distribution (ids
  AlltoAlls) of the next batch runs behind this batch's work, so the step is the larger of the
  remaining critical path and the time the network is busy (every AlltoAll and all-reduce).

Dataflow of one training step (N = H hosts x L GPUs, global batch G, local batch B = G/N, F
features with pooling P_f, dim D; see ``../shared/notes/dmt.md``):

- baseline (TorchRec hybrid parallel, sharding assumed perfectly balanced: its best case): ids
  AlltoAll over N; lookups of G * sum(P) / N rows per GPU; pooled AlltoAll over N, forward and
  backward; the dense model on F features for B samples; all-reduce of the dense parameters
  over N.
- DMT (SPTT + TM, K towers, K/H per host; features assigned to hosts greedily by pooling,
  largest first, at most ceil(F/H) per host, to balance lookups): ids peer AlltoAll over H
  (cross only); ids and pooled AlltoAll inside the host over L (NVLink); lookups of
  G * P_host / L rows per GPU; the host's TMs on its H*B samples; the TM outputs back to the
  samples' home ranks over the peer group (forward and backward); the head on the virtual
  features; all-reduce of the head over N and of the TMs over L. Every phase takes its slowest
  host (the collectives between phases synchronise them).

The cross-host pooled bytes per GPU are the same in both at CR=1 (with balanced towers); what
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
from dmtrec.models.tower_modules import output_width, virtual_features


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


# Published figures. NVLink per GPU is quoted bidirectional (links x 50 GB/s) and halved here
# to one direction; the NIC figure is the ConnectX bandwidth per GPU (Gb/s / 8). Peak is the
# dense (no sparsity) fp16/bf16 tensor-core figure of the SXM part. Latencies are our setting,
# of the order of NCCL's own tuning model (src/graph/tuning.cc: NVLink ring/Simple hwLat
# 3.4 us, base latency 8.4 us; the network adds ~5-10 us per hop). All of these are fields of
# ``Hardware`` (and ``--alpha-*-us`` options), not constants: Meta's ZionEX/Grand Teton hosts
# differ in NIC count, and the paper's exact topology is not public.
HARDWARE: dict[str, Hardware] = {
    "v100": Hardware(
        "v100",
        8,
        intra_GBps=150.0,  # NVLink 2: 6 links x 50 GB/s = 300 GB/s bidirectional
        cross_GBps=6.25,  # DGX-1: 4x EDR 100 Gb/s IB for 8 GPUs = 50 Gb/s per GPU
        peak_tflops=125.0,  # V100 SXM2 tensor core fp16
        hbm_GBps=900.0,
        source="NVIDIA DGX-1 datasheet / Tesla V100 datasheet: NVLink 2 300 GB/s bidir per GPU, "
        "4x EDR IB 100 Gb/s per 8 GPUs, 125 TFLOPS fp16 tensor, HBM2 900 GB/s",
    ),
    "a100": Hardware(
        "a100",
        8,
        intra_GBps=300.0,  # NVLink 3: 12 x 50 GB/s = 600 GB/s bidirectional
        cross_GBps=25.0,  # DGX A100: 8x ConnectX-6 HDR 200 Gb/s, one per GPU
        peak_tflops=312.0,  # A100 SXM bf16 dense
        hbm_GBps=2039.0,  # A100 80GB SXM
        source="NVIDIA DGX A100 datasheet / A100 datasheet: NVLink 3 600 GB/s bidir per GPU, "
        "8x ConnectX-6 HDR IB 200 Gb/s (1 per GPU), 312 TFLOPS bf16 dense, HBM2e 2039 GB/s",
    ),
    "h100": Hardware(
        "h100",
        8,
        intra_GBps=450.0,  # NVLink 4: 18 x 50 GB/s = 900 GB/s bidirectional
        cross_GBps=50.0,  # DGX H100: 8x ConnectX-7 NDR 400 Gb/s, one per GPU
        peak_tflops=989.0,  # H100 SXM bf16 dense
        hbm_GBps=3350.0,
        source="NVIDIA DGX H100 datasheet / H100 datasheet: NVLink 4 900 GB/s bidir per GPU, "
        "8x ConnectX-7 NDR IB 400 Gb/s (1 per GPU), 989 TFLOPS bf16 dense (SXM), HBM3 3.35 TB/s",
    ),
}

# MLPerf Training DLRM-DCNv2 (mlcommons/training recommendation_v2/torchrec_dlrm README:
# --num_embeddings_per_feature and --multi_hot_sizes of the benchmark's synthetic multi-hot
# Criteo 1TB): rows per table (capped at 40M) and ids per sample per table.
MLPERF_ROWS = (
    40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10,
    2209, 11938, 155, 4, 976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36,
)  # fmt: skip
MLPERF_MULTI_HOT = (
    3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1,
)  # fmt: skip

COMM_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
PIPELINES = ("serial", "none", "sparse-dist")


@dataclass(frozen=True)
class Workload:
    """The model and batch of the projection; defaults: MLPerf DLRM-DCNv2 (module docstring)."""

    name: str = "mlperf-dlrmv2"
    pooling: tuple[float, ...] = MLPERF_MULTI_HOT  # ids per sample, one entry per table
    rows: tuple[int, ...] | None = MLPERF_ROWS  # rows per table (memory only; None: unknown)
    embedding_dim: int = 128
    num_dense: int = 13
    bottom: tuple[int, ...] = (512, 256, 128)
    top: tuple[int, ...] = (1024, 1024, 512, 256, 1)
    interaction: str = "dcn"  # "dcn" (DLRM-DCNv2: low-rank cross net) | "dot" (DLRM)
    dcn_layers: int = 3
    dcn_rank: int = 512
    global_batch: int | None = 65536  # fixed global batch; None: fixed ``batch_per_gpu``
    batch_per_gpu: int = 1024
    tm: str = "dcn"  # DMT tower modules: "dcn" (CrossTM) | "dlrm" (DotTM), as dmtrec builds them
    id_bytes: int = 8  # int64 ids (+ int32 lengths)
    weight_bytes: int = 4  # fp32 tables
    grad_bytes: int = 4  # fp32 dense all-reduce
    mfu: float = 0.35  # fraction of peak the dense part reaches
    lookup_efficiency: float = 0.5  # fraction of HBM bandwidth the embedding kernels reach
    max_tower: int = 16  # most features in one tower (sets K, see ``num_towers``)

    @property
    def num_sparse(self) -> int:
        return len(self.pooling)

    def local_batch(self, gpus: int) -> int:
        """B: examples per GPU per step."""
        if self.global_batch is None:
            return self.batch_per_gpu
        if self.global_batch % gpus:
            raise ConfigError(f"--gpus {gpus} does not divide the global batch {self.global_batch}")
        return self.global_batch // gpus


def dlrm_256(
    num_sparse: int = 256,
    pooling: float = 10.0,
    embedding_dim: int = 128,
    batch_per_gpu: int = 1024,
) -> Workload:
    """Our earlier workload (``--workload dlrm-256``): see the module docstring."""
    return Workload(
        name="dlrm-256",
        pooling=(float(pooling),) * num_sparse,
        rows=None,
        embedding_dim=embedding_dim,
        interaction="dot",
        global_batch=None,
        batch_per_gpu=batch_per_gpu,
        tm="dlrm",
    )


WORKLOADS = ("mlperf-dlrmv2", "dlrm-256")


@dataclass(frozen=True)
class RunSettings:
    """What the modelled run does: its embedding-communication precision and pipeline."""

    comm_precision: str = "fp16"
    pipeline: str = "sparse-dist"

    def __post_init__(self) -> None:
        if self.comm_precision not in COMM_BYTES:
            raise ConfigError(
                f"--comm-precision {self.comm_precision}: expected one of {', '.join(COMM_BYTES)}"
            )
        if self.pipeline not in PIPELINES:
            raise ConfigError(f"--pipeline {self.pipeline}: expected one of {', '.join(PIPELINES)}")

    @property
    def comm_bytes(self) -> int:
        return COMM_BYTES[self.comm_precision]


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
    "intra and cross concurrent), hierarchical all-reduce, roofline compute, overlap per "
    "--pipeline (serial | none: DDP all-reduce behind backward | sparse-dist: also the input "
    "distribution behind the step)"
)


# -- closed forms ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Comm:
    """Communication time: ``seconds`` on the critical path, and how long it keeps each link
    class busy (``intra``: NVLink, ``cross``: the NIC). ``a + b`` is ``a`` then ``b``."""

    intra: float = 0.0
    cross: float = 0.0
    seconds: float = 0.0

    @classmethod
    def concurrent(cls, intra: float, cross: float) -> Comm:
        """Both link classes at once (an all-to-all): the slower one sets the time."""
        return cls(intra, cross, max(intra, cross))

    @property
    def time(self) -> float:
        return self.seconds

    def __add__(self, other: Comm) -> Comm:
        return Comm(
            self.intra + other.intra, self.cross + other.cross, self.seconds + other.seconds
        )

    def __rmul__(self, k: float) -> Comm:
        return Comm(k * self.intra, k * self.cross, k * self.seconds)


def a2a(bytes_per_peer: float, intra_peers: int, cross_peers: int, links: Links) -> Comm:
    """Pairwise-exchange all-to-all: one message per peer, per link class."""
    return Comm.concurrent(
        intra_peers * (links.alpha_intra_s + bytes_per_peer / links.intra_Bps),
        cross_peers * (links.alpha_cross_s + bytes_per_peer / links.cross_Bps),
    )


def a2a_time(bytes_per_peer: float, intra_peers: int, cross_peers: int, links: Links) -> float:
    """Pairwise-exchange all-to-all: link classes run concurrently."""
    return a2a(bytes_per_peer, intra_peers, cross_peers, links).time


def allreduce_time(nbytes: float, ranks: int, bw_Bps: float, alpha_s: float) -> float:
    """Ring all-reduce of ``nbytes``: 2(p-1) steps of nbytes/p each."""
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) * (alpha_s + nbytes / ranks / bw_Bps)


def hier_allreduce(nbytes: float, hosts: int, local: int, links: Links) -> Comm:
    """All-reduce over hosts x local GPUs: reduce-scatter + all-gather inside the host (each
    half a ring, (L-1) steps of nbytes/L), a ring all-reduce of the nbytes/L shard across hosts
    over each GPU's own NIC. The phases are sequential. Nothing to reduce costs nothing."""
    if nbytes <= 0:
        return Comm()
    intra = 2 * (local - 1) * (links.alpha_intra_s + nbytes / local / links.intra_Bps)
    cross = allreduce_time(nbytes / local, hosts, links.cross_Bps, links.alpha_cross_s)
    return Comm(intra, cross, intra + cross)


def mlp_flops(sizes: list[int]) -> float:
    """Forward FLOPs of a chain of Linear layers ``sizes[0] -> sizes[1] -> ...`` per example."""
    return float(sum(2 * a * b for a, b in zip(sizes, sizes[1:], strict=False)))


def mlp_params(sizes: list[int]) -> float:
    return float(sum(a * b + b for a, b in zip(sizes, sizes[1:], strict=False)))


def crossnet(inputs: int, layers: int, rank: int) -> tuple[float, float]:
    """(forward matmul FLOPs per example, parameters) of TorchRec's ``LowRankCrossNet``:
    per layer x_{l+1} = x_0 * (W (V x_l) + b) + x_l, V: rank x in, W: in x rank."""
    return float(layers * 4 * inputs * rank), float(layers * (2 * inputs * rank + inputs))


def dense_head(w: Workload, num_features: int) -> tuple[float, float]:
    """(forward matmul FLOPs per example, parameters) of the dense part over ``num_features``
    embedding vectors, as TorchRec's ``DLRM`` / ``DLRM_DCN`` build it: bottom MLP; the dot
    interaction (bmm of the F+1 vectors, the upper triangle and the dense vector to the top)
    or the DCN interaction (low-rank cross net over the (F+1)*D concatenation); top MLP."""
    d = w.embedding_dim
    bottom = [w.num_dense, *w.bottom]
    n = num_features + 1
    if w.interaction == "dot":
        flops, params = 2.0 * n * n * d, 0.0
        top_in = w.bottom[-1] + n * (n - 1) // 2
    elif w.interaction == "dcn":
        flops, params = crossnet(n * d, w.dcn_layers, w.dcn_rank)
        top_in = n * d
    else:
        raise ConfigError(f"interaction {w.interaction!r}: expected dot or dcn")
    top = [top_in, *w.top]
    return (
        mlp_flops(bottom) + flops + mlp_flops(top),
        mlp_params(bottom) + params + mlp_params(top),
    )


def tm_cost(w: Workload, m: int, cr: int) -> tuple[float, float]:
    """(forward matmul FLOPs per example, parameters) of one tower module over m features at
    ``cr``, as ``models/tower_modules.py`` builds it (identity at CR=1)."""
    if cr == 1:
        return 0.0, 0.0
    d = w.embedding_dim
    width = output_width(m, d, cr)
    if w.tm == "dlrm":  # DotTM: bmm of the m vectors, then Linear(m*d + pairs -> width)
        sizes = [m * d + m * (m - 1) // 2, width]
        return 2.0 * m * m * d + mlp_flops(sizes), mlp_params(sizes)
    if w.tm == "dcn":  # CrossTM: 1 low-rank cross layer, then Linear down (no bias) and up
        inputs = m * d
        rank = max(1, min(inputs, width) // 2)
        f, p = crossnet(inputs, 1, rank)
        return (
            f + 2.0 * inputs * rank + 2.0 * rank * width,
            p + inputs * rank + rank * width + width,
        )
    raise ConfigError(f"tm {w.tm!r}: expected dlrm or dcn")


def _compute(w: Workload, hw: Hardware, flops_per_example: float, samples: float) -> float:
    """Forward seconds (backward: twice this)."""
    return flops_per_example * samples / (hw.peak_tflops * 1e12 * w.mfu)


def _rows_time(w: Workload, hw: Hardware, rows: float) -> float:
    """Seconds to read ``rows`` embedding rows (one pass over them)."""
    return rows * w.embedding_dim * w.weight_bytes / (hw.hbm_GBps * 1e9 * w.lookup_efficiency)


def _ids_bytes(w: Workload, pooling: float, features: int) -> float:
    """Bytes of one sample's ids (and lengths) for features of total pooling ``pooling``."""
    return pooling * w.id_bytes + features * 4


def _step(
    parts: dict[str, Any], run: RunSettings, input_dist: list[str], comms: list[str]
) -> dict[str, Any]:
    """Total step time from the terms under ``run.pipeline``; ``parts`` holds each term's
    seconds (comm terms as ``Comm``). Adds ``total``, ``hidden_by_overlap`` and the
    compute / intra-host / cross-host sums."""
    t = {k: (v.time if isinstance(v, Comm) else v) for k, v in parts.items()}
    serial = sum(t.values())
    backward = t["dense_bwd"] + t["lookup_bwd"]
    if run.pipeline == "serial":
        total = serial
    else:
        critical = serial - t["allreduce"] - backward + max(backward, t["allreduce"])
        total = critical
        if run.pipeline == "sparse-dist":
            # the input distribution leaves the critical path but not the links: the step is
            # at least as long as the busier link class is busy
            hidden = sum(t[k] for k in input_dist)
            network = max(sum(parts[k].intra for k in comms), sum(parts[k].cross for k in comms))
            total = max(critical - hidden, network)
    out: dict[str, Any] = dict(t)
    out["compute"] = sum(t[k] for k in ("lookup_fwd", "lookup_bwd", "dense_fwd", "dense_bwd"))
    out["intra_comm"] = sum(parts[k].intra for k in comms)
    out["cross_comm"] = sum(parts[k].cross for k in comms)
    out["serial"] = serial
    out["hidden_by_overlap"] = serial - total
    out["total"] = total
    return out


def baseline_step(
    w: Workload,
    hw: Hardware,
    gpus: int,
    links: Links | None = None,
    run: RunSettings | None = None,
) -> dict[str, Any]:
    """Seconds per step of TorchRec hybrid parallelism on ``gpus`` GPUs (balanced sharding)."""
    lk, run = links or Links.of(hw), run or RunSettings()
    n, loc = gpus, min(hw.gpus_per_host, gpus)
    hosts = n // loc
    b, f, d = w.local_batch(gpus), w.num_sparse, w.embedding_dim
    pool = float(sum(w.pooling))
    flops, params = dense_head(w, f)
    rows = b * pool  # G * sum(P) / N rows per GPU
    parts: dict[str, Any] = {
        "ids_a2a": a2a(b * _ids_bytes(w, pool, f) / n, loc - 1, n - loc, lk),
        "lookup_fwd": _rows_time(w, hw, rows),
        "pooled_fwd": a2a(b * f * d * run.comm_bytes / n, loc - 1, n - loc, lk),
        "dense_fwd": _compute(w, hw, flops, b),
        "dense_bwd": 2 * _compute(w, hw, flops, b),
        "allreduce": hier_allreduce(params * w.grad_bytes, hosts, loc, lk),
        "pooled_bwd": a2a(b * f * d * run.comm_bytes / n, loc - 1, n - loc, lk),
        "lookup_bwd": 3 * _rows_time(w, hw, rows),  # gradient rows + Adagrad read-modify-write
    }
    return _step(parts, run, ["ids_a2a"], ["ids_a2a", "pooled_fwd", "allreduce", "pooled_bwd"])


def num_towers(w: Workload, hosts: int) -> int:
    """K: one tower per host, more when a host's share of features exceeds ``max_tower``
    (a TM's projection grows with the square of its width); a multiple of H."""
    if hosts > w.num_sparse:
        raise ConfigError(
            f"{hosts} hosts but {w.num_sparse} features: SPTT needs a tower on every host"
        )
    per_host = math.ceil(w.num_sparse / hosts)
    return hosts * max(1, math.ceil(per_host / w.max_tower))


def host_features(w: Workload, hosts: int) -> list[list[int]]:
    """Features (table indices) of each host: largest pooling first, each to the host with
    the least pooling so far among those with fewer than ceil(F/H) features (balances
    lookups and ids; ties by index, deterministic)."""
    cap = math.ceil(w.num_sparse / hosts)
    out: list[list[int]] = [[] for _ in range(hosts)]
    load = [0.0] * hosts
    for i in sorted(range(w.num_sparse), key=lambda i: (-w.pooling[i], i)):
        h = min((h for h in range(hosts) if len(out[h]) < cap), key=lambda h: (load[h], h))
        out[h].append(i)
        load[h] += w.pooling[i]
    return [sorted(fs) for fs in out]


def towers(w: Workload, hosts: int) -> list[list[list[int]]]:
    """Per host, its K/H towers: the host's features split into K/H near-equal runs."""
    per = num_towers(w, hosts) // hosts
    out = []
    for fs in host_features(w, hosts):
        k = min(per, len(fs))
        out.append([fs[j * len(fs) // k : (j + 1) * len(fs) // k] for j in range(k)])
    return out


def dmt_step(
    w: Workload,
    hw: Hardware,
    gpus: int,
    cr: int,
    links: Links | None = None,
    run: RunSettings | None = None,
) -> dict[str, Any]:
    """Seconds per step of DMT (SPTT, K towers spread over the hosts, tower modules at
    ``cr``); every phase takes its slowest host."""
    lk, run = links or Links.of(hw), run or RunSettings()
    loc = min(hw.gpus_per_host, gpus)
    hosts = gpus // loc
    b, d, cb = w.local_batch(gpus), w.embedding_dim, run.comm_bytes
    host_towers = towers(w, hosts)
    for ts in host_towers:
        for t in ts:
            if cr > len(t) * d:
                raise ConfigError(
                    f"--crs {cr} is larger than a tower of {len(t)} features x {d} dims: CR <= m * D"
                )
    pool = [sum(w.pooling[i] for t in ts for i in t) for ts in host_towers]
    feats = [sum(len(t) for t in ts) for ts in host_towers]
    ids = [_ids_bytes(w, p, m) for p, m in zip(pool, feats, strict=True)]  # per sample
    # numbers per sample each host's TMs ship back, and virtual features the head sees
    width = [sum(output_width(len(t), d, cr) for t in ts) for ts in host_towers]
    num_virtual = sum(virtual_features(len(t), cr) for ts in host_towers for t in ts)
    tm = [[tm_cost(w, len(t), cr) for t in ts] for ts in host_towers]
    tm_flops = [sum(f for f, _ in c) for c in tm]
    tm_params = [sum(p for _, p in c) for c in tm]
    head_flops, head_params = dense_head(w, num_virtual)

    def peer_a2a(send: list[float], recv: list[float]) -> Comm:
        # pairwise exchange over the H peers: the busiest rank's larger direction
        per_peer = max(max(send), max(recv)) / max(1, hosts - 1)
        return a2a(per_peer, 0, hosts - 1, lk)

    # (1) my B samples' ids of host h's features go to host h (send: all other hosts' share)
    ids_send = [b * (sum(ids) - ids[h]) for h in range(hosts)]
    ids_recv = [(hosts - 1) * b * ids[h] for h in range(hosts)]
    # (2) inside the host: H*B samples' ids and pooled embeddings, 1/L to each local peer
    intra_ids = max(hosts * b * x / loc for x in ids)
    intra_pooled = max(hosts * b * m * d * cb / loc for m in feats)
    # (4) TM outputs back to the samples' home ranks (forward; the backward mirrors it)
    ret_send = [(hosts - 1) * b * x * cb for x in width]
    ret_recv = [b * (sum(width) - width[h]) * cb for h in range(hosts)]
    rows = max(hosts * b * p for p in pool)  # G * P_host / L rows per GPU
    tm_fwd = max(_compute(w, hw, f, hosts * b) for f in tm_flops)
    parts: dict[str, Any] = {
        "ids_a2a": peer_a2a(ids_send, ids_recv) + a2a(intra_ids, loc - 1, 0, lk),
        "lookup_fwd": _rows_time(w, hw, rows),
        "pooled_fwd": a2a(intra_pooled, loc - 1, 0, lk) + peer_a2a(ret_send, ret_recv),
        "dense_fwd": _compute(w, hw, head_flops, b) + tm_fwd,
        "dense_bwd": 2 * (_compute(w, hw, head_flops, b) + tm_fwd),
        "allreduce": hier_allreduce(head_params * w.grad_bytes, hosts, loc, lk)
        + hier_allreduce(max(tm_params) * w.grad_bytes, 1, loc, lk),
        "pooled_bwd": a2a(intra_pooled, loc - 1, 0, lk) + peer_a2a(ret_send, ret_recv),
        "lookup_bwd": 3 * _rows_time(w, hw, rows),
    }
    out = _step(parts, run, ["ids_a2a"], ["ids_a2a", "pooled_fwd", "allreduce", "pooled_bwd"])
    out["towers"] = [[len(t) for t in ts] for ts in host_towers]
    out["virtual_features"] = num_virtual
    return out


def cross_pooled_bytes(
    w: Workload, gpus: int, gpus_per_host: int, cr: int | None, run: RunSettings | None = None
) -> float:
    """Pooled-embedding bytes one GPU sends across hosts per forward (``cr=None``: baseline;
    DMT: the busiest host's)."""
    run = run or RunSettings()
    hosts = gpus // gpus_per_host
    b, f, d = w.local_batch(gpus), w.num_sparse, w.embedding_dim
    if cr is None:
        return (gpus - gpus_per_host) * b * f * d * run.comm_bytes / gpus
    width = max(sum(output_width(len(t), d, cr) for t in ts) for ts in towers(w, hosts))
    return (hosts - 1) * b * width * run.comm_bytes


def table_gb_per_gpu(w: Workload, gpus: int, gpus_per_host: int) -> dict[str, float] | None:
    """fp32 table memory per GPU (GB): baseline (balanced over N), DMT (busiest host / L)."""
    if w.rows is None:
        return None
    hosts = gpus // gpus_per_host
    row_bytes = w.embedding_dim * w.weight_bytes
    per_host = [sum(w.rows[i] for i in fs) * row_bytes for fs in host_features(w, hosts)]
    return {
        "baseline": sum(w.rows) * row_bytes / gpus / 1e9,
        "dmt": max(per_host) / gpus_per_host / 1e9,
    }


def simulate(
    hw: Hardware,
    gpus: list[int],
    crs: list[int],
    w: Workload | None = None,
    run: RunSettings | None = None,
) -> list[dict[str, Any]]:
    """Rows of (gpus, cr): baseline and DMT step time, their breakdowns and the speedup. A
    cluster DMT cannot use (more hosts than features) gets rows with ``speedup`` None and the
    reason in ``dmt_error``."""
    w, run = w or Workload(), run or RunSettings()
    rows = []
    for n in gpus:
        if n % hw.gpus_per_host or n < 2 * hw.gpus_per_host:
            raise ConfigError(
                f"--gpus {n}: need a multiple of {hw.gpus_per_host} GPUs per host and >= 2 hosts"
            )
        base = baseline_step(w, hw, n, run=run)
        for cr in crs:
            row: dict[str, Any] = {
                "gpus": n,
                "hosts": n // hw.gpus_per_host,
                "local_batch": w.local_batch(n),
                "cr": cr,
                "baseline_step_s": base["total"],
                "baseline_breakdown_s": base,
            }
            try:
                dmt = dmt_step(w, hw, n, cr, run=run)
            except ConfigError as e:
                if n // hw.gpus_per_host <= w.num_sparse:
                    raise
                row.update(dmt_step_s=None, speedup=None, dmt_error=str(e))
            else:
                row.update(
                    dmt_step_s=dmt["total"],
                    speedup=base["total"] / dmt["total"],
                    dmt_breakdown_s=dmt,
                    cross_pooled_bytes={
                        "baseline": cross_pooled_bytes(w, n, hw.gpus_per_host, None, run),
                        "dmt": cross_pooled_bytes(w, n, hw.gpus_per_host, cr, run),
                    },
                    table_gb_per_gpu=table_gb_per_gpu(w, n, hw.gpus_per_host),
                )
            rows.append(row)
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
    run: RunSettings | None = None,
    calibration: list[str] | None = None,
    alpha_cross_us: float | None = None,
    alpha_intra_us: float | None = None,
) -> dict[str, Any]:
    """Simulate each hardware generation; optionally calibrate on bench.json files
    (``[unshaped, fit, held_out...]``). Writes ``OUT/simulate.json`` and ``OUT/simulate.png``."""
    w, run = workload or Workload(), run or RunSettings()
    report: dict[str, Any] = {
        "workload": asdict(w),
        "run": asdict(run),
        "model": MODEL,
        "paper": {"speedup": 1.9, "gpus": 64, "hardware": "h100", "source": "Luo et al. 2024"},
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
        report["hardware"][name] = {
            "settings": asdict(hw),
            "rows": simulate(hw, gpus, crs, w, run),
        }
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


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 1e3:.2f}"


def _print(report: dict[str, Any]) -> None:
    r = report["run"]
    print(
        f"workload {report['workload']['name']}, comm {r['comm_precision']}, "
        f"pipeline {r['pipeline']}"
    )
    for name, h in report["hardware"].items():
        print(f"{name}: {h['settings']['source']}")
        print(f"{'GPUs':>6}{'CR':>4}{'baseline ms':>13}{'DMT ms':>9}{'speedup':>9}")
        for row in h["rows"]:
            speedup = "n/a" if row["speedup"] is None else f"{row['speedup']:.2f}"
            print(
                f"{row['gpus']:>6}{row['cr']:>4}{_ms(row['baseline_step_s']):>13}"
                f"{_ms(row['dmt_step_s']):>9}{speedup:>9}"
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
            rs = [r for r in h["rows"] if r["cr"] == cr and r["speedup"] is not None]
            ax.plot(
                [r["gpus"] for r in rs],
                [r["speedup"] for r in rs],
                style,
                marker="o",
                label=f"{name} CR={cr}",
            )
    paper = report["paper"]
    ax.plot([paper["gpus"]], [paper["speedup"]], "k*", ms=10, label="paper (64 H100)")
    ax.axhline(1.0, color="#999", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("GPUs")
    ax.set_ylabel("DMT speedup over hybrid parallel")
    run = report["run"]
    ax.set_title(
        f"{report['workload']['name']}, {run['comm_precision']} comms, "
        f"pipeline {run['pipeline']} (dmtrec simulate)",
        fontsize=9,
    )
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
    workload: str = "mlperf-dlrmv2",
    comm_precision: str = RunSettings.comm_precision,
    pipeline: str = RunSettings.pipeline,
    num_sparse: int | None = None,
    embedding_dim: int | None = None,
    pooling: float | None = None,
    batch_size: int | None = None,
    global_batch: int | None = None,
    alpha_cross_us: float | None = None,
    alpha_intra_us: float | None = None,
    calibrate: list[str] | None = None,
) -> dict[str, Any]:
    """``dmtrec simulate``: ``run_simulate`` with the workload, its main sizes and the run's
    precision and pipeline as options."""
    if not crs or min(crs) < 1:
        raise ConfigError(f"--crs must be integers >= 1, got {list(crs)}")
    if workload == "mlperf-dlrmv2":
        for flag, value in (("--num-sparse", num_sparse), ("--pooling", pooling)):
            if value is not None:
                raise ConfigError(
                    f"{flag}: the MLPerf workload has its 26 tables and multi-hot sizes "
                    "(use --workload dlrm-256 for a custom feature count)"
                )
        w = Workload()
        if global_batch is not None:
            w = replace(w, global_batch=global_batch)
        if batch_size is not None:  # a fixed local batch instead of the global one
            w = replace(w, global_batch=None, batch_per_gpu=batch_size)
    elif workload == "dlrm-256":
        kw = {
            k: v
            for k, v in dict(
                num_sparse=num_sparse, pooling=pooling, batch_per_gpu=batch_size
            ).items()
            if v is not None
        }
        w = dlrm_256(**kw)
        if global_batch is not None:
            w = replace(w, global_batch=global_batch)
    else:
        raise ConfigError(f"--workload {workload}: expected one of {', '.join(WORKLOADS)}")
    if embedding_dim is not None:
        w = replace(w, embedding_dim=embedding_dim)
    return run_simulate(
        out,
        hardware=list(hardware),
        gpus=list(gpus),
        crs=list(crs),
        workload=w,
        run=RunSettings(comm_precision, pipeline),
        calibration=calibrate,
        alpha_cross_us=alpha_cross_us,
        alpha_intra_us=alpha_intra_us,
    )
