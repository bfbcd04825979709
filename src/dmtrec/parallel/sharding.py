"""TorchRec model parallelism as dmtrec uses it: sharders, plans, fused optimizers, weights.

Both the hybrid-parallel baseline (tables over the whole world) and SPTT (a host's tower tables
over that host's ranks) go through ``shard``: TorchRec's ``DistributedModelParallel`` with an
``EmbeddingShardingPlanner`` plan restricted to one sharding type, on any process group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner import Topology as PlannerTopology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingEnv, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from dmtrec.errors import ConfigError
from dmtrec.observe.comm import count_ddp

SHARDING_TYPES = {
    "table_wise": ShardingType.TABLE_WISE,
    "row_wise": ShardingType.ROW_WISE,
    "column_wise": ShardingType.COLUMN_WISE,
    "table_row_wise": ShardingType.TABLE_ROW_WISE,
}


class AnyShardingSharder(EmbeddingBagCollectionSharder):
    """TorchRec's EBC sharder, offering every sharding type on CPU too.

    The stock sharder lists only data_parallel/table_wise/column_wise/table_column_wise for
    the CPU device; row-wise and table-row-wise work there as well (verified against the
    unsharded model), they are only not offered.
    """

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return [t.value for t in SHARDING_TYPES.values()] + [ShardingType.DATA_PARALLEL.value]


class CountingDataParallelWrapper(DefaultDataParallelWrapper):
    """TorchRec's DDP wrapping of the dense part, with its all-reduces visible to CommCounter."""

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        super().wrap(dmp, env, device)
        if isinstance(dmp._dmp_wrapped_module, nn.parallel.DistributedDataParallel):
            count_ddp(dmp._dmp_wrapped_module)


SPARSE_OPTIMIZERS = ("rowwise_adagrad", "sgd", "adam", "rowwise_adam")


COMM_PRECISIONS = ("fp32", "fp16", "bf16")


def qcomm_registry(precision: str, device: torch.device) -> tuple[dict | None, str]:
    """TorchRec's qcomm codecs for pooled-embedding comms (forward and backward) at
    ``precision``, and the precision they really use: gloo has no bf16 all-to-all, so on CPU
    TorchRec falls back to fp16 (Neo's reduced-precision communication; ids stay exact)."""
    from torchrec.distributed.fbgemm_qcomm_codec import (
        CommType,
        QCommsConfig,
        get_qcomm_codecs_registry,
    )

    if precision not in COMM_PRECISIONS:
        raise ConfigError(
            f"--comm-precision: unknown {precision!r}; choose from {', '.join(COMM_PRECISIONS)}"
        )
    effective = "fp16" if precision == "bf16" and device.type == "cpu" else precision
    if precision == "fp32":
        return None, effective
    ct = CommType(effective)
    config = QCommsConfig(forward_precision=ct, backward_precision=ct)
    return get_qcomm_codecs_registry(config, device=device), effective


def add_fused_embedding_optimizer(
    ebc: nn.Module, name: str, lr: float, device: torch.device | None = None
) -> None:
    """Attach the sparse optimizer TorchRec fuses into the TBE backward (applied in backward).

    ``rowwise_adagrad`` is what DLRM/Wukong train with; ``sgd`` makes equivalence tests exact
    (weight change = -lr * gradient); ``adam`` and ``rowwise_adam`` (fbgemm's partial
    row-wise Adam) exist in fbgemm's CUDA kernels only.
    """
    from torchrec.optim import PartialRowWiseAdam

    classes = {
        "rowwise_adagrad": (RowWiseAdagrad, {"lr": lr, "eps": 1e-8}),
        "sgd": (torch.optim.SGD, {"lr": lr}),
        "adam": (torch.optim.Adam, {"lr": lr}),
        "rowwise_adam": (PartialRowWiseAdam, {"lr": lr}),
    }
    if name not in classes:
        raise ConfigError(
            f"--sparse-optimizer: unknown {name!r}; choose from {', '.join(SPARSE_OPTIMIZERS)}"
        )
    if name in ("adam", "rowwise_adam") and (device is None or device.type != "cuda"):
        raise ConfigError(
            f"--sparse-optimizer {name} needs CUDA: fbgemm's CPU kernels offer rowwise_adagrad "
            "and sgd"
        )
    cls, kwargs = classes[name]
    apply_optimizer_in_backward(cls, ebc.parameters(), kwargs)


def shard(
    module: nn.Module,
    ebcs: list[EmbeddingBagCollection],
    group: dist.ProcessGroup,
    sharding_type: str,
    device: torch.device,
    ranks_per_host: int,
    count_comm: bool = False,
    qcomm: dict | None = None,
) -> DistributedModelParallel:
    """Shard every EBC in ``module`` over ``group`` with one sharding type; DDP the rest.

    ``ebcs`` lists the EBCs inside ``module``, whose tables all get ``sharding_type``.
    ``count_comm`` routes DDP's gradient all-reduce through Python so that
    ``observe.comm.CommCounter`` sees it (measured runs only: it replaces DDP's C++ reducer
    call with a hook).
    """
    if sharding_type not in SHARDING_TYPES:
        raise ConfigError(
            f"--sharding: unknown {sharding_type!r}; choose from {', '.join(SHARDING_TYPES)}"
        )
    env = ShardingEnv.from_process_group(group)
    world = env.world_size
    constraints = {
        cfg.name: ParameterConstraints(sharding_types=[SHARDING_TYPES[sharding_type].value])
        for ebc in ebcs
        for cfg in ebc.embedding_bag_configs()
    }
    topology = PlannerTopology(
        world_size=world,
        compute_device=device.type,
        local_world_size=min(world, ranks_per_host),
    )
    sharder = AnyShardingSharder(qcomm_codecs_registry=qcomm)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    if group is dist.group.WORLD:
        plan = planner.collective_plan(module, [sharder], group)
    else:
        # collective_plan broadcasts from *global* rank 0, which is in no other host's group;
        # the planner is deterministic, so every rank of the group plans the same by itself.
        plan = planner.plan(module, [sharder])
        _placements_to_global(plan, dist.get_process_group_ranks(group))
    return DistributedModelParallel(
        module,
        env=env,
        device=device,
        plan=plan,
        sharders=[sharder],
        data_parallel_wrapper=(
            CountingDataParallelWrapper() if count_comm else DefaultDataParallelWrapper()
        ),
    )


def _placements_to_global(plan, group_ranks: list[int]) -> None:
    """Make a sub-group plan's shard placements name global ranks.

    The planner plans for a world of the group's size, so ``ranks`` and placements are group
    ranks. TorchRec's sharding code uses ``ranks`` as group ranks (as in its own tower
    sharding), but ``ShardedTensor`` validates placements against the group's *global* ranks.
    """
    from torch.distributed.remote_device import _remote_device

    for module_plan in plan.plan.values():
        for ps in module_plan.values():
            for md in ps.sharding_spec.shards if ps.sharding_spec is not None else []:
                p = md.placement
                md.placement = _remote_device(f"rank:{group_ranks[p.rank()]}/{p.device()}")


def dense_and_fused_optimizer(
    model: nn.Module, fused: list, dense_opt: str, lr: float, weight_decay: float = 0.0
) -> CombinedOptimizer:
    """One optimizer object for checkpoints: the fused sparse ones plus Adam(W)/SGD on the rest."""
    dense = dict(in_backward_optimizer_filter(model.named_parameters()))
    opts: list = list(fused)
    if dense:
        classes = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
        if dense_opt not in classes:
            raise ConfigError(
                f"--dense-optimizer: unknown {dense_opt!r}; choose from {', '.join(classes)}"
            )
        cls = classes[dense_opt]

        def make(ps):
            return cls(ps, lr=lr, weight_decay=weight_decay)

        opts.append(KeyedOptimizerWrapper(dense, make))
    return CombinedOptimizer(opts)


@torch.no_grad()
def copy_table_weights(dmp: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Load full (unsharded) table weights into a sharded model, shard by shard.

    Sharded fused tables start with their own random values; tests and checkpoints from a
    single-process model need the exact reference weights. ``full`` maps a state-dict key suffix
    ``<table>.weight`` to the full table.
    """
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    for key, value in dmp.state_dict().items():
        name = ".".join(key.split(".")[-2:])
        if name not in full:
            continue
        src = full[name]
        if isinstance(value, ShardedTensor):
            for shard_ in value.local_shards():
                r, c = shard_.metadata.shard_offsets
                h, w = shard_.metadata.shard_sizes
                shard_.tensor.copy_(src[r : r + h, c : c + w])
        else:
            value.copy_(src)
