"""Flat-kernel throughput: dmtrec's flat DLRM vs TorchRec's DLRM, same run.

    .venv/bin/python benchmarks/bench_flat.py --out runs/bench_flat

Runs ``dmtrec.bench.flat.bench_flat`` in this process inside a one-rank gloo group
(``run_single``), writes ``<out>/bench_flat.json`` and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import logging
import warnings

import torch

from dmtrec.bench.flat import bench_flat
from dmtrec.parallel.launch import run_single


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench_flat", help="output folder for bench_flat.json")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20, help="timed steps per model")
    p.add_argument("--table-size", type=int, default=100_000, help="rows per table")
    p.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)"
    )
    args = p.parse_args(argv)
    if args.threads > 0:
        # On a shared 2-core box, 2 OpenMP threads next to another busy process can run far
        # slower than 1 (a starved thread stalls every parallel region): pin it to compare.
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # fbgemm/planner/torch deprecation noise
    for name in ("torchrec", "torch", "fbgemm_gpu"):
        logging.getLogger(name).setLevel(logging.ERROR)
    r = run_single(
        lambda: bench_flat(
            args.out, batch_size=args.batch_size, steps=args.steps, table_size=args.table_size
        ),
        (),
    )
    print(
        f"bench_flat: dmtrec {r['dmtrec']['examples_per_s']:.0f} ex/s, "
        f"torchrec {r['torchrec']['examples_per_s']:.0f} ex/s, "
        f"ratio {r['ratio_dmtrec_over_torchrec']:.3f} (goal >= {r['goal_ratio']}), "
        f"threads {r['torch_threads']} -> {args.out}/bench_flat.json"
    )
    return r


if __name__ == "__main__":
    main()
