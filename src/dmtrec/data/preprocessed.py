"""Reader of the binary store ``dmtrec preprocess`` writes (``--data preprocessed``).

**Format** (justification in ``dmtrec.data.preprocess``): a directory with ``meta.json`` (the
feature spec and each split's parts) and one sub-directory per input file ("part", e.g. a
Criteo day), holding plain ``.npy`` arrays, row-major::

    labels.npy   (n,)    float32        dense.npy  (n, D)  float32 (transforms applied)
    sparse.npy   (n, F1) int32 | int64  ids of the F1 one-hot features, tables already applied
    bag<j>.offsets.npy (n + 1,) int64, bag<j>.values.npy  ids of multi-hot feature j
    done.json    rows, bad rows, and the source file it was converted from

The arrays are memory-mapped (``np.load(mmap_mode="r")``): opening costs nothing, each rank
gathers only its rows (numpy fancy indexing on the map), and the OS page cache is shared by
all ranks on a host. A part is cut into blocks of ``block_rows`` rows for the shuffle
(``dmtrec.data.shard``): blocks in a seeded permutation, rows permuted within a block, so a
rank's reads stay within one or two 64k-row windows per batch (no random I/O over the file).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from dmtrec.data.base import SPLITS, DataStats, FeatureSpec, Jagged, Rows
from dmtrec.data.shard import BlockSource, block_permutation, epoch_permutation
from dmtrec.errors import ConfigError, DataError

if TYPE_CHECKING:
    pass

FORMAT = "dmtrec-preprocessed"
VERSION = 1
BLOCK_ROWS = 65_536


class Part:
    """One converted input file: its arrays, memory-mapped."""

    def __init__(self, path: str, index: int, spec: FeatureSpec) -> None:
        self.path, self.index = path, index
        if not os.path.isfile(os.path.join(path, "done.json")):
            raise DataError(f"{path}: part not finished (no done.json); re-run dmtrec preprocess")

        def load(name: str) -> np.ndarray:
            # A plain ndarray view of the map: indexing it skips np.memmap's Python wrapper.
            return np.asarray(np.load(os.path.join(path, name), mmap_mode="r"))

        try:
            self.labels = load("labels.npy")
            self.dense = load("dense.npy")
            self.sparse = load("sparse.npy")
            multi = set(spec.multi_hot)
            self.bags: dict[int, tuple[np.ndarray, np.ndarray]] = {}
            for j, name in enumerate(spec.sparse):
                if name in multi:
                    self.bags[j] = (load(f"bag{j}.offsets.npy"), load(f"bag{j}.values.npy"))
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: unreadable part: {e}") from None
        self.n = len(self.labels)
        if len(self.dense) != self.n or len(self.sparse) != self.n:
            raise DataError(f"{path}: arrays of different lengths; re-run dmtrec preprocess")
        self.onehot = [j for j in range(len(spec.sparse)) if j not in self.bags]

    def rows(self, idx: np.ndarray) -> Rows:
        """Rows ``idx`` (any order): gathered from the maps, the ids feature-major."""
        labels = self.labels[idx]
        dense = self.dense[idx]
        ids = self.sparse[idx].T.astype(np.int64)  # (F1, m), one copy
        if not self.bags:
            return Rows(labels, dense, ids)
        cols: list[np.ndarray | Jagged] = [np.empty(0)] * (len(self.onehot) + len(self.bags))
        for k, j in enumerate(self.onehot):
            cols[j] = ids[k]
        for j, (offsets, values) in self.bags.items():
            lo, hi = offsets[idx], offsets[idx + 1]
            lens = (hi - lo).astype(np.int64)
            out = np.cumsum(lens) - lens
            pos = np.arange(int(lens.sum()), dtype=np.int64) + np.repeat(lo - out, lens)
            cols[j] = Jagged(lens.astype(np.int32), values[pos].astype(np.int64))
        return Rows(labels, dense, cols)


class _PartBlock:
    """Rows ``[start, start + n)`` of a part (``shard.Block``)."""

    def __init__(self, part: Part, start: int, n: int, order: np.ndarray | None) -> None:
        self.part, self.start, self.n, self.order = part, start, n, order

    def parse(self, records: np.ndarray, report: bool) -> tuple[Rows, np.ndarray]:
        return self.part.rows(self.start + records), np.ones(len(records), dtype=bool)


def read_meta(path: str) -> dict:
    """The store's ``meta.json``; a ``DataError`` naming the directory if it is not a store."""
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
        raise DataError(f"{path}: not a preprocessed store (no meta.json); run dmtrec preprocess")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise DataError(f"{meta_path}: not a {FORMAT} v{VERSION} store")
    return meta


class PreprocessedData(BlockSource):
    """A preprocessed store: the splits it holds, read memory-mapped, each rank its rows.

    ``shuffle`` permutes the train split every epoch from ``seed``: blocks of ``block_rows``
    rows in a seeded order, and the rows inside each block (see ``dmtrec.data.shard``).
    """

    def __init__(
        self,
        path: str,
        shuffle: bool = False,
        seed: int = 0,
        block_rows: int = BLOCK_ROWS,
        pooling: str = "sum",
    ) -> None:
        if block_rows < 1:
            raise ConfigError(f"--block-rows must be >= 1, not {block_rows}")
        if seed < 0:
            raise ConfigError(f"--shuffle-seed must be >= 0, not {seed}")
        meta = read_meta(path)
        self.path = path
        self.spec = FeatureSpec(
            dense=meta["dense"],
            sparse=meta["sparse"],
            num_embeddings=meta["num_embeddings"],
            multi_hot=meta.get("multi_hot", []),
            pooling=pooling,
        )
        self.shuffle, self.seed, self.block_rows = shuffle, seed, block_rows
        self.parts: dict[str, list[Part]] = {}
        for split in SPLITS:
            names = meta["splits"].get(split) or []
            if names:
                self.parts[split] = [
                    Part(os.path.join(path, name), i, self.spec) for i, name in enumerate(names)
                ]
        if "train" not in self.parts:
            raise DataError(f"{path}: the store has no train split")
        # Bad rows were dropped (and counted) when the store was written.
        self.stats: dict[str, DataStats] = {s: DataStats() for s in self.parts}

    @property
    def splits(self) -> list[str]:
        return [s for s in SPLITS if s in self.parts]

    def num_examples(self, split: str) -> int:
        return sum(p.n for p in self.parts[split])

    def split_blocks(
        self, split: str, epoch: int, stats: DataStats, rank: int
    ) -> Iterator[_PartBlock]:
        """The split's blocks (``--block-rows`` rows of a part) in epoch order."""
        if split not in self.parts:
            raise ConfigError(f"{self.path}: the store has no {split} split")
        return self._blocks(split, epoch)

    def _blocks(self, split: str, epoch: int) -> Iterator[_PartBlock]:
        shuffle = self.shuffle and split == "train"
        br = self.block_rows
        units = [(p, b) for p in self.parts[split] for b in range(-(-p.n // br))]
        order = epoch_permutation(self.seed, epoch, len(units)) if shuffle else range(len(units))
        for u in order:
            part, b = units[int(u)]
            n = min(br, part.n - b * br)
            perm = block_permutation(self.seed, epoch, (part.index, b), n) if shuffle else None
            yield _PartBlock(part, b * br, n, perm)
