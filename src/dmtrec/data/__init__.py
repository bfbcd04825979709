"""Data sources: synthetic (built in), Criteo TSV, column-spec CSV/Parquet, and the binary
store ``dmtrec preprocess`` writes (``preprocessed``).

Each source has ``spec`` (a ``FeatureSpec``), ``stats`` (per-split ``DataStats``) and
``batches(split, global_batch_size, *, epoch=0, rank=0, world_size=1, start_step=0)`` yielding
this rank's slice of every global batch as TorchRec ``Batch`` es, parsing only those rows; the
sequence of global batches depends on the data and the seed only (``dmtrec.data.shard``), and
``start_step`` resumes an epoch without parsing the steps before it. ``load_data``
builds one from a picklable ``DataConfig`` so every distributed worker can open the same data
itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dmtrec.data.base import POOLING_MODES, SPLITS, DataStats, FeatureSpec, shard_rows, slice_batch
from dmtrec.errors import ConfigError
from dmtrec.options import option

DATA_KINDS = ("synthetic", "criteo", "csv", "parquet", "preprocessed")


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
        100_000,
        "criteo: rows per hashed table",
        flag="hash-size",
        aliases=("table-size",),
        minimum=2,
    )
    min_count: int = option(
        1, "csv/parquet: vocabulary threshold (rarer values -> id 0)", minimum=1
    )
    max_bad_rows: int = option(100, "bad rows skipped before the read fails", minimum=0)
    multi_hot: list[str] = option(
        factory=list,
        help="csv/parquet: sparse columns with a list of values per row (Parquet lists always)",
    )
    multi_hot_sep: str = option("|", "csv: separator of the values in a multi-hot cell")
    pooling_mode: str = option(
        "sum", "how the ids of a multi-hot bag are pooled", choices=POOLING_MODES
    )
    shuffle: bool = option(
        True, "shuffle the train split every epoch (seeded: file blocks and rows within them)"
    )
    shuffle_seed: int | None = option(
        None, "seed of the per-epoch shuffle of file data (none: the run's --seed)", minimum=0
    )
    block_mb: float = option(
        8.0, "text files: MiB per block, the unit of reading and of the shuffle", minimum=0.001
    )
    block_rows: int = option(
        65_536, "preprocessed: rows per block, the unit of the shuffle", minimum=1
    )
    progress_every: float = option(
        0.0, "seconds between progress lines of long reads on stderr (0: none)", minimum=0
    )
    synthetic: dict[str, Any] = option(
        factory=dict, help="SyntheticConfig fields (--data synthetic)", cli=False
    )


def load_data(cfg: DataConfig, vocab_values: dict[str, Any] | None = None, seed: int = 0):
    """Open the data source ``cfg`` describes; errors name the offending option.

    ``vocab_values`` (a saved model's column vocabularies) makes a csv/parquet source encode
    with them instead of counting a train split (which it then does not need). ``seed`` is the
    run's ``--seed``: file data are shuffled from it unless ``--shuffle-seed`` is given (the
    synthetic generator's rows and order follow its own seed, the same ``--seed``)."""
    shuffle_seed = seed if cfg.shuffle_seed is None else cfg.shuffle_seed
    if cfg.pooling_mode not in POOLING_MODES:
        raise ConfigError(f"--pooling-mode must be sum or mean, not {cfg.pooling_mode!r}")
    if cfg.kind == "synthetic":
        from dmtrec.data.synthetic import SyntheticConfig, SyntheticData

        data = SyntheticData(SyntheticConfig(**cfg.synthetic), shuffle=cfg.shuffle)
        data.spec.pooling = cfg.pooling_mode
        return data
    if cfg.kind not in DATA_KINDS:
        raise ConfigError(f"--data: unknown kind {cfg.kind!r}; choose from {', '.join(DATA_KINDS)}")
    # a train split is what vocabularies are counted on (csv/parquet) and what a store is;
    # Criteo hashing, or saved vocabularies, can read an evaluation split alone
    counts_vocab = cfg.kind in ("csv", "parquet") and vocab_values is None
    if not cfg.train and (
        counts_vocab or cfg.kind == "preprocessed" or not (cfg.valid or cfg.test)
    ):
        raise ConfigError(f"--data {cfg.kind} needs --train PATH")
    if cfg.kind == "preprocessed":
        from dmtrec.data.preprocessed import PreprocessedData

        if len(cfg.train) > 1 or cfg.valid or cfg.test:
            raise ConfigError(
                "--data preprocessed takes one --train DIR (the store); its valid/test splits "
                "come from the store"
            )
        return PreprocessedData(
            cfg.train[0],
            shuffle=cfg.shuffle,
            seed=shuffle_seed,
            block_rows=cfg.block_rows,
            pooling=cfg.pooling_mode,
        )
    paths = {s: getattr(cfg, s) for s in SPLITS if getattr(cfg, s)}
    block_bytes = max(1, int(cfg.block_mb * (1 << 20)))
    if cfg.kind == "criteo":
        from dmtrec.data.criteo import CriteoTSV

        data = CriteoTSV(
            paths,
            table_size=cfg.table_size,
            max_bad_rows=cfg.max_bad_rows,
            shuffle=cfg.shuffle,
            seed=shuffle_seed,
            block_bytes=block_bytes,
            progress_every=cfg.progress_every,
        )
        data.spec.pooling = cfg.pooling_mode
        return data
    from dmtrec.data.columns import ColumnTable

    if not cfg.label or not cfg.sparse:
        raise ConfigError(f"--data {cfg.kind} needs --label and --sparse (and usually --dense)")
    return ColumnTable(
        paths,
        label=cfg.label,
        dense=cfg.dense,
        sparse=cfg.sparse,
        fmt=cfg.kind,
        min_count=cfg.min_count,
        max_bad_rows=cfg.max_bad_rows,
        multi_hot=cfg.multi_hot,
        multi_hot_sep=cfg.multi_hot_sep,
        shuffle=cfg.shuffle,
        seed=shuffle_seed,
        block_bytes=block_bytes,
        pooling=cfg.pooling_mode,
        progress_every=cfg.progress_every,
        vocab_values=vocab_values,
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
