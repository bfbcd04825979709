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

    def __init__(
        self,
        ebc: EmbeddingBagCollection,
        head: nn.Module,
        features: list[str],
        embedding_l2: float = 0.0,
    ) -> None:
        super().__init__()
        self.ebc = ebc
        self.head = head
        self.features = list(features)
        self.embedding_l2 = embedding_l2

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        pooled = stack_pooled(self.ebc(sparse), self.features)
        return self.head(dense, embedding_l2(pooled, self.embedding_l2))


class _LookupL2(torch.autograd.Function):
    """Identity forward; backward adds the gradient of an L2 penalty on the looked-up rows.

    For pooled embeddings ``x`` (S x ... , S samples) it adds ``lam * x / S`` to the incoming
    gradient, i.e. the gradient of ``lam / 2 * mean_s sum ||x_s||^2``. Placed right after the
    lookup, the penalty reaches exactly the rows the batch touched (as FuxiCTR's/DeepCTR's
    embedding regulariser on the batch's rows), and it runs inside every optimizer, fused TBE
    ones included, that only ever see gradients. Dividing by the samples of *this* tensor
    makes it the same objective on every parallel mode: TorchRec and DDP then average over
    ranks as they do for the loss (SPTT's host tensors hold H*B samples and its gradients are
    divided by L: lam / (H*B) / L = lam / (N*B)).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        return g + ctx.lam / max(x.shape[0], 1) * x, None


def embedding_l2(x: torch.Tensor, lam: float) -> torch.Tensor:
    """``x`` with the L2 penalty ``lam`` on its rows attached to its gradient (see above)."""
    return _LookupL2.apply(x, lam) if lam > 0 else x


def mlp(
    in_dim: int,
    sizes: list[int],
    *,
    dropout: float = 0.0,
    batch_norm: bool = False,
    last_activation: bool = True,
) -> nn.Sequential:
    """Linear [-> BatchNorm] -> ReLU [-> Dropout] per size; the last layer stays linear when
    ``last_activation`` is False (a logit or a projection)."""
    layers: list[nn.Module] = []
    for i, out in enumerate(sizes):
        layers.append(nn.Linear(in_dim, out))
        if i < len(sizes) - 1 or last_activation:
            if batch_norm:
                layers.append(nn.BatchNorm1d(out))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        in_dim = out
    return nn.Sequential(*layers)


class LearnedConstant(nn.Module):
    """The dense slot of a model without dense features: one learned D-vector per sample.

    A bottom MLP of zero inputs computes a constant (its biases through the layers), so this
    is the same function class without zero-element weights (and their init warning)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.empty(dim).uniform_(-(dim**-0.5), dim**-0.5))

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        return self.value.expand(dense.shape[0], -1)


def dense_arch(num_dense: int, sizes: list[int], dropout: float, batch_norm: bool) -> nn.Module:
    """Bottom MLP: TorchRec's ``DenseArch`` as is, or ``mlp`` when regularised (dropout/BN);
    a ``LearnedConstant`` of the output size when the data have no dense features."""
    from torchrec.models.dlrm import DenseArch

    if num_dense == 0:
        return LearnedConstant(sizes[-1])
    if dropout == 0 and not batch_norm:
        return DenseArch(num_dense, sizes)
    return mlp(num_dense, sizes, dropout=dropout, batch_norm=batch_norm)


def over_arch(in_dim: int, sizes: list[int], dropout: float, batch_norm: bool) -> nn.Module:
    """Top MLP ending in the logit: TorchRec's ``OverArch``, or ``mlp`` when regularised."""
    from torchrec.models.dlrm import OverArch

    if dropout == 0 and not batch_norm:
        return OverArch(in_dim, sizes)
    return mlp(in_dim, sizes, dropout=dropout, batch_norm=batch_norm, last_activation=False)
