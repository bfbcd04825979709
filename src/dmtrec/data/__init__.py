"""Data sources: synthetic (built in), Criteo TSV, column-spec CSV/Parquet.

Each source has ``spec`` (a ``FeatureSpec``), ``stats`` (per-split ``DataStats``) and
``batches(split, batch_size)`` yielding TorchRec ``Batch`` es. ``load_data`` builds one from a
picklable ``DataConfig`` so every distributed worker can open the same data itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dmtrec.data.base import SPLITS, DataStats, FeatureSpec, shard_rows, slice_batch
from dmtrec.errors import ConfigError

DATA_KINDS = ("synthetic", "criteo", "csv", "parquet")


@dataclass
class DataConfig:
    """Which data to read and how; mirrors the CLI's data options."""

    kind: str = "synthetic"
    train: list[str] = field(default_factory=list)
    valid: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    label: str | None = None
    dense: list[str] = field(default_factory=list)
    sparse: list[str] = field(default_factory=list)
    table_size: int = 100_000  # criteo hashing size
    min_count: int = 1
    max_bad_rows: int = 100
    synthetic: dict[str, Any] = field(default_factory=dict)  # SyntheticConfig fields


def load_data(cfg: DataConfig):
    """Open the data source ``cfg`` describes; errors name the offending option."""
    if cfg.kind == "synthetic":
        from dmtrec.data.synthetic import SyntheticConfig, SyntheticData

        return SyntheticData(SyntheticConfig(**cfg.synthetic))
    if cfg.kind not in DATA_KINDS:
        raise ConfigError(f"--data: unknown kind {cfg.kind!r}; choose from {', '.join(DATA_KINDS)}")
    if not cfg.train:
        raise ConfigError(f"--data {cfg.kind} needs --train PATH")
    paths = {s: getattr(cfg, s) for s in SPLITS if getattr(cfg, s)}
    if cfg.kind == "criteo":
        from dmtrec.data.criteo import CriteoTSV

        return CriteoTSV(paths, table_size=cfg.table_size, max_bad_rows=cfg.max_bad_rows)
    from dmtrec.data.columns import ColumnTable

    if not cfg.label or not cfg.sparse:
        raise ConfigError(f"--data {cfg.kind} needs --label and --sparse (and usually --dense)")
    return ColumnTable(
        {s: p[0] for s, p in paths.items()},
        label=cfg.label,
        dense=cfg.dense,
        sparse=cfg.sparse,
        fmt=cfg.kind,
        min_count=cfg.min_count,
        max_bad_rows=cfg.max_bad_rows,
    )


__all__ = [
    "DATA_KINDS",
    "SPLITS",
    "DataConfig",
    "DataStats",
    "FeatureSpec",
    "load_data",
    "shard_rows",
    "slice_batch",
]
