"""Link latency (and, without namespaces, bandwidth) emulated by delays slept before collectives.

The kernels this project runs on offer ``tbf``/``htb`` but no ``netem``, so the network
namespaces of ``netem.py`` can shape bandwidth but cannot add per-message latency. This module
adds it in user space: before each collective, the calling rank sleeps for the alpha-beta cost
of its messages in that collective, the model of ``dmtrec simulate``:

- all-to-all, reduce-scatter, all-gather: pairwise exchange, one message per peer, each costing
  ``alpha + bytes / bandwidth`` of its link class; the two classes (NVLink, NIC) are different
  hardware and run concurrently, so the cost is the slower class's sum. One difference from the
  simulator, whose messages are all the same size: a peer this rank sends no bytes costs
  nothing (as the message counts of ``CommCounter`` do not count it);
- all-reduce: a ring of ``2 (p - 1)`` steps over the slowest link in the group.

With ``bandwidth`` left ``None`` only the alpha terms are slept (``--link netns``: tbf does the
bytes); with both bandwidths set this is the whole link model (``--link delay``: the fallback
where namespaces cannot be made, on plain loopback).

The sleep is in the calling thread, also for ``async_op=True`` collectives (DDP's bucket
all-reduces, issued from inside backward): injected time never overlaps computation, unlike a
real wire's, so it adds to the step in series (and ``dmtrec simulate``'s calibration adds it
so). While a rank sleeps it holds no CPU, so the other ranks of a box with fewer cores than
ranks lose nothing to it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from dmtrec.observe.comm import intercept
from dmtrec.parallel.topology import Topology


@dataclass(frozen=True)
class LinkDelay:
    """Seconds per message (alpha) and bytes/s (None: not injected) per link class."""

    alpha_intra_s: float = 0.0
    alpha_cross_s: float = 0.0
    intra_Bps: float | None = None
    cross_Bps: float | None = None

    def message_s(self, link: str, nbytes: float) -> float:
        """Cost of one message of ``nbytes`` over ``link`` ('intra' or 'cross')."""
        alpha, bw = (
            (self.alpha_intra_s, self.intra_Bps)
            if link == "intra"
            else (self.alpha_cross_s, self.cross_Bps)
        )
        return alpha + (nbytes / bw if bw else 0.0)

    @property
    def active(self) -> bool:
        """Whether anything is injected at all."""
        return bool(self.alpha_intra_s or self.alpha_cross_s or self.intra_Bps or self.cross_Bps)

    def to_dict(self) -> dict[str, float | None]:
        """The settings for a report; bandwidths are one rank's (None: not injected)."""
        return {
            "alpha_intra_ms": self.alpha_intra_s * 1e3,
            "alpha_cross_ms": self.alpha_cross_s * 1e3,
            "injected_intra_mbit_per_rank": self.intra_Bps * 8e-6 if self.intra_Bps else None,
            "injected_cross_mbit_per_rank": self.cross_Bps * 8e-6 if self.cross_Bps else None,
        }


def collective_delay(
    op: str, ranks: list[int], sends: list[float], rank: int, topology: Topology, d: LinkDelay
) -> float:
    """Seconds ``rank`` waits before a collective (see the module docstring for the model)."""
    links = [topology.link(rank, dst) for dst in ranks]
    if op == "all_reduce":
        if len(ranks) <= 1:
            return 0.0
        slowest = "cross" if "cross" in links else "intra"
        chunk = sends[0]  # the ring moves bytes / p per step
        return 2 * (len(ranks) - 1) * d.message_s(slowest, chunk)
    per_class = {"intra": 0.0, "cross": 0.0}
    for link, nbytes in zip(links, sends):
        if link != "local" and nbytes > 0:
            per_class[link] += d.message_s(link, nbytes)
    return max(per_class.values())


@contextlib.contextmanager
def inject_delay(
    topology: Topology, rank: int, d: LinkDelay, sleep: Callable[[float], None] = time.sleep
) -> Iterator[list[float]]:
    """Sleep before every collective for its modelled cost; yields the list of delays slept."""
    slept: list[float] = []
    if not d.active:
        yield slept
        return

    def observe(op: str, ranks: list[int], sends: list[float], kind: str) -> None:
        s = collective_delay(op, ranks, sends, rank, topology, d)
        if s > 0:
            slept.append(s)
            sleep(s)

    with intercept(observe):
        yield slept
