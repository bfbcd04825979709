"""Does the emulated network charge the same cross-host bytes the same time, whatever the
number of peers? A bandwidth-only emulation should; SPTT at CR=1 depends on it.

On 2 emulated hosts x 2 ranks, each rank sends V bytes across hosts per all-to-all, either as
the baseline does (world all-to-all: V/2 to each of its 2 cross-host ranks, plus V/2 to its
host-mate) or as SPTT does (peer all-to-all: V to its one cross-host peer). Both put 2V on
each host link per direction, so at line rate both take 2V / (cross Mbit/s). Each trial is a
fresh set of 4 processes timing 6 repeats (after 2 warm-ups) between barriers; per trial the
medians, over trials the median and range of peer/world.

Run (root): ``python benchmarks/a2a_flows.py --trials 6 --out runs/a2a_flows`` (writes
``a2a_flows.json`` there; ``benchmarks/results/a2a_flows_100mbit.json`` is one such file).
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def measure(per_peer_kib: list[int], repeats: int = 8) -> dict:
    from dmtrec.parallel.topology import Topology, make_process_groups

    topo = Topology(2, 2)
    groups = make_process_groups(topo)
    out = {}
    for kib in per_peer_kib:
        floats = kib * 1024 // 4
        row = {}
        # world: kib to each of 3 other ranks (2 across); peer: 2 * kib to the 1 peer across
        for name, group, size, per in (
            ("world", None, 4, floats),
            ("peer", groups.peer, 2, 2 * floats),
        ):
            x = torch.ones(size * per)
            y = torch.empty_like(x)
            times = []
            for i in range(repeats):
                dist.barrier()
                t0 = time.perf_counter()
                dist.all_to_all_single(y, x, group=group)
                dist.barrier()
                if i >= 2:
                    times.append(time.perf_counter() - t0)
            row[f"{name}_ms"] = statistics.median(times) * 1e3
        out[kib] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/a2a_flows")
    ap.add_argument("--cross-mbit", type=float, default=100.0)
    ap.add_argument("--queue-ms", type=float, default=100.0)
    ap.add_argument("--kib", default="64,256,1024", help="KiB per cross-host peer (world)")
    ap.add_argument("--trials", type=int, default=4)
    args = ap.parse_args()

    from dmtrec.emulate.launch import spawn_in_hosts
    from dmtrec.emulate.netns import EmulatedHosts, LinkSpec
    from dmtrec.parallel.launch import quiet_libraries

    quiet_libraries()
    here = os.path.dirname(os.path.abspath(__file__))  # ranks import this file by name
    os.environ["PYTHONPATH"] = os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])
    sys.path.insert(0, here)
    from a2a_flows import measure as measure_by_name

    kib = [int(k) for k in args.kib.split(",")]
    spec = LinkSpec(cross_mbit=args.cross_mbit, queue_ms=args.queue_ms)
    with EmulatedHosts(2, spec) as emu:
        trials = [spawn_in_hosts(measure_by_name, (kib,), emu, 2)[0] for _ in range(args.trials)]
    report = {
        "link": spec.to_dict(),
        "hosts": 2,
        "ranks_per_host": 2,
        "trials": args.trials,
        "timed_repeats_per_trial": 6,
        "rows": [],
    }
    print(f"{'KiB/peer':>9}{'line-rate ms':>14}{'world ms':>10}{'peer ms':>9}  peer/world")
    for k in kib:
        line = 2 * 2 * k * 1024 / (args.cross_mbit * 1e6 / 8) * 1e3  # 2 ranks x 2V per link
        world = [t[k]["world_ms"] for t in trials]
        peer = [t[k]["peer_ms"] for t in trials]
        ratio = [p / w for p, w in zip(peer, world)]
        report["rows"].append(
            {
                "kib_per_cross_peer": k,
                "line_rate_ms": line,
                "world_ms": world,
                "peer_ms": peer,
                "peer_over_world": ratio,
                "peer_over_world_median": statistics.median(ratio),
            }
        )
        print(
            f"{k:>9}{line:>14.1f}{statistics.median(world):>10.1f}{statistics.median(peer):>9.1f}"
            f"  {statistics.median(ratio):.2f} ({min(ratio):.2f}-{max(ratio):.2f})"
        )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "a2a_flows.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
