"""``dmtrec bench dmt``: DMT vs TorchRec hybrid parallelism, same model/data/batch, one run.

Runs the baseline (TorchRec DMP, table-wise and row-wise) and DMT (SPTT; identity TMs at CR=1,
DLRM TMs at CR 2/4/8) on H emulated hosts x L ranks, each for warm-up then timed steps, on an
emulated 2-tier network: ``--link netns`` (namespaces + tbf-shaped links, see
``emulate/netns.py``; per-message latency ``--cross-latency-ms``/``--intra-latency-ms``
slept before each collective, see ``emulate/delay.py``, as this kernel has no netem),
``--link delay`` (the fallback without root: bandwidth, and latency if set, slept on loopback)
or plain loopback (``--link none``). Step times are wall-clock per
step on rank 0 between barriers (so the slowest rank sets them); comparisons are within this
one invocation. Writes ``OUT/bench.json``, prints a table and saves ``OUT/bench.png``.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dmtrec.data import DataConfig, load_data
from dmtrec.emulate.delay import LinkDelay, inject_delay
from dmtrec.emulate.netns import LinkSpec
from dmtrec.errors import ConfigError
from dmtrec.models import ModelConfig
from dmtrec.observe.comm import CommCounter
from dmtrec.parallel.build import build
from dmtrec.parallel.launch import rank_device, synchronize
from dmtrec.parallel.sharding import COMM_PRECISIONS
from dmtrec.parallel.topology import Topology, make_process_groups
from dmtrec.train.step import PIPELINES, Stepper
from dmtrec.train.trainer import TrainConfig, local_batches


def _measure_links(topo: Topology, nbytes: int = 1 << 22) -> dict[str, float]:
    """MB/s one rank achieves in an all-to-all inside its host and across hosts."""
    groups = make_process_groups(topo)
    device = rank_device()
    out: dict[str, float] = {}
    for name, group, n in (
        ("intra", groups.intra, topo.ranks_per_host),
        ("cross", groups.peer, topo.hosts),
    ):
        x = torch.zeros(nbytes // 4 * n, device=device)
        y = torch.empty_like(x)
        dist.all_to_all_single(y, x, group=group)  # warm the connections
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(3):
            dist.all_to_all_single(y, x, group=group)
        synchronize(device)
        dist.barrier()
        sent = 3 * nbytes * (n - 1)
        out[f"{name}_MBps"] = sent / (time.perf_counter() - t0) / 1e6
    return out


def host_cross_bytes(
    counter: CommCounter, topo: Topology, steps: int, device: torch.device
) -> list[float]:
    """Cross-host bytes each host sends per step: the sum of its ranks' counted sends (a
    collective: every rank calls it)."""
    mine = sum(b for (_, link), b in counter.bytes.items() if link == "cross") / max(steps, 1)
    sent = torch.zeros(topo.world_size, dtype=torch.float64, device=device)
    sent[dist.get_rank()] = mine
    dist.all_reduce(sent)
    return [float(sum(sent[r] for r in topo.host_ranks(h))) for h in range(topo.hosts)]


def host_link_Bps(
    link: str, measured: dict[str, float], spec: LinkSpec, ranks_per_host: int
) -> tuple[float, str]:
    """Bytes/s of one host's cross-host link and where the figure comes from: under ``netns``
    and ``none`` the probe's all-to-all rate (``_measure_links``: MB/s one rank reached while
    all L ranks of its host sent at once, so the host link carries L times that); under
    ``delay`` the rate the slept model charges a host (its L ranks get 1/L each)."""
    if link == "delay":
        return spec.cross_mbit * 1e6 / 8, "delay model (--cross-mbit)"
    return measured["cross_MBps"] * 1e6 * ranks_per_host, "measured (probe all-to-all x L ranks)"


def bench_worker(
    dcfg: DataConfig,
    mcfg: ModelConfig,
    tcfg: TrainConfig,
    warmup: int,
    steps: int,
    probe: bool,
    delay: LinkDelay | None = None,
) -> dict[str, Any]:
    """Warm-up + timed training steps of one configuration (run on every rank)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    topo = Topology(tcfg.hosts, tcfg.ranks_per_host)
    data = load_data(dcfg)
    batches = list(local_batches(data, "train", tcfg.batch_size * world, rank, world))
    links = _measure_links(topo) if probe else {}  # the TCP links as they are, no delays
    counter = CommCounter(topo, rank)
    times: list[float] = []
    with counter.install(), inject_delay(topo, rank, delay or LinkDelay()) as slept:
        built = build(data.spec, mcfg, tcfg, count_comm=True)
        batches = [b.to(built.device) for b in batches]
        stepper = Stepper(
            built.model, built.optimizer, built.device, tcfg.pipeline, observer=counter
        )
        # warm-up and timed steps are two runs of the stepper: the pipeline is drained in
        # between, so the counted bytes are exactly those of the timed batches
        for start, n in ((0, warmup), (warmup, steps)):
            run = stepper.steps(batches[i % len(batches)] for i in range(start, start + n))
            for _ in range(n):
                dist.barrier()
                t0 = time.perf_counter()
                next(run)
                synchronize(built.device)
                dist.barrier()
                if start == warmup:
                    times.append(time.perf_counter() - t0)
            run.close()
            if start == 0:
                counter.reset()
                slept.clear()
        stepper.detach()
        injected = torch.tensor([sum(slept) / max(steps, 1)], dtype=torch.float64)
    # outside the delays: these collectives are bookkeeping, not part of a step
    comm = counter.totals(steps)
    host_bytes = host_cross_bytes(counter, topo, steps, built.device)
    injected = injected.to(built.device)  # NCCL reduces only accelerator tensors
    # the barriers make the slowest rank set the step time, so report the most any rank slept
    dist.all_reduce(injected, op=dist.ReduceOp.MAX)
    out = {"step_s": times, "comm": comm, "links": links, "injected_s": float(injected.item())}
    out.update(host_cross_bytes=host_bytes, comm_precision_effective=built.comm_precision_effective)
    return out if rank == 0 else {}


def link_delay(
    link: str, spec: LinkSpec, ranks_per_host: int, cross_latency_ms: float, intra_latency_ms: float
) -> LinkDelay:
    """What ``inject_delay`` sleeps under ``--link``: the latencies always; under ``delay`` the
    bandwidths too, each rank getting 1/L of its host's link, as in the namespaces where a
    host's L ranks share one veth (and one loopback)."""
    d = LinkDelay(alpha_intra_s=intra_latency_ms * 1e-3, alpha_cross_s=cross_latency_ms * 1e-3)
    if link != "delay":
        return d
    per_rank = 1e6 / 8 / ranks_per_host  # Mbit/s of the host link -> bytes/s of one rank
    return replace(d, intra_Bps=spec.intra_mbit * per_rank, cross_Bps=spec.cross_mbit * per_rank)


def configs(
    hosts: int,
    ranks_per_host: int,
    batch_size: int,
    towers: int,
    crs: list[int],
    pipeline: str = "sparse-dist",
    *,
    comm_precision: str = "fp32",
) -> list[tuple[str, ModelConfig, TrainConfig]]:
    """The runs of one benchmark: two baselines, then DMT at each CR (all on ``pipeline``)."""
    t = TrainConfig(
        batch_size=batch_size,
        hosts=hosts,
        ranks_per_host=ranks_per_host,
        progress=False,
        pipeline=pipeline,
    )
    t = replace(t, comm_precision=comm_precision)  # both sides, every run
    small = dict(embedding_dim=32, bottom=[32], top=[32])
    runs = [
        (
            "baseline_table_wise",
            ModelConfig(**small),
            replace(t, parallel="baseline", sharding="table_wise"),
        ),
        (
            "baseline_row_wise",
            ModelConfig(**small),
            replace(t, parallel="baseline", sharding="row_wise"),
        ),
    ]
    for cr in crs:
        tm = "identity" if cr == 1 else "dlrm"
        m = ModelConfig(**small, num_towers=towers, partition="planted", tm=tm, cr=cr)
        runs.append((f"dmt_cr{cr}", m, replace(t, parallel="dmt")))
    return runs


def bench_dmt(
    out: str,
    *,
    hosts: int = 2,
    ranks_per_host: int = 2,
    link: str = "netns",
    cross_mbit: float = 100.0,
    ratio: float = 48.0,
    queue_ms: float = 100.0,
    cross_latency_ms: float = 0.0,
    intra_latency_ms: float = 0.0,
    batch_size: int = 256,
    num_sparse: int = 32,
    towers: int = 4,
    crs: tuple[int, ...] = (1, 2, 4, 8),
    warmup: int = 3,
    steps: int = 10,
    comm_precision: str = "fp32",
    pipeline: str = "sparse-dist",
) -> dict[str, Any]:
    """Run every configuration under one link set-up; write ``bench.json`` and ``bench.png``.

    ``pipeline`` (``none`` | ``sparse-dist``: TorchRec's ``TrainPipelineSparseDist``) is the
    train pipeline of every run, baseline and DMT alike."""
    from dmtrec.emulate.launch import spawn_in_hosts
    from dmtrec.emulate.netns import EmulatedHosts
    from dmtrec.parallel.launch import spawn

    for name, value in (("--cross-mbit", cross_mbit), ("--ratio", ratio), ("--queue-ms", queue_ms)):
        if not value > 0:
            raise ConfigError(f"{name} must be > 0, got {value:g}")
    for name, value in (
        ("--cross-latency-ms", cross_latency_ms),
        ("--intra-latency-ms", intra_latency_ms),
    ):
        if not value >= 0:
            raise ConfigError(f"{name} must be >= 0, got {value:g}")
    if comm_precision not in COMM_PRECISIONS:
        raise ConfigError(
            f"--comm-precision must be one of {', '.join(COMM_PRECISIONS)}, got {comm_precision!r}"
        )
    if link not in ("netns", "delay", "none"):
        raise ConfigError(f"--link must be netns, delay or none, got {link!r}")
    if pipeline not in PIPELINES:
        raise ConfigError(f"--pipeline must be {' or '.join(PIPELINES)}, got {pipeline!r}")
    world = hosts * ranks_per_host
    dcfg = DataConfig(
        synthetic=dict(
            num_sparse=num_sparse,
            num_groups=towers,
            table_size=1000,
            num_valid=0,
            num_test=0,
            num_train=batch_size * world * max(1, min(warmup + steps, 8)),
        )
    )
    spec = LinkSpec(cross_mbit=cross_mbit, ratio=ratio, queue_ms=queue_ms)
    delay = link_delay(link, spec, ranks_per_host, cross_latency_ms, intra_latency_ms)
    results: list[dict[str, Any]] = []
    link_info: dict[str, Any] = {}

    def run_all(launch) -> None:
        for i, (name, mcfg, tcfg) in enumerate(
            configs(
                hosts,
                ranks_per_host,
                batch_size,
                towers,
                list(crs),
                pipeline,
                comm_precision=comm_precision,
            )
        ):
            print(f"[bench dmt] {name} ...", flush=True)
            r = launch(bench_worker, (dcfg, mcfg, tcfg, warmup, steps, i == 0, delay))
            if i == 0:
                link_info["measured"] = r["links"]
            st = r["step_s"]
            c = r["comm"]
            results.append(
                {
                    "name": name,
                    "comm_precision": tcfg.comm_precision,
                    "comm_precision_effective": r["comm_precision_effective"],
                    "busiest_host_cross_bytes_per_step": max(r["host_cross_bytes"]),
                    "pipeline": tcfg.pipeline,
                    "step_s_median": statistics.median(st),
                    "step_s_p90": sorted(st)[max(0, round(0.9 * len(st)) - 1)],
                    "examples_per_s": batch_size * world / statistics.median(st),
                    "cross_host_bytes_per_step": c["cross_host_bytes_per_step"],
                    "intra_host_bytes_per_step": c["intra_host_bytes_per_step"],
                    "cross_host_messages_per_step": c["cross_host_messages_per_step"],
                    "pooled_cross_host_bytes_per_step": c["pooled_cross_host_bytes_per_step"],
                    "injected_delay_s_per_step": r["injected_s"],
                    "step_s": st,
                }
            )

    if link == "netns":
        with EmulatedHosts(hosts, spec) as emu:
            run_all(lambda fn, args: spawn_in_hosts(fn, args, emu, ranks_per_host)[0])
        link_info.update(mode="netns", **spec.to_dict(), teardown_ok=not emu.exists())
        if delay.active:
            link_info.update(mode="netns + injected latency", injected=delay.to_dict())
    else:
        run_all(lambda fn, args: spawn(fn, args, world, ranks_per_host)[0])
        if link == "delay":
            links = {k: v for k, v in spec.to_dict().items() if k != "queue_ms"}
            link_info.update(mode="delay (alpha-beta injected on loopback)", **links)
            link_info.update(injected=delay.to_dict())
        elif delay.active:
            link_info.update(mode="none + injected latency", injected=delay.to_dict())
        else:
            link_info.update(mode="none (loopback, unshaped)")
    base = min(r["step_s_median"] for r in results if r["name"].startswith("baseline"))
    base_pooled = next(r for r in results if r["name"] == "baseline_table_wise")[
        "pooled_cross_host_bytes_per_step"
    ]
    link_Bps, link_source = host_link_Bps(link, link_info["measured"], spec, ranks_per_host)
    for r in results:
        r["speedup_vs_baseline"] = base / r["step_s_median"]
        # no step can be shorter than its busiest host link needs for its cross-host bytes
        r["link_floor_s"] = r["busiest_host_cross_bytes_per_step"] / link_Bps
        r["step_over_floor"] = (
            r["step_s_median"] / r["link_floor_s"] if r["link_floor_s"] > 0 else None
        )
        if r["name"].startswith("dmt_cr"):
            cr = int(r["name"][len("dmt_cr") :])
            r["pooled_bytes_ratio_vs_baseline"] = (
                r["pooled_cross_host_bytes_per_step"] / base_pooled
            )
            r["pooled_bytes_ratio_is_1_over_cr"] = (
                abs(r["pooled_bytes_ratio_vs_baseline"] - 1 / cr) < 1e-12
            )
    report = {
        "link_mode": link_info.pop("mode"),
        "link": link_info,
        "hosts": hosts,
        "ranks_per_host": ranks_per_host,
        "batch_size_per_rank": batch_size,
        "num_sparse": num_sparse,
        "towers": towers,
        "comm_precision": comm_precision,
        "host_link_Bps": link_Bps,
        "host_link_rate_source": link_source,
        "pipeline": pipeline,
        "warmup": warmup,
        "steps": steps,
        "runs": results,
    }
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "bench.json").write_text(json.dumps(report, indent=2))
    _print_table(report)
    _plot(report, Path(out) / "bench.png")
    return report


def _print_table(report: dict[str, Any]) -> None:
    print(f"link: {report['link_mode']} {report['link']}")
    print(
        f"{'run':<22}{'step ms':>9}{'p90 ms':>9}{'ex/s':>9}{'cross MB/step':>15}{'msgs':>7}{'speedup':>9}"
    )
    for r in report["runs"]:
        print(
            f"{r['name']:<22}{r['step_s_median'] * 1e3:>9.1f}{r['step_s_p90'] * 1e3:>9.1f}"
            f"{r['examples_per_s']:>9.0f}{r['cross_host_bytes_per_step'] / 1e6:>15.3f}"
            f"{r['cross_host_messages_per_step']:>7.0f}{r['speedup_vs_baseline']:>9.2f}"
        )


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in report["runs"]]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(
        names,
        [r["step_s_median"] * 1e3 for r in report["runs"]],
        color=["#888"] * 2 + ["#2a7"] * (len(names) - 2),
    )
    ax.set_ylabel("median step time (ms)")
    ax.set_title(
        f"{report['hosts']} hosts x {report['ranks_per_host']} ranks, link: {report['link_mode']}"
    )
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
