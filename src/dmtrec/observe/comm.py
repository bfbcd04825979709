"""Counting what every collective sends, per link class (intra-host / cross-host).

``CommCounter.install()`` wraps the ``torch.distributed`` collectives that TorchRec and dmtrec
call from Python (``all_to_all_single``, ``reduce_scatter_tensor``, ``all_gather_into_tensor``,
``all_reduce``); ``count_ddp`` makes DDP's gradient buckets go through them. For each call, this
rank's sends are attributed to the destination rank's link class via the ``Topology``.

Exactness: all-to-all bytes are exact (the split sizes say what goes where). Reductions and
gathers are counted as their pairwise (direct) algorithm: a reduce-scatter of S bytes over n
ranks sends S/n to each other rank, an all-gather sends this rank's chunk to each other rank,
an all-reduce is a reduce-scatter plus an all-gather. Real NCCL/gloo may use rings or trees
with the same totals per rank but different links; those numbers are a model, and say so.

Each record is keyed by ``phase/kind``: phase is what the trainer is doing (``forward``,
``backward``), kind is ``ids`` (integer tensors: lengths, ids, splits), ``embeddings`` (float
all-to-all / reduce-scatter payloads: pooled embeddings, TM outputs, their gradients) or
``allreduce`` (DDP's gradient buckets, see ``count_ddp``).
"""

from __future__ import annotations

import contextlib
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from dmtrec.parallel.topology import Topology

LINKS = ("intra", "cross")


# An observer sees each collective before it runs: (op, the group's global ranks, bytes this
# rank sends to each of them, kind). ``op`` is all_to_all | reduce_scatter | all_gather |
# all_reduce; for an all-reduce ``sends`` is the chunk per rank (bytes / group size).
Observer = Callable[[str, list[int], list[float], str], None]


def group_ranks(group: dist.ProcessGroup | None) -> list[int]:
    """Global ranks of ``group`` (the world when None)."""
    if group is None or group is dist.group.WORLD:
        return list(range(dist.get_world_size()))
    return dist.get_process_group_ranks(group)


def _kind(t: torch.Tensor) -> str:
    return "embeddings" if t.is_floating_point() else "ids"


def _a2a_sends(inp: torch.Tensor, split: list[int] | None, n: int) -> list[float]:
    row = inp[0].numel() * inp.element_size() if inp.dim() > 1 and len(inp) else inp.element_size()
    rows = list(split) if split else [inp.shape[0] // n] * n
    return [float(r * row) for r in rows]


@contextlib.contextmanager
def intercept(observer: Observer) -> Iterator[None]:
    """Call ``observer`` before every Python-level collective that TorchRec and dmtrec issue
    (``all_to_all_single``, ``reduce_scatter_tensor``, ``all_gather_into_tensor``,
    ``all_reduce``), for the duration of the block. Blocks nest (each wraps the one outside)."""
    orig = {
        name: getattr(dist, name)
        for name in (
            "all_to_all_single",
            "reduce_scatter_tensor",
            "all_gather_into_tensor",
            "all_reduce",
        )
    }

    def all_to_all_single(
        output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False
    ):
        ranks = group_ranks(group)
        observer(
            "all_to_all", ranks, _a2a_sends(input, input_split_sizes, len(ranks)), _kind(input)
        )
        return orig["all_to_all_single"](
            output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op
        )

    def reduce_scatter_tensor(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
        ranks = group_ranks(group)
        chunk = input.numel() * input.element_size() / len(ranks)
        observer("reduce_scatter", ranks, [chunk] * len(ranks), _kind(input))
        return orig["reduce_scatter_tensor"](output, input, op=op, group=group, async_op=async_op)

    def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):
        ranks = group_ranks(group)
        nbytes = float(input_tensor.numel() * input_tensor.element_size())
        observer("all_gather", ranks, [nbytes] * len(ranks), _kind(input_tensor))
        return orig["all_gather_into_tensor"](
            output_tensor, input_tensor, group=group, async_op=async_op
        )

    def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        ranks = group_ranks(group)
        chunk = tensor.numel() * tensor.element_size() / len(ranks)
        observer("all_reduce", ranks, [chunk] * len(ranks), "allreduce")
        return orig["all_reduce"](tensor, op=op, group=group, async_op=async_op)

    wrappers = {
        "all_to_all_single": all_to_all_single,
        "reduce_scatter_tensor": reduce_scatter_tensor,
        "all_gather_into_tensor": all_gather_into_tensor,
        "all_reduce": all_reduce,
    }
    for name, fn in wrappers.items():
        setattr(dist, name, fn)
    try:
        yield
    finally:
        for name, fn in orig.items():
            setattr(dist, name, fn)


class CommCounter:
    """Per-rank byte/message counters by (phase/kind, link)."""

    def __init__(self, topology: Topology, rank: int) -> None:
        self.topology = topology
        self.rank = rank
        self.phase = "forward"
        self.enabled = True
        self._lock = threading.Lock()
        self.bytes: dict[tuple[str, str], float] = defaultdict(float)
        self.messages: dict[tuple[str, str], int] = defaultdict(int)

    def reset(self) -> None:
        with self._lock:
            self.bytes.clear()
            self.messages.clear()

    # -- recording ------------------------------------------------------------------------
    def record(self, kind: str, ranks: list[int], sends: list[float]) -> None:
        """This rank sends ``sends[j]`` bytes to global rank ``ranks[j]``."""
        if not self.enabled:
            return
        key = f"{self.phase}/{kind}"
        with self._lock:
            for dst, nbytes in zip(ranks, sends):
                link = self.topology.link(self.rank, dst)
                if link == "local" or nbytes <= 0:
                    continue
                self.bytes[(key, link)] += nbytes
                self.messages[(key, link)] += 1

    def observe(self, op: str, ranks: list[int], sends: list[float], kind: str) -> None:
        """``intercept`` observer. An all-reduce is a reduce-scatter plus an all-gather: twice
        the per-rank chunk to each other rank."""
        if op == "all_reduce":
            sends = [2.0 * b for b in sends]
        self.record(kind, ranks, sends)

    @contextlib.contextmanager
    def install(self) -> Iterator[CommCounter]:
        """Count every Python-level collective for the duration of the block."""
        with intercept(self.observe):
            yield self

    # -- reporting ------------------------------------------------------------------------
    def totals(self, steps: int) -> dict[str, Any]:
        """Per-step totals summed over *all* ranks (collective: every rank must call it)."""
        keys = sorted({k for k, _ in self.bytes} | {"forward/embeddings"})
        vec = []
        for k in keys:
            for link in LINKS:
                vec += [self.bytes.get((k, link), 0.0), float(self.messages.get((k, link), 0))]
        t = torch.tensor(vec, dtype=torch.float64)
        # every rank must report the same key set for the all-reduce to line up
        key_lists: list[list[str]] = [[] for _ in range(dist.get_world_size())]
        was = self.enabled
        self.enabled = False
        dist.all_gather_object(key_lists, keys)
        all_keys = sorted({k for ks in key_lists for k in ks})
        if all_keys != keys:
            pos = {k: i for i, k in enumerate(keys)}
            full = torch.zeros(len(all_keys) * 4, dtype=torch.float64)
            for i, k in enumerate(all_keys):
                if k in pos:
                    full[4 * i : 4 * i + 4] = t[4 * pos[k] : 4 * pos[k] + 4]
            t, keys = full, all_keys
        if torch.cuda.is_available():  # NCCL reduces only accelerator tensors
            t = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(t)
        t = t.cpu()
        self.enabled = was
        s = max(steps, 1)
        by_kind: dict[str, dict[str, float]] = {}
        for i, k in enumerate(keys):
            ib, im, cb, cm = t[4 * i : 4 * i + 4].tolist()
            by_kind[k] = {
                "intra_host_bytes": ib / s,
                "intra_host_messages": im / s,
                "cross_host_bytes": cb / s,
                "cross_host_messages": cm / s,
            }
        return {
            "cross_host_bytes_per_step": sum(v["cross_host_bytes"] for v in by_kind.values()),
            "intra_host_bytes_per_step": sum(v["intra_host_bytes"] for v in by_kind.values()),
            "cross_host_messages_per_step": sum(v["cross_host_messages"] for v in by_kind.values()),
            "pooled_cross_host_bytes_per_step": by_kind["forward/embeddings"]["cross_host_bytes"],
            "by_kind": by_kind,
            "note": "all-to-all bytes exact; reductions/gathers counted as pairwise (direct) algorithms",
        }


def count_ddp(ddp: torch.nn.parallel.DistributedDataParallel) -> None:
    """Route DDP's gradient buckets through Python ``dist.all_reduce`` so ``install`` sees them.

    ``allreduce_hook`` is DDP's default behaviour (sum then divide by the group size); without
    a registered hook the reducer calls the process group from C++, invisible to the counter.
    """
    ddp.register_comm_hook(ddp.process_group, default_hooks.allreduce_hook)
