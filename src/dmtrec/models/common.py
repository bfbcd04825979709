"""Pieces every model shares: the embedding tables and turning pooled lookups into B x F x D."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor


def table_name(feature: str) -> str:
    """One table per sparse feature, named after it (TorchRec's usual ``t_<feature>``)."""
    return f"t_{feature}"


def make_ebc(
    table_sizes: dict[str, int],
    embedding_dim: int,
    features: list[str] | None = None,
    device: torch.device | str = "cpu",
    pooling: str = "sum",
) -> EmbeddingBagCollection:
    """An ``EmbeddingBagCollection`` with one table per sparse feature, each bag of ids
    pooled by ``pooling`` (``sum`` or ``mean``: the data's ``spec.pooling``; the same for a
    one-id bag).

    ``features`` picks (and orders) a subset, e.g. the features of one tower or one host.
    """
    mode = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}[pooling]
    sizes = table_sizes
    names = list(table_sizes) if features is None else features
    tables = [
        EmbeddingBagConfig(
            name=table_name(f),
            embedding_dim=embedding_dim,
            num_embeddings=sizes[f],
            feature_names=[f],
            pooling=mode,
        )
        for f in names
    ]
    return EmbeddingBagCollection(tables=tables, device=torch.device(device))


def table_sizes(ebc: EmbeddingBagCollection) -> dict[str, int]:
    """Feature -> rows of its table, in the EBC's order."""
    return {c.feature_names[0]: c.num_embeddings for c in ebc.embedding_bag_configs()}


def ebc_pooling(ebc: EmbeddingBagCollection) -> str:
    """The pooling (``sum``/``mean``) of an EBC made by ``make_ebc``, to make another alike."""
    modes = {c.pooling for c in ebc.embedding_bag_configs()}
    assert len(modes) == 1, modes
    return {PoolingType.SUM: "sum", PoolingType.MEAN: "mean"}[modes.pop()]


def table_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """``<table>.weight`` -> full table, from an unsharded model's state dict."""
    return {
        ".".join(k.split(".")[-2:]): v
        for k, v in model.state_dict().items()
        if k.endswith(".weight") and ".embedding_bags." in k
    }


def stack_pooled(pooled: KeyedTensor, features: list[str]) -> torch.Tensor:
    """B x len(features) x D from a pooled ``KeyedTensor`` (every feature has the same D)."""
    d = pooled.to_dict()
    return torch.stack([d[f] for f in features], dim=1)


class FlatModel(nn.Module):
    """The flat (single-tower) model: pooled embeddings of ``features`` in that order -> head.

    ``head`` maps (dense B x n_dense, embeddings B x F x D) to logits (B); ``DLRMHead`` and
    ``DCNHead`` are the two. The feature order only permutes the head's interaction inputs.
    """

    def __init__(self, ebc: EmbeddingBagCollection, head: nn.Module, features: list[str]) -> None:
        super().__init__()
        self.ebc = ebc
        self.head = head
        self.features = list(features)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        return self.head(dense, stack_pooled(self.ebc(sparse), self.features))
