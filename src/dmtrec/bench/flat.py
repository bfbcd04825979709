"""Flat-kernel throughput: dmtrec's flat DLRM vs ``torchrec.models.dlrm.DLRM``.

Both models get the same tables, the same MLP sizes, the same weights and the same batches, and
go through the same training path (row-wise Adagrad fused into the TBE backward, table-wise
``DistributedModelParallel``, Adam on the dense part). Their steps are timed in interleaved
blocks (ABBA order over several rounds) in one process, so machine noise hits both alike and
the ratio of their examples/s is the overhead dmtrec's flat model adds over TorchRec's own DLRM
(goal: ratio >= 0.9).

``bench_flat`` must run inside a process group (TorchRec's fused kernels are sharded modules):
call it as ``run_single(bench_flat, (out_dir,))`` from ``dmtrec.parallel.launch``, or from a
rank of an existing group (then every rank must call it; rank 0 writes the JSON).
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.models.dlrm import DLRM

from dmtrec.data.synthetic import SyntheticConfig, SyntheticData
from dmtrec.errors import ConfigError
from dmtrec.models import ModelConfig, build_model
from dmtrec.models.common import make_ebc, table_weights
from dmtrec.parallel.build import distribute
from dmtrec.parallel.launch import synchronize
from dmtrec.train.step import train_step

SPARSE_OPTIMIZER, SPARSE_LR = "rowwise_adagrad", 0.05
DENSE_OPTIMIZER, DENSE_LR = "adam", 1e-3
SHARDING = "table_wise"
MAX_DISTINCT_BATCHES = 8  # batches generated once and cycled: data generation is never timed
MAX_ROUNDS = 5  # timed steps are split into this many interleaved blocks per model
GOAL_RATIO = 0.9


@dataclass
class _Runner:
    """One model under the training path, with its timings."""

    name: str
    dmp: nn.Module
    optimizer: torch.optim.Optimizer
    squeeze: bool  # TorchRec's DLRM returns B x 1 logits, dmtrec's B
    next_batch: int = 0
    step_s: list[float] = field(default_factory=list)
    round_eps: list[float] = field(default_factory=list)

    device: torch.device = torch.device("cpu")

    def __call__(self, dense: torch.Tensor, sparse) -> torch.Tensor:
        out = self.dmp(dense, sparse)
        return out.squeeze(-1) if self.squeeze else out

    def logits(self, batch: Batch) -> torch.Tensor:
        return self(batch.dense_features, batch.sparse_features)

    def step(self, batch: Batch) -> float:
        """The trainer's step (``train/step.py``); returns its seconds (device work included)."""
        t0 = time.perf_counter()
        train_step(self, self.optimizer, batch)
        synchronize(self.device)
        return time.perf_counter() - t0

    def run(self, batches: list[Batch], n: int, timed: bool) -> None:
        """``n`` steps over ``batches`` in a cycle (each model sees the same sequence)."""
        total_s, examples = 0.0, 0
        for _ in range(n):
            batch = batches[self.next_batch % len(batches)]
            self.next_batch += 1
            dt = self.step(batch)
            total_s += dt
            examples += int(batch.labels.numel())
            if timed:
                self.step_s.append(dt)
        if timed and n:
            self.round_eps.append(examples / total_s)


def _torchrec_dlrm(spec, embedding_dim: int, bottom: list[int], top: list[int]) -> DLRM:
    """TorchRec's stock DLRM on the same tables (names, sizes, dim) as dmtrec's flat model."""
    ebc = make_ebc(spec.table_sizes, embedding_dim, spec.sparse)
    return DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=len(spec.dense),
        dense_arch_layer_sizes=[*bottom, embedding_dim],
        over_arch_layer_sizes=[*top, 1],
    )


def _to_torchrec_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """dmtrec ``FlatModel`` (DLRM head) state-dict keys -> ``torchrec.models.dlrm.DLRM`` keys."""
    out = {}
    for k, v in state.items():
        if k.startswith("ebc."):
            k = "sparse_arch.embedding_bag_collection." + k.removeprefix("ebc.")
        elif k.startswith("head."):
            k = k.removeprefix("head.")
        out[k] = v
    return out


@dataclass
class _Opts:
    """The trainer's ``--parallel none`` options, for ``parallel.build.distribute``."""

    parallel: str = "none"
    hosts: int = 1
    ranks_per_host: int = 1
    sharding: str = SHARDING
    sparse_optimizer: str = SPARSE_OPTIMIZER
    sparse_lr: float = SPARSE_LR
    dense_optimizer: str = DENSE_OPTIMIZER
    lr: float = DENSE_LR
    seed: int = 0
    weight_decay: float = 0.0


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _summary(r: _Runner, batch_size: int, output_shape: list[int]) -> dict[str, Any]:
    return {
        "examples_per_s": statistics.median(r.round_eps),
        "step_s_median": statistics.median(r.step_s),
        "round_examples_per_s": r.round_eps,
        "steps_timed": len(r.step_s),
        "output_shape": output_shape,
        "batch_size": batch_size,
    }


def bench_flat(
    out_dir: str,
    *,
    num_sparse: int = 26,
    table_size: int = 100_000,
    embedding_dim: int = 64,
    batch_size: int = 2048,
    bottom: tuple[int, ...] = (512, 256),
    top: tuple[int, ...] = (1024, 1024, 512, 256),
    warmup: int = 3,
    steps: int = 20,
    seed: int = 0,
) -> dict[str, Any]:
    """Train-step examples/s of dmtrec's flat DLRM and TorchRec's DLRM, same run, interleaved.

    Writes ``out_dir/bench_flat.json`` (rank 0) and returns the dict: per model
    ``examples_per_s`` (median over rounds) and ``step_s_median``, their
    ``ratio_dmtrec_over_torchrec``, ``config`` and ``torch_threads``. Needs a process group:
    call via ``run_single(bench_flat, (out_dir,), ...)`` (see the module docstring).
    """
    if not dist.is_initialized():
        raise ConfigError(
            "bench_flat needs a process group: call it via "
            "dmtrec.parallel.launch.run_single(bench_flat, (out_dir,))"
        )
    if warmup < 0 or steps < 1 or batch_size < 1:
        raise ConfigError("bench_flat: --steps and --batch-size must be >= 1, warmup >= 0")
    bottom_l, top_l = list(bottom), list(top)

    # Data: generated once, before anything is timed; both models cycle the same batches.
    n_batches = min(warmup + steps, MAX_DISTINCT_BATCHES)
    data = SyntheticData(
        SyntheticConfig(
            num_sparse=num_sparse,
            num_groups=min(4, num_sparse),
            table_size=table_size,
            num_train=batch_size * n_batches,
            num_valid=0,
            num_test=0,
            seed=seed,
        )
    )
    batches = list(data.batches("train", batch_size))
    spec = data.spec

    # Models: dmtrec's flat DLRM, and TorchRec's DLRM loaded with the very same weights
    # (strict load: proves the two have the same parameters, shapes included).
    torch.manual_seed(seed)
    mcfg = ModelConfig(model="dlrm", embedding_dim=embedding_dim, bottom=bottom_l, top=top_l)
    dm_model = build_model(mcfg, spec)
    tr_model = _torchrec_dlrm(spec, embedding_dim, bottom_l, top_l)
    tr_model.load_state_dict(_to_torchrec_keys(dm_model.state_dict()), strict=True)
    full = table_weights(dm_model)  # sharded fused tables start random: same weights in both
    opts = _Opts(seed=seed)
    dm_b = distribute(dm_model, dm_model.ebc, opts, weights=full)
    tr_b = distribute(tr_model, tr_model.sparse_arch.embedding_bag_collection, opts, weights=full)
    del full, dm_model, tr_model
    gc.collect()
    batches = [b.to(dm_b.device) for b in batches]
    dm = _Runner("dmtrec", dm_b.model, dm_b.optimizer, squeeze=False, device=dm_b.device)
    tr = _Runner("torchrec", tr_b.model, tr_b.optimizer, squeeze=True, device=tr_b.device)

    with torch.no_grad():
        dm_out, tr_out = dm.logits(batches[0]), tr.logits(batches[0])
    initial_diff = float((dm_out - tr_out).abs().max()) if dm_out.shape == tr_out.shape else None

    # Warm-up (untimed), then ABBA-interleaved timed blocks.
    dm.run(batches, warmup, timed=False)
    tr.run(batches, warmup, timed=False)
    rounds = min(steps, MAX_ROUNDS)
    blocks = [steps // rounds + (1 if i < steps % rounds else 0) for i in range(rounds)]
    for i, n in enumerate(blocks):
        for r in (dm, tr) if i % 2 == 0 else (tr, dm):
            r.run(batches, n, timed=True)

    with torch.no_grad():  # same math, weights, batches and optimizer: same trained model
        dm_end, tr_end = dm.logits(batches[0]), tr.logits(batches[0])
    final_diff = float((dm_end - tr_end).abs().max()) if dm_end.shape == tr_end.shape else None

    dm_sum = _summary(dm, batch_size, list(dm_out.shape))
    tr_sum = _summary(tr, batch_size, list(tr_out.shape))
    ratio = dm_sum["examples_per_s"] / tr_sum["examples_per_s"]
    paired = statistics.median(a / b for a, b in zip(dm.round_eps, tr.round_eps))
    result: dict[str, Any] = {
        "config": {
            "model": "dlrm",
            "num_sparse": num_sparse,
            "num_dense": len(spec.dense),
            "table_size": table_size,
            "embedding_dim": embedding_dim,
            "batch_size": batch_size,
            "bottom": [*bottom_l, embedding_dim],
            "top": [*top_l, 1],
            "warmup": warmup,
            "steps": steps,
            "rounds": rounds,
            "distinct_batches": len(batches),
            "seed": seed,
            "sharding": SHARDING,
            "world_size": dist.get_world_size(),
            "sparse_optimizer": SPARSE_OPTIMIZER,
            "sparse_lr": SPARSE_LR,
            "dense_optimizer": DENSE_OPTIMIZER,
            "dense_lr": DENSE_LR,
        },
        "torch_threads": torch.get_num_threads(),
        "versions": {p: _version(p) for p in ("torch", "torchrec", "fbgemm-gpu-cpu")},
        "dmtrec": dm_sum,
        "torchrec": tr_sum,
        "ratio_dmtrec_over_torchrec": ratio,
        "ratio_paired_rounds_median": paired,
        "goal_ratio": GOAL_RATIO,
        "meets_goal": ratio >= GOAL_RATIO,
        "initial_output_max_abs_diff": initial_diff,
        "final_output_max_abs_diff": final_diff,
    }
    if dist.get_rank() == 0:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_flat.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
