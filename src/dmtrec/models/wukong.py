"""Wukong (Zhang et al., ICML 2024, arXiv 2403.02545): stacked factorization machines.

Each Wukong layer maps n embeddings of dim D (X in R^{n x D}) to nF + nL embeddings:

    X_{i+1} = LN(concat(FMB(X_i), LCB(X_i)) + residual(X_i))

- ``FactorizationMachineBlock`` (FMB): second-order interactions, with the "optimized FM"
  X (X^T Y) (Y in R^{n x k} learned) instead of the full n x n matrix X X^T, then an MLP that
  turns the n*k interaction values back into nF embeddings. Stacking l layers gives
  interaction orders up to 2^l.
- ``LinearCompressBlock`` (LCB): W_L X, a linear recombination of the embeddings that keeps
  the lower orders alive from layer to layer.

``WukongHead`` is everything above the embedding lookup (the same contract as ``DLRMHead``:
``forward(dense B x n_dense, embeddings B x F x D) -> logits B``). ``WukongTM`` is one Wukong
layer used as a tower module (``forward(B x m x D) -> B x num_outputs x D``).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchrec.modules.mlp import MLP

from dmtrec.models.common import dense_arch, over_arch


class FactorizationMachineBlock(nn.Module):
    """FMB(X) = reshape(MLP(LN(flatten(X (X^T Y)))), nF, D).

    X (X^T Y) costs O(n D k) per example, against O(n^2 D) for the full interaction matrix
    X X^T, and still holds every pairwise dot product projected onto k learned directions.
    """

    def __init__(
        self, num_in: int, dim: int, num_out: int, rank: int, mlp_hidden: list[int]
    ) -> None:
        super().__init__()
        self.num_out, self.dim = num_out, dim
        self.y = nn.Parameter(torch.empty(num_in, rank))
        nn.init.xavier_uniform_(self.y)
        self.norm = nn.LayerNorm(num_in * rank)
        # Hidden layers (ReLU after each) from TorchRec, then a plain Linear to nF * D so the
        # output embeddings are not clipped to be non-negative.
        self.mlp: nn.Module = MLP(num_in * rank, mlp_hidden) if mlp_hidden else nn.Identity()
        self.out = nn.Linear(mlp_hidden[-1] if mlp_hidden else num_in * rank, num_out * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        proj = torch.matmul(x.transpose(1, 2), self.y)  # B x D x k: X^T Y
        inter = torch.bmm(x, proj)  # B x n x k: X (X^T Y)
        z = self.mlp(self.norm(inter.reshape(b, -1)))
        return self.out(z).view(b, self.num_out, self.dim)


class LinearCompressBlock(nn.Module):
    """LCB(X) = W_L X, W_L in R^{nL x n}: mixes the embeddings, the same weights for every dim."""

    def __init__(self, num_in: int, num_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_out, num_in))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ln,bnd->bld", self.weight, x)


class WukongLayer(nn.Module):
    """One Wukong layer: (B x num_in x D) -> (B x (nF + nL) x D).

    ``nL = 0`` drops the LCB (a layer with a single output embedding, as in ``WukongTM``).
    The residual is the identity when num_in == nF + nL, else a learned linear projection over
    the embedding axis (num_in -> nF + nL, shared by every dim, like the LCB).
    """

    def __init__(
        self, num_in: int, dim: int, nF: int, nL: int, rank: int, mlp_hidden: list[int]
    ) -> None:
        super().__init__()
        if nF < 1 or nL < 0:
            raise ValueError(f"WukongLayer needs nF >= 1 and nL >= 0, got nF={nF}, nL={nL}")
        self.num_outputs = nF + nL
        self.fmb = FactorizationMachineBlock(num_in, dim, nF, rank, mlp_hidden)
        self.lcb = LinearCompressBlock(num_in, nL) if nL > 0 else None
        self.residual = (
            None if num_in == self.num_outputs else LinearCompressBlock(num_in, self.num_outputs)
        )
        # LayerNorm over D, i.e. per output embedding: each of the nF + nL vectors is
        # normalized on its own, so the dot products the next layer's FMB takes stay on one
        # scale however deep the stack is, the parameter count does not depend on n, and no
        # statistic mixes embeddings (which the FMB/LCB are there to do, with learned weights).
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [self.fmb(x)] if self.lcb is None else [self.fmb(x), self.lcb(x)]
        res = x if self.residual is None else self.residual(x)
        return self.norm(torch.cat(parts, dim=1) + res)


class WukongHead(nn.Module):
    """Wukong above the embedding lookup: (dense B x n_dense, embeddings B x F x D) -> logits B.

    The dense features become one more D-dim embedding (bottom MLP), so the layers see
    n = F + 1 embeddings; ``num_layers`` Wukong layers, then flatten -> top MLP -> logit.
    """

    def __init__(
        self,
        num_dense: int,
        num_sparse: int,
        embedding_dim: int,
        num_layers: int = 2,
        nF: int = 8,
        nL: int = 8,
        rank: int = 8,
        fmb_hidden: list[int] | None = None,
        top: list[int] | None = None,
        bottom: list[int] | None = None,
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        fmb_hidden = [64] if fmb_hidden is None else fmb_hidden
        top = [64, 32] if top is None else top
        bottom = [64, 32] if bottom is None else bottom
        if num_layers < 1:
            raise ValueError("WukongHead needs num_layers >= 1")
        self.dense_arch = dense_arch(num_dense, [*bottom, embedding_dim], dropout, batch_norm)
        n = num_sparse + 1
        layers = []
        for _ in range(num_layers):
            layers.append(WukongLayer(n, embedding_dim, nF, nL, rank, fmb_hidden))
            n = nF + nL
        self.layers = nn.Sequential(*layers)
        self.over_arch = over_arch(n * embedding_dim, [*top, 1], dropout, batch_norm)

    def forward(self, dense: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.dense_arch(dense).unsqueeze(1), embeddings], dim=1)
        x = self.layers(x)
        return self.over_arch(x.flatten(1)).squeeze(-1)


class WukongTM(nn.Module):
    """Tower module: one Wukong layer with nF + nL = num_outputs, (B x m x D) -> (B x n x D).

    nF = ceil(n / 2), nL = the rest (n = 1: the FMB alone). Defaults are cheap on purpose (a
    TM runs per tower before the cross-host exchange): rank 8 and no FMB hidden layer, i.e. LN
    of the interactions then one Linear to nF * D.
    """

    def __init__(
        self,
        num_features: int,
        embedding_dim: int,
        num_outputs: int,
        rank: int | None = None,
        fmb_hidden: list[int] | None = None,
    ) -> None:
        super().__init__()
        if num_outputs < 1:
            raise ValueError("WukongTM needs num_outputs >= 1")
        self.num_outputs = num_outputs
        self.width = num_outputs * embedding_dim
        nF = math.ceil(num_outputs / 2)
        self.layer = WukongLayer(
            num_features,
            embedding_dim,
            nF,
            num_outputs - nF,
            8 if rank is None else rank,
            [] if fmb_hidden is None else fmb_hidden,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)
