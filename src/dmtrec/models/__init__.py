"""Single-device models (plain math; nothing here imports ``dmtrec.parallel``).

``build_model`` makes the flat model (``towers=None``) or the multi-tower DMT reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from dmtrec.data.base import FeatureSpec
from dmtrec.errors import ConfigError
from dmtrec.models.common import FlatModel, make_ebc
from dmtrec.models.dcn import DCNHead
from dmtrec.models.dlrm import DLRMHead
from dmtrec.models.dmt import MultiTower
from dmtrec.models.fwfm import FwFMHead
from dmtrec.models.wukong import WukongHead

MODELS = ("dlrm", "dcn", "fwfm", "wukong")


@dataclass
class ModelConfig:
    """Architecture options shared by the CLI, the trainer and the distributed wrappers."""

    model: str = "dlrm"
    embedding_dim: int = 16
    bottom: list[int] = field(default_factory=lambda: [64, 32])
    top: list[int] = field(default_factory=lambda: [64, 32])
    cross_layers: int = 3
    cross_rank: int = 16
    towers: list[list[str]] | None = None  # None: the flat model (unless num_towers > 0)
    num_towers: int = 0  # with ``partition``: computed from the data's features
    partition: str = "sequential"
    tm: str = "identity"
    cr: int = 1
    wukong_layers: int = 2
    wukong_nf: int = 8
    wukong_nl: int = 8
    wukong_rank: int = 8

    def validate(self) -> None:
        if self.model not in MODELS:
            raise ConfigError(
                f"--model: unknown model {self.model!r}; choose from {', '.join(MODELS)}"
            )
        if self.embedding_dim < 1:
            raise ConfigError("--embedding-dim must be >= 1")


def make_head(cfg: ModelConfig, spec: FeatureSpec, num_sparse: int) -> nn.Module:
    """The global (dense) part for ``num_sparse`` D-dim inputs."""
    if cfg.model == "dlrm":
        return DLRMHead(len(spec.dense), num_sparse, cfg.embedding_dim, cfg.bottom, cfg.top)
    if cfg.model == "fwfm":
        return FwFMHead(len(spec.dense), num_sparse, cfg.embedding_dim)
    if cfg.model == "wukong":
        return WukongHead(
            len(spec.dense),
            num_sparse,
            cfg.embedding_dim,
            num_layers=cfg.wukong_layers,
            nF=cfg.wukong_nf,
            nL=cfg.wukong_nl,
            rank=cfg.wukong_rank,
            top=cfg.top,
            bottom=cfg.bottom,
        )
    return DCNHead(
        len(spec.dense),
        num_sparse,
        cfg.embedding_dim,
        cfg.bottom,
        cfg.top,
        cfg.cross_layers,
        cfg.cross_rank,
    )


def build_model(cfg: ModelConfig, spec: FeatureSpec, device: str = "cpu") -> nn.Module:
    """Flat model when ``cfg.towers`` is None, else the multi-tower model (DMT reference)."""
    cfg.validate()
    ebc = make_ebc(spec.table_sizes, cfg.embedding_dim, spec.sparse, device=device)
    if cfg.towers is None:
        return FlatModel(ebc, make_head(cfg, spec, len(spec.sparse)), spec.sparse)
    return MultiTower(
        spec,
        ebc,
        cfg.towers,
        cfg.tm,
        cfg.cr,
        cfg.embedding_dim,
        lambda n: make_head(cfg, spec, n),
    )


__all__ = [
    "MODELS",
    "DCNHead",
    "DLRMHead",
    "FlatModel",
    "FwFMHead",
    "ModelConfig",
    "MultiTower",
    "build_model",
]
