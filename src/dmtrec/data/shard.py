"""Sharded reading: every rank parses only its own rows of each global batch.

The order of a split's examples is a function of the data and the seed alone, never of the
world size; a run on N ranks therefore trains on exactly the global batches of a 1-rank run
with N times the per-rank batch.

**Positions.** A source yields its split as *blocks* (a byte range of a text file, a row group
of a Parquet file, a run of rows of a preprocessed day, a whole in-memory table), each with
``n`` records and, when shuffled, an in-block permutation. Concatenated in epoch order, the
blocks give every record an epoch *position* 0, 1, 2, ... Global batch ``k`` is positions
``[kG, (k+1)G)``; rank ``r`` of ``W`` takes its contiguous slice ``[kG + rB, kG + (r+1)B)``,
``B = G / W``, and parses just those records (``Block.parse``). The final partial global batch
of ``m < G`` positions is cut to ``W * (m // W)`` (each rank ``m // W``, the first positions),
so every rank runs the same number of equal-sized steps: collectives need it, and so do exact
all-gathered evaluation metrics.

**Shuffling** (training split): the blocks are visited in a seeded permutation of the epoch and
the rows inside a block in a seeded permutation of (epoch, block); both are functions of
``(seed, epoch)`` only, so ``--resume`` at (epoch, step) replays the order exactly. The
granularity is the block: a global batch draws its rows from one or two blocks (8 MiB of text,
``block_rows`` preprocessed rows), i.e. blocks mix the whole split across batches and rows are
mixed within a block; evaluation splits are read in file order.

**Bad rows** are found only by the rank that parses them. A bad record is dropped from its
rank's slice (counted and reported by that rank; ``--max-bad-rows`` is per rank); on one rank
that is all. On several ranks every slice must keep ``B`` rows, so the rank tops its slice up
with copies of its own good rows of that slice (cycling); a slice with no good row takes the
first good record of the global batch (parsed, not counted), and a global batch with no good
record at all is skipped by every rank alike (each rank can tell: a rank with a good row knows
the batch is not all bad, one without finds out by parsing the rest). On clean data no row is
ever duplicated or parsed twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Protocol

import numpy as np

from dmtrec.data.base import DataStats, FeatureSpec, Rows
from dmtrec.errors import ConfigError

if TYPE_CHECKING:
    from torchrec.datasets.utils import Batch

# Rows one rank parses per call at most (a wave of whole batches): bounds memory for sources
# with a single huge block (in-memory tables) and keeps each parse call large.
WAVE_ROWS = 65_536


class Block(Protocol):
    """A run of ``n`` records of a split that a source can parse any subset of."""

    n: int
    order: np.ndarray | None  # epoch position in the block -> record index; None: identity

    def parse(self, records: np.ndarray, report: bool) -> tuple[Rows, np.ndarray]:
        """Rows of the good records among ``records`` (record indices, in this order) and a
        bool mask over ``records`` (True: good). Bad ones are counted/reported iff ``report``.

        A block may return an intermediate with a ``concat`` static method instead of
        ``Rows`` and have a ``finish(intermediate) -> Rows`` method: the driver then
        concatenates a whole wave's parts before finishing them in one call (the column
        tables look their vocabularies up once per wave, not once per block)."""
        ...


def check_shard_args(global_batch_size: int, rank: int, world_size: int) -> int:
    """The per-rank batch size; rejects impossible batch/shard arguments before any I/O."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in [0, world size {world_size})")
    if global_batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, not {global_batch_size}")
    if global_batch_size % world_size:
        raise ConfigError(
            f"global batch size {global_batch_size} is not a multiple of the world size "
            f"{world_size}"
        )
    return global_batch_size // world_size


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The seeded visiting order of ``n`` blocks in ``epoch``."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def block_permutation(seed: int, epoch: int, key: tuple[int, ...], n: int) -> np.ndarray:
    """The seeded order of the ``n`` rows of the block ``key`` (stable ids) in ``epoch``."""
    return np.random.default_rng([seed, epoch, 1, *key]).permutation(n)


class _Pending:
    """Loaded blocks whose positions are not all consumed yet, with their start positions."""

    def __init__(self) -> None:
        self.blocks: list[Block] = []
        self.starts: list[int] = []
        self.total = 0

    def add(self, block: Block) -> None:
        self.blocks.append(block)
        self.starts.append(self.total)
        self.total += block.n

    def drop_before(self, pos: int) -> None:
        """Forget blocks that end at or before position ``pos``."""
        keep = 0
        while keep < len(self.blocks) and self.starts[keep] + self.blocks[keep].n <= pos:
            keep += 1
        del self.blocks[:keep], self.starts[:keep]

    def parse(self, pos: np.ndarray, report: bool, stats: DataStats) -> tuple[Rows, np.ndarray]:
        """Parse the records at sorted positions ``pos`` (all loaded), in position order."""
        starts = np.asarray(self.starts, dtype=np.int64)
        which = np.searchsorted(starts, pos, side="right") - 1
        cuts = np.flatnonzero(np.diff(which)) + 1
        parts, goods = [], []
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(pos)]):
            i = int(which[lo])
            q = pos[lo:hi] - starts[i]
            block = self.blocks[i]
            records = q if block.order is None else block.order[q]
            rows, good = block.parse(records, report)
            if report:
                stats.parsed += len(records)
            parts.append(rows)
            goods.append(good)
        finish = getattr(self.blocks[int(which[0])], "finish", None)
        if finish is None:
            return Rows.concat(parts), np.concatenate(goods)
        return finish(type(parts[0]).concat(parts)), np.concatenate(goods)


def sharded_batches(
    blocks: Iterable[Block],
    global_batch_size: int,
    rank: int,
    world_size: int,
    stats: DataStats,
    start_step: int = 0,
) -> Iterator[Rows]:
    """This rank's rows of each global batch of ``blocks`` (see the module docstring), from
    global batch ``start_step`` on: the batches before it are not parsed (a resumed epoch;
    their blocks are still visited, to count positions)."""
    g = global_batch_size
    b = check_shard_args(g, rank, world_size)
    if start_step < 0:
        raise ConfigError(f"start step must be >= 0, not {start_step}")
    pending = _Pending()
    it = iter(blocks)
    done = start_step  # global batches emitted, skipped, or resumed past
    exhausted = False
    while True:
        full = pending.total // g
        if done < full:
            k1 = min(full, done + max(1, WAVE_ROWS // b))
            yield from _emit(pending, done, k1, g, b, rank * b, world_size, stats)
            done = k1
            pending.drop_before(done * g)
        elif exhausted:
            break
        else:
            block = next(it, None)
            if block is None:
                exhausted = True
            else:
                pending.add(block)
                pending.drop_before(done * g)
    last = (pending.total - done * g) // world_size
    if last > 0:
        yield from _emit(pending, done, done + 1, g, last, rank * last, world_size, stats)


def _emit(
    pending: _Pending,
    k0: int,
    k1: int,
    g: int,
    b: int,
    offset: int,
    world_size: int,
    stats: DataStats,
) -> Iterator[Rows]:
    """Rows of global batches ``k0..k1-1``: ``b`` positions from ``k*g + offset`` each."""
    pos = (np.arange(k0, k1, dtype=np.int64)[:, None] * g + offset + np.arange(b)).reshape(-1)
    rows, good = pending.parse(pos, True, stats)
    counts = good.reshape(k1 - k0, b).sum(axis=1)
    stats.rows += len(rows)
    ends = np.cumsum(counts)
    for j, (end, count) in enumerate(zip(ends.tolist(), counts.tolist())):
        part = rows.slice(end - count, end)
        if count < b and world_size > 1:
            part = _top_up(pending, part, (k0 + j) * g, g, offset, b, stats)
        if part is not None and len(part):
            yield part


def _top_up(
    pending: _Pending, part: Rows, start: int, g: int, offset: int, b: int, stats: DataStats
) -> Rows | None:
    """Fill a slice shortened by bad rows back to ``b`` rows (see the module docstring)."""
    if len(part) == 0:
        size = min(g, pending.total - start)  # the whole (possibly final) global batch
        others = np.arange(start, start + size, dtype=np.int64)
        others = others[(others < start + offset) | (others >= start + offset + b)]
        if len(others) == 0:
            return None
        found, _ = pending.parse(others, False, stats)
        if len(found) == 0:
            return None  # every record of the global batch is bad: all ranks skip it
        part = found.slice(0, 1)
    return part.take(np.arange(b) % len(part))


class BlockSource:
    """What every data source's ``batches`` does, around the source's own blocks.

    A source (Criteo TSV, column table, preprocessed store, synthetic) sets ``spec`` and
    ``stats`` and implements ``split_blocks``: it checks that the split exists (eagerly, so a
    missing split is an error at the call) and returns the split's blocks in ``epoch``'s
    order. Everything else -- the shard arguments, this rank's slice of each global batch,
    resuming at a step, the skip counts, the TorchRec batches -- is here, once.
    """

    spec: FeatureSpec
    stats: dict[str, DataStats]

    def split_blocks(self, split: str, epoch: int, stats: DataStats, rank: int) -> Iterable[Block]:
        """The blocks of ``split`` in ``epoch``'s order (bad rows counted into ``stats``;
        ``rank`` 0 may show read progress)."""
        raise NotImplementedError

    def batches(
        self,
        split: str,
        global_batch_size: int,
        *,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
    ) -> Iterator[Batch]:
        """This rank's slice of each global batch of ``split`` (``sharded_batches``), from
        global batch ``start_step`` of ``epoch`` on (a resumed epoch: earlier batches are not
        parsed); train is shuffled per epoch where the source shuffles, eval splits are not."""
        stats = DataStats()
        blocks = self.split_blocks(split, epoch, stats, rank)
        check_shard_args(global_batch_size, rank, world_size)
        self.stats[split] = stats
        rows = sharded_batches(blocks, global_batch_size, rank, world_size, stats, start_step)
        keys = self.spec.sparse
        return (r.to_batch(keys) for r in rows)
