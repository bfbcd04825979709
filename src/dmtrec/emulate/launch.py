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

from dmtrec.parallel.launch import (
    FAILURE_GRACE_S,
    _result,
    _timedelta,
    die_with_parent,
    first_failure,
    run_rank,
)


def spawn_in_hosts(
    fn: Callable, args: tuple, hosts, ranks_per_host: int, timeout: float | None = None
) -> list[Any]:
    """Like ``spawn``, but each rank runs inside its emulated host's network namespace.

    ``hosts`` is an entered ``netns.EmulatedHosts``. Ranks are started with ``ip netns exec``
    (which execs the rank's Python, so the rank is this process's child and dies with it:
    ``die_with_parent``); rendezvous is at host 0's address; gloo binds to the host's veth
    (``GLOO_SOCKET_IFNAME``). Collectives time out after ``timeout`` seconds; a failure is
    reported as the rank that failed first (``parallel.launch.first_failure``).
    """
    import pickle
    import subprocess
    import tempfile

    world = hosts.hosts * ranks_per_host
    td = _timedelta(timeout)
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
                DMTREC_LAUNCHER_PID=str(os.getpid()),
                DMTREC_DIST_TIMEOUT_S=str(int(td.total_seconds())),
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
        outcomes: dict[int, tuple[str, Any]] = {}
        failed: dict[int, tuple[float, str, Any]] = {}
        first: float | None = None
        try:
            while len(outcomes) + len(failed) < world:
                now = time.monotonic()
                for rank, p in enumerate(procs):
                    if rank in outcomes or rank in failed:
                        continue
                    out = os.path.join(tmp, f"rank{rank}.pkl")
                    if os.path.exists(out):
                        with open(out, "rb") as f:
                            o = pickle.load(f)
                        if o[0] == "ok":
                            outcomes[rank] = o
                        else:
                            failed[rank] = (os.path.getmtime(out), *o)
                    elif p.poll() is not None:  # ended without writing its outcome
                        failed[rank] = (time.time(), "died", p.returncode)
                if failed:
                    first = first if first is not None else now
                    if now - first > FAILURE_GRACE_S:
                        break
                time.sleep(0.05)
            if failed:
                alive = [r for r in range(world) if r not in outcomes and r not in failed]
                raise first_failure(
                    failed, alive, td, lambda r: f" in {hosts.namespaces[r // ranks_per_host]}"
                )
            return [_result(rank, *outcomes[rank]) for rank in range(world)]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()


def _netns_main(job: str, out_dir: str) -> None:
    """Entry of a rank started by ``spawn_in_hosts`` (``python -m dmtrec.emulate.launch``)."""
    import pickle

    die_with_parent(int(os.environ["DMTREC_LAUNCHER_PID"]))
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
            timeout=_timedelta(float(os.environ["DMTREC_DIST_TIMEOUT_S"])),
        )

    status, payload = run_rank(rank, init, load_and_run, ())
    tmp = os.path.join(out_dir, f"rank{rank}.pkl.tmp")
    with open(tmp, "wb") as f:
        pickle.dump((status, payload), f)
    os.replace(tmp, os.path.join(out_dir, f"rank{rank}.pkl"))


if __name__ == "__main__":
    _netns_main(sys.argv[1], sys.argv[2])
