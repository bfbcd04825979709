"""Tower modules (TM): per-tower dense nets that compress a tower before it crosses hosts.

A TM maps the tower's m pooled embeddings (B x m x D) to n = ceil(m / CR) "virtual features"
(B x n x D; any CR >= 1 up to m), so the global interaction still sees D-dim vectors while the cross-host exchange
carries CR times fewer bytes. Each non-identity TM adds an interaction order inside the tower
(the hierarchical interaction of DMT: inside towers first, then across them). ``wukong``
(beyond the paper) is one Wukong layer (FM block + linear compression) per tower.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.crossnet import LowRankCrossNet

from dmtrec.errors import ConfigError
from dmtrec.models.wukong import WukongTM

TM_KINDS = ("identity", "dlrm", "dcn", "wukong")


def virtual_features(num_features: int, cr: int) -> int:
    """Outputs of a TM over ``num_features`` at compression ``cr``: ceil(m / CR)."""
    return -(-num_features // cr)


class IdentityTM(nn.Module):
    """SPTT only: the tower's embeddings cross hosts unchanged (CR = 1)."""

    def __init__(self, num_features: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_outputs = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class DotTM(nn.Module):
    """DLRM-style TM: in-tower pairwise dot products plus the embeddings, linearly projected.

    out = reshape(W [flatten(X); triu(X X^T)] + b, n, D).
    """

    def __init__(self, num_features: int, embedding_dim: int, num_outputs: int) -> None:
        super().__init__()
        m, d = num_features, embedding_dim
        self.num_outputs = num_outputs
        self.register_buffer("triu", torch.triu_indices(m, m, offset=1), persistent=False)
        self.proj = nn.Linear(m * d + m * (m - 1) // 2, num_outputs * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, d = x.shape
        dots = torch.bmm(x, x.transpose(1, 2))[:, self.triu[0], self.triu[1]]
        z = torch.cat([x.reshape(b, -1), dots], dim=1)
        return self.proj(z).view(b, self.num_outputs, d)


class CrossTM(nn.Module):
    """DCN-style TM: low-rank cross layers over the tower's concatenated embeddings, then a
    low-rank projection (D*m -> rank -> D*n)."""

    def __init__(
        self,
        num_features: int,
        embedding_dim: int,
        num_outputs: int,
        cross_layers: int = 1,
        rank: int | None = None,
    ) -> None:
        super().__init__()
        width = num_features * embedding_dim
        rank = rank or max(1, min(width, num_outputs * embedding_dim) // 2)
        self.num_outputs = num_outputs
        self.cross = LowRankCrossNet(width, cross_layers, rank)
        self.down = nn.Linear(width, rank, bias=False)
        self.up = nn.Linear(rank, num_outputs * embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, d = x.shape
        z = self.cross(x.reshape(b, -1))
        return self.up(self.down(z)).view(b, self.num_outputs, d)


def make_tower_module(kind: str, num_features: int, embedding_dim: int, cr: int) -> nn.Module:
    """Build a TM; errors name the option that is wrong (``--tm``, ``--cr``)."""
    if kind not in TM_KINDS:
        raise ConfigError(f"--tm: unknown tower module {kind!r}; choose from {', '.join(TM_KINDS)}")
    if cr < 1:
        raise ConfigError(f"--cr must be >= 1, not {cr}")
    if kind == "identity":
        if cr != 1:
            raise ConfigError(
                f"--cr {cr}: the identity tower module does not compress (use --cr 1)"
            )
        return IdentityTM(num_features, embedding_dim)
    if cr > num_features:
        raise ConfigError(
            f"--cr {cr} is larger than a tower of {num_features} features: a tower of m features "
            f"yields ceil(m/CR) >= 1 virtual features, so CR <= m"
        )
    n = virtual_features(num_features, cr)
    if kind == "dlrm":
        return DotTM(num_features, embedding_dim, n)
    if kind == "wukong":
        return WukongTM(num_features, embedding_dim, n)
    return CrossTM(num_features, embedding_dim, n)
