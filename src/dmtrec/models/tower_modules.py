"""Tower modules (TM): per-tower dense nets that compress a tower before it crosses hosts.

A TM maps the tower's m pooled embeddings (B x m x D) to n = ceil(m / CR) "virtual features"
(B x n x D) for any 1 <= CR <= m, so the global interaction still sees D-dim vectors while the
cross-host exchange carries ~CR times fewer bytes. Beyond the tower's width (m < CR <= m*D) the
TM's output width itself shrinks: one virtual feature of w = ceil(m*D / CR) numbers crosses the
hosts (B x 1 x w) and is zero-padded to D on the sample's home rank (``widen``), i.e. it meets
the other features in a learned w-dim subspace. ``width`` is what a TM ships per sample. Each non-identity TM adds an interaction order inside the tower
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
    """Virtual features of a TM over ``num_features`` at compression ``cr``: ceil(m / CR)
    (1 beyond the tower's width)."""
    return -(-num_features // min(cr, num_features))


def output_width(num_features: int, embedding_dim: int, cr: int) -> int:
    """Numbers per sample a TM ships: ceil(m / CR) * D up to CR = m, ceil(m * D / CR) beyond."""
    if cr <= num_features:
        return virtual_features(num_features, cr) * embedding_dim
    return -(-num_features * embedding_dim // cr)


def widen(out: torch.Tensor, embedding_dim: int) -> torch.Tensor:
    """A TM's output (B x n x w, w <= D) as B x n x D virtual features: zero-padded if narrow."""
    pad = embedding_dim - out.shape[-1]
    return out if pad == 0 else nn.functional.pad(out, (0, pad))


class IdentityTM(nn.Module):
    """SPTT only: the tower's embeddings cross hosts unchanged (CR = 1)."""

    def __init__(self, num_features: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_outputs = num_features
        self.width = num_features * embedding_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class DotTM(nn.Module):
    """DLRM-style TM: in-tower pairwise dot products plus the embeddings, linearly projected.

    out = reshape(W [flatten(X); triu(X X^T)] + b, n, width / n); width = n * D unless narrow.
    """

    def __init__(
        self, num_features: int, embedding_dim: int, num_outputs: int, width: int | None = None
    ) -> None:
        super().__init__()
        m, d = num_features, embedding_dim
        self.num_outputs = num_outputs
        self.width = width or num_outputs * d
        self.register_buffer("triu", torch.triu_indices(m, m, offset=1), persistent=False)
        self.proj = nn.Linear(m * d + m * (m - 1) // 2, self.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        dots = torch.bmm(x, x.transpose(1, 2))[:, self.triu[0], self.triu[1]]
        z = torch.cat([x.reshape(b, -1), dots], dim=1)
        return self.proj(z).view(b, self.num_outputs, -1)


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
        width: int | None = None,
    ) -> None:
        super().__init__()
        inputs = num_features * embedding_dim
        self.num_outputs = num_outputs
        self.width = width or num_outputs * embedding_dim
        rank = rank or max(1, min(inputs, self.width) // 2)
        self.cross = LowRankCrossNet(inputs, cross_layers, rank)
        self.down = nn.Linear(inputs, rank, bias=False)
        self.up = nn.Linear(rank, self.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        z = self.cross(x.reshape(b, -1))
        return self.up(self.down(z)).view(b, self.num_outputs, -1)


class NarrowTM(nn.Module):
    """A one-output TM followed by a linear map D -> w: the narrow output of CR > m for TMs
    without a native output width (Wukong's layer is residual in D)."""

    def __init__(self, inner: nn.Module, embedding_dim: int, width: int) -> None:
        super().__init__()
        self.inner = inner
        self.num_outputs = 1
        self.width = width
        self.narrow = nn.Linear(embedding_dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.narrow(self.inner(x))


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
    if cr > num_features * embedding_dim:
        raise ConfigError(
            f"--cr {cr} is larger than a tower of {num_features} features x {embedding_dim} "
            f"dims ({num_features * embedding_dim} numbers per sample): CR <= m * D"
        )
    n = virtual_features(num_features, cr)
    width = output_width(num_features, embedding_dim, cr)
    if kind == "dlrm":
        return DotTM(num_features, embedding_dim, n, width)
    if kind == "wukong":
        tm = WukongTM(num_features, embedding_dim, n)
        return tm if width == n * embedding_dim else NarrowTM(tm, embedding_dim, width)
    return CrossTM(num_features, embedding_dim, n, width=width)
