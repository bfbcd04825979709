"""Field-weighted factorization machine (FwFM, Pan et al., WWW 2018) head.

logit = b + w . dense + sum_f <v_f, e_f> + sum_{i<j} r_ij <e_i, e_j>

One learned weight r_ij per *field pair*: after training, |r_ij| * E|<e_i, e_j>| says how
much the model relies on features i and j together -- an interpretable interaction matrix,
which is why the tower partitioner uses FwFM as its probe model. No MLP, so nothing outside
the pair terms can make two fields interact.
"""

from __future__ import annotations

import torch
from torch import nn


class FwFMHead(nn.Module):
    """(dense B x n_dense, embeddings B x F x D) -> logits B."""

    def __init__(self, num_dense: int, num_sparse: int, embedding_dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(num_dense, 1)
        self.field = nn.Parameter(torch.randn(num_sparse, embedding_dim) * 0.01)
        self.register_buffer(
            "triu", torch.triu_indices(num_sparse, num_sparse, offset=1), persistent=False
        )
        self.pair = nn.Parameter(torch.full((self.triu.shape[1],), 0.1))

    def pair_dots(self, embeddings: torch.Tensor) -> torch.Tensor:
        """<e_i, e_j> for i < j (B x F(F-1)/2), in ``triu`` order."""
        dots = torch.bmm(embeddings, embeddings.transpose(1, 2))
        return dots[:, self.triu[0], self.triu[1]]

    def forward(self, dense: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        linear = self.dense(dense).squeeze(-1) + (embeddings * self.field).sum((1, 2))
        return linear + self.pair_dots(embeddings) @ self.pair
