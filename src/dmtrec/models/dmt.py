"""The Disaggregated Multi-Tower model, single-process reference (plain math, no groups).

Sparse features are partitioned into K towers. Tower k's pooled embeddings (B x m_k x D) go
through its tower module TM_k to ceil(m_k/CR) virtual features (beyond CR = m_k: one narrower
feature, zero-padded to D, see ``tower_modules``); the virtual features of all towers,
concatenated in tower order, are the sparse input of the global head (DLRM or DCN interaction
+ top MLP). With identity TMs this *is* the flat model with its features listed in tower order:
SPTT changes where things are computed, not what.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dmtrec.data.base import FeatureSpec
from dmtrec.errors import ConfigError
from dmtrec.models.common import embedding_l2, stack_pooled
from dmtrec.models.tower_modules import make_tower_module, widen

# Leaf calls for FX (TorchRec's train pipeline traces this forward to find the sharded EBC):
# widen branches on a shape.
torch.fx.wrap("widen")


def check_towers(towers: list[list[str]], features: list[str]) -> None:
    """A partition must use every feature exactly once and name no unknown feature."""
    if not towers or any(len(t) == 0 for t in towers):
        raise ConfigError("--towers: every tower needs at least one feature")
    if len(towers) > len(features):
        raise ConfigError(
            f"--towers {len(towers)} exceeds the number of sparse features ({len(features)})"
        )
    seen: list[str] = [f for t in towers for f in t]
    unknown = sorted(set(seen) - set(features))
    if unknown:
        raise ConfigError(f"--towers names unknown feature(s): {', '.join(unknown)}")
    dupes = sorted({f for f in seen if seen.count(f) > 1})
    if dupes:
        raise ConfigError(f"--towers puts feature(s) in more than one tower: {', '.join(dupes)}")
    missing = [f for f in features if f not in set(seen)]
    if missing:
        raise ConfigError(f"--towers leaves feature(s) in no tower: {', '.join(missing)}")


class MultiTower(nn.Module):
    """EBC -> per-tower TM -> concatenated virtual features -> global head."""

    def __init__(
        self,
        spec: FeatureSpec,
        ebc: EmbeddingBagCollection,
        towers: list[list[str]],
        tm: str,
        cr: int,
        embedding_dim: int,
        make_head,  # (num_virtual_features) -> head module
        embedding_l2: float = 0.0,
    ) -> None:
        super().__init__()
        check_towers(towers, spec.sparse)
        self.embedding_l2 = embedding_l2
        self.towers = [list(t) for t in towers]
        self.ebc = ebc
        self.embedding_dim = embedding_dim
        self.tower_modules = nn.ModuleList(
            [make_tower_module(tm, len(t), embedding_dim, cr) for t in self.towers]
        )
        self.num_virtual = sum(m.num_outputs for m in self.tower_modules)
        self.head = make_head(self.num_virtual)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.ebc(sparse)  # a sharded EBC too (DMP): no embedding_bag_configs()
        dim = self.embedding_dim
        virtual = [
            widen(tm(embedding_l2(stack_pooled(pooled, feats), self.embedding_l2)), dim)
            for tm, feats in zip(self.tower_modules, self.towers)
        ]
        return self.head(dense, torch.cat(virtual, dim=1))
