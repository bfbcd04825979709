"""The one place ExFM distributes a model and makes its optimizer (so a change of the
library's build path is one edit here).

Every ExFM model with embedding tables (the FM, each VM) goes through the library's flat
build: TorchRec ``DistributedModelParallel`` on the current (one-rank) process group, the
tables' optimizer fused into their backward (row-wise Adagrad), Adam on the dense rest. The
student adapter has no tables and gets the same dense optimizer object alone.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.optim.keyed import CombinedOptimizer

from dmtrec.parallel.build import distribute as _distribute
from dmtrec.parallel.sharding import dense_and_fused_optimizer
from dmtrec.train.trainer import TrainConfig


def distribute(
    model: nn.Module, *, lr: float, sparse_lr: float, seed: int
) -> tuple[nn.Module, CombinedOptimizer]:
    """(``model`` under TorchRec DMP with fused row-wise Adagrad on ``model.ebc``, its one
    optimizer object). Must run inside a process group (``run_single``).

    The sharded tables are initialised from ``seed`` here, whatever ran before: the variants
    of one VM (with 0, 1 or 2 distillation heads) start from the same tables.
    """
    torch.manual_seed(seed)
    opts = TrainConfig(lr=lr, sparse_lr=sparse_lr, seed=seed, progress=False)
    built = _distribute(model, model.ebc, opts)
    return built.model, built.optimizer


def dense_optimizer(module: nn.Module, lr: float) -> CombinedOptimizer:
    """Adam on every parameter of a table-free module (the student adapter)."""
    return dense_and_fused_optimizer(module, [], "adam", lr)
