"""DLRM (Naumov et al., 2019): bottom MLP, pairwise dot interaction, top MLP.

Built from TorchRec's own arches (``torchrec.models.dlrm``): ``DenseArch`` (bottom MLP),
``InteractionArch`` (dot products of the dense vector and every pooled embedding, upper
triangle) and ``OverArch`` (top MLP); with dropout or batch norm the MLPs are
``models.common.mlp``. ``interaction="cat"`` concatenates the bottom output and the
embeddings instead of taking dot products (FuxiCTR's DLRM ``interaction_op: cat``). ``DLRMHead`` is everything above the embedding lookup, so
the multi-tower model (``dmt.py``) and the distributed SPTT path reuse it unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.models.dlrm import InteractionArch

from dmtrec.models.common import dense_arch, over_arch

INTERACTIONS = ("dot", "cat")


class CatInteraction(nn.Module):
    """[bottom output; e_1; ...; e_F] flattened (no products: the top MLP learns them)."""

    def forward(self, dense: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        return torch.cat([dense, embeddings.flatten(1)], dim=1)


class DLRMHead(nn.Module):
    """Dense part of DLRM: (dense B x n_dense, embeddings B x F x D) -> logits B."""

    def __init__(
        self,
        num_dense: int,
        num_sparse: int,
        embedding_dim: int,
        bottom: list[int],
        top: list[int],
        interaction: str = "dot",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.dense_arch = dense_arch(num_dense, [*bottom, embedding_dim], dropout, batch_norm)
        if interaction == "dot":
            self.inter_arch: nn.Module = InteractionArch(num_sparse)
            num_inter = embedding_dim + num_sparse + num_sparse * (num_sparse - 1) // 2
        else:
            self.inter_arch = CatInteraction()
            num_inter = embedding_dim * (num_sparse + 1)
        self.over_arch = over_arch(num_inter, [*top, 1], dropout, batch_norm)

    def forward(self, dense: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        x = self.dense_arch(dense)
        x = self.inter_arch(x, embeddings)
        return self.over_arch(x).squeeze(-1)
