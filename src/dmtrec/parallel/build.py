"""One build path: the flat model, the TorchRec hybrid-parallel baseline and DMT, from configs.

``build`` is what the trainer, every benchmark and the partition probe call to get a model
ready to train on this rank:

- ``none``: one process; the tables still go through TorchRec's fused TBE kernels
  (``DistributedModelParallel`` on a one-rank group, ~6.7x faster on CPU than a plain EBC);
- ``baseline``: TorchRec hybrid parallelism over all N ranks (tables sharded table- or
  row-wise over the world, dense part DDP) -- the paper's comparison point;
- ``dmt``: SPTT (``parallel/sptt.py``) with the towers and tower modules of the model.

The tables are declared on the ``meta`` device and materialised only as shards, on the rank
that owns them: no rank ever holds the whole unsharded model. Only where a caller passes a
``reference`` model (the equivalence tests, or a resumed single-process state) are its table
values copied into the shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn
from torchrec.optim.keyed import CombinedOptimizer

from dmtrec.data.base import FeatureSpec
from dmtrec.errors import ConfigError
from dmtrec.models import ModelConfig, build_model
from dmtrec.models.common import table_weights
from dmtrec.parallel.launch import rank_device
from dmtrec.parallel.sharding import (
    add_fused_embedding_optimizer,
    copy_table_weights,
    dense_and_fused_optimizer,
    qcomm_registry,
    shard,
)
from dmtrec.parallel.sptt import SPTT
from dmtrec.parallel.topology import Topology, make_process_groups
from dmtrec.partition import make_partition

PARALLEL = ("none", "baseline", "dmt")


class BuildOptions(Protocol):
    """The fields of ``train.TrainConfig`` that a build reads (kept structural so that
    ``parallel/`` does not import the trainer)."""

    parallel: str
    hosts: int
    ranks_per_host: int
    sharding: str
    sparse_optimizer: str
    sparse_lr: float
    dense_optimizer: str
    lr: float
    seed: int
    weight_decay: float


@dataclass
class Built:
    """A model distributed over this rank's groups, with its one optimizer object."""

    model: nn.Module  # DMP (none/baseline) or SPTT (dmt); called as model(dense, kjt) -> logits
    optimizer: CombinedOptimizer  # the fused sparse optimizers + the dense one
    device: torch.device
    topology: Topology
    comm_precision_effective: str = "fp32"  # what the embedding comms really use


def resolve_towers(mcfg: ModelConfig, spec: FeatureSpec, seed: int) -> None:
    """Fill ``mcfg.towers`` from ``num_towers`` and ``partition`` (sequential/random/planted)."""
    if mcfg.towers is None and mcfg.num_towers:
        mcfg.towers = make_partition(
            mcfg.partition, spec.sparse, mcfg.num_towers, spec.groups, seed
        )


def world_topology(opts: BuildOptions) -> Topology:
    """The run's hosts x ranks, checked against the process group this rank is in."""
    topo = Topology(opts.hosts, opts.ranks_per_host)
    world = dist.get_world_size()
    if topo.world_size != world:
        raise ConfigError(f"--hosts x --ranks-per-host = {topo.world_size} != world size {world}")
    return topo


def build(
    spec: FeatureSpec,
    mcfg: ModelConfig,
    opts: BuildOptions,
    *,
    reference: nn.Module | None = None,
    count_comm: bool = False,
) -> Built:
    """Build ``mcfg`` on ``spec`` under ``opts.parallel`` on this rank (inside a process group).

    Without ``reference`` the model is made from ``opts.seed`` with its tables on ``meta``;
    with it, ``reference`` (an unsharded ``build_model`` result) is distributed and its table
    values are copied into the shards, so the result computes exactly what it computes.
    ``count_comm`` installs the hooks ``observe.comm.CommCounter`` needs (measured runs).
    """
    if opts.parallel not in PARALLEL:
        raise ConfigError(
            f"--parallel: unknown {opts.parallel!r}; choose from {', '.join(PARALLEL)}"
        )
    topo = world_topology(opts)
    device = rank_device()
    resolve_towers(mcfg, spec, opts.seed)
    if opts.parallel == "dmt" and mcfg.towers is None:
        raise ConfigError("--parallel dmt needs --towers (K or a towers.json)")
    if opts.parallel == "dmt" and opts.sharding == "table_row_wise":
        raise ConfigError(
            "--sharding table_row_wise does not apply inside a host (--parallel dmt shards each "
            "host's tables over its own ranks): use table_wise, row_wise or column_wise"
        )
    if reference is None:
        torch.manual_seed(opts.seed)
        model, weights = build_model(mcfg, spec, table_device="meta"), None
    else:
        model, weights = reference, table_weights(reference)
    if opts.parallel != "dmt":
        return distribute(model, model.ebc, opts, weights=weights, count_comm=count_comm)
    qcomm, effective = qcomm_registry(getattr(opts, "comm_precision", "fp32"), device)
    wrapped = SPTT(
        model,
        make_process_groups(topo),
        device,
        opts.sharding,
        opts.sparse_optimizer,
        opts.sparse_lr,
        weights=weights,
        count_comm=count_comm,
        qcomm=qcomm,
    )
    optimizer = dense_and_fused_optimizer(
        wrapped, [wrapped.fused_optimizer], opts.dense_optimizer, opts.lr, opts.weight_decay
    )
    return Built(wrapped, optimizer, device, topo, effective)


def distribute(
    model: nn.Module,
    ebc: nn.Module,
    opts: BuildOptions,
    *,
    weights: dict[str, torch.Tensor] | None = None,
    count_comm: bool = False,
) -> Built:
    """Any model with one EBC (``ebc``, inside ``model``) under TorchRec's DMP over the world:
    the flat and baseline modes of ``build``, and peers such as ``torchrec.models.dlrm.DLRM``
    in ``bench flat``. Fused sparse optimizer in the backward, dense optimizer on the rest."""
    topo = world_topology(opts)
    device = rank_device()
    add_fused_embedding_optimizer(ebc, opts.sparse_optimizer, opts.sparse_lr, device)
    qcomm, effective = qcomm_registry(getattr(opts, "comm_precision", "fp32"), device)
    wrapped = shard(
        model,
        [ebc],
        dist.group.WORLD,
        opts.sharding,
        device,
        topo.ranks_per_host,
        count_comm,
        qcomm,
    )
    if weights is not None:
        copy_table_weights(wrapped, weights)
    optimizer = dense_and_fused_optimizer(
        wrapped, [wrapped.fused_optimizer], opts.dense_optimizer, opts.lr, opts.weight_decay
    )
    return Built(wrapped, optimizer, device, topo, effective)
