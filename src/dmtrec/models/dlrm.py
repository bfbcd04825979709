"""DLRM (Naumov et al., 2019): bottom MLP, pairwise dot interaction, top MLP.

Built from TorchRec's own arches (``torchrec.models.dlrm``): ``DenseArch`` (bottom MLP),
``InteractionArch`` (dot products of the dense vector and every pooled embedding, upper
triangle) and ``OverArch`` (top MLP). ``DLRMHead`` is everything above the embedding lookup, so
the multi-tower model (``dmt.py``) and the distributed SPTT path reuse it unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.models.dlrm import DenseArch, InteractionArch, OverArch


class DLRMHead(nn.Module):
    """Dense part of DLRM: (dense B x n_dense, embeddings B x F x D) -> logits B."""

    def __init__(
        self, num_dense: int, num_sparse: int, embedding_dim: int, bottom: list[int], top: list[int]
    ) -> None:
        super().__init__()
        self.dense_arch = DenseArch(num_dense, [*bottom, embedding_dim])
        self.inter_arch = InteractionArch(num_sparse)
        num_inter = embedding_dim + num_sparse + num_sparse * (num_sparse - 1) // 2
        self.over_arch = OverArch(num_inter, [*top, 1])

    def forward(self, dense: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        x = self.dense_arch(dense)
        x = self.inter_arch(x, embeddings)
        return self.over_arch(x).squeeze(-1)
