"""Benchmarks. Each writes a JSON of what it measured into its ``--out`` directory."""

from __future__ import annotations

from dmtrec.train.trainer import TrainConfig


def synthetic_schedule(epochs: int, seed: int, out: str) -> TrainConfig:
    """The training schedule every quality benchmark on synthetic data uses (one place, so
    their numbers stay comparable): batch 128 per rank, Adam 3e-3, row-wise Adagrad 0.2."""
    return TrainConfig(
        epochs=epochs,
        batch_size=128,
        lr=3e-3,
        sparse_lr=0.2,
        seed=seed,
        progress=False,
        out=out,
        log_every=0,
    )
