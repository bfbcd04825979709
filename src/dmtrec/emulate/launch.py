"""Starting ranks inside emulated hosts: each rank runs in its host's network namespace.

``spawn_in_hosts`` is ``dmtrec.parallel.launch.spawn`` for ranks that must sit behind the
shaped links of ``emulate.netns``: processes are started with ``ip netns exec`` and meet at
host 0's namespace address (assigned by ``EmulatedHosts``, never a real interface).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from dmtrec.parallel.launch import start_ranks


def spawn_in_hosts(
    fn: Callable, args: tuple, hosts, ranks_per_host: int, timeout: float | None = None
) -> list[Any]:
    """Like ``spawn``, but each rank runs inside its emulated host's network namespace.

    ``hosts`` is an entered ``netns.EmulatedHosts``. Ranks are started with ``ip netns exec``,
    which execs the rank's Python, so each rank is this process's child and dies with it
    (``parallel/lifeline.py``); rendezvous is at host 0's address; gloo binds to the host's
    veth (``GLOO_SOCKET_IFNAME``). Collectives time out after ``timeout`` seconds; a failure
    is reported as the rank that failed first, with its namespace.
    """
    world = hosts.hosts * ranks_per_host
    port = 29400 + os.getpid() % 1000
    envs = [
        dict(
            MASTER_ADDR=hosts.addresses[0],
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank % ranks_per_host),
            LOCAL_WORLD_SIZE=str(ranks_per_host),
            GLOO_SOCKET_IFNAME=hosts.ifnames[rank // ranks_per_host],
            DMTREC_BACKEND="gloo",  # the namespaces' links are veths: CPU ranks over gloo
        )
        for rank in range(world)
    ]
    prefixes = [
        ["ip", "netns", "exec", hosts.namespaces[rank // ranks_per_host]] for rank in range(world)
    ]
    return start_ranks(
        fn,
        args,
        envs,
        timeout,
        prefixes,
        where=lambda r: f" in {hosts.namespaces[r // ranks_per_host]}",
    )
