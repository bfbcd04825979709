"""Where a step's time goes: baseline vs SPTT at CR=1 (identity TMs), on loopback (2 x 2 gloo).

Median forward/backward ms per rank, and SPTT's forward stages: ids over the peer group
(``ids``), the host's TorchRec DMP lookup incl. its intra-host input/output distribution
(``lookup``), the tower modules (``towers``). Run: ``python benchmarks/sptt_stages.py``.
"""

import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dmtrec.data import DataConfig, load_data, shard_rows
from dmtrec.models import ModelConfig, build_model
from dmtrec.parallel.sharding import dense_and_fused_optimizer
from dmtrec.parallel.topology import Topology
from dmtrec.partition import make_partition
from dmtrec.train.trainer import TrainConfig, wrap_model


def run(parallel, steps=12):
    rank, world = dist.get_rank(), dist.get_world_size()
    topo = Topology(2, 2)
    torch.manual_seed(0)
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
        mcfg.towers = make_partition("planted", data.spec.sparse, 4, data.spec.groups)
    model = build_model(mcfg, data.spec)
    tcfg = TrainConfig(parallel=parallel, hosts=2, ranks_per_host=2, batch_size=256)
    wrapped = wrap_model(model, mcfg, tcfg, topo)
    opt = dense_and_fused_optimizer(wrapped, [wrapped.fused_optimizer], "adam", 1e-3)
    batches = list(shard_rows(data.batches("train", 256 * world), rank, world))
    fwd, bwd = [], []
    for i in range(steps):
        b = batches[i % len(batches)]
        dist.barrier()
        t0 = time.perf_counter()
        loss = F.binary_cross_entropy_with_logits(
            wrapped(b.dense_features, b.sparse_features), b.labels
        )
        t1 = time.perf_counter()
        opt.zero_grad()
        loss.backward()
        opt.step()
        t2 = time.perf_counter()
        if i >= 4:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    prof = None
    if parallel == "dmt":
        # stage timing of SPTT forward
        import statistics

        w = wrapped
        st = {"ids": [], "lookup": [], "towers": [], "a2a+head": []}
        for i in range(6):
            b = batches[i % len(batches)]
            dist.barrier()
            t0 = time.perf_counter()
            kjt = b.sparse_features.permute(w.host_order)
            local = w.id_dist(kjt).wait().wait()
            t1 = time.perf_counter()
            pooled = w.host_sparse(local)
            pooled.values()  # resolve the lazy awaitable inside the timed stage
            t2 = time.perf_counter()
            w.host_towers(pooled)
            t3 = time.perf_counter()
            st["ids"].append(t1 - t0)
            st["lookup"].append(t2 - t1)
            st["towers"].append(t3 - t2)
        prof = {k: round(statistics.median(v) * 1e3, 1) for k, v in st.items() if v}
    import statistics

    return (
        rank,
        round(statistics.median(fwd) * 1e3, 1),
        round(statistics.median(bwd) * 1e3, 1),
        prof,
    )


if __name__ == "__main__":
    from dmtrec.parallel.launch import quiet_libraries, spawn

    quiet_libraries()
    for p in ("baseline", "dmt"):
        print(p, "(rank, fwd ms, bwd ms, SPTT fwd stages ms):", spawn(run, (p,), 4, 2))
