"""Training on sharded reads: 4 ranks (2 hosts x 2) train on exactly the examples of 1 rank with
4x the batch, so the flat model's losses agree step by step (2 shuffled epochs of a Criteo
file read block by block, each rank parsing only its rows). Slow-marked: spawns processes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.distributed as dist

from dmtrec.data import DataConfig, load_data
from dmtrec.models import ModelConfig, build_model
from dmtrec.parallel.build import build
from dmtrec.parallel.launch import spawn
from dmtrec.train.step import train_step
from dmtrec.train.trainer import TrainConfig

pytestmark = pytest.mark.slow
TOL = 1e-5


def train_losses(dcfg: DataConfig, mcfg: ModelConfig, opts: TrainConfig, global_batch: int):
    """Every step's global mean loss (all ranks) over ``opts.epochs``, and the rows parsed."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(opts.seed)
    data = load_data(dcfg)
    reference = build_model(copy.deepcopy(mcfg), data.spec)
    built = build(data.spec, copy.deepcopy(mcfg), opts, reference=reference)
    losses, parsed = [], 0
    for epoch in range(opts.epochs):
        for batch in data.batches("train", global_batch, epoch=epoch, rank=rank, world_size=world):
            loss, _ = train_step(built.model, built.optimizer, batch.to(built.device))
            total = loss.detach().clone()
            dist.all_reduce(total)
            losses.append(float(total) / world)
        parsed += data.stats["train"].parsed
    return {"losses": losses, "parsed": parsed}


def test_four_ranks_train_on_the_examples_of_one_rank_with_four_times_the_batch(tmp_path):
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(1536):
        dense = [str(int(x)) if rng.random() > 0.2 else "" for x in rng.integers(0, 200, 13)]
        cats = [f"{int(x):08x}" for x in rng.integers(0, 2**32, 26) % 5000]
        lines.append("\t".join([str(int(rng.random() < 0.3)), *dense, *cats]) + "\n")
    path = tmp_path / "day_0"
    path.write_text("".join(lines))
    dcfg = DataConfig(
        kind="criteo", train=[str(path)], table_size=50, shuffle_seed=3, block_mb=16384 / 2**20
    )
    mcfg = ModelConfig(model="dlrm", embedding_dim=8, bottom=[16, 8], top=[16])
    common = dict(epochs=2, seed=0, lr=1e-2, sparse_lr=0.1, progress=False)
    one = spawn(train_losses, (dcfg, mcfg, TrainConfig(parallel="none", **common), 128), 1, 1)[0]
    four = spawn(
        train_losses,
        (dcfg, mcfg, TrainConfig(parallel="baseline", hosts=2, ranks_per_host=2, **common), 128),
        4,
        2,
    )
    assert len(one["losses"]) == 24  # 1536 rows / 128, two epochs
    assert sum(r["parsed"] for r in four) == one["parsed"] == 2 * 1536  # each row once a pass
    diff = np.abs(np.array(four[0]["losses"]) - np.array(one["losses"]))
    assert diff.max() <= TOL, diff.max()
