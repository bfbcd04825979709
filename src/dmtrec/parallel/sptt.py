"""SPTT: the semantic-preserving tower transform, DMT's distributed dataflow.

For N = H hosts x L ranks, local batch B, tower k placed on host h(k):

1. ids to the towers' hosts: each rank sends the ids of host h's features (for its B samples)
   to its peer on host h, over the cross-host *peer* group (H ranks, TorchRec ``KJTAllToAll``);
   every rank of host h now holds its host's features for H*B samples;
2. intra-host lookup: the host's tower tables are sharded over its L ranks (TorchRec
   ``DistributedModelParallel`` on the intra-host group: table/row/column-wise);
3. tower modules TM_k run on the pooled embeddings, replicated inside the host (DDP over the
   intra-host group), compressing each tower by CR;
4. TM outputs return to the samples' home ranks over the peer group (TorchRec's
   ``PooledEmbeddingsAllToAll``);
5. the global head (interaction + top MLP) is data parallel over all N ranks (DDP).

The model is ``dmtrec.models.MultiTower``'s math, unchanged: same TMs, same head, virtual
features in tower order. Gradient scaling: the head's DDP averages over N; the tower side sums
over the H*B samples a rank serves, and DDP / TorchRec divide by L inside the host, so the
returning gradient is divided by H (the return exchange's ``GRADIENT_DIVISION``) to make every gradient (1/N) sum over ranks, exactly the
reference's mean loss over the global batch.

Steps 1-4 are ``SPTTSparse``, a TorchRec ``ShardedModule`` (``input_dist`` = step 1,
``compute`` = steps 2-3, ``output_dist`` = step 4, as TorchRec's own
``ShardedEmbeddingTower``), called by ``SPTT.forward`` with the batch's KJT: so TorchRec's
``TrainPipelineSparseDist`` finds it by FX tracing, like a sharded EBC, and starts the next
batch's id exchange while this batch computes (``train/step.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchrec.distributed.dist_data import (
    KJTAllToAll,
    PooledEmbeddingsAllToAll,
    PooledEmbeddingsAwaitable,
)
from torchrec.distributed.embedding_sharding import KJTListSplitsAwaitable
from torchrec.distributed.embedding_types import KJTList
from torchrec.distributed.types import (
    Awaitable,
    LazyAwaitable,
    NullShardedModuleContext,
    ShardedModule,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from dmtrec.errors import ConfigError
from dmtrec.models.common import ebc_pooling, embedding_l2, make_ebc, stack_pooled, table_sizes
from dmtrec.models.dmt import MultiTower
from dmtrec.models.tower_modules import widen
from dmtrec.observe.comm import count_ddp
from dmtrec.parallel.sharding import add_fused_embedding_optimizer, copy_table_weights, shard
from dmtrec.parallel.topology import ProcessGroups


def assign_towers(tower_sizes: list[int], hosts: int) -> list[int]:
    """Host of each tower: largest first onto the least loaded host (LPT), ties to lower ids.

    Every host needs at least one tower (its ranks would otherwise idle in the lookup).
    """
    if len(tower_sizes) < hosts:
        raise ConfigError(
            f"--towers {len(tower_sizes)} is fewer than --hosts {hosts}: SPTT places each "
            f"tower on one host and every host needs a tower"
        )
    load = [0] * hosts
    count = [0] * hosts
    host = [0] * len(tower_sizes)
    for k in sorted(range(len(tower_sizes)), key=lambda k: (-tower_sizes[k], k)):
        # hosts without a tower first, then the least loaded
        h = min(range(hosts), key=lambda h: (count[h] > 0, load[h], h))
        host[k] = h
        load[h] += tower_sizes[k]
        count[h] += 1
    return host


class HostTowers(nn.Module):
    """The tower modules of one host, applied to that host's pooled embeddings."""

    def __init__(
        self, towers: list[list[str]], modules: list[nn.Module], embedding_l2: float = 0.0
    ) -> None:
        super().__init__()
        self.towers = towers
        self.tms = nn.ModuleList(modules)
        self.embedding_l2 = embedding_l2

    def forward(self, pooled: KeyedTensor) -> torch.Tensor:
        lam = self.embedding_l2  # on the H*B samples this host serves (see models.common)
        outs = [
            tm(embedding_l2(stack_pooled(pooled, feats), lam))
            for tm, feats in zip(self.tms, self.towers)
        ]
        return torch.cat([o.flatten(1) for o in outs], dim=1)  # (H*B) x host width


class _HomeAwaitable(LazyAwaitable[torch.Tensor]):
    """The return exchange in flight; waited, the B x n_virtual x D virtual features."""

    def __init__(
        self,
        exchange: PooledEmbeddingsAwaitable,
        arrange: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        super().__init__()
        self._exchange = exchange
        self._arrange = arrange

    def _wait_impl(self) -> torch.Tensor:
        return self._arrange(self._exchange.wait())


class SPTTSparse(ShardedModule[KJTList, torch.Tensor, torch.Tensor, NullShardedModuleContext]):
    """SPTT's steps 1-4 as a TorchRec sharded module: a batch's KJT in, its virtual features
    (B x n_virtual x D, tower order) out, on every rank.

    - ``input_dist``: the batch's features regrouped by destination host (following the
      batch's own key order, cached per order as a device buffer) and sent to the towers'
      hosts over the peer group (``KJTAllToAll``): awaitable of awaitable, as TorchRec's
      splits-then-tensors exchange;
    - ``compute``: the intra-host lookup (``lookup``, the host's DMP-sharded tables) and the
      host's tower modules (``towers``) on the H*B samples the rank serves;
    - ``output_dist``: the TM outputs back to the samples' home ranks over the peer group
      (``PooledEmbeddingsAllToAll``, the run's qcomm codecs), reordered to tower order (and
      narrow outputs of CR > m zero-padded to D) once they arrive.

    ``lookup`` and ``towers`` are SPTT's modules (registered there, so that state-dict keys
    stay SPTT's) and deliberately not submodules here: TorchRec's pipeline rewrites the input
    dists of every submodule of a pipelined module, and the host's sharded EBC must keep its
    own (TorchRec's ``ShardedEmbeddingTower`` hides its inner sharded module the same way).
    """

    def __init__(
        self,
        host_features: list[list[str]],
        peer: dist.ProcessGroup,
        lookup: nn.Module,
        towers: nn.Module,
        host_width: list[int],
        arrival: list[tuple[int, int]],
        tower_order: list[int],
        dim: int,
        device: torch.device,
        qcomm: dict | None = None,
    ) -> None:
        """``host_width``: numbers per sample each host returns; ``arrival``: (width,
        virtual features) of each tower in the order they arrive (host-major);
        ``tower_order``: the arrival positions in tower order."""
        from torchrec.distributed.fbgemm_qcomm_codec import CommOp

        super().__init__(qcomm_codecs_registry=qcomm)
        self.features = [f for fs in host_features for f in fs]  # destination-host order
        self.device = device
        self.dim = dim
        self._parts = (lookup, towers)  # not submodules: see the class docstring
        self._order: dict[tuple[str, ...], tuple[list[int], torch.Tensor]] = {}
        self.id_dist = KJTAllToAll(peer, [len(fs) for fs in host_features])
        self._arrival_width = [w for w, _ in arrival]
        self._arrival_outputs = [n for _, n in arrival]
        self._tower_order = tower_order
        codecs = (qcomm or {}).get(CommOp.POOLED_EMBEDDINGS_ALL_TO_ALL.name)
        self.return_dist = PooledEmbeddingsAllToAll(peer, host_width, device, codecs=codecs)

    @property
    def unsharded_module_type(self) -> type[nn.Module]:
        return MultiTower

    def create_context(self) -> NullShardedModuleContext:
        return NullShardedModuleContext()

    def _permutation(self, keys: list[str]) -> tuple[list[int], torch.Tensor]:
        """Positions of the destination-host feature order in a batch's keys (cached per key
        order, with its device copy for ``KeyedJaggedTensor.permute``)."""
        k = tuple(keys)
        if k not in self._order:
            pos = {f: i for i, f in enumerate(keys)}
            missing = [f for f in self.features if f not in pos]
            if missing:
                raise ConfigError(f"the batch has no feature(s) {', '.join(missing)} of the towers")
            order = [pos[f] for f in self.features]
            self._order[k] = (order, torch.tensor(order, device=self.device, dtype=torch.int))
        return self._order[k]

    def input_dist(
        self, ctx: NullShardedModuleContext, features: KeyedJaggedTensor
    ) -> Awaitable[Awaitable[KJTList]]:
        """1. ids to their tower's host over the peer group (started, not waited)."""
        order, order_t = self._permutation(features.keys())
        with torch.no_grad():
            return KJTListSplitsAwaitable([self.id_dist(features.permute(order, order_t))], ctx)

    def compute(self, ctx: NullShardedModuleContext, dist_input: KJTList) -> torch.Tensor:
        """2. intra-host lookup, 3. tower modules: (H*B) x host width."""
        lookup, towers = self._parts
        return towers(lookup(dist_input[0]))

    def output_dist(
        self, ctx: NullShardedModuleContext, output: torch.Tensor
    ) -> LazyAwaitable[torch.Tensor]:
        """4. TM outputs ((H*B) x host width, blocks of B per source host) back to the
        samples' home ranks over the peer group.

        TorchRec's ``PooledEmbeddingsAllToAll``: its backward divides the returning gradient
        by H (``GRADIENT_DIVISION``), which with DDP's and TorchRec's 1/L inside the host
        makes every gradient the (1/N)-average of the reference's mean loss."""
        return _HomeAwaitable(self.return_dist(output), self._to_tower_order)

    def _to_tower_order(self, recv: torch.Tensor) -> torch.Tensor:
        """B x sum(host widths), towers in arrival order -> B x n_virtual x D, tower order."""
        b = recv.shape[0]
        parts = [
            widen(p.view(b, n, -1), self.dim)
            for p, n in zip(recv.split(self._arrival_width, dim=1), self._arrival_outputs)
        ]
        return torch.cat([parts[i] for i in self._tower_order], dim=1)


class SPTT(nn.Module):
    """A ``MultiTower`` model distributed with SPTT over ``groups`` (see module docstring)."""

    def __init__(
        self,
        model: MultiTower,
        groups: ProcessGroups,
        device: torch.device,
        sharding_type: str = "table_wise",
        sparse_optimizer: str = "rowwise_adagrad",
        sparse_lr: float = 0.1,
        weights: dict[str, torch.Tensor] | None = None,
        count_comm: bool = False,
        qcomm: dict | None = None,
    ) -> None:
        """``model``'s tables may live on the ``meta`` device: SPTT builds and shards its own
        host tables; ``weights`` (``<table>.weight`` -> full table) loads given values into
        them (tests start from a reference model), else TorchRec initialises them sharded.
        ``count_comm`` makes DDP's all-reduces visible to ``observe.comm.CommCounter``;
        ``qcomm`` is TorchRec's qcomm codecs registry (reduced-precision embedding comms) for
        the intra-host lookup and the return exchange (ids always travel exact)."""
        super().__init__()
        topo = groups.topology
        self.groups = groups
        self.hosts = topo.hosts
        self.host = topo.host_of(groups.rank)
        towers = model.towers
        self.tower_host = assign_towers([len(t) for t in towers], topo.hosts)
        host_towers = [
            [k for k in range(len(towers)) if self.tower_host[k] == h] for h in range(topo.hosts)
        ]
        host_features = [[f for k in ks for f in towers[k]] for ks in host_towers]
        sizes = table_sizes(model.ebc)  # input KJT keys come in this (the data's) order
        self.device = device
        # 2. this host's tables, sharded over its ranks, starting from the reference weights
        self.dim = dim = model.ebc.embedding_bag_configs()[0].embedding_dim
        ebc = make_ebc(
            sizes, dim, host_features[self.host], device="meta", pooling=ebc_pooling(model.ebc)
        )
        add_fused_embedding_optimizer(ebc, sparse_optimizer, sparse_lr, device)
        self.host_sparse = shard(
            ebc, [ebc], groups.intra, sharding_type, device, topo.ranks_per_host, count_comm, qcomm
        )
        if weights is not None:
            copy_table_weights(self.host_sparse, weights)
        # 3. this host's tower modules, replicated in the host
        mine = host_towers[self.host]
        towers_mod = HostTowers(
            [towers[k] for k in mine], [model.tower_modules[k] for k in mine], model.embedding_l2
        ).to(device)
        if any(p.requires_grad for p in towers_mod.parameters()):
            towers_mod = DistributedDataParallel(
                towers_mod, process_group=groups.intra, broadcast_buffers=False
            )
            if count_comm:
                count_ddp(towers_mod)
        self.host_towers = towers_mod
        # 1. + 4. the exchanges around them: the sharded module the pipeline drives
        tms = model.tower_modules
        arrival = [k for ks in host_towers for k in ks]  # towers in the received order
        self.sparse_arch = SPTTSparse(
            host_features,
            groups.peer,
            self.host_sparse,
            self.host_towers,
            host_width=[sum(tms[k].width for k in ks) for ks in host_towers],
            arrival=[(tms[k].width, tms[k].num_outputs) for k in arrival],
            tower_order=sorted(range(len(towers)), key=arrival.__getitem__),
            dim=dim,
            device=device,
            qcomm=qcomm,
        )
        # 5. the global head, data parallel over all ranks
        head = model.head.to(device)
        # No buffer broadcast per forward (as TorchRec's DMP wraps its dense part): the head's
        # buffers are constants (e.g. the interaction's triu indices), and the broadcast is a
        # world-wide collective, i.e. one more cross-host synchronisation every step.
        self.head = DistributedDataParallel(
            head, process_group=groups.world, broadcast_buffers=False
        )
        if count_comm:
            count_ddp(self.head)

    @property
    def fused_optimizer(self):
        return self.host_sparse.fused_optimizer

    # The stages one at a time (benchmarks/sptt_stages.py times them; training runs them as
    # ``sparse_arch``'s input_dist / compute / output_dist).
    def exchange_ids(self, sparse: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """1. ids to their tower's host: this host's features, H*B samples."""
        ctx = self.sparse_arch.create_context()
        return self.sparse_arch.input_dist(ctx, sparse).wait().wait()[0]

    def return_to_home(self, out: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """4. TM outputs ((H*B) x host width) home: B x n_virtual x D in tower order."""
        ctx = self.sparse_arch.create_context()
        return self.sparse_arch.output_dist(ctx, out).wait()

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        virtual = self.sparse_arch(sparse).wait()  # 1.-4.: B x n_virtual x D
        return self.head(dense, virtual)  # 5. global head
