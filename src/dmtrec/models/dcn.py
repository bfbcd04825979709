"""DCNv2 (Wang et al., 2021) on DLRM's layout: bottom MLP, low-rank cross network, top MLP.

x_{l+1} = x_0 * (U_l V_l^T x_l + b_l) + x_l over x_0 = concat(bottom(dense), e_1..e_F), from
TorchRec's ``LowRankCrossNet`` inside its ``InteractionDCNArch`` (as ``DLRM_DCN`` does).
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.models.dlrm import InteractionDCNArch
from torchrec.modules.crossnet import LowRankCrossNet

from dmtrec.models.common import dense_arch, over_arch


class DCNHead(nn.Module):
    """Dense part of DCNv2: (dense B x n_dense, embeddings B x F x D) -> logits B."""

    def __init__(
        self,
        num_dense: int,
        num_sparse: int,
        embedding_dim: int,
        bottom: list[int],
        top: list[int],
        cross_layers: int = 3,
        cross_rank: int = 16,
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        width = (num_sparse + 1) * embedding_dim
        self.dense_arch = dense_arch(num_dense, [*bottom, embedding_dim], dropout, batch_norm)
        self.inter_arch = InteractionDCNArch(
            num_sparse, LowRankCrossNet(width, cross_layers, min(cross_rank, width))
        )
        self.over_arch = over_arch(width, [*top, 1], dropout, batch_norm)

    def forward(self, dense: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        x = self.dense_arch(dense)
        x = self.inter_arch(x, embeddings)
        return self.over_arch(x).squeeze(-1)
