"""Process launch: H*L local gloo processes (emulated hosts), or whatever torchrun started.

Locally, ``spawn`` starts one process per rank on this machine; rendezvous and gloo traffic
stay on loopback (127.0.0.1, ``GLOO_SOCKET_IFNAME=lo``), every collective has a timeout, and
the processes are joined (or killed) before ``spawn`` returns. Under ``torchrun`` (real
clusters) the same worker runs with NCCL when CUDA is present: see the README.
"""

from __future__ import annotations

import datetime
import io
import os
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dmtrec.errors import DmtrecError

TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("DMTREC_DIST_TIMEOUT_S", "300")))


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


def init_local(rank: int, world_size: int, port: int, local_world_size: int) -> None:
    """Join a process group of local processes over loopback."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank % local_world_size),
        LOCAL_WORLD_SIZE=str(local_world_size),
    )
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        backend(),
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=TIMEOUT,
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


def init_from_env() -> None:
    """Join the process group torchrun describes (env://): NCCL with CUDA, else gloo."""
    rank_device()  # makes the rank's GPU current before NCCL sees it
    dist.init_process_group(backend(), init_method="env://", timeout=TIMEOUT)


def run_rank(rank: int, init: Callable[[], None], fn: Callable, args: tuple) -> tuple[str, Any]:
    """Body of every worker process: join the group, run ``fn``, return (status, payload).

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
        return "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _worker(
    rank: int, world: int, local: int, port: int, fn: Callable, args: tuple, q: Any
) -> None:
    status, payload = run_rank(rank, lambda: init_local(rank, world, port, local), fn, args)
    q.put((rank, status, payload))


def _result(rank: int, status: str, payload: Any) -> Any:
    if status == "user":
        raise DmtrecError(payload)
    if status == "error":
        raise RuntimeError(f"rank {rank} failed: {payload}")
    return torch.load(io.BytesIO(payload), weights_only=False)


def spawn(fn: Callable, args: tuple, world_size: int, ranks_per_host: int) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` local processes; return each rank's result.

    A worker's ``DmtrecError`` comes back as a ``DmtrecError``; any other failure as a
    ``RuntimeError`` carrying the worker's traceback.
    """
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker, args=(r, world_size, ranks_per_host, port, fn, args, q), daemon=True
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        while len(results) < world_size:
            if q.empty():
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} died (exit code {procs[dead[0]].exitcode})")
                time.sleep(0.05)
                continue
            rank, status, payload = q.get()
            results[rank] = _result(rank, status, payload)
        for p in procs:
            p.join(timeout=TIMEOUT.total_seconds())
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world_size)]


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
