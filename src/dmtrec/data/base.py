"""What every data source provides: a feature spec and batches of TorchRec ``Batch``.

A ``Batch`` (``torchrec.datasets.utils.Batch``) holds ``dense_features`` (B x n_dense float),
``sparse_features`` (a ``KeyedJaggedTensor`` with one key per sparse feature, in spec order) and
``labels`` (B float). Sparse ids are already mapped into ``[0, num_embeddings)`` of their table;
a multi-hot feature has a bag of ids per sample (KJT lengths other than 1).

Readers parse into ``Rows`` (numpy, columnar) and turn them into a ``Batch`` only at the end.
This module imports neither torch nor TorchRec at import time, so the preprocessing tool and
the data benchmark's subprocesses stay light (their memory is measured).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

import numpy as np

if TYPE_CHECKING:
    from torchrec.datasets.utils import Batch

SPLITS = ("train", "valid", "test")
POOLING_MODES = ("sum", "mean")


@dataclass
class FeatureSpec:
    """Names of the dense and sparse features and the table size of each sparse feature."""

    dense: list[str]
    sparse: list[str]
    num_embeddings: list[int]
    # Planted interaction group of each sparse feature (synthetic data only), else None.
    groups: list[int] | None = None
    # Sparse features with a bag of ids per sample (multi-hot), and how a bag is pooled.
    multi_hot: list[str] = field(default_factory=list)
    pooling: str = "sum"

    def __post_init__(self) -> None:
        assert len(self.sparse) == len(self.num_embeddings)
        assert set(self.multi_hot) <= set(self.sparse), "multi-hot features must be sparse"
        assert self.pooling in POOLING_MODES

    @property
    def table_sizes(self) -> dict[str, int]:
        return dict(zip(self.sparse, self.num_embeddings))


@dataclass
class DataStats:
    """Counters a reader fills while streaming (per rank: each rank sees only its share).

    ``rows``: good rows kept; ``skipped``: bad rows (with the first ``messages``); ``parsed``:
    records this rank parsed, good or bad (every record of the split is parsed by exactly one
    rank, so the ranks' ``parsed`` add up to the split's records).
    """

    rows: int = 0
    skipped: int = 0
    parsed: int = 0
    messages: list[str] = field(default_factory=list)
    # the first skipped rows as records (file, line or row, column, reason): OUT/skipped_rows.jsonl
    records: list[dict] = field(default_factory=list)


@dataclass
class Jagged:
    """A bag of ids per row: ``lengths[i]`` ids of row ``i``, all rows' ids in ``values``."""

    lengths: np.ndarray  # (n,) int32
    values: np.ndarray  # (lengths.sum(),) int64

    def __len__(self) -> int:
        return len(self.lengths)

    def offsets(self) -> np.ndarray:
        off = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=off[1:])
        return off

    def take(self, idx: np.ndarray) -> Jagged:
        """Rows ``idx`` (any order, repeats allowed), gathered without a Python loop."""
        off = self.offsets()
        lens = self.lengths[idx].astype(np.int64)
        out_off = np.cumsum(lens) - lens
        pos = np.arange(int(lens.sum()), dtype=np.int64) + np.repeat(off[idx] - out_off, lens)
        return Jagged(self.lengths[idx].astype(np.int32), self.values[pos])

    def slice(self, start: int, end: int) -> Jagged:
        off0 = int(self.lengths[:start].sum())
        off1 = off0 + int(self.lengths[start:end].sum())
        return Jagged(self.lengths[start:end], self.values[off0:off1])

    @staticmethod
    def concat(parts: Sequence[Jagged]) -> Jagged:
        return Jagged(
            np.concatenate([p.lengths for p in parts]).astype(np.int32, copy=False),
            np.concatenate([p.values for p in parts]).astype(np.int64, copy=False),
        )


# One feature's ids: one id per row (n,) or a bag per row.
SparseColumn = Union[np.ndarray, Jagged]  # noqa: UP007 (a runtime alias)


@dataclass
class Rows:
    """Parsed rows, columnar. ``sparse`` is either an (F, n) int64 array (every feature one id
    per row: the KJT's feature-major values as they are) or a list of F ``SparseColumn``."""

    labels: np.ndarray  # (n,) float32
    dense: np.ndarray  # (n, D) float32
    sparse: np.ndarray | list[SparseColumn]

    def __len__(self) -> int:
        return len(self.labels)

    def columns(self) -> list[SparseColumn]:
        return list(self.sparse)

    def take(self, idx: np.ndarray) -> Rows:
        if isinstance(self.sparse, np.ndarray):
            sparse: np.ndarray | list[SparseColumn] = self.sparse[:, idx]
        else:
            sparse = [c.take(idx) if isinstance(c, Jagged) else c[idx] for c in self.sparse]
        return Rows(self.labels[idx], self.dense[idx], sparse)

    def slice(self, start: int, end: int) -> Rows:
        if isinstance(self.sparse, np.ndarray):
            sparse: np.ndarray | list[SparseColumn] = self.sparse[:, start:end]
        else:
            sparse = [
                c.slice(start, end) if isinstance(c, Jagged) else c[start:end] for c in self.sparse
            ]
        return Rows(self.labels[start:end], self.dense[start:end], sparse)

    @staticmethod
    def concat(parts: Sequence[Rows]) -> Rows:
        if len(parts) == 1:
            return parts[0]
        labels = np.concatenate([p.labels for p in parts])
        dense = np.concatenate([p.dense for p in parts])
        if all(isinstance(p.sparse, np.ndarray) for p in parts):
            return Rows(labels, dense, np.concatenate([p.sparse for p in parts], axis=1))
        cols = list(zip(*(p.columns() for p in parts)))
        sparse: list[SparseColumn] = []
        for c in cols:
            if isinstance(c[0], Jagged):
                sparse.append(Jagged.concat(c))  # type: ignore[arg-type]
            else:
                sparse.append(np.concatenate(c))
        return Rows(labels, dense, sparse)

    def to_batch(self, keys: list[str]) -> Batch:
        """The TorchRec ``Batch`` of these rows; the KJT is feature-major (all rows' ids of
        feature 0, then feature 1, ...). It may share memory with these arrays."""
        import torch
        from torchrec.datasets.utils import Batch
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        n = len(self.labels)
        lengths_t = None
        if isinstance(self.sparse, np.ndarray):
            values = np.ascontiguousarray(self.sparse, dtype=np.int64).reshape(-1)
            lengths_t = _ones(torch, values.size)
        else:
            cols = self.sparse
            values = np.concatenate(
                [c.values if isinstance(c, Jagged) else c for c in cols]
            ).astype(np.int64, copy=False)
            lengths = np.concatenate(
                [c.lengths if isinstance(c, Jagged) else np.ones(n, np.int32) for c in cols]
            ).astype(np.int32, copy=False)
        kjt = KeyedJaggedTensor(
            keys=list(keys),
            values=_tensor(torch, values, np.int64),
            lengths=lengths_t if lengths_t is not None else _tensor(torch, lengths, np.int32),
            stride=n,
        )
        return Batch(
            dense_features=_tensor(torch, self.dense, np.float32),
            sparse_features=kjt,
            labels=_tensor(torch, self.labels, np.float32),
        )


_ONES: dict[int, object] = {}


def _ones(torch, n: int):
    """A read-only-by-convention int32 tensor of ``n`` ones, shared by all one-hot batches of
    that size (as TorchRec's own Criteo datapipe shares its lengths): allocating and filling
    a fresh one per batch cost more than the KJT's ids."""
    t = _ONES.get(n)
    if t is None:
        if len(_ONES) > 64:
            _ONES.clear()
        t = _ONES[n] = torch.ones(n, dtype=torch.int32)
    return t


def _tensor(torch, a: np.ndarray, dtype: type):
    """``a`` as a tensor of ``dtype``, sharing memory when it is already a writable contiguous
    array of that type (parsed rows are fresh arrays), copying otherwise (e.g. a memory map)."""
    a = np.ascontiguousarray(a, dtype=dtype)
    if not a.flags.writeable:
        a = a.copy()
    return torch.from_numpy(a)


def make_batch(dense: np.ndarray, ids: np.ndarray, labels: np.ndarray, keys: list[str]) -> Batch:
    """Build a ``Batch`` from single-valued sparse ids (B x F int array, one id per feature)."""
    b, f = ids.shape
    rows = Rows(
        np.asarray(labels, dtype=np.float32),
        np.asarray(dense, dtype=np.float32).reshape(b, -1),
        np.asarray(ids, dtype=np.int64).T,
    )
    return rows.to_batch(keys)


def slice_batch(batch: Batch, start: int, end: int) -> Batch:
    """Samples ``[start, end)`` of a batch (any pooling factor: the KJT is cut per feature)."""
    import torch
    from torchrec.datasets.utils import Batch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    kjt = batch.sparse_features
    b = kjt.stride()
    keys = kjt.keys()
    lengths = kjt.lengths().view(len(keys), b)
    offsets = kjt.offsets()
    values = [kjt.values()[offsets[f * b + start] : offsets[f * b + end]] for f in range(len(keys))]
    sub = KeyedJaggedTensor(
        keys=keys,
        values=torch.cat(values) if values else kjt.values()[:0],
        lengths=lengths[:, start:end].reshape(-1),
        stride=end - start,
    )
    return Batch(
        dense_features=batch.dense_features[start:end],
        sparse_features=sub,
        labels=batch.labels[start:end],
    )


def shard_rows(batches: Iterator[Batch], rank: int, world_size: int) -> Iterator[Batch]:
    """Split each global batch into ``world_size`` equal per-rank slices; keep this rank's.

    Legacy: every rank still parses the whole global batch. The sources' own
    ``batches(split, global_batch_size, rank=, world_size=)`` parse only this rank's rows and
    give the same slices; this stays for callers that shard batches they built themselves.
    """
    for batch in batches:
        per = int(batch.labels.numel()) // world_size
        if per == 0:
            continue
        if world_size == 1:
            yield batch
        else:
            yield slice_batch(batch, rank * per, (rank + 1) * per)
