"""Data sources: synthetic (built in), Criteo TSV, column-spec CSV/Parquet.

Each source has ``spec`` (a ``FeatureSpec``), ``stats`` (per-split ``DataStats``) and
``batches(split, batch_size)`` yielding TorchRec ``Batch`` es. ``load_data`` builds one from a
picklable ``DataConfig`` so every distributed worker can open the same data itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dmtrec.data.base import SPLITS, DataStats, FeatureSpec, shard_rows, slice_batch
from dmtrec.errors import ConfigError
from dmtrec.options import option

DATA_KINDS = ("synthetic", "criteo", "csv", "parquet")


@dataclass
class DataConfig:
    """Which data to read and how; mirrors the CLI's data options."""

    kind: str = option("synthetic", "data source", flag="data", choices=DATA_KINDS)
    train: list[str] = option(factory=list, help="train file (repeatable)")
    valid: list[str] = option(factory=list, help="validation file (repeatable)")
    test: list[str] = option(factory=list, help="test file (repeatable)")
    label: str | None = option(None, "csv/parquet: label column")
    dense: list[str] = option(factory=list, help="csv/parquet: dense columns a,b,c")
    sparse: list[str] = option(factory=list, help="csv/parquet: sparse columns a,b,c")
    table_size: int = option(
        100_000, "criteo: rows per hashed table", flag="hash-size", aliases=("table-size",), minimum=2
    )
    min_count: int = option(1, "csv/parquet: vocabulary threshold (rarer values -> id 0)", minimum=1)
    max_bad_rows: int = option(100, "bad rows skipped before the read fails", minimum=0)
    synthetic: dict[str, Any] = option(
        factory=dict, help="SyntheticConfig fields (--data synthetic)", cli=False
    )


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
