"""Starting ranks inside emulated hosts: each rank runs in its host's network namespace.

``spawn_in_hosts`` is ``dmtrec.parallel.launch.spawn`` for ranks that must sit behind the
shaped links of ``emulate.netns``: processes are started with ``ip netns exec`` and meet at
host 0's namespace address (assigned by ``EmulatedHosts``, never a real interface).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from dmtrec.parallel.launch import TIMEOUT, _result, run_rank


def spawn_in_hosts(fn: Callable, args: tuple, hosts, ranks_per_host: int) -> list[Any]:
    """Like ``spawn``, but each rank runs inside its emulated host's network namespace.

    ``hosts`` is an entered ``netns.EmulatedHosts``. Ranks are started with ``ip netns exec``;
    rendezvous is at host 0's address; gloo binds to the host's veth (``GLOO_SOCKET_IFNAME``).
    """
    import pickle
    import subprocess
    import tempfile

    world = hosts.hosts * ranks_per_host
    port = 29400 + os.getpid() % 1000
    with tempfile.TemporaryDirectory(prefix="dmtrec-netns-") as tmp:
        job = os.path.join(tmp, "job.pkl")
        with open(job, "wb") as f:
            pickle.dump((fn, args), f)
        procs = []
        for rank in range(world):
            h = rank // ranks_per_host
            env = dict(
                os.environ,
                MASTER_ADDR=hosts.addresses[0],
                MASTER_PORT=str(port),
                RANK=str(rank),
                WORLD_SIZE=str(world),
                LOCAL_RANK=str(rank % ranks_per_host),
                LOCAL_WORLD_SIZE=str(ranks_per_host),
                GLOO_SOCKET_IFNAME=hosts.ifnames[h],
                # the job may pickle functions of modules found on this process's path
                PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
            )
            cmd = [
                "ip",
                "netns",
                "exec",
                hosts.namespaces[h],
                sys.executable,
                "-m",
                "dmtrec.emulate.launch",
                job,
                tmp,
            ]
            procs.append(subprocess.Popen(cmd, env=env))
        deadline = time.monotonic() + TIMEOUT.total_seconds() * 2
        try:
            while any(p.poll() is None for p in procs):
                failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            outcomes: list[tuple[str, Any] | None] = []
            for rank in range(world):
                out = os.path.join(tmp, f"rank{rank}.pkl")
                if os.path.exists(out):
                    with open(out, "rb") as f:
                        outcomes.append(pickle.load(f))
                else:
                    outcomes.append(None)
            # report the first rank that failed by itself, not one left waiting for it
            for rank, o in enumerate(outcomes):
                if o is not None and o[0] != "ok":
                    _result(rank, *o)
            for rank, o in enumerate(outcomes):
                if o is None:
                    code = procs[rank].poll()
                    ns = hosts.namespaces[rank // ranks_per_host]
                    raise RuntimeError(f"rank {rank} in {ns} ended without a result (exit {code})")
            results = [_result(rank, *o) for rank, o in enumerate(outcomes)]
            return results
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()


def _netns_main(job: str, out_dir: str) -> None:
    """Entry of a rank started by ``spawn_in_hosts`` (``python -m dmtrec.emulate.launch``)."""
    import pickle

    rank = int(os.environ["RANK"])

    def load_and_run() -> Any:
        with open(job, "rb") as f:
            fn, args = pickle.load(f)
        return fn(*args)

    def init() -> None:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
            rank=rank,
            world_size=int(os.environ["WORLD_SIZE"]),
            timeout=TIMEOUT,
        )

    status, payload = run_rank(rank, init, load_and_run, ())
    tmp = os.path.join(out_dir, f"rank{rank}.pkl.tmp")
    with open(tmp, "wb") as f:
        pickle.dump((status, payload), f)
    os.replace(tmp, os.path.join(out_dir, f"rank{rank}.pkl"))


if __name__ == "__main__":
    _netns_main(sys.argv[1], sys.argv[2])
