"""Injected link delays (``parallel/delay.py``): the alpha-beta cost each rank sleeps before a
collective, against closed forms, on a real 2 hosts x 2 ranks gloo run."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dmtrec.parallel.delay import LinkDelay, collective_delay, inject_delay
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


def test_latency_only_leaves_bytes_to_the_shaped_link() -> None:
    alpha_only = LinkDelay(alpha_intra_s=0.002, alpha_cross_s=0.010)
    s = collective_delay("all_to_all", [0, 1, 2, 3], [1e9] * 4, 0, TOPO, alpha_only)
    assert s == pytest.approx(2 * 0.010)
    assert not LinkDelay().active and alpha_only.active


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
