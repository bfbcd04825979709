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
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from dmtrec.parallel.topology import Topology

LINKS = ("intra", "cross")


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
    def _ranks(self, group: dist.ProcessGroup | None) -> list[int]:
        if group is None or group is dist.group.WORLD:
            return list(range(dist.get_world_size()))
        return dist.get_process_group_ranks(group)

    def record(self, kind: str, group: dist.ProcessGroup | None, sends: list[float]) -> None:
        """This rank sends ``sends[j]`` bytes to the group's j-th rank."""
        if not self.enabled:
            return
        key = f"{self.phase}/{kind}"
        with self._lock:
            for dst, nbytes in zip(self._ranks(group), sends):
                link = self.topology.link(self.rank, dst)
                if link == "local" or nbytes <= 0:
                    continue
                self.bytes[(key, link)] += nbytes
                self.messages[(key, link)] += 1

    def _all_to_all(self, inp: torch.Tensor, split: list[int] | None, group: Any) -> None:
        n = len(self._ranks(group))
        row = (
            inp[0].numel() * inp.element_size()
            if inp.dim() > 1 and len(inp)
            else inp.element_size()
        )
        rows = list(split) if split else [inp.shape[0] // n] * n
        kind = "embeddings" if inp.is_floating_point() else "ids"
        self.record(kind, group, [r * row for r in rows])

    def _scatter_like(self, nbytes: float, group: Any, kind: str, factor: float = 1.0) -> None:
        n = len(self._ranks(group))
        self.record(kind, group, [factor * nbytes / n] * n)

    @contextlib.contextmanager
    def install(self) -> Iterator[CommCounter]:
        """Wrap the Python-level collectives for the duration of the block."""
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
            output,
            input,
            output_split_sizes=None,
            input_split_sizes=None,
            group=None,
            async_op=False,
        ):  # noqa: E501
            self._all_to_all(input, input_split_sizes, group)
            return orig["all_to_all_single"](
                output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op
            )

        def reduce_scatter_tensor(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
            kind = "embeddings" if input.is_floating_point() else "ids"
            self._scatter_like(input.numel() * input.element_size(), group, kind)
            return orig["reduce_scatter_tensor"](
                output, input, op=op, group=group, async_op=async_op
            )

        def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):
            n = len(self._ranks(group))
            nbytes = input_tensor.numel() * input_tensor.element_size()
            kind = "embeddings" if input_tensor.is_floating_point() else "ids"
            self.record(kind, group, [nbytes] * n)
            return orig["all_gather_into_tensor"](
                output_tensor, input_tensor, group=group, async_op=async_op
            )

        def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            self.count_all_reduce(tensor.numel() * tensor.element_size(), group, "allreduce")
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
            yield self
        finally:
            for name, fn in orig.items():
                setattr(dist, name, fn)

    def count_all_reduce(self, nbytes: float, group: Any, kind: str) -> None:
        """All-reduce as reduce-scatter + all-gather: 2 * S/n to each other rank."""
        self._scatter_like(nbytes, group, kind, factor=2.0)

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
