"""Injected link delays (``emulate/delay.py``): the alpha-beta cost each rank sleeps before a
collective, against closed forms, on a real 2 hosts x 2 ranks gloo run."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dmtrec.emulate.delay import LinkDelay, collective_delay, inject_delay
from dmtrec.parallel.launch import spawn
from dmtrec.parallel.topology import Topology, make_process_groups

TOPO = Topology(2, 2)
D = LinkDelay(alpha_intra_s=0.002, alpha_cross_s=0.010, intra_Bps=1e6, cross_Bps=1e5)


def test_all_to_all_is_pairwise_with_concurrent_link_classes() -> None:
    # rank 0 over the world: 1 intra peer, 2 cross peers, 1000 bytes each
    s = collective_delay("all_to_all", [0, 1, 2, 3], [1000.0] * 4, 0, TOPO, D)
    intra = 0.002 + 1000 / 1e6
    cross = 2 * (0.010 + 1000 / 1e5)
    assert s == pytest.approx(max(intra, cross))
    # the same bytes over the peer group {0, 2}: one cross message, half the alpha cost
    assert collective_delay("all_to_all", [0, 2], [2000.0] * 2, 0, TOPO, D) == pytest.approx(
        0.010 + 2000 / 1e5
    )
    # the host's own group: intra only; empty sends to a peer cost nothing
    assert collective_delay("all_to_all", [0, 1], [0.0, 500.0], 0, TOPO, D) == pytest.approx(
        0.002 + 500 / 1e6
    )
    assert collective_delay("all_to_all", [2, 3], [0.0, 0.0], 2, TOPO, D) == 0.0


def test_all_reduce_is_a_ring_over_the_slowest_link() -> None:
    chunk = 250.0  # bytes / p
    world = collective_delay("all_reduce", [0, 1, 2, 3], [chunk] * 4, 1, TOPO, D)
    assert world == pytest.approx(2 * 3 * (0.010 + chunk / 1e5))
    host = collective_delay("all_reduce", [2, 3], [chunk] * 2, 3, TOPO, D)
    assert host == pytest.approx(2 * 1 * (0.002 + chunk / 1e6))
    assert collective_delay("all_reduce", [1], [chunk], 1, TOPO, D) == 0.0


def test_bench_link_modes_inject_what_they_say() -> None:
    from dmtrec.bench.dmt import link_delay
    from dmtrec.emulate.netns import LinkSpec

    spec = LinkSpec(cross_mbit=100.0, ratio=48.0)
    netns = link_delay("netns", spec, 2, cross_latency_ms=30.0, intra_latency_ms=10.0)
    assert netns == LinkDelay(alpha_intra_s=0.010, alpha_cross_s=0.030)
    # --link delay: each of a host's 2 ranks gets half of its 100 Mbit/s link (and loopback)
    fallback = link_delay("delay", spec, 2, cross_latency_ms=0.0, intra_latency_ms=0.0)
    assert fallback.cross_Bps == pytest.approx(100e6 / 8 / 2)
    assert fallback.intra_Bps == pytest.approx(48 * 100e6 / 8 / 2)
    assert fallback.alpha_cross_s == 0.0 and fallback.active
    assert not link_delay("none", spec, 2, 0.0, 0.0).active


def test_latency_only_leaves_bytes_to_the_shaped_link() -> None:
    alpha_only = LinkDelay(alpha_intra_s=0.002, alpha_cross_s=0.010)
    s = collective_delay("all_to_all", [0, 1, 2, 3], [1e9] * 4, 0, TOPO, alpha_only)
    assert s == pytest.approx(2 * 0.010)
    assert not LinkDelay().active and alpha_only.active


def test_delays_and_counting_nest_and_restore_the_collectives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As ``bench dmt`` uses them: counts are the same with delays injected, every delay is
    slept once per call, and leaving the blocks restores what was there before."""
    from dmtrec.observe import comm

    calls: list[str] = []
    stubs = {
        "all_to_all_single": lambda *a, **k: calls.append("a2a"),
        "all_reduce": lambda *a, **k: calls.append("ar"),
        "reduce_scatter_tensor": lambda *a, **k: calls.append("rs"),
        "all_gather_into_tensor": lambda *a, **k: calls.append("ag"),
    }
    for name, fn in stubs.items():
        monkeypatch.setattr(dist, name, fn)
    monkeypatch.setattr(comm, "group_ranks", lambda group: [0, 1, 2, 3])

    def run(with_delay: bool) -> tuple[dict, list[float]]:
        counter = comm.CommCounter(TOPO, 0)
        slept: list[float] = []
        d = D if with_delay else LinkDelay()
        with counter.install(), inject_delay(TOPO, 0, d, sleep=slept.append):
            dist.all_to_all_single(torch.empty(8, 5), torch.ones(8, 5), [2, 2, 2, 2], [1, 2, 3, 2])
            dist.all_reduce(torch.ones(100))
            dist.reduce_scatter_tensor(torch.empty(10), torch.ones(40))
            dist.all_gather_into_tensor(torch.empty(40), torch.ones(10))
        return dict(counter.bytes), slept

    plain, none_slept = run(False)
    delayed, slept = run(True)
    assert delayed == plain and not none_slept
    assert calls == ["a2a", "ar", "rs", "ag"] * 2
    # all-to-all: rows of 20 bytes, split 1/2/3/2: 40 to the host-mate, 60 + 40 across;
    # reduce-scatter of 160 bytes: 40 to each; all-gather of 40 bytes: 40 to each
    assert plain[("forward/embeddings", "intra")] == 40 + 40 + 40
    assert plain[("forward/embeddings", "cross")] == 100 + 80 + 80
    # all-reduce of 400 bytes: reduce-scatter + all-gather, 2 x 100 to each other rank
    assert plain[("forward/allreduce", "intra")] == 200
    assert plain[("forward/allreduce", "cross")] == 400
    assert slept == pytest.approx(
        [
            (0.010 + 60 / 1e5) + (0.010 + 40 / 1e5),  # the cross class is the slower
            2 * 3 * (0.010 + 100 / 1e5),
            2 * (0.010 + 40 / 1e5),
            2 * (0.010 + 40 / 1e5),
        ]
    )
    for name, fn in stubs.items():
        assert getattr(dist, name) is fn


def _collectives_under_delay() -> list[float]:
    """Run on each of 4 ranks: record (not sleep) the delays of a few real collectives."""
    rank = dist.get_rank()
    groups = make_process_groups(TOPO)
    with inject_delay(TOPO, rank, D, sleep=lambda s: None) as slept:
        x = torch.ones(4 * 25)  # 100 bytes to each rank
        dist.all_to_all_single(torch.empty_like(x), x)
        y = torch.ones(2 * 25)
        dist.all_to_all_single(torch.empty_like(y), y, group=groups.peer)
        dist.all_reduce(torch.ones(100))  # 400 bytes: ring chunks of 100
        dist.all_to_all_single(torch.empty_like(y), y, group=groups.intra)
    # outside the block nothing is intercepted any more
    dist.all_to_all_single(torch.empty_like(x), x)
    return list(slept)


@pytest.mark.slow
def test_every_rank_sleeps_the_modelled_cost_of_real_collectives() -> None:
    results = spawn(_collectives_under_delay, (), 4, 2)
    expected = [
        2 * (0.010 + 100 / 1e5),  # world all-to-all: two cross peers dominate
        0.010 + 100 / 1e5,  # peer group: one cross peer
        2 * 3 * (0.010 + 100 / 1e5),  # ring all-reduce over the world
        0.002 + 100 / 1e6,  # inside the host
    ]
    assert len(results) == 4
    for slept in results:
        assert slept == pytest.approx(expected)
