"""Process launch: H*L local gloo processes (emulated hosts), or whatever torchrun started.

Locally, ``spawn`` starts one process per rank on this machine; rendezvous and gloo traffic
stay on loopback (127.0.0.1, ``GLOO_SOCKET_IFNAME=lo``), every collective has a timeout
(``--timeout``), and the processes are joined (or killed) before ``spawn`` returns. Workers
never outlive their launcher: each asks the kernel for SIGKILL when its parent dies
(``prctl(PR_SET_PDEATHSIG)``, ``parallel/lifeline.py``) before it imports anything heavy, so
even a kill -9 of the launcher leaves no orphan.

When a rank fails, the others fail soon after in their next collective ("connection closed
by peer"); ``spawn`` waits a moment for every rank's outcome and reports the one that failed
first by itself -- a rank that died (``RankFailed``: killed, out of memory, ...), a user error,
a bug -- never a peer that only lost it. Under ``torchrun`` (real clusters) the same worker runs
with NCCL when CUDA is present: see the README.
"""

from __future__ import annotations

import datetime
import io
import os
import re
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from dmtrec.errors import DmtrecError

TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("DMTREC_DIST_TIMEOUT_S", "300")))
# after the first failure, how long to wait for the other ranks' outcomes before judging
FAILURE_GRACE_S = 5.0


class RankFailed(DmtrecError):
    """A rank of a distributed run ended without a result (killed, crashed, or hung past
    ``--timeout``); ``rank`` is the one that failed first. Restartable (``--max-restarts``)."""

    def __init__(self, message: str, rank: int) -> None:
        super().__init__(message)
        self.rank = rank


def _timedelta(timeout: float | datetime.timedelta | None) -> datetime.timedelta:
    if timeout is None:
        return TIMEOUT
    if isinstance(timeout, datetime.timedelta):
        return timeout
    return datetime.timedelta(seconds=float(timeout))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def gpu_per_rank() -> bool:
    """True when this host has a GPU for each of its local ranks (then: NCCL, one GPU a rank).

    Several emulated ranks on one GPU would share it and NCCL refuses two ranks on one
    device, so such runs stay on CPU/gloo; ``DMTREC_BACKEND=nccl`` forces NCCL (and fails
    clearly where it cannot work).
    """
    return torch.cuda.is_available() and torch.cuda.device_count() >= _local_world_size()


def backend() -> str:
    """``nccl`` or ``gloo`` (``DMTREC_BACKEND`` overrides), consistent with ``rank_device``."""
    forced = os.environ.get("DMTREC_BACKEND")
    if forced is not None:
        if forced not in ("nccl", "gloo"):
            raise DmtrecError(f"DMTREC_BACKEND must be nccl or gloo, not {forced!r}")
        if forced == "nccl" and not gpu_per_rank():
            raise DmtrecError(
                f"DMTREC_BACKEND=nccl needs one GPU per local rank: {_local_world_size()} local "
                f"ranks, {torch.cuda.device_count() if torch.cuda.is_available() else 0} GPUs"
            )
        return forced
    return "nccl" if gpu_per_rank() else "gloo"


def rank_device() -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` on the NCCL path (and made current),
    else the CPU. Every batch, buffer and collective tensor of the rank lives there."""
    if backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously); read timers after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def init_local(
    rank: int,
    world_size: int,
    port: int,
    local_world_size: int,
    timeout: float | datetime.timedelta | None = None,
) -> None:
    """Join a process group of local processes over loopback (collectives time out after
    ``timeout`` seconds, default ``TIMEOUT``)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank % local_world_size),
        LOCAL_WORLD_SIZE=str(local_world_size),
    )
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    join_group("127.0.0.1", port, rank, world_size, timeout)


# Rendezvous: how long ranks may take to *start* (imports on a loaded box, a slow host), apart
# from --timeout, which bounds a *collective* (a hung peer).
RENDEZVOUS_S = 600.0


def join_group(
    addr: str,
    port: int,
    rank: int,
    world_size: int,
    timeout: float | datetime.timedelta | None,
    *,
    host_store: bool = True,
    attempt: int = 0,
) -> None:
    """Join the default process group at ``addr:port`` (rank 0 hosts the TCPStore, unless
    ``host_store`` is false: torchrun's agent hosts it).

    Every rank first waits on the store until all ``world_size`` ranks have arrived (up to
    ``RENDEZVOUS_S``); only then is the group built, with ``timeout`` for its collectives. So a
    short ``--timeout`` names a hung peer, and is never hit by ranks that merely started a few
    seconds apart (gloo's mesh connect would otherwise wait only ``timeout`` for the last).
    All keys live under ``attempt`` (torchrun's restart count): a store that outlives a failed
    attempt (torchrun's agent store) must not hand a restarted rank its dead peer's address."""
    rendezvous = datetime.timedelta(seconds=max(RENDEZVOUS_S, _timedelta(timeout).total_seconds()))
    server = dist.TCPStore(
        addr,
        port,
        world_size,
        is_master=host_store and rank == 0,
        timeout=rendezvous,
        wait_for_workers=False,
    )
    store = dist.PrefixStore(f"dmtrec/attempt-{attempt}", server)
    store.add("arrived", 1)
    deadline = time.monotonic() + rendezvous.total_seconds()
    while store.add("arrived", 0) < world_size:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"rank {rank}: not all {world_size} ranks arrived within {RENDEZVOUS_S:.0f} s"
            )
        time.sleep(0.02)
    dist.init_process_group(
        backend(), store=store, rank=rank, world_size=world_size, timeout=_timedelta(timeout)
    )


# Library warnings a dmtrec user cannot act on, each matched by its message (regex, from the
# start). Anything else still shows: a new warning is news.
KNOWN_NOISE = (
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor"),
    (DeprecationWarning, r"`torch\.jit\.(script|interface)` is deprecated"),
    (DeprecationWarning, r"distutils Version classes are deprecated"),
    (
        DeprecationWarning,
        r"This API is deprecated\. Please use Pytorch Distributed's _apply_optimizer",
    ),
    (FutureWarning, r"HeuristicalStorageReservation is known to cause issues"),
    (FutureWarning, r"`broadcast_buffers` is deprecated"),
    # TorchRec's row-wise sharding (comm_ops) still calls the renamed collective
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),
    (DeprecationWarning, r"\x1b\[93m"),  # fbgemm's coloured notices of its legacy op names
)
# Python loggers whose WARNING records are planner advice about dry runs (not our case).
NOISY_LOGGERS = ("torchrec.distributed.planner", "torch.fx._symbolic_trace")


def quiet_libraries() -> None:
    """Silence the known library noise (``KNOWN_NOISE``) here and in the workers this process
    spawns; every other warning still reaches the user."""
    import logging
    import warnings

    for category, message in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    os.environ["DMTREC_QUIET"] = "1"
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def init_from_env(timeout: float | datetime.timedelta | None = None) -> None:
    """Join the process group torchrun describes (its MASTER_ADDR/PORT store, RANK,
    WORLD_SIZE; keys per restart attempt): NCCL with CUDA, else gloo."""
    rank_device()  # makes the rank's GPU current before NCCL sees it
    env = os.environ
    join_group(
        env["MASTER_ADDR"],
        int(env["MASTER_PORT"]),
        int(env["RANK"]),
        int(env["WORLD_SIZE"]),
        timeout,
        host_store=env.get("TORCHELASTIC_USE_AGENT_STORE") != "True",
        attempt=int(env.get("TORCHELASTIC_RESTART_COUNT", "0")),
    )


# gloo/c10d messages of a collective that lost its peer (the peer failed, not this rank)
_PEER_LOST = re.compile(
    r"Connection (closed|reset) by peer|Broken pipe|Connection refused|Timed out waiting|"
    r"[Tt]imeout|ECONNRESET|EPIPE|Socket closed|Connection timed out|NCCL communicator was aborted"
)


def lost_peer(e: BaseException) -> bool:
    """Whether ``e`` is a collective failing because another rank went away or hung."""
    dist_error = getattr(dist, "DistError", ())
    return isinstance(e, dist_error) or bool(_PEER_LOST.search(str(e)))


def run_rank(rank: int, init: Callable[[], None], fn: Callable, args: tuple) -> tuple[str, Any]:
    """Body of every worker process: join the group, run ``fn``, return (status, payload).
    status: ``ok`` (payload: the result), ``user`` (a ``DmtrecError``), ``peer`` (a collective
    that lost another rank), ``error`` (anything else: a bug; payload with the traceback).

    The payload is plain bytes (``torch.save``): tensors sent between processes directly
    travel as shared-memory handles that die with the worker before the parent reads them.
    """
    torch.set_num_threads(1)
    if os.environ.get("DMTREC_QUIET"):
        quiet_libraries()
    try:
        init()
        result = fn(*args)
        buf = io.BytesIO()
        torch.save(result, buf)
        return "ok", buf.getvalue()
    except DmtrecError as e:
        return "user", str(e)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises
        status = "peer" if lost_peer(e) else "error"
        return status, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def child_main(job: str, out_dir: str) -> None:
    """A worker's body after ``lifeline.boot``: join the group the environment describes
    (``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``, ``DMTREC_DIST_TIMEOUT_S``), run
    the pickled ``(fn, args)`` of ``job`` and write ``(status, payload)`` (``run_rank``'s) to
    ``out_dir/rank<R>.pkl``, atomically."""
    import pickle

    rank = int(os.environ["RANK"])

    def load_and_run() -> Any:
        with open(job, "rb") as f:
            fn, args = pickle.load(f)
        return fn(*args)

    def init() -> None:
        join_group(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            rank,
            int(os.environ["WORLD_SIZE"]),
            float(os.environ["DMTREC_DIST_TIMEOUT_S"]),
        )

    status, payload = run_rank(rank, init, load_and_run, ())
    tmp = os.path.join(out_dir, f"rank{rank}.pkl.tmp")
    with open(tmp, "wb") as f:
        pickle.dump((status, payload), f)
    os.replace(tmp, os.path.join(out_dir, f"rank{rank}.pkl"))


def _result(rank: int, status: str, payload: Any) -> Any:
    if status == "user":
        raise DmtrecError(payload)
    if status in ("error", "peer"):
        raise RuntimeError(f"rank {rank} failed: {payload}")
    return torch.load(io.BytesIO(payload), weights_only=False)


def describe_exit(code: int | None) -> str:
    """``exit code 3`` / ``killed by SIGKILL`` for a process's exit status."""
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def first_failure(
    outcomes: dict[int, tuple[float, str, Any]],
    alive: list[int],
    timeout: datetime.timedelta,
    where: Callable[[int], str] = lambda r: "",
) -> Exception:
    """The error to report for a failed run, from each failed rank's (time, status, payload)
    -- status as ``run_rank``'s, or ``died`` with the exit status as payload -- and the ranks
    still running. A rank that failed by itself wins over those that only lost it (``peer``);
    among equals, the earliest. Only ``peer`` failures and a rank still running: it hung."""
    own = {r: o for r, o in outcomes.items() if o[1] != "peer"}
    if own:
        rank = min(own, key=lambda r: (own[r][0], r))
        _, status, payload = own[rank]
        if status == "died":
            return RankFailed(
                f"rank {rank}{where(rank)} died ({describe_exit(payload)}); the other ranks "
                "stopped with it",
                rank,
            )
        if status == "user":
            return DmtrecError(payload)
        return RuntimeError(f"rank {rank}{where(rank)} failed: {payload}")
    if alive:
        rank = alive[0]
        return RankFailed(
            f"rank {rank}{where(rank)} did not answer within --timeout "
            f"{timeout.total_seconds():g} s; the other ranks timed out waiting for it",
            rank,
        )
    rank = min(outcomes, key=lambda r: (outcomes[r][0], r))
    first_line = str(outcomes[rank][2]).splitlines()[0]
    return RankFailed(f"rank {rank}{where(rank)} lost its peers: {first_line}", rank)


def start_ranks(
    fn: Callable,
    args: tuple,
    envs: list[dict[str, str]],
    timeout: float | datetime.timedelta | None = None,
    prefixes: list[list[str]] | None = None,
    where: Callable[[int], str] = lambda r: "",
) -> list[Any]:
    """Run ``fn(*args)`` in one new process per rank -- rank r with environment ``envs[r]``
    (its ``RANK``, ``MASTER_ADDR``, ...), started behind ``prefixes[r]`` (e.g. ``ip netns
    exec NS``) -- and return each rank's result; the common part of ``spawn`` and
    ``emulate.launch.spawn_in_hosts``.

    Each process runs ``lifeline.boot`` first (dies with this process, even before it has
    imported torch), then ``child_main``; ``fn`` must be importable by module name (not defined
    in ``__main__``). The processes are polled until each has a result or one failed; a
    failure waits ``FAILURE_GRACE_S`` for the other ranks' outcomes and raises
    ``first_failure``'s error. Every process is killed before this returns.
    """
    import pickle
    import subprocess
    import tempfile

    from dmtrec.parallel.lifeline import BOOT

    if getattr(fn, "__module__", None) == "__main__":
        raise ValueError(
            f"{getattr(fn, '__qualname__', fn)} is defined in __main__: workers import the "
            "function by module name, so define it in a module"
        )
    td = _timedelta(timeout)
    world = len(envs)
    prefixes = prefixes or [[] for _ in range(world)]
    path = os.pathsep.join(p for p in sys.path if p)  # the job may pickle test/script modules
    with tempfile.TemporaryDirectory(prefix="dmtrec-ranks-") as tmp:
        job = os.path.join(tmp, "job.pkl")
        with open(job, "wb") as f:
            pickle.dump((fn, args), f)
        procs = []
        try:
            for r in range(world):
                env = dict(
                    os.environ,
                    **envs[r],
                    DMTREC_DIST_TIMEOUT_S=str(td.total_seconds()),
                    PYTHONPATH=path,
                )
                cmd = [*prefixes[r], sys.executable, "-c", BOOT, str(os.getpid()), job, tmp]
                procs.append(subprocess.Popen(cmd, env=env))
            outcomes: dict[int, tuple[str, Any]] = {}
            failed: dict[int, tuple[float, str, Any]] = {}
            first: float | None = None
            while len(outcomes) + len(failed) < world:
                now = time.monotonic()
                for r, p in enumerate(procs):
                    if r in outcomes or r in failed:
                        continue
                    out = os.path.join(tmp, f"rank{r}.pkl")
                    if os.path.exists(out):  # written (atomically) before the process ends
                        with open(out, "rb") as f:
                            o = pickle.load(f)
                        if o[0] == "ok":
                            outcomes[r] = o
                        else:
                            failed[r] = (os.path.getmtime(out), *o)
                    elif p.poll() is not None:  # ended without writing its outcome
                        failed[r] = (time.time(), "died", p.returncode)
                if failed:
                    first = first if first is not None else now
                    if now - first > FAILURE_GRACE_S:
                        break
                time.sleep(0.05)
            if failed:
                alive = [r for r in range(world) if r not in outcomes and r not in failed]
                raise first_failure(failed, alive, td, where)
            return [_result(r, *outcomes[r]) for r in range(world)]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()


def spawn(
    fn: Callable,
    args: tuple,
    world_size: int,
    ranks_per_host: int,
    timeout: float | datetime.timedelta | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` local processes over loopback; return each rank's
    result (see ``start_ranks``: ``fn`` must be importable; the workers die with this process).

    Collectives time out after ``timeout`` seconds (default ``TIMEOUT``). On failure the error
    is that of the rank that failed first (``first_failure``): ``RankFailed`` for a rank that
    died or hung, the worker's ``DmtrecError`` as a ``DmtrecError``, any other failure as a
    ``RuntimeError`` carrying the worker's traceback.
    """
    port = str(free_port())
    envs = [
        dict(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            RANK=str(r),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(r % ranks_per_host),
            LOCAL_WORLD_SIZE=str(ranks_per_host),
            GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
        )
        for r in range(world_size)
    ]
    return start_ranks(fn, args, envs, timeout)


def run_single(fn: Callable, args: tuple, kwargs: dict | None = None) -> Any:
    """Run ``fn`` in this process inside a one-rank group (TorchRec's fused kernels need one)."""
    kwargs = kwargs or {}
    if dist.is_initialized():
        return fn(*args, **kwargs)
    saved = dict(os.environ)
    init_local(0, 1, free_port(), 1)
    try:
        return fn(*args, **kwargs)
    finally:
        dist.destroy_process_group()
        os.environ.clear()  # init_local's RANK/WORLD_SIZE would look like a torchrun launch
        os.environ.update(saved)
