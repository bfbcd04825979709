"""Where a step's time goes: baseline vs SPTT at CR=1 (identity TMs), 2 x 2 gloo ranks.

Median forward/backward ms per rank, and SPTT's forward stages: ids over the peer group
(``ids``), the host's TorchRec DMP lookup incl. its intra-host input/output distribution
(``lookup``), the tower modules (``towers``), the return all-to-all over the peer group
with the reorder into tower order (``peer_a2a``), and the head (with and without its DDP
wrapper).
Run: ``python benchmarks/sptt_stages.py`` (loopback) or, as root,
``python benchmarks/sptt_stages.py --cross-mbit 100`` (emulated hosts, 48:1 links).
"""

import statistics
import time

import torch.distributed as dist

from dmtrec.data import DataConfig, load_data
from dmtrec.models import ModelConfig
from dmtrec.parallel.build import build
from dmtrec.train.step import train_step
from dmtrec.train.trainer import TrainConfig, local_batches


class PhaseClock:
    """A ``train_step`` observer that timestamps the step's phases (forward, backward)."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float]] = []

    @property
    def phase(self) -> str:
        return self.marks[-1][0] if self.marks else ""

    @phase.setter
    def phase(self, name: str) -> None:
        self.marks.append((name, time.perf_counter()))


def run(parallel, steps=12):
    rank, world = dist.get_rank(), dist.get_world_size()
    dcfg = DataConfig(
        synthetic=dict(
            num_sparse=32,
            num_groups=4,
            table_size=1000,
            num_valid=0,
            num_test=0,
            num_train=256 * 4 * 4,
        )
    )
    data = load_data(dcfg)
    mcfg = ModelConfig(embedding_dim=32, bottom=[32], top=[32])
    if parallel == "dmt":
        mcfg.num_towers, mcfg.partition = 4, "planted"
    tcfg = TrainConfig(parallel=parallel, hosts=2, ranks_per_host=2, batch_size=256)
    built = build(data.spec, mcfg, tcfg)
    wrapped = built.model
    batches = list(local_batches(data, "train", 256 * world, rank, world))
    fwd, bwd = [], []
    for i in range(steps):
        b = batches[i % len(batches)]
        dist.barrier()
        clock = PhaseClock()
        train_step(wrapped, built.optimizer, b, observer=clock)
        t_end = time.perf_counter()
        (_, t0), (_, t1) = clock.marks
        if i >= 4:
            fwd.append(t1 - t0)  # forward + loss
            bwd.append(t_end - t1)  # zero_grad + backward (fused sparse update) + dense step
    prof = None
    if parallel == "dmt":
        # stage timing of SPTT forward
        w = wrapped
        st = {k: [] for k in ("ids", "lookup", "towers", "peer_a2a", "head", "head_noddp")}
        for i in range(6):
            b = batches[i % len(batches)]
            dist.barrier()
            t = [time.perf_counter()]
            local = w.exchange_ids(b.sparse_features)
            t.append(time.perf_counter())
            pooled = w.host_sparse(local)
            pooled.values()  # resolve the lazy awaitable inside the timed stage
            t.append(time.perf_counter())
            out = w.host_towers(pooled)
            t.append(time.perf_counter())
            virtual = w.return_to_home(out, b.dense_features.shape[0])
            t.append(time.perf_counter())
            w.head(b.dense_features, virtual)
            t.append(time.perf_counter())
            w.head.module(b.dense_features, virtual)
            t.append(time.perf_counter())
            for k, t0, t1 in zip(st, t, t[1:]):
                st[k].append(t1 - t0)
        prof = {k: round(statistics.median(v) * 1e3, 1) for k, v in st.items() if v}
    return (
        rank,
        round(statistics.median(fwd) * 1e3, 1),
        round(statistics.median(bwd) * 1e3, 1),
        prof,
    )


if __name__ == "__main__":
    import argparse
    import os
    import sys

    from dmtrec.emulate.launch import spawn_in_hosts
    from dmtrec.emulate.netns import EmulatedHosts, LinkSpec
    from dmtrec.parallel.launch import quiet_libraries, spawn

    ap = argparse.ArgumentParser()
    ap.add_argument("--cross-mbit", type=float, default=None, help="emulated hosts (root)")
    args = ap.parse_args()
    quiet_libraries()
    # ranks in namespaces import this file by name: put its folder on their path
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])
    sys.path.insert(0, here)
    from sptt_stages import run as stage_run

    head = "(rank, fwd ms, bwd ms, SPTT fwd stages ms):"
    if args.cross_mbit is None:
        for p in ("baseline", "dmt"):
            print(p, head, spawn(stage_run, (p,), 4, 2))
    else:
        with EmulatedHosts(2, LinkSpec(cross_mbit=args.cross_mbit)) as emu:
            for p in ("baseline", "dmt"):
                print(p, head, spawn_in_hosts(stage_run, (p,), emu, 2))
