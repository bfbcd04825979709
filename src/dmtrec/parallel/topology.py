"""Two-tier cluster topology: H hosts x L ranks per host, and its process groups.

Global rank r lives on host r // L with local rank r % L (torchrun's convention: ranks of one
host are contiguous, LOCAL_WORLD_SIZE = L). DMT uses two kinds of groups:
- intra-host group of host h: ranks {h*L, ..., h*L + L - 1} (the fast link, NVLink);
- cross-host peer group of local rank l: ranks {l, L + l, ..., (H-1)*L + l} (one per host,
  the slow link): SPTT's AlltoAlls run here, among H ranks instead of all N.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch.distributed as dist

from dmtrec.errors import ConfigError


@dataclass(frozen=True)
class Topology:
    """H hosts x L ranks per host."""

    hosts: int
    ranks_per_host: int

    def __post_init__(self) -> None:
        if self.hosts < 1 or self.ranks_per_host < 1:
            raise ConfigError("--hosts and --ranks-per-host must be >= 1")

    @property
    def world_size(self) -> int:
        return self.hosts * self.ranks_per_host

    def host_of(self, rank: int) -> int:
        return rank // self.ranks_per_host

    def local_rank(self, rank: int) -> int:
        return rank % self.ranks_per_host

    def host_ranks(self, host: int) -> list[int]:
        return [host * self.ranks_per_host + i for i in range(self.ranks_per_host)]

    def peer_ranks(self, local_rank: int) -> list[int]:
        return [h * self.ranks_per_host + local_rank for h in range(self.hosts)]

    def link(self, src: int, dst: int) -> str:
        """Link class between two global ranks: 'local' (same rank), 'intra' or 'cross'."""
        if src == dst:
            return "local"
        return "intra" if self.host_of(src) == self.host_of(dst) else "cross"

    @classmethod
    def from_torchrun(
        cls, hosts: int = 1, ranks_per_host: int = 1, env: Mapping[str, str] | None = None
    ) -> Topology:
        """The topology torchrun started (``from_env``), checked against ``--hosts`` and
        ``--ranks-per-host``: under torchrun the environment decides, so an option left at
        its default (1) takes the environment's value and any other value must equal it
        (a disagreement is a one-line error naming the option and the environment value)."""
        env = os.environ if env is None else env
        try:
            world = int(env["WORLD_SIZE"])
            local = int(env.get("LOCAL_WORLD_SIZE", world))
        except (KeyError, ValueError) as e:
            raise ConfigError(f"WORLD_SIZE/LOCAL_WORLD_SIZE are not set to integers: {e}") from None
        if local < 1 or world % local:
            raise ConfigError(
                f"LOCAL_WORLD_SIZE={local} (ranks per host) does not divide WORLD_SIZE={world}"
            )
        if ranks_per_host not in (1, local):
            raise ConfigError(
                f"--ranks-per-host {ranks_per_host} disagrees with torchrun's "
                f"LOCAL_WORLD_SIZE={local} (leave it out under torchrun)"
            )
        if hosts not in (1, world // local):
            raise ConfigError(
                f"--hosts {hosts} disagrees with torchrun's WORLD_SIZE={world} / "
                f"LOCAL_WORLD_SIZE={local} = {world // local} hosts (leave it out under torchrun)"
            )
        return cls(world // local, local)

    @classmethod
    def from_env(cls) -> Topology:
        """From torchrun's WORLD_SIZE and LOCAL_WORLD_SIZE."""
        return cls.from_torchrun()

    @classmethod
    def from_world(cls, world_size: int, ranks_per_host: int) -> Topology:
        if ranks_per_host < 1 or world_size % ranks_per_host:
            raise ConfigError(
                f"--ranks-per-host {ranks_per_host} does not divide the world size {world_size}"
            )
        return cls(world_size // ranks_per_host, ranks_per_host)


@dataclass
class ProcessGroups:
    """This rank's groups: the whole world, its host, and its cross-host peers."""

    topology: Topology
    rank: int
    world: dist.ProcessGroup
    intra: dist.ProcessGroup
    peer: dist.ProcessGroup


def make_process_groups(topology: Topology) -> ProcessGroups:
    """Create every intra-host and peer group (collective: all ranks call it, same order)."""
    rank = dist.get_rank()
    if dist.get_world_size() != topology.world_size:
        raise ConfigError(
            f"world size {dist.get_world_size()} != hosts x ranks-per-host "
            f"({topology.hosts} x {topology.ranks_per_host})"
        )
    intra = peer = None
    for h in range(topology.hosts):
        g = dist.new_group(topology.host_ranks(h))
        if topology.host_of(rank) == h:
            intra = g
    for lr in range(topology.ranks_per_host):
        g = dist.new_group(topology.peer_ranks(lr))
        if topology.local_rank(rank) == lr:
            peer = g
    assert intra is not None and peer is not None
    return ProcessGroups(topology, rank, dist.group.WORLD, intra, peer)
