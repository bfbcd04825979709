"""Benchmarks. Each writes a JSON of what it measured into its ``--out`` directory."""

from __future__ import annotations

import statistics
from typing import Any

from dmtrec.train.trainer import TrainConfig


def synthetic_schedule(epochs: int, seed: int, out: str) -> TrainConfig:
    """The training schedule every quality benchmark on synthetic data uses (one place, so
    their numbers stay comparable): batch 128 per rank, Adam 3e-3, row-wise Adagrad 0.2, a
    fixed number of epochs (no early stopping)."""
    return TrainConfig(
        epochs=epochs,
        early_stop_patience=0,
        batch_size=128,
        lr=3e-3,
        sparse_lr=0.2,
        seed=seed,
        progress=False,
        out=out,
        log_every=0,
    )


def paired_comparison(a: list[float], b: list[float]) -> dict[str, Any]:
    """``a`` vs ``b`` paired by seed: mean gain, wins, one-sided paired t-test p (a > b)."""
    from scipy import stats

    t = stats.ttest_rel(a, b, alternative="greater") if len(a) > 1 else None
    return {
        "mean_auc_gain": statistics.mean(x - y for x, y in zip(a, b, strict=True)),
        "wins": sum(x > y for x, y in zip(a, b, strict=True)),
        "paired_t_p_value": float(t.pvalue) if t is not None else None,
    }
