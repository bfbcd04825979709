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
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchrec.distributed.dist_data import KJTAllToAll, PooledEmbeddingsAllToAll
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
        from torchrec.distributed.fbgemm_qcomm_codec import CommOp

        return_codecs = (qcomm or {}).get(CommOp.POOLED_EMBEDDINGS_ALL_TO_ALL.name)
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
        # 1. ids: KJT keys regrouped by destination host, then the peer-group all-to-all
        self.host_features = [f for fs in host_features for f in fs]  # destination-host order
        self._order: dict[tuple[str, ...], tuple[list[int], torch.Tensor]] = {}
        self.device = device
        self.id_dist = KJTAllToAll(groups.peer, [len(fs) for fs in host_features])
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
        # 4. widths (numbers per sample) each host returns; host-major -> tower order at home
        tms = model.tower_modules
        self.host_width = [sum(tms[k].width for k in ks) for ks in host_towers]
        self.return_dist = PooledEmbeddingsAllToAll(
            groups.peer, self.host_width, device, codecs=return_codecs
        )
        self._arrival = [k for ks in host_towers for k in ks]  # towers in the received order
        self._arrival_width = [tms[k].width for k in self._arrival]
        self._arrival_outputs = [tms[k].num_outputs for k in self._arrival]
        self._tower_order = sorted(range(len(towers)), key=self._arrival.__getitem__)
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

    # The stages of one forward, in order (named so that benchmarks can time each one).
    def _permutation(self, keys: list[str]) -> tuple[list[int], torch.Tensor]:
        """Positions of the destination-host feature order in a batch's keys (cached per key
        order, with its device copy for ``KeyedJaggedTensor.permute``)."""
        k = tuple(keys)
        if k not in self._order:
            pos = {f: i for i, f in enumerate(keys)}
            missing = [f for f in self.host_features if f not in pos]
            if missing:
                raise ConfigError(f"the batch has no feature(s) {', '.join(missing)} of the towers")
            order = [pos[f] for f in self.host_features]
            self._order[k] = (order, torch.tensor(order, device=self.device, dtype=torch.int))
        return self._order[k]

    def exchange_ids(self, sparse: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """1. ids to their tower's host over the peer group: this host's features, H*B samples.

        The regrouping by destination host follows the batch's own key order."""
        order, order_t = self._permutation(sparse.keys())
        return self.id_dist(sparse.permute(order, order_t)).wait().wait()

    def return_to_home(self, out: torch.Tensor, batch_size: int) -> torch.Tensor:
        """4. TM outputs ((H*B) x host width, blocks of B per source host) back to the samples'
        home ranks over the peer group; B x n_virtual x D in tower order (narrow outputs of
        CR > m zero-padded to D here, after the exchange).

        TorchRec's ``PooledEmbeddingsAllToAll`` (with the run's qcomm codecs) over the peer
        group: its backward divides the returning gradient by H (``GRADIENT_DIVISION``), which
        with DDP's and TorchRec's 1/L inside the host makes every gradient the (1/N)-average
        of the reference's mean loss."""
        recv = self.return_dist(out).wait()  # B x sum(host widths), towers in arrival order
        parts = [
            widen(p.view(batch_size, n, -1), self.dim)
            for p, n in zip(recv.split(self._arrival_width, dim=1), self._arrival_outputs)
        ]
        return torch.cat([parts[i] for i in self._tower_order], dim=1)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        local = self.exchange_ids(sparse)
        pooled = self.host_sparse(local)  # 2. intra-host lookup
        out = self.host_towers(pooled)  # 3. tower modules
        virtual = self.return_to_home(out, dense.shape[0])
        return self.head(dense, virtual)  # 5. global head
