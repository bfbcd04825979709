"""What every data source provides: a feature spec and batches of TorchRec ``Batch``.

A ``Batch`` (``torchrec.datasets.utils.Batch``) holds ``dense_features`` (B x n_dense float),
``sparse_features`` (a ``KeyedJaggedTensor`` with one key per sparse feature, in spec order) and
``labels`` (B float). Sparse ids are already mapped into ``[0, num_embeddings)`` of their table.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

SPLITS = ("train", "valid", "test")


@dataclass
class FeatureSpec:
    """Names of the dense and sparse features and the table size of each sparse feature."""

    dense: list[str]
    sparse: list[str]
    num_embeddings: list[int]
    # Planted interaction group of each sparse feature (synthetic data only), else None.
    groups: list[int] | None = None

    def __post_init__(self) -> None:
        assert len(self.sparse) == len(self.num_embeddings)

    @property
    def table_sizes(self) -> dict[str, int]:
        return dict(zip(self.sparse, self.num_embeddings))


@dataclass
class DataStats:
    """Counters a reader fills while streaming: rows read, rows skipped (bad), and why."""

    rows: int = 0
    skipped: int = 0
    messages: list[str] = field(default_factory=list)


def make_batch(dense: np.ndarray, ids: np.ndarray, labels: np.ndarray, keys: list[str]) -> Batch:
    """Build a ``Batch`` from single-valued sparse ids (B x F int array, one id per feature).

    The KJT layout is feature-major: all B ids of feature 0, then feature 1, ...
    """
    b, f = ids.shape
    values = torch.from_numpy(np.ascontiguousarray(ids.T).reshape(-1).astype(np.int64))
    lengths = torch.ones(b * f, dtype=torch.int32)
    kjt = KeyedJaggedTensor(keys=list(keys), values=values, lengths=lengths, stride=b)
    return Batch(
        dense_features=torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)),
        sparse_features=kjt,
        labels=torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32)),
    )


def shard_batches(batches: Iterator[Batch], rank: int, world_size: int) -> Iterator[Batch]:
    """Round-robin batches over ranks, dropping a trailing group so every rank gets as many.

    Distributed steps are collective: every rank must run the same number of them.
    """
    group: list[Batch] = []
    for batch in batches:
        group.append(batch)
        if len(group) == world_size:
            # A step needs one batch size on every rank: drop a ragged final group.
            if len({int(b.labels.numel()) for b in group}) == 1:
                yield group[rank]
            group = []


def slice_batch(batch: Batch, start: int, end: int) -> Batch:
    """Samples ``[start, end)`` of a batch (any pooling factor: the KJT is cut per feature)."""
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

    Every rank gets the same number of steps with the same batch size (collectives need it);
    at most ``world_size - 1`` rows of a global batch are left out.
    """
    for batch in batches:
        per = int(batch.labels.numel()) // world_size
        if per == 0:
            continue
        if world_size == 1:
            yield batch
        else:
            yield slice_batch(batch, rank * per, (rank + 1) * per)
