"""Single-device models (plain math; nothing here imports ``dmtrec.parallel``).

``build_model`` makes the flat model (``towers=None``) or the multi-tower DMT reference.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from dmtrec.data.base import FeatureSpec
from dmtrec.errors import ConfigError
from dmtrec.models.common import FlatModel, make_ebc
from dmtrec.models.dcn import DCNHead
from dmtrec.models.dlrm import INTERACTIONS, DLRMHead
from dmtrec.models.dmt import MultiTower
from dmtrec.models.fwfm import FwFMHead
from dmtrec.models.wukong import WukongHead
from dmtrec.options import option

MODELS = ("dlrm", "dcn", "fwfm", "wukong")


@dataclass
class ModelConfig:
    """Architecture options shared by the CLI, the trainer and the distributed wrappers."""

    model: str = option("dlrm", "model family", choices=MODELS)
    embedding_dim: int = option(16, "embedding dimension D of every table", minimum=1)
    bottom: list[int] = option(
        factory=lambda: [64, 32], help="bottom (dense-feature) MLP sizes, comma-separated"
    )
    top: list[int] = option(
        factory=lambda: [64, 32], help="top MLP sizes before the logit, comma-separated"
    )
    interaction: str = option("dot", "dlrm: feature interaction", choices=INTERACTIONS)
    dropout: float = option(0.0, "dropout after every hidden MLP layer", minimum=0, maximum=0.99)
    batch_norm: bool = option(False, "batch norm after every hidden MLP layer")
    embedding_l2: float = option(
        0.0, "L2 penalty on the embedding rows each batch looks up (lam/2 mean ||e||^2)", minimum=0
    )
    cross_layers: int = option(3, "dcn: cross layers", minimum=1)
    cross_rank: int = option(16, "dcn: rank of the low-rank cross layers", minimum=1)
    towers: list[list[str]] | None = option(None, "towers (set from --towers)", cli=False)
    num_towers: int = option(0, "K towers (set from --towers)", cli=False)
    partition: str = option(
        "sequential",
        "how --towers K groups the features",
        choices=("sequential", "random", "planted", "learned"),
    )
    tm: str = option("identity", "tower module", choices=("identity", "dlrm", "dcn", "wukong"))
    cr: int = option(
        1, "tower compression ratio: a tower of m features sends ceil(m/CR)", minimum=1
    )
    wukong_layers: int = option(2, "wukong: stacked layers l", minimum=1)
    wukong_nf: int = option(8, "wukong: FM-block outputs nF", minimum=1)
    wukong_nl: int = option(8, "wukong: linear-compression outputs nL", minimum=0)
    wukong_rank: int = option(8, "wukong: optimized-FM rank k", minimum=1)
    wukong_fmb_hidden: list[int] = option(
        factory=lambda: [64], help="wukong: hidden sizes of the FM block's MLP"
    )

    def validate(self) -> None:
        if self.model not in MODELS:
            raise ConfigError(
                f"--model: unknown model {self.model!r}; choose from {', '.join(MODELS)}"
            )
        if self.embedding_dim < 1:
            raise ConfigError("--embedding-dim must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not self.embedding_l2 >= 0:
            raise ConfigError(f"--embedding-l2 must be >= 0, got {self.embedding_l2}")
        if self.interaction not in INTERACTIONS:
            raise ConfigError(
                f"--interaction: unknown {self.interaction!r}; choose from {', '.join(INTERACTIONS)}"
            )


def make_head(cfg: ModelConfig, spec: FeatureSpec, num_sparse: int) -> nn.Module:
    """The global (dense) part for ``num_sparse`` D-dim inputs."""
    reg = dict(dropout=cfg.dropout, batch_norm=cfg.batch_norm)
    if cfg.model == "dlrm":
        return DLRMHead(
            len(spec.dense),
            num_sparse,
            cfg.embedding_dim,
            cfg.bottom,
            cfg.top,
            interaction=cfg.interaction,
            **reg,
        )
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
            fmb_hidden=cfg.wukong_fmb_hidden,
            top=cfg.top,
            bottom=cfg.bottom,
            **reg,
        )
    return DCNHead(
        len(spec.dense),
        num_sparse,
        cfg.embedding_dim,
        cfg.bottom,
        cfg.top,
        cfg.cross_layers,
        cfg.cross_rank,
        **reg,
    )


def build_model(cfg: ModelConfig, spec: FeatureSpec, table_device: str = "cpu") -> nn.Module:
    """Flat model when ``cfg.towers`` is None, else the multi-tower model (DMT reference).

    ``table_device="meta"`` declares the embedding tables without allocating them: the
    distributed build (``parallel/build.py``) materialises only each rank's shards.
    """
    cfg.validate()
    ebc = make_ebc(
        spec.table_sizes, cfg.embedding_dim, spec.sparse, device=table_device, pooling=spec.pooling
    )
    if cfg.towers is None:
        head = make_head(cfg, spec, len(spec.sparse))
        return FlatModel(ebc, head, spec.sparse, cfg.embedding_l2)
    return MultiTower(
        spec,
        ebc,
        cfg.towers,
        cfg.tm,
        cfg.cr,
        cfg.embedding_dim,
        lambda n: make_head(cfg, spec, n),
        cfg.embedding_l2,
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
